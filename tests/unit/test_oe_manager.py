"""The OE manager core: events in, actions out, time as a value (no kernel, no IKE)."""

from __future__ import annotations

import ipaddress
from dataclasses import replace

import dns.name
import pytest

from oe_router.config.schema import PolicyConfig, parse_policy_entry
from oe_router.datapath.base import (
    Acquire,
    ChildSaCounters,
    ChildSaSpec,
    DatapathError,
    Direction,
    Expire,
    IPAddress,
    PolicyAction,
    PolicyExpire,
    SaCounters,
    SaKeys,
    TrafficSelector,
    encr_algorithm,
)
from oe_router.dns.ipseckey import KeyKind, PeerKey
from oe_router.oe.actions import (
    Action,
    CheckTraffic,
    InstallChild,
    InstallPolicy,
    Negotiate,
    NegotiationResult,
    Rekey,
    RemoveChild,
    RemovePolicy,
    SendDelete,
    TunnelResult,
)
from oe_router.oe.manager import OeManager
from oe_router.oe.policy import PolicyTable, selector_rank

WAN = ipaddress.IPv4Address("198.51.100.1")
P1 = ipaddress.IPv4Address("192.0.2.7")
P2 = ipaddress.IPv4Address("192.0.2.8")
PRIV = ipaddress.IPv4Address("203.0.113.5")
BLOCKED = ipaddress.IPv4Address("198.18.0.1")
TRAP_REQID = 0x4F45FFFF


def _host(a: IPAddress) -> TrafficSelector:
    return TrafficSelector(ipaddress.ip_network(a))


def _acq(dst: IPAddress, proto: int = 17, port: int | None = 5353) -> Acquire:
    return Acquire(
        WAN, dst, _host(WAN), TrafficSelector(ipaddress.ip_network(dst), proto, port),
        TRAP_REQID, 1, 0, 0,
    )  # fmt: skip


def _spec(peer: IPAddress, spi: int = 0x1000, **kw: object) -> ChildSaSpec:
    base = ChildSaSpec(
        WAN, peer, SaKeys(spi, bytes(36)), SaKeys(spi + 1, bytes(36)), encr_algorithm(20),
        local_ts=(_host(WAN),), remote_ts=(_host(peer),),
    )  # fmt: skip
    return replace(base, **kw)  # type: ignore[arg-type]


def only(actions: list[Action], kind: type) -> list:  # type: ignore[type-arg]
    return [a for a in actions if isinstance(a, kind)]


def _negotiate_ok(mgr: OeManager, acts: list[Action], peer: IPAddress, spi: int, now: float):  # type: ignore[no-untyped-def]
    (neg,) = only(acts, Negotiate)
    out = mgr.negotiated(neg.ticket, NegotiationResult(_spec(peer, spi)), now)
    (inst,) = only(out, InstallChild)
    installed = replace(inst.spec, reqid=0x4F450001)
    return neg, inst, mgr.installed(inst.ticket, installed, None, now), installed


def test_start_installs_the_group_policies(mgr: OeManager) -> None:
    acts = mgr.start()
    assert all(isinstance(a, InstallPolicy) for a in acts)
    traps = [a.policy for a in acts if a.policy.action is PolicyAction.TRAP]  # type: ignore[union-attr]
    assert {str(p.dst.net) for p in traps} == {"0.0.0.0/0", "203.0.113.0/24"}


def test_acquire_negotiates_null_auth_host_to_host_and_installs(mgr: OeManager) -> None:
    acts = mgr.acquire(_acq(P1), 0.0)
    (neg,) = only(acts, Negotiate)
    req = neg.request
    assert (req.peer, req.local, req.auth.null) == (P1, WAN, True)
    assert req.remote_ts == _host(P1) and req.local_ts == _host(WAN)
    out = mgr.negotiated(neg.ticket, NegotiationResult(_spec(P1)), 1.0)
    (inst,) = out
    assert isinstance(inst, InstallChild)
    assert inst.spec.policy_priority == selector_rank(_host(P1).net, 0, None)
    assert mgr.installed(inst.ticket, replace(inst.spec, reqid=5), None, 1.0) == []
    (t,) = mgr.tunnels(2.0)
    assert (t.peer, t.state, t.policy, t.transform) == (
        "192.0.2.7", "established", "private-or-clear", "AES_GCM_16"
    )  # fmt: skip
    assert mgr.acquire(_acq(P1), 3.0) == []  # the SA exists: a late ACQUIRE is ignored


