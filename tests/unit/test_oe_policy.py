"""Policy groups: most-specific lookup, and kernel policies that agree with it.

The property tests compare the lookup with a brute-force reference (every matching
entry, most specific wins) and the kernel table with the lookup (the policy the
kernel would pick, lowest priority value among matching selectors, does what the
looked-up group says).
"""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from oe_router.config.schema import PolicyConfig, PolicyEntry, parse_policy_entry
from oe_router.datapath.base import Direction, Mode, PolicyAction, PolicySpec
from oe_router.datapath.kernel import Ownership
from oe_router.oe.policy import (
    EXCLUSION_BAND,
    GROUP_BAND,
    Group,
    PolicyTable,
    Rule,
    selector_rank,
)

WAN4 = ipaddress.IPv4Address("198.51.100.1")
WAN6 = ipaddress.IPv6Address("2001:db8:ffff::1")
WAN: dict[int, ipaddress.IPv4Address | ipaddress.IPv6Address] = {4: WAN4, 6: WAN6}
TRAP_REQID = Ownership().reqid_max


def _e(text: str) -> PolicyEntry:
    return parse_policy_entry(text)


def _cfg(**groups: list[str]) -> PolicyConfig:
    fields = {g: tuple(_e(t) for t in groups.get(g, [])) for g in
              ("private", "private_or_clear", "clear_or_private", "clear", "block")}  # fmt: skip
    return PolicyConfig(**fields)


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text)


# --------------------------------------------------------------------------- examples


def test_a_32_in_clear_beats_a_24_in_private_or_clear() -> None:
    t = PolicyTable.from_config(_cfg(private_or_clear=["192.0.2.0/24"], clear=["192.0.2.7/32"]))
    assert t.group_of(_ip("192.0.2.7")) is Group.CLEAR
    assert t.group_of(_ip("192.0.2.8")) is Group.PRIVATE_OR_CLEAR
    assert t.group_of(_ip("203.0.113.1")) is Group.CLEAR  # no entry at all
    assert t.lookup(_ip("203.0.113.1")) is None


def test_protocol_then_port_break_prefix_ties() -> None:
    t = PolicyTable.from_config(
        _cfg(
            private=["192.0.2.0/24 tcp 443"],
            block=["192.0.2.0/24 tcp"],
            private_or_clear=["192.0.2.0/24", "::/0"],
            clear=["2001:db8::/32 udp 53"],
        )
    )
    a = _ip("192.0.2.9")
    assert t.group_of(a, 6, 443) is Group.PRIVATE
    assert t.group_of(a, 6, 80) is Group.BLOCK
    assert t.group_of(a, 17, 443) is Group.PRIVATE_OR_CLEAR
    assert t.group_of(a) is Group.PRIVATE_OR_CLEAR
    b = _ip("2001:db8::5")
    assert t.group_of(b, 17, 53) is Group.CLEAR
    assert t.group_of(b, 6, 53) is Group.PRIVATE_OR_CLEAR
    # a longer prefix beats protocol and port
    t2 = PolicyTable.from_config(_cfg(private=["192.0.2.0/24 tcp 443"], clear=["192.0.2.9/32"]))
    assert t2.group_of(a, 6, 443) is Group.CLEAR


def test_exclusions_beat_every_group_entry() -> None:
    t = PolicyTable.from_config(
        _cfg(private=["0.0.0.0/0", "::/0"]),
        lan=[ipaddress.ip_network("192.168.1.0/24")],
        dns_upstream=[_ip("9.9.9.9")],
    )
    lan = t.lookup(_ip("192.168.1.20"))
    assert lan is not None and lan.exclusion == "LAN" and lan.group is Group.CLEAR
    dns = t.lookup(_ip("9.9.9.9"), 17, 53)
    assert dns is not None and dns.exclusion == "upstream DNS"
    assert t.group_of(_ip("9.9.9.9"), 6, 53) is Group.CLEAR
    assert t.group_of(_ip("9.9.9.9"), 6, 443) is Group.PRIVATE  # only DNS is excluded
    assert t.group_of(_ip("fe80::1")) is Group.CLEAR
    assert t.group_of(_ip("255.255.255.255"), 17, 67) is Group.CLEAR
    assert all(r.rank < GROUP_BAND for r in t.rules if r.exclusion)
    assert all(r.rank >= GROUP_BAND for r in t.rules if not r.exclusion)
    assert min(r.rank for r in t.rules) >= EXCLUSION_BAND


