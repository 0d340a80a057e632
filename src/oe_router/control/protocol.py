"""Control protocol: newline-delimited JSON, one request object per line.

Request: {"cmd": "<name>", ...arguments}. Reply: {"ok": true, ...} or
{"ok": false, "error": "<one line>"}. This module is sans-IO: it turns lines
into requests and replies into lines, and dispatches requests through a
`CommandTable` that the daemon fills. The socket code lives in `server.py`.

Any local client may be hostile, so a request is bounded before `json.loads`
sees it (size, nesting depth, digit runs: the json module recurses per level
and `int()` refuses long digit strings, both with exceptions that are not
JSONDecodeError), and every command's arguments are checked against the
declared table `COMMAND_ARGS` (names, JSON types, lengths, choices, syntax)
before its handler runs. `parse_request` is the whole parser: bytes in, a
checked `Request` out, or `ProtocolError`; nothing else escapes it.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import math
import re
from array import array
from collections.abc import Awaitable, Callable, Mapping
from itertools import accumulate
from typing import Any

from oe_router.records import record

JsonObject = dict[str, Any]
Handler = Callable[["Request"], Awaitable[JsonObject]]

# A request line longer than this is refused: the control API carries small
# commands, and an unbounded line would let any local client grow our memory.
MAX_LINE = 64 * 1024
# Requests are flat objects; a little nesting is allowed for future arguments.
MAX_DEPTH = 8
# The longest run of digits in a number (2**64 has 20).
MAX_DIGITS = 32
MAX_CMD = 64
# How much of a client's text an error message quotes back.
MAX_SHOWN = 40
# The longest error text a reply carries (one line).
MAX_ERROR = 1000

log = logging.getLogger("oe_router.control")


class ProtocolError(Exception):
    """A request that cannot be understood; the message goes back to the client."""


class CommandError(Exception):
    """A handler's refusal; the message goes back to the client as `error`."""


@record(frozen=True)
class Request:
    """One parsed request: the command name and its other keys as arguments."""

    cmd: str
    args: JsonObject


def shown(value: object) -> str:
    """`repr` of client data cut to MAX_SHOWN characters, for error messages."""
    text = repr(value)
    return text if len(text) <= MAX_SHOWN else text[: MAX_SHOWN - 3] + "..."


def one_line(text: str, limit: int = MAX_ERROR) -> str:
    """`text` on one line and at most `limit` characters (replies and log lines)."""
    flat = " | ".join(part for part in text.splitlines() if part.strip()) or text.strip()
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


# ------------------------------------------------------------------ arguments

_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]*[A-Za-z0-9_])?")
_JSON_TYPE = {str: "a string", int: "a number", bool: "true or false"}


def host_problem(value: str) -> str | None:
    """Why `value` is neither an IP address nor a host name, or None if it is one.

    The IDNA step runs here, on a length-checked value, so a name never reaches the
    resolver's encoder (which raises UnicodeError, not OSError) unchecked.
    """
    if any(not ch.isprintable() or ch.isspace() for ch in value):
        return "contains a space or control character"
    try:
        ipaddress.ip_address(value)
        return None
    except ValueError:
        pass
    try:
        ascii_name = value.encode("idna").decode("ascii")
    except UnicodeError:
        return "not an IP address or a host name"
    labels = ascii_name.removesuffix(".").split(".")
    if len(ascii_name) > 253 or not all(len(x) <= 63 and _LABEL.fullmatch(x) for x in labels):
        return "not an IP address or a host name"
    return None


def ip_problem(value: str) -> str | None:
    """Why ``value`` is not an IP address, or None if it is one."""
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return "not an IP address"
    return None


@record(frozen=True)
class Arg:
    """One argument of a control command as it travels: JSON type and limits."""

    kind: type = str
    required: bool = False
    max_len: int = 253  # characters, for strings
    choices: tuple[str, ...] = ()
    syntax: Callable[[str], str | None] | None = None  # returns what is wrong, or None


ArgSpec = Mapping[str, Arg]

PEER = Arg(required=True, max_len=253, syntax=host_problem)

# Every control command and its arguments. A command registers against its row
# here, so a daemon part cannot add a command whose arguments nobody checks.
COMMAND_ARGS: dict[str, ArgSpec] = {
    "status": {},
    "reload": {},
    "help": {},
    "offload": {},
    "offload-bench": {},
    "up": {
        "peer": PEER,
        "auth": Arg(choices=("null", "pubkey")),
        "mode": Arg(choices=("tunnel", "transport")),
        "peer_key": Arg(max_len=16 * 1024),  # a PEM public key (RSA-8192 is ~1.5 KiB)
    },
    "down": {"peer": PEER},
    "flush": {},
    "devices": {"device": Arg(max_len=45, syntax=ip_problem)},
    "explain": {"address": Arg(required=True, max_len=45, syntax=ip_problem)},
}


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true or false"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "an array" if isinstance(value, list) else "an object"


