"""Fixtures shared by the unit tests (helper code lives in modules under tests/)."""

from __future__ import annotations

import ipaddress

import pytest

from oe_router.config.schema import PolicyConfig, parse_policy_entry
from oe_router.oe.manager import OeManager
from oe_router.oe.policy import PolicyTable
from tests.dnssec_world import PrivKey, World, make_keys, make_world


@pytest.fixture(scope="module")
def zone_keys() -> dict[str, PrivKey]:
    """The signed test zones' keys, generated once per module (RSA generation is slow)."""
    return make_keys()


@pytest.fixture(scope="module")
def base_world(zone_keys: dict[str, PrivKey]) -> World:
    """The signed zones of ``tests.dnssec_world.make_world``, unchanged (do not mutate)."""
    return make_world(zone_keys)


def _oe_policy() -> PolicyConfig:
    def es(*t: str) -> tuple[object, ...]:
        return tuple(parse_policy_entry(x) for x in t)

    return PolicyConfig(
        private=es("203.0.113.0/24"),  # type: ignore[arg-type]
        private_or_clear=es("0.0.0.0/0"),  # type: ignore[arg-type]
        clear_or_private=es("192.0.2.64/26"),  # type: ignore[arg-type]
        clear=es("192.0.2.9/32"),  # type: ignore[arg-type]
        block=es("198.18.0.0/15"),  # type: ignore[arg-type]
    )


@pytest.fixture
def mgr() -> OeManager:
    """The OE manager the manager tests share: one group per kind (private 203.0.113.0/24,
    private-or-clear everything else, clear-or-private 192.0.2.64/26, clear 192.0.2.9,
    block 198.18.0.0/15), WAN 198.51.100.1, trap reqid 0x4F45FFFF. A module may define
    its own ``mgr``."""
    table = PolicyTable.from_config(_oe_policy(), link_exclusions=())
    wan = ipaddress.IPv4Address("198.51.100.1")
    return OeManager(table, {4: wan}, trap_reqid=0x4F45FFFF, shunt_lifetime=900)
