"""The OE service takes its timers from the config, at start and at reload (real kernel).

Why: ``oe.ike.idle_timeout`` decides whether a Child SA is rekeyed or dropped at its soft
expiry, and the counter poll period follows from it; both must follow a reload (``oe
reload`` / SIGHUP) without a restart. The service runs on the real XFRM datapath in a
fresh network namespace (no SAs are needed: the host kernel has no ESP).
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import replace

import pytest

from oe_router.config import parse_config
from oe_router.oe.service import OeService, kernel_datapath
from tests.host.test_oe_service import ProbeNegotiator

pytestmark = pytest.mark.host

WAN = ipaddress.IPv4Address("198.51.100.1")


@pytest.fixture
def netns() -> Iterator[str]:
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
    name = f"oe-cfg-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=True)


def test_idle_timeout_and_poll_period_follow_start_and_reload(netns: str) -> None:
    base = parse_config("config ike 'ike'\n\toption idle_timeout '10s'\n")

    async def body() -> None:
        svc = OeService(
            datapath_factory=kernel_datapath(netns), negotiator=ProbeNegotiator(netns), wan={4: WAN}
        )
        await svc.start(base)
        try:
            assert svc.manager.idle_timeout == 10.0
            assert svc.poll_period == 2.5  # a quarter: activity known to within 2.5 s
            await svc.reload(replace(base, ike=replace(base.ike, idle_timeout=2.0)))
            assert svc.manager.idle_timeout == 2.0
            assert svc.poll_period == 1.0  # floor: never more than one read a second
            await svc.reload(replace(base, ike=replace(base.ike, idle_timeout=3600.0)))
            assert svc.manager.idle_timeout == 3600.0
            assert svc.poll_period == 60.0  # ceiling: a long timeout still polls each minute
        finally:
            await svc.stop()

    asyncio.run(body())


def test_default_idle_timeout_is_five_minutes(netns: str) -> None:
    async def body() -> None:
        svc = OeService(
            datapath_factory=kernel_datapath(netns), negotiator=ProbeNegotiator(netns), wan={4: WAN}
        )
        await svc.start(parse_config(""))
        try:
            assert svc.manager.idle_timeout == 300.0
            assert svc.poll_period == 60.0
        finally:
            await svc.stop()

    asyncio.run(body())
