"""The responder under attack: COOKIEs on the cheapest path, half-open accounting per
source and prefix with peers holding an IKE SA first (RFC 8019), limits a reload applies.

The cookie path reads payload headers only, so it is checked against the full decoder
(it must find the very Ni and COOKIE ``Message.decode`` finds, and its answer must be the
codec's own encoding) and against garbage. The half-open rules are checked sans-IO, then
end to end on loopback: real UDP from many 127/8 source addresses (``tests.ike_flood``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from oe_router.config.schema import IkeConfig, OeConfig
from oe_router.ike.constants import (
    DhId,
    EncrId,
    ExchangeType,
    HeaderFlag,
    IntegId,
    NotifyType,
    PrfId,
)
from oe_router.ike.cookies import (
    DEMAND,
    DROP,
    VALID,
    CookieGate,
    CookieJar,
    ResponderLimits,
    is_new_init_request,
    scan_init_request,
)
from oe_router.ike.endpoint import Address, IkeEndpoint, SaHandle
from oe_router.ike.events import ChildSaEstablished, Event, IkeSaFailed
from oe_router.ike.halfopen import HalfOpenBook, prefix_of
from oe_router.ike.message import Message
from oe_router.ike.payloads import KE, Nonce, Notify, Payload, VendorID
from oe_router.ike.sa import IkeProposalSpec, IkeSa, IkeSaConfig
from oe_router.ike.service import IkeService
from tests.ike_flood import Flood, request_template, with_cookie
from tests.ike_loop import run_async
from tests.ike_pair import config

LO = "127.0.0.1"


# --------------------------------------------------------------------------- COOKIEs


def test_cookie_demand_is_the_codecs_own_encoding_and_the_cookie_comes_back_valid() -> None:
    ini = IkeSa.initiator(config(("192.0.2.1", 500), ("192.0.2.2", 500)), 0.0)
    (request,) = ini.datagrams_to_send()
    assert is_new_init_request(request)
    jar = CookieJar(b"k" * 32, period=60.0)
    gate = CookieGate(jar)
    assert gate.check(request, "192.0.2.1", 10.0) is DEMAND
    nonce = Message.decode(request).first(Nonce)
    assert isinstance(nonce, Nonce)
    spi = request[:8]
    cookie = jar.make(nonce.data, "192.0.2.1", spi, 10.0)
    demand = Message(
        spi, bytes(8), ExchangeType.IKE_SA_INIT, HeaderFlag.RESPONSE, 0,
        [Notify.status(NotifyType.COOKIE, cookie)],
    ).encode()  # fmt: skip
    assert bytes(gate.reply) == demand
    ini.receive_datagram(bytes(gate.reply), 10.1, ("192.0.2.2", 500))
    (again,) = ini.datagrams_to_send()  # our initiator repeats it with the cookie
    assert gate.check(again, "192.0.2.1", 70.0) is VALID  # the previous secret still counts
    assert gate.check(again, "192.0.2.9", 70.0) is DEMAND  # bound to the address
    assert gate.check(again, "192.0.2.1", 130.0) is DEMAND  # two periods on: stale
    assert not is_new_init_request(demand)  # a response is never taken for a request


_OTHER = st.one_of(
    st.builds(Notify.status, st.integers(16384, 65535).filter(lambda t: t != 16390),
              st.binary(max_size=40)),
    st.builds(VendorID, st.binary(max_size=40)),
    st.builds(KE, st.sampled_from([19, 31]), st.binary(min_size=1, max_size=64)),
)  # fmt: skip


@given(
    cookie=st.one_of(st.none(), st.binary(min_size=1, max_size=64)),
    before=st.lists(_OTHER, max_size=4),
    nonce=st.binary(min_size=16, max_size=256),
    after=st.lists(_OTHER, max_size=4),
    spi=st.binary(min_size=8, max_size=8),
)
def test_scan_finds_the_nonce_and_cookie_the_full_decoder_finds(
    cookie: bytes | None, before: list[Payload], nonce: bytes, after: list[Payload], spi: bytes
) -> None:
    payloads: list[Payload] = [*before, Nonce(nonce), *after]
    if cookie is not None:
        payloads.insert(0, Notify.status(NotifyType.COOKIE, cookie))
    data = Message(
        spi, bytes(8), ExchangeType.IKE_SA_INIT, HeaderFlag.INITIATOR, 0, payloads
    ).encode()
    decoded = Message.decode(data)
    assert is_new_init_request(data)
    found = scan_init_request(data)
    assert found is not None
    n0, n1, c0, c1 = found
    first_nonce = decoded.first(Nonce)
    assert isinstance(first_nonce, Nonce) and data[n0:n1] == first_nonce.data
    lead = decoded.payloads[0]
    leading_cookie = (
        lead.data if isinstance(lead, Notify) and lead.notify_type == NotifyType.COOKIE else b""
    )
    assert data[c0:c1] == leading_cookie


TEMPLATE = request_template("192.0.2.1", "192.0.2.2")


@given(
    st.one_of(
        st.binary(max_size=600),
        st.tuples(st.integers(0, len(TEMPLATE)), st.binary(max_size=8)).map(
            lambda cut: TEMPLATE[: cut[0]] + cut[1] + TEMPLATE[cut[0] + len(cut[1]) :]
        ),
        st.integers(0, len(TEMPLATE)).map(lambda n: TEMPLATE[:n]),
    )
)
def test_garbage_never_raises_and_offsets_stay_inside(data: bytes) -> None:
    is_new_init_request(data)
    found = scan_init_request(data)
    if found is not None:
        n0, n1, c0, c1 = found
        assert 28 <= n0 <= n1 <= len(data) and 0 <= c0 <= c1 <= len(data)
    gate = CookieGate(CookieJar(b"x" * 32))
    assert gate.check(data, "192.0.2.1", 0.0) in (DROP, DEMAND, VALID)


@given(before=st.integers(0, 17))
def test_a_cookie_in_front_never_pushes_the_nonce_out_of_reach(before: int) -> None:
    """Ni is looked for among the first 16 payloads; a request that gets an answer still
    gets in when it comes back with the cookie in front (one payload more)."""
    payloads: list[Payload] = [VendorID(bytes([i])) for i in range(before)]
    payloads.append(Nonce(b"n" * 32))

    def request(first: list[Payload]) -> bytes:
        return Message(
            b"s" * 8, bytes(8), ExchangeType.IKE_SA_INIT, HeaderFlag.INITIATOR, 0,
            first + payloads,
        ).encode()  # fmt: skip

    gate = CookieGate(CookieJar(b"k" * 32))
    verdict = gate.check(request([]), "192.0.2.1", 0.0)
    assert verdict is (DEMAND if before < 16 else DROP)
    if verdict is DEMAND:
        cookie = Message.decode(bytes(gate.reply)).payloads[0]
        assert isinstance(cookie, Notify)
        assert gate.check(request([cookie]), "192.0.2.1", 1.0) is VALID


def test_a_request_without_a_nonce_is_dropped_not_answered() -> None:
    no_nonce = Message(
        b"i" * 8, bytes(8), ExchangeType.IKE_SA_INIT, HeaderFlag.INITIATOR, 0,
        [VendorID(b"v")],
    ).encode()  # fmt: skip
    assert CookieGate(CookieJar(b"k" * 32)).check(no_nonce, "192.0.2.1", 0.0) is DROP


# --------------------------------------------------------------------------- half-open rules

DAEMON = ResponderLimits(cookie_threshold=10, half_open_limit=64, per_source=4, per_prefix=8)


def fill(book: HalfOpenBook[str], ip: str, now: float, *, known: bool = False) -> str:
    """Admit one verified request from ``ip`` at ``now`` (it must be admitted)."""
    refusal, victim = book.admit(ip, known=known, verified=True, now=now)
    assert refusal == "", (ip, refusal)
    if victim is not None:
        book.remove(victim)
    key = f"{ip}#{now}#{len(book)}"
    book.add(key, ip, known=known, verified=True, now=now)
    return key


def attack(book: HalfOpenBook[str], sources: list[str], seconds: int, per_second: int) -> int:
    """Every source tries ``per_second`` verified requests a second; returns refusals."""
    refused = 0
    for tick in range(seconds * per_second):
        now = tick / per_second
        for ip in sources:
            refusal, victim = book.admit(ip, known=False, verified=True, now=now)
            if refusal:
                refused += 1
                continue
            if victim is not None:
                book.remove(victim)
            book.add(f"{ip}@{tick}", ip, known=False, verified=True, now=now)
    return refused


def test_64_cookie_answering_sources_in_one_prefix_no_longer_lock_everyone_out() -> None:
    """The issue's attack: 64 sources, 2 requests a second each, all answering cookies.
    With one global cap they held every slot and the next legitimate peer was refused;
    now their /24 holds 8 and the peer gets in."""
    sources = [f"192.0.2.{i}" for i in range(1, 65)]
    # fairness alone (no prefix cap) already lets a newcomer in, displacing their oldest
    no_prefix_cap = HalfOpenBook[str](ResponderLimits(10, 64, per_source=4))
    attack(no_prefix_cap, sources, seconds=5, per_second=2)
    assert len(no_prefix_cap) == 56
    refusal, victim = no_prefix_cap.admit("198.51.100.7", known=False, verified=True, now=5.0)
    assert refusal == "" and victim is not None and victim.startswith("192.0.2.")

    book = HalfOpenBook[str](DAEMON)
    refused = attack(book, sources, seconds=5, per_second=2)
    summary = book.summary()
    assert summary["half_open"] == 8 and summary["half_open_largest_prefix"] == 8
    assert refused == 64 * 10 - 8
    assert book.admit("198.51.100.7", known=False, verified=True, now=5.0) == ("", None)


def test_per_source_cap_counts_only_requests_that_proved_their_address() -> None:
    """Spoofed requests taken below the cookie threshold must not spend a victim's share."""
    book = HalfOpenBook[str](DAEMON)
    for i in range(9):  # a spoofer, below the threshold: no cookie asked
        assert book.admit("203.0.113.5", known=False, verified=False, now=0.0) == ("", None)
        book.add(f"spoof{i}", "203.0.113.5", known=False, verified=False, now=0.0)
    for _ in range(4):
        fill(book, "203.0.113.5", 1.0)
    assert book.admit("203.0.113.5", known=False, verified=True, now=1.0) == ("source", None)
    assert book.summary()["half_open_unverified"] == 9


