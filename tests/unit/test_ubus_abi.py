"""The libubus layouts the ubus shim pins, against the real headers compiled by gcc.

Why compile C: ``control/ubus_abi.py`` declares libubus's and libubox's structures by
hand; only a compiler reading the vendored headers (the snapshots qemu/userland.py
builds) proves every offset and size. gcc runs a program for x86_64 (-m64) and i386
(-m32). The tables hold no 64-bit integer, so the other ILP32 ABIs (ARM EABI, MIPS o32)
and LP64 ones lay them out as i386 and x86_64 do: asserted from the layout math. A
missing tarball or compiler fails the test.
"""

from __future__ import annotations

import ctypes
import os
import tarfile
from pathlib import Path

import pytest

from oe_router.cabi import ABIS, field_offsets
from oe_router.control import ubus_abi
from tests.c_layout import gcc_numbers

REPO = Path(__file__).resolve().parents[2]
SOURCES = {"libubox": "libubox-1aa36ee.tar.gz", "ubus": "ubus-3cc98db.tar.gz"}


def _vendor() -> Path:
    """VENDOR_DIR, default ../shared/vendor beside the clone (as qemu/build.py finds it)."""
    return Path(os.environ.get("VENDOR_DIR") or REPO.parent / "shared" / "vendor") / "openwrt"


@pytest.fixture(scope="module")
def include_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder where <libubox/...> and "libubus.h" resolve, from the vendored snapshots."""
    dest = tmp_path_factory.mktemp("ubus-headers")
    for name, archive in SOURCES.items():
        tar = _vendor() / archive
        if not tar.is_file():
            pytest.fail(f"{tar} is missing: set VENDOR_DIR to the folder holding openwrt/")
        with tarfile.open(tar) as tf:
            tf.extractall(dest / "src", filter="data")
        (top,) = [p for p in (dest / "src").iterdir() if p.name.startswith(name + "-")]
        top.rename(dest / name)
    (dest / "include").mkdir()
    (dest / "include" / "libubox").symlink_to(dest / "libubox")
    for header in ("libubus.h", "ubusmsg.h", "ubus_common.h"):
        (dest / "include" / header).symlink_to(dest / "ubus" / header)
    return dest / "include"


def _expected(lay: ubus_abi.Layout) -> dict[str, int]:
    out: dict[str, int] = {}
    for t in ubus_abi.TABLES:
        cls = lay[t.name]
        if t.name not in ubus_abi.PREFIXES:
            out[f"sizeof {t.name}"] = ctypes.sizeof(cls)
        for field, off in field_offsets(cls).items():
            out[f"offsetof {t.name} {field}"] = off
    return out


def _c_expr(key: str) -> str:
    kind, struct, *field = key.split()
    if kind == "sizeof":
        return f"sizeof(struct {struct})"
    return f"offsetof(struct {struct}, {field[0]})"


@pytest.mark.parametrize(("flag", "abi"), [("-m64", "x86_64"), ("-m32", "i386")])
def test_layout_matches_gcc(include_dir: Path, tmp_path: Path, flag: str, abi: str) -> None:
    want = _expected(ubus_abi.layout(ABIS[abi]))
    prelude = "#include <stddef.h>\n#include <libubus.h>\n"
    got = gcc_numbers({k: _c_expr(k) for k in want}, prelude, [include_dir], flag, tmp_path)
    assert got == want
    # the numbers the shim's authors reason with, spelled out once
    if abi == "x86_64":
        assert got["offsetof ubus_context sock.fd"] == 88  # BUILD-NOTES: sock at 80
        assert got["sizeof ubus_object"] == 120 and got["sizeof ubus_request_data"] == 56
    else:
        assert got["offsetof ubus_context sock.fd"] == 48
        assert got["sizeof ubus_object"] == 60 and got["sizeof ubus_request_data"] == 36


def test_every_abi_lays_out_as_its_pointer_size_says() -> None:
    """No table holds a 64-bit integer: an ABI's layout follows from its pointer size
    alone (so -m32 and -m64 above stand for all of OpenWrt's targets)."""
    by_size = {4: ubus_abi.layout(ABIS["i386"]), 8: ubus_abi.layout(ABIS["x86_64"])}
    for abi in ABIS.values():
        lay, ref = ubus_abi.layout(abi), by_size[abi.pointer_size]
        for t in ubus_abi.TABLES:
            assert ctypes.sizeof(lay[t.name]) == ctypes.sizeof(ref[t.name]), (abi.name, t.name)
            assert field_offsets(lay[t.name]) == field_offsets(ref[t.name]), (abi.name, t.name)


def test_host_layout_is_this_process() -> None:
    assert ctypes.sizeof(ubus_abi.HOST_LAYOUT["ubus_method"]) == 6 * ctypes.sizeof(ctypes.c_void_p)
