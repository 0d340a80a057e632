"""Child SA upkeep: expiry, idleness and rekeys of the Child SAs that are up.

Why apart: once a Child SA is in, its life is a loop of its own (counters read,
lifetime events, a rekey negotiated and installed in its place) that never touches
the negotiation queue; it only reads the peer table, opens rekey tickets and asks the
admission checks about the rekeyed SA.
"""

from __future__ import annotations

import logging
from dataclasses import replace

from oe_router.datapath.base import ChildSaSpec, Expire
from oe_router.oe.actions import (
    Action,
    CheckTraffic,
    InstallChild,
    NegotiationResult,
    Rekey,
    RemoveChild,
    SendDelete,
)
from oe_router.oe.admission import Admission
from oe_router.oe.peers import Peers
from oe_router.oe.tickets import RekeyTicket, Tickets

__all__ = ["Upkeep"]

log = logging.getLogger("oe_router.oe")


class Upkeep:
    """Idle Child SAs go; busy ones are rekeyed at their soft expiry."""

    def __init__(
        self, peers: Peers, tickets: Tickets, admission: Admission, idle_timeout: float
    ) -> None:
        self._peers, self._tickets, self._admission = peers, tickets, admission
        self.idle_timeout = idle_timeout  #: seconds without traffic before a Child SA goes

    def poll(self) -> list[Action]:
        """Read every Child SA's counters (periodically), so idleness is measured."""
        return [CheckTraffic(c.id, c.spec, soft_expired=False) for c in self._peers.children()]

    def expired(self, ev: Expire) -> list[Action]:
        """An SA hit its lifetime: hard -> gone; soft -> rekey if it carried traffic."""
        c = self._peers.child_by_spi(ev.dst, ev.spi)
        if c is None:
            return []
        if ev.hard:
            log.info("peer %s: Child SA expired (spi %#010x)", c.peer, ev.spi)
            return self._peers.remove(c, tell_peer=True)
        if c.rekeying:
            return []
        return [CheckTraffic(c.id, c.spec, soft_expired=True)]

    def traffic(self, child_id: int, total_bytes: int, now: float, soft: bool) -> list[Action]:
        """Counters of a ``CheckTraffic``: an SA idle for ``idle_timeout`` goes (at any
        check: the IKE core rekeys Child SAs on its own timer, so waiting for a soft
        expiry would rekey idle SAs forever); at a soft expiry a busy one is rekeyed."""
        c = self._peers.child(child_id)
        if c is None:
            return []
        if total_bytes != c.bytes_seen:
            c.bytes_seen = total_bytes
            c.active_at = now
        if c.rekeying:
            return []
        if now - c.active_at >= self.idle_timeout:
            log.info("peer %s: idle Child SA not rekeyed; removed", c.peer)
            return self._peers.remove(c, tell_peer=True)
        if not soft:
            return []
        c.rekeying = True
        ticket = self._tickets.open(RekeyTicket(c.peer, c.id))
        return [Rekey(ticket, c.peer, c.spec)]

    def rekeyed(self, ticket: int, t: RekeyTicket, result: NegotiationResult) -> list[Action]:
        """The negotiator answered a ``Rekey``: install the new SA if it may be."""
        c = self._peers.child(t.child_id)
        if c is None:
            self._tickets.close(ticket)
            return [SendDelete(t.peer, result.child_sa)] if result.child_sa else []
        spec = result.child_sa
        error = result.error or "rekey failed"
        if spec is not None:
            error = self._admission.containment_error(t.peer, spec) or ""
        if spec is None or error:
            self._tickets.close(ticket)
            c.rekeying = False
            log.warning("peer %s: %s; the Child SA lives until it expires", t.peer, error)
            return [SendDelete(t.peer, spec)] if spec is not None else []
        spec = replace(spec, policy_priority=c.spec.policy_priority)
        t.spec = spec
        return [InstallChild(ticket, spec)]

    def installed(
        self, t: RekeyTicket, spec: ChildSaSpec | None, error: str | None, now: float
    ) -> list[Action]:
        """The datapath installed the rekeyed SA (or failed): it takes the old one's place."""
        c = self._peers.of(t.peer).children.get(t.child_id)
        if c is None:
            self._peers.gc(t.peer)
            return [RemoveChild(spec)] if spec is not None else []
        c.rekeying = False
        if spec is None:
            log.error("peer %s: installing the rekeyed Child SA failed: %s", t.peer, error)
            return [SendDelete(t.peer, t.spec)]
        old, c.spec, c.since = c.spec, spec, now
        c.bytes_seen, c.active_at = 0, now  # counters start again with the new SA
        log.info("peer %s: Child SA rekeyed", t.peer)
        return [RemoveChild(old, remove_policies=False)]
