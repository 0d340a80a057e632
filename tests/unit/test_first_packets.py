"""datapath.firstpackets: what becomes of a first packet the kernel queued, decided by the
policy table (datapath.policies) as XFRM would decide it.

No NFQUEUE and no nftables here: the projection only records that it went live, no
queue is bound, so each verdict shows in the counters ``oe status`` reports
(``stats``), and each ACQUIRE in the events the datapath hands to IKE.
"""

from __future__ import annotations

import asyncio
import ipaddress
import struct
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from oe_router.datapath.base import (
    Acquire,
    DatapathEvent,
    Direction,
    PolicyAction,
    PolicySpec,
    Template,
    TrafficSelector,
)
from oe_router.datapath.firstpackets import FirstPackets, HoldLimits, Outcome, Ruling, SpdDecider
from oe_router.datapath.nfqueue import QueuedPacket
from oe_router.datapath.nft_spd import SpdProjection
from oe_router.datapath.policies import PolicyTable
from oe_router.datapath.sa_table import SaTable
from oe_router.datapath.workerpool import WorkerPool

WAN = ipaddress.IPv4Address("203.0.113.2")  # a LAN client's source, after source NAT
PEER_NET = ipaddress.IPv4Network("198.51.100.0/24")


class _LiveProjection(SpdProjection):
    """The kernel side left out: goes live, writes nothing."""

    def __init__(self) -> None:
        super().__init__(wan="wan", tun="oe-esp0", queue_num=1, bypass_mark=1, ike_ports=())

    async def go_live(self, policies: list[PolicySpec]) -> None:
        self.live = True

    async def project(
        self,
        policies: Callable[[], list[PolicySpec]],
        add: Sequence[PolicySpec] = (),
        remove: Sequence[PolicySpec] = (),
    ) -> None:
        return None


class _Rig:
    def __init__(self, limits: HoldLimits, projection: SpdProjection | None = None) -> None:
        self.now = 1000.0
        self.events: list[DatapathEvent] = []
        proj = projection or _LiveProjection()
        self.policies = PolicyTable(proj, self.events.append, self._changed)
        sas = SaTable(WorkerPool(sys.executable), replay_window=64, clock=self.clock)
        self.first = FirstPackets(
            queue_num=1,
            limits=limits,
            decider=SpdDecider(self.policies, sas),
            seal=sas.send,
            emit=self.events.append,
            stolen_mark=0x2000000,
            wan="wan",
            egress_table="oe_test_egress",
            netns=None,
            clock=self.clock,
        )
        self._ids = 0

    def clock(self) -> float:
        return self.now

    def _changed(self) -> None:
        self.first.release()

    def queue(
        self, dst: str, dport: int = 443, payload: bytes | None = None, syn: int | None = None
    ) -> None:
        """The kernel queues a TCP packet WAN:40000 -> dst:dport (or raw bytes); ``syn``:
        a SYN with that sequence number."""
        if payload is None:
            head = struct.pack("!HH", 40000, dport)
            if syn is None:
                tcp = head + bytes(16)
            else:
                tcp = head + struct.pack("!IIBBHHH", syn, 0, 5 << 4, 0x02, 64240, 0, 0)
            payload = (
                struct.pack(
                    "!BBHHHBBH4s4s",
                    0x45,
                    0,
                    20 + len(tcp),
                    1,
                    0,
                    64,
                    6,
                    0,
                    WAN.packed,
                    ipaddress.IPv4Address(dst).packed,
                )
                + tcp
            )
        self._ids += 1
        self.first.queued(QueuedPacket(self._ids, 1, 2, 4, 0x0800, payload, len(payload)))


def _out(action: PolicyAction, priority: int = 10) -> PolicySpec:
    templates = (Template(WAN, ipaddress.IPv4Address("0.0.0.0"), 7),)
    return PolicySpec(
        TrafficSelector(ipaddress.IPv4Network(f"{WAN}/32")),
        TrafficSelector(PEER_NET),
        Direction.OUT,
        action,
        priority,
        templates if action in (PolicyAction.TRAP, PolicyAction.IPSEC) else (),
    )


