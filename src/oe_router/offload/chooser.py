"""The choice: which engine runs which transform at which packet size, and what IKE proposes.

Pure functions of the known-answer verdicts, the measurements and the ``offload`` option;
the service calls them again whenever any of those changes and publishes the result.

How ``auto`` picks (per transform):

* only engines whose KAT passed take part, and only once measured (an unmeasured engine
  could be slower than the CPU; until software is measured nothing else is chosen);
* an engine's cost is its measured ns per sealed packet, interpolated linearly between
  the measured sizes (64, 512, 1400). Linear because a packet's cost is a fixed part (a
  syscall, a DMA descriptor, an interrupt) plus a part per byte: the model the numbers
  are meant to reveal. Between two measured sizes every engine's cost is a straight line,
  so where two engines cross is solved exactly and the bands' bounds are whole packet
  sizes. Beyond the smallest and the largest measured size the nearest figure holds
  (no extrapolation): a line extended past the data extends its noise too, and a 2 %
  wobble between 512 and 1400 bytes, extended, moved a crossover to 37 KB in a test;
* an engine other than ``software`` must beat the cost of software's by ``margin``
  (default 5 %) to take a size: measurements move by about ±20 % from run to run, and an
  engine that only ties the CPU is not worth trusting traffic to;
* the result is a list of bands, e.g. ``aes256-sha256``: software up to 511 bytes,
  ``afalg:virtio_crypto_aes_cbc`` above.

``off`` is software for everything. An engine name (``afalg:<driver>``, ``cryptodev``, or a
bare driver name such as ``virtio_crypto_aes_cbc``) runs the transforms it supports and
passed its KAT for, at every size; software runs the rest, and ``notes`` says why.

The table is plain JSON (``to_json``/``from_json``): the userspace datapath's worker
processes receive it and look up ``engine_for(transform, size)`` per packet.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import field
from typing import Any, Protocol

from oe_router.records import record

from .engine import TRANSFORMS, Transform
from .measure import Measurement

__all__ = [
    "SOFTWARE",
    "Band",
    "ChoiceTable",
    "TransformChoice",
    "Verdict",
    "choose",
    "kernel_usable",
    "proposal_order",
    "resolve_offload",
]

SOFTWARE = "software"
#: The largest ESP payload a cost line is extended to (an IPv4 packet's limit).
MAX_SIZE = 65535
#: The size whose throughput ranks transforms for the IKE proposal.
BULK_SIZE = 1400


class VerdictLike(Protocol):
    """A KAT outcome as ``kat.KatResult`` or ``Verdict`` carry it."""

    @property
    def engine(self) -> str: ...

    @property
    def transform(self) -> str | Transform: ...

    @property
    def passed(self) -> bool: ...


@record(frozen=True)
class Verdict:
    """Whether ``engine`` may run ``transform``: a KAT or canary outcome, with why not."""

    engine: str
    transform: str
    passed: bool
    reason: str = ""


def _tname(t: str | Transform) -> str:
    return t if isinstance(t, str) else t.name


def latest(verdicts: Iterable[VerdictLike]) -> dict[tuple[str, str], bool]:
    """(engine, transform) -> passed, the last verdict of each pair winning."""
    return {(v.engine, _tname(v.transform)): bool(v.passed) for v in verdicts}


@record(frozen=True)
class Band:
    """``engine`` runs packets up to ``max_size`` bytes (inclusive; None: any size)."""

    engine: str
    max_size: int | None = None


@record(frozen=True)
class TransformChoice:
    """One transform's bands (ascending sizes) and its verified engines, preferred first."""

    transform: str
    bands: tuple[Band, ...] = ()
    verified: tuple[str, ...] = ()

    def engine_for(self, size: int) -> str:
        for band in self.bands:
            if band.max_size is None or size <= band.max_size:
                return band.engine
        raise LookupError(f"{self.transform}: no engine passed its known-answer test")

    def ranges(self) -> list[tuple[str, int, int | None]]:
        """(engine, first size, last size or None) per band."""
        out: list[tuple[str, int, int | None]] = []
        lo = 1
        for band in self.bands:
            out.append((band.engine, lo, band.max_size))
            if band.max_size is not None:
                lo = band.max_size + 1
        return out


