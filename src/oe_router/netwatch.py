"""The kernel's address and link events (rtnetlink), so the daemon follows a WAN change itself.

Why in the daemon as well as procd's interface trigger: the trigger fires only for what
netifd does, and only on a router with procd; a DHCP client, a PPP daemon or an admin's
``ip addr`` change the addresses without netifd's ``interface.update``, and a trigger
reload waits procd's reload delay. An rtnetlink socket bound to the link and address
groups hears every change at once.

Sans-IO core: ``parse_events`` turns the bytes of one ``recv`` into ``LinkEvent``s; the
wire formats are declared once as field tables. ``NetlinkWatch`` is the asyncio edge: a
non-blocking socket on the loop that calls back once per burst (debounced), since one
change (an address moved, a PPPoE session up) is several messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from collections.abc import Callable

from oe_router.records import record

__all__ = ["GROUPS", "LinkEvent", "NetlinkWatch", "parse_events"]

log = logging.getLogger("oe_router.daemon")

NETLINK_ROUTE = 0
#: rtnetlink multicast groups (linux/rtnetlink.h RTMGRP_*): links, IPv4 and IPv6 addresses
RTMGRP_LINK, RTMGRP_IPV4_IFADDR, RTMGRP_IPV6_IFADDR = 0x1, 0x10, 0x100
GROUPS = RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR

#: message types (linux/rtnetlink.h) -> (what, header table)
RTM_NEWLINK, RTM_DELLINK, RTM_NEWADDR, RTM_DELADDR = 16, 17, 20, 21
NLMSG_ERROR, NLMSG_OVERRUN = 2, 4

#: struct nlmsghdr: len, type, flags, seq, pid
NLMSGHDR = struct.Struct("=IHHII")
#: struct ifinfomsg: family, pad, type, index, flags, change
IFINFOMSG = struct.Struct("=BxHiII")
#: struct ifaddrmsg: family, prefixlen, flags, scope, index
IFADDRMSG = struct.Struct("=BBBBI")

KINDS = {
    RTM_NEWLINK: "link",
    RTM_DELLINK: "link gone",
    RTM_NEWADDR: "address",
    RTM_DELADDR: "address gone",
}


@record(frozen=True)
class LinkEvent:
    """One rtnetlink notification: what changed, on which interface index."""

    kind: str
    ifindex: int
    #: address events: the scope (0 = global); link events: -1
    scope: int = -1


def parse_events(data: bytes) -> tuple[list[LinkEvent], bool]:
    """The events in one datagram, and whether the kernel reported an overrun (events lost:
    the caller must look at everything again). Malformed tails are ignored."""
    events: list[LinkEvent] = []
    overrun = False
    off = 0
    while off + NLMSGHDR.size <= len(data):
        length, mtype, _flags, _seq, _pid = NLMSGHDR.unpack_from(data, off)
        if length < NLMSGHDR.size or off + length > len(data):
            break
        body = off + NLMSGHDR.size
        if mtype == NLMSG_OVERRUN:
            overrun = True
        elif mtype in (RTM_NEWLINK, RTM_DELLINK) and length >= NLMSGHDR.size + IFINFOMSG.size:
            _fam, _type, index, _fl, _change = IFINFOMSG.unpack_from(data, body)
            events.append(LinkEvent(KINDS[mtype], index))
        elif mtype in (RTM_NEWADDR, RTM_DELADDR) and length >= NLMSGHDR.size + IFADDRMSG.size:
            _fam, _plen, _fl, scope, index = IFADDRMSG.unpack_from(data, body)
            events.append(LinkEvent(KINDS[mtype], index, scope))
        off += (length + 3) & ~3  # NLMSG_ALIGN
    return events, overrun


class NetlinkWatch:
    """Calls ``on_change`` once per burst of link/address events (``settle`` seconds after
    the last one, at most ``max_delay`` after the first), on the running loop."""

    def __init__(
        self, on_change: Callable[[], None], settle: float = 0.3, max_delay: float = 1.5
    ) -> None:
        self._on_change = on_change
        self._settle = settle
        self._max_delay = max_delay
        self._sock: socket.socket | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._first: float | None = None
        self.events = 0
        self.bursts = 0

    def start(self) -> bool:
        """Open and watch; False (one log line) where rtnetlink cannot be opened."""
        try:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            sock.bind((0, GROUPS))
            sock.setblocking(False)
        except OSError as exc:
            log.warning("address events: cannot open rtnetlink (%s); reloads still re-read", exc)
            return False
        self._sock = sock
        asyncio.get_running_loop().add_reader(sock.fileno(), self._readable)
        return True

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._sock is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None

    def _readable(self) -> None:
        assert self._sock is not None
        changed = False
        while True:
            try:
                data = self._sock.recv(65536)
            except BlockingIOError:
                break
            except OSError:  # ENOBUFS: the kernel dropped events; look at everything again
                changed = True
                continue
            events, overrun = parse_events(data)
            self.events += len(events)
            changed = changed or overrun or bool(events)
        if changed:
            self._schedule()

    def _schedule(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        if self._first is None:
            self._first = now
        due = min(now + self._settle, self._first + self._max_delay)
        if self._timer is not None:
            self._timer.cancel()
        self._timer = loop.call_at(due, self._fire)

    def _fire(self) -> None:
        self._timer = None
        self._first = None
        self.bursts += 1
        self._on_change()
