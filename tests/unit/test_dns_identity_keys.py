"""An IKE initiator's key looked up by its FQDN identity through the DNS front's own
validating key lookup (dns/identity_keys.py), over the signed zones of
tests/dnssec_world.py (served in memory, no sockets for DNS), and end to end: two
IkeServices on 127.0.0.1, ours with no key for the peer's address.

host.example.test publishes an Ed25519 IPSECKEY (the world's "other" key); the
initiator signs with that key. Secure key: the IKE SA comes up. Bogus answer, no
record, or a key published for another name: AUTHENTICATION_FAILED. No trust anchor
(no DNS front): refused, with one log line.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from pathlib import Path
from typing import Any

import dns.message
import dns.name
import dns.rdatatype
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from oe_router.config.schema import DnsConfig, Endpoint, OeConfig, parse_endpoint
from oe_router.daemon import build_services
from oe_router.dns.dnssec import Query, load_trust_anchors
from oe_router.dns.hold import KeyLookup
from oe_router.dns.identity_keys import NO_ANCHOR, IdentityKeys
from oe_router.dns.keylookup import ValidatingKeyLookup
from oe_router.dns.service import DnsService
from oe_router.dns.upstream import UpstreamError
from oe_router.ike.constants import IdType, NotifyType
from oe_router.ike.peers import IkeUpError
from oe_router.ike.service import IkeService
from oe_router.platform import Platform
from tests.aio import running
from tests.dnssec_world import NOW, World, make_world, strip_records


class _WorldUpstream:
    """The world's answers as an upstream resolver would give them (``Resolving``)."""

    def __init__(self, world: World) -> None:
        self.world = world

    async def resolve(self, message: dns.message.Message) -> dns.message.Message:
        q = message.question[0]
        reply = self.world.answer(Query(q.name, q.rdtype))
        if reply is None:
            raise UpstreamError("no answer")
        return reply


def _lookup(world: World) -> KeyLookup:
    return ValidatingKeyLookup(
        load_trust_anchors(world.anchor), _WorldUpstream(world), clock=lambda: NOW
    )


def _raw(key: Any) -> bytes:
    return bytes(
        key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


# --------------------------------------------------------------------------- the adapter


def test_secure_key_of_the_name(base_world: World, zone_keys: dict[str, Any]) -> None:
    keys = IdentityKeys(lambda: _lookup(base_world))
    key, why = asyncio.run(keys("host.example.test"))
    assert key is not None and _raw(key) == _raw(zone_keys["other"].public_key())
    assert why == "IPSECKEY of host.example.test., DNSSEC secure"


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("nokey.example.test", "no IPSECKEY at nokey.example.test."),  # its sibling has one
        ("alice.example.test", "no IPSECKEY at alice.example.test."),  # NXDOMAIN
        ("host.insecure.test", "IPSECKEY of host.insecure.test. is insecure"),
        ("bad..name", "'bad..name' is not a DNS name"),
    ],
)
def test_no_key(base_world: World, name: str, why: str) -> None:
    key, got = asyncio.run(IdentityKeys(lambda: _lookup(base_world))(name))
    assert key is None and got.startswith(why), got


def test_bogus_answer_gives_no_key(zone_keys: dict[str, Any]) -> None:
    world = make_world(zone_keys)
    world.mutate = strip_records("answer", dns.rdatatype.RRSIG, dns.rdatatype.IPSECKEY)
    key, why = asyncio.run(IdentityKeys(lambda: _lookup(world))("host.example.test"))
    assert key is None and why.startswith("IPSECKEY of host.example.test. is bogus"), why


def test_no_trust_anchor_refuses() -> None:
    key, why = asyncio.run(IdentityKeys(lambda: None)("host.example.test"))
    assert (key, why) == (None, NO_ANCHOR)


# --------------------------------------------------------------------------- end to end


async def _up(lookup: KeyLookup | None, signer: Any, name: str) -> tuple[list[Any], object]:
    """``signer`` brings an IKE SA up with us as ``name``: our established SAs' peer ids,
    and what its ``up`` gave."""
    ours = IkeService(["127.0.0.1"], ike_port=0, natt_port=0)
    ours.peer_key_lookup = IdentityKeys(lambda: lookup)
    ours.key_lookups.timeout = 3.0
    peer = IkeService(
        ["127.0.0.1"], ike_port=0, natt_port=0, private_key=signer, local_id=f"@{name}"
    )
    await ours.start(OeConfig())
    await peer.start(OeConfig())
    try:
        assert ours.endpoint is not None
        peer.remote_ike_port, peer.remote_natt_port = (
            ours.endpoint.ike_port,
            ours.endpoint.natt_port,
        )
        try:
            result: object = await peer.up("127.0.0.1", "pubkey")
        except IkeUpError as exc:
            result = exc
        return [p.ike.peer_id for p in ours.sas if p.ike is not None], result
    finally:
        await peer.stop()
        await ours.stop()


