"""What the offload service knows about each engine, and what happened to them.

Why a module of its own: the record of one engine (its spec, the object, the verdicts of
its known-answer tests, its measured rates) is written by the prover (``prover.py``) and
the canary (``canary.py``) and read by the choice and by ``oe status``; keeping it and
its status row together here lets each of those import it without importing the others.
``EventLog`` is the short history ``oe offload`` prints, written by all of them.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence

from oe_router.control.status import EngineRate, EngineStatus, EngineTransformStatus

from .chooser import ChoiceTable, Verdict, size_range
from .engine import Engine, EngineKind, Transform
from .measure import Measurement
from .probe import EngineSpec

__all__ = ["EngineState", "EventLog"]


class EngineState:
    """Everything known about one engine: the spec, the object, verdicts, numbers."""

    def __init__(self, spec: EngineSpec) -> None:
        self.spec = spec
        self.engine: Engine | None = None
        self.kind = spec.kind
        self.why_not: dict[str, str] = {}  # transform -> why the engine cannot run it here
        self.state = "proving"
        self.reason = ""
        self.transforms: tuple[Transform, ...] = ()
        self.drivers: dict[str, str] = {}
        self.verdicts: dict[str, Verdict] = {}
        self.measurements: dict[tuple[str, int, str], Measurement] = {}

    @property
    def name(self) -> str:
        return self.spec.name

    def status(self, table: ChoiceTable, sizes: Sequence[int]) -> EngineStatus:
        """This engine's row of ``oe status``: per transform its driver, KAT verdict, the
        measured seal rates at ``sizes`` and the packet sizes ``table`` gives it."""
        rows = []
        best: float | None = None
        for t in self.transforms:
            v = self.verdicts.get(t.name)
            rates = tuple(
                EngineRate(size, round(m.mbit_s, 1), round(m.ns_per_packet, 1))
                for size in sizes
                if (m := self.measurements.get((t.name, size, "seal"))) is not None
            )
            if rates and rates[-1].size == max(sizes):
                best = max(best or 0.0, rates[-1].mbit_s)
            choice = table.choice(t.name)
            uses = [
                size_range(lo, hi)
                for e, lo, hi in (choice.ranges() if choice else [])
                if e == self.name
            ]
            rows.append(
                EngineTransformStatus(
                    transform=t.name,
                    driver=self.drivers.get(t.name, ""),
                    kat="pending" if v is None else "passed" if v.passed else "failed",
                    reason="" if v is None else v.reason,
                    rates=rates,
                    in_use_for=",".join(uses),
                )
            )
        rows += [
            EngineTransformStatus(transform=name, kat="unsupported", reason=why)
            for name, why in self.why_not.items()
        ]
        in_use = table.in_use_for(self.name)
        drivers = list(dict.fromkeys(d for d in self.drivers.values() if d))
        hardware = self.kind is EngineKind.HARDWARE
        return EngineStatus(
            name=self.name,
            driver=", ".join(drivers),
            kind="hardware" if hardware else "cpu",
            proven=any(v.passed for v in self.verdicts.values()),
            selected=bool(in_use),
            mbit_s=best,
            hardware=hardware,
            state=self.state,
            reason=self.reason,
            transforms=tuple(rows),
            in_use_for=in_use,
        )


class EventLog:
    """The last 20 things that happened to the engines, stamped with the seconds since start."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self.started_at = clock()
        self._events: deque[str] = deque(maxlen=20)

    def restart(self) -> None:
        self.started_at = self._clock()

    def add(self, text: str) -> None:
        self._events.append(f"+{self._clock() - self.started_at:.1f}s {text}")

    def lines(self) -> list[str]:
        return list(self._events)
