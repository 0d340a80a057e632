"""The sans-IO hold core: release rules of issue 6, shared negotiations, key hygiene."""

from __future__ import annotations

import ipaddress

import dns.name
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from oe_router.config.schema import DnsConfig
from oe_router.dns.hold import (
    Action,
    AddressProof,
    EnsureTunnel,
    HoldCore,
    HoldPolicy,
    KeyResult,
    KeyStatus,
    LookupKey,
    Outcome,
    Release,
)
from oe_router.dns.ipseckey import KeyKind, PeerKey

NAME = dns.name.from_text("www.example.")
A1 = ipaddress.ip_address("192.0.2.1")
A2 = ipaddress.ip_address("192.0.2.2")
V6 = ipaddress.ip_address("2001:db8::1")
KEY = PeerKey(kind=KeyKind.NONE, public_key=None, precedence=10, owner=NAME, algorithm=0)
V4_PROVEN = AddressProof(KeyStatus.SECURE, frozenset({A1, A2}), "A signed by example.")
V6_PROVEN = AddressProof(KeyStatus.SECURE, frozenset({V6}), "AAAA signed by example.")
SECURE = KeyResult(KeyStatus.SECURE, (KEY,), "signed by example.", v4=V4_PROVEN, v6=V6_PROVEN)


def only(actions: list[Action], kind: type) -> list:  # type: ignore[type-arg]
    return [a for a in actions if isinstance(a, kind)]


def release_of(actions: list[Action], qid: int) -> Release:
    found = [a for a in actions if isinstance(a, Release) and a.query == qid]
    assert len(found) == 1, actions
    return found[0]


def test_policy_from_config() -> None:
    p = HoldPolicy.from_config(DnsConfig(hold_limit=1.5, ttl_cap=60, bogus_action="insecure"))
    assert (p.hold_limit, p.ttl_cap, p.bogus_action) == (1.5, 60, "insecure")


def test_first_query_starts_one_lookup_and_waits() -> None:
    core = HoldCore(HoldPolicy())
    assert core.query(1, NAME, 0.0) == [LookupKey(NAME)]
    assert core.answer(1, (A1,), 0.01) == []  # held: key unknown
    assert core.next_deadline() == pytest.approx(3.01)


@pytest.mark.parametrize(
    ("result", "why"),
    [
        (KeyResult(KeyStatus.SECURE, (), "NSEC proves no IPSECKEY"), "no key"),
        (KeyResult(KeyStatus.INSECURE, (KEY,), "unsigned delegation"), "insecure"),
        (KeyResult(KeyStatus.INDETERMINATE, (KEY,), "timeout"), "indeterminate"),
    ],
)
def test_no_usable_key_releases_at_once_and_never_asks_for_a_tunnel(
    result: KeyResult, why: str
) -> None:
    core = HoldCore(HoldPolicy(keyless="probe"))
    core.query(1, NAME, 0.0)
    core.answer(1, (A1,), 0.01)
    actions = core.key_result(NAME, result, 0.02)
    assert not only(actions, EnsureTunnel)
    rel = release_of(actions, 1)
    assert rel.outcome is Outcome.CLEAR and not rel.outcome.servfail
    assert rel.held_for == pytest.approx(0.01)
    assert why in rel.reason or result.reason in rel.reason
    assert core.in_flight == 0 and core.negotiations == 0


def test_key_known_before_answer_releases_when_answer_comes() -> None:
    core = HoldCore(HoldPolicy(keyless="probe"))
    core.query(1, NAME, 0.0)
    assert core.key_result(NAME, KeyResult(KeyStatus.INSECURE), 0.01) == []
    rel = release_of(core.answer(1, (A1,), 0.02), 1)
    assert rel.outcome is Outcome.CLEAR and rel.held_for == 0.0


def test_secure_key_holds_until_tunnel_is_up() -> None:
    core = HoldCore(HoldPolicy())
    core.query(1, NAME, 0.0)
    core.answer(1, (A2, A1), 0.01)
    actions = core.key_result(NAME, SECURE, 0.05)
    (req,) = only(actions, EnsureTunnel)
    assert req.addresses == (A1, A2) and req.key is KEY and req.name == NAME
    assert not only(actions, Release)
    rel = release_of(core.tunnel_done(req.request, True, 0.25), 1)
    assert rel.outcome is Outcome.PROTECTED
    assert rel.held_for == pytest.approx(0.24)
    assert core.negotiations == 0


