"""RFC 5011 against a root that rolls its own KSK: the real oe-routerd and a real knotd.

knotd serves a small signed hierarchy (labkit) in a network namespace: the root, signed
by KSK1; ``example.test`` with keyed names (``kN``: an A record and an IPSECKEY each);
``bogus.test``, whose records carry bad signatures. oe-routerd runs there with the
shipped default, the managed anchors of ``auto_trust_anchor``, its state file seeded
with the lab root's DS (a plain DS file is a state file whose keys are all valid).
RFC 5011's timers are shortened through ``OE_ROUTER_ANCHOR_TIMERS``, the daemon's
test-only knob: add and remove hold-down 3 s, refresh floor 0.5 s (with the zone's 2 s
TTL it probes the root every second). Then the root rolls its key as the real one does:

1. it publishes KSK2, the DNSKEY RRset still signed by KSK1 alone: the daemon holds
   KSK2 in AddPend for the hold-down, then trusts it (Valid);
2. it signs with KSK2 and revokes KSK1 (the RRset signed by KSK1-revoked and KSK2): the
   daemon marks KSK1 Revoked, and Removed after the remove hold-down;
3. the daemon restarts and reads the same states back from the file.

Throughout, a keyed name never asked before (so never cached) answers NOERROR with its
address: with ``bogus_action servfail`` a chain the anchors do not validate would be
SERVFAIL, as ``bogus.test`` is each time. The daemon's own log says a secure key was
found. Last, the control: a state file that missed the rollover (KSK1 only) gets
SERVFAIL for the same names, and its probes cannot repair it, because a key only
comes in signed by a key already trusted.
"""

from __future__ import annotations

import itertools
import shutil
import socket
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dns.dnssec
import dns.exception
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdatatype
import pytest

from oe_router.datapath.netns import in_netns

from .charon import Netns
from .oe_daemon import OeDaemon

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "qemu"))

from labkit.knot import KnotServer
from labkit.zones import (
    Algorithm,
    Breakage,
    BreakKind,
    BuiltHierarchy,
    HierarchySpec,
    ZoneKey,
    ZoneSpec,
    build_hierarchy,
    generate_key,
    ipseckey_none,
    resign_zone,
)

pytestmark = pytest.mark.host

KNOT_PORT = 5300
FRONT = ("127.0.0.1", 5335)
TIMERS = "add_hold_down=3,remove_hold_down=3,min_refresh=0.5"
NAMES = 150  #: keyed names kN.example.test, one fresh name per check
ADDRESS = "192.0.2.10"
REVOKE = 0x0080
PHASE = 40.0  #: generous bound for one phase on a loaded 2-core machine


def _spec() -> HierarchySpec:
    none = "IPSECKEY " + ipseckey_none()
    keyed = [line for i in range(NAMES) for line in (f"k{i} A {ADDRESS}", f"k{i} {none}")]
    return HierarchySpec(
        zones=(
            ZoneSpec(".", algorithm=Algorithm.ECDSAP256SHA256),
            ZoneSpec("example.test.", tuple(keyed), algorithm=Algorithm.ED25519),
            ZoneSpec(
                "bogus.test.",
                ("www A 192.0.2.66", f"www {none}"),
                algorithm=Algorithm.ECDSAP256SHA256,
                breakage=Breakage(BreakKind.BAD_SIGNATURE, (("www", "A"), ("www", "IPSECKEY"))),
            ),
        ),
        ns_addresses=("127.0.0.1",),
        ttl=2,
    )


def _config(state: Path) -> str:
    return f"""package oe

config oe 'global'
\toption offload 'off'
\toption wan_interface 'nowan0'
\toption lan_interface 'nolan0'

config dns 'dns'
\tlist listen '{FRONT[0]}:{FRONT[1]}'
\tlist upstream '127.0.0.1:{KNOT_PORT}'
\toption auto_trust_anchor '{state}'
\toption bogus_action 'servfail'
"""


