"""ICMPv6 neighbour discovery past an OE trap, on the real host kernel's XFRM.

Two network namespaces on a veth pair: "router" installs the policy table's kernel
policies (``::/0`` in private-or-clear: one TRAP for everything it sends) through
XfrmDatapath; "neighbour" has no policies. The host kernel has no ESP, which is fine:
nothing here needs an SA, only the policy lookup the kernel does for every packet,
ND included (ndisc.c runs xfrm_lookup with the ICMPv6 type in the flow).

The observable: the neighbour resolves the router's address (NS in, NA out past the
trap) while the router's echo replies and requests are trapped (ACQUIRE, dropped).
The control run, without the ND exclusions, shows the NA trapped and the link dead.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import re
import socket
import struct
import time
from collections.abc import AsyncGenerator

import pytest

from oe_router.config.schema import PolicyConfig, PolicyEntry
from oe_router.datapath.base import (
    Acquire,
    Direction,
    PolicyAction,
    PolicySpec,
    TrafficSelector,
)
from oe_router.datapath.kernel import XfrmDatapath
from oe_router.datapath.netns import in_netns
from oe_router.oe.policy import LINK_EXCLUSIONS, ND_TYPES, Group, PolicyTable, selector_rank
from tests.host.netlab import MakeNetns
from tests.host.netlab import ip as _ip

pytestmark = pytest.mark.host

ROUTER = ipaddress.IPv6Address("2001:db8:77::1")
NEIGHBOUR = ipaddress.IPv6Address("2001:db8:77::2")
ECHO_REQUEST, ECHO_REPLY = 128, 129


@pytest.fixture
def link(make_netns: MakeNetns) -> tuple[str, str]:
    """(router netns, neighbour netns) joined by a veth, global addresses without DAD."""
    router, neighbour = make_netns("oe-nd-r"), make_netns("oe-nd-n")
    _ip("-n", router, "link", "add", "wan", "type", "veth", "peer", "name", "nb")
    _ip("-n", router, "link", "set", "nb", "netns", neighbour)
    for ns, dev, addr in ((router, "wan", ROUTER), (neighbour, "nb", NEIGHBOUR)):
        _ip("-n", ns, "-6", "addr", "add", f"{addr}/64", "dev", dev, "nodad")
        _ip("-n", ns, "link", "set", dev, "up")
    return router, neighbour


def _table(*, nd_exclusions: bool) -> PolicyTable:
    cfg = PolicyConfig(private_or_clear=(PolicyEntry(ipaddress.ip_network("::/0")),))
    keep = [x for x in LINK_EXCLUSIONS if nd_exclusions or x.entry.icmp_type is None]
    return PolicyTable.from_config(cfg, link_exclusions=keep)


def _echo(netns: str, dst: ipaddress.IPv6Address, count: int = 3) -> int:
    """Send ICMPv6 echo requests from a raw socket in ``netns``; return the replies seen."""
    with in_netns(netns):
        s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
    replies = 0
    try:
        s.settimeout(0.3)
        ident = os.getpid() & 0xFFFF
        for seq in range(count):
            # type, code, checksum (the kernel fills it in for ICMPv6 raw sockets), id, seq
            s.sendto(struct.pack("!BBHHH", ECHO_REQUEST, 0, 0, ident, seq) + b"oe", (str(dst), 0))
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline:
                try:
                    data, _ = s.recvfrom(2048)
                except TimeoutError:
                    continue
                if data[0] == ECHO_REPLY and struct.unpack("!HH", data[4:8]) == (ident, seq):
                    replies += 1
                    break
    finally:
        s.close()
    return replies


def _neigh_state(netns: str, addr: ipaddress.IPv6Address) -> str:
    """The kernel's neighbour entry for ``addr`` in ``netns`` ('' if none)."""
    return _ip("-n", netns, "-6", "neigh", "show", str(addr)).strip()


async def _install(dp: XfrmDatapath, table: PolicyTable) -> tuple[PolicySpec, ...]:
    pols = table.kernel_policies({6: ROUTER}, trap_reqid=dp.ownership.reqid_max)
    for p in pols:
        await dp.install_policy(p)
    return pols


