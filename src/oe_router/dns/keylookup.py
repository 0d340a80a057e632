"""``KeyLookup`` over the in-process DNSSEC validator (dnssec.py) and IPSECKEY parser.

Why an adapter: the hold core speaks ``KeyResult`` (status + usable keys) and must
not know about RRsets or RRSIGs. This drives a ``dnssec.Validation`` with queries
sent through the front's own ``upstream.UpstreamClient`` (same upstreams, same
resolv_file, same timeouts) and turns the validated IPSECKEY RRset into
``PeerKey``s. Keys are only extracted from a SECURE answer; every other status
comes back with no keys at all.

Failures (BOGUS, INDETERMINATE) are remembered for ``failure_ttl`` seconds, as RFC
9520 asks (at least 1 s): a broken zone must not cost an upstream round trip for
every A query of every LAN client. SECURE/INSECURE results are cached by the
validator itself, by TTL.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable

import dns.flags
import dns.message
import dns.name
import dns.rdatatype

from oe_router.dns.dnssec import Query, Status, TrustAnchors, ValidationCache, Validator
from oe_router.dns.hold import KeyResult, KeyStatus
from oe_router.dns.ipseckey import DEFAULT_MIN_RSA_BITS, interpret_rrset
from oe_router.dns.upstream import UpstreamClient, UpstreamError

__all__ = ["ValidatingKeyLookup"]

log = logging.getLogger("oe_router.dns.keylookup")

_STATUS = {
    Status.SECURE: KeyStatus.SECURE,
    Status.INSECURE: KeyStatus.INSECURE,
    Status.BOGUS: KeyStatus.BOGUS,
    Status.INDETERMINATE: KeyStatus.INDETERMINATE,
}
_PAYLOAD = 1232  # DNS flag day 2020 EDNS0 size


class ValidatingKeyLookup:
    """Fetch and validate ``name IPSECKEY`` from the trust anchors; never trust AD."""

    def __init__(
        self,
        anchors: TrustAnchors,
        upstream: UpstreamClient,
        clock: Callable[[], float] = time.time,
        cache: ValidationCache | None = None,
        min_rsa_bits: int = DEFAULT_MIN_RSA_BITS,
        failure_ttl: float = 5.0,
        max_failures: int = 1024,
    ) -> None:
        self.validator = Validator(anchors, cache=cache or ValidationCache())
        self.upstream = upstream
        self._clock = clock
        self._min_rsa_bits = min_rsa_bits
        self._failure_ttl = failure_ttl
        self._max_failures = max_failures
        self._failures: OrderedDict[dns.name.Name, tuple[float, KeyResult]] = OrderedDict()

    async def _ask(self, query: Query) -> dns.message.Message | None:
        msg = dns.message.make_query(
            query.qname, query.rdtype, use_edns=0, want_dnssec=query.do, payload=_PAYLOAD
        )
        if query.cd:
            msg.flags |= dns.flags.CD
        try:
            return await self.upstream.resolve(msg)
        except UpstreamError as exc:
            log.info("validator query %s: %s", query, exc)
            return None

    async def lookup(self, name: dns.name.Name) -> KeyResult:
        name = name.canonicalize()
        now = self._clock()
        remembered = self._failures.get(name)
        if remembered is not None:
            if remembered[0] > now:
                return remembered[1]
            del self._failures[name]
        result = await self._validate(name)
        if result.status in (KeyStatus.BOGUS, KeyStatus.INDETERMINATE) and self._failure_ttl > 0:
            self._failures[name] = (self._clock() + self._failure_ttl, result)
            while len(self._failures) > self._max_failures:
                self._failures.popitem(last=False)
        return result

    async def _validate(self, name: dns.name.Name) -> KeyResult:
        validation = self.validator.start(name, dns.rdatatype.IPSECKEY, self._clock())
        action = validation.action
        while isinstance(action, Query):
            action = validation.feed(await self._ask(action), now=self._clock())
        result = action
        status = _STATUS[result.status]
        if status is not KeyStatus.SECURE:
            return KeyResult(status, (), result.reason)
        if result.rrset is None or result.rrset.rdtype != dns.rdatatype.IPSECKEY:
            denial = result.denial.value if result.denial is not None else "no IPSECKEY"
            return KeyResult(KeyStatus.SECURE, (), f"{denial}: {result.reason}")
        keys = interpret_rrset(result.rrset, owner=name, min_rsa_bits=self._min_rsa_bits)
        for error in keys.errors:
            log.warning("%s", error.message)
        for warning in keys.warnings:
            log.warning("%s", warning.message)
        if not keys.keys:
            return KeyResult(KeyStatus.SECURE, (), f"no usable IPSECKEY at {name}")
        return KeyResult(KeyStatus.SECURE, keys.keys, result.reason)
