"""The real oe-routerd's DNS front facing a LAN, a guest net and the WAN (issue 11, items 4-6).

    client 192.168.74.100, fd74::100 -- lan -- router (oe-routerd) -- wan -- outsider
    guest  10.74.0.100 ------------- guest --+   lan 192.168.74.1, fd74::1   203.0.113.9,
                                                 guest 10.74.0.1             2001:db8:74::9
                                                 wan 203.0.113.2, 2001:db8:74::2

The router runs oe-routerd with ``lan_interface`` and ``wan_interface`` naming its
devices, so its DNS front knows the LAN prefixes and the WAN from the daemon's own
platform probe; knotd (unsigned ``example.test``, a big TXT added) is its upstream on
the router's loopback. Clients are sockets opened in their namespaces and used from
this process. ``rp_filter`` is off on the router (as on OpenWrt without the firewall's
rpfilter option), so a spoofed LAN source coming in over the WAN reaches the socket and
only the front's own check stands between it and an answer. Everything is asserted
on the wire (replies, their absence, resets) and on ``oe status`` counters.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dns.exception
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest
from bench.bench_dns_front import Knot, unrelated_anchor

from oe_router.datapath.netns import in_netns

from .charon import Netns
from .oe_daemon import OeDaemon, device_with, netns_run

pytestmark = pytest.mark.host

LAN4, LAN6, CLIENT4, CLIENT6 = "192.168.74.1", "fd74::1", "192.168.74.100", "fd74::100"
GUEST_GW, GUEST = "10.74.0.1", "10.74.0.100"
WAN4, WAN6, OUT4, OUT6 = "203.0.113.2", "2001:db8:74::2", "203.0.113.9", "2001:db8:74::9"
SPOOFED = "192.168.74.50"  #: a LAN address the outsider sends from, over the WAN
HOSTILE_UPSTREAM = "127.0.0.54"  #: the router-side fake upstream of item 5
NAME = "www.example.test."
#: A reply the front must never send is waited for this long before "none came".
SILENCE = 1.0
TCP_TIMEOUT = 1.0  #: oe.dns.tcp_timeout in the lab
#: one TXT record of 200 strings: a ~51 KB answer, only over TCP
BIG_TXT = "big    TXT " + " ".join(f'"{i:03d}' + "x" * 251 + '"' for i in range(200)) + "\n"
LEN = struct.Struct("!H")


@dataclass
class Lab:
    net: Netns
    router: str
    client: str
    guest: str
    outsider: str
    knot: Knot
    lan_dev: str
    wan_dev: str
    anchor: Path
    workdir: Path
    daemon: OeDaemon | None = None

    @property
    def r(self) -> OeDaemon:
        assert self.daemon is not None
        return self.daemon

    def config(
        self,
        listen: tuple[str, ...] = (f"{LAN4}:53", f"[{LAN6}]:53"),
        upstream: str = "",
        tcp_timeout: float = TCP_TIMEOUT,
    ) -> str:
        lines = "".join(f"\tlist listen '{e}'\n" for e in listen)
        return f"""package oe

config oe 'global'
\toption datapath 'kernel'
\toption offload 'off'
\toption wan_interface '{self.wan_dev}'
\toption lan_interface '{self.lan_dev}'