def test_tunnel_failure_releases_clear() -> None:
    core = HoldCore(HoldPolicy())
    core.query(1, NAME, 0.0)
    core.answer(1, (A1,), 0.0)
    (req,) = only(core.key_result(NAME, SECURE, 0.0), EnsureTunnel)
    rel = release_of(core.tunnel_done(req.request, False, 0.5), 1)
    assert rel.outcome is Outcome.CLEAR and "192.0.2.1" in rel.reason


def test_hold_limit_expiry_releases_clear() -> None:
    core = HoldCore(HoldPolicy(hold_limit=2.0))
    core.query(1, NAME, 0.0)
    core.answer(1, (A1,), 1.0)
    (req,) = only(core.key_result(NAME, SECURE, 1.1), EnsureTunnel)
    assert core.next_deadline() == pytest.approx(3.0)
    assert core.tick(2.99) == []
    rel = release_of(core.tick(3.0), 1)
    assert rel.outcome is Outcome.CLEAR and rel.hold_expired
    assert rel.held_for == pytest.approx(2.0)
    # the late tunnel answer is harmless
    assert core.tunnel_done(req.request, True, 4.0) == []
    assert core.negotiations == 0


def test_hold_limit_also_bounds_a_slow_key_lookup() -> None:
    core = HoldCore(HoldPolicy(hold_limit=1.0))
    core.query(1, NAME, 0.0)
    core.answer(1, (A1,), 0.0)
    rel = release_of(core.tick(1.0), 1)
    assert rel.outcome is Outcome.CLEAR and "key lookup" in rel.reason
    # the lookup still finishes into an idle negotiation; a key arriving now asks nothing
    assert core.negotiations == 1
    assert core.key_result(NAME, SECURE, 1.5) == []
    assert core.negotiations == 0


def test_zero_hold_limit_never_holds() -> None:
    core = HoldCore(HoldPolicy(hold_limit=0.0))
    core.query(1, NAME, 0.0)
    rel = release_of(core.answer(1, (A1,), 0.0), 1)
    assert rel.outcome is Outcome.CLEAR


def test_bogus_is_servfail_and_its_key_never_reaches_the_tunnel() -> None:
    core = HoldCore(HoldPolicy())
    core.query(1, NAME, 0.0)
    core.query(2, NAME, 0.0)
    core.answer(1, (A1,), 0.01)
    bogus = KeyResult(KeyStatus.BOGUS, (KEY,), "RRSIG expired")
    actions = core.key_result(NAME, bogus, 0.02)
    assert not only(actions, EnsureTunnel)
    # both released at once, even query 2 whose upstream answer is still out
    assert release_of(actions, 1).outcome is Outcome.BOGUS
    assert release_of(actions, 2).outcome.servfail
    assert "RRSIG expired" in release_of(actions, 2).reason
    assert core.answer(2, (A1,), 0.03) == []


def test_bogus_action_insecure_releases_clear_without_key() -> None:
    core = HoldCore(HoldPolicy(bogus_action="insecure"))
    core.query(1, NAME, 0.0)
    core.answer(1, (A1,), 0.0)
    actions = core.key_result(NAME, KeyResult(KeyStatus.BOGUS, (KEY,), "DS mismatch"), 0.0)
    assert not only(actions, EnsureTunnel)
    rel = release_of(actions, 1)
    assert rel.outcome is Outcome.CLEAR and "bogus" in rel.reason


# ------------------------------------------------------------------ signed zones: proven addresses

A3 = ipaddress.ip_address("198.51.100.66")  # in no validated RRset: a tampered answer


