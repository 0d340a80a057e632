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

import base64
import enum
import math
from collections import OrderedDict
from collections.abc import Callable, Generator, Iterable, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any, NoReturn

import dns.dnssec
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdataset
import dns.rdatatype
import dns.rrset
import dns.zonefile
from dns.rdatatype import RdataType

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
    "load_trust_anchor_file",
    "load_trust_anchors",
]

#: RSA/SHA-256, ECDSA P-256/SHA-256, Ed25519 (DNSSEC algorithm numbers).
SUPPORTED_ALGORITHMS = frozenset({8, 13, 15})
#: SHA-256 and SHA-384 DS digests.
SUPPORTED_DIGESTS = frozenset({2, 4})
#: Failed (RRSIG, DNSKEY) verifications one validation run may spend before it is BOGUS.
#: Why: KeyTrap (CVE-2023-50387) makes a validator try every signature with every
#: key that carries its key tag; a 64 KB reply holds thousands of each. The fixed
#: resolvers stop early: BIND 9.16.48/9.18.24 give up on the first failed
#: verification, BIND 9.20 made that `max-validation-failures-per-fetch` (default 1);
#: unbound 1.19.1 allows `MAX_VALIDATE_RRSIGS` 8 attempts per RRset and
#: `MAX_DS_MATCH_FAILURES` 4. A run here spans the whole chain (up to
#: `Validator.max_queries` replies), so it gets 8: an honest chain fails none.
MAX_SIGNATURE_FAILURES = 8
#: Public-key operations (successful or not) one validation run may spend.
#: Why: validly signed junk (hundreds of NSEC RRsets in one reply) costs as much
#: as bogus signatures. Knot Resolver 5.7.1 bounds crypto validations per request
#: (`vld_limit_crypto`), BIND 9.20 per fetch (`max-validations-per-fetch`, 16),
#: unbound 1.19.1 validates `MAX_VALIDATE_AT_ONCE` 8 RRsets before suspending, at
#: most `MAX_VALIDATION_SUSPENDS` 16 times. An honest run here costs 2 per zone
#: cut, 1-3 per denial and 1 per answer or CNAME: a few to a few dozen.
MAX_SIGNATURE_CHECKS = 64
#: DNSKEYs that may share one (algorithm, key tag) with an RRSIG or a DS; more is
#: BOGUS. Why: a key tag is a 16-bit checksum, so a zone can publish any number of
#: colliding keys and make each RRSIG (or DS digest) try all of them. Honest zones
#: collide by accident only, and rarely (RFC 4034 appendix B); unbound's 8 checks
#: per RRset and its 4 DS match failures allow about the same.
MAX_KEYS_PER_TAG = 4
_NSEC3_SHA1 = 1
_OPT_OUT = 0x01
_REVOKE = 0x0080
_ZONE = 0x0100

Name = dns.name.Name


# --------------------------------------------------------------------------- values


@dataclass(frozen=True)
class Query:
    """A query the validator needs answered by the upstream resolver."""

    qname: Name
    rdtype: RdataType
    do: bool = True  #: set the EDNS DO bit: we need RRSIGs and NSEC(3)s
    cd: bool = True  #: checking disabled: we validate, the upstream must not filter

    def __str__(self) -> str:
        return f"{self.qname}/{dns.rdatatype.to_text(self.rdtype)}"


class Status(enum.Enum):
    """RFC 4033 section 5 security states."""

    SECURE = "secure"
    INSECURE = "insecure"  #: provably unsigned (or only unsupported algorithms)
    BOGUS = "bogus"  #: should be signed but the proof fails: possible attack
    INDETERMINATE = "indeterminate"  #: no anchor covers it, or data could not be fetched


class Denial(enum.Enum):
    NXDOMAIN = "nxdomain"  #: the name does not exist
    NODATA = "nodata"  #: the name exists but has no record of the type


@dataclass(frozen=True)
class Result:
    """Outcome of one validation. Only SECURE data may be trusted for keys."""

    status: Status
    qname: Name  #: the name that was asked
    rdtype: RdataType
    reason: str  #: what was proven, or which zone/record failed and why
    rrset: dns.rrset.RRset | None = None  #: the answer (owner: last CNAME target)
    cnames: tuple[dns.rrset.RRset, ...] = ()  #: validated CNAME links, in order
    denial: Denial | None = None  #: set for proven (or insecure) negative answers
    zone: Name | None = None  #: zone that signed the answer, or where insecurity starts
    ttl: int = 0  #: seconds this result stays valid (clamped to TTLs and RRSIG expiry)
    sig_checks: int = 0  #: public-key operations this run spent (0 for a cached result)
    limited: bool = False  #: BOGUS because a work limit (MAX_SIGNATURE_*) was reached

    @property
    def secure(self) -> bool:
        return self.status is Status.SECURE


class TrustAnchorError(ValueError):
    """The configured trust anchor is unusable; the message names the record."""


@dataclass(frozen=True)
class TrustAnchor:
    name: Name
    ds: tuple[Any, ...] = ()  #: dns.rdtypes.ANY.DS.DS rdatas
    dnskeys: tuple[Any, ...] = ()  #: dns.rdtypes.ANY.DNSKEY.DNSKEY rdatas


