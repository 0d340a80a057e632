"""RFC 5011 automated updates of the root trust anchors, sans-IO.

Why: the root zone rolls its key-signing key (KSK-2017 to KSK-2024 now). A router
that shipped with fixed anchors would stop validating the day the old key goes, and
with it every DNS-triggered tunnel. RFC 5011 lets the trust point announce its own
key changes: a new key is accepted only from a DNSKEY RRset signed by a key already
trusted, and only after it was seen there for the add hold-down (30 days), so a
stolen key cannot quietly bring in a key of its own. A key its zone revokes (REVOKE
bit, and a signature by that very key over the RRset) is never trusted again.

Why sans-IO: ``TrustPoint`` never touches a socket, a file or a clock. The daemon's
edge (``autotrust.py``) asks it for the probe query, feeds it the reply with ``now``
(seconds since the epoch: hold-downs outlive restarts), writes ``to_text`` when
``dirty``, and sleeps until ``next_probe``.

Keys are ``Anchor`` values in one of ``KeyState``; every change of state goes through
``TrustPoint._set``, which looks the (state, event) pair up in ``TRANSITIONS``
(RFC 5011 section 4) and logs it. The validator is given the DS of the trusted keys
(Valid and Missing) and nothing else. The probe's DNSKEY RRset is validated by the
package's own validator (dnssec.py) from exactly those anchors; a reply that does not
validate changes nothing, so the last trusted key cannot be lost to a bogus probe.

The state file is zone-file text, one key a line, its state in the comment (declared
once, in ``_FIELDS``)::

    . IN DNSKEY 257 3 8 AwEAAa... ; state=valid since=2026-12-06T06:25:15Z
    . IN DS 38696 8 2 683D2D0A... ; state=valid since=2026-12-06T06:25:15Z

A DS line is a seed whose key was not seen yet. A line without a comment (a plain DS
or DNSKEY file) is a key trusted from now on, so any anchor file can seed a state.
"""

from __future__ import annotations

import enum
import logging
import math
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import field, replace
from typing import Any

import dns.exception
import dns.message
import dns.name
import dns.rdata
import dns.rdataclass
import dns.rdataset
import dns.rdatatype
import dns.rrset
import dns.zonefile

from oe_router.dns.dnssec import (
    SUPPORTED_ALGORITHMS,
    Query,
    Result,
    TrustAnchor,
    TrustAnchors,
    Validator,
    drive,
    key_tag,
)
from oe_router.dns.dnssec_crypto import ds_digest, verify_rrsig
from oe_router.records import record

__all__ = [
    "MAX_KEYS",
    "TRANSITIONS",
    "Anchor",
    "AnchorStateError",
    "Event",
    "KeyState",
    "Timers",
    "TrustPoint",
    "parse_timers",
]

log = logging.getLogger("oe_router.dns.anchors")

ROOT = dns.name.root
IN, DS = dns.rdataclass.IN, dns.rdatatype.DS
DAY = 86400.0
HOUR = 3600.0
_SEP = 0x0001
_REVOKE = 0x0080
_ZONE = 0x0100
_SHA256 = 2  #: DS digest type
#: Keys of the trust point kept at once (Removed ones not counted). Why a bound: the
#: keys come from the network; an honest root has two or three during a rollover.
MAX_KEYS = 8
#: Signatures tried to prove one revocation (each is one public-key operation).
_MAX_REVOKE_CHECKS = 4


class AnchorStateError(ValueError):
    """The state file cannot be used; the message names the file, the line and why."""


class KeyState(enum.Enum):
    """RFC 5011 section 4's states of one trust point key."""

    START = "start"  #: not a trust anchor (yet): a new key, or a pending one that went away
    ADDPEND = "addpend"  #: new key in the add hold-down, not trusted yet
    VALID = "valid"  #: trusted
    MISSING = "missing"  #: trusted, but absent from the last validated DNSKEY RRset
    REVOKED = "revoked"  #: its zone revoked it (self-signed REVOKE bit): never trusted again
    REMOVED = "removed"  #: revoked for longer than the remove hold-down

    @property
    def trusted(self) -> bool:
        return self in (KeyState.VALID, KeyState.MISSING)


