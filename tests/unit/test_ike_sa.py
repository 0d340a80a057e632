"""IKE SA state machine: our initiator against our responder, bytes passed by hand.

No sockets: each side is fed the other's datagrams, as the endpoint would.
"""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from oe_router.ike.constants import AuthMethod, DhId, EncrId, ExchangeType, IdType, NotifyType
from oe_router.ike.errors import IkeError
from oe_router.ike.events import (
    ChildSaDeleted,
    ChildSaEstablished,
    ChildSaFailed,
    Event,
    IkeSaDeleted,
    IkeSaEstablished,
    IkeSaFailed,
)
from oe_router.ike.message import Message
from oe_router.ike.payloads import TrafficSelector
from oe_router.ike.sa import DEFAULT_IKE_PROPOSALS, IkeProposalSpec, IkeSa
from tests.ike_pair import I_ADDR, R_ADDR, configs, events, handshake, replace, shuttle


def assert_pair(ie: list[Event], re: list[Event]) -> tuple[ChildSaEstablished, ChildSaEstablished]:
    assert [type(e) for e in ie] == [IkeSaEstablished, ChildSaEstablished], ie
    assert [type(e) for e in re] == [IkeSaEstablished, ChildSaEstablished], re
    ic, rc = ie[1], re[1]
    assert isinstance(ic, ChildSaEstablished) and isinstance(rc, ChildSaEstablished)
    assert ic.spi_in == rc.spi_out and ic.spi_out == rc.spi_in
    assert ic.encr_key_out == rc.encr_key_in and ic.integ_key_out == rc.integ_key_in
    assert ic.encr_key_in == rc.encr_key_out and ic.integ_key_in == rc.integ_key_out
    assert ic.encr_key_in != ic.encr_key_out
    assert (ic.encr, ic.encr_key_bits, ic.integ, ic.esn) == (
        rc.encr,
        rc.encr_key_bits,
        rc.integ,
        rc.esn,
    )
    return ic, rc


def test_null_auth_both_ways() -> None:
    ini_cfg, res_cfg = configs()
    ini, res, ie, re = handshake(ini_cfg, res_cfg)
    ic, rc = assert_pair(ie, re)
    i_ike, r_ike = ie[0], re[0]
    assert isinstance(i_ike, IkeSaEstablished) and isinstance(r_ike, IkeSaEstablished)
    assert i_ike.spi_i == r_ike.spi_i and i_ike.spi_r == r_ike.spi_r
    assert i_ike.peer_auth_method == r_ike.peer_auth_method == AuthMethod.NULL
    assert i_ike.peer_id == (IdType.ID_NULL, b"")
    assert (i_ike.encr, i_ike.encr_key_bits, i_ike.dh_group) == (
        EncrId.AES_GCM_16,
        256,
        DhId.CURVE25519,
    )
    assert ic.mode == "tunnel" and len(ic.encr_key_in) == 36  # AES-GCM-256 key + salt
    assert [str(t.start) for t in ic.ts_local] == [I_ADDR[0]] and [
        str(t.start) for t in rc.ts_local
    ] == [R_ADDR[0]]
    assert not i_ike.nat_local and not i_ike.nat_remote and not ic.udp_encap
    assert ini.state == res.state == "established"


@pytest.mark.parametrize(
    "spec", DEFAULT_IKE_PROPOSALS, ids=lambda s: f"{s.encr}-{s.key_bits}-{s.prf}-{s.integ}"
)
@pytest.mark.parametrize("group", [DhId.CURVE25519, DhId.ECP_256, DhId.MODP_2048])
def test_every_ike_transform_set_and_group(spec: IkeProposalSpec, group: int) -> None:
    one = IkeProposalSpec(spec.encr, spec.key_bits, spec.prf, spec.integ, (group,))
    ini_cfg, res_cfg = configs()
    _, _, ie, re = handshake(replace(ini_cfg, ike_proposals=(one,)), res_cfg)
    assert_pair(ie, re)
    ike = ie[0]
    assert isinstance(ike, IkeSaEstablished)
    assert (ike.encr, ike.prf, ike.integ, ike.dh_group) == (spec.encr, spec.prf, spec.integ, group)


