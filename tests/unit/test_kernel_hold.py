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


def test_trap_and_known_scripts() -> None:
    nets = [ipaddress.IPv4Network("198.51.100.0/24"), ipaddress.IPv4Network("10.9.0.0/16")]
    assert trap_script(S, nets) == (
        "flush set inet oe_hold trap4\nflush set inet oe_hold known4\n"
        "add element inet oe_hold trap4 { 198.51.100.0/24, 10.9.0.0/16 }\n"
    )
    a, b = ipaddress.IPv4Address("198.51.100.7"), ipaddress.IPv4Address("198.51.100.8")
    assert known_script(S, add=[(a, 30), (b, 0)]) == (
        "add element inet oe_hold known4 { 198.51.100.7 timeout 30s, 198.51.100.8 timeout 1s }\n"
    )
    assert known_script(S, remove=[a], flush=True) == (
        "flush set inet oe_hold known4\ndelete element inet oe_hold known4 { 198.51.100.7 }\n"
    )


class _Rig:
    """``FirstPackets`` ruled by a ``KernelDecider``; no queue bound."""

    def __init__(self, limits: HoldLimits = ROOMY) -> None:
        self.now = 1000.0
        self.events: list[DatapathEvent] = []
        self.ruled: list[tuple[Flow, Ruling]] = []
        self.decider = KernelDecider(WAN)
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
        self._ids += 1
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