def test_ipv6_prefixes_are_64s() -> None:
    assert prefix_of("2001:db8:1:2:aaaa::1") == prefix_of("2001:db8:1:2:ffff::9")
    assert prefix_of("2001:db8:1:3::1") != prefix_of("2001:db8:1:2::1")
    assert prefix_of("192.0.2.200") == prefix_of("192.0.2.1") != prefix_of("192.0.3.1")
    book = HalfOpenBook[str](DAEMON)
    for i in range(8):
        fill(book, f"2001:db8:1:2::{i + 1}", 0.0)
    assert book.admit("2001:db8:1:2::99", known=False, verified=True, now=0.0)[0] == "prefix"
    assert book.admit("2001:db8:1:3::99", known=False, verified=True, now=0.0) == ("", None)


def test_peers_with_an_ike_sa_keep_a_reserve_then_displace_the_oldest_unknown() -> None:
    """Attackers spread one per /24 fill every slot peers without an SA may use (56 of 64);
    a newcomer is refused, a peer we hold an IKE SA with is not (RFC 8019)."""
    book = HalfOpenBook[str](DAEMON)
    first = fill(book, "10.0.0.1", 0.0)
    for i in range(1, 56):
        fill(book, f"10.0.{i}.1", 0.0)
    assert book.admit("198.51.100.7", known=False, verified=True, now=9.0) == ("global", None)
    for i in range(8):  # the reserve: the last eighth of the slots
        fill(book, f"192.0.2.{i + 1}", 9.0, known=True)
    assert len(book) == 64
    # full: a known peer displaces the oldest half-open SA of a peer without one
    assert book.admit("192.0.2.100", known=True, verified=True, now=9.0) == ("", first)
    assert book.summary()["half_open_known"] == 8


