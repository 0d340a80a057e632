"""The validator's asyncio driver and ValidatingKeyLookup over the one forwarding client.

The server is the in-memory `World` of test_dns_dnssec behind real sockets on
127.0.0.1, so this exercises UDP, the TC -> TCP fallback, timeouts and the
move to the next upstream with real I/O, through ``upstream.UpstreamClient``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import dns.flags
import dns.message
import dns.name
import dns.rdata
import dns.rdatatype
import pytest

from oe_router.config.schema import Endpoint
from oe_router.dns.dnssec import Query, Status, Validator, load_trust_anchors
from oe_router.dns.hold import KeyResult, KeyStatus
from oe_router.dns.ipseckey import KeyKind
from oe_router.dns.keylookup import ValidatingKeyLookup, query_message, validate
from oe_router.dns.upstream import StaticSource, UpstreamClient, UpstreamError, UpstreamSettings
from tests.aio import run
from tests.dnssec_world import NOW, World, make_world, strip_records


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, world: World, truncate: set[str], seen: list[str]) -> None:
        self.world, self.truncate, self.seen = world, truncate, seen
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        query = dns.message.from_wire(data)
        q = query.question[0]
        key = f"{q.name}/{dns.rdatatype.to_text(q.rdtype)}"
        self.seen.append("udp " + key)
        assert query.flags & dns.flags.CD and query.ednsflags & dns.flags.DO
        reply = _reply(self.world, query)
        if key in self.truncate:
            reply = dns.message.make_response(query)
            reply.flags |= dns.flags.TC
        assert self.transport is not None
        self.transport.sendto(reply.to_wire(), addr)


def _reply(world: World, query: dns.message.Message) -> dns.message.Message:
    q = query.question[0]
    answer = world.answer(Query(q.name, q.rdtype))
    assert answer is not None
    answer.id = query.id
    answer.flags |= dns.flags.QR | dns.flags.CD
    answer.use_edns(0, dns.flags.DO, 1232)
    return answer


@asynccontextmanager
async def serve(world: World, truncate: set[str], seen: list[str]) -> AsyncIterator[int]:
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(
        lambda: _Udp(world, truncate, seen), local_addr=("127.0.0.1", 0)
    )
    port = transport.get_extra_info("sockname")[1]

    async def tcp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        (length,) = struct.unpack("!H", await reader.readexactly(2))
        query = dns.message.from_wire(await reader.readexactly(length))
        seen.append(f"tcp {query.question[0].name}")
        wire = _reply(world, query).to_wire()
        writer.write(struct.pack("!H", len(wire)) + wire)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(tcp, "127.0.0.1", port)
    try:
        yield port
    finally:
        server.close()
        transport.close()


def _client(ports: list[int], timeout: float, tries: int = 1) -> UpstreamClient:
    servers = [Endpoint("127.0.0.1", p) for p in ports]
    return UpstreamClient(StaticSource(servers), UpstreamSettings(timeout=timeout, tries=tries))


def _silent_port() -> tuple[socket.socket, int]:
    """A bound UDP socket that never answers: an upstream that times out."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    return sock, sock.getsockname()[1]


def test_udp_tc_fallback_and_dead_upstream(base_world: World) -> None:
    seen: list[str] = []
    silent, dead_port = _silent_port()

    async def main() -> None:
        async with serve(base_world, {"host.example.test./IPSECKEY"}, seen) as port:
            client = _client([dead_port, port], timeout=0.3)
            v = Validator(load_trust_anchors(base_world.anchor))
            result = await validate(v, client, "host.example.test.", "IPSECKEY", lambda: NOW)
            assert result.status is Status.SECURE, result.reason
            assert result.rrset is not None

    run(main(), silent)
    assert "udp host.example.test./IPSECKEY" in seen
    assert "tcp host.example.test." in seen


def test_all_upstreams_silent_is_indeterminate(base_world: World) -> None:
    silent, dead_port = _silent_port()

    async def main() -> None:
        client = _client([dead_port], timeout=0.1, tries=2)
        v = Validator(load_trust_anchors(base_world.anchor))
        result = await validate(v, client, dns.name.from_text("host.example.test."), "A")
        assert result.status is Status.INDETERMINATE
        assert "no answer from upstream" in result.reason

    run(main(), silent)


