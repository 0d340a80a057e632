"""The userspace datapath's TUN device: where routed packets leave the kernel and where
decrypted packets re-enter it.

Why a TUN (as strongSwan's kernel-libipsec): a packet routed to the device is read by
the worker as a whole IP packet after routing and source NAT, and a packet written to
it is received by the kernel as if it had arrived on that interface, so conntrack
undoes the NAT and forwards it to the LAN like any other reply.
"""

from __future__ import annotations

import fcntl
import os
import struct
from typing import Final

from oe_router.netns import in_netns

__all__ = ["TUN_MTU", "TunError", "open_tun"]

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
