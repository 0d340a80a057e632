"""Control protocol and server: errors get a clear reply and the server keeps serving."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
from pathlib import Path

import pytest

from oe_router.control import (
    CommandError,
    CommandTable,
    ControlClient,
    ControlError,
    ControlServer,
    DaemonNotRunning,
    Request,
    SocketBindError,
)
from oe_router.control.protocol import MAX_LINE, ProtocolError, decode_request


def _table() -> CommandTable:
    table = CommandTable()

    async def echo(req: Request) -> dict[str, object]:
        return {"echo": req.args}

    async def refuse(req: Request) -> dict[str, object]:
        raise CommandError("peer 'x' is not known")

    table.register("echo", echo)
    table.register("refuse", refuse)
    return table


@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        (b"{not json\n", "malformed JSON"),
        (b"[1, 2]\n", "must be a JSON object"),
        (b'{"command": "status"}\n', 'no "cmd"'),
        (b'{"cmd": 7}\n', 'no "cmd"'),
        (b"\xff\xfe\n", "not UTF-8"),
        (b"x" * (MAX_LINE + 1), "longer than"),
    ],
)
def test_decode_request_refuses_bad_input_with_one_message(line: bytes, fragment: str) -> None:
    with pytest.raises(ProtocolError, match=fragment):
        decode_request(line)


def test_dispatch_replies_for_unknown_refused_and_good_commands() -> None:
    table = _table()

    async def go() -> list[dict[str, object]]:
        return [
            await table.dispatch(b'{"cmd": "frobnicate"}'),
            await table.dispatch(b'{"cmd": "refuse"}'),
            await table.dispatch(b'{"cmd": "echo", "peer": "a"}'),
            await table.dispatch(b"garbage"),
        ]

    unknown, refused, good, garbage = asyncio.run(go())
    assert unknown["ok"] is False and "unknown command 'frobnicate'" in str(unknown["error"])
    assert "echo" in str(unknown["error"])  # lists the known ones
    assert refused == {"ok": False, "error": "refuse: peer 'x' is not known"}
    assert good == {"ok": True, "echo": {"peer": "a"}}
    assert garbage["ok"] is False and "malformed JSON" in str(garbage["error"])


def test_registering_a_command_twice_is_refused() -> None:
    table = _table()

    async def other(req: Request) -> dict[str, object]:
        return {}

    with pytest.raises(ValueError, match="echo"):
        table.register("echo", other)


def _raw_exchange(path: Path, payload: bytes, replies: int) -> list[dict[str, object]]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(str(path))
        s.sendall(payload)
        buf = b""
        while buf.count(b"\n") < replies:
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    return [json.loads(line) for line in buf.splitlines()]


def test_server_survives_bad_requests_on_one_connection_and_sets_modes(tmp_path: Path) -> None:
    path = tmp_path / "run" / "oe" / "control.sock"

    async def go() -> tuple[list[dict[str, object]], dict[str, object], int, int]:
        server = ControlServer(path, _table())
        await server.start()
        try:
            sock_mode = stat.S_IMODE(os.stat(path).st_mode)
            dir_mode = stat.S_IMODE(os.stat(path.parent).st_mode)
            payload = b'{oops\n{"cmd": "nope"}\n\n{"cmd": "echo", "n": 1}\n'
            replies = await asyncio.to_thread(_raw_exchange, path, payload, 3)
            # A fresh client after the bad ones is served too.
            again = await asyncio.to_thread(ControlClient(path).request, "echo", n=2)
        finally:
            await server.stop()
        return replies, again, sock_mode, dir_mode

    replies, again, sock_mode, dir_mode = asyncio.run(go())
    assert [r["ok"] for r in replies] == [False, False, True]
    assert "malformed JSON" in str(replies[0]["error"])
    assert "unknown command 'nope'" in str(replies[1]["error"])
    assert replies[2]["echo"] == {"n": 1}
    assert again["echo"] == {"n": 2}
    assert sock_mode == 0o600
    assert dir_mode == 0o755
    assert not path.exists(), "stop() removes the socket file"


def test_client_raises_control_error_with_the_daemon_message(tmp_path: Path) -> None:
    path = tmp_path / "c.sock"

    async def go() -> str:
        server = ControlServer(path, _table(), mode=0o660)
        await server.start()
        try:
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o660
            with pytest.raises(ControlError) as info:
                await asyncio.to_thread(ControlClient(path).request, "refuse")
            return str(info.value)
        finally:
            await server.stop()

    assert asyncio.run(go()) == "refuse: peer 'x' is not known"


def test_client_says_daemon_not_running_for_missing_and_stale_sockets(tmp_path: Path) -> None:
    missing = tmp_path / "missing.sock"
    with pytest.raises(DaemonNotRunning, match=f"no socket at {missing}"):
        ControlClient(missing).request("status")
    stale = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(stale))
    s.close()  # bound but never listening: connect is refused
    with pytest.raises(DaemonNotRunning, match="stale socket"):
        ControlClient(stale).request("status")


def test_server_replaces_a_stale_socket_but_refuses_a_live_one(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.close()

    async def go() -> str:
        first = ControlServer(path, _table())
        await first.start()  # stale file replaced
        try:
            second = ControlServer(path, _table())
            with pytest.raises(SocketBindError) as info:
                await second.start()
            return str(info.value)
        finally:
            await first.stop()

    assert "another daemon is serving it" in asyncio.run(go())


def test_server_refuses_a_path_that_is_not_a_socket_or_not_creatable(tmp_path: Path) -> None:
    regular = tmp_path / "file"
    regular.write_text("x")
    blocker = tmp_path / "notadir"
    blocker.write_text("x")

    async def go(path: Path) -> str:
        with pytest.raises(SocketBindError) as info:
            await ControlServer(path, _table()).start()
        return str(info.value)

    assert asyncio.run(go(regular)) == f"cannot bind control socket {regular}: not a socket"
    msg = asyncio.run(go(blocker / "x.sock"))
    assert msg.startswith(f"cannot bind control socket {blocker / 'x.sock'}: ")
    assert regular.read_text() == "x", "a non-socket file is never removed"


def test_server_answers_an_overlong_line_with_an_error_and_keeps_serving(tmp_path: Path) -> None:
    path = tmp_path / "big.sock"

    async def go() -> tuple[list[dict[str, object]], dict[str, object]]:
        server = ControlServer(path, _table())
        await server.start()
        try:
            huge = b'{"cmd": "echo", "pad": "' + b"x" * (MAX_LINE + 100) + b'"}\n'
            replies = await asyncio.to_thread(_raw_exchange, path, huge, 1)
            after = await asyncio.to_thread(ControlClient(path).request, "echo")
        finally:
            await server.stop()
        return replies, after

    replies, after = asyncio.run(go())
    assert replies == [{"ok": False, "error": f"request longer than {MAX_LINE} bytes"}]
    assert after == {"ok": True, "echo": {}}


def test_a_crashing_handler_gets_an_error_reply_not_a_dead_server() -> None:
    table = _table()

    async def broken(req: Request) -> dict[str, object]:
        raise KeyError("tunnels")

    table.register("broken", broken)
    reply = asyncio.run(table.dispatch(b'{"cmd": "broken"}'))
    assert reply == {"ok": False, "error": "broken: internal error (KeyError: 'tunnels')"}
