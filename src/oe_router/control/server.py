"""Unix-socket server for the control protocol (the asyncio edge of `protocol.py`)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import stat
from pathlib import Path

from oe_router.control.protocol import MAX_LINE, CommandTable, encode_reply, error_reply

log = logging.getLogger("oe_router.control")


class SocketBindError(Exception):
    """The control socket path cannot be used; the message names the path and why."""


class ControlServer:
    """Serves a `CommandTable` on a unix socket; one client error never stops the server.

    The socket file is created with `mode` (0600: root only, by default) in a
    directory created with `dir_mode` if missing. A stale socket left by a
    crashed daemon is replaced; a live one (another daemon answers) is not.
    """

    def __init__(
        self,
        path: Path,
        commands: CommandTable,
        mode: int = 0o600,
        dir_mode: int = 0o755,
    ) -> None:
        self.path = path
        self.commands = commands
        self.mode = mode
        self.dir_mode = dir_mode
        self._server: asyncio.Server | None = None
        self._inode: tuple[int, int] | None = None
        self._clients: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        sock = self._bind()
        self._server = await asyncio.start_unix_server(
            self._serve_client, sock=sock, limit=MAX_LINE
        )
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

    async def _serve_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._clients.add(task)
        try:
            while True:
                try:
                    line = await reader.readuntil(b"\n")
                except asyncio.IncompleteReadError as exc:
                    if not exc.partial.strip():
                        return
                    line = exc.partial
                except asyncio.LimitOverrunError:
                    writer.write(encode_reply(error_reply(f"request longer than {MAX_LINE} bytes")))
                    await writer.drain()
                    return
                if not line.strip():
                    continue
                reply = await self.commands.dispatch(line)
                writer.write(encode_reply(reply))
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            return
        finally:
            if task is not None:
                self._clients.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError, asyncio.CancelledError):
                await writer.wait_closed()

    async def stop(self) -> None:
        """Stop listening, drop clients and remove the socket file if it is still ours."""
        if self._server is not None:
            self._server.close()
            for task in list(self._clients):
                task.cancel()
            await self._server.wait_closed()
            self._server = None
        if self._inode is not None:
            try:
                st = os.stat(self.path)
                if (st.st_dev, st.st_ino) == self._inode:
                    self.path.unlink()
            except FileNotFoundError:
                pass
            self._inode = None
