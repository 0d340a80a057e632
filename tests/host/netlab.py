"""What host tests share around their network namespaces (conftest.py's ``make_netns``
and ``lan_router_world`` fixtures make those): ``ip``, the LAN/router/world address
plan, and the UDP sockets a test sends and receives with from this process.
"""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Callable

from oe_router.datapath.netns import in_netns


def ip(*args: str) -> str:
    """``ip ARGS``; a failure raises with ip's message."""
    return subprocess.run(["ip", *args], check=True, capture_output=True, text=True).stdout


#: Where a ``lan_router_world`` topology puts its addresses, per IP family: (LAN device,
#: router's LAN side, router's WAN side, world's side of the WAN link), and the sysctl
#: that makes the router forward. The router's devices are ``lan0`` and ``wan``, the LAN
#: device's ``eth0``, the world's ``w0``.
LRW_PLANS: dict[int, tuple[tuple[str, str, str, str], str]] = {
    4: (
        ("192.168.1.2/24", "192.168.1.1/24", "198.51.100.1/24", "198.51.100.2/24"),
        "net.ipv4.ip_forward=1",
    ),
    6: (
        ("fd00:1::2/64", "fd00:1::1/64", "2001:db8:1::2/64", "2001:db8:1::1/64"),
        "net.ipv6.conf.all.forwarding=1",
    ),
}

#: conftest's ``make_netns`` fixture: a fresh namespace from a name prefix.
MakeNetns = Callable[[str], str]
#: conftest's ``lan_router_world`` fixture: (L, R, W) from a prefix, family, peers, sysctls.
LanRouterWorld = Callable[..., tuple[str, str, str]]


def udp(
    netns: str, bind: tuple[str, int] | None = None, family: int = socket.AF_INET
) -> socket.socket:
    """A non-blocking UDP socket opened in ``netns`` (used from this process), bound to
    ``bind`` if given: the LAN device's sender, the world's receivers."""
    with in_netns(netns):
        s = socket.socket(family, socket.SOCK_DGRAM)
    if bind is not None:
        s.bind(bind)
    s.setblocking(False)
    return s


def received(s: socket.socket) -> list[tuple[bytes, str]]:
    """Every datagram waiting on ``s``, with its source address."""
    out = []
    while True:
        try:
            data, addr = s.recvfrom(2048)
        except BlockingIOError:
            return out
        out.append((data, addr[0]))
