"""Throw-away network namespaces with lab addresses on lo, for host tests and tools."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager


def run(cmd: Sequence[str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, check=False)


@contextmanager
def netns(tag: str, addresses: Sequence[str]) -> Iterator[str]:
    """A fresh netns with lo up and ``addresses`` (host routes) on lo."""
    name = f"lk-{tag}-{os.getpid()}"
    run(["ip", "netns", "del", name])
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        for addr in addresses:
            plen = "128" if ":" in addr else "32"
            subprocess.run(
                ["ip", "-n", name, "addr", "add", f"{addr}/{plen}", "dev", "lo", "nodad"]
                if ":" in addr
                else ["ip", "-n", name, "addr", "add", f"{addr}/{plen}", "dev", "lo"],
                check=True,
            )
        yield name
    finally:
        run(["ip", "netns", "del", name])


def in_ns(
    ns: str, cmd: Sequence[str], env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        ["ip", "netns", "exec", ns, *cmd],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
        check=False,
    )