@dataclass(frozen=True)
class TrustAnchors:
    anchors: tuple[TrustAnchor, ...]

    def closest(self, name: Name) -> TrustAnchor | None:
        """The deepest anchor at or above `name`."""
        best: TrustAnchor | None = None
        for anchor in self.anchors:
            if name.is_subdomain(anchor.name) and (
                best is None or len(anchor.name) > len(best.name)
            ):
                best = anchor
        return best


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
                if not key.flags & _ZONE or key.protocol != 3:
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


def key_tag(key: Any) -> int:
    return int(dns.dnssec.key_id(key))


# --------------------------------------------------------------------------- cache


class ValidationCache:
    """Validated zones, cut decisions and final results, each with an expiry.

    Keyed by (kind, name, type); `now` is always passed in. Oldest entries go
    first when full. Only SECURE/INSECURE facts are stored, never BOGUS.
    """

    def __init__(self, max_entries: int = 4096) -> None:
        self._max = max_entries
        self._data: OrderedDict[tuple[str, Name, int], tuple[float, object]] = OrderedDict()

    def get(self, key: tuple[str, Name, int], now: float) -> object | None:
        item = self._data.get(key)
        if item is None:
            return None
        expires, value = item
        if expires <= now:
            del self._data[key]
            return None
        self._data.move_to_end(key)
        return value

    def put(self, key: tuple[str, Name, int], value: object, expires: float, now: float) -> None:
        if expires <= now:
            return
        self._data[key] = (expires, value)
        self._data.move_to_end(key)
        while len(self._data) > self._max:
            self._data.popitem(last=False)

    def __len__(self) -> int:
        return len(self._data)

    def clear(self) -> None:
        self._data.clear()


# --------------------------------------------------------------------------- internals


class _Abort(Exception):
    """Ends a validation early with a final status (never escapes the module)."""

    def __init__(
        self, status: Status, reason: str, zone: Name | None = None, limit: bool = False
    ) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.zone = zone
        self.limit = limit  #: a work limit ended the run: never caught and retried


@dataclass(frozen=True)
class _Zone:
    """Where a name lives: a secure zone with its trusted DNSKEYs, or insecurity."""

    name: Name
    secure: bool
    keys: dns.rdataset.Rdataset | None = None
    reason: str = ""
    expires: float = math.inf

    @cached_property
    def by_tag(self) -> dict[tuple[int, int], tuple[Any, ...]]:
        """Zone keys by (algorithm, key tag): tags computed once per key set, not per RRSIG."""
        return _index_keys(self.keys or ())


class _Step(enum.Enum):
    CUT = "cut"
    NOT_CUT = "not-cut"
    INSECURE = "insecure"
    NXDOMAIN = "nxdomain"


@dataclass(frozen=True)
class _DsStep:
    kind: _Step
    ds: tuple[Any, ...] = ()
    reason: str = ""
    expires: float = math.inf


class _Proof(enum.Enum):
    NODATA = "nodata"
    NXDOMAIN = "nxdomain"
    OPTOUT = "optout"  #: an opt-out span covers the name: nothing is proven


@dataclass(frozen=True)
class _ProofResult:
    kind: _Proof
    has_ns: bool = False  #: NODATA at a delegation point (NS without SOA)
    note: str = ""


def _index_keys(keys: Iterable[Any]) -> dict[tuple[int, int], tuple[Any, ...]]:
    """Zone keys (protocol 3) grouped by (algorithm, key tag)."""
    out: dict[tuple[int, int], list[Any]] = {}
    for k in keys:
        if k.flags & _ZONE and k.protocol == 3:
            out.setdefault((k.algorithm, key_tag(k)), []).append(k)
    return {tag: tuple(found) for tag, found in out.items()}


def _tname(rdtype: int) -> str:
    return dns.rdatatype.to_text(RdataType.make(rdtype))


def _types(rdata: Any) -> set[int]:
    """The type bitmap of an NSEC/NSEC3 rdata as a set of type numbers."""
    out: set[int] = set()
    for window, bitmap in rdata.windows:
        for i, byte in enumerate(bitmap):
            for bit in range(8):
                if byte & (0x80 >> bit):
                    out.add(window * 256 + i * 8 + bit)
    return out


def _label_count(name: Name) -> int:
    """RRSIG labels value for an owner name (root and a leading '*' not counted)."""
    n = len(name) - 1
    if name.is_wild():
        n -= 1
    return n


def _common(a: Name, b: Name) -> Name:
    _, _, nlabels = a.fullcompare(b)
    return Name(a.labels[len(a.labels) - nlabels :])


def _covers(owner: Name, nxt: Name, name: Name) -> bool:
    """NSEC span test in canonical order, including the wrap-around last span."""
    if owner < nxt:
        return bool(owner < name < nxt)
    return bool(name > owner or name < nxt)


def _hcovers(owner: bytes, nxt: bytes, h: bytes) -> bool:
    if owner < nxt:
        return owner < h < nxt
    return h > owner or h < nxt


