"""The OE service takes its timers from the config, at start and at reload (real kernel).

Why: ``oe.ike.idle_timeout`` decides whether a Child SA is rekeyed or dropped at its soft
expiry, and the counter poll period follows from it; both must follow a reload (``oe
reload`` / SIGHUP) without a restart. The service runs on the real XFRM datapath in a
fresh network namespace (no SAs are needed: the host kernel has no ESP).
"""

from __future__ import annotations

import asyncio
import ipaddress
import subprocess
from dataclasses import replace

import pytest

from oe_router.config import parse_config
from oe_router.oe.lan import apply_nft
from oe_router.oe.service import OeService, kernel_datapath
from tests.aio import running
from tests.host.netlab import MakeNetns
from tests.host.probe import WAN, ProbeNegotiator

pytestmark = pytest.mark.host


@pytest.fixture
def netns(make_netns: MakeNetns) -> str:
    return make_netns("oe-cfg")


def test_idle_timeout_and_poll_period_follow_start_and_reload(netns: str) -> None:
    base = parse_config("config ike 'ike'\n\toption idle_timeout '10s'\n")

    async def body() -> None:
        svc = OeService(
            datapath_factory=kernel_datapath(netns), negotiator=ProbeNegotiator(netns), wan={4: WAN}
        )
        async with running(svc, base):
            assert svc.manager.idle_timeout == 10.0
            assert svc.poll_period == 2.5  # a quarter: activity known to within 2.5 s
            await svc.reload(replace(base, ike=replace(base.ike, idle_timeout=2.0)))
            assert svc.manager.idle_timeout == 2.0
            assert svc.poll_period == 1.0  # floor: never more than one read a second
            await svc.reload(replace(base, ike=replace(base.ike, idle_timeout=3600.0)))
            assert svc.manager.idle_timeout == 3600.0
            assert svc.poll_period == 60.0  # ceiling: a long timeout still polls each minute

    asyncio.run(body())


def test_default_idle_timeout_is_five_minutes(netns: str) -> None:
    async def body() -> None:
        svc = OeService(
            datapath_factory=kernel_datapath(netns), negotiator=ProbeNegotiator(netns), wan={4: WAN}
        )
        async with running(svc, parse_config("")):
            assert svc.manager.idle_timeout == 300.0
            assert svc.poll_period == 60.0

    asyncio.run(body())


def _nft_list(netns: str) -> str:
    res = subprocess.run(
        ["ip", "netns", "exec", netns, "nft", "list", "table", "inet", "oe_router"],
        capture_output=True,
        text=True,
    )
    return res.stdout if res.returncode == 0 else ""


@pytest.mark.parametrize("keep", [True, False])
def test_lan_gateway_table_is_applied_at_start_and_kept_or_removed_at_stop(
    netns: str, keep: bool
) -> None:
    """With an nft runner the service writes the LAN gateway table (IPv4 SNAT, IPv6 SNAT
    for ``oe_peers6``, empty) at start; at stop the set is emptied, and the table stays
    only while "private" policies stay (they catch LAN flows only after SNAT)."""
    wan6 = ipaddress.IPv6Address("2001:db8:1::2")
    config = replace(parse_config(""), keep_private_on_stop=keep)

    async def body() -> None:
        svc = OeService(
            datapath_factory=kernel_datapath(netns),
            negotiator=ProbeNegotiator(netns),
            wan={4: WAN, 6: wan6},
            lan=[ipaddress.ip_network("192.168.1.0/24"), ipaddress.ip_network("fd00:1::/64")],
            nft=lambda script: apply_nft(script, netns=netns),
        )
        async with running(svc, config):
            text = _nft_list(netns)
            assert 'oifname "wan" ip saddr 192.168.1.0/24 masquerade' in text
            assert (
                'oifname "wan" ip6 saddr fd00:1::/64 ip6 daddr @oe_peers6 snat ip6 to 2001:db8:1::2'
            ) in text
            assert "elements" not in text  # no IPv6 tunnel yet, so no IPv6 peer is NATed
        after = _nft_list(netns)
        if keep:
            # the stopped form: "private" flows keep the address their kept traps match,
            # the rest is masqueraded (a WAN change meanwhile must not cut the LAN off)
            assert "ip daddr @oe_private4 snat ip to 198.51.100.1" in after
            assert 'oifname "wan" ip saddr 192.168.1.0/24 masquerade' in after
            assert "elements" not in after
        else:
            assert after == ""

    asyncio.run(body())


def test_reload_rewrites_oe_private6(netns: str) -> None:
    """A reload that changes the "private" group's networks changes oe_private6 and
    oe_private4 (LAN flows there are NATed into the trap), each with its own family."""
    wan6 = ipaddress.IPv6Address("2001:db8:1::2")
    first = parse_config(
        "config policy\n\toption group 'private'\n\tlist dest '2001:db8:5::/48'\n"
        "\tlist dest '192.0.2.0/24'\n"
    )
    second = parse_config(
        "config policy\n\toption group 'private'\n\tlist dest '2001:db8:7::/48'\n"
    )

    async def body() -> None:
        svc = OeService(
            datapath_factory=kernel_datapath(netns),
            negotiator=ProbeNegotiator(netns),
            wan={4: WAN, 6: wan6},
            lan=[ipaddress.ip_network("fd00:1::/64")],
            nft=lambda script: apply_nft(script, netns=netns),
        )
        async with running(svc, first):
            text = _nft_list(netns)
            assert "elements = { 2001:db8:5::/48 }" in text
            assert "elements = { 192.0.2.0/24 }" in text
            await svc.reload(second)
            text = _nft_list(netns)
            assert "elements = { 2001:db8:7::/48 }" in text and "2001:db8:5::" not in text
            assert "192.0.2" not in text

    asyncio.run(body())
