"""Control protocol and server: errors get a clear reply and the server keeps serving."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from oe_router.control import (
    CommandError,
    CommandTable,
    ControlClient,
    ControlError,
    ControlServer,
    DaemonNotRunning,
    DaemonUnreachable,
    Request,
    SocketBindError,
)
from oe_router.control.protocol import (
    COMMAND_ARGS,
    MAX_LINE,
    Arg,
    ProtocolError,
    bounded_loads,
    decode_request,
    encode_request,
    parse_request,
)
from tests.aio import running

ECHO_ARGS = {"peer": Arg(), "n": Arg(kind=int), "pad": Arg(max_len=2 * MAX_LINE)}


def _table() -> CommandTable:
    table = CommandTable()

    async def echo(req: Request) -> dict[str, object]:
        return {"echo": req.args}

    async def refuse(req: Request) -> dict[str, object]:
        raise CommandError("peer 'x' is not known")

    table.register("echo", echo, args=ECHO_ARGS)
    table.register("refuse", refuse, args={})
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
        async with running(server):
            sock_mode = stat.S_IMODE(os.stat(path).st_mode)
            dir_mode = stat.S_IMODE(os.stat(path.parent).st_mode)
            payload = b'{oops\n{"cmd": "nope"}\n\n{"cmd": "echo", "n": 1}\n'
            replies = await asyncio.to_thread(_raw_exchange, path, payload, 3)
            # A fresh client after the bad ones is served too.
            again = await asyncio.to_thread(ControlClient(path).request, "echo", n=2)
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
        async with running(server):
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o660
            with pytest.raises(ControlError) as info:
                await asyncio.to_thread(ControlClient(path).request, "refuse")
            return str(info.value)

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
        async with running(server):
            huge = b'{"cmd": "echo", "pad": "' + b"x" * (MAX_LINE + 100) + b'"}\n'
            replies = await asyncio.to_thread(_raw_exchange, path, huge, 1)
            after = await asyncio.to_thread(ControlClient(path).request, "echo")
        return replies, after

    replies, after = asyncio.run(go())
    assert replies == [{"ok": False, "error": f"request longer than {MAX_LINE} bytes"}]
    assert after == {"ok": True, "echo": {}}


def test_a_crashing_handler_gets_an_error_reply_not_a_dead_server() -> None:
    table = _table()

    async def broken(req: Request) -> dict[str, object]:
        raise KeyError("tunnels")

    table.register("broken", broken, args={})
    reply = asyncio.run(table.dispatch(b'{"cmd": "broken"}'))
    assert reply == {"ok": False, "error": "broken: internal error (KeyError: 'tunnels')"}


# ---------------------------------------------------------------- hostile requests (issue 11)

HOSTILE = [
    (b"[" * 60_000, "nested deeper than 8 levels"),
    (b'{"a":' * 12_000, "nested deeper than 8 levels"),
    (b'{"cmd": "status", "x": ' + b"[" * 20_000 + b"]" * 20_000 + b"}", "nested deeper"),
    (b'{"cmd": "status", "n": ' + b"9" * 50_000 + b"}", "number longer than 32 digits"),
    (b'{"cmd": "status", "n": 1.' + b"0" * 5_000 + b"}", "number longer than 32 digits"),
    (b'{"cmd": "status", "n": NaN}', "NaN is not a JSON number"),
    (b'{"cmd": "status", "n": -Infinity}', "-Infinity is not a JSON number"),
    (b'{"cmd": "status", "n": 1e999}', "out of range"),
    (b'{"cmd": "down", "peer": "a", "peer": "b"}', "key 'peer' appears twice"),
    (b'{"cmd": "' + b"x" * 60_000 + b'"}', '"cmd" too long (60000 characters, max 64)'),
    (b'{"cmd": "status"}\xc3', "not UTF-8"),
    (b"\x00" * 100, "malformed JSON"),
]


@pytest.mark.parametrize(("line", "message"), HOSTILE)
def test_hostile_lines_are_refused_before_json_can_crash(line: bytes, message: str) -> None:
    """Deep nesting raised RecursionError and long digit runs ValueError out of the
    parser (a traceback in the daemon's log); now each is one ProtocolError line."""
    with pytest.raises(ProtocolError) as info:
        parse_request(line)
    assert message in str(info.value)
    assert "\n" not in str(info.value) and len(str(info.value)) < 200


def test_nesting_and_digits_inside_strings_are_only_text() -> None:
    req = decode_request(b'{"cmd": "x", "s": "' + b"[{" * 20_000 + b"9" * 20_000 + b'\\""}')
    assert req.args["s"] == "[{" * 20_000 + "9" * 20_000 + '"'
    assert decode_request(b'{"cmd": "x", "a": [[[[[[[1]]]]]]]}').args["a"] == [[[[[[[1]]]]]]]


_JSONISH = st.text(alphabet='[]{}",:0123456789\\eE.-+ nultrfasNIy\x00é', max_size=400)
# deep prefixes (past json's recursion limit), some with brackets inside strings
_DEEP = st.builds(
    lambda n, opener, tail: opener * n + tail,
    st.integers(0, 2_500),
    st.sampled_from(["[", '{"a":', '["x",', '[{"a":"]"},', '["\\"[",']),
    _JSONISH,
)
_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
    | st.sampled_from(["192.0.2.1", "gw.example.org", "null", "pubkey", "tunnel", "a" * 300]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner),
    max_leaves=6,
)
_NAMES = st.sampled_from(sorted({n for spec in COMMAND_ARGS.values() for n in spec} | {"x"}))
_REQUESTS = st.tuples(
    st.sampled_from([*COMMAND_ARGS, "nope"]) | _VALUES, st.dictionaries(_NAMES, _VALUES, max_size=4)
).map(lambda t: {**t[1], "cmd": t[0]})


