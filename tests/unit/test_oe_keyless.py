"""Keyless names (issue 16 part 2): a name proven to have no key gets a pass shunt for
its private-or-clear addresses before its answer is released, for the answer's TTL.

The hold core's decision (which results ask for a shunt, and the release waiting for
it), the OE manager's (which addresses are shunted, for how long, how many), its status
row and decision line, and the front's order of events: shunt in, then the answer.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging

import dns.message
import dns.name
import pytest

from oe_router.datapath.base import IPAddress, Lifetime, PolicyAction
from oe_router.dns.front import AnswerCache, Resolver
from oe_router.dns.hold import (
    Action,
    AddressProof,
    EnsureTunnel,
    HoldCore,
    HoldPolicy,
    KeyResult,
    KeyStatus,
    Outcome,
    PassKeyless,
    Release,
)
from oe_router.dns.ipseckey import KeyKind, PeerKey
from oe_router.oe import shunts
from oe_router.oe.actions import InstallPolicy, Negotiate
from oe_router.oe.manager import OeManager

NAME = dns.name.from_text("silent.example.")
A1 = ipaddress.IPv4Address("192.0.2.1")
A2 = ipaddress.IPv4Address("192.0.2.2")
WAN = ipaddress.IPv4Address("198.51.100.1")
PRIV = ipaddress.IPv4Address("203.0.113.5")
CLEAR = ipaddress.IPv4Address("192.0.2.9")
BLOCKED = ipaddress.IPv4Address("198.18.0.1")
KEY = PeerKey(kind=KeyKind.NONE, public_key=None, precedence=10, owner=NAME, algorithm=0)
PROVEN = AddressProof(KeyStatus.SECURE, frozenset({A1, A2}), "A signed by example.")
NO_AAAA = AddressProof(KeyStatus.SECURE, frozenset(), "NODATA")
DENIED = KeyResult(KeyStatus.SECURE, (), "nodata: NSEC", v4=PROVEN, v6=NO_AAAA, denial=True)
INSECURE = KeyResult(KeyStatus.INSECURE, (), "unsigned delegation")


def only(actions: list[Action], kind: type) -> list:  # type: ignore[type-arg]
    return [a for a in actions if isinstance(a, kind)]


def held_keyless(result: KeyResult, policy: HoldPolicy | None = None) -> tuple[HoldCore, list]:  # type: ignore[type-arg]
    core = HoldCore(policy or HoldPolicy())
    core.query(1, NAME, 0.0)
    core.answer(1, (A1,), 0.01, ttl=120.0)
    return core, core.key_result(NAME, result, 0.02)


# ------------------------------------------------------------------ hold core


@pytest.mark.parametrize(
    ("result", "reason"),
    [(DENIED, "no key (secure denial)"), (INSECURE, "no key (insecure zone)")],
)
def test_keyless_answer_waits_for_the_pass_shunt_with_the_answers_ttl(
    result: KeyResult, reason: str
) -> None:
    core, actions = held_keyless(result)
    (ask,) = only(actions, PassKeyless)
    assert (ask.name, ask.addresses, ask.ttl, ask.reason) == (NAME, (A1,), 120.0, reason)
    assert not only(actions, Release) and not only(actions, EnsureTunnel)
    (rel,) = core.keyless_done(ask.request, frozenset({A1}), 0.03)
    assert isinstance(rel, Release) and rel.outcome is Outcome.CLEAR
    assert rel.summary == ""  # the shunt's decision line tells it
    assert core.in_flight == 0 and core.negotiations == 0


def test_keyless_address_not_passed_keeps_the_fronts_decision_line() -> None:
    core, actions = held_keyless(DENIED)
    (ask,) = only(actions, PassKeyless)
    (rel,) = core.keyless_done(ask.request, frozenset(), 0.03)
    assert isinstance(rel, Release) and rel.summary == "clear, no key (DNS)"


@pytest.mark.parametrize(
    ("result", "policy"),
    [
        (KeyResult(KeyStatus.BOGUS, (), "bad RRSIG"), HoldPolicy()),
        (KeyResult(KeyStatus.BOGUS, (), "bad RRSIG"), HoldPolicy(bogus_action="insecure")),
        (KeyResult(KeyStatus.INDETERMINATE, (), "timeout"), HoldPolicy()),
        # an IPSECKEY that is there but unusable is no proof of "no key"
        (
            KeyResult(KeyStatus.SECURE, (), "no usable IPSECKEY", v4=PROVEN, v6=NO_AAAA),
            HoldPolicy(),
        ),
        # a secure denial whose A answer holds an address the validated RRset lacks
        (
            KeyResult(
                KeyStatus.SECURE,
                (),
                "nodata",
                v4=AddressProof(KeyStatus.SECURE, frozenset({A2})),
                v6=NO_AAAA,
                denial=True,
            ),
            HoldPolicy(bogus_action="insecure"),
        ),
        (DENIED, HoldPolicy(keyless="probe")),
        (INSECURE, HoldPolicy(keyless="probe")),
    ],
)
def test_no_shunt_for_bogus_unproven_or_probe(result: KeyResult, policy: HoldPolicy) -> None:
    _core, actions = held_keyless(result, policy)
    assert not only(actions, PassKeyless)
    (rel,) = only(actions, Release)  # released at once, as before this change
    assert rel.held_for == pytest.approx(0.01)


def test_keyed_name_asks_for_a_tunnel_not_a_shunt() -> None:
    keyed = KeyResult(KeyStatus.SECURE, (KEY,), "signed", v4=PROVEN, v6=NO_AAAA)
    _core, actions = held_keyless(keyed)
    assert only(actions, EnsureTunnel) and not only(actions, PassKeyless)


def test_keyless_answer_goes_at_the_hold_limit_if_the_shunt_is_slow() -> None:
    core, _ = held_keyless(DENIED)
    assert core.tick(1.0) == []
    (rel,) = core.tick(3.02)
    assert isinstance(rel, Release) and rel.hold_expired and rel.outcome is Outcome.CLEAR


# ------------------------------------------------------------------ OE manager


def _passes(actions: list) -> list[InstallPolicy]:  # type: ignore[type-arg]
    return [a for a in actions if isinstance(a, InstallPolicy)]


def test_private_or_clear_address_gets_a_pass_shunt_for_the_ttl_with_status_and_line(
    mgr: OeManager, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "oe_router.oe")
    actions, passed = mgr.pass_keyless(NAME, (A1,), 120.0, "no key (secure denial)", 10.0)
    (inst,) = _passes(actions)
    pol = inst.policy
    assert passed == {A1} and pol.action is PolicyAction.PASS
    assert pol.dst.net == ipaddress.ip_network(A1) and pol.src.net == ipaddress.ip_network(WAN)
    assert pol.lifetime == Lifetime(hard_seconds=120)
    (row,) = mgr.shunts(10.0)
    assert (row.kind, row.reason, row.expires_s) == (
        "pass",
        "private-or-clear: no key (secure denial)",
        120.0,
    )
    assert mgr.shunt_status(pol, 10.0) == row
    lines = [r.getMessage() for r in caplog.records if "silent.example" in r.getMessage()]
    assert lines == ["silent.example (192.0.2.1): clear for 2m, no key (secure denial)"]
    assert mgr.keyless_passed((A1,), 129.0) and not mgr.keyless_passed((A1,), 131.0)
    assert not mgr.keyless_passed((A1, A2), 11.0)


@pytest.mark.parametrize("addr", [PRIV, CLEAR, BLOCKED, ipaddress.IPv4Address("192.0.2.70")])
def test_no_shunt_outside_private_or_clear(mgr: OeManager, addr: IPAddress) -> None:
    actions, passed = mgr.pass_keyless(NAME, (addr,), 120.0, "no key (insecure zone)", 0.0)
    assert actions == [] and passed == frozenset() and mgr.shunts(0.0) == ()


def test_no_shunt_for_an_address_with_a_negotiation_or_a_dns_key(mgr: OeManager) -> None:
    keyed = dns.name.from_text("keyed.example.")
    assert only(mgr.ensure_tunnel(1, keyed, (A2,), KEY, 0.0), Negotiate)
    actions, passed = mgr.pass_keyless(NAME, (A1, A2), 60.0, "no key (secure denial)", 0.1)
    assert passed == {A1}  # A2 is being negotiated (a held, keyed answer): IKE decides
    assert [a.policy.dst.net for a in _passes(actions)] == [ipaddress.ip_network(A1)]


def test_ttl_is_bounded_and_a_new_answer_refreshes_quietly(
    mgr: OeManager, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "oe_router.oe")
    actions, _ = mgr.pass_keyless(NAME, (A1,), 0.0, "no key (insecure zone)", 0.0)
    assert _passes(actions)[0].policy.lifetime == Lifetime(hard_seconds=shunts.KEYLESS_MIN)
    actions, _ = mgr.pass_keyless(NAME, (A1,), 86400.0, "no key (insecure zone)", 1.0)
    assert _passes(actions)[0].policy.lifetime == Lifetime(hard_seconds=900)  # shunt_lifetime
    (row,) = mgr.shunts(1.0)
    assert row.expires_s == 900.0
    actions, passed = mgr.pass_keyless(NAME, (A1,), 60.0, "no key (insecure zone)", 2.0)
    assert actions == [] and passed == {A1}  # already passes longer: nothing to do
    lines = [r.getMessage() for r in caplog.records if "clear for" in r.getMessage()]
    assert lines == ["silent.example (192.0.2.1): clear for 30s, no key (insecure zone)"]


def test_keyless_shunts_are_limited_in_number(
    mgr: OeManager, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(shunts, "KEYLESS_LIMIT", 2)
    addrs = tuple(ipaddress.IPv4Address(f"192.0.2.{i}") for i in (1, 2, 3))
    actions, passed = mgr.pass_keyless(NAME, addrs, 60.0, "no key (secure denial)", 0.0)
    assert passed == set(addrs[:2]) and len(_passes(actions)) == 2
    assert "keyless shunt limit" in caplog.text
    # one expires: room again
    mgr.tick(61.0)
    _, passed = mgr.pass_keyless(NAME, addrs[2:], 60.0, "no key (secure denial)", 61.0)
    assert passed == {addrs[2]}


# ------------------------------------------------------------------ the front's order


class Upstream:
    async def query(self, wire: bytes) -> bytes:
        q = dns.message.from_wire(wire)
        reply = dns.message.make_response(q)
        reply.answer.append(dns.rrset.from_text(q.question[0].name, 3600, "IN", "A", str(A1)))
        return reply.to_wire()


class Keys:
    def __init__(self, result: KeyResult) -> None:
        self.result = result

    async def lookup(self, name: dns.name.Name) -> KeyResult:
        return self.result

    def cached(self, name: dns.name.Name) -> KeyResult | None:
        return self.result


class Passer:
    """The OE side: records each shunt request and when its install finished."""

    def __init__(self) -> None:
        self.calls: list[tuple[tuple[IPAddress, ...], float, str]] = []
        self.installed_at: list[float] = []
        self.until = 0.0

    async def ensure_tunnel(self, name: dns.name.Name, addresses: object, key: object) -> bool:
        return False

    async def pass_keyless(
        self, name: dns.name.Name, addresses: tuple[IPAddress, ...], ttl: float, reason: str
    ) -> frozenset[IPAddress]:
        self.calls.append((addresses, ttl, reason))
        await asyncio.sleep(0.05)  # the datapath's install
        now = asyncio.get_running_loop().time()
        self.installed_at.append(now)
        self.until = now + ttl
        return frozenset(addresses)

    def keyless_passed(self, addresses: tuple[IPAddress, ...]) -> bool:
        return asyncio.get_running_loop().time() < self.until


def test_front_releases_a_keyless_answer_only_after_the_shunt_is_in() -> None:
    async def main() -> None:
        passer = Passer()
        r = Resolver(
            Upstream(),
            HoldPolicy(ttl_cap=300.0),
            key_lookup=Keys(DENIED),
            tunnels=passer,  # type: ignore[arg-type]
            cache=AnswerCache(),
        )
        loop = asyncio.get_running_loop()
        wire = dns.message.make_query(NAME, "A").to_wire()
        out = await r.handle(wire, ("192.0.2.50", 1), 512)
        answered = loop.time()
        assert out is not None and dns.message.from_wire(out).answer
        assert passer.calls == [((A1,), 300.0, "no key (secure denial)")]  # TTL after ttl_cap
        assert passer.installed_at[0] <= answered
        # the cached answer goes at once while the shunt stands ...
        assert r.answer_now(wire, 512) is not None
        # ... and through the hold path (a new shunt first) once it does not
        passer.until = 0.0
        assert r.answer_now(wire, 512) is None
        assert await r.handle(wire, ("192.0.2.50", 1), 512) is not None
        assert len(passer.calls) == 2

    asyncio.run(main())


def test_front_without_an_oe_manager_serves_keyless_answers_from_the_cache() -> None:
    """No OE manager, no trap of ours: nothing to pass, the cache answers at once."""

    async def main() -> None:
        r = Resolver(Upstream(), HoldPolicy(), key_lookup=Keys(INSECURE), cache=AnswerCache())
        wire = dns.message.make_query(NAME, "A").to_wire()
        assert await r.handle(wire, ("192.0.2.50", 1), 512) is not None
        assert r.answer_now(wire, 512) is not None

    asyncio.run(main())
