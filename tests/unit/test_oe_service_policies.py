"""The OE service hands a run of policies to the datapath in one call (the start's traps
and passes: one netlink send on the kernel datapath, not one each), and a refusal in it
still costs only the refused policies, each named in the log."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from dataclasses import replace

import pytest

from oe_router.config import OeConfig
from oe_router.config.schema import PolicyConfig, parse_policy_entry
from oe_router.datapath.base import PolicyAction, PolicySpec
from oe_router.oe.service import OeService
from tests.aio import running
from tests.fake_datapath import FakeDatapath, FakeNegotiator

WAN = ipaddress.ip_address("198.51.100.1")
CLEAR = [f"203.0.113.{i}" for i in range(10)]


def _config() -> OeConfig:
    policy = PolicyConfig(
        private_or_clear=(parse_policy_entry("0.0.0.0/0"),),  # type: ignore[arg-type]
        clear=tuple(parse_policy_entry(a) for a in CLEAR),  # type: ignore[arg-type]
    )
    return replace(OeConfig(), policy=policy)


def _started(dp: FakeDatapath) -> None:
    svc = OeService(datapath_factory=lambda c: dp, negotiator=FakeNegotiator(None), wan={4: WAN})  # type: ignore[arg-type,return-value]

    async def main() -> None:
        async with running(svc, _config()):
            pass

    asyncio.run(main())


def _to(policy: PolicySpec, address: str) -> bool:
    return policy.dst.net == ipaddress.ip_network(address)


def test_the_starts_policies_reach_the_datapath_in_one_call() -> None:
    dp = FakeDatapath()
    _started(dp)
    (call,) = dp.policy_calls
    assert len(call) >= 2 * len(CLEAR) + 1
    assert list(call) == dp.policies
    for address in CLEAR:
        assert any(_to(p, address) and p.action is PolicyAction.PASS for p in call), address
    assert any(p.action is PolicyAction.TRAP for p in call)


def test_a_refused_policy_is_named_and_the_others_still_go_in(
    caplog: pytest.LogCaptureFixture,
) -> None:
    dp = FakeDatapath()
    dp.refuse = lambda policy: _to(policy, CLEAR[3])
    with caplog.at_level(logging.ERROR, logger="oe_router.oe"):
        _started(dp)
    batch, *singles = dp.policy_calls
    refused = [p for p in batch if _to(p, CLEAR[3])]
    assert refused and [(p,) for p in batch] == singles  # then each on its own
    assert dp.policies == [p for p in batch if p not in refused] * 2  # went in twice: updates
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == len(refused)
    assert all(CLEAR[3] in e for e in errors), errors
