"""Half-open IKE SA accounting for the responder (RFC 8019): who holds how many,
and who may start one more.

Why: with one global cap, 64 sources that answered cookies at 2 requests a second each
held every slot, and every legitimate initiator was refused for as long as they kept it
up. COOKIEs are demanded once ``cookie_threshold`` IKE SAs are half-open, or once that
many were started within the last second: requests that fail at once (a proposal we
refuse, a body that does not decode) never stay half-open, so without the second rule
a spoofed flood of them got a full decode each and never met a cookie. The rules, for
a new IKE_SA_INIT request that got this far (its COOKIE checked when one is demanded):

- a request that proved its address with a cookie (``verified``) is counted against its
  address (``per_source``) and, for peers without an IKE SA, its /24 (IPv4) or /64
  (IPv6) prefix (``per_prefix``), and refused at either cap. A request taken below the
  cookie threshold proves nothing (a spoofer would spend a victim's share), so it only
  counts globally; there are at most ``cookie_threshold`` of those, as above it every
  request needs a cookie;
- a peer holding an established IKE SA with us (``known``) may use the last ``reserve``
  slots, and when every slot is taken it displaces the oldest half-open SA of a peer
  without one (RFC 8019 prefers peers it already has SAs with);
- a peer without an IKE SA that finds its slots taken displaces the oldest unverified
  half-open SA, or else the oldest of the prefix holding the most, if that prefix holds
  at least two more than the newcomer's (a fairer table, never a swap); either only if
  older than ``guard`` seconds, so one slot costs at most one Diffie-Hellman per guard
  period. Otherwise it is refused.

What this does not do: a flood spread over more prefixes than there are slots, each
answering its cookies, still competes with new peers for free slots (known peers keep
their reserve). Client puzzles (RFC 8019) would be the next step; no peer we meet solves
them.
Sans-IO: time is passed in, keys are whatever the owner tracks SAs by.
"""

from __future__ import annotations

import socket
from collections import deque
from collections.abc import Hashable
from typing import Generic, Literal, TypeVar

from oe_router.records import record

from .cookies import ResponderLimits

__all__ = ["HalfOpenBook", "Refusal", "prefix_of"]

K = TypeVar("K", bound=Hashable)
#: why a request was refused ("" when it may go on)
Refusal = Literal["", "source", "prefix", "global"]


def prefix_of(ip: str) -> str:
    """The /24 of an IPv4 address, the /64 of an IPv6 one, as a key."""
    if ":" not in ip:
        return ip.rpartition(".")[0]
    return socket.inet_pton(socket.AF_INET6, ip.partition("%")[0])[:8].hex()


@record(slots=True)
class _Entry:
    ip: str
    prefix: str
    known: bool
    verified: bool
    since: float


class HalfOpenBook(Generic[K]):
    """The half-open IKE SAs by source, prefix and age, and the admission rules above."""

    def __init__(self, limits: ResponderLimits) -> None:
        self._starts: deque[float] = deque()  # when the last cookie_threshold SAs started
        self.limits = limits
        self._entries: dict[K, _Entry] = {}  # oldest first
        self._sources: dict[str, int] = {}  # verified entries per address
        self._prefixes: dict[str, dict[K, None]] = {}  # verified unknown ones, oldest first
        self._unverified: dict[K, None] = {}  # unknown and unverified, oldest first
        self._unknown = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    @property
    def limits(self) -> ResponderLimits:
        """Replace to apply new limits: they govern the next request (held SAs stay)."""
        return self._limits

    @limits.setter
    def limits(self, limits: ResponderLimits) -> None:
        self._limits = limits
        self._starts = deque(self._starts, maxlen=max(limits.cookie_threshold, 1))

    def cookies_demanded(self, now: float) -> bool:
        """``cookie_threshold`` SAs half-open, or started in the last second."""
        threshold = self._limits.cookie_threshold
        if len(self._entries) >= threshold:
            return True
        starts = self._starts
        return len(starts) >= threshold and now - starts[0] < 1.0

    def admit(
        self, ip: str, *, known: bool, verified: bool, now: float
    ) -> tuple[Refusal, K | None]:
        """May a request from ``ip`` start a half-open SA? ("", None): yes; ("", key):
        yes, once ``key``'s SA is dropped; (reason, None): no."""
        lim = self.limits
        own = 0
        if verified:
            if lim.per_source is not None and self._sources.get(ip, 0) >= lim.per_source:
                return "source", None
            if not known:
                own = len(self._prefixes.get(prefix_of(ip), ()))
                if lim.per_prefix is not None and own >= lim.per_prefix:
                    return "prefix", None
        total = len(self._entries)
        if known:
            if total < lim.half_open_limit:
                return "", None
            victim = self._oldest_unknown()
        else:
            if total < lim.half_open_limit and self._unknown < lim.half_open_limit - lim.reserve:
                return "", None
            victim = self._displaceable(own, now) if verified else None
        return ("", victim) if victim is not None else ("global", None)

    def _oldest_unknown(self) -> K | None:
        for key in self._unverified:
            return key
        return next((k for k, e in self._entries.items() if not e.known), None)

    def _displaceable(self, own: int, now: float) -> K | None:
        old_enough = now - self.limits.guard
        for key in self._unverified:  # the oldest: if it is too young, all are
            if self._entries[key].since <= old_enough:
                return key
            break
        fullest = max(self._prefixes.values(), key=len, default=None)
        if fullest is not None and len(fullest) >= own + 2:
            key = next(iter(fullest))
            if self._entries[key].since <= old_enough:
                return key
        return None

    def add(self, key: K, ip: str, *, known: bool, verified: bool, now: float) -> None:
        entry = _Entry(ip, prefix_of(ip), known, verified, now)
        self._entries[key] = entry
        self._starts.append(now)
        if verified:
            self._sources[ip] = self._sources.get(ip, 0) + 1
        if not known:
            self._unknown += 1
            if verified:
                self._prefixes.setdefault(entry.prefix, {})[key] = None
            else:
                self._unverified[key] = None

    def remove(self, key: K) -> None:
        entry = self._entries.pop(key, None)
        if entry is None:
            return
        if entry.verified:
            left = self._sources[entry.ip] - 1
            if left:
                self._sources[entry.ip] = left
            else:
                del self._sources[entry.ip]
        if not entry.known:
            self._unknown -= 1
            if entry.verified:
                held = self._prefixes[entry.prefix]
                del held[key]
                if not held:
                    del self._prefixes[entry.prefix]
            else:
                del self._unverified[key]

    def summary(self) -> dict[str, int]:
        """Gauges for ``oe status``: how many, from how many sources and prefixes."""
        return {
            "half_open": len(self._entries),
            "half_open_known": len(self._entries) - self._unknown,
            "half_open_unverified": len(self._unverified),
            "half_open_sources": len(self._sources),
            "half_open_prefixes": len(self._prefixes),
            "half_open_largest_prefix": max(map(len, self._prefixes.values()), default=0),
        }