def test_icmpv6_neighbour_discovery_is_excluded_by_type_and_echo_follows_the_group() -> None:
    """ND (133-137) never meets a trap, SA or drop; echo and errors go by the destination."""
    t = PolicyTable.from_config(
        _cfg(private_or_clear=["::/0", "0.0.0.0/0"], private=["2001:db8:5::9/128"])
    )
    peer, private = _ip("2001:db9::1"), _ip("2001:db8:5::9")
    for icmp_type in (133, 134, 135, 136, 137):
        for addr in (peer, private):
            rule = t.lookup(addr, 58, None, icmp_type)
            assert rule is not None and rule.group is Group.CLEAR, (addr, icmp_type)
            assert rule.exclusion is not None and "neighbour discovery" in rule.exclusion
            assert rule.rank < GROUP_BAND  # beats the ::/0 trap and the /128 private entry
    for icmp_type in (128, 129, 1, 2, 3, 4, 130, 143):
        assert t.group_of(peer, 58, None, icmp_type) is Group.PRIVATE_OR_CLEAR, icmp_type
        assert t.group_of(private, 58, None, icmp_type) is Group.PRIVATE, icmp_type
    # An ACQUIRE-style lookup that does not pass the type never lands on an ND rule.
    assert t.group_of(peer, 58) is Group.PRIVATE_OR_CLEAR
    # IPv4 ICMP is untouched: no exclusion names it.
    assert t.group_of(_ip("203.0.113.9"), 1, None, 8) is Group.PRIVATE_OR_CLEAR
    assert not [r for r in t.rules if r.entry.proto == 1]
    assert not [r for r in t.rules if r.entry.proto == 58 and r.entry.icmp_type is None]


def test_neighbour_discovery_pass_policies_carry_the_type_on_the_remote_side() -> None:
    """One PASS per ND type and direction; the ICMP type rides with the remote selector."""
    t = PolicyTable.from_config(_cfg(private_or_clear=["::/0"]))
    pols = [p for p in t.kernel_policies(WAN, trap_reqid=TRAP_REQID) if p.dst.proto == 58]
    assert {(p.direction, p.action) for p in pols} == {(d, PolicyAction.PASS) for d in Direction}
    any6 = ipaddress.ip_network("::/0")
    seen = set()
    for p in pols:
        remote, local = (p.dst, p.src) if p.direction is Direction.OUT else (p.src, p.dst)
        assert (remote.net, local.net, local.icmp_type, remote.port) == (any6, any6, None, None)
        assert remote.icmp_type is not None
        seen.add((p.direction, remote.icmp_type))
        assert "icmp type" in p.describe()
    assert seen == {(d, ty) for d in Direction for ty in (133, 134, 135, 136, 137)}
    trap = next(p for p in t.kernel_policies(WAN, trap_reqid=TRAP_REQID) if p.dst.net == any6
                and p.action is PolicyAction.TRAP)  # fmt: skip
    assert all(p.priority < trap.priority for p in pols)


def test_policy_entry_names_its_icmp_type() -> None:
    e = PolicyEntry(ipaddress.ip_network("::/0"), 58, icmp_type=135)
    assert str(e) == "::/0 icmpv6 type 135"


def test_same_entry_in_two_groups_is_refused_naming_it() -> None:
    e = _e("192.0.2.0/24")
    rank = selector_rank(e.network, None, None)
    rules = [Rule(e, Group.PRIVATE, rank), Rule(e, Group.CLEAR, rank)]
    with pytest.raises(ValueError, match=r"192\.0\.2\.0/24 is in both"):
        PolicyTable(rules)


