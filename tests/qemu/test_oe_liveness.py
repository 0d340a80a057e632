"""A peer that stops answering, and tunnel counters, in the QEMU lab (real kernel ESP, libreswan).

Why a module of its own: it needs a daemon with a short liveness delay (dpd_delay 3 s; the
shipped 0.4 s x 3 retransmissions give up 2.8 s later) and a "private" peer, so it starts
oe-routerd with its own config and stops it at the end. Peers: ls-b (203.0.113.31,
libreswan clear-or-private for everyone) in our default private-or-clear group, and the
matrix host ls-m's own address (203.0.113.32, switched to clear-or-private with labkit's
set-group.sh) in our "private" group.

"Stops answering" is made without restarting anything: nftables in the peer's netns drops
every packet from and to the router's WAN address, so pluto keeps its state and never sends
a DELETE; only liveness checks can notice. Figures go to test-results/qemu-liveness.json.
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

WAN4 = "203.0.113.2"
POC_PEER = "203.0.113.31"  # ls-b: ours private-or-clear (default 0.0.0.0/0)
PRIVATE_PEER = "203.0.113.32"  # ls-m: ours private
PEERS = {POC_PEER: "ls-b", PRIVATE_PEER: "ls-m"}
DPD_DELAY = 3.0
GIVE_UP = 0.4 + 0.8 + 1.6  # the shipped retransmit_timeout 0.4 s, retransmit_tries 3
RESULTS = Path(__file__).resolve().parents[2] / "test-results" / "qemu-liveness.json"
_SHIPPED_CONFIG = oelab.router_config
NFT_TABLE = "oe_liveness_test"
ECHO = "(icmp[icmptype] == icmp-echo or icmp[icmptype] == icmp-echoreply)"


def liveness_config(local_id: str = "%null") -> str:
    text, n = re.subn(
        r"option dpd_delay '[^']*'",
        f"option dpd_delay '{DPD_DELAY:.0f}s'",
        _SHIPPED_CONFIG(local_id),
    )
    assert n == 1, "the shipped config has no option dpd_delay"
    return text + f"\nconfig policy\n\toption group 'private'\n\tlist dest '{PRIVATE_PEER}/32'\n"


def set_group(lab: Lab, variant: str) -> None:
    oelab.libreswan_set_group(lab, "ls-m", variant)


def silence(lab: Lab, netns: str) -> None:
    """The peer's netns drops everything from and to the router: no answers, no DELETE."""
    (lab.run_dir / f"{NFT_TABLE}.nft").write_text(
        f"table inet {NFT_TABLE} {{\n"
        f"  chain in {{ type filter hook input priority -300; ip saddr {WAN4} drop; }}\n"
        f"  chain out {{ type filter hook output priority -300; ip daddr {WAN4} drop; }}\n"
        "}\n"
    )
    lab.host(netns, f"nft -f /lab/{NFT_TABLE}.nft").check()


def unsilence(lab: Lab, netns: str) -> None:
    lab.host(netns, f"nft delete table inet {NFT_TABLE} 2>/dev/null; true")


def status(lab: Lab) -> dict[str, Any]:
    return oelab.status(lab)


def tunnel_row(doc: dict[str, Any], peer: str) -> dict[str, Any] | None:
    """The OE manager's established row for ``peer`` (IKE rows are separate)."""
    for t in doc["tunnels"]:
        if t["source"] != "ike" and t["peer"] == peer and t["state"] == "established":
            return dict(t)
    return None


def shunt(doc: dict[str, Any], peer: str) -> dict[str, Any] | None:
    for s in doc["shunts"]:
        if s["destination"] == f"{peer}/32":
            return dict(s)
    return None


def esp_states(lab: Lab, peer: str) -> list[str]:
    """The router's ESP states with ``peer`` (larval ones, spi 0, are not SAs)."""
    text = lab.router("ip xfrm state").check().stdout
    out = []
    for m in re.finditer(r"^src (\S+) dst (\S+)\n\s+proto esp spi (0x[0-9a-f]+)", text, re.M):
        src, dst, spi = m.groups()
        if peer in (src, dst) and int(spi, 16) != 0:
            out.append(f"{src}->{dst} {spi}")
    return out


