"""Connecting to a silent keyless host: ms from the DNS answer to the completed TCP connect.

BOOTS THE QEMU LAB (router + world VMs; about 4 min in all under TCG).

Most Internet hosts publish no IPSECKEY and drop IKE without a word. With the default
policy (private-or-clear for everything) such a host's first SYN meets the trap and waits
for the IKE probe to give up. The lab's plain host (plain.example.test, 203.0.113.20: a
signed NSEC denies its IPSECKEY) is made silent for the run (nft drops UDP 500/4500 in
its netns), and the LAN client fetches its page by name with curl; the figure is curl's
``time_connect - time_namelookup``: from the answer to the connected socket.

- ours: oe-routerd with the shipped configuration (``oe.dns.keyless pass``): the front
  proves the name keyless and installs a pass shunt before it releases the answer;
- baseline: libreswan's pluto ON THE ROUTER with the equivalent private-or-clear conn for
  the host (lab tooling, as bench_throughput.py), same VMs, same run.

Rounds interleave ours and libreswan (3 each, median); before each, dnsmasq's cache is
cleared (SIGHUP), so every round's name is resolved afresh through the router. The JSON
also carries ours by address (no DNS: the trap, as before this change), and ours with
``keyless probe`` by name, so the price of the fast path's absence shows in the same run.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from bench.run import Result, Unavailable

REPO = Path(__file__).resolve().parents[1]
HOST = "plain"
WAN = "203.0.113.2"
ROUNDS = 3
CURL = "curl -4 -s -o /dev/null --max-time 20 -w '%{http_code} %{time_namelookup} %{time_connect}' "


def _silence(lab: Any, on: bool) -> None:
    if on:
        lab.host(
            HOST,
            "nft add table inet oe_silent && nft add chain inet oe_silent in "
            "'{ type filter hook input priority 0; }' && "
            "nft add rule inet oe_silent in udp dport '{ 500, 4500 }' drop",
        ).check()
    else:
        lab.host(HOST, "nft delete table inet oe_silent")


def _fetch(lab: Any, target: str) -> float:
    """Seconds from the answer (0 for an address) to the connected socket; the page must come."""
    lab.router("kill -HUP $(cat /run/dnsmasq.pid)")  # every round resolves afresh
    res = lab.client(CURL + f"http://{target}/", timeout=60)
    fields = res.stdout.split()
    if res.rc != 0 or len(fields) != 3 or fields[0] != "200":
        raise Unavailable(f"curl {target}: rc {res.rc}, {res.stdout!r} {res.stderr[-300:]!r}")
    return float(fields[2]) - float(fields[1])


def _libreswan_on_router(lab: Any, peers: Any, addr: str) -> None:
    policies = {"private-or-clear": [f"{addr}/32"]}
    d = lab.run_dir / "lsw-router"
    (d / "ipsec.d" / "policies").mkdir(parents=True, exist_ok=True)
    (d / "ipsec.conf").write_text(peers.render_libreswan_conf(WAN, policies))
    (d / "ipsec.secrets").write_text("")
    for g, text in peers.render_policy_files(policies).items():
        (d / "ipsec.d" / "policies" / g).write_text(text)
    lab.router(
        "set -e; . /lab/bundle/lib/common.sh; LAB_STATE=/var/lab; "
        "lab_prepare lsw-router /lab/lsw-router; lab_pluto private-or-clear",
        timeout=90,
    ).check()


def _stop_libreswan(lab: Any) -> None:
    lab.router(
        "kill $(cat /var/lab/lsw-router/pluto.pid) 2>/dev/null; sleep 1; "
        "ip xfrm state flush; ip xfrm policy flush"
    )


def measure(lab: Any, rounds: int = ROUNDS) -> dict[str, Any]:
    sys.path.insert(0, str(REPO / "qemu"))
    import oelab
    from labkit import peers

    host = lab.plan.host(HOST)
    name, addr = host.name, host.ipv4
    out: dict[str, list[float]] = {"ours": [], "libreswan": [], "ours_by_address": []}
    out["ours_keyless_probe"] = []
    _silence(lab, True)
    try:
        for _ in range(rounds):
            oelab.start_daemon(lab)
            try:
                out["ours"].append(_fetch(lab, name))
                oelab.oe(lab, "flush")
                out["ours_by_address"].append(_fetch(lab, addr))
            finally:
                oelab.stop_daemon(lab)
            _libreswan_on_router(lab, peers, addr)
            try:
                out["libreswan"].append(_fetch(lab, name))
            finally:
                _stop_libreswan(lab)
        oelab.start_daemon(lab, options={"dns.keyless": "probe"})
        try:
            out["ours_keyless_probe"].append(_fetch(lab, name))
        finally:
            oelab.stop_daemon(lab)
    finally:
        _silence(lab, False)
    return {k: [round(v * 1000, 1) for v in vs] for k, vs in out.items()}


def run() -> list[Result]:
    sys.path.insert(0, str(REPO / "qemu"))
    try:
        import build
        from lab import Lab, LabError
    except ImportError as exc:
        raise Unavailable(f"the QEMU lab is not importable: {exc}") from None
    images = build.build_all(log=lambda m: None)
    t0 = time.monotonic()
    try:
        with Lab(images, log=lambda m: None) as lab:
            if HOST in lab.failed_hosts:
                raise Unavailable(f"{HOST} did not start: {lab.failed_hosts[HOST]}")
            figures = measure(lab)
    except LabError as exc:
        raise Unavailable(f"the lab did not run: {exc}") from None
    ours = statistics.median(figures["ours"])
    base = statistics.median(figures["libreswan"])
    return [
        Result(
            "silent_host_connect",
            "ms from the DNS answer to the TCP connect, LAN client -> silent keyless host "
            "by name (median of 3)",
            ours,
            base,
            "libreswan pluto on the same router VM (private-or-clear), same run",
            "ratio <= 0.2",
            {
                "figures_ms": figures,
                "ours_by_address_ms": statistics.median(figures["ours_by_address"]),
                "ours_keyless_probe_ms": figures["ours_keyless_probe"][0],
                "lab_seconds": round(time.monotonic() - t0, 1),
                "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
            },
        )
    ]
