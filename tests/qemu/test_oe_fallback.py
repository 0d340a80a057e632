"""private-or-clear fallback in the QEMU lab: a flow to a host without IKE must get through in
the clear, quickly, and the flow that triggered the negotiation must survive it.

Why these tests exist: with the default groups (0.0.0.0/0 private-or-clear) every plain IPv4
site's first connection is trapped. The kernel drops the trapped flow's packets until the pass
shunt exists (a source-NATed LAN flow cannot be queued: nf_xfrm_me_harder looks up without
XFRM_LOOKUP_QUEUE), so the negotiation must fail before TCP's next SYN retransmission
(t = 1, 3, 7, 15, 31 s). It used to take 15.5 s (the retry count was off by one), so the
triggering connection's SYN at 15 s still met the trap and the next came at 31 s: curl timed
out although new flows worked. Now an ICMP unreachable quoting our IKE_SA_INIT fails the SA at
once and a silent host is given up after 0.4 + 0.8 + 1.6 = 2.8 s.

Hosts (labkit world): plain .20 and bogus .22 answer UDP 500 with ICMP port unreachable;
insecure .21 is made silent for the test (nft drops UDP 500/4500 in its netns). Assertions
come from packets on the router's WAN cable (world side) and the client's own timings.

By name (issue 16 part 2): plain.example.test has a signed denial of IPSECKEY; made silent
too, it is reached with no stall at all, because the DNS front installs a pass shunt
(``oe.dns.keyless pass``) before the client gets the answer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import oelab
from lab import Lab

pytestmark = pytest.mark.qemu

ROUTER_ID = "@router.example.test"
WAN4 = "203.0.113.2"
RESULTS = Path(__file__).resolve().parents[2] / "test-results" / "qemu-oe-fallback.json"
CURL = "curl -4 -s -o /dev/null --max-time 15 -w '%{http_code} %{time_connect}' "
IKE_OUT = "src {wan} and dst {dst} and udp dst port 500"

CONNECT = """
import socket, sys, time
t0 = time.monotonic()
s = socket.create_connection((sys.argv[1], 80), timeout=15)
t1 = time.monotonic()
s.sendall(b"GET / HTTP/1.0\\r\\nHost: x\\r\\n\\r\\n")
data = b""
while chunk := s.recv(4096):
    data += chunk
print(f"{t1 - t0:.3f} {data.split(b' ')[1].decode()}")
"""


def no_states(lab: Lab) -> int:
    """XfrmOutNoStates: packets the kernel dropped because a trap had no SA yet."""
    out = lab.router("awk '/XfrmOutNoStates/{print $2}' /proc/net/xfrm_stat").check().stdout
    return int(out.strip())


def shunt(lab: Lab, addr: str) -> dict[str, Any]:
    rows = [s for s in oelab.status(lab)["shunts"] if s["destination"] == f"{addr}/32"]
    assert rows, f"no shunt for {addr} in oe status"
    return dict(rows[0])


def test_lan_flow_to_host_without_ike_fails_fast_and_goes_clear(
    oe_lab: Lab, figures: dict[str, Any]
) -> None:
    """The integrator's case: `curl -4` by address to a plain host from the LAN. The host
    answers IKE with ICMP port unreachable; the SA fails on the first one (one IKE_SA_INIT
    on the wire, no retransmission), the pass shunt goes in and the client's first SYN
    retransmission (1 s) is forwarded in the clear: connect in about 1 s, no ESP."""
    lab = oe_lab
    plain = lab.plan.host("plain").ipv4
    before = no_states(lab)
    with lab.capture_wan(label="wan-fallback-plain") as wan:
        res = lab.client(CURL + f"http://{plain}/", timeout=40)
    assert res.rc == 0, f"curl failed (rc {res.rc}): the trapped flow did not recover"
    code, connect = res.stdout.split()
    assert code == "200", res.stdout
    ike = wan.count(IKE_OUT.format(wan=WAN4, dst=plain))
    assert ike == 1, f"{ike} IKE_SA_INIT sent: the ICMP unreachable did not end the attempt"
    assert wan.count(f"icmp and src {plain}") >= 1
    assert wan.count(f"esp and host {plain}") == 0
    assert wan.count(f"host {plain} and tcp port 80") >= 4
    assert float(connect) < 2.0, f"connect took {connect} s"
    row = shunt(lab, plain)
    assert row["kind"] == "pass" and "unreachable" in row["reason"], row
    figures["lan curl, ICMP-unreachable host"] = {
        "connect_s": float(connect),
        "ike_packets": ike,
        "dropped_while_trapped": no_states(lab) - before,
        "larval_drop": lab.router("sysctl -n net.core.xfrm_larval_drop").check().stdout.strip(),
    }


def test_lan_flow_to_silent_host_gives_up_before_the_third_syn(
    oe_lab: Lab, figures: dict[str, Any]
) -> None:
    """A host that drops IKE silently: 3 sends (0, 0.4, 1.2 s), given up at 2.8 s, so the
    client's SYN at 3 s meets the pass shunt; connect in about 3 s instead of 31 s."""
    lab = oe_lab
    insecure = lab.plan.host("insecure").ipv4
    with oelab.silent_host(lab, "insecure"), lab.capture_wan(label="wan-fallback-silent") as wan:
        res = lab.client(CURL + f"http://{insecure}/", timeout=40)
    assert res.rc == 0, f"curl failed (rc {res.rc}): the trapped flow did not recover"
    code, connect = res.stdout.split()
    assert code == "200", res.stdout
    ike = wan.count(IKE_OUT.format(wan=WAN4, dst=insecure))
    assert ike == 3, f"{ike} IKE_SA_INIT sent, expected retransmit_tries = 3"
    assert wan.count(f"esp and host {insecure}") == 0
    assert float(connect) < 5.0, f"connect took {connect} s"
    assert "no answer" in shunt(lab, insecure)["reason"]
    figures["lan curl, silent host"] = {"connect_s": float(connect), "ike_packets": ike}


