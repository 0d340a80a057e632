"""CAT (client address translation), sans-IO parts: the IKE core's CP request and the
narrowing it accepts, the negotiator's reading of a reply, the manager's decisions, and
the nft script.

Why: a peer with an address pool (libreswan ``rightaddresspool``) protects only
``inner address <-> peer``; the router must use that address towards that peer only,
and never let a peer narrow our side to anything but our address or the inner address
it gave us.
"""

from __future__ import annotations

import ipaddress
from dataclasses import replace

import dns.name
import pytest

from oe_router.config.schema import PolicyConfig, parse_policy_entry
from oe_router.datapath.base import (
    Acquire,
    ChildSaSpec,
    Direction,
    IPAddress,
    PolicyAction,
    SaKeys,
    TrafficSelector,
)
from oe_router.datapath.base import encr_algorithm as encr
from oe_router.dns.ipseckey import KeyKind, PeerKey
from oe_router.ike.child import cp_request
from oe_router.ike.events import ChildSaEstablished, ChildSaFailed
from oe_router.ike.selectors import NO_CONTAINMENT
from oe_router.ike.service import any_selector
from oe_router.oe.actions import (
    Action,
    InstallChild,
    InstallPolicy,
    Negotiate,
    NegotiationResult,
    RemovePolicy,
    TunnelResult,
    UpdateCat,
)
from oe_router.oe.lan import cat_remove_script, cat_script
from oe_router.oe.manager import OeManager
from oe_router.oe.negotiator import cat_result
from oe_router.oe.policy import PolicyTable
from tests.ike_pair import configs, establish, handshake, host_ts, net

WAN = ipaddress.IPv4Address("198.51.100.1")
CAT_PEER = ipaddress.IPv4Address("192.0.2.13")
OTHER = ipaddress.IPv4Address("192.0.2.10")
INNER = ipaddress.IPv4Address("100.64.13.1")
LAN4 = ipaddress.IPv4Network("192.168.1.0/24")
LAN6 = ipaddress.IPv6Network("2001:db8:2::/64")
TRAP_REQID = 0x4F45FFFF


def _host(a: IPAddress) -> TrafficSelector:
    return TrafficSelector(ipaddress.ip_network(a))


def _spec(peer: IPAddress, local: IPAddress = WAN, spi: int = 0x1000) -> ChildSaSpec:
    return ChildSaSpec(
        WAN, peer, SaKeys(spi, bytes(36)), SaKeys(spi + 1, bytes(36)), encr(20),
        local_ts=(_host(local),), remote_ts=(_host(peer),),
    )  # fmt: skip


def only(actions: list[Action], kind: type) -> list:  # type: ignore[type-arg]
    return [a for a in actions if isinstance(a, kind)]


@pytest.fixture
def mgr() -> OeManager:
    cfg = PolicyConfig(
        private_or_clear=(parse_policy_entry("0.0.0.0/0"),),  # type: ignore[arg-type]
        private=(parse_policy_entry("192.0.2.13/32 tcp 443"),),  # type: ignore[arg-type]
    )
    table = PolicyTable.from_config(cfg, link_exclusions=())
    return OeManager(table, {4: WAN}, trap_reqid=TRAP_REQID)


NAME = dns.name.from_text("cat.example.test")
KEY = PeerKey(KeyKind.NONE, None, 10, NAME, 0)


def _negotiate(mgr: OeManager, peer: IPAddress) -> Negotiate:
    (neg,) = only(mgr.ensure_tunnel(1, NAME, (peer,), KEY, 0.0), Negotiate)
    return neg  # type: ignore[no-any-return]


def _up(
    mgr: OeManager, peer: IPAddress, inner: IPAddress | None, spi: int = 0x1000
) -> list[Action]:
    """ensure_tunnel -> Negotiate -> (inner) result -> InstallChild -> installed."""
    neg = _negotiate(mgr, peer)
    assert neg.request.local == WAN and neg.request.local_ts == _host(WAN)
    spec = _spec(peer, inner or WAN, spi)
    result = NegotiationResult(spec, inner=inner)
    (inst,) = only(mgr.negotiated(neg.ticket, result, 1.0), InstallChild)
    return mgr.installed(inst.ticket, replace(inst.spec, reqid=7), None, 1.0)


