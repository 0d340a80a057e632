"""The `oe` CLI: output and exit codes, with the daemon absent, present (a real control
server in a thread serving canned replies) and with good and bad config files."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from oe_router.cli import main, render_status
from oe_router.control import (
    CommandTable,
    ControlServer,
    DaemonStatus,
    EngineStatus,
    ReloadResult,
    Request,
    ShuntStatus,
    Status,
    StatusContribution,
    TunnelStatus,
)

GOOD = "config oe 'global'\n\toption enabled '1'\n\toption log_level 'info'\n"


def _status() -> Status:
    daemon = DaemonStatus(
        version="0.1.0",
        pid=7,
        uptime_s=125.0,
        config_path="/etc/config/oe",
        config_generation=2,
        enabled=True,
        datapath="userspace-esp",
        last_reload=ReloadResult(True, 2, (), 100.0),
        services=("dns", "ike"),
    )
    part = StatusContribution(
        tunnels=(
            TunnelStatus(
                "www.example.org",
                "192.0.2.1",
                "198.51.100.7",
                "established",
                "private-or-clear",
                "AES_GCM_16_256",
                42.0,
                1000,
                2000,
                packets_in=10,
                packets_out=20,
            ),
        ),
        shunts=(ShuntStatus("203.0.113.9/32", "clear", "no IPSECKEY", 600.0),),
        engines=(EngineStatus("cbc(aes)", "cbc-aes-aesni", "af_alg", True, True, 900.0),),
        dns={"listen": ["192.168.1.1:53"], "held": 1},
    )
    return Status.merge(daemon, [part])


class FakeDaemon:
    """A real ControlServer on a real socket, answering status/reload with canned replies."""

    def __init__(self, path: Path, reload_result: ReloadResult) -> None:
        self.path = path
        self.reload_result = reload_result
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.stop = threading.Event()
        table = CommandTable()
        table.register("status", self._status)
        table.register("reload", self._reload)
        self.server = ControlServer(path, table)
        self.thread = threading.Thread(target=self._run, daemon=True)

    async def _status(self, req: Request) -> dict[str, object]:
        return {"status": _status().to_json()}

    async def _reload(self, req: Request) -> dict[str, object]:
        return {"reload": self.reload_result.to_json()}

    def _run(self) -> None:
        async def go() -> None:
            await self.server.start()
            self.ready.set()
            while not self.stop.is_set():
                await asyncio.sleep(0.02)
            await self.server.stop()

        self.loop.run_until_complete(go())
        self.loop.close()

    def __enter__(self) -> FakeDaemon:
        self.thread.start()
        assert self.ready.wait(5)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(5)


@pytest.fixture
def sock(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "run" / "control.sock"


def test_status_without_daemon_says_so_in_one_line_and_exits_2(
    sock: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for argv in (["status"], ["status", "--json"], ["reload"]):
        assert main(["--socket", str(sock), *argv]) == 2
        out, err = capsys.readouterr()
        assert out == ""
        assert err == f"oe: daemon not running (no socket at {sock})\n"


def test_status_table_and_json_from_a_running_server(
    sock: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with FakeDaemon(sock, ReloadResult(True, 3)):
        assert main(["--socket", str(sock), "status"]) == 0
        table = capsys.readouterr().out
        assert main(["--socket", str(sock), "status", "--json"]) == 0
        doc = json.loads(capsys.readouterr().out)
    assert "tunnels (1)" in table and "www.example.org" in table and "AES_GCM_16_256" in table
    assert "shunts (1)" in table and "no IPSECKEY" in table
    assert "engines (1)" in table and "cbc-aes-aesni" in table
    assert "generation 2" in table and "datapath  userspace-esp" in table
    assert {"tunnels", "shunts", "engines", "dns", "daemon"} == set(doc)
    assert isinstance(doc["tunnels"], list) and isinstance(doc["dns"], dict)
    assert doc["tunnels"][0]["peer"] == "www.example.org"
    # the Child SA's counters: bytes and packets per direction, in the table and the JSON
    assert "1000B/10p" in table and "2000B/20p" in table
    t = doc["tunnels"][0]
    assert (t["bytes_in"], t["bytes_out"], t["packets_in"], t["packets_out"]) == (
        1000,
        2000,
        10,
        20,
    )


def test_reload_reports_accepted_and_refused(
    sock: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with FakeDaemon(sock, ReloadResult(True, 3)):
        assert main(["--socket", str(sock), "reload"]) == 0
    assert capsys.readouterr().out == "reload accepted: config generation 3 is active\n"
    refused = ReloadResult(False, 2, ("/etc/config/oe:4: oe.global.log_level: 'x' bad",))
    with FakeDaemon(sock, refused):
        assert main(["--socket", str(sock), "reload"]) == 1
    assert capsys.readouterr().out.splitlines() == [
        "/etc/config/oe:4: oe.global.log_level: 'x' bad",
        "reload refused: 1 problem(s); config generation 2 keeps running",
    ]


def test_unknown_reply_command_error_is_one_line_exit_1(
    sock: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A daemon older than the CLI (no such command) gives its error, not a traceback."""
    table = CommandTable()
    loop = asyncio.new_event_loop()
    server = ControlServer(sock, table)
    loop.run_until_complete(server.start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        rc = main(["--socket", str(sock), "status"])
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.run_until_complete(server.stop())
        loop.close()
    assert rc == 1
    err = capsys.readouterr().err
    assert err.startswith("oe: unknown command 'status'") and err.count("\n") == 1


def test_config_check_clean_file_exits_0(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    f = tmp_path / "oe"
    f.write_text(GOOD)
    assert main(["config", "check", str(f)]) == 0
    assert capsys.readouterr().out == f"{f}: OK\n"


def test_config_check_prints_every_problem_then_a_summary_exit_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    f = tmp_path / "oe"
    f.write_text(GOOD.replace("'info'", "'loud'").replace("enabled '1'", "enabled 'maybe'"))
    assert main(["config", "check", str(f)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3
    assert any("enabled" in line and "maybe" in line for line in lines[:2])
    assert any("log_level" in line and "loud" in line for line in lines[:2])
    assert lines[2] == f"{f}: 2 problem(s)"


def test_config_check_missing_and_garbage_files_never_traceback(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"config oe 'global\n\x00\xff option")
    for f in (missing, garbage):
        proc = subprocess.run(
            [sys.executable, "-m", "oe_router.cli", "config", "check", str(f)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert proc.returncode == 1, proc.stderr
        assert "Traceback" not in proc.stdout + proc.stderr
        assert str(f) in proc.stdout
        assert proc.stdout.splitlines()[-1].endswith("problem(s)")


def test_cli_without_daemon_as_a_real_process_exits_2_with_one_line(tmp_path: Path) -> None:
    sock = tmp_path / "x" / "control.sock"
    proc = subprocess.run(
        [sys.executable, "-m", "oe_router.cli", "--socket", str(sock), "status"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr == f"oe: daemon not running (no socket at {sock})\n"


def test_render_status_of_an_idle_daemon_shows_empty_sections() -> None:
    idle = Status.merge(
        DaemonStatus("0.1.0", 1, 3.0, "/etc/config/oe", 1, False, "none", None, ()), []
    )
    text = render_status(idle)
    assert "DISABLED" in text
    assert "last reload: none since start" in text
    for section in ("tunnels (0)", "shunts (0)", "engines (0)", "(no DNS front running)"):
        assert section in text


def test_socket_comes_from_the_config_file_unless_given(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    custom = tmp_path / "custom" / "ctl.sock"
    conf = tmp_path / "oe"
    conf.write_text(GOOD + f"\toption control_socket '{custom}'\n")
    assert main(["--config", str(conf), "status"]) == 2
    assert capsys.readouterr().err == f"oe: daemon not running (no socket at {custom})\n"
    explicit = tmp_path / "explicit.sock"
    assert main(["--config", str(conf), "--socket", str(explicit), "status"]) == 2
    assert str(explicit) in capsys.readouterr().err
    broken = tmp_path / "broken"
    broken.write_text("config oe 'global'\n\toption log_level 'loud'\n")
    assert main(["--config", str(broken), "status"]) == 2
    assert "no socket at /var/run/oe/control.sock" in capsys.readouterr().err
