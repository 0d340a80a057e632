"""The userspace datapath's Child SAs, seen from the daemon: what the workers run.

Why its own object: the keys go to the workers once, at install (``add_in`` to rx,
``add_out`` to tx, answered ``installed`` before any route may lead into the SA), and
the daemon keeps only what it needs without them: the spec, the counter slots the
workers write, the SPIs and reqids it handed out, and the emulation of the kernel's SA
lifetimes (soft -> rekey, hard -> gone), which reads those counters.
"""

from __future__ import annotations

import contextlib
import ipaddress
import secrets
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Final

from oe_router.offload import EngineError, Transform, transform
from oe_router.records import record

from .base import (
    ChildSaCounters,
    ChildSaSpec,
    DatapathError,
    Expire,
    IPAddress,
    Lifetime,
    PolicySpec,
    SaCounters,
)
from .packet import Flow
from .workerpool import WorkerPool

__all__ = ["InstalledChild", "SaTable", "expire_events", "transform_of"]

_FIRST_REQID: Final = 0x4F450000
_SLOTS: Final = 2048  # counter slots used; 0 and 1 are the workers' own counters


def transform_of(spec: ChildSaSpec) -> Transform:
    """The offload layer's name for a Child SA's algorithms and key size."""
    bits = (len(spec.outbound.encr_key) * 8) - spec.encr.salt_bits
    try:
        return transform(spec.encr.ike_id, bits, spec.integ.ike_id if spec.integ else None)
    except EngineError as exc:
        raise DatapathError(f"Child SA {spec.local}<->{spec.remote}: {exc}") from None


@record(eq=False)
class InstalledChild:
    """A Child SA the workers run: its spec and the counter slots of its directions."""

    spec: ChildSaSpec
    transform: Transform
    slot_in: int
    slot_out: int
    added: float  # epoch seconds
    added_mono: float
    soft_fired: bool = False