def check_args(request: Request, spec: ArgSpec) -> None:
    """Refuse arguments `spec` does not declare, lacks, or whose values break its limits."""
    for name in request.args:
        if name not in spec:
            if not spec:
                raise ProtocolError("takes no arguments")
            raise ProtocolError(f"unknown argument {shown(name)} (takes: {', '.join(spec)})")
    for name, arg in spec.items():
        if name not in request.args:
            if arg.required:
                raise ProtocolError(f'needs "{name}"')
            continue
        value = request.args[name]
        # bool is an int to Python, not to JSON
        if type(value) is not arg.kind:
            want = _JSON_TYPE.get(arg.kind, arg.kind.__name__)
            raise ProtocolError(f"{name} must be {want}, not {_json_type(value)}")
        if not isinstance(value, str):
            continue
        if len(value) > arg.max_len:
            raise ProtocolError(f"{name} too long ({len(value)} characters, max {arg.max_len})")
        if arg.choices and value not in arg.choices:
            raise ProtocolError(f"{name} {shown(value)}: use {' or '.join(arg.choices)}")
        if not value and arg.required:
            raise ProtocolError(f"{name} is empty")
        problem = arg.syntax(value) if arg.syntax is not None and value else None
        if problem is not None:
            raise ProtocolError(f"{name} {shown(value)}: {problem}")


# ------------------------------------------------------------------ parsing

# A JSON string, to its closing quote or, unterminated, to the end (never backtracks):
# blanked out first, so brackets and digits inside strings do not count.
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"?', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_LONG_NUMBER = re.compile(f"[0-9]{{{MAX_DIGITS + 1},}}")
_DEPTH_STEP = bytes.maketrans(b"[]{}", b"\x01\xff\x01\xff")  # +1 / -1 as signed bytes


def _scan(text: str) -> None:
    """Refuse nesting deeper than MAX_DEPTH and digit runs longer than MAX_DIGITS.

    Regexes and C-level folds only: a 64 KiB hostile line costs a few milliseconds.
    """
    bare = _STRING.sub('""', text)
    if _LONG_NUMBER.search(bare):
        raise ProtocolError(f"number longer than {MAX_DIGITS} digits")
    steps = array("b")
    steps.frombytes(_NOT_BRACKET.sub("", bare).encode("ascii").translate(_DEPTH_STEP))
    if steps and max(accumulate(steps)) > MAX_DEPTH:
        raise ProtocolError(f"request nested deeper than {MAX_DEPTH} levels")


def bounded_loads(text: str) -> Any:
    """`json.loads` for hostile text: bounded first, strict (no NaN, no duplicate keys).

    Raises ProtocolError or json.JSONDecodeError, nothing else.
    """
    _scan(text)
    return json.loads(
        text,
        parse_constant=_no_constant,
        parse_float=_finite,
        object_pairs_hook=_unique_keys,
    )