def test_invalid_ke_payload_retry() -> None:
    ini_cfg, res_cfg = configs()
    only_ecp = tuple(
        IkeProposalSpec(s.encr, s.key_bits, s.prf, s.integ, (DhId.ECP_256,))
        for s in DEFAULT_IKE_PROPOSALS
    )
    ini = IkeSa.initiator(ini_cfg, now=0.0)  # guesses X25519 first
    first = ini.datagrams_to_send()
    res1 = IkeSa.responder(replace(res_cfg, ike_proposals=only_ecp))
    res1.receive_datagram(first[0], 0.0, I_ADDR)
    refusal = res1.datagrams_to_send()
    assert isinstance(events(res1)[0], IkeSaFailed)  # endpoint discards this responder
    notify = Message.decode(refusal[0]).payloads[0]
    assert getattr(notify, "notify_type", None) == NotifyType.INVALID_KE_PAYLOAD
    ini.receive_datagram(refusal[0], 0.1, R_ADDR)
    res2 = IkeSa.responder(replace(res_cfg, ike_proposals=only_ecp))
    shuttle(ini, res2, 0.1)
    ie, re = events(ini), events(res2)
    assert_pair(ie, re)
    assert isinstance(ie[0], IkeSaEstablished) and ie[0].dh_group == DhId.ECP_256


def test_duplicate_invalid_ke_payload_is_ignored() -> None:
    """A peer that answers the first request and its retransmission refuses twice (libreswan
    did, in the lab): the second refusal names the group we already switched to and must not
    fail the negotiation."""
    ini_cfg, res_cfg = configs()
    only_ecp = tuple(
        IkeProposalSpec(s.encr, s.key_bits, s.prf, s.integ, (DhId.ECP_256,))
        for s in DEFAULT_IKE_PROPOSALS
    )
    ini = IkeSa.initiator(ini_cfg, now=0.0)
    first = ini.datagrams_to_send()
    refusals = []
    for _ in range(2):
        res = IkeSa.responder(replace(res_cfg, ike_proposals=only_ecp))
        res.receive_datagram(first[0], 0.0, I_ADDR)
        refusals += res.datagrams_to_send()
    ini.receive_datagram(refusals[0], 0.1, R_ADDR)
    retry = ini.datagrams_to_send()
    ini.receive_datagram(refusals[1], 0.1, R_ADDR)
    assert events(ini) == []
    res2 = IkeSa.responder(replace(res_cfg, ike_proposals=only_ecp))
    for d in retry:
        res2.receive_datagram(d, 0.1, I_ADDR)
    shuttle(ini, res2, 0.1)
    ie, re = events(ini), events(res2)
    assert_pair(ie, re)
    assert isinstance(ie[0], IkeSaEstablished) and ie[0].dh_group == DhId.ECP_256


@pytest.mark.parametrize("kind", ["p256", "ed25519", "rsa"])
def test_asymmetric_null_initiator_signature_responder(kind: str) -> None:
    """The router authenticates with NULL, the server with its key (RFC 7619 §3 'anonymous')."""
    key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey
    if kind == "p256":
        key = ec.generate_private_key(ec.SECP256R1())
    elif kind == "ed25519":
        key = ed25519.Ed25519PrivateKey.generate()
    else:
        key = rsa.generate_private_key(65537, 2048)
    ini_cfg, res_cfg = configs()
    ini_cfg = replace(ini_cfg, peer_public_key=key.public_key())
    res_cfg = replace(res_cfg, private_key=key, local_id=(IdType.ID_FQDN, b"server.example"))
    _, _, ie, re = handshake(ini_cfg, res_cfg)
    assert_pair(ie, re)
    i_ike, r_ike = ie[0], re[0]
    assert isinstance(i_ike, IkeSaEstablished) and isinstance(r_ike, IkeSaEstablished)
    assert i_ike.peer_auth_method == AuthMethod.DIGITAL_SIGNATURE == r_ike.local_auth_method
    assert r_ike.peer_auth_method == AuthMethod.NULL == i_ike.local_auth_method
    assert i_ike.peer_id == (IdType.ID_FQDN, b"server.example")


