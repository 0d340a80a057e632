"""Keyless names on the kernel datapath (issue 16 part 2): the pass shunt is in XFRM
before the answer reaches the client, and the first SYN passes without an IKE probe.

Topology (fresh netns): R, the router (WAN 198.51.100.1 on r0, its XFRM holds the OE
service's policies), and W, the world (198.51.100.2, with the lab's plain .20,
insecure .21 and bogus .22 hosts on its loopback, a TCP listener on each). knotd serves
the lab hierarchy (labkit.world.zone_spec) on loopback: plain.example.test has a signed
NSEC denial of IPSECKEY, www.insecure.test sits in an unsigned delegation, www.bogus.test
has bad signatures. The DNS front (DnsService, the production validator) and the OE
service (kernel datapath of R, tests/host/probe.py's ProbeNegotiator at the IKE seam)
run on one event loop, as in the daemon; the client asks over UDP on that loop.

Observed: the time the datapath finished installing each policy (a wrapper around the
kernel datapath's ``install_policy``) against the time the answer arrived; the kernel's
policy right after the answer (``ip xfrm policy get``); the connect time of a TCP
connection from R and whether the probe was asked to negotiate; ``oe status``'s shunt rows.
"""

from __future__ import annotations

import asyncio
import ipaddress
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import dns.asyncquery
import dns.message
import dns.rcode
import pytest
from bench.bench_dns_front import free_port

from oe_router.config.schema import DnsConfig, Endpoint
from oe_router.datapath.base import PolicyAction, PolicySpec
from oe_router.datapath.netns import in_netns
from oe_router.dns.service import DnsService
from oe_router.dns.upstream import UpstreamSettings
from oe_router.oe.service import OeService, kernel_datapath
from tests.aio import running
from tests.host.netlab import MakeNetns
from tests.host.netlab import ip as _ip
from tests.host.probe import WAN, ProbeNegotiator, probe_config

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "qemu"))

from labkit import world
from labkit.knot import KnotServer
from labkit.zones import BuiltHierarchy, build_hierarchy

pytestmark = pytest.mark.host

KNOT_HOST = "127.0.0.1"
PLAIN, INSECURE, BOGUS = "203.0.113.20", "203.0.113.21", "203.0.113.22"
HTTP = 8080
#: A trapped SYN is lost and retransmitted after 1 s; a passed one connects at once.
NO_WAIT = 0.5


@dataclass
class Knot:
    hier: BuiltHierarchy
    port: int


@pytest.fixture(scope="module")
def knot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Knot]:
    if shutil.which("knotd") is None:
        pytest.fail("knotd missing: apt-get install $(cat scripts/apt-packages.txt)")
    base = tmp_path_factory.mktemp("keyless")
    keys = world.WorldKeys.generate()
    hier = build_hierarchy(world.zone_spec(keys, [KNOT_HOST]), base / "zones")
    port = free_port(KNOT_HOST)
    with KnotServer(hier, KNOT_HOST, port, base / "run"):
        yield Knot(hier, port)


@pytest.fixture
def nets(make_netns: MakeNetns) -> Iterator[tuple[str, str]]:
    r, w = make_netns("kl-r"), make_netns("kl-w")
    _ip("-n", r, "link", "add", "r0", "type", "veth", "peer", "name", "w0", "netns", w)
    for ns, dev, addr in ((r, "r0", "198.51.100.1/24"), (w, "w0", "198.51.100.2/24")):
        _ip("-n", ns, "link", "set", dev, "up")
        _ip("-n", ns, "addr", "add", addr, "dev", dev)
    _ip("-n", r, "route", "add", "203.0.113.0/24", "via", "198.51.100.2")
    listeners = []
    for addr in (PLAIN, INSECURE, BOGUS):
        _ip("-n", w, "addr", "add", f"{addr}/32", "dev", "lo")
        with in_netns(w):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.bind((addr, HTTP))
        s.listen(8)
        listeners.append(s)
    try:
        yield r, w
    finally:
        for s in listeners:
            s.close()


@dataclass
class Router:
    """The OE service and the DNS front on one loop, and what the datapath installed."""

    oe: OeService
    neg: ProbeNegotiator
    dns: DnsService
    installed: list[tuple[float, PolicySpec]] = field(default_factory=list)

    async def ask(self, name: str) -> tuple[dns.message.Message, float]:
        """The A answer for ``name`` and when it arrived (monotonic)."""
        port = self.dns.bound[0].port
        q = dns.message.make_query(name, "A")
        msg = await dns.asyncquery.udp(q, "127.0.0.1", port=port, timeout=10)
        return msg, time.monotonic()

    def shunt_done_at(self, dst: str) -> float | None:
        """When the pass policy out to ``dst`` was in the kernel (first install)."""
        net = ipaddress.ip_network(dst)
        for at, pol in self.installed:
            if pol.dst.net == net and pol.action is PolicyAction.PASS:
                return at
        return None

    def shunt_rows(self, dst: str) -> list[dict[str, Any]]:
        rows = self.oe.status().shunts or ()
        return [
            {"kind": s.kind, "reason": s.reason, "expires_s": s.expires_s}
            for s in rows
            if s.destination == f"{dst}/32"
        ]


