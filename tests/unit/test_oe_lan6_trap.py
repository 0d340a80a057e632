"""Packet-triggered OE for LAN devices' IPv6 flows: LAN-sourced traps, shunts, passes.

LAN IPv6 flows keep their global source until a peer has a tunnel (only then does the
LAN gateway NAT them to the WAN address), so the WAN-sourced traps never see them.
These tests pin the policy table's LAN-sourced twins (IPv6 only), the manager's answer
to an ACQUIRE whose source is a LAN host, the pass shunts covering both sources on
failure, and the LAN PASS that lets tunnelled flows reach the NAT while a Child SA lives.
"""

from __future__ import annotations

import ipaddress
from dataclasses import replace

from oe_router.config.schema import PolicyConfig, PolicyEntry
from oe_router.datapath.base import (
    Acquire,
    ChildSaSpec,
    Direction,
    PolicyAction,
    PolicyExpire,
    PolicySpec,
    SaKeys,
    TrafficSelector,
    encr_algorithm,
)
from oe_router.datapath.kernel import Ownership
from oe_router.oe.actions import (
    Action,
    InstallChild,
    InstallPolicy,
    Negotiate,
    NegotiationResult,
    RemovePolicy,
)
from oe_router.oe.manager import OeManager
from oe_router.oe.policy import PolicyTable, selector_rank

WAN4 = ipaddress.IPv4Address("198.51.100.1")
WAN6 = ipaddress.IPv6Address("2001:db8:ffff::1")
LAN4 = ipaddress.IPv4Network("192.168.1.0/24")
LAN6 = ipaddress.IPv6Network("2001:db8:100::/64")
LAN_HOST = ipaddress.IPv6Address("2001:db8:100::42")
PEER = ipaddress.IPv6Address("2001:db8:1::10")
PRIVATE_NET = ipaddress.IPv6Network("2001:db8:5::/48")
TRAP_REQID = Ownership().reqid_max
ANY6 = ipaddress.IPv6Network("::/0")


def _cfg() -> PolicyConfig:
    return PolicyConfig(
        private=(PolicyEntry(PRIVATE_NET),),
        private_or_clear=(
            PolicyEntry(ipaddress.ip_network("0.0.0.0/0")),
            PolicyEntry(ANY6),
        ),
    )


def _table() -> PolicyTable:
    return PolicyTable.from_config(_cfg(), lan=(LAN4, LAN6))


def _mgr(lan6: tuple[ipaddress.IPv6Network, ...] = (LAN6,)) -> OeManager:
    return OeManager(
        _table(), {4: WAN4, 6: WAN6}, trap_reqid=TRAP_REQID, shunt_lifetime=900, lan6=lan6
    )


def _lan_acquire(peer: ipaddress.IPv6Address = PEER) -> Acquire:
    """What the kernel sends for a forwarded LAN packet caught by the LAN trap: the
    selector's source is the LAN host, not our WAN address."""
    return Acquire(
        LAN_HOST, peer, TrafficSelector(ipaddress.ip_network(LAN_HOST), 6, 40000),
        TrafficSelector(ipaddress.ip_network(peer), 6, 80), TRAP_REQID, 1, 0, 0,
    )  # fmt: skip


def _spec(peer: ipaddress.IPv6Address, spi: int = 0x1000) -> ChildSaSpec:
    host = TrafficSelector(ipaddress.ip_network(peer))
    return ChildSaSpec(
        WAN6, peer, SaKeys(spi, bytes(36)), SaKeys(spi + 1, bytes(36)), encr_algorithm(20),
        local_ts=(TrafficSelector(ipaddress.ip_network(WAN6)),), remote_ts=(host,),
    )  # fmt: skip


def _lan_out(p: PolicySpec) -> bool:
    """A LAN-sourced OUT policy (the LAN exclusion's IN/FWD policies also name LAN6)."""
    return p.direction is Direction.OUT and p.src.net == LAN6


def _policies(
    acts: list[Action], kind: type[InstallPolicy] | type[RemovePolicy] = InstallPolicy
) -> list[PolicySpec]:
    return [
        a.policy
        for a in acts
        if isinstance(a, (InstallPolicy, RemovePolicy)) and isinstance(a, kind)
    ]