def test_signature_both_ways() -> None:
    ki, kr = ec.generate_private_key(ec.SECP256R1()), ed25519.Ed25519PrivateKey.generate()
    ini_cfg, res_cfg = configs()
    _, _, ie, re = handshake(
        replace(ini_cfg, private_key=ki, peer_public_key=kr.public_key()),
        replace(res_cfg, private_key=kr, peer_public_key=ki.public_key()),
    )
    assert_pair(ie, re)


def test_wrong_key_fails_authentication() -> None:
    key, other = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ini_cfg, res_cfg = configs()
    ini, _res, ie, _re = handshake(
        replace(ini_cfg, peer_public_key=other.public_key()), replace(res_cfg, private_key=key)
    )
    assert isinstance(ie[-1], IkeSaFailed) and ie[-1].notify == NotifyType.AUTHENTICATION_FAILED
    assert ini.state == "failed"


def test_responder_demanding_signature_refuses_null_initiator() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    ini_cfg, res_cfg = configs()
    _, res, ie, re = handshake(ini_cfg, replace(res_cfg, peer_public_key=key.public_key()))
    assert isinstance(re[-1], IkeSaFailed) and res.state == "failed"
    assert isinstance(ie[-1], IkeSaFailed) and ie[-1].notify == NotifyType.AUTHENTICATION_FAILED


def test_transport_mode() -> None:
    ini_cfg, res_cfg = configs()
    _, _, ie, re = handshake(
        replace(ini_cfg, transport_mode=True), replace(res_cfg, transport_mode=True)
    )
    ic, rc = assert_pair(ie, re)
    assert ic.mode == rc.mode == "transport"


def test_responder_narrows_selectors() -> None:
    ini_cfg, res_cfg = configs()
    wide = (TrafficSelector.for_network("0.0.0.0/0"),)
    _, _, ie, re = handshake(replace(ini_cfg, local_ts=wide, remote_ts=wide), res_cfg)
    ic, _rc = assert_pair(ie, re)
    assert [(str(t.start), str(t.end)) for t in ic.ts_local] == [(I_ADDR[0], I_ADDR[0])]
    assert [(str(t.start), str(t.end)) for t in ic.ts_remote] == [(R_ADDR[0], R_ADDR[0])]


def test_ts_unacceptable_keeps_ike_sa() -> None:
    ini_cfg, res_cfg = configs()
    elsewhere = (TrafficSelector.for_network("203.0.113.0/24"),)
    ini, _, ie, re = handshake(replace(ini_cfg, local_ts=elsewhere), res_cfg)
    assert [type(e) for e in ie] == [IkeSaEstablished, ChildSaFailed]
    assert isinstance(ie[1], ChildSaFailed) and ie[1].notify == NotifyType.TS_UNACCEPTABLE
    assert [type(e) for e in re] == [IkeSaEstablished, ChildSaFailed]
    assert ini.state == "established"


