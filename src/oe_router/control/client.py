"""Blocking client for the control socket, used by the `oe` CLI."""

from __future__ import annotations

import errno
import json
import socket
import time
from pathlib import Path
from typing import Any

from oe_router.control.protocol import MAX_LINE, encode_request

JsonObject = dict[str, Any]

# Backoff between connect attempts while the daemon's listen backlog is full.
CONNECT_RETRY_FIRST = 0.005
CONNECT_RETRY_MAX = 0.1


class ControlError(Exception):
    """The daemon answered with an error, or the answer was not understood."""


class DaemonUnreachable(ControlError):
    """The daemon could not be asked at all (permissions, timeout, broken connection)."""


class DaemonNotRunning(DaemonUnreachable):
    """Nothing listens on the control socket; the message says which path was tried."""


class ControlClient:
    """One request per call over a fresh connection: simple, and the CLI makes few calls.

    `timeout` bounds the whole call: waiting for a busy daemon to accept (its listen
    backlog full: connect says EAGAIN), sending, and reading the reply.
    """

    def __init__(self, path: Path, timeout: float = 10.0) -> None:
        self.path = path
        self.timeout = timeout

    def request(self, cmd: str, **args: Any) -> JsonObject:
        """Send one command; return the reply with `ok: true`, else raise ControlError."""
        deadline = time.monotonic() + self.timeout
        sock = self._connect(deadline)
        try:
            line = self._exchange(sock, encode_request(cmd, **args), deadline)
        finally:
            sock.close()
        try:
            reply = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ControlError("daemon sent a reply that is not JSON") from None
        if not isinstance(reply, dict) or "ok" not in reply:
            raise ControlError("daemon sent a reply without 'ok'")
        if reply["ok"] is not True:
            raise ControlError(str(reply.get("error", "unspecified error")))
        return reply

    def _connect(self, deadline: float) -> socket.socket:
        """A connected socket; retries while the daemon's backlog is full, until `deadline`."""
        delay = CONNECT_RETRY_FIRST
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            try:
                sock.connect(str(self.path))
                return sock
            except BlockingIOError:  # EAGAIN: the daemon is busy accepting; wait a little
                sock.close()
                left = deadline - time.monotonic()
                if left <= 0:
                    raise DaemonUnreachable(
                        f"daemon busy: no connection accepted within {self.timeout:g} s"
                    ) from None
                time.sleep(min(delay, left))
                delay = min(delay * 2, CONNECT_RETRY_MAX)
            except FileNotFoundError:
                sock.close()
                raise DaemonNotRunning(f"daemon not running (no socket at {self.path})") from None
            except OSError as exc:
                sock.close()
                if exc.errno == errno.ECONNREFUSED:
                    raise DaemonNotRunning(
                        f"daemon not running (stale socket at {self.path})"
                    ) from None
                if exc.errno in (errno.EACCES, errno.EPERM):
                    raise DaemonUnreachable(
                        f"permission denied on {self.path} (run as root?)"
                    ) from None
                raise DaemonUnreachable(f"cannot connect to {self.path}: {exc.strerror}") from None

    def _exchange(self, sock: socket.socket, data: bytes, deadline: float) -> bytes:
        try:
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            sock.sendall(data)
            buf = bytearray()
            while not buf.endswith(b"\n"):
                sock.settimeout(max(deadline - time.monotonic(), 0.001))
                chunk = sock.recv(65536)
                if not chunk:
                    break
                buf += chunk
                if len(buf) > 64 * MAX_LINE:
                    raise ControlError("daemon reply too long")
        except TimeoutError:
            raise DaemonUnreachable(f"daemon did not answer within {self.timeout:g} s") from None
        except OSError as exc:
            raise DaemonUnreachable(f"connection to {self.path} failed: {exc.strerror}") from None
        if not buf:
            raise DaemonUnreachable("daemon closed the connection without a reply")
        return bytes(buf)
