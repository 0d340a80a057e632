"""What an established IKE SA keeps per peer (docs/footprint.md, ``rss_per_sa_bytes``):
objects that hold no key are shared between IKE SAs, a Child SA keeps no copy of the
selectors its IKE SA was configured with, and the keys stay each SA's own."""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
from pathlib import Path

from oe_router.ike.payloads import TrafficSelector
from oe_router.ike.selectors import intersect
from tests.ike_pair import configs, establish, replace

SRC = Path(__file__).resolve().parents[2] / "src"


def test_two_ike_sas_share_their_keyless_parts_and_not_their_keys() -> None:
    ini_cfg, res_cfg = configs()
    ini1, res1, _, _ = establish(ini_cfg, res_cfg)
    ini2, res2, _, _ = establish(ini_cfg, res_cfg)
    k1, k2 = ini1.link.keys, ini2.link.keys
    assert k1 is not None and k2 is not None
    assert k1.prf is k2.prf
    assert k1.choice is k2.choice
    assert ini1.link.settings is ini2.link.settings
    assert res1.link.settings is res2.link.settings
    assert k1.send.sk_e != k2.send.sk_e and k1.keys.sk_d != k2.keys.sk_d


def test_a_child_sa_keeps_the_configured_selectors_not_copies() -> None:
    ini_cfg, res_cfg = configs()
    _, _, ic, rc = establish(ini_cfg, res_cfg)
    assert ic.ts_local is ini_cfg.local_ts and ic.ts_remote is ini_cfg.remote_ts
    assert rc.ts_local is res_cfg.local_ts and rc.ts_remote is res_cfg.remote_ts


def test_a_narrowed_selector_is_kept_as_narrowed() -> None:
    """Where the responder narrows the initiator's selectors, the Child SA keeps what was
    agreed (an equal configured one where there is one, the narrowed one otherwise)."""
    ini_cfg, res_cfg = configs()
    wide = (TrafficSelector.for_network("192.0.2.0/24"),)
    ini_cfg = replace(ini_cfg, local_ts=wide)
    _, _, ic, rc = establish(ini_cfg, res_cfg)
    assert ic.ts_local == res_cfg.remote_ts and ic.ts_local != wide
    assert rc.ts_remote is res_cfg.remote_ts


def test_a_one_host_selector_holds_one_address_object() -> None:
    a = ipaddress.ip_address("192.0.2.9")
    host = TrafficSelector.from_range(a, a)
    assert host.start_address is host.end_address and host.start_address == a.packed
    wide = TrafficSelector.for_network("192.0.2.0/24")
    both = intersect(wide, host)
    assert both == host and both is not None and both.start_address is both.end_address
    assert wide.start_address != wide.end_address


def test_checking_a_signature_leaves_the_peers_key_object_as_it_was() -> None:
    """OpenSSL 3 keeps ~1.9 KB on a P-256 key object once it has verified with it; the
    daemon keeps one key object per keyed peer, so AUTH is checked with a copy. 2,000
    distinct key objects each verify a good signature (and refuse a bad one): RSS grows
    by far less than that per key (a fresh interpreter: nothing else allocates)."""
    code = """
import json
from cryptography.hazmat.primitives.asymmetric import ec
from oe_router.ike.auth import ECDSA_P256_SHA256
def rss():
    for line in open("/proc/self/smaps_rollup"):
        if line.startswith("Rss:"):
            return int(line.split()[1])
k = ec.generate_private_key(ec.SECP256R1())
sig = ECDSA_P256_SHA256.sign(k, b"octets")
keys = [k.public_key() for _ in range(2000)]
ECDSA_P256_SHA256.verify(keys[0], sig, b"octets")
before = rss()
good = all(ECDSA_P256_SHA256.verify(key, sig, b"octets") for key in keys)
bad = any(ECDSA_P256_SHA256.verify(key, sig, b"other") for key in keys)
print(json.dumps({"per_key": (rss() - before) * 1024 / len(keys), "good": good, "bad": bad}))
"""
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    doc = json.loads(out.stdout)
    assert doc["good"] is True and doc["bad"] is False
    assert doc["per_key"] < 600, doc  # ~1,950 B per key when verified on the object itself
