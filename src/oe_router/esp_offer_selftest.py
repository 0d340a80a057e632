"""The kernel datapath's ESP self-test runs, for the ESP offer (``esp_offer.EspOffer``).

Why a collaborator of its own: the self-test (``datapath.selftest``) is slow background
work with its own schedule: it runs whenever the gate wants transforms tested, which
happens after every offload publication, when the config changes, and when the driver the
kernel picks for a transform moved (read after each publication and every
``pick_interval`` seconds). This class owns that schedule (the loops, the wake-up, the
pick reads); the offer only reads the gate's verdicts and is told when they changed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from oe_router.datapath.selftest import SelfTestGate, SelfTestResult, summary

__all__ = ["KernelSelfTest", "SelfTestRunner"]

log = logging.getLogger("oe_router.daemon")

SelfTestRunner = Callable[[Sequence[str], Callable[[SelfTestResult], None]], Awaitable[object]]


class KernelSelfTest:
    """Runs the gate's wanted self-tests in batches and re-reads the kernel's picks."""

    def __init__(
        self,
        gate: SelfTestGate,
        *,
        run_selftests: SelfTestRunner,
        read_picks: Callable[[], Mapping[str, str | None]],
        pick_interval: float,
        changed: Callable[[], None],
        failed: Callable[[], None],
        spawn: Callable[[Any], asyncio.Task[Any]],
        clock: Callable[[], float],
        elapsed: Callable[[], float],
    ) -> None:
        """``changed``: the gate's verdicts or wants changed (the offer is recomputed);
        ``failed``: a transform failed its self-test for real (demotion is considered);
        ``elapsed``: seconds since the offer started (for ``first_round_s``)."""
        self.gate = gate
        self._run_selftests = run_selftests
        self._read_picks = read_picks
        self._pick_interval = pick_interval
        self._changed = changed
        self._failed = failed
        self._spawn = spawn
        self._clock = clock
        self._elapsed = elapsed
        #: seconds from ``start`` until the first round of self-tests was done
        self.first_round_s: float | None = None
        self._kick = asyncio.Event()
        self._checking = False
        self._last_drivers: tuple[tuple[str, str], ...] | None = None

    @property
    def idle(self) -> bool:
        """No pick check runs and no self-test round is asked for."""
        return not self._checking and not self._kick.is_set()

    def start(self, wanted: Sequence[str]) -> None:
        self.gate.want(wanted)
        self._spawn(self._selftest_loop())
        self._spawn(self._pick_loop())
        self._kick.set()

    def want(self, wanted: Sequence[str]) -> None:
        """The transforms that may be offered now (config): test the new ones."""
        self.gate.want(wanted)
        self._kick.set()

    def offload_update(self, wanted: Sequence[str], drivers: tuple[tuple[str, str], ...]) -> None:
        """An offload publication: its kernel drivers may say the kernel's picks moved."""
        self.gate.want(wanted)
        if drivers != self._last_drivers:
            self._last_drivers = drivers
            self._check_picks_soon()
        self._kick.set()

    def kick(self) -> None:
        """Look at the gate again (something invalidated results)."""
        self._kick.set()

    async def _selftest_loop(self) -> None:
        gate = self.gate
        while True:
            await self._kick.wait()
            self._kick.clear()
            while batch := gate.next_batch():
                log.info("ESP self-test of %s on the kernel datapath", ", ".join(batch))
                try:
                    await self._run_selftests(batch, self._on_result)
                except asyncio.CancelledError:
                    gate.interrupted(batch)
                    raise
                except Exception as exc:
                    why = f"the self-test could not run: {type(exc).__name__}: {exc}"
                    log.error("ESP self-test of %s: %s", ", ".join(batch), why)
                    for t in [r.transform for r in gate.rows() if r.state == "running"]:
                        self._on_result(SelfTestResult(t, False, 0, 0, 0, why, inconclusive=True))
                gate.interrupted(batch)
                if self.first_round_s is None and not gate.busy:
                    self.first_round_s = self._elapsed()
                await self._check_picks()

    def _on_result(self, result: SelfTestResult) -> None:
        self.gate.finished(result, self._clock())
        line = summary(result)
        if result.passed:
            log.info("%s", line)
        elif result.inconclusive:
            log.error("%s (offered on its known-answer test alone)", line)
        else:
            log.error("%s: not offered for kernel ESP", line)
        self._changed()
        if not result.passed and not result.inconclusive:
            self._failed()

    def _check_picks_soon(self) -> None:
        if not self._checking:
            self._spawn(self._check_picks())

    async def _check_picks(self) -> None:
        if self._checking:
            return
        self._checking = True
        try:
            picks = await asyncio.to_thread(self._read_picks)
        except Exception as exc:  # the self-test then keeps its results
            log.warning("reading the kernel's crypto picks failed: %s", exc)
            return
        finally:
            self._checking = False
        moved = self.gate.picks(picks)
        if moved:
            log.info("the kernel's pick changed for %s: self-testing again", ", ".join(moved))
            self._changed()
            self._kick.set()

    async def _pick_loop(self) -> None:
        while True:
            await asyncio.sleep(self._pick_interval)
            await self._check_picks()
