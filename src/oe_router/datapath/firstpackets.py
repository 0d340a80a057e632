"""First packets, for both datapaths: queued, held, and decided when their SA is in.

Why its own object: a first packet that meets no SA is lost unless someone holds it.
The userspace datapath has no ACQUIRE and no larval state: its projection
(``nft_spd.py``) queues over NFQUEUE (``nfqueue.py``) what a TRAP, HOLD or IPSEC policy
covers. The kernel datapath drops a source-NATed LAN packet that meets a trap after NAT
(``kernel_hold.py`` queues it before NAT instead). Either way each queued packet is
ruled by a ``Decider`` (the datapath's policies and SAs, as XFRM would decide it), raises
an ACQUIRE when a trap covers it (at most once a second per destination and reqid, like
xfrm_acq_expires=1), and waits, within per-destination and total limits and a deadline,
until a policy or an SA decides it: into its SA, in the clear (a pass shunt), or
dropped. On the userspace datapath a packet sealed by us is accepted with the stolen
mark, so conntrack confirms its connection and NAT binding, and dropped by a WAN egress
chain before the wire; on the kernel datapath it is simply accepted (XFRM seals it).

One SYN per TCP connection leaves: a client resends its SYN (same flow, same sequence
number) every 1, 2, 4 s while its negotiation runs, and each copy was held and let go
with the rest. A copy that reaches the server after its SYN-ACK has reached the client
is answered as a new attempt: a server that answered with a SYN cookie (a burst of
released SYNs fills a small listen queue) keeps no state and answers the copy with
another initial sequence number; conntrack, which ignores a SYN in SYN_RECV and
re-syncs on the SYN-ACK that answers it, follows that one, and the client's ACK for
the first is invalid (not NATed; fw4 drops it). A copy is late when the daemon reads
the queue late (busy installing SAs): the QEMU matrix's failing cell, and
tests/host/test_kernel_hold.py staging it (docs/oe-gateway.md 4.3). So a held SYN's
retransmission takes its place (the newest copy: its deadline is the latest), and a
copy queued after one was let go (the destination not yet known to the kernel) is
dropped; both count in ``hold_superseded``. The client's own timer resends
it if the answer is lost, by then without a detour through the queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import ipaddress
import logging
from collections.abc import Callable
from dataclasses import field
from typing import Protocol

from oe_router.records import record

from .base import (
    ICMP_PROTOS,
    Acquire,
    ChildSaSpec,
    DatapathError,
    DatapathEvent,
    Direction,
    PolicyAction,
    PolicySpec,
    TrafficSelector,
)
from .nfqueue import NfQueue, NfQueueError, QueuedPacket
from .nft import run_nft
from .packet import Flow, MalformedPacket, flow, syn_seq
from .policies import PolicyTable
from .sa_table import SaTable

__all__ = ["Decider", "FirstPackets", "HoldLimits", "Outcome", "Ruling", "SpdDecider"]

log = logging.getLogger("oe_router.datapath")


@record(frozen=True)
class HoldLimits:
    """How long first packets are held, and how many (per destination, in total)."""

    seconds: float
    per_destination: int
    total: int


class Outcome(enum.Enum):
    """What a queued packet's rule says."""

    HOLD = "hold"
    CLEAR = "clear"  # no policy, or a pass: in the clear
    DROP = "drop"
    SEAL = "seal"  # into its SA, sealed by us (userspace)
    SA_UP = "sa_up"  # accepted: the kernel seals it into its SA (XFRM)

    @property
    def stat(self) -> str:
        """The counter a packet so decided adds to."""
        return _OUTCOME_STAT[self]


_OUTCOME_STAT: dict[Outcome, str] = {
    Outcome.HOLD: "held",
    Outcome.CLEAR: "accepted",
    Outcome.DROP: "dropped",
    Outcome.SEAL: "released_into_sa",
    Outcome.SA_UP: "released_into_sa",
}


@record(frozen=True)
class Ruling:
    """A ``Decider``'s answer for one flow: the outcome, and what it needs."""

    outcome: Outcome
    trap: PolicySpec | None = None  # HOLD: the trap whose ACQUIRE the packet raises
    flow: Flow | None = None  # HOLD: the flow as the trap sees it (after source NAT)
    child: ChildSaSpec | None = None  # SEAL: the Child SA to seal it into
    policy: PolicySpec | None = None  # the policy that decided it (its lifetime bounds the answer)