@pytest.mark.parametrize(
    ("answer", "proof", "why"),
    [
        ((A3,), V4_PROVEN, "198.51.100.66 not in the validated A RRset"),
        ((A1, A3), V4_PROVEN, "198.51.100.66 not in the validated A RRset"),
        ((A1,), AddressProof(KeyStatus.SECURE, frozenset(), "NODATA"), "192.0.2.1 not in"),
        ((A1,), AddressProof(KeyStatus.BOGUS, frozenset(), "RRSIG fails"), "RRSIG fails"),
    ],
    ids=["swapped", "added", "denied", "bogus-rrset"],
)
@pytest.mark.parametrize("key", [(KEY,), ()], ids=["keyed", "secure-no-key"])
def test_signed_zone_unproven_address_is_servfail_and_never_bound(
    answer: tuple[ipaddress.IPv4Address, ...],
    proof: AddressProof,
    why: str,
    key: tuple[PeerKey, ...],
) -> None:
    """A signed zone's A answer must match its validated RRset, key or no key (issue 11.3)."""
    for order in ("answer-first", "key-first"):
        core = HoldCore(HoldPolicy())
        core.query(1, NAME, 0.0)
        result = KeyResult(KeyStatus.SECURE, key, "signed", v4=proof, v6=V6_PROVEN)
        if order == "answer-first":
            core.answer(1, answer, 0.01)
            actions = core.key_result(NAME, result, 0.02)
        else:
            core.key_result(NAME, result, 0.01)
            actions = core.answer(1, answer, 0.02)
        assert not only(actions, EnsureTunnel), order
        rel = release_of(actions, 1)
        assert rel.outcome is Outcome.BOGUS and rel.outcome.servfail, order
        assert why in rel.reason, rel.reason


def test_signed_zone_unproven_address_with_bogus_action_insecure_is_clear_unbound() -> None:
    core = HoldCore(HoldPolicy(bogus_action="insecure"))
    core.query(1, NAME, 0.0)
    core.answer(1, (A3,), 0.01)
    actions = core.key_result(NAME, SECURE, 0.02)
    assert not only(actions, EnsureTunnel)
    rel = release_of(actions, 1)
    assert rel.outcome is Outcome.CLEAR and "bogus_action" in rel.reason


@pytest.mark.parametrize(
    "proof",
    [None, AddressProof(KeyStatus.INDETERMINATE, frozenset(), "no answer from upstream")],
    ids=["not-validated", "indeterminate"],
)
def test_signed_zone_unvalidated_addresses_are_released_clear_without_the_key(
    proof: AddressProof | None,
) -> None:
    core = HoldCore(HoldPolicy())
    core.query(1, NAME, 0.0)
    core.answer(1, (A1,), 0.01)
    actions = core.key_result(NAME, KeyResult(KeyStatus.SECURE, (KEY,), "k", v4=proof), 0.02)
    assert not only(actions, EnsureTunnel)
    rel = release_of(actions, 1)
    assert rel.outcome is Outcome.CLEAR
    assert "not validated" in rel.reason or "indeterminate" in rel.reason, rel.reason


def test_key_is_bound_only_to_the_answers_proven_addresses() -> None:
    """The tunnel request names exactly the answer's addresses, each one proven."""
    core = HoldCore(HoldPolicy())
    core.query(1, NAME, 0.0)
    core.query(2, NAME, 0.0)
    core.answer(1, (A2,), 0.01)
    core.answer(2, (V6,), 0.01)
    (v4_req, v6_req) = only(core.key_result(NAME, SECURE, 0.02), EnsureTunnel)
    assert v4_req.addresses == (A2,) and v6_req.addresses == (V6,)
    assert set(v4_req.addresses) <= V4_PROVEN.addresses


def test_concurrent_queries_share_one_lookup_and_one_tunnel() -> None:
    core = HoldCore(HoldPolicy())
    lookups = []
    for qid in range(1, 6):
        lookups += only(core.query(qid, NAME, 0.0), LookupKey)
    assert lookups == [LookupKey(NAME)]
    for qid in range(1, 6):
        core.answer(qid, (A1,), 0.01)
    actions = core.key_result(NAME, SECURE, 0.02)
    assert len(only(actions, EnsureTunnel)) == 1
    (req,) = only(actions, EnsureTunnel)
    done = core.tunnel_done(req.request, True, 0.2)
    assert sorted(r.query for r in only(done, Release)) == [1, 2, 3, 4, 5]
    assert all(r.outcome is Outcome.PROTECTED for r in only(done, Release))


def test_name_case_does_not_split_negotiation() -> None:
    core = HoldCore(HoldPolicy())
    assert core.query(1, NAME, 0.0) == [LookupKey(NAME)]
    assert core.query(2, dns.name.from_text("WWW.Example."), 0.0) == []


def test_aaaa_after_a_asks_only_for_the_new_addresses() -> None:
    core = HoldCore(HoldPolicy())
    core.query(1, NAME, 0.0)
    core.answer(1, (A1,), 0.0)
    (r1,) = only(core.key_result(NAME, SECURE, 0.0), EnsureTunnel)
    core.query(2, NAME, 0.01)  # AAAA joins while the v4 tunnel is being built
    (r2,) = only(core.answer(2, (V6,), 0.02), EnsureTunnel)
    assert r1.addresses == (A1,) and r2.addresses == (V6,)
    assert release_of(core.tunnel_done(r1.request, True, 0.1), 1).outcome is Outcome.PROTECTED
    assert release_of(core.tunnel_done(r2.request, True, 0.2), 2).outcome is Outcome.PROTECTED


