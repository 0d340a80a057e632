"""DNS-triggered OE on loopback: a real signed hierarchy, our real front, a real client.

knotd serves the lab hierarchy (labkit.world.zone_spec: `.`, `test.`,
`example.test.`, `nsec3.test.`, an unsigned delegation and four bogus zones),
built and signed per run with fresh keys. DnsService runs in this process on its
own event loop (a thread) with the production ValidatingKeyLookup from the
hierarchy's trust anchor; dnspython sends ordinary queries over UDP/TCP sockets.

The tunnel requester is the seam to the OE manager (src/oe_router/oe, built in
parallel). Here it is ``RecordingTunnels``: a RECORDING STAND-IN with a
controllable delay and outcome, NOT the OE manager or IKE. It notes when each
``ensure_tunnel`` was asked and finished, and with which name, addresses and key,
so every case asserts the released answer, its time relative to the tunnel event,
and that no key from a bogus zone ever reached it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import shutil
import socket
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdata
import dns.rdatatype
import pytest
from bench.bench_dns_front import free_port

from oe_router.config.schema import DnsConfig, Endpoint, OeConfig
from oe_router.dns.hold import IPAddress, KeyResult, KeyStatus
from oe_router.dns.ipseckey import KeyKind, PeerKey
from oe_router.dns.keylookup import ValidatingKeyLookup
from oe_router.dns.service import DnsService
from oe_router.dns.upstream import UpstreamSettings

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "qemu"))

from labkit import world
from labkit.knot import KnotServer
from labkit.zones import BuiltHierarchy, build_hierarchy

pytestmark = pytest.mark.host

KNOT_HOST = "127.0.0.1"
BOGUS_ZONES = tuple(
    dns.name.from_text(z)
    for z in ("bogus.test", "expired.test", "dsmismatch.test", "otherkey.test")
)
#: Generous bound for "released at once": a cold validation is ~10 loopback queries.
AT_ONCE = 0.8


@dataclass
class Call:
    name: dns.name.Name
    addresses: tuple[IPAddress, ...]
    key: PeerKey
    asked_at: float
    done_at: float | None = None
    result: bool | None = None


class RecordingTunnels:
    """``TunnelRequester`` stand-in for the OE manager: records, waits ``delay``, answers ``ok``.

    ``never`` makes it hang forever (a negotiation that never finishes).
    """

    def __init__(self, delay: float = 0.3, ok: bool = True, never: bool = False) -> None:
        self.delay, self.ok, self.never = delay, ok, never
        self.calls: list[Call] = []

    async def ensure_tunnel(
        self, name: dns.name.Name, addresses: tuple[IPAddress, ...], key: PeerKey
    ) -> bool:
        call = Call(name, addresses, key, time.monotonic())
        self.calls.append(call)
        if self.never:
            await asyncio.Event().wait()
        await asyncio.sleep(self.delay)
        call.done_at, call.result = time.monotonic(), self.ok
        return self.ok


class Lab:
    def __init__(self, hier: BuiltHierarchy, keys: world.WorldKeys, port: int) -> None:
        self.hier, self.keys, self.port = hier, keys, port


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    if shutil.which("knotd") is None:
        pytest.fail("knotd missing: apt-get install $(cat scripts/apt-packages.txt)")
    base = tmp_path_factory.mktemp("oehold")
    keys = world.WorldKeys.generate()
    hier = build_hierarchy(world.zone_spec(keys, [KNOT_HOST]), base / "zones")
    port = free_port(KNOT_HOST)
    with KnotServer(hier, KNOT_HOST, port, base / "run"):
        yield Lab(hier, keys, port)


class Front:
    """DnsService with a RecordingTunnels on its own loop; the test thread is the client."""

    def __init__(
        self,
        lab: Lab,
        tunnels: RecordingTunnels,
        upstreams: tuple[tuple[str, int], ...] = (),
        hold_limit: float = 2.0,
        bogus_action: str = "servfail",
        timeout: float = 1.0,
    ) -> None:
        self.tunnels = tunnels
        config = OeConfig(
            dns=DnsConfig(
                listen=(Endpoint("127.0.0.1", 0),),
                upstream=tuple(Endpoint(h, p) for h, p in upstreams or ((KNOT_HOST, lab.port),)),
                trust_anchor=str(lab.hier.trust_anchor_ds),
                hold_limit=hold_limit,
                bogus_action=bogus_action,  # type: ignore[arg-type]
                ttl_cap=60.0,
            )
        )
        self.service = DnsService(
            tunnels=tunnels, upstream_settings=UpstreamSettings(timeout=timeout, tries=1)
        )
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self._run(self.service.start(config))
        self.port = self.service.bound[0].port

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(15)

    def lookup(self, name: str) -> KeyResult:
        """The front's own key lookup (same validator) for ``name``: why it released."""
        assert self.service.resolver is not None
        kl = self.service.resolver.key_lookup
        assert isinstance(kl, ValidatingKeyLookup)
        result: KeyResult = self._run(kl.lookup(dns.name.from_text(name)))
        return result

    def status(self) -> dict[str, Any]:
        return dict(self.service.status().dns)

    def stop(self) -> None:
        self._run(self.service.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()
        for call in self.tunnels.calls:  # whatever the case: no bogus key ever got through
            assert not any(call.key.owner.is_subdomain(z) for z in BOGUS_ZONES), call
            assert not any(call.name.is_subdomain(z) for z in BOGUS_ZONES), call


@dataclass
class Answer:
    msg: dns.message.Message
    sent_at: float
    received_at: float

    @property
    def elapsed(self) -> float:
        return self.received_at - self.sent_at

    def addresses(self, rdtype: str = "A") -> set[str]:
        want = dns.rdatatype.from_text(rdtype)
        return {rd.address for rr in self.msg.answer if rr.rdtype == want for rd in rr}


def ask(port: int, name: str, rdtype: str = "A", tcp: bool = False, **kw: Any) -> Answer:
    query = dns.message.make_query(name, rdtype, **kw)
    sent = time.monotonic()
    if tcp:
        msg = dns.query.tcp(query, "127.0.0.1", port=port, timeout=10)
    else:
        msg = dns.query.udp(query, "127.0.0.1", port=port, timeout=10, ignore_trailing=True)
    return Answer(msg, sent, time.monotonic())


@pytest.fixture
def make_front(lab: Lab) -> Iterator[Any]:
    fronts: list[Front] = []

    def make(tunnels: RecordingTunnels | None = None, **kw: Any) -> Front:
        front = Front(lab, tunnels or RecordingTunnels(), **kw)
        fronts.append(front)
        return front

    yield make
    for front in fronts:
        front.stop()


def _same_key(peer: PeerKey, private: Any) -> bool:
    assert peer.public_key is not None
    return bool(peer.public_key.public_numbers() == private.public_key().public_numbers())


def _ips(*text: str) -> tuple[IPAddress, ...]:
    return tuple(ipaddress.ip_address(t) for t in text)


def _assert_released_after_tunnel(answer: Answer, call: Call, delay: float) -> None:
    assert call.done_at is not None and call.result is True
    assert answer.received_at >= call.done_at, "answer left before the tunnel was up"
    assert call.asked_at >= answer.sent_at
    assert answer.elapsed >= delay


# --------------------------------------------------------------------------- secure keys


@pytest.mark.parametrize(
    ("label", "kind", "identity"),
    [("sw", KeyKind.ECDSA_P256, "sw"), ("rsa", KeyKind.RSA, "rsa"), ("null", KeyKind.NONE, None)],
)
def test_secure_key_holds_answer_until_tunnel_is_up(
    lab: Lab, make_front: Any, label: str, kind: KeyKind, identity: str | None
) -> None:
    """A/NOERROR goes out only after ensure_tunnel(name, addresses, validated key) returned."""
    front = make_front(RecordingTunnels(delay=0.4))
    name = f"{label}.example.test."
    answer = ask(front.port, name)
    octet = {"sw": 12, "rsa": 11, "null": 10}[label]
    assert answer.msg.rcode() == dns.rcode.NOERROR
    assert answer.addresses() == {f"203.0.113.{octet}"}
    [call] = front.tunnels.calls
    assert call.name == dns.name.from_text(name)
    assert call.addresses == _ips(f"203.0.113.{octet}")
    assert call.key.kind is kind and call.key.owner == dns.name.from_text(name)
    assert call.key.gateway_ignored is None
    if identity is not None:
        assert _same_key(call.key, getattr(lab.keys, identity).key)
    else:
        assert call.key.public_key is None  # algorithm 0: anonymous (NULL auth) OE
    _assert_released_after_tunnel(answer, call, 0.4)
    assert all(rr.ttl <= 60 for rr in answer.msg.answer)  # TTL cap
    status = front.status()
    assert status["held"] == 1 and status["released_protected"] == 1


def test_aaaa_is_held_for_the_v6_tunnel(make_front: Any) -> None:
    front = make_front(RecordingTunnels(delay=0.3))
    answer = ask(front.port, "v6only.example.test.", "AAAA")
    assert answer.addresses("AAAA") == {"2001:db8:1::10"}
    [call] = front.tunnels.calls
    assert call.addresses == _ips("2001:db8:1::10") and call.key.kind is KeyKind.NONE
    _assert_released_after_tunnel(answer, call, 0.3)


def test_several_a_records_one_tunnel_request_for_all(make_front: Any) -> None:
    front = make_front(RecordingTunnels(delay=0.3))
    answer = ask(front.port, "multi.example.test.")
    addrs = {"203.0.113.40", "203.0.113.41", "203.0.113.42"}
    assert answer.addresses() == addrs
    [call] = front.tunnels.calls
    assert {str(a) for a in call.addresses} == addrs
    _assert_released_after_tunnel(answer, call, 0.3)


def test_cname_chain_key_of_the_queried_name_for_the_final_addresses(make_front: Any) -> None:
    """cname1 -> cname2 -> null: the answer carries the chain; the tunnel goes to its A."""
    front = make_front(RecordingTunnels(delay=0.3))
    answer = ask(front.port, "cname1.example.test.")
    cnames = [rr for rr in answer.msg.answer if rr.rdtype == dns.rdatatype.CNAME]
    assert [str(rr.name) for rr in cnames] == ["cname1.example.test.", "cname2.example.test."]
    assert answer.addresses() == {"203.0.113.10"}
    [call] = front.tunnels.calls
    assert call.name == dns.name.from_text("cname1.example.test.")
    assert call.addresses == _ips("203.0.113.10") and call.key.kind is KeyKind.NONE
    _assert_released_after_tunnel(answer, call, 0.3)


def test_concurrent_queries_share_one_ensure_tunnel(make_front: Any) -> None:
    front = make_front(RecordingTunnels(delay=0.5))
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda _: ask(front.port, "sw.example.test."), range(6)))
    [call] = front.tunnels.calls
    for answer in answers:
        assert answer.addresses() == {"203.0.113.12"}
        assert call.done_at is not None and answer.received_at >= call.done_at