@pytest.fixture(scope="module")
def live(lab: Lab) -> Iterator[Lab]:
    for h in ("ls-b", "ls-m"):
        assert h not in lab.failed_hosts, lab.failed_hosts[h]
    set_group(lab, "clear-or-private")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(oelab, "router_config", liveness_config)
        oelab.start_daemon(lab, local_id="%null")
    try:
        yield lab
    finally:
        for netns in PEERS.values():
            unsilence(lab, netns)
        oelab.stop_daemon(lab)
        set_group(lab, "matrix")


def test_tunnel_counters_count_the_traffic_and_grow(live: Lab, figures: dict[str, Any]) -> None:
    """``oe status`` carries each Child SA's bytes and packets both ways as the kernel counts
    them: non-zero once traffic flowed, and 5 more echo requests out after 5 more pings."""
    lab = live
    # the first packets wait for the packet-triggered negotiation (and are dropped meanwhile,
    # issue 16): ping until the tunnel answers, then count
    oelab.wait_until(
        f"a reply from {POC_PEER} through its tunnel",
        lambda: lab.client(f"ping -n -c 1 -W 1 {POC_PEER}", timeout=30).ok,
        timeout=60,
    )
    lab.client(f"ping -n -c 3 -i 0.3 -W 2 {POC_PEER}", timeout=30).check()
    first = tunnel_row(status(lab), POC_PEER)
    assert first is not None, status(lab)["tunnels"]
    assert first["bytes_out"] > 0 and first["packets_out"] > 0, first
    assert first["bytes_in"] > 0 and first["packets_in"] > 0, first
    res = lab.client(f"ping -n -c 5 -i 0.2 -W 2 {POC_PEER}", timeout=30)
    replies = len(re.findall(r"bytes from", res.stdout))
    after = tunnel_row(status(lab), POC_PEER)
    assert after is not None
    figures["counters"] = {"before": first, "after": after, "replies": replies}
    assert after["packets_out"] - first["packets_out"] >= 5, (first, after)
    assert after["packets_in"] - first["packets_in"] >= replies >= 1, (first, after, replies)
    assert after["bytes_out"] > first["bytes_out"] and after["bytes_in"] > first["bytes_in"]
    # 84-byte ICMP echoes (20 IP + 8 ICMP + 56 data): the kernel counts the inner packets
    assert after["bytes_out"] - first["bytes_out"] >= 5 * 84, (first, after)
    text = oelab.oe(lab, "status").check().stdout  # the table shows them too
    assert f"{after['bytes_out']}B/{after['packets_out']}p" in text, text


def test_a_restarted_peer_is_noticed_and_gets_its_tunnel_back(
    live: Lab, figures: dict[str, Any]
) -> None:
    """pluto on the private peer is killed (-9: no DELETE) and started again with no memory
    of us. Only the liveness check can notice; the retry that follows it finds the peer
    back, so the flow resumes in a new Child SA instead of sitting behind a 15-minute drop
    shunt, and not one packet of it leaves in the clear."""
    lab = live
    lab.client(f"ping -n -c 3 -i 0.3 -W 2 {PRIVATE_PEER}", timeout=30).check()
    old = set(esp_states(lab, PRIVATE_PEER))
    assert old, "no Child SA with the private peer to start from"
    noticed = oelab.daemon_log(lab).count("stopped answering liveness checks")
    limit = DPD_DELAY + 2 * GIVE_UP + 40  # and pluto's restart under TCG
    with lab.capture_wan(bpf=f"host {PRIVATE_PEER}", label="restart") as cap:
        lab.client(f"ping -n -i 0.25 -w {limit:.0f} {PRIVATE_PEER} > /tmp/live-restart.ping &")
        time.sleep(2)
        t0 = time.monotonic()
        lab.world(f"kill -9 $(cat {lab.state_dir('ls-m')}/pluto.pid)").check()
        set_group(lab, "clear-or-private")  # finds pluto dead, starts it again
        new: set[str] = set()
        while time.monotonic() - t0 < limit:
            time.sleep(1.0)
            new = set(esp_states(lab, PRIVATE_PEER)) - old
            if new and tunnel_row(status(lab), PRIVATE_PEER) is not None:
                break
        back = round(time.monotonic() - t0, 1)
        res = lab.client("ping -n -c 3 -i 0.3 -W 2 " + PRIVATE_PEER, timeout=30)
        lab.client("pkill -f 'ping -n -i 0.25'; true")
    doc = status(lab)
    figures["restart"] = {"tunnel_back_after_s": back, "limit_s": limit}
    assert new and not (old & set(esp_states(lab, PRIVATE_PEER))), (old, new)
    assert res.rc == 0, "the flow did not resume:\n" + res.stdout
    assert shunt(doc, PRIVATE_PEER) is None, doc["shunts"]
    assert oelab.daemon_log(lab).count("stopped answering liveness checks") > noticed
    assert cap.count(ECHO) == 0, "a private flow left in the clear:\n" + cap.text(ECHO)


