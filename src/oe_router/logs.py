"""Where the daemon's log lines go: syslog (/dev/log, as logd reads it) or stderr.

Why syslog: procd logs a service's stderr at LOG_ERR whatever the line says, so
``logread`` showed ``daemon.err`` for an info line. Through /dev/log each line carries its
own priority and logd keeps it: ``daemon.info oe-routerd[pid]: dns: ...``.

The datagram is RFC 3164 as glibc's and musl's ``syslog()`` send it:
``<PRI>Mmm dd hh:mm:ss oe-routerd[PID]: component: message``. The timestamp is not
decoration: logd (ubox log/syslog.c) strips 16 bytes whenever byte 15 is a space, so a
line without one loses its tag when the pid has two digits. logd receives at most 1023
bytes a datagram; longer lines are cut here, at a character boundary.

stderr stays the default (tests, foreground runs) in the old one-line form
``info oe-routerd[component]: message``; it also stays where tracebacks go, which procd
passes to logd. Imports nothing from the project, so every layer may use ``NOTICE``.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import sys
import time
from typing import TextIO

__all__ = [
    "DEV_LOG",
    "LEVELS",
    "NOTICE",
    "StderrFormatter",
    "SyslogHandler",
    "component",
    "configure_logging",
    "level_from_name",
    "one_line",
    "syslog_address",
    "syslog_datagram",
]

PROG = "oe-routerd"
DEV_LOG = "/dev/log"

#: syslog's notice, between info and warning: the decisions a person reads (a tunnel up).
NOTICE = 25
logging.addLevelName(NOTICE, "NOTICE")

#: UCI ``log_level`` words (and syslog's own spellings) to logging levels.
LEVELS: dict[str, int] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "notice": NOTICE,
    "warn": logging.WARNING,
    "warning": logging.WARNING,
    "err": logging.ERROR,
    "error": logging.ERROR,
    "crit": logging.CRITICAL,
}

#: logging level -> (syslog severity, the word the stderr form uses), RFC 5424 table 2.
_SEVERITY: tuple[tuple[int, int, str], ...] = (
    (logging.CRITICAL, 2, "crit"),
    (logging.ERROR, 3, "err"),
    (logging.WARNING, 4, "warning"),
    (NOTICE, 5, "notice"),
    (logging.INFO, 6, "info"),
    (logging.DEBUG, 7, "debug"),
)

LOG_DAEMON = 3  #: syslog facility "daemon" (RFC 5424 table 1)
#: logd's receive buffer (LOG_LINE_SIZE 1024, less its terminating NUL)
MAX_DATAGRAM = 1023
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def level_from_name(name: str) -> int:
    """Map a UCI log level to a logging level; unknown names mean info."""
    return LEVELS.get(str(name).strip().lower(), logging.INFO)


def _severity(levelno: int) -> tuple[int, str]:
    for floor, severity, word in _SEVERITY:
        if levelno >= floor:
            return severity, word
    return 7, "debug"


def component(record: logging.LogRecord) -> str:
    """``oe_router.dns.front`` -> ``dns``: the layer a line comes from."""
    parts = record.name.split(".")
    return parts[1] if parts[0] == "oe_router" and len(parts) > 1 else parts[0]


def one_line(record: logging.LogRecord) -> str:
    """The message on one line; an exception adds its type and text, never a traceback."""
    message = record.getMessage()
    if record.exc_info and record.exc_info[1] is not None:
        exc = record.exc_info[1]
        message = f"{message}: {type(exc).__name__}: {exc}"
    return " | ".join(line for line in message.splitlines() if line) or message


class StderrFormatter(logging.Formatter):
    """`<level> oe-routerd[<component>]: <message>` on one line, no timestamp."""

    def format(self, record: logging.LogRecord) -> str:
        word = _severity(record.levelno)[1]
        return f"{word} {PROG}[{component(record)}]: {one_line(record)}"


def _timestamp(now: float) -> str:
    """RFC 3164's ``Mmm dd hh:mm:ss`` (day space-padded), local time, English months."""
    t = time.localtime(now)
    return f"{_MONTHS[t.tm_mon - 1]} {t.tm_mday:2d} {t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}"


def syslog_datagram(
    severity: int, text: str, now: float, pid: int, tag: str = PROG, facility: int = LOG_DAEMON
) -> bytes:
    """One /dev/log datagram: ``<PRI>Mmm dd hh:mm:ss TAG[PID]: text``, at most 1023 bytes."""
    head = f"<{facility * 8 + severity}>{_timestamp(now)} {tag}[{pid}]: ".encode()
    body = text.encode("utf-8", "replace")
    room = MAX_DATAGRAM - len(head)
    if len(body) > room:
        body = body[:room]
        while body and (body[-1] & 0xC0) == 0x80:  # a cut multi-byte character goes whole
            body = body[:-1]
        if body and body[-1] >= 0xC0:
            body = body[:-1]
    return head + body