def test_tunnel_failure_releases_clear_right_after(make_front: Any) -> None:
    front = make_front(RecordingTunnels(delay=0.3, ok=False))
    answer = ask(front.port, "sw.example.test.")
    assert answer.addresses() == {"203.0.113.12"}
    [call] = front.tunnels.calls
    assert call.done_at is not None and answer.received_at >= call.done_at
    assert answer.received_at - call.done_at < 0.3
    assert front.status()["released_clear"] == 1


def test_hold_limit_releases_clear_when_tunnel_never_finishes(make_front: Any) -> None:
    front = make_front(RecordingTunnels(never=True), hold_limit=0.6)
    answer = ask(front.port, "sw.example.test.")
    assert answer.msg.rcode() == dns.rcode.NOERROR and answer.addresses() == {"203.0.113.12"}
    [call] = front.tunnels.calls
    assert call.done_at is None  # still negotiating when the answer went out
    assert 0.6 <= answer.elapsed < 0.6 + AT_ONCE
    status = front.status()
    assert status["hold_expired"] == 1 and status["released_clear"] == 1


# --------------------------------------------------------------------------- released at once


@pytest.mark.parametrize(
    ("name", "address", "why"),
    [
        ("plain.example.test.", "203.0.113.20", "NSEC"),
        ("www.nsec3.test.", "203.0.113.20", "NSEC3"),
    ],
)
def test_secure_denial_released_at_once(make_front: Any, name: str, address: str, why: str) -> None:
    """No IPSECKEY, proven by a signed NSEC/NSEC3: no tunnel, no wait."""
    front = make_front(RecordingTunnels())
    answer = ask(front.port, name)
    assert answer.msg.rcode() == dns.rcode.NOERROR and answer.addresses() == {address}
    assert answer.elapsed < AT_ONCE
    assert front.tunnels.calls == []
    key = front.lookup(name)
    assert key.status is KeyStatus.SECURE and key.keys == (), key
    assert "nodata" in key.reason.lower(), key.reason
    assert front.status()["released_clear"] == 1


