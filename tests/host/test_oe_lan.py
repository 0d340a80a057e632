"""The LAN gateway on the real kernel: nft SNAT, then the post-NAT XFRM lookup.

Three namespaces: L (a LAN device, 192.168.1.2), R (the router: LAN 192.168.1.1,
WAN 198.51.100.1) and W (the world: 203.0.113.7 private-or-clear, 192.0.2.7
private). A forwarded LAN packet is trapped only because SNAT rewrote its source to
the WAN address: the kernel repeats the XFRM lookup after NAT and the trap's
selector (source = WAN address) matches. The IKE seam is the probe negotiator of
tests/host/probe.py (no IKE responder in W, so negotiations fail for real).
"""

from __future__ import annotations

import asyncio
import ipaddress
import subprocess
import time
from dataclasses import replace

import pytest

from oe_router.oe.lan import LanError, LanGateway, apply_nft, nft_script
from oe_router.oe.service import OeService, kernel_datapath
from tests.aio import run, running
from tests.host.netlab import LanRouterWorld, ip, received, udp
from tests.host.probe import POC, PORT, PRIV, WAN, ProbeNegotiator, probe_config

pytestmark = pytest.mark.host


@pytest.fixture
def nets(lan_router_world: LanRouterWorld) -> tuple[str, str, str]:
    return lan_router_world("oe-", peers=(POC, PRIV))


def _gateway() -> LanGateway:
    return LanGateway(wan_ifname="wan", lan4=(ipaddress.IPv4Network("192.168.1.0/24"),), wan4=WAN)


def test_nft_script_applies_and_reads_back(nets: tuple[str, str, str]) -> None:
    _, r, _ = nets
    apply_nft(nft_script(_gateway()), netns=r)
    apply_nft(nft_script(_gateway()), netns=r)  # replaces, does not duplicate
    text = subprocess.run(
        ["ip", "netns", "exec", r, "nft", "list", "table", "inet", "oe_router"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert text.count("ip saddr 192.168.1.0/24 masquerade") == 1
    assert 'oifname "wan" ip saddr 192.168.1.0/24 masquerade' in text
    with pytest.raises(LanError, match="nft refused the LAN gateway rules"):
        apply_nft("table inet oe_router { chain c { bogus } }", netns=r)


def test_a_kept_table_follows_a_new_wan_address(nets: tuple[str, str, str]) -> None:
    """The table outlives a stop (keep_private_on_stop) in its stopped form. When the WAN
    address changes while no daemon runs, LAN flows must leave from the new address, not
    the one the table was written for (a fixed SNAT sent them from an address the router
    no longer had); flows to "private" networks keep the old address, the source their
    kept traps match, so they stay dropped there rather than leave in the clear."""
    lan, r, w = nets
    gw = replace(_gateway(), private4=(ipaddress.IPv4Network(f"{PRIV}/32"),), stopped=True)
    apply_nft(nft_script(gw), netns=r)
    rx = udp(w, (POC, PORT))
    rx_private = udp(w, (PRIV, PORT))
    udp(lan).sendto(b"before", (POC, PORT))
    ip("-n", r, "addr", "del", "198.51.100.1/24", "dev", "wan")  # takes the route along
    ip("-n", r, "addr", "add", "198.51.100.9/24", "dev", "wan")
    ip("-n", r, "route", "replace", "default", "via", "198.51.100.2")
    udp(lan).sendto(b"after", (POC, PORT))  # a new flow (new source port)
    udp(lan).sendto(b"private", (PRIV, PORT))
    got: list[tuple[bytes, str]] = []
    deadline = time.monotonic() + 5
    while len(got) < 3 and time.monotonic() < deadline:
        got += received(rx) + received(rx_private)
        time.sleep(0.02)
    assert sorted(got) == [
        (b"after", "198.51.100.9"),
        (b"before", "198.51.100.1"),
        (b"private", "198.51.100.1"),  # no trap in this test; a kept one matches this source
    ], got


def test_lan_flow_is_natted_then_trapped_then_shunted(nets: tuple[str, str, str]) -> None:
    lan, r, w = nets
    apply_nft(nft_script(_gateway()), netns=r)
    rx_poc = udp(w, (POC, PORT))
    rx_priv = udp(w, (PRIV, PORT))
    tx = udp(lan)

    async def body() -> None:
        neg = ProbeNegotiator(r)
        svc = OeService(
            datapath_factory=kernel_datapath(r),
            negotiator=neg,
            wan={4: WAN},
            lan=[ipaddress.ip_network("192.168.1.0/24")],
        )
        async with running(svc, probe_config()):
            tx.sendto(b"first", (POC, PORT))  # LAN -> SNAT -> trap (post-NAT lookup)
            deadline = time.monotonic() + 5
            while not svc.status().shunts:
                assert time.monotonic() < deadline, "no ACQUIRE for the NATed LAN flow"
                await asyncio.sleep(0.02)
            (req,) = neg.requests
            assert (str(req.peer), req.local) == (POC, WAN)
            tx.sendto(b"second", (POC, PORT))
            got: list[tuple[bytes, str]] = []
            while not got:
                assert time.monotonic() < deadline + 2, "the pass shunt let nothing through"
                got += received(rx_poc)
                await asyncio.sleep(0.02)
            # the world sees the router's WAN address, and the trapped first packet is lost
            assert got == [(b"second", "198.51.100.1")]

            tx.sendto(b"p1", (PRIV, PORT))
            while len(svc.status().shunts) < 2:
                assert time.monotonic() < deadline + 5, "no drop shunt for the private LAN flow"
                await asyncio.sleep(0.02)
            for _ in range(5):
                tx.sendto(b"p2", (PRIV, PORT))
            await asyncio.sleep(0.3)
            assert received(rx_priv) == []
            assert {s.kind for s in svc.status().shunts} == {"pass", "drop"}

    run(body(), rx_poc, rx_priv, tx)


def test_without_snat_a_lan_flow_is_not_trapped(nets: tuple[str, str, str]) -> None:
    """The control: with no SNAT the LAN source never matches a trap, so nothing is
    negotiated and the packet leaves in the clear with its LAN source address."""
    lan, r, w = nets
    rx = udp(w, (POC, PORT))
    tx = udp(lan)

    async def body() -> None:
        neg = ProbeNegotiator(r)
        svc = OeService(datapath_factory=kernel_datapath(r), negotiator=neg, wan={4: WAN})
        async with running(svc, probe_config()):
            tx.sendto(b"clear", (POC, PORT))
            await asyncio.sleep(0.5)
            assert neg.requests == []
            assert received(rx) == [(b"clear", "192.168.1.2")]

    run(body(), rx, tx)
