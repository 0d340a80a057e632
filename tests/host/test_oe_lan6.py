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
  cleartext packet reaches the world;
- with ``packet_hold`` the first packets of both wait in the daemon instead of being
  dropped by the trap: the private-or-clear one arrives once the pass shunts are in (the
  first datagram itself, un-NATed), the private one is dropped, and a later flow to the
  decided destination is not queued again.

The IKE seam is a probe over IPv6 (UDP 500 of the peer, nothing listens: the negotiation
fails for real); the host kernel has no ESP, so tunnels themselves are the QEMU tier's.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from collections.abc import Callable
from dataclasses import replace

import pytest

from oe_router.config.schema import OeConfig, PolicyConfig, parse_policy_entry
from oe_router.oe.lan import apply_nft
from oe_router.oe.service import OeService, kernel_datapath
from tests.aio import run, running
from tests.host.netlab import LanRouterWorld, received, udp
from tests.host.probe import PORT, ProbeNegotiator

pytestmark = pytest.mark.host

WAN6 = ipaddress.IPv6Address("2001:db8:1::2")
POC6 = "2001:db8:9::7"
PRIV6 = "2001:db8:5::7"
LAN_DEV = "fd00:1::2"


@pytest.fixture
def nets(lan_router_world: LanRouterWorld) -> tuple[str, str, str]:
    return lan_router_world("oe6", family=6, peers=(POC6, PRIV6))


def _udp(netns: str, bind: tuple[str, int] | None = None) -> socket.socket:
    return udp(netns, bind, socket.AF_INET6)


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
        async with running(svc, _config()):
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
                got += received(rx_poc)
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
            assert received(rx_priv) == []

    run(body(), rx_poc, rx_priv, tx)


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
        async with running(svc, _config()):
            apply_nft("flush set inet oe_router oe_private6\n", netns=r)
            tx.sendto(b"leak", (PRIV6, PORT))
            deadline = time.monotonic() + 3  # a fresh veth may need a second solicitation
            got: list[tuple[bytes, str]] = []
            while not got:
                assert time.monotonic() < deadline, "the unNATed flow did not arrive either"
                got += received(rx)
                await asyncio.sleep(0.02)
            assert neg.requests == []
            assert got == [(b"leak", LAN_DEV)]

    run(body(), rx, tx)


def test_lan_ipv6_first_packets_are_held_until_decided(nets: tuple[str, str, str]) -> None:
    lan, r, w = nets
    rx_poc, rx_priv = _udp(w, (POC6, PORT)), _udp(w, (PRIV6, PORT))
    tx = _udp(lan)
    lan6 = ipaddress.ip_network("fd00:1::/64")

    async def body() -> None:
        neg = ProbeNegotiator(r)
        svc = OeService(
            datapath_factory=kernel_datapath(r, wan_devices=["wan"], wan6=WAN6, lan=[lan6]),
            negotiator=neg,
            wan={6: WAN6},
            lan=[lan6],
            nft=lambda script: apply_nft(script, netns=r),
        )

        def stats() -> dict[str, int]:
            return svc.status().datapath_stats or {}

        async def until(what: Callable[[], bool], seconds: float = 5.0) -> bool:
            deadline = time.monotonic() + seconds
            while not what() and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            return what()

        async with running(svc, replace(_config(), packet_hold=True)):
            assert "held_now" in stats(), f"the hold did not come up for IPv6: {stats()}"
            got: list[tuple[bytes, str]] = []

            def arrived() -> list[tuple[bytes, str]]:
                got.extend(received(rx_poc))
                return got

            # private-or-clear: held (not dropped) while the negotiation fails, then the
            # very first datagram leaves, once, with the device's own address
            tx.sendto(b"first", (POC6, PORT))
            assert await until(lambda: arrived() != []), f"held datagram lost: {stats()}"
            await asyncio.sleep(0.2)
            assert arrived() == [(b"first", LAN_DEV)], got
            (req,) = neg.requests
            assert (str(req.peer), req.local) == (POC6, WAN6)
            assert stats()["accepted"] == 1 and stats()["held_now"] == 0
            # the destination is known now: a new flow to it is not queued
            queued = stats()["queued"]
            tx2 = _udp(lan)
            try:
                tx2.sendto(b"second", (POC6, PORT))
                assert await until(lambda: len(arrived()) == 2), got
            finally:
                tx2.close()
            assert got[1] == (b"second", LAN_DEV) and stats()["queued"] == queued
            # private: NATed into the WAN trap, held, the negotiation fails, dropped
            tx.sendto(b"p1", (PRIV6, PORT))
            assert await until(lambda: stats()["dropped"] >= 1), stats()
            assert str(neg.requests[-1].peer) == PRIV6 and neg.requests[-1].local == WAN6
            tx.sendto(b"p2", (PRIV6, PORT))
            await asyncio.sleep(0.3)
            assert received(rx_priv) == []

    run(body(), rx_poc, rx_priv, tx)
