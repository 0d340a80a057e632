"""Our DNS front between real programs: knotd as the upstream, kdig as the client.

knotd serves an unsigned zone from a temp dir on 127.0.0.53; DnsService runs in
this process (its own loop in a thread) with the real DNSSEC key lookup (no anchor
covers the lab zone, so answers are released at once). kdig asks over UDP and TCP.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import dns.message
import dns.rcode
import pytest
from bench.bench_dns_front import KNOT_ADDR, Knot, free_port, unrelated_anchor

from oe_router.config.schema import DnsConfig, Endpoint, OeConfig
from oe_router.dns.service import DnsService
from oe_router.dns.upstream import UpstreamSettings

pytestmark = pytest.mark.host

ZONE = "example.test."


class Front:
    """DnsService on its own event loop, so kdig (blocking) can run from the test."""

    def __init__(self, config: OeConfig, settings: UpstreamSettings) -> None:
        self.service = DnsService(upstream_settings=settings)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.service.start(config), self.loop).result(10)
        self.port = self.service.bound[0].port

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.service.stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()

    def status(self) -> dict[str, object]:
        return dict(self.service.status().dns)


class Blackhole:
    """A UDP and TCP socket on loopback that never answer: an upstream that times out."""

    def __init__(self, host: str = "127.0.0.54") -> None:
        self.port = free_port(host)
        self.host = host
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind((host, self.port))

    def close(self) -> None:
        self.udp.close()


@pytest.fixture(scope="module")
def knot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Knot]:
    for tool in ("knotd", "kdig"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} missing: apt-get install $(cat scripts/apt-packages.txt)")
    server = Knot(tmp_path_factory.mktemp("knot")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def anchor(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return unrelated_anchor(tmp_path_factory.mktemp("anchor") / "root.key")


def make_front(upstreams: list[tuple[str, int]], anchor: Path, timeout: float = 1.0) -> Front:
    config = OeConfig(
        dns=DnsConfig(
            listen=(Endpoint("127.0.0.1", 0),),
            upstream=tuple(Endpoint(h, p) for h, p in upstreams),
            trust_anchor=str(anchor),
            ttl_cap=120.0,
        )
    )
    return Front(config, UpstreamSettings(timeout=timeout, tcp_timeout=2.0, tries=1))


@pytest.fixture
def front(knot: Knot, anchor: Path) -> Iterator[Front]:
    f = make_front([(knot.host, knot.port)], anchor)
    yield f
    f.stop()


def kdig(port: int, *args: str) -> str:
    res = subprocess.run(
        ["kdig", "@127.0.0.1", "-p", str(port), "+time=3", "+retry=0", *args],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout


def answers(out: str, rdtype: str) -> list[tuple[str, int, str]]:
    """(owner, ttl, rdata) of the answer section lines of type ``rdtype``."""
    section = out.split(";; ANSWER SECTION:", 1)[1] if ";; ANSWER SECTION:" in out else ""
    section = section.split("\n;;", 1)[0]
    rows = []
    for line in section.splitlines():
        parts = line.split()
        if len(parts) >= 5 and parts[3] == rdtype:
            rows.append((parts[0], int(parts[1]), parts[4]))
    return rows


def flags(out: str) -> set[str]:
    m = re.search(r";; Flags: ([a-z ]+);", out)
    assert m, out
    return set(m.group(1).split())


def status_of(out: str) -> str:
    m = re.search(r"status: ([A-Z]+)", out)
    assert m, out
    return m.group(1)


def test_a_and_aaaa_pass_through_with_ttl_capped(front: Front) -> None:
    out = kdig(front.port, "www." + ZONE, "A")
    assert status_of(out) == "NOERROR"
    assert answers(out, "A") == [("www." + ZONE, 120, "192.0.2.1")]  # zone TTL 3600, cap 120
    out6 = kdig(front.port, "www." + ZONE, "AAAA")
    assert [r[2] for r in answers(out6, "AAAA")] == ["2001:db8::1"]
    stats = front.status()
    assert stats["queries"] == 2 and stats["released_clear"] == 2 and stats["servfail"] == 0


def test_several_a_records_and_cname(front: Front) -> None:
    out = kdig(front.port, "multi." + ZONE, "A")
    assert sorted(r[2] for r in answers(out, "A")) == [f"192.0.2.1{i}" for i in range(1, 5)]
    out = kdig(front.port, "alias." + ZONE, "A")
    assert answers(out, "CNAME") and answers(out, "A")[0][2] == "192.0.2.1"


def test_tcp_query(front: Front) -> None:
    out = kdig(front.port, "+tcp", "www." + ZONE, "A")
    assert "(TCP)" in out and answers(out, "A")[0][2] == "192.0.2.1"
    assert front.status()["tcp"] == 1


def test_truncation_then_tcp_retry(front: Front) -> None:
    """60 A records do not fit 512 bytes: TC over UDP, kdig retries over TCP by itself."""
    out = kdig(front.port, "+noedns", "+ignore", "big." + ZONE, "A")
    assert "tc" in flags(out) and answers(out, "A") == []
    out = kdig(front.port, "+noedns", "big." + ZONE, "A")
    assert "(TCP)" in out and len(answers(out, "A")) == 60
    # with a large EDNS0 size the client's limit is honoured over UDP
    out = kdig(front.port, "+bufsize=4096", "big." + ZONE, "A")
    assert "(UDP)" in out and len(answers(out, "A")) == 60
    assert int(str(front.status()["truncated"])) >= 1


def test_non_address_query_and_nxdomain(front: Front) -> None:
    out = kdig(front.port, "txt." + ZONE, "TXT")
    assert '"hello from knot"' in out
    out = kdig(front.port, "nope." + ZONE, "A")
    assert status_of(out) == "NXDOMAIN"


def test_upstream_timeout_falls_back_to_second_upstream(knot: Knot, anchor: Path) -> None:
    hole = Blackhole()
    f = make_front([(hole.host, hole.port), (knot.host, knot.port)], anchor, timeout=0.4)
    try:
        t0 = time.monotonic()
        out = kdig(f.port, "www." + ZONE, "A")
        took = time.monotonic() - t0
        assert answers(out, "A")[0][2] == "192.0.2.1"
        assert took >= 0.4  # it waited for the silent one first
        stats = f.status()
        # the A query met the silent one once; no anchor covers the lab zone, so the
        # IPSECKEY lookup is INDETERMINATE without asking anyone
        assert stats["upstream_udp_timeouts"] == 1 and stats["upstream_fallbacks"] == 1
        # the working upstream is now preferred: the next query does not wait
        t0 = time.monotonic()
        kdig(f.port, "multi." + ZONE, "A")
        assert time.monotonic() - t0 < 0.4
    finally:
        f.stop()
        hole.close()


def test_only_silent_upstreams_give_servfail(anchor: Path) -> None:
    hole = Blackhole()
    f = make_front([(hole.host, hole.port)], anchor, timeout=0.3)
    try:
        out = kdig(f.port, "www." + ZONE, "A")
        assert status_of(out) == "SERVFAIL"
        assert f.status()["timeouts"] == 1
    finally:
        f.stop()
        hole.close()


def test_malformed_queries_do_not_hurt_the_server(front: Front) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(1.0)
        s.sendto(b"\x00\x01", ("127.0.0.1", front.port))  # dropped
        junk = b"\xbe\xef\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x3fabc"
        s.sendto(junk, ("127.0.0.1", front.port))
        reply = dns.message.from_wire(s.recv(4096))
        assert reply.id == 0xBEEF and reply.rcode() == dns.rcode.FORMERR
    # garbage over TCP too
    with socket.create_connection(("127.0.0.1", front.port), timeout=2) as t:
        t.sendall(len(junk).to_bytes(2, "big") + junk)
        size = int.from_bytes(t.recv(2), "big")
        assert dns.message.from_wire(t.recv(size)).rcode() == dns.rcode.FORMERR
    out = kdig(front.port, "www." + ZONE, "A")  # still serving
    assert answers(out, "A")[0][2] == "192.0.2.1"
    stats = front.status()
    assert stats["dropped"] == 1 and stats["formerr"] == 2


def test_knot_address_is_loopback() -> None:
    assert KNOT_ADDR.startswith("127.")
