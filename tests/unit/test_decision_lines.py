"""One readable line per decision: what became of a destination and why, rate-limited,
without key bytes.

The OE manager (tunnel up, failure shunts), the negotiator's few words for a failure, and
the DNS front (answers released clear) write the lines; ``DecisionLog`` keeps a flood of
them (anyone on the LAN can cause one per new address or name) to a few per minute.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import logging
import re
from dataclasses import replace

import dns.message
import dns.name
import dns.rdatatype
import dns.rrset
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from oe_router.config.schema import PolicyConfig, parse_policy_entry
from oe_router.control.status import ProposalOffers
from oe_router.datapath.base import (
    Acquire,
    ChildSaSpec,
    IPAddress,
    SaKeys,
    TrafficSelector,
    encr_algorithm,
)
from oe_router.decisions import DecisionLog, duration, subject
from oe_router.dns.front import Resolver
from oe_router.dns.hold import AddressProof, HoldPolicy, KeyResult, KeyStatus
from oe_router.dns.ipseckey import KeyKind, PeerKey
from oe_router.ike.constants import NotifyType
from oe_router.ike.proposals import ProposalMismatch
from oe_router.ike.service import IkeUpError
from oe_router.ike.status_view import offers_status
from oe_router.logs import NOTICE
from oe_router.oe.actions import InstallChild, Negotiate, NegotiationResult
from oe_router.oe.manager import OeManager
from oe_router.oe.negotiator import failure_summary
from oe_router.oe.policy import PolicyTable

WAN = ipaddress.IPv4Address("198.51.100.1")
PEER = ipaddress.IPv4Address("198.51.100.7")
REFUSER = ipaddress.IPv4Address("192.0.2.10")
PRIV = ipaddress.IPv4Address("203.0.113.5")
ORG = dns.name.from_text("example.org.")
TRAP = 0x4F45FFFF
#: key bytes no line may show (an SA's keys; 16-byte AES-GCM key + 4-byte salt)
SECRET_IN = bytes(range(0x40, 0x54))
SECRET_OUT = bytes(range(0x80, 0x94))


def _mgr() -> OeManager:
    cfg = PolicyConfig(
        private=(parse_policy_entry("203.0.113.0/24"),),
        private_or_clear=(parse_policy_entry("0.0.0.0/0"),),
    )
    table = PolicyTable.from_config(cfg, link_exclusions=())
    return OeManager(table, {4: WAN}, trap_reqid=TRAP, shunt_lifetime=900)


def _host(a: IPAddress) -> TrafficSelector:
    return TrafficSelector(ipaddress.ip_network(a))


def _spec(peer: IPAddress) -> ChildSaSpec:
    return ChildSaSpec(
        WAN, peer, SaKeys(0x1000, SECRET_IN), SaKeys(0x1001, SECRET_OUT), encr_algorithm(20),
        local_ts=(_host(WAN),), remote_ts=(_host(peer),),
    )  # fmt: skip


def _acquire(mgr: OeManager, dst: IPAddress, now: float) -> Negotiate:
    ev = Acquire(WAN, dst, _host(WAN), _host(dst), TRAP, 1, 0, 0)
    (neg,) = [a for a in mgr.acquire(ev, now) if isinstance(a, Negotiate)]
    return neg


def _up(mgr: OeManager, neg: Negotiate, peer: IPAddress, now: float) -> None:
    (inst,) = mgr.negotiated(neg.ticket, NegotiationResult(_spec(peer)), now)
    assert isinstance(inst, InstallChild)
    mgr.installed(inst.ticket, replace(inst.spec, reqid=0x4F450001), None, now)


def _lines(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str]]:
    return [(r.levelname, r.getMessage()) for r in caplog.records]


#: "<address or name (addresses)>: <verdict>, ..."
DECISION = re.compile(r"^[\w.:-]+( \([^)]*\))?: (protected|clear|blocked)\b")


def _no_secrets(text: str, *secrets: bytes) -> None:
    for s in secrets:
        for form in (s.hex(), s.hex(" "), repr(s), base64.b64encode(s).decode()):
            assert form not in text, form


# --------------------------------------------------------------------------- the words


def test_subject_and_duration_read_as_a_person_says_them() -> None:
    assert subject([PEER], ORG) == "example.org (198.51.100.7)"
    assert subject([PEER, ipaddress.ip_address("2001:db8::7")], "example.org.") == (
        "example.org (198.51.100.7, 2001:db8::7)"
    )
    assert subject([PEER]) == "198.51.100.7"
    assert [duration(s) for s in (5, 59, 60, 90, 900, 3600, 5400)] == [
        "5s", "59s", "1m", "1m30s", "15m", "1h", "1h30m",
    ]  # fmt: skip


def test_failure_summary_names_the_refusal_or_the_reason_without_the_address() -> None:
    refused = IkeUpError(
        f"peer {REFUSER}: peer refused IKE_SA_INIT: NO_PROPOSAL_CHOSEN",
        NotifyType.NO_PROPOSAL_CHOSEN,
    )
    assert failure_summary(refused, str(REFUSER)) == "IKE refused (NO_PROPOSAL_CHOSEN)"
    silent = IkeUpError(f"peer {REFUSER}: no answer from {REFUSER} after 6 tries")
    assert failure_summary(silent, str(REFUSER)) == "IKE: no answer after 6 tries"


# --------------------------------------------------------------------------- OE manager


def test_dns_triggered_tunnel_up_is_one_notice_line_with_auth_and_cipher_and_no_key(
    caplog: pytest.LogCaptureFixture,
) -> None:
    mgr = _mgr()
    none = PeerKey(KeyKind.NONE, None, 10, ORG, 0)
    caplog.set_level(logging.DEBUG, logger="oe_router")
    (neg,) = [a for a in mgr.ensure_tunnel(1, ORG, (PEER,), none, 0.0) if isinstance(a, Negotiate)]
    _up(mgr, neg, PEER, 0.5)
    notices = [m for lv, m in _lines(caplog) if lv == "NOTICE"]
    assert notices == ["example.org (198.51.100.7): protected, NULL auth, AES-GCM-128 (DNS)"]
    _no_secrets(caplog.text, SECRET_IN, SECRET_OUT, SECRET_IN[:16], SECRET_OUT[:16])


def test_a_dnssec_key_is_named_by_kind_never_by_its_bytes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    mgr = _mgr()
    public = Ed25519PrivateKey.generate().public_key()
    key = PeerKey(KeyKind.ED25519, public, 10, ORG, 5)
    caplog.set_level(logging.DEBUG, logger="oe_router")
    (neg,) = [a for a in mgr.ensure_tunnel(1, ORG, (PEER,), key, 0.0) if isinstance(a, Negotiate)]
    _up(mgr, neg, PEER, 0.5)
    assert (
        "NOTICE",
        "example.org (198.51.100.7): protected, ED25519 key from DNSSEC, AES-GCM-128 (DNS)",
    ) in _lines(caplog)
    _no_secrets(caplog.text, public.public_bytes(Encoding.Raw, PublicFormat.Raw))


def test_packet_triggered_tunnel_and_refusals_say_what_became_of_the_flow(
    caplog: pytest.LogCaptureFixture,
) -> None:
    mgr = _mgr()
    caplog.set_level(logging.INFO, logger="oe_router")
    _up(mgr, _acquire(mgr, PEER, 0.0), PEER, 0.1)
    neg = _acquire(mgr, REFUSER, 1.0)
    error = f"peer {REFUSER}: peer refused IKE_SA_INIT: NO_PROPOSAL_CHOSEN"
    exc = IkeUpError(error, NotifyType.NO_PROPOSAL_CHOSEN)
    mgr.negotiated(neg.ticket, NegotiationResult(None, error, summary=failure_summary(exc, "")), 2)
    neg = _acquire(mgr, PRIV, 3.0)
    silent = f"peer {PRIV}: no answer from {PRIV} after 6 tries"
    why = failure_summary(IkeUpError(silent), str(PRIV))
    mgr.negotiated(neg.ticket, NegotiationResult(None, silent, summary=why), 4.0)
    decisions = [(lv, m) for lv, m in _lines(caplog) if DECISION.match(m)]
    assert decisions == [
        ("NOTICE", "198.51.100.7: protected, NULL auth, AES-GCM-128 (packet)"),
        ("INFO", "192.0.2.10: clear for 15m, IKE refused (NO_PROPOSAL_CHOSEN)"),
        ("WARNING", "203.0.113.5: blocked for 5s, IKE: no answer after 6 tries (group private)"),
    ]
    # oe status keeps the full reason
    reasons = {s.destination: s.reason for s in mgr.shunts(5.0)}
    assert reasons["192.0.2.10/32"] == f"private-or-clear: {error}"


def test_a_flood_of_failures_logs_a_few_lines_and_then_counts_the_rest(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A LAN host scanning 200 addresses that speak no IKE: 30 lines a minute, then
    the next line says how many were left out; a tunnel that comes up meanwhile (notice)
    is not crowded out."""
    mgr = _mgr()
    caplog.set_level(logging.INFO, logger="oe_router")
    for i in range(200):
        neg = _acquire(mgr, ipaddress.IPv4Address(f"192.0.2.{i + 20}"), i * 0.01)
        mgr.negotiated(neg.ticket, NegotiationResult(None, "x", summary="IKE: no answer"), 3.0)
    _up(mgr, _acquire(mgr, PEER, 3.5), PEER, 3.5)
    neg = _acquire(mgr, REFUSER, 70.0)
    mgr.negotiated(neg.ticket, NegotiationResult(None, "x", summary="IKE: no answer"), 70.0)
    lines = _lines(caplog)
    clear = [m for lv, m in lines if DECISION.match(m) and "clear for 15m" in m]
    assert len(clear) == 31  # 30 in the first minute, then the one at t=70
    assert ("INFO", "170 more decision line(s) were suppressed") in lines
    assert ("NOTICE", "198.51.100.7: protected, NULL auth, AES-GCM-128 (packet)") in lines


