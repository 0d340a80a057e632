"""The asyncio edge of IKE: UDP 500 and 4500 sockets, SPI demultiplexing, timers, NAT-T.

Why a thin layer: every protocol decision lives in the sans-IO ``IkeSa``; this
module only moves datagrams between sockets and SAs, keeps the one timer the
loop needs (the earliest of all SA deadlines, read from the injected clock),
and does what RFC 7296 §2.23 / RFC 3948 leave to the transport:

* port 4500 carries IKE behind a 4-byte non-ESP marker; a lone 0xFF byte is a
  NAT keepalive; anything else there is ESP the kernel did not take;
* an initiator that detects a NAT in IKE_SA_INIT floats to 4500 before IKE_AUTH,
  and the side behind the NAT sends keepalives so its mapping stays open;
* a responder answers every request from the socket it came in on, to the
  address and port it came from;
* with ``dpd_delay``, an established IKE SA the peer stayed quiet on that long
  gets a liveness check (empty INFORMATIONAL); no answer fails the SA;
* the 4500 socket gets UDP_ENCAP_ESPINUDP and both sockets per-socket XFRM
  bypass policies, so OE trap policies never capture IKE itself. Where the
  kernel has no XFRM (a container, a test box) this is logged once and IKE runs;
* both sockets have IP_RECVERR/IPV6_RECVERR: an ICMP destination unreachable
  that quotes our own IKE_SA_INIT/IKE_AUTH (our SPI, sent to that peer's address
  and port) fails that not yet established IKE SA at once. Most hosts without
  IKE answer UDP 500 that way; without this an OE negotiation waited out every
  retransmission while the kernel dropped the triggering flow's packets.

Fragments (RFC 7383): each IKE SA bounds what it holds of a peer's incomplete fragmented
messages; the endpoint keeps the sum over all of them under ``max_total_bytes`` (the
biggest holder gives its messages up first), counts what was dropped and logs it at
most once per ``log_interval`` (``fragments.FragmentBudget``).

A new IKE_SA_INIT request takes the cheapest path there is, checked from the fixed
header before anything else: a responder holding ``cookie_threshold`` IKE SAs that have
not finished IKE_AUTH demands COOKIEs (RFC 7296 §2.6) with ``cookies.CookieGate``, which
reads payload headers only and answers from a template; who may then hold a half-open
IKE SA (per address, per prefix, known peers first, at most ``half_open_limit``) is
``halfopen.HalfOpenBook``'s rule (RFC 8019). Nothing on that path logs per packet: it
counts, and says so in one line at most every ``LOAD_REPORT_INTERVAL`` seconds.
IKE SAs are found by their SPI pair (``IkeSa.spis()``, which follows IKE SA
rekeys); a response to our IKE_SA_INIT by our initiator SPI.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import heapq
import ipaddress
import logging
import os
import socket
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any, Final, NamedTuple, Protocol

from oe_router.datapath.base import DatapathError
from oe_router.datapath.kernel import bypass_socket, enable_esp_in_udp
from oe_router.datapath.netns import in_netns
from oe_router.ratelimit import RateLimit

from .constants import ExchangeType, HeaderFlag
from .cookies import (
    DEMAND,
    DROP,
    CookieGate,
    CookieJar,
    ResponderLimits,
    is_new_init_request,
)
from .errors import IkeDecodeError, IkeError
from .events import Event, IkeSaDeleted, IkeSaEstablished, IkeSaFailed, IkeSaRekeyed
from .fragments import DEFAULT_FRAGMENT_LIMITS, FragmentBudget, FragmentLimits
from .halfopen import HalfOpenBook
from .payloads import IkeHeader
from .sa import IkeSa, IkeSaConfig
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
    "SocketHooks",
]

log = logging.getLogger("oe_router.ike")

Address = tuple[str, int]
NON_ESP_MARKER = b"\x00\x00\x00\x00"
NAT_KEEPALIVE = b"\xff"
_IKE_HEADER_LEN = 28
#: seconds between two "under load" summary lines (COOKIE demands, refusals)
LOAD_REPORT_INTERVAL: Final = 10.0
#: datagrams read from a socket per wake-up (``_Reader``)
READ_BATCH: Final = 64

# linux/in.h, linux/in6.h, linux/errqueue.h (socket exposes none of these)
_IP_RECVERR: Final = 11
_IPV6_RECVERR: Final = 25
_SO_EE_ORIGIN_ICMP: Final = 2
_SO_EE_ORIGIN_ICMP6: Final = 3
_ICMP_DEST_UNREACH: Final = 3  # ICMPv4 type; code 4 (fragmentation needed) is not "unreachable"
_ICMP_FRAG_NEEDED: Final = 4
_ICMPV6_DEST_UNREACH: Final = 1
# errors a pending ICMP report makes the next sendto() return instead of sending
_REPORTED_ERRNOS: Final = frozenset(
    {errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN, errno.EACCES}
)


_EE_WIRE: Final = struct.Struct("=IBBBBII")  # the fields of SockExtendedErr, in order


class SockExtendedErr(NamedTuple):
    """``struct sock_extended_err`` (linux/errqueue.h): the IP_RECVERR control message."""

    ee_errno: int
    ee_origin: int
    ee_type: int
    ee_code: int
    ee_pad: int
    ee_info: int
    ee_data: int

    @classmethod
    def parse(cls, raw: bytes) -> SockExtendedErr | None:
        if len(raw) < _EE_WIRE.size:
            return None
        return cls(*_EE_WIRE.unpack_from(raw))

    @property
    def unreachable(self) -> bool:
        """An ICMP/ICMPv6 destination unreachable (not "fragmentation needed")."""
        if self.ee_origin == _SO_EE_ORIGIN_ICMP:
            return self.ee_type == _ICMP_DEST_UNREACH and self.ee_code != _ICMP_FRAG_NEEDED
        return self.ee_origin == _SO_EE_ORIGIN_ICMP6 and self.ee_type == _ICMPV6_DEST_UNREACH

    def describe(self) -> str:
        fam = "ICMPv6" if self.ee_origin == _SO_EE_ORIGIN_ICMP6 else "ICMP"
        why = os.strerror(self.ee_errno)
        return f"{fam} unreachable (type {self.ee_type} code {self.ee_code}, {why})"


class ResponderPolicy(Protocol):
    """Decides whether to answer an IKE_SA_INIT from ``remote`` on ``local``.

    Returns the IKE SA configuration to respond with (identities, keys,
    selectors: containment lives there), or None to ignore the request.
    """

    def __call__(self, local: Address, remote: Address, /) -> IkeSaConfig | None: ...


class SocketHooks(Protocol):
    """What a datapath does to the IKE sockets (strongSwan's kernel_ipsec ``bypass_socket``
    and ``enable_udp_decap``), injected so the IKE layer never imports a datapath.

    ``before_bind`` runs on every new socket before ``bind`` (options that must precede
    it: SO_REUSEPORT, SO_MARK), ``after_bind`` once it is bound, ``closing`` before the
    sockets of ``ip`` close. ``natt`` marks the UDP 4500 socket.
    """

    def before_bind(self, sock: socket.socket, natt: bool) -> None: ...

    def after_bind(self, sock: socket.socket, natt: bool, ip: str) -> None: ...

    def closing(self, ip: str) -> None: ...


class EventListener(Protocol):
    """Receives every event of every IKE SA, with the handle it came from."""

    def __call__(self, handle: SaHandle, event: Event, /) -> None: ...


@dataclass(eq=False)
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
    pairs: set[tuple[bytes, bytes]] = field(default_factory=set)  #: indexed SPI pairs
    known_as: str | None = None  #: counted as a peer holding an IKE SA (RFC 8019 preference)


@dataclass
class EndpointCounters:
    """What the endpoint dropped and why; shown by ``oe status`` and asserted by tests."""

    received: int = 0
    sent: int = 0
    malformed: int = 0
    unknown_spi: int = 0
    esp_dropped: int = 0
    keepalives_in: int = 0
    keepalives_out: int = 0
    refused: int = 0
    half_open_dropped: int = 0  #: new IKE_SA_INIT requests refused: the three below
    half_open_refused_source: int = 0  #: its address held ``per_source`` half-open SAs
    half_open_refused_prefix: int = 0  #: its /24 or /64 held ``per_prefix``
    half_open_refused_global: int = 0  #: no slot free nor displaceable
    half_open_displaced: int = 0  #: half-open SAs dropped to make room (RFC 8019 preference)
    half_open_expired: int = 0  #: half-open SAs that never finished IKE_AUTH in time
    cookies_accepted: int = 0  #: requests that came back with a valid COOKIE
    cookies_sent: int = 0
    floated: int = 0
    icmp_errors: int = 0  #: ICMP reports read from the sockets' error queues
    unreachable: int = 0  #: IKE SAs failed at once by an ICMP unreachable quoting our request
    fragments_dropped: int = 0  #: RFC 7383 fragments refused (a limit, outside the window, forged)
    fragment_messages_abandoned: int = 0  #: fragmented messages given up incomplete


class _Reader:
    """Reads one IKE socket: up to ``READ_BATCH`` datagrams per wake-up, into one buffer.

    Why not asyncio's datagram transport: it runs an event-loop turn per datagram and
    allocates a 256 KiB buffer for each; that cost 15 µs a datagram here, several times
    what answering a COOKIE costs. Other work still runs between two batches.
    """

    def __init__(self, ep: IkeEndpoint, sock: socket.socket, local_ip: str, natt: bool) -> None:
        self.ep, self.sock, self.local_ip, self.natt = ep, sock, local_ip, natt
        self.buf = bytearray(65535)  # the largest UDP payload: nothing is truncated
        self.view = memoryview(self.buf)

    def __call__(self) -> None:
        sock, ep, view = self.sock, self.ep, self.view
        for _ in range(READ_BATCH):
            try:
                n, addr = sock.recvfrom_into(self.buf)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                # a reported error (IP_RECVERR) failed recvfrom(): read the reports behind it
                log.debug("IKE socket %s: %s", self.local_ip, exc)
                try:
                    ep._drain_errors(sock, self.local_ip, self.natt)
                except Exception:
                    log.exception("IKE: error handling an ICMP report on %s", self.local_ip)
                return
            try:
                ep._datagram(self.local_ip, self.natt, bytes(view[:n]), (addr[0], addr[1]))
            except Exception:  # one bad datagram must never kill the socket
                log.exception("IKE: error handling a datagram from %s", addr[0])


@dataclass
class _Sockets:
    ike: socket.socket
    natt: socket.socket
    readers: list[int] = field(default_factory=list)  # file descriptors the loop watches


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
        xfrm: bool = True,
        random: Callable[[int], bytes] = os.urandom,
        socket_hooks: SocketHooks | None = None,
        fragment_limits: FragmentLimits = DEFAULT_FRAGMENT_LIMITS,
    ) -> None:
        self.addresses = tuple(str(ipaddress.ip_address(a)) for a in addresses)
        if not self.addresses:
            raise ValueError("the IKE endpoint needs at least one local address")
        self._on_event = on_event
        self._policy = responder_policy
        self._clock = clock
        self.ike_port = ike_port
        self.natt_port = natt_port
        self._cookie_threshold = cookie_threshold
        self._book: HalfOpenBook[SaHandle] = HalfOpenBook(
            self._limits(half_open_limit, half_open_per_source, half_open_per_prefix)
        )
        self.half_open_timeout = half_open_timeout
        self.keepalive_interval = keepalive_interval
        self.dpd_delay = dpd_delay
        self._netns = netns
        self._xfrm = xfrm
        self._random = random
        self._hooks = socket_hooks
        self.counters = EndpointCounters()
        self.xfrm_note = "not started"
        self._socks: dict[str, _Sockets] = {}
        self._by_pair: dict[tuple[bytes, bytes], SaHandle] = {}  # (SPIi, SPIr) -> SA
        self._by_ispi: dict[bytes, SaHandle] = {}  # SPIi of IKE SAs we initiated
        self._half_open: dict[tuple[bytes, Address], SaHandle] = {}  # (SPIi, peer) -> SA
        self._handles: dict[SaHandle, None] = {}  # insertion-ordered set
        self._heap: list[tuple[float, int, SaHandle]] = []  # lazy: stale entries skipped
        self._due: dict[SaHandle, float] = {}  # each SA's current deadline
        self._seq = 0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._gate: CookieGate | None = None
        self._peers: dict[str, int] = {}  # address -> established IKE SAs with it
        self._load_log = RateLimit(LOAD_REPORT_INTERVAL)
        self._load_reported = EndpointCounters()
        #: bytes of incomplete fragmented messages held by all SAs (``held``), and their limit
        self.fragments: FragmentBudget[SaHandle] = FragmentBudget(fragment_limits)

    # ------------------------------------------------------------------ lifecycle
    def _make_socket(self, ip: str, port: int, natt: bool) -> socket.socket:
        family = socket.AF_INET6 if ":" in ip else socket.AF_INET
        with in_netns(self._netns):
            sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if self._hooks is not None:
                self._hooks.before_bind(sock, natt)
            sock.bind((ip, port))
            sock.setblocking(False)
            if self._xfrm:
                self._kernel_setup(sock, natt)
            if self._hooks is not None:
                self._hooks.after_bind(sock, natt, ip)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, _IPV6_RECVERR, 1)
            else:
                sock.setsockopt(socket.IPPROTO_IP, _IP_RECVERR, 1)
        except OSError:
            sock.close()
            raise
        return sock

    def _kernel_setup(self, sock: socket.socket, natt: bool) -> None:
        try:
            bypass_socket(sock)
            if natt:
                enable_esp_in_udp(sock)
        except DatapathError as exc:
            if self.xfrm_note != f"XFRM unavailable: {exc}":
                log.warning("IKE sockets run without kernel IPsec hooks: %s", exc)
            self.xfrm_note = f"XFRM unavailable: {exc}"
            self._xfrm = False

    async def start(self) -> None:
        """Bind every address's 500/4500 pair; an address in use is a clear error."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        if self._xfrm:
            self.xfrm_note = "bypass policies on, UDP_ENCAP_ESPINUDP on the NAT-T socket"
        else:
            self.xfrm_note = "XFRM hooks disabled by configuration"
        try:
            for ip in self.addresses:
                ike = self._make_socket(ip, self.ike_port, False)
                try:
                    natt = self._make_socket(ip, self.natt_port, True)
                except OSError:
                    ike.close()
                    raise
                socks = _Sockets(ike, natt)
                self._socks[ip] = socks
                for sock, is_natt in ((ike, False), (natt, True)):
                    loop.add_reader(sock.fileno(), _Reader(self, sock, ip, is_natt))
                    socks.readers.append(sock.fileno())
        except OSError as exc:
            await self.stop()
            raise IkeError(
                f"cannot open IKE sockets on {ip} ports {self.ike_port}/{self.natt_port}: "
                f"{exc.strerror or exc}"
            ) from None
        if self.ike_port == 0 or self.natt_port == 0:  # tests: learn the kernel's choice
            first = self._socks[self.addresses[0]]
            self.ike_port = first.ike.getsockname()[1]
            self.natt_port = first.natt.getsockname()[1]

    async def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for ip, socks in self._socks.items():
            if self._hooks is not None:
                with contextlib.suppress(Exception):  # a failing hook must not keep sockets
                    self._hooks.closing(ip)
            for fd in socks.readers:
                if self._loop is not None:
                    self._loop.remove_reader(fd)
            for s in (socks.ike, socks.natt):
                s.close()
        self._socks.clear()

    def sockets(self, ip: str | None = None) -> tuple[socket.socket, socket.socket]:
        """The (IKE, NAT-T) sockets of ``ip`` (default: the first address), for inspection."""
        socks = self._socks[ip or self.addresses[0]]
        return socks.ike, socks.natt

    def bound(self, ip: str | None = None) -> tuple[Address, Address]:
        """(IKE, NAT-T) addresses actually bound for ``ip`` (default: the first)."""
        socks = self._socks[ip or self.addresses[0]]
        a, b = socks.ike.getsockname(), socks.natt.getsockname()
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
        return self._book.limits

    @limits.setter
    def limits(self, limits: ResponderLimits) -> None:
        self._book.limits = limits

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
        self._arm()

    def load_status(self) -> dict[str, object]:
        """The half-open table and its limits, for ``oe status`` (gauges, not counters)."""
        lim = self._book.limits
        return {
            **self._book.summary(),
            "half_open_limit": lim.half_open_limit,
            "half_open_per_source": lim.per_source,
            "half_open_per_prefix": lim.per_prefix,
            "half_open_reserve": lim.reserve,
            "cookie_threshold": lim.cookie_threshold,
            "cookies_demanded": self._book.cookies_demanded(self._clock()),
            "peers_with_sa": len(self._peers),
        }

    def initiate(
        self, config: IkeSaConfig, *, remote_natt_port: int = 4500, via: str | None = None
    ) -> SaHandle:
        """Start an IKE SA as initiator from ``config.local_address`` (or the socket of
        ``via``, when the address IKE hashes differs from the bound one); returns its handle."""
        ip = str(ipaddress.ip_address(via or config.local_address[0]))
        if ip not in self._socks:
            raise IkeError(f"local address {ip} has no IKE socket (have {', '.join(self._socks)})")
        now = self._clock()
        sa = IkeSa.initiator(config, now, self._random)
        h = SaHandle(sa, (ip, self.ike_port), config.remote_address, remote_natt_port, now)
        self._handles[h] = None
        self._by_ispi[sa.spi_i] = h
        self._after(h)
        return h

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

    def _drain_errors(self, sock: socket.socket, local_ip: str, natt: bool) -> None:
        """Read every report queued on ``sock`` (IP_RECVERR) and act on unreachables."""
        while True:
            try:
                data, anc, _flags, dest = sock.recvmsg(2048, 1024, socket.MSG_ERRQUEUE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.debug("IKE socket %s: reading the error queue: %s", local_ip, exc)
                return
            for level, kind, raw in anc:
                if (level, kind) in (
                    (socket.IPPROTO_IP, _IP_RECVERR),
                    (socket.IPPROTO_IPV6, _IPV6_RECVERR),
                ):
                    ee = SockExtendedErr.parse(raw)
                    if ee is not None and dest:
                        self.counters.icmp_errors += 1
                        self._icmp_error(natt, data, (str(dest[0]), int(dest[1])), ee)

    def _icmp_error(self, natt: bool, quoted: bytes, dest: Address, ee: SockExtendedErr) -> None:
        """An ICMP report about a datagram we sent to ``dest`` (``quoted``: its UDP payload,
        as much as the ICMP message carried). Only a destination unreachable that quotes an
        IKE SA we initiated and that is not established yet, sent to where that SA sends,
        fails it: ICMP is unauthenticated, and matching our random SPI means the sender saw
        our request (an on-path party, who could drop IKE anyway)."""
        if not ee.unreachable:
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
        c, book, ip = self.counters, self._book, remote[0]
        if self._policy is None:
            c.refused += 1
            return None
        verified = False
        if book.cookies_demanded(now):
            gate = self._cookie_gate()
            verdict = gate.check(data, ip, now)
            if verdict is DEMAND:
                c.cookies_sent += 1
                self._send(local_ip, natt, gate.reply, remote)
                self._report_load(now)
                return None
            if verdict is DROP:
                c.malformed += 1
                return None
            c.cookies_accepted += 1
            verified = True
        known = ip in self._peers
        refusal, victim = book.admit(ip, known=known, verified=verified, now=now)
        if refusal:
            c.half_open_dropped += 1
            if refusal == "source":
                c.half_open_refused_source += 1
            elif refusal == "prefix":
                c.half_open_refused_prefix += 1
            else:
                c.half_open_refused_global += 1
            self._report_load(now)
            return None
        local = (local_ip, self.natt_port if natt else self.ike_port)
        config = self._policy(local, remote)
        if config is None:
            # Silence, as libreswan does for a peer in its clear group: an answer such as
            # NO_PROPOSAL_CHOSEN makes pluto retry, while a timeout installs its failure
            # shunt (pass for private-or-clear), which is the fallback both sides want.
            c.refused += 1
            return None
        if victim is not None:
            c.half_open_displaced += 1
            self._forget(victim)
        sa = IkeSa.responder(config, self._random)
        h = SaHandle(
            sa, local, remote, remote[1], now, natt=natt, half_open=True, original_initiator=False
        )
        self._handles[h] = None
        self._half_open[(data[:8], remote)] = h
        book.add(h, ip, known=known, verified=verified, now=now)
        return h

    def _cookie_gate(self) -> CookieGate:
        if self._gate is None:
            self._gate = CookieGate(CookieJar(self._random(32)))
        return self._gate

    def _report_load(self, now: float) -> None:
        """While COOKIEs are demanded or requests refused: one summary line at most every
        ``LOAD_REPORT_INTERVAL`` seconds, never one per packet."""
        if not self._load_log.allow(now):
            return
        c, last = self.counters, self._load_reported
        log.warning(
            "IKE responder under load: %d COOKIE demands, %d valid cookies, %d IKE_SA_INIT "
            "refused (%d per source, %d per prefix, %d no slot), %d half-open displaced, "
            "%d expired since the last report; %d/%d half-open",
            c.cookies_sent - last.cookies_sent,
            c.cookies_accepted - last.cookies_accepted,
            c.half_open_dropped - last.half_open_dropped,
            c.half_open_refused_source - last.half_open_refused_source,
            c.half_open_refused_prefix - last.half_open_refused_prefix,
            c.half_open_refused_global - last.half_open_refused_global,
            c.half_open_displaced - last.half_open_displaced,
            c.half_open_expired - last.half_open_expired,
            len(self._book),
            self._book.limits.half_open_limit,
        )
        self._load_reported = replace(c)

    # ------------------------------------------------------------------ send, events
    def _send(
        self,
        local_ip: str,
        natt: bool,
        data: bytes | bytearray,
        remote: Address,
        *,
        raw: bool = False,
    ) -> None:
        socks = self._socks.get(local_ip)
        if socks is None:
            return
        payload = NON_ESP_MARKER + data if natt and not raw else data
        sock = socks.natt if natt else socks.ike
        for attempt in (1, 2):
            try:
                sock.sendto(payload, remote)
                self.counters.sent += 1
                return
            except OSError as exc:
                if attempt == 1 and exc.errno in _REPORTED_ERRNOS:
                    # an ICMP report (perhaps about another peer) was pending on the
                    # socket and failed this send instead: handle it, send again
                    self._drain_errors(sock, local_ip, natt)
                    continue
                log.debug("IKE: send to %s failed: %s", remote[0], exc)
                return

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
            self._send(h.local[0], h.natt, d, reply_to or h.remote)
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
        self._arm()

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
        if pairs == h.pairs:
            return
        for k in h.pairs - pairs:
            if self._by_pair.get(k) is h:
                del self._by_pair[k]
        for p in pairs:
            self._by_pair[p] = h
        h.pairs = pairs

    def _close_half_open(self, h: SaHandle) -> None:
        if h.half_open:
            h.half_open = False
            self._book.remove(h)
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
        self._due.pop(h, None)

    # ------------------------------------------------------------------ timers
    def _deadline(self, h: SaHandle) -> float | None:
        times = [t for t in (h.sa.get_timer(), h.keepalive_at) if t is not None]
        if self.dpd_delay > 0 and h.established_at is not None:
            times.append(max(h.last_rx, h.established_at) + self.dpd_delay)
        if h.half_open:
            times.append(h.created + self.half_open_timeout)
        return min(times) if times else None

    def _reschedule(self, h: SaHandle) -> None:
        d = self._deadline(h) if h in self._handles else None
        if d is None:
            self._due.pop(h, None)
        elif self._due.get(h) != d:
            self._due[h] = d
            self._seq += 1
            heapq.heappush(self._heap, (d, self._seq, h))

    def next_deadline(self) -> float | None:
        heap = self._heap
        while heap and self._due.get(heap[0][2]) != heap[0][0]:
            heapq.heappop(heap)  # stale: the SA moved its deadline or is gone
        return heap[0][0] if heap else None

    def _arm(self) -> None:
        if self._loop is None:
            return
        at = self.next_deadline()
        if at == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = at
        if at is not None:
            self._timer = self._loop.call_later(max(0.0, at - self._clock()), self._on_timer)

    def _on_timer(self) -> None:
        self._timer, self._timer_at = None, None
        self.tick(self._clock())

    def tick(self, now: float) -> None:
        """Run every deadline due at ``now``: retransmits, keepalives, half-open expiry."""
        due: list[SaHandle] = []
        while (at := self.next_deadline()) is not None and at <= now:
            h = heapq.heappop(self._heap)[2]
            del self._due[h]
            due.append(h)
        for h in due:
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
                self._send(h.local[0], True, NAT_KEEPALIVE, h.remote, raw=True)
                self.counters.keepalives_out += 1
                h.keepalive_at = now + self.keepalive_interval
            self._reschedule(h)
        self._arm()
