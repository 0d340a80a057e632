"""datapath.kernel_hold: the kernel datapath's first-packet hold, without a kernel.

The nft text is checked as text (its kernel acceptance is the host tier's); the rule is
``KernelDecider`` (a mirror of the installed policies, looked up after source NAT)
driving ``FirstPackets`` with no queue bound, so each verdict shows in the counters
``oe status`` reports and each ACQUIRE in the events handed to the OE manager.
"""

from __future__ import annotations

import ipaddress
import struct

from oe_router.datapath.base import (
    Acquire,
    DatapathEvent,
    Direction,
    Lifetime,
    PolicyAction,
    PolicySpec,
    Template,
    TrafficSelector,
)
from oe_router.datapath.firstpackets import FirstPackets, HoldLimits, Outcome, Ruling
from oe_router.datapath.kernel_hold import (
    HoldSettings,
    KernelDecider,
    known_script,
    render_table,
    trap_networks,
    trap_script,
)
from oe_router.datapath.nfqueue import QueuedPacket
from oe_router.datapath.packet import Flow

WAN = ipaddress.IPv4Address("203.0.113.2")
LAN_CLIENT = ipaddress.IPv4Address("192.168.1.10")
WAN6 = ipaddress.IPv6Address("2001:db8:1::2")
LAN6 = "fd00:1::/64"
LAN6_CLIENT = ipaddress.IPv6Address("fd00:1::100")
S = HoldSettings()
ROOMY = HoldLimits(4.0, 64, 1024)


def _pol(
    action: PolicyAction,
    dst: str,
    *,
    priority: int = 10,
    direction: Direction = Direction.OUT,
    src: str = f"{WAN}/32",
    hard: int = 0,
) -> PolicySpec:
    ipsec = action in (PolicyAction.TRAP, PolicyAction.IPSEC)
    return PolicySpec(
        TrafficSelector(ipaddress.ip_network(src)),
        TrafficSelector(ipaddress.ip_network(dst)),
        direction,
        action,
        priority,
        (Template(WAN, ipaddress.IPv4Address("0.0.0.0"), 7),) if ipsec else (),
        lifetime=Lifetime(hard_seconds=hard),
    )


def test_trap_networks_merge_outbound_ipv4_traps_only() -> None:
    pols = [
        _pol(PolicyAction.TRAP, "0.0.0.0/0", priority=20),
        _pol(PolicyAction.TRAP, "198.51.100.0/24"),  # inside the first: merged
        _pol(PolicyAction.PASS, "192.0.2.0/24"),  # clear: not a trap
        _pol(PolicyAction.TRAP, "10.0.0.0/8", direction=Direction.IN),
        _pol(PolicyAction.TRAP, "2001:db8::/32", src="2001:db8:ffff::1/128"),
    ]
    assert trap_networks(pols) == [ipaddress.IPv4Network("0.0.0.0/0")]
    assert trap_networks(pols, 6) == [ipaddress.IPv6Network("2001:db8::/32")]
    two = [_pol(PolicyAction.TRAP, "198.51.100.0/25"), _pol(PolicyAction.TRAP, "198.51.100.128/25")]
    assert trap_networks(two) == [ipaddress.IPv4Network("198.51.100.0/24")]


def test_the_table_queues_wan_bound_packets_to_unknown_trapped_hosts_failing_closed() -> None:
    text = render_table(S, ["wan", "pppoe-wan"], [ipaddress.IPv4Network("0.0.0.0/0")])
    assert text.startswith("table inet oe_hold\ndelete table inet oe_hold\n")
    # before conntrack: held packets of one flow find its entry when released one by one
    assert "type filter hook prerouting priority raw; policy accept;" in text
    assert (
        'iifname != { "wan", "pppoe-wan" } ip daddr @trap4 ip daddr != @known4 '
        'fib daddr oifname { "wan", "pppoe-wan" } counter jump first'
    ) in text
    assert "elements = { 0.0.0.0/0 }" in text
    # the queue chain holds a drop only: the queue rule goes ahead of it, never a bypass
    first = text[text.index("chain first") :]
    assert "counter drop" in first and "accept" not in first and "bypass" not in text
    assert "elements" not in render_table(S, ["wan"], [])
    lan = [ipaddress.IPv4Network("192.168.1.0/24"), ipaddress.IPv4Network("10.1.0.0/16")]
    only_lan = render_table(S, ["wan"], [], lan)
    assert (
        'iifname != { "wan" } ip saddr { 192.168.1.0/24, 10.1.0.0/16 } ip daddr @trap4' in only_lan
    )
    assert "nfproto ipv6" not in only_lan  # no IPv6 LAN prefix given: IPv6 is not held


