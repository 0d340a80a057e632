"""The router's WAN address moved under running LAN flows, as netifd moves it: shared by
tests/qemu/test_wan_change.py and bench/bench_wan_change.py.

Why one module: the test asserts what the change does to the flows (recovery, stale NAT,
leaks, the existing connections) and the benchmark reports how long recovery took; both
need the same flows, the same change and the same clocks.

Pieces:
- ``wan_device``, ``netifd_wan4``, ``set_wan4``, ``wait_wan4``: the WAN as netifd has it
  (its device from ``network.interface.wan`` l3_device, never a hard-coded name);
- ``echo_servers``: a TCP line echo in world hosts' netns for the flows;
- ``Flows``: from the LAN client, one long-lived TCP connection per target (an echo every
  0.2 s, never reconnected: the "existing" connection) and a new connection per target
  every 0.25 s (name resolved through the router each time, as a client does);
- ``clock_offset``: the router's clock against the world VM's (captures and flows are
  timed by the world's clock, the change by the router's);
- ``move_wan4``: the change through netifd, timed until the old address left the kernel;
- ``wan_change``: all of it in one go, with a capture of the WAN cable, as ``WanChange``.
"""

from __future__ import annotations

import contextlib
import json
import shlex
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import oelab
from lab import Capture, Lab, LabError

ECHO_PORT = 7007
NETWORK = "wan"  # the OpenWrt network (netifd's interface) the WAN is

_ECHO = r"""
import socketserver, sys
class Echo(socketserver.StreamRequestHandler):
    # each line back, after the address the connection came from as this host sees it
    # (the router's WAN address it was NATed to): "203.0.113.2 probe"
    def handle(self):
        seen = self.client_address[0].encode()
        for line in self.rfile:
            self.wfile.write(seen + b" " + line)
            self.wfile.flush()
socketserver.ThreadingTCPServer.allow_reuse_address = True
socketserver.ThreadingTCPServer.daemon_threads = True
socketserver.ThreadingTCPServer(("0.0.0.0", int(sys.argv[1])), Echo).serve_forever()
"""

# Runs in the LAN client: argv targets (JSON {key: [name, port]}), output dir. One thread
# per target for the long-lived connection and one for the new connections (IPv4); each writes
# JSON lines (world clock) until the file "stop" appears in the output dir.
_FLOWS = r"""
import json, os, socket, sys, threading, time
targets, out = json.loads(sys.argv[1]), sys.argv[2]
stop = os.path.join(out, "stop")

def connect(name, port, timeout):
    # IPv4 only: the WAN change under test is the IPv4 one (SNATed), and an AAAA lookup
    # would start IKE attempts to the host's IPv6 address beside it
    family, kind, proto, _, addr = socket.getaddrinfo(
        name, port, socket.AF_INET, socket.SOCK_STREAM)[0]
    s = socket.socket(family, kind, proto)
    s.settimeout(timeout)
    try:
        s.connect(addr)
    except OSError:
        s.close()
        raise
    return s

def writer(path):
    f = open(path, "w", buffering=1)
    return lambda **kw: f.write(json.dumps(kw) + "\n")

def echo(s, msg):
    # the address the peer saw this connection come from
    s.sendall(msg)
    got = b""
    while not got.endswith(b"\n"):
        chunk = s.recv(256)
        if not chunk:
            raise ConnectionError("closed by the peer")
        got += chunk
    return got.split()[0].decode()

def long_flow(key, name, port):
    log = writer(os.path.join(out, key + "-long.jsonl"))
    try:
        s = connect(name, port, 20)
    except OSError as e:
        log(t=time.time(), event="connect-failed", error=repr(e))
        return
    log(t=time.time(), event="connected", local_port=s.getsockname()[1], peer=s.getpeername()[0])
    n = 0
    while not os.path.exists(stop):
        n += 1
        s.settimeout(1.0)
        s.sendall(b"%d\n" % n)
        got, stalled = b"", False
        while not got.endswith(b"\n"):
            try:
                chunk = s.recv(256)
            except socket.timeout:
                if not stalled:
                    log(t=time.time(), event="stalled", n=n)
                    stalled = True
                if os.path.exists(stop):
                    log(t=time.time(), event="open-at-stop", n=n)
                    return
                continue
            except OSError as e:
                log(t=time.time(), event="error", n=n, error=repr(e))
                return
            if not chunk:
                log(t=time.time(), event="error", n=n, error="closed by the peer")
                return
            got += chunk
        log(t=time.time(), event="echo", n=n, seen_as=got.split()[0].decode())
        time.sleep(0.2)
    log(t=time.time(), event="open-at-stop", n=n)

def probes(key, name, port):
    log = writer(os.path.join(out, key + "-new.jsonl"))
    while not os.path.exists(stop):
        t0, s = time.time(), None
        try:
            s = connect(name, port, 3)
            seen_as = echo(s, b"probe\n")
            log(start=t0, end=time.time(), ok=True, peer=s.getpeername()[0],
                local_port=s.getsockname()[1], seen_as=seen_as)
        except (OSError, ConnectionError) as e:
            log(start=t0, end=time.time(), ok=False, error=repr(e)[:120])
        finally:
            if s is not None:
                s.close()
        time.sleep(0.25)

threads = []
for key, (name, port) in targets.items():
    for fn in (long_flow, probes):
        threads.append(threading.Thread(target=fn, args=(key, name, port), daemon=True))
for t in threads:
    t.start()
for t in threads:
    t.join()
"""