def test_a_newcomer_displaces_the_fullest_prefix_but_only_after_the_guard() -> None:
    book = HalfOpenBook[str](DAEMON)
    oldest: dict[int, str] = {}
    for p in range(7):  # 7 prefixes x 8 = the 56 slots for peers without an SA
        for i in range(8):
            key = fill(book, f"10.{p}.0.{i + 1}", float(p) / 10)
            oldest.setdefault(p, key)
    assert book.admit("198.51.100.7", known=False, verified=True, now=0.95)[0] == "global"
    refusal, victim = book.admit("198.51.100.7", known=False, verified=True, now=1.5)
    assert refusal == "" and victim == oldest[0]
    # a source of a full prefix never displaces its own kind: that would only be a swap
    assert book.admit("10.6.0.99", known=False, verified=True, now=9.0)[0] == "prefix"
    # unverified SAs (taken below the threshold) go first once they are old enough
    small = HalfOpenBook[str](ResponderLimits(2, 8, 4, 8))
    small.add("spoofed", "203.0.113.9", known=False, verified=False, now=0.0)
    for i in range(6):
        fill(small, f"10.9.{i}.1", 0.0)
    assert small.admit("198.51.100.7", known=False, verified=True, now=0.5)[0] == "global"
    assert small.admit("198.51.100.7", known=False, verified=True, now=1.0) == ("", "spoofed")


