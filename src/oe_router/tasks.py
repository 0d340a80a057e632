"""Background asyncio tasks a service owns: kept in its set until done, and a failure
logged once with the service's name (a task's exception is otherwise lost)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any


def spawn_tracked(
    tasks: set[asyncio.Task[Any]], coro: Coroutine[Any, Any, Any], log: logging.Logger, what: str
) -> asyncio.Task[Any]:
    """Run ``coro`` on the running loop, held in ``tasks`` until it ends."""
    task: asyncio.Task[Any] = asyncio.get_running_loop().create_task(coro)
    tasks.add(task)

    def done(t: asyncio.Task[Any]) -> None:
        tasks.discard(t)
        if not t.cancelled() and (exc := t.exception()) is not None:
            log.error("%s task failed: %s: %s", what, type(exc).__name__, exc)

    task.add_done_callback(done)
    return task