class _Engine:
    """One validation run: mutable per-run state, fed by `Validation`."""

    def __init__(self, v: Validator, qname: Name, rdtype: RdataType, now: float) -> None:
        self.v = v
        self.qname = qname
        self.rdtype = rdtype
        self.now = now
        self.queries = 0
        self.expires = math.inf
        self.sig_checks = 0  #: public-key operations spent (MAX_SIGNATURE_CHECKS)
        self.sig_failures = 0  #: of which failed (MAX_SIGNATURE_FAILURES)

    # -- helpers ----------------------------------------------------------------

    def _clamp(self, expires: float) -> None:
        self.expires = min(self.expires, expires)

    def ask(self, qname: Name, rdtype: RdataType) -> Generator[Query, Any, dns.message.Message]:
        if self.queries >= self.v.max_queries:
            raise _Abort(
                Status.INDETERMINATE,
                f"gave up after {self.queries} queries while validating {self.qname}",
            )
        self.queries += 1
        query = Query(qname, rdtype)
        msg = yield query
        if msg is None:
            raise _Abort(Status.INDETERMINATE, f"no answer from upstream for {query}")
        if not isinstance(msg, dns.message.Message) or not msg.flags & dns.flags.QR:
            raise _Abort(Status.INDETERMINATE, f"upstream reply for {query} is not a response")
        if len(msg.question) != 1:
            raise _Abort(Status.INDETERMINATE, f"upstream reply for {query} has no single question")
        q = msg.question[0]
        if q.name != qname or q.rdtype != rdtype or q.rdclass != dns.rdataclass.IN:
            raise _Abort(Status.INDETERMINATE, f"upstream reply does not match query {query}")
        rcode = msg.rcode()
        if rcode not in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
            raise _Abort(
                Status.INDETERMINATE,
                f"upstream answered {dns.rcode.to_text(rcode)} for {query}",
            )
        return msg

    def verify(
        self, rrset: dns.rrset.RRset, sigs: dns.rrset.RRset | None, zone: _Zone, what: str
    ) -> Any:
        """Check `rrset` against RRSIGs by `zone`'s keys; return the RRSIG used."""
        assert zone.keys is not None
        label = f"{what} {rrset.name}/{_tname(rrset.rdtype)}"
        if sigs is None or len(sigs) == 0:
            raise _Abort(Status.BOGUS, f"{label}: missing RRSIG in secure zone {zone.name}")
        by_zone = [s for s in sigs if s.signer == zone.name]
        if not by_zone:
            signers = ", ".join(sorted({str(s.signer) for s in sigs}))
            raise _Abort(
                Status.BOGUS,
                f"{label}: signed by {signers}, but the data belongs to zone {zone.name}",
                zone.name,
            )
        owner_labels = _label_count(rrset.name)
        problems: list[str] = []
        skew = self.v.clock_skew
        for sig in by_zone:
            if sig.type_covered != rrset.rdtype:
                continue
            if sig.algorithm not in SUPPORTED_ALGORITHMS:
                problems.append(f"RRSIG algorithm {sig.algorithm} unsupported")
                continue
            if sig.labels > owner_labels:
                problems.append(f"RRSIG labels {sig.labels} > owner labels {owner_labels}")
                continue
            if sig.expiration + skew < self.now:
                problems.append(f"RRSIG (key {sig.key_tag}) expired at {sig.expiration}")
                continue
            if sig.inception - skew > self.now:
                problems.append(f"RRSIG (key {sig.key_tag}) not valid before {sig.inception}")
                continue
            cands = [
                k
                for k in zone.by_tag.get((sig.algorithm, sig.key_tag), ())
                if not (k.flags & _REVOKE and rrset.rdtype != dns.rdatatype.DNSKEY)
            ]
            if not cands:
                problems.append(f"no DNSKEY {sig.key_tag}/alg {sig.algorithm} in {zone.name}")
                continue
            if len(cands) > self.v.max_keys_per_tag:
                self._limit(
                    f"{len(cands)} DNSKEYs of {zone.name} share key tag {sig.key_tag} "
                    f"(limit {self.v.max_keys_per_tag})",
                    zone.name,
                )
            inside = min(max(self.now, float(sig.inception)), float(sig.expiration))
            failed = ""
            for key in cands:
                failed = self._check(rrset, sig, key, zone.name, inside)
                if not failed:
                    ttl = min(rrset.ttl, sig.original_ttl)
                    self._clamp(min(self.now + ttl, float(sig.expiration)))
                    return sig
            problems.append(f"signature by key {sig.key_tag} does not verify ({failed})")
        if len(problems) > 3:
            problems[3:] = [f"{len(problems) - 3} more"]
        detail = "; ".join(problems) if problems else "no RRSIG covers the type"
        raise _Abort(Status.BOGUS, f"{label} in zone {zone.name}: {detail}", zone.name)

    def _check(self, rrset: dns.rrset.RRset, sig: Any, key: Any, signer: Name, when: float) -> str:
        """One public-key operation within the run's budget: "" if `key` made `sig`, else why."""
        if self.sig_checks >= self.v.max_signature_checks:
            self._limit(f"{self.sig_checks} signature checks", signer)
        self.sig_checks += 1
        keyset = dns.rdataset.from_rdata_list(0, [key])
        try:
            dns.dnssec.validate_rrsig(rrset, sig, {signer: keyset}, now=when)
        except (dns.exception.DNSException, ValueError) as exc:
            self.sig_failures += 1
            if self.sig_failures >= self.v.max_signature_failures:
                self._limit(f"{self.sig_failures} failed signature checks", signer)
            return str(exc) or type(exc).__name__
        return ""

    def _limit(self, what: str, zone: Name | None) -> NoReturn:
        raise _Abort(
            Status.BOGUS,
            f"validation work limit reached validating {self.qname}/{_tname(self.rdtype)}: {what}",
            zone,
            limit=True,
        )

    # -- chain of trust ---------------------------------------------------------

    def zone_keys(
        self, name: Name, ds: Sequence[Any], anchor_keys: Sequence[Any] = ()
    ) -> Generator[Query, Any, _Zone]:
        """Fetch `name`'s DNSKEY set and trust it via DS (or anchor keys)."""
        cached = self.v.cache.get(("zone", name, 0), self.now)
        if isinstance(cached, _Zone):
            self._clamp(cached.expires)
            return cached
        if ds:
            usable_ds = [
                d
                for d in ds
                if d.digest_type in SUPPORTED_DIGESTS and d.algorithm in SUPPORTED_ALGORITHMS
            ]
            if not usable_ds:
                return _Zone(
                    name,
                    False,
                    reason=f"DS of {name} uses only unsupported algorithms/digests",
                )
        else:
            usable_anchor = [k for k in anchor_keys if k.algorithm in SUPPORTED_ALGORITHMS]
            if not usable_anchor:
                return _Zone(
                    name, False, reason=f"trust anchor keys of {name} use unsupported algorithms"
                )
        msg = yield from self.ask(name, dns.rdatatype.DNSKEY)
        rrset = msg.get_rrset(msg.answer, name, dns.rdataclass.IN, dns.rdatatype.DNSKEY)
        sigs = msg.get_rrset(
            msg.answer, name, dns.rdataclass.IN, dns.rdatatype.RRSIG, dns.rdatatype.DNSKEY
        )
        if rrset is None or len(rrset) == 0:
            raise _Abort(Status.BOGUS, f"zone {name}: no DNSKEY set returned", name)
        if ds:
            trusted = self._ds_trusted(name, rrset, usable_ds)
            if not trusted:
                tags = ", ".join(str(d.key_tag) for d in usable_ds)
                raise _Abort(
                    Status.BOGUS, f"zone {name}: no DNSKEY matches its DS (key tags {tags})", name
                )
        else:
            trusted = [k for k in rrset if k in usable_anchor]
            if not trusted:
                raise _Abort(Status.BOGUS, f"zone {name}: trust anchor key not in DNSKEY set", name)
        before = self.expires
        self.expires = math.inf
        self.verify(
            rrset, sigs, _Zone(name, True, dns.rdataset.from_rdata_list(0, trusted)), "DNSKEY"
        )
        expires = self.expires
        self.expires = min(before, expires)
        zone = _Zone(name, True, keys=rrset.to_rdataset(), expires=expires)
        return zone

    def _ds_trusted(
        self, name: Name, rrset: dns.rrset.RRset, usable_ds: Sequence[Any]
    ) -> list[Any]:
        """The DNSKEYs some DS matches; each key is hashed at most once per digest type."""
        by_tag = _index_keys(k for k in rrset if not k.flags & _REVOKE)
        digests: dict[tuple[int, int], bytes | None] = {}
        trusted: dict[int, Any] = {}
        for d in usable_ds:
            cands = by_tag.get((d.algorithm, d.key_tag), ())
            if len(cands) > self.v.max_keys_per_tag:
                self._limit(
                    f"{len(cands)} DNSKEYs of {name} share DS key tag {d.key_tag} "
                    f"(limit {self.v.max_keys_per_tag})",
                    name,
                )
            for key in cands:
                memo = (id(key), d.digest_type)
                if memo not in digests:
                    try:
                        digests[memo] = dns.dnssec.make_ds(name, key, d.digest_type).digest
                    except (dns.exception.DNSException, ValueError):
                        digests[memo] = None
                if digests[memo] == d.digest:
                    trusted[id(key)] = key
        return list(trusted.values())

    def anchor_zone(self, name: Name) -> Generator[Query, Any, _Zone]:
        anchor = self.v.anchors.closest(name)
        if anchor is None:
            raise _Abort(Status.INDETERMINATE, f"no trust anchor covers {name}")
        zone = yield from self.zone_keys(anchor.name, anchor.ds, anchor.dnskeys)
        if zone.secure:
            self.v.cache.put(("zone", zone.name, 0), zone, zone.expires, self.now)
        return zone

    def zone_for(self, target: Name) -> Generator[Query, Any, _Zone]:
        """The deepest secure zone holding `target`, or the insecure cut above it."""
        zone = yield from self.anchor_zone(target)
        if not zone.secure:
            return zone
        depth = len(zone.name)
        while depth < len(target):
            depth += 1
            name = Name(target.labels[len(target.labels) - depth :])
            step = yield from self.ds_step(zone, name)
            self._clamp(step.expires)
            if step.kind is _Step.NXDOMAIN:
                break
            if step.kind is _Step.NOT_CUT:
                continue
            if step.kind is _Step.INSECURE:
                return _Zone(name, False, reason=step.reason, expires=step.expires)
            child = yield from self.zone_keys(name, step.ds)
            if not child.secure:
                return child
            self.v.cache.put(("zone", child.name, 0), child, child.expires, self.now)
            zone = child
        return zone

    def ds_step(self, parent: _Zone, name: Name) -> Generator[Query, Any, _DsStep]:
        """Is `name` a zone cut below `parent`, and is it signed? (proven)."""
        key = ("ds", name, 0)
        cached = self.v.cache.get(key, self.now)
        if isinstance(cached, _DsStep):
            return cached
        outer = self.expires
        self.expires = math.inf
        step = yield from self._ds_step(parent, name)
        step = replace(step, expires=min(step.expires, self.expires))
        self.expires = outer
        self.v.cache.put(key, step, step.expires, self.now)
        return step

    def _ds_step(self, parent: _Zone, name: Name) -> Generator[Query, Any, _DsStep]:
        msg = yield from self.ask(name, dns.rdatatype.DS)
        ds = msg.get_rrset(msg.answer, name, dns.rdataclass.IN, dns.rdatatype.DS)
        if ds is not None and len(ds) > 0 and msg.rcode() == dns.rcode.NOERROR:
            sigs = msg.get_rrset(
                msg.answer, name, dns.rdataclass.IN, dns.rdatatype.RRSIG, dns.rdatatype.DS
            )
            self.verify(ds, sigs, parent, "DS")
            usable = [
                d
                for d in ds
                if d.digest_type in SUPPORTED_DIGESTS and d.algorithm in SUPPORTED_ALGORITHMS
            ]
            if not usable:
                return _DsStep(
                    _Step.INSECURE,
                    reason=f"DS of {name} uses only unsupported algorithms/digests",
                )
            return _DsStep(_Step.CUT, ds=tuple(ds))
        cname = msg.get_rrset(msg.answer, name, dns.rdataclass.IN, dns.rdatatype.CNAME)
        if cname is not None and len(cname) > 0:
            sigs = msg.get_rrset(
                msg.answer, name, dns.rdataclass.IN, dns.rdatatype.RRSIG, dns.rdatatype.CNAME
            )
            self.verify(cname, sigs, parent, "CNAME")
            return _DsStep(_Step.NOT_CUT)
        proof = self.denial(msg, name, dns.rdatatype.DS, parent)
        if proof.kind is _Proof.NXDOMAIN:
            return _DsStep(_Step.NXDOMAIN)
        if proof.kind is _Proof.OPTOUT:
            return _DsStep(
                _Step.INSECURE,
                reason=f"no secure DS denial for {name} in {parent.name} ({proof.note})",
            )
        if proof.has_ns:
            return _DsStep(
                _Step.INSECURE, reason=f"unsigned delegation from {parent.name} to {name}"
            )
        return _DsStep(_Step.NOT_CUT)

    # -- denial of existence ----------------------------------------------------

    def denial(
        self, msg: dns.message.Message, qname: Name, rdtype: RdataType, zone: _Zone
    ) -> _ProofResult:
        """Prove NXDOMAIN/NODATA for qname/rdtype from `zone`'s signed NSEC(3)s."""
        want_nx = msg.rcode() == dns.rcode.NXDOMAIN
        nsecs: list[tuple[Name, Any]] = []
        nsec3s: list[tuple[Name, Any]] = []
        failures: list[str] = []
        for rrset in msg.authority:
            if rrset.rdtype not in (dns.rdatatype.NSEC, dns.rdatatype.NSEC3):
                continue
            if not rrset.name.is_subdomain(zone.name):
                continue
            sigs = msg.get_rrset(
                msg.authority, rrset.name, dns.rdataclass.IN, dns.rdatatype.RRSIG, rrset.rdtype
            )
            try:
                self.verify(rrset, sigs, zone, _tname(rrset.rdtype))
            except _Abort as exc:
                if exc.limit:
                    raise
                failures.append(exc.reason)
                continue
            target = nsecs if rrset.rdtype == dns.rdatatype.NSEC else nsec3s
            target.extend((rrset.name, rd) for rd in rrset)
        what = "NXDOMAIN" if want_nx else "NODATA"
        label = f"{qname}/{_tname(rdtype)}"
        if not nsecs and not nsec3s:
            detail = "; ".join(failures) if failures else "no NSEC or NSEC3 records"
            raise _Abort(
                Status.BOGUS,
                f"{what} for {label} in zone {zone.name} is unproven: {detail}",
                zone.name,
            )
        result: _ProofResult | None = None
        why = ""
        if nsecs:
            result, why = _nsec_proof(nsecs, qname, rdtype, zone.name, want_nx)
        if result is None and nsec3s:
            result, why = _nsec3_proof(
                nsec3s, qname, rdtype, zone.name, want_nx, self.v.nsec3_max_iterations
            )
        if result is None:
            if failures:
                why = f"{why}; also: {'; '.join(failures)}"
            raise _Abort(
                Status.BOGUS,
                f"{what} for {label} in zone {zone.name} is unproven: {why}",
                zone.name,
            )
        soa = msg.get_rrset(msg.authority, zone.name, dns.rdataclass.IN, dns.rdatatype.SOA)
        if soa is not None and len(soa) > 0:
            self._clamp(self.now + min(soa.ttl, soa[0].minimum))
        return result

    # -- answers ----------------------------------------------------------------

    def run(self) -> Generator[Query, Any, Result]:
        try:
            result = yield from self._run()
        except _Abort as exc:
            result = Result(
                exc.status, self.qname, self.rdtype, exc.reason, zone=exc.zone, limited=exc.limit
            )
        except Exception as exc:  # malformed input that slipped past the checks
            result = Result(
                Status.BOGUS,
                self.qname,
                self.rdtype,
                f"malformed DNS data while validating {self.qname}/{_tname(self.rdtype)}: "
                f"{type(exc).__name__}: {exc}",
            )
        return replace(result, sig_checks=self.sig_checks)

    def _final(self, result: Result) -> Result:
        ttl = max(0, int(self.expires - self.now)) if self.expires != math.inf else 0
        result = replace(result, ttl=ttl)
        if result.status in (Status.SECURE, Status.INSECURE) and ttl > 0:
            key = ("answer", self.qname, int(self.rdtype))
            self.v.cache.put(key, (result, self.now + ttl), self.now + ttl, self.now)
        return result

    def _run(self) -> Generator[Query, Any, Result]:
        cached = self.v.cache.get(("answer", self.qname, int(self.rdtype)), self.now)
        if isinstance(cached, tuple) and isinstance(cached[0], Result):
            hit: Result = cached[0]
            expires = float(cached[1])
            return replace(hit, ttl=max(0, int(expires - self.now)))
        if self.v.anchors.closest(self.qname) is None:
            # the chain's first link is signed by qname's own zone: nothing to ask
            raise _Abort(Status.INDETERMINATE, f"no trust anchor covers {self.qname}")
        name = self.qname
        cnames: list[dns.rrset.RRset] = []
        seen = {name}
        for _ in range(self.v.max_cname + 1):
            msg = yield from self.ask(name, self.rdtype)
            outcome = yield from self._one(msg, name)
            if isinstance(outcome, Result):
                return self._final(replace(outcome, cnames=tuple(cnames)))
            cnames.append(outcome)
            name = outcome[0].target
            if name in seen:
                raise _Abort(Status.BOGUS, f"CNAME loop at {name} while validating {self.qname}")
            seen.add(name)
        raise _Abort(Status.INDETERMINATE, f"CNAME chain from {self.qname} is too long")

    def _insecure(self, zone: _Zone, name: Name, **kw: Any) -> Result:
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
                    raise _Abort(Status.BOGUS, f"CNAME at {name} has {len(cname)} records")
                zone = yield from self.zone_for(name)
                if not zone.secure:
                    return self._insecure(zone, name)
                sigs = msg.get_rrset(
                    msg.answer, name, dns.rdataclass.IN, dns.rdatatype.RRSIG, dns.rdatatype.CNAME
                )
                sig = self.verify(cname, sigs, zone, "CNAME")
                self._wildcard_check(msg, cname, sig, zone)
                return cname
        if answer is not None and len(answer) > 0:
            if msg.rcode() != dns.rcode.NOERROR:
                raise _Abort(Status.BOGUS, f"{name}: answer records with rcode NXDOMAIN")
            zone = yield from self.zone_for(name)
            if not zone.secure:
                return self._insecure(zone, name, rrset=answer)
            sigs = msg.get_rrset(msg.answer, name, dns.rdataclass.IN, dns.rdatatype.RRSIG, rdtype)
            sig = self.verify(answer, sigs, zone, "answer")
            wild = self._wildcard_check(msg, answer, sig, zone)
            how = " (wildcard expansion, closer names proven absent)" if wild else ""
            return Result(
                Status.SECURE,
                self.qname,
                rdtype,
                f"{name}/{_tname(rdtype)} signed by {zone.name}, chain to anchor verified{how}",
                rrset=answer,
                zone=zone.name,
            )
        zone = yield from self.zone_for(name)
        kind = Denial.NXDOMAIN if msg.rcode() == dns.rcode.NXDOMAIN else Denial.NODATA
        if not zone.secure:
            return self._insecure(zone, name, denial=kind)
        proof = self.denial(msg, name, rdtype, zone)
        if proof.kind is _Proof.OPTOUT:
            return Result(
                Status.INSECURE,
                self.qname,
                rdtype,
                f"{name} falls in an NSEC3 opt-out span of {zone.name}: {proof.note}",
                denial=kind,
                zone=zone.name,
            )
        proven = Denial.NXDOMAIN if proof.kind is _Proof.NXDOMAIN else Denial.NODATA
        return Result(
            Status.SECURE,
            self.qname,
            rdtype,
            f"{proven.value} for {name}/{_tname(rdtype)} proven by zone {zone.name} ({proof.note})",
            denial=proven,
            zone=zone.name,
        )

    def _wildcard_check(
        self, msg: dns.message.Message, rrset: dns.rrset.RRset, sig: Any, zone: _Zone
    ) -> bool:
        """For an answer synthesized from a wildcard, prove no closer name exists.

        RFC 4035 section 5.3.4, RFC 7129 section 5.3, RFC 5155 section 8.8: the
        RRSIG's labels name the wildcard (*.closest); the denial must show that
        `closest` is the closest encloser of the owner, i.e. that the owner does
        not exist and neither does any name between it and `closest` (an empty
        non-terminal counts as existing).
        """
        owner = rrset.name
        if sig.labels >= _label_count(owner):
            return False
        closest = Name(owner.labels[len(owner.labels) - sig.labels - 1 :])
        if not closest.is_subdomain(zone.name):
            raise _Abort(
                Status.BOGUS,
                f"wildcard answer for {owner}: RRSIG labels {sig.labels} put the wildcard "
                f"above zone {zone.name}",
                zone.name,
            )
        nsecs: list[tuple[Name, Any]] = []
        nsec3s: list[tuple[Name, Any]] = []
        for rr in msg.authority:
            if rr.rdtype not in (dns.rdatatype.NSEC, dns.rdatatype.NSEC3):
                continue
            sigs = msg.get_rrset(
                msg.authority, rr.name, dns.rdataclass.IN, dns.rdatatype.RRSIG, rr.rdtype
            )
            try:
                self.verify(rr, sigs, zone, _tname(rr.rdtype))
            except _Abort as exc:
                if exc.limit:
                    raise
                continue
            (nsecs if rr.rdtype == dns.rdatatype.NSEC else nsec3s).extend(
                (rr.name, rd) for rd in rr
            )
        why = "no signed NSEC or NSEC3 records"
        if nsecs:
            found, why = _nsec_name_error(nsecs, owner, zone.name)
            if found is not None:
                nsec_owner, encloser = found
                if encloser == closest:
                    return True
                why = (
                    f"NSEC {nsec_owner} makes {encloser} the closest encloser, "
                    f"not the wildcard's parent {closest}"
                )
        if nsec3s:
            hashes = _Nsec3Set(nsec3s, zone.name, self.v.nsec3_max_iterations)
            depth = len(closest) + 1
            next_closer = Name(owner.labels[len(owner.labels) - depth :])
            if hashes.usable and hashes.cover(next_closer) is not None:
                return True
            why = f"no NSEC3 covers the next closer name {next_closer}"
        raise _Abort(
            Status.BOGUS,
            f"wildcard answer for {owner} (from *.{closest}) lacks proof that no closer "
            f"name exists: {why}",
            zone.name,
        )


