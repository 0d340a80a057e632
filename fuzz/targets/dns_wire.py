"""Fuzz target: the DNS front's fast-path wire readers (``dns/wire.py``).

Input: a DNS message, read both as a client query and as an upstream reply. Oracles:
none of it raises; a query the fast path accepts is one the front can use (its question
name is a valid DNS name) and agrees with dnspython wherever dnspython parses it; a
reply's TTL offsets lie inside it, and aging/capping TTLs keeps the reply readable, the
same length and every TTL at most the cap. (Not that dnspython still parses it: a name
compressed to a pointer into the header or a TTL changes with them, a reply no real
upstream sends.)
"""

from __future__ import annotations

import struct

import dns.exception
import dns.message

from fuzz.common import fuzz_main, instrumented

with instrumented():
    from oe_router.dns.front import Question
    from oe_router.dns.wire import read_query, read_reply, rewrite_ttls

TTL = struct.Struct("!I")


def _parse(wire: bytes) -> dns.message.Message | None:
    try:
        return dns.message.from_wire(wire)
    except (dns.exception.DNSException, ValueError, UnicodeError):
        return None


def test_one_input(data: bytes) -> None:
    view = read_query(data)
    if view is not None:
        question = Question.of_view(view)  # what the front does with an accepted query
        msg = _parse(data)
        if msg is not None and msg.question:
            q = msg.question[0]
            assert q.name == question.name, (q.name, question.name)
            assert (int(q.rdtype), int(q.rdclass), msg.id) == (view.qtype, view.qclass, view.id)
    reply = read_reply(data)
    if reply is None:
        return
    for at in reply.ttl_offsets:
        assert 12 <= at <= len(data) - TTL.size, (at, len(data))
    elapsed = data[-1] * 37 if data else 0
    cap = 300 if len(data) & 1 else None
    out = rewrite_ttls(data, 0x4242, reply.ttl_offsets, elapsed, cap)
    assert len(out) == len(data) and out[:2] == b"\x42\x42"
    for at in reply.ttl_offsets:
        ttl = TTL.unpack_from(out, at)[0]
        before = TTL.unpack_from(data, at)[0]
        assert ttl <= max(0, before - elapsed) and (cap is None or ttl <= cap), (before, ttl)
    again = read_reply(out)
    assert again is not None and again.ttl_offsets == reply.ttl_offsets


if __name__ == "__main__":
    fuzz_main(test_one_input)
