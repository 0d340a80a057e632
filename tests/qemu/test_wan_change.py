"""A new WAN address under a running daemon, announced as netifd announces it.

Why: on a home router the WAN address changes (a new DHCP lease, a PPPoE reconnect) or
arrives after the daemon started (START=90 on a slow link). The init script asks procd to
reload the daemon on `interface.update` for its WAN (procd_add_reload_interface_trigger);
the daemon then looks at the addresses again and rebuilds its services for the new ones.
netifd does not build here, so the test sends procd the event netifd's ubus notification
on `network.interface` hands procd's trigger code: `ubus call service event` with the same
type and data (procd's service/watch.c passes the notification to trigger_event as is).

Observable: `oe status` lists the new address, the daemon's log has the one warning line,
and a LAN flow to a keyed host leaves as ESP from the new address, none in the clear.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

import oelab
from lab import Lab

pytestmark = pytest.mark.qemu

NEW_WAN4 = "203.0.113.77"
#: what netifd's notification gives procd's trigger_event for the wan interface
EVENT = json.dumps({"type": "interface.update", "data": {"interface": "wan"}})


def _move_wan(lab: Lab, old: str, new: str) -> None:
    """Swap the router's IPv4 WAN address (same /24) and announce it, as netifd does."""
    lab.router(
        "sysctl -qw net.ipv4.conf.wan.promote_secondaries=1; "
        f"ip addr add {new}/24 dev wan && ip addr del {old}/24 dev wan && "
        f"ip route replace default via {lab.plan.inet_gw4} dev wan && "
        f"ubus call service event '{EVENT}'"
    ).check()


def _addresses(lab: Lab) -> list[str]:
    return list(oelab.status(lab).get("ike", {}).get("addresses", []))


@pytest.fixture
def moved_wan(lab: Lab) -> Iterator[Lab]:
    oelab.start_daemon(lab)
    old = lab.plan.router_wan4
    try:
        assert old in _addresses(lab)
        _move_wan(lab, old, NEW_WAN4)
        yield lab
    finally:
        # the rest of the session needs the lab's own address back, and the daemon gone
        lab.router(f"ip addr show dev wan | grep -q ' {old}/' || ip addr add {old}/24 dev wan")
        lab.router(f"ip addr del {NEW_WAN4}/24 dev wan")
        lab.router(f"ip route replace default via {lab.plan.inet_gw4} dev wan").check()
        oelab.stop_daemon(lab)


def test_the_daemon_learns_a_new_wan_address_from_the_interface_trigger(moved_wan: Lab) -> None:
    lab = moved_wan

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