config dns 'dns'
{lines}\tlist upstream '{upstream or f"{self.knot.host}:{self.knot.port}"}'
\toption trust_anchor '{self.anchor}'
\toption tcp_timeout '{tcp_timeout:g}s'
"""

    def dns(self) -> dict[str, Any]:
        doc: dict[str, Any] = self.r.status()["dns"]
        return doc

    def reconfigure(self, **kw: Any) -> None:
        res = self.r.reconfigure(self.config(**kw))
        assert res.returncode == 0, res.stdout + res.stderr


def _add6(ns: str, dev: str, addr: str) -> None:
    netns_run(ns, ["ip", "-6", "addr", "add", f"{addr}/64", "dev", dev, "nodad"])


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    for tool in ("knotd", "ip"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} missing: apt-get install $(cat scripts/apt-packages.txt)")
    work = tmp_path_factory.mktemp("dnslan")
    net = Netns("q")
    knot: Knot | None = None
    lab: Lab | None = None
    try:
        router, client, guest, outsider = net.add("r"), net.add("c"), net.add("g"), net.add("w")
        net.link(client, f"{CLIENT4}/24", router, f"{LAN4}/24")
        net.link(guest, f"{GUEST}/24", router, f"{GUEST_GW}/24")
        net.link(outsider, f"{OUT4}/24", router, f"{WAN4}/24")
        lan_dev, wan_dev = device_with(router, LAN4), device_with(router, WAN4)
        _add6(router, lan_dev, LAN6)
        _add6(client, device_with(client, CLIENT4), CLIENT6)
        _add6(router, wan_dev, WAN6)
        out_dev = device_with(outsider, OUT4)
        _add6(outsider, out_dev, OUT6)
        netns_run(outsider, ["ip", "addr", "add", f"{SPOOFED}/32", "dev", out_dev])
        netns_run(outsider, ["ip", "route", "add", f"{LAN4}/32", "via", WAN4])
        net.route(guest, GUEST_GW)
        for conf in ("all", "default", lan_dev, wan_dev):
            netns_run(router, ["sysctl", "-qw", f"net.ipv4.conf.{conf}.rp_filter=0"])
        (work / "knot").mkdir()
        with in_netns(router):  # knotd inherits the namespace of the thread that starts it
            knot = Knot(work / "knot", extra_zone=BIG_TXT).start()
        anchor = unrelated_anchor(work / "root.key")
        lab = Lab(net, router, client, guest, outsider, knot, lan_dev, wan_dev, anchor, work)
        lab.daemon = OeDaemon(router, work / "r", lab.config())
        lab.daemon.start()
        yield lab
    finally:
        if lab is not None and lab.daemon is not None:
            lab.daemon.stop()
        if knot is not None:
            knot.stop()
        net.close()


# ------------------------------------------------------------------ clients


def _sock(ns: str, family: int, kind: int) -> socket.socket:
    with in_netns(ns):
        return socket.socket(family, kind)


def udp_ask(
    ns: str, server: str, name: str = NAME, rdtype: Any = "A", source: str | None = None
) -> dns.message.Message | None:
    """One UDP query from ``ns``; None if no reply came within SILENCE."""
    family = socket.AF_INET6 if ":" in server else socket.AF_INET
    with _sock(ns, family, socket.SOCK_DGRAM) as s:
        if source is not None:
            s.bind((source, 0))
        s.setblocking(False)
        try:
            return dns.query.udp(
                dns.message.make_query(name, rdtype), server, timeout=SILENCE, sock=s
            )
        except dns.exception.Timeout:
            return None


def tcp_ask(
    ns: str, server: str, name: str = NAME, rdtype: Any = "A"
) -> dns.message.Message | None:
    """One TCP query from ``ns``; None if the connection was closed without a reply."""
    family = socket.AF_INET6 if ":" in server else socket.AF_INET
    with _sock(ns, family, socket.SOCK_STREAM) as s:
        s.settimeout(3.0)
        try:
            s.connect((server, 53))
            wire = dns.message.make_query(name, rdtype).to_wire()
            s.sendall(LEN.pack(len(wire)) + wire)
            head = _read(s, 2)
            if len(head) < 2:
                return None
            return dns.message.from_wire(_read(s, LEN.unpack(head)[0]))
        except (ConnectionError, TimeoutError):
            return None


def _read(s: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = s.recv(n - len(out))
        if not chunk:
            break
        out += chunk
    return out


def _a(msg: dns.message.Message | None) -> list[str]:
    assert msg is not None and msg.rcode() == dns.rcode.NOERROR, msg
    return [rd.to_text() for rr in msg.answer for rd in rr]


def _delta(after: dict[str, Any], before: dict[str, Any], key: str) -> int:
    return int(after[key]) - int(before[key])


# ------------------------------------------------------------------ item 6: LAN only


def test_lan_clients_are_answered_over_udp_and_tcp(lab: Lab) -> None:
    assert _a(udp_ask(lab.client, LAN4)) == ["192.0.2.1"]
    assert _a(udp_ask(lab.client, LAN6, rdtype="AAAA")) == ["2001:db8::1"]
    assert _a(tcp_ask(lab.client, LAN4)) == ["192.0.2.1"]
    assert _a(tcp_ask(lab.client, LAN6)) == ["192.0.2.1"]
    doc = lab.dns()
    assert doc["lan_prefixes"] == ["192.168.74.0/24", "fd74::/64"]
    assert doc["refused_not_lan"] == 0 and doc["dropped_wan"] == 0


def test_clients_outside_the_lan_prefixes_get_refused(lab: Lab) -> None:
    """The guest net reaches the front's LAN address through the router, but it is not
    ``lan_interface``'s prefix: REFUSED over UDP, the TCP connection is closed."""
    before = lab.dns()
    reply = udp_ask(lab.guest, LAN4)
    assert reply is not None and reply.rcode() == dns.rcode.REFUSED and not reply.answer
    assert tcp_ask(lab.guest, LAN4) is None
    after = lab.dns()
    assert _delta(after, before, "refused_not_lan") == 2
    assert _delta(after, before, "queries") == 0  # never reached the resolver