def _parse_or_refuse(line: bytes) -> Request | None:
    try:
        return parse_request(line)
    except ProtocolError as exc:
        assert "\n" not in str(exc) and len(str(exc)) <= 1000
        return None


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=600) | (_JSONISH | _DEEP).map(str.encode))
def test_parser_raises_only_protocol_error_for_any_bytes(line: bytes) -> None:
    _parse_or_refuse(line)


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 3_000), st.sampled_from(["[", '{"a":', '[{"b":']))
def test_parser_raises_only_protocol_error_for_any_depth(depth: int, opener: str) -> None:
    _parse_or_refuse((opener * depth).encode())


@settings(max_examples=300, deadline=None)
@given(_JSONISH | _DEEP)
def test_the_bound_comes_before_json_so_json_never_recurses_too_deep(text: str) -> None:
    """The scan itself (not decode_request's last-resort catch) keeps json.loads safe."""
    with contextlib.suppress(ProtocolError, json.JSONDecodeError):
        bounded_loads(text)


@settings(max_examples=200, deadline=None)
@given(_REQUESTS)
def test_a_parsed_request_always_fits_its_declared_table(obj: dict[str, object]) -> None:
    """Every field of every command with values of every JSON type: either refused in one
    line, or the arguments are exactly the declared names, types and lengths."""
    req = _parse_or_refuse(json.dumps(obj).encode())
    if req is None:
        return
    spec = COMMAND_ARGS[req.cmd]
    for name, value in req.args.items():
        arg = spec[name]
        assert type(value) is arg.kind
        assert len(value) <= arg.max_len
        assert not arg.choices or value in arg.choices
    assert all(name in req.args for name, arg in spec.items() if arg.required)


@pytest.mark.parametrize(
    ("obj", "error"),
    [
        ({"cmd": "up", "peer": "192.0.2.1", "auth": "pubkey", "mode": "transport"}, None),
        ({"cmd": "up", "peer": "Gw-1.example.org.", "peer_key": "PEM"}, None),
        ({"cmd": "down", "peer": "bücher.example"}, None),
        ({"cmd": "down", "peer": "fe80::1%eth0"}, None),
        ({"cmd": "down", "peer": "a" * 60_000}, "down: peer too long (60000 characters, max 253)"),
        ({"cmd": "down"}, 'down: needs "peer"'),
        ({"cmd": "down", "peer": ""}, "down: peer is empty"),
        ({"cmd": "down", "peer": None}, "down: peer must be a string, not null"),
        ({"cmd": "down", "peer": ["1.2.3.4"]}, "down: peer must be a string, not an array"),
        ({"cmd": "down", "peer": "a\x00b"}, "contains a space or control character"),
        ({"cmd": "down", "peer": "a..b"}, "not an IP address or a host name"),
        ({"cmd": "down", "peer": "x" * 64 + ".org"}, "not an IP address or a host name"),
        ({"cmd": "down", "peer": "-x.org"}, "not an IP address or a host name"),
        ({"cmd": "down", "peer": "1.2.3.4", "force": True}, "unknown argument 'force'"),
        ({"cmd": "up", "peer": "h", "auth": "psk"}, "up: auth 'psk': use null or pubkey"),
        ({"cmd": "up", "peer": "h", "mode": 1}, "up: mode must be a string, not a number"),
        ({"cmd": "up", "peer": "h", "peer_key": "k" * 20_000}, "peer_key too long"),
        ({"cmd": "reload", "now": True}, "reload: takes no arguments"),
        ({"cmd": "status", "verbose": 1}, "status: takes no arguments"),
        ({"cmd": "frob"}, "unknown command 'frob'"),
    ],
)
def test_arguments_are_checked_against_the_table(obj: dict[str, object], error: str | None) -> None:
    line = json.dumps(obj).encode()
    if error is None:
        assert parse_request(line).args == {k: v for k, v in obj.items() if k != "cmd"}
        return
    with pytest.raises(ProtocolError) as info:
        parse_request(line)
    assert error in str(info.value)
    assert len(str(info.value)) < 200


