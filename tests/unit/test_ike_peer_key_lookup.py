"""The responder looks a signing initiator's key up by its FQDN identity (issue 15
item 3): the sans-IO side. IKE_AUTH waits in AUTH_PENDING after PeerKeyNeeded, a
retransmission meanwhile is absorbed, and ``peer_key_found`` resumes it: the right
key establishes the SA (confined to the peer's own address), none or a wrong one
fails it with AUTHENTICATION_FAILED on both sides, and so does no answer in time.
"""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from oe_router.ike.constants import AuthMethod, IdType, NotifyType
from oe_router.ike.events import (
    ChildSaEstablished,
    IkeSaEstablished,
    IkeSaFailed,
    PeerKeyNeeded,
)
from oe_router.ike.sa import IkeSa, IkeSaConfig
from oe_router.ike.states import IkeState
from oe_router.ike.tasks.ike_auth import fqdn_text
from tests.ike_pair import I_ADDR, R_ADDR, configs, events, host_ts, net, replace, shuttle

ALICE = b"alice.example"
ALICE_KEY = ec.generate_private_key(ec.SECP256R1())
MALLORY_KEY = ec.generate_private_key(ec.SECP256R1())


def _pair(
    ident: tuple[int, bytes] = (IdType.ID_FQDN, ALICE), lookup: bool = True
) -> tuple[IkeSaConfig, IkeSaConfig]:
    """Alice signs (ECDSA) and offers her whole /24; we answer with NULL auth, know no
    key for her, and our own selectors would take the /24 (only containment narrows)."""
    ini, res = configs()
    lan = (net("192.0.2.0/24"),)
    ini = replace(ini, private_key=ALICE_KEY, local_id=ident, local_ts=lan)
    return ini, replace(res, lookup_peer_key=lookup, peer_key_timeout=8.0, remote_ts=lan)


def _held() -> tuple[IkeSa, IkeSa, PeerKeyNeeded]:
    """The pair after IKE_AUTH reached the responder, which now waits for the key."""
    ini_cfg, res_cfg = _pair()
    ini, res = IkeSa.initiator(ini_cfg, 0.0), IkeSa.responder(res_cfg)
    shuttle(ini, res)
    ev = events(res)
    assert len(ev) == 1 and isinstance(ev[0], PeerKeyNeeded), ev
    assert res.state == IkeState.AUTH_PENDING and res.half_open
    assert events(ini) == [] and ini.state == IkeState.AUTH_SENT
    return ini, res, ev[0]


def _failed_auth(ini: IkeSa, res: IkeSa, now: float) -> None:
    """Both sides failed with AUTHENTICATION_FAILED: we told the initiator so."""
    rev = events(res)
    assert [type(e) for e in rev] == [IkeSaFailed], rev
    assert isinstance(rev[0], IkeSaFailed) and rev[0].notify == NotifyType.AUTHENTICATION_FAILED
    shuttle(ini, res, now)
    iev = events(ini)
    assert [type(e) for e in iev] == [IkeSaFailed], iev
    assert isinstance(iev[0], IkeSaFailed) and iev[0].notify == NotifyType.AUTHENTICATION_FAILED
    assert ini.state == res.state == IkeState.FAILED


def test_pending_then_secure_key_establishes_confined_to_the_peer() -> None:
    ini, res, need = _held()
    assert need.identity == (IdType.ID_FQDN, ALICE) and need.name == "alice.example"
    assert res.get_timer() == 8.0  # the lookup's deadline
    res.peer_key_found(ALICE_KEY.public_key(), 1.0)
    shuttle(ini, res, 1.0)
    rev, iev = events(res), events(ini)
    assert [type(e) for e in rev] == [IkeSaEstablished, ChildSaEstablished], rev
    assert [type(e) for e in iev] == [IkeSaEstablished, ChildSaEstablished], iev
    up, child = rev
    assert isinstance(up, IkeSaEstablished) and isinstance(child, ChildSaEstablished)
    assert up.peer_id == (IdType.ID_FQDN, ALICE)
    assert up.peer_auth_method == AuthMethod.DIGITAL_SIGNATURE
    # containment: her /24 narrowed to her own address, as for an address-bound key
    assert child.ts_remote == (host_ts(I_ADDR[0]),)
    assert res.get_timer() is None or res.get_timer() != 8.0


