"""In-process DNSSEC validation from a configured trust anchor, sans-IO.

Why in-process: an IPSECKEY decides whom we authenticate, so the chain of trust
must be checked here, not taken from an upstream's AD bit. Why sans-IO: the
validator never touches a socket or a clock. It says which query it needs next
(`Query`), is fed the upstream's `dns.message.Message` (or None when none came)
together with `now`, and finally hands back a `Result`. asyncio lives in
`keylookup.validate`, over the package's one forwarding client (`upstream.py`).

Usage::

    validation = validator.start(qname, dns.rdatatype.IPSECKEY, now)
    action = validation.action
    while isinstance(action, Query):
        action = validation.feed(await upstream(action), now=time.time())
    result = action

Scope: DS -> DNSKEY -> RRSIG chains from the anchor through every zone cut
(cuts are found with DS queries, label by label, each answer proven), algorithms
8, 13 and 15, DS digests 2 and 4, NSEC and NSEC3 (closest encloser, opt-out)
denials, wildcard answers, CNAME chains, signature windows with clock skew, TTL
clamping, and a cache of validated keys, cuts and answers. DNAME is not
followed (a DNAME-synthesized CNAME in a signed zone comes out BOGUS).

Work is bounded (KeyTrap, CVE-2023-50387): every (RRSIG, DNSKEY) check is one
public-key operation counted against the run (`MAX_SIGNATURE_CHECKS`,
`MAX_SIGNATURE_FAILURES`), and at most `MAX_KEYS_PER_TAG` keys may share one
key tag with an RRSIG or a DS. Past a limit the run ends BOGUS with
`Result.limited` set; the asyncio driver logs that once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator
from dataclasses import field, replace
from pathlib import Path
from typing import Any

import dns.exception
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import dns.zonefile
from dns.rdatatype import RdataType

from oe_router.records import record

from .dnssec_chain import ChainWalker, Fetcher
from .dnssec_crypto import ZONE_KEY, key_tag
from .dnssec_denial import DenialProver, Proof
from .dnssec_sigs import SignatureChecker
from .dnssec_values import (
    MAX_KEYS_PER_TAG,
    MAX_SIGNATURE_CHECKS,
    MAX_SIGNATURE_FAILURES,
    SUPPORTED_ALGORITHMS,
    SUPPORTED_DIGESTS,
    Abort,
    Denial,
    Name,
    Query,
    Result,
    RunState,
    Status,
    TrustAnchor,
    TrustAnchorError,
    TrustAnchors,
    ValidationCache,
    Zone,
    tname,
)

__all__ = [
    "MAX_KEYS_PER_TAG",
    "MAX_SIGNATURE_CHECKS",
    "MAX_SIGNATURE_FAILURES",
    "SUPPORTED_ALGORITHMS",
    "SUPPORTED_DIGESTS",
    "Denial",
    "Query",
    "Result",
    "Status",
    "TrustAnchor",
    "TrustAnchorError",
    "TrustAnchors",
    "Validation",
    "ValidationCache",
    "Validator",
    "drive",
    "key_tag",
    "load_trust_anchor_file",
    "load_trust_anchors",
]


def load_trust_anchors(text: str, source: str = "trust anchor") -> TrustAnchors:
    """Read DS and/or DNSKEY records in zone-file format (absolute owner names)."""
    try:
        rrsets = dns.zonefile.read_rrsets(text, default_ttl=0, rdclass=None, relativize=False)
    except dns.exception.DNSException as exc:
        raise TrustAnchorError(f"{source}: cannot parse: {exc}") from None
    by_name: dict[Name, tuple[list[Any], list[Any]]] = {}
    for rrset in rrsets:
        what = f"{source}: {rrset.name} {dns.rdatatype.to_text(rrset.rdtype)}"
        if rrset.rdclass != dns.rdataclass.IN:
            raise TrustAnchorError(f"{what}: only class IN is supported")
        ds_list, key_list = by_name.setdefault(rrset.name, ([], []))
        if rrset.rdtype == dns.rdatatype.DS:
            ds_list.extend(rrset)
        elif rrset.rdtype == dns.rdatatype.DNSKEY:
            for key in rrset:
                if not key.flags & ZONE_KEY or key.protocol != 3:
                    raise TrustAnchorError(f"{what}: key {key_tag(key)} is not a zone key")
            key_list.extend(rrset)
        else:
            raise TrustAnchorError(f"{what}: only DS and DNSKEY records can be trust anchors")
    if not by_name:
        raise TrustAnchorError(f"{source}: holds no DS or DNSKEY record")
    return TrustAnchors(
        tuple(TrustAnchor(n, tuple(ds), tuple(keys)) for n, (ds, keys) in by_name.items())
    )


def load_trust_anchor_file(path: str | Path) -> TrustAnchors:
    try:
        text = Path(path).read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise TrustAnchorError(f"trust anchor file {path}: {exc}") from None
    return load_trust_anchors(text, source=f"trust anchor file {path}")


# --------------------------------------------------------------------------- one run


class _Engine:
    """One validation run: follows the answer (CNAMEs, the final RRset or its denial)
    and asks its collaborators, which share the run's `RunState`, for the rest."""

    def __init__(self, v: Validator, qname: Name, rdtype: RdataType, now: float) -> None:
        self.v = v
        self.qname = qname
        self.rdtype = rdtype
        self.state = RunState(v, qname, rdtype, now)  #: `now` and `expires` move
        self.fetch = Fetcher(self.state)
        self.sigs = SignatureChecker(self.state)
        self.denial = DenialProver(self.state, self.sigs)
        self.chain = ChainWalker(self.state, self.fetch, self.sigs, self.denial)

    def run(self) -> Generator[Query, Any, Result]:
        try:
            result = yield from self._run()
        except Abort as exc:
            result = Result(
                exc.status,
                self.qname,
                self.rdtype,
                exc.reason,
                zone=exc.zone,
                limited=exc.limit,
            )
        except Exception as exc:  # malformed input that slipped past the checks
            result = Result(
                Status.BOGUS,
                self.qname,
                self.rdtype,
                f"malformed DNS data while validating {self.qname}/{tname(self.rdtype)}: "
                f"{type(exc).__name__}: {exc}",
            )
        return replace(result, sig_checks=self.sigs.checks)

    def _final(self, result: Result) -> Result:
        ttl = (
            max(0, int(self.state.expires - self.state.now))
            if self.state.expires != math.inf
            else 0
        )
        result = replace(result, ttl=ttl)
        if result.status in (Status.SECURE, Status.INSECURE) and ttl > 0:
            key = ("answer", self.qname, int(self.rdtype))
            self.v.cache.put(
                key, (result, self.state.now + ttl), self.state.now + ttl, self.state.now
            )
        return result

    def _run(self) -> Generator[Query, Any, Result]:
        cached = self.v.cache.get(("answer", self.qname, int(self.rdtype)), self.state.now)
        if isinstance(cached, tuple) and isinstance(cached[0], Result):
            hit: Result = cached[0]
            expires = float(cached[1])
            return replace(hit, ttl=max(0, int(expires - self.state.now)))
        if self.v.anchors.closest(self.qname) is None:
            # the chain's first link is signed by qname's own zone: nothing to ask
            raise Abort(Status.INDETERMINATE, f"no trust anchor covers {self.qname}")
        name = self.qname
        cnames: list[dns.rrset.RRset] = []
        seen = {name}
        for _ in range(self.v.max_cname + 1):
            msg = yield from self.fetch.ask(name, self.rdtype)
            outcome = yield from self._one(msg, name)
            if isinstance(outcome, Result):
                return self._final(replace(outcome, cnames=tuple(cnames)))
            cnames.append(outcome)
            name = outcome[0].target
            if name in seen:
                raise Abort(Status.BOGUS, f"CNAME loop at {name} while validating {self.qname}")
            seen.add(name)
        raise Abort(Status.INDETERMINATE, f"CNAME chain from {self.qname} is too long")

    def _insecure(self, zone: Zone, name: Name, **kw: Any) -> Result:
        return Result(
            Status.INSECURE,
            self.qname,
            self.rdtype,
            f"{name} is in insecure space: {zone.reason}",
            zone=zone.name,
            **kw,
        )

    def _one(
        self, msg: dns.message.Message, name: Name
    ) -> Generator[Query, Any, Result | dns.rrset.RRset]:
        """Validate one response for `name`: a final Result, or a CNAME to follow."""
        rdtype = self.rdtype
        answer = msg.get_rrset(msg.answer, name, dns.rdataclass.IN, rdtype)
        if (answer is None or len(answer) == 0) and rdtype != dns.rdatatype.CNAME:
            cname = msg.get_rrset(msg.answer, name, dns.rdataclass.IN, dns.rdatatype.CNAME)
            if cname is not None and len(cname) > 0:
                if len(cname) != 1:
                    raise Abort(Status.BOGUS, f"CNAME at {name} has {len(cname)} records")
                zone = yield from self.chain.zone_for(name)
                if not zone.secure:
                    return self._insecure(zone, name)
                sigs = msg.get_rrset(
                    msg.answer, name, dns.rdataclass.IN, dns.rdatatype.RRSIG, dns.rdatatype.CNAME
                )
                sig = self.sigs.verify(cname, sigs, zone, "CNAME")
                self.denial.wildcard_check(msg, cname, sig, zone)
                return cname
        if answer is not None and len(answer) > 0:
            if msg.rcode() != dns.rcode.NOERROR:
                raise Abort(Status.BOGUS, f"{name}: answer records with rcode NXDOMAIN")
            zone = yield from self.chain.zone_for(name)
            if not zone.secure:
                return self._insecure(zone, name, rrset=answer)
            sigs = msg.get_rrset(msg.answer, name, dns.rdataclass.IN, dns.rdatatype.RRSIG, rdtype)
            sig = self.sigs.verify(answer, sigs, zone, "answer")
            wild = self.denial.wildcard_check(msg, answer, sig, zone)
            how = " (wildcard expansion, closer names proven absent)" if wild else ""
            return Result(
                Status.SECURE,
                self.qname,
                rdtype,
                f"{name}/{tname(rdtype)} signed by {zone.name}, chain to anchor verified{how}",
                rrset=answer,
                zone=zone.name,
            )
        zone = yield from self.chain.zone_for(name)
        kind = Denial.NXDOMAIN if msg.rcode() == dns.rcode.NXDOMAIN else Denial.NODATA
        if not zone.secure:
            return self._insecure(zone, name, denial=kind)
        proof = self.denial.prove(msg, name, rdtype, zone)
        if proof.kind is Proof.OPTOUT:
            return Result(
                Status.INSECURE,
                self.qname,
                rdtype,
                f"{name} falls in an NSEC3 opt-out span of {zone.name}: {proof.note}",
                denial=kind,
                zone=zone.name,
            )
        proven = Denial.NXDOMAIN if proof.kind is Proof.NXDOMAIN else Denial.NODATA
        return Result(
            Status.SECURE,
            self.qname,
            rdtype,
            f"{proven.value} for {name}/{tname(rdtype)} proven by zone {zone.name} ({proof.note})",
            denial=proven,
            zone=zone.name,
        )