def test_router_own_flow_to_host_without_ike(oe_lab: Lab, figures: dict[str, Any]) -> None:
    """The router's own TCP connection (python on the router) to a host without IKE: its
    socket must not keep the larval black hole; it connects in the clear after the fallback."""
    lab = oe_lab
    bogus = lab.plan.host("bogus").ipv4
    (lab.run_dir / "oe_connect.py").write_text(CONNECT)
    before = no_states(lab)
    with lab.capture_wan(label="wan-fallback-own") as wan:
        res = lab.router(f"python3 /lab/oe_connect.py {bogus}", timeout=40)
    assert res.rc == 0, res.stderr
    connect, code = res.stdout.split()
    assert code == "200"
    assert wan.count(IKE_OUT.format(wan=WAN4, dst=bogus)) == 1
    assert wan.count(f"esp and host {bogus}") == 0
    assert float(connect) < 2.0, f"connect took {connect} s"
    figures["router own connect, ICMP-unreachable host"] = {
        "connect_s": float(connect),
        "dropped_while_trapped": no_states(lab) - before,
    }


def test_ping_every_50ms_loses_at_most_two(oe_lab: Lab, figures: dict[str, Any]) -> None:
    """First-packet count for a forwarded LAN flow: ping every 50 ms to a host without IKE.
    The pass shunt of the first test is removed from the kernel behind the manager's back
    (a lab shortcut for "a fresh destination"): the next echo request traps again, the
    manager negotiates anew and fails on the ICMP. Echo requests sent while trapped are
    lost (no queue on the NAT path); at most the first two."""
    lab = oe_lab
    plain = lab.plan.host("plain").ipv4
    lab.router(f"ip xfrm policy delete src {WAN4}/32 dst {plain}/32 dir out").check()
    res = lab.client(f"ping -n -i 0.05 -c 40 -W 1 {plain}", timeout=40)
    seqs = [
        int(w.split("=")[1])
        for line in res.stdout.splitlines()
        if "bytes from" in line
        for w in line.split()
        if w.startswith("icmp_seq=")
    ]
    assert seqs, res.stdout
    assert min(seqs) <= 3 and len(seqs) >= 37, res.stdout
    figures["lan ping 50ms, ICMP-unreachable host"] = {
        "first_reply_seq": min(seqs),
        "lost": 40 - len(seqs),
    }


def test_lan_client_resolving_a_silent_keyless_host_connects_at_once(
    oe_lab: Lab, figures: dict[str, Any]
) -> None:
    """Issue 16 part 2: plain.example.test (a signed NSEC denies its IPSECKEY), its host
    made silent. The client resolves the name through the router and connects: the front
    proved the name keyless and put a pass shunt in before the answer, so the first SYN
    leaves the WAN right after the answer, is never retransmitted, and no IKE goes out."""
    lab = oe_lab
    plain = lab.plan.host("plain")
    assert plain.name
    # no earlier shunt (the address test above left one) and no answer cached in dnsmasq
    oelab.oe(lab, "flush").check()
    lab.router("kill -HUP $(cat /run/dnsmasq.pid)").check()
    lan_dev = "eth0"
    with (
        oelab.silent_host(lab, "plain"),
        lab.capture(lan_dev, netns="client", label="lan-keyless") as lan,
        lab.capture_wan(label="wan-keyless") as wan,
    ):
        res = lab.client(
            "curl -4 -s -o /dev/null --max-time 15 "
            "-w '%{http_code} %{time_namelookup} %{time_connect}' "
            f"http://{plain.name}/",
            timeout=40,
        )
    try:
        assert res.rc == 0, f"curl failed (rc {res.rc}): {res.stderr}"
        code, t_dns, t_connect = res.stdout.split()
        assert code == "200", res.stdout
        client, ip4 = lab.plan.client4, plain.ipv4
        syns = lan.packets(f"src {client} and dst {ip4} and tcp[tcpflags] == tcp-syn")
        answers = lan.packets(f"udp src port 53 and dst {client}")
        wan_syns = wan.packets(f"src {WAN4} and dst {ip4} and tcp[tcpflags] == tcp-syn")
        assert len(syns) == 1, "SYN retransmitted (first SYN lost):\n" + lan.text(
            f"host {ip4} and tcp"
        )
        assert wan_syns, "no SYN on the WAN"
        assert wan.count(IKE_OUT.format(wan=WAN4, dst=ip4)) == 0, "IKE probe to a keyless host"
        before = [t for t, _ in answers if t <= syns[0][0]]
        assert before, "no DNS answer to the client before its SYN:\n" + lan.text("udp port 53")
        answer_to_wan_syn = wan_syns[0][0] - before[-1]
        connect = float(t_connect) - float(t_dns)
        # generous bounds (TCG, a loaded CI box); the figure's goal is 50 ms
        assert answer_to_wan_syn < 1.0, f"first SYN on the WAN {answer_to_wan_syn:.3f} s after"
        assert connect < 1.0, f"connect took {connect:.3f} s after the answer"
        row = shunt(lab, ip4)
        assert row["kind"] == "pass" and "no key (secure denial)" in row["reason"], row
        figures["lan curl by name, silent keyless host"] = {
            "answer_to_first_wan_syn_ms": round(answer_to_wan_syn * 1000, 1),
            "connect_after_answer_s": round(connect, 3),
            "syn_retransmits": len(syns) - 1,
            "ike_packets": 0,
        }
    finally:
        oelab.oe(lab, "flush")  # later scenarios meet plain's trap as before
