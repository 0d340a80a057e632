"""Responder cookies and half-open limit, fragmentation on send, CP inner addresses,
containment of NULL/address-bound peers, INITIAL_CONTACT, AUTHENTICATION_FAILED,
the negotiated-keys accessor, and a chaos-network property test.
"""

from __future__ import annotations

import ipaddress

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from oe_router.ike.constants import IdType, NotifyType
from oe_router.ike.cookies import CookieJar, ResponderLimits, responder_precheck
from oe_router.ike.events import (
    ChildSaDeleted,
    ChildSaEstablished,
    ChildSaFailed,
    IkeSaEstablished,
    IkeSaFailed,
    InitialContact,
)
from oe_router.ike.message import Message
from oe_router.ike.payloads import SKF, Notify
from oe_router.ike.sa import IkeSa
from oe_router.ike.selectors import NO_CONTAINMENT, ContainmentPolicy
from tests.ike_pair import (
    I_ADDR,
    R_ADDR,
    assert_mirror,
    configs,
    establish,
    events,
    handshake,
    host_ts,
    mirrored,
    net,
    pairs,
    replace,
    seeded,
    shuttle,
)

# --------------------------------------------------------------------------- cookies


def test_cookie_demanded_above_threshold_then_accepted() -> None:
    ini_cfg, res_cfg = configs()
    jar = CookieJar(b"k" * 32, period=60.0)
    limits = ResponderLimits(cookie_threshold=2, half_open_limit=5)
    ini = IkeSa.initiator(ini_cfg, 0.0)
    (first,) = ini.datagrams_to_send()
    assert responder_precheck(first, I_ADDR[0], 1, 0.0, jar, limits).action == "new"
    check = responder_precheck(first, I_ADDR[0], 2, 0.0, jar, limits)
    assert check.action == "reply" and check.reply is not None
    notify = Message.decode(check.reply).payloads[0]
    assert isinstance(notify, Notify) and notify.notify_type == NotifyType.COOKIE
    ini.receive_datagram(check.reply, 0.1, R_ADDR)  # the initiator retries with the cookie
    (second,) = ini.datagrams_to_send()
    first_payload = Message.decode(second).payloads[0]
    assert isinstance(first_payload, Notify) and first_payload.notify_type == NotifyType.COOKIE
    assert responder_precheck(second, I_ADDR[0], 3, 30.0, jar, limits).action == "new"
    # the cookie is bound to the address it was sent to
    assert responder_precheck(second, "192.0.2.99", 3, 30.0, jar, limits).action == "reply"
    res = IkeSa.responder(res_cfg)
    res.receive_datagram(second, 0.1, I_ADDR)
    shuttle(ini, res, 0.1)
    assert [type(e) for e in events(ini)] == [IkeSaEstablished, ChildSaEstablished]


def test_cookie_secret_rotates_with_time() -> None:
    jar = CookieJar(b"s" * 32, period=60.0)
    c = jar.make(b"n" * 32, "192.0.2.1", b"i" * 8, 10.0)
    assert jar.verify(c, b"n" * 32, "192.0.2.1", b"i" * 8, 70.0)  # previous secret still good
    assert not jar.verify(c, b"n" * 32, "192.0.2.1", b"i" * 8, 130.0)  # two periods: stale
    assert not CookieJar(b"t" * 32).verify(c, b"n" * 32, "192.0.2.1", b"i" * 8, 10.0)
    assert not jar.verify(c[:-1], b"n" * 32, "192.0.2.1", b"i" * 8, 10.0)