class SyslogHandler(logging.Handler):
    """Sends each record to logd's /dev/log datagram socket, never blocking the loop.

    A full socket buffer (logd stuck) drops the line and counts it; the next line that
    gets through says how many went. With /dev/log gone (logd restarting), a line goes to
    ``fallback`` (stderr) instead, and the socket is tried again at most once a second.
    """

    def __init__(
        self,
        address: str = DEV_LOG,
        fallback: TextIO | None = None,
        facility: int = LOG_DAEMON,
        tag: str = PROG,
    ) -> None:
        super().__init__()
        self.address = address
        self.facility = facility
        self.tag = tag
        self.fallback = fallback if fallback is not None else sys.stderr
        self.dropped = 0
        self._sock: socket.socket | None = None
        self._retry_at = 0.0
        self._stderr = StderrFormatter()

    def connect(self) -> socket.socket:
        """Connect to ``address``; OSError when nothing listens there."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.connect(self.address)
        except OSError:
            sock.close()
            raise
        if self._sock is not None:
            self._sock.close()
        self._sock = sock
        return sock

    def _send(self, data: bytes) -> bool:
        """True when logd has the datagram (or it was dropped as logd was busy)."""
        now = time.monotonic()
        sock = self._sock
        if sock is None:
            if now < self._retry_at:
                return False
            try:
                sock = self.connect()
            except OSError:
                self._retry_at = now + 1.0
                return False
        for attempt in (1, 2):
            try:
                sock.send(data)
                return True
            except BlockingIOError:
                self.dropped += 1
                return True
            except OSError as exc:
                if exc.errno == errno.EMSGSIZE:
                    return False
                # logd restarted (ECONNREFUSED) or /dev/log was replaced: once more, anew
                sock.close()
                self._sock = None
                if attempt == 2:
                    break
                try:
                    sock = self.connect()
                except OSError:
                    break
        self._retry_at = now + 1.0
        return False

    def emit(self, record: logging.LogRecord) -> None:
        try:
            severity, _ = _severity(record.levelno)
            text = f"{component(record)}: {one_line(record)}"
            if self.dropped and self._sock is not None:
                n = self.dropped
                note = f"log: {n} line(s) dropped (logd did not keep up)"
                sent = self._send(syslog_datagram(4, note, record.created, os.getpid(), self.tag))
                self.dropped = 0 if sent and self.dropped == n else n  # not out: say it later
            data = syslog_datagram(
                severity, text, record.created, os.getpid(), self.tag, self.facility
            )
            if not self._send(data):
                self.fallback.write(self._stderr.format(record) + "\n")
                self.fallback.flush()
        except Exception:
            self.handleError(record)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        super().close()


def configure_logging(stream: TextIO | None = None, syslog: str | None = None) -> logging.Logger:
    """Send the package's logs, one line each, to ``syslog`` (a /dev/log path) or stderr.

    asyncio's own reports (an exception nobody caught in a task or callback) go the same
    way: one line naming the exception, never a multi-line traceback in logd. When the
    syslog socket cannot be reached the lines go to stderr, after one line saying so.
    """
    err: TextIO = sys.stderr if stream is None else stream
    handler: logging.Handler
    problem = None
    if syslog is not None:
        handler = SyslogHandler(syslog, fallback=err)
        try:
            handler.connect()
        except OSError as exc:
            handler.close()
            problem = f"syslog: cannot reach {syslog} ({exc.strerror or exc}): logging to stderr"
    if syslog is None or problem is not None:
        handler = logging.StreamHandler(err)
        handler.setFormatter(StderrFormatter())
    root = logging.getLogger("oe_router")
    for old in root.handlers:
        old.close()
    root.handlers[:] = [handler]
    root.propagate = False
    root.setLevel(logging.INFO)
    aio = logging.getLogger("asyncio")
    aio.handlers[:] = [handler]
    aio.propagate = False
    if problem is not None:
        logging.getLogger("oe_router.daemon").warning("%s", problem)
    return root


def syslog_address() -> str | None:
    """The /dev/log path this process logs to, or None (stderr): helper processes (the
    userspace datapath's ESP workers) log the same way, not to a stderr that procd files
    at LOG_ERR."""
    for handler in logging.getLogger("oe_router").handlers:
        if isinstance(handler, SyslogHandler):
            return handler.address
    return None
