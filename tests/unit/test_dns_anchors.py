"""RFC 5011 trust anchor state machine (dns/anchors.py) and its state file (dns/autotrust.py).

Root DNSKEY probe replies are built here from fresh ECDSA keys and signed with
dnspython; the trust point validates them with the package's own validator. Time is a
value: thirty days of hold-down pass between two ``feed`` calls.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import dns.dnssec
import dns.message
import dns.name
import dns.rdatatype
import dns.rrset
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings
from hypothesis import strategies as st

from oe_router.dns.anchors import (
    MAX_KEYS,
    TRANSITIONS,
    AnchorStateError,
    Event,
    KeyState,
    Timers,
    TrustPoint,
    _from_iso,
    _iso,
    parse_timers,
)
from oe_router.dns.autotrust import ManagedAnchors, seed_text
from oe_router.dns.dnssec import Query, load_trust_anchors
from oe_router.dns.keylookup import query_message
from oe_router.dns.upstream import UpstreamError

ROOT = dns.name.root
DAY = 86400.0
T0 = 1_800_000_000.0
REVOKE = 0x0080
KSK2017 = "20326 8 2 E06D44B80B8F1D39A95C0B0D7C65D08458E880409BBC683457104237C7F8EC8D"


class Key:
    """A root KSK: its private half, its DNSKEY, and the same key revoked."""

    def __init__(self, flags: int = 257) -> None:
        self.private = ec.generate_private_key(ec.SECP256R1())
        self.dnskey = dns.dnssec.make_dnskey(self.private.public_key(), 13, flags=flags)
        self.revoked = self.dnskey.replace(flags=flags | REVOKE)

    @property
    def tag(self) -> int:
        return int(dns.dnssec.key_id(self.dnskey))

    def ds_line(self) -> str:
        return f". 3600 IN DS {dns.dnssec.make_ds(ROOT, self.dnskey, 'SHA256')}\n"


def reply(
    keys: Sequence[Any],
    signers: Sequence[tuple[Key, Any]],
    now: float,
    ttl: int = 3600,
    lifetime: float = 14 * DAY,
) -> dns.message.Message:
    """The root's DNSKEY RRset ``keys`` signed by each (key, the DNSKEY form it signs as)."""
    rrset = dns.rrset.from_rdata_list(ROOT, ttl, list(keys))
    query = query_message(Query(ROOT, dns.rdatatype.DNSKEY))
    msg = dns.message.make_response(query)
    msg.answer.append(rrset)
    sigs = [
        dns.dnssec.sign(
            rrset, k.private, ROOT, form, inception=now - 3600, expiration=now + lifetime
        )
        for k, form in signers
    ]
    if sigs:
        msg.answer.append(dns.rrset.from_rdata_list(ROOT, ttl, sigs))
    return dns.message.from_wire(msg.to_wire())  # as the forwarding client hands it over


@pytest.fixture(scope="module")
def k1() -> Key:
    return Key()


@pytest.fixture(scope="module")
def k2() -> Key:
    return Key()


def state(point: TrustPoint, key: Key) -> KeyState | None:
    for a in point.anchors:
        if a.key_tag == key.tag:
            return a.state
    return None


def trusted_tags(point: TrustPoint) -> set[int]:
    return {int(d.key_tag) for a in point.trust_anchors().anchors for d in a.ds}


def seeded(*keys: Key, timers: Timers | None = None) -> TrustPoint:
    return TrustPoint.from_text("".join(k.ds_line() for k in keys), "seed", T0, timers)


def both_valid(k1: Key, k2: Key) -> TrustPoint:
    point = seeded(k1, k2)
    point.feed(reply([k1.dnskey, k2.dnskey], [(k1, k1.dnskey)], T0), T0)
    assert (state(point, k1), state(point, k2)) == (KeyState.VALID, KeyState.VALID)
    return point


# --------------------------------------------------------------------------- the table


