#!/usr/bin/python3
"""Lab guest agent: runs shell commands for the host over a virtio-serial port.

Why a serial port: it needs no network inside the guest (the guest's NICs belong to the test)
and no polling of a shared folder. Protocol: one JSON object per line each way.

  host -> guest  {"id": 1, "op": "run", "cmd": "ip -br a", "timeout": 30}
                 {"id": 2, "op": "poweroff"}
  guest -> host  {"event": "ready", "hostname": "router"}
                 {"id": 1, "rc": 0, "stdout": "...", "stderr": "..."}

Each request runs in its own thread, so a slow command never blocks another one. A command that
outlives its timeout has its whole process group killed and answers rc 124.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, BinaryIO

PORT_NAME = "oe.agent"
TIMEOUT_RC = 124


def find_port(name: str) -> Path:
    """Return the /dev node of the virtio-serial port called `name` (no udev here)."""
    for _ in range(200):
        for entry in Path("/sys/class/virtio-ports").glob("vport*"):
            try:
                if (entry / "name").read_text().strip() == name:
                    return Path("/dev") / entry.name
            except OSError:
                continue
        threading.Event().wait(0.05)
    raise SystemExit(f"agent: no virtio-serial port named {name!r}")


class Agent:
    """Reads requests, runs them, writes answers; one lock guards the shared writer."""

    def __init__(self, rfile: BinaryIO, wfile: BinaryIO) -> None:
        self._rfile = rfile
        self._wfile = wfile
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def send(self, obj: dict[str, Any]) -> None:
        data = (json.dumps(obj) + "\n").encode()
        with self._lock:
            self._wfile.write(data)
            self._wfile.flush()

    def run(self, req: dict[str, Any]) -> None:
        timeout = float(req.get("timeout", 60))
        env = dict(os.environ, PATH="/usr/sbin:/usr/bin:/sbin:/bin", HOME="/root", LANG="C.UTF-8")
        stdin = req.get("stdin")
        proc = subprocess.Popen(
            ["/bin/sh", "-c", req["cmd"]],
            stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            env=env,
            cwd=req.get("cwd", "/"),
        )
        try:
            out, err = proc.communicate(
                input=stdin.encode() if stdin is not None else None, timeout=timeout
            )
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            rc = TIMEOUT_RC
            err += f"\nagent: timed out after {timeout:g}s: {req['cmd']}\n".encode()
        self.send(
            {
                "id": req["id"],
                "rc": rc,
                "stdout": out.decode(errors="replace"),
                "stderr": err.decode(errors="replace"),
            }
        )

    def handle(self, req: dict[str, Any]) -> None:
        try:
            if req.get("op") == "poweroff":
                self.send({"id": req.get("id"), "rc": 0, "stdout": "", "stderr": ""})
                self._stop.set()
                return
            self.run(req)
        except Exception as exc:  # an answer is owed whatever happened
            self.send({"id": req.get("id"), "rc": 125, "stdout": "", "stderr": f"agent: {exc!r}"})

    def serve(self) -> None:
        self.send({"event": "ready", "hostname": socket.gethostname()})
        while not self._stop.is_set():
            line = self._rfile.readline()
            if not line:
                # Host not connected yet / went away: virtio-serial reads return EOF then.
                threading.Event().wait(0.1)
                continue
            try:
                req = json.loads(line)
            except ValueError:
                continue
            threading.Thread(target=self.handle, args=(req,), daemon=True).start()


def main() -> int:
    port = find_port(PORT_NAME)
    fd = os.open(port, os.O_RDWR)
    with os.fdopen(fd, "rb") as rfile, os.fdopen(os.dup(fd), "wb") as wfile:
        Agent(rfile, wfile).serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
