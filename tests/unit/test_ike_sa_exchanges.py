"""CREATE_CHILD_SA, rekeys and their collisions, lifetimes, TEMPORARY_FAILURE, cookies,
fragments, CP, containment, INITIAL_CONTACT: our initiator against our responder,
datagrams passed by hand (no sockets), time passed in as a value.
"""

from __future__ import annotations

import pytest

from oe_router.ike.constants import ExchangeType, NotifyType
from oe_router.ike.events import (
    ChildSaDeleted,
    ChildSaEstablished,
    ChildSaFailed,
    ChildSaRekeyed,
    IkeSaEstablished,
    IkeSaFailed,
    IkeSaRekeyed,
)
from oe_router.ike.payloads import KE, Notify
from oe_router.ike.sa import IkeSa
from oe_router.ike.selectors import ContainmentPolicy
from tests.ike_pair import (
    I_ADDR,
    R_ADDR,
    assert_mirror,
    configs,
    establish,
    events,
    mirrored,
    net,
    open_request,
    pairs,
    replace,
    run_until,
    shuttle,
)

# --------------------------------------------------------------------------- CREATE_CHILD_SA


@pytest.mark.parametrize("who", ["initiator", "responder"])
def test_create_child_on_existing_ike_sa(who: str) -> None:
    """One IKE SA per peer carries many Child SAs; either side may add one."""
    ini_cfg, res_cfg = configs()
    lan = (net("10.0.0.0/24"),)
    ini_cfg = replace(ini_cfg, local_ts=(*ini_cfg.local_ts, *lan))
    res_cfg = replace(res_cfg, remote_ts=(*res_cfg.remote_ts, *lan))
    ini, res, _ic, _rc = establish(
        replace(ini_cfg, containment=ContainmentPolicy(False, False)),
        replace(res_cfg, containment=ContainmentPolicy(False, False)),
    )
    creator, other = (ini, res) if who == "initiator" else (res, ini)
    local, remote = (
        (lan, ini.config.remote_ts) if who == "initiator" else (res.config.local_ts, lan)
    )
    rid = creator.create_child(local, remote, False, 1.0)
    shuttle(ini, res, 1.0)
    (mine,) = events(creator)
    (peer,) = events(other)
    assert isinstance(mine, ChildSaEstablished) and mine.request_id == rid
    assert isinstance(peer, ChildSaEstablished) and not isinstance(peer, ChildSaRekeyed)
    assert_mirror(mine, peer)
    assert mine.ts_local == local and mine.ike_spi_i == ini.spi_i
    assert len(ini.child_sas()) == len(res.child_sas()) == 2
    assert pairs(ini) == mirrored(res)


def test_create_child_before_ike_sa_is_up_waits_in_queue() -> None:
    ini_cfg, res_cfg = configs()
    ini = IkeSa.initiator(ini_cfg, 0.0)
    rid = ini.create_child(ini_cfg.local_ts, ini_cfg.remote_ts, False, 0.0)
    res = IkeSa.responder(res_cfg)
    shuttle(ini, res)
    ie = events(ini)
    assert [type(e) for e in ie] == [IkeSaEstablished, ChildSaEstablished, ChildSaEstablished]
    assert isinstance(ie[2], ChildSaEstablished) and ie[2].request_id == rid
    assert pairs(ini) == mirrored(res) and len(pairs(ini)) == 2


def test_child_refused_reports_request_id() -> None:
    ini, res, _, _ = establish(*configs())
    rid = ini.create_child((net("203.0.113.0/24"),), ini.config.remote_ts, False, 1.0)
    shuttle(ini, res, 1.0)
    (ev,) = events(ini)
    assert isinstance(ev, ChildSaFailed) and ev.request_id == rid
    assert ev.notify == NotifyType.TS_UNACCEPTABLE
    assert ini.state == res.state == "established"


# --------------------------------------------------------------------------- Child SA rekey