def test_transition_table_is_rfc5011_and_nothing_else_moves_a_key() -> None:
    s, e = KeyState, Event
    rfc = {
        (s.START, e.NEW_KEY): s.ADDPEND,
        (s.ADDPEND, e.KEY_REM): s.START,
        (s.ADDPEND, e.ADD_TIME): s.VALID,
        (s.VALID, e.KEY_REM): s.MISSING,
        (s.VALID, e.REVBIT): s.REVOKED,
        (s.MISSING, e.KEY_PRES): s.VALID,
        (s.MISSING, e.REVBIT): s.REVOKED,
        (s.REVOKED, e.REM_TIME): s.REMOVED,
    }
    assert rfc.items() <= TRANSITIONS.items()
    # beyond the RFC's table only: a self-revoked key is dead, pending or not
    assert set(TRANSITIONS) - set(rfc) == {(s.ADDPEND, e.REVBIT), (s.START, e.REVBIT)}
    assert all(TRANSITIONS[(st, e.REVBIT)] is s.REVOKED for st in (s.ADDPEND, s.START))
    assert {s.VALID, s.MISSING} == {st for st in KeyState if st.trusted}


def test_a_pair_outside_the_table_changes_nothing(k1: Key) -> None:
    point = seeded(k1)
    assert not point._set(0, Event.ADD_TIME, T0 + 1)  # Valid + AddTime: not in the table
    assert not point._set(0, Event.REM_TIME, T0 + 1)
    assert point.anchors[0].state is KeyState.VALID and point.anchors[0].since == T0
    assert not point.dirty


# --------------------------------------------------------------------------- add hold-down


def test_new_key_is_pending_for_the_add_hold_down_then_valid(
    k1: Key, k2: Key, caplog: pytest.LogCaptureFixture
) -> None:
    point = seeded(k1)
    zsk = Key(flags=256)
    caplog.set_level(logging.INFO, "oe_router.dns.anchors")
    both = reply([k1.dnskey, k2.dnskey, zsk.dnskey], [(k1, k1.dnskey)], T0)
    assert not point.feed(both, T0)  # the trusted keys did not change
    assert state(point, k1) is KeyState.VALID and state(point, k2) is KeyState.ADDPEND
    assert state(point, zsk) is None  # only key-signing keys are trust anchors
    assert point.anchors[1].until == T0 + 30 * DAY
    assert trusted_tags(point) == {k1.tag}
    assert point.dirty and point.anchors[0].dnskey == k1.dnskey  # the seed met its key
    assert f"key {k2.tag} (algorithm 13): start -> addpend (NewKey)" in caplog.text

    later = T0 + 30 * DAY - 60
    assert not point.feed(reply([k1.dnskey, k2.dnskey], [(k1, k1.dnskey)], later), later)
    assert state(point, k2) is KeyState.ADDPEND
    done = T0 + 30 * DAY
    assert point.feed(reply([k1.dnskey, k2.dnskey], [(k1, k1.dnskey)], done), done)
    assert state(point, k2) is KeyState.VALID
    assert trusted_tags(point) == {k1.tag, k2.tag}
    assert f"key {k2.tag} (algorithm 13): addpend -> valid (AddTime)" in caplog.text


def test_add_hold_down_is_the_ttl_when_that_is_longer(k1: Key, k2: Key) -> None:
    point = seeded(k1, timers=Timers(add_hold_down=10))
    point.feed(reply([k1.dnskey, k2.dnskey], [(k1, k1.dnskey)], T0, ttl=7200), T0)
    assert point.anchors[1].until == T0 + 7200


