"""A peer's P-256 key kept as its point (``StoredP256Key``, docs/footprint.md) does all
that cryptography's own key object does for the daemon, at a twentieth of the memory."""

from __future__ import annotations

import base64
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import dns.name
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from oe_router.dns.ipseckey import PeerKey, interpret
from oe_router.ike.auth import ECDSA_P256_SHA256
from oe_router.storedkey import StoredP256Key

SRC = Path(__file__).resolve().parents[2] / "src"


def _pair() -> tuple[ec.EllipticCurvePrivateKey, StoredP256Key]:
    private = ec.generate_private_key(ec.SECP256R1())
    point = private.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
    return private, StoredP256Key(point)


def test_it_is_the_same_key_in_every_use() -> None:
    private, stored = _pair()
    real = private.public_key()
    assert isinstance(stored, ec.EllipticCurvePublicKey)
    assert isinstance(stored.curve, ec.SECP256R1) and stored.key_size == 256
    assert stored == real and real == stored
    assert (stored != real) is False and (real != stored) is False
    assert stored != _pair()[1] and stored != "a key"
    assert stored.public_numbers() == real.public_numbers()
    for enc, fmt in (
        (Encoding.DER, PublicFormat.SubjectPublicKeyInfo),
        (Encoding.PEM, PublicFormat.SubjectPublicKeyInfo),
        (Encoding.X962, PublicFormat.CompressedPoint),
    ):
        assert stored.public_bytes(enc, fmt) == real.public_bytes(enc, fmt)
    sig = private.sign(b"octets", ec.ECDSA(hashes.SHA256()))
    stored.verify(sig, b"octets", ec.ECDSA(hashes.SHA256()))
    with pytest.raises(InvalidSignature):
        stored.verify(sig, b"other", ec.ECDSA(hashes.SHA256()))
    assert ECDSA_P256_SHA256.verify(stored, ECDSA_P256_SHA256.sign(private, b"x"), b"x")
    assert copy.copy(stored) == stored and copy.deepcopy(stored) == stored
    with pytest.raises(TypeError):
        hash(stored)  # as cryptography's own key objects: not hashable


def test_a_point_off_the_curve_is_refused_when_made() -> None:
    point = bytearray(_pair()[1].point)
    point[-1] ^= 1
    with pytest.raises(ValueError):
        StoredP256Key(bytes(point))


def test_an_ecdsa_ipseckey_gives_a_stored_key() -> None:
    private, stored = _pair()
    for alg, blob in ((3, stored.point[1:]), (3, stored.point)):
        text = f"10 0 {alg} . {base64.b64encode(blob).decode()}"
        rd = dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.IPSECKEY, text)
        got = interpret(dns.name.from_text("host.example."), rd)
        assert isinstance(got, PeerKey) and isinstance(got.public_key, StoredP256Key)
        assert got.public_key == private.public_key()


def test_a_thousand_stored_keys_take_a_fraction_of_the_memory() -> None:
    """A fresh interpreter makes 2,000 keys each way from the same point and reads RSS."""
    code = """
import json
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from oe_router.storedkey import StoredP256Key
def rss():
    for line in open("/proc/self/smaps_rollup"):
        if line.startswith("Rss:"):
            return int(line.split()[1])
k = ec.generate_private_key(ec.SECP256R1()).public_key()
point = k.public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
a = rss()
stored = [StoredP256Key(point) for _ in range(2000)]
b = rss()
real = [ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point) for _ in range(2000)]
c = rss()
print(json.dumps({"stored": (b - a) * 1024 / 2000, "real": (c - b) * 1024 / 2000}))
"""
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    doc = json.loads(out.stdout)
    assert doc["stored"] < 400 and doc["real"] > 1500, doc