def test_decision_log_repeats_a_line_only_after_its_quiet_time() -> None:
    log = logging.getLogger("test.decisions")
    log.setLevel(logging.INFO)
    d = DecisionLog(log, window=60, burst=30, repeat=600)
    assert d.decide(logging.INFO, "a.example (192.0.2.1)", "clear, no key (DNS)", 0.0)
    assert not d.decide(logging.INFO, "a.example (192.0.2.1)", "clear, no key (DNS)", 599.0)
    assert d.decide(logging.INFO, "a.example (192.0.2.1)", "clear, no key (DNS)", 600.0)
    assert d.decide(logging.INFO, "a.example (192.0.2.1)", "protected", 600.0)  # changed
    log.setLevel(logging.WARNING)  # log_level warning: nothing is written, nothing counted
    assert not d.decide(logging.INFO, "b.example (192.0.2.2)", "clear, no key (DNS)", 700.0)


# --------------------------------------------------------------------------- DNS front

NAME = dns.name.from_text("www.example.net.")
ADDR = ipaddress.IPv4Address("203.0.113.9")


class Upstream:
    """Answers every A query with 203.0.113.9."""

    async def query(self, wire: bytes) -> bytes:
        q = dns.message.from_wire(wire)
        reply = dns.message.make_response(q)
        question = q.question[0]
        if question.rdtype == dns.rdatatype.A:
            reply.answer.append(dns.rrset.from_text_list(NAME, 300, "IN", "A", [str(ADDR)]))
        return reply.to_wire()


