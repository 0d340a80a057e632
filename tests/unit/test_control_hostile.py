"""The real oe-routerd process against hostile local clients on its control socket.

The daemon runs as a child process with OE disabled (no service starts, nothing on
the network changes) and its real logging (stderr, one line per record, log_level
debug so nothing is filtered). The tests throw what a hostile or broken local client
can (deep nesting, huge numbers and names, bytes that are not UTF-8, wrong types for
every argument, pipelined garbage, hundreds of connections that never send) and look
at what a user sees: one reply line per request, `oe status` still answering, a
bounded number of descriptors held, and a log without a single traceback.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from oe_router.cli import main
from oe_router.control.protocol import COMMAND_ARGS, MAX_LINE
from oe_router.control.server import MAX_CLIENTS

CONFIG = """config oe 'global'
\toption enabled '0'
\toption log_level 'debug'
\toption control_socket '{socket}'
"""
LOG_LINE = re.compile(r"(debug|info|notice|warning|err|crit) oe-routerd\[[\w.-]+\]: \S")


@dataclass
class RealDaemon:
    proc: subprocess.Popen[bytes]
    socket: Path
    logfile: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def log(self) -> str:
        return self.logfile.read_text(errors="replace")

    def stop(self) -> str:
        """SIGTERM, wait, and return the whole log."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.log()


@pytest.fixture
def daemon(tmp_path: Path, poll: Callable[..., bool]) -> Iterator[RealDaemon]:
    sock = tmp_path / "control.sock"
    cfg = tmp_path / "oe"
    cfg.write_text(CONFIG.format(socket=sock))
    logfile = tmp_path / "oe-routerd.log"
    with logfile.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "oe_router.daemon", "--config", str(cfg)],
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
    d = RealDaemon(proc, sock, logfile)
    try:
        ready = poll(lambda: proc.poll() is not None or " running (pid " in d.log())
        assert ready and proc.poll() is None, d.log()[-3000:]
        yield d
    finally:
        d.stop()


def _ask(path: Path, payload: bytes) -> list[bytes]:
    """Send `payload` on a fresh connection, half-close, and return every reply line."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(30)
        s.connect(str(path))
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        buf = b""
        while chunk := s.recv(65536):
            buf += chunk
    return buf.splitlines()


def _hostile() -> list[bytes]:
    lines = [
        b"[" * 60_000,
        b'{"a":' * 12_000,
        b'{"cmd": "status", "n": ' + b"9" * 50_000 + b"}",
        b'{"cmd": "down", "peer": "' + b"a" * 60_000 + b'"}',
        b'{"cmd": "up", "peer": "' + b"a" * 60_000 + b'"}',
        b'{"cmd": "down", "peer": "a\\u0000b"}',
        b'{"cmd": "down", "peer": "a..b"}',
        b'{"cmd": "' + b"x" * 60_000 + b'"}',
        b'{"cmd": "status", "n": NaN}',
        b'{"cmd": "status", "n": 1e999}',
        b'{"cmd": "status", "cmd": "reload"}',
        b'{"cmd": "reload", "now": true}',
        b'{"cmd": "help", "x": [[[[[[[[[[]]]]]]]]]]}',
        b"\xff\xfe\xfd",
        b'{"cmd": "st\xc3atus"}',
        b"\x00" * 1000,
        b"null",
        b'"cmd"',
        b'{"cmd": null}',
        b"{" + b'"k":1,' * 9_000 + b'"cmd":"status"}',
    ]
    wrong: list[object] = [None, True, 7, 1.5, [], {"a": 1}, "x" * 300]
    for cmd, spec in COMMAND_ARGS.items():
        lines.append(json.dumps({"cmd": cmd, "extra": 1}).encode())
        for name in spec:
            for value in wrong:
                lines.append(json.dumps({"cmd": cmd, "peer": "192.0.2.1", name: value}).encode())
    return lines


def test_hostile_requests_each_get_one_error_line_and_no_traceback_reaches_the_log(
    daemon: RealDaemon, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 11: 60,000 '[' and the like crashed the client handler (no reply, a
    traceback in the log); `down` with a 60,000-character name said "internal error"."""
    hostile = _hostile()
    for line in hostile:
        replies = _ask(daemon.socket, line + b"\n")
        assert len(replies) == 1, (line[:60], replies)
        reply = json.loads(replies[0])
        assert reply["ok"] is False, (line[:60], reply)
        assert "internal error" not in reply["error"], (line[:60], reply)
        assert len(reply["error"]) < 300
    # the same garbage pipelined on one connection: one reply line per request line
    small = [line for line in hostile if len(line) < MAX_LINE]
    replies = _ask(daemon.socket, b"\n".join(small) + b"\n")
    assert len(replies) == len(small)
    assert all(json.loads(r)["ok"] is False for r in replies)
    # and the daemon still serves
    assert main(["--socket", str(daemon.socket), "status", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["daemon"]["pid"] == daemon.pid

    log = daemon.stop()
    assert daemon.proc.returncode == 0
    assert "Traceback" not in log
    assert "[asyncio]" not in log
    bad = [line for line in log.splitlines() if not LOG_LINE.match(line)]
    assert bad == [], "every log record is one line"


def test_cli_is_answered_with_200_connections_pending_and_fds_stay_bounded(
    daemon: RealDaemon, capsys: pytest.CaptureFixture[str], poll: Callable[..., bool]
) -> None:
    """Issue 12: with the listen backlog full, connect says EAGAIN and `oe` gave up at
    once. Here the daemon is stopped (SIGSTOP) while 200 clients connect and never
    send, so the backlog is full when `oe status` connects; the daemon resumes a
    moment later. `oe` must wait and get its answer, and the idle 200 must not make
    the daemon hold more than its client limit of descriptors."""
    base = daemon.fds()
    os.kill(daemon.pid, signal.SIGSTOP)
    idlers: list[socket.socket] = []
    eagain = 0
    try:
        for _ in range(200):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.setblocking(False)
            try:
                s.connect(str(daemon.socket))
            except BlockingIOError:
                eagain += 1
            idlers.append(s)
        assert eagain > 0, "the backlog never filled: the test would prove nothing"
        resume = threading.Timer(0.5, os.kill, (daemon.pid, signal.SIGCONT))
        resume.start()
        rc = main(["--socket", str(daemon.socket), "status", "--json"])
        resume.join()
        out, err = capsys.readouterr()
        assert rc == 0, err
        assert json.loads(out)["daemon"]["pid"] == daemon.pid
        held = [daemon.fds() for _ in range(10)]
        assert max(held) <= base + MAX_CLIENTS + 4, (base, held)
    finally:
        os.kill(daemon.pid, signal.SIGCONT)
        for s in idlers:
            s.close()
    # once the idlers are gone, the daemon is back to its own descriptors
    assert poll(lambda: daemon.fds() <= base + 1), (base, daemon.fds())
    assert main(["--socket", str(daemon.socket), "reload"]) == 0