# --------------------------------------------------------------------------- IKE core


def test_cp_request_offers_our_address_and_the_whole_family() -> None:
    """The TSi a CAT request sends: a pool server narrows the wide range to the lease,
    a peer without a pool picks our own address (host-to-host as before)."""
    assert (str(any_selector("203.0.113.2").start), str(any_selector("203.0.113.2").end)) == (
        "0.0.0.0", "255.255.255.255",
    )  # fmt: skip
    ini_cfg, res_cfg = configs()
    wide = (host_ts(ini_cfg.local_address[0]), net("0.0.0.0/0"))
    ini_cfg = replace(ini_cfg, request_internal_address=True, local_ts=wide)
    # a pool server: the lease, narrowed to it
    pool = replace(res_cfg, internal_addresses=(str(INNER),), remote_ts=(net("100.64.13.0/24"),))
    _i, _r, ic, _rc = establish(ini_cfg, pool)
    assert ic.internal_addresses == (INNER,)
    assert [(str(t.start), str(t.end)) for t in ic.ts_local] == [(str(INNER), str(INNER))]
    # no pool: our own address, no inner address
    _i, _r, ic, _rc = establish(ini_cfg, res_cfg)
    assert ic.internal_addresses == ()
    ours = ini_cfg.local_address[0]
    assert [(str(t.start), str(t.end)) for t in ic.ts_local] == [(ours, ours)]


def test_cp_request_asks_for_the_family_of_the_sa_only() -> None:
    """An IPv4 IKE SA asks for INTERNAL_IP4_ADDRESS only: a responder holding a v4 and a v6
    address hands out just the v4 one (an inner address of the other family is useless)."""
    assert [a.attr_type for a in cp_request(4).attributes] == [1]  # INTERNAL_IP4_ADDRESS
    assert [a.attr_type for a in cp_request(6).attributes] == [8]  # INTERNAL_IP6_ADDRESS
    assert [a.attr_type for a in cp_request().attributes] == [1, 8]
    ini_cfg, res_cfg = configs()
    wide = (host_ts(ini_cfg.local_address[0]), net("0.0.0.0/0"))
    ini_cfg = replace(ini_cfg, request_internal_address=True, local_ts=wide)
    both = replace(
        res_cfg, internal_addresses=(str(INNER), "fd00::7"), remote_ts=(net("0.0.0.0/0"),)
    )
    _i, _r, ic, _rc = establish(ini_cfg, both)
    assert ic.internal_addresses == (INNER,)


def test_a_peer_narrowing_our_side_to_an_address_it_did_not_give_is_refused() -> None:
    """TSi narrowed to someone else's address (no CP address for it): Child SA refused."""
    ini_cfg, res_cfg = configs()
    wide = (host_ts(ini_cfg.local_address[0]), net("0.0.0.0/0"))
    ini_cfg = replace(ini_cfg, request_internal_address=True, local_ts=wide)
    # a responder that narrows a NULL peer anywhere it likes (ours would not)
    res_cfg = replace(res_cfg, remote_ts=(net("10.0.0.0/24"),), containment=NO_CONTAINMENT)
    _, _, ie, _ = handshake(ini_cfg, res_cfg)
    failed = [e for e in ie if isinstance(e, ChildSaFailed)]
    assert not [e for e in ie if isinstance(e, ChildSaEstablished)]
    assert len(failed) == 1 and "neither our address nor an inner address" in failed[0].reason


# --------------------------------------------------------------------------- negotiator


def _event(local: str, inner: tuple[str, ...]) -> ChildSaEstablished:
    ts = host_ts(local)
    return ChildSaEstablished(
        b"i" * 8, b"r" * 8, b"\0\0\0\1", b"\0\0\0\2", "tunnel", 20, 256, None, False,
        b"", b"", b"", b"", (ts,), (host_ts(str(CAT_PEER)),), False,
        internal_addresses=tuple(ipaddress.ip_address(a) for a in inner),
    )  # fmt: skip


