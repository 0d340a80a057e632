"""``KeyLookup`` over the in-process DNSSEC validator (dnssec.py) and IPSECKEY parser.

Why an adapter: the hold core speaks ``KeyResult`` (status + usable keys) and must
not know about RRsets or RRSIGs. ``validate`` is the validator's only asyncio
driver: it sends the validator's queries through the front's own
``upstream.UpstreamClient`` (same upstreams, same resolv_file, same timeouts, one
forwarding client in the whole package). ``ValidatingKeyLookup`` turns the
validated IPSECKEY RRset into ``PeerKey``s. Keys are only extracted from a SECURE
answer; every other status comes back with no keys at all. A SECURE result (the
zone is signed) also carries the name's validated A and AAAA RRsets, so the hold
core binds a key only to its host's proven addresses.

Failures (BOGUS, INDETERMINATE) are remembered for ``failure_ttl`` seconds, as RFC
9520 asks (at least 1 s): a broken zone must not cost an upstream round trip for
every A query of every LAN client. SECURE/INSECURE results are remembered by TTL.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Protocol

import dns.flags
import dns.message
import dns.name
import dns.rdatatype

from oe_router.dns.dnssec import Query, Result, TrustAnchors, ValidationCache, Validator
from oe_router.dns.hold import AddressProof, IPAddress, KeyResult, KeyStatus
from oe_router.dns.ipseckey import DEFAULT_MIN_RSA_BITS, interpret_rrset
from oe_router.dns.upstream import UpstreamError
from oe_router.ratelimit import RateLimit

__all__ = ["Resolving", "ValidatingKeyLookup", "query_message", "validate"]

log = logging.getLogger("oe_router.dns.keylookup")

_PAYLOAD = 1232  # DNS flag day 2020 EDNS0 size


class Resolving(Protocol):
    """What the driver needs from ``upstream.UpstreamClient``; raises UpstreamError."""

    def resolve(self, message: dns.message.Message) -> Awaitable[dns.message.Message]: ...


def query_message(query: Query, payload: int = _PAYLOAD) -> dns.message.QueryMessage:
    """The validator's ``Query`` as a DNS message: EDNS0, DO and CD as it asks."""
    msg = dns.message.make_query(
        query.qname, query.rdtype, use_edns=0, want_dnssec=query.do, payload=payload
    )
    if query.cd:
        msg.flags |= dns.flags.CD
    return msg


async def validate(
    validator: Validator,
    upstream: Resolving,
    qname: dns.name.Name | str,
    rdtype: dns.rdatatype.RdataType | str,
    clock: Callable[[], float] = time.time,
    log_limit: RateLimit | None = None,
) -> Result:
    """Run one validation to completion; a query no upstream answers is fed as None.

    ``log_limit``: how many of its lines may go out (names are the client's choice, so a
    stream of new ones would otherwise write a line each); None: every one."""
    validation = validator.start(qname, rdtype, clock())
    action = validation.action
    while isinstance(action, Query):
        try:
            reply: dns.message.Message | None = await upstream.resolve(query_message(action))
        except UpstreamError as exc:
            if _may_log(log_limit, clock()):
                log.info("validator query %s: %s", action, exc)
            reply = None
        action = validation.feed(reply, now=clock())
    # one line per validation at most; failures are remembered for a while
    if action.limited and _may_log(log_limit, clock()):
        log.warning("DNSSEC: %s", action.reason)
    return action


def _may_log(limit: RateLimit | None, now: float) -> bool:
    """Whether a line may go out; the first after a quiet spell says how many did not."""
    if limit is None:
        return True
    if not limit.allow(now):
        return False
    if suppressed := limit.take_suppressed():
        log.warning("%d more key lookup log lines were suppressed", suppressed)
    return True


