"""Run an ``nft -f`` script atomically: the one way every part of oe-router writes netfilter.

Why here, below ``oe/``: the userspace datapath keeps its policy projection and MSS
clamp in nftables too, and a layer must not import the one above it.
"""

from __future__ import annotations

import subprocess

from .base import DatapathError

__all__ = ["NftError", "run_nft"]


class NftError(DatapathError):
    """nft refused a script (or is missing); the message carries nft's own words."""


def run_nft(script: str, *, netns: str | None = None, nft: str = "nft", what: str = "") -> None:
    """Apply ``script`` with ``nft -f -`` (atomic: all of it or none)."""
    if not script.strip():
        return
    argv = [nft, "-f", "-"]
    if netns is not None:
        argv = ["ip", "netns", "exec", netns, *argv]
    name = what or "rules"
    try:
        done = subprocess.run(argv, input=script, capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        raise NftError(f"{nft} not found: the {name} need nftables") from None
    except subprocess.TimeoutExpired:
        raise NftError(f"nft did not finish the {name} within 30 s") from None
    if done.returncode != 0:
        detail = " | ".join(line for line in done.stderr.splitlines() if line.strip())
        raise NftError(f"nft refused the {name}: {detail or done.returncode}")
