"""The IKE SAs the service holds, one ``PeerSa`` each, and what their events do to them.

Why apart from the service: the service turns commands and config into IKE SAs; this
table is the bookkeeping behind them. Each event of an IKE SA lands here: Child SAs are
recorded and handed to the ``ChildSaSink`` (the datapath or the OE manager plugs in
there), whoever waits in ``up`` or ``create_child`` is settled, and a failure is logged
at the level it deserves (a responder's early failure, which anyone can cause with a
packet, rate-limited).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import field
from typing import Protocol

from oe_router.ratelimit import RateLimit
from oe_router.records import record

from .auth import PrivateKey, PublicKey
from .endpoint import SaHandle
from .events import (
    ChildSaDeleted,
    ChildSaEstablished,
    ChildSaFailed,
    Event,
    IkeSaDeleted,
    IkeSaEstablished,
    IkeSaFailed,
    IkeSaRekeyed,
    InitialContact,
)
from .proposals import ProposalMismatch
from .sa import IkeSaConfig
from .states import IkeState
from .status_view import identity_text

__all__ = [
    "ChildSaSink",
    "IkeUpError",
    "Mismatch",
    "PeerSa",
    "PeerTable",
    "RecordingSink",
    "log_limited",
    "with_offers",
]

log = logging.getLogger("oe_router.ike")


class IkeUpError(Exception):
    """``up`` failed; the message names the peer and the reason.

    ``notify`` is the peer's error notify when it refused (AUTHENTICATION_FAILED lets
    the OE negotiator retry with the other authentication).
    """

    def __init__(
        self, message: str, notify: int | None = None, offers: ProposalMismatch | None = None
    ) -> None:
        super().__init__(message)
        self.notify = notify
        #: NO_PROPOSAL_CHOSEN: what each side offered
        self.offers = offers


def log_limited(limit: RateLimit, now: float, level: int, msg: str, *args: object) -> None:
    """Log what anyone can cause with a packet (a refused IKE_SA_INIT, a responder IKE
    SA failing before IKE_AUTH) as ``limit`` allows; the next line that gets out says
    how many were left out meanwhile."""
    if not limit.allow(now):
        return
    if left_out := limit.take_suppressed():
        msg += " (and %d more like it in the last %.0fs)"
        args += (left_out, limit.window)
    log.log(level, msg, *args)


# --------------------------------------------------------------------------- the sink


class ChildSaSink(Protocol):
    """Where established and deleted Child SAs go (datapath, OE manager, a test recorder).

    Called synchronously from the endpoint's datagram handler: schedule slow work
    (netlink) as a task, do not block.
    """

    def child_sa_established(self, peer: PeerSa, child: ChildSaEstablished) -> None: ...

    def child_sa_deleted(self, peer: PeerSa, child: ChildSaDeleted) -> None: ...

    def peer_dead(self, peer: PeerSa, children: tuple[ChildSaDeleted, ...]) -> None:
        """``peer`` stopped answering an established IKE SA (liveness check, rekey): the
        IKE SA is already forgotten, ``children`` went with it. Called INSTEAD of
        ``child_sa_deleted`` for them, so the owner can fall back per policy in one step
        rather than treating each as an ordinary DELETE."""
        ...


@record
class RecordingSink:
    """A sink that only records, for tests and for running without a datapath."""

    established: list[tuple[str, ChildSaEstablished]] = field(default_factory=list)
    deleted: list[tuple[str, ChildSaDeleted]] = field(default_factory=list)
    dead: list[tuple[str, tuple[ChildSaDeleted, ...]]] = field(default_factory=list)

    def child_sa_established(self, peer: PeerSa, child: ChildSaEstablished) -> None:
        self.established.append((peer.peer, child))

    def child_sa_deleted(self, peer: PeerSa, child: ChildSaDeleted) -> None:
        self.deleted.append((peer.peer, child))

    def peer_dead(self, peer: PeerSa, children: tuple[ChildSaDeleted, ...]) -> None:
        self.dead.append((peer.peer, children))


# --------------------------------------------------------------------------- per-peer state


@record
class _Child:
    event: ChildSaEstablished
    since: float


@record(eq=False)
class PeerSa:
    """One IKE SA with one peer, and the Child SAs it carries."""

    peer: str
    handle: SaHandle
    local_key: PrivateKey | None
    peer_key: PublicKey | None
    ike: IkeSaEstablished | None = None
    children: dict[bytes, _Child] = field(default_factory=dict)  # by our inbound SPI
    error: str | None = None
    notify: int | None = None  #: the notify of the failure, if the peer sent one
    child_error: str | None = None  #: why the first Child SA failed (the IKE SA stays up)
    offers: ProposalMismatch | None = None  #: the failure's proposals (NO_PROPOSAL_CHOSEN)
    #: create_child requests refused with NO_PROPOSAL_CHOSEN: what each side offered
    child_offers: dict[int, ProposalMismatch] = field(default_factory=dict)
    done: asyncio.Future[None] | None = None
    pending: dict[int, asyncio.Future[str | None]] = field(default_factory=dict)  # create_child

    @property
    def state(self) -> IkeState:
        if self.error is not None:
            return IkeState.FAILED
        return self.handle.sa.state


@record(frozen=True)
class Mismatch:
    """A recent NO_PROPOSAL_CHOSEN with a peer, either way (``oe status``)."""

    peer: str
    at: float
    offers: ProposalMismatch


#: how many peers' latest proposal mismatches ``oe status`` keeps (a table anyone can
#: write to with an IKE_SA_INIT must stay small)
MISMATCHES_KEPT = 16


def with_offers(reason: str, offers: ProposalMismatch | None) -> str:
    """A failure's reason, and what each side offered when no proposal matched."""
    return reason if offers is None else f"{reason} ({offers.text()})"