class Event(enum.Enum):
    """RFC 5011 section 4's events, as a validated probe or a timer gives them."""

    NEW_KEY = "NewKey"  #: a validated RRset holds a SEP key we did not know
    ADD_TIME = "AddTime"  #: the key was in every validated RRset for the add hold-down
    KEY_REM = "KeyRem"  #: a validated RRset lacks the key
    KEY_PRES = "KeyPres"  #: a missing key is back
    REVBIT = "Revbit"  #: the key is there with REVOKE set, and signed the RRset itself
    REM_TIME = "RemTime"  #: the remove hold-down has passed since the revocation


S, E = KeyState, Event
#: (state, event) -> next state; any other pair changes nothing. RFC 5011 section 4's
#: table, plus Revbit from AddPend and Start: a key its zone revoked with its own
#: signature is dead for every purpose (section 2.1), pending or not, so it must not go
#: back to Start where its hold-down could begin again.
TRANSITIONS: Mapping[tuple[KeyState, Event], KeyState] = {
    (S.START, E.NEW_KEY): S.ADDPEND,
    (S.ADDPEND, E.KEY_REM): S.START,
    (S.ADDPEND, E.ADD_TIME): S.VALID,
    (S.VALID, E.KEY_REM): S.MISSING,
    (S.MISSING, E.KEY_PRES): S.VALID,
    (S.VALID, E.REVBIT): S.REVOKED,
    (S.MISSING, E.REVBIT): S.REVOKED,
    (S.ADDPEND, E.REVBIT): S.REVOKED,
    (S.START, E.REVBIT): S.REVOKED,
    (S.REVOKED, E.REM_TIME): S.REMOVED,
}
del S, E


@record(frozen=True)
class Timers:
    """RFC 5011's hold-downs (section 2.4) and refresh bounds (section 2.3), in seconds.

    The defaults are the RFC's. Shorter values exist for tests only (``parse_timers``,
    from the daemon's environment): a shorter add hold-down is a shorter window in which
    a stolen key's misuse can be noticed.
    """

    add_hold_down: float = 30 * DAY
    remove_hold_down: float = 30 * DAY
    min_refresh: float = HOUR  #: floor of both the query interval and the retry time
    max_refresh: float = 15 * DAY
    max_retry: float = DAY


def parse_timers(text: str) -> Timers:
    """``add_hold_down=3,remove_hold_down=5,min_refresh=1`` (seconds) over the defaults;
    ValueError names the culprit."""
    values: dict[str, float] = {}
    names = {f for f in Timers.__dataclass_fields__}
    for item in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = item.partition("=")
        if name not in names:
            raise ValueError(f"anchor timer {name!r}: unknown (known: {', '.join(sorted(names))})")
        try:
            seconds = float(value)
        except ValueError:
            raise ValueError(f"anchor timer {name}: {value!r} is not seconds") from None
        if not 0 < seconds < math.inf:
            raise ValueError(f"anchor timer {name}: {value!r} is not a positive number")
        values[name] = seconds
    return replace(Timers(), **values)


_ISO = "%Y-%m-%dT%H:%M:%SZ"
_ISO_TEXT = r"(\d{4})-(\d{1,2})-(\d{1,2})T(\d{1,2}):(\d{1,2}):(\d{1,2})Z"  #: compiled on first use
_MONTH_DAYS = (31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)


def _iso(t: float) -> str:
    return time.strftime(_ISO, time.gmtime(int(t)))


def _from_iso(text: str) -> float:
    """The POSIX time of a UTC time written as `_iso` writes it. By hand, not with
    ``datetime`` or ``time.strptime`` (which imports it): ``datetime`` is ~0.2 MB of a
    router's RAM for this one parse (docs/footprint.md)."""
    match = re.fullmatch(_ISO_TEXT, text)
    fields = [int(g) for g in match.groups()] if match else []
    if not fields or not _valid_date(*fields):
        raise ValueError(f"{text!r} is not a UTC time like 2026-12-06T06:25:15Z")
    year, month, day, hour, minute, second = fields
    return float(_days_from_epoch(year, month, day) * 86400 + hour * 3600 + minute * 60 + second)