def size_range(lo: int, hi: int | None) -> str:
    """``all``, ``<=511``, ``>=512`` or ``512-1023``: a band as ``oe offload`` prints it."""
    if lo <= 1 and hi is None:
        return "all"
    if lo <= 1:
        return f"<={hi}"
    if hi is None:
        return f">={lo}"
    return f"{lo}-{hi}"


@record(frozen=True)
class ChoiceTable:
    """Per transform, the engines that run it by packet size; JSON for the worker processes.

    ``offload`` is the option it was built for, ``notes`` the reasons a user should see
    (an engine that failed, an ``offload`` name that matches nothing).
    """

    offload: str = "auto"
    choices: tuple[TransformChoice, ...] = ()
    notes: tuple[str, ...] = field(default=())

    def choice(self, transform: str) -> TransformChoice | None:
        return next((c for c in self.choices if c.transform == transform), None)

    def engine_for(self, transform: str, size: int) -> str:
        """The engine for a ``size``-byte packet of ``transform``; LookupError if none."""
        c = self.choice(transform)
        if c is None:
            raise LookupError(f"{transform}: not an ESP transform this table knows")
        return c.engine_for(size)

    def engines_in_use(self) -> dict[str, list[tuple[str, int, int | None]]]:
        """engine -> [(transform, first size, last size or None)], in table order."""
        out: dict[str, list[tuple[str, int, int | None]]] = {}
        for c in self.choices:
            for engine, lo, hi in c.ranges():
                out.setdefault(engine, []).append((c.transform, lo, hi))
        return out

    def in_use_for(self, engine: str) -> tuple[str, ...]:
        """``transform@sizes`` for each band ``engine`` holds (``aes256-sha256@>=512``)."""
        return tuple(
            f"{t}@{size_range(lo, hi)}" for t, lo, hi in self.engines_in_use().get(engine, [])
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "offload": self.offload,
            "transforms": {
                c.transform: {
                    "bands": [{"engine": b.engine, "max_size": b.max_size} for b in c.bands],
                    "verified": list(c.verified),
                }
                for c in self.choices
            },
            "notes": list(self.notes),
        }

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> ChoiceTable:
        """Read ``to_json``'s shape back; KeyError/TypeError/ValueError if malformed."""
        choices = []
        for name, c in dict(obj["transforms"]).items():
            bands = tuple(
                Band(str(b["engine"]), None if b["max_size"] is None else int(b["max_size"]))
                for b in c["bands"]
            )
            choices.append(
                TransformChoice(str(name), bands, tuple(str(e) for e in c.get("verified", ())))
            )
        return cls(
            offload=str(obj.get("offload", "auto")),
            choices=tuple(choices),
            notes=tuple(str(n) for n in obj.get("notes", ())),
        )


# --- cost lines ----------------------------------------------------------------------


class _Cost:
    """An engine's ns per packet as a function of size: linear between measured points,
    flat beyond the first and the last (the nearest measured figure holds there)."""

    def __init__(self, points: Mapping[int, float], scale: float) -> None:
        self.points = sorted((s, ns * scale) for s, ns in points.items())

    def __call__(self, size: float) -> float:
        pts = self.points
        if size <= pts[0][0]:
            return pts[0][1]
        if size >= pts[-1][0]:
            return pts[-1][1]
        i = 1
        while size > pts[i][0]:
            i += 1
        (x0, y0), (x1, y1) = pts[i - 1], pts[i]
        return y0 + (y1 - y0) * (size - x0) / (x1 - x0)


