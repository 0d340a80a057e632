"""The offload service: probe, prove, measure, choose, in the background, and keep watching.

Why in the background: the daemon must serve DNS and IKE at once, and a full round of
known-answer tests and measurements takes seconds (tens under QEMU's TCG). So ``start``
proves only the software engine with a quick KAT, publishes a table where software runs
everything, and returns; a task then discovers the engines, proves each with the full
KATs, measures them, and republishes after each step: engines join as they are proven.

After that the service keeps the choice honest:

* a canary re-runs a quick KAT every ``canary_interval`` seconds on each engine the table
  uses, for each transform it is used for; a failure takes that engine off that
  transform and republishes at once (the datapath moves within the second);
* ``report_failure`` lets the datapath's workers report a failure they saw, same effect;
* hotplug (``probe.HotplugWatcher``) re-probes: an engine that is gone is dropped at once,
  a new one is proven and measured before it is used.

An engine that raises anywhere is caught, logged and marked failed: a broken driver must
never take the daemon down. Key material is made inside KAT and measure code and never
reaches a log line or a reason.

Subscribers (``subscribe``) get an ``OffloadUpdate`` for every new table: the
ChoiceTable (for the userspace datapath), the ESP proposal order (for IKE) and the
transforms the kernel's own drivers run correctly (for the kernel datapath).

The service decides when work happens and publishes the choice; the work and the record
live in its collaborators: ``prover.EngineProver`` (the engines, their KATs and
measurements on the service's thread), ``canary.Canary`` (the canary and reported
failures) and ``roster`` (each engine's record, its ``oe status`` row, the event log).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from oe_router.config import OeConfig
from oe_router.config.schema import DEFAULT_ESP_PROPOSALS
from oe_router.control.protocol import CommandTable, Request
from oe_router.control.status import (
    EngineStatus,
    StatusContribution,
)
from oe_router.records import record

from ..tasks import spawn_tracked
from .canary import Canary
from .chooser import (
    SOFTWARE,
    ChoiceTable,
    Verdict,
    choose,
    kernel_usable,
    proposal_order,
    size_range,
)
from .engine import TRANSFORMS, Engine
from .measure import SIZES, Measurement
from .probe import EngineSpec, HostSnapshot, HotplugWatcher, discover, probe_host
from .prover import EngineProver, KatRunner
from .roster import EngineState, EventLog

__all__ = ["KatRunner", "OffloadService", "OffloadUpdate"]

log = logging.getLogger("oe_router.offload")


@record(frozen=True)
class OffloadUpdate:
    """One publication: what the datapaths and IKE should use from now on.

    ``table``: engine per transform and packet size (userspace datapath).

    ``proposal``: the ESP proposal for the userspace datapath: ``esp_proposal`` as set
    (without transforms no proven engine runs), or when it is not set the default list
    fastest first by the table's 1400-byte engine (``offload auto``; other settings keep
    the default order). ``kernel_proposal``: the same for the kernel datapath, ranked by
    the kernel's own pick (engine ``afalg``) and without transforms whose kernel driver
    failed. Transforms no engine here implements (none today) would stay in the kernel's
    list: the kernel runs them and nothing here tested them.

    ``kernel_usable``: transforms whose kernel-picked driver passed its KAT (engine
    ``afalg``); ``kernel_checked`` is True once every transform AF_ALG runs here has a
    verdict. Until then (and always where AF_ALG is absent, which says nothing about the
    kernel's drivers) ``kernel_proposal`` leaves nothing out. ``kernel_failed``:
    (transform, driver) of the kernel's picks that failed, for ``offload_demote``.
    """

    table: ChoiceTable
    proposal: tuple[str, ...]
    kernel_usable: frozenset[str]
    kernel_checked: bool = False
    kernel_proposal: tuple[str, ...] = ()
    kernel_failed: tuple[tuple[str, str], ...] = ()
    #: (transform, driver) the kernel picks for each transform (AF_ALG's view): what the
    #: kernel datapath's ESP runs on, for ``oe status``
    kernel_drivers: tuple[tuple[str, str], ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "table": self.table.to_json(),
            "proposal": list(self.proposal),
            "kernel_proposal": list(self.kernel_proposal),
            "kernel_usable": sorted(self.kernel_usable),
            "kernel_checked": self.kernel_checked,
            "kernel_failed": [list(f) for f in self.kernel_failed],
            "kernel_drivers": [list(d) for d in self.kernel_drivers],
        }


Subscriber = Callable[[OffloadUpdate], None]


def _default_factory(name: str) -> Engine:
    from . import make_engine

    return make_engine(name)


class OffloadService:
    """The daemon's ``offload`` service (see the module docstring).

    Parameters that tests and the lab turn: ``canary_interval`` (seconds between canary
    rounds, 0 turns it off; None: ``offload_canary`` from the config),
    ``measure_duration`` (seconds per measured case),
    ``rescan_interval`` (hotplug rescan without pyudev; also a safety net with it),
    ``watch`` (False: no hotplug watching), and the I/O seams ``engine_factory``,
    ``snapshot`` and ``kat``.
    """

    def __init__(
        self,
        *,
        canary_interval: float | None = None,
        measure_duration: float = 0.3,
        sizes: Sequence[int] = SIZES,
        rescan_interval: float = 10.0,
        watch: bool = True,
        use_udev: bool = True,
        engine_factory: Callable[[str], Engine] = _default_factory,
        snapshot: Callable[[], HostSnapshot] = probe_host,
        kat: KatRunner | None = None,
        clock: Callable[[], float] = time.monotonic,
        measure_only: Sequence[str] | None = None,
        canary_engines: Sequence[str] = (),
    ) -> None:
        #: engines measured in the background (None: all). The kernel datapath uses only
        #: the kernel's own pick (``afalg``) for ESP, so measuring the others there would
        #: only burn a router's CPU; ``oe offload bench`` still measures every engine.
        self.measure_only = None if measure_only is None else tuple(measure_only)
        #: more top-level sections of the ``oe offload`` document, from outside the service
        #: (the kernel datapath's ESP self-test, esp_offer.EspOffer)
        self.report_extras: list[Callable[[], dict[str, Any]]] = []
        self._events = EventLog(clock)
        self._prover = EngineProver(
            factory=engine_factory,
            kat=kat,
            sizes=sizes,
            measure_duration=measure_duration,
            events=self._events,
        )
        self._canary = Canary(
            self._prover,
            self._events,
            interval=canary_interval,
            engines=canary_engines,
            table=lambda: self.table,
            publish=self._publish,
            spawn=self._spawn,
        )
        self._rescan_interval = rescan_interval
        self._watch = watch
        self._use_udev = use_udev
        self._snapshot = snapshot
        self._offload = "auto"
        self._esp_proposals: tuple[str, ...] = ()
        self._subscribers: list[Subscriber] = []
        self._update: OffloadUpdate | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._work = asyncio.Lock()
        self._watcher: HotplugWatcher | None = None
        self._phase = "stopped"

    @property
    def name(self) -> str:
        return "offload"

    @property
    def canary_interval(self) -> float:
        """Seconds between canary rounds (0: no canary)."""
        return self._canary.interval

    # -- lifecycle ------------------------------------------------------------------
    async def start(self, config: OeConfig) -> None:
        """Software proven quickly and published; everything else in the background."""
        self._configure(config)
        self._events.restart()
        if self._prover.kat is None:
            from .kat import run_kat

            self._prover.kat = run_kat
        sw = EngineState(discover(HostSnapshot("", False, False))[0])
        self._prover.engines = {SOFTWARE: sw}
        await self._prover.prove(sw, quick=True)
        for v in sw.verdicts.values():
            if not v.passed:  # the userspace datapath cannot run this transform at all
                log.error("software engine fails %s at start: %s", v.transform, v.reason)
        self._phase = "probing"
        self._publish()
        self._spawn(self._first_round())
        self._canary.start()

    async def reload(self, config: OeConfig) -> None:
        before = (self._offload, self._esp_proposals, self.canary_interval)
        self._configure(config)
        if (self._offload, self._esp_proposals) != before[:2]:
            self._events.add(f"offload {self._offload}: choice recomputed")
            self._publish()
        if self.canary_interval != before[2]:
            self._canary.start()

    def _configure(self, config: OeConfig) -> None:
        self._offload = config.offload
        self._esp_proposals = tuple(config.ike.esp_proposals)
        self._canary.configure(config)

    async def stop(self) -> None:
        if self._watcher is not None:
            await self._watcher.stop()
            self._watcher = None
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._prover.close()
        self._phase = "stopped"

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        return spawn_tracked(self._tasks, coro, log, "offload")

    # -- subscribers ------------------------------------------------------------------
    @property
    def update(self) -> OffloadUpdate | None:
        """The last publication (None before ``start``)."""
        return self._update

    @property
    def table(self) -> ChoiceTable:
        return self._update.table if self._update is not None else ChoiceTable()

    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        """Call ``callback`` with every new OffloadUpdate (now too, if there is one);
        returns the function that unsubscribes."""
        self._subscribers.append(callback)
        if self._update is not None:
            self._notify(callback, self._update)

        def unsubscribe() -> None:
            if callback in self._subscribers:
                self._subscribers.remove(callback)

        return unsubscribe

    @staticmethod
    def _notify(callback: Subscriber, update: OffloadUpdate) -> None:
        try:
            callback(update)
        except Exception as exc:  # a subscriber's bug must not stop the others
            log.error("offload subscriber %r failed: %s: %s", callback, type(exc).__name__, exc)

    def _publish(self) -> None:
        """Recompute the choice; tell subscribers if it changed."""
        verdicts = self._prover.verdicts()
        ms = self._prover.measurements()
        table = choose(self._offload, list(self._prover.engines), verdicts, ms)
        afalg = self._prover.engines.get("afalg")
        usable = frozenset(kernel_usable(verdicts))
        checked = (
            afalg is not None
            and bool(afalg.transforms)
            and all(t.name in afalg.verdicts for t in afalg.transforms)
        )
        proposal, kernel = self._proposals(table, ms, verdicts, usable, checked)
        update = OffloadUpdate(
            table=table,
            proposal=proposal,
            kernel_usable=usable,
            kernel_checked=checked,
            kernel_proposal=kernel,
            kernel_drivers=tuple(sorted(afalg.drivers.items())) if afalg is not None else (),
            kernel_failed=tuple(
                (v.transform, afalg.drivers.get(v.transform, ""))
                for v in afalg.verdicts.values()
                if not v.passed
            )
            if afalg is not None
            else (),
        )
        if update == self._update:
            return
        old = self._update
        self._update = update
        if old is None or old.table.choices != table.choices:
            log.info("engine choice: %s", _describe(table))
        for callback in list(self._subscribers):
            self._notify(callback, update)

    def _proposals(
        self,
        table: ChoiceTable,
        ms: list[Measurement],
        verdicts: list[Verdict],
        usable: frozenset[str],
        checked: bool,
    ) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(userspace proposal, kernel proposal): see OffloadUpdate."""
        explicit = bool(self._esp_proposals)
        candidates = self._esp_proposals or DEFAULT_ESP_PROPOSALS
        kernel_ok = tuple(
            c for c in candidates if not checked or c not in TRANSFORMS or c in usable
        )
        if explicit or self._offload != "auto":
            runs = {c.transform for c in table.choices if c.bands}
            return tuple(c for c in candidates if c in runs), kernel_ok
        if "afalg" not in self._prover.engines:
            return proposal_order(table, ms, candidates), kernel_ok
        # ranked by the kernel's own pick only; transforms it has no verdict for go last
        mine = [v for v in verdicts if v.engine == "afalg"]
        kernel_table = choose("afalg", ["afalg"], mine, ms)
        kernel_ranked = proposal_order(kernel_table, ms, kernel_ok)
        untested = tuple(c for c in kernel_ok if c not in kernel_ranked)
        return proposal_order(table, ms, candidates), kernel_ranked + untested

    # -- background work --------------------------------------------------------------
    async def _first_round(self) -> None:
        try:
            snap = await self._prover.thread(self._snapshot)
        except Exception as exc:  # the machine cannot be read: software alone, and watch
            log.error("cannot probe for crypto engines: %s: %s", type(exc).__name__, exc)
            snap = HostSnapshot("", False, False)
        await self._apply(snap, initial=True)
        if self._watch:
            self._watcher = HotplugWatcher(
                self._on_hotplug,
                snapshot=self._snapshot,
                rescan_interval=self._rescan_interval,
                use_udev=self._use_udev,
            )
            await self._watcher.start(snap)
            self._events.add(f"watching for engines ({self._watcher.mode})")

    def _on_hotplug(self, snap: HostSnapshot) -> None:
        self._events.add("hotplug: the crypto drivers changed; probing again")
        self._drop_gone(discover(snap))
        self._spawn(self._apply(snap))

    def _drop_gone(self, specs: Sequence[EngineSpec]) -> list[EngineSpec]:
        """Drop engines no longer present (or whose spec moved) now; return the new ones."""
        wanted = {s.name: s for s in specs}
        engines = self._prover.engines
        gone = [n for n, st in engines.items() if n != SOFTWARE and wanted.get(n) != st.spec]
        for name in gone:
            del engines[name]
            why = "is gone" if name not in wanted else "changed driver; proving it again"
            log.warning("engine %s %s", name, why)
            self._events.add(f"{name} {why}")
        if gone:
            self._publish()
        return [s for s in specs if s.name not in engines]

    async def _apply(self, snap: HostSnapshot, *, initial: bool = False) -> None:
        """Bring the engine list in line with ``snap``: prove and measure the new ones."""
        async with self._work:
            new = self._drop_gone(discover(snap))
            states = [EngineState(spec) for spec in new]
            for st in states:
                self._prover.engines[st.name] = st
            self._phase = "proving"
            for st in states:
                await self._prover.prove(st, quick=False)
                self._publish()
            if initial:
                # software was proven quickly at start; now with the full vectors
                sw = self._prover.engines[SOFTWARE]
                await self._prover.prove(sw, quick=False)
                states.insert(0, sw)
                self._publish()
            self._phase = "measuring"
            for st in sorted(states, key=lambda s: s.name != SOFTWARE):
                if self.measure_only is not None and st.name not in self.measure_only:
                    continue
                await self._prover.measure(st)
                self._publish()
            self._phase = "ready"

    async def bench(self) -> None:
        """Measure every proven engine again now (``oe offload bench``) and republish."""
        async with self._work:
            self._phase = "measuring"
            for st in sorted(self._prover.engines.values(), key=lambda s: s.name != SOFTWARE):
                await self._prover.measure(st)
                self._publish()
            self._phase = "ready"
            self._events.add("bench: measured again on request")

    # -- faults ------------------------------------------------------------------------
    async def canary_round(self) -> list[Verdict]:
        """One canary round now (see ``canary.Canary.round``)."""
        return await self._canary.round()

    def report_failure(self, engine: str, transform: str, reason: str) -> None:
        """A datapath worker saw ``engine`` fail ``transform`` (call on the loop's thread):
        take it off that transform and republish now."""
        self._canary.report_failure(engine, transform, reason)

    # -- status and control ------------------------------------------------------------
    def engines_status(self) -> tuple[EngineStatus, ...]:
        table = self.table
        return tuple(st.status(table, self._prover.sizes) for st in self._prover.engines.values())

    def status(self) -> StatusContribution:
        return StatusContribution(engines=self.engines_status())

    def rescan(self) -> None:
        """Look at the machine again soon (something here changed it: a driver's priority)."""
        if self._watcher is not None:
            self._watcher.nudge()

    def report(self) -> dict[str, Any]:
        """The ``offload`` command's document (``oe offload --json`` prints it)."""
        update = self._update
        sections: dict[str, Any] = {}
        for extra in self.report_extras:
            sections.update(extra())
        return {
            "offload": self._offload,
            "phase": self._phase,
            "canary_interval_s": self.canary_interval,
            "watch": self._watcher.mode if self._watcher is not None else "off",
            "engines": [e.to_json() for e in self.engines_status()],
            **(update.to_json() if update is not None else {"table": ChoiceTable().to_json()}),
            "events": self._events.lines(),
            **sections,
        }

    def register_commands(self, commands: CommandTable) -> None:
        """Add ``offload`` (the engines table) and ``offload-bench`` (measure again)."""
        commands.register("offload", self._cmd_offload, "crypto engines, proofs, speeds, choice")
        commands.register(
            "offload-bench", self._cmd_bench, "measure the crypto engines again, then report"
        )

    async def _cmd_offload(self, request: Request) -> dict[str, object]:
        return {"offload": self.report()}

    async def _cmd_bench(self, request: Request) -> dict[str, object]:
        await self.bench()
        return {"offload": self.report()}


def _describe(table: ChoiceTable) -> str:
    parts = []
    for c in table.choices:
        bands = ", ".join(
            f"{e} {size_range(lo, hi)}" if len(c.bands) > 1 else e for e, lo, hi in c.ranges()
        )
        parts.append(f"{c.transform}: {bands or 'none'}")
    return "; ".join(parts)
