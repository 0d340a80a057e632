"""The DoH canary domain (oe.dns.doh_canary): ``use-application-dns.net`` gets NXDOMAIN
from the front itself, for any query type, without an upstream query or a key lookup, so
Firefox keeps the system resolver; with the option off it is forwarded like any name.

Resolver-level tests use a recording in-memory upstream; the last test runs the real
DnsService on a loopback UDP socket against a UDP upstream that records what it is asked.
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.rrset

from oe_router.config import parse_config
from oe_router.config.schema import DnsConfig, Endpoint, OeConfig
from oe_router.dns.front import AnswerCache, Resolver
from oe_router.dns.hold import HoldPolicy, KeyResult, KeyStatus
from oe_router.dns.service import DnsService

CANARY = "use-application-dns.net."
ANCHOR = ". 3600 IN DS 20326 8 2 E06D44B80B8F1D39A95C0B0D7C65D08458E880409BBC683457104237C7F8EC8D\n"


def _answer(wire: bytes) -> bytes:
    """What a resolver would say: an A record for A queries, NOERROR/no data otherwise."""
    query = dns.message.from_wire(wire)
    reply = dns.message.make_response(query)
    q = query.question[0]
    if q.rdtype == dns.rdatatype.A:
        reply.answer.append(dns.rrset.from_text(q.name, 300, "IN", "A", "192.0.2.80"))
    return reply.to_wire()


class Upstream:
    """Records every question it is asked."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    async def query(self, wire: bytes) -> bytes:
        q = dns.message.from_wire(wire).question[0]
        self.asked.append(f"{q.name} {dns.rdatatype.to_text(q.rdtype)}")
        return _answer(wire)


class Keys:
    """A key lookup that records names (the canary must never get one)."""

    def __init__(self) -> None:
        self.names: list[dns.name.Name] = []

    async def lookup(self, name: dns.name.Name) -> KeyResult:
        self.names.append(name)
        return KeyResult(KeyStatus.INSECURE, ())

    def cached(self, name: dns.name.Name) -> KeyResult | None:
        return None


def _resolver(canary: bool) -> tuple[Resolver, Upstream, Keys]:
    upstream, keys = Upstream(), Keys()
    resolver = Resolver(
        upstream, HoldPolicy(), key_lookup=keys, cache=AnswerCache(), doh_canary=canary
    )
    return resolver, upstream, keys


def _query(name: str, rdtype: str, **kw: object) -> dns.message.Message:
    return dns.message.make_query(name, rdtype, **kw)  # type: ignore[arg-type]


def test_every_type_of_canary_query_is_nxdomain_without_upstream_or_key_lookup() -> None:
    async def main() -> None:
        resolver, upstream, keys = _resolver(canary=True)
        types = ("A", "AAAA", "ANY", "HTTPS", "TXT")
        for i, rdtype in enumerate(types):
            query = _query(CANARY, rdtype, use_edns=0)
            query.id = 1000 + i
            wire = await resolver.handle(query.to_wire(), ("192.168.1.20", 5353), 512)
            assert wire is not None
            reply = dns.message.from_wire(wire)
            assert reply.rcode() == dns.rcode.NXDOMAIN, rdtype
            assert reply.id == 1000 + i and reply.flags & dns.flags.QR
            assert reply.question == query.question and reply.answer == []
            assert reply.edns == 0  # EDNS echoed, as for every other reply
        assert upstream.asked == [] and keys.names == []
        assert resolver.stats.doh_canary == len(types)
        assert resolver.stats.queries == len(types)
        assert resolver.stats.held == resolver.stats.servfail == 0

    asyncio.run(main())


def test_the_fast_path_answers_the_canary_in_any_letter_case() -> None:
    async def main() -> None:
        resolver, upstream, _ = _resolver(canary=True)
        for name in (CANARY, "USE-Application-DNS.Net."):
            wire = resolver.answer_now(_query(name, "AAAA").to_wire(), 512)
            assert wire is not None
            assert dns.message.from_wire(wire).rcode() == dns.rcode.NXDOMAIN
        assert upstream.asked == [] and resolver.stats.doh_canary == 2
        # with no cache at all (a plain forwarder) the canary is still answered
        bare = Resolver(Upstream(), HoldPolicy(), doh_canary=True)
        assert bare.answer_now(_query(CANARY, "A").to_wire(), 512) is not None

    asyncio.run(main())


