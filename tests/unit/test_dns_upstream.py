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
