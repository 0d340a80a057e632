"""The ubus object ``oe`` of a real oe-routerd on the real ubusd, driven with the real
``ubus`` CLI (OpenWrt's userland built from source: the ``openwrt_userland`` fixture).

    router R (oe-routerd, userspace datapath, 198.51.100.1) --+-- peer P (oe-routerd, .2)
                                                              +-- plain host H (.3, no IKE)

ubusd runs on a socket in a temp folder (unix sockets reach across network namespaces);
R's daemon is started with ``--ubus-socket`` pointing there and LD_LIBRARY_PATH at the
built libubus. Asserted: the object and its policies as ``ubus -v list`` shows them,
``ubus call oe status`` against ``oe status --json`` (one model), the parts, a pass
shunt's ``oe.shunt`` event and ``flush`` making the next flow negotiate again,
``oe.tunnel.up``/``down`` for ``up``/``down`` with P, refusals with their status codes, a
malformed blob from a raw libubus client, a slow call that does not hold the others,
ubusd killed (one log line, the control socket serves) and back (the object again),
the live self-test refusing layouts that do not match, the blobmsg codec against
libblobmsg_json, and rpcd granting the ACL's read and write methods separately.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from oe_router.control.blobmsg import decode, encode, message_length

from .charon import Netns
from .oe_daemon import OeDaemon, bare_config, device_with, netns_run

if TYPE_CHECKING:
    from userland import UserlandBuild

pytestmark = pytest.mark.host

REPO = Path(__file__).resolve().parents[2]
R_WAN, P_WAN, PLAIN, NOBODY = "198.51.100.1", "198.51.100.2", "198.51.100.3", "198.51.100.9"


class Lines:
    """A subprocess's stdout lines, read by a thread (``ubus listen``)."""

    def __init__(self, cmd: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def events(self, name: str) -> list[dict[str, Any]]:
        out = []
        for line in list(self.lines):
            obj = json.loads(line)
            if name in obj:
                out.append(obj[name])
        return out

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(5)


@dataclass
class Lab:
    userland: UserlandBuild
    net: Netns
    work: Path
    sock: Path
    ubusd: subprocess.Popen[bytes]
    r: OeDaemon
    p: OeDaemon
    r_ns: str

    def ubus(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return self.ubus_at(self.sock, *args, timeout=timeout)

    def ubus_at(
        self, sock: Path, *args: str, timeout: float = 30
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.userland.tool("ubus")), "-s", str(sock), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.userland.env(),
            check=False,
        )

    def call(self, method: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
        """``ubus call oe method``: the reply; fails the test if the call failed."""
        return self.call_object("oe", method, args)

    def call_object(
        self, obj: str, method: str, args: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        p = self.ubus("call", obj, method, *([json.dumps(args)] if args is not None else []))
        assert p.returncode == 0, f"ubus call {obj} {method}: {p.returncode} {p.stdout}{p.stderr}"
        reply: dict[str, Any] = json.loads(p.stdout)
        return reply

    def listen(self) -> Lines:
        cmd = [str(self.userland.tool("ubus")), "-s", str(self.sock), "listen"]
        return Lines(cmd, self.userland.env())

    def start_ubusd(self) -> None:
        self.sock.unlink(missing_ok=True)
        self.ubusd = subprocess.Popen(
            [str(self.userland.tool("ubusd")), "-s", str(self.sock)], env=self.userland.env()
        )
        deadline = time.monotonic() + 10
        while not self.sock.exists():
            assert time.monotonic() < deadline, "ubusd did not create its socket"
            time.sleep(0.05)


def _lib_path(userland: UserlandBuild) -> str:
    return str(userland.env()["LD_LIBRARY_PATH"])


def _load(userland: UserlandBuild, name: str) -> ctypes.CDLL:
    """A library of the built root in this process (libubox first: the others need it and
    this process's LD_LIBRARY_PATH does not name the root)."""
    lib = userland.root / "usr" / "lib"
    ctypes.CDLL(str(lib / "libubox.so"), mode=ctypes.RTLD_GLOBAL)
    return ctypes.CDLL(str(lib / name), mode=ctypes.RTLD_GLOBAL)


@pytest.fixture(scope="module")
def lab(openwrt_userland: UserlandBuild, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    work = tmp_path_factory.mktemp("ubus")
    net = Netns("ub")
    daemons: list[OeDaemon] = []
    lab: Lab | None = None
    try:
        r, p, h = net.add("r"), net.add("p"), net.add("h")
        net.switch("sw", [(r, f"{R_WAN}/24"), (p, f"{P_WAN}/24"), (h, f"{PLAIN}/24")])
        sock = work / "ubus.sock"
        rd = OeDaemon(
            r,
            work / "r",
            bare_config(device_with(r, R_WAN), work / "no-anchor", datapath="userspace"),
            env={"LD_LIBRARY_PATH": _lib_path(openwrt_userland)},
            args=["--ubus-socket", str(sock)],
        )  # fmt: skip
        pd = OeDaemon(
            p,
            work / "p",
            bare_config(device_with(p, P_WAN), work / "no-anchor"),
            args=["--no-ubus"],
        )
        lab = Lab(openwrt_userland, net, work, sock, None, rd, pd, r)  # type: ignore[arg-type]
        lab.start_ubusd()
        for d in (rd, pd):
            daemons.append(d)
            d.start()
        rd.wait_for("object oe on ubus", lambda: "object oe registered" in rd.log(), 20)
        yield lab
    finally:
        for d in daemons:
            d.stop()
        if lab is not None and lab.ubusd is not None:
            lab.ubusd.kill()
            lab.ubusd.wait()
        net.close()


# --------------------------------------------------------------------- the object


def test_the_object_and_its_policies_as_ubus_lists_them(lab: Lab) -> None:
    assert "oe" in lab.ubus("list").stdout.split()
    listed = lab.ubus("-v", "list", "oe").stdout.splitlines()
    assert re.fullmatch(r"'oe' @[0-9a-f]{8}", listed[0])
    assert [line.strip() for line in listed[1:]] == [
        '"status":{}', '"tunnels":{}', '"shunts":{}', '"offload":{}', '"flush":{}',
        '"reload":{}', '"up":{"peer":"String","auth":"String","mode":"String",'
        '"peer_key":"String"}', '"down":{"peer":"String"}', '"devices":{"device":"String"}',
        '"explain":{"address":"String"}',
    ]  # fmt: skip


_TIMES = re.compile(r"(_s|_at)$")


def _model(doc: Any) -> Any:
    """A status document without what moves between two reads (ages, times), floats to
    the 6 decimals ``ubus`` prints them with."""
    if isinstance(doc, dict):
        return {k: _model(v) for k, v in doc.items() if not _TIMES.search(k)}
    if isinstance(doc, list):
        return [_model(v) for v in doc]
    if isinstance(doc, float):
        return round(doc, 6)
    return doc


def test_ubus_status_is_the_model_of_oe_status_json(lab: Lab) -> None:
    via_ubus = lab.call("status")
    via_cli = lab.r.status()
    assert set(via_ubus) == set(via_cli) >= {"daemon", "tunnels", "shunts", "engines", "dns"}
    assert _model(via_ubus) == _model(via_cli)
    assert lab.call("tunnels") == {"tunnels": lab.call("status")["tunnels"]}
    assert lab.call("shunts") == {"shunts": lab.call("status")["shunts"]}
    offload = json.loads(lab.r.oe("offload", "--json").stdout)
    assert _model(lab.call("offload")) == _model(offload)


# --------------------------------------------------------------------- events, flush


def _ping(ns: str, dst: str, count: int = 1) -> None:
    netns_run(ns, ["ping", "-c", str(count), "-i", "0.5", "-W", "2", dst], check=False, timeout=30)


def test_a_pass_shunt_is_an_event_and_flush_makes_the_next_flow_negotiate(lab: Lab) -> None:
    listen = lab.listen()
    try:
        time.sleep(0.3)  # `ubus listen` registers its handler first
        _ping(lab.r_ns, PLAIN)  # H answers IKE with port unreachable: IKE fails at once
        lab.r.wait_for("a pass shunt for H", lambda: lab.call("shunts")["shunts"], 20)
        (row,) = lab.call("shunts")["shunts"]
        assert (row["destination"], row["kind"]) == (f"{PLAIN}/32", "pass")
        events = lab.r.wait_for("oe.shunt", lambda: listen.events("oe.shunt"), 10)
        assert events[0]["destination"] == f"{PLAIN}/32" and events[0]["kind"] == "pass"
        assert "ICMP unreachable" in events[0]["reason"]  # the shunt row's reason

        assert lab.call("flush") == {"flushed": 1}
        assert lab.call("shunts") == {"shunts": []} and lab.r.status()["shunts"] == []
        # the trap again: a new negotiation, a new shunt (the datapath raises at most one
        # ACQUIRE a second per destination, as the kernel does: a flow that goes on gets one)
        _ping(lab.r_ns, PLAIN, count=4)
        lab.r.wait_for("a second oe.shunt", lambda: len(listen.events("oe.shunt")) >= 2, 20)
        assert len(lab.call("shunts")["shunts"]) == 1
        flushed = lab.r.oe("flush")
        assert flushed.stdout.startswith("1 shunt(s) removed")
    finally:
        listen.close()


def test_up_and_down_are_tunnel_events(lab: Lab) -> None:
    listen = lab.listen()
    try:
        time.sleep(0.3)
        up = lab.call("up", {"peer": P_WAN})
        assert up["ike"]["peer"] == P_WAN and up["ike"]["state"] == "established"
        (ev,) = lab.r.wait_for("oe.tunnel.up", lambda: listen.events("oe.tunnel.up"), 10)
        assert ev["peer"] == P_WAN and ev["local"] == R_WAN and ev["mode"] == "tunnel"
        spis = {c["spi_in"] for c in up["ike"]["children"]}
        assert ev["spi_in"] in spis
        assert lab.call("down", {"peer": P_WAN}) == {"deleted": 1}
        (gone,) = lab.r.wait_for("oe.tunnel.down", lambda: listen.events("oe.tunnel.down"), 10)
        assert (gone["peer"], gone["spi_in"], gone["dead"]) == (P_WAN, ev["spi_in"], False)
    finally:
        listen.close()


# --------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("method", "args", "rc", "error"),
    [
        ("status", '{"x": 1}', 254, "status: takes no arguments"),  # INVALID_ARGUMENT
        ("up", '{"peer": 7}', 254, "up: peer must be a string, not a number"),
        ("up", '{"peer": "a b"}', 254, "contains a space"),
        ("down", f'{{"peer": "{NOBODY}"}}', 247, f"no IKE SA with {NOBODY}"),  # UNKNOWN_ERROR
    ],
)
def test_bad_calls_get_an_error_status_and_one_line(
    lab: Lab, method: str, args: str, rc: int, error: str
) -> None:
    p = lab.ubus("call", "oe", method, args)
    assert p.returncode == rc, (p.stdout, p.stderr)
    assert error in json.loads(p.stdout)["error"]


def test_reload_as_the_cli_a_broken_file_is_refused(lab: Lab) -> None:
    before = lab.call("status")["daemon"]["config_generation"]
    assert lab.call("reload")["reload"]["accepted"] is True
    good = lab.r.config
    assert lab.r.reconfigure(good.replace("'userspace'", "'warp'")).returncode == 1
    p = lab.ubus("call", "oe", "reload")
    assert p.returncode == 247  # UNKNOWN_ERROR, with the reload result
    body = json.loads(p.stdout)
    assert body["reload"]["accepted"] is False and "datapath" in body["error"]
    assert lab.r.reconfigure(good).returncode == 0
    assert lab.call("status")["daemon"]["config_generation"] == before + 2


class _RawClient:
    """A libubus client in this process that sends what it is told (a hostile caller)."""

    def __init__(self, lab: Lab) -> None:
        self.lib = _load(lab.userland, "libubus.so")
        self.lib.ubus_connect.restype = ctypes.c_void_p
        self.lib.ubus_connect.argtypes = [ctypes.c_char_p]
        self.lib.ubus_lookup_id.argtypes = [
            ctypes.c_void_p, ctypes.c_char_p, ctypes.POINTER(ctypes.c_uint32)
        ]  # fmt: skip
        self.lib.ubus_invoke_fd.argtypes = [
            ctypes.c_void_p, ctypes.c_uint32, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_void_p,
            ctypes.c_void_p, ctypes.c_int, ctypes.c_int,
        ]  # fmt: skip
        self.lib.ubus_free.argtypes = [ctypes.c_void_p]
        self.ctx = self.lib.ubus_connect(str(lab.sock).encode())
        assert self.ctx
        oid = ctypes.c_uint32()
        assert self.lib.ubus_lookup_id(self.ctx, b"oe", ctypes.byref(oid)) == 0
        self.oid = oid.value

    def call(self, method: str, blob: bytes) -> int:
        buf = ctypes.create_string_buffer(blob, len(blob))
        return int(
            self.lib.ubus_invoke_fd(
                self.ctx, self.oid, method.encode(), ctypes.addressof(buf), None, None, 5000, -1
            )
        )

    def close(self) -> None:
        self.lib.ubus_free(self.ctx)


def test_a_malformed_blob_from_a_raw_client_is_invalid_argument(lab: Lab) -> None:
    good = encode({"peer": P_WAN})
    member_len = 4 + 8 + len(P_WAN) + 1
    bad_lengths = good[:4] + (0x83000000 | 4000).to_bytes(4, "big") + good[8:]  # runs past
    no_nul = bytearray(good)
    no_nul[4 + member_len - 1] = ord("x")  # the string's NUL
    client = _RawClient(lab)
    try:
        assert client.call("down", bad_lengths) == 2  # UBUS_STATUS_INVALID_ARGUMENT
        assert client.call("down", bytes(no_nul)) == 2
        assert client.call("down", encode({"peer": "x" * 70000})) == 2  # over 64 KiB
        assert client.call("status", encode({})) == 0
    finally:
        client.close()
    assert "Traceback" not in lab.r.log()
    assert lab.r.status()["daemon"]["pid"] > 0


def test_a_slow_call_does_not_hold_the_others(lab: Lab) -> None:
    """``up`` towards an address nobody has: IKE retransmits for seconds; meanwhile
    status answers over ubus and over the control socket."""
    slow = subprocess.Popen(
        [str(lab.userland.tool("ubus")), "-s", str(lab.sock), "call", "oe", "up",
         json.dumps({"peer": NOBODY})],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=lab.userland.env(),
    )  # fmt: skip
    try:
        time.sleep(0.5)
        for _ in range(3):
            assert lab.call("status")["daemon"]["pid"] > 0
            assert lab.r.status()["daemon"]["pid"] > 0
        assert slow.poll() is None, "the slow up ended before the other calls were answered"
        out, _ = slow.communicate(timeout=60)
        assert slow.returncode == 247 and NOBODY in json.loads(out)["error"]
    finally:
        with contextlib.suppress(ProcessLookupError):
            slow.kill()


# --------------------------------------------------------------------- ubusd goes away


def test_ubusd_killed_is_one_line_and_the_object_comes_back(lab: Lab) -> None:
    registered = lab.r.log().count("object oe registered")
    lab.ubusd.send_signal(signal.SIGKILL)
    lab.ubusd.wait()
    lab.r.wait_for("the lost line", lambda: "lost ubusd" in lab.r.log(), 10)
    assert lab.r.status()["daemon"]["pid"] > 0  # the control socket serves meanwhile
    time.sleep(1.5)  # a few reconnect attempts fail, silently
    lab.start_ubusd()
    lab.r.wait_for("oe on the new ubusd", lambda: "oe" in lab.ubus("list").stdout.split(), 40)
    log = lab.r.log()
    assert log.count("lost ubusd") == 1
    assert log.count("object oe registered") == registered + 1
    assert lab.call("status")["daemon"]["pid"] > 0


# --------------------------------------------------------------------- the shim itself


def test_the_live_self_test_refuses_layouts_that_do_not_match(lab: Lab) -> None:
    """The i386 layouts in this x86_64 process: ubus_context.sock is not where they say,
    the handshake finds it out against the live ubusd, one line, no object."""
    import logging

    from oe_router.cabi import ABIS
    from oe_router.control.ubus import UbusShim
    from oe_router.control.ubus_abi import layout

    lib = str(lab.userland.root / "usr" / "lib" / "libubus.so")
    _load(lab.userland, "libubus.so")
    records: list[str] = []

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    handler = Catch()
    logger = logging.getLogger("oe_router.control")
    logger.addHandler(handler)

    async def body() -> None:
        shim = UbusShim(
            socket_path=str(lab.sock), candidates=lambda: [lib], layout=layout(ABIS["i386"])
        )
        await shim.start()
        deadline = time.monotonic() + 10
        while not records and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert not shim.connected
        await shim.stop()

    try:
        asyncio.run(body())
    finally:
        logger.removeHandler(handler)
    assert len(records) == 1, records
    assert "self-test against ubusd" in records[0] and "i386 layouts do not match" in records[0]


@pytest.fixture
def own_ubusd(lab: Lab, tmp_path: Path) -> Iterator[tuple[Path, subprocess.Popen[bytes]]]:
    """A ubusd of its own (socket, process), for a shim in this process: the lab's ubusd
    already has the daemon's object oe."""
    _load(lab.userland, "libubus.so")
    sock = tmp_path / "own.sock"
    proc = subprocess.Popen(
        [str(lab.userland.tool("ubusd")), "-s", str(sock)], env=lab.userland.env()
    )
    try:
        yield sock, proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGCONT)
        proc.kill()
        proc.wait()


async def _connected(shim: Any) -> None:
    deadline = time.monotonic() + 10
    while not shim.connected:
        assert time.monotonic() < deadline, "the shim did not connect to its ubusd"
        await asyncio.sleep(0.05)


def test_calls_beyond_the_in_flight_limit_are_busy(
    lab: Lab, own_ubusd: tuple[Path, subprocess.Popen[bytes]]
) -> None:
    """With two slow calls running (the limit, here), a third is refused at once with
    UNKNOWN_ERROR and says busy; the two complete when their command does."""
    from oe_router.control.protocol import CommandTable, Request
    from oe_router.control.ubus import UbusShim

    sock, _ = own_ubusd
    lib = str(lab.userland.root / "usr" / "lib" / "libubus.so")
    table = CommandTable()
    running: list[Request] = []
    release = asyncio.Event()

    async def up(request: Request) -> dict[str, Any]:
        running.append(request)
        await release.wait()
        return {"ike": None}

    async def status(request: Request) -> dict[str, Any]:
        return {"status": {}}

    table.register("up", up)
    table.register("status", status)
    got: dict[str, Any] = {}

    async def ubus(*args: str) -> tuple[int, str]:
        proc = await asyncio.create_subprocess_exec(
            str(lab.userland.tool("ubus")), "-s", str(sock), *args,
            stdout=asyncio.subprocess.PIPE, env=lab.userland.env(),
        )  # fmt: skip
        out, _ = await proc.communicate()
        return int(proc.returncode or 0), out.decode()

    async def body() -> None:
        shim = UbusShim(table, str(sock), candidates=lambda: [lib], max_in_flight=2)
        await shim.start()
        await _connected(shim)
        slow = [
            asyncio.create_task(ubus("call", "oe", "up", json.dumps({"peer": f"192.0.2.{i}"})))
            for i in (1, 2)
        ]
        deadline = time.monotonic() + 10
        while len(running) < 2:
            assert time.monotonic() < deadline, "the slow calls did not arrive"
            await asyncio.sleep(0.05)
        got["third"] = await ubus("call", "oe", "status")
        release.set()
        got["slow"] = await asyncio.gather(*slow)
        got["busy"] = shim.stats["busy"]
        await shim.stop()

    asyncio.run(body())
    rc, out = got["third"]
    assert rc == 247 and "busy (2 calls in progress)" in json.loads(out)["error"]
    assert [rc for rc, _ in got["slow"]] == [0, 0] and got["busy"] == 1


def test_a_stalled_ubusd_never_holds_the_loop(
    lab: Lab, own_ubusd: tuple[Path, subprocess.Popen[bytes]]
) -> None:
    """A ubusd that stops reading (SIGSTOP) while events pour out: libubus would wait
    for room in the socket with no timeout, so the shim only writes what fits; the
    rest is dropped and counted, the loop keeps its pace, and after SIGCONT calls are
    answered again. (A shim of this process on a ubusd of its own.)"""
    from oe_router.control.events import Events
    from oe_router.control.protocol import CommandTable, Request
    from oe_router.control.ubus import UbusShim

    lib = str(lab.userland.root / "usr" / "lib" / "libubus.so")
    sock, ubusd = own_ubusd
    table = CommandTable()

    async def status(request: Request) -> dict[str, Any]:
        return {"status": {"pong": True}}

    table.register("status", status)
    hub = Events()
    result: dict[str, Any] = {}

    async def body() -> None:
        shim = UbusShim(table, str(sock), events=hub, candidates=lambda: [lib])
        await shim.start()
        await _connected(shim)
        lags: list[float] = []

        async def heartbeat() -> None:
            while True:
                t0 = time.monotonic()
                await asyncio.sleep(0.01)
                lags.append(time.monotonic() - t0)

        beat = asyncio.get_running_loop().create_task(heartbeat())
        os.kill(ubusd.pid, signal.SIGSTOP)
        try:
            for i in range(3000):  # 3000 events of 2 KB: 6 MB against a 2 MiB buffer
                hub.publish("oe.shunt", {"destination": f"{i}", "reason": "x" * 2000})
                if i % 50 == 0:
                    await asyncio.sleep(0)
            await asyncio.sleep(0.2)
        finally:
            os.kill(ubusd.pid, signal.SIGCONT)
        result.update(shim.stats, max_lag=max(lags))
        reply = await asyncio.to_thread(lambda: lab.ubus_at(sock, "call", "oe", "status").stdout)
        result["reply"] = json.loads(reply)
        beat.cancel()
        await shim.stop()

    asyncio.run(body())
    assert result["events_sent"] > 100 and result["events_dropped"] > 100, result
    assert result["events_sent"] + result["events_dropped"] == 3000
    assert result["max_lag"] < 1.0, result  # the loop never waited on ubusd
    assert result["reply"] == {"pong": True}


def test_a_ubusd_that_never_answers_costs_a_thread_not_the_loop(lab: Lab, tmp_path: Path) -> None:
    """A socket that accepts and never says HELLO: libubus's connect waits for it with no
    timeout. The handshake thread is given up after connect_timeout (one line), no second
    one starts while it hangs, the loop keeps its pace, and the thread ends once the
    socket closes, after the shim stopped."""
    import logging
    import socket

    from oe_router.control.ubus import UbusShim

    lib = str(lab.userland.root / "usr" / "lib" / "libubus.so")
    _load(lab.userland, "libubus.so")
    path = tmp_path / "hung.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(8)
    records: list[str] = []

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    handler = Catch()
    logger = logging.getLogger("oe_router.control")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    lags: list[float] = []
    threads: list[int] = []

    def handshakes() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name == "ubus-handshake"]

    async def body() -> None:
        shim = UbusShim(
            socket_path=str(path), candidates=lambda: [lib], connect_timeout=1.0,
            retry_first=0.2, retry_max=0.2,
        )  # fmt: skip
        await shim.start()
        end = time.monotonic() + 3.0
        while time.monotonic() < end:
            t0 = time.monotonic()
            await asyncio.sleep(0.01)
            lags.append(time.monotonic() - t0)
            threads.append(len(handshakes()))
        assert not shim.connected
        await shim.stop()

    try:
        asyncio.run(body())
    finally:
        logger.removeHandler(handler)
        logger.setLevel(logging.NOTSET)
        server.close()  # the hung read in libubus returns: the thread frees its context
    assert max(threads) == 1  # the retries found the first one hanging
    deadline = time.monotonic() + 10
    while handshakes():
        assert time.monotonic() < deadline, "the handshake thread never ended"
        time.sleep(0.05)
    assert records == [
        f"ubus: ubusd at {path} did not answer within 1 s; trying again in the background"
    ]
    assert max(lags) < 0.5


class _BlobmsgJson:
    """libblobmsg_json and libubox in this process: JSON <-> blobmsg the C way."""

    def __init__(self, userland: UserlandBuild) -> None:
        self.ubox = _load(userland, "libubox.so")
        self.json = _load(userland, "libblobmsg_json.so")
        self.ubox.blob_buf_init.argtypes = [ctypes.c_void_p, ctypes.c_int]
        self.ubox.blob_buf_free.argtypes = [ctypes.c_void_p]
        self.json.blobmsg_add_json_from_string.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        self.json.blobmsg_add_json_from_string.restype = ctypes.c_bool
        self.json.blobmsg_format_json_with_cb.argtypes = [
            ctypes.c_void_p, ctypes.c_bool, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int
        ]  # fmt: skip
        self.json.blobmsg_format_json_with_cb.restype = ctypes.c_void_p
        self.libc = ctypes.CDLL(None)
        self.libc.free.argtypes = [ctypes.c_void_p]

    def from_json(self, text: str) -> bytes:
        """blobmsg_add_json_from_string into a fresh blob_buf: the message's bytes."""
        buf = ctypes.create_string_buffer(64)  # struct blob_buf, zeroed
        self.ubox.blob_buf_init(buf, 0)
        try:
            assert self.json.blobmsg_add_json_from_string(buf, text.encode())
            head = ctypes.c_void_p.from_buffer(buf).value
            assert head
            return ctypes.string_at(head, message_length(ctypes.string_at(head, 4)))
        finally:
            self.ubox.blob_buf_free(buf)

    def to_json(self, blob: bytes) -> Any:
        """blobmsg_format_json(message, true): what ``ubus call`` prints."""
        buf = ctypes.create_string_buffer(blob, len(blob))
        out = self.json.blobmsg_format_json_with_cb(ctypes.addressof(buf), True, None, None, -1)
        assert out
        try:
            return json.loads(ctypes.string_at(out).decode())
        finally:
            self.libc.free(out)


DOCS = [
    {"s": "text", "u": "h\u00e9 \u2713", "i": 7, "n": -5, "big": 2**40, "neg": -(2**40)},
    {"t": True, "f": False, "z": None, "d": 2.5, "e": [], "o": {}},
    {"nested": {"list": [1, "two", [3, {"four": 4}], {"five": [None, False]}]}},
    {"status-ish": [{"peer": "192.0.2.7", "bytes_in": 123456789012, "rekey_in_s": 3599.25}]},
]


@pytest.mark.parametrize("doc", DOCS)
def test_the_codec_agrees_with_libblobmsg_json(lab: Lab, doc: dict[str, Any]) -> None:
    c = _BlobmsgJson(lab.userland)
    text = json.dumps(doc)
    assert decode(c.from_json(text)) == doc  # their encoder, our decoder
    assert c.from_json(text) == encode(doc)  # byte for byte
    assert c.to_json(encode(doc)) == doc  # our encoder, their decoder


def test_the_status_document_survives_libblobmsg_json(lab: Lab) -> None:
    c = _BlobmsgJson(lab.userland)
    doc = lab.r.status()
    assert _model(c.to_json(encode(doc))) == _model(doc)


# --------------------------------------------------------------------- rpcd's ACL

#: MD5-crypt of "secret" (``openssl passwd -1 -salt abcdefgh secret``), as rpcd's logins hold it
SECRET = "$1$abcdefgh$cHJi5PXp/ki/ktXzqlk6I1"
RPCD_CONFIG = """
config rpcd
\toption socket '{sock}'
\toption timeout 30

config login
\toption username 'viewer'
\toption password '{secret}'
\tlist read 'oe'

config login
\toption username 'admin'
\toption password '{secret}'
\tlist read 'oe'
\tlist write 'oe'
"""


#: What OpenWrt's rpcd package grants the anonymous session (so that it can log in)
UNAUTHENTICATED = {
    "unauthenticated": {
        "description": "Access controls for unauthenticated requests",
        "read": {"ubus": {"session": ["access", "login"]}},
    }
}


@pytest.fixture
def rpcd(lab: Lab, tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """rpcd on the lab's ubusd, in a mount namespace where /etc/config/rpcd and
    /usr/share/rpcd/acl.d/oe.json are the test's (overlays on the host's folders)."""
    for d in ("etc-up", "etc-work", "share-up", "share-work"):
        (tmp_path / d).mkdir()
    (tmp_path / "etc-up" / "config").mkdir()
    (tmp_path / "etc-up" / "config" / "rpcd").write_text(
        RPCD_CONFIG.format(sock=lab.sock, secret=SECRET)
    )
    acl = tmp_path / "share-up" / "rpcd" / "acl.d"
    acl.mkdir(parents=True)
    (acl / "oe.json").write_text((REPO / "files/usr/share/rpcd/acl.d/oe.json").read_text())
    (acl / "unauthenticated.json").write_text(json.dumps(UNAUTHENTICATED))
    script = (
        f"mount -t overlay overlay -o lowerdir=/etc,upperdir={tmp_path}/etc-up,"
        f"workdir={tmp_path}/etc-work /etc && "
        f"mount -t overlay overlay -o lowerdir=/usr/share,upperdir={tmp_path}/share-up,"
        f"workdir={tmp_path}/share-work /usr/share && "
        f'exec "{lab.userland.tool("rpcd")}" -s "{lab.sock}"'
    )
    proc = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        env=lab.userland.env(),
    )
    try:
        deadline = time.monotonic() + 15
        while "session" not in lab.ubus("list").stdout.split():
            assert proc.poll() is None, "rpcd exited"
            assert time.monotonic() < deadline, "rpcd did not register its objects"
            time.sleep(0.1)
        yield proc
    finally:
        proc.terminate()
        proc.wait(5)


def test_rpcd_grants_read_and_write_separately(lab: Lab, rpcd: Any) -> None:
    def access(sid: str, function: str) -> bool:
        query = {"ubus_rpc_session": sid, "scope": "ubus", "object": "oe", "function": function}
        return bool(lab.call_object("session", "access", query)["access"])

    wrong = lab.ubus("call", "session", "login", '{"username": "admin", "password": "x"}')
    assert wrong.returncode == 250  # UBUS_STATUS_PERMISSION_DENIED: the hash is checked
    viewer = lab.call_object("session", "login", {"username": "viewer", "password": "secret"})
    admin = lab.call_object("session", "login", {"username": "admin", "password": "secret"})
    reads, writes = ("status", "tunnels", "shunts", "offload"), ("flush", "reload", "up", "down")
    v, a = viewer["ubus_rpc_session"], admin["ubus_rpc_session"]
    assert [access(v, f) for f in reads] == [True] * 4
    assert [access(v, f) for f in writes] == [False] * 4  # an unprivileged session
    assert [access(a, f) for f in (*reads, *writes)] == [True] * 8
    assert access(a, "offload-bench") is False  # not a method of the object


def _json_rpc(ns: str, port: int, params: list[Any]) -> dict[str, Any]:
    """One JSON-RPC ``call`` to uhttpd's /ubus, from inside namespace ``ns``."""
    import http.client
    import socket

    from oe_router.datapath.netns import in_netns

    with in_netns(ns):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.sock = sock
    body = {"jsonrpc": "2.0", "id": 1, "method": "call", "params": params}
    conn.request("POST", "/ubus", json.dumps(body), {"Content-Type": "application/json"})
    reply: dict[str, Any] = json.loads(conn.getresponse().read())
    conn.close()
    return reply


def _login(ns: str, port: int, user: str) -> dict[str, Any]:
    return _json_rpc(
        ns, port, ["0" * 32, "session", "login", {"username": user, "password": "secret"}]
    )


def test_uhttpd_json_rpc_refuses_write_methods_to_a_read_only_login(
    lab: Lab, rpcd: Any, tmp_path: Path
) -> None:
    """The whole LuCI path: uhttpd's /ubus JSON-RPC asks rpcd whether the session may
    call the method, then calls the daemon's object. The read-only login reads the
    status and is refused flush; the admin flushes."""
    docroot = tmp_path / "www"
    docroot.mkdir()
    port = 8080
    uhttpd = subprocess.Popen(
        ["ip", "netns", "exec", lab.r_ns, str(lab.userland.tool("uhttpd")), "-f",
         "-p", f"127.0.0.1:{port}", "-h", str(docroot), "-u", "/ubus", "-U", str(lab.sock)],
        env=lab.userland.env(),
    )  # fmt: skip
    try:
        anonymous = "0" * 32
        deadline = time.monotonic() + 15
        while True:
            try:
                login = _login(lab.r_ns, port, "viewer")
                break
            except OSError:
                assert uhttpd.poll() is None and time.monotonic() < deadline, "uhttpd not up"
                time.sleep(0.1)
        viewer = login["result"][1]["ubus_rpc_session"]
        admin_sid = _login(lab.r_ns, port, "admin")["result"][1]["ubus_rpc_session"]

        status = _json_rpc(lab.r_ns, port, [viewer, "oe", "status", {}])
        assert status["result"][0] == 0, status
        assert status["result"][1]["daemon"]["pid"] > 0
        refused = _json_rpc(lab.r_ns, port, [viewer, "oe", "flush", {}])
        assert refused["error"] == {"code": -32002, "message": "Access denied"}
        flushed = _json_rpc(lab.r_ns, port, [admin_sid, "oe", "flush", {}])
        assert flushed["result"][0] == 0 and "flushed" in flushed["result"][1]
        denied = _json_rpc(lab.r_ns, port, [anonymous, "oe", "status", {}])
        assert denied["error"]["code"] == -32002  # no login, no status
    finally:
        uhttpd.terminate()
        uhttpd.wait(5)