# --------------------------------------------------------------------------- the table


class PeerTable:
    """Every IKE SA the service holds (``sas``), kept by their events.

    ``forget`` drops an IKE SA at the endpoint without telling the peer (an older one
    the peer's INITIAL_CONTACT replaced).
    """

    def __init__(
        self,
        sink: ChildSaSink,
        clock: Callable[[], float],
        forget: Callable[[SaHandle], None],
    ) -> None:
        self.sas: list[PeerSa] = []
        self.sink = sink
        self._clock = clock
        self._forget = forget
        self._early_failures = RateLimit()
        #: the latest proposal mismatch per (peer, protocol, who refused), oldest first
        self.mismatches: dict[tuple[str, str, str], Mismatch] = {}

    def find(self, peer: str) -> PeerSa | None:
        """The best IKE SA with ``peer``: established first, then one in progress."""
        live = [p for p in self.sas if p.peer == peer and not p.state.over]
        live.sort(key=lambda p: p.state != IkeState.ESTABLISHED)
        return live[0] if live else None

    def track(self, handle: SaHandle, addr: str, cfg: IkeSaConfig) -> PeerSa:
        """An IKE SA we initiate: someone waits for it (``done``)."""
        p = PeerSa(addr, handle, cfg.private_key, cfg.peer_public_key)
        p.done = asyncio.get_running_loop().create_future()
        handle.owner = p
        self.sas.append(p)
        return p

    def settle(self, p: PeerSa, request_id: int | None = None, error: str | None = None) -> None:
        if p.done is not None and not p.done.done():
            p.done.set_result(None)
        for rid, fut in list(p.pending.items()):
            if (request_id is None or rid == request_id) and not fut.done():
                fut.set_result(error if request_id is not None else p.error or "IKE SA gone")

    def drop(self, p: PeerSa, reason: str, *, dead: bool = False) -> None:
        gone = []
        for spi in list(p.children):
            child = p.children.pop(spi).event
            gone.append(ChildSaDeleted(child.spi_in, child.spi_out, reason))
        if dead:
            self.sink.peer_dead(p, tuple(gone))
        else:
            for ev in gone:
                self.sink.child_sa_deleted(p, ev)
        if p in self.sas:
            self.sas.remove(p)
        if p.error is None and p.ike is None:
            p.error = reason
        self.settle(p)

    def mismatch(self, peer: str, offers: ProposalMismatch | None, now: float) -> None:
        """Remember the latest NO_PROPOSAL_CHOSEN with ``peer`` for ``oe status``."""
        if offers is None:
            return
        key = (peer, offers.protocol, offers.refused_by)
        self.mismatches.pop(key, None)
        self.mismatches[key] = Mismatch(peer, now, offers)
        while len(self.mismatches) > MISMATCHES_KEPT:
            del self.mismatches[next(iter(self.mismatches))]

    def on_event(self, handle: SaHandle, ev: Event) -> None:
        """The endpoint's listener: an IKE SA a peer initiated is tracked from its first event."""
        p = handle.owner
        if not isinstance(p, PeerSa):  # a peer initiated: track its IKE SA
            cfg = handle.sa.config
            p = PeerSa(handle.remote[0], handle, cfg.private_key, cfg.peer_public_key)
            handle.owner = p
            self.sas.append(p)
        now = self._clock()
        if isinstance(ev, IkeSaEstablished):
            p.ike = ev
            p.peer_key = p.peer_key or handle.sa.peer.public_key  # one looked up by its name
            log.info(
                "IKE SA with %s established (%s, peer id %s)",
                p.peer,
                "initiator" if ev.is_initiator else "responder",
                identity_text(ev.peer_id),
            )
            if not handle.sa.is_initiator:
                self.settle(p)
        elif isinstance(ev, ChildSaEstablished):  # ChildSaRekeyed too: install the new pair
            p.children[ev.spi_in] = _Child(ev, now)
            log.info("Child SA with %s up: in %s out %s", p.peer, ev.spi_in.hex(), ev.spi_out.hex())
            self.sink.child_sa_established(p, ev)
            if ev.request_id is not None:
                self.settle(p, ev.request_id)
            self.settle(p)
        elif isinstance(ev, ChildSaFailed):
            self.mismatch(p.peer, ev.offers, now)
            why = with_offers(ev.reason, ev.offers)
            log.warning("peer %s: Child SA refused: %s", p.peer, why)
            if ev.request_id is not None:
                if ev.offers is not None:
                    p.child_offers[ev.request_id] = ev.offers
                self.settle(p, ev.request_id, f"Child SA refused: {ev.reason}")
            elif ev.rekey_of is None and not p.children:
                p.child_error = f"IKE SA up but the Child SA failed: {ev.reason}"
                p.notify = ev.notify
                p.offers = ev.offers
                self.settle(p)
        elif isinstance(ev, ChildSaDeleted):
            gone = p.children.pop(ev.spi_in, None)
            if gone is not None:
                self.sink.child_sa_deleted(p, ev)
        elif isinstance(ev, IkeSaRekeyed):
            log.info(
                "IKE SA with %s rekeyed: now %s_i %s_r", p.peer, ev.spi_i.hex(), ev.spi_r.hex()
            )
        elif isinstance(ev, InitialContact):
            for old in [o for o in self.sas if o.peer == p.peer and o is not p]:
                log.info("peer %s sent INITIAL_CONTACT: forgetting its older IKE SA", p.peer)
                self._forget(old.handle)
                self.drop(old, "replaced: the peer sent INITIAL_CONTACT")
        elif isinstance(ev, IkeSaFailed):
            self.mismatch(p.peer, ev.offers, now)
            why = with_offers(ev.reason, ev.offers)
            dead = ev.unanswered and p.ike is not None
            if dead:
                log.warning("peer %s stopped answering its IKE SA: %s", p.peer, ev.reason)
            elif p.ike is None and not handle.sa.is_initiator:
                # a request that failed at once (a proposal we refuse, a bad body): a
                # spoofed flood of them must not become a line each
                msg = "IKE SA with %s failed: %s"
                log_limited(self._early_failures, now, logging.WARNING, msg, p.peer, why)
            elif p.ike is None:
                # our attempt: the OE manager's decision line says what became of the
                # flow ("clear for 15m, IKE refused (...)"), at the level that deserves
                log.info("IKE SA with %s failed: %s", p.peer, why)
            else:
                log.warning("IKE SA with %s failed: %s", p.peer, why)
            p.error = ev.reason
            p.notify = ev.notify
            p.offers = ev.offers
            self.drop(p, ev.reason, dead=dead)
        elif isinstance(ev, IkeSaDeleted):
            log.info("IKE SA with %s deleted: %s", p.peer, ev.reason)
            self.drop(p, ev.reason)
