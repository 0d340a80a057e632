"""The DNS front's message helpers and its Resolver driving the hold core.

The upstream here is an in-memory forwarder built with dnspython (the host tier
uses knotd); KeyLookup and TunnelRequester are recording stand-ins for the
validator and the OE manager, as the brief asks, with controllable delays.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Awaitable, Callable

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest

from oe_router.dns.front import AnswerCache, Question, Resolver, client_udp_limit, fit_to_limit
from oe_router.dns.hold import AddressProof, HoldPolicy, IPAddress, KeyResult, KeyStatus
from oe_router.dns.ipseckey import KeyKind, PeerKey
from oe_router.dns.upstream import UpstreamError, parse_resolv_conf
from oe_router.dns.wire import read_reply, rewrite_ttls

NAME = dns.name.from_text("host.example.")
KEY = PeerKey(kind=KeyKind.NONE, public_key=None, precedence=1, owner=NAME, algorithm=0)
#: What the validator proves of host.example's A and AAAA RRsets (Upstream's answers).
PROVEN_A = AddressProof(
    KeyStatus.SECURE, frozenset(ipaddress.ip_address(f"192.0.2.{i}") for i in range(1, 61))
)
NO_AAAA = AddressProof(KeyStatus.SECURE, frozenset(), "NODATA")


def signed(
    keys: tuple[PeerKey, ...] = (KEY,), reason: str = "", a: AddressProof = PROVEN_A
) -> KeyResult:
    """A SECURE lookup result: the zone is signed, its A RRset validated."""
    return KeyResult(KeyStatus.SECURE, keys, reason, v4=a, v6=NO_AAAA)


def reply_for(wire: bytes, n_addresses: int = 1, ttl: int = 3600) -> bytes:
    query = dns.message.from_wire(wire)
    reply = dns.message.make_response(query)
    q = query.question[0]
    if q.rdtype == dns.rdatatype.A:
        addrs = [f"192.0.2.{i + 1}" for i in range(n_addresses)]
        reply.answer.append(dns.rrset.from_text_list(q.name, ttl, "IN", "A", addrs))
    return reply.to_wire()


class Upstream:
    """In-memory forwarder: answers A with n addresses, or fails, after ``delay``."""

    def __init__(self, n: int = 1, fail: bool = False, delay: float = 0.0) -> None:
        self.n, self.fail, self.delay, self.calls = n, fail, delay, 0

    async def query(self, wire: bytes) -> bytes:
        self.calls += 1
        await asyncio.sleep(self.delay)
        if self.fail:
            raise UpstreamError("no upstream answered (192.0.2.53:53: no UDP reply)")
        return reply_for(wire, self.n)


class Keys:
    def __init__(self, result: KeyResult, delay: float = 0.0) -> None:
        self.result, self.delay, self.calls = result, delay, 0

    async def lookup(self, name: dns.name.Name) -> KeyResult:
        self.calls += 1
        await asyncio.sleep(self.delay)
        return self.result

    def cached(self, name: dns.name.Name) -> KeyResult | None:
        return None  # every query takes the lookup path (tested with delays here)


class RememberedKeys(Keys):
    """A key lookup that already knows the answer (as ValidatingKeyLookup after one lookup)."""

    def cached(self, name: dns.name.Name) -> KeyResult | None:
        return self.result


class Tunnels:
    """Records ensure_tunnel calls and the loop time each one finished."""

    def __init__(self, delay: float, ok: bool = True) -> None:
        self.delay, self.ok = delay, ok
        self.calls: list[tuple[dns.name.Name, tuple[IPAddress, ...], PeerKey]] = []
        self.done_at: list[float] = []

    async def ensure_tunnel(
        self, name: dns.name.Name, addresses: tuple[IPAddress, ...], key: PeerKey
    ) -> bool:
        self.calls.append((name, addresses, key))
        await asyncio.sleep(self.delay)
        self.done_at.append(asyncio.get_running_loop().time())
        return self.ok


def query(name: str = "host.example.", rdtype: str = "A", **kw: object) -> bytes:
    return dns.message.make_query(name, rdtype, **kw).to_wire()  # type: ignore[arg-type]


def run(coro: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(coro())  # type: ignore[arg-type]


# ------------------------------------------------------------------ pure helpers


def test_client_udp_limit_follows_edns0() -> None:
    assert client_udp_limit(dns.message.make_query("a.", "A")) == 512
    assert client_udp_limit(dns.message.make_query("a.", "A", use_edns=0, payload=4096)) == 4096
    assert client_udp_limit(dns.message.make_query("a.", "A", use_edns=0, payload=100)) == 512


def test_fit_to_limit_sets_tc_and_keeps_question_and_opt() -> None:
    wire = query(use_edns=0, payload=1232)
    big = reply_for(wire, n_addresses=60)
    assert len(big) > 512
    out, truncated = fit_to_limit(big, 512)
    msg = dns.message.from_wire(out)
    assert truncated and msg.flags & dns.flags.TC and not msg.answer
    assert msg.question[0].name == NAME and msg.edns == 0
    assert fit_to_limit(big, 4096) == (big, False)


def test_reply_view_caps_ttls_and_finds_addresses() -> None:
    wire = reply_for(query(), n_addresses=3, ttl=7200)
    view = read_reply(wire)
    assert view is not None and view.min_ttl == 7200
    assert sorted(view.addresses) == [ipaddress.ip_address(f"192.0.2.{i}") for i in (1, 2, 3)]
    msg = dns.message.from_wire(rewrite_ttls(wire, 7, view.ttl_offsets, cap=300))
    assert msg.id == 7 and msg.answer[0].ttl == 300
    msg = dns.message.from_wire(rewrite_ttls(wire, 7, view.ttl_offsets, cap=None))
    assert msg.answer[0].ttl == 7200  # None = no cap


def test_parse_resolv_conf_names_bad_lines_and_excludes_ourselves() -> None:
    from oe_router.config.schema import Endpoint

    text = "# x\nnameserver 192.0.2.1\nnameserver fe80::1%eth0\nnameserver bogus\nsearch lan\n"
    text += "nameserver 127.0.0.1\n"
    servers, problems = parse_resolv_conf(text, "/tmp/r", exclude=[Endpoint("127.0.0.1", 53)])
    assert [str(s) for s in servers] == ["192.0.2.1:53", "[fe80::1]:53"]
    assert len(problems) == 1 and "/tmp/r:4" in problems[0] and "bogus" in problems[0]


def test_answer_cache_counts_ttl_down() -> None:
    cache = AnswerCache()
    wire = query()
    reply = reply_for(wire, ttl=100)
    key = Question.of_message(dns.message.from_wire(wire)).cache_key
    view = read_reply(reply)
    assert view is not None
    cache.put(key, reply, view, now=10.0)
    hit = cache.get(key, 0x4242, now=40.5)
    assert hit is not None
    msg = dns.message.from_wire(hit[0])
    assert msg.id == 0x4242 and msg.answer[0].ttl == 70
    assert cache.get(key, 1, now=110.0) is None


# ------------------------------------------------------------------ resolver


def test_malformed_queries_get_formerr_or_are_dropped(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        r = Resolver(Upstream(), HoldPolicy())
        assert await r.handle(b"\x12", ("192.0.2.9", 5353), 512) is None
        junk = b"\xab\xcd\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x05abc"
        out = await r.handle(junk, ("192.0.2.9", 5353), 512)
        assert out is not None
        msg = dns.message.from_wire(out)
        assert msg.id == 0xABCD and msg.rcode() == dns.rcode.FORMERR
        response = dns.message.from_wire(reply_for(query()))
        assert await r.handle(response.to_wire(), ("192.0.2.9", 1), 512) is None
        assert (r.stats.formerr, r.stats.dropped) == (1, 2)

    run(main)
    assert "192.0.2.9:5353" in caplog.text


def test_non_address_queries_are_forwarded_without_key_lookup() -> None:
    async def main() -> None:
        keys = Keys(KeyResult(KeyStatus.INSECURE))
        r = Resolver(Upstream(), HoldPolicy(), key_lookup=keys)
        out = await r.handle(query(rdtype="TXT"), ("192.0.2.9", 1), 512)
        assert out is not None and dns.message.from_wire(out).rcode() == dns.rcode.NOERROR
        assert keys.calls == 0

    run(main)


def test_secure_key_answer_released_after_tunnel_with_capped_ttl() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        tunnels = Tunnels(delay=0.2)
        r = Resolver(
            Upstream(n=2),
            HoldPolicy(ttl_cap=60),
            key_lookup=Keys(signed(reason="ok")),
            tunnels=tunnels,
        )
        t0 = loop.time()
        out = await r.handle(query(), ("192.0.2.9", 1), 512)
        released = loop.time()
        assert out is not None
        msg = dns.message.from_wire(out)
        assert len(msg.answer[0]) == 2 and msg.answer[0].ttl == 60
        assert released >= tunnels.done_at[0] >= t0 + 0.2
        (name, addrs, key) = tunnels.calls[0]
        assert name == NAME and len(addrs) == 2 and key is KEY
        assert (r.stats.held, r.stats.released_protected) == (1, 1)

    run(main)


def test_concurrent_queries_share_one_tunnel_request() -> None:
    async def main() -> None:
        tunnels = Tunnels(delay=0.1)
        keys = Keys(signed(), delay=0.02)
        r = Resolver(Upstream(), HoldPolicy(), key_lookup=keys, tunnels=tunnels)
        outs = await asyncio.gather(*(r.handle(query(), ("192.0.2.9", i), 512) for i in range(8)))
        assert all(o is not None for o in outs)
        assert keys.calls == 1 and len(tunnels.calls) == 1
        assert r.stats.released_protected == 8

    run(main)


def test_hold_limit_releases_clear_while_tunnel_is_slow() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        tunnels = Tunnels(delay=2.0)
        r = Resolver(
            Upstream(),
            HoldPolicy(hold_limit=0.3),
            key_lookup=Keys(signed()),
            tunnels=tunnels,
        )
        t0 = loop.time()
        out = await r.handle(query(), ("192.0.2.9", 1), 512)
        took = loop.time() - t0
        assert out is not None and dns.message.from_wire(out).answer
        assert 0.28 <= took < 1.0
        assert (r.stats.hold_expired, r.stats.released_clear) == (1, 1)
        await r.close()

    run(main)


def test_bogus_gets_servfail_and_no_tunnel_request() -> None:
    async def main() -> None:
        tunnels = Tunnels(delay=0.0)
        r = Resolver(
            Upstream(),
            HoldPolicy(),
            key_lookup=Keys(KeyResult(KeyStatus.BOGUS, (KEY,), "bad RRSIG")),
            tunnels=tunnels,
        )
        out = await r.handle(query(), ("192.0.2.9", 1), 512)
        assert out is not None and dns.message.from_wire(out).rcode() == dns.rcode.SERVFAIL
        assert tunnels.calls == [] and r.stats.servfail == 1

    run(main)


def test_no_key_is_not_held_behind_a_slow_tunnel_manager() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        tunnels = Tunnels(delay=5.0)
        r = Resolver(
            Upstream(),
            HoldPolicy(),
            key_lookup=Keys(KeyResult(KeyStatus.INSECURE, (), "unsigned")),
            tunnels=tunnels,
        )
        t0 = loop.time()
        out = await r.handle(query(), ("192.0.2.9", 1), 512)
        assert out is not None and loop.time() - t0 < 0.2
        assert tunnels.calls == [] and r.stats.released_clear == 1

    run(main)


def test_upstream_failure_is_servfail_and_counted() -> None:
    async def main() -> None:
        r = Resolver(
            Upstream(fail=True), HoldPolicy(), key_lookup=Keys(KeyResult(KeyStatus.INSECURE))
        )
        out = await r.handle(query(), ("192.0.2.9", 1), 512)
        assert out is not None and dns.message.from_wire(out).rcode() == dns.rcode.SERVFAIL
        assert (r.stats.timeouts, r.stats.servfail) == (1, 1)

    run(main)


def test_a_flood_of_failing_queries_logs_a_few_lines_and_counts_every_one(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Any client can make every query fail (a dead or bogus zone): lines are rate-limited."""

    async def main() -> None:
        failing = Resolver(
            Upstream(fail=True), HoldPolicy(), key_lookup=Keys(KeyResult(KeyStatus.INSECURE))
        )
        bogus = Resolver(
            Upstream(),
            HoldPolicy(),
            key_lookup=Keys(KeyResult(KeyStatus.BOGUS, (KEY,), "bad RRSIG")),
            tunnels=Tunnels(delay=0.0),
        )
        for i in range(200):
            for r in (failing, bogus):
                out = await r.handle(query(f"h{i}.example."), ("192.0.2.9", 1), 512)
                assert out is not None and dns.message.from_wire(out).rcode() == dns.rcode.SERVFAIL
        assert (failing.stats.timeouts, failing.stats.servfail) == (200, 200)
        assert bogus.stats.servfail == 200

    with caplog.at_level("INFO", logger="oe_router.dns.front"):
        run(main)
    lines = [r.getMessage() for r in caplog.records]
    assert any("no upstream answered" in line for line in lines)
    assert any("SERVFAIL to the client" in line for line in lines)
    assert 2 <= len(lines) <= 2 * 20, lines  # 10 per window and resolver, not 1200


