"""The OE manager meets an ICMPv6 ACQUIRE (ping -6 to a peer) with the real exclusions.

The kernel's ACQUIRE for an echo carries the ICMPv6 type in the selector's source
port (parse_event puts it on the destination selector as ``icmp_type``, no port).
It must negotiate for the destination's group, and what it builds (Child SA or
shunt) must stay host-wide, so the peer's other traffic follows the same SA.
"""

from __future__ import annotations

import ipaddress

from oe_router.config.schema import PolicyConfig, PolicyEntry
from oe_router.datapath.base import Acquire, Direction, PolicyAction, TrafficSelector
from oe_router.oe.actions import Action, InstallPolicy, Negotiate, NegotiationResult
from oe_router.oe.manager import OeManager
from oe_router.oe.policy import PolicyTable, selector_rank

WAN6 = ipaddress.IPv6Address("2001:db8:ffff::1")
PEER = ipaddress.IPv6Address("2001:db8:2::7")
PRIVATE = ipaddress.IPv6Address("2001:db8:5::9")
TRAP_REQID = 0x4F45FFFF


def _mgr() -> OeManager:
    cfg = PolicyConfig(
        private=(PolicyEntry(ipaddress.ip_network("2001:db8:5::/48")),),
        private_or_clear=(PolicyEntry(ipaddress.ip_network("::/0")),),
    )
    table = PolicyTable.from_config(cfg)  # with LINK_EXCLUSIONS, ND among them
    return OeManager(table, {6: WAN6}, trap_reqid=TRAP_REQID, shunt_lifetime=900, idle_timeout=300)


def _echo_acquire(peer: ipaddress.IPv6Address, icmp_type: int = 128) -> Acquire:
    host = ipaddress.ip_network(peer)
    return Acquire(
        WAN6, peer, TrafficSelector(ipaddress.ip_network(WAN6), 58),
        TrafficSelector(host, 58, icmp_type=icmp_type), TRAP_REQID, 1, 0, 0,
    )  # fmt: skip


def _negotiate(acts: list[Action]) -> Negotiate:
    (neg,) = [a for a in acts if isinstance(a, Negotiate)]
    return neg


def test_echo_acquire_negotiates_host_to_host_for_a_private_or_clear_peer() -> None:
    mgr = _mgr()
    neg = _negotiate(mgr.acquire(_echo_acquire(PEER), 0.0))
    host = TrafficSelector(ipaddress.ip_network(PEER))
    assert neg.request.peer == PEER and neg.request.auth.null
    assert neg.request.remote_ts == host  # proto 0, no type: the whole host
    (inst,) = mgr.negotiated(neg.ticket, NegotiationResult(None, "no response"), 5.0)
    assert isinstance(inst, InstallPolicy)
    shunt = inst.policy
    assert (shunt.action, shunt.direction) == (PolicyAction.PASS, Direction.OUT)
    assert shunt.dst == host and shunt.dst.icmp_type is None
    assert shunt.priority == selector_rank(host.net, 0, None)


def test_echo_reply_acquire_for_a_private_peer_fails_closed_host_wide() -> None:
    mgr = _mgr()
    neg = _negotiate(mgr.acquire(_echo_acquire(PRIVATE, 129), 0.0))
    (inst,) = mgr.negotiated(neg.ticket, NegotiationResult(None, "AUTHENTICATION_FAILED"), 1.0)
    assert isinstance(inst, InstallPolicy)
    p = inst.policy
    assert (p.action, p.persistent, p.dst) == (
        PolicyAction.DROP, True, TrafficSelector(ipaddress.ip_network(PRIVATE))
    )  # fmt: skip


def test_the_trap_loses_to_neighbour_discovery_in_the_started_policies() -> None:
    """What the manager installs at start: the ND passes outrank every IPv6 trap."""
    acts = _mgr().start()
    pols = [a.policy for a in acts if isinstance(a, InstallPolicy)]
    nd = [p for p in pols if (p.dst.icmp_type or p.src.icmp_type) in range(133, 138)]
    traps = [p for p in pols if p.action is PolicyAction.TRAP]
    assert len(nd) == 15 and len(traps) == 2
    assert max(p.priority for p in nd) < min(p.priority for p in traps)