def test_nd_exclusions_show_in_ip_xfrm_as_icmpv6_types_and_dump_back_equal(
    link: tuple[str, str],
) -> None:
    """`ip xfrm policy` shows a PASS per ND type and direction, with the type (sport)
    named; our own dump decodes them back to the specs we installed (reconcile relies
    on that equality to recognise its policies after a restart)."""
    router, _ = link

    async def body() -> tuple[tuple[PolicySpec, ...], list[PolicySpec], str]:
        dp = XfrmDatapath(netns=router)
        try:
            pols = await _install(dp, _table(nd_exclusions=True))
            dumped = [spec for _, spec in dp.dump_policies() if spec is not None]
            return pols, dumped, _ip("-n", router, "xfrm", "policy")
        finally:
            await dp.close()

    pols, dumped, text = asyncio.run(body())

    # reconcile's identity of a policy: selectors, direction, mark (and our rank)
    def ident(p: PolicySpec) -> str:
        return repr((p.src, p.dst, p.direction, p.mark, p.priority))

    assert sorted(map(ident, dumped)) == sorted(map(ident, pols))
    assert any(p.dst.icmp_type == 135 and p.direction is Direction.OUT for p in dumped)
    assert any(p.src.icmp_type == 135 and p.direction is Direction.IN for p in dumped)
    records = re.split(r"\n(?=\S)", text.strip())  # one record per policy
    icmp6 = [r for r in records if "proto ipv6-icmp" in r]
    for icmp_type in ND_TYPES:
        for direction in ("out", "in", "fwd"):
            hits = [r for r in icmp6 if f"type {icmp_type} " in r and f"dir {direction} " in r]
            assert len(hits) == 1, (icmp_type, direction, text)
            assert hits[0].startswith("src ::/0 dst ::/0 proto ipv6-icmp"), hits[0]
            assert "tmpl" not in hits[0] and "action block" not in hits[0]  # a plain allow
    # no blanket ICMPv6 exclusion any more: every ICMPv6 policy names a type
    assert len(icmp6) == 3 * len(ND_TYPES)
    (trap,) = [r for r in records if f"tmpl src {ROUTER}" in r]
    assert trap.startswith(f"src {ROUTER}/128 dst ::/0 \n") and "dir out" in trap
    # the ND passes sit at a stronger (lower) kernel priority than the trap
    prio = {r: int(re.search(r"priority (\d+)", r).group(1)) for r in [trap, *icmp6]}  # type: ignore[union-attr]
    assert max(prio[r] for r in icmp6) < prio[trap]


def _nd_and_echo(router: str, neighbour: str, *, nd_exclusions: bool) -> dict[str, object]:
    table = _table(nd_exclusions=nd_exclusions)

    async def body() -> dict[str, object]:
        dp = XfrmDatapath(netns=router)
        events = dp.events()
        acquires: list[Acquire] = []

        async def collect() -> None:
            async for ev in events:
                if isinstance(ev, Acquire):
                    acquires.append(ev)

        reader = asyncio.ensure_future(collect())
        try:
            dp.apply_kernel_settings()  # xfrm_acq_expires=1, as the daemon runs it
            await _install(dp, table)
            await asyncio.sleep(0.05)  # the reader is registered before packets leave
            # The router's own ping to the neighbour (echo request) meets the trap.
            from_router = await asyncio.to_thread(_echo, router, NEIGHBOUR, 1)
            await asyncio.sleep(1.5)  # the larval state of that ACQUIRE expires
            # The neighbour pings the router: it must resolve the router first (NS to the
            # solicited-node group, NA back to its global address through the router's
            # XFRM lookup), then the router's echo reply meets the trap too.
            from_neighbour = await asyncio.to_thread(_echo, neighbour, ROUTER)
            await asyncio.sleep(0.2)
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
            if isinstance(events, AsyncGenerator):
                await events.aclose()
            await dp.close()
        return {
            "replies_to_neighbour": from_neighbour,
            "replies_to_router": from_router,
            "neighbour_sees_router": _neigh_state(neighbour, ROUTER),
            "acquires": acquires,
        }

    return asyncio.run(body())


