"""Userspace ESP throughput: ours <-> ours against strongSwan kernel-libipsec <-> itself.

Same host, same run, same transform (AES-GCM-256, and ChaCha20-Poly1305 and
AES-256-CBC/HMAC-SHA-256 beside it), same topology: two network namespaces on a veth
pair, iperf3 from one end's address to the other's through the tunnel, host to host.
Both stacks do ESP in userspace over a TUN device, always in UDP 4500:

- baseline: charon 5.9.8 with kernel-libipsec in each namespace (public keys, the
  Child SA up with ``swanctl --initiate``, routes into libipsec's TUN);
- ours: oe-routerd with ``datapath userspace`` in each namespace, the tunnel brought up
  by the first packet (NULL-auth OE, packet trigger), ESP in the worker processes.

Rounds alternate (ours, charon, ...) and the median of each side counts; the 2 cores
are shared by both ends and iperf3, as a router shares its CPU. The result also gives
the CPU each of our workers spent per packet, split into system calls (kernel time)
and Python (user time), the crypto part of it measured apart with the same engine.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from bench.run import Result, Unavailable

A, B = "198.51.100.1", "198.51.100.2"  # TEST-NET-2: private-or-clear by default
SECONDS = 6
ROUNDS = 3
TRANSFORMS = ("aes256gcm16", "chacha20poly1305", "aes256-sha256")
IKE = "aes256gcm16-prfsha256-x25519"


def _need() -> None:
    if os.geteuid() != 0:
        raise Unavailable("needs root (network namespaces)")
    for tool in ("iperf3", "ip", "nft", "swanctl"):
        if shutil.which(tool) is None:
            raise Unavailable(f"{tool} not installed (make setup installs it)")


def _run(ns: str, cmd: list[str], timeout: float = 60) -> str:
    p = subprocess.run(
        ["ip", "netns", "exec", ns, *cmd], capture_output=True, text=True, timeout=timeout
    )
    if p.returncode != 0:
        raise RuntimeError(f"{ns}: {' '.join(cmd)}: {p.stdout}{p.stderr}")
    return p.stdout


def _iperf(client: str, server_ns: str, dst: str) -> float:
    """Receiver-side Mbit/s of one iperf3 run (a fresh server each time)."""
    srv = subprocess.Popen(
        ["ip", "netns", "exec", server_ns, "iperf3", "-s", "-1", "-B", dst],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(0.3)
        out = _run(client, ["iperf3", "-c", dst, "-t", str(SECONDS), "-J"], SECONDS + 30)
    finally:
        srv.wait(timeout=10)
    doc = json.loads(out)
    return float(doc["end"]["sum_received"]["bits_per_second"]) / 1e6


@contextmanager
def _pair(tag: str) -> Iterator[tuple[Any, str, str]]:
    from tests.host.charon import Netns

    net = Netns(tag)
    try:
        a, b = net.add("a"), net.add("b")
        net.link(a, f"{A}/24", b, f"{B}/24")
        yield net, a, b
    finally:
        net.close()


# --------------------------------------------------------------------------- ours
def _ours_config(wan: str, esp: str, work: Path) -> str:
    return f"""package oe

config oe 'global'
\toption datapath 'userspace'
\toption wan_interface '{wan}'
\toption lan_interface 'lo'
\toption offload 'off'

config dns 'dns'
\toption trust_anchor '{work}/no-anchor'

