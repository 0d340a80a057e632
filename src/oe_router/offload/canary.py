"""Fault handling: the canary that keeps re-proving the engines in use, and the failures
the datapath reports.

Why a collaborator of its own: an engine that passed its known-answer tests can start
answering wrong later (SafeXcel's AES-GCM dropped ESP silently), and both ways of noticing
(a quick KAT every ``interval`` seconds, a datapath worker's report) end the same way: the
engine is taken off that transform and the choice is published again at once. This class
owns the canary's schedule and that rule; the service gives it the table in use and the
way to publish.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Any

from oe_router.config import OeConfig

from .chooser import ChoiceTable, Verdict
from .prover import EngineProver
from .roster import EngineState, EventLog

__all__ = ["Canary"]

log = logging.getLogger("oe_router.offload")


class Canary:
    """Quick KATs on a schedule, and the one place a failing engine is taken off a transform."""

    def __init__(
        self,
        prover: EngineProver,
        events: EventLog,
        *,
        interval: float | None,
        engines: Sequence[str],
        table: Callable[[], ChoiceTable],
        publish: Callable[[], None],
        spawn: Callable[[Any], asyncio.Task[Any]],
    ) -> None:
        self._prover = prover
        self._events = events
        self._fixed = interval  # None: ``offload_canary`` from the config
        self.interval = 10.0 if interval is None else interval
        #: engines checked on every transform they passed, chosen by the table or not:
        #: the kernel's own pick (``afalg``) runs kernel ESP, never the table's
        self.engines = tuple(engines)
        self._table = table
        self._publish = publish
        self._spawn = spawn
        self._task: asyncio.Task[Any] | None = None

    def configure(self, config: OeConfig) -> None:
        if self._fixed is None:
            self.interval = float(config.offload_canary)

    def start(self) -> None:
        """(Re)start the schedule at the current ``interval`` (0: no canary)."""
        if self._task is not None:
            self._task.cancel()
            self._task = None
        if self.interval > 0:
            self._task = self._spawn(self._loop())

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.round()
            except Exception as exc:
                log.error("canary round failed: %s: %s", type(exc).__name__, exc)

    async def round(self) -> list[Verdict]:
        """Quick KAT of every engine the table uses, per transform it is used for, and of
        the canary ``engines`` on every transform they passed; a failure takes the engine
        off that transform and republishes at once."""
        failed: list[Verdict] = []
        checks = {e: [t for t, _, _ in u] for e, u in self._table().engines_in_use().items()}
        for name in self.engines:
            if (extra := self._prover.engines.get(name)) is not None:
                passed = [t for t, v in extra.verdicts.items() if v.passed]
                checks[name] = checks.get(name, []) + passed
        for engine, tnames in checks.items():
            st = self._prover.engines.get(engine)
            if st is None or st.engine is None:
                continue
            by_name = {t.name: t for t in st.transforms}
            for tname in dict.fromkeys(tnames):
                t = by_name.get(tname)
                if t is None:
                    continue
                verdict = await self._prover.run_kat(st, t, quick=True)
                if verdict.passed or not self._prover.present(st):
                    continue
                self._take_off(st, tname, f"canary: {verdict.reason}")
                failed.append(st.verdicts[tname])
                self._publish()
        return failed

    def report_failure(self, engine: str, transform: str, reason: str) -> None:
        """A datapath worker saw ``engine`` fail ``transform``: take it off, republish now."""
        st = self._prover.engines.get(engine)
        if st is None:
            log.warning(
                "failure reported for unknown engine %s (%s): %s", engine, transform, reason
            )
            return
        self._take_off(st, transform, f"reported by the datapath: {reason}")
        self._publish()

    def _take_off(self, st: EngineState, transform: str, reason: str) -> None:
        st.verdicts[transform] = Verdict(st.name, transform, False, reason)
        log.error("engine %s taken off %s: %s", st.name, transform, reason)
        self._events.add(f"{st.name} off {transform}: {reason}")