def test_secure_key_authenticates_the_initiator(
    base_world: World, zone_keys: dict[str, Any]
) -> None:
    ids, result = asyncio.run(_up(_lookup(base_world), zone_keys["other"], "host.example.test"))
    assert not isinstance(result, IkeUpError), result
    assert ids == [(IdType.ID_FQDN, b"host.example.test")]


@pytest.mark.parametrize(
    ("case", "line"),
    [
        ("bogus", "refused: IPSECKEY of host.example.test. is bogus"),
        ("no-record", "refused: no IPSECKEY at nokey.example.test."),
        ("other-name", "refused: no IPSECKEY at host.n3.test."),
        ("other-key", "key found (IPSECKEY of host.example.test., DNSSEC secure)"),
        ("no-anchor", f"refused: {NO_ANCHOR}"),
    ],
)
def test_refused_with_authentication_failed(
    case: str, line: str, zone_keys: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    world = make_world(zone_keys)
    lookup: KeyLookup | None = _lookup(world)
    signer, name = zone_keys["other"], "host.example.test"
    if case == "bogus":
        world.mutate = strip_records("answer", dns.rdatatype.RRSIG, dns.rdatatype.IPSECKEY)
    elif case == "no-record":
        name = "nokey.example.test"
    elif case == "other-name":  # the key host.example.test published, claimed for another name
        name = "host.n3.test"
    elif case == "other-key":  # host.example.test's name, signed with a key it did not publish
        signer = ec.generate_private_key(ec.SECP256R1())
    else:
        lookup = None
    ids, result = asyncio.run(_up(lookup, signer, name))
    assert ids == []
    assert isinstance(result, IkeUpError) and result.notify == NotifyType.AUTHENTICATION_FAILED
    lines = [r.getMessage() for r in caplog.records if f"as {name}" in r.getMessage()]
    assert len(lines) == 1, lines  # the one line, with the reason
    assert lines[0].startswith(f"IKE_AUTH from 127.0.0.1 as {name}: {line}"), lines


# --------------------------------------------------------------------------- the daemon's wiring


def test_daemon_hands_ike_the_dns_fronts_lookup(tmp_path: Path, base_world: World) -> None:
    """build_services: IKE asks the running DNS front's validator (an upstream that is not
    there makes the answer indeterminate, which only a real validation can say); with no
    trust anchor there is no front, and the lookup is refused for that reason."""
    anchor = tmp_path / "root.key"
    plat = Platform(wan={4: ipaddress.ip_address("192.0.2.1")}, datapath="none")  # not started

    # a fixed anchor file: no front while it is missing (the shipped IANA anchors
    # would otherwise start one out of the box)
    dns_config = DnsConfig(
        listen=(Endpoint("127.0.0.1", 0),),
        trust_anchor=str(anchor),
        upstream=(parse_endpoint("127.0.0.1:9"),),
    )
    cfg = OeConfig(dns=dns_config)

    def services(cfg: OeConfig) -> tuple[IkeService, DnsService | None]:
        registry = list(build_services(cfg, platform=plat))
        (ike,) = [s for s in registry if isinstance(s, IkeService)]
        fronts = [s for s in registry if isinstance(s, DnsService)]
        return ike, fronts[0] if fronts else None

    async def main() -> tuple[tuple[Any, str], tuple[Any, str], tuple[Any, str]]:
        ike, front = services(cfg)
        assert front is None and ike.peer_key_lookup is not None
        without = await ike.peer_key_lookup("host.example.test")
        anchor.write_text(base_world.anchor)
        ike, front = services(cfg)
        assert front is not None and ike.peer_key_lookup is not None
        before = await ike.peer_key_lookup("host.example.test")  # front not started yet
        async with running(front, cfg):
            during = await ike.peer_key_lookup("host.example.test")
        return without, before, during

    without, before, during = asyncio.run(main())
    assert without == (None, NO_ANCHOR) and before == (None, NO_ANCHOR)
    assert during[0] is None and during[1].startswith(
        "IPSECKEY of host.example.test. is indeterminate"
    ), during
    assert during[1] != NO_ANCHOR, during


def test_a_cname_is_followed_like_the_fronts_own_lookup(
    base_world: World, zone_keys: dict[str, Any]
) -> None:
    """www.example.test is a signed CNAME to host.other.test: the key at the end of the
    validated chain is the name's key (docs/dns.md, "Keys of IKE initiators")."""
    key, why = asyncio.run(IdentityKeys(lambda: _lookup(base_world))("www.example.test"))
    assert key is not None and _raw(key) == _raw(zone_keys["other"].public_key()), why