config ike 'ike'
\tlist esp_proposal '{esp}'
"""


def _worker_cpu(ns_pids: list[int]) -> dict[str, float]:
    """user and system CPU seconds of the given processes (from /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    user = sys_ = 0.0
    for pid in ns_pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        user += int(fields[11]) / tick
        sys_ += int(fields[12]) / tick
    return {"user": user, "sys": sys_}


def _worker_pids(log: str) -> list[int]:
    import re

    found = re.findall(r"workers tx pid (\d+), rx pid (\d+)", log)  # the log is appended to
    return [int(found[-1][0]), int(found[-1][1])] if found else []


def _ours(esp: str, work: Path) -> tuple[list[float], dict[str, Any]]:
    from tests.host.oe_daemon import OeDaemon, device_with

    speeds: list[float] = []
    detail: dict[str, Any] = {}
    with _pair("bu") as (_, a, b):
        da = OeDaemon(a, work / f"ours-a-{esp}", _ours_config(device_with(a, A), esp, work))
        db = OeDaemon(b, work / f"ours-b-{esp}", _ours_config(device_with(b, B), esp, work))
        try:
            da.start()
            db.start()
            _run(a, ["ping", "-c", "3", "-i", "0.2", B])  # the packet trigger
            rows = da.wait_for("tunnel", da.tunnels, 10)
            detail["transform"] = rows[0]["transform"]
            pids = _worker_pids(da.log()) + _worker_pids(db.log())
            for _ in range(ROUNDS):
                before = _worker_cpu(pids)
                pk0 = sum(int(t["packets_out"]) for t in da.tunnels())
                speeds.append(_iperf(a, b, B))
                after = _worker_cpu(pids)
                pk1 = sum(int(t["packets_out"]) for t in da.tunnels())
                packets = max(1, pk1 - pk0)
                detail.setdefault("cpu_us_per_packet", []).append(
                    {
                        "user": round((after["user"] - before["user"]) / packets * 1e6, 2),
                        "sys": round((after["sys"] - before["sys"]) / packets * 1e6, 2),
                        "packets": packets,
                    }
                )
            bad = [t for t in da.tunnels() if t["integrity_failures"] or t["replay_errors"]]
            detail["errors"] = bad
        finally:
            da.stop()
            db.stop()
    return speeds, detail


# --------------------------------------------------------------------------- charon
def _charon_conn(local: str, remote: str, esp: str, initiator: bool) -> str:
    return f"""
  bench {{
    version = 2
    local_addrs = {local}
    remote_addrs = {remote}
    proposals = {IKE}
    unique = never
    local {{ auth = pubkey
      pubkeys = {"a" if initiator else "b"}.pem
      id = {local} }}
    remote {{ auth = pubkey
      pubkeys = {"b" if initiator else "a"}.pem
      id = {remote} }}
    children {{ bench-c {{ local_ts = dynamic
      remote_ts = dynamic
      esp_proposals = {esp}
      mode = tunnel }} }}
  }}"""


def _charon(esp: str, work: Path) -> list[float]:
    from tests.host.charon import Charon

    keys = {n: ec.generate_private_key(ec.SECP256R1()) for n in ("a", "b")}
    pub = {
        f"{n}.pem": k.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        for n, k in keys.items()
    }

    def priv(n: str) -> dict[str, bytes]:
        return {
            f"{n}.pem": keys[n].private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        }

    speeds: list[float] = []
    with _pair("bc") as (_, a, b):
        quiet = "default = -1"
        ca = Charon(a, work / f"charon-a-{esp}", _charon_conn(A, B, esp, True), pub, priv("a"),
                    log_levels=quiet, install_routes=True)  # fmt: skip
        cb = Charon(b, work / f"charon-b-{esp}", _charon_conn(B, A, esp, False), pub, priv("b"),
                    log_levels=quiet, install_routes=True)  # fmt: skip
        try:
            cb.start()
            ca.start()
            ca.initiate("bench-c")
            _run(a, ["ping", "-c", "2", "-i", "0.2", B])
            for _ in range(ROUNDS):
                speeds.append(_iperf(a, b, B))
        finally:
            ca.stop()
            cb.stop()
    return speeds


def _crypto_us(esp: str) -> float:
    """Seal + open of one 1400-byte packet with the software engine (the workers' own)."""
    from oe_router.offload import TRANSFORMS
    from oe_router.offload.software import SoftwareEngine

    t = TRANSFORMS[esp]
    e = SoftwareEngine()
    c = e.cipher(t, os.urandom(t.encr_key_len), os.urandom(t.auth_key_len))
    pt, hdr, iv = os.urandom(1392), bytes(8), os.urandom(t.iv_len)
    sealed = c.seal(hdr, None, iv, pt)
    n = 20000
    t0 = time.perf_counter()
    for _ in range(n):
        c.seal(hdr, None, iv, pt)
    for _ in range(n):
        c.open(hdr, None, iv, sealed)
    return round((time.perf_counter() - t0) / n * 1e6, 2)


def run() -> list[Result]:
    _need()
    out: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="bench-us-") as tmp:
        work = Path(tmp)
        for esp in TRANSFORMS:
            ours: list[float] = []
            base: list[float] = []
            detail: dict[str, Any] = {}
            # interleaved: each side's rounds run between the other's
            for _ in range(2):
                o, detail = _ours(esp, work)
                ours += o
                base += _charon(esp, work)
            crypto = _crypto_us(esp)
            cpu = [
                {
                    "syscalls_us": c["sys"],
                    "crypto_us": crypto,
                    "python_us": round(c["user"] - crypto, 2),
                    "packets": c["packets"],
                }
                for c in detail.get("cpu_us_per_packet", [])
            ]
            out.append(
                Result(
                    name=f"userspace_esp_throughput_{esp}",
                    unit="Mbit/s",
                    ours=statistics.median(ours),
                    baseline=statistics.median(base),
                    baseline_name="strongSwan 5.9.8 charon kernel-libipsec <-> charon",
                    goal=">= 1.0 (ratio), same host, same transform, iperf3 through the tunnel",
                    extra={
                        "ours_runs": [round(x, 1) for x in ours],
                        "baseline_runs": [round(x, 1) for x in base],
                        "transform": detail.get("transform", esp),
                        # worker CPU of both ends per packet sent: kernel time (system
                        # calls: TUN, UDP), the crypto (one seal + one open, measured
                        # apart with the same engine) and the rest of the user time
                        "worker_cpu_per_packet_both_ends": cpu,
                        "topology": "two netns on a veth, host to host, 2 cores shared by all",
                    },
                )
            )
    return out