def test_acquires_for_one_peer_coalesce_into_one_negotiation(mgr: OeManager) -> None:
    first = mgr.acquire(_acq(P1), 0.0)
    assert len(only(first, Negotiate)) == 1
    for port in (5353, 80, 443):
        assert mgr.acquire(_acq(P1, 6, port), 0.1) == []
    other = mgr.acquire(_acq(P2), 0.2)  # a different peer negotiates in parallel
    assert len(only(other, Negotiate)) == 1
    assert [t.state for t in mgr.tunnels(0.3)] == ["negotiating", "negotiating"]


def test_private_or_clear_failure_installs_a_pass_shunt_that_expires(mgr: OeManager) -> None:
    (neg,) = only(mgr.acquire(_acq(P1), 0.0), Negotiate)
    acts = mgr.negotiated(neg.ticket, NegotiationResult(None, "no response from 192.0.2.7"), 5.0)
    (inst,) = acts
    assert isinstance(inst, InstallPolicy)
    shunt = inst.policy
    assert (shunt.action, shunt.direction, shunt.persistent) == (
        PolicyAction.PASS, Direction.OUT, False
    )  # fmt: skip
    assert shunt.dst == _host(P1) and shunt.src.net == _host(WAN).net
    assert shunt.lifetime.hard_seconds == 900
    # it beats the 0.0.0.0/0 trap in the kernel
    assert shunt.priority < selector_rank(ipaddress.ip_network("0.0.0.0/0"), None, None)
    (s,) = mgr.shunts(5.0)
    assert (s.destination, s.kind, s.expires_s) == ("192.0.2.7/32", "pass", 900.0)
    assert "no response" in s.reason
    assert mgr.next_deadline() == 905.0
    assert mgr.tick(904.9) == []
    assert mgr.tick(905.0) == [RemovePolicy(shunt)]
    assert mgr.shunts(905.0) == ()
    # the next packet negotiates again
    assert len(only(mgr.acquire(_acq(P1), 906.0), Negotiate)) == 1


def test_kernel_policy_expiry_forgets_the_shunt(mgr: OeManager) -> None:
    (neg,) = only(mgr.acquire(_acq(P1), 0.0), Negotiate)
    (inst,) = mgr.negotiated(neg.ticket, NegotiationResult(None, "timeout"), 1.0)
    p = inst.policy  # type: ignore[union-attr]
    soft = PolicyExpire(p.src, p.dst, Direction.OUT, 0, hard=False)
    assert mgr.policy_expired(soft, 400.0) == [] and len(mgr.shunts(400.0)) == 1
    assert mgr.policy_expired(PolicyExpire(p.src, p.dst, Direction.OUT, 0, True), 901.0) == []
    assert mgr.shunts(901.0) == () and mgr.tick(2000.0) == []


def test_private_failure_installs_a_persistent_drop_shunt(mgr: OeManager) -> None:
    (neg,) = only(mgr.acquire(_acq(PRIV), 0.0), Negotiate)
    (inst,) = mgr.negotiated(neg.ticket, NegotiationResult(None, "AUTHENTICATION_FAILED"), 1.0)
    p = inst.policy  # type: ignore[union-attr]
    assert (p.action, p.persistent, str(p.dst.net)) == (PolicyAction.DROP, True, "203.0.113.5/32")


