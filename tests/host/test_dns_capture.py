"""The DNS capture on a real kernel: the router's own DNS reaches the front while it runs,
its real upstreams the moment it dies (capture.py, docs/dns.md "Deployment 2").

    router 198.51.100.2, 2001:db8:ff::2 -- veth -- world 198.51.100.1, 2001:db8:ff::1
    (oe-routerd, default listen                    lab DNS on lo: knotd 203.0.113.53,
     127.0.0.1:5335 and [::1]:5335,                 2001:db8:1::53 (authoritative);
     mode 'dnsmasq')                                unbound 203.0.113.54, 2001:db8:1::54
                                                    (recursive, not validating)

dnsmasq runs in the router on 127.0.0.53:53 with both world servers as its upstreams and
no cache, as a router's dnsmasq with two WAN resolvers. The world is the QEMU lab's own
DNS (qemu/labkit: its signed hierarchy with the bogus zone ``bogus.test``), its trust
anchor the daemon's fixed anchor. Queries are sent from this test process in the
router's namespace, as dnsmasq's would be, to the world's servers on port 53.
``www.bogus.test`` tells who answered: the front says SERVFAIL (bad signature), both
world servers give its address. The daemon's end is ``kill -9``: no handler runs, only
the kernel's cleanup of the owned table.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dns.message
import dns.query
import dns.rcode
import pytest

from oe_router.datapath.netns import in_netns

from .charon import Netns
from .oe_daemon import OeDaemon, netns_run

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "qemu"))

from labkit import world
from labkit.netns import in_ns

pytestmark = pytest.mark.host

NS4, RES4, NS6, RES6 = "203.0.113.53", "203.0.113.54", "2001:db8:1::53", "2001:db8:1::54"
DNSMASQ = "127.0.0.53"  #: the router's dnsmasq
BOGUS, BOGUS_A = "www.bogus.test.", "203.0.113.22"
PLAIN = "a.example.test."  #: signed, no key, no trouble: the front needs its upstream to answer it
DEADLINE = 10.0  #: generous: the table goes with the socket, in milliseconds when idle


@dataclass
class World:
    router: str
    daemon: OeDaemon


def _ask(ns: str, server: str, name: str, tcp: bool = False) -> dns.message.Message:
    query = dns.message.make_query(name, "A")
    with in_netns(ns):
        if tcp:
            return dns.query.tcp(query, server, timeout=5)
        return dns.query.udp(query, server, timeout=5)


def _a(reply: dns.message.Message) -> list[str]:
    return [r.address for rrset in reply.answer for r in rrset if rrset.rdtype == 1]


def _table(ns: str) -> bool:
    done = subprocess.run(
        ["ip", "netns", "exec", ns, "nft", "list", "table", "inet", "oe_dns"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    return done.returncode == 0


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tools = ("knotd", "knotc", "unbound", "nft", "ip", "dnsmasq")
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.fail(
            f"missing host tools {missing}: apt-get install $(cat scripts/apt-packages.txt)"
        )
    base = tmp_path_factory.mktemp("dnscapture")
    info = world.build(base / "bundle")
    net = Netns("dc")
    env = {"LAB_STATE": str(base / "state")}
    started: list[str] = []
    daemon: OeDaemon | None = None
    dnsmasq: subprocess.Popen[bytes] | None = None
    try:
        router, outside = net.add("rt"), net.add("wd")
        net.link(router, "198.51.100.2/24", outside, "198.51.100.1/24")
        dev = next(
            ln.split()[1]
            for ln in netns_run(router, ["ip", "-o", "-4", "addr", "show"]).splitlines()
            if " 198.51.100.2/" in ln
        )
        wdev = next(
            ln.split()[1]
            for ln in netns_run(outside, ["ip", "-o", "-4", "addr", "show"]).splitlines()
            if " 198.51.100.1/" in ln
        )
        netns_run(router, ["ip", "-6", "addr", "add", "2001:db8:ff::2/64", "dev", dev, "nodad"])
        netns_run(outside, ["ip", "-6", "addr", "add", "2001:db8:ff::1/64", "dev", wdev, "nodad"])
        for addr in (NS4, RES4):
            netns_run(outside, ["ip", "addr", "add", f"{addr}/32", "dev", "lo"])
        for addr in (NS6, RES6):
            netns_run(outside, ["ip", "addr", "add", f"{addr}/128", "dev", "lo", "nodad"])
        netns_run(router, ["ip", "route", "add", "203.0.113.0/24", "via", "198.51.100.1"])
        netns_run(router, ["ip", "-6", "route", "add", "2001:db8:1::/64", "via", "2001:db8:ff::1"])
        for host in ("ns", "resolver"):
            res = in_ns(outside, ["sh", str(info.outdir / "hosts" / host / "start.sh")], env)
            assert res.returncode == 0, f"{host}/start.sh failed: {res.stderr}"
            started.append(host)
        assert _a(_ask(router, RES4, BOGUS)) == [BOGUS_A], "the world's resolver does not answer"
        resolv = base / "resolv.conf"
        resolv.write_text(f"nameserver {RES4}\nnameserver {RES6}\n")
        anchor = info.outdir / info.router.trust_anchor_ds
        daemon = OeDaemon(
            router,
            base / "daemon",
            f"""package oe

