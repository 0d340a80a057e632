"""The few DNS wire fields the front reads on its hot path (RFC 1035 4.1, RFC 6891 6.1).

Why not dnspython here: it parses and renders whole messages, which cost the front
most of its time per query (profiled: ~0.1 ms per parse or render). A cached answer
only needs the query's header, question and OPT record, and the offsets of the
reply's TTLs to age and cap them in place. Anything unusual (several questions,
a compressed question name, an EDNS version other than 0, trailing bytes, a
malformed record) gives None, and the caller takes the dnspython path, which also
produces the error replies.
"""

from __future__ import annotations

import ipaddress
import struct

from oe_router.records import record

__all__ = ["QueryView", "ReplyView", "read_query", "read_reply", "rewrite_ttls"]

#: id, flags, qdcount, ancount, nscount, arcount
HEADER = struct.Struct("!HHHHHH")
#: qtype, qclass (after the question name)
QUESTION = struct.Struct("!HH")
#: type, class, ttl, rdlength (after an RR's owner name); OPT: class=payload, ttl=flags
RR = struct.Struct("!HHIH")
TTL_OFFSET = 4  #: of ``ttl`` inside ``RR``
ID = struct.Struct("!H")
TTL = struct.Struct("!I")

_QR = 0x8000
_OPCODE = 0x7800
_TC = 0x0200
_CD = 0x0010
_RCODE = 0x000F
_DO = 0x8000  #: in the OPT record's flags (low 16 bits of its TTL field)
_OPT, _SOA, _A, _AAAA, _IN = 41, 6, 1, 28, 1
_MAX_NAME = 255

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@record(frozen=True, slots=True)
class QueryView:
    """A plain query: one question, no records but an optional EDNS0 OPT."""

    id: int
    flags: int
    labels: tuple[bytes, ...]  #: question name labels, lowercased, without the root
    qtype: int
    qclass: int
    edns: bool
    payload: int  #: the client's EDNS0 UDP size (0 without EDNS)
    do: bool

    @property
    def cd(self) -> bool:
        return bool(self.flags & _CD)


def _skip_name(wire: bytes, pos: int) -> int:
    """Offset just past a (possibly compressed) name at ``pos``; -1 if malformed."""
    end = len(wire)
    while pos < end:
        length = wire[pos]
        if length == 0:
            return pos + 1
        if length & 0xC0 == 0xC0:
            return pos + 2 if pos + 2 <= end else -1
        if length & 0xC0:
            return -1
        pos += 1 + length
    return -1


def read_query(wire: bytes) -> QueryView | None:
    """The query's fields, or None when the dnspython path must judge it."""
    if len(wire) < HEADER.size:
        return None
    qid, flags, qd, an, ns, ar = HEADER.unpack_from(wire)
    if flags & (_QR | _OPCODE) or qd != 1 or an or ns or ar > 1:
        return None
    pos = HEADER.size
    labels: list[bytes] = []
    while True:
        if pos >= len(wire):
            return None
        length = wire[pos]
        if length == 0:
            pos += 1
            break
        if length & 0xC0 or pos + 1 + length > len(wire):
            return None
        labels.append(wire[pos + 1 : pos + 1 + length].lower())
        pos += 1 + length
        if pos - HEADER.size + 1 > _MAX_NAME:  # with the root label still to come
            return None
    if pos + QUESTION.size > len(wire):
        return None
    qtype, qclass = QUESTION.unpack_from(wire, pos)
    pos += QUESTION.size
    edns, payload, do = False, 0, False
    if ar:
        if wire[pos : pos + 1] != b"\x00" or pos + 1 + RR.size > len(wire):
            return None
        rtype, payload, ttl, rdlen = RR.unpack_from(wire, pos + 1)
        pos += 1 + RR.size + rdlen
        if rtype != _OPT or (ttl >> 16) & 0xFF != 0:  # EDNS version 0 only
            return None
        edns, do = True, bool(ttl & _DO)
    if pos != len(wire):
        return None
    return QueryView(qid, flags, tuple(labels), qtype, qclass, edns, payload, do)


@record(frozen=True, slots=True)
class ReplyView:
    """What the front needs from an upstream reply without rendering it again."""

    rcode: int
    truncated: bool
    ttl_offsets: tuple[int, ...]  #: every TTL field except the OPT record's
    min_ttl: int  #: smallest answer/authority TTL or SOA minimum (RFC 2308); 0 if none
    addresses: tuple[IPAddress, ...]  #: A/AAAA of the answer section (NOERROR only)


def read_reply(wire: bytes) -> ReplyView | None:
    """Walk every record of a reply; None if any of it is malformed."""
    if len(wire) < HEADER.size:
        return None
    _qid, flags, qd, an, ns, ar = HEADER.unpack_from(wire)
    rcode = flags & _RCODE
    pos = HEADER.size
    for _ in range(qd):
        pos = _skip_name(wire, pos)
        if pos < 0:
            return None
        pos += QUESTION.size
    offsets: list[int] = []
    ttls: list[int] = []
    addresses: list[IPAddress] = []
    for index in range(an + ns + ar):
        pos = _skip_name(wire, pos)
        if pos < 0 or pos + RR.size > len(wire):
            return None
        rtype, rclass, ttl, rdlen = RR.unpack_from(wire, pos)
        rdata = pos + RR.size
        end = rdata + rdlen
        if end > len(wire):
            return None
        if rtype != _OPT:
            offsets.append(pos + TTL_OFFSET)
        if index < an + ns:
            ttls.append(ttl)
            if rtype == _SOA and index >= an and rdlen >= 4:
                ttls.append(TTL.unpack_from(wire, end - 4)[0])
        if index < an and rclass == _IN and rcode == 0:
            if rtype == _A and rdlen == 4:
                addresses.append(ipaddress.IPv4Address(wire[rdata:end]))
            elif rtype == _AAAA and rdlen == 16:
                addresses.append(ipaddress.IPv6Address(wire[rdata:end]))
        pos = end
    if pos != len(wire):
        return None
    return ReplyView(
        rcode, bool(flags & _TC), tuple(offsets), min(ttls) if ttls else 0, tuple(addresses)
    )


def rewrite_ttls(
    wire: bytes, query_id: int, offsets: tuple[int, ...], elapsed: int = 0, cap: int | None = None
) -> bytes:
    """``wire`` with the client's ID and every TTL aged by ``elapsed``, then capped.

    ``cap`` None means no cap. TTLs never go below 0.
    """
    out = bytearray(wire)
    ID.pack_into(out, 0, query_id)
    if elapsed <= 0 and cap is None:
        return bytes(out)
    for at in offsets:
        ttl = max(0, TTL.unpack_from(out, at)[0] - elapsed)
        if cap is not None and ttl > cap:
            ttl = cap
        TTL.pack_into(out, at, ttl)
    return bytes(out)
