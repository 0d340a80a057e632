"""DNS-triggered OE: the answers the DNS front holds, and the key each named peer proves.

Why apart: an answer names several addresses and is released once every one is
protected (or one cannot be), by whichever kind of work protects it (our negotiation,
or the peer's own Child SA being installed); and a peer a DNS name led us to must prove
that name's key in every later negotiation, packet-triggered ones too.
"""

from __future__ import annotations

from dataclasses import field

import dns.name

from oe_router.datapath.base import IPAddress, TrafficSelector
from oe_router.oe.actions import Action, TunnelResult
from oe_router.oe.peerauth import PeerAuth
from oe_router.records import record

__all__ = ["HeldAnswers"]


@record
class _Answer:
    ok: bool
    pending: set[tuple[IPAddress, TrafficSelector]] = field(default_factory=set)


class HeldAnswers:
    """Held answers by waiter number, and the peer auth learnt from DNS, by peer."""

    def __init__(self) -> None:
        self._answers: dict[int, _Answer] = {}
        self._auth: dict[IPAddress, PeerAuth] = {}

    def learn(self, peer: IPAddress, auth: PeerAuth) -> None:
        """A DNS answer named ``peer``: it must prove ``auth`` from now on."""
        self._auth[peer] = auth

    def auth(self, peer: IPAddress) -> PeerAuth:
        """How ``peer`` must authenticate: its DNS name's key, else NULL."""
        return self._auth.get(peer, PeerAuth())

    def name(self, peer: IPAddress) -> dns.name.Name | None:
        """The DNS name that asked for ``peer``, if one did."""
        auth = self._auth.get(peer)
        return None if auth is None else auth.name

    def named(self) -> dict[IPAddress, PeerAuth]:
        """Every peer a DNS name led to, with how it must authenticate (the device view)."""
        return {peer: auth for peer, auth in self._auth.items() if auth.name is not None}

    def hold(self, waiter: int, ok: bool) -> None:
        """Hold answer ``waiter`` (``ok``: not already known to go out unprotected)."""
        self._answers[waiter] = _Answer(ok)

    def held(self, waiter: int) -> bool:
        return waiter in self._answers

    def refuse(self, waiter: int) -> None:
        """One of the answer's addresses stays in the clear."""
        self._answers[waiter].ok = False

    def wait_for(self, waiter: int, peer: IPAddress, selector: TrafficSelector) -> None:
        """The answer goes out only once ``peer``'s ``selector`` is settled."""
        self._answers[waiter].pending.add((peer, selector))

    def release_if_done(self, waiter: int) -> list[Action]:
        """The answer's ``TunnelResult`` once nothing is pending, else nothing."""
        a = self._answers.get(waiter)
        if a is None or a.pending:
            return []
        del self._answers[waiter]
        return [TunnelResult(waiter, a.ok)]

    def settle(
        self, waiters: set[int], peer: IPAddress, selector: TrafficSelector, ok: bool
    ) -> list[Action]:
        """``peer``'s ``selector`` is protected (ok) or not: answer the waiters that
        waited only for it."""
        out: list[Action] = []
        for waiter in sorted(waiters):
            a = self._answers.get(waiter)
            if a is None:
                continue
            a.pending.discard((peer, selector))
            a.ok = a.ok and ok
            out += self.release_if_done(waiter)
        return out