def _wrong_values(arg: Arg) -> list[object]:
    values: list[object] = [None, True, 1, 1.5, [], {}, "x" * (arg.max_len + 1)]
    return [v for v in values if type(v) is not arg.kind or len(str(v)) > arg.max_len]


def test_every_command_refuses_wrong_types_and_extra_arguments_before_its_handler() -> None:
    """Each declared command, registered with a handler that records its calls, gets
    every wrong JSON type for each argument and an undeclared one: each is a one-line
    refusal naming the argument, and the handler never runs."""
    calls: list[Request] = []

    async def record(req: Request) -> dict[str, object]:
        calls.append(req)
        return {}

    table = CommandTable()
    for name in COMMAND_ARGS:
        table.register(name, record)
    valid = {"peer": "192.0.2.1", "auth": "null", "mode": "tunnel", "peer_key": "PEM",
             "address": "192.0.2.1", "device": "192.168.1.10"}  # fmt: skip

    async def go() -> list[tuple[str, dict[str, object]]]:
        out = []
        for cmd, spec in COMMAND_ARGS.items():
            base = {n: valid[n] for n, a in spec.items() if a.required}
            for name, arg in spec.items():
                for bad in _wrong_values(arg):
                    line = json.dumps({"cmd": cmd, **base, name: bad}).encode()
                    out.append((name, await table.dispatch(line)))
            line = json.dumps({"cmd": cmd, **base, "extra": 1}).encode()
            out.append(("extra", await table.dispatch(line)))
        return out

    replies = asyncio.run(go())
    assert len(replies) > 2 * len(COMMAND_ARGS)
    for name, reply in replies:
        assert reply["ok"] is False, (name, reply)
        error = str(reply["error"])
        assert name in error or "takes no arguments" in error, error
        assert "\n" not in error and len(error) < 200
    assert calls == []


def test_an_unserialisable_or_crashing_reply_is_still_one_line() -> None:
    table = CommandTable()

    async def weird(req: Request) -> dict[str, object]:
        return {"value": object()}

    async def crash(req: Request) -> dict[str, object]:
        raise RuntimeError("line one\nline two " + "x" * 5000)

    table.register("weird", weird, args={})
    table.register("crash", crash, args={})

    async def go() -> list[bytes]:
        return [await table.answer(b'{"cmd": "weird"}'), await table.answer(b'{"cmd": "crash"}')]

    weird_line, crash_line = asyncio.run(go())
    for line in (weird_line, crash_line):
        assert line.endswith(b"\n") and line.count(b"\n") == 1
        reply = json.loads(line)
        assert reply["ok"] is False and "internal error" in reply["error"]
    assert "TypeError" in json.loads(weird_line)["error"]
    assert "line one | line two" in json.loads(crash_line)["error"]
    assert len(crash_line) < 400


# ---------------------------------------------------------------- hostile clients


class ServerThread:
    """A ControlServer with small limits on its own loop in a thread (tests use blocking
    sockets against it)."""

    def __init__(self, path: Path, **limits: Any) -> None:
        self.loop = asyncio.new_event_loop()
        self.server = ControlServer(path, _table(), **limits)
        self.loop.run_until_complete(self.server.start())
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> ControlServer:
        self.thread.start()
        return self.server

    def __exit__(self, *exc: object) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.run_until_complete(self.server.stop())
        self.loop.close()