def _no_constant(name: str) -> object:
    raise ProtocolError(f"malformed JSON: {name} is not a JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ProtocolError(f"number {shown(text)} is out of range")
    return value


def _unique_keys(pairs: list[tuple[str, Any]]) -> JsonObject:
    obj: JsonObject = {}
    for key, value in pairs:
        if key in obj:
            raise ProtocolError(f"key {shown(key)} appears twice")
        obj[key] = value
    return obj


def decode_request(line: bytes) -> Request:
    """Parse one request line (without or with its newline); only the shape is checked."""
    if len(line) > MAX_LINE:
        raise ProtocolError(f"request longer than {MAX_LINE} bytes")
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError("request is not UTF-8") from None
    try:
        obj = bounded_loads(text)
    except json.JSONDecodeError as exc:
        raise ProtocolError(f"malformed JSON: {exc.msg} at column {exc.colno}") from None
    except (RecursionError, ValueError) as exc:  # the scan should make these impossible
        raise ProtocolError(f"malformed JSON: {type(exc).__name__}") from None
    if not isinstance(obj, dict):
        raise ProtocolError('request must be a JSON object like {"cmd": "status"}')
    cmd = obj.get("cmd")
    if not isinstance(cmd, str) or not cmd:
        raise ProtocolError('request has no "cmd" string')
    if len(cmd) > MAX_CMD:
        raise ProtocolError(f'"cmd" too long ({len(cmd)} characters, max {MAX_CMD})')
    args = {k: v for k, v in obj.items() if k != "cmd"}
    return Request(cmd=cmd, args=args)


def parse_request(line: bytes, commands: Mapping[str, ArgSpec] = COMMAND_ARGS) -> Request:
    """The whole parser: one request line to a `Request` whose arguments are checked
    against `commands`, or `ProtocolError` (the only exception it raises)."""
    request = decode_request(line)
    spec = commands.get(request.cmd)
    if spec is None:
        raise ProtocolError(f"unknown command {shown(request.cmd)}")
    try:
        check_args(request, spec)
    except ProtocolError as exc:
        raise ProtocolError(f"{request.cmd}: {exc}") from None
    return request


def encode_request(cmd: str, **args: Any) -> bytes:
    return (json.dumps({"cmd": cmd, **args}, separators=(",", ":")) + "\n").encode()


def encode_reply(reply: JsonObject) -> bytes:
    return (json.dumps(reply, separators=(",", ":")) + "\n").encode()


def error_reply(message: str) -> JsonObject:
    return {"ok": False, "error": one_line(message)}


class CommandTable:
    """Maps command names to async handlers and their argument tables.

    Each handler gets a `Request` whose arguments passed its table, and returns
    the reply body; `ok: true` is added for it. A handler refuses with `CommandError`.
    """

    def __init__(self) -> None:
        self._handlers: dict[str, tuple[Handler, str, ArgSpec]] = {}

    def register(
        self, name: str, handler: Handler, help_text: str = "", args: ArgSpec | None = None
    ) -> None:
        """Add a command; its arguments are `args`, else its row in `COMMAND_ARGS`."""
        if name in self._handlers:
            raise ValueError(f"control command {name!r} is already registered")
        spec = COMMAND_ARGS.get(name) if args is None else args
        if spec is None:
            raise ValueError(f"control command {name!r} has no argument table (COMMAND_ARGS)")
        self._handlers[name] = (handler, help_text, spec)

    def unregister(self, name: str) -> None:
        """Drop a command (its service went away); an unknown name is ignored."""
        self._handlers.pop(name, None)

    def names(self) -> list[str]:
        return sorted(self._handlers)

    def help(self) -> dict[str, str]:
        return {name: text for name, (_, text, _) in sorted(self._handlers.items())}

    def has(self, name: str) -> bool:
        return name in self._handlers

    async def invoke(self, request: Request) -> JsonObject:
        """Check ``request``'s arguments against its command's table and run the handler:
        the reply body (without ``ok``). Raises ProtocolError (unknown command, bad
        arguments) or CommandError (the handler refused); a handler's bug raises as is.
        The control socket and the ubus object both come through here."""
        entry = self._handlers.get(request.cmd)
        if entry is None:
            known = ", ".join(self.names())
            raise ProtocolError(f"unknown command {shown(request.cmd)} (known: {known})")
        handler, _, spec = entry
        try:
            check_args(request, spec)
            return await handler(request)
        except ProtocolError as exc:
            raise ProtocolError(f"{request.cmd}: {exc}") from None
        except CommandError as exc:
            raise CommandError(f"{request.cmd}: {exc}") from None

    async def dispatch(self, line: bytes) -> JsonObject:
        """Handle one request line and always return a reply (never raises for bad input)."""
        try:
            request = decode_request(line)
        except ProtocolError as exc:
            return error_reply(str(exc))
        try:
            body = await self.invoke(request)
        except (ProtocolError, CommandError) as exc:
            return error_reply(str(exc))
        except Exception as exc:
            # A bug in a handler must not take the control socket down with it.
            what = one_line(f"{type(exc).__name__}: {exc}", 200)
            log.error("command %s failed: %s", request.cmd, what)
            return error_reply(f"{request.cmd}: internal error ({what})")
        return {"ok": True, **body}

    async def answer(self, line: bytes) -> bytes:
        """The reply line for one request line: always exactly one line, whatever happens."""
        try:
            return encode_reply(await self.dispatch(line))
        except Exception as exc:  # e.g. a handler's reply that is not JSON-serialisable
            what = one_line(f"{type(exc).__name__}: {exc}", 200)
            log.error("control reply failed: %s", what)
            return encode_reply(error_reply(f"internal error ({what})"))
