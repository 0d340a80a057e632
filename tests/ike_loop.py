"""IKE endpoints and services on loopback in the unit tier: a fresh event loop per test
(no pytest-asyncio), and the recorder of what an endpoint reports."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from functools import wraps
from typing import Any

from oe_router.ike.endpoint import SaHandle
from oe_router.ike.events import Event


def run_async(fn: Callable[[], Coroutine[Any, Any, None]]) -> Callable[[], None]:
    """No pytest-asyncio here: each test runs its own loop."""

    @wraps(fn)
    def wrapper() -> None:
        asyncio.run(fn())

    return wrapper


class Recorder:
    """The events an endpoint reports (its ``on_event``), and a wait for them."""

    def __init__(self) -> None:
        self.events: list[tuple[SaHandle, Event]] = []
        self.changed = asyncio.Event()

    def __call__(self, handle: SaHandle, event: Event) -> None:
        self.events.append((handle, event))
        self.changed.set()

    def of(self, cls: type[Event]) -> list[Event]:
        return [e for _, e in self.events if isinstance(e, cls)]

    async def wait_for(self, cls: type[Event], n: int = 1, timeout: float = 5.0) -> list[Event]:
        async with asyncio.timeout(timeout):
            while len(self.of(cls)) < n:
                self.changed.clear()
                await self.changed.wait()
        return self.of(cls)