class Decider(Protocol):
    """The policies and SAs a queued packet is decided by (XFRM's order of checks)."""

    @property
    def live(self) -> bool:
        """False until the policy set is complete: queued packets wait until then."""
        ...

    def rule(self, f: Flow) -> Ruling: ...


class SpdDecider:
    """The userspace datapath's rule: its SPD (``PolicyTable``) and SAs (``SaTable``)."""

    def __init__(self, policies: PolicyTable, sas: SaTable) -> None:
        self._policies = policies
        self._sas = sas

    @property
    def live(self) -> bool:
        return self._policies.projection.live

    def rule(self, f: Flow) -> Ruling:
        pol = self._policies.lookup(Direction.OUT, f)
        action = None if pol is None else pol.action
        if action is None or action is PolicyAction.PASS:
            if self._sas.covers(f):
                return Ruling(Outcome.DROP)  # its tunnel exists, un-NATed: never clear
            return Ruling(Outcome.CLEAR)
        if action is PolicyAction.DROP:
            return Ruling(Outcome.DROP)
        if action is PolicyAction.IPSEC:
            child = self._sas.for_policy(pol)
            if child is None:
                return Ruling(Outcome.HOLD)  # policy ahead of its SA: a moment more
            return Ruling(Outcome.SEAL, child=child)
        if action is PolicyAction.TRAP:
            return Ruling(Outcome.HOLD, trap=pol, flow=f)
        return Ruling(Outcome.HOLD)  # HOLD: wait for the SA or a shunt


@record(eq=False)
class _Held:
    """A queued first packet waiting for its destination's SA or shunt."""

    packet_id: int
    payload: bytes = field(repr=False)
    flow: Flow
    deadline: float
    syn: int | None = None  # a TCP SYN's sequence number: its retransmissions share it


def _superseded(bucket: list[_Held], h: _Held) -> int | None:
    """Where in ``bucket`` a copy of the TCP SYN ``h`` is held (same flow, same sequence
    number: the client's retransmission), or None."""
    for i, old in enumerate(bucket):
        if old.syn == h.syn and old.flow == h.flow:
            return i
    return None


