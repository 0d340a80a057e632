"""The daemon's log lines through syslog: the datagrams as logd reads them, and the fallback.

A unix datagram socket in tmp stands in for /dev/log. ``logd_reads`` does what logd's
``log_add`` (ubox log/syslog.c) does with a datagram: take ``<PRI>``, then drop 16 bytes
when byte 15 is a space (the RFC 3164 timestamp). tests/host/test_logd.py runs the real
logd and logread.
"""

from __future__ import annotations

import io
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from oe_router.daemon import parse_args
from oe_router.logs import NOTICE, SyslogHandler, configure_logging, syslog_datagram

#: syslog facility "daemon" (3) times 8, plus the severity
PRI = {"crit": 26, "err": 27, "warning": 28, "notice": 29, "info": 30, "debug": 31}
STAMP = r"[A-Z][a-z]{2} [ 1-3][0-9] [0-2][0-9]:[0-5][0-9]:[0-6][0-9]"


def logd_reads(datagram: bytes) -> tuple[int, bytes]:
    """(priority, stored text) as logd's log_add makes them from a /dev/log datagram."""
    buf = datagram.replace(b"\n", b" ").rstrip()
    prio = 0
    m = re.match(rb"<([0-9]*)>(.*)", buf, re.S)
    if m:
        prio, buf = int(m[1] or 0), m[2]
    if len(buf) + 1 > 16 and buf[15:16] == b" ":
        buf = buf[16:]
    return prio, buf


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """configure_logging rewires the package's loggers: put them back for the next test."""
    saved = []
    for name in ("oe_router", "asyncio"):
        lg = logging.getLogger(name)
        saved.append((lg, list(lg.handlers), lg.propagate, lg.level))
    yield
    for lg, handlers, propagate, level in saved:
        for h in lg.handlers:
            if h not in handlers:
                h.close()
        lg.handlers[:] = handlers
        lg.propagate, lg.level = propagate, level


