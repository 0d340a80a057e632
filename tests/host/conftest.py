"""Fixtures the host tier's tests share: the package build, the LAN/router/world
network namespaces of the LAN gateway tests, and charon started for a test."""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO / "package") not in sys.path:
    sys.path.insert(0, str(REPO / "package"))

import ipk  # noqa: E402

from tests.host.charon import Charon, available  # noqa: E402
from tests.host.netlab import LRW_PLANS, LanRouterWorld, MakeNetns, ip  # noqa: E402


@pytest.fixture(scope="session")
def oe_ipk(tmp_path_factory: pytest.TempPathFactory) -> ipk.Ipk:
    """`make package`'s .ipk of this tree (package/ipk.py; about 3 s), built once."""
    return ipk.build(tmp_path_factory.mktemp("dist"))


@pytest.fixture
def make_netns() -> Iterator[MakeNetns]:
    """``make_netns(prefix)``: a fresh network namespace ``prefix-<random>`` with its
    loopback up, deleted at teardown (after the fixtures and test that use it). The host
    tier needs root: without it the test fails, it is never skipped."""
    if os.geteuid() != 0:
        pytest.fail("the host tier needs root for network namespaces")
    made: list[str] = []

    def make(prefix: str) -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:8]}"
        ip("netns", "add", name)
        made.append(name)
        ip("-n", name, "link", "set", "lo", "up")
        return name

    try:
        yield make
    finally:
        for name in reversed(made):
            subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)


@pytest.fixture
def lan_router_world(make_netns: MakeNetns) -> LanRouterWorld:
    """``lan_router_world(prefix, family=4, peers=(), sysctls=())``: three fresh network
    namespaces L (a LAN device), R (the router, default route to W) and W (the world,
    ``peers`` on its loopback) on the address plan ``LRW_PLANS[family]``, returned as
    (L, R, W) and deleted at teardown. The LAN tests' shared topology (test_oe_lan,
    test_oe_lan6, test_nft_spd)."""

    def build(
        prefix: str, family: int = 4, peers: Sequence[str] = (), sysctls: Sequence[str] = ()
    ) -> tuple[str, str, str]:
        lan, r, w = (make_netns(f"{prefix}{role}") for role in ("l", "r", "w"))
        (dev_addr, r_lan, r_wan, w_addr), forward = LRW_PLANS[family]
        nodad = ("nodad",) if family == 6 else ()
        ip("-n", r, "link", "add", "lan0", "type", "veth", "peer", "name", "eth0", "netns", lan)
        ip("-n", r, "link", "add", "wan", "type", "veth", "peer", "name", "w0", "netns", w)
        for ns, dev, addr in ((lan, "eth0", dev_addr), (r, "lan0", r_lan), (r, "wan", r_wan),
                              (w, "w0", w_addr)):  # fmt: skip
            ip("-n", ns, "link", "set", dev, "up")
            ip("-n", ns, "addr", "add", addr, "dev", dev, *nodad)
        fam = f"-{family}"
        ip("-n", lan, fam, "route", "add", "default", "via", r_lan.split("/")[0])
        ip("-n", r, fam, "route", "add", "default", "via", w_addr.split("/")[0])
        if family == 6:
            lan_net = str(ipaddress.ip_interface(dev_addr).network)
            ip("-n", w, fam, "route", "add", lan_net, "via", r_wan.split("/")[0])
        host = 32 if family == 4 else 128
        for peer in peers:
            ip("-n", w, "addr", "add", f"{peer}/{host}", "dev", "lo", *nodad)
        for key in (forward, *sysctls):
            subprocess.run(["ip", "netns", "exec", r, "sysctl", "-qw", key], check=True)
        return lan, r, w

    return build


@pytest.fixture(scope="session")
def need_charon() -> None:
    """Fail (never skip) a module that talks to charon where it cannot run; modules ask
    for it with ``pytest.mark.usefixtures("need_charon")``."""
    why = available()
    if why is not None:
        pytest.fail(f"charon interop cannot run (make setup installs it): {why}")


StartCharon = Callable[..., Charon]


@pytest.fixture
def charon(tmp_path: Path, need_charon: None) -> Iterator[StartCharon]:
    """``charon(ns, conns, **files)``: a charon started in namespace ``ns`` with the swanctl
    ``conns`` (its files under tmp_path; ``files`` as ``Charon`` takes them), stopped at
    teardown however the test ended (a test may stop or kill it first)."""
    started: list[Charon] = []

    def start(ns: str, conns: str, **kw: Any) -> Charon:
        work = tmp_path / ("charon" if not started else f"charon{len(started)}")
        ch = Charon(ns, work, conns, **kw)
        started.append(ch)
        ch.start()
        return ch

    try:
        yield start
    finally:
        for ch in reversed(started):
            ch.stop()
