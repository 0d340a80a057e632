"""The asyncio edge of IKE: SPI demultiplexing, NAT-T, liveness, the SA table.

Why a thin layer: every protocol decision lives in the sans-IO ``IkeSa``; this
module only moves datagrams between sockets and SAs and does what RFC 7296 §2.23 /
RFC 3948 leave to the transport. Its collaborators each own one concern:
``sockets.IkeSockets`` the UDP 500/4500 pairs (datapath ``SocketHooks``, batched
reads, ICMP reports), ``deadlines.Deadlines`` the one timer the loop needs (the
earliest of all SA deadlines, read from the injected clock), and
``admission.ResponderAdmission`` who may open a half-open IKE SA (COOKIEs, RFC 8019).

* port 4500 carries IKE behind a 4-byte non-ESP marker; a lone 0xFF byte is a
  NAT keepalive; anything else there is ESP the kernel did not take;
* an initiator that detects a NAT in IKE_SA_INIT floats to 4500 before IKE_AUTH,
  and the side behind the NAT sends keepalives so its mapping stays open;
* a responder answers every request from the socket it came in on, to the
  address and port it came from;
* with ``dpd_delay``, an established IKE SA the peer stayed quiet on that long
  gets a liveness check (empty INFORMATIONAL); no answer fails the SA;
* an ICMP destination unreachable that quotes our own IKE_SA_INIT/IKE_AUTH (our
  SPI, sent to that peer's address and port) fails that not yet established IKE SA
  at once. Most hosts without IKE answer UDP 500 that way; without this an OE
  negotiation waited out every retransmission while the kernel dropped the
  triggering flow's packets.

Fragments (RFC 7383): each IKE SA bounds what it holds of a peer's incomplete fragmented
messages; the endpoint keeps the sum over all of them under ``max_total_bytes`` (the
biggest holder gives its messages up first), counts what was dropped and logs it at
most once per ``log_interval`` (``fragments.FragmentBudget``).

A new IKE_SA_INIT request takes the cheapest path there is (``admission``), checked
from the fixed header before anything else, and nothing on it logs per packet.
IKE SAs are found by their SPI pair (``IkeSa.spis()``, which follows IKE SA
rekeys); a response to our IKE_SA_INIT by our initiator SPI.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import socket
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

from oe_router.records import record

from .admission import ResponderAdmission
from .constants import ExchangeType, HeaderFlag
from .cookies import ResponderLimits, is_new_init_request
from .counters import EndpointCounters
from .deadlines import Deadlines
from .errors import IkeDecodeError, IkeError
from .events import Event, IkeSaDeleted, IkeSaEstablished, IkeSaFailed, IkeSaRekeyed
from .fragments import DEFAULT_FRAGMENT_LIMITS, FragmentBudget, FragmentLimits
from .payloads import IkeHeader
from .sa import IkeSa, IkeSaConfig
from .sockets import NON_ESP_MARKER, Address, IkeSockets, SocketHooks, SockExtendedErr
from .states import IkeState
from .wire import Reader

__all__ = [
    "NON_ESP_MARKER",
    "Address",
    "EndpointCounters",
    "EventListener",
    "IkeEndpoint",
    "ResponderPolicy",
    "SaHandle",
]

log = logging.getLogger("oe_router.ike")

NAT_KEEPALIVE = b"\xff"
_IKE_HEADER_LEN = 28


class ResponderPolicy(Protocol):
    """Decides whether to answer an IKE_SA_INIT from ``remote`` on ``local``.

    Returns the IKE SA configuration to respond with (identities, keys,
    selectors: containment lives there), or None to ignore the request.
    """

    def __call__(self, local: Address, remote: Address, /) -> IkeSaConfig | None: ...


class EventListener(Protocol):
    """Receives every event of every IKE SA, with the handle it came from."""

    def __call__(self, handle: SaHandle, event: Event, /) -> None: ...


@record(eq=False, slots=True)
class SaHandle:
    """One IKE SA as the endpoint sees it: where its datagrams go and when.

    ``remote`` is where our requests go (it follows NAT-T floating and a NATed
    peer's mapping); ``natt`` says whether we talk from our 4500 socket.
    """

    sa: IkeSa
    local: Address
    remote: Address
    remote_natt_port: int
    created: float
    natt: bool = False
    established_at: float | None = None
    keepalive_at: float | None = None
    last_rx: float = 0.0  #: when the peer last sent us anything (liveness)
    half_open: bool = False
    original_initiator: bool = True  #: we sent the first IKE_SA_INIT (roles flip on rekeys)
    owner: Any = None  #: free for the IKE manager's bookkeeping
    #: indexed SPI pairs (a tuple: 56 bytes for one pair where a set takes 216)
    pairs: tuple[tuple[bytes, bytes], ...] = ()
    known_as: str | None = None  #: counted as a peer holding an IKE SA (RFC 8019 preference)


class IkeEndpoint:
    """Owns the IKE sockets on ``addresses`` and every IKE SA that uses them."""

    def __init__(
        self,
        addresses: Iterable[str],
        *,
        on_event: EventListener,
        responder_policy: ResponderPolicy | None = None,
        clock: Callable[[], float],
        ike_port: int = 500,
        natt_port: int = 4500,
        half_open_limit: int = 64,
        cookie_threshold: int = 10,
        half_open_per_source: int | None = None,
        half_open_per_prefix: int | None = None,
        half_open_timeout: float = 30.0,
        keepalive_interval: float = 20.0,
        dpd_delay: float = 0.0,
        netns: str | None = None,
        random: Callable[[int], bytes] = os.urandom,
        socket_hooks: Sequence[SocketHooks] = (),
        fragment_limits: FragmentLimits = DEFAULT_FRAGMENT_LIMITS,
    ) -> None:
        self.addresses = tuple(str(ipaddress.ip_address(a)) for a in addresses)
        if not self.addresses:
            raise ValueError("the IKE endpoint needs at least one local address")
        self._on_event = on_event
        self._policy = responder_policy
        self._clock = clock
        self._cookie_threshold = cookie_threshold
        self.half_open_timeout = half_open_timeout
        self.keepalive_interval = keepalive_interval
        self.dpd_delay = dpd_delay
        self._random = random
        self.counters = EndpointCounters()
        self._sockets = IkeSockets(
            self.addresses,
            ike_port=ike_port,
            natt_port=natt_port,
            netns=netns,
            hooks=socket_hooks,
            counters=self.counters,
            on_datagram=self._datagram,
            on_icmp=self._icmp_error,
        )
        self._admission: ResponderAdmission[SaHandle] = ResponderAdmission(
            self._limits(half_open_limit, half_open_per_source, half_open_per_prefix),
            self.counters,
            random,
        )
        self._deadlines: Deadlines[SaHandle] = Deadlines(clock, self.tick)
        self._by_pair: dict[tuple[bytes, bytes], SaHandle] = {}  # (SPIi, SPIr) -> SA
        self._by_ispi: dict[bytes, SaHandle] = {}  # SPIi of IKE SAs we initiated
        self._half_open: dict[tuple[bytes, Address], SaHandle] = {}  # (SPIi, peer) -> SA
        self._handles: dict[SaHandle, None] = {}  # insertion-ordered set
        self._peers: dict[str, int] = {}  # address -> established IKE SAs with it
        #: one (address, port) tuple per socket, which every SA on it shares (not ~128 B
        #: of tuple and string per IKE SA: docs/footprint.md)
        self._locals: dict[Address, Address] = {}
        #: bytes of incomplete fragmented messages held by all SAs (``held``), and their limit
        self.fragments: FragmentBudget[SaHandle] = FragmentBudget(fragment_limits)

    @property
    def ike_port(self) -> int:
        """Our IKE port (the kernel's choice once started, when 0 was asked for)."""
        return self._sockets.ike_port

    @property
    def natt_port(self) -> int:
        return self._sockets.natt_port

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Bind every address's 500/4500 pair; an address in use is a clear error."""
        loop = asyncio.get_running_loop()
        self._deadlines.start(loop)
        try:
            self._sockets.open(loop)
        except IkeError:
            await self.stop()
            raise

    async def stop(self) -> None:
        self._deadlines.stop()
        self._sockets.close()

    def sockets(self, ip: str | None = None) -> tuple[socket.socket, socket.socket]:
        """The (IKE, NAT-T) sockets of ``ip`` (default: the first address), for inspection."""
        return self._sockets.pair(ip)

    def bound(self, ip: str | None = None) -> tuple[Address, Address]:
        """(IKE, NAT-T) addresses actually bound for ``ip`` (default: the first)."""
        ike, natt = self._sockets.pair(ip)
        a, b = ike.getsockname(), natt.getsockname()
        return (a[0], a[1]), (b[0], b[1])

    # ------------------------------------------------------------------ SAs
    def handles(self) -> list[SaHandle]:
        return list(self._handles)

    def half_open_count(self) -> int:
        return len(self._half_open)

    @property
    def limits(self) -> ResponderLimits:
        """Who may hold a half-open IKE SA. Assigning new limits applies them from the next
        IKE_SA_INIT request on; half-open SAs already held finish or time out."""
        return self._admission.book.limits

    @limits.setter
    def limits(self, limits: ResponderLimits) -> None:
        self._admission.book.limits = limits

    def _limits(
        self, half_open_limit: int, per_source: int | None, per_prefix: int | None
    ) -> ResponderLimits:
        threshold = min(self._cookie_threshold, half_open_limit)
        return ResponderLimits(threshold, half_open_limit, per_source, per_prefix)

    def configure(
        self,
        *,
        half_open_limit: int,
        half_open_per_source: int | None,
        half_open_per_prefix: int | None,
        dpd_delay: float,
    ) -> None:
        """Apply a reloaded config: the half-open limits govern the next IKE_SA_INIT
        request, and every established IKE SA's next liveness check moves with the delay."""
        self.limits = self._limits(half_open_limit, half_open_per_source, half_open_per_prefix)
        self.dpd_delay = dpd_delay
        for h in self._handles:
            self._reschedule(h)
        self._deadlines.arm()

    def load_status(self) -> dict[str, object]:
        """The half-open table and its limits, for ``oe status`` (gauges, not counters)."""
        return {**self._admission.status(self._clock()), "peers_with_sa": len(self._peers)}

    def initiate(
        self, config: IkeSaConfig, *, remote_natt_port: int = 4500, via: str | None = None
    ) -> SaHandle:
        """Start an IKE SA as initiator from ``config.local_address`` (or the socket of
        ``via``, when the address IKE hashes differs from the bound one); returns its handle."""
        ip = str(ipaddress.ip_address(via or config.local_address[0]))
        if ip not in self._sockets:
            have = ", ".join(self._sockets.names())
            raise IkeError(f"local address {ip} has no IKE socket (have {have})")
        now = self._clock()
        sa = IkeSa.initiator(config, now, self._random)
        local = self._local((ip, self.ike_port))
        h = SaHandle(sa, local, config.remote_address, remote_natt_port, now)
        self._handles[h] = None
        self._by_ispi[sa.spi_i] = h
        self._after(h)
        return h

    def _local(self, address: Address) -> Address:
        """The shared tuple for one of our socket addresses."""
        return self._locals.setdefault(address, address)

    def flush(self, handle: SaHandle) -> None:
        """Send what ``handle.sa`` queued and deliver its events (after calling its methods)."""
        self._after(handle)

    def forget(self, handle: SaHandle) -> None:
        """Drop an IKE SA without telling the peer (it lost its state: INITIAL_CONTACT)."""
        self._forget(handle)

    def delete(self, handle: SaHandle) -> None:
        """Delete an IKE SA with its peer; a half-open or failed one is just forgotten."""
        if handle.sa.state == IkeState.ESTABLISHED:
            handle.sa.delete(self._clock())
            self._after(handle)
        else:
            self._forget(handle)

    # ------------------------------------------------------------------ receive
    def _datagram(self, local_ip: str, natt: bool, data: bytes, remote: Address) -> None:
        c = self.counters
        c.received += 1
        if natt:
            if data == NAT_KEEPALIVE:
                c.keepalives_in += 1
                return
            if data[:4] != NON_ESP_MARKER:
                c.esp_dropped += 1  # ESP the kernel did not decapsulate (no ESP here)
                return
            data = data[4:]
        if is_new_init_request(data):
            self._init_request(local_ip, natt, data, remote)
            return
        if len(data) < _IKE_HEADER_LEN:
            c.malformed += 1
            return
        try:
            hdr = IkeHeader.read(Reader(data[:_IKE_HEADER_LEN]))
        except IkeDecodeError:
            c.malformed += 1
            return
        if hdr.version >> 4 != 2:
            c.malformed += 1
            return
        from_initiator = bool(hdr.flags & HeaderFlag.INITIATOR)
        is_response = bool(hdr.flags & HeaderFlag.RESPONSE)
        now = self._clock()
        h = self._by_pair.get((hdr.spi_i, hdr.spi_r))
        if (
            h is None
            and hdr.exchange_type == ExchangeType.IKE_SA_INIT
            and is_response
            and not from_initiator
        ):
            h = self._by_ispi.get(hdr.spi_i)  # answer to our IKE_SA_INIT
        if h is None:
            c.unknown_spi += 1
            return
        self._feed(h, natt, data, remote, now, is_response)

    def _feed(
        self, h: SaHandle, natt: bool, data: bytes, remote: Address, now: float, is_response: bool
    ) -> None:
        before = (h.sa.get_timer(), h.sa.state, h.sa.spi_r)
        h.sa.receive_datagram(data, now, remote)
        self._after(h, reply_to=None if is_response else remote, heard=(natt, remote, before))

    def _init_request(self, local_ip: str, natt: bool, data: bytes, remote: Address) -> None:
        """A new IKE_SA_INIT request, or a retransmission of one a half-open SA answers.
        A flood takes this path: nothing here decodes more than ``CookieGate`` reads, and
        nothing logs per packet."""
        now = self._clock()
        h = self._half_open.get((data[:8], remote))
        if h is None:
            h = self._new_responder(local_ip, natt, data, remote, now)
            if h is None:
                return
        self._feed(h, natt, data, remote, now, False)

    def _icmp_error(self, natt: bool, quoted: bytes, dest: Address, ee: SockExtendedErr) -> None:
        """An ICMP report about a datagram we sent to ``dest`` (``quoted``: its UDP payload,
        as much as the ICMP message carried). Only a definite destination unreachable (port,
        protocol, prohibited: ``SockExtendedErr.definite``) that quotes an IKE SA we
        initiated and that is not established yet, sent to where that SA sends, fails it:
        ICMP is unauthenticated, and matching our random SPI means the sender saw our
        request (an on-path party, who could drop IKE anyway). Network and host unreachable
        are counted and left to the retransmissions (a next hop not resolved yet)."""
        if not ee.unreachable:
            return
        if not ee.definite:
            self.counters.unreachable_soft += 1
            log.debug("IKE to %s: %s: retransmitting", dest[0], ee.describe())
            return
        if natt:
            if quoted[:4] != NON_ESP_MARKER:
                return  # ESP or a keepalive: not ours to judge
            quoted = quoted[4:]
        if len(quoted) < 8:
            return  # the ICMP quoted too little to name an SA: retransmissions decide
        h = self._by_ispi.get(quoted[:8])
        if (
            h is None
            or h.established_at is not None
            or (ipaddress.ip_address(h.remote[0]), h.remote[1])
            != (ipaddress.ip_address(dest[0]), dest[1])
            or not h.sa.half_open
        ):
            return
        reason = f"{ee.describe()} from {dest[0]} for IKE on UDP {dest[1]}"
        log.info("IKE SA with %s: %s; giving up at once", dest[0], reason)
        self.counters.unreachable += 1
        h.sa.abort(reason)
        self._after(h)

    def _new_responder(
        self, local_ip: str, natt: bool, data: bytes, remote: Address, now: float
    ) -> SaHandle | None:
        """COOKIE when demanded, then the half-open rules, then the responder policy."""
        c, ip = self.counters, remote[0]
        if self._policy is None:
            c.refused += 1
            return None

        def demand(reply: bytes | bytearray) -> None:
            self._sockets.send(local_ip, natt, reply, remote)

        admitted = self._admission.admit(data, ip, now, ip in self._peers, demand)
        if admitted is None:
            return None
        local = self._local((local_ip, self.natt_port if natt else self.ike_port))
        config = self._policy(local, remote)
        if config is None:
            # Silence, as libreswan does for a peer in its clear group: an answer such as
            # NO_PROPOSAL_CHOSEN makes pluto retry, while a timeout installs its failure
            # shunt (pass for private-or-clear), which is the fallback both sides want.
            c.refused += 1
            return None
        if admitted.victim is not None:
            self._forget(admitted.victim)
        sa = IkeSa.responder(config, self._random)
        h = SaHandle(
            sa, local, remote, remote[1], now, natt=natt, half_open=True, original_initiator=False
        )
        self._handles[h] = None
        self._half_open[(data[:8], remote)] = h
        self._admission.hold(h, ip, admitted, now)
        return h

    # ------------------------------------------------------------------ events
    def _after(
        self,
        h: SaHandle,
        reply_to: Address | None = None,
        heard: tuple[bool, Address, tuple[object, ...]] | None = None,
    ) -> None:
        """Float if IKE_SA_INIT found a NAT, send, index SPIs, deliver events, re-arm timer.

        ``heard`` (socket was NAT-T, source, SA state before) marks a datagram just fed:
        only one the SA accepted (it answered, reported, or changed state) may move
        the peer's address or port; a forged or replayed packet must not.
        """
        sa = h.sa
        out = sa.datagrams_to_send()
        events: list[Event] = []
        while (e := sa.next_event()) is not None:
            events.append(e)
        if heard is not None:
            natt, source, before = heard
            if out or events or before != (sa.get_timer(), sa.state, sa.spi_r):
                h.last_rx = self._clock()
                if natt and not h.natt:
                    self.counters.floated += 1
                    h.natt = True  # the peer floated (RFC 7296 §2.23): follow it
                if not h.original_initiator and reply_to is not None:
                    h.remote = source  # a NATed initiator's mapping may change
        if (
            sa.is_initiator
            and not h.natt
            and sa.state == IkeState.AUTH_SENT
            and any(sa.nat_detected)
        ):
            h.natt = True
            h.remote = (h.remote[0], h.remote_natt_port)
            self.counters.floated += 1
            log.info("IKE SA with %s: NAT detected, floating to port 4500", h.remote[0])
        out += sa.datagrams_to_send()
        for d in out:
            self._sockets.send(h.local[0], h.natt, d, reply_to or h.remote)
        self._index(h)
        for ev in events:
            if isinstance(ev, IkeSaEstablished):
                h.established_at = self._clock()
                self._close_half_open(h)
                self._count_peer(h, True)
                if ev.nat_local:
                    h.keepalive_at = h.established_at + self.keepalive_interval
            if isinstance(ev, IkeSaRekeyed):
                self._index(h)
            self._on_event(h, ev)
            if isinstance(ev, IkeSaFailed | IkeSaDeleted):
                self._forget(h)
        self._fragments(h)
        self._reschedule(h)
        self._deadlines.arm()

    # ------------------------------------------------------------------ fragments
    def _fragments(self, h: SaHandle) -> None:
        """Count what ``h`` dropped of its peer's fragments; take bytes back from the
        biggest holders while all SAs together hold more than ``max_total_bytes``."""
        self.fragments.hold(h, h.sa.fragment_bytes if h in self._handles else 0)
        self._count_fragments(h)
        while (victim := self.fragments.victim()) is not None:
            limit = self.fragments.limits.max_total_bytes
            victim.sa.drop_fragments(f"over {limit} bytes held for all IKE SAs")
            self.fragments.hold(victim, 0)
            self._count_fragments(victim)
            self._reschedule(victim)

    def _count_fragments(self, h: SaHandle) -> None:
        stats = h.sa.take_fragment_stats()
        self.counters.fragments_dropped += stats.dropped
        self.counters.fragment_messages_abandoned += stats.abandoned
        due = self.fragments.report(stats, self._clock())
        if due is not None:
            log.warning(
                "IKE fragments from %s: %d dropped, %d incomplete messages abandoned since "
                "the last report (latest: %s); %d bytes held now",
                h.remote[0], due.dropped, due.abandoned, due.reason, self.fragments.held,
            )  # fmt: skip

    def _index(self, h: SaHandle) -> None:
        """Point every SPI pair the SA answers for at ``h``; drop pairs it no longer has."""
        if h.sa.state.over:
            return
        pairs = {p for p in h.sa.spis() if p[1] != bytes(8)}
        if pairs == set(h.pairs):
            return
        for k in h.pairs:
            if k not in pairs and self._by_pair.get(k) is h:
                del self._by_pair[k]
        for p in pairs:
            self._by_pair[p] = h
        h.pairs = tuple(pairs)

    def _close_half_open(self, h: SaHandle) -> None:
        if h.half_open:
            h.half_open = False
            self._admission.book.remove(h)
            for k, v in list(self._half_open.items()):
                if v is h:
                    del self._half_open[k]

    def _count_peer(self, h: SaHandle, established: bool) -> None:
        """Keep ``_peers``: the addresses holding an established IKE SA with us."""
        if established and h.known_as is None:
            h.known_as = h.remote[0]
            self._peers[h.known_as] = self._peers.get(h.known_as, 0) + 1
        elif not established and h.known_as is not None:
            left = self._peers.pop(h.known_as) - 1
            if left:
                self._peers[h.known_as] = left
            h.known_as = None

    def _forget(self, h: SaHandle) -> None:
        self._close_half_open(h)
        self._count_peer(h, False)
        self.fragments.hold(h, 0)
        for k in h.pairs:
            if self._by_pair.get(k) is h:
                del self._by_pair[k]
        for spi in [k for k, v in self._by_ispi.items() if v is h]:
            del self._by_ispi[spi]
        self._handles.pop(h, None)
        self._deadlines.set(h, None)

    # ------------------------------------------------------------------ timers
    def _deadline(self, h: SaHandle) -> float | None:
        times = [t for t in (h.sa.get_timer(), h.keepalive_at) if t is not None]
        if self.dpd_delay > 0 and h.established_at is not None:
            times.append(max(h.last_rx, h.established_at) + self.dpd_delay)
        if h.half_open:
            times.append(h.created + self.half_open_timeout)
        return min(times) if times else None

    def _reschedule(self, h: SaHandle) -> None:
        self._deadlines.set(h, self._deadline(h) if h in self._handles else None)

    def next_deadline(self) -> float | None:
        return self._deadlines.next()

    def tick(self, now: float) -> None:
        """Run every deadline due at ``now``: retransmits, keepalives, half-open expiry."""
        for h in self._deadlines.pop_due(now):
            if h not in self._handles:
                continue
            if h.half_open and now >= h.created + self.half_open_timeout:
                log.debug("IKE: half-open SA from %s timed out", h.remote[0])
                self.counters.half_open_expired += 1
                self._forget(h)
                continue
            t = h.sa.get_timer()
            if t is not None and now >= t:
                h.sa.handle_timer(now)
                self._after(h)
            if (
                self.dpd_delay > 0
                and h.established_at is not None
                and now >= max(h.last_rx, h.established_at) + self.dpd_delay
                and h.sa.state == IkeState.ESTABLISHED
            ):
                h.last_rx = now  # one check per quiet period; no answer fails the SA
                with contextlib.suppress(IkeError):  # a request in flight checks already
                    h.sa.send_liveness_check(now)
                    self._after(h)
            if h.keepalive_at is not None and now >= h.keepalive_at and h.natt:
                self._sockets.send(h.local[0], True, NAT_KEEPALIVE, h.remote, raw=True)
                self.counters.keepalives_out += 1
                h.keepalive_at = now + self.keepalive_interval
            self._reschedule(h)
        self._deadlines.arm()
