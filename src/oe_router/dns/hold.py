"""The hold decision core, sans-IO: when may an A/AAAA answer go to the LAN client?

Why a separate core: the rules (release at once, hold until the tunnel is up or the
hold limit passes, SERVFAIL on bogus) are the security-relevant part of the DNS front
and must be testable without sockets or clocks. Events go in with ``now`` as a value;
actions come out (``LookupKey``, ``EnsureTunnel``, ``PassKeyless``, ``Release``). The
asyncio driver in ``front.py`` performs the actions and feeds the results back.

One ``_Negotiation`` per name is shared by every concurrent query for it (A and AAAA
of one browser tab arrive together): one key lookup, one tunnel request per new set
of addresses. A key reaches ``EnsureTunnel`` only from a SECURE result; a BOGUS,
INSECURE or INDETERMINATE result never passes its keys on, whatever it carries.

A SECURE result also proves the name's zone is signed, so the upstream's A/AAAA
answer must be signed too: a key protects only its host's own proven addresses.
The lookup brings the name's validated A and AAAA RRsets (``AddressProof``); an
answer holding an address they do not prove is bogus (SERVFAIL, or clear per
``bogus_action``), and ``EnsureTunnel`` carries only proven addresses.

A name proven keyless (a SECURE denial of its IPSECKEY, with proven addresses, or an
INSECURE zone) would only make the first packet wait for an IKE probe that the host
almost never answers. With ``keyless pass`` (the default) its answer waits for
``PassKeyless`` instead: the OE manager's pass shunt for the answer's TTL, in the
datapath before the client can send anything. BOGUS and INDETERMINATE results never
ask for one.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Awaitable, Callable
from dataclasses import field
from typing import Literal, Protocol, runtime_checkable

import dns.name

from oe_router.config.schema import DnsConfig
from oe_router.dns.dnssec import Status
from oe_router.dns.ipseckey import PeerKey
from oe_router.records import record

__all__ = [
    "Action",
    "AddressProof",
    "EnsureTunnel",
    "HoldCore",
    "HoldPolicy",
    "IPAddress",
    "KeyLookup",
    "KeyResult",
    "KeyStatus",
    "KeylessPasser",
    "LookupKey",
    "Outcome",
    "PassKeyless",
    "Release",
    "TunnelRequester",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


#: RFC 4033 security state of the name's IPSECKEY answer: the validator's own enum.
KeyStatus = Status


@record(frozen=True)
class AddressProof:
    """The name's A (or AAAA) RRset as validated from the trust anchor.

    SECURE with no addresses is a proven denial (NODATA or NXDOMAIN).
    """

    status: KeyStatus
    addresses: frozenset[IPAddress] = frozenset()
    reason: str = ""


@record(frozen=True)
class KeyResult:
    """What the IPSECKEY lookup found. ``keys`` are best first; empty means no key.

    ``v4``/``v6`` are the name's validated A/AAAA RRsets, looked up when the zone
    is signed (``status`` SECURE); None means they were not validated.
    """

    status: KeyStatus
    keys: tuple[PeerKey, ...] = ()
    reason: str = ""
    v4: AddressProof | None = None
    v6: AddressProof | None = None
    #: SECURE and the IPSECKEY RRset is proven absent (NODATA or NXDOMAIN), not merely
    #: unusable: the name's host publishes no key
    denial: bool = False

    @property
    def keyless(self) -> bool:
        """Proven to publish no key: a secure denial, or an unsigned (insecure) zone."""
        if self.status is KeyStatus.SECURE:
            return self.denial and not self.keys
        return self.status is KeyStatus.INSECURE

    @property
    def usable_key(self) -> PeerKey | None:
        """The key to authenticate the peer with: only ever from a SECURE result."""
        if self.status is KeyStatus.SECURE and self.keys:
            return self.keys[0]
        return None

    def check_addresses(self, addresses: tuple[IPAddress, ...]) -> tuple[KeyStatus, str]:
        """May an upstream answer's ``addresses`` be trusted? (SECURE, "") or (status, why).

        Only meaningful for a SECURE result (a signed zone). BOGUS: the validated
        RRset is bogus or lacks one of the addresses (a tampered answer). Any other
        status: that family's RRset could not be validated.
        """
        for version, proof in ((4, self.v4), (6, self.v6)):
            mine = {a for a in addresses if a.version == version}
            if not mine:
                continue
            rrtype = "A" if version == 4 else "AAAA"
            if proof is None:
                return KeyStatus.INDETERMINATE, f"{rrtype} RRset was not validated"
            if proof.status is not KeyStatus.SECURE:
                return proof.status, f"{rrtype} RRset is {proof.status.value}: {proof.reason}"
            unproven = mine - proof.addresses
            if unproven:
                listed = ", ".join(sorted(str(a) for a in unproven))
                return KeyStatus.BOGUS, f"{rrtype} {listed} not in the validated {rrtype} RRset"
        return KeyStatus.SECURE, ""


class KeyLookup(Protocol):
    """Fetches and DNSSEC-validates the IPSECKEY RRset of a name (dns/keylookup.py)."""

    def lookup(self, name: dns.name.Name) -> Awaitable[KeyResult]: ...

    def cached(self, name: dns.name.Name) -> KeyResult | None:
        """A still-valid earlier result, without awaiting; None: call ``lookup``."""


class TunnelRequester(Protocol):
    """The OE manager: bring a tunnel up to ``addresses`` authenticated with ``key``.

    Returns True when the tunnel is up (or already was), False when it failed.
    """

    def ensure_tunnel(
        self, name: dns.name.Name, addresses: tuple[IPAddress, ...], key: PeerKey
    ) -> Awaitable[bool]: ...


@runtime_checkable
class KeylessPasser(Protocol):
    """The OE manager's pass shunts for names proven keyless (``keyless pass``)."""

    def pass_keyless(
        self, name: dns.name.Name, addresses: tuple[IPAddress, ...], ttl: float, reason: str
    ) -> Awaitable[frozenset[IPAddress]]:
        """Shunt what may pass of ``addresses`` for ``ttl`` s; the ones that pass, once
        their shunts are in the datapath."""
        ...

    def keyless_passed(self, addresses: tuple[IPAddress, ...]) -> bool:
        """A pass shunt stands for every address now (a cached answer may go at once)."""
        ...


