"""OffloadService: start without waiting, engines joining as proven and measured, the canary,
datapath failure reports, hotplug, reload, the control commands; with engines made from the
software engine (renamed, slowed, corrupted) and a recorded /proc/crypto."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from oe_router.config import OeConfig
from oe_router.config.schema import DEFAULT_ESP_PROPOSALS, IkeConfig
from oe_router.control import CommandTable
from oe_router.offload.chooser import Band, ChoiceTable
from oe_router.offload.engine import (
    TRANSFORMS,
    AuthenticationFailed,
    Engine,
    EngineError,
    EngineKind,
    EspCipher,
    OpenRequest,
    SealRequest,
    Transform,
)
from oe_router.offload.faults import FaultyEngine
from oe_router.offload.probe import HostSnapshot
from oe_router.offload.service import OffloadService, OffloadUpdate
from oe_router.offload.software import SoftwareEngine

HW = "afalg:virtio_crypto_aes_cbc"
#: AES-CBC with HMAC-SHA2-256/384/512: what virtio's cbc(aes) serves through authenc
CBC = tuple(n for n, t in TRANSFORMS.items() if t.hmac_hash is not None)
VIRTIO = (
    "name         : cbc(aes)\ndriver       : virtio_crypto_aes_cbc\nmodule       : virtio_crypto\n"
    "priority     : 150\nrefcnt       : 1\nselftest     : passed\ninternal     : no\n"
    "type         : skcipher\n\n"
)
AESNI = (
    "name         : cbc(aes)\ndriver       : cbc-aes-aesni\nmodule       : aesni_intel\n"
    "priority     : 400\nrefcnt       : 1\nselftest     : passed\ninternal     : no\n"
    "type         : skcipher\n\n"
)


def run(coro: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(coro())


# --- a known-answer test: the engine against an independent reference -----------------


@dataclass
class Kat:
    engine: str
    transform: str
    passed: bool
    failures: list[str] = field(default_factory=list)


def kat(engine: Engine, t: Transform, *, quick: bool = False) -> Kat:
    """Seal a fixed packet and compare with a fresh software engine's; open it back; a
    flipped ICV must be refused. The quick form checks one packet, the full one three."""
    ref = SoftwareEngine()
    ek, ik = bytes(range(t.encr_key_len)), bytes(range(100, 100 + t.auth_key_len))
    mine, theirs = engine.cipher(t, ek, ik), ref.cipher(t, ek, ik)
    failures = []
    for i in range(1 if quick else 3):
        hdr, iv = b"\x00\x00\x01\x00" + i.to_bytes(4, "big"), bytes([i]) * t.iv_len
        pt = bytes(range(32)) * (i + 1)
        got = mine.seal(hdr, None, iv, pt)
        if got != theirs.seal(hdr, None, iv, pt):
            failures.append(f"case {i}: ciphertext differs")
            continue
        if mine.open(hdr, None, iv, got) != pt:
            failures.append(f"case {i}: open differs")
        try:
            mine.open(hdr, None, iv, got[:-1] + bytes([got[-1] ^ 1]))
            failures.append(f"case {i}: forged ICV accepted")
        except AuthenticationFailed:
            pass
    return Kat(engine.name, t.name, not failures, failures)


# --- engines ---------------------------------------------------------------------------


class _SlowCipher:
    def __init__(self, inner: EspCipher, delay: float) -> None:
        self._inner, self._delay = inner, delay
        self.transform = inner.transform

    def seal(self, hdr: bytes, seq_hi: int | None, iv: bytes, plaintext: bytes) -> bytes:
        time.sleep(self._delay)
        return self._inner.seal(hdr, seq_hi, iv, plaintext)

    def open(self, hdr: bytes, seq_hi: int | None, iv: bytes, sealed: bytes) -> bytes:
        return self._inner.open(hdr, seq_hi, iv, sealed)

    def seal_many(self, batch: Sequence[SealRequest]) -> list[bytes]:
        time.sleep(self._delay * len(batch))
        return self._inner.seal_many(batch)

    def open_many(self, batch: Sequence[OpenRequest]) -> list[bytes | None]:
        return self._inner.open_many(batch)

    def close(self) -> None:
        self._inner.close()


class Named:
    """The software engine under another name, kind and transform list, optionally slow."""

    def __init__(
        self,
        name: str,
        kind: EngineKind = EngineKind.CPU,
        transforms: Sequence[str] = tuple(TRANSFORMS),
        delay: float = 0.0,
    ) -> None:
        self.name, self.kind, self._names, self.delay = name, kind, transforms, delay
        self._sw = SoftwareEngine()

    def transforms(self) -> tuple[Transform, ...]:
        return tuple(TRANSFORMS[n] for n in self._names)

    def driver(self, transform: Transform) -> str:
        return self.name.partition(":")[2] or "cbc-aes-aesni"

    def why_not(self, transform: Transform) -> str:
        return "" if transform.name in self._names else f"{self.name}: ENOENT for {transform.aead}"

    def cipher(self, transform: Transform, encr_key: bytes, integ_key: bytes = b"") -> EspCipher:
        if transform.name not in self._names:
            raise EngineError(f"{self.name}: no {transform.name}")
        inner = self._sw.cipher(transform, encr_key, integ_key)
        return _SlowCipher(inner, self.delay) if self.delay else inner


class Lab:
    """A machine: /proc/crypto text, AF_ALG, and the engines make_engine would build."""

    def __init__(self, proc: str = AESNI + VIRTIO, afalg: bool = True) -> None:
        self.proc, self.afalg = proc, afalg
        self.engines: dict[str, Engine] = {
            "software": Named("software", delay=0.0002),  # a slow CPU: 200 us a packet
            "afalg": Named("afalg"),
            HW: Named(HW, EngineKind.HARDWARE, CBC),
        }
        self.made: list[str] = []
        self.gate: threading.Event | None = None

    def snapshot(self) -> HostSnapshot:
        if self.gate is not None:
            self.gate.wait(10)
        return HostSnapshot(self.proc, self.afalg, False)

    def factory(self, name: str) -> Engine:
        self.made.append(name)
        engine = self.engines.get(name)
        if engine is None:
            raise EngineError(f"no engine {name}")
        return engine


def _service(lab: Lab, **kw: Any) -> OffloadService:
    base: dict[str, Any] = {
        "canary_interval": 0,
        "measure_duration": 0.02,
        "watch": False,
        "engine_factory": lab.factory,
        "snapshot": lab.snapshot,
        "kat": kat,
    }
    base.update(kw)
    return OffloadService(**base)


async def _until(cond: Callable[[], bool], timeout: float = 20.0) -> float:
    start = time.monotonic()
    while not cond():
        if time.monotonic() - start > timeout:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)
    return time.monotonic() - start


def _ready(svc: OffloadService) -> Callable[[], bool]:
    return lambda: svc.report()["phase"] == "ready"


# --- tests -----------------------------------------------------------------------------


def test_start_publishes_software_at_once_and_does_not_wait_for_probing() -> None:
    async def go() -> None:
        lab = Lab()
        lab.gate = threading.Event()  # probing blocks until the test opens the gate
        svc = _service(lab)
        updates: list[OffloadUpdate] = []
        svc.subscribe(updates.append)
        t0 = time.monotonic()
        await svc.start(OeConfig())
        assert time.monotonic() - t0 < 2.0
        assert lab.made == ["software"]
        assert len(updates) == 1
        table = updates[0].table
        assert all(c.bands == (Band("software"),) for c in table.choices)
        assert updates[0].proposal == DEFAULT_ESP_PROPOSALS  # not measured: configured order
        assert svc.report()["phase"] == "probing"
        lab.gate.set()
        await _until(_ready(svc))
        await svc.stop()

    run(go)


def test_engines_join_when_proven_and_measured_and_win_where_faster() -> None:
    async def go() -> None:
        lab = Lab()
        svc = _service(lab)
        updates: list[OffloadUpdate] = []
        await svc.start(OeConfig())
        svc.subscribe(updates.append)  # gets the current update at once
        await _until(_ready(svc))
        await svc.stop()
        assert sorted(lab.made) == sorted(["software", "afalg", HW])
        table = svc.table
        # the slowed software engine loses everywhere: virtio-named for CBC, afalg for AEADs
        for t in CBC:
            assert table.engine_for(t, 64) in ("afalg", HW)
            assert table.engine_for(t, 1400) in ("afalg", HW)
        assert table.engine_for("aes256gcm16", 1400) == "afalg"
        assert len(updates) >= 2 and updates[-1].table == table
        # the status rows: one per engine, with per-transform detail
        rows = {e.name: e for e in svc.status().engines}
        assert set(rows) == {"software", "afalg", HW}
        hw = rows[HW]
        assert hw.hardware and hw.kind == "hardware" and hw.driver == "virtio_crypto_aes_cbc"
        assert [t.transform for t in hw.transforms] == list(CBC)
        assert all(t.kat == "passed" and len(t.rates) == 3 for t in hw.transforms)
        assert [r.size for r in hw.transforms[0].rates] == [64, 512, 1400]
        sw = rows["software"]
        assert sw.proven and not sw.selected and sw.in_use_for == ()
        assert 0 < sw.transforms[0].rates[-1].mbit_s < rows["afalg"].transforms[0].rates[-1].mbit_s
        assert rows["afalg"].selected and rows["afalg"].mbit_s is not None
        # everything the CLI reads is plain JSON
        doc = json.loads(json.dumps(svc.report()))
        assert ChoiceTable.from_json(doc["table"]) == table
        assert doc["kernel_checked"] is True and set(doc["kernel_usable"]) == set(TRANSFORMS)

    run(go)


def test_slower_hardware_is_measured_and_left_to_the_cpu() -> None:
    """As under TCG: virtio-crypto slower than the CPU at every size."""

    async def go() -> None:
        lab = Lab()
        lab.engines["software"] = Named("software")
        lab.engines["afalg"] = Named("afalg", delay=0.0002)
        lab.engines[HW] = Named(HW, EngineKind.HARDWARE, CBC, delay=0.0002)
        svc = _service(lab)
        await svc.start(OeConfig())
        await _until(_ready(svc))
        await svc.stop()
        assert all(c.bands == (Band("software"),) for c in svc.table.choices)
        rows = {e.name: e for e in svc.status().engines}
        hw = rows[HW]
        assert hw.proven and not hw.selected and hw.in_use_for == ()
        sw = {t.transform: t for t in rows["software"].transforms}
        for t in hw.transforms:  # measured, and slower at every size
            cpu = {r.size: r.mbit_s for r in sw[t.transform].rates}
            assert [r.size for r in t.rates] == [64, 512, 1400]
            assert all(r.mbit_s < cpu[r.size] for r in t.rates)
        assert rows["software"].in_use_for == tuple(f"{t}@all" for t in TRANSFORMS)

    run(go)


def test_a_failing_engine_is_marked_and_never_used_and_the_daemon_goes_on() -> None:
    async def go() -> None:
        lab = Lab()
        lab.engines[HW] = FaultyEngine(Named(HW, EngineKind.HARDWARE, CBC), corrupt_after=0)
        del lab.engines["afalg"]  # make_engine raises for it
        svc = _service(lab)
        await svc.start(OeConfig(offload=HW))
        await _until(_ready(svc))
        await svc.stop()
        rows = {e.name: e for e in svc.status().engines}
        assert rows["afalg"].state == "failed" and "no engine afalg" in rows["afalg"].reason
        hw = rows[HW]
        assert not hw.proven and {t.kat for t in hw.transforms} == {"failed"}
        assert "ciphertext differs" in hw.transforms[0].reason
        # offload names the failed engine: software runs its transforms, and says why
        assert all(c.bands == (Band("software"),) for c in svc.table.choices)
        assert any(HW in n and "software runs" in n for n in svc.table.notes)
        assert svc.update is not None and "aes256-sha256" in svc.update.proposal

    run(go)


def test_the_canary_catches_a_corrupting_engine_within_its_interval() -> None:
    async def go() -> None:
        lab = Lab()
        faulty = FaultyEngine(Named(HW, EngineKind.HARDWARE, CBC), corrupt_after=10**9)
        lab.engines[HW] = faulty
        svc = _service(lab, canary_interval=0.2)
        updates: list[OffloadUpdate] = []
        svc.subscribe(updates.append)
        await svc.start(OeConfig(offload=HW))
        await _until(_ready(svc))
        assert svc.table.engine_for("aes256-sha256", 1400) == HW
        seen = len(updates)
        faulty.corrupt_after = faulty.seals  # from now on every seal is corrupt
        took = await _until(lambda: svc.table.engine_for("aes256-sha256", 1400) != HW, 5.0)

        def all_failed() -> bool:
            hw = next(e for e in svc.status().engines if e.name == HW)
            return all(t.kat == "failed" for t in hw.transforms)

        # one round checks each transform in turn (six CBC ones): let it finish
        await _until(all_failed, 5.0)
        await svc.stop()
        assert took <= 0.2 + 1.0
        assert svc.table.engine_for("aes256-sha256", 1400) == "software"
        assert svc.table.engine_for("aes128-sha256", 64) == "software"
        assert len(updates) > seen and updates[-1].table.engine_for("aes256-sha256", 9) == (
            "software"
        )
        hw = next(e for e in svc.status().engines if e.name == HW)
        assert all(t.kat == "failed" and t.reason.startswith("canary:") for t in hw.transforms)
        assert any("canary" in ev for ev in svc.report()["events"])

    run(go)


def test_a_datapath_report_takes_the_engine_off_at_once() -> None:
    async def go() -> None:
        lab = Lab()
        svc = _service(lab)
        await svc.start(OeConfig())
        await _until(_ready(svc))
        got: list[OffloadUpdate] = []
        svc.subscribe(got.append)
        assert svc.table.engine_for("aes256gcm16", 1400) == "afalg"
        svc.report_failure("afalg", "aes256gcm16", "worker 1: 3 packets failed the self-check")
        assert svc.table.engine_for("aes256gcm16", 1400) != "afalg"
        assert got[-1].table == svc.table  # published synchronously
        assert "aes256gcm16" not in got[-1].kernel_usable
        assert ("aes256gcm16", "cbc-aes-aesni") in got[-1].kernel_failed
        assert "aes256gcm16" not in got[-1].kernel_proposal
        svc.report_failure("nonesuch", "aes256gcm16", "x")  # logged, nothing else
        await svc.stop()

    run(go)


def test_hotplug_removes_a_vanished_engine_at_once_and_proves_a_new_one() -> None:
    async def go() -> None:
        lab = Lab(proc=AESNI)  # no virtio yet
        svc = _service(lab, watch=True, use_udev=False, rescan_interval=0.05)
        await svc.start(OeConfig(offload=HW.partition(":")[2]))  # the bare driver name
        await _until(_ready(svc))
        assert {e.name for e in svc.status().engines} == {"software", "afalg"}
        assert any("no such engine" in n for n in svc.table.notes)
        lab.proc = AESNI + VIRTIO  # modprobe virtio_crypto
        await _until(lambda: svc.table.engine_for("aes256-sha256", 1400) == HW)
        assert svc.table.notes == ()
        lab.proc = AESNI  # rmmod
        took = await _until(lambda: HW not in {e.name for e in svc.status().engines}, 5.0)
        assert took < 1.0
        assert svc.table.engine_for("aes256-sha256", 1400) == "software"
        assert lab.made.count(HW) == 1
        await svc.stop()

    run(go)


def test_reload_recomputes_the_choice_and_the_proposals() -> None:
    async def go() -> None:
        lab = Lab()
        svc = _service(lab)
        await svc.start(OeConfig())
        await _until(_ready(svc))
        auto = svc.update
        assert auto is not None and auto.table.engine_for("aes256gcm16", 1400) == "afalg"
        await svc.reload(OeConfig(offload="off"))
        assert all(c.bands == (Band("software"),) for c in svc.table.choices)
        explicit = ("aes128-sha256", "aes256-sha512", "aes256gcm16")
        await svc.reload(OeConfig(ike=IkeConfig(esp_proposals=explicit)))
        assert svc.update is not None
        # an explicit list wins: its order (the software engine runs every transform;
        # test_offload_chooser drops what no engine runs)
        assert svc.update.proposal == explicit
        assert svc.update.kernel_proposal == explicit
        await svc.stop()

    run(go)


def test_canary_interval_comes_from_the_config_unless_given() -> None:
    async def go() -> None:
        lab = Lab()
        svc = _service(lab, canary_interval=None)
        await svc.start(OeConfig(offload_canary=0.1))
        assert svc.canary_interval == 0.1
        await svc.reload(OeConfig(offload_canary=0.0))
        assert svc.canary_interval == 0.0
        await svc.stop()

    run(go)


def test_control_commands_report_and_bench() -> None:
    async def go() -> None:
        lab = Lab()
        svc = _service(lab)
        table = CommandTable()
        svc.register_commands(table)
        await svc.start(OeConfig())
        await _until(_ready(svc))
        reply = await table.dispatch(b'{"cmd": "offload"}\n')
        assert reply["ok"] is True
        doc = reply["offload"]
        assert doc["offload"] == "auto" and doc["phase"] == "ready"
        assert {e["name"] for e in doc["engines"]} == {"software", "afalg", HW}
        before = {
            (e["name"], t["transform"]): t["rates"] for e in doc["engines"] for t in e["transforms"]
        }
        lab.engines["afalg"].delay = 0.001  # type: ignore[attr-defined]  # now it is slow
        reply = await table.dispatch(b'{"cmd": "offload-bench"}\n')
        assert reply["ok"] is True
        after = {
            (e["name"], t["transform"]): t["rates"]
            for e in reply["offload"]["engines"]
            for t in e["transforms"]
        }
        assert set(after) == set(before) and after != before
        assert svc.table.engine_for("aes256gcm16", 1400) == "software"
        assert any("bench" in ev for ev in reply["offload"]["events"])
        await svc.stop()

    run(go)


def test_a_subscriber_that_raises_does_not_stop_the_others() -> None:
    async def go() -> None:
        lab = Lab()
        svc = _service(lab)

        def bad(update: OffloadUpdate) -> None:
            raise RuntimeError("boom")

        good: list[OffloadUpdate] = []
        svc.subscribe(bad)
        unsubscribe = svc.subscribe(good.append)
        await svc.start(OeConfig())
        assert len(good) == 1
        unsubscribe()
        await _until(_ready(svc))
        assert len(good) == 1
        await svc.stop()

    run(go)


def test_a_transform_the_engine_does_not_run_shows_with_its_reason() -> None:
    async def go() -> None:
        lab = Lab()
        lab.engines[HW] = Named(HW, EngineKind.HARDWARE, ("aes256-sha256",))
        svc = _service(lab)
        await svc.start(OeConfig())
        await _until(_ready(svc))
        await svc.stop()
        hw = next(e for e in svc.status().engines if e.name == HW)
        rows = {t.transform: t for t in hw.transforms}
        assert rows["aes256-sha256"].kat == "passed"
        assert rows["aes128-sha256"].kat == "unsupported"
        assert rows["aes128-sha256"].reason == (f"{HW}: ENOENT for authenc(hmac(sha256),cbc(aes))")

    run(go)


def test_the_canary_with_the_real_known_answer_tests_catches_a_faulty_engine(
    tmp_path: Path,
) -> None:
    """offload.kat's vectors (the service's default), the fault switched on by a file."""

    async def go() -> None:
        flag = tmp_path / "oe-fault"
        lab = Lab()
        lab.engines[HW] = FaultyEngine(Named(HW, EngineKind.HARDWARE, CBC), corrupt_when=str(flag))
        svc = _service(lab, kat=None, canary_interval=0.3)
        await svc.start(OeConfig(offload="virtio_crypto_aes_cbc"))
        await _until(_ready(svc))
        assert svc.table.engine_for("aes128-sha256", 100) == HW
        hw = next(e for e in svc.status().engines if e.name == HW)
        assert {t.kat for t in hw.transforms} == {"passed"}
        flag.touch()
        took = await _until(lambda: svc.table.engine_for("aes128-sha256", 100) != HW, 5.0)
        await svc.stop()
        assert took <= 0.3 + 1.0
        assert svc.table.engine_for("aes128-sha256", 100) == "software"
        hw = next(e for e in svc.status().engines if e.name == HW)
        reasons = [t.reason for t in hw.transforms if t.kat == "failed"]
        assert reasons and all(r.startswith("canary: known-answer test failed: ") for r in reasons)

    run(go)