def test_half_open_limit_refuses_and_garbage_is_dropped() -> None:
    ini_cfg, _ = configs()
    (first,) = IkeSa.initiator(ini_cfg, 0.0).datagrams_to_send()
    jar = CookieJar(b"k" * 32)
    limits = ResponderLimits(cookie_threshold=2, half_open_limit=5)
    check = responder_precheck(first, I_ADDR[0], 5, 0.0, jar, limits)
    assert check.action == "drop" and "limit" in check.reason
    assert responder_precheck(b"\x00" * 10, I_ADDR[0], 0, 0.0, jar).action == "drop"
    reply = Message.decode(first)
    reply.flags |= 0x20
    assert responder_precheck(reply.encode(), I_ADDR[0], 0, 0.0, jar).action == "drop"


# --------------------------------------------------------------------------- fragmentation


def test_fragmented_ike_auth_both_ways_and_retransmitted_whole() -> None:
    """RFC 7383: IKE_AUTH larger than fragment_size goes as SKF fragments; a lost
    fragment makes the initiator resend all of them and the responder replay its reply."""
    key = rsa.generate_private_key(65537, 2048)
    ini_cfg, res_cfg = configs(fragment_size=300)
    ini_cfg = replace(ini_cfg, peer_public_key=key.public_key())
    res_cfg = replace(res_cfg, private_key=key, local_id=(IdType.ID_FQDN, b"server.example"))
    ini = IkeSa.initiator(ini_cfg, 0.0)
    res = IkeSa.responder(res_cfg)
    for d in ini.datagrams_to_send():
        res.receive_datagram(d, 0.0, I_ADDR)
    for d in res.datagrams_to_send():
        ini.receive_datagram(d, 0.0, R_ADDR)
    auth = ini.datagrams_to_send()
    assert len(auth) > 1 and all(len(d) <= 300 for d in auth)
    assert all(isinstance(Message.decode(d).payloads[0], SKF) for d in auth)
    for d in auth[1:]:  # fragment 1 lost
        res.receive_datagram(d, 0.0, I_ADDR)
    assert res.datagrams_to_send() == []
    ini.handle_timer(0.5)
    again = ini.datagrams_to_send()
    assert again == auth  # every fragment, byte for byte
    for d in again:
        res.receive_datagram(d, 0.5, I_ADDR)
    reply = res.datagrams_to_send()
    assert len(reply) > 1 and all(len(d) <= 300 for d in reply)  # 256-byte RSA signature
    for d in reply[:-1]:
        ini.receive_datagram(d, 0.5, R_ADDR)
    ini.handle_timer(1.5)  # last reply fragment lost: resend the request
    for d in ini.datagrams_to_send():
        res.receive_datagram(d, 1.5, I_ADDR)
    replay = res.datagrams_to_send()
    assert replay == reply  # replayed once (on fragment 1), not once per fragment
    for d in replay:
        ini.receive_datagram(d, 1.5, R_ADDR)
    assert [type(e) for e in events(ini)] == [IkeSaEstablished, ChildSaEstablished]
    assert [type(e) for e in events(res)] == [IkeSaEstablished, ChildSaEstablished]


def test_no_fragments_when_peer_lacks_support() -> None:
    ini_cfg, res_cfg = configs(fragment_size=256)
    ini = IkeSa.initiator(ini_cfg, 0.0)
    res = IkeSa.responder(res_cfg)
    (init,) = ini.datagrams_to_send()
    res.receive_datagram(init, 0.0, I_ADDR)
    (resp,) = res.datagrams_to_send()
    m = Message.decode(resp)
    m.payloads = [
        p
        for p in m.payloads
        if not (isinstance(p, Notify) and p.notify_type == NotifyType.IKEV2_FRAGMENTATION_SUPPORTED)
    ]
    ini.receive_datagram(m.encode(), 0.0, R_ADDR)
    (auth,) = ini.datagrams_to_send()
    assert len(auth) > 256  # sent whole: the peer never said it can reassemble


# --------------------------------------------------------------------------- CP


