"""The SPD -> nftables compiler: rendered text, and verdicts equal to XFRM's lookup.

The reference here is a brute-force XFRM lookup written in this file from PolicySpec's
fields (lowest priority among matching policies, earliest on ties, no match = accept),
independent of the compiler's own matching code. Hypothesis draws policy sets from a
small address universe so that prefixes overlap, priorities tie and verdicts conflict.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import threading
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from oe_router.config.schema import PolicyConfig, parse_policy_entry
from oe_router.datapath import nft_spd as N
from oe_router.datapath.base import (
    Direction,
    Mark,
    Mode,
    PolicyAction,
    PolicySpec,
    Template,
    TrafficSelector,
)
from oe_router.oe.policy import PolicyTable, flow_selector, selector_rank

WAN4 = ipaddress.IPv4Address("198.51.100.1")
WAN6 = ipaddress.IPv6Address("2001:db8::1")
PORTED = (6, 17)


def net(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(text)


def tmpl(version: int) -> tuple[Template, ...]:
    any_ = ipaddress.ip_address("0.0.0.0" if version == 4 else "::")
    local = WAN4 if version == 4 else WAN6
    return (Template(local, any_, 1, Mode.TRANSPORT),)


def policy(
    src: TrafficSelector,
    dst: TrafficSelector,
    direction: Direction,
    action: PolicyAction,
    priority: int,
) -> PolicySpec:
    needs = action in (PolicyAction.TRAP, PolicyAction.IPSEC)
    return PolicySpec(src, dst, direction, action, priority, tmpl(src.net.version) if needs else ())


# --- the reference: XFRM's lookup, brute force ----------------------------------------
def xfrm_match(p: PolicySpec, flow: N.Flow) -> bool:
    if flow.src.version != p.src.net.version:
        return False
    if flow.src not in p.src.net or flow.dst not in p.dst.net:
        return False
    proto = p.src.proto or p.dst.proto
    if proto and proto != flow.proto:
        return False
    for want, have in ((p.src.port, flow.sport), (p.dst.port, flow.dport)):
        if want is not None and (flow.proto not in (6, 17, 33, 132, 136) or want != have):
            return False
    icmp = p.src.icmp_type if p.src.icmp_type is not None else p.dst.icmp_type
    return icmp is None or (flow.proto in (1, 58) and flow.icmp_type == icmp)


def xfrm_verdict(policies: Sequence[PolicySpec], direction: Direction, flow: N.Flow) -> N.Verdict:
    best = None
    for i, p in enumerate(policies):
        matches = p.direction is direction and xfrm_match(p, flow)
        if matches and (best is None or (p.priority, i) < best[0]):
            best = ((p.priority, i), p)
    if best is None:
        return N.Verdict.ACCEPT
    return N.verdict_of(direction, best[1].action)


# --- strategies ----------------------------------------------------------------------
V4_NETS = [
    "0.0.0.0/0",
    "10.0.0.0/29",
    "10.0.0.0/30",
    "10.0.0.4/30",
    "10.0.0.0/31",
    *(f"10.0.0.{i}/32" for i in range(8)),
]
V6_NETS = ["::/0", "2001:db8:5::/126", "2001:db8:5::1/128", "2001:db8:5::2/128"]


@st.composite
def selector_pair(
    draw: st.DrawFn, direction: Direction = Direction.OUT
) -> tuple[TrafficSelector, TrafficSelector]:
    """Remote side from every prefix, local side from few: shapes repeat, as in OE."""
    v6 = draw(st.integers(0, 5)) == 0
    nets = V6_NETS if v6 else V4_NETS
    remote = net(draw(st.sampled_from(nets)))
    local = net(draw(st.sampled_from(nets[:2] if draw(st.integers(0, 3)) else nets)))
    s, d = (local, remote) if direction is Direction.OUT else (remote, local)
    icmp_proto = 58 if v6 else 1
    proto = draw(st.sampled_from([0, 0, 0, 0, 6, 17, icmp_proto]))
    sport = dport = icmp = None
    if proto in PORTED:
        sport = draw(st.sampled_from([None, None, 53]))
        dport = draw(st.sampled_from([None, None, 53, 80]))
    elif proto == icmp_proto:
        icmp = draw(st.sampled_from([None, 8, 135]))
    icmp_on_dst = draw(st.booleans())
    src = TrafficSelector(s, proto, sport, None if icmp_on_dst else icmp)
    dst = TrafficSelector(d, proto, dport, icmp if icmp_on_dst else None)
    return src, dst


@st.composite
def policies(draw: st.DrawFn, max_size: int = 25) -> list[PolicySpec]:
    out = []
    for _ in range(draw(st.integers(0, max_size))):
        direction = draw(st.sampled_from(list(Direction)))
        src, dst = draw(selector_pair(direction))
        action = draw(st.sampled_from(list(PolicyAction)))
        out.append(policy(src, dst, direction, action, draw(st.sampled_from([0, 1, 2, 5]))))
    return out


def _all_flows() -> list[N.Flow]:
    """Every flow of the strategies' address universe: conflicts cannot hide."""
    out = []
    for v6, addrs in (
        (False, [*(f"10.0.0.{i}" for i in range(8)), "192.0.2.1"]),
        (True, ["2001:db8:5::", "2001:db8:5::1", "2001:db8:5::2", "2001:db8:9::1"]),
    ):
        l4: list[tuple[int, int | None, int | None, int | None]] = [
            (p, sp, dp, None) for p in PORTED for sp in (53, 1024) for dp in (53, 80)
        ]
        l4 += [(58 if v6 else 1, None, None, t) for t in (8, 135)] + [(50, None, None, None)]
        for s in addrs:
            for d in addrs:
                for proto, sp, dp, icmp in l4:
                    f = N.Flow(
                        ipaddress.ip_address(s), ipaddress.ip_address(d), proto, sp, dp, icmp
                    )
                    out.append(f)
    return out


