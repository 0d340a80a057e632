"""A new WAN address under a running daemon, set the way a router's owner sets it: netifd.

Why: on a home router the WAN address changes (a new DHCP lease, a PPPoE reconnect) or
arrives after the daemon started (START=90 on a slow link). The init script asks procd to
reload the daemon on `interface.update` for its WAN (procd_add_reload_interface_trigger);
the daemon then looks at the addresses again and rebuilds its services for the new ones.
Here the address moves as on OpenWrt: `uci set network.wan.ipaddr`, `uci commit network`,
`ubus call network reload`. netifd moves the address and notifies on `network.interface`;
procd, which watches that object for the network service (/etc/init.d/network), hands the
notification to its triggers, and oe's interface trigger reloads the daemon. Nothing of it
is played by the test.

Observable: netifd's status and the kernel carry the new address, `oe status` lists it,
the daemon's log has the one warning line, and a LAN flow to a keyed host leaves as ESP
from the new address, none in the clear.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

import oelab
from lab import ROUTER_WAN_DEV, Lab

pytestmark = pytest.mark.qemu

NEW_WAN4 = "203.0.113.77"


def _set_wan4(lab: Lab, address: str) -> None:
    """The WAN's IPv4 address (same /24) in /etc/config/network, and netifd told to reload."""
    lab.router(
        f"uci set network.wan.ipaddr={address} && uci commit network && ubus call network reload"
    ).check()


def _netifd_wan4(lab: Lab) -> list[str] | None:
    """The WAN's IPv4 addresses as netifd's status gives them, when the kernel agrees."""
    status = json.loads(lab.router("ubus call network.interface.wan status").check().stdout)
    got = sorted(a["address"] for a in status.get("ipv4-address", []))
    kernel = lab.router(f"ip -4 -o addr show dev {ROUTER_WAN_DEV}").check().stdout
    if not status.get("up") or any(f" {a}/24 " not in kernel for a in got):
        return None
    return got if kernel.count(" inet ") == len(got) else None


def _wait_wan4(lab: Lab, address: str) -> None:
    oelab.wait_until(
        f"netifd to put {address} on wan",
        lambda: _netifd_wan4(lab) == [address] or None,
        timeout=60,
    )


def _addresses(lab: Lab) -> list[str]:
    return list(oelab.status(lab).get("ike", {}).get("addresses", []))


@pytest.fixture
def moved_wan(lab: Lab) -> Iterator[Lab]:
    oelab.start_daemon(lab)
    old = lab.plan.router_wan4
    try:
        assert old in _addresses(lab)
        _set_wan4(lab, NEW_WAN4)
        _wait_wan4(lab, NEW_WAN4)
        yield lab
    finally:
        # the rest of the session needs the lab's own address back, and the daemon gone
        try:
            _set_wan4(lab, old)
            _wait_wan4(lab, old)
            # and the daemon back on it (its SNAT table with it) before it stops
            oelab.wait_until(
                "oe status to list the lab's WAN address again",
                lambda: old in _addresses(lab) and NEW_WAN4 not in _addresses(lab),
                timeout=90,
            )
        finally:
            oelab.stop_daemon(lab)


def test_the_daemon_learns_a_new_wan_address_from_the_interface_trigger(moved_wan: Lab) -> None:
    lab = moved_wan
    route = lab.router("ip -4 route show default").check().stdout
    # netifd kept the gateway
    assert f"via {lab.plan.inet_gw4} dev {ROUTER_WAN_DEV}" in route, route

    def moved() -> list[str] | None:
        got = _addresses(lab)
        return got if NEW_WAN4 in got else None

    got = oelab.wait_until("oe status to list the new WAN address", moved, timeout=90)
    assert lab.plan.router_wan4 not in got, got
    assert lab.plan.router_wan6 in got, got  # IPv6 did not move
    log = oelab.daemon_log(lab)
    line = f"network changed (WAN {lab.plan.router_wan4}, {lab.plan.router_wan6} -> "
    assert line in log and "restarting the services" in log, log[-3000:]

    null = lab.plan.host("oe-null").ipv4
    with lab.capture_wan(label="wan-moved") as wan:
        res = lab.client(
            "curl -s -m 20 -o /dev/null -w '%{http_code}' http://null.example.test/", timeout=40
        ).check()
    assert res.stdout == "200", res.stdout
    esp_out = wan.count(f"esp and src {NEW_WAN4} and dst {null}")
    clear = wan.count(f"host {null} and tcp")
    assert esp_out >= 3 and clear == 0, (esp_out, clear)