def test_cp_request_returns_inner_address() -> None:
    ini_cfg, res_cfg = configs()
    ini_cfg = replace(ini_cfg, request_internal_address=True, local_ts=(net("0.0.0.0/0"),))
    res_cfg = replace(res_cfg, internal_addresses=("10.9.0.7",), remote_ts=(net("10.9.0.0/24"),))
    _ini, _res, ic, rc = establish(ini_cfg, res_cfg)
    assert ic.internal_addresses == (ipaddress.ip_address("10.9.0.7"),)
    assert [(str(t.start), str(t.end)) for t in ic.ts_local] == [("10.9.0.7", "10.9.0.7")]
    assert rc.internal_addresses == ic.internal_addresses
    assert_mirror(ic, rc)


def test_cp_without_pool_replies_without_addresses() -> None:
    ini_cfg, res_cfg = configs()
    _ini, _res, ic, _ = establish(replace(ini_cfg, request_internal_address=True), res_cfg)
    assert ic.internal_addresses == ()


# --------------------------------------------------------------------------- containment


@pytest.mark.parametrize(
    ("tsi", "narrowing", "outcome"),
    [
        ("192.0.2.0/24", True, "192.0.2.1"),  # wider, contains its address: narrowed
        ("192.0.2.0/24", False, None),  # refuse mode: only exactly its address
        ("192.0.2.1/32", False, "192.0.2.1"),
        ("203.0.113.0/24", True, None),  # somebody else's addresses
    ],
)
def test_responder_confines_null_peer(tsi: str, narrowing: bool, outcome: str | None) -> None:
    ini_cfg, res_cfg = configs()
    policy = ContainmentPolicy(narrow=narrowing)
    res_cfg = replace(res_cfg, containment=policy, remote_ts=(net("0.0.0.0/0"),))
    _, _, ie, re = handshake(replace(ini_cfg, local_ts=(net(tsi),)), res_cfg)
    if outcome is None:
        assert isinstance(re[1], ChildSaFailed) and re[1].notify == NotifyType.TS_UNACCEPTABLE
        assert isinstance(ie[1], ChildSaFailed) and ie[1].notify == NotifyType.TS_UNACCEPTABLE
    else:
        rc = re[1]
        assert isinstance(rc, ChildSaEstablished)
        assert [(str(t.start), str(t.end)) for t in rc.ts_remote] == [(outcome, outcome)]


def test_responder_does_not_confine_signature_peer_unless_key_is_address_bound() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    ini_cfg, res_cfg = configs()
    ini_cfg = replace(ini_cfg, private_key=key, local_ts=(net("192.0.2.0/24"),))
    res_cfg = replace(res_cfg, peer_public_key=key.public_key(), remote_ts=(net("0.0.0.0/0"),))
    _, _, ic, _ = establish(ini_cfg, res_cfg)
    assert [str(t.end) for t in ic.ts_local] == ["192.0.2.255"]
    _, _, ic, _ = establish(ini_cfg, replace(res_cfg, peer_key_address_bound=True))
    assert [str(t.end) for t in ic.ts_local] == ["192.0.2.1"]


def test_initiator_refuses_confined_responder_claiming_more_and_deletes_it() -> None:
    ini_cfg, res_cfg = configs()
    ini, res, ie, re = handshake(
        replace(ini_cfg, remote_ts=(net("0.0.0.0/0"),)),
        replace(res_cfg, local_ts=(net("198.51.100.0/24"),)),
    )
    assert isinstance(ie[1], ChildSaFailed) and ie[1].notify == NotifyType.TS_UNACCEPTABLE
    assert [type(e) for e in re] == [IkeSaEstablished, ChildSaEstablished, ChildSaDeleted]
    assert ini.child_sas() == [] == res.child_sas()
    # with the rule switched off by config, the same answer is accepted
    ini = IkeSa.initiator(
        replace(ini_cfg, remote_ts=(net("0.0.0.0/0"),), containment=NO_CONTAINMENT), 0.0
    )
    res = IkeSa.responder(replace(res_cfg, local_ts=(net("198.51.100.0/24"),)))
    shuttle(ini, res)
    ie = events(ini)
    assert isinstance(ie[1], ChildSaEstablished)