# --------------------------------------------------------------------------- ValidatingKeyLookup


def test_query_message_sets_do_cd_and_edns() -> None:
    msg = query_message(Query(dns.name.from_text("a.test."), dns.rdatatype.IPSECKEY))
    assert msg.flags & dns.flags.CD and msg.ednsflags & dns.flags.DO
    assert msg.edns == 0 and msg.payload == 1232


def test_key_lookup_secure_key_nodata_and_cname(zone_keys: dict[str, Any]) -> None:
    """Keys only from a SECURE RRset; secure NODATA is SECURE without keys."""
    world = make_world(zone_keys)
    got: dict[str, KeyResult] = {}

    async def main() -> None:
        async with serve(world, set(), []) as port:
            anchors = load_trust_anchors(world.anchor)
            kl = ValidatingKeyLookup(anchors, _client([port], 0.5), clock=lambda: NOW)
            for name in ("host.example.test.", "nokey.example.test.", "www.example.test."):
                got[name] = await kl.lookup(dns.name.from_text(name))

    asyncio.run(main())
    secure = got["host.example.test."]
    assert secure.status is KeyStatus.SECURE and len(secure.keys) == 1
    assert secure.keys[0].kind is KeyKind.ED25519 and secure.usable_key is secure.keys[0]
    nodata = got["nokey.example.test."]
    assert nodata.status is KeyStatus.SECURE and nodata.keys == () and nodata.usable_key is None
    # www is a CNAME to other.test's host, whose record names a gateway: key used, gateway not
    via_cname = got["www.example.test."]
    assert via_cname.status is KeyStatus.SECURE and via_cname.keys
    assert via_cname.keys[0].gateway_ignored is not None
    assert via_cname.keys[0].owner == dns.name.from_text("www.example.test.")


def test_key_lookup_bogus_has_no_keys_and_is_remembered(zone_keys: dict[str, Any]) -> None:
    """A bogus IPSECKEY yields no key; the failure is remembered failure_ttl (5 s)."""
    world = make_world(zone_keys)
    world.mutate = strip_records("answer", dns.rdatatype.RRSIG, dns.rdatatype.IPSECKEY)
    clock = [NOW]
    seen: list[str] = []
    results = []

    async def main() -> None:
        async with serve(world, set(), seen) as port:
            kl = ValidatingKeyLookup(
                load_trust_anchors(world.anchor), _client([port], 0.5), clock=lambda: clock[0]
            )
            name = dns.name.from_text("host.example.test.")
            for advance in (0.0, 1.0, 10.0):
                clock[0] += advance
                before = len(seen)
                results.append((await kl.lookup(name), len(seen) - before))

    asyncio.run(main())
    (first, q1), (second, q2), (third, q3) = results
    for r in (first, second, third):
        assert r.status is KeyStatus.BOGUS and r.keys == () and r.usable_key is None
    assert q1 > 0 and q2 == 0 and q3 > 0  # remembered for 5 s, then asked again


# --------------------------------------------------------------------------- A/AAAA in signed zones


def _swap_a(address: str) -> Any:
    """A tampering upstream: host.example.test's A rdata replaced, its RRSIGs kept."""

    def mutate(q: Query, msg: dns.message.Message) -> dns.message.Message:
        if str(q) == "host.example.test./A":
            for rrset in msg.answer:
                if rrset.rdtype == dns.rdatatype.A:
                    rrset.clear()
                    rrset.add(dns.rdata.from_text("IN", "A", address))
        return msg

    return mutate