def test_pending_key_that_goes_away_starts_over(
    k1: Key, k2: Key, caplog: pytest.LogCaptureFixture
) -> None:
    point = seeded(k1)
    caplog.set_level(logging.INFO, "oe_router.dns.anchors")
    point.feed(reply([k1.dnskey, k2.dnskey], [(k1, k1.dnskey)], T0), T0)
    gone = T0 + 10 * DAY
    point.feed(reply([k1.dnskey], [(k1, k1.dnskey)], gone), gone)
    assert f"key {k2.tag} (algorithm 13): addpend -> start (KeyRem)" in caplog.text
    assert state(point, k2) is None  # Start: not a trust anchor, not kept
    back = T0 + 20 * DAY
    point.feed(reply([k1.dnskey, k2.dnskey], [(k1, k1.dnskey)], back), back)
    assert state(point, k2) is KeyState.ADDPEND
    assert point.anchors[1].until == back + 30 * DAY  # the hold-down begins again
    end_of_first = T0 + 31 * DAY
    point.feed(reply([k1.dnskey, k2.dnskey], [(k1, k1.dnskey)], end_of_first), end_of_first)
    assert state(point, k2) is KeyState.ADDPEND


# --------------------------------------------------------------------------- missing


def test_valid_key_that_goes_away_is_missing_and_still_trusted_until_it_is_back(
    k1: Key, k2: Key
) -> None:
    point = both_valid(k1, k2)
    t = T0 + DAY
    assert not point.feed(reply([k2.dnskey], [(k2, k2.dnskey)], t), t)
    assert state(point, k1) is KeyState.MISSING
    assert trusted_tags(point) == {k1.tag, k2.tag}  # Missing is abnormal, not untrusted
    t += DAY
    point.feed(reply([k1.dnskey, k2.dnskey], [(k2, k2.dnskey)], t), t)
    assert state(point, k1) is KeyState.VALID


# --------------------------------------------------------------------------- revocation


def test_self_signed_revocation_then_removal_after_the_remove_hold_down(k1: Key, k2: Key) -> None:
    point = both_valid(k1, k2)
    t = T0 + DAY
    roll = reply([k1.revoked, k2.dnskey], [(k1, k1.revoked), (k2, k2.dnskey)], t)
    assert point.feed(roll, t)
    assert state(point, k1) is KeyState.REVOKED
    assert trusted_tags(point) == {k2.tag}
    t2 = t + 30 * DAY - 60
    point.feed(reply([k1.revoked, k2.dnskey], [(k1, k1.revoked), (k2, k2.dnskey)], t2), t2)
    assert state(point, k1) is KeyState.REVOKED
    point.tick(t + 30 * DAY)  # RemTime needs no probe
    assert state(point, k1) is KeyState.REMOVED
    # a removed key that comes back unrevoked is not trusted again without a hold-down
    t3 = t + 40 * DAY
    point.feed(reply([k1.dnskey, k2.dnskey], [(k2, k2.dnskey)], t3), t3)
    assert state(point, k1) is KeyState.REMOVED and trusted_tags(point) == {k2.tag}


def test_revoke_bit_without_the_keys_own_signature_does_not_revoke(k1: Key, k2: Key) -> None:
    point = both_valid(k1, k2)
    t = T0 + DAY
    point.feed(reply([k1.revoked, k2.dnskey], [(k2, k2.dnskey)], t), t)
    assert state(point, k1) is KeyState.MISSING  # its unrevoked form is gone, nothing else
    forged = reply([k1.revoked, k2.dnskey], [(k2, k1.revoked), (k2, k2.dnskey)], t)
    point.feed(forged, t)  # an RRSIG claiming the revoked key's tag, made by another key
    assert state(point, k1) is KeyState.MISSING


def test_a_pending_key_revoked_by_itself_is_never_trusted(k1: Key, k2: Key) -> None:
    point = seeded(k1)
    point.feed(reply([k1.dnskey, k2.dnskey], [(k1, k1.dnskey)], T0), T0)
    t = T0 + DAY
    point.feed(reply([k1.dnskey, k2.revoked], [(k1, k1.dnskey), (k2, k2.revoked)], t), t)
    assert state(point, k2) is KeyState.REVOKED
    t = T0 + 20 * DAY
    point.feed(reply([k1.dnskey, k2.dnskey], [(k1, k1.dnskey)], t), t)
    assert state(point, k2) is KeyState.REVOKED and trusted_tags(point) == {k1.tag}


# --------------------------------------------------------------------------- bogus probes


