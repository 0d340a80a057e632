"""The IKE endpoint's one timer: the earliest deadline of all its IKE SAs.

Why a lazy heap: every datagram may move an SA's deadline (a retransmission answered,
a keepalive due); a heap entry is never removed, only found stale when it surfaces
(the SA moved its deadline or is gone), so moving one costs a push. One asyncio timer
follows the earliest entry; time is read from the injected clock.
"""

from __future__ import annotations

import asyncio
import heapq
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

__all__ = ["Deadlines"]

K = TypeVar("K", bound=Hashable)


class Deadlines(Generic[K]):
    """Each key's current deadline, and the event-loop timer for the earliest one."""

    def __init__(self, clock: Callable[[], float], on_due: Callable[[float], None]) -> None:
        self._clock = clock
        self._on_due = on_due  #: called with the clock's time when the earliest is due
        self._heap: list[tuple[float, int, K]] = []  # lazy: stale entries skipped
        self._due: dict[K, float] = {}
        self._seq = 0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def set(self, key: K, at: float | None) -> None:
        """``key`` is next due ``at`` (None: nothing to do for it)."""
        if at is None:
            self._due.pop(key, None)
        elif self._due.get(key) != at:
            self._due[key] = at
            self._seq += 1
            heapq.heappush(self._heap, (at, self._seq, key))

    def next(self) -> float | None:
        heap = self._heap
        while heap and self._due.get(heap[0][2]) != heap[0][0]:
            heapq.heappop(heap)  # stale: the key moved its deadline or is gone
        return heap[0][0] if heap else None

    def pop_due(self, now: float) -> list[K]:
        """Every key due at ``now``, each taken off (the caller sets its next one)."""
        due: list[K] = []
        while (at := self.next()) is not None and at <= now:
            key = heapq.heappop(self._heap)[2]
            del self._due[key]
            due.append(key)
        return due

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def arm(self) -> None:
        """Point the loop's timer at the earliest deadline (once running)."""
        if self._loop is None:
            return
        at = self.next()
        if at == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = at
        if at is not None:
            self._timer = self._loop.call_later(max(0.0, at - self._clock()), self._fire)

    def _fire(self) -> None:
        self._timer, self._timer_at = None, None
        self._on_due(self._clock())