def _valid_date(year: int, month: int, day: int, hour: int, minute: int, second: int) -> bool:
    if not (year >= 1 and 1 <= month <= 12 and hour < 24 and minute < 60 and second < 60):
        return False
    leap = year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)
    return 1 <= day <= _MONTH_DAYS[month - 1] + (month == 2 and leap)


def _days_from_epoch(year: int, month: int, day: int) -> int:
    """Days from 1970-01-01 to a proleptic Gregorian date (H. Hinnant's days_from_civil)."""
    year -= month <= 2
    era = year // 400
    year_of_era = year - era * 400
    day_of_year = (153 * (month + (-3 if month > 2 else 9)) + 2) // 5 + day - 1
    day_of_era = year_of_era * 365 + year_of_era // 4 - year_of_era // 100 + day_of_year
    return era * 146097 + day_of_era - 719468


def _unrevoked(key: Any) -> Any:
    return key.replace(flags=key.flags & ~_REVOKE) if key.flags & _REVOKE else key


@record(frozen=True)
class Anchor:
    """One key of the trust point: its DS (always), its DNSKEY once seen, its state.

    ``dnskey`` is the key without the REVOKE bit (what the DS was made of). ``since`` is
    when the key entered ``state``; ``until`` the end of an AddPend hold-down.
    """

    ds: Any  #: dns.rdtypes.ANY.DS.DS
    state: KeyState
    since: float
    dnskey: Any = None  #: dns.rdtypes.ANY.DNSKEY.DNSKEY, or None for a seed not seen yet
    until: float | None = None

    @classmethod
    def of_key(cls, key: Any, state: KeyState, since: float) -> Anchor:
        key = _unrevoked(key)
        digest = ds_digest(ROOT, key, _SHA256).hex()
        ds = dns.rdata.from_text(IN, DS, f"{key_tag(key)} {key.algorithm} {_SHA256} {digest}")
        return cls(ds, state, since, key)

    @property
    def key_tag(self) -> int:
        return int(self.ds.key_tag)

    @property
    def algorithm(self) -> int:
        return int(self.ds.algorithm)

    def matches(self, key: Any) -> bool:
        """Whether ``key`` (REVOKE bit cleared) is this anchor's key."""
        if self.dnskey is not None:
            return bool(self.dnskey == key)
        if key.algorithm != self.ds.algorithm or key_tag(key) != self.ds.key_tag:
            return False
        try:
            return bool(ds_digest(ROOT, key, self.ds.digest_type) == self.ds.digest)
        except (dns.exception.DNSException, ValueError):
            return False

    def describe(self) -> str:
        return f"key {self.key_tag} (algorithm {self.algorithm})"


# --------------------------------------------------------------------------- the state file

#: The comment fields of a state line, in order: name, reader, writer (None: left out).
_FIELDS: tuple[tuple[str, Callable[[str], Any], Callable[[Anchor], str | None]], ...] = (
    ("state", lambda v: KeyState(v), lambda a: a.state.value),
    ("since", _from_iso, lambda a: _iso(a.since)),
    ("until", _from_iso, lambda a: None if a.until is None else _iso(math.ceil(a.until))),
)
_HEADER = (
    "; oe-routerd's root trust anchors (RFC 5011), rewritten when a key changes state.\n"
    "; One key a line: DNSKEY once seen, else the DS it was seeded with.\n"
)