def test_query_joining_after_tunnel_up_is_released_protected_at_once() -> None:
    core = HoldCore(HoldPolicy())
    core.query(1, NAME, 0.0)
    core.query(2, NAME, 0.0)
    core.answer(1, (A1,), 0.0)
    (req,) = only(core.key_result(NAME, SECURE, 0.0), EnsureTunnel)
    core.tunnel_done(req.request, True, 0.1)
    rel = release_of(core.answer(2, (A1,), 0.2), 2)
    assert rel.outcome is Outcome.PROTECTED


def test_empty_answer_is_released_without_waiting() -> None:
    core = HoldCore(HoldPolicy())
    core.query(1, NAME, 0.0)
    rel = release_of(core.answer(1, (), 0.0), 1)
    assert rel.outcome is Outcome.CLEAR and "no addresses" in rel.reason


def test_upstream_failure_is_servfail_counted_as_timeout() -> None:
    core = HoldCore(HoldPolicy())
    core.query(1, NAME, 0.0)
    rel = release_of(core.upstream_failed(1, "no upstream answered", 2.0), 1)
    assert rel.outcome is Outcome.UPSTREAM_FAILED and rel.outcome.servfail
    assert rel.outcome.value == "timeouts"


def test_cancel_forgets_and_duplicate_id_is_refused() -> None:
    core = HoldCore(HoldPolicy())
    core.query(1, NAME, 0.0)
    with pytest.raises(ValueError, match="already in flight"):
        core.query(1, NAME, 0.0)
    core.cancel(1)
    assert core.in_flight == 0
    assert core.answer(1, (A1,), 0.1) == []


# ------------------------------------------------------------------ property: key hygiene

_STATUSES = st.sampled_from(list(KeyStatus))
_EVENTS = st.lists(
    st.tuples(
        st.sampled_from(["query", "answer", "key", "tunnel_ok", "tunnel_fail", "tick", "fail"]),
        st.integers(0, 5),
        _STATUSES,
        st.sampled_from(["servfail", "insecure"]),
    ),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(_EVENTS)
def test_random_event_orders_keep_the_invariants(
    events: list[tuple[str, int, KeyStatus, str]],
) -> None:
    """Whatever the order: keys only from SECURE results and for proven addresses only,
    each query released once (query 5's answer is a tampered address)."""
    names = [dns.name.from_text(f"h{i}.example.") for i in range(3)]
    core = HoldCore(HoldPolicy(hold_limit=1.0))
    statuses: dict[dns.name.Name, KeyStatus] = {}
    released: list[int] = []
    requests: list[int] = []
    started: set[int] = set()
    now = 0.0
    for kind, n, status, _bogus in events:
        now += 0.3
        name = names[n % 3]
        actions: list[Action] = []
        if kind == "query" and n not in started:
            started.add(n)
            actions = core.query(n, names[n % 3], now)
        elif kind == "answer":
            actions = core.answer(n, (A3,) if n == 5 else (A1, V6), now)
        elif kind == "key":
            statuses[name.canonicalize()] = status
            result = KeyResult(status, (KEY,), "x", v4=V4_PROVEN, v6=V6_PROVEN)
            actions = core.key_result(name, result, now)
        elif kind in ("tunnel_ok", "tunnel_fail") and requests:
            actions = core.tunnel_done(requests.pop(0), kind == "tunnel_ok", now)
        elif kind == "tick":
            actions = core.tick(now)
        elif kind == "fail":
            actions = core.upstream_failed(n, "t", now)
        for action in actions:
            if isinstance(action, EnsureTunnel):
                assert statuses[action.name] is KeyStatus.SECURE
                assert set(action.addresses) <= V4_PROVEN.addresses | V6_PROVEN.addresses
                requests.append(action.request)
            if isinstance(action, Release):
                assert action.query not in released
                released.append(action.query)
                if action.outcome is Outcome.PROTECTED:
                    assert statuses[names[action.query % 3]] is KeyStatus.SECURE
                    assert action.query != 5  # its answer was never proven
    assert core.in_flight == len(started) - len(released)
