"""The ubus object ``oe`` on ubusd, through libubus and ctypes, driven by the asyncio loop.

On OpenWrt, LuCI, rpcd and scripts talk to daemons over ubus. This shim registers the
object ``oe`` (methods and policies: ``ubus_api.py``) and sends the daemon's events
(``events.py``) as ubus events, with the libubus it finds at run time; without one, or
with one it does not know, it logs one line and the daemon runs on without ubus (the
control socket is the API either way).

How it is driven: no uloop. The ubus socket's fd is on the asyncio loop
(``loop.add_reader``); readable, it runs the socket's read callback (what the static
inline ``ubus_handle_event`` does), in which libubus calls the method handler. The
handler only parses the call and defers it (a copy of ``ubus_request_data``, what the
static inline ``ubus_defer_request`` does); the command runs as an asyncio task, and its
reply goes out when it is done and the socket has room for it. So a slow command or
caller never holds the loop, and IKE, DNS and the datapath go on. Events go out with the
asynchronous invoke of ubusd's event object (``ubus_send_event`` would wait for ubusd's
status with no timeout), and are dropped (counted) when the socket has no room for them.
Room matters because libubus writes a message whole, polling without a timeout while the
send buffer is full: the shim asks for a 2 MiB buffer and writes only what fits
(``TIOCOUTQ``), so a ubusd that stops reading never holds the loop.

Only the handshake is synchronous in libubus (``ubus_connect``, ``ubus_add_object``,
``ubus_lookup``: each waits for ubusd without a timeout), so it runs in a short-lived
thread that owns the context until it hands it to the loop; a ubusd that never answers
costs that thread, not the loop, and the attempt is abandoned after ``connect_timeout``.
libubus is not thread-safe: the loop touches no context while a handshake thread runs.

What is checked before the object goes live:

- the library: every function the shim calls is exported (``ubus_abi.REQUIRED``;
  ``ubus_invoke_async_fd`` dates the structures); otherwise one line and no ubus;
- the layouts, against the live ubusd at every connect: the fd where ``ubus_context``
  should hold its socket is a unix socket connected to that ubusd; the id libubus wrote
  into our ``ubus_object`` is the one ubusd reports for ``oe``; the signature ubusd holds
  (built by libubus from our ``ubus_method``/``blobmsg_policy`` arrays) is the declared
  one. A mismatch is one error line, and ubus stays off;
- at every call: the object id in ``ubus_request_data`` is ours.

A lost ubusd (it stopped, restarted) is one warning line; the shim reconnects in the
background (1 s, doubling to 30 s) and registers the object again. libubus's
``uloop_init`` installs C signal handlers where the disposition is SIG_DFL; after each
handshake the shim puts back what Python had.
"""

from __future__ import annotations

import asyncio
import ctypes
import fcntl
import glob
import logging
import os
import signal
import socket
import stat
import struct
import termios
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from oe_router.control import ubus_api
from oe_router.control.blobmsg import BlobmsgError, decode, encode, message_length
from oe_router.control.events import Events
from oe_router.control.protocol import MAX_LINE, CommandTable, one_line
from oe_router.control.ubus_abi import (
    FD_CALLBACK,
    HANDLER,
    HOST_LAYOUT,
    LOOKUP_CALLBACK,
    MAX_MSGLEN,
    REQUIRED,
    UBUS_SYSTEM_OBJECT_EVENT,
    ULOOP_READ,
    Layout,
    Status,
)
from oe_router.ratelimit import RateLimit
from oe_router.records import record

log = logging.getLogger("oe_router.control")

#: libubus's compiled-in socket (UBUS_UNIX_SOCKET), used when no path is given
DEFAULT_SOCKET = "/var/run/ubus/ubus.sock"
#: Where libubus is looked for: the dynamic linker's search (LD_LIBRARY_PATH, /usr/lib),
#: then OpenWrt's versioned file names.
LIBRARY_CANDIDATES = ("libubus.so", "/usr/lib/libubus.so.*", "/lib/libubus.so.*")
MAX_IN_FLIGHT = 32
CONNECT_TIMEOUT = 10.0
REPLY_TIMEOUT = 10.0
RETRY_FIRST, RETRY_MAX = 1.0, 30.0
#: The send buffer asked for on the ubus socket: room for the largest message twice over
SEND_BUFFER = 2 * MAX_MSGLEN
#: How often a reply waiting for room in the send buffer looks again (ubusd not reading)
ROOM_POLL = 0.05


