"""IKE SAs per second with both sides installing what they negotiate: ours vs charon, same run.

``ike_sa_per_s_one_core`` (bench_ike.py) compares our handshakes, which hand their
Child SAs to nobody, with charon's, which install each one into kernel-libipsec: an
unfair 2.2x. Here both sides install. Each Child SA of ours goes through the real
datapath's ``install_child_sa`` on both ends (initiator and responder), the way the
daemon does it (``oe/sa_spec.child_sa_spec`` -> ``Datapath.install_child_sa``), and a
handshake counts once the initiator's install is through, as charon's vici ``initiate``
returns once its CHILD_SA is installed. The run's wall time also waits for the
responder's last installs.

Which datapath, and why the userspace one: kernel XFRM in a netns would be the closest
match, but this host's kernel has no ESP (``ip xfrm state add ... proto esp`` fails with
"Requested type not found"/"AEAD algorithm not found"; only policies are accepted), so
nothing real could be installed there, and the QEMU router is not ours to use in a
bench run. The userspace datapath (``datapath/userspace.py``) is the exact counterpart
of charon's kernel-libipsec: both keep the ESP SAs in userspace (ours in two worker
processes, which acknowledge each install), route the peer into a TUN device and keep
their own SPD; ours also projects the SPD into nftables as the daemon does.

Same shape as charon's side of bench_ike: two network namespaces joined by a veth and
one process per end in its namespace (``_Side``: its IKE endpoint and its datapath, as
a daemon runs; inside the namespace its nft runs need no ``ip netns exec``), IKE from
one to the other, ESP in UDP (``force_udp_encap``, as kernel-libipsec needs),
identical host-to-host selectors for every Child SA (so both stacks find the policies
in place after the first one and refresh them), nothing deleted during a phase
(charon deletes nothing either; ours are removed between phases, untimed, because the
userspace SA table holds 1,023 Child SAs). Pinning as for charon: both ends, their
datapath workers and their nft runs on one CPU, as charon's two daemons share one
CPU; this process only drives them from the other CPU, as charon's vici driver does.
CPU time per handshake (both ends, workers and nft included) is reported beside the
rate, because it depends much less than the rate on what else the machine runs.

The same run also measures today's unfair pair (bench_ike's ``_ours`` loop on
loopback, installing nothing, against the same charon figure), so the report shows the
fair ratio next to the unfair one; and a control run of the same two processes with
their datapaths and sockets that installs nothing (``control_no_install_*``): the
installing run's CPU minus the control's is what the install itself costs. The four
measurements are interleaved for ``ROUNDS`` rounds and the medians count (the 2 cores
are shared with other work, and a burst of it should not land on one side only); a
cProfile of a short installing phase in the first round, in CPU time, says where our
install time goes
(``install_profile_top``; nft and the workers are in ``ours_cpu_split_ms``).
"""

from __future__ import annotations

import asyncio
import contextlib
import cProfile
import ipaddress
import json
import os
import pstats
import select
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from bench.bench_ike import ESP_SPEC, IKE_SPEC, SECONDS, WARMUP, WINDOW, _charon, _cpu_of, _cpus
from bench.bench_ike import _ours as _ours_plain
from bench.run import Result, Unavailable
from oe_router.ike.constants import IdType
from oe_router.ike.endpoint import IkeEndpoint, SaHandle
from oe_router.ike.events import ChildSaEstablished, Event, IkeSaFailed
from oe_router.ike.payloads import TrafficSelector
from oe_router.ike.sa import IkeSaConfig

A, B = "10.0.19.1", "10.0.19.2"
PROFILE_SECONDS = 2.0
#: handshakes a phase starts at most: room in the userspace SA table (1,023 Child SAs)
PHASE_LIMIT = 1000
ROUNDS = 3
BASELINE_NAME = "charon<->charon 5.9.8 (kernel-libipsec, installing each Child SA), one CPU"


# --------------------------------------------------------------------------- bookkeeping