def _router(r: str, knot: Knot) -> tuple[Router, Any]:
    neg = ProbeNegotiator(r)
    make_dp = kernel_datapath(r)
    installed: list[tuple[float, PolicySpec]] = []

    def factory(config: Any) -> Any:
        dp = make_dp(config)
        install = dp.install_policy

        async def recording(policy: PolicySpec) -> None:
            await install(policy)
            installed.append((time.monotonic(), policy))

        dp.install_policy = recording
        return dp

    oe = OeService(datapath_factory=factory, negotiator=neg, wan={4: WAN})
    front = DnsService(tunnels=oe, upstream_settings=UpstreamSettings(timeout=2.0, tries=1))
    config = replace(
        probe_config(),
        dns=DnsConfig(
            listen=(Endpoint("127.0.0.1", 0),),
            upstream=(Endpoint(KNOT_HOST, knot.port),),
            trust_anchor=str(knot.hier.trust_anchor_ds),
            ttl_cap=60.0,
        ),
    )
    return Router(oe, neg, front, installed), config


async def _connect(netns: str, dst: str) -> float:
    """Seconds a TCP connect from ``netns`` to ``dst`` takes (the router's own flow, from
    the WAN address: it meets the same trap or shunt as a NATed LAN flow)."""
    with in_netns(netns):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setblocking(False)
    t0 = time.monotonic()
    try:
        await asyncio.wait_for(asyncio.get_running_loop().sock_connect(s, (dst, HTTP)), 10)
        return time.monotonic() - t0
    finally:
        s.close()


def _kernel_policy(netns: str, dst: str) -> str:
    try:
        return _ip("-n", netns, "-s", "xfrm", "policy", "get", "src", f"{WAN}/32", "dst",
                   f"{dst}/32", "dir", "out")  # fmt: skip
    except subprocess.CalledProcessError:
        return ""


@pytest.mark.parametrize(
    ("name", "addr", "reason"),
    [
        ("plain.example.test.", PLAIN, "private-or-clear: no key (secure denial)"),
        ("www.insecure.test.", INSECURE, "private-or-clear: no key (insecure zone)"),
    ],
    ids=["secure-denial", "insecure"],
)
def test_keyless_answer_leaves_after_the_xfrm_pass_and_the_syn_is_not_probed(
    nets: tuple[str, str], knot: Knot, name: str, addr: str, reason: str
) -> None:
    r, _ = nets
    router, config = _router(r, knot)

    async def body() -> dict[str, float]:
        async with running(router.oe, config), running(router.dns, config):
            assert _kernel_policy(r, addr) == ""  # only the group's trap so far
            msg, answered_at = await router.ask(name)
            policy = _kernel_policy(r, addr)  # read the moment the answer is in
            assert msg.rcode() == dns.rcode.NOERROR, msg
            assert {rd.address for rr in msg.answer for rd in rr} == {addr}
            done_at = router.shunt_done_at(addr)
            assert done_at is not None, f"no pass policy for {addr}: {router.installed}"
            assert done_at <= answered_at, "the answer reached the client before the shunt"
            assert "action allow" in policy and "dir out" in policy, policy
            # the answer's TTL after ttl_cap (60 s): the kernel removes the shunt then
            assert "expire add: soft 0(sec), hard 60(sec)" in policy, policy
            (row,) = router.shunt_rows(addr)
            assert row["kind"] == "pass" and row["reason"] == reason, row
            connect = await _connect(r, addr)
            assert connect < NO_WAIT, f"connect took {connect:.3f} s: the SYN met the trap"
            assert router.neg.requests == [], "the router probed a keyless host with IKE"
            return {"answer_after_shunt_ms": (answered_at - done_at) * 1000, "connect": connect}

    figures = asyncio.run(body())
    print(f"\n{name}: {figures}")


def test_bogus_answer_gets_no_shunt(nets: tuple[str, str], knot: Knot) -> None:
    r, _ = nets
    router, config = _router(r, knot)

    async def body() -> None:
        async with running(router.oe, config), running(router.dns, config):
            msg, _ = await router.ask("www.bogus.test.")
            assert msg.rcode() == dns.rcode.SERVFAIL
            assert router.shunt_done_at(BOGUS) is None
            assert _kernel_policy(r, BOGUS) == ""
            assert router.shunt_rows(BOGUS) == []

    asyncio.run(body())


def test_keyless_probe_keeps_the_trap(nets: tuple[str, str], knot: Knot) -> None:
    """``keyless probe``: today's behaviour, measured against the same world: no shunt
    before the answer, the first SYN is trapped and the probe asked to negotiate."""
    r, _ = nets
    router, config = _router(r, knot)
    config = replace(config, dns=replace(config.dns, keyless="probe"))

    async def body() -> float:
        async with running(router.oe, config), running(router.dns, config):
            msg, _ = await router.ask("plain.example.test.")
            assert msg.rcode() == dns.rcode.NOERROR
            assert router.shunt_done_at(PLAIN) is None and _kernel_policy(r, PLAIN) == ""
            connect = await _connect(r, PLAIN)
            assert [str(q.peer) for q in router.neg.requests] == [PLAIN]
            assert connect >= 0.9, f"connect took {connect:.3f} s without the trap's loss"
            return connect

    print(f"\nkeyless probe: connect {asyncio.run(body()):.3f} s")
