"""COOKIE demands per second on one core, and a handshake's time under a COOKIE flood.

RFC 8019: a responder under a flood of IKE_SA_INIT requests from spoofed addresses
answers each with a COOKIE demand, so an answer must cost far less than the request.

- cookie_replies_per_s_one_core: a responder ``IkeEndpoint`` (real UDP on loopback,
  COOKIEs demanded from the first request: ``cookie_threshold`` 0) in its own process
  pinned to one CPU; a flooder process pinned to the other CPU sends it new
  IKE_SA_INIT requests (a new SPIi each, no cookie) as fast as it can. Ours: COOKIE
  demands per CPU-second of the responder (its counter over its own CPU time, system
  calls included): what one core answers. Per CPU-second, not per wall second, because
  the CI box is shared: a process there may get a third of a CPU (``responder_busy``
  and ``responder_waiting_for_cpu`` in the result say what it got; the wall-clock rates
  are recorded too). Baseline, same harness and run: the same endpoint as of commit
  ``BASELINE_COMMIT`` (main before the fast path: every request went through the
  generic codec, ``Message.decode`` and ``Message.encode``), extracted with ``git
  archive`` and run from a temporary directory.
- ike_handshake_ms_under_cookie_flood: the same current responder while the flooder
  sends ``FLOOD_PPS`` requests per second (the goal rate), and a legitimate initiator
  (an ``IkeEndpoint`` in this process, on the flooder's CPU) running one handshake at a
  time: IKE_SA_INIT, its COOKIE round trip, IKE_AUTH with the first Child SA. Ours: the
  median handshake under the flood; baseline: the median with no flood, same run.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from bench.run import Result, Unavailable
from oe_router.ike.endpoint import IkeEndpoint, SaHandle
from oe_router.ike.events import ChildSaEstablished, Event, IkeSaFailed
from oe_router.ike.payloads import TrafficSelector
from oe_router.ike.sa import IkeSa, IkeSaConfig

ROOT = Path(__file__).resolve().parent.parent
#: main before the COOKIE fast path and the per-source half-open accounting
BASELINE_COMMIT = "a17748e"
FLOOD_PPS = 20_000
GOAL = 20_000
WARMUP = 1.5
WINDOW = 5.0
HANDSHAKES = 12

#: The responder: an IkeEndpoint on 127.0.0.1 demanding COOKIEs from the first request,
#: pinned to the CPU in argv[1]. Prints its ports, then answers "stats" lines on stdin.
#: Uses only the endpoint API both the baseline commit and the current code have.
RESPONDER = r"""
import asyncio, ipaddress, json, logging, os, sys, time
os.sched_setaffinity(0, {int(sys.argv[1])})
logging.getLogger("oe_router").setLevel(logging.ERROR)  # its "under load" lines
import oe_router
from oe_router.ike.endpoint import IkeEndpoint
from oe_router.ike.payloads import TrafficSelector
from oe_router.ike.sa import IkeSaConfig

def ts(a):
    ip = ipaddress.ip_address(a[0])
    return (TrafficSelector.from_range(ip, ip),)

async def main():
    ep = IkeEndpoint(["127.0.0.1"], on_event=lambda h, e: None,
                     responder_policy=lambda l, r: IkeSaConfig(l, r, ts(l), ts(r)),
                     clock=time.monotonic, ike_port=0, natt_port=0,
                     half_open_limit=1000, cookie_threshold=0)
    await ep.start()
    print(json.dumps({"port": ep.ike_port, "natt_port": ep.natt_port,
                      "module": oe_router.__file__}), flush=True)
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def command():
        line = sys.stdin.readline().strip()
        if line == "stats":
            c = ep.counters
            run_ns, wait_ns, _ = open("/proc/self/schedstat").read().split()
            print(json.dumps({"cookies": c.cookies_sent, "received": c.received,
                              "cpu": time.process_time(), "t": time.monotonic(),
                              "wait": int(wait_ns) / 1e9}), flush=True)
        elif not done.done():
            done.set_result(None)

    loop.add_reader(sys.stdin.fileno(), command)
    await done
    await ep.stop()

asyncio.run(main())
"""

#: The flooder: new IKE_SA_INIT requests (the template in argv[4], a new SPIi each) to
#: 127.0.0.1:argv[2] at argv[3] per second (0: as fast as it can), pinned to argv[1],
#: until stdin closes; prints how many it sent.
FLOODER = r"""
import os, select, socket, struct, sys, time
os.sched_setaffinity(0, {int(sys.argv[1])})
port, rate, buf = int(sys.argv[2]), int(sys.argv[3]), bytearray(bytes.fromhex(sys.argv[4]))
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.1", 0))
s.setblocking(False)
dest, spi, sent, burst = ("127.0.0.1", port), struct.Struct("!Q"), 0, 100
start = time.monotonic()
print("started", flush=True)
while not select.select([sys.stdin], [], [], 0)[0]:
    for _ in range(burst):
        spi.pack_into(buf, 0, (os.getpid() << 40) + sent + 1)
        try:
            s.sendto(buf, dest)
            sent += 1
        except BlockingIOError:
            pass
    try:
        while True:
            s.recv(4096)
    except BlockingIOError:
        pass
    if rate:
        ahead = start + sent / rate - time.monotonic()
        if ahead > 0:
            time.sleep(ahead)