@dataclass
class Tally:
    """What one phase of the installing run counted (sans-IO, so it can be unit-tested).

    ``done``: handshakes whose initiator-side install went through (one IKE SA each);
    the responder's installs are counted apart and must keep up: the phase ends only
    when none is pending, so a lagging responder costs wall time, as it costs charon.
    """

    stop_at: float
    #: most handshakes a phase starts (0: no cap): the userspace SA table holds 1,023
    #: Child SAs, which a fast enough phase would otherwise fill before ``stop_at``
    limit: int = 0
    started: int = 0
    done: int = 0
    failed: int = 0
    responder_installed: int = 0
    responder_failed: int = 0
    pending_initiator: int = 0
    pending_responder: int = 0
    last_done: float = 0.0  # clock of the last install through (the end of the phase)
    install_ms: dict[str, list[float]] = field(default_factory=lambda: {"ini": [], "res": []})

    def child_up(self, side: str) -> None:
        if side == "ini":
            self.pending_initiator += 1
        else:
            self.pending_responder += 1

    def installed(self, side: str, ok: bool, ms: float, now: float) -> None:
        self.last_done = max(self.last_done, now)
        if side == "ini":
            self.pending_initiator -= 1
            if ok:
                self.done += 1
            else:
                self.failed += 1
        else:
            self.pending_responder -= 1
            if ok:
                self.responder_installed += 1
            else:
                self.responder_failed += 1
        if ok:
            self.install_ms[side].append(ms)

    def handshake_failed(self) -> None:
        self.failed += 1

    def start_another(self, now: float) -> bool:
        """A slot of the window came free: start a new handshake only before the end
        (and below the cap); counts the one it allows."""
        if now >= self.stop_at or (self.limit and self.started >= self.limit):
            return False
        self.started += 1
        return True

    def finished(self, in_flight: int) -> bool:
        """Over once nothing is negotiating or installing on either side."""
        return in_flight == 0 and self.pending_initiator == 0 and self.pending_responder == 0

    def medians(self) -> dict[str, float]:
        return {
            f"{side}_install_ms_median": round(statistics.median(v), 3) if v else float("nan")
            for side, v in self.install_ms.items()
        }


def _rate(r: Mapping[str, Any]) -> float:
    return float(r["done"]) / float(r["wall"])


def _cpu_ms(rounds: Sequence[Mapping[str, Any]]) -> float:
    """CPU ms per handshake over all rounds (both ends)."""
    return 1000 * sum(r["cpu"] for r in rounds) / sum(r["done"] for r in rounds)


def fair_result(
    installing: Sequence[Mapping[str, Any]],
    plain: Sequence[Mapping[str, Any]],
    charon: Sequence[Mapping[str, Any]],
    load: tuple[float, ...] = (),
) -> Result:
    """The fair comparison (medians of the interleaved rounds), with the same rounds'
    unfair ratio beside it."""
    ours_rate = statistics.median(_rate(r) for r in installing)
    plain_rate = statistics.median(_rate(r) for r in plain)
    charon_rate = statistics.median(_rate(r) for r in charon)
    done = sum(r["done"] for r in installing)
    split = {k: sum(r["cpu_split"][k] for r in installing) for k in installing[0]["cpu_split"]}
    profiled = next((r for r in installing if r.get("profile")), {})
    extra: dict[str, Any] = {
        "unfair_ratio_same_run": round(plain_rate / charon_rate, 4),
        "unfair_ours_not_installing": round(plain_rate, 1),
        "rounds": len(installing),
        "ours_runs": [round(_rate(r), 1) for r in installing],
        "charon_runs": [round(_rate(r), 1) for r in charon],
        "unfair_ours_runs": [round(_rate(r), 1) for r in plain],
        "datapath": "userspace-esp (SaTable + 2 worker processes, TUN routes, SPD + nft "
        "projection); kernel XFRM has no ESP on this host",
        "auth": "ECDSA P-256 both ways, DH group 19, AES_GCM_16_256/PRF_HMAC_SHA2_256",
        "in_flight": WINDOW,
        "seconds_per_run": SECONDS,
        "ours_handshakes": done,
        "ours_failed": sum(r["failed"] for r in installing),
        "ours_responder_installs": sum(r["responder_installed"] for r in installing),
        "ours_responder_install_failures": sum(r["responder_failed"] for r in installing),
        "charon_handshakes": sum(r["done"] for r in charon),
        "charon_failed": sum(r["failed"] for r in charon),
        # CPU per handshake depends less than the rates on what else the machine runs
        "ours_cpu_ms_per_handshake": round(_cpu_ms(installing), 3),
        "ours_cpu_split_ms": {k: round(1000 * v / done, 3) for k, v in split.items()},
        "charon_cpu_ms_per_handshake": round(_cpu_ms(charon), 3),
        "unfair_ours_cpu_ms_per_handshake": round(_cpu_ms(plain), 3),
        "cpu_ratio_same_run": round(_cpu_ms(charon) / _cpu_ms(installing), 4),
        **{
            k: round(statistics.median(r["medians"][k] for r in installing), 3)
            for k in installing[0]["medians"]
        },
        "install_profile_handshakes": profiled.get("profile_handshakes", 0),
        "install_profile_top": profiled.get("profile", []),
        "loadavg_1min_before_after": [round(x, 2) for x in load],
        "note": "both sides install every Child SA they negotiate (SAs + policies + route); "
        "nothing is deleted during a run",
    }
    return Result(
        name="ike_sa_per_s_installing",
        unit="IKE SAs/s (median of interleaved runs)",
        ours=round(ours_rate, 1),
        baseline=round(charon_rate, 1),
        baseline_name=BASELINE_NAME,
        goal=">= 1.0",
        extra=extra,
    )