@dataclass
class Lab:
    ns: str
    hier: BuiltHierarchy
    knot: KnotServer
    daemon: OeDaemon
    state: Path
    ksk1: ZoneKey
    names: Iterator[int]

    def ask(self, name: str, rdtype: str = "A", port: int = FRONT[1]) -> dns.message.Message:
        """One UDP query from inside the namespace (3 s: a cold validation is ~10 queries)."""
        with in_netns(self.ns):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with sock:
            query = dns.message.make_query(name, rdtype)
            try:
                return dns.query.udp(query, FRONT[0], port=port, timeout=3.0, sock=sock)
            except dns.exception.Timeout:
                raise AssertionError(f"no answer to {name}/{rdtype} within 3 s") from None

    def fresh_name_validates(self) -> None:
        """A keyed name never asked before gets its address (a bogus chain: SERVFAIL)."""
        name = f"k{next(self.names)}.example.test."
        reply = self.ask(name)
        addresses = [rd.to_text() for rr in reply.answer for rd in rr]
        assert reply.rcode() == dns.rcode.NOERROR and addresses == [ADDRESS], (
            f"{name}: {dns.rcode.to_text(reply.rcode())} {addresses}\n{self.daemon.log()[-3000:]}"
        )

    def bogus_fails(self) -> None:
        assert self.ask("www.bogus.test.").rcode() == dns.rcode.SERVFAIL

    def anchors(self) -> dict[int, dict[str, Any]]:
        return {int(a["key_tag"]): a for a in self.daemon.status()["trust_anchors"]}

    def until(self, what: str, pred: Callable[[dict[int, dict[str, Any]]], bool]) -> dict[int, Any]:
        """Poll the anchors until ``pred`` holds; a fresh keyed name must validate every
        second on the way (validation keeps working while the keys move)."""
        deadline = time.monotonic() + PHASE
        checked = 0.0
        while True:
            if time.monotonic() - checked >= 1.0:
                self.fresh_name_validates()
                checked = time.monotonic()
            rows = self.anchors()
            if pred(rows):
                return rows
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: not within {PHASE} s: {rows}\n{self.daemon.log()}")
            time.sleep(0.2)

    def serve_root(self, tags: set[int]) -> None:
        """knotd reloads the rewritten root; wait until it serves that DNSKEY RRset."""
        self.knot.reload(".")
        deadline = time.monotonic() + 10
        while True:
            reply = self.ask(".", "DNSKEY", port=KNOT_PORT)
            served = {dns.dnssec.key_id(k) for rr in reply.answer for k in rr}
            if served == tags:
                return
            assert time.monotonic() < deadline, f"knotd serves {served}, not {tags}"
            time.sleep(0.1)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    for tool in ("knotd", "knotc", "ip"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} missing: apt-get install $(cat scripts/apt-packages.txt)")
    work = tmp_path_factory.mktemp("rfc5011")
    net = Netns("ta")
    knot: KnotServer | None = None
    daemon: OeDaemon | None = None
    try:
        ns = net.add("r")
        hier = build_hierarchy(_spec(), work / "zones")
        knot = KnotServer(hier, "127.0.0.1", KNOT_PORT, work / "knot", netns=ns)
        knot.start()
        state = work / "etc-oe" / "root.anchors"
        state.parent.mkdir()
        shutil.copy(hier.trust_anchor_ds, state)  # ". 3600 IN DS <KSK1>"
        daemon = OeDaemon(ns, work / "r", _config(state), env={"OE_ROUTER_ANCHOR_TIMERS": TIMERS})
        daemon.start()
        ksk1 = hier.zones["."].key
        assert ksk1 is not None
        yield Lab(ns, hier, knot, daemon, state, ksk1, itertools.count())
    finally:
        if daemon is not None:
            daemon.stop()
        if knot is not None:
            knot.stop()
        net.close()


