"""The router's own key, made on first start (ike/hostkey.py, IkeService._load_key), the
IPSECKEY form it is published in (dns/ipseckey.rdata_text) and the atomic writer."""

from __future__ import annotations

import dataclasses
import logging
import os
import stat
from pathlib import Path

import dns.name
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from oe_router.atomic import write_atomic
from oe_router.config.schema import IdentityConfig, OeConfig
from oe_router.dns.ipseckey import KeyKind, PeerKey, interpret, rdata_text
from oe_router.ike.errors import IkeError
from oe_router.ike.hostkey import generate_key_file, publish_line
from oe_router.ike.service import IkeService, load_private_key

OWNER = dns.name.from_text("router.example.test")


def _config(path: Path, local_id: str = "@router.example.test") -> OeConfig:
    return dataclasses.replace(OeConfig(), identity=IdentityConfig(local_id, str(path)))


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_key_file_is_p256_mode_0600_and_never_replaced(tmp_path: Path) -> None:
    path = tmp_path / "etc" / "oe" / "private.pem"
    old = os.umask(0)  # the mode must not depend on the umask
    try:
        key = generate_key_file(path)
    finally:
        os.umask(old)
    assert _mode(path) == 0o600
    loaded = load_private_key(path.read_bytes(), str(path))
    assert isinstance(loaded, ec.EllipticCurvePrivateKey) and loaded.curve.name == "secp256r1"
    assert loaded.private_numbers() == key.private_numbers()
    before = path.read_bytes()
    with pytest.raises(FileExistsError):
        generate_key_file(path)
    assert path.read_bytes() == before
    assert sorted(os.listdir(path.parent)) == ["private.pem"]  # no temporary file left


def test_write_atomic_replaces_whole_files(tmp_path: Path) -> None:
    path = tmp_path / "f"
    write_atomic(path, b"one", 0o644)
    write_atomic(path, b"two", 0o640)
    assert path.read_bytes() == b"two" and _mode(path) == 0o640
    with pytest.raises(FileExistsError):
        write_atomic(path, b"three", exclusive=True)
    assert path.read_bytes() == b"two" and sorted(os.listdir(tmp_path)) == ["f"]


@pytest.mark.parametrize(
    ("private", "kind"),
    [
        (ec.generate_private_key(ec.SECP256R1()), KeyKind.ECDSA_P256),
        (ed25519.Ed25519PrivateKey.generate(), KeyKind.ED25519),
        (rsa.generate_private_key(65537, 2048), KeyKind.RSA),
    ],
    ids=["ecdsa", "ed25519", "rsa"],
)
def test_published_form_reads_back_as_the_same_key(private: object, kind: KeyKind) -> None:
    public = private.public_key()  # type: ignore[attr-defined]
    text = rdata_text(public)
    assert text.startswith("10 0 ")
    rdata = dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.IPSECKEY, text)
    key = interpret(OWNER, rdata)  # type: ignore[arg-type]
    assert isinstance(key, PeerKey) and key.kind is kind
    assert key.public_key is not None
    spki = (Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    assert key.public_key.public_bytes(*spki) == public.public_bytes(*spki)


def test_publish_line_names_the_identity() -> None:
    public = ec.generate_private_key(ec.SECP256R1()).public_key()
    rdata = rdata_text(public)
    assert publish_line("@router.example.test", public) == (
        f"router.example.test. IN IPSECKEY {rdata}"
    )
    assert publish_line("192.0.2.1", public).startswith(
        "1.2.0.192.in-addr.arpa. IN IPSECKEY 10 0 3 "
    )


def test_first_start_makes_the_key_an_fqdn_identity_needs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "oe" / "private.pem"
    service = IkeService(["127.0.0.1"])
    caplog.set_level(logging.INFO, "oe_router.ike")
    service._load_key(_config(path))
    assert path.is_file() and _mode(path) == 0o600
    key = load_private_key(path.read_bytes(), str(path))
    publish = rdata_text(key.public_key())
    (line,) = [r.getMessage() for r in caplog.records if "made one" in r.getMessage()]
    assert line == (
        f"identity @router.example.test: no key at {path}, made one (ECDSA P-256, mode 0600);"
        f" publish: router.example.test. IN IPSECKEY {publish}"
    )
    assert "PRIVATE" not in caplog.text and path.read_text().split("\n")[1] not in caplog.text
    service.config = _config(path)
    assert service.identity() == {
        "local_id": "@router.example.test",
        "key": f"ECDSA-P256 {path}",
        "ipseckey": publish,
    }
    # the next start loads it, and says nothing new
    caplog.clear()
    again = IkeService(["127.0.0.1"])
    again._load_key(_config(path))
    assert again.private_key is not None and "made one" not in caplog.text
    assert rdata_text(again.private_key.public_key()) == publish


def test_null_identity_makes_no_key(tmp_path: Path) -> None:
    path = tmp_path / "private.pem"
    service = IkeService(["127.0.0.1"])
    service._load_key(_config(path, "%null"))
    assert not path.exists() and service.private_key is None


def test_key_that_cannot_be_written_is_one_error_naming_the_option(tmp_path: Path) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("")  # a file where the key's directory should be
    service = IkeService(["127.0.0.1"])
    with pytest.raises(IkeError, match=r"^identity\.private_key .*file/private\.pem: "):
        service._load_key(_config(blocked / "private.pem"))