def test_ipv6_is_queued_only_from_the_lan_prefixes_given() -> None:
    """LAN IPv6 flows are held from the prefixes the LAN gateway NATs (their traps have
    LAN-sourced twins), with sets of their own; a WAN without IPv4 gets no IPv4 rule."""
    lan = [ipaddress.IPv4Network("192.168.1.0/24"), ipaddress.IPv6Network("fd00:1::/64")]
    traps = [ipaddress.IPv4Network("0.0.0.0/0"), ipaddress.IPv6Network("::/0")]
    text = render_table(S, ["wan"], traps, lan)
    assert (
        'meta nfproto ipv6 iifname != { "wan" } ip6 saddr { fd00:1::/64 } ip6 daddr @trap6 '
        'ip6 daddr != @known6 fib daddr oifname { "wan" } counter jump first'
    ) in text
    assert "ip saddr { 192.168.1.0/24 } ip daddr @trap4" in text
    assert "set trap6 {\n\t\ttype ipv6_addr\n\t\tflags interval\n\t\telements = { ::/0 }" in text
    assert "set known6 {\n\t\ttype ipv6_addr\n\t\tflags timeout" in text
    v6only = render_table(S, ["wan"], traps, lan, ipv4=False)
    assert "nfproto ipv4" not in v6only and "nfproto ipv6" in v6only


def test_trap_and_known_scripts() -> None:
    nets = [ipaddress.IPv4Network("198.51.100.0/24"), ipaddress.IPv4Network("10.9.0.0/16")]
    assert trap_script(S, nets) == (
        "flush set inet oe_hold trap4\nflush set inet oe_hold trap6\n"
        "flush set inet oe_hold known4\nflush set inet oe_hold known6\n"
        "add element inet oe_hold trap4 { 198.51.100.0/24, 10.9.0.0/16 }\n"
    )
    both = trap_script(S, [*nets, ipaddress.IPv6Network("::/0")])
    assert both.endswith("add element inet oe_hold trap6 { ::/0 }\n")
    a, b = ipaddress.IPv4Address("198.51.100.7"), ipaddress.IPv4Address("198.51.100.8")
    assert known_script(S, add=[(a, 30), (b, 0)]) == (
        "add element inet oe_hold known4 { 198.51.100.7 timeout 30s, 198.51.100.8 timeout 1s }\n"
    )
    assert known_script(S, remove=[a], flush=True) == (
        "flush set inet oe_hold known4\nflush set inet oe_hold known6\n"
        "delete element inet oe_hold known4 { 198.51.100.7 }\n"
    )
    c = ipaddress.IPv6Address("2001:db8:9::7")
    assert known_script(S, add=[(a, 30), (c, 60)], remove=[c]) == (
        "add element inet oe_hold known4 { 198.51.100.7 timeout 30s }\n"
        "add element inet oe_hold known6 { 2001:db8:9::7 timeout 60s }\n"
        "delete element inet oe_hold known6 { 2001:db8:9::7 }\n"
    )


class _Rig:
    """``FirstPackets`` ruled by a ``KernelDecider``; no queue bound."""

    def __init__(self, limits: HoldLimits = ROOMY) -> None:
        self.now = 1000.0
        self.events: list[DatapathEvent] = []
        self.ruled: list[tuple[Flow, Ruling]] = []
        self.decider = KernelDecider(WAN, WAN6)
        self.first = FirstPackets(
            queue_num=S.queue_num,
            limits=limits,
            decider=self.decider,
            emit=self.events.append,
            netns=None,
            clock=lambda: self.now,
            on_rule=lambda f, r: self.ruled.append((f, r)),
        )
        self._ids = 0

    def install(self, *pols: PolicySpec) -> None:
        for p in pols:
            self.decider.install(p)
        self.first.release()

    def queue(self, dst: str, dport: int = 443) -> None:
        """The forward hook queues a LAN client's TCP SYN, before source NAT."""
        tcp = struct.pack("!HH", 40000, dport) + bytes(16)
        self._ids += 1
        if ":" in dst:
            ip6 = struct.pack(
                "!IHBB16s16s",
                6 << 28,
                len(tcp),
                6,
                64,
                LAN6_CLIENT.packed,
                ipaddress.IPv6Address(dst).packed,
            )
            self.first.queued(QueuedPacket(self._ids, 1, 10, 0, 0x86DD, ip6 + tcp, 60))
            return
        payload = struct.pack(
            "!BBHHHBBH4s4s",
            0x45,
            0,
            20 + len(tcp),
            1,
            0,
            64,
            6,
            0,
            LAN_CLIENT.packed,
            ipaddress.IPv4Address(dst).packed,
        )
        self.first.queued(QueuedPacket(self._ids, 1, 2, 4, 0x0800, payload + tcp, 40))