def test_removal_keeps_every_count_straight() -> None:
    book = HalfOpenBook[str](DAEMON)
    keys = [fill(book, f"10.{i % 3}.0.{i}", 0.0, known=i % 5 == 0) for i in range(1, 30)]
    book.add("u", "10.0.0.200", known=False, verified=False, now=0.0)
    for k in [*keys, "u", "never-added"]:
        book.remove(k)
    assert len(book) == 0 and book.summary() == {
        "half_open": 0,
        "half_open_known": 0,
        "half_open_unverified": 0,
        "half_open_sources": 0,
        "half_open_prefixes": 0,
        "half_open_largest_prefix": 0,
    }


# --------------------------------------------------------------------------- over UDP


class Events:
    def __init__(self) -> None:
        self.seen: list[tuple[SaHandle, Event]] = []

    def __call__(self, h: SaHandle, ev: Event) -> None:
        self.seen.append((h, ev))

    def of(self, cls: type[Event]) -> list[Event]:
        return [e for _, e in self.seen if isinstance(e, cls)]


async def until(what: str, cond: Callable[[], object], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        await asyncio.sleep(0.02)


async def responder(**kw: Any) -> IkeEndpoint:
    ep = IkeEndpoint(
        [LO], on_event=Events(), responder_policy=config, clock=time.monotonic,
        ike_port=0, natt_port=0, **kw,
    )  # fmt: skip
    await ep.start()
    return ep


async def initiator(ip: str, events: Events) -> IkeEndpoint:
    ep = IkeEndpoint([ip], on_event=events, clock=time.monotonic, ike_port=0, natt_port=0)
    await ep.start()
    return ep


def initiate(ini: IkeEndpoint, res: IkeEndpoint, tries: int = 8) -> SaHandle:
    ip = ini.addresses[0]
    cfg = dataclasses.replace(
        config((ip, ini.ike_port), (LO, res.ike_port)), retransmit_timeout=0.3,
        retransmit_tries=tries,
    )  # fmt: skip
    return ini.initiate(cfg, remote_natt_port=res.natt_port)


@run_async
async def test_legit_initiator_completes_while_64_sources_answer_cookies() -> None:
    """End to end on loopback with the daemon's default limits: 64 sources of one /24
    (127.0.5.x) at 2 new IKE_SA_INIT a second each, every COOKIE answered; a peer from
    127.0.9.1 still gets its IKE SA and Child SA."""
    res = await responder(half_open_limit=64, half_open_per_source=4, half_open_per_prefix=8)
    sources = [f"127.0.5.{i}" for i in range(1, 65)]
    flood = Flood(sources, (LO, res.ike_port), 128.0, request_template(sources[0], LO), True)
    flood.start(30.0)
    events = Events()
    ini = await initiator("127.0.9.1", events)
    try:
        await until("the flood holds half-open SAs", lambda: res.half_open_count() >= 8, 10)
        await asyncio.sleep(1.0)  # two more requests from every source
        initiate(ini, res)
        await until("the legitimate Child SA", lambda: events.of(ChildSaEstablished), 15)
        c, load = res.counters, res.load_status()
        assert c.cookies_sent > 0 and c.cookies_accepted > 0 and c.half_open_refused_prefix > 0
        # 8 that proved their address, and at most the 10 taken before cookies were asked
        assert load["half_open_largest_prefix"] == 8 and res.half_open_count() <= 8 + 10
    finally:
        flood.stop()
        await ini.stop()
        await res.stop()


@run_async
async def test_a_peer_holding_an_ike_sa_gets_in_when_unknown_sources_hold_every_slot() -> None:
    """Limit 16 (2 reserved), one half-open SA per prefix: sources one per /24 fill the
    14 others (no prefix holds more than a newcomer's would, so none is displaced) and a
    newcomer is refused, but the peer we already hold an IKE SA with starts another."""
    res = await responder(half_open_limit=16, half_open_per_source=1, half_open_per_prefix=1)
    known_events, new_events = Events(), Events()
    known = await initiator("127.0.9.1", known_events)
    newcomer = await initiator("127.0.10.1", new_events)
    flood: Flood | None = None
    try:
        initiate(known, res)
        await until("the first IKE SA", lambda: known_events.of(ChildSaEstablished), 10)
        sources = [f"127.{i}.1.1" for i in range(20, 60)]
        flood = Flood(sources, (LO, res.ike_port), 200.0, request_template(sources[0], LO), True)
        flood.start(30.0)
        # full, and the requests taken before cookies were asked displaced (after 1 s)
        await until(
            "14 half-open SAs that all proved their address",
            lambda: res.half_open_count() >= 14 and not res.load_status()["half_open_unverified"],
            10,
        )
        refused = res.counters.half_open_refused_global
        initiate(newcomer, res, tries=3)
        initiate(known, res)
        await until("the known peer's second IKE SA",
                    lambda: len(known_events.of(ChildSaEstablished)) == 2, 15)  # fmt: skip
        await until(
            f"the newcomer refused ({[type(e).__name__ for _, e in new_events.seen]}, "
            f"{res.counters}, {res.load_status()})",
            lambda: new_events.of(IkeSaFailed),
            15,
        )
        assert not new_events.of(ChildSaEstablished)
        assert res.counters.half_open_refused_global > refused
        assert res.load_status()["peers_with_sa"] == 1
    finally:
        if flood is not None:
            flood.stop()
        for ep in (known, newcomer, res):
            await ep.stop()


@run_async
async def test_a_flood_of_requests_that_fail_at_once_still_meets_cookies() -> None:
    """Spoofed IKE_SA_INIT requests we refuse at once (no proposal we accept) never stay
    half-open, so counting half-open SAs alone never asked them for a cookie: each got a
    full decode and an IKE SA that failed. Once 10 were started within a second, the rest
    get a COOKIE demand, which a spoofer cannot answer."""
    events = Events()
    ecp384_only = IkeProposalSpec(
        EncrId.AES_CBC, 128, PrfId.HMAC_SHA2_256, IntegId.HMAC_SHA2_256_128, (DhId.ECP_384,)
    )

    def policy(local: Address, remote: Address) -> IkeSaConfig:
        return dataclasses.replace(config(local, remote), ike_proposals=(ecp384_only,))

    res = IkeEndpoint(
        [LO], on_event=events, responder_policy=policy, clock=time.monotonic, ike_port=0,
        natt_port=0,
    )  # fmt: skip
    await res.start()
    sources = [f"127.0.{i}.9" for i in range(60, 80)]
    flood = Flood(sources, (LO, res.ike_port), 400.0, request_template(sources[0], LO))
    flood.start(30.0)
    try:
        await until("300 requests read", lambda: res.counters.received >= 300, 15)
    finally:
        flood.stop()
        await res.stop()
    failed = len(events.of(IkeSaFailed))
    assert 10 <= failed <= res.counters.received // 4, (failed, res.counters)
    assert res.counters.cookies_sent >= res.counters.received // 2, res.counters
    assert res.half_open_count() == 0


# --------------------------------------------------------------------------- reload


@run_async
async def test_reload_applies_half_open_limits_and_liveness_delay() -> None:
    """Item 10: a reload that changes ``half_open_limit`` (and the other endpoint
    settings) is applied, not only accepted: the status shows it, the next requests
    meet it, and an established IKE SA starts liveness checks at the new delay."""
    base = IkeConfig(dpd_delay=0.0, half_open_limit=64)
    a = IkeService([LO], ike_port=0, natt_port=0)
    b = IkeService([LO], ike_port=0, natt_port=0)
    await a.start(OeConfig(ike=base))
    await b.start(OeConfig(ike=base))
    ep_a, ep_b = a.endpoint, b.endpoint
    assert ep_a is not None and ep_b is not None
    a.remote_ike_port, a.remote_natt_port = ep_b.ike_port, ep_b.natt_port
    flood: Flood | None = None
    try:
        await a.up(LO)
        got = ep_a.counters.received
        await asyncio.sleep(0.5)
        assert ep_a.counters.received == got, "liveness checks with dpd_delay 0"
        tight = dataclasses.replace(
            base, dpd_delay=0.3, half_open_limit=3, half_open_per_source=1, half_open_per_prefix=2
        )
        await b.reload(OeConfig(ike=tight))
        ike = b.status().ike
        assert (ike["half_open_limit"], ike["half_open_per_source"]) == (3, 1)
        assert ike["half_open_per_prefix"] == 2 and ike["cookie_threshold"] == 3
        await until("a liveness check from b", lambda: ep_a.counters.received > got, 5)
        sources = [f"127.0.{i}.7" for i in range(30, 50)]
        flood = Flood(sources, (LO, ep_b.ike_port), 100.0, request_template(sources[0], LO), True)
        flood.start(30.0)
        await until("requests refused", lambda: ep_b.counters.half_open_dropped > 20, 10)
        assert ep_b.half_open_count() <= 3
        assert b.status().ike["half_open"] <= 3
    finally:
        if flood is not None:
            flood.stop()
        await a.stop()
        await b.stop()


def test_with_cookie_helper_is_what_our_initiator_sends() -> None:
    """The flood helper answers COOKIEs exactly as our initiator does (same bytes)."""
    ini = IkeSa.initiator(config(("192.0.2.1", 500), ("192.0.2.2", 500)), 0.0)
    (request,) = ini.datagrams_to_send()
    gate = CookieGate(CookieJar(b"k" * 32))
    assert gate.check(request, "192.0.2.1", 0.0) is DEMAND
    ini.receive_datagram(bytes(gate.reply), 0.0, ("192.0.2.2", 500))
    (again,) = ini.datagrams_to_send()
    cookie = Message.decode(bytes(gate.reply)).payloads[0]
    assert isinstance(cookie, Notify)
    assert with_cookie(request, cookie.data) == again
