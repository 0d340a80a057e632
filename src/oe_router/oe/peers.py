"""The OE manager's peers: per peer, its Child SAs and the flows queued to negotiate.

Why a table of its own: every event (an SA expiring, a DELETE, a counter reading, a
status request) starts by finding a peer or one of its Child SAs; the lookups, what a
Child SA's coming and going does to the policies around it, and the status rows belong
with the state they read, apart from the decisions made on them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import field

from oe_router.control.status import TunnelStatus
from oe_router.datapath.base import (
    ChildSaCounters,
    ChildSaSpec,
    DatapathError,
    IPAddress,
    TrafficSelector,
)
from oe_router.oe.actions import Action, RemoveChild, SendDelete
from oe_router.oe.groups import GroupPolicies
from oe_router.oe.passes import Passes
from oe_router.oe.policy import Group, Rule
from oe_router.oe.selectors import child_keys, describe
from oe_router.records import record

__all__ = ["Child", "Peer", "Peers", "Want"]


@record
class Child:
    """One installed Child SA and what the manager tracks of it."""

    id: int
    peer: IPAddress
    spec: ChildSaSpec
    selector: TrafficSelector
    group: Group
    since: float
    bytes_seen: int = 0
    active_at: float = 0.0
    rekeying: bool = False
    moving: str = ""  #: why it is being rekeyed onto the current ESP offer (MoveChild)


@record
class Want:
    """A flow selector to negotiate with a peer, and who waits for it."""

    selector: TrafficSelector
    rule: Rule
    waiters: set[int] = field(default_factory=set)
    cause: str = ""  #: why we negotiate again (a shunt's reason names it)
    #: Child SAs the new one replaces (make-before-break: a move the peer refused as a
    #: rekey); they go once it is in, or when the negotiation fails
    replaces: set[int] = field(default_factory=set)


@record
class Peer:
    """One peer: at most one negotiation in flight, the rest queued behind it."""

    addr: IPAddress
    in_flight: int | None = None  # ticket
    queue: dict[TrafficSelector, Want] = field(default_factory=dict)
    children: dict[int, Child] = field(default_factory=dict)

    @property
    def idle(self) -> bool:
        return self.in_flight is None and not self.queue and not self.children


class Peers:
    """Every peer with work in flight, queued or installed, by address."""

    def __init__(self, groups: GroupPolicies, passes: Passes) -> None:
        self._by_addr: dict[IPAddress, Peer] = {}
        self._groups, self._passes = groups, passes

    def __iter__(self) -> Iterator[Peer]:
        return iter(self._by_addr.values())

    def get(self, addr: IPAddress) -> Peer | None:
        return self._by_addr.get(addr)

    def of(self, addr: IPAddress) -> Peer:
        """The peer, made on first use."""
        return self._by_addr.setdefault(addr, Peer(addr))

    def gc(self, addr: IPAddress) -> None:
        """Forget the peer once nothing is in flight, queued or installed."""
        p = self._by_addr.get(addr)
        if p is not None and p.idle:
            del self._by_addr[addr]

    def children(self) -> list[Child]:
        return [c for p in self._by_addr.values() for c in p.children.values()]

    def child(self, child_id: int) -> Child | None:
        return next((c for c in self.children() if c.id == child_id), None)

    def child_for(self, peer: IPAddress, selector: TrafficSelector) -> Child | None:
        p = self._by_addr.get(peer)
        if p is None:
            return None
        return next((c for c in p.children.values() if c.selector == selector), None)

    def child_by_spi(self, dst: IPAddress, spi: int) -> Child | None:
        """The Child SA one of whose SAs goes to ``dst`` with ``spi`` (an EXPIRE's SA)."""
        for c in self.children():
            s = c.spec
            if (dst, spi) in ((s.local, s.inbound.spi), (s.remote, s.outbound.spi)):
                return c
        return None

    def supersede(self, p: Peer, selector: TrafficSelector) -> list[Action]:
        """A new Child SA for a flow that already has one (both ends initiated, or the
        peer restarted): the new one's policies replaced the old one's in the kernel,
        so the old SAs go without their policies, and the peer is told."""
        actions: list[Action] = []
        for old in [c for c in p.children.values() if c.selector == selector]:
            del p.children[old.id]
            actions += [RemoveChild(old.spec, remove_policies=False), SendDelete(p.addr, old.spec)]
        return actions

    def remove(self, c: Child, *, tell_peer: bool) -> list[Action]:
        """``c`` goes: the group's policies take its policies' place, and with the peer's
        last Child SA its CAT inner address and passes go too."""
        p = self.of(c.peer)
        del p.children[c.id]
        actions: list[Action] = [RemoveChild(c.spec)]
        if tell_peer:
            actions.append(SendDelete(c.peer, c.spec))
        actions += self._groups.restore(child_keys(c.spec))
        if not p.children:
            actions += self._passes.last_child_gone(c.peer)
        self.gc(c.peer)
        return actions

    def tunnels(
        self,
        now: float,
        wan: Mapping[int, IPAddress],
        counters: Callable[[ChildSaSpec], ChildSaCounters] | None,
        engine: Callable[[ChildSaSpec], str] | None,
    ) -> tuple[TunnelStatus, ...]:
        """``oe status`` rows: one per Child SA and per queued negotiation."""
        out: list[TunnelStatus] = []
        for p in self._by_addr.values():
            for c in p.children.values():
                n = _read(counters, c.spec)
                out.append(
                    TunnelStatus(
                        peer=str(p.addr),
                        local=str(c.spec.local),
                        remote=describe(c.selector),
                        state="rekeying" if c.rekeying or c.moving else "established",
                        policy=c.group.value,
                        transform=c.spec.encr.ike_name,
                        established_s=round(now - c.since, 3),
                        bytes_in=0 if n is None else n.inbound.bytes,
                        bytes_out=0 if n is None else n.outbound.bytes,
                        packets_in=0 if n is None else n.inbound.packets,
                        packets_out=0 if n is None else n.outbound.packets,
                        engine="" if engine is None else engine(c.spec),
                        replay_errors=0 if n is None else n.inbound.replay_errors,
                        integrity_failures=0 if n is None else n.inbound.integrity_failures,
                    )
                )
            for want in p.queue.values():
                out.append(
                    TunnelStatus(
                        peer=str(p.addr),
                        local=str(wan.get(p.addr.version, "")),
                        remote=describe(want.selector),
                        state="negotiating" if p.in_flight is not None else "queued",
                        policy=want.rule.group.value,
                    )
                )
        return tuple(out)


def _read(
    counters: Callable[[ChildSaSpec], ChildSaCounters] | None, spec: ChildSaSpec
) -> ChildSaCounters | None:
    """A Child SA's counters for the status, or None when they cannot be read (it left the
    kernel between the event and this look: the status shows 0, never fails)."""
    if counters is None:
        return None
    try:
        return counters(spec)
    except DatapathError:
        return None
