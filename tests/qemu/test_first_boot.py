"""Out of the box: the router boots with the package installed by opkg and nothing else set.

Why: a user flashes the package and changes nothing. The lab's own session leaves the
daemon to the tests (oelab.start_daemon writes a config, starts it, points dnsmasq at it);
this module boots a lab of its own in first-boot mode (``Lab(first_boot=True)``, the
``first_boot_lab`` fixture) where none of that happens: the package's rc.d links are as
its default_postinst left them, procd starts oe-routerd at boot (S90, before the network
is up), dnsmasq keeps OpenWrt's own DNS set-up (the daemon's capture redirects its
forwards to the front while the front runs), and the one change to
the shipped /etc/config/oe is the trust anchor pointed at the lab's root (the lab's DNS
root is not IANA's), delivered as firmware customisation: a uci-defaults script. netifd
brings up the LAN at boot and the WAN late, once the daemon runs (the lab's ifup, as a
DHCP lease would): its addresses, resolv.conf.auto and interface.update notification;
the lab starts dnsmasq from /etc/config/dhcp.

Observable: procd's instance and its pid (started before the lab's agent was), the uci
state of oe and dhcp, the running dnsmasq's command line, and the LAN client's first query
for a keyed name answered and its TCP leaving the router as ESP, none in the clear, on the
WAN cable. Issue 12 ("A first-boot test", "DNS mode").

The WAN comes up 30 s after the daemon opened its socket (the fixture's wan_delay, issue
13 "Boot with the WAN down"): before that `oe status` says OE is off and why; after it
the daemon procd started at boot picks the WAN up by itself.
"""

from __future__ import annotations

import calendar
import json
import re
import time
from pathlib import Path
from typing import Any

import pytest

import oelab
from lab import FIRST_BOOT_ANCHOR, Lab
from oe_router.config import uci

pytestmark = pytest.mark.qemu

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "test-results" / "qemu-first-boot.json"
SHIPPED = REPO / "files" / "etc" / "config" / "oe"
ANCHOR = "/" + FIRST_BOOT_ANCHOR
KEYED = ("oe-null", "null.example.test")


def _model(text: str) -> list[tuple[str, str | None, dict[str, str], dict[str, list[str]]]]:
    """A UCI file as its sections in order: type, name, options, lists (comments gone)."""
    return [
        (s.type, s.name, dict(s.options), {k: list(v) for k, v in s.lists.items()})
        for s in uci.parse(text, "oe").sections
    ]


def _pid_start(lab: Lab, pid: str) -> int:
    """A process's start time in clock ticks since boot (/proc/PID/stat field 22)."""
    stat = lab.router(f"cat /proc/{pid}/stat").check().stdout
    return int(stat.rsplit(")", 1)[1].split()[19])


def test_procd_started_the_daemon_at_boot_with_the_shipped_config(
    first_boot_lab: Lab, figures: dict[str, Any]
) -> None:
    lab = first_boot_lab
    t = lab.timings
    figures["boot_s"] = {
        "agents": round(t.boot_to_agents, 1),
        "network_ready": round(t.network_ready, 1),
        "all_ready": round(t.all_ready, 1),
        **{k: round(v, 1) for k, v in t.steps.items()},
    }
    links = lab.router("ls /etc/rc.d").check().stdout.split()
    assert "S90oe" in links and "K10oe" in links, links

    query = json.dumps({"name": "oe", "verbose": True})  # verbose: with the triggers
    services = json.loads(lab.router(f"ubus call service list '{query}'").check().stdout)
    instance = services["oe"]["instances"]["oe-routerd"]
    assert instance["running"], instance
    pid = lab.router("pgrep -x oe-routerd").check().stdout.split()
    assert pid == [str(instance["pid"])], (pid, instance)
    triggers = json.dumps(services["oe"].get("triggers", []))
    assert "interface.*" in triggers, triggers
    # started by the boot (S90), before the lab's agent (S99) and so before any address,
    # and still that process: not one procd respawned after the boot's instance died
    agent = lab.router("pgrep -o -f /lab/guest/agent.py").check().stdout.split()[0]
    started, agent_started = _pid_start(lab, pid[0]), _pid_start(lab, agent)
    assert started < agent_started, (
        f"oe-routerd (pid {pid[0]}) started {(started - agent_started) / 100:.1f} s after the "
        "lab's agent: procd respawned it, the instance S90oe started at boot is gone"
    )

    # the shipped config, but for the trust anchor the lab's uci-defaults pointed
    expected = _model(SHIPPED.read_text())
    for _, name, options, _ in expected:
        if name == "dns":
            options["trust_anchor"] = ANCHOR
    got = _model(lab.router("uci export oe").check().stdout)
    assert got == expected
    ta = lab.run_dir / "bundle" / lab.world_info["router"]["trust_anchor_ds"]
    assert lab.router(f"cat {ANCHOR}").check().stdout == ta.read_text()


