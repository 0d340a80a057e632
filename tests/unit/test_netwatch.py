"""rtnetlink notifications parsed (``netwatch.parse_events``), and the daemon's answer to
one (``Daemon.network_event``): look again, rebuild only when something changed."""

from __future__ import annotations

import struct

from oe_router.netwatch import (
    IFADDRMSG,
    IFINFOMSG,
    NLMSGHDR,
    RTM_DELADDR,
    RTM_NEWADDR,
    RTM_NEWLINK,
    LinkEvent,
    parse_events,
)


def _msg(mtype: int, body: bytes, attrs: bytes = b"") -> bytes:
    raw = body + attrs
    length = NLMSGHDR.size + len(raw)
    pad = b"\0" * (-length % 4)
    return NLMSGHDR.pack(length, mtype, 0, 0, 0) + raw + pad


def test_address_and_link_messages_become_events() -> None:
    # an IFA_ADDRESS attribute of 4 bytes after the header, as the kernel sends it
    attr = struct.pack("=HH4s", 8, 1, bytes([203, 0, 113, 77]))
    data = (
        _msg(RTM_NEWADDR, IFADDRMSG.pack(2, 24, 0, 0, 3), attr)
        + _msg(RTM_DELADDR, IFADDRMSG.pack(10, 64, 0, 253, 3))
        + _msg(RTM_NEWLINK, IFINFOMSG.pack(0, 1, 7, 0x1043, 1), b"\0" * 5)  # odd length
    )
    events, overrun = parse_events(data)
    assert events == [
        LinkEvent("address", 3, 0),
        LinkEvent("address gone", 3, 253),
        LinkEvent("link", 7),
    ]
    assert not overrun


def test_an_overrun_and_garbage_are_reported_not_raised() -> None:
    events, overrun = parse_events(NLMSGHDR.pack(16, 4, 0, 0, 0))
    assert (events, overrun) == ([], True)
    for junk in (b"", b"\x01\x02", NLMSGHDR.pack(4, RTM_NEWADDR, 0, 0, 0) + b"x" * 20,
                 NLMSGHDR.pack(999, RTM_NEWADDR, 0, 0, 0)):  # fmt: skip
        assert parse_events(junk) == ([], False)
    # a message too short for its header is skipped, the next one still read
    short = _msg(RTM_NEWADDR, b"\0\0")
    assert parse_events(short + _msg(RTM_NEWLINK, IFINFOMSG.pack(0, 1, 2, 0, 0)))[0] == [
        LinkEvent("link", 2)
    ]