# --------------------------------------------------------------------------- INITIAL_CONTACT / AUTH


def test_initial_contact_surfaces_at_responder() -> None:
    ini_cfg, res_cfg = configs()
    ini = IkeSa.initiator(replace(ini_cfg, initial_contact=True), 0.0)
    res = IkeSa.responder(res_cfg)
    shuttle(ini, res)
    re = events(res)
    ic = [e for e in re if isinstance(e, InitialContact)]
    assert len(ic) == 1 and ic[0].peer_address == I_ADDR[0]
    assert ic[0].peer_id == (IdType.ID_NULL, b"") and ic[0].spi_i == ini.spi_i
    _, _, _, _ = establish(ini_cfg, res_cfg)  # off by default: no event (checked by establish)


def test_initiator_tells_responder_authentication_failed() -> None:
    """§2.21.2: the responder believed the SA was up; the initiator's note tears it down."""
    key, other = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ini_cfg, res_cfg = configs()
    _, res, ie, re = handshake(
        replace(ini_cfg, peer_public_key=other.public_key()), replace(res_cfg, private_key=key)
    )
    assert isinstance(ie[-1], IkeSaFailed) and ie[-1].notify == NotifyType.AUTHENTICATION_FAILED
    assert [type(e) for e in re] == [IkeSaEstablished, ChildSaEstablished, IkeSaFailed]
    assert isinstance(re[-1], IkeSaFailed) and re[-1].notify == NotifyType.AUTHENTICATION_FAILED
    assert res.state == "failed"


def test_negotiated_keys_agree() -> None:
    ini, res, _, _ = establish(*configs())
    ki, kr = ini.negotiated_keys(), res.negotiated_keys()
    assert ki is not None and ki == kr
    assert (ki.spi_i, ki.spi_r) == (ini.spi_i, ini.spi_r) and len(ki.ni) == 32
    assert IkeSa.responder(configs()[1]).negotiated_keys() is None