def test_a_trapped_packet_raises_one_acquire_and_leaves_with_the_pass_shunt() -> None:
    """Held from the start (no complete policy set yet), one ACQUIRE per destination and
    second once the trap is live, accepted in the clear when a pass shunt replaces it."""

    async def go() -> None:
        rig = _Rig(HoldLimits(4.0, 64, 1024))
        await rig.policies.install([_out(PolicyAction.TRAP)])
        rig.queue("198.51.100.7")
        assert rig.first.held_now == 1 and rig.events == []
        await rig.policies.go_live()
        rig.queue("198.51.100.7", dport=80)
        assert rig.first.held_now == 2
        assert len(rig.events) == 1
        acq = rig.events[0]
        assert isinstance(acq, Acquire)
        assert (acq.src, acq.dst, acq.reqid) == (WAN, ipaddress.IPv4Address("198.51.100.7"), 7)
        assert acq.selector_dst == TrafficSelector(ipaddress.IPv4Network("198.51.100.7/32"), 6, 443)
        assert acq.selector_src == TrafficSelector(ipaddress.IPv4Network(f"{WAN}/32"), 6, 40000)
        await rig.policies.install([_out(PolicyAction.PASS)])  # same selector: replaces
        assert rig.first.held_now == 0
        assert rig.first.stats["accepted"] == 2 and rig.first.stats["held"] == 2

    asyncio.run(go())


def test_drop_shunts_and_malformed_packets_are_dropped_at_once() -> None:
    async def go() -> None:
        rig = _Rig(HoldLimits(4.0, 64, 1024))
        await rig.policies.install([_out(PolicyAction.DROP)])
        await rig.policies.go_live()
        rig.queue("198.51.100.7")
        rig.queue("198.51.100.8", payload=b"\x45\x00")
        assert rig.first.held_now == 0
        assert rig.first.stats["dropped"] == 2 and rig.first.stats["queued"] == 2
        assert rig.events == []

    asyncio.run(go())


def test_hold_limits_per_destination_and_in_total_then_the_deadline() -> None:
    """Two per destination, three in all; what is over is dropped at once, the rest when
    its hold time has passed (``expire`` runs every quarter second)."""

    async def go() -> None:
        rig = _Rig(HoldLimits(4.0, 2, 3))
        await rig.policies.install([_out(PolicyAction.TRAP)])
        await rig.policies.go_live()
        for dst in ("198.51.100.7", "198.51.100.7", "198.51.100.7", "198.51.100.8"):
            rig.queue(dst)
        assert rig.first.stats["hold_overflow"] == 1 and rig.first.held_now == 3
        rig.queue("198.51.100.9")
        assert rig.first.stats["hold_overflow"] == 2 and rig.first.held_now == 3
        rig.now += 4.0
        task = asyncio.get_running_loop().create_task(rig.first.expire())
        deadline = time.monotonic() + 10.0
        try:
            while rig.first.held_now and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        finally:
            task.cancel()
        assert rig.first.held_now == 0 and rig.first.stats["hold_expired"] == 3

    asyncio.run(go())


class _WritingProjection(_LiveProjection):
    """A kernel write that takes a while (nfnetlink, asynchronous): it waits for ``done``."""

    def __init__(self) -> None:
        super().__init__()
        self.done = asyncio.Event()
        self.writing = asyncio.Event()

    async def project(
        self,
        policies: Callable[[], list[PolicySpec]],
        add: Sequence[PolicySpec] = (),
        remove: Sequence[PolicySpec] = (),
    ) -> None:
        self.writing.set()
        await self.done.wait()