# ------------------------------------------------------------------------------ the WAN


def _wan_status(lab: Lab) -> dict[str, Any]:
    return dict(
        json.loads(lab.router(f"ubus call network.interface.{NETWORK} status").check().stdout)
    )


def wan_device(lab: Lab) -> str:
    """The WAN's Linux device as netifd has it (l3_device): the lab renames its devices."""
    dev = _wan_status(lab).get("l3_device") or _wan_status(lab).get("device")
    if not dev:
        raise LabError(f"netifd names no device for network {NETWORK!r}")
    return str(dev)


def netifd_wan4(lab: Lab) -> list[str] | None:
    """The WAN's IPv4 addresses as netifd's status gives them, when the kernel agrees."""
    status = _wan_status(lab)
    got = sorted(a["address"] for a in status.get("ipv4-address", []))
    dev = status.get("l3_device") or status.get("device")
    if not status.get("up") or not dev:
        return None
    kernel = lab.router(f"ip -4 -o addr show dev {shlex.quote(dev)}").check().stdout
    if any(f" {a}/" not in kernel for a in got):
        return None
    return got if kernel.count(" inet ") == len(got) else None


def _set_wan4_cmd(address: str) -> str:
    return (
        f"uci set network.{NETWORK}.ipaddr={address} && uci commit network && "
        "ubus call network reload"
    )


def set_wan4(lab: Lab, address: str) -> None:
    """The WAN's IPv4 address (same /24) in /etc/config/network, and netifd told to reload."""
    lab.router(_set_wan4_cmd(address)).check()


def wait_wan4(lab: Lab, address: str, timeout: float = 60) -> None:
    oelab.wait_until(
        f"netifd to put {address} on {NETWORK}",
        lambda: netifd_wan4(lab) == [address] or None,
        timeout=timeout,
    )


def clock_offset(lab: Lab, rounds: int = 5) -> tuple[float, float]:
    """(router clock - world clock, its uncertainty) in seconds: the round with the
    shortest world-router-world trip, the router's reading taken as its midpoint."""
    best: tuple[float, float] | None = None
    for _ in range(rounds):
        a = float(lab.world("date +%s.%N").check().stdout)
        r = float(lab.router("date +%s.%N").check().stdout)
        b = float(lab.world("date +%s.%N").check().stdout)
        if best is None or b - a < best[1] * 2:
            best = (r - (a + b) / 2, (b - a) / 2)
    assert best is not None
    return best