def test_large_answer_over_udp_is_truncated_but_not_over_tcp() -> None:
    async def main() -> None:
        r = Resolver(Upstream(n=60), HoldPolicy())
        out = await r.handle(query(), ("192.0.2.9", 1), 512)
        assert out is not None and dns.message.from_wire(out).flags & dns.flags.TC
        out = await r.handle(query(), ("192.0.2.9", 1), 65535)
        assert out is not None and len(dns.message.from_wire(out).answer[0]) == 60

    run(main)


def test_cache_hits_skip_the_upstream() -> None:
    async def main() -> None:
        up = Upstream()
        r = Resolver(up, HoldPolicy(), cache=AnswerCache())
        for _ in range(3):
            assert await r.handle(query(), ("192.0.2.9", 1), 512) is not None
        assert up.calls == 1 and r.stats.cache_hits == 2

    run(main)


def test_answer_now_serves_cached_keyless_names_and_defers_the_rest() -> None:
    """The synchronous path: a cached answer with a remembered keyless status only."""

    async def main() -> None:
        up = Upstream()
        clear = RememberedKeys(signed((), "nodata"))
        r = Resolver(up, HoldPolicy(ttl_cap=60), key_lookup=clear, cache=AnswerCache())
        wire = query(use_edns=0, payload=1232)
        assert r.answer_now(wire, 512) is None  # not cached yet: the task path
        first = await r.handle(wire, ("192.0.2.9", 1), 512)
        assert first is not None and clear.calls == 0  # remembered: no lookup task
        fast = r.answer_now(b"\x99\x99" + wire[2:], 512)
        assert fast is not None
        msg = dns.message.from_wire(fast)
        assert msg.id == 0x9999 and msg.answer[0].ttl == 60  # capped like the held path
        assert [str(a.address) for a in msg.answer[0]] == ["192.0.2.1"]
        assert r.stats.cache_hits == 1 and r.stats.released_clear == 2 and up.calls == 1
        # a usable key, an unknown status or a malformed query never take the fast path
        r.key_lookup = RememberedKeys(signed(reason="key"))
        assert r.answer_now(wire, 512) is None
        r.key_lookup = Keys(signed(()))
        assert r.answer_now(wire, 512) is None
        assert r.answer_now(wire[:-3], 512) is None

    run(main)


