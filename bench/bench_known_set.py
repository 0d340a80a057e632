"""Set-element writes: nfnetlink batches against one ``nft -f`` process per change.

Host network namespace (no QEMU), the real tables, the callers' own write paths:

- ``known_set_write_us``: the packet hold deciding N new destinations one at a time (the
  flood case: each decided destination becomes a ``known4`` element with a timeout),
  through ``HeldXfrmDatapath._apply_known``; ours over nfnetlink (``nft_setelem``), the
  baseline the same method with the netlink writer off (``nft -f`` per change, as before).
  Wall time per element; ``cpu_us`` adds this process's CPU and its children's (nft).
- ``spd_element_write_us``: the userspace datapath's SPD projection adding N pass shunts
  one by one (``SpdProjection.project``, one verdict-map interval each), same two paths.

Interleaved, ROUNDS rounds of N each; the goal is a ratio <= 0.1.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import resource
import shutil
import statistics
import subprocess
import time
import uuid
from collections.abc import Callable
from typing import Any

from bench.run import Result, Unavailable

N = 200
ROUNDS = 3
WAN = ipaddress.IPv4Address("198.51.100.1")


def _need() -> None:
    if os.geteuid() != 0:
        raise Unavailable("needs root (network namespaces)")
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            raise Unavailable(f"{tool} not installed (make setup installs it)")


def _cpu() -> float:
    """CPU seconds of this process and its reaped children (nft)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _timed(step: Callable[[int], None], n: int) -> tuple[float, float]:
    """(wall us, CPU us) per call of ``step(i)`` for i < n."""
    c0, t0 = _cpu(), time.perf_counter()
    for i in range(n):
        step(i)
    return (time.perf_counter() - t0) / n * 1e6, (_cpu() - c0) / n * 1e6


def _known(ns: str) -> dict[str, Any]:
    from oe_router.datapath.kernel_hold import HeldXfrmDatapath, HoldSettings, KnownOp, render_table
    from oe_router.datapath.nft import run_nft
    from oe_router.datapath.nft_setelem import SetElemWriter

    s = HoldSettings(table="oe_bench_hold")
    run_nft(render_table(s, ["wan"], [ipaddress.IPv4Network("0.0.0.0/1")]), netns=ns)
    dp = HeldXfrmDatapath(netns=ns, reason="bench", wan_devices=["wan"], wan4=WAN, hold=s)
    walls: dict[str, list[float]] = {"ours": [], "base": []}
    cpus: dict[str, list[float]] = {"ours": [], "base": []}
    try:
        for r in range(ROUNDS):
            for side in ("ours", "base"):
                dp._elems = SetElemWriter(netns=ns) if side == "ours" else None
                dp._apply_known(KnownOp(flush=True))
                base = int(ipaddress.IPv4Address("10.0.0.0")) + (r * 2 + (side == "base")) * N

                def step(i: int, base: int = base) -> None:
                    dp._apply_known(KnownOp(add=((ipaddress.IPv4Address(base + i), 600),)))

                wall, cpu = _timed(step, N)
                walls[side].append(wall)
                cpus[side].append(cpu)
        out = subprocess.run(
            ["ip", "netns", "exec", ns, "nft", "list", "set", "inet", s.table, "known4"],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        if out.count("timeout 10m") != N:
            raise RuntimeError(f"known4 holds {out.count('timeout 10m')} elements, not {N}")
    finally:
        asyncio.run(dp.close())
    return {"walls": walls, "cpus": cpus}


def _spd(ns: str) -> dict[str, Any]:
    from oe_router.datapath import nft_spd
    from oe_router.datapath.base import (
        Direction,
        Mode,
        PolicyAction,
        PolicySpec,
        Template,
        TrafficSelector,
    )
    from oe_router.datapath.nft_setelem import SetElemWriter

    def ts(net: str) -> TrafficSelector:
        return TrafficSelector(ipaddress.ip_network(net))

    tmpl = Template(WAN, ipaddress.IPv4Address("0.0.0.0"), 1, Mode.TRANSPORT)
    trap = PolicySpec(
        ts(f"{WAN}/32"), ts("0.0.0.0/0"), Direction.OUT, PolicyAction.TRAP, 100, (tmpl,)
    )

    def shunt(i: int) -> PolicySpec:
        dst = ts(f"{ipaddress.IPv4Address(int(ipaddress.IPv4Address('20.0.0.0')) + i)}/32")
        return PolicySpec(ts(f"{WAN}/32"), dst, Direction.OUT, PolicyAction.PASS, 1)

    walls: dict[str, list[float]] = {"ours": [], "base": []}
    cpus: dict[str, list[float]] = {"ours": [], "base": []}

    async def rounds() -> None:
        proj = nft_spd.SpdProjection(
            wan="wan", tun="oetun", queue_num=4799, bypass_mark=0x100, ike_ports=(), netns=ns
        )
        await proj.probe()
        for r in range(ROUNDS):
            for side in ("ours", "base"):
                current = [trap, shunt(10**6)]  # a map for the /32 shunts to join
                await proj.go_live(list(current))
                proj._elems = SetElemWriter(netns=ns) if side == "ours" else None
                first = (r * 2 + (side == "base")) * N
                c0, t0 = _cpu(), time.perf_counter()
                for i in range(first, first + N):
                    p = shunt(i)
                    current.append(p)
                    await proj.project(lambda cur=current: list(cur), add=[p])
                walls[side].append((time.perf_counter() - t0) / N * 1e6)
                cpus[side].append((_cpu() - c0) / N * 1e6)
        if proj.runs["nft"] != ROUNDS * N:
            raise RuntimeError(f"the baseline ran nft {proj.runs['nft']} times, not {ROUNDS * N}")
        await proj.leave([])

    asyncio.run(rounds())
    return {"walls": walls, "cpus": cpus}


def _result(name: str, what: str, m: dict[str, Any], base_name: str) -> Result:
    walls, cpus = m["walls"], m["cpus"]
    return Result(
        name=name,
        unit="us per element",
        ours=round(statistics.median(walls["ours"]), 1),
        baseline=round(statistics.median(walls["base"]), 1),
        baseline_name=base_name,
        goal="ratio <= 0.1",
        extra={
            "what": what,
            "elements_per_round": N,
            "rounds": ROUNDS,
            "cpu_us_ours": round(statistics.median(cpus["ours"]), 1),
            "cpu_us_baseline": round(statistics.median(cpus["base"]), 1),
            "ours_rounds": [round(x, 1) for x in walls["ours"]],
            "baseline_rounds": [round(x, 1) for x in walls["base"]],
        },
    )


def run() -> list[Result]:
    _need()
    ns = f"bks-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", ns], check=True, capture_output=True)
    try:
        known = _known(ns)
        spd = _spd(ns)
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)
    return [
        _result(
            "known_set_write_us",
            "packet hold: one new known4 destination (timeout) written per decision",
            known,
            "nft -f per change, same run",
        ),
        _result(
            "spd_element_write_us",
            "SPD projection: one pass shunt added per change (verdict-map interval)",
            spd,
            "nft -f per change, same run",
        ),
    ]