@record(frozen=True)
class HoldPolicy:
    """The knobs of ``config dns``: how long to hold, TTL cap, what bogus means, and
    whether a keyless name's addresses pass at once or probe on the first packet."""

    hold_limit: float = 3.0
    #: 0 means no cap.
    ttl_cap: float = 300.0
    bogus_action: Literal["servfail", "insecure"] = "servfail"
    keyless: Literal["pass", "probe"] = "pass"

    @classmethod
    def from_config(cls, dns_config: DnsConfig) -> HoldPolicy:
        return cls(
            dns_config.hold_limit, dns_config.ttl_cap, dns_config.bogus_action, dns_config.keyless
        )


class Outcome(enum.Enum):
    """How a query ended; the names are the ``oe status`` counters."""

    PROTECTED = "released_protected"  #: tunnel up before the answer went out
    CLEAR = "released_clear"  #: no usable key, tunnel failed, or hold limit reached
    BOGUS = "servfail"  #: IPSECKEY or A/AAAA failed validation, bogus_action servfail
    UPSTREAM_FAILED = "timeouts"  #: no upstream answered the A/AAAA query

    @property
    def servfail(self) -> bool:
        """True when the client gets SERVFAIL instead of the upstream's answer."""
        return self in (Outcome.BOGUS, Outcome.UPSTREAM_FAILED)


# --------------------------------------------------------------------------- actions


@record(frozen=True)
class LookupKey:
    """Start the IPSECKEY lookup for ``name``; feed the result to ``key_result``."""

    name: dns.name.Name


@record(frozen=True)
class EnsureTunnel:
    """Ask the OE manager for a tunnel; feed its answer to ``tunnel_done(request, ...)``."""

    request: int
    name: dns.name.Name
    addresses: tuple[IPAddress, ...]
    key: PeerKey


@record(frozen=True)
class PassKeyless:
    """Ask the OE manager to pass ``addresses`` of a keyless name in the clear for
    ``ttl`` seconds; feed the ones that pass to ``keyless_done(request, ...)``."""

    request: int
    name: dns.name.Name
    addresses: tuple[IPAddress, ...]
    ttl: float
    reason: str  #: ``no key (secure denial)`` or ``no key (insecure zone)``


@record(frozen=True)
class Release:
    """Answer query ``query`` now: the upstream answer, or SERVFAIL if ``outcome.servfail``."""

    query: int
    outcome: Outcome
    reason: str
    #: Seconds the answer waited after it arrived from upstream (0: not held).
    held_for: float = 0.0
    hold_expired: bool = False
    #: the decision in a few words for the log ("clear, no key (DNS)"); "" when the
    #: decision is another's to tell (the OE manager's, for a tunnel up or failed)
    summary: str = ""


