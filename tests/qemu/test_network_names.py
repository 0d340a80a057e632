"""OpenWrt network names on the lab router, whose devices are named as on OpenWrt's x86
layout (LAN bridge br-lan over eth0, networks wan and wan6 on eth1): the shipped config's
`wan`, `wan6` and `lan` resolve to those devices through netifd, and, without netifd's
answer, through /etc/config/network read with the real uci; a config that names a network
the router does not have turns OE off with one clear line naming it, and a reload with
the right names turns it on again."""

from __future__ import annotations

import json

import oelab
from lab import ROUTER_LAN_DEV, ROUTER_WAN_DEV, Lab

#: without netifd (its dump left out): what /etc/config/network says, through the real uci
FILE_ONLY = (
    "import json; from oe_router.netnames import resolve, uci_network, link_names; "
    "print(json.dumps([[r.name, r.device, r.via, r.problem] for r in resolve("
    "('wan', 'wan6', 'lan', 'wan7'), 'oe.global.wan_interface', None, uci_network(), "
    "link_names())]))"
)


def test_network_names_resolve_to_the_routers_devices(running_daemon: Lab) -> None:
    lab = running_daemon
    net = oelab.status(lab)["daemon"]["network"]
    assert net["wan"]["networks"] == [
        f"wan ({ROUTER_WAN_DEV}, netifd)",
        f"wan6 ({ROUTER_WAN_DEV}, netifd)",
    ], net
    assert net["wan"]["devices"] == [ROUTER_WAN_DEV]
    assert net["wan"]["addresses"] == [lab.plan.router_wan4, lab.plan.router_wan6], net
    assert net["lan"]["networks"] == [f"lan ({ROUTER_LAN_DEV}, netifd)"]
    assert "192.168.1.0/24" in net["lan"]["prefixes"], net
    text = oelab.oe(lab, "status").check().stdout
    assert f"WAN       wan ({ROUTER_WAN_DEV}, netifd), wan6 ({ROUTER_WAN_DEV}, netifd): " in text

    # the file path: the same router's /etc/config/network through `uci export`
    got = json.loads(lab.router(f'python3 -c "{FILE_ONLY}"').check().stdout)
    via = "/etc/config/network"
    assert got[:3] == [
        ["wan", ROUTER_WAN_DEV, via, ""],
        ["wan6", ROUTER_WAN_DEV, via, ""],
        ["lan", ROUTER_LAN_DEV, via, ""],
    ], got
    assert got[3][1] == "" and "no network or device named 'wan7'" in got[3][3], got


def test_an_unknown_network_turns_oe_off_with_a_clear_line(running_daemon: Lab) -> None:
    lab = running_daemon
    oelab.reload_daemon(lab, options={"global.wan_interface": ["wan7"]})
    why = (
        "oe.global.wan_interface: no network or device named 'wan7' "
        "(networks: lan, loopback, mgmt, wan, wan6)"
    )
    status = oelab.wait_until(
        "OE off for want of network wan7",
        lambda: (s := oelab.status(lab))["daemon"]["network"]["wan"]["problem"] == why and s,
        timeout=60,
    )
    assert status["daemon"]["network"]["wan"]["addresses"] == []
    assert not status.get("ike", {}).get("addresses"), status.get("ike")
    assert f"(OE off: {why})" in oelab.oe(lab, "status").check().stdout
    log = lab.router("logread -e oe-routerd").check().stdout
    warned = [ln for ln in log.splitlines() if "daemon.warn oe-routerd[" in ln and why in ln]
    assert warned, log[-2000:]
    # the shipped names again: OE back on the WAN's addresses
    oelab.reload_daemon(lab)
    oelab.wait_until(
        "oe status to list the WAN's addresses again",
        lambda: oelab.status(lab).get("ike", {}).get("addresses")
        == [lab.plan.router_wan4, lab.plan.router_wan6]
        or None,
        timeout=90,
    )
