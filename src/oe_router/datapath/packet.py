"""Inner IP packets -> the flow a policy lookup needs, fast and without surprises.

``flow(packet)`` reads what XFRM's decode_session reads: addresses, protocol, and the
two "ports" of the selector match (``xfrm_flowi_sport``/``_dport`` in
include/net/xfrm.h): TCP, UDP, UDP-Lite and SCTP ports; the ICMP/ICMPv6 type in
``sport`` and code in ``dport`` (so a selector's ICMP type matches whichever way the
packet goes); the Mobility Header type in ``sport``; a GRE key split over both. Other
protocols, and fragments after the first, have ports 0. IPv6 extension headers
(hop-by-hop, routing, destination options, fragment) are skipped to the upper layer.

Addresses are ints: a prefix match is then ``addr & mask == net`` with no conversion,
they hash fast as cache keys, and ``struct`` reads them in one call (an
``ipaddress`` object costs about a microsecond each to build; ``Flow.src_address``
makes one for the slow paths). Anything short or inconsistent raises
``MalformedPacket``; no IndexError or struct.error escapes.
"""

from __future__ import annotations

import ipaddress
import struct
from typing import Final, NamedTuple

__all__ = [
    "IPV4_HEADER",
    "IPV6_HEADER",
    "Flow",
    "MalformedPacket",
    "flow",
    "next_header",
    "syn_seq",
    "version",
]

# --- wire formats ------------------------------------------------------------------------
#: IPv4 (RFC 791) fields the lookup reads: version/IHL, fragment offset + flags, protocol,
#: source, destination.
IPV4_HEADER: Final = struct.Struct("!B5xHxB2xII")
#: IPv6 (RFC 8200): next header at 6; the addresses as two 64-bit halves each.
IPV6_HEADER: Final = struct.Struct("!6xB1xQQQQ")
_PORTS: Final = struct.Struct("!HH")  # TCP, UDP, UDP-Lite, SCTP: source, destination port
_TYPE_CODE: Final = struct.Struct("!BB")  # ICMP, ICMPv6: type, code
_EXT: Final = struct.Struct("!BB")  # IPv6 extension header: next header, length
_FRAG6: Final = struct.Struct("!BxH")  # IPv6 fragment header: next header, offset + flags
_GRE: Final = struct.Struct("!H")  # GRE flags (RFC 2890: key present = 0x2000)
_GRE_KEY: Final = struct.Struct("!I")
_MH_TYPE: Final = struct.Struct("!2xB")  # Mobility Header (RFC 6275): type at 2
#: TCP (RFC 9293): sequence number at 4, flags at 13 (after ack number and data offset).
_TCP_SEQ_FLAGS: Final = struct.Struct("!4xI5xB")
_TCP_SYN: Final = 0x02
_TCP_ACK: Final = 0x10
_TCP_RST: Final = 0x04

_PORT_PROTOS: Final = frozenset((6, 17, 132, 136))  # TCP, UDP, SCTP, UDP-Lite
_ICMP_PROTOS: Final = frozenset((1, 58))
_V6_EXT: Final = frozenset((0, 43, 60))  # hop-by-hop, routing, destination options
_FRAGMENT: Final = 44
_GRE_PROTO: Final = 47
_MH: Final = 135

_unpack_v4 = IPV4_HEADER.unpack_from
_unpack_v6 = IPV6_HEADER.unpack_from
_unpack_ports = _PORTS.unpack_from


class MalformedPacket(ValueError):
    """The bytes are not an IP packet this code can read (the message says where)."""