def test_probe_that_fails_validation_changes_nothing(k1: Key, k2: Key) -> None:
    point = both_valid(k1, k2)
    point.saved()
    before = [*point.anchors]
    rogue = Key()
    t = T0 + DAY
    cases = {
        "signed by an unknown key only": reply(
            [k1.dnskey, rogue.dnskey], [(rogue, rogue.dnskey)], t
        ),
        "expired signature": reply([rogue.dnskey, k2.dnskey], [(k2, k2.dnskey)], t - 20 * DAY),
        "no signature": reply([rogue.dnskey], [], t),
        "revocation signed by the revoked key only": reply(
            [k1.revoked, rogue.dnskey], [(k1, k1.revoked)], t
        ),
    }
    for why, msg in cases.items():
        assert not point.feed(msg, t), why
        assert point.anchors == before and not point.dirty, why
        assert point.last_probe.startswith("failed at"), why
        assert point.next_probe == t + 3600, why  # retry: RFC 5011 section 2.3's floor
    assert not point.feed(None, t) and point.anchors == before


def test_the_last_trusted_key_is_never_lost(k1: Key, k2: Key) -> None:
    point = seeded(k1)
    t = T0
    for msg in (
        reply([k2.dnskey], [(k2, k2.dnskey)], t),  # a replacement signed by itself: bogus
        reply([k1.revoked], [(k1, k1.revoked)], t),  # revoking the only key: bogus
        reply([k2.dnskey, k1.revoked], [(k1, k1.revoked), (k2, k2.dnskey)], t),
    ):
        point.feed(msg, t)
        assert state(point, k1) is KeyState.VALID and trusted_tags(point) == {k1.tag}
        assert state(point, k2) is None


def test_new_keys_beyond_the_bound_are_not_tracked(k1: Key) -> None:
    point = seeded(k1)
    many = [Key() for _ in range(MAX_KEYS + 3)]
    point.feed(reply([k1.dnskey, *(k.dnskey for k in many)], [(k1, k1.dnskey)], T0), T0)
    assert len(point.anchors) == MAX_KEYS


# --------------------------------------------------------------------------- refresh timer


def test_active_refresh_interval_is_rfc5011_section_2_3(k1: Key) -> None:
    cases = [  # (ttl, signature lifetime) -> interval
        (3600, 14 * DAY, 3600.0),  # 1/2 TTL below the one-hour floor
        (172800, 14 * DAY, DAY),  # 1/2 TTL
        (172800, 1.5 * DAY, 3600.0 * 18),  # 1/2 of the RRSIG's remaining life
        (90 * 86400, 60 * DAY, 15 * DAY),  # the 15-day ceiling
    ]
    for ttl, lifetime, interval in cases:
        point = seeded(k1)
        point.feed(reply([k1.dnskey], [(k1, k1.dnskey)], T0, ttl, lifetime), T0)
        assert point.next_probe == pytest.approx(T0 + interval), (ttl, lifetime)


def test_timers_from_text() -> None:
    timers = parse_timers("add_hold_down=3, remove_hold_down=5,min_refresh=0.5")
    assert (timers.add_hold_down, timers.remove_hold_down, timers.min_refresh) == (3, 5, 0.5)
    assert timers.max_refresh == 15 * DAY
    for bad, needle in (("add_holddown=3", "unknown"), ("min_refresh=x", "not seconds"),
                        ("max_retry=-1", "positive")):  # fmt: skip
        with pytest.raises(ValueError, match=needle):
            parse_timers(bad)


# --------------------------------------------------------------------------- the state file