def test_drop_shunts_back_off_and_start_again_after_a_tunnel(mgr: OeManager) -> None:
    """A private peer's drop shunt lasts 5 s, then 10 s, 20 s... (capped at the shunt
    lifetime): a peer that was only restarting is retried within seconds."""
    lifetimes = []
    now = 0.0
    for _ in range(9):
        (neg,) = only(mgr.acquire(_acq(PRIV), now), Negotiate)
        (inst,) = mgr.negotiated(neg.ticket, NegotiationResult(None, "timeout"), now + 1)
        lifetime = inst.policy.lifetime.hard_seconds  # type: ignore[union-attr]
        lifetimes.append(lifetime)
        now += 1 + lifetime
        assert mgr.tick(now) == [RemovePolicy(inst.policy)]  # type: ignore[union-attr]
    assert lifetimes == [5, 10, 20, 40, 80, 160, 320, 640, 900]
    acts = mgr.acquire(_acq(PRIV), now)
    _negotiate_ok(mgr, acts, PRIV, 0x2000, now + 1)
    mgr.peer_deleted(PRIV, None, now + 2)
    (neg,) = only(mgr.acquire(_acq(PRIV), now + 3), Negotiate)
    (inst,) = mgr.negotiated(neg.ticket, NegotiationResult(None, "timeout"), now + 4)
    assert inst.policy.lifetime.hard_seconds == 5  # type: ignore[union-attr]


def test_block_and_clear_or_private_never_negotiate(mgr: OeManager) -> None:
    assert mgr.acquire(_acq(BLOCKED), 0.0) == []
    assert mgr.acquire(_acq(ipaddress.IPv4Address("192.0.2.70")), 0.0) == []
    assert mgr.acquire(_acq(ipaddress.IPv4Address("192.0.2.9")), 0.0) == []
    assert mgr.tunnels(0.0) == ()


def test_a_queued_flow_rides_the_same_peer_after_the_first(mgr: OeManager) -> None:
    table = PolicyTable.from_config(
        PolicyConfig(
            private_or_clear=(parse_policy_entry("0.0.0.0/0"),),
            private=(parse_policy_entry("192.0.2.0/24 tcp 443"),),
            clear=(),
        ),
        link_exclusions=(),
    )
    m = OeManager(table, {4: WAN}, trap_reqid=TRAP_REQID)
    (n1,) = only(m.acquire(_acq(P1, 17, 53), 0.0), Negotiate)
    assert m.acquire(_acq(P1, 6, 443), 0.0) == []  # queued: one negotiation per peer
    out = m.negotiated(n1.ticket, NegotiationResult(_spec(P1)), 1.0)
    (inst,) = only(out, InstallChild)
    nxt = m.installed(inst.ticket, inst.spec, None, 1.0)
    (n2,) = only(nxt, Negotiate)
    assert n2.request.remote_ts == TrafficSelector(ipaddress.ip_network(P1), 6, 443)
    assert n2.request.local_ts.proto == 6


def test_containment_refuses_selectors_beyond_the_peer(
    mgr: OeManager, caplog: pytest.LogCaptureFixture
) -> None:
    (neg,) = only(mgr.acquire(_acq(P1), 0.0), Negotiate)
    wide = _spec(P1, remote_ts=(TrafficSelector(ipaddress.ip_network("192.0.2.0/24")),))
    acts = mgr.negotiated(neg.ticket, NegotiationResult(wide), 1.0)
    assert acts[0] == SendDelete(P1, wide)
    assert not only(acts, InstallChild)
    (shunt,) = only(acts, InstallPolicy)
    assert shunt.policy.action is PolicyAction.PASS  # fell back per group
    assert "peer 192.0.2.7: refused selector 192.0.2.0/24" in caplog.text
    other = _spec(P1, remote=P2, remote_ts=(_host(P2),))
    assert mgr.containment_error(P1, other) == (
        "peer 192.0.2.7: Child SA goes to 192.0.2.8, not to the peer itself"
    )
    inner = _spec(P1, local_ts=(TrafficSelector(ipaddress.ip_network("192.168.1.0/24")),))
    assert "only 198.51.100.1 may be protected" in (mgr.containment_error(P1, inner) or "")