def test_only_the_exact_name_in_class_in_is_the_canary() -> None:
    async def main() -> None:
        resolver, upstream, _ = _resolver(canary=True)
        others = [
            _query("www.use-application-dns.net.", "A"),
            _query("application-dns.net.", "A"),
            _query("use-application-dns.net.example.", "A"),
            _query(CANARY, "TXT", rdclass="CH"),
        ]
        for query in others:
            wire = query.to_wire()
            assert resolver.answer_now(wire, 512) is None
            reply = await resolver.handle(wire, ("192.168.1.20", 5353), 512)
            assert reply is not None
            assert dns.message.from_wire(reply).rcode() == dns.rcode.NOERROR
        assert len(upstream.asked) == len(others)
        assert resolver.stats.doh_canary == 0

    asyncio.run(main())


def test_with_the_option_off_the_canary_is_forwarded() -> None:
    async def main() -> None:
        resolver, upstream, keys = _resolver(canary=False)
        wire = _query(CANARY, "A").to_wire()
        assert resolver.answer_now(wire, 512) is None
        reply = await resolver.handle(wire, ("192.168.1.20", 5353), 512)
        assert reply is not None
        answer = dns.message.from_wire(reply)
        assert answer.rcode() == dns.rcode.NOERROR
        assert [r.to_text() for rrset in answer.answer for r in rrset] == ["192.0.2.80"]
        assert upstream.asked == [f"{CANARY} A"]
        assert keys.names == [dns.name.from_text(CANARY)]  # an ordinary A query: held
        assert resolver.stats.doh_canary == 0

    asyncio.run(main())


def test_the_option_defaults_on_and_parses() -> None:
    assert DnsConfig().doh_canary is True
    off = parse_config("config dns 'dns'\n\toption doh_canary '0'\n")
    assert off.dns.doh_canary is False
    assert parse_config("config dns 'dns'\n\toption doh_canary 'yes'\n").dns.doh_canary


class _UdpUpstream(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.asked: list[str] = []
        self.transport: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        q = dns.message.from_wire(data).question[0]
        self.asked.append(f"{q.name} {dns.rdatatype.to_text(q.rdtype)}")
        assert self.transport is not None
        self.transport.sendto(_answer(data), addr)


def test_the_running_front_answers_the_canary_and_a_reload_turns_it_off(
    tmp_path: Path,
) -> None:
    anchor = tmp_path / "root.key"
    anchor.write_text(ANCHOR)

    def config(upstream_port: int, canary: bool) -> OeConfig:
        return OeConfig(
            dns=DnsConfig(
                listen=(Endpoint("127.0.0.1", 0),),
                upstream=(Endpoint("127.0.0.1", upstream_port),),
                trust_anchor=str(anchor),
                doh_canary=canary,
            )
        )

    async def ask(port: int, rdtype: str) -> dns.message.Message:
        loop = asyncio.get_running_loop()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.setblocking(False)
            await loop.sock_connect(sock, ("127.0.0.1", port))
            await loop.sock_sendall(sock, _query(CANARY, rdtype).to_wire())
            data = await asyncio.wait_for(loop.sock_recv(sock, 4096), 10)
        return dns.message.from_wire(data)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        transport, upstream = await loop.create_datagram_endpoint(
            _UdpUpstream, local_addr=("127.0.0.1", 0)
        )
        upstream_port = transport.get_extra_info("sockname")[1]
        service = DnsService()
        await service.start(config(upstream_port, canary=True))
        try:
            port = service.bound[0].port
            for rdtype in ("A", "AAAA", "TXT"):
                assert (await ask(port, rdtype)).rcode() == dns.rcode.NXDOMAIN
            assert upstream.asked == []
            assert service.status().dns["doh_canary"] == 3
            await service.reload(config(upstream_port, canary=False))
            reply = await ask(port, "TXT")
            assert reply.rcode() == dns.rcode.NOERROR
            assert upstream.asked == [f"{CANARY} TXT"]
            assert service.status().dns["doh_canary"] == 3
        finally:
            await service.stop()
            transport.close()

    asyncio.run(main())