def test_kernel_policies_per_group() -> None:
    t = PolicyTable.from_config(
        _cfg(
            private=["192.0.2.0/24"],
            private_or_clear=["0.0.0.0/0"],
            clear_or_private=["203.0.113.0/24"],
            clear=["10.0.0.0/8"],
            block=["198.18.0.0/15 tcp 25"],
        ),
        link_exclusions=(),
    )
    pols = t.kernel_policies({4: WAN4}, trap_reqid=TRAP_REQID)
    by_dst: dict[str, list[PolicySpec]] = {}
    for p in pols:
        net = p.dst.net if p.direction is Direction.OUT else p.src.net
        by_dst.setdefault(str(net), []).append(p)
    (priv,) = by_dst["192.0.2.0/24"]
    assert (priv.action, priv.direction, priv.persistent) == (
        PolicyAction.TRAP,
        Direction.OUT,
        True,
    )
    assert priv.src.net == ipaddress.ip_network("198.51.100.1/32")
    (tmpl,) = priv.templates
    assert (tmpl.src, tmpl.dst, tmpl.mode, tmpl.reqid) == (
        WAN4, _ip("0.0.0.0"), Mode.TRANSPORT, TRAP_REQID
    )  # fmt: skip
    (poc,) = by_dst["0.0.0.0/0"]
    assert poc.action is PolicyAction.TRAP and not poc.persistent
    assert {(p.action, p.direction) for p in by_dst["203.0.113.0/24"]} == {
        (PolicyAction.PASS, d) for d in Direction
    }
    assert {(p.action, p.direction) for p in by_dst["10.0.0.0/8"]} == {
        (PolicyAction.PASS, d) for d in Direction
    }
    blk = by_dst["198.18.0.0/15"]
    assert {(p.action, p.direction) for p in blk} == {(PolicyAction.DROP, d) for d in Direction}
    out = next(p for p in blk if p.direction is Direction.OUT)
    assert (out.dst.proto, out.dst.port, out.src.net) == (6, 25, ipaddress.ip_network("0.0.0.0/0"))
    inn = next(p for p in blk if p.direction is Direction.IN)
    assert (inn.src.port, inn.src.net) == (25, ipaddress.ip_network("198.18.0.0/15"))


def test_without_a_wan_address_private_drops_and_private_or_clear_is_clear() -> None:
    t = PolicyTable.from_config(
        _cfg(private=["2001:db8:1::/48"], private_or_clear=["::/0"]), link_exclusions=()
    )
    pols = t.kernel_policies({4: WAN4}, trap_reqid=TRAP_REQID)
    assert {(str(p.dst.net), p.action) for p in pols if p.direction is Direction.OUT} == {
        ("2001:db8:1::/48", PolicyAction.DROP)
    }


# --------------------------------------------------------------------------- properties

_BASES4 = ["192.0.2.0", "192.0.2.128", "192.0.2.7", "0.0.0.0", "192.0.0.0", "203.0.113.0"]
_BASES6 = ["2001:db8::", "2001:db8::7", "::", "2001:db8:1::"]


@st.composite
def entries(draw: st.DrawFn) -> PolicyEntry:
    v6 = draw(st.booleans())
    base = draw(st.sampled_from(_BASES6 if v6 else _BASES4))
    common = [0, 32, 48, 127, 128] if v6 else [0, 8, 24, 25, 32]
    plen = draw(st.one_of(st.sampled_from(common), st.integers(0, 128 if v6 else 32)))
    net = ipaddress.ip_network(f"{base}/{plen}", strict=False)
    proto = draw(st.sampled_from([None, None, 6, 17]))
    port = draw(st.sampled_from([None, 53, 443])) if proto else None
    return PolicyEntry(net, proto, port)


@st.composite
def tables(draw: st.DrawFn) -> PolicyTable:
    raw = draw(st.lists(st.tuples(entries(), st.sampled_from(list(Group))), max_size=12))
    chosen: dict[PolicyEntry, Group] = {}
    for entry, group in raw:
        chosen.setdefault(entry, group)  # the config layer refuses an entry in two groups
    cfg = PolicyConfig(
        **{
            g.value.replace("-", "_"): tuple(e for e, gg in chosen.items() if gg is g)
            for g in Group
        }
    )
    lan = draw(st.lists(st.sampled_from(["192.0.2.128/25", "2001:db8:1::/48"]), max_size=1))
    dns = draw(st.lists(st.sampled_from(["192.0.2.7", "2001:db8::7"]), max_size=1))
    return PolicyTable.from_config(
        cfg, lan=[ipaddress.ip_network(n) for n in lan], dns_upstream=[_ip(a) for a in dns]
    )


Packet = tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int, int, int | None]


@st.composite
def packets(draw: st.DrawFn) -> Packet:
    """(destination, protocol, port or 0, ICMP type or None)."""
    v6 = draw(st.booleans())
    pool = ["192.0.2.7", "192.0.2.130", "192.0.2.1", "192.0.1.1", "203.0.113.9", "8.8.8.8"]
    pool6 = ["2001:db8::7", "2001:db8::1", "2001:db8:1::5", "2001:db9::1", "fe80::1"]
    addr = _ip(draw(st.sampled_from(pool6 if v6 else pool)))
    proto = draw(st.sampled_from([6, 17, 1 if not v6 else 58]))
    port = draw(st.sampled_from([53, 443, 80])) if proto in (6, 17) else 0
    # echo request/reply, an error, and neighbour discovery (NS, NA, RA)
    types = [128, 129, 2, 135, 136, 134] if v6 else [8, 0, 3]
    icmp_type = draw(st.sampled_from(types)) if proto in (1, 58) else None
    return addr, proto, port, icmp_type