def _logread_epoch(line: str) -> float:
    """The epoch seconds of a line the lab's logread follower kept (its ctime prefix)."""
    stamp = " ".join(line.split()[:5])
    return calendar.timegm(time.strptime(stamp, "%a %b %d %H:%M:%S %Y"))


def test_oe_waits_for_the_late_wan_and_starts_by_itself(
    first_boot_lab: Lab, figures: dict[str, Any]
) -> None:
    """The WAN stays down for ``wan_delay`` (30) s after the daemon opened its socket (a
    slow link). Just before netifd brings it up, `oe status` says OE is off and why (no
    WAN address) and lists no address; afterwards the same process, started by procd at
    boot and never restarted, lists the WAN's address with a datapath on (the keyed
    host's ESP is test_first_query_for_a_keyed_name_leaves_as_esp's)."""
    lab = first_boot_lab
    assert lab.wan_delay >= 30
    logs = lab.run_dir / "logs"
    text = (logs / "oe-status-wan-down.txt").read_text()
    down = json.loads((logs / "oe-status-wan-down.json").read_text())
    daemon = down["daemon"]
    reason = daemon["datapath"]
    figures["wan_down_status"] = {"datapath": reason, "uptime_s": daemon["uptime_s"]}
    assert re.fullmatch(r"none \(.*wan.*\)", reason, re.IGNORECASE), reason
    assert f"datapath  {reason}" in text, text
    assert not down.get("ike", {}).get("addresses"), down.get("ike")
    # and the network part says which network and why: netifd has wan down, no device yet
    why = daemon["network"]["wan"]["problem"]
    assert "network 'wan' is down with no device yet (netifd)" in why, daemon["network"]
    assert f"(OE off: {why})" in text, text
    assert daemon["uptime_s"] >= lab.wan_delay * 0.9, daemon  # it ran without a WAN

    def on() -> dict[str, Any] | None:
        res = lab.router("oe status --json", timeout=20)
        doc: dict[str, Any] = json.loads(res.stdout) if res.ok else {}
        got = doc.get("ike", {}).get("addresses", [])
        return doc if lab.plan.router_wan4 in got else None

    now = oelab.wait_until("oe status to list the WAN address", on, timeout=120)
    assert now["daemon"]["pid"] == daemon["pid"], (now["daemon"], daemon)
    assert not now["daemon"]["datapath"].startswith("none"), now["daemon"]["datapath"]
    wan_up_at = float((logs / "wan-up-at").read_text())
    changed = [ln for ln in oelab.daemon_log(lab).splitlines() if "network changed (WAN" in ln]
    assert changed, oelab.daemon_log(lab)[-3000:]
    figures["wan_up_to_network_changed_s"] = round(_logread_epoch(changed[0]) - wan_up_at, 1)
    figures["network_changed_line"] = changed[0]


