"""The router image: OpenWrt's file layout from Debian parts, the pinned runtime, virtio-crypto.

Why: the product ships as an OpenWrt package; these checks hold the image to the paths and
versions that package installs, and say plainly (banner) what the image is not.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

import build
from lab import Lab

pytestmark = pytest.mark.qemu

REPO = Path(__file__).resolve().parents[2]


def test_image_has_openwrt_layout_and_says_it_is_debian(lab: Lab) -> None:
    res = lab.router(
        "cat /etc/banner; test -f /etc/config/oe && test -x /etc/init.d/oe && echo layout-ok; "
        "python3 -c 'import oe_router, sys; print(oe_router.__file__)'"
    ).check()
    assert "from Debian parts" in res.stdout and "OpenWrt" in res.stdout
    assert "layout-ok" in res.stdout
    assert "/usr/lib/python3.11/site-packages/oe_router/__init__.py" in res.stdout


def test_image_carries_the_pinned_runtime_dependencies(lab: Lab) -> None:
    pins = dict(
        line.split("==")
        for line in (REPO / "requirements.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    )
    code = (
        "import json, importlib.metadata as m; "
        f"print(json.dumps({{n: m.version(n) for n in {sorted(pins)!r}}}))"
    )
    got = json.loads(lab.router(f'python3 -c "{code}"').check().stdout)
    assert got == pins


@pytest.fixture(scope="module")
def crypto_lab(lab_images: build.Images) -> Iterator[Lab]:
    """A second lab whose router has virtio-crypto and -cpu qemu64 (no AES-NI)."""
    with Lab(lab_images, crypto=True, bundle=False) as the_lab:
        yield the_lab


def test_virtio_crypto_engine_is_visible_to_the_router(crypto_lab: Lab) -> None:
    """With -cpu qemu64 there is no AES-NI, so the kernel's cbc(aes) is the virtio driver."""
    crypto = crypto_lab.router("cat /proc/crypto").check().stdout
    assert "virtio_crypto_aes_cbc" in crypto
    assert "aesni" not in crypto
    blocks = [b for b in crypto.split("\n\n") if "name         : cbc(aes)" in b]
    best = max(blocks, key=lambda b: int(b.split("priority     : ")[1].split()[0]))
    assert "virtio_crypto_aes_cbc" in best
