"""Clear traffic through the kernel hold: TCP throughput to a destination known to be clear.

Host network namespaces (no QEMU): L (LAN device) -> R (router, masquerade to its WAN
address) -> W (the world). R's XFRM policies are the OE shape: a private-or-clear trap
for 0.0.0.0/0 (source = WAN address) and a pass shunt for the plain host, as the OE
manager leaves after a failed negotiation.

- ours: ``HeldXfrmDatapath`` (``packet_hold``): a warm-up ping makes the plain host known
  (one queued packet), then iperf3 runs; ``queued_during_transfer`` counts the packets
  that took the userspace hop while it ran (the goal: 0);
- baseline: the same policies from a plain ``XfrmDatapath`` (no hold table).

Interleaved, ROUNDS rounds each; the goal is a ratio >= 0.98: a known clear destination
pays nothing for the hold.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import shutil
import statistics
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from bench.run import Result, Unavailable

SECONDS = 5
ROUNDS = 3
WAN = ipaddress.IPv4Address("198.51.100.1")
PLAIN = "203.0.113.20"


def _need() -> None:
    if os.geteuid() != 0:
        raise Unavailable("needs root (network namespaces)")
    for tool in ("iperf3", "ip", "nft"):
        if shutil.which(tool) is None:
            raise Unavailable(f"{tool} not installed (make setup installs it)")


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@contextmanager
def _world() -> Iterator[tuple[str, str, str]]:
    tag = uuid.uuid4().hex[:6]
    lan, r, w = f"bhl-{tag}", f"bhr-{tag}", f"bhw-{tag}"
    try:
        for ns in (lan, r, w):
            _ip("netns", "add", ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", r, "link", "add", "lan0", "type", "veth", "peer", "name", "eth0", "netns", lan)
        _ip("-n", r, "link", "add", "wan", "type", "veth", "peer", "name", "w0", "netns", w)
        for ns, dev, addr in (
            (lan, "eth0", "192.168.1.2/24"),
            (r, "lan0", "192.168.1.1/24"),
            (r, "wan", "198.51.100.1/24"),
            (w, "w0", "198.51.100.2/24"),
        ):
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "addr", "add", addr, "dev", dev)
        _ip("-n", w, "addr", "add", f"{PLAIN}/32", "dev", "lo")
        _ip("-n", lan, "route", "add", "default", "via", "192.168.1.1")
        _ip("-n", r, "route", "add", "default", "via", "198.51.100.2")
        subprocess.run(["ip", "netns", "exec", r, "sysctl", "-qw", "net.ipv4.ip_forward=1"])
        from oe_router.datapath.nft import run_nft

        run_nft(
            "table ip bh_nat {\n\tchain post {\n"
            "\t\ttype nat hook postrouting priority srcnat; policy accept;\n"
            '\t\toifname "wan" masquerade\n\t}\n}\n',
            netns=r,
        )
        yield lan, r, w
    finally:
        for ns in (lan, r, w):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


async def _iperf(lan: str, w: str) -> float:
    srv = await asyncio.create_subprocess_exec(
        *("ip", "netns", "exec", w, "iperf3", "-s", "-1", "-B", PLAIN),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    await asyncio.sleep(0.3)
    cli = await asyncio.create_subprocess_exec(
        *("ip", "netns", "exec", lan, "iperf3", "-c", PLAIN, "-t", str(SECONDS), "-J"),
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await asyncio.wait_for(cli.communicate(), SECONDS + 30)
    await asyncio.wait_for(srv.wait(), 10)
    doc = json.loads(out)
    return float(doc["end"]["sum_received"]["bits_per_second"]) / 1e6


async def _round(lan: str, r: str, w: str, held: bool) -> tuple[float, int]:
    from oe_router.datapath.base import (
        Direction,
        Mode,
        PolicyAction,
        PolicySpec,
        Template,
        TrafficSelector,
    )
    from oe_router.datapath.kernel import XfrmDatapath
    from oe_router.datapath.kernel_hold import HeldXfrmDatapath

    dp: XfrmDatapath
    if held:
        dp = HeldXfrmDatapath(netns=r, reason="bench", wan_devices=["wan"], wan4=WAN)
    else:
        dp = XfrmDatapath(netns=r, reason="bench")
    src = TrafficSelector(ipaddress.ip_network(f"{WAN}/32"))
    tmpl = Template(
        WAN, ipaddress.IPv4Address("0.0.0.0"), dp.ownership.reqid_min + 1, Mode.TRANSPORT
    )
    trap = PolicySpec(
        src, TrafficSelector(ipaddress.ip_network("0.0.0.0/0")), Direction.OUT,
        PolicyAction.TRAP, 100, (tmpl,),
    )  # fmt: skip
    shunt = PolicySpec(
        src, TrafficSelector(ipaddress.ip_network(f"{PLAIN}/32")), Direction.OUT,
        PolicyAction.PASS, 1,
    )  # fmt: skip
    try:
        await dp.start()
        await dp.install_policy(trap)
        await dp.install_policy(shunt)
        await dp.release_adopted(lambda p: False)
        if held and "queued" not in dp.stats():
            raise Unavailable("the hold did not come up (no NFQUEUE?)")
        ping = await asyncio.create_subprocess_exec(
            *("ip", "netns", "exec", lan, "ping", "-c", "3", "-i", "0.2", "-W", "2", PLAIN),
            stdout=asyncio.subprocess.DEVNULL,
        )
        await ping.wait()
        await asyncio.sleep(0.3)  # the known4 element goes in off the packet's path
        before = dp.stats().get("queued", 0)
        mbit = await _iperf(lan, w)
        return mbit, dp.stats().get("queued", 0) - before
    finally:
        await dp.close()


def run() -> list[Result]:
    _need()
    ours: list[float] = []
    base: list[float] = []
    hops = 0
    with _world() as (lan, r, w):
        for _ in range(ROUNDS):
            mbit, queued = asyncio.run(_round(lan, r, w, held=True))
            ours.append(mbit)
            hops += queued
            base.append(asyncio.run(_round(lan, r, w, held=False))[0])
    extra: dict[str, Any] = {
        "queued_during_transfer": hops,
        "ours_rounds": [round(x, 1) for x in ours],
        "baseline_rounds": [round(x, 1) for x in base],
        "seconds": SECONDS,
    }
    return [
        Result(
            name="kernel_hold_clear_throughput",
            unit="Mbit/s",
            ours=statistics.median(ours),
            baseline=statistics.median(base),
            baseline_name="XfrmDatapath without the hold, same policies, same run",
            goal="ratio >= 0.98, queued_during_transfer == 0",
            extra=extra,
        )
    ]