def _parse_line(line: str, where: str, now: float) -> Anchor | None:
    record, _, comment = line.partition(";")
    if not record.strip():
        return None
    try:
        rrsets = dns.zonefile.read_rrsets(record, default_ttl=0, rdclass=None, relativize=False)
    except dns.exception.DNSException as exc:
        raise AnchorStateError(f"{where}: not a DS or DNSKEY record ({exc})") from None
    if len(rrsets) != 1 or len(rrsets[0]) != 1:
        raise AnchorStateError(f"{where}: not one DS or DNSKEY record")
    rrset = rrsets[0]
    rdata = rrset[0]
    if rrset.name != ROOT or rrset.rdclass != dns.rdataclass.IN:
        raise AnchorStateError(f"{where}: only the root's keys (. IN) are managed here")
    values: dict[str, Any] = {}
    if comment.strip():
        readers = {name: read for name, read, _ in _FIELDS}
        for word in comment.split():
            name, eq, value = word.partition("=")
            if not eq or name not in readers:
                raise AnchorStateError(f"{where}: {word!r} is not one of {', '.join(readers)}=")
            try:
                values[name] = readers[name](value)
            except ValueError as exc:
                raise AnchorStateError(f"{where}: {name}: {exc}") from None
        if "state" not in values or "since" not in values:
            raise AnchorStateError(f"{where}: a state comment needs state= and since=")
    state = values.get("state", KeyState.VALID)
    since = values.get("since", now)
    if rrset.rdtype == dns.rdatatype.DS:
        return Anchor(rdata, state, since, until=values.get("until"))
    if rrset.rdtype == dns.rdatatype.DNSKEY:
        if not rdata.flags & _ZONE or rdata.protocol != 3:
            raise AnchorStateError(f"{where}: key {key_tag(rdata)} is not a zone key")
        return replace(Anchor.of_key(rdata, state, since), until=values.get("until"))
    raise AnchorStateError(f"{where}: only DS and DNSKEY records can be trust anchors")


# --------------------------------------------------------------------------- the trust point


