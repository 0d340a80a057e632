"""ubus shim: on this host there is no libubus (no OpenWrt userland), so only the absent path
and the loader's failure paths run for real; a present, reachable ubusd is not testable here."""

from __future__ import annotations

import ctypes
import ctypes.util

import pytest

from oe_router.control.ubus import UbusShim


def test_ubus_reports_unavailable_on_this_host_without_libubus() -> None:
    if ctypes.util.find_library("ubus") is not None:
        pytest.fail("libubus exists on this host: extend this test to a real ubusd")
    probe = UbusShim().probe()
    assert probe.available is False
    assert probe.detail == "ubus unavailable: libubus not found"


def test_ubus_reports_a_library_that_cannot_be_loaded() -> None:
    probe = UbusShim(find_library=lambda: "/nonexistent/libubus.so").probe()
    assert probe.available is False
    assert probe.detail.startswith("ubus unavailable: cannot load /nonexistent/libubus.so")


def test_ubus_reports_a_library_without_the_ubus_symbols() -> None:
    libc = ctypes.util.find_library("c")
    assert libc is not None
    probe = UbusShim(find_library=lambda: libc).probe()
    assert probe.available is False
    assert "lacks ubus_connect" in probe.detail
