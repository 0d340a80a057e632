"""The asyncio driver against a loopback UDP+TCP server answering from signed zones.

The server is the in-memory `World` of test_dns_dnssec behind real sockets on
127.0.0.1, so this exercises UDP, the TC -> TCP fallback, timeouts and the
move to the next upstream with real I/O.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import dns.flags
import dns.message
import dns.name
import dns.rdatatype

from oe_router.dns.dnssec import Query, Status, Validator, load_trust_anchors
from oe_router.dns.resolver_io import Upstream, UpstreamClient, validate
from tests.unit.test_dns_dnssec import NOW, World, base_world, keys  # noqa: F401


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


def _silent_port() -> tuple[socket.socket, int]:
    """A bound UDP socket that never answers: an upstream that times out."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    return sock, sock.getsockname()[1]


def test_udp_tc_fallback_and_dead_upstream(base_world: World) -> None:  # noqa: F811
    seen: list[str] = []
    silent, dead_port = _silent_port()

    async def main() -> None:
        async with serve(base_world, {"host.example.test./IPSECKEY"}, seen) as port:
            client = UpstreamClient(
                [Upstream("127.0.0.1", dead_port), Upstream("127.0.0.1", port)], timeout=0.3
            )
            v = Validator(load_trust_anchors(base_world.anchor))
            result = await validate(v, client, "host.example.test.", "IPSECKEY", lambda: NOW)
            assert result.status is Status.SECURE, result.reason
            assert result.rrset is not None

    try:
        asyncio.run(main())
    finally:
        silent.close()
    assert "udp host.example.test./IPSECKEY" in seen
    assert "tcp host.example.test." in seen


def test_all_upstreams_silent_is_indeterminate(base_world: World) -> None:  # noqa: F811
    silent, dead_port = _silent_port()

    async def main() -> None:
        client = UpstreamClient([Upstream("127.0.0.1", dead_port)], timeout=0.1, retries=1)
        v = Validator(load_trust_anchors(base_world.anchor))
        result = await validate(v, client, dns.name.from_text("host.example.test."), "A")
        assert result.status is Status.INDETERMINATE
        assert "no answer from upstream" in result.reason

    try:
        asyncio.run(main())
    finally:
        silent.close()
