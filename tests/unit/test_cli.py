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

from oe_router.cli import main, render_offload, render_status
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
from tests.control_thread import ThreadedControlServer

GOOD = "config oe 'global'\n\toption enabled '1'\n\toption log_level 'info'\n"
#: ``oe status --json`` of a real oe-routerd in a netns (kernel datapath without ESP), read
#: while 500 addresses flooded its IKE port with IKE_SA_INIT requests (tests.ike_flood,
#: 3,000 a second, answering COOKIEs) and after a junk DNS query, one its upstream never
#: answered, and a TCP client that sent nothing within the 1 s tcp_timeout
FLOODED_STATUS = Path(__file__).parent / "data" / "status_ike_flood.json"


def _rates(*mbit: float) -> list[dict[str, float]]:
    return [
        {"size": size, "mbit_s": m, "ns_per_packet": round(size * 8e3 / m, 1)}
        for size, m in zip((64, 512, 1400), mbit, strict=True)
    ]


# The `offload` command's reply as a daemon on the lab router (TCG, virtio-crypto) sends
# it, trimmed to two transforms: virtio slower than the CPU, one driver failing.
OFFLOAD_DOC: dict[str, object] = {
    "offload": "auto",
    "phase": "ready",
    "canary_interval_s": 10.0,
    "watch": "rescan",
    "engines": [
        {"name": "software", "driver": "openssl", "kind": "cpu", "proven": True,
         "selected": True, "mbit_s": 612.0, "hardware": False, "state": "ready", "reason": "",
         "transforms": [
             {"transform": "aes256gcm16", "driver": "openssl", "kat": "passed", "reason": "",
              "rates": _rates(41.0, 301.5, 612.0), "in_use_for": "<=511"},
             {"transform": "aes256-sha256", "driver": "openssl", "kat": "passed", "reason": "",
              "rates": _rates(20.1, 140.2, 250.3), "in_use_for": "all"}],
         "in_use_for": ["aes256gcm16@<=511", "aes256-sha256@all"]},
        {"name": "afalg", "driver": "rfc4106-gcm-aesni, cbc-aes-aesni", "kind": "cpu",
         "proven": True, "selected": True, "mbit_s": 701.0, "hardware": False,
         "state": "ready", "reason": "",
         "transforms": [
             {"transform": "aes256gcm16", "driver": "rfc4106-gcm-aesni", "kat": "passed",
              "reason": "", "rates": _rates(30.2, 290.0, 701.0), "in_use_for": ">=512"},
             {"transform": "aes256-sha256", "driver": "cbc-aes-aesni", "kat": "failed",
              "reason": "canary: known-answer test failed: case 2: ciphertext differs",
              "rates": _rates(15.0, 120.0, 230.0), "in_use_for": ""}],
         "in_use_for": ["aes256gcm16@>=512"]},
        {"name": "afalg:virtio_crypto_aes_cbc", "driver": "virtio_crypto_aes_cbc",
         "kind": "hardware", "proven": True, "selected": False, "mbit_s": 71.9,
         "hardware": True, "state": "ready", "reason": "",
         "transforms": [
             {"transform": "aes256-sha256", "driver": "virtio_crypto_aes_cbc", "kat": "passed",
              "reason": "", "rates": _rates(4.2, 33.0, 71.9), "in_use_for": ""}],
         "in_use_for": []},
        {"name": "cryptodev", "driver": "", "kind": "cpu", "proven": False, "selected": False,
         "mbit_s": None, "hardware": False, "state": "failed",
         "reason": "cannot open: EngineError: /dev/crypto: Permission denied",
         "transforms": [], "in_use_for": []},
    ],
    "table": {
        "offload": "auto",
        "transforms": {
            "aes256gcm16": {"bands": [{"engine": "software", "max_size": 511},
                                      {"engine": "afalg", "max_size": None}],
                            "verified": ["afalg", "software"]},
            "aes256-sha256": {"bands": [{"engine": "software", "max_size": None}],
                              "verified": ["software", "afalg:virtio_crypto_aes_cbc"]},
        },
        "notes": ["afalg is not used for aes256-sha256: canary: known-answer test failed: "
                  "case 2: ciphertext differs"],
    },
    "proposal": ["aes256gcm16", "aes256-sha256"],
    "kernel_proposal": ["aes256gcm16"],
    "kernel_usable": ["aes256gcm16"],
    "kernel_checked": True,
    "kernel_failed": [["aes256-sha256", "cbc-aes-aesni"]],
    "events": ["+41.2s afalg off aes256-sha256: canary: known-answer test failed: case 2: "
               "ciphertext differs"],
}  # fmt: skip


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
                engine="afalg:virtio_crypto_aes_cbc",
            ),
            TunnelStatus("kernel.example", "192.0.2.1", "198.51.100.8", "established"),
        ),
        shunts=(ShuntStatus("203.0.113.9/32", "clear", "no IPSECKEY", 600.0),),
        engines=(EngineStatus("cbc(aes)", "cbc-aes-aesni", "af_alg", True, True, 900.0),),
        dns={"listen": ["192.168.1.1:53"], "held": 1},
    )
    return Status.merge(daemon, [part])