def test_child_rekey_with_pfs() -> None:
    ini, res, ic, rc = establish(*configs())
    ini.rekey_child(ic.spi_in, 5.0)
    (req,) = ini.datagrams_to_send()
    inner = open_request(ini, req)
    assert inner.exchange_type == ExchangeType.CREATE_CHILD_SA
    rekey = [p for p in inner.payloads if isinstance(p, Notify)]
    assert any(n.notify_type == NotifyType.REKEY_SA and n.spi == ic.spi_in for n in rekey)
    assert any(isinstance(p, KE) for p in inner.payloads)  # PFS: a fresh DH
    res.receive_datagram(req, 5.0, I_ADDR)
    shuttle(ini, res, 5.0)
    ie, re = events(ini), events(res)
    assert [type(e) for e in ie] == [ChildSaRekeyed, ChildSaDeleted]
    assert [type(e) for e in re] == [ChildSaRekeyed, ChildSaDeleted]
    new_i, new_r = ie[0], re[0]
    assert isinstance(new_i, ChildSaRekeyed) and isinstance(new_r, ChildSaRekeyed)
    assert_mirror(new_i, new_r)
    assert (new_i.old_spi_in, new_i.old_spi_out) == (ic.spi_in, ic.spi_out)
    assert (new_r.old_spi_in, new_r.old_spi_out) == (rc.spi_in, rc.spi_out)
    assert new_i.encr_key_in != ic.encr_key_in and new_i.spi_in != ic.spi_in
    assert new_i.ts_local == ic.ts_local and new_i.mode == ic.mode
    gone_i, gone_r = ie[1], re[1]
    assert isinstance(gone_i, ChildSaDeleted) and gone_i.spi_in == ic.spi_in
    assert isinstance(gone_r, ChildSaDeleted) and gone_r.spi_in == rc.spi_in
    assert pairs(ini) == {(new_i.spi_in, new_i.spi_out)} and pairs(ini) == mirrored(res)


def test_child_rekey_by_responder_keeps_transport_mode() -> None:
    ini_cfg, res_cfg = configs(transport_mode=True)
    ini, res, _ic, rc = establish(ini_cfg, res_cfg)
    res.rekey_child(rc.spi_in, 5.0)
    shuttle(ini, res, 5.0)
    ie, re = events(ini), events(res)
    assert isinstance(re[0], ChildSaRekeyed) and isinstance(ie[0], ChildSaRekeyed)
    assert ie[0].mode == re[0].mode == "transport"
    assert_mirror(ie[0], re[0])


@pytest.mark.parametrize("seed", range(8))
def test_simultaneous_child_rekey_leaves_one_sa(seed: int) -> None:
    """RFC 7296 §2.8.1: both rekey at once; the SA made with the lowest nonce is deleted."""
    ini, res, ic, rc = establish(*configs(), seed=seed)
    ini.rekey_child(ic.spi_in, 5.0)
    res.rekey_child(rc.spi_in, 5.0)
    shuttle(ini, res, 5.0, crossed=True)  # both requests cross on the wire
    ie, re = events(ini), events(res)
    for evs in (ie, re):
        rekeyed = [e for e in evs if isinstance(e, ChildSaRekeyed)]
        assert len(rekeyed) == 1  # exactly one replacement announced
        installed = {e.spi_in for e in evs if isinstance(e, ChildSaEstablished)}
        deleted = {e.spi_in for e in evs if isinstance(e, ChildSaDeleted)}
        assert len(installed) == 2 and len(deleted) == 2  # old + redundant removed
    assert pairs(ini) == mirrored(res) and len(pairs(ini)) == 1
    (survivor,) = ini.child_sas()
    assert survivor.state == "installed"
    r_new = next(e for e in ie if isinstance(e, ChildSaRekeyed))
    assert r_new.spi_in == survivor.spi_in


def test_simultaneous_child_rekey_both_outcomes_occur() -> None:
    """Across seeds, sometimes our exchange's SA survives and sometimes the peer's.

    The winner is announced as ChildSaRekeyed; the loser as a plain
    ChildSaEstablished that is deleted again. Our own exchange ends first here,
    so its SA is the first announced.
    """
    outcomes = set()
    for seed in range(8):
        ini, res, ic, rc = establish(*configs(), seed=seed)
        ini.rekey_child(ic.spi_in, 5.0)
        res.rekey_child(rc.spi_in, 5.0)
        shuttle(ini, res, 5.0, crossed=True)  # both requests cross on the wire
        first = next(e for e in events(ini) if isinstance(e, ChildSaEstablished))
        (survivor,) = ini.child_sas()
        ours_won = isinstance(first, ChildSaRekeyed)
        assert (first.spi_in == survivor.spi_in) == ours_won
        outcomes.add(ours_won)
    assert outcomes == {True, False}


def test_peer_deletes_child_while_we_rekey_it() -> None:
    """§2.25.1: the Delete is answered; our late rekey result is deleted, not installed."""
    ini, res, ic, rc = establish(*configs())
    ini.rekey_child(ic.spi_in, 5.0)
    (rekey_req,) = ini.datagrams_to_send()
    res.delete_child(rc.spi_in, 5.0)
    (del_req,) = res.datagrams_to_send()
    ini.receive_datagram(del_req, 5.0, R_ADDR)  # ini: answer, child gone
    res.receive_datagram(rekey_req, 5.0, I_ADDR)  # res: still deleting it -> TEMPORARY_FAILURE
    shuttle(ini, res, 5.0)
    ie, re = events(ini), events(res)
    assert [type(e) for e in ie] == [ChildSaDeleted]
    assert [type(e) for e in re] == [ChildSaDeleted]
    t = run_until(ini, res, 5.0, 60.0)
    assert t < 60.0
    assert ini.child_sas() == [] and res.child_sas() == []
    assert not [e for e in events(ini) if isinstance(e, ChildSaEstablished)]


