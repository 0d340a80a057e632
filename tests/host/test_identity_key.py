"""First start with an FQDN identity and no key: the real oe-routerd makes one.

    peer 198.18.0.2 (oe-routerd, NULL auth) -- veth -- router 198.18.0.1 (oe-routerd)

The router's config says ``local_id '@router.example.test'`` and names a key file that
does not exist. At start the daemon writes an ECDSA P-256 key there with mode 0600 and
logs one line with the IPSECKEY record to publish, which ``oe status`` shows too. The
proof that this is the key IKE uses: the peer takes the published record (parsed as a
resolver would), brings up an IKE SA to the router with it as the router's key, and
the router authenticates by signing as @router.example.test. A restart keeps the key.
"""

from __future__ import annotations

import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dns.name
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from oe_router.dns.ipseckey import PeerKey, interpret, rdata_text
from oe_router.ike.service import load_private_key

from .charon import Netns
from .oe_daemon import OeDaemon, bare_config, device_with

pytestmark = pytest.mark.host

ROUTER, PEER = "198.18.0.1", "198.18.0.2"
ROUTER_ID = "@router.example.test"


def _config(wan: str, local_id: str, key: Path, work: Path) -> str:
    identity = f"""
config identity 'identity'
\toption local_id '{local_id}'
\toption private_key '{key}'
"""
    return bare_config(wan, work / "no-anchor", extra=identity)


@dataclass
class Lab:
    router: OeDaemon
    peer: OeDaemon
    key: Path
    work: Path


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    work = tmp_path_factory.mktemp("idkey")
    net = Netns("id")
    daemons: list[OeDaemon] = []
    try:
        r, p = net.add("r"), net.add("p")
        net.link(r, f"{ROUTER}/24", p, f"{PEER}/24")
        key = work / "etc-oe" / "private.pem"  # its folder does not exist yet either
        router = OeDaemon(r, work / "r", _config(device_with(r, ROUTER), ROUTER_ID, key, work))
        peer_key = work / "peer-unused.pem"
        peer = OeDaemon(p, work / "p", _config(device_with(p, PEER), "%null", peer_key, work))
        for one in (router, peer):
            daemons.append(one)
            one.start()
        yield Lab(router, peer, key, work)
    finally:
        for one in daemons:
            one.stop()
        net.close()


def test_first_start_makes_a_0600_key_and_publishes_its_ipseckey(lab: Lab) -> None:
    assert lab.key.is_file()
    assert stat.S_IMODE(lab.key.stat().st_mode) == 0o600
    private = load_private_key(lab.key.read_bytes(), str(lab.key))
    assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp256r1"
    publish = rdata_text(private.public_key())
    assert publish.startswith("10 0 3 . ")

    lines = [line for line in lab.router.log().splitlines() if "made one" in line]
    assert lines == [
        f"info oe-routerd[ike]: identity {ROUTER_ID}: no key at {lab.key}, made one"
        f" (ECDSA P-256, mode 0600); publish: router.example.test. IN IPSECKEY {publish}"
    ]
    secret = lab.key.read_text().splitlines()[1:-1]  # the PEM body: never in a log
    assert not any(chunk in lab.router.log() for chunk in secret)
    assert "PRIVATE KEY" not in lab.router.log()

    ike = lab.router.status()["ike"]
    assert ike["identity"] == {
        "local_id": ROUTER_ID,
        "key": f"ECDSA-P256 {lab.key}",
        "ipseckey": publish,
    }
    text = lab.router.oe("status").stdout
    assert f"  identity   {ROUTER_ID}, key ECDSA-P256 {lab.key}, IPSECKEY {publish}" in text
    assert not [line for line in lab.peer.log().splitlines() if "made one" in line]


def test_the_published_key_is_the_one_ike_signs_with(lab: Lab) -> None:
    owner = dns.name.from_text("router.example.test")
    published = lab.router.status()["ike"]["identity"]["ipseckey"]
    rdata = dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.IPSECKEY, published)
    key = interpret(owner, rdata)  # type: ignore[arg-type]
    assert isinstance(key, PeerKey) and key.public_key is not None
    pem = lab.work / "router-published.pem"
    pem.write_bytes(
        key.public_key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    up = lab.peer.oe("up", ROUTER, "--auth", "null", "--peer-key", str(pem))
    assert "IKE SA up (initiator" in up.stdout and "digital_signature(ECDSA-P256)" in up.stdout
    rows = [t for t in lab.router.status()["tunnels"] if t.get("source") == "ike"]
    assert [(t["peer"], t["local_id"], t["local_auth"]) for t in rows] == [
        (PEER, ROUTER_ID, "digital_signature(ECDSA-P256)")
    ]
    lab.peer.oe("down", ROUTER)


def test_a_restart_keeps_the_key(lab: Lab) -> None:
    before = lab.key.read_bytes()
    seen = len(lab.router.log())
    lab.router.stop()
    lab.router.start()
    assert lab.key.read_bytes() == before
    assert "made one" not in lab.router.log()[seen:]
    publish = rdata_text(load_private_key(before, "key").public_key())
    assert lab.router.status()["ike"]["identity"]["ipseckey"] == publish