class FakeDaemon(ThreadedControlServer):
    """A real ControlServer on a real socket, answering status/reload with canned replies."""

    def __init__(self, path: Path, reload_result: ReloadResult) -> None:
        self.reload_result = reload_result
        self.calls: list[str] = []
        table = CommandTable()
        table.register("status", self._status)
        table.register("reload", self._reload)
        table.register("offload", self._offload)
        table.register("offload-bench", self._offload_bench)
        super().__init__(path, table)

    async def _status(self, req: Request) -> dict[str, object]:
        return {"status": _status().to_json()}

    async def _reload(self, req: Request) -> dict[str, object]:
        return {"reload": self.reload_result.to_json()}

    async def _offload(self, req: Request) -> dict[str, object]:
        self.calls.append("offload")
        return {"offload": OFFLOAD_DOC}

    async def _offload_bench(self, req: Request) -> dict[str, object]:
        self.calls.append("offload-bench")
        return {"offload": {**OFFLOAD_DOC, "events": ["+99.0s bench: measured again"]}}


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
    assert "tunnels (2)" in table and "www.example.org" in table and "AES_GCM_16_256" in table
    assert "shunts (1)" in table and "no IPSECKEY" in table
    assert "engines (1)" in table and "cbc-aes-aesni" in table
    assert "generation 2" in table and "datapath  userspace-esp" in table
    assert {"tunnels", "shunts", "engines", "dns", "ike", "trust_anchors", "daemon"} == set(doc)
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
    for section in (
        "tunnels (0)",
        "shunts (0)",
        "engines (0)",
        "(no DNS front running; capture off",
    ):
        assert section in text
    assert "ike endpoint\n  (no IKE endpoint running)" in text


