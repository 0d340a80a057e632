"""Scenario 2: the router as a plain OpenWrt-style gateway, oe-routerd NOT running.

Why: every later OE scenario is a difference from this baseline: the LAN client resolves every
lab name through the router (dnsmasq -> the world's resolver) and reaches every host in the
clear through the router's masquerade.
"""

from __future__ import annotations

import pytest

from lab import Host, Lab

pytestmark = pytest.mark.qemu


def named_hosts(lab: Lab) -> list[Host]:
    return [h for h in lab.hosts if h.name]


def test_daemon_is_not_running(lab: Lab) -> None:
    res = lab.router("pgrep -fa '[o]e-routerd'")
    assert res.rc == 1, f"oe-routerd is running on the router:\n{res.stdout}"


def test_client_resolves_every_lab_name_through_the_router(lab: Lab) -> None:
    hosts = named_hosts(lab)
    assert len(hosts) >= 8
    script = "; ".join(
        f"echo {h.name}=$(dig +short +time=3 +tries=2 {h.name} A | tail -1)" for h in hosts
    )
    out = lab.client(script, timeout=120).check().stdout
    got = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    wrong = {h.name: got.get(h.name or "") for h in hosts if got.get(h.name or "") != h.ipv4}
    assert not wrong, f"names resolved wrongly through the router: {wrong}"
    # The answers really came through the router's dnsmasq, forwarded to the world resolver.
    server = lab.client(f"dig +time=3 {hosts[0].name} A | grep SERVER").stdout
    assert lab.plan.router_lan4 in server
    qlog = (lab.run_dir / "logs" / "router-dnsmasq.log").read_text()
    assert f"forwarded {hosts[0].name} to {lab.plan.resolver}" in qlog


def test_client_fetches_every_page_in_the_clear(lab: Lab) -> None:
    hosts = [h for h in named_hosts(lab) if h.netns not in lab.failed_hosts]
    broken = [h.netns for h in named_hosts(lab) if h.netns in lab.failed_hosts]
    script = "; ".join(
        f"echo \"{h.netns}=$(curl -s -m 10 http://{h.name}/ | tr -d '\\n')\"" for h in hosts
    )
    with lab.capture_wan(label="baseline") as cap:
        out = lab.client(script, timeout=180).check().stdout
    pages = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    missing = [h.netns for h in hosts if f"lab host {h.netns}" not in pages.get(h.netns, "")]
    assert not missing, f"pages not fetched from: {missing}"
    assert cap.count("tcp port 80") >= 4 * len(hosts), "HTTP should cross the WAN in the clear"
    assert cap.count(f"tcp port 80 and host {lab.plan.client4}") == 0, "LAN address leaked: no NAT"
    assert cap.esp() == 0, "ESP on the WAN although oe-routerd is not running"
    assert not broken, f"world hosts that failed to start (their pages untested): {broken}"


def test_client_reaches_a_host_over_ipv6_through_the_router(lab: Lab) -> None:
    """IPv6 is routed, not masqueraded (fw4's default): the host sees the client's ULA."""
    plain = lab.plan.host("plain")
    with lab.capture_wan(label="baseline-v6") as cap:
        page = lab.client(f"curl -s -m 10 -g http://[{plain.ipv6}]/", timeout=30).check().stdout
    assert "lab host plain" in page
    assert cap.count(f"ip6 and tcp port 80 and host {lab.plan.client6}") >= 4
    assert cap.esp() == 0
