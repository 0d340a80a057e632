"""The DNS front: LAN queries in on UDP and TCP, upstream answers out, A/AAAA held.

Three layers, thinnest at the edge:

- pure message helpers (``error_reply``, ``fit_to_limit``, ``cap_ttls``, ...), unit-tested
  without sockets;
- ``Resolver``: one query in, one reply out. It forwards to the upstreams, keeps a small
  answer cache, and for A/AAAA drives the sans-IO ``HoldCore`` (hold.py): it performs
  the core's ``LookupKey``/``EnsureTunnel`` actions and waits for its ``Release``;
- ``DnsFront``: the asyncio UDP and TCP (RFC 7766) listeners.

A bad query never ends the server: it gets FORMERR/NOTIMP, or is dropped with a log
line naming the client when it cannot even be answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import itertools
import logging
import socket
import struct
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import fields
from typing import Any, Protocol

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype

from oe_router.config.schema import Endpoint
from oe_router.decisions import DecisionLog, subject
from oe_router.dns.access import LanAccess, Verdict, client_address
from oe_router.dns.hold import (
    Action,
    EnsureTunnel,
    HoldCore,
    HoldPolicy,
    IPAddress,
    KeylessPasser,
    KeyLookup,
    KeyResult,
    KeyStatus,
    LookupKey,
    Outcome,
    PassKeyless,
    Release,
    TunnelRequester,
)
from oe_router.dns.upstream import UpstreamError
from oe_router.dns.wire import QueryView, ReplyView, read_query, read_reply, rewrite_ttls
from oe_router.ratelimit import RateLimit
from oe_router.records import record

__all__ = [
    "AnswerCache",
    "Arrival",
    "DnsFront",
    "Forwarder",
    "FrontBindError",
    "FrontStats",
    "Question",
    "Resolver",
    "client_udp_limit",
    "error_reply",
    "fit_to_limit",
    "refused_reply",
]

log = logging.getLogger("oe_router.dns.front")

_HEADER = 12
_QR = 0x80  # in the third header octet
_LEN = struct.Struct("!H")  # RFC 7766 two-octet length prefix
_MIN_UDP = 512  # RFC 1035 limit without EDNS
_TCP_LIMIT = 65535
_ADDRESS_TYPES = (dns.rdatatype.A, dns.rdatatype.AAAA)
_ZONE_TRANSFERS = (dns.rdatatype.AXFR, dns.rdatatype.IXFR)
#: Mozilla's canary domain (support.mozilla.org, "Canary domain - use-application-dns.net"):
#: NXDOMAIN for it makes Firefox's default DNS over HTTPS stand down and use the system
#: resolver, so its queries reach the front (the DNS trigger). The exact name only.
DOH_CANARY = dns.name.from_text("use-application-dns.net.")
_CANARY_LABELS = tuple(DOH_CANARY.labels[:-1])
_IN = dns.rdataclass.IN

Client = tuple[str, int]
Handler = Callable[[bytes, Client, int], Awaitable[bytes | None]]
FastHandler = Callable[[bytes, int], bytes | None]


# --------------------------------------------------------------------------- pure helpers


def client_udp_limit(query: dns.message.Message) -> int:
    """Largest UDP reply the client takes: its EDNS0 size, never below 512."""
    if query.edns < 0:
        return _MIN_UDP
    return max(_MIN_UDP, int(query.payload))


def error_reply(query: dns.message.Message, rcode: dns.rcode.Rcode) -> bytes:
    """A reply with ``rcode`` and the question, EDNS0 iff the query had it."""
    reply = dns.message.make_response(query)
    reply.set_rcode(rcode)
    return reply.to_wire()


def header_only_reply(wire: bytes, rcode: dns.rcode.Rcode) -> bytes | None:
    """FORMERR-style reply for a query dnspython cannot parse; None if not answerable."""
    if len(wire) < _HEADER or wire[2] & _QR:
        return None
    query_id, flags = _LEN.unpack_from(wire)[0], _LEN.unpack_from(wire, 2)[0]
    reply = dns.message.Message(id=query_id)
    reply.flags = dns.flags.QR | (flags & (0x7800 | dns.flags.RD))  # echo opcode and RD
    reply.set_rcode(rcode)
    return reply.to_wire()


def fit_to_limit(reply: bytes, limit: int) -> tuple[bytes, bool]:
    """The reply, or a truncated one (TC=1, question and OPT only) if over ``limit``."""
    if len(reply) <= limit:
        return reply, False
    msg = dns.message.from_wire(reply)
    msg.answer = []
    msg.authority = []
    msg.additional = []
    msg.flags |= dns.flags.TC
    return msg.to_wire(), True


# --------------------------------------------------------------------------- small parts


@record
class FrontStats:
    """Counters for ``oe status`` (keys of the ``dns`` object)."""

    queries: int = 0
    udp: int = 0
    tcp: int = 0
    held: int = 0
    released_clear: int = 0
    released_protected: int = 0
    servfail: int = 0
    timeouts: int = 0
    hold_expired: int = 0
    cache_hits: int = 0
    truncated: int = 0
    formerr: int = 0
    notimp: int = 0
    dropped: int = 0
    #: from a client outside the LAN prefixes: REFUSED over UDP, TCP connection closed
    refused_not_lan: int = 0
    #: came in over the WAN interface or to a WAN address: never answered
    dropped_wan: int = 0
    #: TCP connection refused: every TCP slot in use
    tcp_refused: int = 0
    #: TCP connection closed: no complete query within the TCP timeout
    tcp_idle_timeouts: int = 0
    #: TCP connection aborted: the client did not read its replies within the TCP timeout
    tcp_write_timeouts: int = 0
    #: queries for the DoH canary domain answered NXDOMAIN by the front (``doh_canary``)
    doh_canary: int = 0

    def to_json(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _may_log(limit: RateLimit, now: float, what: str) -> bool:
    """Whether a line about a client may go out (``limit`` keeps a flood of junk from
    filling logd); the first one after a quiet spell says how many were left out."""
    if not limit.allow(now):
        return False
    if suppressed := limit.take_suppressed():
        log.warning("%d more %s log lines were suppressed", suppressed, what)
    return True


class AnswerCache:
    """Upstream replies by (name, type, class, EDNS, DO, CD), kept for their smallest TTL.

    Only NOERROR and NXDOMAIN replies that were not truncated are kept. ``now`` is
    passed in. Oldest entries go first when full. A hit is the stored wire with
    the client's ID and its TTLs aged (and capped) in place: no parse, no render.
    """

    def __init__(self, max_entries: int = 4096, max_ttl: int = 86400) -> None:
        self._max = max_entries
        self._max_ttl = max_ttl
        self._data: OrderedDict[tuple[object, ...], tuple[float, float, bytes, ReplyView]] = (
            OrderedDict()
        )

    def get(
        self, key: tuple[object, ...], query_id: int, now: float, cap: int | None = None
    ) -> tuple[bytes, ReplyView] | None:
        item = self._data.get(key)
        if item is None:
            return None
        stored, expires, wire, view = item
        if expires <= now:
            del self._data[key]
            return None
        self._data.move_to_end(key)
        return rewrite_ttls(wire, query_id, view.ttl_offsets, int(now - stored), cap), view

    def put(self, key: tuple[object, ...], wire: bytes, view: ReplyView, now: float) -> None:
        if view.rcode not in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN) or view.truncated:
            return
        ttl = min(view.min_ttl, self._max_ttl)
        if ttl <= 0:
            return
        self._data[key] = (now, now + ttl, wire, view)
        self._data.move_to_end(key)
        while len(self._data) > self._max:
            self._data.popitem(last=False)

    def clear(self) -> None:
        self._data.clear()

    def __len__(self) -> int:
        return len(self._data)


@record(frozen=True, slots=True)
class Question:
    """What the resolver needs of a query, from ``wire.read_query`` or from dnspython."""

    id: int
    name: dns.name.Name
    rdtype: int
    rdclass: int
    cache_key: tuple[object, ...]
    udp_limit: int  #: the client's EDNS0 size, never below 512

    @classmethod
    def of_view(cls, view: QueryView) -> Question:
        name = dns.name.Name((*view.labels, b""))
        key = (view.labels, view.qtype, view.qclass, view.edns, view.do, view.cd)
        limit = max(_MIN_UDP, view.payload) if view.edns else _MIN_UDP
        return cls(view.id, name, view.qtype, view.qclass, key, limit)

    @classmethod
    def of_message(cls, query: dns.message.Message) -> Question:
        q = query.question[0]
        labels = tuple(label.lower() for label in q.name.labels[:-1])
        do = bool(query.ednsflags & dns.flags.DO)
        cd = bool(query.flags & dns.flags.CD)
        key = (labels, int(q.rdtype), int(q.rdclass), query.edns >= 0, do, cd)
        return cls(query.id, q.name, q.rdtype, q.rdclass, key, client_udp_limit(query))


# --------------------------------------------------------------------------- resolver


class Forwarder(Protocol):
    """What the resolver needs from upstream.UpstreamClient: wire query in, reply out."""

    async def query(self, wire: bytes) -> bytes: ...


class Resolver:
    """One query in, one reply out; A/AAAA answers wait for the hold core's release.

    ``key_lookup`` None turns the IPSECKEY trigger off (a plain forwarder).
    ``tunnels`` None means no OE manager: a secure key's tunnel counts as failed and
    the answer goes out in the clear at once. ``doh_canary`` answers the DoH canary
    domain NXDOMAIN itself (``oe.dns.doh_canary``) instead of forwarding it.
    """

    def __init__(
        self,
        upstream: Forwarder,
        policy: HoldPolicy,
        key_lookup: KeyLookup | None = None,
        tunnels: TunnelRequester | None = None,
        cache: AnswerCache | None = None,
        stats: FrontStats | None = None,
        key_timeout: float = 10.0,
        doh_canary: bool = False,
    ) -> None:
        self.upstream = upstream
        self.doh_canary = doh_canary
        self.core = HoldCore(policy)
        self.key_lookup = key_lookup
        self.tunnels = tunnels
        self.cache = cache
        self.stats = stats or FrontStats()
        self.key_timeout = key_timeout
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[Release]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._log_limit = RateLimit(burst=10)  # lines about bad queries
        #: lines about one query's answer (upstream failed, bogus, SERVFAIL): any client
        #: or zone can cause one per query, and the stats count each
        self._answer_log = RateLimit(burst=10)
        #: "example.net (203.0.113.9): clear, no key (DNS)": once per name, rate-limited
        self.decisions = DecisionLog(log)
        self._warned_no_tunnels = False

    @property
    def policy(self) -> HoldPolicy:
        return self.core.policy

    @policy.setter
    def policy(self, policy: HoldPolicy) -> None:
        self.core.policy = policy

    # ------------------------------------------------------------------ entry point
    def _holds(self, question: Question) -> bool:
        return (
            self.key_lookup is not None
            and question.rdtype in _ADDRESS_TYPES
            and question.rdclass == dns.rdataclass.IN
        )

    def _cap(self) -> int | None:
        return int(self.policy.ttl_cap) if self.policy.ttl_cap > 0 else None

    def answer_now(self, wire: bytes, limit: int) -> bytes | None:
        """The reply if it needs no waiting at all, else None (then call ``handle``).

        Why: most LAN queries repeat a name. A cached answer whose name's key
        status is known and gives no tunnel goes out from here, without a task,
        the hold core or dnspython. Counts the query only when it answers it. The DoH
        canary is answered here too.
        """
        if self.cache is None and not self.doh_canary:
            return None
        view = read_query(wire)
        if view is None or view.qtype in _ZONE_TRANSFERS:
            return None
        if self.doh_canary and view.labels == _CANARY_LABELS and view.qclass == _IN:
            canary = self._canary_reply(wire, None)
            if canary is not None:
                self.stats.queries += 1
            return canary
        if self.cache is None:
            return None
        question = Question.of_view(view)
        holds = self._holds(question)
        key: KeyResult | None = None
        if holds:
            assert self.key_lookup is not None
            key = self.key_lookup.cached(question.name)
            if key is None or key.usable_key is not None:
                return None
            if key.status is KeyStatus.BOGUS and self.policy.bogus_action == "servfail":
                return None
        now = asyncio.get_running_loop().time()
        hit = self.cache.get(question.cache_key, view.id, now, self._cap() if holds else None)
        if hit is None:
            return None
        passer = self.tunnels
        if (
            key is not None
            and key.keyless
            and self.policy.keyless == "pass"
            and isinstance(passer, KeylessPasser)
            and not passer.keyless_passed(hit[1].addresses)
        ):
            return None  # a keyless name's cached answer goes at once while its shunts stand
        reply = hit[0]
        if len(reply) > (limit if limit == _TCP_LIMIT else question.udp_limit):
            return None  # the truncation path is in handle
        if (
            key is not None
            and key.status is KeyStatus.SECURE
            and key.check_addresses(hit[1].addresses)[0] is not KeyStatus.SECURE
        ):
            return None  # signed zone, unproven address: the hold core decides
        self.stats.queries += 1
        self.stats.cache_hits += 1
        if holds:
            self.stats.released_clear += 1
        return reply

    async def handle(self, wire: bytes, client: Client, limit: int) -> bytes | None:
        """Answer one query; ``limit`` is the transport's size (UDP: 512, TCP: 65535)."""
        self.stats.queries += 1
        view = read_query(wire)
        query: dns.message.Message | None = None
        if view is not None and view.qtype not in _ZONE_TRANSFERS:
            question = Question.of_view(view)
        else:
            parsed = self._check(wire, client)
            if not isinstance(parsed, dns.message.Message):
                return parsed
            query = parsed
            question = Question.of_message(query)
        if self.doh_canary and question.name == DOH_CANARY and question.rdclass == _IN:
            canary = self._canary_reply(wire, query)
            if canary is not None:
                return canary
        if limit != _TCP_LIMIT:
            limit = question.udp_limit
        try:
            reply = await self._answer(question, wire)
        except Exception as exc:  # a bug here must cost one query, not the server
            log.error(
                "query %s from %s failed: %s: %s",
                question.name,
                _fmt(client),
                type(exc).__name__,
                exc,
            )
            self.stats.servfail += 1
            return error_reply(query or dns.message.from_wire(wire), dns.rcode.SERVFAIL)
        out, truncated = fit_to_limit(reply, limit)
        if truncated:
            self.stats.truncated += 1
        return out

    def _canary_reply(self, wire: bytes, query: dns.message.Message | None) -> bytes | None:
        """NXDOMAIN for the DoH canary, any type, without asking an upstream."""
        try:
            reply = error_reply(query or dns.message.from_wire(wire), dns.rcode.NXDOMAIN)
        except (dns.exception.DNSException, ValueError, IndexError):
            return None  # read_query took it, dnspython does not: the slow path decides
        self.stats.doh_canary += 1
        return reply

    def _check(self, wire: bytes, client: Client) -> dns.message.Message | bytes | None:
        """dnspython's judgement of an unusual query: the query, or the reply/None to send."""
        try:
            query = dns.message.from_wire(wire)
        except dns.message.ShortHeader:
            self._bad(client, f"dropped {len(wire)}-byte message: too short for a DNS header")
            self.stats.dropped += 1
            return None
        except (dns.exception.DNSException, ValueError, IndexError) as exc:
            reply = header_only_reply(wire, dns.rcode.FORMERR)
            what = "answered FORMERR" if reply is not None else "dropped"
            self._bad(client, f"{what}: malformed query ({exc})")
            if reply is None:
                self.stats.dropped += 1
            else:
                self.stats.formerr += 1
            return reply
        if query.flags & dns.flags.QR:
            self._bad(client, "dropped: a response was sent to the query port")
            self.stats.dropped += 1
            return None
        if query.opcode() != dns.opcode.QUERY:
            self.stats.notimp += 1
            return error_reply(query, dns.rcode.NOTIMP)
        if len(query.question) != 1:
            self._bad(client, f"answered FORMERR: {len(query.question)} questions (need 1)")
            self.stats.formerr += 1
            return error_reply(query, dns.rcode.FORMERR)
        if query.question[0].rdtype in _ZONE_TRANSFERS:
            self.stats.notimp += 1
            return error_reply(query, dns.rcode.REFUSED)
        return query

    async def _answer(self, question: Question, wire: bytes) -> bytes:
        loop = asyncio.get_running_loop()
        hold_id: int | None = None
        if self._holds(question):
            hold_id = next(self._ids)
            self._waiting[hold_id] = loop.create_future()
            self._apply(self.core.query(hold_id, question.name, loop.time()))
        try:
            hit = self._cached(question, loop.time())
            view: ReplyView | None
            if hit is not None:
                reply, view = hit
            else:
                try:
                    reply = await self.upstream.query(wire)
                except UpstreamError as exc:
                    if self._may_log_answer():
                        rdtype = dns.rdatatype.RdataType.make(question.rdtype)
                        log.info("%s/%s: %s", question.name, dns.rdatatype.to_text(rdtype), exc)
                    if hold_id is not None:
                        self._apply(self.core.upstream_failed(hold_id, str(exc), loop.time()))
                        self._count(await self._waiting[hold_id])
                    else:
                        self.stats.timeouts += 1
                        self.stats.servfail += 1
                    return error_reply(dns.message.from_wire(wire), dns.rcode.SERVFAIL)
                view = read_reply(reply)
                if view is not None and self.cache is not None:
                    self.cache.put(question.cache_key, reply, view, loop.time())
            if hold_id is None:
                return reply
            return await self._hold(question, wire, reply, view, hold_id)
        finally:
            if hold_id is not None:
                self._waiting.pop(hold_id, None)
                self.core.cancel(hold_id)

    async def _hold(
        self, question: Question, wire: bytes, reply: bytes, view: ReplyView | None, hold_id: int
    ) -> bytes:
        loop = asyncio.get_running_loop()
        if view is None:
            if self._may_log_answer():
                log.warning("%s: unparsable upstream reply passed on as is", question.name)
            self._apply(self.core.answer(hold_id, (), loop.time()))
            self._count(await self._waiting[hold_id])
            return reply
        cap = self._cap()
        ttl = view.min_ttl if cap is None else min(view.min_ttl, cap)
        self._apply(self.core.answer(hold_id, view.addresses, loop.time(), float(ttl)))
        release = await self._waiting[hold_id]
        self._count(release)
        if release.summary and view.addresses:
            who = subject(view.addresses, question.name)
            now = loop.time()
            self.decisions.decide(logging.INFO, who, release.summary, now, key=str(question.name))
        if release.outcome.servfail:
            if self._may_log_answer():
                log.warning("%s: SERVFAIL to the client: %s", question.name, release.reason)
            return error_reply(dns.message.from_wire(wire), dns.rcode.SERVFAIL)
        return rewrite_ttls(reply, question.id, view.ttl_offsets, cap=self._cap())

    # ------------------------------------------------------------------ cache
    def _cached(self, question: Question, now: float) -> tuple[bytes, ReplyView] | None:
        if self.cache is None:
            return None
        hit = self.cache.get(question.cache_key, question.id, now)
        if hit is not None:
            self.stats.cache_hits += 1
        return hit

    # ------------------------------------------------------------------ the core's actions
    def _apply(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, Release):
                fut = self._waiting.get(action.query)
                if fut is not None and not fut.done():
                    fut.set_result(action)
            elif isinstance(action, LookupKey):
                known = self.key_lookup.cached(action.name) if self.key_lookup else None
                if known is None:
                    self._spawn(self._lookup(action))
                else:  # no task for a name whose key status is remembered
                    now = asyncio.get_running_loop().time()
                    self._apply(self.core.key_result(action.name, known, now))
            elif isinstance(action, EnsureTunnel):
                self._spawn(self._tunnel(action))
            elif isinstance(action, PassKeyless):
                if isinstance(self.tunnels, KeylessPasser):
                    self._spawn(self._pass_keyless(action, self.tunnels))
                else:  # no OE manager: nothing to pass, nothing traps either
                    now = asyncio.get_running_loop().time()
                    self._apply(self.core.keyless_done(action.request, frozenset(), now))
        self._reschedule()

    def _spawn(self, coro: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _lookup(self, action: LookupKey) -> None:
        assert self.key_lookup is not None
        try:
            result = await asyncio.wait_for(self.key_lookup.lookup(action.name), self.key_timeout)
        except TimeoutError:
            result = KeyResult(KeyStatus.INDETERMINATE, (), f"lookup exceeded {self.key_timeout}s")
        except Exception as exc:
            log.error("IPSECKEY lookup for %s failed: %s: %s", action.name, type(exc).__name__, exc)
            result = KeyResult(KeyStatus.INDETERMINATE, (), f"lookup failed: {exc}")
        if result.status is KeyStatus.BOGUS and self._may_log_answer():
            log.warning("IPSECKEY for %s is bogus: %s", action.name, result.reason)
        self._apply(self.core.key_result(action.name, result, asyncio.get_running_loop().time()))

    async def _tunnel(self, action: EnsureTunnel) -> None:
        ok = False
        if self.tunnels is None:
            if not self._warned_no_tunnels:
                log.warning(
                    "no OE manager: %s has a secure key but its answer goes out clear", action.name
                )
                self._warned_no_tunnels = True
        else:
            try:
                ok = await self.tunnels.ensure_tunnel(action.name, action.addresses, action.key)
            except Exception as exc:
                log.error("tunnel to %s failed: %s: %s", action.name, type(exc).__name__, exc)
        now = asyncio.get_running_loop().time()
        self._apply(self.core.tunnel_done(action.request, ok, now))

    async def _pass_keyless(self, action: PassKeyless, passer: KeylessPasser) -> None:
        passing: frozenset[IPAddress] = frozenset()
        try:
            passing = await passer.pass_keyless(
                action.name, action.addresses, action.ttl, action.reason
            )
        except Exception as exc:
            log.error("pass shunt for %s failed: %s: %s", action.name, type(exc).__name__, exc)
        now = asyncio.get_running_loop().time()
        self._apply(self.core.keyless_done(action.request, passing, now))

    def _reschedule(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        deadline = self.core.next_deadline()
        if deadline is not None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._apply(self.core.tick(asyncio.get_running_loop().time()))

    def _count(self, release: Release) -> None:
        if release.held_for > 0:
            self.stats.held += 1
        if release.hold_expired:
            self.stats.hold_expired += 1
        if release.outcome is Outcome.PROTECTED:
            self.stats.released_protected += 1
        elif release.outcome is Outcome.CLEAR:
            self.stats.released_clear += 1
        else:
            self.stats.servfail += 1
            if release.outcome is Outcome.UPSTREAM_FAILED:
                self.stats.timeouts += 1

    def _may_log_answer(self) -> bool:
        return _may_log(self._answer_log, asyncio.get_running_loop().time(), "answer")

    def _bad(self, client: Client, what: str) -> None:
        if _may_log(self._log_limit, asyncio.get_running_loop().time(), "bad-query"):
            log.warning("DNS client %s: %s", _fmt(client), what)

    async def close(self) -> None:
        """Cancel lookups and tunnel requests in flight (the service is stopping)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _fmt(client: Client) -> str:
    host, port = client[0], client[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# --------------------------------------------------------------------------- sockets

#: struct in_pktinfo (IPv4): ifindex, spec_dst (our address for the reply), addr (header dst)
_PKTINFO4 = struct.Struct("=i4s4s")
#: struct in6_pktinfo (IPv6): addr (header dst), ifindex
_PKTINFO6 = struct.Struct("=16si")
_IP_PKTINFO: int = getattr(socket, "IP_PKTINFO", 8)  # Linux's value; Python 3.11 lacks it
_CMSG_ROOM = socket.CMSG_SPACE(max(_PKTINFO4.size, _PKTINFO6.size))
_UDP_BATCH = 32  #: datagrams read per wakeup, so one busy socket cannot starve the rest
_GATE_TTL = 30.0  #: verdicts and interface names are looked up again after this long
_GATE_MAX = 4096  #: remembered verdicts; a spray of sources empties it, costing only time
_LINGER_RESET = struct.pack("ii", 1, 0)  #: struct linger: on, 0 s: close() sends RST
#: Longest a query's answer takes (upstream budget, key lookup, hold): a safety net only
_ANSWER_CAP = 30.0


class FrontBindError(OSError):
    """A listen address cannot be bound; the message names it."""


@record(frozen=True, slots=True)
class Arrival:
    """Where a datagram came in (IP_PKTINFO/IPV6_PKTINFO): our address and the interface."""

    local: bytes  #: the header's destination address, packed
    source: bytes  #: our address to answer from (IPv4 spec_dst; IPv6: ``local``)
    ifindex: int


def refused_reply(wire: bytes) -> bytes | None:
    """REFUSED with the query's question; None when it cannot be answered (a response)."""
    try:
        query = dns.message.from_wire(wire)
    except (dns.exception.DNSException, ValueError, IndexError):
        return header_only_reply(wire, dns.rcode.REFUSED)
    if query.flags & dns.flags.QR:
        return None
    return error_reply(query, dns.rcode.REFUSED)


class _Gate:
    """``LanAccess`` per packet at the cost of a dict lookup.

    Verdicts are remembered by (client, local address, interface index) and interface
    names by index, both for ``_GATE_TTL`` seconds: a PPP WAN device that comes back
    gets a new index, and a remembered verdict must not outlive a renamed one for long.
    """

    def __init__(self, access: LanAccess, clock: Callable[[], float]) -> None:
        self.access = access
        self._clock = clock
        self._verdicts: dict[tuple[str, bytes | None, int | None], Verdict] = {}
        self._names: dict[int, str | None] = {}
        self._renew = -1e18

    def verdict(self, host: str, local: bytes | None, ifindex: int | None) -> Verdict:
        key = (host, local, ifindex)
        now = self._clock()
        if now >= self._renew:
            self._verdicts.clear()
            self._names.clear()
            self._renew = now + _GATE_TTL
        verdict = self._verdicts.get(key)
        if verdict is None:
            verdict = self._judge(host, local, ifindex)
            if len(self._verdicts) >= _GATE_MAX:
                self._verdicts.clear()
            self._verdicts[key] = verdict
        return verdict

    def _judge(self, host: str, local: bytes | None, ifindex: int | None) -> Verdict:
        client = client_address(host)
        if client is None:
            return Verdict.REFUSE
        ours = ipaddress.ip_address(local) if local else None
        return self.access.verdict(client, ours, self._ifname(ifindex) if ifindex else None)

    def _ifname(self, ifindex: int) -> str | None:
        if ifindex not in self._names:
            try:
                self._names[ifindex] = socket.if_indextoname(ifindex)
            except OSError:  # gone since the packet came in: judged by addresses alone
                self._names[ifindex] = None
        return self._names[ifindex]


class _UdpListener:
    """One UDP socket. Where the access rules need them (a non-loopback address), each
    datagram's arrival interface and local address come with it, and a wildcard
    socket answers from the address it was asked on."""

    def __init__(self, front: DnsFront, endpoint: Endpoint, checked: bool) -> None:
        self._front = front
        self.checked = checked
        self.v6 = endpoint.family == 6
        self.wildcard = ipaddress.ip_address(endpoint.host).is_unspecified
        sock = socket.socket(socket.AF_INET6 if self.v6 else socket.AF_INET, socket.SOCK_DGRAM)
        try:
            if self.v6:  # [::] is IPv6 only: 0.0.0.0 is its own listen entry
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if checked and self.v6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
            elif checked:
                sock.setsockopt(socket.IPPROTO_IP, _IP_PKTINFO, 1)
            sock.setblocking(False)
            sock.bind((endpoint.host, endpoint.port))
        except BaseException:
            sock.close()
            raise
        self.sock = sock
        self.port = int(sock.getsockname()[1])
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(sock.fileno(), self._readable)
        self.closed = False

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._loop.remove_reader(self.sock.fileno())
            self.sock.close()

    def _readable(self) -> None:
        for _ in range(_UDP_BATCH):
            arrival: Arrival | None = None
            try:
                if self.checked:
                    data, ancillary, _flags, addr = self.sock.recvmsg(65535, _CMSG_ROOM)
                    arrival = self._arrival(ancillary)
                else:
                    data, addr = self.sock.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.debug("UDP socket error: %s", exc)
                return
            self._front.datagram(self, data, addr, arrival)
            if self.closed:
                return

    def _arrival(self, ancillary: list[tuple[int, int, bytes]]) -> Arrival | None:
        for level, kind, data in ancillary:
            if level == socket.IPPROTO_IP and kind == _IP_PKTINFO:
                ifindex, spec_dst, local = _PKTINFO4.unpack_from(data)
                return Arrival(local, spec_dst, ifindex)
            if level == socket.IPPROTO_IPV6 and kind == socket.IPV6_PKTINFO:
                local, ifindex = _PKTINFO6.unpack_from(data)
                return Arrival(local, local, ifindex)
        return None

    def send(self, reply: bytes, addr: Any, arrival: Arrival | None) -> None:
        if self.closed:
            return
        try:
            if self.wildcard and arrival is not None:
                if self.v6:
                    info = (
                        socket.IPPROTO_IPV6,
                        socket.IPV6_PKTINFO,
                        _PKTINFO6.pack(arrival.source, arrival.ifindex),
                    )
                else:
                    info = (
                        socket.IPPROTO_IP,
                        _IP_PKTINFO,
                        _PKTINFO4.pack(0, arrival.source, bytes(4)),
                    )
                self.sock.sendmsg([reply], [info], 0, addr)
            else:
                self.sock.sendto(reply, addr)
        except (BlockingIOError, InterruptedError):
            pass  # the socket buffer is full: UDP, the client asks again
        except OSError as exc:
            log.debug("UDP reply to %s: %s", addr, exc)


class DnsFront:
    """UDP and TCP listeners on each endpoint; every query goes to ``handler``.

    ``fast`` (optional) may answer a UDP datagram synchronously, without a task;
    when it returns None the query goes to ``handler``.
    ``access`` decides who is answered on a non-loopback listener (access.py); None
    answers everyone (tests). Every wait on a TCP client's behalf is bounded: a query
    must arrive within ``tcp_idle``, a reply must find room in the connection (the
    client reads) within ``tcp_write``, else the connection is aborted and its slot
    comes back.
    A port of 0 binds UDP to a free port and TCP to the same number (tests).
    """

    def __init__(
        self,
        handler: Handler,
        tcp_idle: float = 10.0,
        max_tcp_clients: int = 128,
        max_tcp_pipeline: int = 32,
        fast: FastHandler | None = None,
        access: LanAccess | None = None,
        stats: FrontStats | None = None,
        tcp_write: float | None = None,
    ) -> None:
        self._handler = handler
        self._fast = fast
        self.tcp_idle = tcp_idle
        self.tcp_write = tcp_idle if tcp_write is None else tcp_write
        self._max_tcp = max_tcp_clients
        self._max_pipeline = max_tcp_pipeline
        self._access = access
        self._gate: _Gate | None = None
        self.stats = stats or FrontStats()
        self._udp: list[_UdpListener] = []
        self._tcp: list[asyncio.Server] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._tcp_tasks: set[asyncio.Task[Any]] = set()
        self.tcp_clients = 0
        self._log_limit = RateLimit(burst=10)  # lines about clients
        self.bound: tuple[Endpoint, ...] = ()

    async def start(self, listen: Sequence[Endpoint]) -> None:
        """Bind every endpoint; on any failure close what was bound and raise FrontBindError."""
        loop = asyncio.get_running_loop()
        if self._access is not None:
            self._gate = _Gate(self._access, loop.time)
        bound: list[Endpoint] = []
        try:
            for endpoint in listen:
                checked = self._access is not None and not self._access.open_listener(endpoint.host)
                try:
                    udp = _UdpListener(self, endpoint, checked)
                    self._udp.append(udp)
                    server = await asyncio.start_server(
                        self._serve_tcp, endpoint.host, udp.port, reuse_address=True
                    )
                    self._tcp.append(server)
                except OSError as exc:
                    raise FrontBindError(
                        exc.errno, f"cannot listen on {endpoint}: {exc.strerror or exc}"
                    ) from None
                bound.append(Endpoint(endpoint.host, udp.port))
        except BaseException:
            await self.stop()
            raise
        self.bound = tuple(bound)
        log.info("DNS front listening on %s (UDP and TCP)", ", ".join(map(str, bound)))

    async def stop(self) -> None:
        for udp in self._udp:
            udp.close()
        for server in self._tcp:
            server.close()
        for server in self._tcp:
            await server.wait_closed()
        self._udp, self._tcp = [], []
        tasks = [*self._tasks, *self._tcp_tasks]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.bound = ()

    def spawn(self, coro: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def answer_now(self, data: bytes, limit: int) -> bytes | None:
        if self._fast is None:
            return None
        try:
            return self._fast(data, limit)
        except Exception as exc:  # the task path still answers it
            log.error("fast path: %s: %s", type(exc).__name__, exc)
            return None

    # ------------------------------------------------------------------ UDP
    def datagram(
        self, listener: _UdpListener, data: bytes, addr: Any, arrival: Arrival | None
    ) -> None:
        """One datagram from ``listener``: judged, then answered now or by a task."""
        if listener.checked and self._gate is not None:
            verdict = self._gate.verdict(
                str(addr[0]),
                arrival.local if arrival else None,
                arrival.ifindex if arrival else None,
            )
            if verdict is not Verdict.ANSWER:
                self._turn_away(verdict, (str(addr[0]), int(addr[1])), "UDP")
                reply = refused_reply(data) if verdict is Verdict.REFUSE else None
                if reply is not None:
                    listener.send(reply, addr, arrival)
                return
        reply = self.answer_now(data, _MIN_UDP)
        if reply is not None:
            listener.send(reply, addr, arrival)
            return
        client = (str(addr[0]), int(addr[1]))
        self.spawn(self.serve_udp(listener, data, client, addr, arrival))

    async def serve_udp(
        self,
        listener: _UdpListener,
        data: bytes,
        client: Client,
        addr: Any,
        arrival: Arrival | None,
    ) -> None:
        try:
            reply = await self._handler(data, client, _MIN_UDP)
        except Exception as exc:  # never let one datagram end the listener
            log.error("UDP query from %s: %s: %s", _fmt(client), type(exc).__name__, exc)
            return
        if reply is not None:
            listener.send(reply, addr, arrival)

    def _log_allowed(self) -> bool:
        return _may_log(self._log_limit, asyncio.get_running_loop().time(), "DNS client")

    def _turn_away(self, verdict: Verdict, client: Client, proto: str) -> None:
        if verdict is Verdict.DROP:
            self.stats.dropped_wan += 1
            what = "dropped: it came over the WAN"
        else:
            self.stats.refused_not_lan += 1
            what = "REFUSED: not a LAN or loopback address"
        if self._log_allowed():
            log.warning("DNS client %s (%s): %s", _fmt(client), proto, what)

    # ------------------------------------------------------------------ TCP
    def _tcp_verdict(self, writer: asyncio.StreamWriter, peer: Any) -> Verdict:
        if self._gate is None:
            return Verdict.ANSWER
        local = writer.get_extra_info("sockname")
        if local is None or self._access is None or self._access.open_listener(str(local[0])):
            return Verdict.ANSWER
        ours = client_address(str(local[0]))
        scope = int(peer[3]) if len(peer) > 3 and peer[3] else None  # IPv6 link-local
        return self._gate.verdict(str(peer[0]), ours.packed if ours else None, scope)

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername") or ("?", 0)
        client = (str(peer[0]), int(peer[1]))
        verdict = self._tcp_verdict(writer, peer)
        if verdict is not Verdict.ANSWER:
            self._turn_away(verdict, client, "TCP")
            _reset(writer.transport)
            return
        if self.tcp_clients >= self._max_tcp:
            self.stats.tcp_refused += 1
            if self._log_allowed():
                log.warning(
                    "DNS client %s: TCP refused, %d clients connected",
                    _fmt(client),
                    self.tcp_clients,
                )
            _reset(writer.transport)
            return
        task = asyncio.current_task()
        assert task is not None
        self._tcp_tasks.add(task)
        self.tcp_clients += 1
        try:
            await _TcpClient(self, reader, writer, client).serve()
        finally:
            self.tcp_clients -= 1
            self._tcp_tasks.discard(task)


def _reset(transport: asyncio.WriteTransport) -> None:
    """Abort with an RST (SO_LINGER 0), so the kernel drops what the client never read
    too, instead of keeping the socket to deliver it."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    transport.abort()


class _TcpClient:
    """One RFC 7766 connection: pipelined queries, replies in any order, every wait bounded."""

    def __init__(
        self,
        front: DnsFront,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        client: Client,
    ) -> None:
        self.front = front
        self.reader = reader
        self.writer = writer
        self.client = client
        self.slots = asyncio.Semaphore(front._max_pipeline)
        self.inflight: set[asyncio.Task[None]] = set()
        #: the client did not take its replies off the wire within ``tcp_write``
        self.stalled = False

    async def serve(self) -> None:
        front, transport = self.front, self.writer.transport
        try:
            while not transport.is_closing():
                try:
                    async with asyncio.timeout(front.tcp_idle):
                        head = await self.reader.readexactly(2)
                except TimeoutError:
                    if self.inflight:  # idle counts from the last answer (RFC 7766 6.2.3)
                        continue  # a partial prefix stays buffered for the next try
                    front.stats.tcp_idle_timeouts += 1
                    break
                except (asyncio.IncompleteReadError, ConnectionError):
                    break
                try:
                    async with asyncio.timeout(front.tcp_idle):
                        data = await self.reader.readexactly(_LEN.unpack(head)[0])
                except TimeoutError:
                    front.stats.tcp_idle_timeouts += 1
                    break
                except (asyncio.IncompleteReadError, ConnectionError):
                    break
                try:
                    async with asyncio.timeout(front.tcp_write):
                        await self.slots.acquire()  # pipeline full: replies are not read
                except TimeoutError:
                    self.stalled = True
                    break
                task = asyncio.ensure_future(self._one(data))
                self.inflight.add(task)
                task.add_done_callback(self.inflight.discard)
            if self.inflight and not self.stalled:  # each answer is bounded on its own
                await asyncio.wait(self.inflight, timeout=_ANSWER_CAP + front.tcp_write)
            if not self.stalled and not transport.is_closing():
                self.writer.close()
                try:  # what is still buffered goes out, if the client reads it in time
                    async with asyncio.timeout(front.tcp_write):
                        await self.writer.wait_closed()
                except TimeoutError:
                    self.stalled = True
                except OSError:
                    pass
        finally:
            for task in self.inflight:
                task.cancel()
            if self.stalled:
                front.stats.tcp_write_timeouts += 1
            if self.stalled or not transport.is_closing():
                _reset(transport)

    async def _one(self, data: bytes) -> None:
        front, writer = self.front, self.writer
        try:
            reply = await front._handler(data, self.client, _TCP_LIMIT)
            if reply is None or writer.transport.is_closing():
                return
            try:  # room first, so one connection buffers at most a reply past the high mark
                async with asyncio.timeout(front.tcp_write):
                    await writer.drain()
            except TimeoutError:
                self.stalled = True
                _reset(writer.transport)
                return
            if not writer.transport.is_closing():
                writer.write(_LEN.pack(len(reply)) + reply)
        except ConnectionError:
            pass
        except Exception as exc:
            log.error("TCP query from %s: %s: %s", _fmt(self.client), type(exc).__name__, exc)
        finally:
            self.slots.release()
