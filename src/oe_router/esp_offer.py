"""The ESP transforms IKE offers, kept in step with the datapath and the crypto engines.

Why a module of its own: the offer depends on things that change apart: the config (an
explicit ``esp_proposal`` always wins), the active datapath (only what it can run is
offered), the offload layer's findings (with ``offload auto`` the transform the fastest
proven engine runs comes first) and, for kernel ESP, the end-to-end self-test of the
kernel's own driver per transform (a transform is offered once it passed, withdrawn when
its driver fails, and live Child SAs on it move to one still offered).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from oe_router.config import OeConfig
from oe_router.config.schema import DEFAULT_ESP_PROPOSALS
from oe_router.control import (
    EngineStatus,
    StatusContribution,
)
from oe_router.control.status import EngineTransformStatus
from oe_router.datapath.base import ChildSaSpec, IPAddress
from oe_router.datapath.selftest import (
    SelfTestGate,
    SelfTestResult,
    esp_selftest_all,
    kernel_picks,
)
from oe_router.esp_offer_demote import Demoter
from oe_router.esp_offer_selftest import KernelSelfTest, SelfTestRunner
from oe_router.ike.proposals import ESP_KEYWORDS, esp_offer
from oe_router.ike.service import REKEY_REFUSED, IkeService
from oe_router.offload.engine import transform
from oe_router.offload.service import OffloadService, OffloadUpdate
from oe_router.services import ServiceError
from oe_router.tasks import spawn_tracked

log = logging.getLogger("oe_router.daemon")


#: The kernel's picks are read again this often (seconds) even when the offload layer
#: reports nothing (no AF_ALG): a pick that moved is self-tested again before it is offered.
PICK_INTERVAL = 10.0
#: How long a move (a rekey onto the current offer) may take before it counts as failed.
MOVE_TIMEOUT = 30.0
#: A rekey whose Child SA went back to ``installed`` for this long was refused. (A
#: TEMPORARY_FAILURE retry also puts it back for a while: taking that for a refusal only
#: means a new Child SA replaces it instead, and the queued rekey then finds it gone.)
MOVE_SETTLE = 0.3


async def _run_selftests(
    transforms: Sequence[str], on_result: Callable[[SelfTestResult], None]
) -> object:
    return await esp_selftest_all(transforms, on_result=on_result)


def _lower_priority(driver: str) -> tuple[int, int]:
    """(priority before, after) of ``driver`` ranked below the next implementation."""
    from oe_router.offload.crypto_user import CryptoUser

    with CryptoUser() as cu:
        before = cu.get_alg(driver).priority
        return before, cu.lower_priority(driver).priority


def esp_keyword(spec: Any) -> str | None:
    """The ``esp_proposal`` keyword of a Child SA's transform (None if it has none)."""
    try:
        bits = len(spec.outbound.encr_key) * 8 - spec.encr.salt_bits
        integ = spec.integ.ike_id if spec.integ is not None else None
        encr = spec.encr.ike_id
    except AttributeError:
        return None
    for name, p in ESP_KEYWORDS.items():
        if p.encr == encr and p.integ == integ and p.key_bits in (None, bits):
            return name
    return None


class ConfiguredEspOffer:
    """IKE's ESP offer where no datapath runs ESP (SAs are negotiated, not installed): the
    ``esp_proposal`` list as written, or the default one. Why a service: without it the
    IKE service kept its built-in list and the option did nothing there."""

    name = "esp-offer"

    def __init__(self, ike: IkeService) -> None:
        self._ike = ike

    def _apply(self, config: OeConfig) -> None:
        self._ike.set_esp_proposals(esp_offer(config.ike.esp_proposals or DEFAULT_ESP_PROPOSALS))

    async def start(self, config: OeConfig) -> None:
        self._apply(config)

    async def reload(self, config: OeConfig) -> None:
        self._apply(config)

    async def stop(self) -> None:
        return None

    def status(self) -> StatusContribution:
        return StatusContribution()