def test_retransmission_and_cached_reply() -> None:
    ini_cfg, res_cfg = configs()
    ini = IkeSa.initiator(ini_cfg, now=0.0)
    res = IkeSa.responder(res_cfg)
    shuttle(ini, res, 0.0, drop=1)  # the IKE_SA_INIT response is lost
    assert ini.state == "init-sent" and ini.get_timer() == pytest.approx(0.5)
    ini.handle_timer(0.2)
    assert ini.datagrams_to_send() == []  # not yet
    ini.handle_timer(0.5)
    again = ini.datagrams_to_send()
    assert len(again) == 1 and ini.get_timer() == pytest.approx(0.5 + 1.0)
    res.receive_datagram(again[0], 0.5, I_ADDR)
    replay = res.datagrams_to_send()
    assert len(replay) == 1  # the cached response, byte for byte the first one
    ini.receive_datagram(replay[0], 0.5, R_ADDR)
    shuttle(ini, res, 0.5)
    assert_pair(events(ini), events(res))
    assert ini.get_timer() is None


def test_gives_up_after_retries() -> None:
    ini_cfg, _ = configs()
    ini = IkeSa.initiator(replace(ini_cfg, retransmit_tries=2), now=0.0)
    t = 0.0
    for _ in range(10):
        t += 100
        ini.handle_timer(t)
    evs = events(ini)
    assert len(ini.datagrams_to_send()) == 3 and isinstance(evs[-1], IkeSaFailed)
    assert not evs[-1].unanswered  # never established: an ordinary failure, not a dead peer


def test_unanswered_liveness_check_marks_the_peer_dead() -> None:
    """An established SA whose liveness check is never answered fails with ``unanswered``:
    the owner tears its Child SAs down as a dead peer's (the OE liveness fallback)."""
    ini_cfg, res_cfg = configs()
    ini, _, _, _ = handshake(replace(ini_cfg, retransmit_tries=1), res_cfg)
    ini.send_liveness_check(10.0)
    t = 10.0
    for _ in range(5):
        t += 100
        ini.handle_timer(t)
    assert len(ini.datagrams_to_send()) == 2  # the check and its one retransmission
    (failed,) = [e for e in events(ini) if isinstance(e, IkeSaFailed)]
    assert failed.unanswered and "no answer" in failed.reason and ini.state == "failed"


def test_nat_detected_when_addresses_are_translated() -> None:
    ini_cfg, res_cfg = configs()
    ini = IkeSa.initiator(replace(ini_cfg, local_address=("10.0.0.2", 500)), now=0.0)
    res = IkeSa.responder(res_cfg)
    shuttle(ini, res)  # responder sees I_ADDR, initiator believes it is 10.0.0.2
    ie, re = events(ini), events(res)
    ic, rc = assert_pair(ie, re)
    assert isinstance(ie[0], IkeSaEstablished) and ie[0].nat_local and not ie[0].nat_remote
    assert isinstance(re[0], IkeSaEstablished) and re[0].nat_remote and not re[0].nat_local
    assert ic.udp_encap and rc.udp_encap


def test_liveness_check_answered() -> None:
    ini_cfg, res_cfg = configs()
    ini, res, _, _ = handshake(ini_cfg, res_cfg)
    ini.send_liveness_check(10.0)
    (req,) = ini.datagrams_to_send()
    assert Message.decode(req).exchange_type == ExchangeType.INFORMATIONAL
    res.receive_datagram(req, 10.0, I_ADDR)
    (resp,) = res.datagrams_to_send()
    ini.receive_datagram(resp, 10.0, R_ADDR)
    assert ini.get_timer() is None


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_mutated_datagrams_never_raise(data: st.DataObject) -> None:
    ini_cfg, res_cfg = configs()
    ini = IkeSa.initiator(ini_cfg, now=0.0, random=lambda n: bytes([7]) * n)
    res = IkeSa.responder(res_cfg, random=lambda n: bytes([9]) * n)
    for _ in range(3):
        for d in ini.datagrams_to_send():
            raw = bytearray(d)
            if data.draw(st.booleans()):
                raw[data.draw(st.integers(0, len(raw) - 1))] ^= data.draw(st.integers(1, 255))
            res.receive_datagram(bytes(raw), 0.0, I_ADDR)
        for d in res.datagrams_to_send():
            raw = bytearray(d)
            if data.draw(st.booleans()):
                del raw[data.draw(st.integers(0, len(raw) - 1)) :]
            ini.receive_datagram(bytes(raw), 0.0, R_ADDR)
    junk = data.draw(st.binary(max_size=300))
    ini.receive_datagram(junk, 0.0)
    res.receive_datagram(junk, 0.0)


