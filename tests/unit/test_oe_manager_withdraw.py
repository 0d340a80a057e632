"""The OE manager moves Child SAs off a withdrawn ESP transform (sans-IO: actions out).

Why: on the kernel datapath a live Child SA stays bound to the driver it was created on.
When that driver fails (the canary's KAT, the ESP self-test), the daemon's ESP offer drops
the transform, and every Child SA using it must be rekeyed onto what is still offered, or
taken down and negotiated again when the peer takes none of it.
"""

from __future__ import annotations

import ipaddress
from dataclasses import replace

from oe_router.datapath.base import (
    Acquire,
    ChildSaSpec,
    IPAddress,
    PolicyAction,
    SaKeys,
    TrafficSelector,
    encr_algorithm,
    integ_algorithm,
)
from oe_router.oe.actions import (
    Action,
    InstallChild,
    InstallPolicy,
    MoveChild,
    Negotiate,
    NegotiationResult,
    RemoveChild,
    SendDelete,
)
from oe_router.oe.manager import OeManager

WAN = ipaddress.IPv4Address("198.51.100.1")
P1 = ipaddress.IPv4Address("192.0.2.7")
P2 = ipaddress.IPv4Address("192.0.2.8")
PRIV = ipaddress.IPv4Address("203.0.113.5")
RESP = ipaddress.IPv4Address("192.0.2.70")  # clear-or-private: we only respond
TRAP_REQID = 0x4F45FFFF
GCM = encr_algorithm(20)  # AES_GCM_16
CBC = encr_algorithm(12)  # AES_CBC


def _host(a: IPAddress) -> TrafficSelector:
    return TrafficSelector(ipaddress.ip_network(a))


def _spec(peer: IPAddress, spi: int, gcm: bool = True) -> ChildSaSpec:
    if gcm:
        keys_in, keys_out, encr, integ = (
            SaKeys(spi, bytes(36)),
            SaKeys(spi + 1, bytes(36)),
            GCM,
            None,
        )
    else:
        keys_in = SaKeys(spi, bytes(32), bytes(32))
        keys_out = SaKeys(spi + 1, bytes(32), bytes(32))
        encr, integ = CBC, integ_algorithm(12)
    return ChildSaSpec(
        WAN, peer, keys_in, keys_out, encr, integ, local_ts=(_host(WAN),), remote_ts=(_host(peer),)
    )


def only(actions: list[Action], kind: type) -> list:  # type: ignore[type-arg]
    return [a for a in actions if isinstance(a, kind)]


def _up(mgr: OeManager, peer: IPAddress, spi: int, now: float, gcm: bool = True) -> ChildSaSpec:
    """A Child SA we initiated (the packet trigger's path: ACQUIRE -> negotiate)."""
    acq = Acquire(WAN, peer, _host(WAN), _host(peer), TRAP_REQID, 1, 0, 0)
    (neg,) = only(mgr.acquire(acq, now), Negotiate)
    (inst,) = mgr.negotiated(neg.ticket, NegotiationResult(_spec(peer, spi, gcm)), now)
    assert isinstance(inst, InstallChild)
    installed = replace(inst.spec, reqid=0x4F450000 + spi)
    mgr.installed(inst.ticket, installed, None, now)
    return installed


def gcm_withdrawn(spec: ChildSaSpec) -> str | None:
    return "aes256gcm16 was withdrawn: its ESP self-test failed" if spec.encr is GCM else None


def test_only_child_sas_on_a_withdrawn_transform_move_once(mgr: OeManager) -> None:
    a = _up(mgr, P1, 0x100, 0.0)
    _up(mgr, P2, 0x200, 0.0, gcm=False)
    acts = mgr.withdraw(gcm_withdrawn, 1.0)
    (move,) = acts
    assert isinstance(move, MoveChild)
    assert (move.peer, move.spec, move.reason) == (P1, a, gcm_withdrawn(a))
    assert mgr.withdraw(gcm_withdrawn, 1.5) == []  # one move per Child SA at a time
    states = {t.peer: t.state for t in mgr.tunnels(2.0)}
    assert states == {str(P1): "rekeying", str(P2): "established"}


def test_a_successful_move_is_finished_by_the_rekeyed_sa(mgr: OeManager) -> None:
    old = _up(mgr, P1, 0x100, 0.0)
    (move,) = mgr.withdraw(gcm_withdrawn, 1.0)
    assert mgr.moved(move.child_id, None, 1.2) == []  # the IKE rekey is on its way
    # the rekeyed Child SA arrives as every IKE rekey does, and supersedes the old one
    new = _spec(P1, 0x300, gcm=False)
    (inst,) = mgr.adopt_inbound(P1, new, 1.3)
    assert isinstance(inst, InstallChild)
    acts = mgr.installed(inst.ticket, replace(inst.spec, reqid=0x4F450300), None, 1.3)
    assert only(acts, RemoveChild) == [RemoveChild(old, remove_policies=False)]
    assert [s.child for s in only(acts, SendDelete)] == [old]
    (row,) = mgr.tunnels(2.0)
    assert (row.state, row.transform) == ("established", "AES_CBC")
    assert mgr.withdraw(gcm_withdrawn, 2.0) == []  # nothing left on the broken transform
    assert mgr.moved(move.child_id, None, 2.1) == []  # a late outcome for a gone SA


