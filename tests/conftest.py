"""Shared pytest configuration for all tiers."""

import time
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, settings

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
