"""The IKE responder's key lookup by initiator identity against knot (issue 15 item 3).

knotd serves the lab hierarchy (labkit.world.zone_spec, signed per run with fresh
keys). Our DnsService runs with the production ValidatingKeyLookup from the
hierarchy's trust anchor, knot as its upstream; our IkeService on 127.0.0.1 holds no
peer key and asks that lookup through dns/identity_keys.py, as daemon.py wires it.
A second IkeService is the initiator: it signs with one of the world's keys and names
itself with an FQDN. Secure key -> the IKE SA comes up on both sides; bogus, no
record, or a key published for another name -> AUTHENTICATION_FAILED.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from bench.bench_dns_front import free_port

from oe_router.config.schema import DnsConfig, Endpoint, OeConfig
from oe_router.dns.identity_keys import IdentityKeys
from oe_router.dns.service import DnsService
from oe_router.dns.upstream import UpstreamSettings
from oe_router.ike.constants import IdType, NotifyType
from oe_router.ike.peers import IkeUpError
from oe_router.ike.service import IkeService

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "qemu"))

from labkit import world
from labkit.knot import KnotServer
from labkit.zones import BuiltHierarchy, build_hierarchy

pytestmark = pytest.mark.host

KNOT_HOST = "127.0.0.1"


@dataclass
class Lab:
    hier: BuiltHierarchy
    keys: world.WorldKeys
    port: int


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    if shutil.which("knotd") is None:
        pytest.fail("knotd missing: apt-get install $(cat scripts/apt-packages.txt)")
    base = tmp_path_factory.mktemp("idkeys")
    keys = world.WorldKeys.generate()
    hier = build_hierarchy(world.zone_spec(keys, [KNOT_HOST]), base / "zones")
    port = free_port(KNOT_HOST)
    with KnotServer(hier, KNOT_HOST, port, base / "run"):
        yield Lab(hier, keys, port)


async def _up(lab: Lab, signer: Any, name: str) -> tuple[list[tuple[int, bytes]], object]:
    """``signer`` brings an IKE SA up with us as ``name``: the peer ids our side
    established, and what the initiator's ``up`` gave (PeerSa or IkeUpError)."""
    config = OeConfig(
        dns=DnsConfig(
            listen=(Endpoint("127.0.0.1", 0),),
            upstream=(Endpoint(KNOT_HOST, lab.port),),
            trust_anchor=str(lab.hier.trust_anchor_ds),
        )
    )
    front = DnsService(upstream_settings=UpstreamSettings(timeout=1.0, tries=2))
    ours = IkeService(["127.0.0.1"], ike_port=0, natt_port=0)
    ours.peer_key_lookup = IdentityKeys(
        lambda: front.resolver.key_lookup if front.resolver is not None else None
    )
    peer = IkeService(
        ["127.0.0.1"], ike_port=0, natt_port=0, private_key=signer, local_id=f"@{name}"
    )
    await front.start(config)
    await ours.start(OeConfig())
    await peer.start(OeConfig())
    try:
        assert ours.endpoint is not None
        peer.remote_ike_port = ours.endpoint.ike_port
        peer.remote_natt_port = ours.endpoint.natt_port
        try:
            result: object = await peer.up("127.0.0.1", "pubkey")
        except IkeUpError as exc:
            result = exc
        return [p.ike.peer_id for p in ours.sas if p.ike is not None], result
    finally:
        await peer.stop()
        await ours.stop()
        await front.stop()


def test_secure_key_authenticates_the_initiator(lab: Lab) -> None:
    ids, result = asyncio.run(_up(lab, lab.keys.sw.key, "sw.example.test"))
    assert not isinstance(result, IkeUpError), result
    assert ids == [(IdType.ID_FQDN, b"sw.example.test")]


def test_rsa_key_authenticates_the_initiator(lab: Lab) -> None:
    ids, result = asyncio.run(_up(lab, lab.keys.rsa.key, "rsa.example.test"))
    assert not isinstance(result, IkeUpError), result
    assert ids == [(IdType.ID_FQDN, b"rsa.example.test")]


@pytest.mark.parametrize(
    ("name", "line"),
    [
        ("www.bogus.test", "refused: IPSECKEY of www.bogus.test. is bogus"),
        ("www.otherkey.test", "refused: IPSECKEY of www.otherkey.test. is bogus"),
        ("plain.example.test", "refused: no IPSECKEY at plain.example.test."),
        ("null.example.test", "refused: the IPSECKEY at null.example.test. asks for NULL auth"),
        ("rsa.example.test", "key found (IPSECKEY of rsa.example.test., DNSSEC secure)"),
    ],
    ids=["bogus", "other-zone-key", "no-record", "null-record", "key-of-another-name"],
)
def test_refused_with_authentication_failed(
    lab: Lab, name: str, line: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The initiator always signs with sw.example.test's key; only that name's
    record would vouch for it."""
    caplog.set_level(logging.INFO, logger="oe_router.ike")
    ids, result = asyncio.run(_up(lab, lab.keys.sw.key, name))
    assert ids == []
    assert isinstance(result, IkeUpError) and result.notify == NotifyType.AUTHENTICATION_FAILED
    lines = [r.getMessage() for r in caplog.records if f"as {name}:" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith(f"IKE_AUTH from 127.0.0.1 as {name}: {line}")
