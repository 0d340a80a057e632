"""Cold flows from the LAN: the first connection to a host, ours against libreswan on the
router; and the daemon's start on the router. One lab boot, three figures (issue 16).

BOOTS THE QEMU LAB (router + world VMs; about 4 min for the boot under TCG, then about
5 min of rounds).

``packet_trigger_cold_connect``: the LAN client connects (curl, by address: no DNS, so
only the packet trigger can help) to ls-b (203.0.113.31, libreswan OE, NULL auth), with
no SA in place. The figure is curl's ``time_connect``; the LAN capture counts the client's
SYNs (a lost first SYN is resent after 1 s). A second cold start per round sends a ping
every 50 ms during the negotiation and counts the lost ones.
- ours: oe-routerd with the shipped configuration and ``packet_hold`` on (the first
  packets wait in the daemon and leave into the SA);
- baseline: libreswan's pluto on the router with the equivalent private-or-clear conn.

``silent_host_connect``: the lab's plain host (plain.example.test, 203.0.113.20: a signed
NSEC denies its IPSECKEY) made silent (nft drops UDP 500/4500 there, so IKE gets no
answer and no ICMP); the LAN client fetches its page by name; the figure is curl's
``time_connect - time_namelookup``, from the answer to the connected socket.
- ours: the shipped configuration (``oe.dns.keyless pass``: the pass shunt is in before
  the answer is released);
- baseline: libreswan's pluto on the router (private-or-clear for the host).
The JSON also carries both by address (ours: the trap, its held SYN released in the clear
when IKE gives up) and ours with ``keyless probe`` by name.

``daemon_ready_s_qemu``: from ``/etc/init.d/oe start`` to the daemon's ubus object (it is
published once every service has started), measured on the router; pluto's start as the
lab does it (NSS, spawn, control socket, groups loaded) beside it.

Rounds interleave ours and libreswan (3 each, median); before each fetch dnsmasq's cache
is cleared (SIGHUP) so a name is resolved afresh through the router.
"""

from __future__ import annotations

import os
import re
import statistics
import sys
import time
from typing import Any

from bench.qemu_lab import (
    REPO,
    booted,
    daemon_ready_on_router,
    libreswan_on_router,
    stop_libreswan_on_router,
)
from bench.run import Result, Unavailable

OE_HOST = "ls-b"
HOLD = {"global.packet_hold": "1"}  # the default, said explicitly
SILENT = "plain"
ROUNDS = 3
PINGS = 60
LIMIT = 30  # s: curl's --max-time; a baseline that never connects is recorded as this bound
CURL = (
    f"curl -4 -s -o /dev/null --max-time {LIMIT} "
    "-w '%{http_code} %{time_namelookup} %{time_connect}' "
)


def _fetch(lab: Any, target: str, bound: bool = False) -> tuple[float, int]:
    """Seconds from the answer (0 for an address) to the connected socket, and the SYNs the
    client sent (the LAN capture); the page must come. ``bound`` (a baseline): a connect
    that never happens within ``LIMIT`` is recorded as ``LIMIT``, a lower bound."""
    lab.router("kill -HUP $(cat /run/dnsmasq.pid)")  # every round resolves afresh
    with lab.capture("eth0", netns="client", bpf="tcp port 80", label="cold-lan") as lan:
        res = lab.client(CURL + f"http://{target}/", timeout=LIMIT + 30)
    fields = res.stdout.split()
    syns = lan.count("tcp[tcpflags] == tcp-syn")
    if res.rc == 28 and bound and len(fields) == 3 and fields[2] == "0.000000":
        return float(LIMIT), syns  # curl: operation timed out before any connect
    if res.rc != 0 or len(fields) != 3 or fields[0] != "200":
        raise Unavailable(f"curl {target}: rc {res.rc}, {res.stdout!r} {res.stderr[-300:]!r}")
    return float(fields[2]) - float(fields[1]), syns


