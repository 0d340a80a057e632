"""Fuzz target: the control protocol (``control/protocol.py``): request lines in, replies out.

Input: one request line as a local client writes it to the control socket. Oracles:
parsing either yields a request or refuses with ProtocolError; ``dispatch`` always
answers (a reply object, never an exception) and the reply encodes to one JSON line.
The parse entry point is ``PARSE``: the one name to change if the protocol's moves.
"""

from __future__ import annotations

import json
from collections.abc import Coroutine
from typing import Any

from fuzz.common import fuzz_main, instrumented

with instrumented():
    from oe_router.control import protocol
    from oe_router.control.protocol import CommandError, CommandTable, ProtocolError, Request

#: the whole request parser (``parse_request`` where the protocol has one)
PARSE = getattr(protocol, "parse_request", None) or protocol.decode_request


async def _echo(request: Request) -> dict[str, Any]:
    return {"args": request.args}


async def _refuse(request: Request) -> dict[str, Any]:
    raise CommandError(f"refused {sorted(request.args)}")


async def _buggy(request: Request) -> dict[str, Any]:
    return {"n": 1 / len(request.args)}  # a handler bug: dispatch must contain it


TABLE = CommandTable()
TABLE.register("status", _echo, "echo the arguments")
TABLE.register("down", _refuse, "always refuses")
TABLE.register("up", _buggy, "raises when called without arguments")


def run(coro: Coroutine[Any, Any, dict[str, Any]]) -> dict[str, Any]:
    """Run a coroutine that never waits (these handlers do not) without an event loop."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    coro.close()
    raise AssertionError("a handler waited")


def test_one_input(data: bytes) -> None:
    try:
        request = PARSE(data)
    except ProtocolError as exc:
        assert "\n" not in str(exc), exc
    else:
        assert isinstance(request.cmd, str) and request.cmd and isinstance(request.args, dict)
    reply = run(TABLE.dispatch(data))
    line = protocol.encode_reply(reply)
    assert line.endswith(b"\n") and line.count(b"\n") == 1, line
    back = json.loads(line)
    assert isinstance(back, dict) and isinstance(back.get("ok"), bool), back
    if not back["ok"]:
        assert isinstance(back.get("error"), str), back


if __name__ == "__main__":
    fuzz_main(test_one_input)