# --------------------------------------------------------------------------- IKE SA rekey


@pytest.mark.parametrize("who", ["initiator", "responder"])
def test_ike_rekey_moves_children(who: str) -> None:
    ini, res, ic, _rc = establish(*configs())
    old = (ini.spi_i, ini.spi_r)
    old_keys = ini.negotiated_keys()
    rekeyer = ini if who == "initiator" else res
    rekeyer.rekey(7.0)
    shuttle(ini, res, 7.0)
    ie, re = events(ini), events(res)
    assert [type(e) for e in ie] == [IkeSaRekeyed] and [type(e) for e in re] == [IkeSaRekeyed]
    a, b = ie[0], re[0]
    assert isinstance(a, IkeSaRekeyed) and isinstance(b, IkeSaRekeyed)
    assert (a.old_spi_i, a.old_spi_r) == old == (b.old_spi_i, b.old_spi_r)
    assert (
        (a.spi_i, a.spi_r) == (b.spi_i, b.spi_r) == (ini.spi_i, ini.spi_r) == (res.spi_i, res.spi_r)
    )
    assert (a.spi_i, a.spi_r) != old
    assert rekeyer.is_initiator and not (res if rekeyer is ini else ini).is_initiator
    assert a.is_initiator == ini.is_initiator
    ki, kr = ini.negotiated_keys(), res.negotiated_keys()
    assert ki is not None and kr is not None and old_keys is not None
    assert ki.keys == kr.keys and ki.keys.sk_d != old_keys.keys.sk_d
    assert ini.spis() == [(ini.spi_i, ini.spi_r)] == res.spis()  # old SA deleted
    assert pairs(ini) == {(ic.spi_in, ic.spi_out)} == mirrored(res)
    # the new IKE SA works: both directions, and a new Child SA derives from its SK_d
    ini.send_liveness_check(8.0)
    shuttle(ini, res, 8.0)
    res.send_liveness_check(9.0)
    shuttle(ini, res, 9.0)
    assert ini.get_timer() is None and res.get_timer() is None
    res.create_child(res.config.local_ts, res.config.remote_ts, False, 10.0)
    shuttle(ini, res, 10.0)
    (ci,), (cr,) = events(ini), events(res)
    assert isinstance(ci, ChildSaEstablished) and isinstance(cr, ChildSaEstablished)
    assert_mirror(ci, cr)
    assert (ci.ike_spi_i, ci.ike_spi_r) == (ini.spi_i, ini.spi_r)


@pytest.mark.parametrize("seed", range(6))
def test_simultaneous_ike_rekey(seed: int) -> None:
    """§2.8.2: both rekey the IKE SA at once; both end on the same new SA, one only."""
    ini, res, ic, _ = establish(*configs(), seed=seed)
    old = (ini.spi_i, ini.spi_r)
    ini.rekey(7.0)
    res.rekey(7.0)
    shuttle(ini, res, 7.0, crossed=True)  # both requests cross on the wire
    ie, re = events(ini), events(res)
    assert [type(e) for e in ie] == [IkeSaRekeyed] == [type(e) for e in re]
    assert (ini.spi_i, ini.spi_r) == (res.spi_i, res.spi_r) != old
    assert ini.is_initiator != res.is_initiator
    assert len(ini.spis()) == len(res.spis()) == 1  # old and redundant SAs deleted
    ki, kr = ini.negotiated_keys(), res.negotiated_keys()
    assert ki is not None and kr is not None and ki.keys == kr.keys
    assert pairs(ini) == {(ic.spi_in, ic.spi_out)} == mirrored(res)
    ini.send_liveness_check(8.0)
    shuttle(ini, res, 8.0)
    assert ini.get_timer() is None and ini.state == res.state == "established"