config oe 'global'
\toption datapath 'kernel'
\toption wan_interface '{dev}'
\toption lan_interface 'lo'
\toption offload 'off'

config dns 'dns'
\toption mode 'dnsmasq'
\toption trust_anchor '{anchor}'
\toption resolv_file '{resolv}'
""",
        )
        daemon.start()
        dnsmasq = subprocess.Popen(
            ["ip", "netns", "exec", router, "dnsmasq", "--keep-in-foreground",
             "--conf-file=/dev/null", f"--listen-address={DNSMASQ}", "--bind-interfaces",
             "--no-resolv", f"--server={RES4}", f"--server={NS4}", "--cache-size=0",
             "--user=root", "--pid-file=", "--log-facility=-", "--log-queries"],
            stdout=subprocess.DEVNULL, stderr=(base / "dnsmasq.log").open("wb"),
        )  # fmt: skip
        deadline = time.monotonic() + DEADLINE
        while netns_run(router, ["ss", "-lnu"]).find(f"{DNSMASQ}:53 ") < 0:
            assert dnsmasq.poll() is None and time.monotonic() < deadline, "dnsmasq did not start"
            time.sleep(0.1)
        yield World(router, daemon)
    finally:
        if dnsmasq is not None:
            dnsmasq.terminate()
            dnsmasq.wait(timeout=10)
        if daemon is not None:
            daemon.stop()
        for host in started:
            in_ns(outside, ["sh", str(info.outdir / "hosts" / host / "stop.sh")], env)
        net.close()


def test_the_routers_own_queries_to_any_upstream_reach_the_front(lab: World) -> None:
    status = lab.daemon.status()["dns"]
    assert status["capture"] == "on: udp/tcp 53 -> 127.0.0.1:5335, [::1]:5335", status
    assert _table(lab.router)
    before = status["queries"]
    # the front's own upstream queries are marked and pass: a good name resolves through it
    assert _a(_ask(lab.router, RES4, PLAIN)), "the front's upstream queries were captured too"
    # bogus: SERVFAIL from the front, whichever upstream it was sent to, UDP or TCP, v4 or v6
    # (the authoritative server would hand out the address, and so would the resolver)
    for server, tcp in ((RES4, False), (NS4, False), (RES6, False), (NS6, False), (RES4, True)):
        reply = _ask(lab.router, server, BOGUS, tcp=tcp)
        assert reply.rcode() == dns.rcode.SERVFAIL, (server, tcp, reply)
    # through dnsmasq with two upstreams, no cache: whichever it asks or retries, SERVFAIL
    for _ in range(3):
        reply = _ask(lab.router, DNSMASQ, BOGUS)
        assert reply.rcode() == dns.rcode.SERVFAIL and not _a(reply), reply
    after = lab.daemon.status()["dns"]
    assert after["queries"] >= before + 9, (before, after)
    assert after["servfail"] >= 8, after


def test_after_kill_9_the_table_is_gone_and_queries_reach_the_real_upstream(lab: World) -> None:
    assert lab.daemon.proc is not None
    pid = lab.daemon.proc.pid
    lab.daemon.stop(signal.SIGKILL)
    t0 = time.monotonic()
    while _table(lab.router):
        assert time.monotonic() - t0 < DEADLINE, f"table inet oe_dns outlived oe-routerd {pid}"
        time.sleep(0.05)
    gone = time.monotonic() - t0
    for server in (DNSMASQ, RES4, NS4, RES6):
        reply = _ask(lab.router, server, BOGUS)
        assert reply.rcode() == dns.rcode.NOERROR and _a(reply) == [BOGUS_A], (server, reply)
    print(f"table gone {gone * 1000:.0f} ms after kill -9 (polled)")