def _specificity(e: PolicyEntry) -> tuple[int, int, int]:
    narrow = e.port is not None or e.icmp_type is not None
    return (e.network.prefixlen, int(e.proto is not None), int(narrow))


def _reference(
    t: PolicyTable,
    addr: ipaddress.IPv4Address | ipaddress.IPv6Address,
    proto: int,
    port: int,
    icmp_type: int | None,
) -> Rule | None:
    """Brute force: of all matching rules, exclusions first, then the most specific."""
    hits = [
        r
        for r in t.rules
        if addr in r.entry.network
        if r.entry.proto in (None, proto)
        if r.entry.port in (None, port)
        if r.entry.icmp_type in (None, icmp_type)
    ]  # fmt: skip
    if not hits:
        return None
    best = max(hits, key=lambda r: (r.exclusion is not None, _specificity(r.entry)))
    # equal specificity among matches means the same entry (exclusion or one group)
    ties = [r for r in hits if (r.exclusion is not None, _specificity(r.entry)) ==
            (best.exclusion is not None, _specificity(best.entry))]  # fmt: skip
    assert len({(r.entry, r.group) for r in ties}) == 1
    return best


@settings(max_examples=300, deadline=None)
@given(tables(), st.lists(packets(), min_size=1, max_size=8))
def test_lookup_agrees_with_brute_force(t: PolicyTable, pkts: list[Packet]) -> None:
    for addr, proto, port, icmp_type in pkts:
        got = t.lookup(addr, proto, port or None, icmp_type)
        want = _reference(t, addr, proto, port, icmp_type)
        assert (got and (got.entry, got.group)) == (want and (want.entry, want.group))


def _kernel_pick(
    pols: tuple[PolicySpec, ...],
    src: ipaddress.IPv4Address | ipaddress.IPv6Address,
    dst: ipaddress.IPv4Address | ipaddress.IPv6Address,
    proto: int,
    port: int,
    icmp_type: int | None = None,
) -> PolicySpec | None:
    """What XFRM does for an outbound packet: the matching policy with the lowest priority.

    For ICMP the kernel compares the packet's type with the selector's source port.
    """
    own = Ownership()
    sport = icmp_type
    hits = [
        p
        for p in pols
        if p.direction is Direction.OUT
        if src.version == p.src.net.version and src in p.src.net and dst in p.dst.net
        if p.dst.proto in (0, proto)
        if p.dst.port in (None, port)
        if (p.src.icmp_type if p.src.icmp_type is not None else p.dst.icmp_type) in (None, sport)
    ]  # fmt: skip
    if not hits:
        return None
    prio = [own.kernel_priority(p.priority, p.persistent) for p in hits]
    best = min(prio)
    winners = [p for p, pr in zip(hits, prio, strict=True) if pr == best]
    assert len(winners) == 1, "two matching policies at one priority: the kernel order is ambiguous"
    return winners[0]


_EXPECT = {
    Group.PRIVATE: PolicyAction.TRAP,
    Group.PRIVATE_OR_CLEAR: PolicyAction.TRAP,
    Group.CLEAR_OR_PRIVATE: PolicyAction.PASS,
    Group.CLEAR: PolicyAction.PASS,
    Group.BLOCK: PolicyAction.DROP,
}


@settings(max_examples=300, deadline=None)
@given(tables(), st.lists(packets(), min_size=1, max_size=8))
def test_kernel_priority_order_agrees_with_lookup(t: PolicyTable, pkts: list[Packet]) -> None:
    pols = t.kernel_policies(WAN, trap_reqid=TRAP_REQID)
    for addr, proto, port, icmp_type in pkts:
        rule = t.lookup(addr, proto, port or None, icmp_type)
        picked = _kernel_pick(pols, WAN[addr.version], addr, proto, port, icmp_type)
        if rule is None:
            assert picked is None
            continue
        assert picked is not None
        assert picked.action is _EXPECT[rule.group]
        assert picked.priority == rule.rank
        assert picked.persistent == (rule.group is Group.PRIVATE)


@settings(max_examples=100, deadline=None)
@given(tables())
def test_kernel_policies_are_distinct_kernel_objects(t: PolicyTable) -> None:
    """No two policies share a kernel identity (selector + direction): none replaces another."""
    pols = t.kernel_policies(WAN, trap_reqid=TRAP_REQID)
    keys = [(p.src, p.dst, p.direction) for p in pols]
    assert len(keys) == len(set(keys))