def test_temporary_failure_while_ike_rekey_in_progress() -> None:
    """§2.25: a CREATE_CHILD_SA during our IKE rekey gets TEMPORARY_FAILURE; the
    peer retries after a random delay within config.retry_delay, on the new SA."""
    ini_cfg, res_cfg = configs(retry_delay=(2.0, 3.0))
    ini, res, _, _ = establish(ini_cfg, res_cfg)
    ini.rekey(7.0)
    (rekey_req,) = ini.datagrams_to_send()  # held back: the IKE rekey is in flight
    rid = res.create_child(res_cfg.local_ts, res_cfg.remote_ts, False, 7.0)
    (create_req,) = res.datagrams_to_send()
    ini.receive_datagram(create_req, 7.0, R_ADDR)
    (refusal,) = ini.datagrams_to_send()
    res.receive_datagram(refusal, 7.0, I_ADDR)
    assert events(res) == []  # not a failure: a retry is scheduled
    retry_at = res.get_timer()
    assert retry_at is not None and 9.0 <= retry_at <= 10.0
    res.receive_datagram(rekey_req, 7.1, I_ADDR)
    shuttle(ini, res, 7.1)
    assert [type(e) for e in events(ini)] == [IkeSaRekeyed]
    assert [type(e) for e in events(res)] == [IkeSaRekeyed]
    res.handle_timer(retry_at - 0.01)
    assert res.datagrams_to_send() == []
    run_until(ini, res, retry_at, retry_at + 1)
    (ev,) = events(res)
    assert isinstance(ev, ChildSaEstablished) and ev.request_id == rid
    assert (ev.ike_spi_i, ev.ike_spi_r) == (res.spi_i, res.spi_r)
    (peer_ev,) = events(ini)
    assert isinstance(peer_ev, ChildSaEstablished)
    assert_mirror(ev, peer_ev)


def test_rekey_of_unknown_child_answers_child_sa_not_found() -> None:
    ini, res, ic, _rc = establish(*configs())
    # the responder forgets the Child SA (as after a restart of its datapath state)
    res._children.clear()
    ini.rekey_child(ic.spi_in, 5.0)
    shuttle(ini, res, 5.0)
    ie, re = events(ini), events(res)
    # §2.25: silently delete it and create a new Child SA from scratch
    assert [type(e) for e in ie] == [ChildSaDeleted, ChildSaEstablished]
    assert [type(e) for e in re] == [ChildSaEstablished]
    assert isinstance(ie[1], ChildSaEstablished) and isinstance(re[0], ChildSaEstablished)
    assert_mirror(ie[1], re[0])


# --------------------------------------------------------------------------- lifetimes


def test_lifetimes_with_jitter_rekey_children_and_ike_sa() -> None:
    """Rekeys happen inside [L(1-margin-jitter), L(1-margin)], driven by timers only."""
    ini_cfg, res_cfg = configs(
        child_lifetime=100.0, ike_lifetime=400.0, rekey_margin=0.1, rekey_jitter=0.2
    )
    ini, res, ic, _ = establish(ini_cfg, res_cfg, seed=3)
    (info,) = ini.child_sas()
    assert info.rekey_at is not None and 70.0 <= info.rekey_at <= 90.0
    assert info.expire_at == pytest.approx(100.0)
    assert ini.ike_rekey_at is not None and 280.0 <= ini.ike_rekey_at <= 360.0
    t, seen_i, seen_r = 0.0, [], []
    while t < 1000.0:
        t = run_until(ini, res, t, t + 50.0) + 0.0
        seen_i += events(ini)
        seen_r += events(res)
        t += 50.0
        assert len(pairs(ini)) <= 2
    child_rekeys = [e for e in seen_i if isinstance(e, ChildSaRekeyed)]
    ike_rekeys = [e for e in seen_i if isinstance(e, IkeSaRekeyed)]
    assert len(child_rekeys) >= 9 and len(ike_rekeys) >= 2
    assert not [e for e in seen_i + seen_r if isinstance(e, IkeSaFailed | ChildSaFailed)]
    assert len(pairs(ini)) == 1 and pairs(ini) == mirrored(res)
    assert ini.state == res.state == "established"
    # every SA ever installed was removed again, except the live one
    installed = {e.spi_in for e in seen_i if isinstance(e, ChildSaEstablished)} | {ic.spi_in}
    deleted = {e.spi_in for e in seen_i if isinstance(e, ChildSaDeleted)}
    assert installed - deleted == {c.spi_in for c in ini.child_sas()}


def test_child_expires_when_rekey_impossible() -> None:
    ini_cfg, res_cfg = configs(child_lifetime=100.0)
    ini, res, ic, _ = establish(ini_cfg, replace(res_cfg, child_lifetime=None))
    ini._children[ic.spi_in].rekey_at = None  # rekeying never starts
    run_until(ini, res, 0.0, 150.0)
    (ev,) = events(ini)
    assert isinstance(ev, ChildSaDeleted) and ev.reason == "lifetime expired"
    assert ini.child_sas() == [] == res.child_sas()


def test_bad_lifetime_config_names_the_option() -> None:
    with pytest.raises(ValueError, match="child_lifetime"):
        configs(child_lifetime=-1.0)
    with pytest.raises(ValueError, match="fragment_size"):
        configs(fragment_size=100)
    with pytest.raises(ValueError, match="internal_addresses"):
        configs(internal_addresses=("nope",))
