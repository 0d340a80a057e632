"""The real oe-routerd as a subprocess: status over its socket, SIGHUP with a broken
config keeps the last good one, a fixed config is taken, SIGTERM exits 0 and cleans up."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import pytest

from tests.host.oe_daemon import cli

pytestmark = pytest.mark.host

GOOD = "config oe 'global'\n\toption enabled '1'\n\toption log_level 'info'\n"
# without an anchor file the DNS front stays off (the default, RFC 5011-managed anchors
# would run it on this host's 127.0.0.1:5335 and keep their state in /etc/oe)
GOOD += "\nconfig dns 'dns'\n\toption trust_anchor '/nonexistent/oe-daemon-reload-anchor'\n"
BROKEN = GOOD.replace("option log_level 'info'", "option log_level 'chatty'")
FIXED = GOOD.replace("'info'", "'debug'")


class LogTail:
    """Collects the daemon's stderr lines in a thread so the test can wait for one."""

    def __init__(self, stream: IO[str]) -> None:
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def _pump(self, stream: IO[str]) -> None:
        for line in stream:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()

    def wait_for(self, pred: Callable[[str], bool], timeout: float = 15.0) -> str:
        deadline = time.monotonic() + timeout
        with self._cond:
            seen = 0
            while True:
                for line in self.lines[seen:]:
                    if pred(line):
                        return line
                seen = len(self.lines)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError("log line not seen; log was:\n" + "\n".join(self.lines))
                self._cond.wait(left)

    def join(self) -> None:
        self._thread.join(5)


def oe(sock: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return cli("--socket", str(sock), *args)


def status(sock: Path) -> dict[str, Any]:
    proc = oe(sock, "status", "--json")
    assert proc.returncode == 0, proc.stderr
    doc: dict[str, Any] = json.loads(proc.stdout)
    return doc


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], LogTail, Path, Path]]:
    config = tmp_path / "oe"
    config.write_text(GOOD)
    sock = tmp_path / "run" / "oe" / "control.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "oe_router", "--config", str(config), "--socket", str(sock)],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stderr is not None
    tail = LogTail(proc.stderr)
    try:
        tail.wait_for(lambda line: "running (pid" in line)
        yield proc, tail, config, sock
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        tail.join()


def test_daemon_keeps_last_good_config_on_broken_sighup_and_stops_cleanly(
    daemon: tuple[subprocess.Popen[str], LogTail, Path, Path],
) -> None:
    proc, tail, config, sock = daemon
    first = status(sock)
    assert set(first) >= {"tunnels", "shunts", "engines", "dns"}
    assert first["daemon"]["pid"] == proc.pid
    assert first["daemon"]["config_generation"] == 1
    assert first["daemon"]["config_path"] == str(config)
    assert oct(os.stat(sock).st_mode & 0o777) == "0o600"

    config.write_text(BROKEN)
    os.kill(proc.pid, signal.SIGHUP)
    refusal = tail.wait_for(lambda line: "reload refused" in line and "log_level" in line)
    assert refusal.startswith("warning oe-routerd[daemon]: reload refused: ")
    assert "'chatty'" in refusal
    tail.wait_for(lambda line: "keeping config generation 1" in line)
    after_bad = status(sock)
    assert proc.poll() is None, "the daemon must survive a broken config"
    assert after_bad["daemon"]["config_generation"] == 1
    assert after_bad["daemon"]["last_reload"]["accepted"] is False
    assert any("log_level" in p for p in after_bad["daemon"]["last_reload"]["problems"])

    config.write_text(FIXED)
    os.kill(proc.pid, signal.SIGHUP)
    tail.wait_for(lambda line: "reload accepted: config generation 2" in line)
    after_fix = status(sock)
    assert after_fix["daemon"]["config_generation"] == 2
    assert after_fix["daemon"]["last_reload"]["accepted"] is True

    # `oe reload` asks over the socket and reports the outcome.
    config.write_text(BROKEN)
    refused = oe(sock, "reload")
    assert refused.returncode == 1
    assert "log_level" in refused.stdout and "generation 2 keeps running" in refused.stdout
    config.write_text(GOOD)
    accepted = oe(sock, "reload")
    assert (accepted.returncode, accepted.stdout) == (
        0,
        "reload accepted: config generation 3 is active\n",
    )

    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(15) == 0
    assert not sock.exists(), "the socket file is removed on SIGTERM"
    assert not any("Traceback" in line for line in tail.lines)
    # Every log line has the syslog-friendly one-line form.
    for line in tail.lines:
        level, _, rest = line.partition(" ")
        assert level in {"debug", "info", "notice", "warning", "err", "crit"}, line
        assert rest.startswith("oe-routerd["), line
    gone = oe(sock, "status")
    assert gone.returncode == 2
    assert gone.stderr == f"oe: daemon not running (no socket at {sock})\n"