# --------------------------------------------------------------------------- NSEC / NSEC3 proofs


def _nsec_proof(
    nsecs: list[tuple[Name, Any]], qname: Name, rdtype: RdataType, zone: Name, want_nx: bool
) -> tuple[_ProofResult | None, str]:
    """RFC 4035 section 5.4 with RFC 4592 wildcards; (None, why) when unproven."""

    def nodata_ok(owner: Name, rd: Any, label: str) -> tuple[_ProofResult | None, str]:
        types = _types(rd)
        if rdtype in types:
            return None, f"NSEC at {owner} lists {_tname(rdtype)}"
        if dns.rdatatype.CNAME in types and rdtype != dns.rdatatype.CNAME:
            return None, f"NSEC at {owner} lists CNAME"
        delegation = dns.rdatatype.NS in types and dns.rdatatype.SOA not in types
        if rdtype == dns.rdatatype.DS:
            if dns.rdatatype.SOA in types and owner != zone:
                return None, f"NSEC at {owner} is from the child apex, not the parent"
        elif delegation:
            return None, f"NSEC at {owner} is a delegation point, not authoritative data"
        return _ProofResult(_Proof.NODATA, has_ns=delegation, note=label), ""

    if not want_nx:
        for owner, rd in nsecs:
            if owner == qname:
                return nodata_ok(owner, rd, f"NSEC at {owner}")
        for owner, rd in nsecs:
            if _covers(owner, rd.next, qname) and rd.next.is_subdomain(qname) and rd.next != qname:
                return _ProofResult(_Proof.NODATA, note=f"empty non-terminal, NSEC {owner}"), ""
    found, why = _nsec_name_error(nsecs, qname, zone)
    if found is None:
        return None, why
    owner, encloser = found
    wildcard = Name((b"*", *encloser.labels))
    for w_owner, w_rd in nsecs:
        if w_owner == wildcard:
            if want_nx:
                return None, f"wildcard {wildcard} exists, so {qname} is not NXDOMAIN"
            res, why = nodata_ok(w_owner, w_rd, f"NSEC {owner} and wildcard NSEC {wildcard}")
            return res, why
    if not want_nx:
        return None, f"NODATA claimed but NSEC {owner} shows {qname} does not exist"
    for w_owner, w_rd in nsecs:
        if _covers(w_owner, w_rd.next, wildcard):
            return _ProofResult(
                _Proof.NXDOMAIN, note=f"NSEC {owner} covers the name, NSEC {w_owner} the wildcard"
            ), ""
    return None, f"no NSEC proves that wildcard {wildcard} does not exist"


