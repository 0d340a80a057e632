"""IPv6 OE for the LAN: a LAN device's IPv6 flow to an OE peer leaves the router as ESP.

Why a module of its own: the IPv6 LAN path differs from IPv4. LAN devices keep their IPv6
addresses, and only flows to peers in the nft set ``oe_peers6`` (peers with a Child SA) are
source-NATed to the router's WAN address, which makes the post-NAT XFRM lookup hit the SA.
So the tunnel must exist before the flow starts: the DNS front builds it while it holds the
AAAA answer, the OE service puts the peer into ``oe_peers6``, and only then releases the
answer (oe/service.py ``_sync_peers6``).

The peer: oe-null (libreswan, clear-or-private for everyone, NULL auth) answers only IPv4 in
the shipped lab (libreswan OE conns have one address family). This module adds the IPv6
twin of its conn at run time (``clear-or-private-6``: left=2001:db8:1::10, policy ``::/0``,
rendered by labkit.peers like every other conn), restarts its pluto, and restores the
IPv4-only config at the end. Names: v6only.example.test (AAAA 2001:db8:1::10 and a
"no key" IPSECKEY, i.e. NULL-auth OE) in the signed lab zone.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import oelab
from lab import Lab

pytestmark = pytest.mark.qemu

ROUTER_ID = "%null"
RESULTS = Path(__file__).resolve().parents[2] / "test-results" / "qemu-ipv6.json"
WAN6 = "2001:db8:1::2"
CLIENT6 = "fd00:1::100"
PEER = "oe-null"
PEER6 = "2001:db8:1::10"
NAME = "v6only.example.test"
#: a TCP SYN (no ACK) over IPv6 without extension headers (BPF's tcp[] is IPv4 only)
SYN6 = "ip6[6] == 6 and ip6[53] & 0x12 == 0x02"


def pluto_traffic(lab: Lab) -> str:
    ctl = f"{lab.state_dir(PEER)}/run/pluto.ctl"
    return lab.host(PEER, f"ipsec whack --ctlsocket {ctl} --trafficstatus").check().stdout


def peers6(lab: Lab) -> set[str]:
    out = lab.router("nft list set inet oe_router oe_peers6").check().stdout
    m = re.search(r"elements = \{([^}]*)\}", out)
    return {e.strip() for e in m.group(1).split(",")} if m else set()


def sa_spis(lab: Lab, peer: str) -> set[str]:
    out = lab.router(f"ip xfrm state list dst {peer}; ip xfrm state list src {peer}").check()
    return set(re.findall(r"proto esp spi (0x[0-9a-f]+)", out.stdout)) - {"0x00000000"}


@pytest.fixture(scope="module")
def v6(lab: Lab) -> Iterator[Lab]:
    assert PEER not in lab.failed_hosts, lab.failed_hosts[PEER]
    oelab.libreswan_ipv6_twin(lab, PEER, PEER6, on=True)
    try:
        oelab.start_daemon(lab, local_id=ROUTER_ID)
        try:
            yield lab
        finally:
            oelab.stop_daemon(lab)
    finally:
        oelab.libreswan_ipv6_twin(lab, PEER, PEER6, on=False)


def test_lan_ipv6_flow_to_an_oe_peer_leaves_as_esp(v6: Lab, figures: dict[str, Any]) -> None:
    """curl -6 from the LAN client to v6only.example.test: the DNS front builds the tunnel to
    2001:db8:1::10, the peer enters oe_peers6 before the answer is released, and the whole
    HTTP exchange crosses the WAN as ESP with 0 cleartext TCP packets; pluto sees the
    router's WAN IPv6 address as its peer (the flow was NATed into the host-to-host SA)."""
    lab = v6
    assert peers6(lab) == set(), "oe_peers6 must start empty"
    clear_tcp = f"host {PEER6} and tcp"
    with lab.capture_wan(bpf=f"host {PEER6}", label="ipv6-curl") as cap:
        t0 = time.monotonic()
        res = lab.client(
            f"curl -6 -s -m 20 -o /dev/null -w '%{{http_code}} %{{remote_ip}}' http://{NAME}/",
            timeout=40,
        )
        took = time.monotonic() - t0
    in_set = peers6(lab)
    spis = sa_spis(lab, PEER6)
    esp, clear = cap.count(f"esp and host {PEER6}"), cap.count(clear_tcp)
    figures["ipv6_lan_flow"] = {
        "curl": res.stdout,
        "curl_s": round(took, 2),
        "esp_packets": esp,
        "cleartext_tcp_packets": clear,
        "oe_peers6": sorted(in_set),
        "spis": sorted(spis),
    }
    assert res.rc == 0 and res.stdout.split() == ["200", PEER6], (res.rc, res.stdout, res.stderr)
    assert in_set == {PEER6}
    assert len(spis) == 2, spis
    assert clear == 0, "cleartext TCP to the OE peer:\n" + cap.text(clear_tcp)
    assert esp >= 8, cap.text()  # handshake, request, response and close, both ways
    assert WAN6 in pluto_traffic(lab)
    tunnels = [t for t in oelab.status(lab)["tunnels"] if t["peer"] == PEER6]
    assert tunnels, "no tunnel to the IPv6 peer in oe status"


