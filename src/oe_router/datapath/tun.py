"""The userspace datapath's TUN device: where routed packets leave the kernel and where
decrypted packets re-enter it.

Why a TUN (as strongSwan's kernel-libipsec): a packet routed to the device is read by
the worker as a whole IP packet after routing and source NAT, and a packet written to
it is received by the kernel as if it had arrived on that interface, so conntrack
undoes the NAT and forwards it to the LAN like any other reply.

``TunDevice`` is the device with what leads into it: a route per remote selector of
the Child SAs (counted: two SAs of a rekey share one), in a table of ours that a "not
fwmark" rule puts before the main table, so our own IKE and ESP sockets (marked) never
loop back in. Everything goes when its descriptor closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import socket
import struct
from typing import Any, Final

from oe_router.netns import in_netns

from .base import DatapathError, IPNetwork

__all__ = ["TUN_MTU", "TunDevice", "TunError", "open_tun"]

log = logging.getLogger("oe_router.datapath")

# linux/if_tun.h
_TUNSETIFF: Final = 0x400454CA
_IFF_TUN: Final = 0x0001
_IFF_NO_PI: Final = 0x1000
_IFF_MULTI_QUEUE: Final = 0x0100
_IFREQ: Final = struct.Struct("16sH22x")  # struct ifreq: ifr_name, ifr_flags, padding

#: Inner MTU: 1500 minus the worst ESP-in-UDP overhead over IPv6 (40 + 8 UDP + 8 ESP
#: header + 16 IV + 17 padding/trailer + 16 ICV = 105), rounded down as libipsec does.
TUN_MTU: Final = 1380


class TunError(Exception):
    """The TUN device cannot be made; the message names the device and the cause."""


def open_tun(name: str, *, netns: str | None = None, multi_queue: bool = False) -> int:
    """Create (or attach to) TUN device ``name``; returns its file descriptor.

    The device lives as long as a descriptor is open (it is not persistent), so a
    crashed daemon leaves no device and no routes through it behind.
    """
    if not 0 < len(name.encode()) < 16:
        raise TunError(f"TUN device name {name!r} must be 1 to 15 bytes")
    flags = _IFF_TUN | _IFF_NO_PI | (_IFF_MULTI_QUEUE if multi_queue else 0)
    with in_netns(netns):
        try:
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise TunError(
                f"TUN device {name}: /dev/net/tun: {exc.strerror} (load the tun module; "
                "kmod-tun on OpenWrt)"
            ) from None
        try:
            fcntl.ioctl(fd, _TUNSETIFF, _IFREQ.pack(name.encode(), flags))
        except OSError as exc:
            os.close(fd)
            raise TunError(f"TUN device {name}: TUNSETIFF: {exc.strerror}") from None
    return fd


class TunDevice:
    """The TUN device ``name``, its routing rule and its routes (one netns)."""

    def __init__(
        self,
        name: str,
        *,
        mtu: int,
        table: int,
        rule_priority: int,
        fwmark: int,
        netns: str | None = None,
    ) -> None:
        self.name = name
        self._mtu = mtu
        self._table = table
        self._rule_priority = rule_priority
        self._fwmark = fwmark
        self._netns = netns
        self.fd: int | None = None
        self._index = 0
        self._routes: dict[IPNetwork, int] = {}  # remote selector -> Child SAs using it

    def open(self) -> int:
        """Create the device (TunError if the kernel cannot); returns its descriptor."""
        self.fd = open_tun(self.name, netns=self._netns)
        return self.fd

    def _ipr(self) -> Any:
        from pyroute2.iproute.linux import IPRoute

        with in_netns(self._netns):
            return IPRoute()

    def setup(self) -> None:
        """Up with our MTU, the "not fwmark -> our table" rule, no reverse-path filter
        (decrypted packets arrive from anywhere). Blocking: run it in a thread."""
        with self._ipr() as ipr:
            idx = ipr.link_lookup(ifname=self.name)
            if not idx:
                raise DatapathError(f"TUN device {self.name} vanished after creation")
            self._index = idx[0]
            ipr.link("set", index=self._index, mtu=self._mtu, state="up")
            for family in (socket.AF_INET, socket.AF_INET6):
                self._rule(ipr, "del", family, missing_ok=True)  # an earlier run's
                self._rule(ipr, "add", family)
        self._sysctl(f"net/ipv4/conf/{self.name}/rp_filter", "0")

    def _rule(self, ipr: Any, cmd: str, family: int, *, missing_ok: bool = False) -> None:
        from pyroute2.netlink.exceptions import NetlinkError

        try:
            ipr.rule(
                cmd,
                family=family,
                table=self._table,
                priority=self._rule_priority,
                fwmark=self._fwmark,
                fwmask=self._fwmark,
                flags=0x2,  # FIB_RULE_INVERT: "not fwmark"
            )
        except NetlinkError as exc:
            if not missing_ok:
                raise DatapathError(
                    f"routing rule 'not fwmark {self._fwmark:#x} lookup {self._table}': {exc}"
                ) from None

    def _sysctl(self, key: str, value: str) -> None:
        try:
            with in_netns(self._netns), open(f"/proc/sys/{key}", "w") as f:
                f.write(value)
        except OSError as exc:
            log.warning("cannot set %s=%s: %s", key.replace("/", "."), value, exc)

    async def route_ref(self, net: IPNetwork, delta: int) -> None:
        """Route ``net`` into the device while at least one Child SA needs it (``delta``
        +1 or -1)."""
        n = self._routes.get(net, 0) + delta
        if n > 0:
            self._routes[net] = n
        else:
            self._routes.pop(net, None)
        if (delta > 0 and n == 1) or (delta < 0 and n <= 0):
            await asyncio.to_thread(self._route, "replace" if delta > 0 else "del", net)

    def _route(self, cmd: str, net: IPNetwork) -> None:
        from pyroute2.netlink.exceptions import NetlinkError

        try:
            with self._ipr() as ipr:
                ipr.route(
                    cmd,
                    dst=str(net),
                    oif=self._index,
                    table=self._table,
                    family=socket.AF_INET6 if net.version == 6 else socket.AF_INET,
                )
        except NetlinkError as exc:
            if cmd != "del":
                raise DatapathError(f"route {net} dev {self.name}: {exc}") from None

    def close(self) -> None:
        """The rule goes, and with the descriptor the device and every route through it."""
        with contextlib.suppress(Exception), self._ipr() as ipr:
            for family in (socket.AF_INET, socket.AF_INET6):
                self._rule(ipr, "del", family, missing_ok=True)
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        self._routes.clear()