def _negotiate(acts: list[Action]) -> Negotiate:
    (neg,) = [a for a in acts if isinstance(a, Negotiate)]
    return neg


def test_policy_table_emits_lan_sourced_traps_for_ipv6_private_or_clear_only() -> None:
    pols = _table().kernel_policies({4: WAN4, 6: WAN6}, trap_reqid=TRAP_REQID, lan6=(LAN6,))
    traps = [p for p in pols if p.action is PolicyAction.TRAP]
    by_src = {(str(p.src.net), str(p.dst.net)) for p in traps}
    assert by_src == {
        (f"{WAN4}/32", "0.0.0.0/0"),
        (f"{WAN6}/128", "::/0"),
        (str(LAN6), "::/0"),
        (f"{WAN6}/128", str(PRIVATE_NET)),
    }  # no LAN-sourced IPv4 trap, no LAN-sourced trap for the private group
    wan_trap = next(
        p for p in traps if p.src.net == ipaddress.ip_network(WAN6) and p.dst.net == ANY6
    )
    lan_trap = next(p for p in traps if p.src.net == LAN6)
    # same destination, rank and template (the SA is WAN6 <-> peer), out only
    assert lan_trap.dst == wan_trap.dst and lan_trap.priority == wan_trap.priority
    assert lan_trap.templates == wan_trap.templates and lan_trap.templates[0].src == WAN6
    assert lan_trap.direction is Direction.OUT and not lan_trap.persistent
    # the private network: LAN flows pass to the NAT (oe_private6) and meet its WAN trap;
    # the PASS outranks the LAN ::/0 trap, which would otherwise catch them first
    (lan_private,) = [p for p in pols if _lan_out(p) and p.dst.net == PRIVATE_NET]
    assert lan_private.action is PolicyAction.PASS and lan_private.direction is Direction.OUT
    assert lan_private.priority < lan_trap.priority
    # exactly these two LAN-sourced OUT policies; none for the IPv4 LAN
    assert [p for p in pols if _lan_out(p)] == [lan_private, lan_trap]
    assert not any(p.src.net == LAN4 and p.direction is Direction.OUT for p in pols)


def test_without_lan6_or_wan6_there_are_no_lan_sourced_policies() -> None:
    table = _table()
    assert not any(map(_lan_out, table.kernel_policies({4: WAN4, 6: WAN6}, trap_reqid=1)))
    assert not any(map(_lan_out, table.kernel_policies({4: WAN4}, trap_reqid=1, lan6=(LAN6,))))
    m = OeManager(table, {4: WAN4}, trap_reqid=1, lan6=(LAN6,))  # no WAN6: no gateway
    assert m.lan6 == () and not any(map(_lan_out, _policies(m.start())))


def test_manager_starts_with_the_lan_trap() -> None:
    pols = _policies(_mgr().start())
    assert any(p.src.net == LAN6 and p.action is PolicyAction.TRAP for p in pols)


def test_lan_sourced_acquire_negotiates_wan6_to_peer() -> None:
    m = _mgr()
    neg = _negotiate(m.acquire(_lan_acquire(), 0.0))
    assert neg.request.peer == PEER and neg.request.local == WAN6
    assert neg.request.local_ts.net == ipaddress.ip_network(WAN6)
    assert neg.request.remote_ts == TrafficSelector(ipaddress.ip_network(PEER))
    assert neg.request.auth.null


def test_failure_installs_pass_shunts_for_wan6_and_lan6_sources_removed_together() -> None:
    m = _mgr()
    neg = _negotiate(m.acquire(_lan_acquire(), 0.0))
    acts = m.negotiated(neg.ticket, NegotiationResult(None, "no response"), 2.0)
    shunts = _policies(acts)
    host = TrafficSelector(ipaddress.ip_network(PEER))
    assert {p.src.net for p in shunts} == {ipaddress.ip_network(WAN6), LAN6}
    rank = selector_rank(host.net, 0, None)
    for p in shunts:
        assert (p.action, p.direction, p.dst, p.priority) == (
            PolicyAction.PASS, Direction.OUT, host, rank
        )  # fmt: skip
        assert p.lifetime.hard_seconds == 900 and not p.persistent
    # the status shows one row for the destination (the WAN6 and LAN6 sources' policies)
    assert [s.destination for s in m.shunts(2.0)] == [str(host.net)]
    # both go at the lifetime, and the tables' own policies are not disturbed
    gone = _policies(m.tick(2.0 + 900), RemovePolicy)
    assert {p.src.net for p in gone} == {ipaddress.ip_network(WAN6), LAN6}
    assert m.shunts(903.0) == ()