def _seal_costs(measurements: Iterable[Measurement], transform: str) -> dict[str, dict[int, float]]:
    """engine -> size -> ns per sealed packet for ``transform`` (the last measurement wins)."""
    out: dict[str, dict[int, float]] = {}
    for m in measurements:
        if m.transform == transform and m.op == "seal" and m.packets > 0:
            out.setdefault(m.engine, {})[m.size] = m.ns_per_packet
    return out


def _bands(
    engines: Sequence[str], costs: Mapping[str, _Cost], max_size: int = MAX_SIZE
) -> tuple[Band, ...]:
    """The lower envelope of ``costs`` over sizes 1..max_size, ties to the earlier engine.

    Every cost is linear between the union of all measured sizes, so the winner can only
    change where two lines cross inside such a segment: evaluating at the segment ends and
    at floor(x), floor(x)+1 of each crossing x finds every change at whole sizes.
    """
    breaks = sorted({1, max_size, *(s for e in engines for s, _ in costs[e].points)})
    breaks = [b for b in breaks if 1 <= b <= max_size]
    # lines that touch at a segment's end (a tie there) part right after it
    events = {*breaks, *(b + 1 for b in breaks), *(b - 1 for b in breaks)}
    for lo, hi in itertools.pairwise(breaks):
        for i, a in enumerate(engines):
            for b in engines[i + 1 :]:
                d_lo = costs[a](lo) - costs[b](lo)
                d_hi = costs[a](hi) - costs[b](hi)
                if (d_lo < 0 < d_hi) or (d_hi < 0 < d_lo):
                    x = lo + (hi - lo) * d_lo / (d_lo - d_hi)
                    events.update({math.floor(x), math.floor(x) + 1})
    order = {e: i for i, e in enumerate(engines)}

    def winner(size: int) -> str:
        return min(engines, key=lambda e: (costs[e](size), order[e]))

    points = sorted(s for s in events if 1 <= s <= max_size)
    bands: list[Band] = []
    current = winner(points[0])
    for size in points[1:]:
        w = winner(size)
        if w != current:
            bands.append(Band(current, size - 1))
            current = w
    bands.append(Band(current, None))
    return tuple(bands)


# --- the choice ------------------------------------------------------------------------


def resolve_offload(offload: str, engines: Sequence[str]) -> tuple[str, ...]:
    """The engines an explicit ``offload`` name means: that engine, or the engines bound to
    a driver of that name (``virtio_crypto_aes_cbc`` -> ``afalg:virtio_crypto_aes_cbc``)."""
    if offload in engines:
        return (offload,)
    return tuple(e for e in engines if e.partition(":")[2] == offload)


def _auto(
    t: str,
    verified: Sequence[str],
    measurements: Sequence[Measurement],
    margin: float,
) -> tuple[Band, ...]:
    if not verified:
        return ()
    points = _seal_costs(measurements, t)
    measured = [e for e in verified if points.get(e)]
    if SOFTWARE in verified and SOFTWARE not in measured:
        return (Band(SOFTWARE),)  # the baseline is not measured yet: nothing can beat it
    if not measured:
        return (Band(SOFTWARE if SOFTWARE in verified else verified[0]),)
    costs = {e: _Cost(points[e], 1.0 if e == SOFTWARE else 1.0 + margin) for e in measured}
    ranked = sorted(measured, key=lambda e: e != SOFTWARE)  # ties go to the CPU
    return _bands(ranked, costs)


def _preference(t: str, verified: Sequence[str], measurements: Sequence[Measurement]) -> list[str]:
    """Verified engines fastest first at the largest measured size; unmeasured last."""
    points = _seal_costs(measurements, t)

    def key(e: str) -> tuple[bool, float]:
        p = points.get(e)
        return (not p, p[max(p)] if p else 0.0)

    return sorted(verified, key=key)


