"""datapath.packet: inner IP packets -> the flow XFRM's selector match reads.

Packets are built here with struct from the RFC layouts (791, 8200, 793/768, 792/4443,
2890, 6275), independently of the parser's own tables.
"""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from oe_router.datapath.packet import (
    Flow,
    MalformedPacket,
    flow,
    next_header,
    syn_seq,
    version,
)

A4, B4 = ipaddress.IPv4Address("192.0.2.10"), ipaddress.IPv4Address("198.51.100.7")
A6, B6 = ipaddress.IPv6Address("2001:db8::10"), ipaddress.IPv6Address("2001:db8:1::7")


def ipv4(proto: int, payload: bytes, *, frag: int = 0, options: bytes = b"") -> bytes:
    ihl = 5 + len(options) // 4
    total = ihl * 4 + len(payload)
    return (
        struct.pack(
            "!BBHHHBBH4s4s", 0x40 | ihl, 0, total, 0x1234, frag, 64, proto, 0, A4.packed, B4.packed
        )
        + options
        + payload
    )


def ipv6(nh: int, payload: bytes) -> bytes:
    return struct.pack("!IHBB16s16s", 6 << 28, len(payload), nh, 64, A6.packed, B6.packed) + payload


def ext(nh: int, body: bytes = b"\0" * 6) -> bytes:
    """A hop-by-hop/routing/destination-options header: 8 + 8n bytes."""
    return struct.pack("!BB", nh, (len(body) + 2) // 8 - 1) + body


def frag6(nh: int, offset: int, more: bool) -> bytes:
    return struct.pack("!BBHI", nh, 0, offset << 3 | int(more), 0xABCDEF)


def ports(sport: int, dport: int) -> bytes:
    return struct.pack("!HH", sport, dport) + b"\0" * 16


@pytest.mark.parametrize("proto", [6, 17, 132, 136])
def test_ipv4_ports(proto: int) -> None:
    f = flow(ipv4(proto, ports(40000, 443)))
    assert f == Flow(4, int(A4), int(B4), proto, 40000, 443)
    assert f.src_address == A4 and f.dst_address == B4


def test_ipv4_options_are_skipped() -> None:
    assert flow(ipv4(6, ports(1, 2), options=b"\x01" * 8)) == Flow(4, int(A4), int(B4), 6, 1, 2)


def test_icmp_type_in_sport_code_in_dport_like_xfrm() -> None:
    assert flow(ipv4(1, bytes([8, 0]) + b"\0" * 6)) == Flow(4, int(A4), int(B4), 1, 8, 0)
    assert flow(ipv4(1, bytes([3, 4]) + b"\0" * 30)) == Flow(4, int(A4), int(B4), 1, 3, 4)
    assert flow(ipv6(58, bytes([135, 0]) + b"\0" * 22)) == Flow(6, int(A6), int(B6), 58, 135, 0)


def test_gre_key_and_mobility_header() -> None:
    key = 0x12345678
    assert flow(ipv4(47, struct.pack("!HHI", 0x2000, 0x0800, key))).sport == 0x1234
    assert flow(ipv4(47, struct.pack("!HHI", 0x2000, 0x0800, key))).dport == 0x5678
    with_csum = struct.pack("!HHHHI", 0xA000, 0x0800, 0, 0, key)
    assert flow(ipv4(47, with_csum))[4:] == (0x1234, 0x5678)
    assert flow(ipv4(47, struct.pack("!HH", 0, 0x0800)))[4:] == (0, 0)
    assert flow(ipv6(135, bytes([59, 1, 5, 0]) + b"\0" * 4))[3:] == (135, 5, 0)


def test_other_protocols_have_no_ports() -> None:
    assert flow(ipv4(50, b"\0" * 16))[3:] == (50, 0, 0)
    assert flow(ipv6(59, b""))[3:] == (59, 0, 0)


def test_ipv4_fragments() -> None:
    first = ipv4(17, ports(53, 5353), frag=0x2000)  # MF set, offset 0: ports present
    assert flow(first)[3:] == (17, 53, 5353)
    later = ipv4(17, b"\xff" * 3, frag=0x2000 | 185)  # offset != 0: no header, no ports
    assert flow(later) == Flow(4, int(A4), int(B4), 17, 0, 0)


def test_ipv6_extension_headers_are_skipped() -> None:
    # hop-by-hop (16 bytes) -> routing (8) -> destination options (8) -> TCP
    pkt = ipv6(0, struct.pack("!BB", 43, 1) + b"\0" * 14 + ext(60) + ext(6) + ports(5000, 22))
    assert flow(pkt) == Flow(6, int(A6), int(B6), 6, 5000, 22)


def test_ipv6_fragments() -> None:
    first = ipv6(44, frag6(17, 0, True) + ports(53, 1053))
    assert flow(first)[3:] == (17, 53, 1053)
    later = ipv6(44, frag6(17, 100, False) + b"\xff")
    assert flow(later) == Flow(6, int(A6), int(B6), 17, 0, 0)
    after_dst = ipv6(60, ext(44) + frag6(58, 0, True) + bytes([128, 0]) + b"\0" * 6)
    assert flow(after_dst)[3:] == (58, 128, 0)


def test_version_and_next_header() -> None:
    assert version(ipv4(6, ports(1, 2))) == 4 and next_header(ipv4(6, ports(1, 2))) == 4
    assert version(ipv6(6, ports(1, 2))) == 6 and next_header(ipv6(6, ports(1, 2))) == 41
    for bad in (b"", b"\x50" + bytes(39), b"\x00"):
        with pytest.raises(MalformedPacket):
            version(bad)
        with pytest.raises(MalformedPacket):
            next_header(bad)


@pytest.mark.parametrize(
    "packet",
    [
        ipv4(6, ports(1, 2)),
        ipv4(1, bytes([8, 0, 0, 0])),
        ipv4(47, struct.pack("!HHI", 0x2000, 0x0800, 7)),
        ipv6(6, ports(1, 2)),
        ipv6(0, ext(60) + ext(44) + frag6(17, 0, True) + ports(3, 4)),
        ipv6(135, bytes([59, 1, 5, 0])),
    ],
)
def test_every_truncation_is_malformed_or_a_prefix_flow(packet: bytes) -> None:
    """A cut packet either still holds every byte the flow needs or is refused."""
    full = flow(packet)
    for cut in range(len(packet)):
        try:
            f = flow(packet[:cut])
        except MalformedPacket:
            continue
        assert f == full


def test_bad_ipv4_header_length() -> None:
    pkt = bytearray(ipv4(6, ports(1, 2)))
    pkt[0] = 0x44  # IHL 4 < 5
    with pytest.raises(MalformedPacket, match="header length"):
        flow(bytes(pkt))
    pkt[0] = 0x4F  # IHL 15: 60 bytes, more than the packet has
    with pytest.raises(MalformedPacket):
        flow(bytes(pkt))


@given(st.binary(max_size=120))
def test_arbitrary_bytes_give_a_flow_or_malformed(data: bytes) -> None:
    try:
        f = flow(data)
    except MalformedPacket:
        return
    assert f.version in (4, 6) and 0 <= f.sport <= 0xFFFF and 0 <= f.dport <= 0xFFFF


@given(
    v6=st.booleans(),
    proto=st.sampled_from([6, 17, 132, 136]),
    sport=st.integers(0, 0xFFFF),
    dport=st.integers(0, 0xFFFF),
    exts=st.lists(st.sampled_from([0, 43, 60, 44]), max_size=4),
)
def test_built_packets_round_trip(
    v6: bool, proto: int, sport: int, dport: int, exts: list[int]
) -> None:
    if not v6:
        assert flow(ipv4(proto, ports(sport, dport))) == Flow(
            4, int(A4), int(B4), proto, sport, dport
        )
        return
    body = ports(sport, dport)
    nh = proto
    for kind in reversed(exts):
        body = (frag6(nh, 0, True) if kind == 44 else ext(nh)) + body
        nh = kind
    assert flow(ipv6(nh, body)) == Flow(6, int(A6), int(B6), proto, sport, dport)


def _tcp(seq: int, flags: int) -> bytes:
    return struct.pack("!HHIIBBHHH", 40000, 443, seq, 7, 5 << 4, flags, 64240, 0, 0)


def test_syn_seq_names_a_bare_syn_only() -> None:
    """A client's SYN and its retransmissions share the sequence number; a SYN-ACK, RST,
    plain ACK, another protocol or a later fragment is no connection opening."""
    assert syn_seq(ipv4(6, _tcp(0xDEADBEEF, 0x02))) == 0xDEADBEEF
    assert syn_seq(ipv6(6, _tcp(5, 0x02 | 0x40 | 0x80))) == 5  # ECE/CWR (ECN setup) too
    assert syn_seq(ipv4(6, _tcp(5, 0x12))) is None  # SYN-ACK
    assert syn_seq(ipv4(6, _tcp(5, 0x06))) is None  # SYN+RST
    assert syn_seq(ipv4(6, _tcp(5, 0x10))) is None
    assert syn_seq(ipv4(17, _tcp(5, 0x02))) is None
    assert syn_seq(ipv4(6, _tcp(5, 0x02), frag=3)) is None
    assert syn_seq(ipv6(0, ext(6) + _tcp(5, 0x02))) is None  # extension headers: not read
    assert syn_seq(ipv4(6, _tcp(5, 0x02))[:30]) is None  # truncated: no error
    assert syn_seq(b"") is None and syn_seq(b"\x10") is None