def test_inbound_child_is_authorized_per_group(mgr: OeManager) -> None:
    cop = ipaddress.IPv4Address("192.0.2.70")
    assert mgr.authorize_inbound(cop, _spec(cop)) is None  # clear-or-private responds
    assert mgr.authorize_inbound(P1, _spec(P1)) is None
    assert "block" in (mgr.authorize_inbound(BLOCKED, _spec(BLOCKED)) or "")
    clear = ipaddress.IPv4Address("192.0.2.9")
    assert "group clear" in (mgr.authorize_inbound(clear, _spec(clear)) or "")
    (inst,) = mgr.adopt_inbound(cop, _spec(cop), 0.0)
    assert isinstance(inst, InstallChild)
    mgr.installed(inst.ticket, inst.spec, None, 0.0)
    assert [t.policy for t in mgr.tunnels(1.0)] == ["clear-or-private"]


def test_ike_from_a_peer_whose_group_takes_no_ipsec_is_refused_up_front(mgr: OeManager) -> None:
    """The IKE responder asks before IKE_SA_INIT, so a clear/block peer falls back at once."""
    assert mgr.refuses_peer(ipaddress.IPv4Address("192.0.2.70")) is None  # clear-or-private
    assert mgr.refuses_peer(P1) is None
    assert "group clear" in (mgr.refuses_peer(ipaddress.IPv4Address("192.0.2.9")) or "")
    assert "block" in (mgr.refuses_peer(BLOCKED) or "")


def test_hard_expire_removes_the_child_and_tells_the_peer(mgr: OeManager) -> None:
    _, _, _, spec = _negotiate_ok(mgr, mgr.acquire(_acq(P1), 0.0), P1, 0x1000, 0.0)
    acts = mgr.expired(Expire(P1, WAN, 0x1000, spec.reqid, hard=True), 3600.0)
    assert acts == [RemoveChild(spec), SendDelete(P1, spec)]
    assert mgr.tunnels(3600.0) == ()
    assert len(only(mgr.acquire(_acq(P1), 3601.0), Negotiate)) == 1


def test_soft_expire_rekeys_a_busy_sa_and_lets_an_idle_one_go(mgr: OeManager) -> None:
    _, _, _, spec = _negotiate_ok(mgr, mgr.acquire(_acq(P1), 0.0), P1, 0x1000, 0.0)
    (chk,) = mgr.expired(Expire(WAN, P1, 0x1001, spec.reqid, hard=False), 3000.0)
    assert isinstance(chk, CheckTraffic) and chk.soft_expired
    (rk,) = mgr.traffic(chk.child_id, 123456, 3000.0, soft=True)
    assert isinstance(rk, Rekey) and rk.child == spec
    assert mgr.expired(Expire(WAN, P1, 0x1001, spec.reqid, False), 3001.0) == []  # rekeying
    new = _spec(P1, 0x2000)
    (inst,) = mgr.negotiated(rk.ticket, NegotiationResult(new), 3001.0)
    assert isinstance(inst, InstallChild) and inst.spec.policy_priority == spec.policy_priority
    assert mgr.installed(inst.ticket, inst.spec, None, 3001.0) == [
        RemoveChild(spec, remove_policies=False)
    ]
    # the new SA goes quiet: a periodic check sees no change, then soft expiry drops it
    assert mgr.traffic(chk.child_id, 0, 3100.0, soft=False) == []  # counters of the new SA
    (chk2,) = mgr.expired(Expire(WAN, P1, 0x2001, 0, hard=False), 6600.0)
    acts = mgr.traffic(chk2.child_id, 0, 6600.0, soft=True)
    assert acts == [RemoveChild(inst.spec), SendDelete(P1, inst.spec)]


