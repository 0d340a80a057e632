"""The userspace datapath's policies: the SPD, its lifetimes, and its nftables projection.

Why its own object: XFRM keeps the policies in the kernel and fires their lifetimes
itself; here the daemon does. Every change goes to the SPD (``spd.py``, what a queued
packet is decided by), then to the kernel's projection (``nft_spd.py``, what every other
packet is decided by) in one step, and then the held first packets are decided again
(``on_change``). A shunt's lifetime is a timer: soft -> PolicyExpire(hard=False), hard
-> PolicyExpire(hard=True) and the policy goes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from oe_router.tasks import spawn_tracked

from .base import DatapathEvent, Direction, PolicyExpire, PolicySpec
from .nft_spd import SpdProjection
from .packet import Flow
from .spd import Spd, key_of

__all__ = ["PolicyTable"]

log = logging.getLogger("oe_router.datapath")


class PolicyTable:
    """The SPD with shunt timers, kept projected into nftables."""

    def __init__(
        self,
        projection: SpdProjection,
        emit: Callable[[DatapathEvent], None],
        on_change: Callable[[], None],
    ) -> None:
        self.projection = projection
        self._emit = emit
        self._on_change = on_change
        self._spd = Spd()
        self._timers: dict[tuple[Any, ...], asyncio.TimerHandle] = {}
        self._tasks: set[asyncio.Task[Any]] = set()

    def __len__(self) -> int:
        return len(self._spd)

    def policies(self) -> list[PolicySpec]:
        return self._spd.policies()

    def lookup(self, direction: Direction, flow: Flow) -> PolicySpec | None:
        return self._spd.lookup(direction, flow)

    def _current(self, policy: PolicySpec) -> PolicySpec | None:
        """The installed policy with ``policy``'s key (XFRM's: selector, direction, mark)."""
        entry = self._spd.get(policy)
        return None if entry is None else entry.policy

    async def install(self, policies: list[PolicySpec]) -> None:
        """Into the SPD, then one projection step for all of them (a Child SA's out, in
        and fwd policies go together: one nft run, not three)."""
        olds = []
        for policy in policies:
            old_policy = self._current(policy)
            if old_policy is not None:
                olds.append(old_policy)
            self._spd.install(policy)
            key = key_of(policy)
            old = self._timers.pop(key, None)
            if old is not None:
                old.cancel()
            lft = policy.lifetime
            if lft.hard_seconds or lft.soft_seconds:
                self._timers[key] = asyncio.get_running_loop().call_later(
                    float(lft.soft_seconds or lft.hard_seconds), self._timer, key, policy
                )
        # held packets are decided by the SPD before the kernel's copy changes: once the
        # projection lets new packets of a held flow through, each would be confirmed by
        # conntrack first and the held one, released after, dropped as a clash (its
        # unconfirmed entry has the same tuple). An accept verdict never meets the
        # projection again, so releasing ahead of it is safe.
        self._on_change()
        await self.projection.project(self._spd.policies, add=policies, remove=olds)
        self._on_change()

    def _timer(self, key: tuple[Any, ...], policy: PolicySpec) -> None:
        self._timers.pop(key, None)
        if self._current(policy) is not policy:
            return
        lft = policy.lifetime
        soft_first = bool(lft.soft_seconds) and (
            not lft.hard_seconds or lft.soft_seconds < lft.hard_seconds
        )
        if soft_first:
            self._emit(
                PolicyExpire(policy.src, policy.dst, policy.direction, policy.priority, False)
            )
            if lft.hard_seconds:
                self._timers[key] = asyncio.get_running_loop().call_later(
                    float(lft.hard_seconds - lft.soft_seconds), self._timer_hard, key, policy
                )
            return
        self._timer_hard(key, policy)

    def _timer_hard(self, key: tuple[Any, ...], policy: PolicySpec) -> None:
        self._timers.pop(key, None)
        if self._current(policy) is not policy:
            return
        self._emit(PolicyExpire(policy.src, policy.dst, policy.direction, policy.priority, True))
        spawn_tracked(self._tasks, self.remove([policy]), log, "policy expiry")

    async def remove(self, policies: list[PolicySpec]) -> None:
        """Out of the SPD and the projection; absent policies are not an error."""
        gone = []
        for policy in policies:
            current = self._current(policy)
            h = self._timers.pop(key_of(policy), None)
            if h is not None:
                h.cancel()
            if current is not None:
                self._spd.remove(current)
                gone.append(current)
        if gone:
            self._on_change()  # ahead of the kernel's copy, as in ``install``
            await self.projection.project(self._spd.policies, remove=gone)
            self._on_change()

    async def go_live(self) -> None:
        """This run's policies are all in: write the projection."""
        await self.projection.go_live(self._spd.policies())
        self._on_change()

    async def leave(self, keep_persistent: bool) -> None:
        """At stop: the persistent ("private") policies stay projected if so configured,
        the rest goes (DatapathError if nft refuses)."""
        keep = [p for p in self._spd.policies() if p.persistent and keep_persistent]
        await self.projection.leave(keep)

    def close(self) -> None:
        """No timer fires and no expiry runs after this."""
        for task in list(self._tasks):
            task.cancel()
        for h in self._timers.values():
            h.cancel()
        self._timers.clear()