class ValidatingKeyLookup:
    """Fetch and validate ``name IPSECKEY`` from the trust anchors; never trust AD.

    Every outcome is remembered: SECURE and INSECURE for the validated TTL,
    BOGUS and INDETERMINATE for ``failure_ttl``. ``cached`` answers from that
    memory without awaiting, so a repeated query costs no task and no validation.
    """

    def __init__(
        self,
        anchors: TrustAnchors,
        upstream: Resolving,
        clock: Callable[[], float] = time.time,
        cache: ValidationCache | None = None,
        min_rsa_bits: int = DEFAULT_MIN_RSA_BITS,
        failure_ttl: float = 5.0,
        max_remembered: int = 4096,
    ) -> None:
        self.validator = Validator(anchors, cache=cache or ValidationCache())
        self.upstream = upstream
        self._clock = clock
        self._min_rsa_bits = min_rsa_bits
        self._failure_ttl = failure_ttl
        self._max_remembered = max_remembered
        self._memo: OrderedDict[dns.name.Name, tuple[float, KeyResult]] = OrderedDict()
        self._log_limit = RateLimit(burst=10)

    def set_anchors(self, anchors: TrustAnchors) -> None:
        """Validate from ``anchors`` from now on (RFC 5011 moved a key). What was proven
        from the old ones is forgotten: a revoked key must not vouch for a cached chain."""
        self.validator.anchors = anchors
        self.validator.cache.clear()
        self._memo.clear()

    def cached(self, name: dns.name.Name) -> KeyResult | None:
        """The remembered result for ``name`` if still valid, else None (then ``lookup``)."""
        item = self._memo.get(name)  # Name hashes and compares case-insensitively
        if item is None:
            return None
        if item[0] <= self._clock():
            del self._memo[name]
            return None
        return item[1]

    async def lookup(self, name: dns.name.Name) -> KeyResult:
        name = name.canonicalize()
        remembered = self.cached(name)
        if remembered is not None:
            return remembered
        result, ttl = await self._validate(name)
        if result.status in (KeyStatus.BOGUS, KeyStatus.INDETERMINATE):
            ttl = self._failure_ttl
        if ttl > 0:
            self._memo[name] = (self._clock() + ttl, result)
            self._memo.move_to_end(name)
            while len(self._memo) > self._max_remembered:
                self._memo.popitem(last=False)
        return result

    async def _validate(self, name: dns.name.Name) -> tuple[KeyResult, float]:
        """The key result and how long the validation said it stays valid."""
        result = await validate(
            self.validator,
            self.upstream,
            name,
            dns.rdatatype.IPSECKEY,
            self._clock,
            self._log_limit,
        )
        status, ttl = result.status, float(result.ttl)
        if status is not KeyStatus.SECURE:
            return KeyResult(status, (), result.reason), ttl
        # The zone is signed: its A/AAAA answers must be too (the chain is cached now).
        (v4, ttl4), (v6, ttl6) = await asyncio.gather(
            self._addresses(name, dns.rdatatype.A), self._addresses(name, dns.rdatatype.AAAA)
        )
        ttl = min(ttl, ttl4, ttl6)
        if result.rrset is None or result.rrset.rdtype != dns.rdatatype.IPSECKEY:
            denial = result.denial.value if result.denial is not None else "no IPSECKEY"
            reason = f"{denial}: {result.reason}"
            return KeyResult(KeyStatus.SECURE, (), reason, v4=v4, v6=v6, denial=True), ttl
        keys = interpret_rrset(result.rrset, owner=name, min_rsa_bits=self._min_rsa_bits)
        problems = [e.message for e in keys.errors] + [w.message for w in keys.warnings]
        for message in problems:
            if _may_log(self._log_limit, self._clock()):
                log.warning("%s", message)
        if not keys.keys:
            reason = f"no usable IPSECKEY at {name}"
            return KeyResult(KeyStatus.SECURE, (), reason, v4=v4, v6=v6), ttl
        return KeyResult(KeyStatus.SECURE, keys.keys, result.reason, v4=v4, v6=v6), ttl

    async def _addresses(
        self, name: dns.name.Name, rdtype: dns.rdatatype.RdataType
    ) -> tuple[AddressProof, float]:
        """The name's validated A or AAAA RRset, and how long that stays valid."""
        result = await validate(
            self.validator, self.upstream, name, rdtype, self._clock, self._log_limit
        )
        if result.status is not KeyStatus.SECURE:
            return AddressProof(result.status, frozenset(), result.reason), self._failure_ttl
        found: set[IPAddress] = set()
        if result.rrset is not None and result.rrset.rdtype == rdtype:
            found = {ipaddress.ip_address(rd.address) for rd in result.rrset}
        return AddressProof(KeyStatus.SECURE, frozenset(found), result.reason), float(result.ttl)
