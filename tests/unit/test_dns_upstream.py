"""The forwarding client takes only the reply to its own question (issue 11, item 5).

A reply matches on ID, QR, question count and the question: the name ignoring ASCII
case, QTYPE and QCLASS byte for byte. Lower-casing the whole question made type 65
(0x0041, "A") equal to type 97 (0x0061, "a"). The fake upstream is a real UDP socket
on 127.0.0.1 that sends a forged reply before the genuine one.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from typing import Any

import dns.message
import dns.rcode
import dns.rdatatype

from oe_router.config.schema import Endpoint
from oe_router.dns.upstream import StaticSource, UpstreamClient, UpstreamError, UpstreamSettings

QTAIL = struct.Struct("!HH")  # QTYPE, QCLASS after the question name


def _question_end(wire: bytes) -> int:
    return 12 + len(dns.message.from_wire(wire).question[0].name.to_wire()) + QTAIL.size


def _with_tail(reply: bytes, qend: int, rdtype: int, rdclass: int = 1) -> bytes:
    return reply[: qend - QTAIL.size] + QTAIL.pack(rdtype, rdclass) + reply[qend:]


def _upper_name(reply: bytes, qend: int) -> bytes:
    return reply[:12] + reply[12 : qend - QTAIL.size].upper() + reply[qend - QTAIL.size :]


def _reply(query: bytes) -> bytes:
    return dns.message.make_response(dns.message.from_wire(query)).to_wire()


def test_answers_folds_the_name_only() -> None:
    from oe_router.dns.upstream import answers

    query = dns.message.make_query("host.example.", 65).to_wire()  # HTTPS: QTYPE 0x0041
    qend = _question_end(query)
    reply = _reply(query)
    assert answers(query, reply, qend)
    assert answers(query, _upper_name(reply, qend), qend)  # 0x20 mixed case is fine
    assert not answers(query, _with_tail(reply, qend, 97), qend)  # "a" is not "A"
    assert not answers(query, _with_tail(reply, qend, 65, rdclass=0x0041 | 0x20), qend)
    assert not answers(query, _with_tail(reply, qend, dns.rdatatype.TXT), qend)
    other = bytearray(reply)
    other[0] ^= 1
    assert not answers(query, bytes(other), qend)  # another ID


class _Forger(asyncio.DatagramProtocol):
    """Answers each query with a forged reply (QTYPE 65 -> 97 by case folding), then,
    if ``genuine``, with the real one whose name is upper-cased (0x20 style)."""

    def __init__(self, genuine: bool) -> None:
        self.genuine = genuine
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        assert self.transport is not None
        qend = _question_end(data)
        reply = _reply(data)
        rdtype = QTAIL.unpack_from(data, qend - QTAIL.size)[0]
        self.transport.sendto(_with_tail(reply, qend, rdtype | 0x20), addr)
        if self.genuine:
            self.transport.sendto(_upper_name(reply, qend), addr)


async def _ask(genuine: bool, rdtype: int) -> tuple[bytes | UpstreamError, UpstreamClient]:
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(
        lambda: _Forger(genuine), local_addr=("127.0.0.1", 0), family=socket.AF_INET
    )
    port = transport.get_extra_info("sockname")[1]
    client = UpstreamClient(
        StaticSource([Endpoint("127.0.0.1", port)]), UpstreamSettings(timeout=0.3, tries=1)
    )
    try:
        return await client.query(dns.message.make_query("host.example.", rdtype).to_wire()), client
    except UpstreamError as exc:
        return exc, client
    finally:
        transport.close()


def test_reply_for_another_qtype_is_ignored_and_the_genuine_one_taken() -> None:
    reply, client = asyncio.run(_ask(genuine=True, rdtype=65))
    assert isinstance(reply, bytes)
    msg = dns.message.from_wire(reply)
    assert msg.question[0].rdtype == 65 and msg.rcode() == dns.rcode.NOERROR
    assert client.stats.mismatched == 1


def test_only_forged_replies_time_out() -> None:
    for rdtype in (65, dns.rdatatype.A):  # "A" -> "a" (97), 0x0001 -> 0x0021 (33, SRV)
        reply, client = asyncio.run(_ask(genuine=False, rdtype=rdtype))
        assert isinstance(reply, UpstreamError), reply
        assert client.stats.mismatched == 1 and client.stats.udp_timeouts == 1


class _Marking(socket.socket):
    """A socket that records SO_MARK instead of setting it (that needs CAP_NET_ADMIN)."""

    marks: list[tuple[int, int]] = []

    def setsockopt(self, level: int, option: int, value: Any, *rest: Any) -> None:
        if (level, option) == (socket.SOL_SOCKET, socket.SO_MARK):
            _Marking.marks.append((self.type, value))
            return
        super().setsockopt(level, option, value, *rest)


class _Truncating(asyncio.DatagramProtocol):
    """Answers over UDP with TC set, so the client asks again over TCP."""

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        reply = bytearray(_reply(data))
        reply[2] |= 0x02  # TC
        self.transport.sendto(bytes(reply), addr)


def test_a_mark_goes_on_every_upstream_socket_udp_and_tcp(monkeypatch: Any) -> None:
    """The DNS capture lets the front's own queries through by their mark (capture.py):
    the UDP socket and the TCP fallback's both carry it."""
    from types import SimpleNamespace

    from oe_router.dns import upstream

    shim = SimpleNamespace(**{n: getattr(socket, n) for n in dir(socket) if n.isupper()})
    shim.socket = _Marking
    monkeypatch.setattr(upstream, "socket", shim)
    _Marking.marks.clear()

    async def main() -> bytes:
        loop = asyncio.get_running_loop()

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            size = struct.unpack("!H", await reader.readexactly(2))[0]
            reply = _reply(await reader.readexactly(size))
            writer.write(struct.pack("!H", len(reply)) + reply)
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        transport, _ = await loop.create_datagram_endpoint(
            _Truncating, local_addr=("127.0.0.1", port), family=socket.AF_INET
        )
        client = UpstreamClient(
            StaticSource([Endpoint("127.0.0.1", port)]),
            UpstreamSettings(timeout=1.0, tries=1, mark=0x4F000035),
        )
        try:
            return await client.query(dns.message.make_query("host.example.", "A").to_wire())
        finally:
            transport.close()
            server.close()

    reply = asyncio.run(main())
    assert not dns.message.from_wire(reply).flags & 0x0200  # the TCP answer, not truncated
    assert _Marking.marks == [
        (socket.SOCK_DGRAM, 0x4F000035),
        (socket.SOCK_STREAM, 0x4F000035),
    ]