def test_key_lookup_brings_the_validated_addresses_of_a_signed_name(
    zone_keys: dict[str, Any],
) -> None:
    """SECURE results carry the name's validated A/AAAA; a tampered A comes out BOGUS."""
    world = make_world(zone_keys)
    got: dict[str, KeyResult] = {}

    async def main() -> None:
        async with serve(world, set(), []) as port:
            kl = ValidatingKeyLookup(
                load_trust_anchors(world.anchor), _client([port], 0.5), clock=lambda: NOW
            )
            for name in ("host.example.test.", "nokey.example.test.", "host.insecure.test."):
                got[name] = await kl.lookup(dns.name.from_text(name))
            world.mutate = _swap_a("198.51.100.66")
            kl = ValidatingKeyLookup(
                load_trust_anchors(world.anchor), _client([port], 0.5), clock=lambda: NOW
            )
            got["tampered"] = await kl.lookup(dns.name.from_text("host.example.test."))

    asyncio.run(main())
    host = got["host.example.test."]
    assert host.v4 is not None and host.v4.status is KeyStatus.SECURE
    assert host.v4.addresses == {
        ipaddress.ip_address("192.0.2.10"),
        ipaddress.ip_address("192.0.2.11"),
    }
    assert host.v6 is not None and host.v6.status is KeyStatus.SECURE and not host.v6.addresses
    assert host.check_addresses(tuple(host.v4.addresses)) == (KeyStatus.SECURE, "")
    nokey = got["nokey.example.test."]  # secure denial of IPSECKEY: A still validated
    assert nokey.v4 is not None and nokey.v4.addresses == {ipaddress.ip_address("192.0.2.12")}
    assert got["host.insecure.test."].v4 is None  # unsigned zone: nothing to prove
    tampered = got["tampered"]
    assert tampered.status is KeyStatus.SECURE and tampered.usable_key is not None
    assert tampered.v4 is not None and tampered.v4.status is KeyStatus.BOGUS
    verdict, why = tampered.check_addresses((ipaddress.ip_address("198.51.100.66"),))
    assert verdict is KeyStatus.BOGUS and "A RRset is bogus" in why


class _Direct:
    """``Resolving`` over the World without sockets (the driver's logging is under test)."""

    def __init__(self, world: World) -> None:
        self.world = world

    async def resolve(self, message: dns.message.Message) -> dns.message.Message:
        return _reply(self.world, message)


def test_work_limit_is_logged_once_per_validation(
    zone_keys: dict[str, Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Many failed signature checks: BOGUS with one log line, not one per signature."""
    world = make_world(zone_keys)

    def junk_sigs(q: Query, msg: dns.message.Message) -> dns.message.Message:
        if str(q) == "host.example.test./A":
            for rrset in msg.answer:
                if rrset.rdtype == dns.rdatatype.RRSIG:
                    real = next(iter(rrset))
                    rrset.clear()
                    for i in range(20):
                        sig = bytearray(real.signature)
                        sig[-1] ^= i + 1
                        rrset.add(real.replace(signature=bytes(sig)))
            msg.request_payload = 65535
        return msg

    world.mutate = junk_sigs
    v = Validator(load_trust_anchors(world.anchor))
    with caplog.at_level(logging.WARNING, logger="oe_router.dns.keylookup"):
        result = asyncio.run(validate(v, _Direct(world), "host.example.test.", "A", lambda: NOW))
    assert result.status is Status.BOGUS and result.limited
    lines = [r for r in caplog.records if r.name == "oe_router.dns.keylookup"]
    assert len(lines) == 1 and "work limit" in lines[0].getMessage()


class _Dead:
    """``Resolving`` whose every query fails, as when the client's names lead nowhere."""

    def __init__(self) -> None:
        self.calls = 0

    async def resolve(self, message: dns.message.Message) -> dns.message.Message:
        self.calls += 1
        raise UpstreamError("no upstream answered (192.0.2.53:53: no UDP reply)")


def test_a_stream_of_new_names_logs_a_few_lines(
    zone_keys: dict[str, Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Names are the client's choice: each new one fails anew, the lines stay few."""
    world = make_world(zone_keys)
    dead = _Dead()
    kl = ValidatingKeyLookup(load_trust_anchors(world.anchor), dead, clock=lambda: NOW)

    async def main() -> list[KeyResult]:
        return [await kl.lookup(dns.name.from_text(f"h{i}.example.test.")) for i in range(200)]

    with caplog.at_level(logging.INFO, logger="oe_router.dns.keylookup"):
        results = asyncio.run(main())
    assert all(r.status is KeyStatus.INDETERMINATE for r in results)
    assert dead.calls >= 200  # every name was really looked up, none answered from memory
    lines = [r.getMessage() for r in caplog.records if r.name == "oe_router.dns.keylookup"]
    assert lines and "no upstream answered" in lines[0]
    assert len(lines) <= 10, lines
