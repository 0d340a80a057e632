"""Fixtures shared by the unit tests (helper code lives in modules under tests/)."""

from __future__ import annotations

import pytest

from tests.dnssec_world import PrivKey, World, make_keys, make_world


@pytest.fixture(scope="module")
def zone_keys() -> dict[str, PrivKey]:
    """The signed test zones' keys, generated once per module (RSA generation is slow)."""
    return make_keys()


@pytest.fixture(scope="module")
def base_world(zone_keys: dict[str, PrivKey]) -> World:
    """The signed zones of ``tests.dnssec_world.make_world``, unchanged (do not mutate)."""
    return make_world(zone_keys)