def _needed(size: int) -> int:
    """Send-buffer room a message of ``size`` bytes takes without blocking (its bytes and
    the kernel's per-buffer overhead, generously)."""
    return size + size // 2 + 4096


class UbusUnavailable(Exception):
    """ubus cannot be used (now); ``fatal``: retrying will not help (unknown library,
    layouts that do not match)."""

    def __init__(self, message: str, *, fatal: bool = False) -> None:
        super().__init__(message)
        self.fatal = fatal


@record(frozen=True)
class UbusProbe:
    """Whether a known libubus is here, and why not if it is not."""

    available: bool
    detail: str


def library_candidates() -> Sequence[str]:
    return LIBRARY_CANDIDATES


class Library:
    """A loaded libubus whose exports the shim needs are all there, typed."""

    def __init__(self, cdll: Any, path: str) -> None:
        self.path = path
        missing = [name for name in REQUIRED if not hasattr(cdll, name)]
        if missing:
            raise UbusUnavailable(
                f"{path} is not a libubus this shim knows: it lacks {', '.join(missing)}",
                fatal=True,
            )
        self.fn: dict[str, Any] = {}
        for name, (restype, argtypes) in REQUIRED.items():
            fn = getattr(cdll, name)
            fn.restype, fn.argtypes = restype, list(argtypes)
            self.fn[name] = fn

    def strerror(self, code: int) -> str:
        text = self.fn["ubus_strerror"](code)
        return text.decode(errors="replace") if text else f"error {code}"


def load_library(candidates: Sequence[str], loader: Callable[[str], Any] = ctypes.CDLL) -> Library:
    """The first candidate (a name for the dynamic linker, a path, or a glob pattern)
    that loads, checked; UbusUnavailable (fatal) otherwise."""
    errors = []
    paths = [p for c in candidates for p in (sorted(glob.glob(c)) if "*" in c else [c])]
    for path in paths:
        try:
            cdll = loader(path)
        except OSError as exc:
            text = str(exc)
            if not (text.startswith(f"{path}:") and "No such file" in text):
                errors.append(f"cannot load {path}: {text}")  # there, but it does not load
            continue
        return Library(cdll, path)
    if errors:
        raise UbusUnavailable(one_line("; ".join(errors), 300), fatal=True)
    looked = ", ".join(candidates) or "nothing"
    raise UbusUnavailable(f"libubus not found (looked for {looked})", fatal=True)


class _ObjectMemory:
    """Object ``oe``'s C structures, in memory this process keeps for its lifetime
    (libubus and ubusd's handshake keep pointers into it)."""

    def __init__(self, layout: Layout, handler: Any) -> None:
        self._keep: list[Any] = [handler]
        names = list(ubus_api.METHODS)
        method_t, policy_t = layout["ubus_method"], layout["blobmsg_policy"]
        self.methods = (method_t * len(names))()
        for i, name in enumerate(names):
            pol = ubus_api.policy(name)
            policies = (policy_t * max(1, len(pol)))()
            self._keep.append(policies)
            for j, (arg, kind) in enumerate(pol):
                policies[j].name, policies[j].type = self._text(arg), int(kind)
            m = self.methods[i]
            m.name, m.handler = self._text(name), ctypes.cast(handler, ctypes.c_void_p).value
            m.policy = ctypes.addressof(policies) if pol else 0
            m.n_policy = len(pol)
        self.type = layout["ubus_object_type"]()
        self.type.name = self._text(ubus_api.OBJECT)
        self.type.methods, self.type.n_methods = ctypes.addressof(self.methods), len(names)
        self.obj = layout["ubus_object"]()
        self.obj.name = self._text(ubus_api.OBJECT)
        self.obj.type = ctypes.addressof(self.type)
        self.obj.methods, self.obj.n_methods = ctypes.addressof(self.methods), len(names)

    def _text(self, text: str) -> int:
        buf = ctypes.create_string_buffer(text.encode())
        self._keep.append(buf)
        return ctypes.addressof(buf)

    @property
    def address(self) -> int:
        return ctypes.addressof(self.obj)

    def reset(self) -> None:
        """Before registering on a new connection: no ids, no tree links."""
        ctypes.memset(ctypes.addressof(self.obj.avl), 0, ctypes.sizeof(self.obj.avl))
        self.obj.id, self.type.id, self.obj.has_subscribers = 0, 0, 0


