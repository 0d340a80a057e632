"""A real control server (``ControlServer`` on a real unix socket) in a thread of its own,
so a test can drive it with the synchronous CLI and client."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

from oe_router.control.protocol import CommandTable
from oe_router.control.server import ControlServer


class ThreadedControlServer:
    """Serves ``table`` at ``path`` while the ``with`` block runs."""

    def __init__(self, path: Path, table: CommandTable) -> None:
        self.path = path
        self.loop = asyncio.new_event_loop()
        self.server = ControlServer(path, table)
        self.ready, self.stop = threading.Event(), threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        async def go() -> None:
            await self.server.start()
            self.ready.set()
            while not self.stop.is_set():
                await asyncio.sleep(0.02)
            await self.server.stop()

        self.loop.run_until_complete(go())
        self.loop.close()

    def __enter__(self) -> ThreadedControlServer:
        self.thread.start()
        assert self.ready.wait(5)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(5)
