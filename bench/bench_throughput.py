"""Throughput through the router, LAN client -> libreswan OE host, oe-routerd vs libreswan.

BOOTS THE QEMU LAB (router + world VMs; about 4 min in all under TCG).

The same job done two ways on the same VM pair in the same run, interleaved (ours,
libreswan, five rounds): the LAN client (192.168.1.100) runs `iperf3 -c` for 8 s to
ls-b (203.0.113.31, libreswan clear-or-private for everyone); the router source-NATs the
flow to its WAN address and a packet-triggered host-to-host OE SA (NULL auth) protects it.

- ours: oe-routerd with the shipped config (private-or-clear 0.0.0.0/0);
- baseline: libreswan's pluto ON THE ROUTER with the equivalent private-or-clear conn for
  ls-b (lab tooling: the router image carries libreswan only for this baseline; the
  product never starts it).

Both use kernel ESP with the cipher the two ends agree on (AES-GCM-256 with libreswan as
responder), so the goal is a ratio >= 0.98: the daemon adds nothing per packet. Each run
first checks the flow is ESP on the WAN (0 cleartext TCP) so neither figure is a
cleartext figure.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from typing import Any

from bench.qemu_lab import REPO, booted, libreswan_on_router, stop_libreswan_on_router
from bench.run import Result, Unavailable

PEER = "203.0.113.31"  # ls-b
SECONDS = 8


def _iperf(lab: Any, algs: list[str]) -> float:
    """Receiver-side Mbit/s of one iperf3 run from the LAN client (after a warm-up ping);
    appends the kernel's ESP algorithm lines to ``algs`` (both sides must use the same)."""
    lab.client(f"ping -c 3 -i 0.3 -W 2 {PEER}", timeout=30)
    with lab.capture_wan(bpf=f"host {PEER}", label="tput-check") as cap:
        lab.client(f"iperf3 -c {PEER} -t 1 -J >/dev/null", timeout=30)
    if cap.count("tcp") or not cap.esp():
        raise Unavailable(f"the iperf3 flow was not ESP on the WAN:\n{cap.text()[:800]}")
    out = lab.client(f"iperf3 -c {PEER} -t {SECONDS} -J", timeout=SECONDS + 30).check()
    doc = json.loads(out.stdout)
    state = lab.router(f"ip xfrm state list dst {PEER}").stdout
    algs.append(
        " ".join(
            ln.split()[0] + " " + ln.split()[1]
            for ln in state.splitlines()
            if ln.strip().startswith(("aead", "enc", "auth"))
        )
    )
    return float(doc["end"]["sum_received"]["bits_per_second"]) / 1e6


def measure(lab: Any, rounds: int = 5) -> dict[str, Any]:
    sys.path.insert(0, str(REPO / "qemu"))
    import oelab

    lab.host("ls-b", f"iperf3 -s -D -B {PEER}").check()
    ours: list[float] = []
    theirs: list[float] = []
    algs_ours: list[str] = []
    algs_theirs: list[str] = []
    for _ in range(rounds):
        oelab.start_daemon(lab)
        try:
            ours.append(_iperf(lab, algs_ours))
        finally:
            oelab.stop_daemon(lab)
        lab.host("ls-b", "ip xfrm state flush")  # libreswan on ls-b forgets the old SA
        libreswan_on_router(lab, {"private-or-clear": [f"{PEER}/32"]})
        try:
            theirs.append(_iperf(lab, algs_theirs))
        finally:
            stop_libreswan_on_router(lab)
    return {
        "ours_mbit": ours,
        "libreswan_mbit": theirs,
        "esp_ours": sorted(set(algs_ours)),
        "esp_libreswan": sorted(set(algs_theirs)),
    }


def run() -> list[Result]:
    t0 = time.monotonic()
    with booted(("ls-b",)) as lab:
        figures = measure(lab)
    ours = statistics.median(figures["ours_mbit"])
    base = statistics.median(figures["libreswan_mbit"])
    # Each round runs ours then libreswan back to back: the per-round ratio cancels the
    # drift of a shared TCG host, so its median is reported next to the ratio of medians.
    rounds = zip(figures["ours_mbit"], figures["libreswan_mbit"], strict=True)
    paired = [o / t for o, t in rounds if t]
    figures["paired_ratios"] = [round(r, 4) for r in paired]
    figures["paired_ratio_median"] = round(statistics.median(paired), 4) if paired else None
    figures["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    return [
        Result(
            "oe_lan_throughput_mbit",
            "Mbit/s, LAN client -> OE host through the router (iperf3, median of 5)",
            ours,
            base,
            "libreswan pluto on the same router VM, same run",
            ">= 0.98 (kernel ESP both ways)",
            {"figures": figures, "lab_seconds": round(time.monotonic() - t0, 1)},
        )
    ]