def test_unsigned_delegation_is_insecure_released_at_once(make_front: Any) -> None:
    """insecure.test has no DS: its IPSECKEY (published!) is never used."""
    front = make_front(RecordingTunnels())
    answer = ask(front.port, "www.insecure.test.")
    assert answer.addresses() == {"203.0.113.21"} and answer.elapsed < AT_ONCE
    assert front.tunnels.calls == []
    assert front.lookup("www.insecure.test.").status is KeyStatus.INSECURE


BOGUS = ["www.bogus.test.", "www.expired.test.", "www.dsmismatch.test.", "www.otherkey.test."]


@pytest.mark.parametrize("name", BOGUS, ids=lambda n: n.split(".")[1])
def test_bogus_servfail_and_no_key_reaches_the_tunnel(make_front: Any, name: str) -> None:
    """Bad signature, expired signature, DS mismatch, key of another zone: SERVFAIL."""
    front = make_front(RecordingTunnels())
    answer = ask(front.port, name)
    assert answer.msg.rcode() == dns.rcode.SERVFAIL and not answer.msg.answer
    assert answer.elapsed < AT_ONCE
    assert front.tunnels.calls == []
    key = front.lookup(name)
    assert key.status is KeyStatus.BOGUS and key.keys == () and key.usable_key is None