def _pings_lost(lab: Any, addr: str) -> int:
    res = lab.client(f"ping -n -i 0.05 -c {PINGS} -W 2 {addr}", timeout=60)
    return PINGS - len(re.findall(r"bytes from .*icmp_seq=\d+", res.stdout))


def _ours(lab: Any, oelab: Any, addr: str) -> dict[str, Any]:
    """A cold connect and a cold ping run with a freshly started daemon (the hold on)."""
    oelab.start_daemon(lab, options=HOLD)
    try:
        deadline = time.monotonic() + 30
        stats = oelab.status(lab)["daemon"]["datapath_stats"]
        while "queued" not in stats and time.monotonic() < deadline:
            time.sleep(0.5)  # the OE service (the datapath) may start after the control socket
            stats = oelab.status(lab)["daemon"]["datapath_stats"]
        connect, syns = _fetch(lab, addr)
        oelab.oe(lab, f"down {addr}")
        time.sleep(1.5)  # xfrm_acq_expires=1: no larval state left
        lost = _pings_lost(lab, addr)
        return {"connect": connect, "syns": syns, "pings_lost": lost, "hold": "queued" in stats}
    finally:
        oelab.stop_daemon(lab)


def _libreswan(lab: Any, addr: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for step in ("connect", "ping"):
        lab.host(OE_HOST, "ip xfrm state flush")  # ls-b's pluto forgets the last SA
        libreswan_on_router(lab, {"private-or-clear": [f"{addr}/32"]})
        try:
            if step == "connect":
                out["connect"], out["syns"] = _fetch(lab, addr, bound=True)
            else:
                out["pings_lost"] = _pings_lost(lab, addr)
        finally:
            stop_libreswan_on_router(lab)
    return out


def measure_packet_trigger(lab: Any, oelab: Any, rounds: int) -> dict[str, list[Any]]:
    addr = lab.plan.host(OE_HOST).ipv4
    out: dict[str, list[Any]] = {"ours": [], "libreswan": []}
    for _ in range(rounds):
        out["ours"].append(_ours(lab, oelab, addr))
        out["libreswan"].append(_libreswan(lab, addr))
    return out


def measure_silent(lab: Any, oelab: Any, rounds: int) -> dict[str, list[Any]]:
    host = lab.plan.host(SILENT)
    name, addr = host.name, host.ipv4
    keys = ("ours", "ours_by_address", "libreswan", "libreswan_by_address", "ours_keyless_probe")
    out: dict[str, list[Any]] = {k: [] for k in keys}
    with oelab.silent_host(lab, SILENT):
        for _ in range(rounds):
            oelab.start_daemon(lab)
            try:
                out["ours"].append(_fetch(lab, name))
                oelab.oe(lab, "flush")
                out["ours_by_address"].append(_fetch(lab, addr))
            finally:
                oelab.stop_daemon(lab)
            for key, target in (("libreswan", name), ("libreswan_by_address", addr)):
                # a fresh pluto each time: its failed probe leaves a pass shunt behind
                libreswan_on_router(lab, {"private-or-clear": [f"{addr}/32"]})
                try:
                    out[key].append(_fetch(lab, target, bound=True))
                finally:
                    stop_libreswan_on_router(lab)
        oelab.start_daemon(lab, options={"dns.keyless": "probe"})
        try:
            out["ours_keyless_probe"].append(_fetch(lab, name))
        finally:
            oelab.stop_daemon(lab)
    return out


def measure_ready(lab: Any, oelab: Any, rounds: int) -> dict[str, list[float]]:
    """Start to ready on the router: ours through procd, pluto as the lab starts it."""
    addr = lab.plan.host(OE_HOST).ipv4
    out: dict[str, list[float]] = {"ours": [], "pluto": []}
    oelab.start_daemon(lab)  # installs the shipped configuration, trust anchor and key
    oelab.stop_daemon(lab)
    for _ in range(rounds):
        try:
            out["ours"].append(daemon_ready_on_router(lab))
        finally:
            oelab.stop_daemon(lab)
        try:
            out["pluto"].append(libreswan_on_router(lab, {"private-or-clear": [f"{addr}/32"]}))
        finally:
            stop_libreswan_on_router(lab)
    return out


def _ms(xs: list[float]) -> float:
    return round(statistics.median(xs) * 1000, 1)


def run() -> list[Result]:
    t0 = time.monotonic()
    with booted((OE_HOST, SILENT)) as lab:
        sys.path.insert(0, str(REPO / "qemu"))
        import oelab

        trigger = measure_packet_trigger(lab, oelab, ROUNDS)
        silent = measure_silent(lab, oelab, ROUNDS)
        ready = measure_ready(lab, oelab, ROUNDS)
    load = [round(x, 2) for x in os.getloadavg()]
    ours, theirs = trigger["ours"], trigger["libreswan"]
    fetches = {k: [(round(s * 1000, 1), n) for s, n in v] for k, v in silent.items()}
    return [
        Result(
            "packet_trigger_cold_connect",
            "ms, LAN client cold TCP connect to a libreswan OE host by address (median of 3)",
            _ms([r["connect"] for r in ours]),
            _ms([r["connect"] for r in theirs]),
            "libreswan pluto on the same router VM (private-or-clear), same run",
            "ratio <= 0.5, syn_retransmits 0, pings_lost 0",
            {
                "syn_retransmits": max(r["syns"] for r in ours) - 1,
                "pings_lost": statistics.median(r["pings_lost"] for r in ours),
                "pings_sent": PINGS,
                "libreswan_syn_retransmits": max(r["syns"] for r in theirs) - 1,
                "libreswan_pings_lost": statistics.median(r["pings_lost"] for r in theirs),
                "packet_hold": all(r["hold"] for r in ours),
                "rounds": {
                    "ours": [{**r, "connect": round(r["connect"] * 1000, 1)} for r in ours],
                    "libreswan": [{**r, "connect": round(r["connect"] * 1000, 1)} for r in theirs],
                },
                "lab_seconds": round(time.monotonic() - t0, 1),
                "load_average_at_end": load,
            },
        ),
        Result(
            "silent_host_connect",
            "ms from the DNS answer to the TCP connect, LAN client -> silent keyless host "
            "by name (median of 3)",
            _ms([s for s, _ in silent["ours"]]),
            _ms([s for s, _ in silent["libreswan"]]),
            "libreswan pluto on the same router VM (private-or-clear), same run",
            "ratio <= 0.2",
            {
                "syn_retransmits": max(n for _, n in silent["ours"]) - 1,
                "ours_by_address_ms": _ms([s for s, _ in silent["ours_by_address"]]),
                "libreswan_by_address_ms": _ms([s for s, _ in silent["libreswan_by_address"]]),
                "ours_keyless_probe_ms": _ms([s for s, _ in silent["ours_keyless_probe"]]),
                "baseline_is_lower_bound": any(
                    s >= LIMIT for k in ("libreswan", "libreswan_by_address") for s, _ in silent[k]
                ),
                "bound_note": f"a libreswan fetch that did not connect within {LIMIT} s counts "
                f"as {LIMIT} s (a lower bound)",
                "fetches_ms_and_syns": fetches,
                "lab_seconds": round(time.monotonic() - t0, 1),
                "load_average_at_end": load,
            },
        ),
        Result(
            "daemon_ready_s_qemu",
            "s from start to ready on the TCG router (ours: /etc/init.d/oe start to its ubus "
            "object, every service started; median of 3)",
            round(statistics.median(ready["ours"]), 3),
            round(statistics.median(ready["pluto"]), 3),
            "libreswan pluto on the same router VM: spawn to control socket and groups loaded",
            "ours <= 2 s",
            {"rounds_s": {k: [round(x, 3) for x in v] for k, v in ready.items()}},
        ),
    ]
