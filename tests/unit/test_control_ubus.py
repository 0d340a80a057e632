"""The ubus shim's refusals, without ubusd: no library, a library that does not load, a
library that is not a libubus this shim knows. Each is one log line and the shim stays
off (the daemon runs on). The shim against the real libubus and ubusd:
tests/host/test_ubus_shim.py."""

from __future__ import annotations

import asyncio
import ctypes.util
import logging
from pathlib import Path

import pytest

from oe_router.control.ubus import LIBRARY_CANDIDATES, UbusShim


def _start(shim: UbusShim) -> None:
    async def body() -> None:
        await shim.start()
        await asyncio.sleep(0)
        assert not shim.connected
        await shim.stop()

    asyncio.run(body())


def test_no_library_is_one_line_and_the_shim_stays_off(caplog: pytest.LogCaptureFixture) -> None:
    shim = UbusShim(candidates=lambda: ["/nonexistent/libubus.so", "/nonexistent/x.so.*"])
    with caplog.at_level(logging.INFO, logger="oe_router.control"):
        _start(shim)
    assert [r.getMessage() for r in caplog.records] == [
        "ubus off: libubus not found (looked for /nonexistent/libubus.so, "
        "/nonexistent/x.so.*); the control socket is the API"
    ]
    assert shim.probe().available is False


def test_a_file_that_does_not_load_says_why(tmp_path: Path) -> None:
    bad = tmp_path / "libubus.so.20250102"
    bad.write_text("not an ELF file")
    probe = UbusShim(candidates=lambda: [str(tmp_path / "libubus.so.*")]).probe()
    assert probe.available is False
    assert probe.detail.startswith(f"ubus unavailable: cannot load {bad}")


def test_a_library_without_the_ubus_functions_is_refused_by_name(
    caplog: pytest.LogCaptureFixture,
) -> None:
    libc = ctypes.util.find_library("c")
    assert libc is not None
    shim = UbusShim(candidates=lambda: [libc])
    assert "lacks ubus_connect, ubus_free, ubus_add_object" in shim.probe().detail
    with caplog.at_level(logging.INFO, logger="oe_router.control"):
        _start(shim)
    (line,) = [r.getMessage() for r in caplog.records]
    assert line.startswith(f"ubus off: {libc} is not a libubus this shim knows: it lacks")


def test_openwrt_names_are_looked_for() -> None:
    assert LIBRARY_CANDIDATES[0] == "libubus.so" and "/usr/lib/libubus.so.*" in LIBRARY_CANDIDATES