def test_status_shows_ike_endpoint_and_dns_front_counters_of_a_recorded_document() -> None:
    doc = json.loads(FLOODED_STATUS.read_text())
    lines = render_status(Status.from_json(doc)).splitlines()
    start = lines.index("ike endpoint")
    assert lines[start + 1 : start + 6] == [
        "  half-open  26/64: 0 known, 10 unverified, from 16 sources in 2 prefixes (largest 8);"
        " 0 peers with an IKE SA",
        "  limits     per source 4, per prefix 8, reserve 8 for known peers, COOKIEs from 10"
        " half-open (demanded now)",
        "  refused    per prefix 16749",  # zero counts (per source, no slot) are left out
        "  cookies    demanded 16988, accepted 16765",
        "  counters   received 33763, sent 17014",
    ]
    assert lines[start + 6] == ""  # no "given up" nor "fragments" line: all zero
    # the DNS front's counters are rows of the dns table, zero or not
    dns = {line.split()[0]: line.split()[1:] for line in lines[lines.index("dns") + 2 :]}
    for key in ("tcp_refused", "tcp_write_timeouts", "tcp_clients_now", "upstream_mismatched",
                "dropped_wan", "refused_not_lan"):  # fmt: skip
        assert dns[key] == ["0"], key
    assert dns["tcp_idle_timeouts"] == ["1"] and dns["lan_prefixes"] == ["-"]

    # the same endpoint after an IKE fragment flood (figures of docs/oe-gateway.md §7), and
    # a counter this oe does not know yet
    doc["ike"].update(fragments_dropped=3552, fragment_messages_abandoned=352,
                      fragment_bytes=258048, half_open_expired=5, puzzles_sent=7)  # fmt: skip
    lines = render_status(Status.from_json(doc)).splitlines()
    start = lines.index("ike endpoint")
    assert lines[start + 4 : start + 8] == [
        "  given up   expired 5",
        "  cookies    demanded 16988, accepted 16765",
        "  fragments  dropped 3552, messages abandoned 352, bytes held 258048",
        "  counters   received 33763, sent 17014, puzzles_sent 7",
    ]

    # the WAN addresses IKE uses now (a reload looks at them again)
    doc["ike"]["addresses"] = ["192.0.2.1", "2001:db8::1"]
    assert "  addresses  192.0.2.1, 2001:db8::1" in render_status(Status.from_json(doc))


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