def test_state_file_round_trip(k1: Key, k2: Key) -> None:
    point = both_valid(k1, k2)
    k3 = Key()
    t = T0 + DAY
    point.feed(reply([k1.revoked, k2.dnskey, k3.dnskey], [(k1, k1.revoked), (k2, k2.dnskey)], t), t)
    point.anchors.append(TrustPoint.from_text(Key().ds_line(), "x", t).anchors[0])  # a DS seed
    text = point.to_text()
    assert text.count("\n. IN DNSKEY ") == 3 and text.count("\n. IN DS ") == 1
    assert "state=addpend since=2027-01-16T08:00:00Z until=2027-02-15T08:00:00Z" in text
    back = TrustPoint.from_text(text, "state", t + 5)
    assert back.anchors == point.anchors
    assert back.to_text() == text
    # a state file is a zone file: a plain anchor reader sees its records
    assert len(load_trust_anchors(text).anchors[0].dnskeys) == 3


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        (". IN DS {DS} ; state=valid", "needs state= and since="),
        (". IN DS {DS} ; state=happy since=2026-01-01T00:00:00Z", "state: 'happy'"),
        (". IN DS {DS} ; state=valid since=yesterday", "since: 'yesterday'"),
        (". IN DS {DS} ; state=valid since=2026-01-01T00:00:00Z colour=red", "colour"),
        ("example. IN DS {DS}", "only the root's keys"),
        (". IN A 192.0.2.1", "only DS and DNSKEY"),
        (". IN DS twenty", "not a DS or DNSKEY record"),
        (". IN DNSKEY 256 4 13 AAAA", "not a zone key"),
    ],
)
def test_bad_state_lines_are_named(line: str, needle: str) -> None:
    with pytest.raises(AnchorStateError) as err:
        text = "; header\n" + line.format(DS=KSK2017) + "\n"
        TrustPoint.from_text(text, "/etc/oe/root.anchors", T0)
    assert str(err.value).startswith("/etc/oe/root.anchors:2: ")
    assert needle in str(err.value)


def test_the_shipped_seed_is_the_iana_root_anchors() -> None:
    point = TrustPoint.from_text(seed_text(), "seed", T0)
    rows = {(r["key_tag"], r["algorithm"], r["state"], r["form"]) for r in point.rows()}
    assert rows == {(20326, 8, "valid", "ds"), (38696, 8, "valid", "ds")}
    digests = {a.key_tag: a.ds.digest.hex().upper() for a in point.anchors}
    assert digests == {
        20326: "E06D44B80B8F1D39A95C0B0D7C65D08458E880409BBC683457104237C7F8EC8D",
        38696: "683D2D0ACB8C9B712A1948B27F741219298D0A450D612C483AF444A4C0FB2B16",
    }


class Upstream:
    """The DNS front's forwarding client, answering the probe with ``msg`` (or failing)."""

    def __init__(self, msg: dns.message.Message | None) -> None:
        self.msg = msg
        self.asked: list[dns.message.Message] = []

    async def resolve(self, message: dns.message.Message) -> dns.message.Message:
        self.asked.append(message)
        if self.msg is None:
            raise UpstreamError("no upstream answered")
        return self.msg