def test_lan_ipv6_ping_to_an_oe_peer_is_protected(v6: Lab, figures: dict[str, Any]) -> None:
    """ping -6 through the tunnel the previous test built: answered, and as ESP only.

    The policy table excludes ICMPv6 by type (neighbour discovery, 133-137), so echo
    (128/129) follows the peer's Child SA like the HTTP flow did; it used to pass all of
    ICMPv6 around OE and the echo left in the clear."""
    lab = v6
    if PEER6 not in peers6(lab):
        lab.client(f"curl -6 -s -m 20 -o /dev/null http://{NAME}/", timeout=40)
    echo = f"host {PEER6} and icmp6 and ip6[40] == 128"  # echo request, no extension header
    with lab.capture_wan(bpf=f"host {PEER6}", label="ipv6-ping") as cap:
        ping = lab.client(f"ping -6 -n -c 5 -i 0.3 -W 1 {PEER6}", timeout=20)
    replies = len(re.findall(r"bytes from", ping.stdout))
    esp = cap.count(f"esp and host {PEER6}")
    figures["ipv6_ping"] = {
        "replies_of_5": replies,
        "cleartext_echo": cap.count(echo),
        "esp_packets": esp,
    }
    assert cap.count(echo) == 0, "cleartext ICMPv6 echo to the OE peer:\n" + cap.text(echo)
    assert replies == 5, ping.stdout
    assert esp >= 10, cap.text()  # 5 requests and 5 replies, each one ESP packet


def test_tunnel_down_takes_the_peer_out_of_oe_peers6(v6: Lab, figures: dict[str, Any]) -> None:
    """`oe down` removes the Child SA; the peer leaves oe_peers6, so a new LAN flow to it is
    no longer NATed to a tunnel that is gone (it leaves with the client's own address)."""
    lab = v6
    if PEER6 not in peers6(lab):  # the previous test brings it up; standalone: do it here
        lab.client(f"curl -6 -s -m 20 -o /dev/null http://{NAME}/", timeout=40)
    assert peers6(lab) == {PEER6}
    oelab.oe(lab, f"down {PEER6}").check()
    deadline = time.monotonic() + 10
    while PEER6 in peers6(lab) or sa_spis(lab, PEER6):
        assert time.monotonic() < deadline, (peers6(lab), sa_spis(lab, PEER6))
        time.sleep(0.3)
    figures["ipv6_down"] = {"oe_peers6_after_down": sorted(peers6(lab))}


PLAIN6 = "2001:db8:1::20"  # the world's plain host: HTTP over IPv6, no IKE at all


def _cold(lab: Lab) -> None:
    """No tunnel to the peer (and no larval state left from one: xfrm_acq_expires=1)."""
    if PEER6 in peers6(lab) or sa_spis(lab, PEER6):
        oelab.oe(lab, f"down {PEER6}").check()
        deadline = time.monotonic() + 10
        while PEER6 in peers6(lab) or sa_spis(lab, PEER6):
            assert time.monotonic() < deadline, (peers6(lab), sa_spis(lab, PEER6))
            time.sleep(0.3)
    time.sleep(1.5)


def hold_stats(lab: Lab) -> dict[str, int]:
    stats: dict[str, int] = oelab.status(lab)["daemon"]["datapath_stats"]
    return stats