def test_held_packets_leave_with_the_pass_shunt_before_its_kernel_write_ends() -> None:
    """The held packet is accepted as soon as the SPD holds the pass shunt, not after the
    projection's write: once the kernel has the shunt, later packets of the same flow pass
    and are confirmed by conntrack first, and the held one, released after, would be
    dropped as a clash (the ICMP echo this lost on the host tier)."""

    async def go() -> None:
        proj = _WritingProjection()
        proj.done.set()
        rig = _Rig(HoldLimits(4.0, 64, 1024), proj)
        await rig.policies.install([_out(PolicyAction.TRAP)])
        await rig.policies.go_live()
        rig.queue("198.51.100.7")
        assert rig.first.held_now == 1
        proj.done.clear()
        proj.writing.clear()
        task = asyncio.get_running_loop().create_task(
            rig.policies.install([_out(PolicyAction.PASS)])
        )
        await proj.writing.wait()
        assert rig.first.held_now == 0 and rig.first.stats["accepted"] == 1
        proj.done.set()
        await task

    asyncio.run(go())


class _Switch:
    """A decider flipped by hand, with no release after (the kernel hold's XFRM state
    changes before its ``release``)."""

    def __init__(self) -> None:
        self.clear = False

    @property
    def live(self) -> bool:
        return True

    def rule(self, f: object) -> Ruling:
        return Ruling(Outcome.CLEAR if self.clear else Outcome.HOLD)


class _Recording(FirstPackets):
    def __init__(self, **kw: object) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        self.order: list[int] = []

    def _verdict(self, held: Any, accept: bool, stat: str, mark: int | None = None) -> None:
        self.order.append(held.packet_id)
        super()._verdict(held, accept, stat, mark)


def test_a_packet_never_leaves_ahead_of_one_held_for_the_same_destination() -> None:
    """Conntrack confirms the first of a flow's packets to leave and drops the others, so
    a packet queued after the rule changed but before ``release`` ran leaves behind the
    held one, not ahead of it."""
    decider = _Switch()
    first = _Recording(
        queue_num=1,
        limits=HoldLimits(4.0, 64, 1024),
        decider=decider,
        emit=lambda e: None,
        netns=None,
        clock=lambda: 1000.0,
    )
    rig = _Rig(HoldLimits(4.0, 64, 1024))
    rig.first = first
    rig.queue("198.51.100.7")
    rig.queue("198.51.100.8")
    assert first.held_now == 2 and first.order == []
    decider.clear = True
    rig.queue("198.51.100.7")
    assert first.order == [1, 3]  # the held one first; .8 waits for its release
    assert first.held_now == 1
    first.release()
    assert first.order == [1, 3, 2] and first.stats["accepted"] == 3


def test_a_resent_syn_takes_the_held_ones_place_and_a_late_copy_is_dropped() -> None:
    """A client resends its SYN while the negotiation runs: one copy is held (the newest,
    with the newest deadline), one leaves, and a copy queued after it left is dropped, so
    the server never answers a copy after the client has its SYN-ACK."""
    decider = _Switch()
    clock = [1000.0]
    first = _Recording(
        queue_num=1,
        limits=HoldLimits(4.0, 64, 1024),
        decider=decider,
        emit=lambda e: None,
        netns=None,
        clock=lambda: clock[0],
    )
    rig = _Rig(HoldLimits(4.0, 64, 1024))
    rig.first = first
    rig.queue("198.51.100.7", syn=111)
    clock[0] += 1.0
    rig.queue("198.51.100.7", syn=111)  # the 1 s retransmission
    rig.queue("198.51.100.7", syn=222)  # another connection (same ports, as built here)
    rig.queue("198.51.100.7")  # not a SYN: never merged
    clock[0] += 2.0
    rig.queue("198.51.100.7", syn=111)  # the 3 s one
    assert first.held_now == 3 and first.order == [1, 2]
    assert first.stats["hold_superseded"] == 2 and first.stats["held"] == 5
    decider.clear = True
    first.release()
    assert first.order == [1, 2, 5, 3, 4] and first.stats["accepted"] == 3
    rig.queue("198.51.100.7", syn=111)  # queued before the kernel knew the destination
    rig.queue("198.51.100.7", syn=333)  # a new connection passes
    assert first.order == [1, 2, 5, 3, 4, 6, 7]
    assert first.stats["hold_superseded"] == 3 and first.stats["accepted"] == 4
    clock[0] += 4.5  # long after: the SYN's copy is the client's own retry, let go
    rig.queue("198.51.100.7", syn=111)
    assert first.stats["accepted"] == 5 and first.stats["hold_superseded"] == 3
