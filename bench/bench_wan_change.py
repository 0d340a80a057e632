"""Recovery after a WAN address change: seconds until the LAN's new connections work again.

BOOTS THE QEMU LAB (router + world VMs; about 5 min in all under TCG).

The change a home router sees on a new DHCP lease or a PPPoE reconnect, made as its owner
makes it (``uci set network.wan.ipaddr``, ``ubus call network reload``: netifd moves the
address), with LAN flows running (qemu/wanlab.py, shared with tests/qemu/test_wan_change.py):
the LAN client keeps a TCP connection open to a keyed host (null.example.test, IPSECKEY
with NULL auth, libreswan) and to the plain host (no key), and opens a new connection to
each every 0.25 s, the name resolved through the router each time. The figure is the time
from the moment the old address left the WAN device (the router polls its kernel every
50 ms; its clock is set against the world VM's, which times the flows) to the end of the
first new connection, opened after that moment, that got its echo back.

- ours: oe-routerd with the shipped configuration running, the keyed host in the
  ``private`` group: a connection to it can only be ESP from the new address (never clear:
  in the default private-or-clear group a new flow masqueraded to the new address meets
  no trap until the daemon has rebuilt for it, about a second, and would leave in the
  clear, which is not the recovery this figure is about), so its figure is the time to a
  new tunnel from the new address (the front holds the answer until it is up);
- baseline: the same change, same run, with oe-routerd stopped (its tables removed: fw4's
  masquerade alone), the keyed host then reached in the clear.

Rounds interleave ours and the baseline (3 each, median); the plain host's figures are
kept in the JSON too. A round whose flows never recovered within RECOVER_WITHIN counts
as that bound and is flagged (``lower_bound``): it was not measured as a number.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from typing import Any

from bench.qemu_lab import REPO, booted
from bench.run import Result

NEW_WAN4 = "203.0.113.77"
KEYED, CLEAR = "oe-null", "plain"
ROUNDS = 3
RECOVER_WITHIN = 90.0


def _round(lab: Any, wanlab: Any, targets: dict[str, tuple[str, int]]) -> dict[str, Any]:
    """One WAN change under the flows; the WAN back on the plan's address after it."""
    try:
        ch = wanlab.wan_change(
            lab, targets, NEW_WAN4, recover_within=RECOVER_WITHIN, hold=1, label="bench-wan"
        )
    finally:
        wanlab.restore_wan4(lab)
    return {
        "recovery_s": ch.recovery_s,
        "netifd_s": ch.figures["netifd_s"],
        "clock_uncertainty_s": ch.offset_uncertainty,
        "existing_connections": {k: ch.long_outcome(k) for k in targets},
    }


def _figure(rounds: list[dict[str, Any]], key: str) -> tuple[float, bool]:
    """Median recovery of ``key`` over rounds; True when a round did not recover (the
    bound stands in for it)."""
    got = [r["recovery_s"][key] for r in rounds]
    return statistics.median(RECOVER_WITHIN if v is None else v for v in got), None in got


def measure(lab: Any, rounds: int = ROUNDS) -> dict[str, Any]:
    sys.path.insert(0, str(REPO / "qemu"))
    import oelab
    import wanlab

    keyed, clear = lab.plan.host(KEYED), lab.plan.host(CLEAR)
    targets = {"keyed": (keyed.name, wanlab.ECHO_PORT), "clear": (clear.name, wanlab.ECHO_PORT)}
    ours: list[dict[str, Any]] = []
    base: list[dict[str, Any]] = []
    private = f"\nconfig policy\n\toption group 'private'\n\tlist dest '{keyed.ipv4}/32'\n"
    with wanlab.echo_servers(lab, [KEYED, CLEAR]):
        for _ in range(rounds):
            oelab.start_daemon(lab, extra_config=private)
            try:
                ours.append(_round(lab, wanlab, targets))
            finally:
                oelab.stop_daemon(lab)
            # pluto on the keyed host drops its states with the router's addresses (SAs
            # whose Delete could not leave: their address was gone), whose inbound
            # policies would drop the baseline's cleartext
            ctl = f"{lab.state_dir(KEYED)}/run/pluto.ctl"
            for addr in (lab.plan.router_wan4, NEW_WAN4):
                lab.host(KEYED, f"ipsec whack --ctlsocket {ctl} --crash {addr}", timeout=30)
            base.append(_round(lab, wanlab, targets))
    return {"ours": ours, "baseline": base}


def run() -> list[Result]:
    t0 = time.monotonic()
    with booted((KEYED, CLEAR)) as lab:
        figures = measure(lab)
    ours, ours_bound = _figure(figures["ours"], "keyed")
    base, base_bound = _figure(figures["baseline"], "keyed")
    ours_clear, ours_clear_bound = _figure(figures["ours"], "clear")
    base_clear, base_clear_bound = _figure(figures["baseline"], "clear")
    return [
        Result(
            "wan_change_recovery",
            "s from the old WAN address gone to a new LAN connection's echo (median of 3)",
            ours,
            base,
            "the same change with oe-routerd stopped (fw4 masquerade only), same run",
            "<= 5 s",
            {
                "ours_keyed_over_oe_s": ours,
                "ours_clear_host_s": ours_clear,
                "baseline_keyed_in_clear_s": base,
                "baseline_clear_host_s": base_clear,
                "lower_bound": {
                    "ours": ours_bound,
                    "ours_clear": ours_clear_bound,
                    "baseline": base_bound,
                    "baseline_clear": base_clear_bound,
                },
                "rounds": figures,
                "lab_seconds": round(time.monotonic() - t0, 1),
                "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
            },
        )
    ]