def test_first_start_is_seeded_and_the_file_written_by_the_first_validated_probe(
    tmp_path: Path, k1: Key, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "etc" / "oe" / "root.anchors"
    managed = ManagedAnchors(path, clock=lambda: T0, seed=lambda: k1.ds_line())
    assert managed.source == "shipped IANA root anchors" and caplog.text == ""
    asyncio.run(managed.probe(Upstream(None)))
    assert not path.exists()  # nothing learnt, nothing written (routers write to flash)
    seen: list[object] = []
    managed.listeners.append(seen.append)
    upstream = Upstream(reply([k1.dnskey], [(k1, k1.dnskey)], T0))
    asyncio.run(managed.probe(upstream))
    asked = upstream.asked[0]
    assert (asked.question[0].name, asked.question[0].rdtype) == (ROOT, dns.rdatatype.DNSKEY)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    text = path.read_text()
    assert f". IN DNSKEY {k1.dnskey.to_text()} ; state=valid" in text
    assert seen == []  # same trusted key: the validator keeps its anchors
    again = ManagedAnchors(path, clock=lambda: T0 + 1)
    assert again.source == str(path) and again.point.anchors == managed.point.anchors
    assert [e for e in os.listdir(path.parent) if e != "root.anchors"] == []  # no temp files


@pytest.mark.parametrize("content", [b"\x00\xff garbage\n", b". IN DS 1 2 3 ZZ ; state=x\n", b""])
def test_corrupt_state_file_is_one_log_line_and_the_shipped_anchors(
    tmp_path: Path, content: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "root.anchors"
    path.write_bytes(content)
    managed = ManagedAnchors(path, clock=lambda: T0)
    errors = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(errors) == 1, caplog.text
    assert str(path) in errors[0].getMessage()
    assert "IANA root anchors shipped with oe-router" in errors[0].getMessage()
    assert managed.source == "shipped IANA root anchors"
    assert {a.key_tag for a in managed.point.anchors} == {20326, 38696}
    assert path.read_bytes() == content  # left as it was until a probe rewrites it


def test_unreadable_state_file_falls_back_too(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "root.anchors"
    path.mkdir()  # reading it fails with EISDIR
    managed = ManagedAnchors(path, clock=lambda: T0)
    assert "cannot be read" in caplog.text and managed.source == "shipped IANA root anchors"


def test_anchor_change_reaches_the_listeners(tmp_path: Path, k1: Key, k2: Key) -> None:
    path = tmp_path / "root.anchors"
    path.write_text(k1.ds_line())
    now = [T0]
    managed = ManagedAnchors(path, Timers(add_hold_down=10), clock=lambda: now[0])
    seen: list[set[int]] = []
    managed.listeners.append(lambda a: seen.append({int(d.key_tag) for d in a.anchors[0].ds}))
    both = reply([k1.dnskey, k2.dnskey], [(k1, k1.dnskey)], T0)
    asyncio.run(managed.probe(Upstream(both)))
    assert seen == []
    now[0] = T0 + 3600
    asyncio.run(managed.probe(Upstream(both)))
    assert seen == [{k1.tag, k2.tag}]
    assert "state=valid" in path.read_text().split(k2.dnskey.to_text())[1].splitlines()[0]


def test_a_root_out_of_reach_costs_one_log_line_not_one_per_probe(
    k1: Key, caplog: pytest.LogCaptureFixture
) -> None:
    point = seeded(k1)
    caplog.set_level(logging.INFO, "oe_router.dns.anchors")
    for i in range(5):
        point.feed(None, T0 + i * 3600, "no upstream answered")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["root DNSKEY probe: no upstream answered; trust anchors unchanged"]
    assert point.last_probe == "failed at 2027-01-15T12:00:00Z: no upstream answered"
    point.feed(reply([k1.dnskey], [(k1, k1.dnskey)], T0 + DAY), T0 + DAY)
    assert "root DNSKEY probe: secure again" in caplog.text
    assert point.last_probe.startswith("secure at 2027-01-16T08:00:00Z (1 keys, 1 trusted)")


@settings(max_examples=500, deadline=None)
@given(
    fields=st.tuples(
        st.integers(1, 9999),
        st.integers(0, 13),
        st.integers(0, 32),
        st.integers(0, 25),
        st.integers(0, 61),
        st.integers(0, 62),
    ),
    width=st.sampled_from([1, 2]),
)
def test_state_file_times_read_as_datetime_reads_them(fields: tuple[int, ...], width: int) -> None:
    """The state file's times are parsed by hand (no ``datetime`` at start); what
    ``datetime.strptime`` accepts, and the POSIX time it gives, are the same."""
    year, rest = fields[0], fields[1:]
    text = f"{year:04d}-" + "{:0{w}d}-{:0{w}d}T{:0{w}d}:{:0{w}d}:{:0{w}d}Z".format(*rest, w=width)
    try:
        expected: float | None = (
            dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC).timestamp()
        )
    except ValueError:
        expected = None
    try:
        got: float | None = _from_iso(text)
    except ValueError as exc:
        assert "is not a UTC time like" in str(exc)
        got = None
    assert got == expected
    if got is not None and width == 2 and year >= 1000:  # strftime writes year 1 as "1"
        assert _iso(got) == text
