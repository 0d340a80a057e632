"""The real oe-routerd (in a netns) shows its policy count in `oe status` and it follows a
reload; a reload with more policy destinations than ``policy_limit`` is refused naming the
count and the limit, and the datapath keeps the policies it had.

    router 198.18.0.1 (oe-routerd) -- veth -- 198.18.0.2 (nothing)

This host's kernel has no ESP, so the daemon runs the userspace datapath, whose count is
its SPD (projected into nftables); that the kernel datapath's count is the kernel's own
(``ip xfrm policy count``) is test_xfrm_kernel.py::test_stats_count_the_policies_the_kernel_holds.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from .charon import Netns
from .oe_daemon import OeDaemon, bare_config, device_with

pytestmark = pytest.mark.host

ROUTER, OTHER = "198.18.0.1", "198.18.0.2"


def _config(wan: str, work: Path, n: int, limit: int | None = None) -> str:
    """A private-or-clear default and ``n`` clear /32s (3 policies each)."""
    dests = "".join(f"\tlist dest '203.0.113.{i}'\n" for i in range(n))
    policy = (
        "\nconfig policy\n\toption group 'private-or-clear'\n\tlist dest '0.0.0.0/0'\n"
        f"\nconfig policy\n\toption group 'clear'\n{dests}"
    )
    text = bare_config(wan, work / "no-anchor", datapath="userspace", extra=policy)
    if limit is None:
        return text
    return text.replace(
        "\toption offload 'off'\n", f"\toption offload 'off'\n\toption policy_limit '{limit}'\n"
    )


@pytest.fixture(scope="module")
def router(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[OeDaemon, str, Path]]:
    work = tmp_path_factory.mktemp("plimit")
    net = Netns("pl")
    daemon: OeDaemon | None = None
    try:
        r, o = net.add("r"), net.add("o")
        net.link(r, f"{ROUTER}/24", o, f"{OTHER}/24")
        wan = device_with(r, ROUTER)
        daemon = OeDaemon(r, work / "r", _config(wan, work, 4))
        daemon.start()
        yield daemon, wan, work
    finally:
        if daemon is not None:
            daemon.stop()
        net.close()


def test_status_shows_the_kernel_policy_count_and_follows_a_reload(
    router: tuple[OeDaemon, str, Path],
) -> None:
    daemon, wan, work = router
    doc = daemon.status()["daemon"]
    assert doc["datapath"].startswith("userspace-esp")
    first = doc["datapath_stats"]["policies"]
    assert first > 12  # 4 clear x 3, a trap, the exclusions
    line = daemon.oe("status").stdout.splitlines()[2]
    assert line.startswith("datapath  userspace-esp") and line.endswith(f"; {first} policies")

    assert daemon.reconfigure(_config(wan, work, 14)).returncode == 0
    daemon.wait_for(
        "10 more clear destinations installed",
        lambda: daemon.status()["daemon"]["datapath_stats"]["policies"] == first + 30,
    )


def test_a_reload_over_the_policy_limit_is_refused_naming_count_and_limit(
    router: tuple[OeDaemon, str, Path],
) -> None:
    daemon, wan, work = router
    before = daemon.status()["daemon"]["datapath_stats"]["policies"]
    generation = daemon.status()["daemon"]["config_generation"]
    refused = daemon.reconfigure(_config(wan, work, 40, limit=20))
    assert refused.returncode == 1, refused.stdout + refused.stderr
    problem = next(line for line in refused.stdout.splitlines() if "policy_limit" in line)
    assert ".dest: '203.0.113.19/32' is policy destination 21 of 41, over the limit of 20" in (
        problem
    )
    status = daemon.status()["daemon"]
    assert status["config_generation"] == generation
    assert status["datapath_stats"]["policies"] == before
