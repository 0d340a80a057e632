"""The vocabulary of a DNSSEC validation run, and the state its parts share.

Why a module of its own: one run (`dnssec._Engine`) is done by collaborators, the
chain walker (`dnssec_chain`), the signature checker (`dnssec_sigs`) and the denial
prover (`dnssec_denial`); they all speak these types and share one `RunState`, so
these live below all of them and each imports them without a cycle. The public
names are re-exported by `dnssec`, which stays the one module users import.
"""

from __future__ import annotations

import enum
import math
from collections import OrderedDict
from collections.abc import Iterable
from functools import cached_property
from typing import Any, NoReturn, Protocol

import dns.name
import dns.rdataset
import dns.rdatatype
import dns.rrset
from dns.rdatatype import RdataType

from oe_router.records import record

from .dnssec_crypto import ZONE_KEY, key_tag

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


REVOKE = 0x0080

Name = dns.name.Name

# --------------------------------------------------------------------------- values


@record(frozen=True)
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


@record(frozen=True)
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


@record(frozen=True)
class TrustAnchor:
    name: Name
    ds: tuple[Any, ...] = ()  #: dns.rdtypes.ANY.DS.DS rdatas
    dnskeys: tuple[Any, ...] = ()  #: dns.rdtypes.ANY.DNSKEY.DNSKEY rdatas


@record(frozen=True)
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


class Abort(Exception):
    """Ends a validation early with a final status (never escapes `dnssec._Engine.run`)."""

    def __init__(
        self, status: Status, reason: str, zone: Name | None = None, limit: bool = False
    ) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.zone = zone
        self.limit = limit  #: a work limit ended the run: never caught and retried


@record(frozen=True)
class Zone:
    """Where a name lives: a secure zone with its trusted DNSKEYs, or insecurity."""

    name: Name
    secure: bool
    keys: dns.rdataset.Rdataset | None = None
    reason: str = ""
    expires: float = math.inf

    @cached_property
    def by_tag(self) -> dict[tuple[int, int], tuple[Any, ...]]:
        """Zone keys by (algorithm, key tag): tags computed once per key set, not per RRSIG."""
        return index_keys(self.keys or ())


def index_keys(keys: Iterable[Any]) -> dict[tuple[int, int], tuple[Any, ...]]:
    """Zone keys (protocol 3) grouped by (algorithm, key tag)."""
    out: dict[tuple[int, int], list[Any]] = {}
    for k in keys:
        if k.flags & ZONE_KEY and k.protocol == 3:
            out.setdefault((k.algorithm, key_tag(k)), []).append(k)
    return {tag: tuple(found) for tag, found in out.items()}


def tname(rdtype: int) -> str:
    return dns.rdatatype.to_text(RdataType.make(rdtype))


def label_count(name: Name) -> int:
    """RRSIG labels value for an owner name (root and a leading '*' not counted)."""
    n = len(name) - 1
    if name.is_wild():
        n -= 1
    return n


# --------------------------------------------------------------------------- one run


class Settings(Protocol):
    """What a run reads from its `dnssec.Validator` (declared here: the validator sits above)."""

    anchors: TrustAnchors
    cache: ValidationCache
    clock_skew: int
    max_queries: int
    max_cname: int
    nsec3_max_iterations: int
    max_signature_checks: int
    max_signature_failures: int
    max_keys_per_tag: int


class RunState:
    """What every part of one validation run shares: the question, the settings, the
    time (moved on with each reply) and `expires`, when the facts proven so far stop
    holding (clamped to TTLs and RRSIG expiries, narrowed by whoever proves a fact)."""

    def __init__(self, v: Settings, qname: Name, rdtype: RdataType, now: float) -> None:
        self.v = v
        self.qname = qname
        self.rdtype = rdtype
        self.now = now
        self.expires = math.inf

    def clamp(self, expires: float) -> None:
        self.expires = min(self.expires, expires)

    def limit(self, what: str, zone: Name | None) -> NoReturn:
        """End the run BOGUS: a work limit (MAX_SIGNATURE_*, MAX_KEYS_PER_TAG) was reached."""
        raise Abort(
            Status.BOGUS,
            f"validation work limit reached validating {self.qname}/{tname(self.rdtype)}: {what}",
            zone,
            limit=True,
        )