def choose(
    offload: str,
    engines: Sequence[str],
    verdicts: Iterable[VerdictLike],
    measurements: Iterable[Measurement],
    *,
    margin: float = 0.05,
    transforms: Iterable[str] = tuple(TRANSFORMS),
) -> ChoiceTable:
    """The ChoiceTable for ``offload`` (``auto``, ``off`` or an engine/driver name).

    ``engines`` are the engines present, in discovery order; ``verdicts`` the KAT and
    canary outcomes (the last per engine and transform counts; no verdict yet means not
    verified); ``measurements`` what ``measure`` found.
    """
    verdicts = list(verdicts)
    ok = latest(verdicts)
    reasons = {(v.engine, _tname(v.transform)): getattr(v, "reason", "") or "" for v in verdicts}
    ms = list(measurements)
    notes: list[str] = []
    forced: tuple[str, ...] = ()
    if offload not in ("auto", "off"):
        forced = resolve_offload(offload, engines)
        if not forced:
            notes.append(
                f"offload {offload}: no such engine here (found: {', '.join(engines) or 'none'});"
                " software runs every transform"
            )
    choices = []
    for t in transforms:
        verified = [e for e in engines if ok.get((e, t))]
        for e in engines:
            if ok.get((e, t)) is False:
                why = reasons.get((e, t)) or "known-answer test failed"
                tail = f"; software runs {t}" if e in forced else ""
                notes.append(f"{e} is not used for {t}: {why}{tail}")
        if offload == "off":
            verified = [e for e in verified if e == SOFTWARE]
            bands: tuple[Band, ...] = (Band(SOFTWARE),) if verified else ()
        elif offload != "auto":
            use = next((e for e in forced if ok.get((e, t))), None)
            if use is None:
                use = SOFTWARE if SOFTWARE in verified else None
            bands = (Band(use),) if use else ()
        else:
            bands = _auto(t, verified, ms, margin)
        if not bands:
            notes.append(f"{t}: no engine passed its known-answer test; it is not used")
        choices.append(TransformChoice(t, bands, tuple(_preference(t, verified, ms))))
    return ChoiceTable(offload=offload, choices=tuple(choices), notes=tuple(notes))


def proposal_order(
    table: ChoiceTable,
    measurements: Iterable[Measurement],
    candidates: Sequence[str],
    *,
    tolerance: float = 0.10,
) -> tuple[str, ...]:
    """``candidates`` (strongSwan ESP keywords) fastest first, without unusable ones.

    A transform is ranked by the Mbit/s of the engine the table gives 1400-byte packets
    (``BULK_SIZE``): bulk transfers are where the choice of transform shows, while small
    packets cost about the same per-packet overhead whatever the transform (and go to
    the CPU anyway). Transforms within ``tolerance`` (10 %) of the fastest one left keep
    their configured order: each next place goes to the first configured transform at
    least ``1/(1+tolerance)`` as fast as the fastest remaining, so run-to-run noise does
    not reshuffle near-equals (under TCG GCM and CBC came out at 90 and 89 Mbit/s).
    Transforms not measured yet keep their configured order after the measured ones;
    transforms no verified engine runs (or unknown to the engines) are left out.
    """
    rate: dict[tuple[str, str], float] = {}
    for m in measurements:
        if m.size == BULK_SIZE and m.op == "seal":
            rate[(m.engine, m.transform)] = m.mbit_s
    usable: list[tuple[str, float | None]] = []
    for c in dict.fromkeys(candidates):
        choice = table.choice(c)
        if choice is None or not choice.bands:
            continue
        usable.append((c, rate.get((choice.engine_for(BULK_SIZE), c))))
    left = [(c, r) for c, r in usable if r is not None]
    order: list[str] = []
    while left:
        fastest = max(r for _, r in left)
        pick = next(i for i, (_, r) in enumerate(left) if r * (1.0 + tolerance) >= fastest)
        order.append(left.pop(pick)[0])
    return tuple(order) + tuple(c for c, r in usable if r is None)


def kernel_usable(kat_results: Iterable[VerdictLike]) -> set[str]:
    """Transforms whose kernel-picked driver (engine ``afalg``) passed its last KAT: the
    kernel datapath never proposes a transform whose kernel driver fails."""
    return {t for (e, t), passed in latest(kat_results).items() if e == "afalg" and passed}
