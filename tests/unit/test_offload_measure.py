"""offload.measure: throughput per engine x transform x size through the batched form, in a
thread; the arithmetic on a controlled clock, the real software engine's numbers."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

import pytest

from oe_router.offload.engine import (
    TRANSFORMS,
    EngineError,
    EngineKind,
    EspCipher,
    OpenRequest,
    SealRequest,
    Transform,
)
from oe_router.offload.measure import (
    SIZES,
    Measurement,
    cpu_ns_per_packet,
    measure_cipher,
    measure_engine,
    measure_engine_async,
    padded_plaintext_len,
)
from oe_router.offload.software import SoftwareEngine

CBC = TRANSFORMS["aes256-sha256"]
GCM = TRANSFORMS["aes256gcm16"]


class _Recorder:
    """An EspCipher that records the batches it is given and seals by copying."""

    def __init__(self, t: Transform) -> None:
        self.transform = t
        self.batches: list[Sequence[SealRequest]] = []
        self.opened: list[Sequence[OpenRequest]] = []
        self.closed = False

    def seal(self, hdr: bytes, seq_hi: int | None, iv: bytes, plaintext: bytes) -> bytes:
        return plaintext + bytes(self.transform.icv_len)

    def open(self, hdr: bytes, seq_hi: int | None, iv: bytes, sealed: bytes) -> bytes:
        return sealed[: -self.transform.icv_len]

    def seal_many(self, batch: Sequence[SealRequest]) -> list[bytes]:
        self.batches.append(batch)
        return [self.seal(r.hdr, r.seq_hi, r.iv, r.plaintext) for r in batch]

    def open_many(self, batch: Sequence[OpenRequest]) -> list[bytes | None]:
        self.opened.append(batch)
        return [self.open(r.hdr, r.seq_hi, r.iv, r.sealed) for r in batch]

    def close(self) -> None:
        self.closed = True


def test_packets_time_and_rates_on_a_controlled_clock() -> None:
    ticks = iter(i * 0.1 for i in range(1000))
    cipher = _Recorder(CBC)
    m = measure_cipher(
        cipher, 1400, engine="x", duration=0.35, batch=8, repeats=1, clock=lambda: next(ticks)
    )
    # clock: start 0.0, then one reading per batch: 0.1 0.2 0.3 0.4 -> 4 timed batches
    assert (m.packets, m.seconds) == (32, 0.4)
    assert len(cipher.batches) == 5  # one untimed warm-up batch first
    assert m.mbit_s == 32 * 1400 * 8 / 0.4 / 1e6
    assert m.ns_per_packet == 0.4e9 / 32
    # the plaintext is the inner packet with the ESP trailer, padded to the block size
    req = cipher.batches[0][0]
    assert len(req.plaintext) == padded_plaintext_len(CBC, 1400) == 1408
    assert len(req.iv) == CBC.iv_len and len(req.hdr) == 8
    assert len({r.iv for r in cipher.batches[0]}) == 8  # distinct IVs in a batch


def test_the_fastest_of_the_rounds_is_kept() -> None:
    # rounds of 0.2 s each: in round 1 one batch takes 0.3 s (disturbed), round 2 does
    # 4 batches in 0.2 s
    times = iter([0.0, 0.3, 1.0, 1.05, 1.1, 1.15, 1.2])
    m = measure_cipher(
        _Recorder(CBC), 64, engine="x", duration=0.4, batch=2, repeats=2, clock=lambda: next(times)
    )
    assert m.packets == 8 and m.seconds == pytest.approx(0.2)


def test_open_is_measured_on_what_the_cipher_sealed() -> None:
    cipher = _Recorder(GCM)
    m = measure_cipher(cipher, 64, engine="x", duration=0.0, batch=4, op="open")
    assert m.op == "open" and m.packets == 4
    assert cipher.opened and cipher.opened[0][0].sealed == cipher.batches[0][0].plaintext + bytes(
        16
    )
    assert padded_plaintext_len(GCM, 64) == 68


def test_the_software_engine_measures_every_transform_at_every_size() -> None:
    report = measure_engine(
        SoftwareEngine(), TRANSFORMS.values(), duration=0.01, ops=("seal", "open")
    )
    assert report.errors == ()
    got = {(m.transform, m.size, m.op) for m in report.measurements}
    assert got == {(t, s, op) for t in TRANSFORMS for s in SIZES for op in ("seal", "open")}
    for m in report.measurements:
        # the best of 3 rounds of 0.01/3 s each
        assert m.engine == "software" and m.packets >= 16 and m.seconds >= 0.01 / 3
        assert 0 < m.mbit_s < 1e6 and m.ns_per_packet > 0
        parts = cpu_ns_per_packet(m)
        assert parts["user"] + parts["sys"] + parts["wait"] >= parts["wall"] * 0.999
    # OpenSSL and Python run in user mode (getrusage counts in scheduler ticks: summed)
    assert sum(m.user_s for m in report.measurements) > 0
    back = Measurement.from_json(report.measurements[0].to_json())
    assert back == report.measurements[0]


class _HalfBroken:
    """Runs GCM; its CBC cipher raises on use; chacha cannot even be keyed."""

    name = "afalg:broken"
    kind = EngineKind.HARDWARE

    def __init__(self) -> None:
        self.sw = SoftwareEngine()
        self.closed: list[str] = []

    def transforms(self) -> tuple[Transform, ...]:
        return tuple(TRANSFORMS.values())

    def driver(self, transform: Transform) -> str:
        return "broken"

    def cipher(self, transform: Transform, encr_key: bytes, integ_key: bytes = b"") -> EspCipher:
        if transform.name == "chacha20poly1305":
            raise EngineError("afalg:broken: no chacha here")
        inner = self.sw.cipher(transform, encr_key, integ_key)
        if transform.name != "aes256-sha256":
            return inner
        engine = self

        class Failing(_Recorder):
            def seal_many(self, batch: Sequence[SealRequest]) -> list[bytes]:
                raise OSError(5, "Input/output error")

            def close(self) -> None:
                engine.closed.append(self.transform.name)

        return Failing(transform)


def test_a_failing_transform_is_reported_and_the_others_still_measured() -> None:
    engine = _HalfBroken()
    ts = [GCM, CBC, TRANSFORMS["chacha20poly1305"]]
    report = measure_engine(engine, ts, duration=0.0)
    assert {m.transform for m in report.measurements} == {"aes256gcm16"}
    errors = dict(report.errors)
    assert set(errors) == {"aes256-sha256", "chacha20poly1305"}
    assert "OSError" in errors["aes256-sha256"] and "afalg:broken" in errors["aes256-sha256"]
    assert "no chacha here" in errors["chacha20poly1305"]
    assert engine.closed == ["aes256-sha256"]  # the broken cipher was still closed


def test_measuring_runs_in_a_thread_while_the_loop_keeps_serving() -> None:
    threads: list[int] = []

    class Tracking(SoftwareEngine):
        def cipher(
            self, transform: Transform, encr_key: bytes, integ_key: bytes = b""
        ) -> EspCipher:  # type: ignore[override]
            threads.append(threading.get_ident())
            return super().cipher(transform, encr_key, integ_key)

    async def go() -> int:
        ticks = 0
        task = asyncio.ensure_future(measure_engine_async(Tracking(), [GCM], duration=0.1))
        while not task.done():
            ticks += 1
            await asyncio.sleep(0.01)
        report = task.result()
        assert len(report.measurements) == len(SIZES)
        return ticks

    ticks = asyncio.run(go())
    assert threads and threads[0] != threading.get_ident()
    # 3 sizes x 0.1 s: a loop blocked by the measurement would tick once; it shares the
    # GIL with the measuring thread, so on a loaded machine it ticks less than every 10 ms
    assert ticks >= 3
