"""Who may open a half-open IKE SA with us: the responder's cheapest path.

A new IKE_SA_INIT request is checked from its fixed header before anything else: while
``cookie_threshold`` IKE SAs have not finished IKE_AUTH, COOKIEs are demanded (RFC 7296
§2.6) with ``cookies.CookieGate``, which reads payload headers only and answers from a
template; who may then hold a half-open IKE SA (per address, per prefix, known peers
first, at most ``half_open_limit``) is ``halfopen.HalfOpenBook``'s rule (RFC 8019).
Nothing here logs per packet: it counts, and says so in one line at most every
``LOAD_REPORT_INTERVAL`` seconds.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable
from dataclasses import replace
from typing import Final, Generic, NamedTuple, TypeVar

from oe_router.ratelimit import RateLimit

from .cookies import DEMAND, DROP, CookieGate, CookieJar, ResponderLimits
from .counters import EndpointCounters
from .halfopen import HalfOpenBook

__all__ = ["LOAD_REPORT_INTERVAL", "Admitted", "ResponderAdmission"]

log = logging.getLogger("oe_router.ike")

#: seconds between two "under load" summary lines (COOKIE demands, refusals)
LOAD_REPORT_INTERVAL: Final = 10.0

K = TypeVar("K", bound=Hashable)


class Admitted(NamedTuple, Generic[K]):
    """A request that may become a half-open IKE SA: ``victim`` must go to make room."""

    verified: bool  #: it came back with a valid COOKIE
    known: bool  #: its address holds an established IKE SA with us
    victim: K | None


class ResponderAdmission(Generic[K]):
    """The COOKIE gate, the half-open table and the load report, keyed by the owner's
    handle of each half-open IKE SA."""

    def __init__(
        self,
        limits: ResponderLimits,
        counters: EndpointCounters,
        random: Callable[[int], bytes],
    ) -> None:
        self.book: HalfOpenBook[K] = HalfOpenBook(limits)
        self._counters = counters
        self._random = random
        self._gate: CookieGate | None = None
        self._load_log = RateLimit(LOAD_REPORT_INTERVAL)
        self._load_reported = EndpointCounters()

    def admit(
        self,
        data: bytes,
        ip: str,
        now: float,
        known: bool,
        demand: Callable[[bytes | bytearray], None],
    ) -> Admitted[K] | None:
        """COOKIE when demanded (``demand`` sends our answer), then the half-open rules;
        None when the request goes no further (counted)."""
        c, book = self._counters, self.book
        verified = False
        if book.cookies_demanded(now):
            gate = self._cookie_gate()
            verdict = gate.check(data, ip, now)
            if verdict is DEMAND:
                c.cookies_sent += 1
                demand(gate.reply)
                self._report_load(now)
                return None
            if verdict is DROP:
                c.malformed += 1
                return None
            c.cookies_accepted += 1
            verified = True
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
        return Admitted(verified, known, victim)

    def hold(self, key: K, ip: str, admitted: Admitted[K], now: float) -> None:
        """``key`` is a half-open IKE SA now (its ``victim`` already gone)."""
        if admitted.victim is not None:
            self._counters.half_open_displaced += 1
        self.book.add(key, ip, known=admitted.known, verified=admitted.verified, now=now)

    def status(self, now: float) -> dict[str, object]:
        """The half-open table and its limits (gauges, not counters)."""
        lim = self.book.limits
        return {
            **self.book.summary(),
            "half_open_limit": lim.half_open_limit,
            "half_open_per_source": lim.per_source,
            "half_open_per_prefix": lim.per_prefix,
            "half_open_reserve": lim.reserve,
            "cookie_threshold": lim.cookie_threshold,
            "cookies_demanded": self.book.cookies_demanded(now),
        }

    def _cookie_gate(self) -> CookieGate:
        if self._gate is None:
            self._gate = CookieGate(CookieJar(self._random(32)))
        return self._gate

    def _report_load(self, now: float) -> None:
        """While COOKIEs are demanded or requests refused: one summary line at most every
        ``LOAD_REPORT_INTERVAL`` seconds, never one per packet."""
        if not self._load_log.allow(now):
            return
        c, last = self._counters, self._load_reported
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
            len(self.book),
            self.book.limits.half_open_limit,
        )
        self._load_reported = replace(c)