Action = LookupKey | EnsureTunnel | PassKeyless | Release


# --------------------------------------------------------------------------- state


@record
class _Query:
    name: dns.name.Name
    addresses: tuple[IPAddress, ...] | None = None  #: None until the upstream answered
    answered_at: float = 0.0
    deadline: float = 0.0
    ttl: float = 0.0  #: the answer's TTL as the client gets it (capped)


@record
class _Negotiation:
    key: KeyResult | None = None
    lookup_pending: bool = False
    queries: set[int] = field(default_factory=set)
    requested: set[IPAddress] = field(default_factory=set)
    up: set[IPAddress] = field(default_factory=set)
    failed: set[IPAddress] = field(default_factory=set)
    pending_requests: set[int] = field(default_factory=set)
    #: keyless pass: addresses asked for, answered, and passing
    pass_asked: set[IPAddress] = field(default_factory=set)
    pass_done: set[IPAddress] = field(default_factory=set)
    passing: set[IPAddress] = field(default_factory=set)

    @property
    def idle(self) -> bool:
        return not (self.queries or self.lookup_pending or self.pending_requests)


class HoldCore:
    """Decides, per A/AAAA query, when and how its answer is released.

    Call order per query: ``query`` (at arrival), then ``answer`` or
    ``upstream_failed``; ``key_result`` and ``tunnel_done`` arrive per name/request.
    Every call returns the actions to perform. Call ``tick`` at ``next_deadline()``.
    Query ids are the caller's and must be unique among queries in flight.
    """

    def __init__(self, policy: HoldPolicy) -> None:
        self.policy = policy
        self._queries: dict[int, _Query] = {}
        self._negs: dict[dns.name.Name, _Negotiation] = {}
        self._requests: dict[int, tuple[dns.name.Name, frozenset[IPAddress]]] = {}
        self._passes: dict[int, tuple[dns.name.Name, frozenset[IPAddress]]] = {}
        self._next_request = 1

    # ------------------------------------------------------------------ introspection
    @property
    def in_flight(self) -> int:
        """Queries not yet released."""
        return len(self._queries)

    @property
    def negotiations(self) -> int:
        """Names with a lookup, tunnel request or query outstanding."""
        return len(self._negs)

    def next_deadline(self) -> float | None:
        """Earliest time ``tick`` must be called, or None if nothing is held."""
        deadlines = [q.deadline for q in self._queries.values() if q.addresses is not None]
        return min(deadlines) if deadlines else None

    # ------------------------------------------------------------------ events
    def query(self, query: int, name: dns.name.Name, now: float) -> list[Action]:
        """A LAN client asked for A/AAAA of ``name``; join or start its negotiation."""
        if query in self._queries:
            raise ValueError(f"query id {query} is already in flight")
        name = name.canonicalize()
        self._queries[query] = _Query(name)
        neg = self._negs.setdefault(name, _Negotiation())
        neg.queries.add(query)
        if neg.key is None and not neg.lookup_pending:
            neg.lookup_pending = True
            return [LookupKey(name)]
        return self._evaluate(query, now)

    def answer(
        self, query: int, addresses: tuple[IPAddress, ...], now: float, ttl: float = 0.0
    ) -> list[Action]:
        """The upstream answered; ``addresses`` are its A/AAAA records (may be empty),
        ``ttl`` the answer's TTL as the client gets it (a keyless shunt's life)."""
        q = self._queries.get(query)
        if q is None or q.addresses is not None:
            return []  # already released (e.g. bogus) or answered twice
        q.addresses = addresses
        q.ttl = ttl
        q.answered_at = now
        q.deadline = now + self.policy.hold_limit
        return self._evaluate(query, now)

    def upstream_failed(self, query: int, reason: str, now: float) -> list[Action]:
        """No upstream answered: there is nothing to hold, the client gets SERVFAIL."""
        if query not in self._queries:
            return []
        return [self._release(query, Outcome.UPSTREAM_FAILED, reason, now)]

    def cancel(self, query: int) -> None:
        """The client went away (TCP closed, server stopping): forget the query."""
        q = self._queries.pop(query, None)
        if q is not None:
            self._forget(q.name, query)

    def key_result(self, name: dns.name.Name, result: KeyResult, now: float) -> list[Action]:
        """The IPSECKEY lookup for ``name`` ended; decide for every query waiting on it."""
        name = name.canonicalize()
        neg = self._negs.get(name)
        if neg is None:
            return []
        neg.lookup_pending = False
        neg.key = result
        actions = self._evaluate_name(name, now)
        self._gc(name)
        return actions

    def tunnel_done(self, request: int, ok: bool, now: float) -> list[Action]:
        """The OE manager answered ``EnsureTunnel(request)``: up (True) or failed."""

        def record(neg: _Negotiation, addresses: frozenset[IPAddress]) -> None:
            (neg.up if ok else neg.failed).update(addresses)

        return self._answered(self._requests, request, record, now)

    def keyless_done(self, request: int, passing: frozenset[IPAddress], now: float) -> list[Action]:
        """The OE manager answered ``PassKeyless(request)``: ``passing`` are shunted."""

        def record(neg: _Negotiation, addresses: frozenset[IPAddress]) -> None:
            neg.pass_done |= addresses
            neg.passing |= passing & addresses

        return self._answered(self._passes, request, record, now)

    def _answered(
        self,
        requests: dict[int, tuple[dns.name.Name, frozenset[IPAddress]]],
        request: int,
        record: Callable[[_Negotiation, frozenset[IPAddress]], None],
        now: float,
    ) -> list[Action]:
        """One answer of the OE manager: ``record`` it on its name's negotiation (if both
        are still there), then look at the name again."""
        entry = requests.pop(request, None)
        if entry is None:
            return []
        name, addresses = entry
        neg = self._negs.get(name)
        if neg is None:
            return []
        neg.pending_requests.discard(request)
        record(neg, addresses)
        actions = self._evaluate_name(name, now)
        self._gc(name)
        return actions

    def tick(self, now: float) -> list[Action]:
        """Release the answers whose hold limit has passed."""
        due = [
            qid for qid, q in self._queries.items() if q.addresses is not None and q.deadline <= now
        ]
        actions: list[Action] = []
        for qid in due:
            actions.extend(self._evaluate(qid, now))
        return actions

    # ------------------------------------------------------------------ decisions
    def _evaluate_name(self, name: dns.name.Name, now: float) -> list[Action]:
        neg = self._negs.get(name)
        if neg is None:
            return []
        actions: list[Action] = []
        for qid in sorted(neg.queries):
            if qid in self._queries:
                actions.extend(self._evaluate(qid, now))
        return actions

    def _evaluate(self, qid: int, now: float) -> list[Action]:
        q = self._queries[qid]
        neg = self._negs[q.name]
        key = neg.key
        bogus = key is not None and key.status is KeyStatus.BOGUS
        if bogus and key is not None and self.policy.bogus_action == "servfail":
            return [self._release(qid, Outcome.BOGUS, f"IPSECKEY is bogus: {key.reason}", now)]
        if q.addresses is None:
            return []  # wait for the upstream; its own timeouts bound this
        if not q.addresses:
            return [self._release(qid, Outcome.CLEAR, "no addresses in the answer", now)]
        if key is None:
            if now >= q.deadline:
                why = "hold limit: key lookup unfinished"
                late = f"clear, key lookup not done within hold_limit {self.policy.hold_limit:g}s"
                return [self._release(qid, Outcome.CLEAR, why, now, summary=late)]
            return []
        if key.status is KeyStatus.SECURE:  # signed zone: only proven addresses
            verdict, why = key.check_addresses(q.addresses)
            if verdict is KeyStatus.BOGUS:
                if self.policy.bogus_action == "servfail":
                    return [self._release(qid, Outcome.BOGUS, f"bogus answer: {why}", now)]
                why = f"bogus answer treated as insecure (bogus_action): {why}"
                words = "clear, bogus answer let through (bogus_action insecure)"
                return [self._release(qid, Outcome.CLEAR, why, now, summary=words)]
            if verdict is not KeyStatus.SECURE:
                words = "clear, key not used: addresses not validated (DNS)"
                why = f"no key used: {why}"
                return [self._release(qid, Outcome.CLEAR, why, now, summary=words)]
        peer_key = key.usable_key
        if peer_key is None:
            if self.policy.keyless == "pass" and key.keyless:
                return self._pass_keyless(qid, q, neg, key, now)
            words = _clear_summary(key)
            return [self._release(qid, Outcome.CLEAR, _clear_reason(key), now, summary=words)]
        actions: list[Action] = []
        wanted = set(q.addresses)
        missing = wanted - neg.requested
        if missing:
            neg.requested |= missing
            request, addrs = self._new_request(neg, q.name, missing, self._requests)
            actions.append(EnsureTunnel(request, q.name, addrs, peer_key))
        if wanted <= neg.up:
            actions.append(self._release(qid, Outcome.PROTECTED, "tunnel up", now))
        elif wanted <= neg.up | neg.failed:
            failed = ", ".join(str(a) for a in sorted(wanted & neg.failed, key=str))
            actions.append(self._release(qid, Outcome.CLEAR, f"tunnel failed to {failed}", now))
        elif now >= q.deadline:
            limit = self.policy.hold_limit
            late = f"answer released after hold_limit {limit:g}s, tunnel not up yet"
            actions.append(
                self._release(
                    qid, Outcome.CLEAR, "hold limit: tunnel not up", now, expired=True, summary=late
                )
            )
        return actions

    def _new_request(
        self,
        neg: _Negotiation,
        name: dns.name.Name,
        missing: set[IPAddress],
        table: dict[int, tuple[dns.name.Name, frozenset[IPAddress]]],
    ) -> tuple[int, tuple[IPAddress, ...]]:
        """A numbered request (a tunnel or a pass) for ``missing``, pending on ``neg`` and
        kept in ``table`` until its answer; its addresses in a stable order."""
        request = self._next_request
        self._next_request += 1
        neg.pending_requests.add(request)
        table[request] = (name, frozenset(missing))
        return request, tuple(sorted(missing, key=lambda a: (a.version, a)))

    def _pass_keyless(
        self, qid: int, q: _Query, neg: _Negotiation, key: KeyResult, now: float
    ) -> list[Action]:
        """A name proven keyless: its answer goes once the OE manager's pass shunts for
        its addresses are in (or the hold limit passes). The manager's shunt tells the
        decision; the front tells it only for addresses that do not pass."""
        assert q.addresses is not None
        actions: list[Action] = []
        wanted = set(q.addresses)
        missing = wanted - neg.pass_asked
        if missing:
            neg.pass_asked |= missing
            request, addrs = self._new_request(neg, q.name, missing, self._passes)
            reason = _KEYLESS[key.status]
            actions.append(PassKeyless(request, q.name, addrs, q.ttl, reason))
        reason = _clear_reason(key)
        if wanted <= neg.pass_done:
            words = "" if wanted <= neg.passing else _clear_summary(key)
            actions.append(self._release(qid, Outcome.CLEAR, reason, now, summary=words))
        elif now >= q.deadline:
            limit = self.policy.hold_limit
            late = f"clear, pass shunt not in within hold_limit {limit:g}s"
            actions.append(
                self._release(qid, Outcome.CLEAR, reason, now, expired=True, summary=late)
            )
        return actions

    def _release(
        self,
        qid: int,
        outcome: Outcome,
        reason: str,
        now: float,
        expired: bool = False,
        summary: str = "",
    ) -> Release:
        q = self._queries.pop(qid)
        held = now - q.answered_at if q.addresses is not None else 0.0
        self._forget(q.name, qid)
        return Release(qid, outcome, reason, max(0.0, held), expired, summary)

    def _forget(self, name: dns.name.Name, qid: int) -> None:
        neg = self._negs.get(name)
        if neg is not None:
            neg.queries.discard(qid)
            self._gc(name)

    def _gc(self, name: dns.name.Name) -> None:
        neg = self._negs.get(name)
        if neg is not None and neg.idle:
            # The key and tunnel facts go too: KeyLookup caches by TTL and the OE
            # manager answers quickly for a tunnel it already has.
            del self._negs[name]


#: the key states that prove a name keyless, and the keyless shunt's reason for each
_KEYLESS = {
    KeyStatus.SECURE: "no key (secure denial)",
    KeyStatus.INSECURE: "no key (insecure zone)",
}


def _clear_summary(key: KeyResult) -> str:
    """The decision line's words for an answer released clear for want of a usable key."""
    if key.status is KeyStatus.SECURE:
        return "clear, no key (DNS)"
    if key.status is KeyStatus.INSECURE:
        return "clear, no key (DNS, unsigned zone)"
    if key.status is KeyStatus.BOGUS:
        return "clear, bogus key ignored (bogus_action insecure)"
    return "clear, key unknown (DNS lookup failed)"


def _clear_reason(key: KeyResult) -> str:
    if key.status is KeyStatus.SECURE:
        return "no IPSECKEY (secure denial)" if not key.reason else f"no key: {key.reason}"
    if key.status is KeyStatus.BOGUS:
        return f"IPSECKEY is bogus, treated as insecure (bogus_action): {key.reason}"
    return f"IPSECKEY {key.status.value}: {key.reason}" if key.reason else key.status.value