print(sent, flush=True)
"""


def _cpus() -> tuple[int, int]:
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise Unavailable("needs two CPUs (one for the responder, one for the flooder)")
    return cpus[0], cpus[1]


def _ts(address: str) -> tuple[TrafficSelector, ...]:
    ip = ipaddress.ip_address(address)
    return (TrafficSelector.from_range(ip, ip),)


def _request_template() -> bytes:
    """A real IKE_SA_INIT request (SA, KE, Ni, NAT-D ...) from our own initiator."""
    cfg = IkeSaConfig(("127.0.0.1", 500), ("127.0.0.1", 500), _ts("127.0.0.1"), _ts("127.0.0.1"))
    (first,) = IkeSa.initiator(cfg, 0.0).datagrams_to_send()
    return first


def _baseline_tree(tmp: Path) -> Path:
    """The source tree at ``BASELINE_COMMIT``, for the baseline responder's PYTHONPATH."""
    archive = tmp / "baseline.tar"
    try:
        with archive.open("wb") as out:
            subprocess.run(
                ["git", "-C", str(ROOT), "archive", BASELINE_COMMIT, "src"],
                stdout=out, stderr=subprocess.PIPE, check=True, timeout=60,
            )  # fmt: skip
    except (OSError, subprocess.CalledProcessError) as exc:
        raise Unavailable(f"git archive {BASELINE_COMMIT} (the baseline): {exc}") from None
    with tarfile.open(archive) as tar:
        tar.extractall(tmp / "baseline", filter="data")
    return tmp / "baseline" / "src"