def test_remembered_key_releases_after_tunnel_without_lookup() -> None:
    async def main() -> None:
        keys = RememberedKeys(signed(reason="key"))
        tunnels = Tunnels(delay=0.05)
        r = Resolver(Upstream(), HoldPolicy(), key_lookup=keys, tunnels=tunnels)
        out = await r.handle(query(), ("192.0.2.9", 1), 512)
        assert out is not None and keys.calls == 0 and len(tunnels.calls) == 1
        assert r.stats.released_protected == 1

    run(main)


def test_signed_zone_tampered_address_is_servfail_and_never_reaches_the_tunnel() -> None:
    """The upstream's A is not the validated one: SERVFAIL, no tunnel to it (issue 11.3)."""

    async def main() -> None:
        elsewhere = AddressProof(KeyStatus.SECURE, frozenset({ipaddress.ip_address("192.0.2.99")}))
        tunnels = Tunnels(delay=0.0)
        r = Resolver(
            Upstream(), HoldPolicy(), key_lookup=Keys(signed(a=elsewhere)), tunnels=tunnels
        )
        out = await r.handle(query(), ("192.0.2.9", 1), 512)
        assert out is not None and dns.message.from_wire(out).rcode() == dns.rcode.SERVFAIL
        assert tunnels.calls == [] and r.stats.servfail == 1

    run(main)


def test_answer_now_never_serves_an_unproven_cached_answer_of_a_signed_zone() -> None:
    """The synchronous path checks a cached answer against the remembered proof too."""

    async def main() -> None:
        elsewhere = AddressProof(KeyStatus.SECURE, frozenset({ipaddress.ip_address("192.0.2.99")}))
        keys = RememberedKeys(signed((), "nodata", a=elsewhere))
        r = Resolver(Upstream(), HoldPolicy(), key_lookup=keys, cache=AnswerCache())
        wire = query(use_edns=0, payload=1232)
        first = await r.handle(wire, ("192.0.2.9", 1), 512)
        assert first is not None and dns.message.from_wire(first).rcode() == dns.rcode.SERVFAIL
        assert r.answer_now(wire, 512) is None  # cached, but its address is unproven
        again = await r.handle(wire, ("192.0.2.9", 1), 512)
        assert again is not None and dns.message.from_wire(again).rcode() == dns.rcode.SERVFAIL
        r.key_lookup = RememberedKeys(signed((), "nodata"))  # now the cached A is proven
        assert r.answer_now(wire, 512) is not None

    run(main)
