"""``offload_demote`` for the ESP offer: rank a failing kernel crypto driver below the next.

Why a collaborator of its own: when the driver the kernel picks for a transform fails (its
known-answer test, the canary or the ESP self-test), the remedy is a NETLINK_CRYPTO
priority change, once per driver, on a thread, with its outcome remembered for ``oe
offload`` and for the reason a transform is not offered. That memory (what was tried on
which driver, the demotion records) and the rule for what to lower next live here; the
offer only says when failures may have changed.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable
from typing import Any

from oe_router.datapath.selftest import SelfTestGate, demotion_targets
from oe_router.offload.service import OffloadUpdate

__all__ = ["Demoter"]

log = logging.getLogger("oe_router.daemon")


class Demoter:
    """Lowers each failing kernel pick once; remembers what it tried and what came of it."""

    def __init__(
        self,
        gate: SelfTestGate | None,
        *,
        demote: Callable[[str], tuple[int, int]],
        retest: Callable[[], None],
        rescan: Callable[[], None],
        changed: Callable[[], None],
        spawn: Callable[[Any], asyncio.Task[Any]],
        elapsed: Callable[[], float],
    ) -> None:
        """``demote``: lower a driver's priority, (before, after); ``retest``: the gate
        has transforms to test again; ``rescan``: the offload layer should look at the
        kernel's picks again; ``changed``: the offer may have changed; ``elapsed``: seconds
        since the offer started."""
        self._gate = gate
        self._demote = demote
        self._retest = retest
        self._rescan = rescan
        self._changed = changed
        self._spawn = spawn
        self._elapsed = elapsed
        self._tried: dict[str, str] = {}  # driver -> what lowering it did ("" while running)
        self.demotions: list[dict[str, Any]] = []

    def retry_failed(self) -> None:
        """``offload_demote`` was turned on: failed attempts get another chance
        (crypto_user may be loaded now)."""
        self._tried = {d: r for d, r in self._tried.items() if r.startswith("lowered")}

    def note(self, driver: str, enabled: bool) -> str:
        """What ``offload_demote`` did (or would do) about ``driver``, to append to why
        a transform is not offered ("" when nothing)."""
        tried = [self._tried.get(d) for d in demotion_targets(driver)]
        done = "; ".join(f"offload_demote: {t}" for t in tried if t)
        if done:
            return f"; {done}"
        if not enabled:
            return (
                f"; offload_demote is off: {driver} keeps its priority "
                "(set oe.global.offload_demote 1 to rank it below the next implementation)"
            )
        return ""

    def consider(self, update: OffloadUpdate | None) -> None:
        """Lower each failing kernel pick once: KAT, canary or self-test failures of the
        driver the kernel picks now."""
        failing: dict[str, tuple[list[str], str]] = {}  # driver -> (transforms, why)
        for t, driver in update.kernel_failed if update is not None else ():
            if driver:
                failing.setdefault(driver, ([], "its known-answer test failed"))[0].append(t)
        for t, r in (self._gate.failed() if self._gate is not None else {}).items():
            if r.driver:
                why = f"its ESP self-test failed: {r.detail}"
                failing.setdefault(r.driver, ([], why))[0].append(t)
        for driver, (names, why) in failing.items():
            target = next((d for d in demotion_targets(driver) if d not in self._tried), None)
            if target is not None:
                self._tried[target] = ""
                self._spawn(self._lower(target, driver, tuple(dict.fromkeys(names)), why))

    async def _lower(self, target: str, driver: str, names: tuple[str, ...], why: str) -> None:
        transform_name = names[0]
        record: dict[str, Any] = {
            "driver": target,
            "kernel_pick": driver,
            "transform": transform_name,
            "transforms": list(names),
            "why": why,
            "at_s": self._elapsed(),
        }
        try:
            before, after = await asyncio.to_thread(self._demote, target)
        except Exception as exc:
            self._tried[target] = f"could not lower {target}: {exc}"
            record["error"] = str(exc)
            self.demotions.append(record)
            log.error(
                "offload_demote: %s failed %s (%s); lowering %s failed: %s",
                driver,
                transform_name,
                why,
                target,
                exc,
            )
            self._changed()
            return
        record.update(priority_before=before, priority_after=after)
        self.demotions.append(record)
        self._tried[target] = f"lowered {target} from priority {before} to {after}"
        log.warning(
            "offload_demote: the kernel's pick %s failed %s (%s): lowered %s's priority "
            "from %d to %d; testing what the kernel picks now",
            driver,
            transform_name,
            why,
            target,
            before,
            after,
        )
        if self._gate is not None:
            affected = set(names)
            for row in self._gate.rows():
                used = row.result.driver if row.result is not None else None
                if used and target in re.split(r"[(),]", used):
                    affected.add(row.transform)
            self._gate.invalidate(sorted(affected), f"{target}'s priority was lowered")
            self._retest()
        self._rescan()  # the KATs run again on the new pick
        self._changed()