class _Responder:
    def __init__(self, cpu: int, pythonpath: Path | None) -> None:
        env = dict(os.environ)
        if pythonpath is not None:
            env["PYTHONPATH"] = str(pythonpath)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", RESPONDER, str(cpu)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
        )  # fmt: skip
        hello = self._line()
        self.port: int = hello["port"]
        self.natt_port: int = hello["natt_port"]
        self.module: str = hello["module"]
        want = pythonpath if pythonpath is not None else ROOT / "src"
        if not Path(self.module).resolve().is_relative_to(want.resolve()):
            self.close()
            raise Unavailable(f"responder ran {self.module}, not the code under {want}")

    def _line(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise Unavailable(f"the responder exited ({self.proc.wait(10)})")
        out: dict[str, Any] = json.loads(line)
        return out

    def stats(self) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write("stats\n")
        self.proc.stdin.flush()
        return self._line()

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@contextmanager
def _flood(cpu: int, port: int, rate: int, template: bytes) -> Iterator[list[int]]:
    """A flooder running while the block runs; the list gets the number it sent."""
    proc = subprocess.Popen(
        [sys.executable, "-c", FLOODER, str(cpu), str(port), str(rate), template.hex()],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    stdout: IO[str] | None = proc.stdout
    assert stdout is not None and proc.stdin is not None
    if stdout.readline().strip() != "started":
        raise Unavailable(f"the flooder did not start ({proc.wait(10)})")
    sent: list[int] = []
    try:
        yield sent
    finally:
        proc.stdin.close()
        line = stdout.readline().strip()
        proc.wait(10)
        sent.append(int(line) if line.isdigit() else 0)


def _replies_per_s(cpu: int, flood_cpu: int, pythonpath: Path | None) -> dict[str, Any]:
    """COOKIE demands/s of one responder flooded beyond what it can answer."""
    res = _Responder(cpu, pythonpath)
    try:
        with _flood(flood_cpu, res.port, 0, _request_template()) as sent:
            time.sleep(WARMUP)
            a = res.stats()
            time.sleep(WINDOW)
            b = res.stats()
        wall = b["t"] - a["t"]
        answered = b["cookies"] - a["cookies"]
        if answered < 1000:
            raise Unavailable(f"the responder answered only {answered} requests in {wall:.1f}s")
        return {
            "replies_per_s": answered / wall,
            "cpu_us_per_reply": 1e6 * (b["cpu"] - a["cpu"]) / answered,
            "responder_cpu_busy": (b["cpu"] - a["cpu"]) / wall,
            "received_per_s": (b["received"] - a["received"]) / wall,
            "responder_waiting_for_cpu": (b["wait"] - a["wait"]) / wall,
            "flooder_sent": sent[0] if sent else 0,
        }
    finally:
        res.close()


async def _handshakes(port: int, natt_port: int, n: int) -> list[float]:
    """``n`` handshakes (IKE SA + first Child SA) one after another; seconds each."""
    done: asyncio.Queue[Event] = asyncio.Queue()

    def on_event(h: SaHandle, ev: Event) -> None:
        if isinstance(ev, ChildSaEstablished | IkeSaFailed):
            done.put_nowait(ev)
            ini.forget(h)

    ini = IkeEndpoint(["127.0.0.1"], on_event=on_event, clock=time.monotonic, ike_port=0,
                      natt_port=0)  # fmt: skip
    await ini.start()
    times = []
    try:
        for _ in range(n):
            cfg = IkeSaConfig(
                ("127.0.0.1", ini.ike_port), ("127.0.0.1", port),
                _ts("127.0.0.1"), _ts("127.0.0.1"), retransmit_timeout=0.5, retransmit_tries=6,
            )  # fmt: skip
            t0 = time.monotonic()
            ini.initiate(cfg, remote_natt_port=natt_port)
            async with asyncio.timeout(60):
                ev = await done.get()
            if isinstance(ev, IkeSaFailed):
                raise Unavailable(f"a legitimate handshake failed: {ev.reason}")
            times.append(time.monotonic() - t0)
    finally:
        await ini.stop()
    return times


def _under_flood(cpu: int, flood_cpu: int) -> dict[str, Any]:
    res = _Responder(cpu, None)
    old = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {flood_cpu})
    try:
        quiet = asyncio.run(_handshakes(res.port, res.natt_port, HANDSHAKES))
        with _flood(flood_cpu, res.port, FLOOD_PPS, _request_template()) as sent:
            time.sleep(WARMUP)
            a = res.stats()
            flooded = asyncio.run(_handshakes(res.port, res.natt_port, HANDSHAKES))
            b = res.stats()
        wall = b["t"] - a["t"]
        return {
            "quiet_s": quiet,
            "flood_s": flooded,
            "cookies_per_s_during": (b["cookies"] - a["cookies"]) / wall,
            "responder_cpu_busy_during": (b["cpu"] - a["cpu"]) / wall,
            "responder_waiting_during": (b["wait"] - a["wait"]) / wall,
            "flooder_sent": sent[0] if sent else 0,
        }
    finally:
        os.sched_setaffinity(0, old)
        res.close()


def run() -> list[Result]:
    cpu, flood_cpu = _cpus()
    with tempfile.TemporaryDirectory(prefix="bench-cookies-") as tmp:
        old_src = _baseline_tree(Path(tmp))
        ours = _replies_per_s(cpu, flood_cpu, None)
        base = _replies_per_s(cpu, flood_cpu, old_src)
    flood = _under_flood(cpu, flood_cpu)
    quiet_ms = 1000 * statistics.median(flood["quiet_s"])
    flood_ms = 1000 * statistics.median(flood["flood_s"])
    return [
        Result(
            name="cookie_replies_per_s_one_core",
            unit="COOKIE demands per CPU-second of the responder (one core's rate)",
            ours=round(1e6 / ours["cpu_us_per_reply"]),
            baseline=round(1e6 / base["cpu_us_per_reply"]),
            baseline_name=f"the same endpoint at {BASELINE_COMMIT} (full decode), same run",
            goal=f">= {GOAL} replies/s",
            extra={
                "ours_cpu_us_per_reply": round(ours["cpu_us_per_reply"], 2),
                "baseline_cpu_us_per_reply": round(base["cpu_us_per_reply"], 2),
                "ours_wall_replies_per_s": round(ours["replies_per_s"]),
                "baseline_wall_replies_per_s": round(base["replies_per_s"]),
                "ours_responder_busy": round(ours["responder_cpu_busy"], 3),
                "baseline_responder_busy": round(base["responder_cpu_busy"], 3),
                "ours_responder_waiting_for_cpu": round(ours["responder_waiting_for_cpu"], 3),
                "baseline_responder_waiting_for_cpu": round(base["responder_waiting_for_cpu"], 3),
                "flooder_sent_ours": ours["flooder_sent"],
                "flooder_sent_baseline": base["flooder_sent"],
                "window_s": WINDOW,
                "goal_met": 1e6 / ours["cpu_us_per_reply"] >= GOAL,
            },
        ),
        Result(
            name="ike_handshake_ms_under_cookie_flood",
            unit="ms per legitimate handshake (IKE_SA_INIT + COOKIE + IKE_AUTH), median",
            ours=round(flood_ms, 2),
            baseline=round(quiet_ms, 2),
            baseline_name="the same responder without the flood, same run",
            goal=f"completes under a {FLOOD_PPS} requests/s COOKIE flood",
            extra={
                "flood_pps": FLOOD_PPS,
                "handshakes": HANDSHAKES,
                "flood_ms_max": round(1000 * max(flood["flood_s"]), 2),
                "quiet_ms_max": round(1000 * max(flood["quiet_s"]), 2),
                "cookies_per_s_during_flood": round(flood["cookies_per_s_during"]),
                "responder_busy_during_flood": round(flood["responder_cpu_busy_during"], 3),
                "responder_waiting_for_cpu_during_flood": round(
                    flood["responder_waiting_during"], 3
                ),
            },
        ),
    ]


if __name__ == "__main__":
    for r in run():
        print(json.dumps(r.to_json(), indent=2))