def _nsec_name_error(
    nsecs: list[tuple[Name, Any]], qname: Name, zone: Name
) -> tuple[tuple[Name, Name] | None, str]:
    """The NSEC proving that `qname` does not exist, and the closest encloser it implies.

    RFC 4035 section 5.4, RFC 7129 section 5: the NSEC covers `qname`; it is no
    delegation or DNAME above `qname` (that proves nothing below the cut); its
    next name is not below `qname` (then `qname` is an empty non-terminal, which
    exists). The closest encloser is the longer of the names `qname` shares with
    the NSEC's owner and with its next name. Returns ((owner, encloser), "") or
    (None, why).
    """
    for owner, rd in nsecs:
        if not _covers(owner, rd.next, qname):
            continue
        types = _types(rd)
        if (
            qname.is_subdomain(owner)
            and owner != zone
            and (
                (dns.rdatatype.NS in types and dns.rdatatype.SOA not in types)
                or dns.rdatatype.DNAME in types
            )
        ):
            return None, f"NSEC at {owner} is a delegation/DNAME above {qname}"
        if rd.next.is_subdomain(qname) and rd.next != qname:
            return None, f"NSEC {owner} shows {qname} is an empty non-terminal"
        a, b = _common(qname, owner), _common(qname, rd.next)
        encloser = a if len(a) >= len(b) else b
        if not encloser.is_subdomain(zone):
            encloser = zone
        return (owner, encloser), ""
    return None, f"no NSEC covers {qname}"


