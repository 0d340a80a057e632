"""Runs INSIDE the router VM (Debian's python3 + the image's oe_router): XfrmDatapath by hand.

Why a guest-side script: the host kernel has no ESP, so the only place our XFRM netlink code
can install real ESP SAs is the router VM. The tests and benchmarks copy this file into the
lab's 9p share and call one subcommand per step; each prints one JSON document. SAs and
policies stay in the kernel between calls (a process exit removes nothing), so every step
after `install` is stateless: it rebuilds the spec from the same JSON.

    python3 /lab/xfrm_guest.py install  '<spec json>' [--alloc]
    python3 /lab/xfrm_guest.py counters '<spec json>'
    python3 /lab/xfrm_guest.py remove   '<spec json>'
    python3 /lab/xfrm_guest.py expire   '<spec json>' SECONDS
    python3 /lab/xfrm_guest.py natt-socket SECONDS          (holds an ESPINUDP socket on 4500)
    python3 /lab/xfrm_guest.py first-packet '<fp json>'     (trap, ACQUIRE, delayed install)
    python3 /lab/xfrm_guest.py ping DST COUNT INTERVAL WAIT  (the router's own ICMP echo)
    python3 /lab/xfrm_guest.py connect DST PORT TIMEOUT      (the router's own TCP connect)
    python3 /lab/xfrm_guest.py bench-install N BASE_SPI     (SA install latency, N SAs)
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import socket
import sys
import time
from typing import Any

from oe_router.datapath.base import (
    ChildSaSpec,
    Direction,
    Lifetime,
    Mode,
    NatTEncap,
    PolicyAction,
    PolicySpec,
    SaKeys,
    Template,
    TrafficSelector,
    encr_algorithm,
    integ_algorithm,
)
from oe_router.datapath.kernel import Ownership, XfrmDatapath, bypass_socket, enable_esp_in_udp


def spec_from(d: dict[str, Any]) -> ChildSaSpec:
    """The JSON the host test writes -> a ChildSaSpec (keys in hex)."""
    integ = integ_algorithm(d["integ"]) if d.get("integ") else None
    encap = NatTEncap(*d["encap"]) if d.get("encap") else None
    return ChildSaSpec(
        local=ipaddress.ip_address(d["local"]),
        remote=ipaddress.ip_address(d["remote"]),
        inbound=SaKeys(
            d["in_spi"], bytes.fromhex(d["in_key"]), bytes.fromhex(d.get("in_ikey", ""))
        ),
        outbound=SaKeys(
            d["out_spi"], bytes.fromhex(d["out_key"]), bytes.fromhex(d.get("out_ikey", ""))
        ),
        encr=encr_algorithm(d["encr"]),
        integ=integ,
        mode=Mode.TUNNEL,
        encap=encap,
        esn=bool(d.get("esn", False)),
        replay_window=int(d.get("replay_window", 64)),
        reqid=int(d.get("reqid", 0)),
        lifetime=Lifetime(**d.get("lifetime", {})),
        policy_priority=int(d.get("priority", 100)),
    )


def counters_json(dp: XfrmDatapath, spec: ChildSaSpec) -> dict[str, Any]:
    inbound = dp.get_sa(spec.remote, spec.local, spec.inbound.spi)
    outbound = dp.get_sa(spec.local, spec.remote, spec.outbound.spi)
    return {
        "in": vars(inbound.counters),
        "out": vars(outbound.counters),
        "in_reqid": inbound.reqid,
        "out_reqid": outbound.reqid,
    }


async def install(d: dict[str, Any], alloc: bool) -> dict[str, Any]:
    dp = XfrmDatapath()
    try:
        spec = spec_from(d)
        out: dict[str, Any] = {}
        if alloc:
            reqid = dp.allocate_reqid()
            t0 = time.perf_counter()
            spi = await dp.allocate_spi(spec.local, spec.remote, reqid)
            out["alloc_ms"] = (time.perf_counter() - t0) * 1e3
            out["allocated_spi"] = spi
            out["larval"] = os.popen(f"ip xfrm state list spi {spi:#x}").read()
            inbound = SaKeys(spi, spec.inbound.encr_key, spec.inbound.integ_key)
            spec = ChildSaSpec(**{**vars(spec), "inbound": inbound, "reqid": reqid})
        t0 = time.perf_counter()
        spec = await dp.install_child_sa(spec)
        out["install_ms"] = (time.perf_counter() - t0) * 1e3
        out["reqid"] = spec.reqid
        out["in_spi"] = spec.inbound.spi
        return out
    finally:
        # Do NOT close(): close() removes what this process installed; the SAs must outlive it.
        dp._sock.close()
        dp._events_sock.close()


async def remove(d: dict[str, Any]) -> dict[str, Any]:
    dp = XfrmDatapath()
    try:
        await dp.remove_child_sa(spec_from(d))
        left = [s for s in dp.dump_sas() if s.spi in (d["in_spi"], d["out_spi"])]
        return {"left": len(left)}
    finally:
        await dp.close()


async def expire(d: dict[str, Any], seconds: float) -> dict[str, Any]:
    """Install with a lifetime, collect EXPIRE events for `seconds`, report what is left."""
    dp = XfrmDatapath()
    events: list[dict[str, Any]] = []
    t0 = time.monotonic()

    async def collect() -> None:
        async for ev in dp.events():
            row: dict[str, Any] = {
                k: v if isinstance(v, (int, bool)) else str(v) for k, v in vars(ev).items()
            }
            row["type"] = type(ev).__name__
            row["t"] = round(time.monotonic() - t0, 3)
            events.append(row)

    task = asyncio.create_task(collect())
    await asyncio.sleep(0.05)  # subscribed before the SA exists
    spec = await dp.install_child_sa(spec_from(d))
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await task
    task.cancel()
    left = [s.spi for s in dp.dump_sas() if s.spi in (spec.inbound.spi, spec.outbound.spi)]
    await dp.remove_child_sa(spec)
    await dp.close()
    return {"events": events, "left": left}


def natt_socket(seconds: float) -> dict[str, Any]:
    """Hold a UDP 4500 socket as our IKE endpoint sets it up: ESPINUDP plus the per-socket
    bypass (the kernel checks the in-policy on the outer UDP packet before decapsulating,
    and a host-to-host Child SA's selector covers it)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", 4500))
    bypass_socket(s)
    enable_esp_in_udp(s)
    print("ready", flush=True)
    time.sleep(seconds)
    return {"held": seconds}


async def first_packet(fp: dict[str, Any]) -> dict[str, Any]:
    """A trap like the OE manager's, then the Child SA `delay_ms` after the ACQUIRE arrives.

    Stands in for the IKE exchange's duration only (the negotiation is not what is measured):
    what is measured is what the kernel does with the flow's packets meanwhile.
    """
    own = Ownership()
    dp = XfrmDatapath()
    spec = spec_from(fp["spec"])
    wan, peer = spec.local, spec.remote
    # A trap for a prefix around the peer (as a group entry would be): a /32 trap would share
    # the Child SA policy's selector and be replaced by it.
    trap = PolicySpec(
        TrafficSelector(ipaddress.ip_network(wan)),
        TrafficSelector(ipaddress.ip_network(fp["trap_prefix"])),
        Direction.OUT,
        PolicyAction.TRAP,
        priority=500,
        templates=(Template(wan, ipaddress.ip_address("0.0.0.0"), own.reqid_max, Mode.TRANSPORT),),
    )
    await dp.install_policy(trap)
    print("armed", flush=True)
    acquires: list[float] = []
    t0 = time.monotonic()
    installed_at = None
    try:
        async with asyncio.timeout(fp.get("wait", 30)):
            async for ev in dp.events():
                if type(ev).__name__ == "Acquire" and str(ev.dst) == str(peer):
                    acquires.append(time.monotonic() - t0)
                    if len(acquires) == 1:
                        await asyncio.sleep(fp["delay_ms"] / 1e3)
                        await dp.install_child_sa(spec)
                        installed_at = time.monotonic() - t0
                        break
    except TimeoutError:
        pass
    # remove the trap; the Child SA stays for the host to count and remove
    await dp.remove_policy(trap)
    dp._sock.close()
    dp._events_sock.close()
    return {"acquires": acquires, "installed_at": installed_at}


def icmp_ping(dst: str, count: int, interval: float, wait: float) -> dict[str, Any]:
    """The router's own pings (the image has no ping(8)): raw ICMP echo, seqs answered."""
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    s.setblocking(False)
    ident = os.getpid() & 0xFFFF
    got: set[int] = set()
    errors = 0

    def checksum(b: bytes) -> int:
        total = sum(int.from_bytes(b[i : i + 2], "big") for i in range(0, len(b), 2))
        total = (total >> 16) + (total & 0xFFFF)
        return ~(total + (total >> 16)) & 0xFFFF

    def drain() -> None:
        while True:
            try:
                pkt = s.recv(2048)
            except BlockingIOError:
                return
            ihl = (pkt[0] & 0xF) * 4
            if pkt[ihl] == 0 and int.from_bytes(pkt[ihl + 4 : ihl + 6], "big") == ident:
                got.add(int.from_bytes(pkt[ihl + 6 : ihl + 8], "big"))

    for seq in range(1, count + 1):
        body = ident.to_bytes(2, "big") + seq.to_bytes(2, "big") + bytes(48)
        hdr = bytes([8, 0]) + checksum(bytes([8, 0, 0, 0]) + body).to_bytes(2, "big")
        try:
            s.sendto(hdr + body, (dst, 0))
        except OSError:
            errors += 1  # EPERM from a DROP shunt, EAGAIN/EHOSTUNREACH while larval
        time.sleep(interval)
        drain()
    end = time.monotonic() + wait
    while time.monotonic() < end:
        time.sleep(0.05)
        drain()
    return {
        "sent": count,
        "received": len(got),
        "lost": count - len(got),
        "first": min(got) if got else None,
        "send_errors": errors,
    }


def tcp_connect(dst: str, port: int, timeout: float) -> dict[str, Any]:
    t0 = time.monotonic()
    try:
        socket.create_connection((dst, port), timeout).close()
    except OSError as exc:
        return {"connect_s": None, "error": str(exc)}
    return {"connect_s": time.monotonic() - t0}


async def bench_install(n: int, base_spi: int) -> dict[str, Any]:
    """Install n Child SAs (2 SAs + 3 policies each), one netlink round trip set at a time."""
    dp = XfrmDatapath()
    key = bytes(36)
    specs = []
    times: list[float] = []
    for i in range(n):
        remote = ipaddress.ip_address(0x0A000000 + i + 1)  # 10.0.x.y
        spec = ChildSaSpec(
            local=ipaddress.ip_address("203.0.113.2"),
            remote=remote,
            inbound=SaKeys(base_spi + 2 * i, key),
            outbound=SaKeys(base_spi + 2 * i + 1, key),
            encr=encr_algorithm(20),
            policy_priority=100,
        )
        t0 = time.perf_counter()
        specs.append(await dp.install_child_sa(spec))
        times.append((time.perf_counter() - t0) * 1e3)
    t0 = time.perf_counter()
    for s in specs:
        await dp.remove_child_sa(s)
    remove_s = time.perf_counter() - t0
    await dp.close()
    return {"install_ms": times, "remove_s": remove_s}


def main(argv: list[str]) -> int:
    op = argv[1]
    if op == "install":
        res = asyncio.run(install(json.loads(argv[2]), "--alloc" in argv))
    elif op == "counters":
        dp = XfrmDatapath()
        res = counters_json(dp, spec_from(json.loads(argv[2])))
    elif op == "remove":
        res = asyncio.run(remove(json.loads(argv[2])))
    elif op == "expire":
        res = asyncio.run(expire(json.loads(argv[2]), float(argv[3])))
    elif op == "natt-socket":
        res = natt_socket(float(argv[2]))
    elif op == "first-packet":
        res = asyncio.run(first_packet(json.loads(argv[2])))
    elif op == "ping":
        res = icmp_ping(argv[2], int(argv[3]), float(argv[4]), float(argv[5]))
    elif op == "connect":
        res = tcp_connect(argv[2], int(argv[3]), float(argv[4]))
    elif op == "bench-install":
        res = asyncio.run(bench_install(int(argv[2]), int(argv[3], 0)))
    else:
        print(f"unknown op {op!r}", file=sys.stderr)
        return 2
    print(json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