def test_peer_delete_removes_exactly_its_sas(mgr: OeManager) -> None:
    _, _, _, s1 = _negotiate_ok(mgr, mgr.acquire(_acq(P1), 0.0), P1, 0x1000, 0.0)
    _, _, _, s2 = _negotiate_ok(mgr, mgr.acquire(_acq(P2), 0.0), P2, 0x3000, 0.0)
    assert mgr.peer_deleted(P1, [0x9999], 1.0) == []
    acts = mgr.peer_deleted(P1, [s1.outbound.spi], 1.0)
    assert acts == [RemoveChild(s1)]
    assert [t.peer for t in mgr.tunnels(1.0)] == ["192.0.2.8"]
    assert mgr.peer_deleted(P2, None, 2.0) == [RemoveChild(s2)]


def test_liveness_failure_tears_down_and_falls_back_per_group(mgr: OeManager) -> None:
    """A dead peer's Child SAs go without a DELETE (the IKE engine already forgot the IKE
    SA); each flow is tried once more, and a failed try gets its group's shunt: pass for
    private-or-clear, drop for private, both naming the liveness failure."""
    _, _, _, s1 = _negotiate_ok(mgr, mgr.acquire(_acq(P1), 0.0), P1, 0x1000, 0.0)
    _, _, _, s3 = _negotiate_ok(mgr, mgr.acquire(_acq(PRIV), 0.0), PRIV, 0x5000, 0.0)
    a1 = mgr.liveness_failed(P1, 100.0)
    assert only(a1, SendDelete) == []  # no second deletion of the dead IKE SA
    assert a1[0] == RemoveChild(s1)
    (n1,) = only(a1, Negotiate)
    assert n1.request.peer == P1 and n1.request.remote_ts == _host(P1)
    a3 = mgr.liveness_failed(PRIV, 100.0)
    assert only(a3, SendDelete) == [] and a3[0] == RemoveChild(s3)
    (n3,) = only(a3, Negotiate)
    assert [t.state for t in mgr.tunnels(100.0)] == ["negotiating", "negotiating"]
    assert mgr.acquire(_acq(P1), 100.5) == []  # trapped packets join the retry
    (pass_,) = mgr.negotiated(n1.ticket, NegotiationResult(None, "no answer"), 103.0)
    (drop,) = mgr.negotiated(n3.ticket, NegotiationResult(None, "no answer"), 103.0)
    assert isinstance(pass_, InstallPolicy) and isinstance(drop, InstallPolicy)
    assert (pass_.policy.action, pass_.policy.dst) == (PolicyAction.PASS, _host(P1))
    assert (drop.policy.action, drop.policy.dst) == (PolicyAction.DROP, _host(PRIV))
    assert drop.policy.persistent and not pass_.policy.persistent
    shunts = {s.destination: s for s in mgr.shunts(103.0)}
    assert shunts["192.0.2.7/32"].kind == "pass" and shunts["203.0.113.5/32"].kind == "drop"
    assert all("stopped answering liveness" in s.reason for s in shunts.values())
    assert mgr.tunnels(103.0) == ()
    assert mgr.liveness_failed(P1, 104.0) == []  # nothing left of it: nothing to do


def test_liveness_failure_of_a_rebooted_peer_rebuilds_the_tunnel(mgr: OeManager) -> None:
    """The retry that follows a liveness failure succeeds when the peer is back: a new
    Child SA, no shunt."""
    _, _, _, s3 = _negotiate_ok(mgr, mgr.acquire(_acq(PRIV), 0.0), PRIV, 0x5000, 0.0)
    acts = mgr.liveness_failed(PRIV, 50.0)
    _, _, after, s4 = _negotiate_ok(mgr, acts, PRIV, 0x6000, 52.0)
    assert only(after, InstallPolicy) == [] and mgr.shunts(52.0) == ()
    (t,) = mgr.tunnels(53.0)
    assert (t.peer, t.state, t.policy) == ("203.0.113.5", "established", "private")
    assert mgr.children() == [s4] and s4 != s3