@pytest.mark.parametrize("name", BOGUS, ids=lambda n: n.split(".")[1])
def test_bogus_as_insecure_releases_clear(make_front: Any, name: str) -> None:
    """bogus_action=insecure: the address goes out in the clear, still no key used."""
    front = make_front(RecordingTunnels(), bogus_action="insecure")
    answer = ask(front.port, name)
    assert answer.msg.rcode() == dns.rcode.NOERROR
    assert answer.addresses() == {"203.0.113.22"} and answer.elapsed < AT_ONCE
    assert front.tunnels.calls == []
    assert front.status()["released_clear"] == 1


# --------------------------------------------------------------------------- transport


def test_big_ipseckey_rrset_needs_tcp_and_still_keys_the_tunnel(lab: Lab, make_front: Any) -> None:
    """12 IPSECKEYs do not fit 1232 bytes: the key lookup retries over TCP."""
    front = make_front(RecordingTunnels(delay=0.3))
    answer = ask(front.port, "big.example.test.")
    assert answer.addresses() == {"203.0.113.10"}
    [call] = front.tunnels.calls
    assert call.key.kind is KeyKind.RSA and call.key.owner == dns.name.from_text(
        "big.example.test."
    )
    _assert_released_after_tunnel(answer, call, 0.3)
    assert front.status()["upstream_tcp_fallbacks"] >= 1
    # a LAN client asking IPSECKEY itself gets TC over UDP, then all 12 over TCP
    udp = ask(
        front.port, "big.example.test.", "IPSECKEY", use_edns=0, payload=1232, want_dnssec=True
    )
    assert udp.msg.flags & dns.flags.TC and not udp.msg.answer
    tcp = ask(front.port, "big.example.test.", "IPSECKEY", tcp=True, use_edns=0, want_dnssec=True)
    [rrset] = [rr for rr in tcp.msg.answer if rr.rdtype == dns.rdatatype.IPSECKEY]
    assert len(rrset) == 12