def control_extra(control: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The control run: the same two processes, datapaths and sockets, nothing installed;
    the difference to the installing run is the install's own cost."""
    done = sum(r["done"] for r in control)
    split = {k: sum(r["cpu_split"][k] for r in control) for k in control[0]["cpu_split"]}
    return {
        "control_no_install_runs": [round(_rate(r), 1) for r in control],
        "control_no_install_cpu_ms_per_handshake": round(_cpu_ms(control), 3),
        "control_no_install_cpu_split_ms": {k: round(1000 * v / done, 3) for k, v in split.items()},
    }


# --------------------------------------------------------------------------- ours, installing


def _children_cpu() -> float:
    """CPU seconds of this process's live children (the datapath workers)."""
    me, total = os.getpid(), 0.0
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == me:
                total += _cpu_of(int(d.name))
    return total


def _cpu_now() -> dict[str, float]:
    t, main = os.times(), time.thread_time()  # called on the event loop's thread
    return {
        "event_loop_thread": main,
        "other_threads": time.process_time() - main,  # forking nft, the stdin reader
        "reaped_children": t.children_user + t.children_system,  # the nft runs
        "workers": _children_cpu(),
    }


def _ts(addr: str) -> tuple[TrafficSelector, ...]:
    a = ipaddress.ip_address(addr)
    return (TrafficSelector.from_range(a, a),)


def _pem_private(k: ec.EllipticCurvePrivateKey) -> str:
    fmt = serialization.PrivateFormat.PKCS8
    return k.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption()).decode()


def _pem_public(k: ec.EllipticCurvePrivateKey) -> str:
    fmt = serialization.PublicFormat.SubjectPublicKeyInfo
    return k.public_key().public_bytes(serialization.Encoding.PEM, fmt).decode()