# --------------------------------------------------------------------------- chaos network


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_chaos_network_then_reliable_delivery_converges(data: st.DataObject) -> None:
    """Random drop/duplication/reordering/mutation, then reliable delivery.

    Nothing ever raises; with only drop/dup/reorder both sides end with the
    same Child SAs (including one created by command during the chaos). With
    mutations (unauthenticated IKE_SA_INIT can be tampered with), either both
    sides agree or at least one side gave up.
    """
    mutate = data.draw(st.booleans(), "mutate")
    seed = data.draw(st.integers(0, 2**16), "seed")
    ini_cfg, res_cfg = configs()
    ini = IkeSa.initiator(ini_cfg, 0.0, seeded(seed))
    res = IkeSa.responder(res_cfg, seeded(seed + 1))
    ini.create_child(ini_cfg.local_ts, ini_cfg.remote_ts, True, 0.0)
    in_flight: list[tuple[IkeSa, bytes]] = []
    now = 0.0
    for _ in range(data.draw(st.integers(1, 12), "rounds")):
        in_flight += [(res, d) for d in ini.datagrams_to_send()]
        in_flight += [(ini, d) for d in res.datagrams_to_send()]
        if in_flight:
            order = data.draw(st.permutations(range(len(in_flight))), "order")
            batch = [in_flight[i] for i in order]
            in_flight = []
            for target, d in batch:
                fate = data.draw(st.sampled_from(["deliver", "drop", "dup", "hold"]), "fate")
                if fate == "hold":
                    in_flight.append((target, d))
                    continue
                if fate == "drop":
                    continue
                raw = bytearray(d)
                if mutate and data.draw(st.booleans(), "flip"):
                    raw[data.draw(st.integers(0, len(raw) - 1))] ^= data.draw(st.integers(1, 255))
                for _ in range(2 if fate == "dup" else 1):
                    target.receive_datagram(bytes(raw), now, I_ADDR if target is res else R_ADDR)
        now += data.draw(st.sampled_from([0.0, 0.3, 1.0]), "dt")
        ini.handle_timer(now)
        res.handle_timer(now)
    for target, d in in_flight:  # late arrivals
        target.receive_datagram(d, now, I_ADDR if target is res else R_ADDR)
    # reliable from here on: run the timers until both are quiet
    for _ in range(200):
        shuttle(ini, res, now)
        timers = [t for t in (ini.get_timer(), res.get_timer()) if t is not None]
        if not timers:
            break
        now = max(now, min(timers))
        ini.handle_timer(now)
        res.handle_timer(now)
    failed = ini.state == "failed" or res.state == "failed"
    if not mutate:
        assert not failed, (ini.state, res.state)
    if not failed:
        assert ini.state == res.state == "established"
        assert pairs(ini) == mirrored(res) and len(pairs(ini)) == 2
        assert {c.mode for c in ini.child_sas()} == {"tunnel"}
    assert host_ts(I_ADDR[0]) in ini_cfg.local_ts


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_rekeys_from_both_sides_under_chaos_converge(data: st.DataObject) -> None:
    """Child and IKE SA rekeys and new Child SAs, commanded on both sides at random
    moments while datagrams are dropped, duplicated and reordered: after reliable
    delivery both sides agree on one IKE SA and the same Child SAs."""
    seed = data.draw(st.integers(0, 2**16), "seed")
    ini, res, _, _ = establish(*configs(), seed=seed)
    now = 1.0
    in_flight: list[tuple[IkeSa, bytes]] = []
    for _ in range(data.draw(st.integers(1, 10), "rounds")):
        side = data.draw(st.sampled_from([ini, res]), "side")
        cmd = data.draw(st.sampled_from(["none", "rekey-child", "rekey-ike", "create"]), "cmd")
        if cmd == "rekey-child":
            live = [c.spi_in for c in side.child_sas() if c.state == "installed"]
            if live:
                side.rekey_child(data.draw(st.sampled_from(live), "child"), now)
        elif cmd == "rekey-ike":
            side.rekey(now)
        elif cmd == "create":
            side.create_child(side.config.local_ts, side.config.remote_ts, False, now)
        in_flight += [(res, d) for d in ini.datagrams_to_send()]
        in_flight += [(ini, d) for d in res.datagrams_to_send()]
        if in_flight:
            order = data.draw(st.permutations(range(len(in_flight))), "order")
            batch = [in_flight[i] for i in order]
            in_flight = []
            for target, d in batch:
                fate = data.draw(st.sampled_from(["deliver", "drop", "dup", "hold"]), "fate")
                if fate == "hold":
                    in_flight.append((target, d))
                elif fate != "drop":
                    for _ in range(2 if fate == "dup" else 1):
                        target.receive_datagram(d, now, I_ADDR if target is res else R_ADDR)
        now += data.draw(st.sampled_from([0.0, 0.3, 1.0]), "dt")
        ini.handle_timer(now)
        res.handle_timer(now)
    for target, d in in_flight:
        target.receive_datagram(d, now, I_ADDR if target is res else R_ADDR)
    for _ in range(500):
        shuttle(ini, res, now)
        timers = [t for t in (ini.get_timer(), res.get_timer()) if t is not None]
        if not timers:
            break
        now = max(now, min(timers))
        ini.handle_timer(now)
        res.handle_timer(now)
    ie, re = events(ini), events(res)
    assert ini.state == res.state == "established", (ie, re)
    assert not [e for e in ie + re if isinstance(e, IkeSaFailed)]
    assert (ini.spi_i, ini.spi_r) == (res.spi_i, res.spi_r)
    assert len(ini.spis()) == len(res.spis()) == 1
    assert pairs(ini) == mirrored(res)
    assert all(c.state == "installed" for c in ini.child_sas() + res.child_sas())
