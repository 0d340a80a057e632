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
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from oe_router.config import OeConfig
from oe_router.config.schema import DEFAULT_ESP_PROPOSALS
from oe_router.control.protocol import CommandTable, Request
from oe_router.control.status import (
    EngineRate,
    EngineStatus,
    EngineTransformStatus,
    StatusContribution,
)

from ..tasks import spawn_tracked
from .chooser import (
    SOFTWARE,
    ChoiceTable,
    Verdict,
    choose,
    kernel_usable,
    proposal_order,
    size_range,
)
from .engine import TRANSFORMS, Engine, EngineKind, Transform
from .measure import SIZES, Measurement, MeasureReport, measure_engine
from .probe import EngineSpec, HostSnapshot, HotplugWatcher, discover, probe_host

__all__ = ["KatRunner", "OffloadService", "OffloadUpdate"]

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


@dataclass(frozen=True)
class OffloadUpdate:
    """One publication: what the datapaths and IKE should use from now on.

    ``table``: engine per transform and packet size (userspace datapath).

    ``proposal``: the ESP proposal for the userspace datapath: ``esp_proposal`` as set
    (without transforms no proven engine runs), or when it is not set the default list
    fastest first by the table's 1400-byte engine (``offload auto``; other settings keep
    the default order). ``kernel_proposal``: the same for the kernel datapath, ranked by
    the kernel's own pick (engine ``afalg``) and without transforms whose kernel driver
    failed. Transforms no engine here implements (``aes256-sha512``) stay in the kernel's
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


class _EngineState:
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
        #: engines the canary checks on every transform they passed, chosen by the table
        #: or not: the kernel's own pick (``afalg``) runs kernel ESP, never the table's
        self.canary_engines = tuple(canary_engines)
        #: more top-level sections of the ``oe offload`` document, from outside the service
        #: (the kernel datapath's ESP self-test, esp_offer.EspOffer)
        self.report_extras: list[Callable[[], dict[str, Any]]] = []
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._canary_fixed = canary_interval
        self.canary_interval = 10.0 if canary_interval is None else canary_interval
        self.measure_duration = measure_duration
        self.sizes = tuple(sizes)
        self._rescan_interval = rescan_interval
        self._watch = watch
        self._use_udev = use_udev
        self._factory = engine_factory
        self._snapshot = snapshot
        self._kat = kat
        self._clock = clock
        self._offload = "auto"
        self._esp_proposals: tuple[str, ...] = ()
        self._engines: dict[str, _EngineState] = {}
        self._subscribers: list[Subscriber] = []
        self._update: OffloadUpdate | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._work = asyncio.Lock()
        self._watcher: HotplugWatcher | None = None
        self._canary: asyncio.Task[Any] | None = None
        self._phase = "stopped"
        self._events: deque[str] = deque(maxlen=20)
        self._started_at = clock()

    @property
    def name(self) -> str:
        return "offload"

    # -- lifecycle ------------------------------------------------------------------
    async def start(self, config: OeConfig) -> None:
        """Software proven quickly and published; everything else in the background."""
        self._configure(config)
        self._started_at = self._clock()
        if self._kat is None:
            from .kat import run_kat

            self._kat = run_kat
        sw = _EngineState(discover(HostSnapshot("", False, False))[0])
        self._engines = {SOFTWARE: sw}
        await self._prove(sw, quick=True)
        for v in sw.verdicts.values():
            if not v.passed:  # the userspace datapath cannot run this transform at all
                log.error("software engine fails %s at start: %s", v.transform, v.reason)
        self._phase = "probing"
        self._publish()
        self._spawn(self._first_round())
        if self.canary_interval > 0:
            self._canary = self._spawn(self._canary_loop())

    async def reload(self, config: OeConfig) -> None:
        before = (self._offload, self._esp_proposals, self.canary_interval)
        self._configure(config)
        if (self._offload, self._esp_proposals) != before[:2]:
            self._event(f"offload {self._offload}: choice recomputed")
            self._publish()
        if self.canary_interval != before[2]:
            if self._canary is not None:
                self._canary.cancel()
                self._canary = None
            if self.canary_interval > 0:
                self._canary = self._spawn(self._canary_loop())

    def _configure(self, config: OeConfig) -> None:
        self._offload = config.offload
        self._esp_proposals = tuple(config.ike.esp_proposals)
        if self._canary_fixed is None:
            self.canary_interval = float(config.offload_canary)

    async def stop(self) -> None:
        if self._watcher is not None:
            await self._watcher.stop()
            self._watcher = None
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
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

    def _verdicts(self) -> list[Verdict]:
        return [v for s in self._engines.values() for v in s.verdicts.values()]

    def _measurements(self) -> list[Measurement]:
        return [m for s in self._engines.values() for m in s.measurements.values()]

    def _publish(self) -> None:
        """Recompute the choice; tell subscribers if it changed."""
        verdicts = self._verdicts()
        ms = self._measurements()
        table = choose(self._offload, list(self._engines), verdicts, ms)
        afalg = self._engines.get("afalg")
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
        if "afalg" not in self._engines:
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
            snap = await self._thread(self._snapshot)
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
            self._event(f"watching for engines ({self._watcher.mode})")

    def _on_hotplug(self, snap: HostSnapshot) -> None:
        self._event("hotplug: the crypto drivers changed; probing again")
        self._drop_gone(discover(snap))
        self._spawn(self._apply(snap))

    def _drop_gone(self, specs: Sequence[EngineSpec]) -> list[EngineSpec]:
        """Drop engines no longer present (or whose spec moved) now; return the new ones."""
        wanted = {s.name: s for s in specs}
        gone = [n for n, st in self._engines.items() if n != SOFTWARE and wanted.get(n) != st.spec]
        for name in gone:
            del self._engines[name]
            why = "is gone" if name not in wanted else "changed driver; proving it again"
            log.warning("engine %s %s", name, why)
            self._event(f"{name} {why}")
        if gone:
            self._publish()
        return [s for s in specs if s.name not in self._engines]

    async def _apply(self, snap: HostSnapshot, *, initial: bool = False) -> None:
        """Bring the engine list in line with ``snap``: prove and measure the new ones."""
        async with self._work:
            new = self._drop_gone(discover(snap))
            states = [_EngineState(spec) for spec in new]
            for st in states:
                self._engines[st.name] = st
            self._phase = "proving"
            for st in states:
                await self._prove(st, quick=False)
                self._publish()
            if initial:
                # software was proven quickly at start; now with the full vectors
                sw = self._engines[SOFTWARE]
                await self._prove(sw, quick=False)
                states.insert(0, sw)
                self._publish()
            self._phase = "measuring"
            for st in sorted(states, key=lambda s: s.name != SOFTWARE):
                if self.measure_only is not None and st.name not in self.measure_only:
                    continue
                await self._measure(st)
                self._publish()
            self._phase = "ready"

    async def _thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run blocking engine work on the service's own thread, at a lower CPU priority
        (nice 10): known-answer tests and measurements must never slow the daemon's
        traffic and IKE on a small router."""
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="offload", initializer=_lower_priority
            )
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def _prove(self, st: _EngineState, *, quick: bool) -> None:
        """Make the engine (if not yet) and run the KATs of every transform it claims."""
        st.state = "proving"
        if st.engine is None:
            try:
                engine = await self._thread(self._factory, st.name)
                info = await self._thread(_describe_engine, st.spec, engine)
            except Exception as exc:
                self._fail_engine(st, f"cannot open: {type(exc).__name__}: {exc}")
                return
            st.engine = engine
            st.transforms, st.drivers, st.why_not, st.kind = info
        for t in st.transforms:
            if self._engines.get(st.name) is not st:
                return  # unplugged meanwhile
            verdict = await self._run_kat(st, t, quick=quick)
            st.verdicts[t.name] = verdict
            if not verdict.passed:
                log.warning("engine %s fails %s: %s", st.name, t.name, verdict.reason)
                self._event(f"{st.name} {t.name}: {verdict.reason}")
        st.state = "ready" if st.verdicts else "failed"
        if not st.transforms and not st.reason:
            st.reason = "runs none of the ESP transforms here"
            st.state = "failed"

    async def _run_kat(self, st: _EngineState, t: Transform, *, quick: bool) -> Verdict:
        assert st.engine is not None and self._kat is not None
        kat, engine = self._kat, st.engine
        try:
            outcome = await self._thread(lambda: kat(engine, t, quick=quick))
        except Exception as exc:
            return Verdict(st.name, t.name, False, f"KAT raised {type(exc).__name__}: {exc}")
        if outcome.passed:
            return Verdict(st.name, t.name, True)
        return Verdict(st.name, t.name, False, _kat_reason(outcome))

    def _fail_engine(self, st: _EngineState, reason: str) -> None:
        st.state, st.reason = "failed", reason
        log.warning("engine %s: %s", st.name, reason)
        self._event(f"{st.name}: {reason}")

    async def _measure(self, st: _EngineState) -> None:
        proven = [
            t for t in st.transforms if st.verdicts.get(t.name, Verdict("", "", False)).passed
        ]
        if st.engine is None or not proven:
            return
        st.state = "measuring"
        engine = st.engine
        try:
            sizes, duration = self.sizes, self.measure_duration
            report: MeasureReport = await self._thread(
                lambda: measure_engine(engine, proven, sizes=sizes, duration=duration)
            )
        except Exception as exc:
            self._fail_engine(st, f"measurement failed: {type(exc).__name__}: {exc}")
            return
        if self._engines.get(st.name) is not st:
            return
        for m in report.measurements:
            st.measurements[(m.transform, m.size, m.op)] = m
        for tname, reason in report.errors:
            # an engine that errors under load is not trusted with traffic
            st.verdicts[tname] = Verdict(st.name, tname, False, f"failed while measured: {reason}")
            log.warning("engine %s fails %s while measured: %s", st.name, tname, reason)
        st.state = "ready"

    async def bench(self) -> None:
        """Measure every proven engine again now (``oe offload bench``) and republish."""
        async with self._work:
            self._phase = "measuring"
            for st in sorted(self._engines.values(), key=lambda s: s.name != SOFTWARE):
                await self._measure(st)
                self._publish()
            self._phase = "ready"
            self._event("bench: measured again on request")

    # -- canary ------------------------------------------------------------------------
    async def _canary_loop(self) -> None:
        while True:
            await asyncio.sleep(self.canary_interval)
            try:
                await self.canary_round()
            except Exception as exc:
                log.error("canary round failed: %s: %s", type(exc).__name__, exc)

    async def canary_round(self) -> list[Verdict]:
        """Quick KAT of every engine the table uses, per transform it is used for, and of
        the ``canary_engines`` on every transform they passed; a failure takes the engine
        off that transform and republishes at once."""
        failed: list[Verdict] = []
        checks = {e: [t for t, _, _ in u] for e, u in self.table.engines_in_use().items()}
        for name in self.canary_engines:
            if (extra := self._engines.get(name)) is not None:
                passed = [t for t, v in extra.verdicts.items() if v.passed]
                checks[name] = checks.get(name, []) + passed
        for engine, tnames in checks.items():
            st = self._engines.get(engine)
            if st is None or st.engine is None:
                continue
            by_name = {t.name: t for t in st.transforms}
            for tname in dict.fromkeys(tnames):
                t = by_name.get(tname)
                if t is None:
                    continue
                verdict = await self._run_kat(st, t, quick=True)
                if verdict.passed or self._engines.get(engine) is not st:
                    continue
                self._record_failure(st, tname, f"canary: {verdict.reason}")
                failed.append(st.verdicts[tname])
                self._publish()
        return failed

    def report_failure(self, engine: str, transform: str, reason: str) -> None:
        """A datapath worker saw ``engine`` fail ``transform`` (call on the loop's thread):
        take it off that transform and republish now."""
        st = self._engines.get(engine)
        if st is None:
            log.warning(
                "failure reported for unknown engine %s (%s): %s", engine, transform, reason
            )
            return
        self._record_failure(st, transform, f"reported by the datapath: {reason}")
        self._publish()

    def _record_failure(self, st: _EngineState, transform: str, reason: str) -> None:
        st.verdicts[transform] = Verdict(st.name, transform, False, reason)
        log.error("engine %s taken off %s: %s", st.name, transform, reason)
        self._event(f"{st.name} off {transform}: {reason}")

    # -- status and control ------------------------------------------------------------
    def _event(self, text: str) -> None:
        self._events.append(f"+{self._clock() - self._started_at:.1f}s {text}")

    def engines_status(self) -> tuple[EngineStatus, ...]:
        table = self.table
        out = []
        for st in self._engines.values():
            rows = []
            best: float | None = None
            for t in st.transforms:
                v = st.verdicts.get(t.name)
                rates = tuple(
                    EngineRate(size, round(m.mbit_s, 1), round(m.ns_per_packet, 1))
                    for size in self.sizes
                    if (m := st.measurements.get((t.name, size, "seal"))) is not None
                )
                if rates and rates[-1].size == max(self.sizes):
                    best = max(best or 0.0, rates[-1].mbit_s)
                choice = table.choice(t.name)
                uses = [
                    size_range(lo, hi)
                    for e, lo, hi in (choice.ranges() if choice else [])
                    if e == st.name
                ]
                rows.append(
                    EngineTransformStatus(
                        transform=t.name,
                        driver=st.drivers.get(t.name, ""),
                        kat="pending" if v is None else "passed" if v.passed else "failed",
                        reason="" if v is None else v.reason,
                        rates=rates,
                        in_use_for=",".join(uses),
                    )
                )
            rows += [
                EngineTransformStatus(transform=name, kat="unsupported", reason=why)
                for name, why in st.why_not.items()
            ]
            in_use = table.in_use_for(st.name)
            drivers = list(dict.fromkeys(d for d in st.drivers.values() if d))
            hardware = st.kind is EngineKind.HARDWARE
            out.append(
                EngineStatus(
                    name=st.name,
                    driver=", ".join(drivers),
                    kind="hardware" if hardware else "cpu",
                    proven=any(v.passed for v in st.verdicts.values()),
                    selected=bool(in_use),
                    mbit_s=best,
                    hardware=hardware,
                    state=st.state,
                    reason=st.reason,
                    transforms=tuple(rows),
                    in_use_for=in_use,
                )
            )
        return tuple(out)

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
            "events": list(self._events),
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


def _describe(table: ChoiceTable) -> str:
    parts = []
    for c in table.choices:
        bands = ", ".join(
            f"{e} {size_range(lo, hi)}" if len(c.bands) > 1 else e for e, lo, hi in c.ranges()
        )
        parts.append(f"{c.transform}: {bands or 'none'}")
    return "; ".join(parts)