def test_dnsmasq_keeps_its_upstreams_and_the_daemon_captures_them(first_boot_lab: Lab) -> None:
    lab = first_boot_lab
    assert lab.router("uci -q get 'dhcp.@dnsmasq[0].server'").stdout.strip() == ""
    assert lab.router("uci -q get 'dhcp.@dnsmasq[0].noresolv'").stdout.strip() == ""
    assert lab.router("ls /etc/oe/dnsmasq.undo").rc != 0
    # the running dnsmasq took it from /etc/config/dhcp: the WAN's resolvers, not the front
    args = lab.router("tr '\\0' '\\n' </proc/$(cat /run/dnsmasq.pid)/cmdline").check().stdout
    argv = args.split()
    assert "--resolv-file=/tmp/resolv.conf.d/resolv.conf.auto" in argv, argv
    assert not [a for a in argv if a.startswith("--server") or a == "--no-resolv"], argv
    # the daemon's front runs, so its capture does
    capture = oelab.wait_until(
        "the DNS capture",
        lambda: (oelab.status(lab).get("dns", {}).get("capture") or "").startswith("on:") or None,
        timeout=60,
    )
    assert capture
    assert lab.router(f"nft list table inet {oelab.CAPTURE_TABLE}").ok


def test_first_query_for_a_keyed_name_leaves_as_esp(
    first_boot_lab: Lab, figures: dict[str, Any]
) -> None:
    """The LAN client's first query, through dnsmasq to the front: answered once the
    tunnel is up, and the client's TCP to the address leaves the router as ESP only."""
    lab = first_boot_lab
    plan = lab.plan
    netns, name = KEYED
    assert netns not in lab.failed_hosts, lab.failed_hosts
    a = plan.host(netns).ipv4

    def learned() -> dict[str, Any] | None:
        res = lab.router("oe status --json", timeout=20)
        if not res.ok:
            return None
        doc: dict[str, Any] = json.loads(res.stdout)
        dns = doc.get("dns", {})
        if plan.router_wan4 not in doc.get("ike", {}).get("addresses", []):
            return None
        if not any(plan.resolver in u for u in dns.get("upstreams", [])):
            return None
        return doc if dns.get("ipseckey_trigger") == "on" else None

    # procd's interface trigger reloads the daemon on netifd's interface.update for wan
    t0 = time.monotonic()
    doc = oelab.wait_until("the daemon to learn the WAN and its resolver", learned, timeout=120)
    figures["wan_learned_wait_s"] = round(time.monotonic() - t0, 1)
    assert "network changed" in oelab.daemon_log(lab), oelab.daemon_log(lab)[-3000:]
    dns = doc["dns"]
    assert dns["trust_anchor"] == f"file {ANCHOR}", dns
    assert doc["ike"]["identity"]["local_id"] == "%null", doc["ike"]["identity"]
    assert dns["queries"] == 0, "the front saw queries before the client's first one"

    with (
        lab.capture("eth0", netns="client", label="lan-first") as lan,
        lab.capture_wan(label="wan-first") as wan,
    ):
        res = lab.client(
            "curl -s -m 20 -o /dev/null -w '%{http_code} %{remote_ip} %{time_namelookup}' "
            f"http://{name}/",
            timeout=40,
        ).check()
    code, remote_ip, t_dns = res.stdout.split()
    assert (code, remote_ip) == ("200", a), res.stdout

    queries = lan.packets(f"dst {plan.router_lan4} and udp dst port 53")
    answers = [t for t, ln in lan.packets(f"src {plan.router_lan4} and udp src port 53") if a in ln]
    assert queries and answers, "no A query and answer on the LAN"
    flow = oelab.first_flow(lab, lan, wan, a, plan.router_wan4)
    assert not flow.problems(), flow.problems()
    assert answers[0] < flow.syns[0][0] <= flow.esp_out[0][0]

    # dnsmasq forwarded the query to the WAN's resolver, and the capture took it to the front
    dnsmasq_log = (lab.run_dir / "logs" / "router-dnsmasq.log").read_text(errors="replace")
    forwarded = re.findall(rf"forwarded {re.escape(name)} to (\S+)", dnsmasq_log)
    assert forwarded and set(forwarded) == {plan.resolver}, forwarded
    after = oelab.status(lab)
    assert after["dns"]["queries"] >= 1, after["dns"]
    rows = [t for t in after["tunnels"] if t.get("source") == "ike" and t["peer"] == a]
    assert rows and rows[0]["local_auth"] == "null", after["tunnels"]
    figures[name] = {
        "answer_ms": round((answers[0] - queries[0][0]) * 1000, 1),
        "curl_namelookup_s": float(t_dns),
        "esp_out": len(flow.esp_out),
        "esp_in": len(flow.esp_in),
    }
