"""The `oe` CLI finds a running oe-routerd through its config file even when that file has
errors: the daemon runs with a custom ``control_socket`` named only in the file, the file
is then broken, and `oe status` still answers and `oe reload` prints the daemon's problems
(the real daemon as a subprocess, the real CLI as another)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.host.oe_daemon import cli

pytestmark = pytest.mark.host


def _config(sock: Path, log_level: str) -> str:
    # the DNS front stays off (no anchor file): no port 5335 and no /etc/oe on this host
    return (
        f"config oe 'global'\n\toption control_socket '{sock}'\n"
        f"\toption log_level '{log_level}'\n"
        "\nconfig dns 'dns'\n\toption trust_anchor '/nonexistent/oe-cli-broken-anchor'\n"
    )


def oe(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The CLI told only where the config file is (no --socket)."""
    return cli("--config", str(config), *args)


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path, Path]]:
    sock = tmp_path / "custom-run" / "oe.sock"
    config = tmp_path / "oe"
    config.write_text(_config(sock, "info"))
    log = (tmp_path / "oe-routerd.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "oe_router", "--config", str(config)],
        stdout=log,
        stderr=log,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while oe(config, "status", "--json").returncode != 0:
            assert proc.poll() is None, (tmp_path / "oe-routerd.log").read_text()
            assert time.monotonic() < deadline, "the daemon's socket never answered"
            time.sleep(0.2)
        yield proc, config, sock
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        log.close()


def test_status_and_reload_reach_the_daemon_through_a_broken_config(
    daemon: tuple[subprocess.Popen[bytes], Path, Path],
) -> None:
    proc, config, sock = daemon
    assert sock.exists()  # only the config file names it

    # two problems the daemon will name, and a syntax error after the socket's line
    config.write_text(
        _config(sock, "loud") + "\toption hold_limit '2s'\n\toption bogus_option '1'\n"
    )
    status = oe(config, "status", "--json")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["daemon"]["pid"] == proc.pid

    refused = oe(config, "reload")
    assert refused.returncode == 1, refused.stdout + refused.stderr
    lines = refused.stdout.splitlines()
    assert any(line.startswith(f"{config}:3: oe.global.log_level: 'loud'") for line in lines), lines
    assert any("oe.dns.bogus_option" in line and "unknown option" in line for line in lines)
    assert lines[-1] == "reload refused: 2 problem(s); config generation 1 keeps running"

    config.write_text(_config(sock, "loud") + "\toption hold_limit 'unterminated\n")
    again = oe(config, "reload")
    assert again.returncode == 1
    assert "unterminated" in again.stdout or "quote" in again.stdout, again.stdout
    assert again.stdout.splitlines()[-1].endswith("config generation 1 keeps running")

    config.write_text(_config(sock, "debug"))
    accepted = oe(config, "reload")
    assert (accepted.returncode, accepted.stdout) == (
        0,
        "reload accepted: config generation 2 is active\n",
    )
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(15) == 0