def test_responder_liveness_check_answered_by_initiator() -> None:
    ini_cfg, res_cfg = configs()
    ini, res, _, _ = handshake(ini_cfg, res_cfg)
    res.send_liveness_check(5.0)
    (req,) = res.datagrams_to_send()
    m = Message.decode(req)
    assert not m.is_initiator and not m.is_response and m.message_id == 0
    ini.receive_datagram(req, 5.0, R_ADDR)
    (resp,) = ini.datagrams_to_send()
    res.receive_datagram(resp, 5.0, I_ADDR)
    assert res.get_timer() is None
    ini.receive_datagram(req, 6.0, R_ADDR)  # retransmitted request gets the cached reply
    assert ini.datagrams_to_send() == [resp]


@pytest.mark.parametrize("who", ["initiator", "responder"])
def test_delete_ike_sa(who: str) -> None:
    ini_cfg, res_cfg = configs()
    ini, res, _, _ = handshake(ini_cfg, res_cfg)
    (ini if who == "initiator" else res).delete(3.0)
    shuttle(ini, res, 3.0)
    for sa in (ini, res):
        (ev,) = events(sa)
        assert isinstance(ev, IkeSaDeleted) and sa.state == "closed"
        assert ev.spi_i == ini.spi_i and ev.spi_r == ini.spi_r


def test_delete_child_sa() -> None:
    ini_cfg, res_cfg = configs()
    ini, res, ie, re = handshake(ini_cfg, res_cfg)
    ic, rc = assert_pair(ie, re)
    ini.delete_child(ic.spi_in, 4.0)
    shuttle(ini, res, 4.0)
    (ri,) = events(ini)
    (rr,) = events(res)
    assert isinstance(ri, ChildSaDeleted) and (ri.spi_in, ri.spi_out) == (ic.spi_in, ic.spi_out)
    assert isinstance(rr, ChildSaDeleted) and (rr.spi_in, rr.spi_out) == (rc.spi_in, rc.spi_out)
    assert ini.state == res.state == "established"
    with pytest.raises(IkeError):
        ini.delete_child(ic.spi_in, 5.0)


def test_window_size_one() -> None:
    ini_cfg, res_cfg = configs()
    ini, _, _, _ = handshake(ini_cfg, res_cfg)
    ini.send_liveness_check(1.0)
    with pytest.raises(IkeError):
        ini.send_liveness_check(1.1)


@pytest.mark.parametrize("forcing", ["initiator", "responder"])
def test_forced_udp_encap_makes_both_sides_encapsulate(forcing: str) -> None:
    """A side without kernel ESP forces NAT-T: its faked NAT_DETECTION_SOURCE_IP makes the
    peer see it behind a NAT, and both Child SA ends use UDP encapsulation (RFC 3948)."""
    ini_cfg, res_cfg = configs()
    if forcing == "initiator":
        ini_cfg = replace(ini_cfg, force_udp_encap=True)
    else:
        res_cfg = replace(res_cfg, force_udp_encap=True)
    _, _, ie, re = handshake(ini_cfg, res_cfg)
    ic, rc = assert_pair(ie, re)
    i_ike, r_ike = ie[0], re[0]
    assert isinstance(i_ike, IkeSaEstablished) and isinstance(r_ike, IkeSaEstablished)
    forcer, other = (i_ike, r_ike) if forcing == "initiator" else (r_ike, i_ike)
    assert forcer.nat_local and not forcer.nat_remote  # behind a NAT, as it claims
    assert other.nat_remote and not other.nat_local  # the peer believes it
    assert ic.udp_encap and rc.udp_encap