class EspOffer:
    """Keeps IKE's ESP offer and the userspace datapath's engines in step with offload.

    Why a service of its own: the offer depends on things that change apart: the
    config (an explicit ``esp_proposal`` always wins), the active datapath (only what it
    can run is offered) and the offload layer's findings (with ``offload auto`` and no
    explicit list, the transform the fastest proven engine runs comes first; a kernel
    driver that fails its known-answer test is never offered for kernel ESP).

    On the kernel datapath it also runs the end-to-end ESP self-test
    (``datapath.selftest``): a transform is offered only once an SA pair with it carried
    real ESP intact between two throw-away namespaces, on the driver the kernel picks
    now. The preferred transform is tested first and each is offered as soon as it
    passed; until the first one has, the offer is empty and the OE service waits for it
    (``wait_offer``). The kernel's picks are read after every offload publication and
    every ``PICK_INTERVAL``; a transform whose pick moved is tested again. A driver that
    fails (KAT, canary or self-test) is lowered below the next implementation when
    ``offload_demote`` is on, and the transform comes back once it passes again. Live
    IKE SAs get every new offer, and Child SAs on a withdrawn transform are rekeyed onto
    it (``listeners`` -> ``OeService.offer_changed``, ``rekey_child``).

    The self-test's schedule is ``esp_offer_selftest.KernelSelfTest`` (``selftest``) and
    the demotions are ``esp_offer_demote.Demoter``; this class decides what is offered.
    """

    def __init__(
        self,
        ike: IkeService,
        offload: OffloadService,
        datapath: str,
        *,
        selftest: bool | None = None,
        run_selftests: SelfTestRunner = _run_selftests,
        read_picks: Callable[[], Mapping[str, str | None]] = kernel_picks,
        demote: Callable[[str], tuple[int, int]] = _lower_priority,
        clock: Callable[[], float] = time.monotonic,
        pick_interval: float = PICK_INTERVAL,
    ) -> None:
        """``selftest``: gate the offer by the ESP self-test (default: on the kernel
        datapath); the rest are seams for tests (the runner, the kernel's picks, the
        NETLINK_CRYPTO demotion) and the clock."""
        self._ike = ike
        self._offload = offload
        self._datapath = datapath  # "kernel" | "userspace"
        self._config = OeConfig()
        self._update: OffloadUpdate | None = None
        self._userspace: Any = None
        self.offer: tuple[str, ...] = ()
        #: explicit ``esp_proposal`` entries last warned about (the datapath cannot run them)
        self._dropped: tuple[str, ...] = ()
        #: called (no arguments) whenever the offer changed
        self.listeners: list[Callable[[], None]] = []
        use_gate = datapath == "kernel" if selftest is None else selftest
        self.gate: SelfTestGate | None = SelfTestGate() if use_gate else None
        self._clock = clock
        self._started_at = clock()
        self._first_offer_s: float | None = None
        self._nonempty = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        #: the self-test's schedule (None: the offer is not gated by it)
        self.selftest: KernelSelfTest | None = None
        if self.gate is not None:
            self.selftest = KernelSelfTest(
                self.gate,
                run_selftests=run_selftests,
                read_picks=read_picks,
                pick_interval=pick_interval,
                changed=self.apply,
                failed=self._consider_demotion,
                spawn=self._spawn,
                clock=clock,
                elapsed=self._elapsed,
            )
        self._demoter = Demoter(
            self.gate,
            demote=demote,
            retest=self._retest,
            rescan=offload.rescan,
            changed=self.apply,
            spawn=self._spawn,
            elapsed=self._elapsed,
        )
        #: the last rekeys onto a new offer (``rekey_child``): when, how long, the outcome
        self.moves: list[dict[str, Any]] = []
        offload.subscribe(self.on_update)
        if self.gate is not None:
            offload.report_extras.append(self.report_extra)

    @property
    def name(self) -> str:
        return "esp-offer"

    @property
    def demotions(self) -> list[dict[str, Any]]:
        """What ``offload_demote`` lowered (or failed to), for ``oe offload --json``."""
        return self._demoter.demotions

    def _elapsed(self) -> float:
        return round(self._clock() - self._started_at, 3)

    def _retest(self) -> None:
        if self.selftest is not None:
            self.selftest.kick()

    def attach_userspace(self, dp: Any) -> None:
        self._userspace = dp

    async def start(self, config: OeConfig) -> None:
        self._config = config
        self._started_at = self._clock()
        if self.selftest is not None:
            self.selftest.start(self._base())
        self.apply()

    async def reload(self, config: OeConfig) -> None:
        demote_on = config.offload_demote and not self._config.offload_demote
        old, self._config = self._config, config
        dropped = self._unrunnable()
        if dropped and len(dropped) == len(config.ike.esp_proposals):
            self._config = old
            why = self._dropped_text(dropped)
            raise ServiceError(f"esp_proposal: {why}; nothing left to offer")
        if demote_on:
            self._demoter.retry_failed()
        if self.selftest is not None:
            self.selftest.want(self._base())
        self.apply()
        self._consider_demotion()

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def status(self) -> StatusContribution:
        if self.gate is None:
            return StatusContribution()
        return StatusContribution(engines=(self.engine_row(),))

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        return spawn_tracked(self._tasks, coro, log, "esp-offer")

    # -- the offer ------------------------------------------------------------------
    def on_update(self, update: OffloadUpdate) -> None:
        self._update = update
        if self.selftest is not None:
            self.selftest.offload_update(self._base(), update.kernel_drivers)
        self.apply()
        self._consider_demotion()

    def engine_for(self, spec: Any) -> str:
        """The engine that runs a Child SA's ESP, for ``oe status``: the userspace
        datapath's engines by packet size, or the kernel's own driver for kernel ESP."""
        if self._userspace is not None:
            return str(self._userspace.engine_for(spec))
        up = self._update
        try:
            bits = len(spec.outbound.encr_key) * 8 - spec.encr.salt_bits
            name = transform(spec.encr.ike_id, bits, spec.integ.ike_id if spec.integ else None).name
        except Exception:
            return "kernel"
        driver = dict(up.kernel_drivers).get(name, "") if up is not None else ""
        return f"kernel ({driver})" if driver else "kernel"

    def _base(self) -> tuple[str, ...]:
        return tuple(self._config.ike.esp_proposals or DEFAULT_ESP_PROPOSALS)

    def _ranked(self) -> tuple[str, ...]:
        """The keywords the datapath can run, in order, before the self-test's say."""
        cfg, up = self._config, self._update
        explicit = cfg.ike.esp_proposals
        base = self._base()
        if up is None:
            return base
        if self._datapath == "userspace":
            runnable = {c.transform for c in up.table.choices if c.bands}
        else:
            runnable = set(base)
            if up.kernel_checked:  # every transform AF_ALG runs here has a verdict
                runnable &= set(up.kernel_usable)
        if explicit or cfg.offload != "auto":
            return tuple(n for n in base if n in runnable)
        ranked = up.proposal if self._datapath == "userspace" else up.kernel_proposal
        fast = [n for n in ranked if n in runnable and n in base]
        return tuple(fast + [n for n in base if n in runnable and n not in fast])

    def _unrunnable(self) -> tuple[str, ...]:
        """Explicit ``esp_proposal`` entries the active datapath cannot run (known once the
        offload layer has published; the self-test's pending verdicts are no reason)."""
        explicit = self._config.ike.esp_proposals
        if not explicit or self._update is None:
            return ()
        ranked = set(self._ranked())
        return tuple(n for n in dict.fromkeys(explicit) if n not in ranked)

    def _dropped_text(self, names: Sequence[str]) -> str:
        why = "; ".join(f"{n} ({self._why_unrunnable(n)})" for n in names)
        return f"the {self._datapath} datapath cannot run {why}"

    def _why_unrunnable(self, name: str) -> str:
        failure = self._failure(name)
        if failure:
            return failure
        if self._datapath == "userspace":
            return "no crypto engine here passed its known-answer test"
        return "the kernel's crypto API has no implementation that passed its known-answer test"

    def _warn_dropped(self) -> None:
        """One warning per change of what an explicit list loses (never per packet)."""
        dropped = self._unrunnable()
        if dropped == self._dropped:
            return
        self._dropped = dropped
        if not dropped:
            return
        if len(dropped) == len(self._config.ike.esp_proposals):
            log.error("esp_proposal: %s; nothing is offered", self._dropped_text(dropped))
        else:
            log.warning("esp_proposal: %s; left out of the offer", self._dropped_text(dropped))

    def names(self) -> tuple[str, ...]:
        """The keywords offered, in order."""
        ranked = self._ranked()
        if self.gate is None:
            return ranked
        return tuple(n for n in ranked if self.gate.allows(n))

    def apply(self) -> None:
        self._warn_dropped()
        names = self.names()
        changed = names != self.offer
        if changed:
            if self.offer or names != self._base():
                log.info("ESP offer: %s", ", ".join(names) or "nothing (no usable transform)")
            self.offer = names
        self._ike.set_esp_proposals(esp_offer(names))
        if names:
            if self._first_offer_s is None:
                self._first_offer_s = round(self._clock() - self._started_at, 3)
            self._nonempty.set()
        else:
            self._nonempty.clear()
        up = self._update
        if self._userspace is not None and up is not None:
            self._userspace.set_engine_table(up.table.to_json(), self._config.offload_canary)
        if changed:
            for listener in list(self.listeners):
                listener()

    # -- what the OE service asks (oe.service.EspOfferHooks) ------------------------------
    def empty_reason(self) -> str | None:
        if self.offer:
            return None
        if self.gate is not None and self.gate.busy:
            return "no ESP transform has passed the kernel datapath's self-test yet"
        why = [self.why_not(n) for n in self._base()]
        return "no ESP transform is usable: " + "; ".join(f"{n}: {w}" for n, w in zip(
            self._base(), why, strict=True) if w)  # fmt: skip

    async def wait_offer(self, timeout: float) -> str | None:
        if not self.offer and self.gate is not None and self.gate.busy:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._nonempty.wait()
        return self.empty_reason()

    def _failure(self, name: str) -> str | None:
        """Why ``name``'s kernel driver is known to be broken, or None."""
        up = self._update
        if self._datapath != "kernel":
            return None
        if up is not None:
            for t, driver in up.kernel_failed:
                if t == name:
                    return f"the kernel's pick {driver or '?'} failed its known-answer test"
        r = self.gate.failed().get(name) if self.gate is not None else None
        if r is not None:
            return f"its ESP self-test failed on {r.driver or 'the kernel pick'}"
        return None

    def withdrawn(self, spec: ChildSaSpec) -> str | None:
        """Why this Child SA's transform left the offer for a broken driver (None: it
        did not, or only for now: untested, stale, or no longer configured)."""
        name = esp_keyword(spec)
        if name is None or name in self.offer:
            return None
        why = self._failure(name)
        return None if why is None else f"{name} was withdrawn: {why}"

    def why_not(self, name: str) -> str:
        """Why ``name`` is not offered ("" when it is)."""
        if name in self.offer:
            return ""
        up = self._update
        if name not in self._ranked():
            if name in self._base() and up is not None:
                why = self._why_unrunnable(name)
            else:
                why = self._failure(name) or "not in the ESP proposal list"
        elif self.gate is not None:
            r = self.gate.result(name)
            row = next((x for x in self.gate.rows() if x.transform == name), None)
            if r is None:
                why = "waiting for its ESP self-test"
            elif row is not None and row.stale:
                why = f"ESP self-test again ({row.note or 'the kernel pick changed'})"
            else:
                why = f"its ESP self-test failed on {r.driver or 'the kernel pick'}: {r.detail}"
        else:
            why = "not usable"
        driver = self._failed_driver(name)
        if driver:
            why += self._demoter.note(driver, self._config.offload_demote)
        return why

    def _failed_driver(self, name: str) -> str:
        up = self._update
        if self._datapath != "kernel":
            return ""
        if up is not None:
            for t, driver in up.kernel_failed:
                if t == name and driver:
                    return driver
        r = self.gate.failed().get(name) if self.gate is not None else None
        return (r.driver or "") if r is not None else ""

    async def rekey_child(self, peer: IPAddress, spec: ChildSaSpec) -> str | None:
        """Rekey one Child SA now with the current offer (the IKE core's CREATE_CHILD_SA
        with REKEY_SA); None once the old SA is on its way out, else why not.

        The new SA reaches the OE manager as every rekey does (``adopt_inbound``). The
        outcome is read from the IKE SA's view of the Child SA: rekeyed or deleting means
        done; back to installed (for ``MOVE_SETTLE``) means the peer refused (libreswan
        refuses a rekey that changes the algorithms), and the manager replaces it.
        """
        started = self._clock()
        error = await self._rekey_child(peer, spec)
        self.moves.append(
            {
                "peer": str(peer),
                "transform": esp_keyword(spec),
                "at_s": round(started - self._started_at, 3),
                "took_s": round(self._clock() - started, 3),
                "error": error,
            }
        )
        del self.moves[:-20]
        return error

    async def _rekey_child(self, peer: IPAddress, spec: ChildSaSpec) -> str | None:
        error = await self._ike.rekey_child(
            str(peer),
            spec.inbound.spi.to_bytes(4, "big"),
            timeout=MOVE_TIMEOUT,
            settle=MOVE_SETTLE,
            clock=self._clock,
        )
        if error == REKEY_REFUSED:
            return f"the peer took none of the current offer ({', '.join(self.offer)})"
        return error

    # -- offload_demote -------------------------------------------------------------------
    def _consider_demotion(self) -> None:
        """Lower each failing kernel pick once (``offload_demote``): KAT, canary or
        self-test failures of the driver the kernel picks now."""
        if self._config.offload_demote and self._datapath == "kernel":
            self._demoter.consider(self._update)

    # -- status ------------------------------------------------------------------------------
    def engine_row(self) -> EngineStatus:
        """The self-test as an engine row of ``oe status`` / ``oe offload``: one line per
        transform with the driver it ran on, its verdict and why it is not offered."""
        gate = self.gate
        assert gate is not None
        kat = {"passed": "passed", "failed": "failed", "inconclusive": "inconclusive",
               "untestable": "untested"}  # fmt: skip
        rows = []
        for r in gate.rows():
            res = r.result
            verdict = "pending" if r.stale else kat.get(r.state, "pending")
            rows.append(
                EngineTransformStatus(
                    transform=r.transform,
                    driver=(res.driver or "") if res is not None else "",
                    kat=verdict,
                    reason=self.why_not(r.transform),
                    in_use_for="all" if r.transform in self.offer else "",
                )
            )
        drivers = list(dict.fromkeys(t.driver for t in rows if t.driver))
        state = "proving" if gate.busy else "ready"
        return EngineStatus(
            name="kernel-esp",
            driver=", ".join(drivers),
            kind="kernel",
            proven=any(t.kat == "passed" for t in rows),
            selected=bool(self.offer),
            state=state,
            reason="" if self.offer else (self.empty_reason() or ""),
            transforms=tuple(rows),
            in_use_for=tuple(f"{n}@all" for n in self.offer),
        )

    def report_extra(self) -> dict[str, Any]:
        """``oe offload --json``: the section ``kernel_selftest`` (the row is in ``engine_row``
        for ``oe status``: the self-test is no engine of the offload table)."""
        gate = self.gate
        assert gate is not None
        transforms: dict[str, Any] = {}
        for r in gate.rows():
            res = r.result
            transforms[r.transform] = {
                "state": r.state,
                "stale": r.stale,
                "note": r.note,
                "offered": r.transform in self.offer,
                "why_not": self.why_not(r.transform),
                "at_s": None if r.at is None else round(r.at - self._started_at, 3),
                "result": None if res is None else dataclasses.asdict(res),
            }
        section = {
            "offer": list(self.offer),
            "first_offer_s": self._first_offer_s,
            "first_round_s": self.selftest.first_round_s if self.selftest is not None else None,
            "busy": gate.busy,
            "offload_demote": self._config.offload_demote,
            "transforms": transforms,
            "demotions": list(self.demotions),
            "moves": list(self.moves),
            "now_s": round(self._clock() - self._started_at, 3),
            "row": self.engine_row().to_json(),
        }
        return {"kernel_selftest": section}