class _Nsec3Set:
    """Verified NSEC3 records of one zone with the hash parameters they share."""

    def __init__(self, records: Iterable[tuple[Name, Any]], zone: Name, max_iter: int) -> None:
        self.zone = zone
        self.entries: list[tuple[bytes, Any]] = []
        self.params: tuple[int, bytes] | None = None
        self.too_costly = False
        self.usable = False
        for owner, rd in records:
            if owner.parent() != zone or rd.algorithm != _NSEC3_SHA1:
                continue
            if self.params is None:
                self.params = (rd.iterations, bytes(rd.salt))
            if (rd.iterations, bytes(rd.salt)) != self.params:
                continue
            try:
                h = base64.b32hexdecode(owner.labels[0].upper())
            except ValueError:
                continue
            self.entries.append((h, rd))
        if self.params is not None and self.params[0] > max_iter:
            self.too_costly = True
        self.usable = bool(self.entries) and not self.too_costly
        self._hashes: dict[Name, bytes] = {}

    def hash(self, name: Name) -> bytes:
        assert self.params is not None
        h = self._hashes.get(name)
        if h is None:
            text = dns.dnssec.nsec3_hash(name, self.params[1], self.params[0], _NSEC3_SHA1)
            h = base64.b32hexdecode(text)
            self._hashes[name] = h
        return h

    def match(self, name: Name) -> Any | None:
        h = self.hash(name)
        for owner_hash, rd in self.entries:
            if owner_hash == h:
                return rd
        return None

    def cover(self, name: Name) -> Any | None:
        h = self.hash(name)
        for owner_hash, rd in self.entries:
            if _hcovers(owner_hash, bytes(rd.next), h):
                return rd
        return None

    def closest_encloser(self, qname: Name) -> tuple[Name, Name, Any] | None:
        """RFC 5155 section 8.3: (encloser, next closer, NSEC3 covering next closer)."""
        name, nearer = qname, None
        while name.is_subdomain(self.zone):
            rd = self.match(name)
            if rd is not None:
                types = _types(rd)
                if dns.rdatatype.DNAME in types:
                    return None
                if dns.rdatatype.NS in types and dns.rdatatype.SOA not in types:
                    return None
                if nearer is None:
                    return None
                cov = self.cover(nearer)
                return (name, nearer, cov) if cov is not None else None
            nearer = name
            if name == self.zone:
                break
            name = name.parent()
        return None