def test_cat_result_carries_the_inner_address_only_when_our_side_is_it() -> None:
    assert cat_result(_spec(CAT_PEER, INNER), _event(str(INNER), (str(INNER),))).inner == INNER
    # an address given, but the peer kept us host-to-host: no CAT
    assert cat_result(_spec(CAT_PEER), _event(str(WAN), (str(INNER),))).inner is None
    assert cat_result(_spec(CAT_PEER), _event(str(WAN), ())).inner is None


# --------------------------------------------------------------------------- manager


def test_inner_address_becomes_the_peers_snat_before_the_waiter_hears(mgr: OeManager) -> None:
    acts = _up(mgr, CAT_PEER, INNER)
    kinds = [type(a) for a in acts]
    assert UpdateCat in kinds and TunnelResult in kinds
    assert kinds.index(UpdateCat) < kinds.index(TunnelResult)  # SNAT first, then the answer
    assert only(acts, UpdateCat) == [UpdateCat(((CAT_PEER, INNER),))]
    assert mgr.cat_map() == ((CAT_PEER, INNER),)
    # the router's own flows (source WAN) pass the routing-time lookup, to be NATed to A
    (own,) = [
        a.policy for a in only(acts, InstallPolicy) if a.policy.dst.net == _host(CAT_PEER).net
    ]
    assert (own.src.net, own.direction, own.action) == (
        _host(WAN).net, Direction.OUT, PolicyAction.PASS,
    )  # fmt: skip
    trap = [
        p for p in mgr.group_policies() if p.dst.net.prefixlen == 0 and p.action.value == "trap"
    ]
    assert trap and own.priority < min(p.priority for p in trap)  # beats the 0.0.0.0/0 trap


def test_other_peers_stay_on_the_wan_address(mgr: OeManager) -> None:
    """Containment: the inner address is used towards its peer only."""
    _up(mgr, CAT_PEER, INNER)
    acts = _up(mgr, OTHER, None, spi=0x2000)
    assert not only(acts, UpdateCat)
    assert mgr.cat_map() == ((CAT_PEER, INNER),)
    # a Child SA to the other peer from the inner address is refused
    assert "only 198.51.100.1 may be protected" in (
        mgr.containment_error(OTHER, _spec(OTHER, INNER)) or ""
    )


def test_next_child_to_a_cat_peer_starts_at_the_inner_address(mgr: OeManager) -> None:
    _up(mgr, CAT_PEER, INNER)
    flow = TrafficSelector(ipaddress.ip_network(CAT_PEER), 6, 443)
    acq = Acquire(WAN, CAT_PEER, _host(WAN), flow, TRAP_REQID, 1, 0, 0)
    (neg,) = only(mgr.acquire(acq, 2.0), Negotiate)
    assert (neg.request.local, neg.request.local_ts.net) == (INNER, ipaddress.ip_network(INNER))
    # a rekey by the IKE core arrives as an inbound Child SA from the inner address: accepted
    assert mgr.containment_error(CAT_PEER, _spec(CAT_PEER, INNER, spi=0x3000)) is None
    # but not from the WAN address any more, nor from another inner address
    assert mgr.containment_error(CAT_PEER, _spec(CAT_PEER, WAN)) is not None
    other = ipaddress.IPv4Address("100.64.13.2")
    assert mgr.containment_error(CAT_PEER, _spec(CAT_PEER, other)) is not None


@pytest.mark.parametrize(
    ("inner", "why"),
    [
        (WAN, "is our WAN address or the peer's own"),
        (CAT_PEER, "is our WAN address or the peer's own"),
        (ipaddress.IPv4Address("224.0.0.1"), "is not a unicast address"),
    ],
)
def test_unusable_inner_addresses_are_refused(mgr: OeManager, inner: IPAddress, why: str) -> None:
    neg = _negotiate(mgr, CAT_PEER)
    spec = _spec(CAT_PEER, inner)
    acts = mgr.negotiated(neg.ticket, NegotiationResult(spec, inner=inner), 1.0)
    assert not only(acts, InstallChild) and not only(acts, UpdateCat)
    assert mgr.containment_error(CAT_PEER, spec, inner) == (
        f"peer {CAT_PEER}: inner address {inner} {why}; CAT refused"
    )


