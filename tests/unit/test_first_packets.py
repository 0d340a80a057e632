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

from oe_router.datapath.base import (
    Acquire,
    DatapathEvent,
    Direction,
    PolicyAction,
    PolicySpec,
    Template,
    TrafficSelector,
)
from oe_router.datapath.firstpackets import FirstPackets, HoldLimits, SpdDecider
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
    def __init__(self, limits: HoldLimits) -> None:
        self.now = 1000.0
        self.events: list[DatapathEvent] = []
        self.policies = PolicyTable(_LiveProjection(), self.events.append, self._changed)
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

    def queue(self, dst: str, dport: int = 443, payload: bytes | None = None) -> None:
        """The kernel queues a TCP packet WAN:40000 -> dst:dport (or raw bytes)."""
        if payload is None:
            tcp = struct.pack("!HH", 40000, dport) + bytes(16)
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