def test_a_silent_peer_is_torn_down_and_falls_back_per_group(
    live: Lab, figures: dict[str, Any]
) -> None:
    """Both peers stop answering at once. Within the liveness delay plus two give-ups (the
    dead IKE SA's check, then the one retry of each flow) and a margin for the loaded
    machine, the router's Child SAs are gone and `oe status` shows the groups' failure
    shunts: pass for the private-or-clear peer, whose pings then leave in the clear, drop
    for the private peer, which never gets a cleartext packet."""
    lab = live
    for peer in PEERS:
        lab.client(f"ping -n -c 3 -i 0.3 -W 2 {peer}", timeout=30).check()
        assert esp_states(lab, peer), f"no Child SA with {peer} to start from"
    limit = DPD_DELAY + 2 * GIVE_UP + 30  # margin: TCG and three labs on two cores
    seen: dict[str, float] = {}
    with lab.capture_wan(bpf=f"host {POC_PEER} or host {PRIVATE_PEER}", label="liveness") as cap:
        lab.client(
            f"ping -n -i 0.25 -w {limit + 10:.0f} {POC_PEER} >/dev/null 2>&1 & "
            f"ping -n -i 0.25 -w {limit + 10:.0f} {PRIVATE_PEER} >/dev/null 2>&1 &",
            timeout=10,
        )
        t0 = time.monotonic()
        for netns in PEERS.values():
            silence(lab, netns)
        doc: dict[str, Any] = {}
        while time.monotonic() - t0 < limit and len(seen) < 2:
            time.sleep(1.0)
            doc = status(lab)
            for peer in PEERS:
                if peer not in seen and shunt(doc, peer) is not None:
                    seen[peer] = round(time.monotonic() - t0, 1)
        gone = {peer: esp_states(lab, peer) for peer in PEERS}
        time.sleep(3)  # pings after the fallback: clear to one peer, dropped to the other
        t_end = time.monotonic()
        lab.client("pkill -x ping; true")
    figures["fallback_after_s"] = seen
    figures["limit_s"] = limit
    poc, priv = shunt(doc, POC_PEER), shunt(doc, PRIVATE_PEER)
    assert poc is not None and priv is not None, (seen, doc.get("shunts"), doc.get("tunnels"))
    assert poc["kind"] == "pass" and priv["kind"] == "drop", (poc, priv)
    for s in (poc, priv):
        assert "stopped answering liveness checks" in s["reason"], s
    assert gone == {POC_PEER: [], PRIVATE_PEER: []}, gone
    assert tunnel_row(doc, POC_PEER) is None and tunnel_row(doc, PRIVATE_PEER) is None
    clear_poc = cap.count(f"src {WAN4} and dst {POC_PEER} and icmp[icmptype] == icmp-echo")
    clear_priv = cap.count(f"host {PRIVATE_PEER} and {ECHO}")
    figures["cleartext_echo"] = {"private-or-clear": clear_poc, "private": clear_priv}
    figures["capture_s"] = round(t_end - t0, 1)
    assert clear_priv == 0, "a private flow left in the clear:\n" + cap.text(ECHO)
    assert clear_poc >= 4, f"the private-or-clear flow did not fall back to clear: {clear_poc}"
    assert "stopped answering" in oelab.daemon_log(lab)