def test_an_inner_address_another_peer_gave_is_refused(mgr: OeManager) -> None:
    _up(mgr, CAT_PEER, INNER)
    neg = _negotiate(mgr, OTHER)
    acts = mgr.negotiated(neg.ticket, NegotiationResult(_spec(OTHER, INNER), inner=INNER), 1.0)
    assert not only(acts, InstallChild)
    assert mgr.cat_map() == ((CAT_PEER, INNER),)


def test_translation_goes_with_the_last_child_sa(mgr: OeManager) -> None:
    _up(mgr, CAT_PEER, INNER)
    acts = mgr.peer_deleted(CAT_PEER, None, 5.0)
    assert only(acts, UpdateCat) == [UpdateCat(())]
    (gone,) = [a.policy for a in only(acts, RemovePolicy) if a.policy.src.net == _host(WAN).net]
    assert (gone.dst.net, gone.action) == (_host(CAT_PEER).net, PolicyAction.PASS)
    assert mgr.cat_map() == ()


def test_a_private_cat_peer_gets_no_pass_for_the_routers_own_flows() -> None:
    """The own-flow PASS would survive a crash of the daemon while the CAT table may not:
    for a "private" peer the router's own flows stay trapped, LAN flows are still CATed."""
    cfg = PolicyConfig(private=(parse_policy_entry("192.0.2.0/24"),))  # type: ignore[arg-type]
    mgr = OeManager(PolicyTable.from_config(cfg, link_exclusions=()), {4: WAN}, trap_reqid=1)
    acts = _up(mgr, CAT_PEER, INNER)
    assert only(acts, UpdateCat) == [UpdateCat(((CAT_PEER, INNER),))]
    assert not [a for a in only(acts, InstallPolicy) if a.policy.action is PolicyAction.PASS]
    gone = mgr.peer_deleted(CAT_PEER, None, 5.0)
    assert only(gone, UpdateCat) == [UpdateCat(())]
    assert not [a for a in only(gone, RemovePolicy) if a.policy.action is PolicyAction.PASS]


# --------------------------------------------------------------------------- nft


def test_cat_script_maps_each_peer_to_its_inner_address_for_lan_sources() -> None:
    v6peer, v6inner = ipaddress.IPv6Address("2001:db8:1::13"), ipaddress.IPv6Address("fd00::5")
    wan6 = ipaddress.IPv6Address("2001:db8:1::2")
    text = cat_script([LAN4, LAN6], [(CAT_PEER, INNER), (v6peer, v6inner)], wan=[WAN, wan6])
    assert text.splitlines()[:3] == [
        "table inet oe_cat", "delete table inet oe_cat", "table inet oe_cat {",
    ]  # fmt: skip
    assert "\t\telements = { 192.0.2.13 : 100.64.13.1 }" in text
    assert "\t\telements = { 2001:db8:1::13 : fd00::5 }" in text
    assert "type nat hook postrouting priority srcnat - 10; policy accept;" in text
    assert "ip saddr { 192.168.1.0/24 } snat ip to ip daddr map @oe_cat4" in text
    assert "ip6 saddr { 2001:db8:2::/64 } snat ip6 to ip6 daddr map @oe_cat6" in text
    # the router's own flows too, but never IKE or ESP: they must keep the WAN address
    assert f"ip saddr {WAN} meta l4proto != {{ esp, udp }} snat ip to ip daddr map @oe_cat4" in text
    assert f"ip saddr {WAN} udp sport != {{ 500, 4500 }} snat ip to ip daddr map @oe_cat4" in text
    assert f"ip6 saddr {wan6} udp sport != {{ 500, 4500 }} snat ip6 to" in text


def test_cat_script_with_no_peers_keeps_empty_maps_and_removal_is_idempotent() -> None:
    text = cat_script([LAN4], [])
    assert "elements" not in text and "map @oe_cat4" in text and "oe_cat6" in text
    assert "ip6 saddr" not in text  # no IPv6 LAN: no IPv6 rule
    assert cat_remove_script() == "table inet oe_cat\ndelete table inet oe_cat\n"
