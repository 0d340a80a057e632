"""Fixtures the host tier's package tests share."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO / "package") not in sys.path:
    sys.path.insert(0, str(REPO / "package"))

import ipk  # noqa: E402


@pytest.fixture(scope="session")
def oe_ipk(tmp_path_factory: pytest.TempPathFactory) -> ipk.Ipk:
    """`make package`'s .ipk of this tree (package/ipk.py; about 3 s), built once."""
    return ipk.build(tmp_path_factory.mktemp("dist"))