def test_queries_over_the_wan_are_never_answered(lab: Lab) -> None:
    """The outsider routes the router's LAN address over the WAN (the weak host model
    delivers it): from its own address and from a spoofed LAN address, no reply at all;
    a TCP connection from outside is closed."""
    before = lab.dns()
    assert udp_ask(lab.outsider, LAN4) is None
    assert udp_ask(lab.outsider, LAN4, source=SPOOFED) is None
    assert tcp_ask(lab.outsider, LAN4) is None
    after = lab.dns()
    assert _delta(after, before, "dropped_wan") == 2
    assert _delta(after, before, "refused_not_lan") == 1  # TCP: the source is not the LAN
    assert _delta(after, before, "queries") == 0


def test_wildcard_listen_answers_the_lan_and_ignores_the_wan(lab: Lab) -> None:
    """``0.0.0.0`` and ``[::]`` also take the WAN addresses: queries to them, or coming in
    over the WAN device, get nothing; the LAN is answered from the address it asked."""
    lab.reconfigure(listen=("0.0.0.0:53", "[::]:53"))
    try:
        before = lab.dns()
        assert before["listen"] == ["0.0.0.0:53", "[::]:53"]
        # dnspython checks that the reply comes from the address it asked
        assert _a(udp_ask(lab.client, LAN4)) == ["192.0.2.1"]
        assert _a(udp_ask(lab.client, LAN6)) == ["192.0.2.1"]
        assert _a(tcp_ask(lab.client, LAN4)) == ["192.0.2.1"]
        assert udp_ask(lab.outsider, WAN4) is None
        assert udp_ask(lab.outsider, WAN6) is None
        assert udp_ask(lab.outsider, LAN4, source=SPOOFED) is None
        assert tcp_ask(lab.outsider, WAN4) is None
        reply = udp_ask(lab.guest, GUEST_GW)
        assert reply is not None and reply.rcode() == dns.rcode.REFUSED
        after = lab.dns()
        assert _delta(after, before, "dropped_wan") == 4
        assert _delta(after, before, "refused_not_lan") == 1
    finally:
        lab.reconfigure()


def test_listening_on_a_wan_address_is_refused(lab: Lab) -> None:
    res = lab.r.reconfigure(lab.config(listen=(f"{LAN4}:53", f"{WAN4}:53")))
    assert res.returncode == 1
    assert f"oe.dns.listen: {WAN4}:53 is an address of the WAN ({lab.wan_dev};" in res.stdout
    assert lab.dns()["listen"] == [f"{LAN4}:53", f"[{LAN6}]:53"]  # the old ones kept running
    assert _a(udp_ask(lab.client, LAN4)) == ["192.0.2.1"]
    lab.reconfigure()


# ------------------------------------------------------------------ item 4: TCP slots


