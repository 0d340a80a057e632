"""Opening, proving and measuring the crypto engines, off the event loop.

Why a collaborator of its own: making an engine, running its known-answer tests and
measuring it is blocking work that must run on a thread of its own at a lower CPU
priority, and an engine that raises anywhere in it must be caught and marked failed (a
broken driver never takes the daemon down). ``EngineProver`` owns that thread, the roster
of engines (``engines``) and the rules for turning outcomes into verdicts; the service
only decides when to prove or measure which engine.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import threading
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from .chooser import Verdict
from .engine import TRANSFORMS, Engine, EngineKind, Transform
from .measure import Measurement, MeasureReport, measure_engine
from .probe import EngineSpec
from .roster import EngineState, EventLog

__all__ = ["EngineProver", "KatOutcome", "KatRunner"]

log = logging.getLogger("oe_router.offload")


class KatOutcome(Protocol):
    """What ``kat.run_kat`` returns, as far as the service reads it."""

    @property
    def passed(self) -> bool: ...

    @property
    def failures(self) -> Sequence[object]: ...


class KatRunner(Protocol):
    def __call__(
        self, engine: Engine, transform: Transform, *, quick: bool = False
    ) -> KatOutcome: ...


class EngineProver:
    """The engines known (``engines``, by name) and the blocking work that proves them."""

    def __init__(
        self,
        *,
        factory: Callable[[str], Engine],
        kat: KatRunner | None,
        sizes: Sequence[int],
        measure_duration: float,
        events: EventLog,
    ) -> None:
        self.engines: dict[str, EngineState] = {}
        self.kat = kat
        self.sizes = tuple(sizes)
        self.measure_duration = measure_duration
        self._factory = factory
        self._events = events
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None

    def present(self, st: EngineState) -> bool:
        """False once ``st`` was unplugged (or replaced) while work on it ran."""
        return self.engines.get(st.name) is st

    def verdicts(self) -> list[Verdict]:
        return [v for s in self.engines.values() for v in s.verdicts.values()]

    def measurements(self) -> list[Measurement]:
        return [m for s in self.engines.values() for m in s.measurements.values()]

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    async def thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run blocking engine work on the service's own thread, at a lower CPU priority
        (nice 10): known-answer tests and measurements must never slow the daemon's
        traffic and IKE on a small router."""
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="offload", initializer=_lower_priority
            )
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def prove(self, st: EngineState, *, quick: bool) -> None:
        """Make the engine (if not yet) and run the KATs of every transform it claims."""
        st.state = "proving"
        if st.engine is None:
            try:
                engine = await self.thread(self._factory, st.name)
                info = await self.thread(_describe_engine, st.spec, engine)
            except Exception as exc:
                self.fail(st, f"cannot open: {type(exc).__name__}: {exc}")
                return
            st.engine = engine
            st.transforms, st.drivers, st.why_not, st.kind = info
        for t in st.transforms:
            if not self.present(st):
                return  # unplugged meanwhile
            verdict = await self.run_kat(st, t, quick=quick)
            st.verdicts[t.name] = verdict
            if not verdict.passed:
                log.warning("engine %s fails %s: %s", st.name, t.name, verdict.reason)
                self._events.add(f"{st.name} {t.name}: {verdict.reason}")
        st.state = "ready" if st.verdicts else "failed"
        if not st.transforms and not st.reason:
            st.reason = "runs none of the ESP transforms here"
            st.state = "failed"

    async def run_kat(self, st: EngineState, t: Transform, *, quick: bool) -> Verdict:
        assert st.engine is not None and self.kat is not None
        kat, engine = self.kat, st.engine
        try:
            outcome = await self.thread(lambda: kat(engine, t, quick=quick))
        except Exception as exc:
            return Verdict(st.name, t.name, False, f"KAT raised {type(exc).__name__}: {exc}")
        if outcome.passed:
            return Verdict(st.name, t.name, True)
        return Verdict(st.name, t.name, False, _kat_reason(outcome))

    def fail(self, st: EngineState, reason: str) -> None:
        st.state, st.reason = "failed", reason
        log.warning("engine %s: %s", st.name, reason)
        self._events.add(f"{st.name}: {reason}")

    async def measure(self, st: EngineState) -> None:
        proven = [
            t for t in st.transforms if st.verdicts.get(t.name, Verdict("", "", False)).passed
        ]
        if st.engine is None or not proven:
            return
        st.state = "measuring"
        engine = st.engine
        try:
            sizes, duration = self.sizes, self.measure_duration
            report: MeasureReport = await self.thread(
                lambda: measure_engine(engine, proven, sizes=sizes, duration=duration)
            )
        except Exception as exc:
            self.fail(st, f"measurement failed: {type(exc).__name__}: {exc}")
            return
        if not self.present(st):
            return
        for m in report.measurements:
            st.measurements[(m.transform, m.size, m.op)] = m
        for tname, reason in report.errors:
            # an engine that errors under load is not trusted with traffic
            st.verdicts[tname] = Verdict(st.name, tname, False, f"failed while measured: {reason}")
            log.warning("engine %s fails %s while measured: %s", st.name, tname, reason)
        st.state = "ready"


def _kat_reason(outcome: KatOutcome) -> str:
    """The first failure (it names the vector) and how many more there were."""
    failures = list(getattr(outcome, "failures", ()) or ())
    if not failures:
        return "known-answer test failed"
    more = f" (+{len(failures) - 1} more)" if len(failures) > 1 else ""
    return f"known-answer test failed: {failures[0]}{more}"


def _lower_priority() -> None:
    with contextlib.suppress(OSError, AttributeError):  # per thread on Linux
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)


def _describe_engine(
    spec: EngineSpec, engine: Engine
) -> tuple[tuple[Transform, ...], dict[str, str], dict[str, str], EngineKind]:
    """What ``engine`` runs, on which drivers, why not the rest, and its kind.

    Blocking (a thread): an AF_ALG engine binds each transform to find out, and its
    ``kind`` reads /proc/crypto; ``oe status`` must not do either on the event loop.
    """
    transforms = tuple(engine.transforms())
    drivers: dict[str, str] = {}
    for t in transforms:
        try:
            drivers[t.name] = engine.driver(t)
        except Exception:
            drivers[t.name] = spec.driver(t.name)
    runs = {t.name for t in transforms}
    why = getattr(engine, "why_not", None)
    why_not: dict[str, str] = {}
    for name in spec.transforms:
        if name not in runs:
            reason = why(TRANSFORMS[name]) if callable(why) else ""
            why_not[name] = str(reason or "this engine does not run it here")
    try:
        kind = engine.kind
    except Exception:
        kind = spec.kind
    hardware = EngineKind.HARDWARE in (kind, spec.kind)
    return transforms, drivers, why_not, EngineKind.HARDWARE if hardware else EngineKind.CPU