def move_wan4(lab: Lab, old: str, new: str, offset: float) -> tuple[float, float]:
    """Move the WAN from ``old`` to ``new`` through netifd; returns (when the change was
    asked, when ``old`` had left the WAN device), both on the world's clock (``offset``:
    router - world). The router polls its own kernel every 50 ms for the second."""
    dev = shlex.quote(wan_device(lab))
    out = lab.router(
        "t0=$(date +%s.%N); " + _set_wan4_cmd(new) + "; i=0; "
        f"while ip -4 -o addr show dev {dev} | grep -q ' {old}/'; do i=$((i + 1)); "
        f"[ $i -le 1200 ] || {{ echo '{old} still on {dev} after 60 s' >&2; exit 1; }}; "
        "sleep 0.05; done; echo $t0 $(date +%s.%N)",
        timeout=120,
    ).check()
    asked, gone = (float(x) for x in out.stdout.split()[-2:])
    return asked - offset, gone - offset


# ------------------------------------------------------------------------------ flows


@contextlib.contextmanager
def echo_servers(lab: Lab, netns: list[str], port: int = ECHO_PORT) -> Iterator[None]:
    """A TCP line echo on ``port`` in each world host netns, for the test's duration."""
    (lab.run_dir / "wan-echo.py").write_text(_ECHO)
    pids = []
    try:
        for ns in netns:
            res = lab.world(
                f"ip netns exec {ns} setsid python3 /lab/wan-echo.py {port} "
                f">/lab/logs/wan-echo-{ns}.log 2>&1 </dev/null & echo $!"
            ).check()
            pids.append(res.stdout.split()[-1])
        for ns in netns:
            oelab.wait_until(
                f"the echo server in {ns}",
                lambda ns=ns: lab.host(ns, f"ss -ltn | grep -q ':{port} '").ok,
                timeout=20,
            )
        yield
    finally:
        for pid in pids:
            lab.world(f"kill {pid} 2>/dev/null")


@dataclass
class Flows:
    """The LAN client's flows to ``targets`` (key -> (DNS name, port)), running in the
    background in the client netns; records read back from the run directory."""

    lab: Lab
    targets: Mapping[str, tuple[str, int]]
    label: str = "wanflows"
    pid: str = ""

    @property
    def out(self) -> Path:
        return self.lab.run_dir / self.label

    def start(self) -> None:
        self.out.mkdir(exist_ok=True)
        for old in self.out.glob("*"):
            old.unlink()
        (self.lab.run_dir / "wan-flows.py").write_text(_FLOWS)
        args = shlex.quote(json.dumps({k: list(v) for k, v in self.targets.items()}))
        res = self.lab.world(
            f"ip netns exec client setsid python3 /lab/wan-flows.py {args} /lab/{self.label} "
            f">/lab/logs/{self.label}.log 2>&1 </dev/null & echo $!"
        ).check()
        self.pid = res.stdout.split()[-1]

    def stop(self) -> None:
        if not self.pid:
            return
        self.lab.world(
            f"touch /lab/{self.label}/stop; for i in $(seq 100); do "
            f"kill -0 {self.pid} 2>/dev/null || exit 0; sleep 0.1; done; kill -9 {self.pid}",
            timeout=30,
        )
        self.pid = ""

    def records(self, key: str, kind: str) -> list[dict[str, Any]]:
        """``kind`` "long" (the one connection's events) or "new" (one per new connection)."""
        path = self.out / f"{key}-{kind}.jsonl"
        if not path.exists():
            return []
        return [json.loads(ln) for ln in path.read_text().splitlines() if ln.endswith("}")]

    def steady(self, timeout: float = 60) -> None:
        """Wait until every target's long connection echoes and a new connection succeeded."""

        def ready() -> bool:
            for key in self.targets:
                long = self.records(key, "long")
                if any(r["event"] in ("connect-failed", "error") for r in long):
                    raise LabError(f"the {key} flow failed before the change: {long[-1]}")
                if not any(r["event"] == "echo" for r in long):
                    return False
                if not any(r["ok"] for r in self.records(key, "new")):
                    return False
            return True

        oelab.wait_until("the LAN flows to run", ready, timeout=timeout)


def first_success_after(
    probes: list[dict[str, Any]], since: float, source: str | None = None
) -> dict[str, Any] | None:
    """The first new connection started at ``since`` or later that succeeded (and, given
    ``source``, that the peer saw come from it)."""
    ok = [
        p for p in probes if p["ok"] and p["start"] >= since and source in (None, p.get("seen_as"))
    ]
    return min(ok, key=lambda p: p["end"]) if ok else None


