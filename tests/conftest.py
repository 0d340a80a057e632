"""Shared pytest configuration for all tiers."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from hypothesis import HealthCheck, settings

if TYPE_CHECKING:
    from userland import UserlandBuild

QEMU_DIR = Path(__file__).resolve().parents[1] / "qemu"

# Property tests judge correctness, not speed: on a shared 2-core CI machine a slow example
# must not fail a run (hypothesis' default 200 ms deadline did, intermittently).
settings.register_profile(
    "oe", deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)
settings.load_profile("oe")


Poll = Callable[..., bool]


def _poll(condition: Callable[[], bool], timeout: float = 30.0, step: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(step)
    return True


@pytest.fixture
def poll() -> Poll:
    """``poll(condition, timeout=30)``: True once ``condition()`` holds, False at the
    deadline. For waiting on another thread or process without a fixed sleep."""
    return _poll


@pytest.fixture(scope="session")
def openwrt_userland() -> UserlandBuild:
    """OpenWrt's userland built from source by qemu/userland.py (cached; about 40 s the
    first time). A build that cannot happen fails the test, with the builder's reason (the
    sources it could not find or fetch, or the step that broke and its log): the tests that
    use it hold the project to the real thing, so they must not pass silently without it."""
    if str(QEMU_DIR) not in sys.path:
        sys.path.insert(0, str(QEMU_DIR))
    import userland
    from build import BuildError

    try:
        return userland.build()
    except BuildError as exc:
        pytest.fail(f"OpenWrt userland: {exc}", pytrace=False)