def test_liveness_failure_of_an_inbound_clear_or_private_peer_only_removes(
    mgr: OeManager,
) -> None:
    """clear-or-private only responds: its flow loses the SA and passes in the clear, and we
    do not start IKE towards it."""
    cop = ipaddress.IPv4Address("192.0.2.70")
    (inst,) = mgr.adopt_inbound(cop, _spec(cop, 0x7000), 0.0)
    assert isinstance(inst, InstallChild)
    mgr.installed(inst.ticket, inst.spec, None, 0.0)
    acts = mgr.liveness_failed(cop, 60.0)
    assert acts == [RemoveChild(inst.spec)]
    assert mgr.tunnels(60.0) == () and mgr.shunts(60.0) == ()


def test_removing_a_runtime_policy_that_replaced_a_trap_restores_the_trap() -> None:
    """A host entry's trap and the peer's SA policy are one kernel object (same selector)."""
    table = PolicyTable.from_config(
        PolicyConfig(private_or_clear=(parse_policy_entry("192.0.2.7/32"),), clear=()),
        link_exclusions=(),
    )
    m = OeManager(table, {4: WAN}, trap_reqid=TRAP_REQID)
    (trap,) = [a.policy for a in m.start()]  # type: ignore[union-attr]
    _, _, _, spec = _negotiate_ok(m, m.acquire(_acq(P1), 0.0), P1, 0x1000, 0.0)
    acts = m.peer_deleted(P1, None, 1.0)
    assert acts == [RemoveChild(spec), InstallPolicy(trap)]
    (neg,) = only(m.acquire(_acq(P1), 2.0), Negotiate)
    (shunt,) = m.negotiated(neg.ticket, NegotiationResult(None, "timeout"), 2.0)
    assert m.tick(902.0) == [RemovePolicy(shunt.policy), InstallPolicy(trap)]  # type: ignore[union-attr]


def _key() -> PeerKey:
    return PeerKey(KeyKind.NONE, None, 10, dns.name.from_text("www.example.org"), 0)


def test_ensure_tunnel_uses_the_dns_key_and_answers_when_all_addresses_are_up(
    mgr: OeManager,
) -> None:
    name = dns.name.from_text("www.example.org")
    acts = mgr.ensure_tunnel(7, name, (P1, P2), _key(), 0.0)
    negs = only(acts, Negotiate)
    assert {n.request.peer for n in negs} == {P1, P2}
    assert all(
        n.request.auth.key == _key().public_key and n.request.auth.name == name for n in negs
    )
    assert all(n.request.auth.null for n in negs)  # kind NONE: anonymous OE
    _, _, out1, _ = _negotiate_ok(mgr, [negs[0]], negs[0].request.peer, 0x1000, 0.5)
    assert only(out1, TunnelResult) == []
    _, _, out2, _ = _negotiate_ok(mgr, [negs[1]], negs[1].request.peer, 0x2000, 0.6)
    assert only(out2, TunnelResult) == [TunnelResult(7, True)]
    # already up: answered at once; a later ACQUIRE for P1 would use the key too
    assert mgr.ensure_tunnel(8, name, (P1,), _key(), 1.0) == [TunnelResult(8, True)]


def test_ensure_tunnel_fails_for_clear_block_and_failed_negotiations(mgr: OeManager) -> None:
    name = dns.name.from_text("x.example")
    assert mgr.ensure_tunnel(1, name, (BLOCKED,), _key(), 0.0) == [TunnelResult(1, False)]
    v6 = ipaddress.IPv6Address("2001:db8::1")
    assert mgr.ensure_tunnel(2, name, (v6,), _key(), 0.0) == [TunnelResult(2, False)]
    (neg,) = only(mgr.ensure_tunnel(3, name, (P1,), _key(), 0.0), Negotiate)
    out = mgr.negotiated(neg.ticket, NegotiationResult(None, "AUTH failed"), 1.0)
    assert only(out, TunnelResult) == [TunnelResult(3, False)]
    assert only(out, InstallPolicy)[0].policy.action is PolicyAction.PASS


