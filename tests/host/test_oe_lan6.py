"""The IPv6 LAN gateway on the real kernel: the daemon's nft table, then the XFRM lookup.

Three namespaces, as tests/host/test_oe_lan.py but IPv6: L (a LAN device, fd00:1::2),
R (the router: LAN fd00:1::1, WAN 2001:db8:1::2) and W (the world: 2001:db8:9::7 in
private-or-clear, 2001:db8:5::7 in "private"). The OE service writes the LAN gateway
table itself (``nft=``, as the daemon does). What it must show:

- a LAN flow to a private-or-clear IPv6 destination with no tunnel is trapped before NAT
  by the LAN-sourced trap (oe-gateway.md 1.4), negotiated from the WAN address and, the
  negotiation failing, passed by the pass shunts for both sources: the next packet
  leaves with the device's own address (no NAT66 for ordinary traffic);
- a LAN flow into the "private" group is NATed to the WAN address (set oe_private6),
  meets the private trap, is negotiated and, the negotiation failing, dropped: no
  cleartext packet reaches the world.

The IKE seam is a probe over IPv6 (UDP 500 of the peer, nothing listens: the negotiation
fails for real); the host kernel has no ESP, so tunnels themselves are the QEMU tier's.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace

import pytest

from oe_router.config.schema import OeConfig, PolicyConfig, parse_policy_entry
from oe_router.datapath.netns import in_netns
from oe_router.oe.lan import apply_nft
from oe_router.oe.service import OeService, kernel_datapath
from tests.host.probe import PORT, ProbeNegotiator

pytestmark = pytest.mark.host

WAN6 = ipaddress.IPv6Address("2001:db8:1::2")
POC6 = "2001:db8:9::7"
PRIV6 = "2001:db8:5::7"
LAN_DEV = "fd00:1::2"


def _ip(*args: str) -> str:
    return subprocess.run(["ip", *args], check=True, capture_output=True, text=True).stdout


@pytest.fixture
def nets() -> Iterator[tuple[str, str, str]]:
    if os.geteuid() != 0:
        pytest.fail("the host tier needs root for network namespaces")
    tag = uuid.uuid4().hex[:8]
    lan, r, w = f"oe-l6-{tag}", f"oe-r6-{tag}", f"oe-w6-{tag}"
    for ns in (lan, r, w):
        _ip("netns", "add", ns)
        _ip("-n", ns, "link", "set", "lo", "up")
    try:
        _ip("-n", r, "link", "add", "lan0", "type", "veth", "peer", "name", "eth0", "netns", lan)
        _ip("-n", r, "link", "add", "wan", "type", "veth", "peer", "name", "w0", "netns", w)
        for ns, dev, addr in (
            (lan, "eth0", f"{LAN_DEV}/64"),
            (r, "lan0", "fd00:1::1/64"),
            (r, "wan", f"{WAN6}/64"),
            (w, "w0", "2001:db8:1::1/64"),
        ):
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "addr", "add", addr, "dev", dev, "nodad")
        _ip("-n", lan, "-6", "route", "add", "default", "via", "fd00:1::1")
        _ip("-n", r, "-6", "route", "add", "default", "via", "2001:db8:1::1")
        _ip("-n", w, "-6", "route", "add", "fd00:1::/64", "via", str(WAN6))
        for addr in (POC6, PRIV6):
            _ip("-n", w, "addr", "add", f"{addr}/128", "dev", "lo", "nodad")
        subprocess.run(
            ["ip", "netns", "exec", r, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"],
            check=True,
        )
        yield lan, r, w
    finally:
        for ns in (lan, r, w):
            _ip("netns", "del", ns)


def _udp(netns: str, bind: tuple[str, int] | None = None) -> socket.socket:
    with in_netns(netns):
        s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    if bind is not None:
        s.bind(bind)
    s.setblocking(False)
    return s


def _recv(s: socket.socket) -> list[tuple[bytes, str]]:
    out = []
    while True:
        try:
            data, addr = s.recvfrom(2048)
        except BlockingIOError:
            return out
        out.append((data, addr[0]))


def _config() -> OeConfig:
    return OeConfig(
        policy=replace(
            PolicyConfig(),
            private_or_clear=(parse_policy_entry("::/0"),),
            private=(parse_policy_entry("2001:db8:5::/48"),),
        )
    )


def test_lan_ipv6_private_flow_is_natted_trapped_and_dropped(
    nets: tuple[str, str, str],
) -> None:
    lan, r, w = nets
    rx_poc, rx_priv = _udp(w, (POC6, PORT)), _udp(w, (PRIV6, PORT))
    tx = _udp(lan)

    async def body() -> None:
        neg = ProbeNegotiator(r)
        svc = OeService(
            datapath_factory=kernel_datapath(r),
            negotiator=neg,
            wan={6: WAN6},
            lan=[ipaddress.ip_network("fd00:1::/64")],
            nft=lambda script: apply_nft(script, netns=r),
        )
        await svc.start(_config())
        try:
            # private-or-clear, no tunnel: the LAN trap catches the packet before NAT
            # (dropped while the ACQUIRE is pending), the negotiation WAN6 <-> peer fails,
            # pass shunts for WAN6 and the LAN prefix follow, and the next packet reaches
            # the world un-NATed, with the device's own address
            tx.sendto(b"trapped", (POC6, PORT))
            deadline = time.monotonic() + 5
            while len(svc.status().shunts) < 1:
                assert time.monotonic() < deadline, "no ACQUIRE for the LAN IPv6 flow"
                await asyncio.sleep(0.02)
            (req,) = neg.requests
            assert (str(req.peer), req.local) == (POC6, WAN6)
            shunts = svc.status().shunts
            # one row: the WAN6 and the LAN prefix's pass shunts are one decision
            assert [(s.kind, s.destination) for s in shunts] == [("pass", f"{POC6}/128")]
            deadline = time.monotonic() + 3  # a fresh veth may need a second solicitation
            got: list[tuple[bytes, str]] = []
            while not got:
                assert time.monotonic() < deadline, "the passed IPv6 LAN flow did not arrive"
                tx.sendto(b"clear", (POC6, PORT))
                await asyncio.sleep(0.1)
                got += _recv(rx_poc)
            assert set(got) == {(b"clear", LAN_DEV)}  # never the trapped one, never NATed
            assert len(neg.requests) == 1  # the LAN shunt stops further ACQUIREs

            # private: NATed into the trap, negotiated, failed -> drop shunt
            tx.sendto(b"p1", (PRIV6, PORT))
            deadline = time.monotonic() + 5
            while len(svc.status().shunts) < 2:
                assert time.monotonic() < deadline, "no ACQUIRE for the private IPv6 LAN flow"
                await asyncio.sleep(0.02)
            req = neg.requests[-1]
            assert (len(neg.requests), str(req.peer), req.local) == (2, PRIV6, WAN6)
            private = [s.kind for s in svc.status().shunts if s.destination == f"{PRIV6}/128"]
            assert private == ["drop"]  # one, from WAN6: the LAN flow was NATed into it
            for _ in range(5):
                tx.sendto(b"p2", (PRIV6, PORT))
            await asyncio.sleep(0.3)
            assert _recv(rx_priv) == []
        finally:
            await svc.stop()

    try:
        asyncio.run(body())
    finally:
        for s in (rx_poc, rx_priv, tx):
            with contextlib.suppress(OSError):
                s.close()


def test_without_the_private6_rule_the_private_flow_would_leak(
    nets: tuple[str, str, str],
) -> None:
    """The control: with the service's table but oe_private6 emptied (as before this rule
    existed), the LAN's flow into the private network is not trapped and arrives in the
    clear with the device's address. This is the leak the rule closes."""
    lan, r, w = nets
    rx = _udp(w, (PRIV6, PORT))
    tx = _udp(lan)

    async def body() -> None:
        neg = ProbeNegotiator(r)
        svc = OeService(
            datapath_factory=kernel_datapath(r),
            negotiator=neg,
            wan={6: WAN6},
            lan=[ipaddress.ip_network("fd00:1::/64")],
            nft=lambda script: apply_nft(script, netns=r),
        )
        await svc.start(_config())
        try:
            apply_nft("flush set inet oe_router oe_private6\n", netns=r)
            tx.sendto(b"leak", (PRIV6, PORT))
            deadline = time.monotonic() + 3  # a fresh veth may need a second solicitation
            got: list[tuple[bytes, str]] = []
            while not got:
                assert time.monotonic() < deadline, "the unNATed flow did not arrive either"
                got += _recv(rx)
                await asyncio.sleep(0.02)
            assert neg.requests == []
            assert got == [(b"leak", LAN_DEV)]
        finally:
            await svc.stop()

    try:
        asyncio.run(body())
    finally:
        rx.close()
        tx.close()