def _nsec3_proof(
    records: list[tuple[Name, Any]],
    qname: Name,
    rdtype: RdataType,
    zone: Name,
    want_nx: bool,
    max_iter: int,
) -> tuple[_ProofResult | None, str]:
    """RFC 5155 section 8 proofs; (None, why) when unproven."""
    s = _Nsec3Set(records, zone, max_iter)
    if s.too_costly:
        assert s.params is not None
        return _ProofResult(
            _Proof.OPTOUT, note=f"NSEC3 iterations {s.params[0]} above the limit {max_iter}"
        ), ""
    if not s.usable:
        return None, f"no usable NSEC3 records of zone {zone}"

    def nodata_types(rd: Any, where: str) -> tuple[_ProofResult | None, str]:
        types = _types(rd)
        if rdtype in types or (dns.rdatatype.CNAME in types and rdtype != dns.rdatatype.CNAME):
            return None, f"NSEC3 for {where} lists the type"
        delegation = dns.rdatatype.NS in types and dns.rdatatype.SOA not in types
        if rdtype == dns.rdatatype.DS:
            if dns.rdatatype.SOA in types and where != str(zone):
                return None, f"NSEC3 for {where} is from the child apex"
        elif delegation:
            return None, f"NSEC3 for {where} is a delegation point"
        return _ProofResult(_Proof.NODATA, has_ns=delegation, note=f"NSEC3 matches {where}"), ""

    if not want_nx:
        rd = s.match(qname)
        if rd is not None:
            return nodata_types(rd, str(qname))
    ce = s.closest_encloser(qname)
    if ce is None:
        return None, f"no NSEC3 closest encloser proof for {qname}"
    encloser, nearer, cover = ce
    optout = bool(cover.flags & _OPT_OUT)
    wildcard = Name((b"*", *encloser.labels))
    if not want_nx:
        wild = s.match(wildcard)
        if wild is not None:
            return nodata_types(wild, str(wildcard))
        if rdtype == dns.rdatatype.DS and optout:
            return _ProofResult(_Proof.OPTOUT, note=f"opt-out span covers {nearer}"), ""
        return None, f"NODATA claimed but NSEC3 shows {nearer} does not exist"
    if s.cover(wildcard) is None:
        return None, f"no NSEC3 proves that wildcard {wildcard} does not exist"
    if optout:
        return _ProofResult(_Proof.OPTOUT, note=f"opt-out span covers {nearer}"), ""
    return _ProofResult(
        _Proof.NXDOMAIN, note=f"closest encloser {encloser}, next closer {nearer} covered"
    ), ""


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
        self._engine.now = now
        return self._step(response)


@dataclass
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