def _restore_signals() -> None:
    """Put back the C handlers Python's view says are SIG_DFL (uloop_init replaces those)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD):
        if signal.getsignal(sig) == signal.SIG_DFL:
            signal.signal(sig, signal.SIG_DFL)


class UbusShim:
    """Object ``oe`` on ubusd for ``commands``, and ``events`` as ubus events.

    ``start`` never fails: without ubus it logs one line and returns. ``stats`` counts
    calls, calls refused as busy, events sent and dropped, connects and losses.
    """

    def __init__(
        self,
        commands: CommandTable | None = None,
        socket_path: str | None = None,
        *,
        events: Events | None = None,
        candidates: Callable[[], Sequence[str]] = library_candidates,
        loader: Callable[[str], Any] = ctypes.CDLL,
        layout: Layout = HOST_LAYOUT,
        connect_timeout: float = CONNECT_TIMEOUT,
        reply_timeout: float = REPLY_TIMEOUT,
        retry_first: float = RETRY_FIRST,
        retry_max: float = RETRY_MAX,
        max_in_flight: int = MAX_IN_FLIGHT,
    ) -> None:
        self.commands = commands if commands is not None else CommandTable()
        self.socket_path = socket_path
        self.events = events
        self._candidates = candidates
        self._loader = loader
        self._layout = layout
        self.connect_timeout = connect_timeout
        self.reply_timeout = reply_timeout
        self.retry_first, self.retry_max = retry_first, retry_max
        self.max_in_flight = max_in_flight
        self.stats = dict.fromkeys(
            ("calls", "busy", "events_sent", "events_dropped", "connects", "lost"), 0
        )
        self._lib: Library | None = None
        self._obj: _ObjectMemory | None = None
        self._handler = HANDLER(self._on_call_c)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._ctx: int | None = None
        self._ctx_struct: Any = None
        self._fd = -1
        self._sndbuf = 0
        self._sock_cb: Any = None
        self._sock_addr = 0
        #: the connection a call belongs to: its reply goes out only on that one
        self._conn: object | None = None
        self._handshake_conn: object | None = None
        self._loop_thread = 0
        self._lost = asyncio.Event()
        self._in_flight: set[asyncio.Task[None]] = set()
        self._thread: threading.Thread | None = None
        self._errors = RateLimit(60.0)

    @property
    def where(self) -> str:
        return self.socket_path or DEFAULT_SOCKET

    @property
    def connected(self) -> bool:
        return self._ctx is not None

    def probe(self) -> UbusProbe:
        """Whether a libubus this shim knows loads here (no connection is made)."""
        try:
            lib = load_library(self._candidates(), self._loader)
        except UbusUnavailable as exc:
            return UbusProbe(False, f"ubus unavailable: {exc}")
        return UbusProbe(True, f"libubus at {lib.path} has every function the shim calls")

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Load and check libubus, then connect in the background; one line if ubus is off."""
        try:
            self._lib = load_library(self._candidates(), self._loader)
        except UbusUnavailable as exc:
            log.info("ubus off: %s; the control socket is the API", exc)
            return
        self._obj = _ObjectMemory(self._layout, self._handler)
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._lost = asyncio.Event()
        if self.events is not None:
            self.events.subscribe(self._on_event)
        self._task = self._loop.create_task(self._keep_connected())

    async def stop(self) -> None:
        if self.events is not None:
            self.events.unsubscribe(self._on_event)
        tasks = [*self._in_flight, *([self._task] if self._task is not None else [])]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self._task = None
        self._detach()

    async def _keep_connected(self) -> None:
        delay, quiet = self.retry_first, False
        while True:
            conn = object()
            try:
                ctx = await self._connect(conn)
            except UbusUnavailable as exc:
                if exc.fatal:
                    log.error("ubus off: %s; the control socket is the API", exc)
                    return
                if not quiet:
                    log.info("ubus: %s; trying again in the background", exc)
                    quiet = True
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.retry_max)
                continue
            self._attach(ctx, conn)
            assert self._obj is not None
            log.info(
                "ubus: object %s registered on %s (id %08x)",
                ubus_api.OBJECT,
                self.where,
                self._obj.obj.id,
            )
            delay = self.retry_first
            await self._lost.wait()
            self._lost.clear()
            self.stats["lost"] += 1
            log.warning(
                "ubus: lost ubusd at %s; reconnecting in the background "
                "(the control socket serves meanwhile)",
                self.where,
            )
            quiet = True

    # ------------------------------------------------------------------ the handshake
    async def _connect(self, conn: object) -> int:
        """Connect, register and self-test in a thread; the context, or UbusUnavailable.

        A call that libubus hands the handler during the handshake (in that thread)
        belongs to ``conn``, the connection the context becomes once attached. A
        handshake given up (timeout, or the shim stopping) frees its own context when it
        ends: whoever of the thread and the loop comes second does it.
        """
        if self._thread is not None and self._thread.is_alive():
            raise UbusUnavailable(f"an earlier handshake with ubusd at {self.where} still hangs")
        self._handshake_conn = conn
        loop = asyncio.get_running_loop()
        done: asyncio.Future[int] = loop.create_future()
        state = {"claimed": False, "abandoned": False}
        lock = threading.Lock()

        def free(ctx: int | None) -> None:
            if ctx is not None and self._lib is not None:
                self._lib.fn["ubus_free"](ctx)

        def deliver(ctx: int | None, err: BaseException | None) -> None:  # on the loop
            if state["abandoned"] or done.done():
                free(ctx)
            elif err is not None:
                done.set_exception(err)
            else:
                done.set_result(int(ctx or 0))

        def run() -> None:  # the handshake thread
            ctx: int | None = None
            err: BaseException | None = None
            try:
                ctx = self._handshake()
            except UbusUnavailable as exc:
                err = exc
            except Exception as exc:
                err = UbusUnavailable(f"handshake failed: {type(exc).__name__}: {exc}")
            with lock:
                state["claimed"] = not state["abandoned"]
            if not state["claimed"]:
                free(ctx)
                return
            try:
                loop.call_soon_threadsafe(deliver, ctx, err)
            except RuntimeError:  # the loop is gone
                free(ctx)

        self._thread = threading.Thread(target=run, name="ubus-handshake", daemon=True)
        self._thread.start()
        try:
            return await asyncio.wait_for(asyncio.shield(done), self.connect_timeout)
        except TimeoutError:
            with lock:
                state["abandoned"] = not state["claimed"]
            if not state["abandoned"]:  # the thread finished just now: its result comes
                return await done
            raise UbusUnavailable(
                f"ubusd at {self.where} did not answer within {self.connect_timeout:g} s"
            ) from None
        except asyncio.CancelledError:  # the shim stops
            with lock:
                state["abandoned"] = True
            if done.done() and not done.cancelled() and done.exception() is None:
                free(done.result())
            raise
        finally:
            _restore_signals()

    def _handshake(self) -> int:
        """(In the handshake thread.) ubus_connect, the layout checks, ubus_add_object."""
        lib, obj = self._lib, self._obj
        assert lib is not None and obj is not None
        fn = lib.fn
        ctx = fn["ubus_connect"](self.socket_path.encode() if self.socket_path else None)
        if not ctx:
            raise UbusUnavailable(f"ubusd at {self.where} does not accept a connection")
        try:
            self._check_context(ctx)
            obj.reset()
            rc = fn["ubus_add_object"](ctx, obj.address)
            if rc:
                raise UbusUnavailable(
                    f"ubusd at {self.where} refused object {ubus_api.OBJECT}: "
                    f"{lib.strerror(rc)} (another oe-routerd on this bus?)"
                )
            self._check_registration(ctx)
        except BaseException:
            fn["ubus_free"](ctx)
            raise
        return int(ctx)

    def _mismatch(self, what: str) -> UbusUnavailable:
        assert self._lib is not None
        return UbusUnavailable(
            f"self-test against ubusd at {self.where} failed: {what}; the shim's "
            f"{self._layout.abi.name} layouts do not match {self._lib.path}",
            fatal=True,
        )

    def _check_context(self, ctx: int) -> None:
        """``ubus_context.sock`` holds a unix socket connected to our ubusd, and a callback."""
        c = self._layout["ubus_context"].from_address(ctx)
        fd = c.sock.fd
        if fd < 0 or not c.sock.cb:
            raise self._mismatch(f"ubus_context.sock is fd {fd}, callback {c.sock.cb:#x}")
        try:
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                raise self._mismatch(f"ubus_context.sock.fd {fd} is not a socket")
            with socket.socket(fileno=os.dup(fd)) as s:
                peer = s.getpeername() if s.family == socket.AF_UNIX else None
        except OSError as exc:
            raise self._mismatch(f"ubus_context.sock.fd {fd}: {exc.strerror or exc}") from None
        if not isinstance(peer, str) or not _same_file(peer, self.where):
            raise self._mismatch(f"ubus_context.sock.fd {fd} is connected to {peer!r}")

    def _check_registration(self, ctx: int) -> None:
        """The id libubus wrote into our object is ubusd's, and so is the signature."""
        lib, obj = self._lib, self._obj
        assert lib is not None and obj is not None
        if obj.obj.id == 0:
            raise self._mismatch("ubus_add_object left ubus_object.id at 0")
        found = ctypes.c_uint32(0)
        rc = lib.fn["ubus_lookup_id"](ctx, ubus_api.OBJECT.encode(), ctypes.byref(found))
        if rc or found.value != obj.obj.id:
            raise self._mismatch(
                f"ubusd says {ubus_api.OBJECT} is {found.value:08x}, ubus_object.id "
                f"holds {obj.obj.id:08x}"
            )
        seen: list[Any] = []
        data_t = self._layout["ubus_object_data"]

        def on_lookup(_ctx: Any, data: Any, _priv: Any) -> None:
            try:
                od = data_t.from_address(data)
                sig = od.signature
                seen.append((od.id, _read_message(sig) if sig else None))
            except Exception as exc:  # never into C
                seen.append((None, f"{type(exc).__name__}: {exc}"))

        callback = LOOKUP_CALLBACK(on_lookup)
        rc = lib.fn["ubus_lookup"](ctx, ubus_api.OBJECT.encode(), callback, None)
        want = (obj.obj.id, ubus_api.signature())
        if rc or seen != [want]:
            raise self._mismatch(f"ubusd holds {seen!r} for the object, expected {want!r}")

    # ------------------------------------------------------------------ the connection
    def _attach(self, ctx: int, conn: object) -> None:
        assert self._loop is not None
        _restore_signals()
        self._ctx, self._conn = ctx, conn
        self._ctx_struct = c = self._layout["ubus_context"].from_address(ctx)
        self._fd = c.sock.fd
        self._sock_cb = FD_CALLBACK(c.sock.cb)
        self._sock_addr = ctx + self._layout["ubus_context"].sock.offset
        self._sndbuf = _grow_send_buffer(self._fd)
        self.stats["connects"] += 1
        self._loop.add_reader(self._fd, self._on_readable)
        self._on_readable()  # what came during the handshake (the socket is non-blocking)

    def _detach(self) -> None:
        if self._ctx is None:
            return
        ctx, self._ctx, self._conn = self._ctx, None, None
        if self._loop is not None:
            self._loop.remove_reader(self._fd)
            self._loop.remove_writer(self._fd)
        assert self._lib is not None
        self._lib.fn["ubus_free"](ctx)
        self._ctx_struct, self._sock_cb, self._fd = None, None, -1

    def _on_readable(self) -> None:
        if self._ctx is None:
            return
        self._sock_cb(self._sock_addr, ULOOP_READ)
        if self._ctx is not None and self._ctx_struct.sock.eof:
            self._detach()
            self._lost.set()

    def _has_room(self, size: int) -> bool:
        """Whether a message of ``size`` bytes goes into the socket now without blocking:
        libubus writes a message whole, waiting (poll without a timeout) while the send
        buffer is full, so a ubusd that stopped reading would hold the loop."""
        try:
            raw = fcntl.ioctl(self._fd, termios.TIOCOUTQ, b"\0\0\0\0")
        except OSError:
            return False
        queued: int = struct.unpack("i", raw)[0]
        return self._sndbuf - queued >= min(_needed(size), self._sndbuf)

    async def _wait_room(self, conn: object, size: int) -> bool:
        """Until the socket of connection ``conn`` has room for ``size`` bytes (or False
        after ``reply_timeout``, or when the connection is gone)."""
        assert self._loop is not None
        deadline = self._loop.time() + self.reply_timeout
        while conn is self._conn:
            if self._has_room(size):
                return True
            left = deadline - self._loop.time()
            if left <= 0:
                return False
            await asyncio.sleep(min(ROOM_POLL, left))
        return False

    # ------------------------------------------------------------------ calls
    def _on_call_c(self, ctx: Any, obj: Any, req: Any, method: Any, msg: Any) -> int:
        """libubus's method handler: whatever happens, a status and no exception into C."""
        try:
            return self._on_call(ctx, req, method, msg)
        except BaseException as exc:
            self._log_error("a call failed before its command ran: %s", exc)
            return int(Status.UNKNOWN_ERROR)

    def _on_call(self, ctx: int, req: int, method: bytes | None, msg: int | None) -> int:
        """Parse and defer one call. Runs on the loop, or in the handshake thread when
        libubus delivers a call that came during the handshake."""
        assert self._obj is not None and self._loop is not None and self._lib is not None
        on_loop = threading.get_ident() == self._loop_thread
        conn = self._conn if on_loop else self._handshake_conn
        self.stats["calls"] += 1
        name = (method or b"").decode("utf-8", "replace")
        data_t = self._layout["ubus_request_data"]
        rd = data_t.from_address(req)
        if rd.object != self._obj.obj.id:
            self._log_error("%s", f"ubus_request_data.object {rd.object:08x} is not ours")
            return int(Status.UNKNOWN_ERROR)
        if len(self._in_flight) >= self.max_in_flight:
            self.stats["busy"] += 1
            why = f"{name}: busy ({len(self._in_flight)} calls in progress); try again"
            return self._reply_now(ctx, req, ubus_api.failure(Status.UNKNOWN_ERROR, why))
        size = message_length(ctypes.string_at(msg, 4)) if msg else 0
        if not msg or size > MAX_LINE + 4:
            why = f"{name}: arguments of {size} bytes (max {MAX_LINE})"
            return self._reply_now(ctx, req, ubus_api.failure(Status.INVALID_ARGUMENT, why))
        args = ctypes.string_at(msg, size)
        saved = data_t.from_buffer_copy(ctypes.string_at(req, ctypes.sizeof(data_t)))
        saved.acl.user = saved.acl.group = saved.acl.object = 0  # they point into the message
        saved.fd, saved.req_fd, saved.deferred = -1, -1, 0
        rd.deferred = 1  # ubus_defer_request: libubus sends no status now
        if on_loop:
            self._spawn(saved, name, args, conn)
        else:
            self._loop.call_soon_threadsafe(self._spawn, saved, name, args, conn)
        return int(Status.OK)

    def _spawn(self, saved: Any, method: str, args: bytes, conn: object | None) -> None:
        assert self._loop is not None
        task = self._loop.create_task(self._answer(saved, method, args, conn))
        self._in_flight.add(task)
        task.add_done_callback(self._in_flight.discard)

    def _reply_now(self, ctx: int, req: int, answer: ubus_api.Answer) -> int:
        """Answer inside the handler (libubus sends the status when it returns)."""
        assert self._lib is not None
        buf = ctypes.create_string_buffer(answer.data, len(answer.data))
        self._lib.fn["ubus_send_reply"](ctx, req, ctypes.addressof(buf))
        return int(answer.status)

    async def _answer(self, saved: Any, method: str, args: bytes, conn: object | None) -> None:
        answer = await ubus_api.answer(self.commands, method, args)
        if conn is None or not await self._wait_room(conn, len(answer.data) + 256):
            return  # ubusd went away or stopped reading: the caller gets ubusd's timeout
        assert self._lib is not None and self._ctx is not None
        buf = ctypes.create_string_buffer(answer.data, len(answer.data))
        self._lib.fn["ubus_send_reply"](self._ctx, ctypes.addressof(saved), ctypes.addressof(buf))
        self._lib.fn["ubus_complete_deferred_request"](
            self._ctx, ctypes.addressof(saved), int(answer.status)
        )

    # ------------------------------------------------------------------ events
    def _on_event(self, name: str, body: dict[str, Any]) -> None:
        """(Events listener.) Sent on the next loop turn, never inside libubus's calls."""
        if self._loop is None or self._ctx is None:
            self.stats["events_dropped"] += 1
            return
        self._loop.call_soon(self._send_event, name, body)

    def _send_event(self, name: str, body: dict[str, Any]) -> None:
        if self._ctx is None or self._lib is None or self._obj is None:
            self.stats["events_dropped"] += 1
            return
        try:
            event = encode({"id": name, "data": body})
            notify = encode(body)
        except BlobmsgError as exc:
            self.stats["events_dropped"] += 1
            self._log_error("event %s", f"{name} not sent: {exc}")
            return
        if not self._has_room(2 * len(event) + 512):  # the event and its notification
            self.stats["events_dropped"] += 1
            return
        fn = self._lib.fn
        buf = ctypes.create_string_buffer(event, len(event))
        req = ctypes.create_string_buffer(ctypes.sizeof(self._layout["ubus_request"]))
        # ubus_send_event without waiting for ubusd's status (ubus_request stays unlinked:
        # the status that comes back finds no request and is dropped by libubus)
        rc = fn["ubus_invoke_async_fd"](
            self._ctx, UBUS_SYSTEM_OBJECT_EVENT, b"send", ctypes.addressof(buf),
            ctypes.addressof(req), -1,
        )  # fmt: skip
        self.stats["events_dropped" if rc else "events_sent"] += 1
        if self._obj.obj.has_subscribers:  # `ubus subscribe oe`: a notification, no reply
            nbuf = ctypes.create_string_buffer(notify, len(notify))
            address = ctypes.addressof(nbuf)
            fn["ubus_notify"](self._ctx, self._obj.address, name.encode(), address, -1)

    def _log_error(self, msg: str, exc: object) -> None:
        if self._errors.allow(time.monotonic()):
            log.error("ubus: " + msg, one_line(str(exc), 300))


def _read_message(address: int) -> Any:
    """The blobmsg message at a C address (its length from its header), decoded."""
    size = message_length(ctypes.string_at(address, 4))
    return decode(ctypes.string_at(address, size))


def _grow_send_buffer(fd: int) -> int:
    """Ask for SEND_BUFFER on the ubus socket (as root beyond wmem_max); what it got."""
    with socket.socket(fileno=os.dup(fd)) as s:
        for option in (getattr(socket, "SO_SNDBUFFORCE", 32), socket.SO_SNDBUF):
            try:
                s.setsockopt(socket.SOL_SOCKET, option, SEND_BUFFER // 2)  # Linux doubles it
                break
            except OSError:
                continue
        return int(s.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF))


def _same_file(a: str, b: str) -> bool:
    if a == b:
        return True
    try:
        sa, sb = os.stat(a), os.stat(b)
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)
