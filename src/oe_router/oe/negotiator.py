"""The OE manager's ``Negotiator`` over the IKE service, and the IKE service's Child SA sink.

Why one adapter for both directions: there must be exactly ONE place where Child SAs
reach the kernel, and that is the OE manager (it checks containment, supersedes old
SAs and drops shunts). So the IKE service never installs anything itself:

- Child SAs we asked for (``negotiate``) are handed back to the manager as complete
  ``ChildSaSpec``s, which it installs;
- every other Child SA the IKE service reports (a peer initiated, ``oe up`` from the
  CLI, a rekey the IKE core did on its own timer) goes to ``adopt_inbound``, which
  runs the same containment check and installs it;
- Child SAs the IKE side lost (the peer's DELETE, an IKE SA deleted or failed) go to
  ``peer_deleted``;
- a peer that stopped answering its established IKE SA (liveness check or any other
  request unanswered through every retransmission) goes to ``liveness_failed`` instead,
  once per peer, so the manager falls back per group. The IKE SA is already gone on the
  IKE side then: nothing here sends it a DELETE.

Identity: NULL auth (RFC 7619) towards peers without a key. Towards a peer with a
DNSSEC key we sign with our own key when ``identity.local_id`` names one (an FQDN
whose IPSECKEY we publish, as strongSwan needs), else we stay anonymous (NULL) and
only the peer signs (the "@anonymous" design). A peer that refuses our choice with
AUTHENTICATION_FAILED gets exactly one more try with the other one (libreswan's OE
responders take only NULL from initiators), and the choice that worked is remembered
per peer.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Protocol

from oe_router.datapath.base import ChildSaSpec, IPAddress
from oe_router.ike.constants import NotifyType, notify_name
from oe_router.ike.errors import IkeError
from oe_router.ike.events import ChildSaDeleted, ChildSaEstablished, ChildSaRekeyed
from oe_router.ike.service import (
    AuthChoice,
    IkeService,
    IkeUpError,
    PeerSa,
    host_selector,
)
from oe_router.ike.states import IkeState
from oe_router.ike.status_view import offers_status
from oe_router.oe.actions import ChildRequest, NegotiationResult
from oe_router.oe.sa_spec import child_sa_spec

__all__ = ["IkeNegotiator", "InboundHandler", "cat_result", "failure_summary"]

log = logging.getLogger("oe_router.oe")


class InboundHandler(Protocol):
    """The OE service's entries for Child SAs it did not ask for (``OeService``)."""

    def adopt_inbound(self, peer: IPAddress, spec: ChildSaSpec) -> Awaitable[None]: ...

    def peer_deleted(self, peer: IPAddress, spis: Iterable[int] | None) -> Awaitable[None]: ...

    def liveness_failed(self, peer: IPAddress) -> Awaitable[None]: ...


def _keys_equal(a: Any, b: Any) -> bool:
    if a is None or b is None:
        return a is b
    try:
        return bool(a.public_numbers() == b.public_numbers())
    except AttributeError:  # Ed25519 has no numbers: compare the raw bytes
        from cryptography.hazmat.primitives import serialization

        raw = serialization.Encoding.Raw, serialization.PublicFormat.Raw
        return bool(a.public_bytes(*raw) == b.public_bytes(*raw))


def cat_result(spec: ChildSaSpec, ev: ChildSaEstablished) -> NegotiationResult:
    """The result of a first Child SA, with the inner address when the peer gave us one
    and narrowed our side to it (CAT); the IKE core already refused any other narrowing."""
    local = [ts.net for ts in spec.local_ts]
    for a in ev.internal_addresses:
        if a.version == spec.remote.version and local == [ipaddress.ip_network(a)]:
            return NegotiationResult(spec, inner=a)
    return NegotiationResult(spec)


