"""The real oe-routerd, as a process inside a network namespace, for host tests.

Reusable by any host test: ``OeDaemon`` writes a UCI config, starts
``python -m oe_router.daemon`` under ``ip netns exec`` (so the daemon, its ESP workers,
its TUN device and its nftables all live in that namespace), waits for the control
socket, and drives it with the real ``oe`` CLI.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class OeDaemon:
    """One daemon in ``ns`` with its files under ``workdir``; ``config`` is the UCI text
    without ``control_socket`` (added here)."""

    ns: str
    workdir: Path
    config: str
    env: dict[str, str] | None = None
    proc: subprocess.Popen[bytes] | None = None
    #: more oe-routerd arguments (``--ubus-socket PATH``)
    args: Sequence[str] = ()

    @property
    def socket(self) -> Path:
        return self.workdir / "control.sock"

    @property
    def logfile(self) -> Path:
        return self.workdir / "oe-routerd.log"

    def _write_config(self) -> Path:
        self.workdir.mkdir(parents=True, exist_ok=True)
        cfg = self.workdir / "oe.conf"
        text = self.config.replace(
            "config oe 'global'", f"config oe 'global'\n\toption control_socket '{self.socket}'", 1
        )
        cfg.write_text(text)
        return cfg

    def reconfigure(self, config: str) -> subprocess.CompletedProcess[str]:
        """Write ``config`` (UCI text as for the constructor) and ``oe reload``; the result
        says whether the daemon took it (exit 0) or refused it (1, with its reasons)."""
        self.config = config
        self._write_config()
        return self.oe("reload", check=False)

    def start(self, timeout: float = 30.0) -> None:
        cfg = self._write_config()
        self.socket.unlink(missing_ok=True)
        log = self.logfile.open("ab")
        seen = len(self.log())  # a restart appends: only this run's lines say it is ready
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", self.ns, sys.executable, "-m", "oe_router.daemon",
             "--config", str(cfg), *self.args],
            stdout=log, stderr=log, start_new_session=True,
            env={**os.environ, **(self.env or {})},
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"oe-routerd in {self.ns} exited: {self.log()[-3000:]}")
            # every service has started once the daemon says it runs (the control socket
            # answers before that)
            if " running (pid " in self.log()[seen:] and self.socket.exists():
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"oe-routerd in {self.ns} not ready: {self.log()[-3000:]}")
            time.sleep(0.1)

    def oe(
        self, *args: str, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        p = cli("--socket", str(self.socket), *args, timeout=timeout)
        if check and p.returncode != 0:
            raise RuntimeError(
                f"oe {' '.join(args)} failed ({p.returncode}): {p.stdout}{p.stderr}\n"
                f"--- daemon log tail:\n{self.log()[-3000:]}"
            )
        return p

    def status(self) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(self.oe("status", "--json").stdout)
        return doc

    def status_between(self) -> tuple[float, dict[str, Any], float]:
        """(monotonic before, status document, monotonic after), asked in this process
        over the control socket (what ``oe status --json`` prints): the daemon computed
        its ages (``established_s``) between the two instants, a few ms apart, where
        the CLI's interpreter start would widen the bracket to a few hundred."""
        from oe_router.control.client import ControlClient

        client = ControlClient(self.socket)
        before = time.monotonic()
        reply = client.request("status")
        after = time.monotonic()
        doc: dict[str, Any] = reply["status"]
        return before, doc, after

    def tunnels(self) -> list[dict[str, Any]]:
        return [t for t in self.status()["tunnels"] if t.get("source") != "ike"]

    def wait_counted(self, before: dict[str, Any], packets: int, timeout: float = 3.0) -> Any:
        """The first tunnel once its counters moved by ``packets`` both ways from ``before``
        (a row of ``tunnels()``): the userspace datapath's workers publish their counters
        ten times a second, so a read right after the last reply can miss it."""

        def moved() -> Any:
            now = self.tunnels()[0]
            done = all(now[k] >= before[k] + packets for k in ("packets_out", "packets_in"))
            return now if done else None

        return self.wait_for(f"tunnel counters +{packets} both ways from {before}", moved, timeout)

    def wait_for(self, what: str, pred: Any, timeout: float = 20.0) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            got = pred()
            if got:
                return got
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: not within {timeout} s\n{self.log()[-3000:]}")
            time.sleep(0.1)

    def log(self) -> str:
        try:
            return self.logfile.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=5)
        self.proc = None


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """The `oe` CLI of this checkout (``python -m oe_router.cli``), output captured."""
    return subprocess.run(
        [sys.executable, "-m", "oe_router.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def netns_run(ns: str, cmd: Sequence[str], timeout: float = 60, check: bool = True) -> str:
    p = subprocess.run(
        ["ip", "netns", "exec", ns, *cmd], capture_output=True, text=True, timeout=timeout
    )
    if check and p.returncode != 0:
        raise RuntimeError(f"{ns}: {' '.join(cmd)} failed ({p.returncode}): {p.stdout}{p.stderr}")
    return p.stdout


def device_with(ns: str, address: str) -> str:
    """The device of namespace ``ns`` that has the IPv4 ``address`` (for wan_interface)."""
    for line in netns_run(ns, ["ip", "-o", "-4", "addr", "show"]).splitlines():
        if f" {address}/" in line:
            return line.split()[1]
    raise RuntimeError(f"no device with {address} in {ns}")


def bare_config(
    wan: str,
    anchor: str | Path,
    *,
    datapath: str = "kernel",
    lan: str = "lo",
    dns: str = "",
    extra: str = "",
) -> str:
    """A daemon on ``wan`` with no offload and, unless given, no LAN (``lan``) and its DNS
    front off (``anchor`` does not exist): IKE and the datapath only. ``dns`` adds options
    to the dns section (a listen address, upstreams); ``extra`` appends UCI sections."""
    return f"""package oe

config oe 'global'
\toption datapath '{datapath}'
\toption wan_interface '{wan}'
\toption lan_interface '{lan}'
\toption offload 'off'

config dns 'dns'
\toption trust_anchor '{anchor}'
{dns}{extra}"""