def test_kernel_expiry_of_the_lan_shunt_is_followed() -> None:
    m = _mgr()
    neg = _negotiate(m.acquire(_lan_acquire(), 0.0))
    m.negotiated(neg.ticket, NegotiationResult(None, "no response"), 2.0)
    host = TrafficSelector(ipaddress.ip_network(PEER))
    ev = PolicyExpire(TrafficSelector(LAN6), host, Direction.OUT, 0, True)
    assert m.policy_expired(ev, 902.0) == []
    assert [s.destination for s in m.shunts(902.0)] == [str(host.net)]  # the WAN one left


def test_ipv4_failure_gets_no_lan_shunt() -> None:
    m = _mgr()
    v4 = ipaddress.IPv4Address("203.0.113.9")
    acq = Acquire(
        WAN4, v4, TrafficSelector(ipaddress.ip_network(WAN4)),
        TrafficSelector(ipaddress.ip_network(v4)), TRAP_REQID, 1, 0, 0,
    )  # fmt: skip
    neg = _negotiate(m.acquire(acq, 0.0))
    (shunt,) = _policies(m.negotiated(neg.ticket, NegotiationResult(None, "x"), 1.0))
    assert shunt.src.net == ipaddress.ip_network(WAN4)


def _up(m: OeManager, now: float = 1.0) -> tuple[list[Action], ChildSaSpec]:
    neg = _negotiate(m.acquire(_lan_acquire(), 0.0))
    (inst,) = [a for a in m.negotiated(neg.ticket, NegotiationResult(_spec(PEER)), now)
               if isinstance(a, InstallChild)]  # fmt: skip
    spec = replace(inst.spec, reqid=0x4F450001)
    return m.installed(inst.ticket, spec, None, now), spec


def test_child_sa_up_installs_the_lan_pass_before_nat_is_needed() -> None:
    m = _mgr()
    acts, _ = _up(m)
    installs = [a for a in acts if isinstance(a, InstallPolicy)]
    (lan_pass,) = installs
    p = lan_pass.policy
    host = TrafficSelector(ipaddress.ip_network(PEER))
    assert (p.src, p.dst, p.direction, p.action) == (
        TrafficSelector(LAN6), host, Direction.OUT, PolicyAction.PASS
    )  # fmt: skip
    assert p.priority == selector_rank(host.net, 0, None) and p.lifetime.hard_seconds == 0  # none
    assert lan_pass.nat_first  # the service syncs oe_peers6 before installing it
    # no new ACQUIRE-driven negotiation while the tunnel lives
    assert m.acquire(_lan_acquire(), 2.0) == []


def test_lan_pass_replaces_a_lan_pass_shunt_and_goes_with_the_last_child() -> None:
    m = _mgr()
    neg = _negotiate(m.acquire(_lan_acquire(), 0.0))
    m.negotiated(neg.ticket, NegotiationResult(None, "no response"), 1.0)
    assert len(m.shunts(1.0)) == 1  # one row: the WAN6 and the LAN6 source's shunt
    # the peer comes back: a new ACQUIRE after the shunts (here: the peer initiates)
    acts, _spec_up = _up(m, 5.0)
    assert m.shunts(5.0) == ()  # the WAN shunt by the SA's policy, the LAN one by the PASS
    assert any(p.src.net == LAN6 for p in _policies(acts))
    # the peer deletes its Child SA: the LAN PASS goes and the LAN trap rules again
    gone = m.peer_deleted(PEER, None, 10.0)
    removed = _policies(gone, RemovePolicy)
    assert any(p.src.net == LAN6 and p.action is PolicyAction.PASS for p in removed)
    assert _negotiate(m.acquire(_lan_acquire(), 11.0)).request.peer == PEER


def test_reload_keeps_the_lan_pass_of_a_live_tunnel() -> None:
    m = _mgr()
    _up(m)
    acts = m.replace_table(_table())
    assert not any(
        p.src.net == LAN6 and p.dst.net.prefixlen == 128 for p in _policies(acts, RemovePolicy)
    )