class IkeNegotiator:
    """``oe.actions.Negotiator`` on ``IkeService``, and the service's ``ChildSaSink``.

    Construct, set ``ike.sink = negotiator`` (done here) and ``inbound`` to the OE
    service before traffic flows. Sink callbacks are synchronous (they run inside the
    endpoint's datagram handler); their work is queued and done in order by one task,
    so a rekey's new SA is adopted before the old one's DELETE is processed.
    """

    def __init__(
        self, ike: IkeService, inbound: InboundHandler | None = None, *, cat: bool = True
    ) -> None:
        self.ike = ike
        self.inbound = inbound
        #: CAT: a new IKE SA asks the peer for an inner address (see ``_first_child``)
        self.cat = cat
        self._no_pool: set[str] = set()  # peers that refused the Child SA we asked CP with
        ike.sink = self
        self._want_first: dict[str, int] = {}  # peer address -> negotiations awaiting IKE_AUTH
        self._firsts: dict[int, ChildSaEstablished] = {}  # id(PeerSa) -> first Child SA
        self._requests: set[tuple[int, int]] = set()  # (id(PeerSa), request id) of ours
        self._created: dict[tuple[int, int], ChildSaEstablished] = {}
        self._retiring: set[bytes] = set()  # inbound SPIs replaced by a rekey
        self._auth_ok: dict[str, AuthChoice] = {}  # peer -> our auth that worked
        self._queue: asyncio.Queue[Callable[[], Awaitable[None]]] | None = None
        self._worker: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ specs
    def spec_for(self, p: PeerSa, ev: ChildSaEstablished) -> ChildSaSpec:
        """The complete install request (keys, selectors, NAT-T ports) of ``ev``."""
        h = p.handle
        ep = self.ike.endpoint
        local_natt = ep.natt_port if ep is not None else 4500
        remote_natt = h.remote[1] if h.natt else h.remote_natt_port
        return child_sa_spec(
            ev, h.local[0], h.remote[0], local_natt_port=local_natt, remote_natt_port=remote_natt
        )

    # ------------------------------------------------------------------ Negotiator
    def _our_auth(self, request: ChildRequest) -> AuthChoice:
        peer = str(request.peer)
        if peer in self._auth_ok:
            return self._auth_ok[peer]
        if request.auth.null or self.ike.private_key is None:
            return "null"
        local_id = self.ike.config.identity.local_id
        return "null" if local_id == "%null" else "pubkey"

    async def negotiate(self, request: ChildRequest, now: float) -> NegotiationResult:
        """A Child SA for ``request``: on the peer's IKE SA if one is up, else a new one."""
        peer = str(request.peer)
        peer_key = request.auth.key  # None: NULL auth
        try:
            p = self.ike.find(peer)
            if (
                p is not None
                and p.state == IkeState.ESTABLISHED
                and (peer_key is None or _keys_equal(p.peer_key, peer_key))
            ):
                return await self._create_child(p, request)
            auth = self._our_auth(request)
            try:
                ev, p = await self._first_child(peer, auth, peer_key)
            except IkeUpError as exc:
                other: AuthChoice = "null" if auth == "pubkey" else "pubkey"
                can_other = other == "null" or (
                    self.ike.private_key is not None
                    and self.ike.config.identity.local_id != "%null"
                    and peer_key is not None
                )
                if exc.notify != NotifyType.AUTHENTICATION_FAILED or not can_other:
                    raise
                log.info("peer %s refused our %s auth: trying %s", peer, auth, other)
                ev, p = await self._first_child(peer, other, peer_key)
                auth = other
            self._auth_ok[peer] = auth
            return cat_result(self.spec_for(p, ev), ev)
        except (IkeUpError, IkeError) as exc:
            m = getattr(exc, "offers", None)
            offers = None if m is None else offers_status(m)
            summary = failure_summary(exc, peer)
            return NegotiationResult(None, str(exc), summary=summary, offers=offers)

    async def _first_child(
        self, peer: str, auth: AuthChoice, peer_key: Any
    ) -> tuple[ChildSaEstablished, PeerSa]:
        self._want_first[peer] = self._want_first.get(peer, 0) + 1
        try:
            inner = self.cat and peer not in self._no_pool
            p = await self.ike.up(peer, auth, peer_key, inner=inner)
        except IkeUpError as exc:
            # CAT asked for an inner address: a peer without an address pool may refuse
            # the first Child SA (strongSwan: INTERNAL_ADDRESS_FAILURE) yet keep the IKE
            # SA. Then one more Child SA, host-to-host, on that IKE SA; and no more CP
            # requests to this peer.
            p_up = self.ike.find(peer)
            if not inner or p_up is None or p_up.state != IkeState.ESTABLISHED or p_up.children:
                raise
            log.info("%s; host-to-host Child SA instead, no CAT", exc)
            self._no_pool.add(peer)
            p = p_up
        finally:
            self._want_first[peer] -= 1
            if not self._want_first[peer]:
                del self._want_first[peer]
        ev = self._firsts.pop(id(p), None)
        if ev is None:  # the IKE SA was up already (another negotiation): one more Child SA
            local = host_selector(p.handle.local[0])
            remote = host_selector(p.peer)
            ev = await self._create(p, (local,), (remote,))
        return ev, p

    async def _create_child(self, p: PeerSa, request: ChildRequest) -> NegotiationResult:
        local = host_selector(str(request.local))
        remote = host_selector(str(request.peer))
        return NegotiationResult(self.spec_for(p, await self._create(p, (local,), (remote,))))

    async def _create(self, p: PeerSa, local: tuple[Any, ...], remote: tuple[Any, ...]) -> Any:
        """CREATE_CHILD_SA on ``p``; the IKE service settles ``p.pending[rid]``."""
        ep = self.ike.endpoint
        if ep is None:
            raise IkeError("the IKE service is not running")
        rid = p.handle.sa.create_child(local, remote, False, self.ike._clock())
        key = (id(p), rid)
        self._requests.add(key)
        fut: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        p.pending[rid] = fut
        ep.flush(p.handle)
        try:
            async with asyncio.timeout(self.ike.up_timeout):
                error = await asyncio.shield(fut)
        except TimeoutError:
            raise IkeUpError(
                f"peer {p.peer}: no Child SA after {self.ike.up_timeout:.0f}s"
            ) from None
        finally:
            p.pending.pop(rid, None)
            self._requests.discard(key)
        ev = self._created.pop(key, None)
        offers = p.child_offers.pop(rid, None)
        if error is not None or ev is None:
            raise IkeUpError(f"peer {p.peer}: {error or 'Child SA gone'}", None, offers)
        return ev

    async def rekey(self, peer: IPAddress, child: ChildSaSpec, now: float) -> NegotiationResult:
        """The IKE core rekeys Child SAs on its own timers (ChildSaRekeyed -> adopt)."""
        return NegotiationResult(None, "the IKE engine rekeys its Child SAs itself")

    async def delete(self, peer: IPAddress, child: ChildSaSpec | None) -> None:
        addr = str(peer)
        if child is None:
            with contextlib.suppress(IkeUpError, IkeError):
                await self.ike.down(addr, timeout=1.0)
            return
        spi_in = child.inbound.spi.to_bytes(4, "big")
        if spi_in in self._retiring:
            return  # a rekey replaced it: the IKE core deletes it with the peer itself
        ep = self.ike.endpoint
        for p in list(self.ike.sas):
            if p.peer == addr and spi_in in p.children and ep is not None:
                with contextlib.suppress(IkeError):
                    p.handle.sa.delete_child(spi_in, self.ike._clock())
                    ep.flush(p.handle)
                return

    # ------------------------------------------------------------------ ChildSaSink
    def child_sa_established(self, peer: PeerSa, child: ChildSaEstablished) -> None:
        if isinstance(child, ChildSaRekeyed):
            self._retiring.add(child.old_spi_in)
        elif child.request_id is not None and (id(peer), child.request_id) in self._requests:
            self._created[(id(peer), child.request_id)] = child
            return
        elif (
            child.request_id is None
            and peer.handle.sa.is_initiator
            and self._want_first.get(peer.peer)
            and id(peer) not in self._firsts
        ):
            self._firsts[id(peer)] = child
            return
        spec = self.spec_for(peer, child)
        addr = ipaddress.ip_address(peer.peer)
        self._enqueue(lambda: self._adopt(addr, spec, peer))

    def child_sa_deleted(self, peer: PeerSa, child: ChildSaDeleted) -> None:
        addr = ipaddress.ip_address(peer.peer)
        spi_out = int.from_bytes(child.spi_out, "big")
        self._retiring.discard(child.spi_in)
        self._firsts.pop(id(peer), None)
        if self.inbound is not None:
            handler = self.inbound
            self._enqueue(lambda: handler.peer_deleted(addr, [spi_out]))

    def peer_dead(self, peer: PeerSa, children: tuple[ChildSaDeleted, ...]) -> None:
        """The IKE SA with ``peer`` died unanswered: the OE side's liveness fallback.

        If another established IKE SA with the same address is still alive (the peer
        restarted and came back first), only the dead SA's Child SAs go, as a DELETE."""
        addr = ipaddress.ip_address(peer.peer)
        for child in children:
            self._retiring.discard(child.spi_in)
        self._firsts.pop(id(peer), None)
        if self.inbound is None:
            return
        handler = self.inbound
        alive = any(
            o is not peer and o.peer == peer.peer and o.state == IkeState.ESTABLISHED
            for o in self.ike.sas
        )
        if alive:
            spis = [int.from_bytes(c.spi_out, "big") for c in children]
            if spis:
                self._enqueue(lambda: handler.peer_deleted(addr, spis))
            return
        self._enqueue(lambda: handler.liveness_failed(addr))

    async def _adopt(self, addr: IPAddress, spec: ChildSaSpec, peer: PeerSa) -> None:
        if self.inbound is None:
            log.warning("peer %s: Child SA up but no OE manager to install it", addr)
            return
        if peer not in self.ike.sas:
            # its IKE SA failed or went while this job waited (e.g. the initiator refused
            # our signature after our IKE_AUTH answer): installing it now would only
            # black-hole the peer's cleartext until the removal behind us runs
            log.info("peer %s: Child SA not installed, its IKE SA is gone", addr)
            return
        await self.inbound.adopt_inbound(addr, spec)

    def _enqueue(self, job: Callable[[], Awaitable[None]]) -> None:
        if self._queue is None:
            self._queue = asyncio.Queue()
        self._queue.put_nowait(job)
        if self._worker is None or self._worker.done():
            self._worker = asyncio.get_running_loop().create_task(self._work())

    async def _work(self) -> None:
        assert self._queue is not None
        while not self._queue.empty():
            job = self._queue.get_nowait()
            try:
                await job()
            except Exception as exc:  # one bad SA must not stop the others
                log.error("handling an IKE Child SA event failed: %s", exc)

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._worker
        self._worker = None
        self._queue = None


def failure_summary(exc: Exception, peer: str) -> str:
    """A failed negotiation in a few words for the decision line: ``IKE refused
    (NO_PROPOSAL_CHOSEN)`` when the peer said no, else the reason without the peer's
    address (the line starts with it). When no proposal matched, what each side offered
    follows (``: we offered ESP aes256gcm16-noesn-esn, ...; the peer did not say ...``)."""
    notify = getattr(exc, "notify", None)
    offers = getattr(exc, "offers", None)
    if notify:
        summary = f"IKE refused ({notify_name(notify)})"
    else:
        text = str(exc).removeprefix(f"peer {peer}: ").replace(f" from {peer} ", " ")
        summary = f"IKE: {text}"
    return summary if offers is None else f"{summary}: {offers.text()}"