def test_a_key_known_in_advance_is_not_confined_by_this() -> None:
    """Control: the narrowing above comes from the lookup, not from the test's setup."""
    ini_cfg, res_cfg = _pair()
    res_cfg = replace(res_cfg, peer_public_key=ALICE_KEY.public_key())
    ini, res = IkeSa.initiator(ini_cfg, 0.0), IkeSa.responder(res_cfg)
    shuttle(ini, res)
    rev = events(res)
    assert [type(e) for e in rev] == [IkeSaEstablished, ChildSaEstablished], rev
    assert isinstance(rev[1], ChildSaEstablished)
    assert rev[1].ts_remote == (net("192.0.2.0/24"),)


@pytest.mark.parametrize(
    "why", ["BOGUS: RRSIG does not verify", "SECURE: NXDOMAIN", "no trust anchor"]
)
def test_no_key_fails_with_authentication_failed(why: str) -> None:
    ini, res, _ = _held()
    res.peer_key_found(None, 1.0, why)
    _failed_auth(ini, res, 1.0)


def test_key_published_for_another_name_fails() -> None:
    ini, res, _ = _held()
    res.peer_key_found(MALLORY_KEY.public_key(), 1.0)
    _failed_auth(ini, res, 1.0)


def test_retransmission_while_pending_is_absorbed_then_answered_once() -> None:
    ini, res, _ = _held()
    for t in (0.5, 1.5):  # the initiator's back-off: two more copies of IKE_AUTH
        ini.handle_timer(t)
        again = ini.datagrams_to_send()
        assert again
        for d in again:
            res.receive_datagram(d, t, I_ADDR)
        assert res.datagrams_to_send() == [] and events(res) == []
        assert res.state == IkeState.AUTH_PENDING
    res.peer_key_found(ALICE_KEY.public_key(), 2.0)
    replies = res.datagrams_to_send()
    assert len(replies) == 1  # one answer
    for d in replies:
        ini.receive_datagram(d, 2.0, R_ADDR)
    rev = events(res)
    assert [type(e) for e in rev] == [IkeSaEstablished, ChildSaEstablished]  # processed once
    assert ini.state == res.state == IkeState.ESTABLISHED


def test_no_answer_in_time_fails_cleanly_and_a_late_one_is_ignored() -> None:
    ini, res, _ = _held()
    res.handle_timer(7.9)
    assert res.state == IkeState.AUTH_PENDING and res.datagrams_to_send() == []
    res.handle_timer(8.0)
    assert res.get_timer() is None
    _failed_auth(ini, res, 8.0)
    res.peer_key_found(ALICE_KEY.public_key(), 9.0)  # the lookup came back too late
    assert res.state == IkeState.FAILED and events(res) == [] and res.datagrams_to_send() == []


@pytest.mark.parametrize(
    ("ident", "lookup"),
    [
        ((IdType.ID_FQDN, ALICE), False),  # lookups not enabled
        ((IdType.ID_IPV4_ADDR, bytes([192, 0, 2, 1])), True),  # address identity: skipped
        ((IdType.ID_FQDN, b"bad name!.example"), True),  # not a host name
    ],
)
def test_no_lookup_refuses_a_signing_initiator_at_once(
    ident: tuple[int, bytes], lookup: bool
) -> None:
    ini_cfg, res_cfg = _pair(ident, lookup)
    ini, res = IkeSa.initiator(ini_cfg, 0.0), IkeSa.responder(res_cfg)
    shuttle(ini, res)
    rev = events(res)
    assert not any(isinstance(e, PeerKeyNeeded) for e in rev)
    assert isinstance(rev[-1], IkeSaFailed)
    assert rev[-1].notify == NotifyType.AUTHENTICATION_FAILED


@pytest.mark.parametrize(
    ("data", "text"),
    [
        (b"alice.example", "alice.example"),
        (b"alice.example.", "alice.example"),
        (b"", None),
        (b"a..b", None),
        (b"\xffx.example", None),
        (b"x" * 64 + b".example", None),
    ],
)
def test_fqdn_text(data: bytes, text: str | None) -> None:
    assert fqdn_text(data) == text