class Blackhole:
    """A bound UDP socket that never answers: an upstream that times out."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])


@pytest.fixture
def blackhole() -> Iterator[Blackhole]:
    hole = Blackhole()
    yield hole
    hole.sock.close()


def test_timed_out_upstream_falls_back_and_still_holds(
    lab: Lab, make_front: Any, blackhole: Blackhole
) -> None:
    front = make_front(
        RecordingTunnels(delay=0.3),
        upstreams=(("127.0.0.1", blackhole.port), (KNOT_HOST, lab.port)),
        timeout=0.3,
    )
    answer = ask(front.port, "sw.example.test.")
    assert answer.addresses() == {"203.0.113.12"}
    [call] = front.tunnels.calls
    assert _same_key(call.key, lab.keys.sw.key)
    _assert_released_after_tunnel(answer, call, 0.3)
    status = front.status()
    assert status["upstream_udp_timeouts"] >= 1 and status["upstream_fallbacks"] >= 1


def test_only_upstream_times_out_servfail_at_once(make_front: Any, blackhole: Blackhole) -> None:
    """No upstream answers: SERVFAIL once the forwarding budget is spent, no tunnel."""
    front = make_front(RecordingTunnels(), upstreams=(("127.0.0.1", blackhole.port),), timeout=0.3)
    answer = ask(front.port, "sw.example.test.")
    assert answer.msg.rcode() == dns.rcode.SERVFAIL
    assert answer.elapsed < 0.3 + AT_ONCE
    assert front.tunnels.calls == []
    assert front.status()["timeouts"] == 1


# --------------------------------------------------------------------------- tampered A records


class TamperingUpstream:
    """A man in the middle between the front and knotd (UDP): every reply for ``name``/A
    gets its address rdata replaced by ``forged``; the RRSIGs are passed on untouched.

    ``plain_only``: only replies to queries without the DO bit (the LAN client's own)
    are tampered, so the validator's DO+CD queries see knotd's honest records.
    """

    def __init__(self, knot_port: int, name: str, forged: str, plain_only: bool) -> None:
        self.knot_port, self.forged, self.plain_only = knot_port, forged, plain_only
        self.name = dns.name.from_text(name)
        self.tampered = 0
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = int(self.sock.getsockname()[1])
        self.running = True
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while self.running:
            try:
                data, client = self.sock.recvfrom(65535)
            except TimeoutError:
                continue
            query = dns.message.from_wire(data)
            try:
                reply = dns.query.udp(query, KNOT_HOST, port=self.knot_port, timeout=2)
            except (dns.exception.Timeout, OSError):
                continue  # as a lost packet: the front's own timeout handles it
            q = query.question[0]
            spared = self.plain_only and bool(query.ednsflags & dns.flags.DO)
            if q.name == self.name and q.rdtype == dns.rdatatype.A and not spared:
                for rrset in reply.answer:
                    if rrset.rdtype == dns.rdatatype.A:
                        rrset.clear()
                        rrset.add(dns.rdata.from_text("IN", "A", self.forged))
                        self.tampered += 1
            self.sock.sendto(reply.to_wire(), client)

    def close(self) -> None:
        self.running = False
        self.thread.join(2)
        self.sock.close()


@pytest.fixture
def tampering(lab: Lab) -> Iterator[Any]:
    made: list[TamperingUpstream] = []

    def make(plain_only: bool) -> TamperingUpstream:
        mitm = TamperingUpstream(lab.port, "sw.example.test.", "198.51.100.66", plain_only)
        made.append(mitm)
        return mitm

    yield make
    for mitm in made:
        mitm.close()


@pytest.mark.parametrize("plain_only", [False, True], ids=["every-reply", "client-reply-only"])
def test_tampered_a_of_signed_name_is_servfail_and_never_tunnelled(
    make_front: Any, tampering: Any, plain_only: bool
) -> None:
    """Issue 11.3: sw.example.test (signed, keyed) answered with a forged A through a
    middlebox: the client gets SERVFAIL, no tunnel is asked for with sw's key (so no IKE
    starts) to any address; plain.example.test through the same box still works."""
    mitm = tampering(plain_only)
    front = make_front(  # a generous hold: the box may be loaded, the hold is not under test
        RecordingTunnels(delay=0.3), upstreams=(("127.0.0.1", mitm.port),), hold_limit=5.0
    )
    answer = ask(front.port, "sw.example.test.")
    assert mitm.tampered >= 1
    assert answer.msg.rcode() == dns.rcode.SERVFAIL and not answer.msg.answer
    assert front.tunnels.calls == []
    key = front.lookup("sw.example.test.")
    assert key.usable_key is not None and key.v4 is not None  # the key itself is fine
    assert key.check_addresses(_ips("198.51.100.66"))[0] is KeyStatus.BOGUS
    assert front.status()["servfail"] == 1
    # untampered names through the same middlebox are unaffected
    other = ask(front.port, "null.example.test.")
    assert other.addresses() == {"203.0.113.10"}
    [call] = front.tunnels.calls
    assert call.addresses == _ips("203.0.113.10")


def test_tampered_a_with_bogus_action_insecure_is_released_without_the_key(
    make_front: Any, tampering: Any
) -> None:
    """bogus_action=insecure: the (forged) answer goes out as if unsigned; the key is
    never bound to the forged address."""
    mitm = tampering(True)
    front = make_front(
        RecordingTunnels(), upstreams=(("127.0.0.1", mitm.port),), bogus_action="insecure"
    )
    answer = ask(front.port, "sw.example.test.")
    assert answer.msg.rcode() == dns.rcode.NOERROR
    assert answer.addresses() == {"198.51.100.66"}
    assert front.tunnels.calls == []
    assert front.status()["released_clear"] == 1