@record
class TrustPoint:
    """The root's keys and their RFC 5011 states; fed validated DNSKEY probes.

    ``dirty`` says the keys changed since the last ``to_text`` the caller saved (it
    clears it with ``saved``); ``next_probe`` when to probe again (0: at once).
    """

    anchors: list[Anchor]
    timers: Timers = field(default_factory=Timers)
    next_probe: float = 0.0
    dirty: bool = False
    last_probe: str = "none yet"  #: what the last probe found, for ``oe status``
    _ttl: float | None = None  #: the root DNSKEY RRset's original TTL, last seen
    _expires: float | None = None  #: when its latest RRSIG expires, last seen
    _failure: str = ""  #: why the last probe failed ("" if it did not)

    # -- the file -------------------------------------------------------------

    @classmethod
    def from_text(
        cls, text: str, source: str, now: float, timers: Timers | None = None
    ) -> TrustPoint:
        """Read a state file (or any DS/DNSKEY file as a seed); AnchorStateError names the line."""
        anchors: list[Anchor] = []
        for number, line in enumerate(text.splitlines(), 1):
            anchor = _parse_line(line, f"{source}:{number}", now)
            if anchor is None:
                continue
            if any(a.ds == anchor.ds or (a.dnskey is not None and a.dnskey == anchor.dnskey)
                   for a in anchors):  # fmt: skip
                raise AnchorStateError(f"{source}:{number}: {anchor.describe()} is listed twice")
            anchors.append(anchor)
        if not anchors:
            raise AnchorStateError(f"{source}: holds no DS or DNSKEY record")
        return cls(anchors, timers or Timers())

    def to_text(self) -> str:
        lines = [_HEADER.rstrip("\n")]
        for a in self.anchors:
            record = (
                f". IN DNSKEY {a.dnskey.to_text()}" if a.dnskey is not None else f". IN DS {a.ds}"
            )
            fields = (f"{name}={v}" for name, _, write in _FIELDS if (v := write(a)) is not None)
            lines.append(f"{record} ; {' '.join(fields)}")
        return "\n".join(lines) + "\n"

    def saved(self) -> None:
        """The caller wrote ``to_text``."""
        self.dirty = False

    # -- what the validator trusts ----------------------------------------------

    def trust_anchors(self) -> TrustAnchors:
        """The DS of every trusted key (Valid, Missing): the validator's anchors."""
        ds = tuple(a.ds for a in self.anchors if a.state.trusted)
        return TrustAnchors((TrustAnchor(ROOT, ds),) if ds else ())

    def query(self) -> Query:
        """The active refresh (RFC 5011 section 2.3): the root's DNSKEY RRset."""
        return Query(ROOT, dns.rdatatype.DNSKEY)

    # -- state changes -----------------------------------------------------------

    def _set(self, index: int, event: Event, now: float, until: float | None = None) -> bool:
        """The one place a key changes state: by ``TRANSITIONS``, logged."""
        anchor = self.anchors[index]
        new = TRANSITIONS.get((anchor.state, event))
        if new is None:
            return False
        self.anchors[index] = replace(anchor, state=new, since=now, until=until)
        self.dirty = True
        detail = f" until {_iso(until)}" if until is not None else ""
        log.info(
            "trust anchor . %s: %s -> %s (%s)%s",
            anchor.describe(),
            anchor.state.value,
            new.value,
            event.value,
            detail,
        )
        return True

    def tick(self, now: float) -> None:
        """Timer events that need no probe: RemTime."""
        for i, a in enumerate(self.anchors):
            if a.state is KeyState.REVOKED and now >= a.since + self.timers.remove_hold_down:
                self._set(i, Event.REM_TIME, now)

    def _failed(self, now: float, why: str) -> None:
        """The probe got no usable answer: nothing changes; retry (section 2.3). Logged
        when the reason is new, so a root out of reach for days costs one line."""
        if why != self._failure:
            log.warning("root DNSKEY probe: %s; trust anchors unchanged", why)
        self._failure = why
        self.last_probe = f"failed at {_iso(now)}: {why}"
        t = self.timers
        retry = t.min_refresh
        if self._ttl is not None and self._expires is not None:
            retry = max(t.min_refresh, min(t.max_retry, self._ttl / 10, (self._expires - now) / 10))
        self.next_probe = now + retry

    def feed(
        self, response: dns.message.Message | None, now: float, why: str = "no answer"
    ) -> bool:
        """Apply one probe reply (None: there was none, ``why``); True if the trusted keys
        changed (the validator's anchors).

        Only a DNSKEY RRset that validates from the trusted keys moves any key; anything
        else changes nothing and is retried later.
        """
        before = self.trust_anchors()
        self.tick(now)
        if response is None:
            self._failed(now, why)
            return self.trust_anchors() != before
        result = self._validate(response, now)
        if not result.secure or result.rrset is None:
            self._failed(now, f"{result.status.value}: {result.reason}")
            return self.trust_anchors() != before
        if self._failure:
            log.info("root DNSKEY probe: secure again")
        self._failure = ""
        rrset = result.rrset
        sigs = response.get_rrset(
            response.answer, ROOT, dns.rdataclass.IN, dns.rdatatype.RRSIG, dns.rdatatype.DNSKEY
        )
        self._schedule(now, rrset, sigs)
        self._apply(rrset, sigs, now)
        trusted = sum(1 for a in self.anchors if a.state.trusted)
        self.last_probe = f"secure at {_iso(now)} ({len(rrset)} keys, {trusted} trusted)"
        return self.trust_anchors() != before

    def _validate(self, response: dns.message.Message, now: float) -> Result:
        """The package's validator from the trusted keys, answered with this one reply."""
        validator = Validator(self.trust_anchors())

        def answer(query: Query) -> dns.message.Message | None:
            wanted = query.qname == ROOT and query.rdtype == dns.rdatatype.DNSKEY
            return response if wanted else None

        return drive(validator.start(ROOT, dns.rdatatype.DNSKEY, now), answer, lambda: now)

    def _schedule(self, now: float, rrset: dns.rrset.RRset, sigs: dns.rrset.RRset | None) -> None:
        """queryInterval = MAX(1 h, MIN(15 days, 1/2 OrigTTL, 1/2 RRSIG expiry)), section 2.3."""
        ttl = float(max((s.original_ttl for s in sigs or ()), default=rrset.ttl))
        expires = float(max((s.expiration for s in sigs or ()), default=now))
        self._ttl, self._expires = ttl, expires
        t = self.timers
        self.next_probe = now + max(t.min_refresh, min(t.max_refresh, ttl / 2, (expires - now) / 2))

    def _find(self, key: Any) -> int | None:
        for i, a in enumerate(self.anchors):
            if a.matches(key):
                return i
        return None

    def _apply(self, rrset: dns.rrset.RRset, sigs: dns.rrset.RRset | None, now: float) -> None:
        """RFC 5011's events from one validated DNSKEY RRset."""
        present: set[int] = set()
        revoked: set[int] = set()
        new: list[Any] = []
        for key in rrset:
            if not key.flags & _SEP or not key.flags & _ZONE or key.protocol != 3:
                continue  # only key-signing keys are trust anchors
            if key.algorithm not in SUPPORTED_ALGORITHMS:
                continue
            index = self._find(_unrevoked(key))
            if key.flags & _REVOKE:
                if index is not None and _self_signed(key, rrset, sigs, now):
                    revoked.add(index)
                continue  # a revoked key that did not sign its revocation proves nothing
            if index is None:
                new.append(key)
            else:
                present.add(index)
                if self.anchors[index].dnskey is None:  # a seed DS meets its key
                    self.anchors[index] = replace(self.anchors[index], dnskey=key)
                    self.dirty = True
        for i, a in enumerate(list(self.anchors)):
            if i in revoked:
                self._set(i, Event.REVBIT, now)
            elif i in present:
                if a.state is KeyState.START:
                    self._set(i, Event.NEW_KEY, now, until=now + self._hold_down(rrset))
                elif a.state is KeyState.ADDPEND and now >= (a.until or 0.0):
                    self._set(i, Event.ADD_TIME, now)
                elif a.state is KeyState.MISSING:
                    self._set(i, Event.KEY_PRES, now)
            elif a.state in (KeyState.ADDPEND, KeyState.VALID):
                self._set(i, Event.KEY_REM, now)
        for key in new:
            if sum(1 for a in self.anchors if a.state is not KeyState.REMOVED) >= MAX_KEYS:
                log.warning(
                    "root DNSKEY probe: key %d not tracked: %d keys already", key_tag(key), MAX_KEYS
                )
                break
            self.anchors.append(Anchor.of_key(key, KeyState.START, now))
            self._set(len(self.anchors) - 1, Event.NEW_KEY, now, until=now + self._hold_down(rrset))
        self.anchors[:] = _prune(self.anchors)

    def _hold_down(self, rrset: dns.rrset.RRset) -> float:
        """Section 2.4.1: 30 days, or the RRset's original TTL if that is longer."""
        return max(self.timers.add_hold_down, float(self._ttl or rrset.ttl))

    # -- status -------------------------------------------------------------------

    def rows(self) -> list[dict[str, object]]:
        """One row a key for ``oe status``: tag, algorithm, state, since (and until)."""
        return [
            {
                "zone": ".",
                "key_tag": a.key_tag,
                "algorithm": a.algorithm,
                "state": a.state.value,
                "since": _iso(a.since),
                "until": "" if a.until is None else _iso(math.ceil(a.until)),
                "form": "dnskey" if a.dnskey is not None else "ds",
            }
            for a in self.anchors
        ]