def test_install_failure_deletes_the_negotiated_child_and_falls_back(mgr: OeManager) -> None:
    (neg,) = only(mgr.acquire(_acq(P1), 0.0), Negotiate)
    (inst,) = mgr.negotiated(neg.ticket, NegotiationResult(_spec(P1)), 1.0)
    acts = mgr.installed(inst.ticket, None, "kernel lacks ESP", 1.0)  # type: ignore[union-attr]
    assert acts[0] == SendDelete(P1, inst.spec)  # type: ignore[union-attr]
    assert only(acts, InstallPolicy)[0].policy.action is PolicyAction.PASS
    assert "kernel lacks ESP" in mgr.shunts(1.0)[0].reason


def test_a_second_child_for_the_same_flow_supersedes_the_first(mgr: OeManager) -> None:
    """The peer restarted and initiated again: the old SAs go, the policies stay."""
    _, _, _, old = _negotiate_ok(mgr, mgr.acquire(_acq(P1), 0.0), P1, 0x1000, 0.0)
    (inst,) = mgr.adopt_inbound(P1, _spec(P1, 0x7000), 10.0)
    acts = mgr.installed(inst.ticket, inst.spec, None, 10.0)  # type: ignore[union-attr]
    assert acts == [RemoveChild(old, remove_policies=False), SendDelete(P1, old)]
    (t,) = mgr.tunnels(11.0)
    assert t.established_s == 1.0
    # the old SA's hard expiry no longer touches anything
    assert mgr.expired(Expire(P1, WAN, 0x1000, 0, hard=True), 3600.0) == []


def test_ensure_tunnel_with_no_address_is_not_protected(mgr: OeManager) -> None:
    name = dns.name.from_text("empty.example")
    assert mgr.ensure_tunnel(1, name, (), _key(), 0.0) == [TunnelResult(1, False)]


def test_reload_swaps_group_policies_and_keeps_tunnels(mgr: OeManager) -> None:
    _, _, _, spec = _negotiate_ok(mgr, mgr.acquire(_acq(P1), 0.0), P1, 0x1000, 0.0)
    old = set(mgr.group_policies())
    new_table = PolicyTable.from_config(
        PolicyConfig(private_or_clear=(parse_policy_entry("0.0.0.0/0"),), clear=()),
        link_exclusions=(),
    )
    acts = mgr.replace_table(new_table)
    removed = {a.policy for a in only(acts, RemovePolicy)}
    installed = {a.policy for a in only(acts, InstallPolicy)}
    assert installed == set(mgr.group_policies())
    assert removed == old - installed  # the private trap, block/clear/c-o-p policies go
    assert {str(p.dst.net) for p in installed} == {"0.0.0.0/0"}
    assert [t.peer for t in mgr.tunnels(1.0)] == ["192.0.2.7"]
    assert mgr.table.group_of(PRIV).value == "private-or-clear"
    assert RemoveChild(spec) not in acts


def test_tunnel_rows_carry_the_child_sa_counters_read_at_status_time(mgr: OeManager) -> None:
    """``oe status`` reads each Child SA's counters when asked (no stale poll), and a Child
    SA the datapath no longer has shows 0 instead of failing the whole status."""
    _, _, _, s1 = _negotiate_ok(mgr, mgr.acquire(_acq(P1), 0.0), P1, 0x1000, 0.0)
    _, _, _, s2 = _negotiate_ok(mgr, mgr.acquire(_acq(P2), 0.0), P2, 0x3000, 0.0)
    mgr.acquire(_acq(PRIV), 0.0)  # a negotiation in flight: a row without counters
    asked: list[ChildSaSpec] = []

    def read(spec: ChildSaSpec) -> ChildSaCounters:
        asked.append(spec)
        if spec == s2:
            raise DatapathError("SA 198.51.100.1->192.0.2.8 spi 0x00003001: not in the kernel")
        return ChildSaCounters(SaCounters(1500, 3, 0, 0), SaCounters(4200, 7, 0, 0))

    rows = {t.peer: t for t in mgr.tunnels(1.0, read)}
    assert asked == [s1, s2]  # only Child SAs are looked up, each once
    t1 = rows["192.0.2.7"]
    assert (t1.bytes_in, t1.packets_in, t1.bytes_out, t1.packets_out) == (1500, 3, 4200, 7)
    t2 = rows["192.0.2.8"]
    assert (t2.bytes_in, t2.bytes_out, t2.packets_in, t2.packets_out) == (0, 0, 0, 0)
    assert rows["203.0.113.5"].state == "negotiating" and rows["203.0.113.5"].bytes_out == 0
    assert all(t.bytes_in == 0 for t in mgr.tunnels(1.0))  # no reader: zeros, no lookups