def _hostile(ns: str, burst: bytes) -> socket.socket:
    """A LAN connection with a tiny receive window that pipelines ``burst`` and never
    reads (the refused ones are reset by the front; their send may fail)."""
    s = _sock(ns, socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
    s.settimeout(3.0)
    with contextlib.suppress(OSError):
        s.connect((LAN4, 53))
        s.sendall(burst)
    return s


def test_tcp_clients_that_never_read_give_their_slots_back(lab: Lab) -> None:
    """More never-reading clients than the front has TCP slots (128), each pipelining
    more big queries than one connection may have in flight (32): the front is full
    (the extra ones are refused), they are aborted after ``tcp_timeout``, and a
    well-behaved LAN client is answered over TCP again."""
    timeout = 4.0  # time enough to open all of them on a loaded machine
    lab.reconfigure(tcp_timeout=timeout)
    socks: list[socket.socket] = []
    try:
        assert len(_a(tcp_ask(lab.client, LAN4, "big.example.test.", "TXT"))) == 1  # cached
        before = lab.dns()
        wire = dns.message.make_query("big.example.test.", "TXT").to_wire()
        burst = (LEN.pack(len(wire)) + wire) * 200
        start = time.monotonic()
        socks = [_hostile(lab.client, burst) for _ in range(130)]
        opened = time.monotonic() - start
        answered = None
        while answered is None and time.monotonic() - start < 5 * timeout:
            answered = tcp_ask(lab.client, LAN4)
            if answered is None:
                time.sleep(0.1)
        took = time.monotonic() - start
        assert answered is not None, "the hostile clients kept every TCP slot"
        assert _a(answered) == ["192.0.2.1"]
        deadline = time.monotonic() + 10
        while (doc := lab.dns())["tcp_clients_now"] and time.monotonic() < deadline:
            time.sleep(0.2)
        assert doc["tcp_clients_now"] == 0
        assert _delta(doc, before, "tcp_refused") >= 2, f"never full (opened in {opened:.1f} s)"
        assert _delta(doc, before, "tcp_write_timeouts") == 128
        print(f"130 opened in {opened:.2f} s; answered after {took:.2f} s")
    finally:
        for s in socks:
            s.close()
        lab.reconfigure()


# ------------------------------------------------------------------ item 5: upstream replies


class ForgingUpstream:
    """A UDP upstream on the router's loopback that answers every query twice: first a
    forged reply whose QTYPE is the query's with bit 0x20 set (type 65 "A" -> 97 "a",
    what lower-casing the question made equal), then knotd's genuine reply with the
    name upper-cased (servers may echo 0x20-mixed names)."""

    def __init__(self, ns: str, knot: Knot) -> None:
        self.sock = _sock(ns, socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((HOSTILE_UPSTREAM, 53))
        self.sock.settimeout(0.2)
        self.upstream = _sock(ns, socket.AF_INET, socket.SOCK_DGRAM)
        self.upstream.settimeout(2.0)
        self.knot = (knot.host, knot.port)
        self.forged = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data, addr = self.sock.recvfrom(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            qend = 12 + len(dns.message.from_wire(data).question[0].name.to_wire()) + 4
            with contextlib.suppress(OSError):
                self.upstream.sendto(data, self.knot)
                genuine = self.upstream.recv(65535)
                rdtype, rdclass = struct.unpack_from("!HH", data, qend - 4)
                forged = genuine[: qend - 4] + struct.pack("!HH", rdtype | 0x20, rdclass)
                self.sock.sendto(forged + genuine[qend:], addr)
                self.forged += 1
                name = genuine[12 : qend - 4].upper()
                self.sock.sendto(genuine[:12] + name + genuine[qend - 4 :], addr)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()
        self.upstream.close()


def test_upstream_reply_for_another_qtype_is_not_taken(lab: Lab) -> None:
    """An HTTPS (type 65) query through an upstream that first sends a reply for type 97:
    the front waits for the reply to its own question (name case may differ)."""
    fake = ForgingUpstream(lab.router, lab.knot)
    try:
        lab.reconfigure(upstream=f"{HOSTILE_UPSTREAM}:53")
        before = lab.dns()
        reply = udp_ask(lab.client, LAN4, rdtype=65)
        assert reply is not None and reply.question[0].rdtype == 65
        assert reply.rcode() == dns.rcode.NOERROR
        assert _a(udp_ask(lab.client, LAN4, "alias.example.test.", "A"))[-1] == "192.0.2.1"
        after = lab.dns()
        assert fake.forged >= 2
        assert _delta(after, before, "upstream_mismatched") == fake.forged
        assert _delta(after, before, "servfail") == 0
    finally:
        lab.reconfigure()
        fake.close()


def test_knot_answers_the_big_txt(lab: Lab) -> None:
    """The lab's premise for item 4: a ~51 KB answer, more than a tiny window takes."""
    msg = tcp_ask(lab.client, LAN4, "big.example.test.", "TXT")
    assert msg is not None and len(msg.to_wire()) > 50000