def _prune(anchors: Iterable[Anchor]) -> list[Anchor]:
    """Keys back in Start go (RFC 5011: not yet a trust anchor; if it returns, it is new
    again), and Removed keys beyond ``MAX_KEYS``, oldest first (they only keep a revoked
    key from coming back)."""
    kept = [a for a in anchors if a.state is not KeyState.START]
    removed = sorted((a for a in kept if a.state is KeyState.REMOVED), key=lambda a: a.since)
    for a in removed[: max(0, len(removed) - MAX_KEYS)]:
        kept.remove(a)
    return kept


def _self_signed(
    key: Any, rrset: dns.rrset.RRset, sigs: dns.rrset.RRset | None, now: float
) -> bool:
    """Whether the revoked ``key`` signed ``rrset`` itself (RFC 5011 section 2.1)."""
    tag = key_tag(key)  # the revoked key's own tag: the REVOKE bit is part of it
    tried = 0
    for sig in sigs or ():
        if sig.key_tag != tag or sig.algorithm != key.algorithm or sig.signer != ROOT:
            continue
        if tried >= _MAX_REVOKE_CHECKS:
            break
        tried += 1
        when = min(max(now, float(sig.inception)), float(sig.expiration))
        if abs(when - now) > 300:  # outside its validity window (the validator's skew)
            continue
        try:
            verify_rrsig(rrset, sig, key, when)
        except (dns.exception.DNSException, ValueError):
            continue
        return True
    return False