ALL_FLOWS = _all_flows()


def compile_(pols: Sequence[PolicySpec]) -> N.SpdTable:
    return N.compile_spd(pols, wan="wan", tun="oetun", queue_num=5)


def check_structure(spd: N.SpdTable) -> None:
    """What nft needs of a map: keys of one block never overlap (nor repeat)."""
    for blocks in spd.blocks.values():
        for b in blocks:
            keys = [e.key for e in b.entries]
            for i, k in enumerate(keys):
                for other in keys[i + 1 :]:
                    assert k.version != other.version or not k.overlaps(other), (b.name, k, other)


def map_elements(spd: N.SpdTable) -> dict[tuple[str, str], str]:
    """What the kernel's maps hold after ``render(spd)``: (map, element) -> verdict text."""
    return {
        (b.name, N._net(e.key)): N._verdict_text(e.verdict)
        for blocks in spd.blocks.values()
        for b in blocks
        if not b.plain
        for e in b.entries
    }


ELEMENT_LINE = re.compile(
    r"^(add|delete) element inet oe_spd (\S+) \{ ([0-9a-f.:/]+)(?: : (.+?))? \}$"
)


def apply_elements(elements: dict[tuple[str, str], str], script: str) -> dict[tuple[str, str], str]:
    """``script``'s element lines applied as nft would: a delete of an absent element or
    an add over a present one fails the whole script (this model is stricter than nft)."""
    out = dict(elements)
    for line in script.splitlines():
        m = ELEMENT_LINE.match(line)
        assert m is not None, line
        op, name, key, verdict = m.groups()
        if op == "delete":
            assert (name, key) in out, ("delete of an absent element", line)
            del out[(name, key)]
        else:
            assert (name, key) not in out, ("add over a present element", line)
            out[(name, key)] = verdict
    return out