def test_daemon_follows_the_root_ksk_rollover_and_keeps_validating(lab: Lab) -> None:
    root = lab.hier.zones["."]
    k1 = lab.ksk1
    t1 = int(dns.dnssec.key_id(k1.dnskey))

    # 0. the seed: KSK1 valid, seen (its DNSKEY learnt by the first probe, which wrote the file)
    rows = lab.until("KSK1 seen", lambda r: r.get(t1, {}).get("form") == "dnskey")
    assert rows[t1]["state"] == "valid" and set(rows) == {t1}
    assert lab.daemon.status()["dns"]["anchor_probe"].startswith("secure at ")
    assert f". IN DNSKEY {k1.dnskey.to_text()} ; state=valid" in lab.state.read_text()
    lab.fresh_name_validates()
    lab.bogus_fails()
    assert "has a secure key but its answer goes out clear" in lab.daemon.log()
    assert "RFC 5011 timers shortened for testing" in lab.daemon.log()

    # 1. the root publishes KSK2, its DNSKEY RRset still signed by KSK1 alone
    k2 = generate_key(Algorithm.ECDSAP256SHA256)
    t2 = int(dns.dnssec.key_id(k2.dnskey))
    resign_zone(root, [k1.dnskey, k2.dnskey], [(k1.private, k1.dnskey)], k1)
    lab.serve_root({t1, t2})
    rows = lab.until("KSK2 pending", lambda r: t2 in r)
    pending = rows[t2]
    assert pending["state"] == "addpend", rows
    hold = _seconds(pending["until"]) - _seconds(pending["since"])
    assert 3 <= hold <= 4, pending  # max(3 s, the RRset's 2 s TTL), rounded up to the second
    text = lab.daemon.oe("status").stdout
    assert "trust anchors (2)" in text and "addpend" in text, text
    rows = lab.until("KSK2 valid", lambda r: r[t2]["state"] == "valid")
    assert _seconds(rows[t2]["since"]) >= _seconds(pending["until"]) - 1
    assert rows[t1]["state"] == "valid"
    lab.bogus_fails()

    # 2. the root signs with KSK2 and revokes KSK1, which signs its own revocation
    k1_revoked = k1.dnskey.replace(flags=k1.dnskey.flags | REVOKE)
    resign_zone(
        root, [k1_revoked, k2.dnskey], [(k1.private, k1_revoked), (k2.private, k2.dnskey)], k2
    )
    lab.serve_root({int(dns.dnssec.key_id(k1_revoked)), t2})
    rows = lab.until("KSK1 revoked", lambda r: r[t1]["state"] == "revoked")
    assert rows[t2]["state"] == "valid"
    rows = lab.until("KSK1 removed", lambda r: r[t1]["state"] == "removed")
    lab.bogus_fails()
    text = lab.state.read_text()
    assert "state=removed" in text and "state=valid" in text

    # 3. a restart reads the same states back (before, and whatever, the first probe finds)
    lab.daemon.stop()
    lab.daemon.start()
    after = lab.anchors()
    assert {t: (a["state"], a["since"]) for t, a in after.items()} == {
        t: (a["state"], a["since"]) for t, a in rows.items()
    }
    assert lab.daemon.status()["dns"]["trust_anchor_source"] == str(lab.state)
    lab.fresh_name_validates()  # from KSK2 alone: KSK1 is revoked in the zone
    lab.bogus_fails()

    # control: a state that missed the rollover validates nothing, and cannot catch up
    lab.daemon.stop()
    lab.state.write_text(lab.hier.trust_anchor_ds.read_text())  # KSK1 only
    lab.daemon.start()
    deadline = time.monotonic() + PHASE
    while not lab.daemon.status()["dns"]["anchor_probe"].startswith("failed"):
        assert time.monotonic() < deadline, lab.daemon.status()["dns"]
        time.sleep(0.2)
    reply = lab.ask(f"k{next(lab.names)}.example.test.")
    assert reply.rcode() == dns.rcode.SERVFAIL
    assert set(lab.anchors()) == {t1} and lab.anchors()[t1]["state"] == "valid"
    assert "bogus" in lab.daemon.status()["dns"]["anchor_probe"]


def _seconds(iso: str) -> float:
    return time.mktime(time.strptime(iso, "%Y-%m-%dT%H:%M:%SZ"))