class Keys:
    def __init__(self, result: KeyResult) -> None:
        self.result = result

    async def lookup(self, name: dns.name.Name) -> KeyResult:
        return self.result

    def cached(self, name: dns.name.Name) -> KeyResult | None:
        return None


@pytest.mark.parametrize(
    ("result", "words"),
    [
        (
            KeyResult(
                KeyStatus.SECURE, (), "", v4=AddressProof(KeyStatus.SECURE, frozenset({ADDR}))
            ),
            "clear, no key (DNS)",
        ),
        (KeyResult(KeyStatus.INSECURE, (), "no DS"), "clear, no key (DNS, unsigned zone)"),
        (
            KeyResult(KeyStatus.INDETERMINATE, (), "timeout"),
            "clear, key unknown (DNS lookup failed)",
        ),
    ],
)
def test_an_answer_released_clear_is_one_line_per_name_not_per_query(
    caplog: pytest.LogCaptureFixture, result: KeyResult, words: str
) -> None:
    async def main() -> None:
        r = Resolver(Upstream(), HoldPolicy(), key_lookup=Keys(result))
        for rdtype in ("A", "A", "AAAA", "A"):
            wire = dns.message.make_query(NAME, rdtype).to_wire()
            assert await r.handle(wire, ("192.168.1.20", 4000), 512) is not None
        assert r.stats.released_clear == 4  # 4 answers, 1 line (the AAAA one has no address)

    caplog.set_level(logging.INFO, logger="oe_router")
    asyncio.run(main())
    assert [(lv, m) for lv, m in _lines(caplog) if "www.example.net" in m] == [
        ("INFO", f"www.example.net (203.0.113.9): {words}")
    ]


def test_notice_is_a_level_of_its_own() -> None:
    assert logging.INFO < NOTICE < logging.WARNING
    assert logging.getLevelName(NOTICE) == "NOTICE"


def test_a_proposal_mismatch_says_what_each_side_offered_in_one_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Peer refused our ESP: the one decision line keeps its words and adds our offer and
    that the peer's is unknown; the shunt's status row carries both sides."""
    mgr = _mgr()
    caplog.set_level(logging.INFO, logger="oe_router")
    neg = _acquire(mgr, REFUSER, 1.0)
    offers = ProposalMismatch("ESP", "peer", ("aes256gcm16-noesn-esn", "aes256-sha512-noesn-esn"))
    error = f"peer {REFUSER}: IKE SA up but the Child SA failed: peer refused the Child SA"
    exc = IkeUpError(error, NotifyType.NO_PROPOSAL_CHOSEN, offers)
    result = NegotiationResult(
        None, error, summary=failure_summary(exc, str(REFUSER)), offers=offers_status(offers)
    )
    mgr.negotiated(neg.ticket, result, 2.0)
    decisions = [(lv, m) for lv, m in _lines(caplog) if DECISION.match(m)]
    assert decisions == [
        (
            "INFO",
            "192.0.2.10: clear for 15m, IKE refused (NO_PROPOSAL_CHOSEN): we offered ESP"
            " aes256gcm16-noesn-esn, aes256-sha512-noesn-esn; the peer did not say what it"
            " accepts",
        )
    ]
    (row,) = mgr.shunts(3.0)
    assert row.reason == f"private-or-clear: {error}"
    assert row.offers == ProposalOffers("ESP", "peer", offers.ours, None)