def test_a_flow_waits_for_the_peers_child_sa_being_installed(mgr: OeManager) -> None:
    """The peer initiated and its Child SA is still being installed when our first
    packet (ACQUIRE) or a DNS answer for it comes: neither negotiates a second Child SA
    (one side would delete the duplicate and take the flow with it); the answer goes
    once the peer's SA is in."""
    (inst,) = mgr.adopt_inbound(P1, _spec(P1, 0x7000), 0.0)
    assert mgr.acquire(_acq(P1), 0.1) == []
    name = dns.name.from_text("www.example.org")
    assert mgr.ensure_tunnel(5, name, (P1,), _key(), 0.1) == []  # held, no Negotiate
    acts = mgr.installed(inst.ticket, inst.spec, None, 0.2)  # type: ignore[union-attr]
    assert only(acts, TunnelResult) == [TunnelResult(5, True)]
    assert not only(acts, Negotiate)
    (t,) = mgr.tunnels(1.0)
    assert (t.peer, t.state) == (str(P1), "established")


def test_a_failed_install_of_the_peers_child_sa_negotiates_for_the_held_answer(
    mgr: OeManager,
) -> None:
    (inst,) = mgr.adopt_inbound(P1, _spec(P1, 0x7000), 0.0)
    name = dns.name.from_text("www.example.org")
    assert mgr.ensure_tunnel(5, name, (P1,), _key(), 0.1) == []
    acts = mgr.installed(inst.ticket, None, "no room", 0.2)
    assert acts[0] == SendDelete(P1, inst.spec)  # type: ignore[union-attr]
    (neg,) = only(acts, Negotiate)
    assert neg.request.peer == P1 and neg.request.auth.key == _key().public_key
    _, _, out, _ = _negotiate_ok(mgr, [neg], P1, 0x1000, 0.5)
    assert only(out, TunnelResult) == [TunnelResult(5, True)]


def test_flush_removes_every_shunt_and_the_next_flows_negotiate_again(mgr: OeManager) -> None:
    mgr.start()
    fails = {}
    for peer in (P1, PRIV):  # private-or-clear: a pass shunt; private: a drop shunt
        (neg,) = only(mgr.acquire(_acq(peer), 0.0), Negotiate)
        (inst,) = mgr.negotiated(neg.ticket, NegotiationResult(None, "timeout"), 1.0)
        fails[peer] = inst.policy  # type: ignore[union-attr]
        assert mgr.shunt_status(inst.policy, 1.0) == mgr.shunts(1.0)[-1]  # type: ignore[union-attr]
    assert {s.kind for s in mgr.shunts(2.0)} == {"pass", "drop"}
    # a group's own policy is not a shunt
    group = next(p for p in mgr.group_policies() if p.action is PolicyAction.DROP)
    assert mgr.shunt_status(group, 2.0) is None
    n, acts = mgr.flush_shunts()
    assert n == 2 and acts == [RemovePolicy(fails[P1]), RemovePolicy(fails[PRIV])]
    assert mgr.shunts(3.0) == () and mgr.flush_shunts() == (0, [])
    assert len(only(mgr.acquire(_acq(P1), 4.0), Negotiate)) == 1
    # the private peer's drop back-off starts over: its next shunt lasts 5 s again
    (neg,) = only(mgr.acquire(_acq(PRIV), 4.0), Negotiate)
    (inst,) = mgr.negotiated(neg.ticket, NegotiationResult(None, "timeout"), 5.0)
    assert inst.policy.lifetime.hard_seconds == 5  # type: ignore[union-attr]