def test_nd_passes_a_v6_trap_and_echo_is_trapped_with_its_type(link: tuple[str, str]) -> None:
    router, neighbour = link
    got = _nd_and_echo(router, neighbour, nd_exclusions=True)
    # ND worked: the neighbour learned the router's link-layer address (NA got out)
    state = str(got["neighbour_sees_router"])
    assert "lladdr" in state and "FAILED" not in state and "INCOMPLETE" not in state, state
    # echo did not: both ways it met the ::/0 trap and was held for a negotiation
    assert got["replies_to_neighbour"] == 0
    assert got["replies_to_router"] == 0
    acquires = got["acquires"]
    assert isinstance(acquires, list)
    kinds = {(a.selector_dst.net, a.selector_dst.proto, a.selector_dst.icmp_type) for a in acquires}
    host = ipaddress.ip_network(NEIGHBOUR)
    assert (host, 58, ECHO_REPLY) in kinds, kinds
    assert (host, 58, ECHO_REQUEST) in kinds, kinds
    assert not [k for k in kinds if k[2] in ND_TYPES], kinds  # ND never reaches the trap
    # the manager's lookup for such an ACQUIRE: the destination's group, not an exclusion
    table = _table(nd_exclusions=True)
    for a in acquires:
        peer = a.selector_dst.net.network_address
        rule = table.lookup(peer, a.selector_dst.proto, a.selector_dst.port)
        assert rule is not None and rule.group is Group.PRIVATE_OR_CLEAR and not rule.exclusion


def test_control_without_nd_exclusions_the_trap_eats_the_neighbour_advertisement(
    link: tuple[str, str],
) -> None:
    """The same run with the ND exclusions left out: the NA is trapped (an ACQUIRE for
    ICMPv6 type 136) and the neighbour never resolves the router. This is what the
    exclusions prevent, and shows the first test's pass is theirs."""
    router, neighbour = link
    got = _nd_and_echo(router, neighbour, nd_exclusions=False)
    state = str(got["neighbour_sees_router"])
    assert "lladdr" not in state, state
    assert got["replies_to_neighbour"] == 0
    acquires = got["acquires"]
    assert isinstance(acquires, list)
    assert any(a.selector_dst.icmp_type == 136 for a in acquires), acquires


@pytest.mark.parametrize("nd_exclusions", [True, False], ids=["nd-excluded", "control"])
def test_nd_pass_beats_an_inbound_drop_for_the_peer(
    link: tuple[str, str], nd_exclusions: bool
) -> None:
    """An SA's inbound policy (here a DROP for the neighbour, at the rank of a /128
    group entry) would throw away the neighbour's NS/NA; the ND exclusion's IN policy
    outranks it, so resolution still works while its echo requests are dropped.
    Control: without the exclusions the router never learns the neighbour."""
    router, neighbour = link
    table = _table(nd_exclusions=nd_exclusions)

    async def body() -> tuple[int, str]:
        dp = XfrmDatapath(netns=router)
        try:
            await _install(dp, table)
            peer = ipaddress.ip_network(NEIGHBOUR)
            rank = selector_rank(peer, 0, None)
            any6 = TrafficSelector(ipaddress.ip_network("::/0"))
            await dp.install_policy(
                PolicySpec(TrafficSelector(peer), any6, Direction.IN, PolicyAction.DROP, rank)
            )
            # the router resolves the neighbour: NS out (multicast), NA in (unicast,
            # from the neighbour: meets the IN drop unless ND passes)
            replies = await asyncio.to_thread(_echo, neighbour, ROUTER, 1)
            return replies, _neigh_state(router, NEIGHBOUR)
        finally:
            await dp.close()

    replies, state = asyncio.run(body())
    assert replies == 0  # the echo request from the neighbour is dropped inbound
    if nd_exclusions:  # the router learned the neighbour from its NS (past the IN drop)
        assert "lladdr" in state, state
    else:
        assert "lladdr" not in state, state