def test_a_refused_move_makes_a_new_child_sa_before_the_old_goes(mgr: OeManager) -> None:
    old = _up(mgr, P1, 0x100, 0.0)
    (move,) = mgr.withdraw(gcm_withdrawn, 1.0)
    acts = mgr.moved(move.child_id, "the peer took none of the current offer", 1.5)
    assert only(acts, RemoveChild) == [] and only(acts, SendDelete) == []  # still carrying
    (neg,) = only(acts, Negotiate)
    assert neg.request.peer == P1
    assert [t.state for t in mgr.tunnels(1.6)] == ["rekeying", "negotiating"]
    assert mgr.withdraw(gcm_withdrawn, 1.7) == []  # being replaced: no second move
    new = _spec(P1, 0x300, gcm=False)
    (inst,) = mgr.negotiated(neg.ticket, NegotiationResult(new), 2.0)
    assert isinstance(inst, InstallChild)
    out = mgr.installed(inst.ticket, replace(inst.spec, reqid=0x4F450300), None, 2.0)
    # the new SA's policies replaced the old one's: the old SAs go without theirs
    assert only(out, RemoveChild) == [RemoveChild(old, remove_policies=False)]
    assert [s.child for s in only(out, SendDelete)] == [old]
    (row,) = mgr.tunnels(3.0)
    assert (row.state, row.transform) == ("established", "AES_CBC")


def _not_traps(actions: list[Action]) -> list[PolicyAction]:
    return [
        a.policy.action
        for a in only(actions, InstallPolicy)
        if a.policy.action is not PolicyAction.TRAP
    ]


def test_a_refused_move_that_cannot_be_replaced_falls_back_per_group(mgr: OeManager) -> None:
    old = _up(mgr, P1, 0x100, 0.0)
    (move,) = mgr.withdraw(gcm_withdrawn, 1.0)
    acts = mgr.moved(move.child_id, "the peer took none of the current offer", 1.5)
    (neg,) = only(acts, Negotiate)
    out = mgr.negotiated(neg.ticket, NegotiationResult(None, "NO_PROPOSAL_CHOSEN"), 2.0)
    # the broken driver's SA goes, with its policies, and the group decides
    assert only(out, RemoveChild) == [RemoveChild(old)]
    assert [s.child for s in only(out, SendDelete)] == [old]
    assert _not_traps(out) == [PolicyAction.PASS]
    (s,) = mgr.shunts(2.0)
    assert "aes256gcm16 was withdrawn" in s.reason
    assert "the rekey failed: the peer took none of the current offer" in s.reason
    assert "NO_PROPOSAL_CHOSEN" in s.reason
    assert mgr.tunnels(2.0) == ()


def test_a_private_peer_whose_move_fails_gets_a_drop_shunt_never_clear(mgr: OeManager) -> None:
    _up(mgr, PRIV, 0x100, 0.0)
    (move,) = mgr.withdraw(gcm_withdrawn, 1.0)
    (neg,) = only(mgr.moved(move.child_id, "no rekey within 30s", 31.0), Negotiate)
    out = mgr.negotiated(neg.ticket, NegotiationResult(None, "no answer"), 40.0)
    assert _not_traps(out) == [PolicyAction.DROP]


def test_a_responder_only_child_whose_move_fails_just_goes(mgr: OeManager) -> None:
    (inst,) = mgr.adopt_inbound(RESP, _spec(RESP, 0x500), 0.0)
    assert isinstance(inst, InstallChild)
    spec = replace(inst.spec, reqid=0x4F450500)
    mgr.installed(inst.ticket, spec, None, 0.0)
    (move,) = mgr.withdraw(gcm_withdrawn, 1.0)
    acts = mgr.moved(move.child_id, "cannot rekey it", 1.1)
    assert only(acts, RemoveChild) == [RemoveChild(spec)]
    assert only(acts, Negotiate) == []  # clear-or-private never initiates
    assert mgr.tunnels(2.0) == ()


def test_a_transform_offered_again_is_left_alone(mgr: OeManager) -> None:
    _up(mgr, P1, 0x100, 0.0)
    (move,) = mgr.withdraw(gcm_withdrawn, 1.0)
    mgr.moved(move.child_id, None, 1.1)
    assert mgr.withdraw(lambda spec: None, 2.0) == []
    assert [t.state for t in mgr.tunnels(2.0)] == ["established"]