class SaTable:
    """Child SAs by (local address, inbound SPI), handed to the workers in ``pool``."""

    def __init__(self, pool: WorkerPool, *, replay_window: int, clock: Callable[[], float]) -> None:
        self._pool = pool
        self._replay_window = replay_window
        self._clock = clock
        self._children: dict[tuple[IPAddress, int], InstalledChild] = {}
        self._spis: set[int] = set()
        self._free_slots = list(range(_SLOTS - 1, 1, -1))
        self._next_reqid = _FIRST_REQID
        #: reqid -> how many installed Child SAs carry it, kept in step with _children
        #: (a reqid is picked per install: no rebuild of the set of those in use)
        self._reqids_used: Counter[int] = Counter()

    def specs(self) -> list[ChildSaSpec]:
        return [c.spec for c in self._children.values()]

    def allocate_spi(self) -> int:
        while True:
            spi = secrets.randbits(32)
            if spi >= 0x100 and spi not in self._spis:
                self._spis.add(spi)
                return spi

    def _reqid(self) -> int:
        used = self._reqids_used
        while used[self._next_reqid] > 0:
            self._next_reqid += 1
        reqid, self._next_reqid = self._next_reqid, self._next_reqid + 1
        return reqid

    def _slot(self) -> int:
        if not self._free_slots:
            raise DatapathError("userspace datapath: no counter slot left (too many SAs)")
        return self._free_slots.pop()

    async def install(self, spec: ChildSaSpec) -> ChildSaSpec:
        """Hand both directions to the workers (keys included, and nowhere else); returns
        the spec with its reqid filled in."""
        t = transform_of(spec)
        if spec.reqid == 0:
            spec = replace(spec, reqid=self._reqid())
        slot_in, slot_out = self._slot(), self._slot()
        local_ts = [str(ts.net) for ts in spec.local_ts] or [str(ipaddress.ip_network(spec.local))]
        remote_ts = [str(ts.net) for ts in spec.remote_ts] or [
            str(ipaddress.ip_network(spec.remote))
        ]
        port = spec.encap.remote_port if spec.encap is not None else 4500
        common = {
            "transform": t.name,
            "esn": spec.esn,
            "local_ts": local_ts,
            "remote_ts": remote_ts,
        }
        try:
            await self._pool.install(
                "rx",
                {
                    "op": "add_in",
                    "slot": slot_in,
                    "spi": spec.inbound.spi,
                    "encr_key": spec.inbound.encr_key.hex(),
                    "integ_key": spec.inbound.integ_key.hex(),
                    "window": max(spec.replay_window, self._replay_window),
                    **common,
                },
            )
            await self._pool.install(
                "tx",
                {
                    "op": "add_out",
                    "slot": slot_out,
                    "spi": spec.outbound.spi,
                    "encr_key": spec.outbound.encr_key.hex(),
                    "integ_key": spec.outbound.integ_key.hex(),
                    "src": str(spec.local),
                    "dst": str(spec.remote),
                    "port": port,
                    **common,
                },
            )
        except DatapathError:
            self._free_slots += [slot_in, slot_out]
            raise
        child = InstalledChild(spec, t, slot_in, slot_out, time.time(), self._clock())
        key = (spec.local, spec.inbound.spi)
        replaced = self._children.get(key)
        if replaced is not None:
            self._forget_reqid(replaced.spec.reqid)
        self._children[key] = child
        self._reqids_used[spec.reqid] += 1
        self._spis.add(spec.inbound.spi)
        return spec

    def detach(self, spec: ChildSaSpec) -> InstalledChild | None:
        """Out of the table (no packet is decided into it any more), its SPI released;
        the workers still run it until ``retire``. None if it was not installed."""
        child = self._children.pop((spec.local, spec.inbound.spi), None)
        self._spis.discard(spec.inbound.spi)
        if child is not None:
            self._forget_reqid(child.spec.reqid)
        return child

    def _forget_reqid(self, reqid: int) -> None:
        left = self._reqids_used[reqid] - 1
        if left > 0:
            self._reqids_used[reqid] = left
        else:
            del self._reqids_used[reqid]

    def retire(self, child: InstalledChild) -> None:
        """Take both directions out of the workers."""
        for role, slot in (("rx", child.slot_in), ("tx", child.slot_out)):
            with contextlib.suppress(DatapathError):
                self._pool.send(role, {"op": "remove", "slot": slot})
            self._free_slots.insert(0, slot)  # reused last: late counter reads stay sane

    def send(self, child_spec: ChildSaSpec, packets: list[bytes]) -> None:
        """Seal inner packets into this Child SA and send them (the tx worker does it)."""
        child = self._children[(child_spec.local, child_spec.inbound.spi)]
        self._pool.send(
            "tx", {"op": "send", "slot": child.slot_out, "packets": [p.hex() for p in packets]}
        )

    def for_policy(self, pol: PolicySpec | None) -> ChildSaSpec | None:
        """The Child SA an IPSEC policy's template asks for, if it is installed."""
        if pol is None or not pol.templates:
            return None
        t = pol.templates[0]
        for c in self._children.values():
            s = c.spec
            if s.reqid == t.reqid and s.local == t.src and s.remote == t.dst:
                return s
        return None

    def covers(self, f: Flow) -> bool:
        """A Child SA's remote selectors cover this destination."""
        dst = f.dst_address
        return any(dst in ts.net for c in self._children.values() for ts in c.spec.remote_ts)

    def _read(self, slot: int, added: float) -> SaCounters:
        counters = self._pool.counters
        if counters is None:
            raise DatapathError("the userspace datapath is not running")
        c = counters.read(slot)
        return SaCounters(
            c.bytes, c.packets, int(added), int(c.last_use), c.replay_errors, c.integrity_failures
        )

    def read_counters(self, spec: ChildSaSpec) -> ChildSaCounters:
        child = self._children.get((spec.local, spec.inbound.spi))
        if child is None:
            raise DatapathError(
                f"Child SA {spec.local}<->{spec.remote} spi {spec.inbound.spi:#010x}: not installed"
            )
        return ChildSaCounters(
            self._read(child.slot_in, child.added), self._read(child.slot_out, child.added)
        )

    def expiring(self) -> Iterator[tuple[ChildSaSpec, bool]]:
        """The kernel's SA lifetimes, emulated: (spec, hard) for every SA past its hard
        limit, and once for every SA past its soft limit."""
        now = self._clock()
        for child in list(self._children.values()):
            hard, soft = self._expired(child, child.spec.lifetime, now)
            if hard:
                yield child.spec, True
            elif soft and not child.soft_fired:
                child.soft_fired = True
                yield child.spec, False

    def _expired(self, child: InstalledChild, lft: Lifetime, now: float) -> tuple[bool, bool]:
        age = now - child.added_mono
        try:
            c = self.read_counters(child.spec)
        except DatapathError:
            return False, False
        nbytes = max(c.inbound.bytes, c.outbound.bytes)
        npkts = max(c.inbound.packets, c.outbound.packets)

        def over(limit: int, value: float) -> bool:
            return bool(limit) and value >= limit

        hard = (
            over(lft.hard_seconds, age)
            or over(lft.hard_bytes, nbytes)
            or over(lft.hard_packets, npkts)
        )
        soft = (
            over(lft.soft_seconds, age)
            or over(lft.soft_bytes, nbytes)
            or over(lft.soft_packets, npkts)
        )
        return hard, soft


def expire_events(spec: ChildSaSpec, hard: bool) -> tuple[Expire, Expire]:
    """What the kernel reports for a Child SA's lifetime: one Expire per direction."""
    return (
        Expire(spec.local, spec.remote, spec.outbound.spi, spec.reqid, hard),
        Expire(spec.remote, spec.local, spec.inbound.spi, spec.reqid, hard),
    )
