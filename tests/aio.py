"""The asyncio edge of tests: a service started for a block and stopped however the
block ends, and ``asyncio.run`` with objects to close afterwards.

Shared by every tier (unit, host) that starts an endpoint, a service or a daemon in an
event loop: it replaces the ``start; try: ...; finally: stop`` block, and the
``asyncio.run`` wrapped in ``try: ... finally: close``, that each test spelled out.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Coroutine
from typing import Any, Protocol, TypeVar


class _Closable(Protocol):
    def close(self) -> Any: ...


S = TypeVar("S")
T = TypeVar("T")


@contextlib.asynccontextmanager
async def running(service: S, *start_args: Any) -> AsyncIterator[S]:
    """``await service.start(*start_args)``, then the block, then ``await service.stop()``
    whether the block passed or failed (an assertion inside still stops the service)."""
    svc: Any = service  # anything with async start(...) and stop()
    await svc.start(*start_args)
    try:
        yield service
    finally:
        await svc.stop()


@contextlib.asynccontextmanager
async def stopping(*things: Any) -> AsyncIterator[None]:
    """The block, then ``await thing.stop()`` for each of ``things`` in order, however the
    block ended: for what starts itself (a negotiator's worker) but must be stopped."""
    try:
        yield
    finally:
        for thing in things:
            await thing.stop()


def run(main: Coroutine[Any, Any, T], *closing: _Closable) -> T:
    """``asyncio.run(main)``, then close every one of ``closing`` (sockets, mostly), even
    when ``main`` failed; an OSError from a close is ignored."""
    try:
        return asyncio.run(main)
    finally:
        for c in closing:
            with contextlib.suppress(OSError):
                c.close()