# ------------------------------------------------------------------------------ the change


@dataclass
class WanChange:
    """What one WAN address change did to the flows, on the world's clock."""

    old: str
    new: str
    asked: float  # the change asked of netifd
    gone: float  # the old address left the WAN device
    offset_uncertainty: float
    #: key -> end of the first new connection opened after ``gone`` that the peer saw
    #: come from the new address, less ``gone``
    recovery_s: dict[str, float | None]
    long: dict[str, list[dict[str, Any]]]  # key -> the long connection's events
    new_conns: dict[str, list[dict[str, Any]]]
    capture: Capture
    figures: dict[str, Any] = field(default_factory=dict)

    def long_outcome(self, key: str) -> dict[str, Any]:
        """What became of the connection opened before the change: its last echo relative
        to ``gone``, and how it ended (error, stalled, or still open when the flows stopped)."""
        events = self.long[key]
        echoes = [e["t"] for e in events if e["event"] == "echo"]
        sources = sorted({e["seen_as"] for e in events if e["event"] == "echo"})
        end = events[-1] if events else {}
        stalls = [e["t"] for e in events if e["event"] == "stalled" and e["t"] >= self.asked]
        return {
            "echoes_after_gone": len([t for t in echoes if t > self.gone]),
            "seen_as": sources,
            "last_echo_after_gone_s": round(max(echoes) - self.gone, 2) if echoes else None,
            "first_stall_after_asked_s": round(stalls[0] - self.asked, 2) if stalls else None,
            "end": end.get("event"),
            "error": end.get("error"),
            "end_after_gone_s": round(end["t"] - self.gone, 2) if end else None,
        }


def wan_change(
    lab: Lab,
    targets: Mapping[str, tuple[str, int]],
    new: str,
    *,
    recover_within: float = 30,
    hold: float = 8,
    label: str = "wan-change",
) -> WanChange:
    """Flows to ``targets`` running, the WAN moved to ``new``, and the flows watched until
    every target took a new connection from the new address (or ``recover_within``
    seconds passed) and then ``hold`` seconds more (stale traffic shows there). The WAN
    is left on ``new``: restoring it is the caller's."""
    old = lab.plan.router_wan4
    if netifd_wan4(lab) != [old]:
        raise LabError(f"the WAN is not on {old} before the change: {netifd_wan4(lab)}")
    flows = Flows(lab, targets, label=label)
    flows.start()
    try:
        flows.steady()
        offset, uncertainty = clock_offset(lab)
        with lab.capture_wan(bpf="ip or ip6", label=label) as cap:
            asked, gone = move_wan4(lab, old, new, offset)
            deadline = time.monotonic() + recover_within
            while time.monotonic() < deadline:
                if all(first_success_after(flows.records(k, "new"), gone, new) for k in targets):
                    break
                time.sleep(0.5)
            time.sleep(hold)
            flows.stop()
    finally:
        flows.stop()
    recovery: dict[str, float | None] = {}
    any_source: dict[str, float | None] = {}
    for key in targets:
        first = first_success_after(flows.records(key, "new"), gone, new)
        recovery[key] = round(first["end"] - gone, 2) if first else None
        first = first_success_after(flows.records(key, "new"), gone)
        any_source[key] = round(first["end"] - gone, 2) if first else None
    return WanChange(
        old=old,
        new=new,
        asked=asked,
        gone=gone,
        offset_uncertainty=round(uncertainty, 3),
        recovery_s=recovery,
        long={k: flows.records(k, "long") for k in targets},
        new_conns={k: flows.records(k, "new") for k in targets},
        capture=cap,
        figures={"netifd_s": round(gone - asked, 2), "first_success_any_source_s": any_source},
    )


def restore_wan4(lab: Lab) -> None:
    """The plan's WAN address back (later modules rely on it)."""
    set_wan4(lab, lab.plan.router_wan4)
    wait_wan4(lab, lab.plan.router_wan4)
