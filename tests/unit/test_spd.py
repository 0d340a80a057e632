"""datapath.spd against XFRM's semantics.

The reference is a literal model of the kernel's ordered policy list: the insertion loop
of xfrm_policy_insert_list (net/xfrm/xfrm_policy.c) on a Python list, and a lookup that
returns the first policy in list order whose selector matches (xfrm_selector_match and
the mark test of xfrm_policy_match), with matching done here through ``ipaddress``.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from oe_router.datapath.base import (
    DatapathError,
    Direction,
    Lifetime,
    Mark,
    PolicyAction,
    PolicySpec,
    Template,
    TrafficSelector,
)
from oe_router.datapath.esp import OutboundSa
from oe_router.datapath.packet import Flow
from oe_router.datapath.spd import Sad, Spd
from oe_router.offload.engine import TRANSFORMS
from oe_router.offload.software import SoftwareEngine

LOCAL = ipaddress.ip_address("192.0.2.1")
PEER = ipaddress.ip_address("198.51.100.2")


def net(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(text)


def pol(
    src: str,
    dst: str,
    *,
    direction: Direction = Direction.OUT,
    action: PolicyAction = PolicyAction.PASS,
    rank: int = 0,
    proto: int = 0,
    sport: int | None = None,
    dport: int | None = None,
    icmp: int | None = None,
    mark: Mark | None = None,
    persistent: bool = False,
    reqid: int = 7,
    lifetime: Lifetime | None = None,
) -> PolicySpec:
    tmpl = (
        (Template(LOCAL, PEER, reqid),) if action in (PolicyAction.IPSEC, PolicyAction.TRAP) else ()
    )
    return PolicySpec(
        TrafficSelector(net(src), proto, sport),
        TrafficSelector(net(dst), proto, dport, icmp),
        direction,
        action,
        rank,
        tmpl,
        lifetime or Lifetime(),
        mark,
        persistent,
    )


def flow(src: str, dst: str, proto: int = 6, sport: int = 1234, dport: int = 80) -> Flow:
    a, b = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    return Flow(a.version, int(a), int(b), proto, sport, dport)


# --- the kernel model ------------------------------------------------------------------------
def kernel_selector(p: PolicySpec) -> tuple[object, ...]:
    icmp = p.src.icmp_type if p.src.icmp_type is not None else p.dst.icmp_type
    sport = p.src.port if icmp is None else icmp
    mark = (p.mark.value, p.mark.mask) if p.mark else (0, 0)
    return (p.direction, p.src.net, p.dst.net, p.dst.proto or p.src.proto, sport, p.dst.port, mark)


@dataclass
class KernelModel:
    chain: list[PolicySpec]

    @staticmethod
    def prio(p: PolicySpec) -> int:
        return 2 * p.priority + int(p.persistent)

    def insert(self, policy: PolicySpec) -> None:
        """xfrm_policy_insert_list, step by step."""
        newpos: int | None = None
        delpol: int | None = None
        for i, p in enumerate(self.chain):
            if delpol is None and kernel_selector(p) == kernel_selector(policy):
                delpol = i
                if self.prio(policy) > self.prio(p):
                    continue
            elif self.prio(policy) >= self.prio(p):
                newpos = i
                continue
            if delpol is not None:
                break
        at = 0 if newpos is None else newpos + 1
        self.chain.insert(at, policy)
        if delpol is not None:
            del self.chain[delpol + 1 if delpol >= at else delpol]

    def delete(self, policy: PolicySpec) -> None:
        self.chain = [p for p in self.chain if kernel_selector(p) != kernel_selector(policy)]

    def lookup(self, direction: Direction, f: Flow, mark: int) -> PolicySpec | None:
        for p in self.chain:
            if p.direction is direction and selector_match(p, f, mark):
                return p
        return None


def selector_match(p: PolicySpec, f: Flow, mark: int) -> bool:
    if p.src.net.version != f.version:
        return False
    if f.src_address not in p.src.net or f.dst_address not in p.dst.net:
        return False
    proto = p.dst.proto or p.src.proto
    if proto and proto != f.proto:
        return False
    icmp = p.src.icmp_type if p.src.icmp_type is not None else p.dst.icmp_type
    sport = p.src.port if icmp is None else icmp
    if sport is not None and f.sport != sport:
        return False
    if p.dst.port is not None and f.dport != p.dst.port:
        return False
    value, mask = (p.mark.value, p.mark.mask) if p.mark else (0, 0)
    return mark & mask == value


NETS4 = ["0.0.0.0/0", "10.0.0.0/8", "10.1.0.0/16", "10.1.2.0/24", "10.1.2.3/32", "10.1.2.4/32",
         "192.0.2.0/24", "192.0.2.9/32"]  # fmt: skip
NETS6 = ["::/0", "2001:db8::/32", "2001:db8::1/128"]
ADDRS4 = ["10.1.2.3", "10.1.2.4", "10.2.0.1", "192.0.2.9", "8.8.8.8"]
ADDRS6 = ["2001:db8::1", "2001:db8::2", "2001:db9::1"]


@st.composite
def policies(draw: st.DrawFn) -> PolicySpec:
    v6 = draw(st.integers(0, 5)) == 0
    nets = NETS6 if v6 else NETS4
    proto = draw(st.sampled_from([0, 6, 17, 1 if not v6 else 58]))
    icmp = draw(st.sampled_from([None, 8, 128])) if proto in (1, 58) else None
    ports = [None, 80, 443, 1234]
    return pol(
        draw(st.sampled_from(nets)),
        draw(st.sampled_from(nets)),
        direction=draw(st.sampled_from(list(Direction))),
        action=draw(st.sampled_from([PolicyAction.PASS, PolicyAction.DROP, PolicyAction.IPSEC])),
        rank=draw(st.integers(0, 2)),
        proto=proto,
        sport=None if icmp is not None or proto in (1, 58) else draw(st.sampled_from(ports)),
        dport=None if proto in (1, 58) else draw(st.sampled_from(ports)),
        icmp=icmp,
        mark=draw(st.sampled_from([None, None, Mark(1, 0xFF), Mark(0, 0)])),
        persistent=draw(st.booleans()),
    )


@st.composite
def flows(draw: st.DrawFn) -> tuple[Flow, int]:
    addrs = ADDRS6 if draw(st.integers(0, 5)) == 0 else ADDRS4
    proto = draw(st.sampled_from([6, 17, 1, 58, 50]))
    f = flow(
        draw(st.sampled_from(addrs)),
        draw(st.sampled_from(addrs)),
        proto,
        draw(st.sampled_from([0, 8, 80, 128, 1234])),
        draw(st.sampled_from([0, 80, 443])),
    )
    return f, draw(st.sampled_from([0, 1, 0x101]))


@settings(max_examples=200)
@given(
    ops=st.lists(st.tuples(st.booleans(), policies()), min_size=1, max_size=40),
    probes=st.lists(flows(), min_size=1, max_size=30),
)
def test_lookup_equals_the_kernel_list(
    ops: list[tuple[bool, PolicySpec]], probes: list[tuple[Flow, int]]
) -> None:
    spd, model = Spd(), KernelModel([])
    for i, (add, p) in enumerate(ops):
        if add or i % 3:
            spd.install(p)
            model.insert(p)
        else:
            assert spd.remove(p) == any(
                kernel_selector(q) == kernel_selector(p) for q in model.chain
            )
            model.delete(p)
        for f, mark in probes[: 1 + i % 3]:  # lookups between changes: caches must follow
            for d in Direction:
                assert spd.lookup(d, f, mark) == model.lookup(d, f, mark)
    assert len(spd) == len(model.chain)
    for d in Direction:
        assert spd.policies(d) == [p for p in model.chain if p.direction is d]
        for f, mark in probes:
            expected = model.lookup(d, f, mark)
            assert spd.lookup(d, f, mark) == expected  # cached
            assert spd.lookup(d, f, mark) == expected  # from the cache
            e = spd.search(d, f, mark)
            assert (e.policy if e else None) == expected


def test_ties_go_to_the_earlier_installed_and_replacement_keeps_its_place() -> None:
    spd = Spd()
    wide = pol("10.0.0.0/8", "0.0.0.0/0", action=PolicyAction.DROP)
    narrow = pol("10.1.2.0/24", "0.0.0.0/0")
    spd.install(wide)
    spd.install(narrow)
    f = flow("10.1.2.3", "8.8.8.8")
    assert spd.lookup(Direction.OUT, f) == wide  # same rank: first installed
    wide2 = pol("10.0.0.0/8", "0.0.0.0/0", action=PolicyAction.PASS)
    spd.install(wide2)  # same key, same priority: replaces in place
    assert spd.lookup(Direction.OUT, f) == wide2 and len(spd) == 2
    spd.install(pol("10.0.0.0/8", "0.0.0.0/0", rank=1))
    spd.install(pol("10.0.0.0/8", "0.0.0.0/0", rank=0))  # back, but behind its new equals
    assert spd.lookup(Direction.OUT, f) == narrow
    assert spd.lookup(Direction.OUT, f, 0) == narrow
    spd.install(pol("10.1.2.3/32", "8.8.8.8/32", rank=0, persistent=True))
    assert spd.lookup(Direction.OUT, f) == narrow  # persistent: 2*rank+1 ranks after
    better = pol("10.1.2.3/32", "8.8.8.8/32", rank=0, proto=6, dport=80)
    spd.install(better)  # more specific, equal priority, installed later: not first
    assert spd.lookup(Direction.OUT, f) == narrow
    assert spd.lookup(Direction.OUT, f._replace(dport=443)) == narrow


def test_priority_beats_prefix_length_and_icmp_type_sits_in_sport() -> None:
    spd = Spd()
    trap = pol("192.0.2.0/24", "0.0.0.0/0", action=PolicyAction.TRAP, rank=5)
    shunt = pol("192.0.2.0/24", "198.51.100.0/24", rank=1, proto=1, icmp=8)
    spd.install(trap)
    spd.install(shunt)
    echo = flow("192.0.2.1", "198.51.100.2", 1, 8, 0)
    reply = flow("192.0.2.1", "198.51.100.2", 1, 0, 0)
    assert spd.lookup(Direction.OUT, echo) == shunt
    assert spd.lookup(Direction.OUT, reply) == trap
    # the same kernel selector with the type carried on the other side: a replacement
    other_side = PolicySpec(
        TrafficSelector(net("192.0.2.0/24"), 1, None, 8),
        TrafficSelector(net("198.51.100.0/24"), 1),
        Direction.OUT,
        PolicyAction.DROP,
        1,
    )
    spd.install(other_side)
    assert len(spd) == 2 and spd.lookup(Direction.OUT, echo) == other_side


def test_marks_and_directions_are_separate_policies() -> None:
    spd = Spd()
    a = pol("10.0.0.0/8", "0.0.0.0/0", mark=Mark(1, 0xFF))
    b = pol("10.0.0.0/8", "0.0.0.0/0", action=PolicyAction.DROP)
    c = pol("10.0.0.0/8", "0.0.0.0/0", direction=Direction.IN)
    for p in (a, b, c):
        spd.install(p)
    f = flow("10.0.0.1", "1.1.1.1")
    assert len(spd) == 3
    assert spd.lookup(Direction.OUT, f, 0x201) == a  # 0x201 & 0xff == 1
    assert spd.lookup(Direction.OUT, f, 2) == b
    assert spd.lookup(Direction.IN, f) == c
    assert spd.lookup(Direction.FWD, f) is None


def test_match_exposes_what_the_worker_needs() -> None:
    spd = Spd()
    p = pol("10.0.0.0/8", "198.51.100.2/32", action=PolicyAction.IPSEC, reqid=0x4F450001)
    e1 = spd.install(p)
    e = spd.match(Direction.OUT, flow("10.9.9.9", "198.51.100.2"))
    assert e is not None and e.action is PolicyAction.IPSEC and e.policy == p
    assert e.sa_key == (int(LOCAL), int(PEER), 0x4F450001)
    assert e.index & 7 == 1 and spd.install(p).index == e1.index  # kept on replacement
    assert spd.install(pol("10.0.0.0/8", "0.0.0.0/0", direction=Direction.FWD)).index & 7 == 2


def test_more_than_one_template_is_refused() -> None:
    t = Template(LOCAL, PEER, 1)
    p = PolicySpec(
        TrafficSelector(net("10.0.0.0/8")),
        TrafficSelector(net("0.0.0.0/0")),
        Direction.OUT,
        PolicyAction.IPSEC,
        0,
        (t, t),
    )
    with pytest.raises(DatapathError, match="one ESP template"):
        Spd().install(p)


def test_policy_lifetimes_by_add_time() -> None:
    spd = Spd()
    shunt = pol("10.0.0.0/8", "8.8.8.8/32", lifetime=Lifetime(soft_seconds=10, hard_seconds=15))
    spd.install(shunt, now=100.0)
    f = flow("10.0.0.1", "8.8.8.8")
    assert spd.lookup(Direction.OUT, f) == shunt
    assert spd.expire(105.0) == []
    [soft] = spd.expire(110.0)
    assert not soft.hard and soft.src == shunt.src and soft.direction is Direction.OUT
    assert spd.expire(111.0) == []
    spd.install(shunt, now=111.0)  # re-installed: the clock starts again, as UPDPOLICY
    assert spd.expire(121.0) != [] and spd.lookup(Direction.OUT, f) == shunt  # soft again
    [hard] = spd.expire(126.0)
    assert hard.hard and spd.lookup(Direction.OUT, f) is None and len(spd) == 0


def test_cache_follows_every_change() -> None:
    spd = Spd()
    f1, f2 = flow("10.0.0.1", "8.8.8.8", 6, 1, 80), flow("10.0.0.1", "8.8.8.8", 6, 2, 443)
    assert spd.lookup(Direction.OUT, f1) is None
    wide = pol("10.0.0.0/8", "0.0.0.0/0")
    spd.install(wide)
    assert spd.lookup(Direction.OUT, f1) == wide == spd.lookup(Direction.OUT, f2)
    web = pol("10.0.0.0/8", "8.8.8.8/32", rank=0, proto=6, dport=443, action=PolicyAction.DROP)
    spd.install(pol("10.0.0.0/8", "0.0.0.0/0", rank=1))  # moves behind
    spd.install(web)
    assert spd.lookup(Direction.OUT, f2) == web  # the key now includes ports
    assert spd.lookup(Direction.OUT, f1) == pol("10.0.0.0/8", "0.0.0.0/0", rank=1)
    spd.remove(web)
    assert spd.lookup(Direction.OUT, f2) == pol("10.0.0.0/8", "0.0.0.0/0", rank=1)
    spd.clear()
    assert spd.lookup(Direction.OUT, f2) is None


def test_cache_is_bounded() -> None:
    spd = Spd(cache_size=8)
    spd.install(pol("0.0.0.0/0", "0.0.0.0/0", proto=6, dport=80))
    for i in range(100):
        assert spd.lookup(Direction.OUT, flow("10.0.0.1", f"10.0.1.{i}")) is not None
        assert spd.cached <= 8


# --- SAD -----------------------------------------------------------------------------------
T = TRANSFORMS["aes128gcm16"]
ENGINE = SoftwareEngine()


def out_sa(spi: int, **kw: object) -> OutboundSa:
    return OutboundSa(spi, ENGINE.cipher(T, os.urandom(20)), esn=False, **kw)  # type: ignore[arg-type]


def test_outbound_by_template_prefers_newest_then_not_dying() -> None:
    sad = Sad()
    key = (int(LOCAL), int(PEER), 7)
    assert sad.outbound(key) is None
    old = out_sa(0x100, lifetime=Lifetime(soft_packets=1))
    sad.add_outbound(LOCAL, PEER, 7, old)
    assert sad.outbound(key) is old
    new = out_sa(0x200, lifetime=Lifetime(soft_packets=1, hard_packets=2))
    sad.add_outbound(LOCAL, PEER, 7, new)  # a rekey: the new one takes over at once
    assert sad.outbound(key) is new and sad.outbound_for(Template(LOCAL, PEER, 7)) is new
    for _ in range(2):
        new.seal(b"x", 4)  # now dying (soft limit crossed)
    assert new.dying and sad.outbound(key) is old
    for _ in range(2):
        old.seal(b"x", 4)
    assert sad.outbound(key) is new  # both dying: the newest still usable
    with pytest.raises(Exception):  # noqa: B017 - hard limit: new refuses now
        new.seal(b"x", 4)
    assert sad.outbound(key) is old
    assert sad.outbound((int(LOCAL), int(PEER), 0)) is old  # reqid 0: any reqid
    assert sad.outbound((int(LOCAL), int(PEER), 8)) is None
    assert sad.remove_outbound(LOCAL, PEER, 7, 0x100)
    assert not sad.remove_outbound(LOCAL, PEER, 7, 0x100)
    assert sad.outbound(key) is None  # only the hard-expired one is left: never used
    with pytest.raises(DatapathError):
        sad.add_outbound(LOCAL, PEER, 7, out_sa(0x200))


def test_inbound_by_spi() -> None:
    from oe_router.datapath.esp import InboundSa

    sad = Sad()
    sa = InboundSa(0xC0000001, ENGINE.cipher(T, os.urandom(20)), esn=True)
    sad.add_inbound(sa)
    assert sad.inbound(0xC0000001) is sa and sad.inbound(1) is None
    with pytest.raises(DatapathError, match="0xc0000001"):
        sad.add_inbound(sa)
    assert list(sad.inbound_sas()) == [sa] and len(sad) == 1
    assert sad.remove_inbound(0xC0000001) is sa and sad.inbound(0xC0000001) is None