@pytest.fixture
def devlog(tmp_path: Path) -> Iterator[socket.socket]:
    """A datagram socket where logd's /dev/log would be (``.getsockname()`` is its path)."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(str(tmp_path / "log"))
    server.settimeout(10)
    yield server
    server.close()


def received(server: socket.socket) -> list[bytes]:
    out = []
    server.setblocking(False)
    try:
        while True:
            out.append(server.recv(4096))
    except BlockingIOError:
        pass
    finally:
        server.settimeout(10)
    return out


def test_each_level_gets_its_priority_facility_daemon_and_the_tag_with_the_pid(
    devlog: socket.socket, restore_logging: None
) -> None:
    root = configure_logging(syslog=devlog.getsockname())
    root.setLevel(logging.DEBUG)
    for lg, level in (
        ("oe_router.dns.front", logging.DEBUG),
        ("oe_router.dns.front", logging.INFO),
        ("oe_router.oe", NOTICE),
        ("oe_router.daemon", logging.WARNING),
        ("oe_router.ike", logging.ERROR),
        ("oe_router.daemon", logging.CRITICAL),
    ):
        logging.getLogger(lg).log(level, "line %s", logging.getLevelName(level))
    got = [devlog.recv(4096) for _ in range(6)]
    pid = os.getpid()
    expect = [
        (PRI["debug"], f"oe-routerd[{pid}]: dns: line DEBUG"),
        (PRI["info"], f"oe-routerd[{pid}]: dns: line INFO"),
        (PRI["notice"], f"oe-routerd[{pid}]: oe: line NOTICE"),
        (PRI["warning"], f"oe-routerd[{pid}]: daemon: line WARNING"),
        (PRI["err"], f"oe-routerd[{pid}]: ike: line ERROR"),
        (PRI["crit"], f"oe-routerd[{pid}]: daemon: line CRITICAL"),
    ]
    assert [(p, t.decode()) for p, t in map(logd_reads, got)] == expect
    for d in got:  # RFC 3164 as syslog() sends it: the 15-byte timestamp, then a space
        assert re.fullmatch(rb"<\d+>" + STAMP.encode() + rb" oe-routerd\[\d+\]: .+", d), d


@pytest.mark.parametrize("pid", [7, 42, 999, 1234, 65535, 4194304])
def test_logd_keeps_the_tag_whatever_the_pids_length(pid: int) -> None:
    """logd drops 16 bytes when byte 15 is a space: with the timestamp that is the
    timestamp; without it a two-digit pid would lose "oe-routerd[42]" instead."""
    data = syslog_datagram(6, "dns: hello", time.time(), pid)
    assert logd_reads(data) == (30, f"oe-routerd[{pid}]: dns: hello".encode())


def test_a_line_is_one_datagram_of_at_most_1023_bytes_cut_at_a_character(
    devlog: socket.socket, restore_logging: None
) -> None:
    configure_logging(syslog=devlog.getsockname())
    log = logging.getLogger("oe_router.dns")
    log.info("%s", "é" * 2000)  # two bytes each: the cut falls inside one
    try:
        raise ValueError("bad\nvalue")
    except ValueError:
        log.exception("two\nlines")
    long, exc = devlog.recv(65536), devlog.recv(65536)
    assert len(long) <= 1023 and long.decode().endswith("é")  # valid UTF-8 to the end
    assert (
        logd_reads(exc)[1].decode().endswith("dns: two | lines: ValueError: bad | value")
    )  # no traceback, one line


def test_log_level_notice_passes_notice_and_drops_info(
    devlog: socket.socket, restore_logging: None
) -> None:
    root = configure_logging(syslog=devlog.getsockname())
    root.setLevel(NOTICE)
    log = logging.getLogger("oe_router.oe")
    log.info("not this")
    log.log(NOTICE, "this")
    assert [logd_reads(d)[0] for d in received(devlog)] == [PRI["notice"]]


def test_no_syslog_socket_falls_back_to_stderr_with_one_line_saying_so(
    tmp_path: Path, restore_logging: None
) -> None:
    err = io.StringIO()
    configure_logging(stream=err, syslog=str(tmp_path / "nobody"))
    logging.getLogger("oe_router.dns").info("still here")
    assert err.getvalue().splitlines() == [
        f"warning oe-routerd[daemon]: syslog: cannot reach {tmp_path / 'nobody'}"
        " (No such file or directory): logging to stderr",
        "info oe-routerd[dns]: still here",
    ]


def test_stderr_stays_the_default_in_the_one_line_form(restore_logging: None) -> None:
    err = io.StringIO()
    configure_logging(stream=err).setLevel(logging.DEBUG)
    logging.getLogger("oe_router.oe").log(NOTICE, "example.org (192.0.2.7): protected")
    assert err.getvalue() == "notice oe-routerd[oe]: example.org (192.0.2.7): protected\n"
    assert parse_args([]).syslog is None
    assert parse_args(["--syslog"]).syslog == "/dev/log"
    assert parse_args(["--syslog", "/tmp/x"]).syslog == "/tmp/x"


def test_logd_gone_then_back_lines_go_to_stderr_meanwhile(
    tmp_path: Path, devlog: socket.socket, poll: Callable[..., bool]
) -> None:
    """logd restarting: its socket is gone for a while. No line is lost: stderr takes
    them (procd passes it on) until /dev/log answers again."""
    path = devlog.getsockname()
    err = io.StringIO()
    handler = SyslogHandler(path, fallback=err)
    log = logging.getLogger("test.logd-restart")
    log.propagate, log.handlers = False, [handler]
    log.setLevel(logging.DEBUG)
    try:
        log.warning("before")
        assert logd_reads(devlog.recv(4096))[1].endswith(b"]: test: before")
        devlog.close()
        os.unlink(path)
        log.warning("while gone")
        assert err.getvalue() == "warning oe-routerd[test]: while gone\n"
        back = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        back.bind(path)
        back.setblocking(False)
        got: list[bytes] = []

        def arrived() -> bool:
            log.warning("again")  # retried at most once a second
            got.extend(received(back))
            return bool(got)

        assert poll(arrived, timeout=10)
        assert logd_reads(got[0])[1].endswith(b"]: test: again")
        back.close()
    finally:
        handler.close()


def test_a_stuck_logd_never_blocks_the_daemon_and_the_loss_is_counted(
    devlog: socket.socket,
) -> None:
    """Nobody reads the socket: sends would block once its queue is full. They drop
    instead, and the first line that gets through afterwards says how many went."""
    handler = SyslogHandler(devlog.getsockname(), fallback=io.StringIO())
    log = logging.getLogger("test.stuck")
    log.propagate, log.handlers = False, [handler]
    log.setLevel(logging.DEBUG)
    try:
        t0 = time.monotonic()
        for i in range(3000):
            log.info("line %d", i)
        assert time.monotonic() - t0 < 10  # it would hang forever if send blocked
        dropped = handler.dropped
        assert dropped > 0
        delivered = len(received(devlog))
        assert delivered + dropped == 3000
        log.info("after")
        note, after = (logd_reads(d) for d in received(devlog))
        assert note == (PRI["warning"], f"oe-routerd[{os.getpid()}]: log: {dropped} line(s)"
                        " dropped (logd did not keep up)".encode())  # fmt: skip
        assert after[1].endswith(b"test: after")
    finally:
        handler.close()


CONFIG = """config oe 'global'
\toption enabled '0'
\toption log_level 'info'
\toption control_socket '{socket}'
"""


def test_the_real_daemon_with_syslog_sends_its_lines_at_their_priorities(
    tmp_path: Path, devlog: socket.socket, poll: Callable[..., bool]
) -> None:
    """oe-routerd --syslog PATH (what /etc/init.d/oe runs, with /dev/log): start-up at
    notice, a refused reload at warning, each tagged oe-routerd[its pid]; nothing on stderr."""
    cfg = tmp_path / "oe"
    cfg.write_text(CONFIG.format(socket=tmp_path / "control.sock"))
    path = devlog.getsockname()
    errfile = tmp_path / "stderr"
    with errfile.open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "oe_router.daemon", "--config", str(cfg), "--syslog", path],
            stdout=err,
            stderr=err,
            start_new_session=True,
        )
    lines: list[tuple[int, str]] = []

    def saw(text: str) -> bool:
        lines.extend((p, t.decode()) for p, t in map(logd_reads, received(devlog)))
        return proc.poll() is not None or any(text in t for _, t in lines)

    try:
        tag = f"oe-routerd[{proc.pid}]: "
        assert poll(lambda: saw(" running (pid "), timeout=60), errfile.read_text()
        assert (PRI["notice"], f"{tag}daemon: oe disabled in {cfg}: services not started") in lines
        cfg.write_text(CONFIG.format(socket=tmp_path / "control.sock").replace("info", "chatty"))
        proc.send_signal(signal.SIGHUP)
        assert poll(lambda: saw("reload refused: 1 problem"), timeout=30), lines
        refused = [(p, t) for p, t in lines if "reload refused" in t]
        assert refused and all(p == PRI["warning"] for p, _ in refused), refused
        assert all(t.startswith(f"{tag}daemon: ") for _, t in refused)
        proc.terminate()
        assert proc.wait(30) == 0
        saw("")
        assert (PRI["notice"], f"{tag}daemon: stopped") in lines
        assert errfile.read_text() == ""  # every line went to syslog, none twice
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


@pytest.mark.usefixtures("restore_logging")
def test_helper_processes_learn_where_the_daemon_logs(
    tmp_path: Path, devlog: socket.socket
) -> None:
    """The userspace datapath's ESP workers are told the daemon's /dev/log (their stderr
    would reach logd through procd at LOG_ERR)."""
    from oe_router.logs import syslog_address

    address = devlog.getsockname()
    configure_logging(syslog=address)
    assert syslog_address() == address
    configure_logging(stream=io.StringIO())
    assert syslog_address() is None