def test_a_lan_packet_is_held_as_after_nat_and_released_when_its_sa_is_in() -> None:
    """The trap's source is the WAN address: the LAN packet is looked up as after SNAT,
    held, raises the ACQUIRE the kernel would raise after NAT; the SA's policy releases
    it and the next ones (the kernel seals them), and its destination becomes known."""
    rig = _Rig()
    rig.install(_pol(PolicyAction.TRAP, "0.0.0.0/0", priority=30))
    rig.queue("198.51.100.7")
    assert rig.first.held_now == 1 and rig.events == []  # not live: no ACQUIRE yet
    rig.decider.live = True
    rig.first.release()
    rig.queue("198.51.100.7", dport=80)
    assert rig.first.held_now == 2
    assert len(rig.events) == 1  # once a second per destination and reqid
    acq = rig.events[0]
    assert isinstance(acq, Acquire)
    assert (acq.src, acq.dst, acq.reqid) == (WAN, ipaddress.IPv4Address("198.51.100.7"), 7)
    assert acq.selector_src == TrafficSelector(ipaddress.IPv4Network(f"{WAN}/32"), 6, 40000)
    assert acq.selector_dst == TrafficSelector(ipaddress.IPv4Network("198.51.100.7/32"), 6, 443)
    rig.install(_pol(PolicyAction.IPSEC, "198.51.100.7/32", priority=1))
    assert rig.first.held_now == 0
    assert rig.first.stats["released_into_sa"] == 2 and rig.first.stats["dropped"] == 0
    assert [(ipaddress.IPv4Address(f.dst), r.outcome) for f, r in rig.ruled] == [
        (ipaddress.IPv4Address("198.51.100.7"), Outcome.SA_UP)
    ] * 2


def test_failure_releases_private_or_clear_in_the_clear_and_drops_private() -> None:
    rig = _Rig()
    rig.decider.live = True
    rig.install(
        _pol(PolicyAction.TRAP, "0.0.0.0/0", priority=30),  # private-or-clear
        _pol(PolicyAction.TRAP, "198.51.100.0/24", priority=20),  # private
    )
    rig.queue("192.0.2.9")
    rig.queue("198.51.100.9")
    assert rig.first.held_now == 2 and len(rig.events) == 2
    rig.install(_pol(PolicyAction.PASS, "192.0.2.9/32", priority=1, hard=900))
    assert rig.first.stats["accepted"] == 1 and rig.first.held_now == 1
    rig.install(_pol(PolicyAction.DROP, "198.51.100.9/32", priority=1))
    assert rig.first.stats["dropped"] == 1 and rig.first.held_now == 0
    outcomes = [
        (r.outcome, r.policy.lifetime.hard_seconds if r.policy else None) for _, r in rig.ruled
    ]
    assert outcomes == [(Outcome.CLEAR, 900), (Outcome.DROP, 0)]


def test_clear_destinations_are_decided_at_once_and_the_bounds_hold() -> None:
    """A destination outside every trap, or behind a clear entry, is accepted without a
    hold; beyond the per-destination and total bounds a packet is dropped and counted."""
    rig = _Rig(HoldLimits(4.0, 2, 3))
    rig.decider.live = True
    rig.install(
        _pol(PolicyAction.TRAP, "0.0.0.0/0", priority=30),
        _pol(PolicyAction.PASS, "192.0.2.0/24", src="0.0.0.0/0", priority=20),
    )
    rig.queue("192.0.2.1")
    assert rig.first.stats["accepted"] == 1 and rig.first.held_now == 0
    for dst in ("198.51.100.7", "198.51.100.7", "198.51.100.7", "198.51.100.8"):
        rig.queue(dst)
    assert rig.first.stats["hold_overflow"] == 1 and rig.first.held_now == 3
    rig.queue("198.51.100.9")
    assert rig.first.stats["hold_overflow"] == 2 and rig.first.held_now == 3
    rig.first.drop_all()
    assert rig.first.stats["dropped"] == 3


def _pol6(action: PolicyAction, dst: str, *, src: str = f"{WAN6}/128", priority: int = 10,
          hard: int = 0) -> PolicySpec:  # fmt: skip
    ipsec = action in (PolicyAction.TRAP, PolicyAction.IPSEC)
    return PolicySpec(
        TrafficSelector(ipaddress.ip_network(src)),
        TrafficSelector(ipaddress.ip_network(dst)),
        Direction.OUT,
        action,
        priority,
        (Template(WAN6, ipaddress.IPv6Address("::"), 7),) if ipsec else (),
        lifetime=Lifetime(hard_seconds=hard),
    )


