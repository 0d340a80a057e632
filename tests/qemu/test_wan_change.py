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

With flows running (issue 13, qemu/wanlab.py, shared with bench/bench_wan_change.py): the
LAN client keeps one TCP connection open to a keyed host that is also in the "private"
group (over OE) and one to the plain host (in the clear), and opens a new connection to
each every 0.25 s (the name resolved through the router each time) while netifd moves the
WAN. New connections to both succeed from the new address within 30 s; on the WAN cable
nothing leaves with the old source once the old address is gone (no stale SNAT, no ESP
from SAs bound to it), and the private host never sees a cleartext packet. The connections
opened before the change cannot survive it: each was NATed to the old address, and the
peer's socket is bound to that address and port, so what the peer sees from the new
address is no packet of that connection. The test asserts that neither carries an echo
once the old address is gone, and records how each ended.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import oelab
import wanlab
from lab import Lab

pytestmark = pytest.mark.qemu

NEW_WAN4 = "203.0.113.77"
RESULTS = Path(__file__).resolve().parents[2] / "test-results" / "qemu-wan-change.json"
PRIVATE = "oe-null"  # null.example.test: IPSECKEY (NULL auth), libreswan clear-or-private
CLEAR = "plain"  # plain.example.test: no key, no IKE (ICMP unreachable: a pass shunt)


def _addresses(lab: Lab) -> list[str]:
    return list(oelab.status(lab).get("ike", {}).get("addresses", []))


@pytest.fixture
def moved_wan(lab: Lab) -> Iterator[Lab]:
    oelab.start_daemon(lab)
    old = lab.plan.router_wan4
    try:
        assert old in _addresses(lab)
        wanlab.set_wan4(lab, NEW_WAN4)
        wanlab.wait_wan4(lab, NEW_WAN4)
        yield lab
    finally:
        # the rest of the session needs the lab's own address back, and the daemon gone
        try:
            wanlab.set_wan4(lab, old)
            wanlab.wait_wan4(lab, old)
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
    assert f"via {lab.plan.inet_gw4} dev {wanlab.wan_device(lab)}" in route, route

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


def _back_on_the_plans_wan(lab: Lab) -> None:
    """The plan's WAN address back, and the daemon on it (its SNAT table with it)."""
    old = lab.plan.router_wan4
    wanlab.restore_wan4(lab)
    oelab.wait_until(
        "oe status to list the lab's WAN address again",
        lambda: old in _addresses(lab) and NEW_WAN4 not in _addresses(lab),
        timeout=90,
    )


@pytest.fixture
def flows_lab(lab: Lab) -> Iterator[Lab]:
    """The daemon with the keyed host in the private group, echo servers on both hosts;
    afterwards the plan's WAN address back and the daemon stopped."""
    private = lab.plan.host(PRIVATE).ipv4
    policy = f"\nconfig policy\n\toption group 'private'\n\tlist dest '{private}/32'\n"
    oelab.start_daemon(lab, extra_config=policy)
    try:
        with wanlab.echo_servers(lab, [PRIVATE, CLEAR]):
            yield lab
    finally:
        try:
            _back_on_the_plans_wan(lab)
        finally:
            oelab.stop_daemon(lab)


def test_lan_flows_across_a_wan_address_change(flows_lab: Lab, figures: dict[str, Any]) -> None:
    lab = flows_lab
    old, new = lab.plan.router_wan4, NEW_WAN4
    private, clear = lab.plan.host(PRIVATE), lab.plan.host(CLEAR)
    assert private.name and clear.name
    targets = {"oe": (private.name, wanlab.ECHO_PORT), "clear": (clear.name, wanlab.ECHO_PORT)}
    ch = wanlab.wan_change(lab, targets, new, recover_within=30, label="wan-flows")
    cap = ch.capture
    outcome = {k: ch.long_outcome(k) for k in targets}
    figures["flows"] = {
        "recovery_s": ch.recovery_s,
        "existing_connections": outcome,
        "clock_uncertainty_s": ch.offset_uncertainty,
        **ch.figures,
    }

    # Each failed property is collected, so one run shows all of them (main's stale SNAT
    # fails several at once).
    problems: list[str] = []
    # new connections to both, from the new address (as the peer saw it), within 30 s
    for key, took in ch.recovery_s.items():
        if took is None or took > 30:
            problems.append(f"{key}: no new connection from {new} within 30 s ({took})")
    if cap.count(f"esp and src {new} and dst {private.ipv4}") == 0:
        problems.append(f"no ESP from {new} to the private host")

    # nothing leaves with the old address once it is gone (after the clocks' uncertainty)
    after = ch.gone + ch.offset_uncertainty + 0.1
    stale = [(t, ln) for t, ln in cap.packets(f"src {old}") if t > after]
    figures["flows"]["stale_packets"] = len(stale)
    if stale:
        problems.append(
            f"{len(stale)} packets from {old} after it was gone, the last "
            f"{stale[-1][0] - ch.gone:.1f} s after:\n" + "\n".join(ln for _, ln in stale[:8])
        )

    # the private host never sees a cleartext packet, before, during or after the change
    leaks = cap.packets(f"ip host {private.ipv4} and not (esp or udp port 500 or udp port 4500)")
    if leaks:
        problems.append("cleartext with the private host:\n" + "\n".join(ln for _, ln in leaks[:8]))

    # the connections opened before the change carry no data once the old address is
    # gone: NATed to it, they cannot move (the peer's socket is bound to old:port)
    for key, got in outcome.items():
        late = [e for e in ch.long[key] if e["event"] == "echo" and e["t"] > after + 1.0]
        if late:
            problems.append(f"{key}: the connection opened before the change still echoes: {got}")
    assert not problems, "\n".join(problems)
