"""IKE endpoints and services on loopback in the unit tier: a fresh event loop per test
(no pytest-asyncio), the recorder of what an endpoint reports, and two services started
and pointed at each other's kernel-chosen ports."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from functools import wraps
from typing import Any

from oe_router.config.schema import OeConfig
from oe_router.ike.endpoint import SaHandle
from oe_router.ike.events import Event
from oe_router.ike.service import IkeService
from tests.aio import running


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


@asynccontextmanager
async def linked(
    a: IkeService,
    b: IkeService,
    config_a: OeConfig | None = None,
    config_b: OeConfig | None = None,
    *,
    mutual: bool = True,
) -> AsyncIterator[tuple[IkeService, IkeService]]:
    """``a`` and ``b`` (services on loopback, ports 0) started, ``a`` initiating to ``b``'s
    IKE and NAT-T ports, and ``b`` to ``a``'s unless not ``mutual``; stopped after."""
    async with running(a, config_a or OeConfig()), running(b, config_b or OeConfig()):
        assert a.endpoint is not None and b.endpoint is not None
        a.remote_ike_port, a.remote_natt_port = b.endpoint.ike_port, b.endpoint.natt_port
        if mutual:
            b.remote_ike_port, b.remote_natt_port = a.endpoint.ike_port, a.endpoint.natt_port
        yield a, b
