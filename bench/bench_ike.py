"""IKE SAs established per second on one core: ours <-> ours vs charon <-> charon, same run.

Both pairs use ECDSA P-256 public keys both ways, DH group 19 and
AES_GCM_16_256/PRF_HMAC_SHA2_256 for the IKE SA; each handshake is IKE_SA_INIT +
IKE_AUTH with its first Child SA (ESP AES-GCM), and ``WINDOW`` handshakes are
kept in flight.

- ours: two ``IkeEndpoint`` (initiator, responder) in this process, one asyncio
  loop, real UDP on loopback, the process pinned to one CPU, so initiator,
  responder and driver share that core.
- charon: two charon 5.9.8 (kernel-libipsec) in two network namespaces joined by
  a veth, both pinned to the same one CPU; driven through vici (a minimal
  client here) from threads pinned to the other CPU, with ``reuse_ikesa = no``,
  ``unique = never`` and ``dos_protection = no`` (LAB-NOTES).

CPU time per handshake (both ends) comes from process CPU clocks; ours is split
into DH, signature and the rest (Python) with a cProfile run of the same loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import cProfile
import json
import os
import pstats
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from bench.run import Result, Unavailable
from oe_router.ike.auth import OUR_HASH_ALGORITHMS, signature_auth, verify_signature_auth
from oe_router.ike.constants import DhId, EncrId, IdType, PrfId
from oe_router.ike.crypto import Ecp256Exchange
from oe_router.ike.endpoint import IkeEndpoint, SaHandle
from oe_router.ike.events import ChildSaEstablished, Event, IkeSaFailed
from oe_router.ike.payloads import TrafficSelector
from oe_router.ike.sa import EspProposalSpec, IkeProposalSpec, IkeSaConfig

WINDOW = 20
SECONDS = 6.0
WARMUP = 1.0
PROFILE_HANDSHAKES = 150
IKE_SPEC = IkeProposalSpec(EncrId.AES_GCM_16, 256, PrfId.HMAC_SHA2_256, None, (DhId.ECP_256,))
ESP_SPEC = EspProposalSpec(EncrId.AES_GCM_16, 256, None)


def _cpus() -> tuple[int, int]:
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise Unavailable("needs two CPUs (one for the peers, one for the charon driver)")
    return cpus[0], cpus[1]


# --------------------------------------------------------------------------- ours


@dataclass
class _Ours:
    ini: IkeEndpoint
    res: IkeEndpoint
    ini_cfg: IkeSaConfig
    done: int = 0
    failed: int = 0
    stop_at: float = 0.0
    finished: asyncio.Event | None = None


def _ts() -> tuple[TrafficSelector, ...]:
    import ipaddress

    lo = ipaddress.ip_address("127.0.0.1")
    return (TrafficSelector.from_range(lo, lo),)


async def _ours_run(seconds: float, profile: cProfile.Profile | None = None) -> dict[str, float]:
    ka, kb = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    state: _Ours | None = None

    def on_ini(h: SaHandle, ev: Event) -> None:
        assert state is not None
        if isinstance(ev, ChildSaEstablished | IkeSaFailed):
            if isinstance(ev, ChildSaEstablished):
                state.done += 1
            else:
                state.failed += 1
            state.ini.forget(h)
            if time.monotonic() < state.stop_at:
                state.ini.initiate(state.ini_cfg, remote_natt_port=state.res.natt_port)
            elif not state.ini.handles() and state.finished is not None:
                state.finished.set()

    def on_res(h: SaHandle, ev: Event) -> None:
        assert state is not None
        if isinstance(ev, ChildSaEstablished | IkeSaFailed):
            state.res.forget(h)

    ini = IkeEndpoint(["127.0.0.1"], on_event=on_ini, clock=time.monotonic, ike_port=0,
                      natt_port=0)  # fmt: skip
    res_holder: list[IkeEndpoint] = []

    def policy(local: tuple[str, int], remote: tuple[str, int]) -> IkeSaConfig:
        return IkeSaConfig(local, remote, _ts(), _ts(), ike_proposals=(IKE_SPEC,),
                           esp_proposals=(ESP_SPEC,), local_id=(IdType.ID_FQDN, b"b.example"),
                           private_key=kb, peer_public_key=ka.public_key())  # fmt: skip

    res = IkeEndpoint(["127.0.0.1"], on_event=on_res, responder_policy=policy,
                      clock=time.monotonic, ike_port=0, natt_port=0,
                      half_open_limit=10 * WINDOW, cookie_threshold=10 * WINDOW)  # fmt: skip
    res_holder.append(res)
    await ini.start()
    await res.start()
    cfg = IkeSaConfig(("127.0.0.1", ini.ike_port), ("127.0.0.1", res.ike_port), _ts(), _ts(),
                      ike_proposals=(IKE_SPEC,), esp_proposals=(ESP_SPEC,),
                      local_id=(IdType.ID_FQDN, b"a.example"), private_key=ka,
                      peer_public_key=kb.public_key())  # fmt: skip
    state = _Ours(ini, res, cfg, finished=asyncio.Event())
    try:
        # warm-up, then the measured window
        for phase in ("warmup", "run"):
            length = WARMUP if phase == "warmup" else seconds
            state.done = state.failed = 0
            state.finished = asyncio.Event()
            state.stop_at = time.monotonic() + length
            if profile is not None and phase == "run":
                profile.enable()
            t0, c0 = time.monotonic(), time.process_time()
            for _ in range(WINDOW):
                ini.initiate(cfg, remote_natt_port=res.natt_port)
            async with asyncio.timeout(length + 30):
                await state.finished.wait()
            wall, cpu = time.monotonic() - t0, time.process_time() - c0
            if profile is not None and phase == "run":
                profile.disable()
        return {"done": state.done, "failed": state.failed, "wall": wall, "cpu": cpu}
    finally:
        await ini.stop()
        await res.stop()


def _ours(cpu: int) -> dict[str, float]:
    old = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        return asyncio.run(_ours_run(SECONDS))
    finally:
        os.sched_setaffinity(0, old)


def _primitives(cpu: int, n: int = 300) -> dict[str, float]:
    """CPU ms per handshake (both ends) of exactly the handshake's DH and signature work.

    A handshake does, summed over both ends: two group-19 key generations with
    their public values and two ECDH computations; two RFC 7427 ECDSA P-256
    signatures over ~300-byte <SignedOctets> and two verifications. The same
    library calls the SA core makes are timed here in a loop; Python overhead is
    the rest of the measured CPU time per handshake.
    """
    old = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        c0 = time.process_time()
        for _ in range(n):
            a, b = Ecp256Exchange.generate(), Ecp256Exchange.generate()
            pa, pb = a.public_bytes, b.public_bytes
            a.shared_secret(pb)
            b.shared_secret(pa)
        dh = (time.process_time() - c0) / n
        ka, kb = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
        octets = os.urandom(300)
        hashes = list(OUR_HASH_ALGORITHMS)
        c0 = time.process_time()
        for _ in range(n):
            for k in (ka, kb):
                auth = signature_auth(k, octets, hashes)
                verify_signature_auth(auth, k.public_key(), octets)
        sig = (time.process_time() - c0) / n
    finally:
        os.sched_setaffinity(0, old)
    return {"dh_ms": 1000 * dh, "sig_ms": 1000 * sig}


def _profile_top(cpu: int) -> list[str]:
    """The functions with the most own time in a profiled run (where Python time goes)."""
    old = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    prof = cProfile.Profile()
    try:
        asyncio.run(_ours_run(PROFILE_HANDSHAKES / 300.0, prof))
    finally:
        os.sched_setaffinity(0, old)
    stats: dict[Any, Any] = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    total = sum(v[2] for v in stats.values()) or 1.0
    top = sorted(stats.items(), key=lambda kv: -kv[1][2])[:8]
    return [f"{Path(k[0]).name}:{k[2]} {100 * v[2] / total:.1f}%" for k, v in top]


# --------------------------------------------------------------------------- charon


class Vici:
    """Just enough of the vici protocol (strongSwan's libvici wire format) to initiate."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)

    @staticmethod
    def _kv(key: str, value: str) -> bytes:
        k, v = key.encode(), value.encode()
        return b"\x03" + bytes([len(k)]) + k + struct.pack(">H", len(v)) + v

    def request(self, cmd: str, **kv: str) -> bytes:
        name = cmd.encode()
        body = b"\x00" + bytes([len(name)]) + name + b"".join(self._kv(k, v) for k, v in kv.items())
        self.sock.sendall(struct.pack(">I", len(body)) + body)
        while True:
            head = self._read(4)
            pkt = self._read(struct.unpack(">I", head)[0])
            if pkt[0] == 1:  # CMD_RESPONSE
                return pkt[1:]
            if pkt[0] == 2:
                raise RuntimeError(f"vici: unknown command {cmd}")

    def _read(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise RuntimeError("vici: connection closed")
            buf += chunk
        return buf

    def close(self) -> None:
        self.sock.close()


def _cpu_of(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _charon(peer_cpu: int, driver_cpu: int) -> dict[str, float]:
    try:
        from tests.host.charon import Charon, Netns, available
    except ImportError as exc:
        raise Unavailable(f"tests.host.charon not importable: {exc}") from None
    why = available()
    if why is not None:
        raise Unavailable(f"charon baseline: {why}")
    ka, kb = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())

    def pem(k: ec.EllipticCurvePrivateKey) -> tuple[bytes, bytes]:
        return (
            k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()),
            k.public_key().public_bytes(serialization.Encoding.PEM,
                                        serialization.PublicFormat.SubjectPublicKeyInfo),
        )  # fmt: skip

    (a_priv, a_pub), (b_priv, b_pub) = pem(ka), pem(kb)
    conn = """
  bench {{
    version = 2
    local_addrs = {local}
    remote_addrs = {remote}
    proposals = aes256gcm16-prfsha256-ecp256
    unique = never
    mobike = no
    local {{ auth = pubkey
      pubkeys = {me}.pem
      id = {me}.example }}
    remote {{ auth = pubkey
      pubkeys = {peer}.pem
      id = {peer}.example }}
    children {{ c {{ local_ts = dynamic
      remote_ts = dynamic
      esp_proposals = aes256gcm16
      mode = tunnel }} }}
  }}"""
    # vici's initiate blocks one charon worker thread until the SA is up: with the
    # default 16 threads, WINDOW blocked initiates starve packet processing.
    extra = (
        f"reuse_ikesa = no\n  dos_protection = no\n  init_limit_half_open = 0\n"
        f"  threads = {2 * WINDOW + 16}"
    )
    quiet = "default = -1"
    net = Netns("b")
    charons: list[Any] = []
    with tempfile.TemporaryDirectory() as tmp:
        try:
            na, nb = net.add("a"), net.add("b")
            net.link(na, "10.0.9.1/24", nb, "10.0.9.2/24")
            keys = {"a.pem": a_pub, "b.pem": b_pub}
            ca = Charon(na, Path(tmp) / "a", conn.format(local="10.0.9.1", remote="10.0.9.2",
                        me="a", peer="b"), keys, {"a.pem": a_priv}, extra, quiet)  # fmt: skip
            cb = Charon(nb, Path(tmp) / "b", conn.format(local="10.0.9.2", remote="10.0.9.1",
                        me="b", peer="a"), keys, {"b.pem": b_priv}, extra, quiet)  # fmt: skip
            for c in (ca, cb):
                c.start()
                charons.append(c)
                assert c.proc is not None
                os.sched_setaffinity(c.proc.pid, {peer_cpu})
                for tid in os.listdir(f"/proc/{c.proc.pid}/task"):
                    with contextlib.suppress(OSError):
                        os.sched_setaffinity(int(tid), {peer_cpu})
            vici_path = str(Path(tmp) / "a" / "charon.vici")
            counts = {"done": 0, "failed": 0}
            lock = threading.Lock()
            stop = threading.Event()

            def worker() -> None:
                os.sched_setaffinity(0, {driver_cpu})
                v = Vici(vici_path)
                try:
                    while not stop.is_set():
                        reply = v.request("initiate", child="c", timeout="10000")
                        ok = b"\x07success\x00\x03yes" in reply
                        with lock:
                            counts["done" if ok else "failed"] += 1
                finally:
                    v.close()

            def run(seconds: float) -> dict[str, float]:
                counts["done"] = counts["failed"] = 0
                stop.clear()
                pids = [c.proc.pid for c in charons]
                c0 = sum(_cpu_of(p) for p in pids)
                t0 = time.monotonic()
                threads = [threading.Thread(target=worker) for _ in range(WINDOW)]
                for t in threads:
                    t.start()
                time.sleep(seconds)
                stop.set()
                for t in threads:
                    t.join(30)
                wall = time.monotonic() - t0
                return {**counts, "wall": wall, "cpu": sum(_cpu_of(p) for p in pids) - c0}

            run(WARMUP)
            return run(SECONDS)
        finally:
            for c in charons:
                c.stop()
            net.close()


# --------------------------------------------------------------------------- reference


REF_ENV = "OE_BENCH_IKE_REF"
REF_ROUNDS = 3


def _reference_tree(ref: str, dest: Path) -> str:
    """Unpack ``ref``'s src/ and bench/ into ``dest``; return the commit it names.

    A refactor of the IKE core must not cost handshake rate; comparing against a number
    saved from another day measures the machine, not the change, so the reference runs
    here, in this run, from its own sources (``git archive``, no worktree left behind).
    """
    repo = Path(__file__).resolve().parent.parent
    try:
        git = ["git", "-C", str(repo)]
        rev = [*git, "rev-parse", "--verify", f"{ref}^{{commit}}"]
        commit = subprocess.run(rev, check=True, capture_output=True, text=True).stdout.strip()
        archive = subprocess.run([*git, "archive", commit, "src", "bench"],
                                 check=True, capture_output=True).stdout  # fmt: skip
    except (OSError, subprocess.CalledProcessError) as exc:
        raise Unavailable(f"reference {ref!r} for the same-run IKE comparison: {exc}") from exc
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return commit


def _reference_ours(tree: Path, cpu: int) -> dict[str, float]:
    """Our handshake loop at the reference revision, in a child process on its own sources."""
    code = f"import json, sys; from bench.bench_ike import _ours; print(json.dumps(_ours({cpu})))"
    env = {**os.environ, "PYTHONPATH": f"{tree / 'src'}:{tree}"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tree, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    if proc.returncode != 0:
        raise Unavailable(f"reference run failed: {proc.stderr.strip().splitlines()[-1:]}")
    result: dict[str, float] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def _versus_reference(cpu: int, head_rate: float) -> Result:
    """Handshake rate at HEAD vs at ``$OE_BENCH_IKE_REF`` (default HEAD~1), interleaved."""
    ref = os.environ.get(REF_ENV, "HEAD~1")
    head_rates, ref_rates = [head_rate], []
    with tempfile.TemporaryDirectory(prefix="oe-bench-ref-") as tmp:
        commit = _reference_tree(ref, Path(tmp))
        for i in range(REF_ROUNDS):
            r = _reference_ours(Path(tmp), cpu)
            if r["failed"] or not r["done"]:
                raise Unavailable(f"reference handshakes failed: {r}")
            ref_rates.append(r["done"] / r["wall"])
            if i < REF_ROUNDS - 1:
                h = _ours(cpu)
                head_rates.append(h["done"] / h["wall"])
    ours_med, ref_med = statistics.median(head_rates), statistics.median(ref_rates)
    return Result(
        name="ike_sa_per_s_vs_reference",
        unit="IKE SAs/s (median of interleaved runs)",
        ours=round(ours_med, 1),
        baseline=round(ref_med, 1),
        baseline_name=f"ours at {ref} ({commit[:12]}), same run, same CPU",
        goal=">= 0.9 x the reference (a refactor costs at most 10 %)",
        extra={
            "reference": commit,
            "ours_runs": [round(x, 1) for x in head_rates],
            "reference_runs": [round(x, 1) for x in ref_rates],
            "seconds_per_run": SECONDS,
        },
    )


# --------------------------------------------------------------------------- entry


def run() -> list[Result]:
    peer_cpu, driver_cpu = _cpus()
    ours = _ours(peer_cpu)
    versus = _versus_reference(peer_cpu, ours["done"] / ours["wall"])
    theirs = _charon(peer_cpu, driver_cpu)
    prim = _primitives(peer_cpu)
    top = _profile_top(peer_cpu)
    if ours["failed"] or not ours["done"]:
        raise Unavailable(f"our handshakes failed: {ours}")
    if not theirs["done"]:
        raise Unavailable(f"charon handshakes all failed: {theirs}")
    ours_rate = ours["done"] / ours["wall"]
    theirs_rate = theirs["done"] / theirs["wall"]
    ours_ms = 1000 * ours["cpu"] / ours["done"]
    theirs_ms = 1000 * theirs["cpu"] / theirs["done"]
    dh_ms, sig_ms = prim["dh_ms"], prim["sig_ms"]
    return [
        Result(
            name="ike_sa_per_s_one_core",
            unit="IKE SAs/s",
            ours=round(ours_rate, 1),
            baseline=round(theirs_rate, 1),
            baseline_name="charon<->charon 5.9.8 (kernel-libipsec), both on one CPU",
            goal=">= 0.5 x charon",
            extra={
                "auth": "ECDSA P-256 both ways, DH group 19, AES_GCM_16_256/PRF_HMAC_SHA2_256",
                "in_flight": WINDOW,
                "seconds": SECONDS,
                "ours_handshakes": ours["done"],
                "charon_handshakes": theirs["done"],
                "charon_failed": theirs["failed"],
                "ours_cpu_ms_per_handshake": round(ours_ms, 3),
                "charon_cpu_ms_per_handshake": round(theirs_ms, 3),
                "ours_dh_ms": round(dh_ms, 3),
                "ours_signature_ms": round(sig_ms, 3),
                "ours_python_overhead_ms": round(ours_ms - dh_ms - sig_ms, 3),
                "breakdown_from": "DH and signature calls timed alone; overhead = the rest",
                "ours_profile_top_own_time": top,
                "note": "charon installs each Child SA into kernel-libipsec; ours hands it "
                "to no datapath (the sink is not part of the handshake)",
            },
        ),
        versus,
    ]


if __name__ == "__main__":
    for r in run():
        print(r.to_json())