POC6, PRIV6, PEER6 = "2001:db8:9::7", "2001:db8:5::7", "2001:db8:1::10"


def _ipv6_rig() -> _Rig:
    """The OE groups' IPv6 policies (oe/policy.py): private-or-clear ::/0 as a WAN trap
    and its LAN-sourced twin; "private" 2001:db8:5::/48 as a WAN trap and a LAN pass
    (such flows are NATed into it)."""
    rig = _Rig()
    rig.decider.live = True
    rig.install(
        _pol6(PolicyAction.TRAP, "::/0", priority=30),
        _pol6(PolicyAction.TRAP, "::/0", src=LAN6, priority=30),
        _pol6(PolicyAction.TRAP, "2001:db8:5::/48", priority=20),
        _pol6(PolicyAction.PASS, "2001:db8:5::/48", src=LAN6, priority=20),
    )
    return rig


def test_a_lan_ipv6_packet_is_held_by_the_lan_trap_as_the_kernel_would() -> None:
    """IPv6 is not NATed before a tunnel exists: the LAN-sourced trap twin catches the
    packet at its routing-time lookup, so the ACQUIRE names the LAN client, as the
    kernel's does; the failure's pass shunts (both sources) release it in the clear."""
    rig = _ipv6_rig()
    rig.queue(POC6)
    assert rig.first.held_now == 1 and len(rig.events) == 1
    acq = rig.events[0]
    assert isinstance(acq, Acquire)
    assert (acq.src, acq.dst, acq.reqid) == (WAN6, ipaddress.IPv6Address(POC6), 7)
    assert acq.selector_src == TrafficSelector(
        ipaddress.IPv6Network(f"{LAN6_CLIENT}/128"), 6, 40000
    )
    rig.install(
        _pol6(PolicyAction.PASS, f"{POC6}/128", priority=1, hard=900),
        _pol6(PolicyAction.PASS, f"{POC6}/128", src=LAN6, priority=1, hard=900),
    )
    assert rig.first.held_now == 0 and rig.first.stats["accepted"] == 1
    ((f, r),) = rig.ruled
    assert (f.dst_address, r.outcome) == (ipaddress.IPv6Address(POC6), Outcome.CLEAR)
    assert r.policy is not None and r.policy.lifetime.hard_seconds == 900


def test_a_lan_ipv6_packet_to_a_tunnel_goes_on_to_the_nat_and_its_sa() -> None:
    """A peer with a tunnel: the LAN pass lets the packet on to the NAT (``oe_peers6``),
    and the lookup after it finds the Child SA's policy: released into the SA. Before the
    LAN pass is in (it follows the SA), the LAN trap still holds it."""
    rig = _ipv6_rig()
    rig.queue(PEER6)
    rig.install(_pol6(PolicyAction.IPSEC, f"{PEER6}/128", priority=1))
    assert rig.first.held_now == 1, "the LAN trap still covers it until the LAN pass"
    rig.install(_pol6(PolicyAction.PASS, f"{PEER6}/128", src=LAN6, priority=1))
    assert rig.first.held_now == 0 and rig.first.stats["released_into_sa"] == 1
    assert [r.outcome for _, r in rig.ruled] == [Outcome.SA_UP]


def test_a_private_lan_ipv6_packet_is_held_as_after_nat_and_dropped_on_failure() -> None:
    """ "private": the LAN pass sends the flow to the NAT (``oe_private6``), after which
    the WAN trap covers it: held, with the ACQUIRE the kernel would raise after NAT; a
    drop shunt drops it; a later packet is dropped at once."""
    rig = _ipv6_rig()
    rig.queue(PRIV6)
    assert rig.first.held_now == 1
    (acq,) = rig.events
    assert isinstance(acq, Acquire)
    assert acq.selector_src == TrafficSelector(ipaddress.IPv6Network(f"{WAN6}/128"), 6, 40000)
    rig.install(_pol6(PolicyAction.DROP, f"{PRIV6}/128", priority=1))
    assert rig.first.held_now == 0 and rig.first.stats["dropped"] == 1
    rig.queue(PRIV6)
    assert rig.first.stats["dropped"] == 2 and rig.first.stats["accepted"] == 0


def test_an_ipv6_source_without_lan_policies_is_not_held() -> None:
    """A source no LAN-sourced policy covers is not NATed, so the WAN trap is not its
    business: accepted at once (the kernel passes it too)."""
    rig = _Rig()
    rig.decider.live = True
    rig.install(_pol6(PolicyAction.TRAP, "::/0", priority=30))
    rig.queue(POC6)
    assert rig.first.held_now == 0 and rig.first.stats["accepted"] == 1 and rig.events == []
