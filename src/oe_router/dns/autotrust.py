"""The managed root trust anchors on the event loop: the state file and the probe timer.

Why a separate edge: ``anchors.TrustPoint`` is the RFC 5011 state machine, sans-IO.
This module gives it a clock (wall time: hold-downs outlive restarts), sends its root
DNSKEY probe through the DNS front's own forwarding client, writes the state file when
a key changes state (only then: routers write to flash), and tells the key lookup when
the trusted keys change.

Reading is tolerant: a state file that cannot be read or parsed costs one log line, and
the daemon validates from the IANA anchors shipped with the package until the next
successful probe rewrites the file. It never stops the daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import dns.message

from oe_router.atomic import write_atomic
from oe_router.dns.anchors import AnchorStateError, Timers, TrustPoint, parse_timers
from oe_router.dns.dnssec import TrustAnchors
from oe_router.dns.keylookup import Resolving, query_message
from oe_router.dns.upstream import UpstreamError

__all__ = ["SEED", "TIMERS_ENV", "ManagedAnchors", "seed_exists", "timers_from_environ"]

log = logging.getLogger("oe_router.dns.autotrust")

#: The IANA root anchors (KSK-2017, KSK-2024) shipped in the package.
SEED = "iana-root-anchors"
#: Test-only: shorter RFC 5011 timers, e.g. ``add_hold_down=3,remove_hold_down=5,min_refresh=1``.
#: Read from the environment, never from the configuration (see anchors.Timers).
TIMERS_ENV = "OE_ROUTER_ANCHOR_TIMERS"


def _seed() -> Path:
    """The shipped file, next to this module (read as a plain file, not through
    ``importlib.resources``: that imports tempfile, shutil, bz2, lzma ... ~1 MB of RSS
    for the life of the daemon, docs/footprint.md; the package is never zipped)."""
    return Path(__file__).with_name(SEED)


def seed_text() -> str:
    return _seed().read_text(encoding="ascii")


def seed_exists() -> bool:
    return _seed().is_file()


def timers_from_environ(environ: Mapping[str, str] | None = None) -> Timers:
    """RFC 5011's timers, or the test's from ``OE_ROUTER_ANCHOR_TIMERS`` (logged once)."""
    text = (os.environ if environ is None else environ).get(TIMERS_ENV, "")
    if not text:
        return Timers()
    try:
        timers = parse_timers(text)
    except ValueError as exc:
        log.error("%s: %s; using RFC 5011's timers", TIMERS_ENV, exc)
        return Timers()
    log.warning("%s: RFC 5011 timers shortened for testing: %s", TIMERS_ENV, timers)
    return timers


class ManagedAnchors:
    """The root trust point kept in ``path``: loaded (or seeded), probed, saved.

    ``listeners`` are called with the new ``TrustAnchors`` whenever the trusted keys
    change. ``start`` runs the probe timer on the loop with the resolver ``upstream()``
    returns at each probe (the DNS front's current forwarding client).
    """

    def __init__(
        self,
        path: str | Path,
        timers: Timers | None = None,
        clock: Callable[[], float] = time.time,
        seed: Callable[[], str] = seed_text,
    ) -> None:
        self.path = Path(path)
        self._clock = clock
        self._seed = seed
        self.timers = timers or Timers()
        self.source = ""  #: where the keys came from: the file, or the shipped seed
        self.point = self._load()
        self.listeners: list[Callable[[TrustAnchors], None]] = []
        self._task: asyncio.Task[None] | None = None
        self._save_error = ""

    def _load(self) -> TrustPoint:
        """The state file's keys; the shipped seed when it is missing or unusable."""
        now = self._clock()
        problem = ""
        try:
            text = self.path.read_text(encoding="ascii")
            point = TrustPoint.from_text(text, str(self.path), now, self.timers)
        except FileNotFoundError:
            pass  # the first start: seeded, written once the first probe attaches its keys
        except AnchorStateError as exc:
            problem = str(exc)
        except (OSError, UnicodeDecodeError) as exc:
            problem = f"{self.path}: cannot be read ({getattr(exc, 'strerror', None) or exc})"
        else:
            self.source = str(self.path)
            return point
        if problem:
            log.error(
                "%s; validating from the IANA root anchors shipped with oe-router until a"
                " probe rewrites it",
                problem,
            )
        self.source = "shipped IANA root anchors"
        return TrustPoint.from_text(self._seed(), "the shipped IANA root anchors", now, self.timers)

    @property
    def anchors(self) -> TrustAnchors:
        return self.point.trust_anchors()

    # -- the probe ----------------------------------------------------------------

    def start(self, upstream: Callable[[], Resolving | None]) -> None:
        """Probe at once, then whenever the trust point asks (RFC 5011 section 2.3)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(upstream))

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self, upstream: Callable[[], Resolving | None]) -> None:
        while True:
            delay = self.point.next_probe - self._clock()
            if delay > 0:
                await asyncio.sleep(delay)
            await self.probe(upstream())

    async def probe(self, upstream: Resolving | None) -> None:
        """One active refresh: ask, feed the trust point, save and tell on change."""
        reply: dns.message.Message | None = None
        why = "no upstream resolver"
        if upstream is not None:
            try:
                reply = await upstream.resolve(query_message(self.point.query()))
            except UpstreamError as exc:
                why = str(exc)
        changed = self.point.feed(reply, self._clock(), why)
        if self.point.dirty:
            self.save()
        if changed:
            anchors = self.anchors
            for listener in list(self.listeners):
                listener(anchors)

    def save(self) -> None:
        """Write the state file; a failure is logged once (until it changes) and retried
        with the next change, the keys stay in memory meanwhile."""
        try:
            write_atomic(self.path, self.point.to_text().encode("ascii"), 0o644)
        except OSError as exc:
            error = f"{exc.strerror or exc}"
            if error != self._save_error:
                log.error("cannot write the trust anchor state %s: %s", self.path, error)
            self._save_error = error
            return
        self._save_error = ""
        self.point.saved()
        self.source = str(self.path)

    # -- status -------------------------------------------------------------------

    def describe(self) -> dict[str, object]:
        """The ``dns`` object's scalar facts about the anchors."""
        return {
            "trust_anchor": f"rfc5011 {self.path}",
            "trust_anchor_source": self.source,
            "anchor_probe": self.point.last_probe,
            "anchor_next_probe_s": max(0, round(self.point.next_probe - self._clock())),
        }