class Flow(NamedTuple):
    """What an XFRM selector matches. ``src``/``dst`` are the addresses as ints
    (``version`` says 4 or 6); ``sport``/``dport`` hold ICMP type/code for ICMP."""

    version: int
    src: int
    dst: int
    proto: int
    sport: int = 0
    dport: int = 0

    @property
    def src_address(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        return _address(self.version, self.src)

    @property
    def dst_address(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        return _address(self.version, self.dst)


_new = tuple.__new__  # Flow(...) without NamedTuple's Python-level __new__: half the cost


def _address(v: int, value: int) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.IPv4Address(value) if v == 4 else ipaddress.IPv6Address(value)


def version(packet: bytes) -> int:
    """4 or 6; ``MalformedPacket`` for anything else (an empty read included)."""
    if not packet:
        raise MalformedPacket("empty packet")
    v = packet[0] >> 4
    if v != 4 and v != 6:
        raise MalformedPacket(f"IP version {v}")
    return v


def next_header(packet: bytes) -> int:
    """The ESP next header that carries this packet in tunnel mode: 4 (IPv4) or 41."""
    return 4 if version(packet) == 4 else 41


def _upper(packet: bytes, proto: int, off: int, v: int) -> tuple[int, int]:
    """The selector's (sport, dport) from the upper-layer header at ``off``."""
    if proto in _PORT_PROTOS:
        return _unpack_ports(packet, off)
    if proto in _ICMP_PROTOS:
        return _TYPE_CODE.unpack_from(packet, off)
    if proto == _GRE_PROTO:
        (flags,) = _GRE.unpack_from(packet, off)
        if flags & 0x2000:  # key present: after the checksum word if there is one
            (key,) = _GRE_KEY.unpack_from(packet, off + (8 if flags & 0x8000 else 4))
            return key >> 16, key & 0xFFFF
        return 0, 0
    if proto == _MH and v == 6:
        return _MH_TYPE.unpack_from(packet, off)[0], 0
    return 0, 0


def flow(packet: bytes) -> Flow:
    """The flow of an IPv4 or IPv6 packet; ``MalformedPacket`` if it cannot be read."""
    try:
        b0 = packet[0]
        if b0 >> 4 == 4:
            vihl, frag, proto, src, dst = _unpack_v4(packet)
            ihl = (vihl & 15) << 2
            if ihl < 20:
                raise MalformedPacket(f"IPv4 header length {ihl}")
            if frag & 0x1FFF:  # not the first fragment: no upper-layer header
                return _new(Flow, (4, src, dst, proto, 0, 0))
            if proto in _PORT_PROTOS:
                sport, dport = _unpack_ports(packet, ihl)
                return _new(Flow, (4, src, dst, proto, sport, dport))
            sport, dport = _upper(packet, proto, ihl, 4)
            return _new(Flow, (4, src, dst, proto, sport, dport))
        if b0 >> 4 == 6:
            proto, s1, s2, d1, d2 = _unpack_v6(packet)
            src, dst, off = s1 << 64 | s2, d1 << 64 | d2, 40
            while True:
                if proto in _PORT_PROTOS:
                    sport, dport = _unpack_ports(packet, off)
                    return _new(Flow, (6, src, dst, proto, sport, dport))
                if proto in _V6_EXT:
                    proto, hlen = _EXT.unpack_from(packet, off)
                    off += (hlen + 1) << 3
                elif proto == _FRAGMENT:
                    proto, frag = _FRAG6.unpack_from(packet, off)
                    off += 8
                    if frag & 0xFFF8:  # offset != 0: not the first fragment
                        return _new(Flow, (6, src, dst, proto, 0, 0))
                else:
                    sport, dport = _upper(packet, proto, off, 6)
                    return _new(Flow, (6, src, dst, proto, sport, dport))
        raise MalformedPacket(f"IP version {b0 >> 4}")
    except (IndexError, struct.error):
        raise MalformedPacket(f"{len(packet)}-byte packet is truncated") from None


def syn_seq(packet: bytes) -> int | None:
    """The sequence number of a connection-opening TCP SYN (SYN without ACK or RST), in
    an IPv4 packet or an IPv6 one without extension headers; None for anything else
    (a truncated header included). A client's retransmitted SYNs carry the same one."""
    try:
        b0 = packet[0]
        if b0 >> 4 == 4:
            vihl, frag, proto, _src, _dst = _unpack_v4(packet)
            if proto != 6 or frag & 0x1FFF:
                return None
            off = (vihl & 15) << 2
        elif b0 >> 4 == 6:
            if packet[6] != 6:
                return None
            off = 40
        else:
            return None
        seq, flags = _TCP_SEQ_FLAGS.unpack_from(packet, off)
    except (IndexError, struct.error):
        return None
    if flags & (_TCP_SYN | _TCP_ACK | _TCP_RST) != _TCP_SYN:
        return None
    return int(seq)