class _Side:
    """One end (``ini`` or ``res``) in its own process, inside its own namespace, as a
    daemon runs: its IKE endpoint and its userspace datapath, installing each Child SA
    it negotiates. Driven over stdin/stdout, one JSON line per command and answer."""

    def __init__(self, args: dict[str, str]) -> None:
        self.role, self.local, self.remote = args["role"], args["local"], args["remote"]
        self.args = args
        self.tally = Tally(stop_at=0.0)
        self.finished = asyncio.Event()
        self.tasks: set[asyncio.Task[None]] = set()
        self.installed: list[Any] = []
        self.cfg: IkeSaConfig | None = None
        self.c0: dict[str, float] = {}
        self.prof: cProfile.Profile | None = None
        #: False: the control run, same processes and sockets, the Child SA handed to nobody
        self.install = args["install"] == "yes"
        self.key = serialization.load_pem_private_key(args["key"].encode(), None)
        self.peer_key = serialization.load_pem_public_key(args["peer_key"].encode())

    def _config(self, local: tuple[str, int], remote: tuple[str, int]) -> IkeSaConfig:
        key, peer = self.key, self.peer_key
        return IkeSaConfig(local, remote, _ts(self.local), _ts(self.remote),
                           ike_proposals=(IKE_SPEC,), esp_proposals=(ESP_SPEC,),
                           local_id=(IdType.ID_FQDN, f"{self.role}.example".encode()),
                           private_key=key, peer_public_key=peer,  # type: ignore[arg-type]
                           force_udp_encap=True)  # fmt: skip

    async def main(self) -> None:
        from oe_router.datapath.userspace import UserspaceDatapath

        self.dp = UserspaceDatapath(wan_ifname=self.args["wan"], keep_persistent_on_stop=False)
        await self.dp.start()
        try:
            await self.dp.release_adopted(lambda _p: True)  # the projection goes live
            res = self.role == "res"
            self.ep = IkeEndpoint([self.local], on_event=self._event, clock=time.monotonic,
                                  socket_hooks=(self.dp,),
                                  responder_policy=self._config if res else None,
                                  half_open_limit=10 * WINDOW,
                                  cookie_threshold=10 * WINDOW)  # fmt: skip
            await self.ep.start()
            try:
                self.cfg = self._config((self.local, 500), (self.remote, 500))
                await self._serve()
            finally:
                await self.ep.stop()
        finally:
            await self.dp.close()

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        lines: asyncio.Queue[str] = asyncio.Queue()

        def reader() -> None:
            for line in sys.stdin:
                loop.call_soon_threadsafe(lines.put_nowait, line)
            loop.call_soon_threadsafe(lines.put_nowait, '{"cmd": "stop"}')

        threading.Thread(target=reader, daemon=True).start()
        print(json.dumps({"ready": True}), flush=True)
        while True:
            cmd = json.loads(await lines.get())
            if cmd["cmd"] == "stop":
                return
            answer = await getattr(self, f"_cmd_{cmd['cmd']}")(cmd)
            print(json.dumps(answer), flush=True)

    async def _cmd_phase(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """Count afresh; the initiator runs the phase's handshakes and answers at its end."""
        self.tally = Tally(stop_at=time.monotonic() + float(cmd["seconds"]), limit=PHASE_LIMIT)
        self.finished.clear()
        self.c0 = _cpu_now()
        # main-thread CPU time, not wall: on one shared CPU, wall time in a send() is
        # mostly the woken worker (or another tenant) running
        self.prof = cProfile.Profile(time.thread_time) if cmd["profile"] else None
        if self.prof is not None:
            self.prof.enable()
        if self.role == "res":
            return {}
        t0 = time.monotonic()
        for _ in range(WINDOW):
            if self.tally.start_another(t0):
                self._initiate()
        async with asyncio.timeout(float(cmd["seconds"]) + 60):
            await self.finished.wait()
        return {"t0": t0, **self._summary()}

    async def _cmd_settle(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """The responder's installs of the phase are all through: its counts."""
        async with asyncio.timeout(60):
            while self.tally.pending_responder:
                await asyncio.sleep(0.005)
        return self._summary()

    async def _cmd_clear(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """Between phases, untimed: every Child SA out again, so no run fills the
        datapath's table (1,023 Child SAs)."""
        for spec in self.installed:
            await self.dp.remove_child_sa(spec)
        self.installed.clear()
        return {}

    def _summary(self) -> dict[str, Any]:
        c1 = _cpu_now()
        out: dict[str, Any] = {
            "t_end": self.tally.last_done,
            "done": self.tally.done,
            "failed": self.tally.failed,
            "responder_installed": self.tally.responder_installed,
            "responder_failed": self.tally.responder_failed,
            "cpu_split": {k: c1[k] - self.c0[k] for k in c1},
            "medians": self.tally.medians(),
        }
        if self.prof is not None:
            self.prof.disable()
            out["profile"] = _profile_top(self.prof)
            self.prof = None
        return out

    def _initiate(self) -> None:
        assert self.cfg is not None
        self.ep.initiate(self.cfg)

    def _event(self, h: SaHandle, ev: Event) -> None:
        from oe_router.oe.sa_spec import child_sa_spec

        if isinstance(ev, ChildSaEstablished):
            spec = child_sa_spec(ev, self.local, self.remote, local_natt_port=self.ep.natt_port)
            self.tally.child_up(self.role)
            self.ep.forget(h)
            task = asyncio.get_running_loop().create_task(self._install(spec))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        elif isinstance(ev, IkeSaFailed):
            self.ep.forget(h)
            if self.role == "ini":
                self.tally.handshake_failed()
                self._next()

    async def _install(self, spec: Any) -> None:
        from oe_router.datapath.base import DatapathError

        t0 = time.perf_counter()
        ok = True
        try:
            if self.install:
                self.installed.append(await self.dp.install_child_sa(spec))
        except DatapathError as exc:
            print(f"install failed: {exc}", file=sys.stderr)
            ok = False
        self.tally.installed(self.role, ok, 1000 * (time.perf_counter() - t0), time.monotonic())
        if self.role == "ini":
            self._next()

    def _next(self) -> None:
        if self.tally.start_another(time.monotonic()):
            self._initiate()
        elif self.tally.finished(len(self.ep.handles())):
            self.finished.set()


def _profile_top(prof: cProfile.Profile, n: int = 12) -> list[str]:
    """Own CPU time of the busiest functions, and the cumulative CPU of the install path
    (the event loop's thread only: nft runs and the workers are in ``ours_cpu_split_ms``)."""
    stats: dict[Any, Any] = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    total = sum(v[2] for v in stats.values()) or 1.0
    top = sorted(stats.items(), key=lambda kv: -kv[1][2])[:n]
    lines = [f"own {Path(k[0]).name}:{k[2]} {100 * v[2] / total:.1f}%" for k, v in top]
    lines.append(f"profiled main-thread CPU {1000 * total:.0f} ms")
    for k, v in stats.items():
        if k[2] in INSTALL_PATH and "datapath" in k[0]:
            lines.append(f"cum {Path(k[0]).name}:{k[2]} {v[1]} calls {1000 * v[3]:.1f} ms")
    return lines


INSTALL_PATH = frozenset({"install_child_sa", "install", "project", "run_nft", "route_ref"})


class _Driver:
    """The parent's handle on one side's process (JSON lines, with a deadline)."""

    def __init__(self, ns: str, args: dict[str, str], log: Path) -> None:
        self.log = log
        repo = Path(__file__).resolve().parent.parent
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-m", "bench.bench_ike_installing",
             "side", json.dumps(args)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log.open("w"), text=True,
            cwd=repo,
        )  # fmt: skip
        self._answer(60)

    def _answer(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            tail = self.log.read_text().strip().splitlines()[-3:]
            raise Unavailable(f"our bench side stopped answering: {tail}")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def ask(self, cmd: str, timeout: float = 120, **kw: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"cmd": cmd, **kw}) + "\n")
        self.proc.stdin.flush()
        return self._answer(timeout)

    def stop(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            assert self.proc.stdin is not None
            self.proc.stdin.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _ours_installing(
    cpu: int, driver_cpu: int, *, profile: bool = False, install: bool = True
) -> dict[str, Any]:
    """Both ends as two processes in two namespaces on one CPU (as charon's two daemons);
    this process only drives them, from the other CPU (as charon's vici driver)."""
    try:
        from tests.host.charon import Netns
        from tests.host.oe_daemon import device_with
    except ImportError as exc:
        raise Unavailable(f"tests.host helpers not importable: {exc}") from None
    if os.geteuid() != 0:
        raise Unavailable("needs root (network namespaces, TUN, nftables)")
    ka, kb = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    old = os.sched_getaffinity(0)
    net = Netns("f")
    sides: list[_Driver] = []
    with tempfile.TemporaryDirectory(prefix="oe-bench-install-") as tmp:
        try:
            na, nb = net.add("a"), net.add("b")
            net.link(na, f"{A}/24", nb, f"{B}/24")
            os.sched_setaffinity(0, {cpu})  # the sides and their workers inherit it
            common = {"key": "", "peer_key": "", "install": "yes" if install else "no"}
            res = _Driver(nb, {**common, "role": "res", "local": B, "remote": A,
                               "wan": device_with(nb, B), "key": _pem_private(kb),
                               "peer_key": _pem_public(ka)}, Path(tmp) / "res.log")  # fmt: skip
            sides.append(res)
            ini = _Driver(na, {**common, "role": "ini", "local": A, "remote": B,
                               "wan": device_with(na, A), "key": _pem_private(ka),
                               "peer_key": _pem_public(kb)}, Path(tmp) / "ini.log")  # fmt: skip
            sides.append(ini)
            os.sched_setaffinity(0, {driver_cpu})
            out: dict[str, Any] = {}
            phases = [("warmup", WARMUP), ("run", SECONDS)]
            if profile:
                phases.append(("profile", PROFILE_SECONDS))
            for phase, length in phases:
                profile = phase == "profile"
                res.ask("phase", seconds=length, profile=profile)
                i = ini.ask("phase", seconds=length, profile=profile)
                r = res.ask("settle")
                ini.ask("clear")
                res.ask("clear")
                if profile:
                    out["profile_handshakes"] = i["done"]
                    out["profile"] = [f"ini {x}" for x in i.get("profile", [])] + [
                        f"res {x}" for x in r.get("profile", [])
                    ]
                if phase != "run":
                    continue
                split = {k: i["cpu_split"][k] + r["cpu_split"][k] for k in i["cpu_split"]}
                out.update(
                    done=i["done"], failed=i["failed"],
                    wall=max(i["t_end"], r["t_end"]) - i["t0"],
                    responder_installed=r["responder_installed"],
                    responder_failed=r["responder_failed"],
                    cpu=sum(split.values()), cpu_split=split,
                    medians={"ini_install_ms_median": i["medians"]["ini_install_ms_median"],
                             "res_install_ms_median": r["medians"]["res_install_ms_median"]},
                )  # fmt: skip
            return out
        finally:
            for side in reversed(sides):
                side.stop()
            os.sched_setaffinity(0, old)
            net.close()


def _side_main(raw: str) -> None:
    asyncio.run(_Side(json.loads(raw)).main())


# --------------------------------------------------------------------------- entry


def run() -> list[Result]:
    peer_cpu, driver_cpu = _cpus()
    load_before = os.getloadavg()[0]
    plain, installing, theirs, control = [], [], [], []
    for i in range(ROUNDS):  # interleaved: a burst of the shared machine's load hits all
        plain.append(_ours_plain(peer_cpu))
        installing.append(_ours_installing(peer_cpu, driver_cpu, profile=i == 0))
        control.append(_ours_installing(peer_cpu, driver_cpu, install=False))
        theirs.append(_charon(peer_cpu, driver_cpu))
        if installing[-1]["failed"] or installing[-1]["responder_failed"]:
            raise Unavailable(f"our installing handshakes failed: {installing[-1]}")
        if plain[-1]["failed"] or not plain[-1]["done"] or not installing[-1]["done"]:
            raise Unavailable(f"our handshakes failed: {plain[-1]}, {installing[-1]}")
        if not theirs[-1]["done"]:
            raise Unavailable(f"charon handshakes all failed: {theirs[-1]}")
    result = fair_result(installing, plain, theirs, (load_before, os.getloadavg()[0]))
    result.extra.update(control_extra(control))
    return [result]


if __name__ == "__main__":
    if sys.argv[1:2] == ["side"]:
        _side_main(sys.argv[2])
    else:
        for r in run():
            print(r.to_json())
