"""Measurement: how fast each engine runs each transform at small, medium and full packets.

Why measure at all: an accelerator that wins on 1400-byte packets often loses on 64-byte
ACKs (per-request overhead: a syscall, a DMA descriptor, an interrupt), and under QEMU's
TCG the "hardware" is slower than the CPU at every size. The chooser decides from these
numbers, never from an engine's kind.

Each case seals (and optionally opens) batches of ESP payloads through the batched form
the datapath uses, for ``duration`` seconds of wall time, on one cipher with a random key
(made here, never logged). ``size`` is the inner packet's length; the plaintext carries
the ESP trailer and padding as the datapath would send it, and Mbit/s counts inner bytes.
Each measurement also records the thread's user and system CPU time (``getrusage``), so
``cpu_ns_per_packet`` can split a packet's cost into userspace work (Python, OpenSSL),
kernel work (syscalls, in-kernel crypto for AF_ALG and cryptodev) and waiting (an
asynchronous device, or the scheduler).

All of it is blocking; the daemon runs it through ``measure_engine_async`` (a thread),
so the event loop never waits on a benchmark.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict
from typing import Any

from oe_router.records import record

from .engine import Engine, EngineError, EspCipher, OpenRequest, SealRequest, Transform

__all__ = [
    "SIZES",
    "MeasureReport",
    "Measurement",
    "cpu_ns_per_packet",
    "measure_cipher",
    "measure_engine",
    "measure_engine_async",
    "padded_plaintext_len",
]

#: Packet sizes measured: a TCP ACK, a middling packet, a full-MTU packet in a tunnel.
SIZES: tuple[int, ...] = (64, 512, 1400)

_RUSAGE_THREAD = getattr(resource, "RUSAGE_THREAD", None)


@record(frozen=True)
class Measurement:
    """One engine x transform x size x operation: packets done in ``seconds`` of wall time."""

    engine: str
    transform: str
    size: int
    op: str  # "seal" or "open"
    packets: int
    seconds: float
    user_s: float = 0.0
    sys_s: float = 0.0

    @property
    def mbit_s(self) -> float:
        return self.packets * self.size * 8 / self.seconds / 1e6 if self.seconds > 0 else 0.0

    @property
    def ns_per_packet(self) -> float:
        return self.seconds * 1e9 / self.packets if self.packets else float("inf")

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["mbit_s"] = round(self.mbit_s, 1)
        out["ns_per_packet"] = round(self.ns_per_packet, 1)
        return out

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Measurement:
        return cls(
            engine=str(obj["engine"]),
            transform=str(obj["transform"]),
            size=int(obj["size"]),
            op=str(obj["op"]),
            packets=int(obj["packets"]),
            seconds=float(obj["seconds"]),
            user_s=float(obj.get("user_s", 0.0)),
            sys_s=float(obj.get("sys_s", 0.0)),
        )


@record(frozen=True)
class MeasureReport:
    """What ``measure_engine`` got: the measurements, and the transforms that failed."""

    measurements: tuple[Measurement, ...]
    errors: tuple[tuple[str, str], ...] = ()  # (transform, reason)


def cpu_ns_per_packet(m: Measurement) -> dict[str, float]:
    """Nanoseconds per packet: ``wall``, ``user`` (Python, OpenSSL), ``sys`` (syscalls,
    in-kernel crypto), ``wait`` (wall minus CPU: an asynchronous device, preemption)."""
    if not m.packets:
        return {"wall": float("inf"), "user": 0.0, "sys": 0.0, "wait": 0.0}
    per = 1e9 / m.packets
    wall, user, sys_ = m.seconds * per, m.user_s * per, m.sys_s * per
    return {"wall": wall, "user": user, "sys": sys_, "wait": max(0.0, wall - user - sys_)}


def padded_plaintext_len(t: Transform, size: int) -> int:
    """ESP plaintext length for an inner packet of ``size`` bytes (trailer and padding)."""
    return -(-(size + 2) // t.block_size) * t.block_size


def _cpu() -> tuple[float, float]:
    if _RUSAGE_THREAD is not None:
        r = resource.getrusage(_RUSAGE_THREAD)
        return r.ru_utime, r.ru_stime
    return time.thread_time(), 0.0


def _requests(t: Transform, size: int, batch: int) -> list[SealRequest]:
    n = padded_plaintext_len(t, size)
    body = bytes(range(256)) * (n // 256 + 1)
    return [
        SealRequest(
            hdr=b"\x00\x00\x10\x01" + (i + 1).to_bytes(4, "big"),
            seq_hi=None,
            iv=(i + 1).to_bytes(t.iv_len, "big"),
            plaintext=body[:n],
        )
        for i in range(batch)
    ]


def measure_cipher(
    cipher: EspCipher,
    size: int,
    *,
    engine: str,
    duration: float = 0.3,
    batch: int = 16,
    op: str = "seal",
    repeats: int = 3,
    clock: Callable[[], float] = time.perf_counter,
) -> Measurement:
    """Run ``op`` on batches of ``batch`` packets for ``duration`` seconds in all, split
    into ``repeats`` rounds; the fastest round is the result.

    One untimed batch first: the first request may instantiate a kernel template or
    fault pages in, which is not what a running datapath pays. The fastest round, because
    what slows a round down on a router is something else running (the datapath itself,
    the other core's work), not the engine: the least disturbed round is the engine's.
    """
    t = cipher.transform
    seals = _requests(t, size, batch)
    run: Callable[[], object]
    if op == "seal":

        def run() -> object:
            return cipher.seal_many(seals)
    elif op == "open":
        sealed = cipher.seal_many(seals)
        opens = [OpenRequest(r.hdr, r.seq_hi, r.iv, c) for r, c in zip(seals, sealed, strict=True)]

        def run() -> object:
            return cipher.open_many(opens)
    else:
        raise ValueError(f"measure: op {op!r} is not seal or open")
    run()
    best: Measurement | None = None
    for _ in range(max(1, repeats)):
        packets = 0
        user0, sys0 = _cpu()
        start = clock()
        end = start + duration / max(1, repeats)
        now = start
        while True:
            run()
            packets += batch
            now = clock()
            if now >= end:
                break
        user1, sys1 = _cpu()
        m = Measurement(
            engine=engine,
            transform=t.name,
            size=size,
            op=op,
            packets=packets,
            seconds=now - start,
            user_s=user1 - user0,
            sys_s=sys1 - sys0,
        )
        if best is None or m.ns_per_packet < best.ns_per_packet:
            best = m
    assert best is not None
    return best


def measure_engine(
    engine: Engine,
    transforms: Iterable[Transform],
    *,
    sizes: Sequence[int] = SIZES,
    duration: float = 0.3,
    ops: Sequence[str] = ("seal",),
    batch: int = 16,
) -> MeasureReport:
    """Every transform x size x op on ``engine``; a transform that fails is reported, not
    raised (one broken driver must not hide the others' numbers)."""
    out: list[Measurement] = []
    errors: list[tuple[str, str]] = []
    for t in transforms:
        try:
            cipher = engine.cipher(t, os.urandom(t.encr_key_len), os.urandom(t.auth_key_len))
        except Exception as exc:
            errors.append((t.name, _reason(engine.name, t, exc)))
            continue
        try:
            for size in sizes:
                for op in ops:
                    out.append(
                        measure_cipher(
                            cipher, size, engine=engine.name, duration=duration, batch=batch, op=op
                        )
                    )
        except Exception as exc:
            errors.append((t.name, _reason(engine.name, t, exc)))
        finally:
            with contextlib.suppress(Exception):  # a broken cipher must not lose the report
                cipher.close()
    return MeasureReport(tuple(out), tuple(errors))


def _reason(engine: str, t: Transform, exc: BaseException) -> str:
    what = "engine error" if isinstance(exc, EngineError) else type(exc).__name__
    return f"{engine} {t.name}: {what}: {exc}"


async def measure_engine_async(
    engine: Engine,
    transforms: Iterable[Transform],
    *,
    sizes: Sequence[int] = SIZES,
    duration: float = 0.3,
    ops: Sequence[str] = ("seal",),
) -> MeasureReport:
    """``measure_engine`` in a worker thread, so the event loop keeps serving."""
    return await asyncio.to_thread(
        measure_engine, engine, tuple(transforms), sizes=sizes, duration=duration, ops=ops
    )
