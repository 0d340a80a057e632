"""Unix-socket server for the control protocol (the asyncio edge of `protocol.py`).

Every local client may be hostile. The server holds at most `max_clients`
connections (each costs the daemon a file descriptor, shared with its IKE, DNS
and netlink sockets); more wait in the kernel's listen backlog, where they cost
us nothing. A connection that is full when another one waits gives up its
longest-idle member (a client that connected and sends nothing, or trickles),
so idle clients cannot starve one that asks. A request line must arrive whole
within `request_timeout`, and its reply must be taken within `reply_timeout`
(a client that never reads is dropped). Every request line gets exactly one
reply line; no client can make the server raise.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import stat
import time
from dataclasses import field
from pathlib import Path

from oe_router.control.protocol import (
    MAX_LINE,
    CommandTable,
    encode_reply,
    error_reply,
    one_line,
)
from oe_router.ratelimit import RateLimit
from oe_router.records import record

log = logging.getLogger("oe_router.control")

MAX_CLIENTS = 32
BACKLOG = 128
REQUEST_TIMEOUT = 10.0
REPLY_TIMEOUT = 10.0
# After accept() fails (out of descriptors, say), wait this long before the next try.
ACCEPT_BACKOFF = 0.1
# At most one warning per this many seconds about failing accept() calls.
ACCEPT_WARN_INTERVAL = 60.0


class SocketBindError(Exception):
    """The control socket path cannot be used; the message names the path and why."""


@record(eq=False)
class _Client:
    """One accepted connection; `idle_since` is None while a request is being answered."""

    task: asyncio.Task[None] | None = None
    writer: asyncio.StreamWriter | None = None
    idle_since: float | None = field(default_factory=time.monotonic)


class ControlServer:
    """Serves a `CommandTable` on a unix socket; one client error never stops the server.

    The socket file is created with `mode` (0600: root only, by default) in a
    directory created with `dir_mode` if missing. A stale socket left by a
    crashed daemon is replaced; a live one (another daemon answers) is not.
    `stats` counts what the limits did: accepted, evicted (idle, to make room),
    timed_out (no whole request, or reply not taken, in time), accept_errors.
    """

    def __init__(
        self,
        path: Path,
        commands: CommandTable,
        mode: int = 0o600,
        dir_mode: int = 0o755,
        *,
        max_clients: int = MAX_CLIENTS,
        request_timeout: float = REQUEST_TIMEOUT,
        reply_timeout: float = REPLY_TIMEOUT,
        backlog: int = BACKLOG,
    ) -> None:
        self.path = path
        self.commands = commands
        self.mode = mode
        self.dir_mode = dir_mode
        self.max_clients = max_clients
        self.request_timeout = request_timeout
        self.reply_timeout = reply_timeout
        self.backlog = backlog
        self.stats = {"accepted": 0, "evicted": 0, "timed_out": 0, "accept_errors": 0}
        self._listener: socket.socket | None = None
        self._acceptor: asyncio.Task[None] | None = None
        self._inode: tuple[int, int] | None = None
        self._clients: set[_Client] = set()
        self._changed = asyncio.Event()
        self._accept_log = RateLimit(ACCEPT_WARN_INTERVAL)

    @property
    def connections(self) -> int:
        """Client connections held open right now."""
        return len(self._clients)

    async def start(self) -> None:
        sock = self._bind()
        sock.setblocking(False)
        sock.listen(self.backlog)
        self._listener = sock
        self._acceptor = asyncio.get_running_loop().create_task(self._accept_loop(sock))
        self._acceptor.add_done_callback(self._acceptor_done)
        log.info("control socket listening on %s", self.path)

    def _bind(self) -> socket.socket:
        directory = self.path.parent
        try:
            if not directory.exists():
                directory.mkdir(parents=True, mode=self.dir_mode)
                os.chmod(directory, self.dir_mode)
            self._remove_stale()
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                old_umask = os.umask(0o777 & ~self.mode)
                try:
                    sock.bind(str(self.path))
                finally:
                    os.umask(old_umask)
                os.chmod(self.path, self.mode)
            except BaseException:
                sock.close()
                raise
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise SocketBindError(f"cannot bind control socket {self.path}: {reason}") from None
        st = os.stat(self.path)
        self._inode = (st.st_dev, st.st_ino)
        return sock

    def _remove_stale(self) -> None:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise SocketBindError(f"cannot bind control socket {self.path}: not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(self.path))
        except OSError as exc:
            if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
                log.info("removing stale control socket %s", self.path)
                self.path.unlink(missing_ok=True)
                return
            raise
        finally:
            probe.close()
        raise SocketBindError(
            f"cannot bind control socket {self.path}: another daemon is serving it"
        )

    # ------------------------------------------------------------------ accepting
    async def _accept_loop(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if len(self._clients) >= self.max_clients:
                await self._connection_waiting(listener)
                while len(self._clients) >= self.max_clients and not self._evict_idle():
                    self._changed.clear()
                    await self._changed.wait()  # a client closed or went idle
            try:
                conn, _ = await loop.sock_accept(listener)
            except OSError as exc:
                self._accept_failed(exc)
                await asyncio.sleep(ACCEPT_BACKOFF)
                continue
            self.stats["accepted"] += 1
            client = _Client()
            self._clients.add(client)
            client.task = loop.create_task(self._serve(conn, client))
            await asyncio.sleep(0)  # let it read its request before the next accept

    def _acceptor_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            log.error(
                "control socket stopped accepting: %s", one_line(f"{type(exc).__name__}: {exc}")
            )

    async def _connection_waiting(self, listener: socket.socket) -> None:
        """Return once a connection waits in the backlog (the listener is readable)."""
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()

        def wake() -> None:
            if not ready.done():
                ready.set_result(None)

        loop.add_reader(listener.fileno(), wake)
        try:
            await ready
        finally:
            loop.remove_reader(listener.fileno())

    def _evict_idle(self) -> bool:
        """Close the longest-idle connection to make room; False if every one is busy."""
        idle = [c for c in self._clients if c.idle_since is not None]
        if not idle:
            return False
        victim = min(idle, key=lambda c: c.idle_since or 0.0)
        self._forget(victim)
        self.stats["evicted"] += 1
        if victim.writer is not None:
            victim.writer.write(
                encode_reply(error_reply("server busy: closing this idle connection"))
            )
        if victim.task is not None:
            victim.task.cancel()
        return True

    def _accept_failed(self, exc: OSError) -> None:
        self.stats["accept_errors"] += 1
        if exc.errno == errno.ECONNABORTED:
            return
        if self._accept_log.allow(time.monotonic()):
            log.warning(
                "control socket: accept failed: %s (%d failure(s) so far)",
                exc.strerror or exc,
                self.stats["accept_errors"],
            )

    def _forget(self, client: _Client) -> None:
        self._clients.discard(client)
        self._changed.set()

    # ------------------------------------------------------------------ serving
    async def _serve(self, conn: socket.socket, client: _Client) -> None:
        writer: asyncio.StreamWriter | None = None
        try:
            reader, writer = await asyncio.open_unix_connection(sock=conn, limit=MAX_LINE)
            client.writer = writer
            while True:
                client.idle_since = time.monotonic()
                self._changed.set()
                line = await self._read_request(reader, writer)
                if line is None:
                    return
                if not line.strip():
                    continue
                client.idle_since = None
                writer.write(await self.commands.answer(line))
                try:
                    async with asyncio.timeout(self.reply_timeout):
                        await writer.drain()
                except TimeoutError:
                    self.stats["timed_out"] += 1
                    return
        except ConnectionError:
            return
        except Exception as exc:  # never a traceback: one line, and the server goes on
            log.error("control client failed: %s", one_line(f"{type(exc).__name__}: {exc}"))
        finally:
            self._forget(client)
            if writer is None:
                conn.close()
            elif writer.transport.get_write_buffer_size():
                writer.transport.abort()  # a client that does not read: do not wait for it
            else:
                writer.close()

    async def _read_request(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bytes | None:
        """The next request line, or None when the connection is done (EOF, error sent)."""
        try:
            async with asyncio.timeout(self.request_timeout):
                return await reader.readuntil(b"\n")
        except asyncio.IncompleteReadError as exc:
            return exc.partial if exc.partial.strip() else None
        except asyncio.LimitOverrunError:
            writer.write(encode_reply(error_reply(f"request longer than {MAX_LINE} bytes")))
        except TimeoutError:
            self.stats["timed_out"] += 1
            writer.write(
                encode_reply(error_reply(f"no complete request within {self.request_timeout:g} s"))
            )
        return None

    async def stop(self) -> None:
        """Stop listening, drop clients and remove the socket file if it is still ours."""
        tasks = [c.task for c in self._clients if c.task is not None]
        if self._acceptor is not None:
            tasks.append(self._acceptor)
            self._acceptor = None
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self._clients.clear()
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if self._inode is not None:
            try:
                st = os.stat(self.path)
                if (st.st_dev, st.st_ino) == self._inode:
                    self.path.unlink()
            except FileNotFoundError:
                pass
            self._inode = None
