"""OffloadService on the kernel datapath: the canary checks the kernel's own pick (afalg).

Why: kernel ESP runs on the kernel's pick of each algorithm, never on the chooser's table
(on the kernel datapath only ``afalg`` is measured, so the table stays on software). Without
``canary_engines`` a kernel driver that starts corrupting after it was proven would never
be tested again; with it, the canary's failure reaches ``kernel_failed`` and the ESP offer.
The engines are the software engine under the name ``afalg``, one of them corrupting on
demand (``FaultyEngine``); the machine is a recorded /proc/crypto line.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from oe_router.config import OeConfig
from oe_router.offload.engine import Engine, EngineKind, EspCipher, Transform
from oe_router.offload.faults import FaultyEngine
from oe_router.offload.probe import HostSnapshot
from oe_router.offload.service import OffloadService
from oe_router.offload.software import SoftwareEngine
from tests.aio import running

PROC = (
    "name         : rfc4106(gcm(aes))\ndriver       : rfc4106-gcm-aesni\n"
    "module       : aesni_intel\n"
    "priority     : 400\nrefcnt       : 1\nselftest     : passed\ninternal     : no\n"
    "type         : aead\n\n"
)
GCM = ("aes128gcm16", "aes256gcm16")


class Afalg:
    """The software engine answering as the kernel's pick."""

    def __init__(self) -> None:
        self._inner = SoftwareEngine()

    @property
    def name(self) -> str:
        return "afalg"

    @property
    def kind(self) -> EngineKind:
        return EngineKind.CPU

    def transforms(self) -> tuple[Transform, ...]:
        return tuple(self._inner.transforms())

    def driver(self, transform: Transform) -> str:
        return "rfc4106-gcm-aesni" if transform.name in GCM else "generic"

    def cipher(self, transform: Transform, encr_key: bytes, integ_key: bytes = b"") -> EspCipher:
        return self._inner.cipher(transform, encr_key, integ_key)


def _service(flag: Path, **kw: Any) -> OffloadService:
    engines: dict[str, Engine] = {
        "software": SoftwareEngine(),
        "afalg": FaultyEngine(Afalg(), corrupt_when=str(flag)),  # type: ignore[arg-type]
    }
    return OffloadService(
        canary_interval=0.2,
        measure_duration=0.02,
        watch=False,
        engine_factory=engines.__getitem__,
        snapshot=lambda: HostSnapshot(PROC, True, False),
        measure_only=("afalg",),
        **kw,
    )


async def _until(cond: Callable[[], bool], timeout: float = 30.0) -> float:
    start = time.monotonic()
    while not cond():
        if time.monotonic() - start > timeout:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)
    return time.monotonic() - start


def _breaks(flag: Path, **kw: Any) -> tuple[set[str], list[tuple[str, str]], dict[str, Any]]:
    async def go() -> tuple[set[str], list[tuple[str, str]], dict[str, Any]]:
        svc = _service(flag, **kw)
        svc.report_extras.append(lambda: {"kernel_selftest": {"offer": ["x"]}})
        async with running(svc, OeConfig()):
            await _until(lambda: svc.report()["phase"] == "ready")
            up = svc.update
            assert up is not None and up.kernel_checked and set(GCM) <= up.kernel_usable
            # the table never chooses afalg here: software runs it (nothing measured it)
            assert set(svc.table.engines_in_use()) == {"software"}
            svc.rescan()  # no watcher (watch=False): nothing to nudge, and no error
            flag.touch()  # from now on afalg corrupts what it seals
            with_canary = bool(kw.get("canary_engines"))
            try:
                await _until(lambda: not set(GCM) & svc.update.kernel_usable, 3.0)  # type: ignore[union-attr]
            except AssertionError:
                assert not with_canary
            up = svc.update
            assert up is not None
            return set(up.kernel_usable), list(up.kernel_failed), svc.report()

    return asyncio.run(go())


def test_the_kernel_pick_is_canaried_when_asked(tmp_path: Path) -> None:
    usable, failed, report = _breaks(tmp_path / "fault", canary_engines=("afalg",))
    assert not set(GCM) & usable
    assert {t for t, _ in failed} >= set(GCM)
    assert dict(failed)["aes256gcm16"] == "rfc4106-gcm-aesni"
    afalg = next(e for e in report["engines"] if e["name"] == "afalg")
    rows = {t["transform"]: t for t in afalg["transforms"]}
    assert rows["aes256gcm16"]["kat"] == "failed"
    assert rows["aes256gcm16"]["reason"].startswith("canary:")
    assert report["kernel_selftest"] == {"offer": ["x"]}  # report_extras: a section of its own


def test_without_it_the_kernel_pick_is_never_tested_again(tmp_path: Path) -> None:
    usable, failed, _ = _breaks(tmp_path / "fault")
    assert set(GCM) <= usable and failed == []