# --------------------------------------------------------------------------- public driver


class Validation:
    """One validation in progress; h11-style: read `action`, `feed` responses."""

    def __init__(self, engine: _Engine) -> None:
        self._engine = engine
        self._gen = engine.run()
        self._action: Query | Result = self._step(None, first=True)

    def _step(self, response: dns.message.Message | None, first: bool = False) -> Query | Result:
        try:
            action = next(self._gen) if first else self._gen.send(response)
        except StopIteration as stop:
            action = stop.value
        self._action = action
        return action

    @property
    def action(self) -> Query | Result:
        """The query to send next, or the final Result."""
        return self._action

    @property
    def result(self) -> Result | None:
        return self._action if isinstance(self._action, Result) else None

    def feed(self, response: dns.message.Message | None, now: float) -> Query | Result:
        """Give the upstream's reply to `action` (None: nothing came) and the time."""
        if isinstance(self._action, Result):
            return self._action
        self._engine.state.now = now
        return self._step(response)


@record
class Validator:
    """Validates answers from a trust anchor; shares one cache across validations."""

    anchors: TrustAnchors
    cache: ValidationCache = field(default_factory=ValidationCache)
    clock_skew: int = 300  #: seconds of slack on RRSIG inception/expiration
    max_queries: int = 48  #: per validation, against amplification loops
    max_cname: int = 8
    nsec3_max_iterations: int = 150  #: RFC 9276: more is treated as insecure
    max_signature_checks: int = MAX_SIGNATURE_CHECKS  #: public-key operations per validation
    max_signature_failures: int = MAX_SIGNATURE_FAILURES  #: failed ones per validation
    max_keys_per_tag: int = MAX_KEYS_PER_TAG  #: keys one RRSIG or DS may have to try

    def start(self, qname: Name | str, rdtype: RdataType | int | str, now: float) -> Validation:
        if isinstance(qname, str):
            qname = dns.name.from_text(qname)
        rdtype = dns.rdatatype.RdataType.make(rdtype)
        return Validation(_Engine(self, qname, rdtype, now))


def drive(
    validation: Validation,
    answer: Callable[[Query], dns.message.Message | None],
    clock: Callable[[], float],
) -> Result:
    """Run a validation to the end with a synchronous `answer` function."""
    action = validation.action
    while isinstance(action, Query):
        action = validation.feed(answer(action), now=clock())
    return action