class FirstPackets:
    """The NFQUEUE of first packets, the packets held from it, and their verdicts."""

    def __init__(
        self,
        *,
        queue_num: int,
        limits: HoldLimits,
        decider: Decider,
        emit: Callable[[DatapathEvent], None],
        netns: str | None,
        clock: Callable[[], float],
        seal: Callable[[ChildSaSpec, list[bytes]], None] | None = None,
        stolen_mark: int = 0,
        wan: str = "",
        egress_table: str | None = None,
        on_rule: Callable[[Flow, Ruling], None] | None = None,
    ) -> None:
        """``seal``, ``stolen_mark``, ``wan``, ``egress_table``: the userspace datapath's
        sealing of a packet into its SA (None: the kernel seals what we accept).
        ``on_rule``: told every final ruling (the kernel hold's set of known
        destinations)."""
        self._queue_num = queue_num
        self._limits = limits
        self._decider = decider
        self._seal = seal
        self._on_rule = on_rule
        self._emit = emit
        self._stolen_mark = stolen_mark
        self._wan = wan
        self._egress_table = egress_table
        self._netns = netns
        self._clock = clock
        self._queue: NfQueue | None = None
        self._egress_drop = False  # the WAN egress chain that drops stolen packets is in
        self._held: dict[tuple[int, int], list[_Held]] = {}  # (version, dst) -> packets
        self._held_count = 0
        self._acquired: dict[tuple[int, int, int], float] = {}  # (version, dst, reqid) -> when
        # TCP SYNs let go (flow, sequence number) -> until: a copy queued later is dropped
        self._sent_syns: dict[tuple[Flow, int], float] = {}
        self._acq_seq = 0
        self.stats = {
            "queued": 0,
            "held": 0,
            "released_into_sa": 0,
            "accepted": 0,
            "dropped": 0,
            "hold_overflow": 0,
            "hold_expired": 0,
            "hold_superseded": 0,
        }

    @property
    def held_now(self) -> int:
        return self._held_count

    def queue_stats(self) -> dict[str, int]:
        """The NFQUEUE binding's own trouble counters (empty while it is closed)."""
        q = self._queue
        if q is None:
            return {}
        return {
            "queue_malformed": q.malformed,
            "queue_overruns": q.overruns,
            "queue_verdict_errors": q.verdict_errors,
        }

    # ------------------------------------------------------------------ kernel side
    async def open(self) -> None:
        """The egress drop chain, then the queue binding (``close`` undoes a half-done open)."""
        if self._egress_table is not None:
            await asyncio.to_thread(self._setup_egress)
        self._queue = NfQueue(self._queue_num, netns=self._netns, maxlen=4 * self._limits.total)
        await asyncio.to_thread(self._queue.open)
        asyncio.get_running_loop().add_reader(self._queue.fileno(), self._on_queue)

    def _setup_egress(self) -> None:
        """The WAN device's egress chain dropping what we sealed into an SA ourselves."""
        t, m = self._egress_table, self._stolen_mark
        assert t is not None
        script = (
            f"table netdev {t}\ndelete table netdev {t}\n"
            f"table netdev {t} {{\n\tchain stolen {{\n"
            f'\t\ttype filter hook egress device "{self._wan}" priority 0; policy accept;\n'
            f"\t\tmeta mark & {m:#x} == {m:#x} counter drop\n\t}}\n}}\n"
        )
        try:
            run_nft(script, netns=self._netns, what="egress drop of stolen packets")
        except DatapathError as exc:
            log.warning(
                "%s; a first packet sent into its SA is dropped instead, and its "
                "connection's first reply may be lost (no netdev egress hook: Linux < 5.16, or "
                "kmod-nft-netdev missing on OpenWrt)",
                exc,
            )
            self._egress_drop = False
        else:
            self._egress_drop = True

    def drop_all(self) -> None:
        """At stop: every held packet is dropped."""
        for held in list(self._held.values()):
            for h in held:
                self._verdict(h, False, "dropped")
        self._held.clear()

    def close(self) -> None:
        """The queue binding and the egress chain go."""
        if self._queue is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._queue.fileno())
            self._queue.close()
            self._queue = None
        if self._egress_drop and self._egress_table is not None:
            t = self._egress_table
            with contextlib.suppress(DatapathError):
                run_nft(f"table netdev {t}\ndelete table netdev {t}\n", netns=self._netns)
            self._egress_drop = False

    # ------------------------------------------------------------------ packets
    def _on_queue(self) -> None:
        q = self._queue
        if q is None:
            return
        try:
            packets = q.read_packets()
        except NfQueueError as exc:
            log.error("%s", exc)
            return
        for p in packets:
            self.queued(p)

    def _verdict(self, held: _Held, accept: bool, stat: str, mark: int | None = None) -> None:
        self.stats[stat] += 1
        if self._queue is not None:
            try:
                self._queue.verdict(held.packet_id, accept, mark=mark)
            except NfQueueError as exc:
                log.warning("verdict for queued packet %d: %s", held.packet_id, exc)

    def queued(self, p: QueuedPacket) -> None:
        """A packet the kernel queued: decided now, or held."""
        self.stats["queued"] += 1
        try:
            f = flow(p.payload)
        except MalformedPacket:
            h = _Held(p.id, b"", Flow(0, 0, 0, 0), 0.0)
            self._verdict(h, False, "dropped")
            return
        syn = syn_seq(p.payload) if f.proto == 6 else None
        now = self._clock()
        h = _Held(p.id, p.payload, f, now + self._limits.seconds, syn)
        if syn is not None and self._sent_syns.get((f, syn), 0.0) > now:
            # a copy of a SYN already let go, queued before the kernel learned its
            # destination: sent late, it would reach the server after its answer (module doc)
            self._verdict(h, False, "hold_superseded")
            return
        if not self._decider.live:
            self._hold(h)
            return
        key = (f.version, f.dst)
        if key in self._held:
            # never ahead of older packets to the same place: conntrack confirms the first
            # of a flow's packets to leave and drops the others (their unconfirmed entries
            # clash), so the held ones are decided first, by the same rule
            self._release_bucket(key)
        if not self._decide(h):
            self._hold(h)

    def _decide(self, h: _Held) -> bool:
        """Settle a queued packet by the rule that covers it now; False: keep holding."""
        r = self._decider.rule(h.flow)
        if r.outcome is Outcome.HOLD:
            if r.trap is not None:
                self._acquire(r.trap, r.flow or h.flow)
            return False
        if self._on_rule is not None:
            self._on_rule(h.flow, r)
        if r.outcome is Outcome.SEAL and r.child is not None and self._seal is not None:
            # the verdict first: the peer's answer may be back before a late verdict, and
            # must find the connection (and its NAT binding) confirmed by conntrack
            if self._egress_drop:  # into conntrack, not onto the wire
                self._verdict(h, True, "released_into_sa", mark=self._stolen_mark)
            else:
                self._verdict(h, False, "released_into_sa")
            self._seal(r.child, [h.payload])
            self._sent_syn(h)
            return True
        accept = r.outcome in (Outcome.CLEAR, Outcome.SA_UP)
        self._verdict(h, accept, r.outcome.stat)
        if accept:
            self._sent_syn(h)
        return True

    def _sent_syn(self, h: _Held) -> None:
        """Remember a SYN let go (for ``hold.seconds``, within the hold's total bound)."""
        if h.syn is None or len(self._sent_syns) >= self._limits.total:
            return
        self._sent_syns[(h.flow, h.syn)] = self._clock() + self._limits.seconds

    def _acquire(self, pol: PolicySpec, f: Flow) -> None:
        """The kernel's ACQUIRE, for a trapped packet (at most once a second per flow's
        destination and reqid while it stays trapped, like xfrm_acq_expires=1)."""
        t = pol.templates[0]
        key = (f.version, f.dst, t.reqid)
        now = self._clock()
        if now - self._acquired.get(key, -10.0) < 1.0:
            return
        self._acquired[key] = now
        src, dst = f.src_address, f.dst_address
        host = 32 if f.version == 4 else 128
        if f.proto in ICMP_PROTOS:
            sel_dst = TrafficSelector(
                ipaddress.ip_network(f"{dst}/{host}"), f.proto, icmp_type=f.sport
            )
            sel_src = TrafficSelector(ipaddress.ip_network(f"{src}/{host}"), f.proto)
        else:
            ports = f.proto in (6, 17, 132)
            sel_dst = TrafficSelector(
                ipaddress.ip_network(f"{dst}/{host}"), f.proto, f.dport if ports else None
            )
            sel_src = TrafficSelector(
                ipaddress.ip_network(f"{src}/{host}"), f.proto, f.sport if ports else None
            )
        self._acq_seq += 1
        self._emit(
            Acquire(
                src=t.src if not t.src.is_unspecified else src,
                dst=t.dst if not t.dst.is_unspecified else dst,
                selector_src=sel_src,
                selector_dst=sel_dst,
                reqid=t.reqid,
                seq=self._acq_seq,
                policy_priority=pol.priority,
                policy_index=0,
            )
        )

    def _hold(self, h: _Held) -> None:
        key = (h.flow.version, h.flow.dst)
        bucket = self._held.setdefault(key, [])
        if h.syn is not None:
            i = _superseded(bucket, h)
            if i is not None:
                # the client resent its SYN: only the newest copy is kept (module doc)
                self._verdict(bucket[i], False, "hold_superseded")
                bucket[i] = h
                self.stats["held"] += 1
                return
        lim = self._limits
        if len(bucket) >= lim.per_destination or self._held_count >= lim.total:
            self._verdict(h, False, "hold_overflow")
            if not bucket:
                del self._held[key]
            return
        bucket.append(h)
        self._held_count += 1
        self.stats["held"] += 1

    def release(self) -> None:
        """Decide again every held packet (a policy or an SA changed)."""
        if not self._decider.live or not self._held:
            return
        for key in list(self._held):
            self._release_bucket(key)

    def _release_bucket(self, key: tuple[int, int]) -> None:
        """Decide again, oldest first, the packets held for one destination."""
        bucket = self._held[key]
        keep = [h for h in bucket if not self._decide(h)]
        self._held_count -= len(bucket) - len(keep)
        if keep:
            self._held[key] = keep
        else:
            del self._held[key]

    async def expire(self) -> None:
        """Forever: drop what waited past its deadline, forget old ACQUIRE times."""
        while True:
            await asyncio.sleep(0.25)
            now = self._clock()
            for key, bucket in list(self._held.items()):
                keep = []
                for h in bucket:
                    if h.deadline <= now:
                        self._verdict(h, False, "hold_expired")
                        self._held_count -= 1
                    else:
                        keep.append(h)
                if keep:
                    self._held[key] = keep
                else:
                    del self._held[key]
            stale = [k for k, t in self._acquired.items() if now - t > 60]
            for k in stale:
                del self._acquired[k]
            self._sent_syns = {k: u for k, u in self._sent_syns.items() if u > now}
