"""Tickets: the OE manager's work in flight, one type per kind of work.

Why: an action that goes out (``Negotiate``, ``Rekey``, ``InstallChild``) comes back
later as a result naming its ticket, and what that result means depends on the kind of
work: our negotiation of a queued flow, a rekey of one of our Child SAs, or a Child SA
the peer initiated that the datapath is installing. A type per kind says which, and
carries only what that kind needs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import field

from oe_router.datapath.base import ChildSaSpec, IPAddress, TrafficSelector
from oe_router.oe.peers import Child, Want
from oe_router.records import record

__all__ = ["InboundTicket", "NegotiationTicket", "RekeyTicket", "Ticket", "Tickets"]


@record
class NegotiationTicket:
    """Our negotiation of ``want`` (``Negotiate``, then ``InstallChild``)."""

    peer: IPAddress
    want: Want
    spec: ChildSaSpec | None = None  #: what InstallChild was asked to install
    inner: IPAddress | None = None  #: CAT: the inner address the peer gave us


@record
class RekeyTicket:
    """A rekey of our Child SA ``child_id`` (``Rekey``, then ``InstallChild``)."""

    peer: IPAddress
    child_id: int
    spec: ChildSaSpec | None = None  #: what InstallChild was asked to install


@record
class InboundTicket:
    """A Child SA the peer initiated, being installed (``InstallChild``)."""

    peer: IPAddress
    child: Child
    waiters: set[int] = field(default_factory=set)  #: DNS answers held for it


Ticket = NegotiationTicket | RekeyTicket | InboundTicket


class Tickets:
    """The tickets in flight, by number (numbers come from ``ids``)."""

    def __init__(self, ids: Callable[[], int]) -> None:
        self._ids = ids
        self._open: dict[int, Ticket] = {}

    def open(self, ticket: Ticket) -> int:
        n = self._ids()
        self._open[n] = ticket
        return n

    def get(self, n: int) -> Ticket | None:
        return self._open.get(n)

    def close(self, n: int) -> Ticket | None:
        return self._open.pop(n, None)

    def installing(self, peer: IPAddress, selector: TrafficSelector) -> InboundTicket | None:
        """The peer's own Child SA for ``selector`` while the datapath installs it: a
        packet or an answer for it waits for that install instead of negotiating a
        second Child SA (which one side would then delete, taking the flow with it)."""
        return next(
            (
                t
                for t in self._open.values()
                if isinstance(t, InboundTicket) and t.peer == peer and t.child.selector == selector
            ),
            None,
        )