# --- properties ------------------------------------------------------------------------
@settings(max_examples=150)
@given(policies())
def test_compiled_verdict_equals_best_policy(pols: list[PolicySpec]) -> None:
    spd = compile_(pols)
    check_structure(spd)
    for d in Direction:
        for f in ALL_FLOWS:
            assert N.evaluate(spd, d, f) == xfrm_verdict(pols, d, f), (d, f)
    for f in ALL_FLOWS[:: len(ALL_FLOWS) // 40]:  # the module's own brute force agrees too
        best = N.best_policy(pols, Direction.OUT, f)
        want = N.Verdict.ACCEPT if best is None else N.verdict_of(Direction.OUT, best.action)
        assert want == xfrm_verdict(pols, Direction.OUT, f)


@settings(max_examples=100)
@given(
    policies(),
    st.lists(st.tuples(st.booleans(), st.integers(0, 10**6)), max_size=8),
    st.data(),
)
def test_incremental_updates_keep_the_verdicts(
    pols: list[PolicySpec], ops: list[tuple[bool, int]], data: st.DataObject
) -> None:
    """Element updates keep every verdict, under XFRM's rule that a selector and
    direction name one policy: adding one that exists replaces it (the userspace SPD
    removes the old one in the same update), removing one removes it."""

    def same(q: PolicySpec, p: PolicySpec) -> bool:
        return q.direction is p.direction and q.src == p.src and q.dst == p.dst

    current: list[PolicySpec] = []
    for p in pols:  # as the kernel would hold them: the first of each selector
        if not any(same(q, p) for q in current):
            current.append(p)
    spd = compile_(current)
    for is_add, pick in ops:
        if is_add or not current:
            direction = data.draw(st.sampled_from(list(Direction)))
            src, dst = data.draw(selector_pair(direction))
            p = policy(
                src,
                dst,
                direction,
                data.draw(st.sampled_from(list(PolicyAction))),
                data.draw(st.sampled_from([0, 1, 2, 5])),
            )
            old = [q for q in current if same(q, p)]
            result = N.update(spd, add=[p], remove=old)
            current = [q for q in current if not same(q, p)] + [p]
        else:
            p = current[pick % len(current)]
            result = N.update(spd, remove=[p])
            current = [q for q in current if not same(q, p)]
        if result is None:
            spd = compile_(current)
            continue
        before = map_elements(spd)
        spd, script = result
        check_structure(spd)
        # the script brings the kernel's maps exactly to the new table's (nothing more:
        # replaced elements with an unchanged verdict are not touched at all)
        assert apply_elements(before, script) == map_elements(spd), script
        changed = {
            k
            for k in before.keys() | map_elements(spd).keys()
            if before.get(k) != map_elements(spd).get(k)
        }
        assert len(script.splitlines()) <= 2 * len(changed), script
        assert all(
            line.startswith(("add element inet oe_spd ", "delete element inet oe_spd "))
            for line in script.splitlines()
        )
        for d in Direction:
            for f in ALL_FLOWS:
                assert N.evaluate(spd, d, f) == xfrm_verdict(current, d, f), (d, f, script)


# --- the real table ----------------------------------------------------------------------
def real_policies(shunts: int = 0, sas: int = 0) -> list[PolicySpec]:
    cfg = PolicyConfig(
        private=(parse_policy_entry("192.0.2.0/24"), parse_policy_entry("203.0.113.0/24 tcp 443")),
        block=(parse_policy_entry("198.18.0.0/15"),),
    )
    table = PolicyTable.from_config(
        cfg, lan=[net("192.168.1.0/24")], dns_upstream=[ipaddress.ip_address("9.9.9.9")]
    )
    out = list(
        table.kernel_policies({4: WAN4, 6: WAN6}, trap_reqid=1, lan6=[net("2001:db8:1::/64")])
    )
    wan = TrafficSelector(net(f"{WAN4}/32"))
    for i in range(shunts):
        peer = ipaddress.IPv4Address(0x32000000 + i)  # 50.0.0.0 up: private-or-clear
        dst = flow_selector(peer, table.lookup(peer))
        action = PolicyAction.PASS if i % 3 else PolicyAction.DROP
        out.append(policy(wan, dst, Direction.OUT, action, selector_rank(dst.net, 0, None)))
    for i in range(sas):
        peer = ipaddress.IPv4Address(0x33000000 + i)
        dst = flow_selector(peer, table.lookup(peer))
        rank = selector_rank(dst.net, 0, None)
        out.append(policy(wan, dst, Direction.OUT, PolicyAction.IPSEC, rank))
        out.append(policy(dst, wan, Direction.IN, PolicyAction.IPSEC, rank))
        out.append(policy(dst, wan, Direction.FWD, PolicyAction.IPSEC, rank))
    return out


def test_representative_table_renders() -> None:
    pols = real_policies(shunts=3, sas=2)
    spd = N.compile_spd(
        pols, wan="wan", tun="oetun", queue_num=5, bypass_mark=0x100, ike_ports=(4500, 500)
    )
    text = N.render(spd)
    lines = [line.strip() for line in text.splitlines()]
    assert lines[:3] == ["table inet oe_spd", "delete table inet oe_spd", "table inet oe_spd {"]
    # chains: hooks, priorities, preambles
    assert "type filter hook postrouting priority srcnat + 10; policy accept;" in lines
    assert 'oifname != "wan" accept' in lines
    assert "meta mark & 0x00000100 == 0x00000100 accept" in lines
    assert "type filter hook prerouting priority dstnat - 10; policy accept;" in lines
    assert 'iifname "oetun" accept' in lines
    assert "meta l4proto udp th dport { 500, 4500 } fib daddr type local accept" in lines
    assert "fib daddr type { local, broadcast, multicast } goto in_policies" in lines
    assert lines[lines.index("chain oe_queue {") + 1] == "queue num 5"
    # exclusions first: upstream DNS, link-local/multicast, LAN, ND types
    out = lines[lines.index("chain out_policies {") + 1 : lines.index("chain inbound {") - 2]
    assert out[:3] == [
        "meta nfproto ipv4 meta l4proto 6 th dport 53 ip daddr vmap @out_0",
        "meta nfproto ipv4 meta l4proto 17 th dport 53 ip daddr vmap @out_1",
        "meta nfproto ipv4 ip daddr vmap @out_2",
    ]
    assert "meta nfproto ipv6 meta l4proto 58 icmpv6 type 135 accept" in out
    # shunts and SAs (rank 690) and the private /24 trap share one WAN-sourced map
    shunt_rule = "meta nfproto ipv4 ip saddr 198.51.100.1 ip daddr vmap @out_9"
    assert shunt_rule in out
    elements = next(x for x in lines[lines.index("map out_9 {") :] if x.startswith("elements"))
    for part in (
        "50.0.0.0 : drop",
        "50.0.0.1 : accept",
        "51.0.0.1 : goto oe_queue",
        "192.0.2.0/24 : goto oe_queue",
    ):
        assert part in elements
    # the /0 private-or-clear traps are last, and plain rules
    assert out[-3:] == [
        "meta nfproto ipv4 ip saddr 198.51.100.1 goto oe_queue",
        "meta nfproto ipv6 ip6 saddr 2001:db8::1 goto oe_queue",
        "meta nfproto ipv6 ip6 saddr 2001:db8:1::/64 goto oe_queue",
    ]
    # inbound: SA peers must arrive through the TUN device
    inb = "\n".join(lines[lines.index("chain in_policies {") :])
    assert "51.0.0.0 : drop" in text and "ip daddr 198.51.100.1 ip saddr vmap @in_" in inb
    assert N.render(spd, xt_queue=True).count("\t\tdrop\n") == 1


def test_representative_table_verdicts() -> None:
    pols = real_policies(shunts=30, sas=5)
    spd = compile_(pols)
    a = ipaddress.ip_address
    cases = [
        (Direction.OUT, N.Flow(WAN4, a("50.0.0.0"), 6, 1000, 80), N.Verdict.DROP),
        (Direction.OUT, N.Flow(WAN4, a("50.0.0.1"), 6, 1000, 80), N.Verdict.ACCEPT),
        (Direction.OUT, N.Flow(WAN4, a("51.0.0.3"), 17, 1000, 53), N.Verdict.QUEUE),
        (Direction.OUT, N.Flow(WAN4, a("8.8.8.8"), 6, 1000, 80), N.Verdict.QUEUE),  # trap
        (Direction.OUT, N.Flow(WAN4, a("9.9.9.9"), 17, 1000, 53), N.Verdict.ACCEPT),  # DNS
        (Direction.OUT, N.Flow(WAN4, a("9.9.9.9"), 17, 1000, 443), N.Verdict.QUEUE),
        (Direction.OUT, N.Flow(WAN4, a("198.18.0.1"), 6, 1000, 80), N.Verdict.DROP),  # block
        (Direction.OUT, N.Flow(a("192.168.1.5"), a("8.8.8.8"), 6, 1, 80), N.Verdict.ACCEPT),
        (Direction.IN, N.Flow(a("51.0.0.3"), WAN4, 17, 4000, 4000), N.Verdict.DROP),
        (Direction.IN, N.Flow(a("8.8.8.8"), WAN4, 6, 80, 1000), N.Verdict.ACCEPT),
        (Direction.FWD, N.Flow(a("198.18.0.9"), a("192.168.1.5"), 6, 80, 1), N.Verdict.DROP),
        (Direction.OUT, N.Flow(WAN6, a("2001:db8:77::1"), 58, icmp_type=135), N.Verdict.ACCEPT),
        (Direction.OUT, N.Flow(WAN6, a("2001:db8:77::1"), 58, icmp_type=128), N.Verdict.QUEUE),
    ]
    for d, f, want in cases:
        assert N.evaluate(spd, d, f) == want == xfrm_verdict(pols, d, f), (d, f)


def test_thousands_of_shunts_are_one_map_not_thousands_of_rules() -> None:
    pols = real_policies(shunts=2000, sas=500)
    t0 = time.perf_counter()
    spd = compile_(pols)
    text = N.render(spd)
    took = time.perf_counter() - t0
    rules = [x for x in text.splitlines() if x.startswith("\t\tmeta nfproto")]
    assert len(spd.blocks[Direction.OUT]) < 20
    assert len(rules) < 60
    biggest = max(len(b.entries) for b in spd.blocks[Direction.OUT])
    assert biggest == 2000 + 500 + 1  # shunts, SA entries, the private /24 trap
    assert took < 5.0, took


def test_incremental_shunt_is_one_element() -> None:
    spd = compile_(real_policies(shunts=10))
    wan = TrafficSelector(net(f"{WAN4}/32"))
    dst = TrafficSelector(net("50.1.2.3/32"))
    shunt = policy(wan, dst, Direction.OUT, PolicyAction.PASS, selector_rank(dst.net, 0, None))
    result = N.update(spd, add=[shunt])
    assert result is not None
    spd2, script = result
    assert script == "add element inet oe_spd out_9 { 50.1.2.3 : accept }\n"
    f = N.Flow(WAN4, ipaddress.ip_address("50.1.2.3"), 6, 1, 80)
    assert N.evaluate(spd, Direction.OUT, f) is N.Verdict.QUEUE
    assert N.evaluate(spd2, Direction.OUT, f) is N.Verdict.ACCEPT
    result = N.update(spd2, remove=[shunt])
    assert result is not None and result[1] == "delete element inet oe_spd out_9 { 50.1.2.3 }\n"
    assert N.evaluate(result[0], Direction.OUT, f) is N.Verdict.QUEUE
    # removing what is not there is not an error (Datapath.remove_policy's contract)
    assert N.update(result[0], remove=[shunt]) == (result[0], "")


def test_sa_policies_replacing_the_trap_run_no_nft() -> None:
    """A Child SA's IPSEC policies replace policies of the same selectors whose verdicts
    are the same in the kernel (queue out, drop in/fwd): no element changes, empty script."""
    pols = real_policies(sas=3)
    spd = compile_(pols)
    olds = [p for p in pols if p.action is PolicyAction.IPSEC][:3]  # one SA: out, in, fwd
    new = [replace(p, templates=(Template(WAN4, WAN6, 7, Mode.TUNNEL),)) for p in olds]
    result = N.update(spd, add=new, remove=olds)
    assert result is not None
    spd2, script = result
    assert script == ""
    assert map_elements(spd2) == map_elements(spd)
    # the new policies are the ones the table now holds (a later removal finds them)
    gone = N.update(spd2, remove=new)
    assert gone is not None and gone[1].count("delete element") == 3


def test_replacement_with_another_verdict_changes_the_element() -> None:
    spd = compile_(real_policies(shunts=10))
    wan = TrafficSelector(net(f"{WAN4}/32"))
    dst = TrafficSelector(net("50.0.0.1/32"))  # shunt 1: PASS
    rank = selector_rank(dst.net, 0, None)
    old = policy(wan, dst, Direction.OUT, PolicyAction.PASS, rank)
    drop = policy(wan, dst, Direction.OUT, PolicyAction.DROP, rank)
    result = N.update(spd, add=[drop], remove=[old])
    assert result is not None
    assert result[1] == (
        "delete element inet oe_spd out_9 { 50.0.0.1 }\n"
        "add element inet oe_spd out_9 { 50.0.0.1 : drop }\n"
    )
    # and back: the kernel's maps are as before
    undo = N.update(result[0], add=[old], remove=[drop])
    assert undo is not None
    assert apply_elements(map_elements(result[0]), undo[1]) == map_elements(spd)


def test_update_that_needs_a_new_rule_says_so() -> None:
    spd = compile_(real_policies())
    odd = policy(
        TrafficSelector(net("0.0.0.0/0"), 47),
        TrafficSelector(net("50.1.2.3/32"), 47),
        Direction.OUT,
        PolicyAction.DROP,
        1,
    )
    assert N.update(spd, add=[odd]) is None


def test_emptied_map_refilled_with_a_lone_default_rerenders() -> None:
    """Regression (hypothesis): a map emptied by removals stays a map in the kernel; a
    ``/0`` key added to it would make the table read as a plain rule without the map
    (``map_names`` losing it, the next whole write leaving it behind), so the update
    asks for the whole table. A narrower key still goes in as one element."""
    any4 = TrafficSelector(net("0.0.0.0/0"))
    host = policy(TrafficSelector(net("10.0.0.3/32")), any4, Direction.FWD, PolicyAction.IPSEC, 2)
    result = N.update(compile_([host]), remove=[host])
    assert result is not None
    emptied, script = result
    assert script == "delete element inet oe_spd fwd_0 { 10.0.0.3 }\n"
    assert N.map_names(emptied) == ["fwd_0"]
    wide = policy(any4, any4, Direction.FWD, PolicyAction.IPSEC, 0)
    assert N.update(emptied, add=[wide]) is None
    assert N.update_elements(emptied, add=[wide]) is None
    whole = compile_([wide])  # what is written instead: a plain rule, no map
    assert N.map_names(whole) == []
    f = N.Flow(ipaddress.ip_address("10.0.0.9"), ipaddress.ip_address("10.0.0.1"), 6, 1, 80)
    assert N.evaluate(whole, Direction.FWD, f) is N.Verdict.DROP
    other = policy(TrafficSelector(net("10.0.0.5/32")), any4, Direction.FWD, PolicyAction.IPSEC, 2)
    result = N.update(emptied, add=[other])
    assert result is not None and result[1] == "add element inet oe_spd fwd_0 { 10.0.0.5 : drop }\n"
    assert N.map_names(result[0]) == ["fwd_0"]


@pytest.mark.parametrize(
    ("kwargs", "why"),
    [
        ({"wan": "bad name"}, "WAN device"),
        ({"tun": ""}, "TUN device"),
        ({"queue_num": 70000}, "out of range"),
        ({"bypass_mark": 0}, "non-zero"),
    ],
)
def test_bad_arguments_are_named(kwargs: dict[str, object], why: str) -> None:
    args: dict[str, object] = {"wan": "wan", "tun": "oetun", "queue_num": 1, **kwargs}
    with pytest.raises(N.NftSpdError, match=why):
        N.compile_spd([], **args)  # type: ignore[arg-type]


def test_port_without_protocol_is_refused() -> None:
    p = policy(
        TrafficSelector(net("0.0.0.0/0")),
        TrafficSelector(net("10.0.0.1/32"), 0, 53),
        Direction.OUT,
        PolicyAction.PASS,
        0,
    )
    with pytest.raises(N.NftSpdError, match="needs a protocol with ports"):
        compile_([p])


def test_marked_policy_is_refused() -> None:
    p = PolicySpec(
        TrafficSelector(net("0.0.0.0/0")),
        TrafficSelector(net("10.0.0.1/32")),
        Direction.OUT,
        PolicyAction.PASS,
        mark=Mark(1),
    )
    with pytest.raises(N.NftSpdError, match="marked policies"):
        compile_([p])


def test_empty_table_accepts_everything() -> None:
    spd = compile_([])
    f = N.Flow(WAN4, ipaddress.ip_address("8.8.8.8"), 6, 1, 2)
    assert all(N.evaluate(spd, d, f) is N.Verdict.ACCEPT for d in Direction)
    assert "chain out_policies {\n\t}" in N.render(spd)


def test_later_ip_fragments_to_a_local_address_reach_reassembly() -> None:
    """Only an IKE datagram's first IP fragment has the UDP port: the rest pass to local
    reassembly (which judges the datagram by its first fragment), v4 and v6."""
    text = N.render(compile_(real_policies(shunts=1)))
    inbound = text[text.index("chain inbound {") :]
    inbound = inbound[: inbound.index("\n\t}")]
    assert "ip frag-off & 0x1fff != 0 fib daddr type local accept" in inbound
    assert "frag frag-off != 0 fib daddr type local accept" in inbound
    assert inbound.index("frag-off") < inbound.index("goto")


# --- the projection's nft runs: batching and their order ----------------------------------
class _Recorded(N.SpdProjection):
    """nft left out: each run is recorded, and a run blocks until the test lets it end
    (a slow nft), so what is in flight when a change arrives is under the test's control."""

    def __init__(self) -> None:
        super().__init__(wan="wan", tun="oetun", queue_num=5, bypass_mark=0x100, ike_ports=())
        self._backend = "nft"
        self.log: list[tuple[str, str]] = []  # ("elements", script) / ("whole", n policies)
        self.gate = threading.Event()
        self.gate.set()
        self.fail_next = False

    def _gate(self) -> None:
        assert self.gate.wait(10)
        if self.fail_next:
            self.fail_next = False
            raise N.NftSpdError("nft refused (test)")

    def _run_elements(self, script: str, changes: Any = None) -> None:
        self._gate()
        self.log.append(("elements", script))

    def _write(self, policies: list[PolicySpec]) -> N.SpdTable:
        self._gate()
        self.log.append(("whole", str(len(policies))))
        return compile_(policies)


def _shunt(i: int, action: PolicyAction = PolicyAction.PASS) -> PolicySpec:
    wan = TrafficSelector(net(f"{WAN4}/32"))
    dst = TrafficSelector(net(f"50.0.1.{i}/32"))
    return policy(wan, dst, Direction.OUT, action, selector_rank(dst.net, 0, None))


def test_projection_batches_one_turn_and_what_arrives_during_a_run() -> None:
    """Changes of one event-loop turn share one nft run; changes arriving while a run is
    in flight share the next; runs keep the order of the changes, and no caller returns
    before the run carrying its change has ended."""

    async def run() -> None:
        proj = _Recorded()
        current = real_policies(shunts=10)
        await proj.go_live(current)
        assert proj.log == [("whole", str(len(current)))]

        def add(p: PolicySpec) -> Any:
            current.append(p)
            return proj.project(lambda: list(current), add=[p])

        first = [asyncio.create_task(add(_shunt(i))) for i in range(1, 4)]
        await asyncio.sleep(0)  # the three changes are made in this turn
        proj.gate.clear()  # the first run now hangs in "nft"
        for _ in range(50):
            await asyncio.sleep(0.01)
            if proj._lock.locked():
                break
        second = [asyncio.create_task(add(_shunt(i))) for i in range(4, 8)]
        await asyncio.sleep(0.05)
        assert not any(t.done() for t in first + second)  # nobody returns early
        proj.gate.set()
        await asyncio.gather(*first, *second)
        runs = proj.log[1:]
        assert [kind for kind, _ in runs] == ["elements", "elements"]
        assert runs[0][1].count("add element") == 3 and "50.0.1.1 " in runs[0][1]
        assert runs[1][1].count("add element") == 4 and "50.0.1.7 " in runs[1][1]
        assert proj.runs == {"elements": 2, "whole": 1, "nft": 0}

    asyncio.run(run())


def test_projection_runs_no_nft_for_unchanged_elements() -> None:
    async def run() -> None:
        proj = _Recorded()
        current = real_policies(shunts=3, sas=2)
        await proj.go_live(current)
        olds = [p for p in current if p.action is PolicyAction.IPSEC][:3]
        new = [replace(p, templates=(Template(WAN4, WAN4, 9, Mode.TUNNEL),)) for p in olds]
        await proj.project(lambda: current, add=new, remove=olds)
        assert proj.runs == {"elements": 0, "whole": 1, "nft": 0}

    asyncio.run(run())


def test_projection_after_a_failed_run_writes_the_whole_table() -> None:
    """A refused run fails its callers; the batch queued behind it (computed on top of
    it) becomes a whole-table write of the policies as they are then."""

    async def run() -> None:
        proj = _Recorded()
        current = real_policies(shunts=10)
        await proj.go_live(current)

        def add(p: PolicySpec) -> Any:
            current.append(p)
            return proj.project(lambda: list(current), add=[p])

        proj.gate.clear()
        proj.fail_next = True
        failing = asyncio.create_task(add(_shunt(1)))
        for _ in range(50):
            await asyncio.sleep(0.01)
            if proj._lock.locked():
                break
        behind = asyncio.create_task(add(_shunt(2)))
        await asyncio.sleep(0.02)
        proj.gate.set()
        with pytest.raises(N.DatapathError, match="refused"):
            await failing
        await behind
        assert proj.log[-1] == ("whole", str(len(current)))
        # and the next change is an element change again
        await add(_shunt(3))
        assert proj.log[-1][0] == "elements" and "50.0.1.3 " in proj.log[-1][1]

    asyncio.run(run())


def test_whole_write_waits_for_the_batch_opened_before_it() -> None:
    async def run() -> None:
        proj = _Recorded()
        current = real_policies(shunts=10)
        await proj.go_live(current)
        p = _shunt(1)
        current.append(p)
        batch = asyncio.create_task(proj.project(lambda: list(current), add=[p]))
        await asyncio.sleep(0)
        odd = policy(
            TrafficSelector(net("0.0.0.0/0"), 47),
            TrafficSelector(net("50.1.2.3/32"), 47),
            Direction.OUT,
            PolicyAction.DROP,
            1,
        )
        current.append(odd)
        await proj.project(lambda: list(current), add=[odd])  # a new rule: whole table
        await batch
        assert [k for k, _ in proj.log] == ["whole", "elements", "whole"]

    asyncio.run(run())