def test_socket_of_a_config_with_errors_is_still_found(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A custom control_socket is read from a file that does not validate (bad values,
    unknown options, or a syntax error after it), so `oe status` and `oe reload` reach the
    daemon running from it; an unusable or unreachable option falls back to the default."""
    custom = tmp_path / "custom" / "ctl.sock"
    head = f"config oe 'global'\n\toption control_socket '{custom}'\n"
    cases = {
        "bad values": head + "\toption log_level 'loud'\n\toption bogus 'x'\n",
        "syntax error below": head + "\nconfig dns 'dns'\n\toption hold_limit 'unterminated\n",
        "a second oe section": head + "\nconfig oe 'again'\n\toption control_socket '/x'\n",
    }
    for what, text in cases.items():
        conf = tmp_path / "oe"
        conf.write_text(text)
        assert main(["--config", str(conf), "status"]) == 2, what
        assert capsys.readouterr().err == f"oe: daemon not running (no socket at {custom})\n"
    default = "no socket at /var/run/oe/control.sock"
    for what, text in {
        "syntax error above": "config oe 'global\n" + head,
        "relative path": head.replace(f"'{custom}'", "'run/ctl.sock'"),
        "longer than sun_path": head.replace(str(custom), "/" + "s" * 120),
    }.items():
        conf = tmp_path / "oe"
        conf.write_text(text)
        assert main(["--config", str(conf), "status"]) == 2, what
        assert default in capsys.readouterr().err, what


def test_reload_with_a_broken_config_reaches_the_daemon_and_prints_its_problems(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sock = tmp_path / "custom.sock"
    conf = tmp_path / "oe"
    conf.write_text(
        f"config oe 'global'\n\toption control_socket '{sock}'\n\toption log_level 'loud'\n"
    )
    problem = f"{conf}:3: oe.global.log_level: 'loud' is not one of debug, info"
    with FakeDaemon(sock, ReloadResult(False, 4, (problem,))):
        assert main(["--config", str(conf), "reload"]) == 1
    assert capsys.readouterr().out.splitlines() == [
        problem,
        "reload refused: 1 problem(s); config generation 4 keeps running",
    ]


def test_status_shows_the_engine_per_tunnel_and_the_richer_engines_table() -> None:
    text = render_status(_status())
    header = next(line for line in text.splitlines() if line.lstrip().startswith("peer "))
    assert header.split()[:8] == [
        "peer", "local", "remote", "state", "policy", "transform", "engine", "up"
    ]  # fmt: skip
    rows = {line.split()[0]: line.split() for line in text.splitlines()[1:] if line.strip()}
    assert rows["www.example.org"][6] == "afalg:virtio_crypto_aes_cbc"
    assert rows["kernel.example"][4] == "-"  # no policy, no transform: "-" for the engine
    # engines from a full offload document: hardware?, KAT summary, best 1400, in use for
    engines = tuple(EngineStatus.from_json(e) for e in OFFLOAD_DOC["engines"])  # type: ignore[attr-defined]
    status = Status.merge(_status().daemon, [StatusContribution(engines=engines)])
    lines = render_status(status).splitlines()
    start = lines.index("engines (4)")
    table = lines[start + 1 : start + 6]
    assert table[0].split() == ["name", "driver", "hw", "state", "KAT", "Mbit/s@1400", "in",
                                "use", "for"]  # fmt: skip
    by = {line.split()[0]: line for line in table[1:]}
    assert (
        "2/2 passed" in by["software"] and "aes256gcm16@<=511, aes256-sha256@all" in by["software"]
    )
    assert "1/2 passed" in by["afalg"] and " 701 " in by["afalg"]
    assert " yes " in by["afalg:virtio_crypto_aes_cbc"] and by[
        "afalg:virtio_crypto_aes_cbc"
    ].endswith(" -")
    assert " failed " in by["cryptodev"]
    assert "  cryptodev: cannot open: EngineError: /dev/crypto: Permission denied" in lines


def test_render_offload_from_a_recorded_document() -> None:
    text = render_offload(json.loads(json.dumps(OFFLOAD_DOC)))
    lines = text.splitlines()
    assert lines[0] == "offload auto  phase ready  canary every 10s  hotplug rescan"
    head = lines.index("engines (4)") + 1
    assert lines[head].split() == ["engine", "driver", "hw", "transform", "KAT", "Mbit/s@64",
                                   "Mbit/s@512", "Mbit/s@1400", "in", "use", "for"]  # fmt: skip
    rows = [line.split() for line in lines[head + 1 : head + 7]]
    assert rows == [
        ["software", "openssl", "no", "aes256gcm16", "passed", "41", "302", "612", "<=511"],
        ["software", "openssl", "no", "aes256-sha256", "passed", "20", "140", "250", "all"],
        ["afalg", "rfc4106-gcm-aesni", "no", "aes256gcm16", "passed", "30", "290", "701", ">=512"],
        ["afalg", "cbc-aes-aesni", "no", "aes256-sha256", "FAILED", "15", "120", "230", "-"],
        ["afalg:virtio_crypto_aes_cbc", "virtio_crypto_aes_cbc", "yes", "aes256-sha256",
         "passed", "4", "33", "72", "-"],
        ["cryptodev", "-", "no", "-", "failed", "-", "-", "-", "-"],
    ]  # fmt: skip
    assert "  cryptodev: cannot open: EngineError: /dev/crypto: Permission denied" in lines
    assert (
        "  afalg aes256-sha256: canary: known-answer test failed: case 2: ciphertext differs"
        in lines
    )
    assert "esp proposal  aes256gcm16, aes256-sha256" in lines
    assert "kernel drivers pass  aes256gcm16" in lines
    assert lines[-2] == "events"
    # an old daemon's document without any detail still renders
    assert "engines (0)" in render_offload({"offload": "off"})


def test_oe_offload_table_json_and_bench_against_a_running_server(
    sock: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with FakeDaemon(sock, ReloadResult(True, 3)) as fake:
        assert main(["--socket", str(sock), "offload"]) == 0
        table = capsys.readouterr().out
        assert main(["--socket", str(sock), "offload", "--json"]) == 0
        doc = json.loads(capsys.readouterr().out)
        assert main(["--socket", str(sock), "offload", "bench"]) == 0
        bench = capsys.readouterr().out
        calls = list(fake.calls)
    assert table == render_offload(OFFLOAD_DOC) + "\n"
    assert doc == json.loads(json.dumps(OFFLOAD_DOC))
    assert calls == ["offload", "offload", "offload-bench"]
    assert "+99.0s bench: measured again" in bench and "engines (4)" in bench


def test_oe_offload_against_a_daemon_without_it_is_one_line_exit_1(
    sock: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    table = CommandTable()
    table.register("status", lambda req: asyncio.sleep(0, {"status": {}}))
    loop = asyncio.new_event_loop()
    server = ControlServer(sock, table)
    loop.run_until_complete(server.start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        rc = main(["--socket", str(sock), "offload"])
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.run_until_complete(server.stop())
        loop.close()
    assert rc == 1
    err = capsys.readouterr().err
    assert err.startswith("oe: unknown command 'offload'") and err.count("\n") == 1


def test_render_offload_shows_the_kernel_esp_self_test() -> None:
    doc = {
        "offload": "auto",
        "kernel_selftest": {
            "offer": ["aes256gcm16", "chacha20poly1305"],
            "first_offer_s": 1.5,
            "transforms": {
                "aes256gcm16": {
                    "state": "passed",
                    "offered": True,
                    "result": {"driver": "rfc4106-gcm-aesni"},
                },
                "aes128gcm16": {
                    "state": "failed",
                    "stale": False,
                    "offered": False,
                    "why_not": "24 of 48 datagrams arrived",
                    "result": {"driver": "rfc4106-gcm-aes-faulty"},
                },
            },
            "moves": [
                {"peer": "203.0.113.10", "transform": "aes128gcm16", "error": None, "took_s": 0.9}
            ],
        },
    }
    lines = render_offload(doc).splitlines()
    head = "kernel ESP self-test  offer aes256gcm16, chacha20poly1305"
    at = lines.index(f"{head}  (first offered 1.5s after start)")
    rows = [line.split() for line in lines[at + 2 : at + 4]]
    assert rows[0][:4] == ["aes128gcm16", "failed", "rfc4106-gcm-aes-faulty", "no"]
    assert rows[1] == ["aes256gcm16", "passed", "rfc4106-gcm-aesni", "yes"]
    assert "  moved a Child SA with 203.0.113.10 off aes128gcm16: done in 0.9s" in lines


def test_status_names_the_networks_devices_and_addresses_and_why_oe_is_off() -> None:
    from dataclasses import replace

    base = DaemonStatus("0.1.0", 1, 3.0, "/etc/config/oe", 1, True, "kernel", None, ())
    up = replace(base, network={
        "wan": {"networks": ["wan (eth1, netifd)", "wan6 (eth1, netifd)"], "devices": ["eth1"],
                "addresses": ["203.0.113.2", "2001:db8:1::2"], "problem": ""},
        "lan": {"networks": ["lan (br-lan, netifd)"], "devices": ["br-lan"],
                "prefixes": ["192.168.1.0/24"]},
    })  # fmt: skip
    text = render_status(Status.merge(up, []))
    assert "WAN       wan (eth1, netifd), wan6 (eth1, netifd): 203.0.113.2, 2001:db8:1::2" in text
    assert "LAN       lan (br-lan, netifd): 192.168.1.0/24" in text
    why = "oe.global.wan_interface: network 'wan' is down with no device yet (netifd)"
    down = replace(base, network={"wan": {"networks": [f"wan (none: {why})"], "devices": [],
                                          "addresses": [], "problem": why}})  # fmt: skip
    line = next(
        x for x in render_status(Status.merge(down, [])).splitlines() if x.startswith("WAN")
    )
    assert line.endswith(f": none  (OE off: {why})"), line
    # the document round-trips through JSON (the CLI reads it from the socket)
    assert Status.from_json(json.loads(json.dumps(Status.merge(up, []).to_json()))).daemon == up