def test_sigint_also_stops_cleanly(
    daemon: tuple[subprocess.Popen[str], LogTail, Path, Path],
) -> None:
    proc, _tail, _config, sock = daemon
    assert status(sock)["daemon"]["pid"] == proc.pid
    os.kill(proc.pid, signal.SIGINT)
    assert proc.wait(15) == 0
    assert not sock.exists()


def run_daemon_expecting_failure(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "oe_router", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_invalid_config_at_start_is_one_clear_error_without_traceback(tmp_path: Path) -> None:
    config = tmp_path / "oe"
    config.write_text(BROKEN)
    proc = run_daemon_expecting_failure("--config", str(config), "--socket", str(tmp_path / "s"))
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert lines[0].startswith("err oe-routerd[daemon]: ") and "log_level" in lines[0]
    assert lines[-1] == (
        f"err oe-routerd[daemon]: cannot start: {config} has 1 problem(s); "
        f"run 'oe config check {config}'"
    )
    assert not (tmp_path / "s").exists()


def test_missing_config_at_start_is_one_clear_error(tmp_path: Path) -> None:
    config = tmp_path / "absent"
    proc = run_daemon_expecting_failure("--config", str(config), "--socket", str(tmp_path / "s"))
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert str(config) in proc.stderr and "cannot read" in proc.stderr


def test_unbindable_socket_is_one_clear_error(tmp_path: Path) -> None:
    config = tmp_path / "oe"
    config.write_text(GOOD)
    blocker = tmp_path / "file"
    blocker.write_text("")
    sock = blocker / "control.sock"  # a path under a regular file cannot exist
    proc = run_daemon_expecting_failure("--config", str(config), "--socket", str(sock))
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    last = proc.stderr.splitlines()[-1]
    assert last.startswith(
        f"err oe-routerd[daemon]: cannot start: cannot bind control socket {sock}"
    )


def test_second_daemon_on_the_same_socket_is_refused(
    daemon: tuple[subprocess.Popen[str], LogTail, Path, Path],
) -> None:
    proc, _tail, config, sock = daemon
    second = run_daemon_expecting_failure("--config", str(config), "--socket", str(sock))
    assert second.returncode == 1
    assert "another daemon is serving it" in second.stderr
    assert status(sock)["daemon"]["pid"] == proc.pid, "the first daemon is untouched"


def _catches_sighup(pid: int) -> bool:
    """Whether the process has a handler for SIGHUP yet (SigCgt bit 0 in /proc)."""
    with open(f"/proc/{pid}/status") as f:
        caught = next(line for line in f if line.startswith("SigCgt:"))
    return bool(int(caught.split()[1], 16) & (1 << (signal.SIGHUP - 1)))


def test_a_sighup_during_start_up_is_a_reload_not_the_end(tmp_path: Path) -> None:
    """procd reloads right after START (an interface trigger, reload_config): the HUP comes
    while the daemon still imports its modules (about 11 s on a TCG router). It must not
    end the process (the signal's default action), and the change it announced is applied
    once the daemon runs: one reload, config generation 2."""
    config = tmp_path / "oe"
    config.write_text(GOOD)
    sock = tmp_path / "control.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "oe_router.routerd", "--config", str(config), "--socket", str(sock)],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stderr is not None
    tail = LogTail(proc.stderr)
    try:
        deadline = time.monotonic() + 10
        while not _catches_sighup(proc.pid):
            assert time.monotonic() < deadline, "the entry point never took SIGHUP"
            time.sleep(0.005)
        config.write_text(FIXED)
        os.kill(proc.pid, signal.SIGHUP)
        assert not any("running (pid" in line for line in tail.lines), "HUP came too late"
        tail.wait_for(lambda line: "SIGHUP during start-up: reloading once" in line)
        tail.wait_for(lambda line: "reload accepted: config generation 2" in line)
        assert proc.poll() is None
        assert status(sock)["daemon"]["config_generation"] == 2
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        tail.join()