def _connect(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(str(path))
    return s


def _read_to_eof(s: socket.socket) -> bytes:
    buf = b""
    while chunk := s.recv(65536):
        buf += chunk
    return buf


def test_idle_and_trickling_clients_cannot_hold_the_server(
    tmp_path: Path, poll: Callable[..., bool]
) -> None:
    """Slowloris: clients that connect and send nothing (or part of a line) fill every
    slot; a real client is still answered because the longest-idle one makes room (the
    request deadline is too long to help here), the server never holds more than
    max_clients, and each idler it let go got one error line, then EOF."""
    path = tmp_path / "s.sock"
    with ServerThread(path, max_clients=4, request_timeout=60.0) as server:
        idlers = [_connect(path)]
        idlers[0].sendall(b'{"cmd": ')  # a trickler: part of a line, never the rest
        # (sent before the others queue up: once they wait, the server may let the
        # trickler go at once as the longest idle, and a late send would meet EPIPE)
        idlers += [_connect(path) for _ in range(7)]
        assert poll(lambda: server.connections == 4)
        reply = ControlClient(path, timeout=10).request("echo", n=1)
        assert reply == {"ok": True, "echo": {"n": 1}}
        assert server.connections <= 4
        assert server.stats["evicted"] >= 5 and server.stats["timed_out"] == 0
        received = {i: b"" for i in range(len(idlers))}
        closed: set[int] = set()
        for s in idlers:
            s.setblocking(False)

        def drained() -> bool:
            for i, s in enumerate(idlers):
                if i in closed:
                    continue
                with contextlib.suppress(BlockingIOError):
                    while chunk := s.recv(4096):
                        received[i] += chunk
                    closed.add(i)  # EOF
            return len(closed) >= 5

        assert poll(drained)
        for s in idlers:
            s.close()
    busy = {"ok": False, "error": "server busy: closing this idle connection"}
    for i, data in received.items():
        if i in closed:
            assert json.loads(data) == busy
        else:
            assert data == b"", "a connection still held got nothing"


def test_a_request_that_never_completes_times_out_with_one_line(
    tmp_path: Path, poll: Callable[..., bool]
) -> None:
    path = tmp_path / "t.sock"
    with ServerThread(path, request_timeout=0.5) as server:
        s = _connect(path)
        s.sendall(b'{"cmd": "echo", "n": 1')  # no closing brace, no newline
        ending = _read_to_eof(s)  # on a server without a deadline this blocks (10 s timeout)
        s.close()
        assert poll(lambda: server.connections == 0)
        assert server.stats["timed_out"] == 1
    assert json.loads(ending) == {"ok": False, "error": "no complete request within 0.5 s"}


def test_a_client_that_never_reads_is_dropped(tmp_path: Path, poll: Callable[..., bool]) -> None:
    """Pipelined requests with big replies and no reads: once a reply stops draining
    for reply_timeout the connection is closed, not held forever (request_timeout is
    long here, so only the reply deadline can close it)."""
    path = tmp_path / "r.sock"
    with ServerThread(path, reply_timeout=0.5, request_timeout=60.0) as server:
        s = _connect(path)
        request = encode_request("echo", pad="p" * 60_000)
        failed: list[OSError] = []

        def flood() -> None:
            try:
                s.sendall(request * 400)  # 24 MB; blocks once the server stops reading
            except OSError as exc:
                failed.append(exc)

        sender = threading.Thread(target=flood, daemon=True)
        sender.start()
        assert poll(lambda: server.stats["timed_out"] >= 1)
        assert poll(lambda: server.connections == 0)
        sender.join(20)
        s.close()
        assert ControlClient(path).request("echo", n=3)["echo"] == {"n": 3}
    assert failed and isinstance(failed[0], ConnectionError), "the server hung up on the flood"


def test_client_waits_while_the_backlog_is_full_then_gives_up_at_its_timeout(
    tmp_path: Path,
) -> None:
    """EAGAIN on connect (the daemon's listen backlog is full) is 'busy', not 'broken':
    the client retries until its timeout, and is answered if room appears in time."""
    path = tmp_path / "b.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(0)
    fillers = []
    for _ in range(8):  # fill the backlog until connect says EAGAIN
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.setblocking(False)
        try:
            s.connect(str(path))
        except BlockingIOError:
            s.close()
            break
        fillers.append(s)
    else:
        pytest.fail("the backlog never filled")
    try:
        start = time.monotonic()
        with pytest.raises(
            DaemonUnreachable, match="daemon busy: no connection accepted within 1 s"
        ):
            ControlClient(path, timeout=1.0).request("status")
        assert time.monotonic() - start >= 0.9, "gave up before its timeout"

        def serve_one() -> None:
            for s in fillers:  # make room, then answer the client that gets in
                s.close()
            while True:
                conn, _ = listener.accept()
                with conn:
                    if conn.recv(100):
                        conn.sendall(b'{"ok": true, "served": 1}\n')
                        return

        timer = threading.Timer(0.3, serve_one)
        timer.start()
        assert ControlClient(path, timeout=10).request("status") == {"ok": True, "served": 1}
        timer.join(10)
    finally:
        listener.close()
        for s in fillers:
            s.close()
