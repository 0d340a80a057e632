"""The ubus object ``oe``: its methods, their policies, and how a call is answered.

Sans-IO: a call's method name and argument blob in, a status code and reply blob out
(``answer``); the shim (``ubus.py``) moves them between libubus and the asyncio loop.
Every method runs a control command through the daemon's ``CommandTable`` (the same
handlers and the same ``COMMAND_ARGS`` checks as the control socket), so ``ubus call oe
status`` and ``oe status --json`` cannot disagree. A method's blobmsg policy (what
``ubus -v list oe`` shows) is derived from its command's ``COMMAND_ARGS`` row, and the
rpcd ACL (``files/usr/share/rpcd/acl.d/oe.json``) from the methods' access (``acl()``), as is
luci-app-oe's (``luci_acl()``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, Literal

from oe_router.control.blobmsg import BlobmsgError, BlobmsgType, decode, encode
from oe_router.control.protocol import (
    COMMAND_ARGS,
    MAX_DEPTH,
    MAX_LINE,
    CommandError,
    CommandTable,
    ProtocolError,
    Request,
    one_line,
)
from oe_router.control.ubus_abi import MAX_MSGLEN, Status
from oe_router.records import record

log = logging.getLogger("oe_router.control")

JsonObject = dict[str, Any]
OBJECT = "oe"
#: What uhttpd's /ubus (LuCI's JSON-RPC) adds to every call's arguments: the caller's
#: rpcd session, after rpcd said it may call the method (a client cannot set it itself).
SESSION_ARG = "ubus_rpc_session"
#: A reply bigger than this is refused with a pointer to the control socket (ubusd drops
#: messages over MAX_MSGLEN; the rest is room for libubus's own attributes).
MAX_REPLY = MAX_MSGLEN - 4096


def _whole(key: str) -> Callable[[JsonObject], JsonObject]:
    """The reply is the document under ``key`` (what ``oe <cmd> --json`` prints)."""

    def pick(body: JsonObject) -> JsonObject:
        doc: JsonObject = body[key]
        return doc

    return pick


def _part(key: str, part: str) -> Callable[[JsonObject], JsonObject]:
    """The reply is one list of the document under ``key``, as ``{part: [...]}`` (a ubus
    reply is a table)."""

    def pick(body: JsonObject) -> JsonObject:
        return {part: body[key][part]}

    return pick


def _body(body: JsonObject) -> JsonObject:
    """The reply is the control reply without ``ok``."""
    return body


def _reload_refused(body: JsonObject) -> str | None:
    result = body.get("reload", {})
    if result.get("accepted", True):
        return None
    return "reload refused: " + "; ".join(str(p) for p in result.get("problems", []))


@record(frozen=True)
class Method:
    """One method of the object: the control command it runs, whether it only reads
    (rpcd's read/write ACL), how the command's reply becomes the method's, and when a
    reply that came back still means the call failed."""

    command: str
    access: Literal["read", "write"]
    reply: Callable[[JsonObject], JsonObject]
    refused: Callable[[JsonObject], str | None] = lambda body: None


METHODS: Mapping[str, Method] = MappingProxyType(
    {
        "status": Method("status", "read", _whole("status")),
        "tunnels": Method("status", "read", _part("status", "tunnels")),
        "shunts": Method("status", "read", _part("status", "shunts")),
        "offload": Method("offload", "read", _whole("offload")),
        "flush": Method("flush", "write", _body),
        "reload": Method("reload", "write", _body, _reload_refused),
        "up": Method("up", "write", _body),
        "down": Method("down", "write", _body),
        "devices": Method("devices", "read", _whole("devices")),
        "explain": Method("explain", "read", _whole("explain")),
    }
)

_POLICY_TYPES: Mapping[type, BlobmsgType] = {
    str: BlobmsgType.STRING,
    int: BlobmsgType.INT32,
    bool: BlobmsgType.INT8,
}


def policy(method: str) -> tuple[tuple[str, BlobmsgType], ...]:
    """The blobmsg policy of ``method``: its command's arguments and their types."""
    spec = COMMAND_ARGS[METHODS[method].command]
    return tuple((name, _POLICY_TYPES[arg.kind]) for name, arg in spec.items())


def signature() -> JsonObject:
    """What ubusd holds for the object (``ubus -v list oe``): method -> {arg: type id}."""
    return {m: {name: int(t) for name, t in policy(m)} for m in METHODS}


def acl(description: str = "Opportunistic IPsec (oe-routerd)") -> JsonObject:
    """rpcd's ACL group for the object: read grants the read methods, write the others."""
    group: JsonObject = {"description": description}
    for access in ("read", "write"):
        names = [m for m, spec in METHODS.items() if spec.access == access]
        group[access] = {"ubus": {OBJECT: names}}
    return {OBJECT: group}


#: The rpcd ACL group luci-app-oe's pages depend on (its menu.d entry's ``depends.acl``).
LUCI_GROUP = "luci-app-oe"


def luci_acl() -> JsonObject:
    """luci-app-oe's ACL group (``root/usr/share/rpcd/acl.d/luci-app-oe.json``): the
    object's methods as ``acl()`` splits them, and the ``oe`` UCI config, read with read
    and written with write (LuCI's settings form; its uci apply is luci-base's grant)."""
    group: JsonObject = {"description": "Grant access to Opportunistic IPsec (luci-app-oe)"}
    for access, part in acl()[OBJECT].items():
        if access in ("read", "write"):
            group[access] = {**part, "uci": ["oe"]}
    return {LUCI_GROUP: group}


@record(frozen=True)
class Answer:
    """A call's outcome: the status code and the reply message (blobmsg; always a table,
    ``{"error": ...}`` when the call failed)."""

    status: Status
    data: bytes


def failure(status: Status, message: str) -> Answer:
    return Answer(status, encode({"error": one_line(message)}))


async def answer(commands: CommandTable, method: str, args: bytes) -> Answer:
    """Run ``method`` with the argument message ``args`` through ``commands``.

    Never raises: malformed or refused arguments are INVALID_ARGUMENT, a handler's
    refusal (and a refused reload) UNKNOWN_ERROR, a method whose command this daemon
    does not run NOT_SUPPORTED, each with one line saying why.
    """
    spec = METHODS.get(method)
    if spec is None:
        return failure(Status.METHOD_NOT_FOUND, f"no method {method[:40]!r}")
    try:
        fields = decode(args, max_size=MAX_LINE, max_depth=MAX_DEPTH)
    except BlobmsgError as exc:
        return failure(Status.INVALID_ARGUMENT, f"{method}: malformed arguments: {exc}")
    if isinstance(fields.get(SESSION_ARG), str):
        del fields[SESSION_ARG]  # the HTTP gateway's, not an argument of the command
    request = Request(spec.command, fields)
    if not commands.has(spec.command):
        why = "this daemon runs without the service that answers it"
        return failure(Status.NOT_SUPPORTED, f"{method}: not available ({why})")

    def named(exc: Exception) -> str:  # "status: takes no arguments" -> "tunnels: ..."
        return f"{method}: {str(exc).removeprefix(spec.command + ': ')}"

    try:
        body = await commands.invoke(request)
        reply = spec.reply(body)
        data = encode(reply)
    except ProtocolError as exc:
        return failure(Status.INVALID_ARGUMENT, named(exc))
    except CommandError as exc:
        return failure(Status.UNKNOWN_ERROR, named(exc))
    except Exception as exc:
        what = one_line(f"{type(exc).__name__}: {exc}", 200)
        log.error("ubus %s failed: %s", method, what)
        return failure(Status.UNKNOWN_ERROR, f"{method}: internal error ({what})")
    if len(data) > MAX_REPLY:
        return failure(
            Status.NO_MEMORY,
            f"{method}: reply of {len(data)} bytes is over ubus's limit; use oe {spec.command}",
        )
    refused = spec.refused(body)
    if refused is not None:  # the reply, and why it counts as a failure
        return Answer(Status.UNKNOWN_ERROR, encode({**reply, "error": one_line(refused)}))
    return Answer(Status.OK, data)
