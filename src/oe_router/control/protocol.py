"""Control protocol: newline-delimited JSON, one request object per line.

Request: {"cmd": "<name>", ...arguments}. Reply: {"ok": true, ...} or
{"ok": false, "error": "<one line>"}. This module is sans-IO: it turns lines
into requests and replies into lines, and dispatches requests through a
`CommandTable` that the daemon fills. The socket code lives in `server.py`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

JsonObject = dict[str, Any]
Handler = Callable[["Request"], Awaitable[JsonObject]]

# A request line longer than this is refused: the control API carries small
# commands, and an unbounded line would let any local client grow our memory.
MAX_LINE = 64 * 1024

log = logging.getLogger("oe_router.control")


class ProtocolError(Exception):
    """A request that cannot be understood; the message goes back to the client."""


class CommandError(Exception):
    """A handler's refusal; the message goes back to the client as `error`."""


@dataclass(frozen=True)
class Request:
    """One parsed request: the command name and its other keys as arguments."""

    cmd: str
    args: JsonObject


def decode_request(line: bytes) -> Request:
    """Parse one request line (without or with its newline)."""
    if len(line) > MAX_LINE:
        raise ProtocolError(f"request longer than {MAX_LINE} bytes")
    try:
        obj = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError:
        raise ProtocolError("request is not UTF-8") from None
    except json.JSONDecodeError as exc:
        raise ProtocolError(f"malformed JSON: {exc.msg} at column {exc.colno}") from None
    if not isinstance(obj, dict):
        raise ProtocolError('request must be a JSON object like {"cmd": "status"}')
    cmd = obj.get("cmd")
    if not isinstance(cmd, str) or not cmd:
        raise ProtocolError('request has no "cmd" string')
    args = {k: v for k, v in obj.items() if k != "cmd"}
    return Request(cmd=cmd, args=args)


def encode_request(cmd: str, **args: Any) -> bytes:
    return (json.dumps({"cmd": cmd, **args}, separators=(",", ":")) + "\n").encode()


def encode_reply(reply: JsonObject) -> bytes:
    return (json.dumps(reply, separators=(",", ":")) + "\n").encode()


def error_reply(message: str) -> JsonObject:
    return {"ok": False, "error": message}


class CommandTable:
    """Maps command names to async handlers; later issues register up, down, ...

    Each handler gets the `Request` and returns the reply body; `ok: true` is
    added for it. A handler refuses with `CommandError`.
    """

    def __init__(self) -> None:
        self._handlers: dict[str, tuple[Handler, str]] = {}

    def register(self, name: str, handler: Handler, help_text: str = "") -> None:
        if name in self._handlers:
            raise ValueError(f"control command {name!r} is already registered")
        self._handlers[name] = (handler, help_text)

    def names(self) -> list[str]:
        return sorted(self._handlers)

    def help(self) -> dict[str, str]:
        return {name: text for name, (_, text) in sorted(self._handlers.items())}

    async def dispatch(self, line: bytes) -> JsonObject:
        """Handle one request line and always return a reply (never raises for bad input)."""
        try:
            request = decode_request(line)
        except ProtocolError as exc:
            return error_reply(str(exc))
        entry = self._handlers.get(request.cmd)
        if entry is None:
            known = ", ".join(self.names())
            return error_reply(f"unknown command {request.cmd!r} (known: {known})")
        handler, _ = entry
        try:
            body = await handler(request)
        except CommandError as exc:
            return error_reply(f"{request.cmd}: {exc}")
        except Exception as exc:
            # A bug in a handler must not take the control socket down with it.
            log.error("command %s failed: %s: %s", request.cmd, type(exc).__name__, exc)
            return error_reply(f"{request.cmd}: internal error ({type(exc).__name__}: {exc})")
        return {"ok": True, **body}