def test_lan_ipv6_flow_by_address_is_packet_triggered(v6: Lab, figures: dict[str, Any]) -> None:
    """ping -6 and curl -6 from the LAN client to the peer's IPv6 address itself, no DNS
    (so the DNS trigger plays no part), each with no tunnel up. The LAN-sourced trap covers
    the first packet; the packet hold (``packet_hold``, on by default) queues it before
    the routing-time lookup and raises the ACQUIRE the kernel would (the LAN host as
    source); the router negotiates WAN6 <-> peer, puts the peer into oe_peers6, installs
    the LAN PASS, and then lets the held packets go: they are NATed into the SA. So pings
    every 50 ms lose none, the cold connect sends one SYN, which leaves as ESP, and no
    cleartext echo or TCP crosses the WAN."""
    lab = v6
    _cold(lab)
    assert peers6(lab) == set() and not sa_spis(lab, PEER6)
    before = hold_stats(lab)
    assert "queued" in before, f"the packet hold is off for IPv6: {before}"
    echo = f"host {PEER6} and icmp6 and ip6[40] == 128"
    with lab.capture_wan(bpf=f"host {PEER6}", label="ipv6-by-address") as cap:
        t0 = time.monotonic()
        ping = lab.client(f"ping -6 -n -c 40 -i 0.05 -W 2 {PEER6}", timeout=40)
        took = time.monotonic() - t0
    seqs = [int(s) for s in re.findall(r"icmp_seq=(\d+)", ping.stdout)]
    esp = cap.count(f"esp and host {PEER6}")
    clear_echo = cap.count(echo)
    spis = sa_spis(lab, PEER6)
    in_set = peers6(lab)
    _cold(lab)
    with (
        lab.capture("eth0", netns="client", label="ipv6-cold-lan") as lan,
        lab.capture_wan(bpf=f"host {PEER6}", label="ipv6-cold-wan") as wan,
    ):
        curl = lab.client(
            f"curl -6 -s -m 20 -o /dev/null -w '%{{http_code}} %{{time_connect}}' "
            f"http://[{PEER6}]/",
            timeout=40,
        )
    syns = lan.count(f"dst {PEER6} and {SYN6}")
    after = hold_stats(lab)
    acquire_log = [
        ln for ln in oelab.daemon_log(lab).splitlines() if f"negotiating with {PEER6}" in ln
    ]
    code, connect = [*curl.stdout.split(), "", "0"][:2]
    figures["ipv6_lan_by_address"] = {
        "pings_lost_of_40": 40 - len(seqs),
        "first_reply_seq": seqs[0] if seqs else None,
        "ping_s": round(took, 2),
        "ping_esp_packets": esp,
        "cleartext_echo": clear_echo,
        "curl": code,
        "tcp_connect_s": float(connect),
        "client_syns": syns,
        "cleartext_tcp": wan.count("tcp"),
        "curl_esp_packets": wan.count("esp"),
        "held": after["held"] - before["held"],
        "released_into_sa": after["released_into_sa"] - before["released_into_sa"],
        "oe_peers6": sorted(in_set),
    }
    assert seqs == list(range(1, 41)), f"echo lost: {seqs}\n" + oelab.daemon_log(lab)[-3000:]
    assert clear_echo == 0, "cleartext ICMPv6 echo to the OE peer:\n" + cap.text(echo)
    assert esp >= 2 * len(seqs), cap.text()
    assert in_set == {PEER6} and len(spis) == 2, (in_set, spis)
    assert curl.rc == 0 and code == "200", (curl.rc, curl.stdout, curl.stderr)
    assert syns == 1, figures["ipv6_lan_by_address"]  # the held SYN left: no 1 s resend
    assert wan.count("tcp") == 0, "cleartext TCP to the OE peer:\n" + wan.text("tcp")
    assert wan.count("esp") >= 8, wan.text()
    assert 0 < float(connect) < 3.0, figures["ipv6_lan_by_address"]
    assert after["released_into_sa"] - before["released_into_sa"] >= 2, (before, after)
    assert acquire_log, "the daemon logged no negotiation with the peer"
    assert WAN6 in pluto_traffic(lab)


def test_lan_ipv6_flow_to_a_plain_host_falls_back_to_clear(
    v6: Lab, figures: dict[str, Any]
) -> None:
    """curl -6 from the LAN client to a plain IPv6 host without IKE, by address: the packet
    hold keeps the SYN while the LAN trap's ACQUIRE starts a negotiation, the host answers
    IKE with ICMP port unreachable (fail fast), and once the pass shunts for the WAN6 and
    LAN sources are in, the held SYN itself leaves in the clear, un-NATed (the client's own
    address): one SYN, no retransmission."""
    lab = v6
    with (
        lab.capture("eth0", netns="client", label="ipv6-plain-lan") as lan,
        lab.capture_wan(bpf=f"host {PLAIN6}", label="ipv6-plain") as cap,
    ):
        t0 = time.monotonic()
        curl = lab.client(
            f"curl -6 -s -m 20 -o /dev/null -w '%{{http_code}}' http://[{PLAIN6}]/", timeout=40
        )
        took = time.monotonic() - t0
    shunts = [s for s in oelab.status(lab)["shunts"] if s["destination"] == f"{PLAIN6}/128"]
    policies = lab.router(f"ip -6 xfrm policy list dst {PLAIN6}/128 dir out").check().stdout
    srcs = set(re.findall(r"^src (\S+) dst", policies, re.M))
    figures["ipv6_lan_plain"] = {
        "curl": curl.stdout,
        "curl_s": round(took, 2),
        "esp_packets": cap.count("esp"),
        "clear_tcp_from_client": cap.count(f"tcp and src host {CLIENT6}"),
        "client_syns": lan.count(f"dst {PLAIN6} and {SYN6}"),
        "wan_syns": cap.count(f"dst {PLAIN6} and {SYN6}"),
        "shunts": shunts,
        "shunt_sources": sorted(srcs),
    }
    assert curl.rc == 0 and curl.stdout == "200", (curl.rc, curl.stdout, curl.stderr)
    assert took < 8, f"curl took {took:.1f} s"
    syns = (figures["ipv6_lan_plain"]["client_syns"], figures["ipv6_lan_plain"]["wan_syns"])
    assert syns == (1, 1), figures["ipv6_lan_plain"]  # the held SYN released, not resent
    assert cap.count("esp") == 0
    assert cap.count(f"tcp and src host {CLIENT6}") > 0, cap.text()  # un-NATed, in the clear
    # one row in oe status; two kernel policies (the WAN6 and the LAN prefix as source)
    assert len(shunts) == 1 and shunts[0]["kind"] == "pass", shunts
    assert f"{WAN6}/128" in srcs and any(s.startswith("fd00:1::") for s in srcs), policies
    assert PLAIN6 not in peers6(lab)
