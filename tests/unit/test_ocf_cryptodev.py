"""ocf_cryptodev's layouts against the real header, and the binding's pure parts.

Why compile C: the structures are declared by hand from crypto/cryptodev.h; only a compiler
reading the vendored header proves the offsets, sizes and ioctl numbers for each ABI. gcc runs
a program for x86_64 (-m64) and i386 (-m32); clang checks MIPS o32/n64 (the other _IOC
encoding) and ARM EABI at compile time with _Static_assert against the cross uapi headers
(linux-libc-dev-{mips,armhf}-cross). A missing tarball, compiler or header fails the test.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import pytest

from oe_router import ocf_cryptodev as oc
from oe_router.cabi import struct_type
from tests.c_layout import gcc_numbers

REPO = Path(__file__).resolve().parents[2]
TARBALL = "cryptodev-linux-08644db.tar.gz"


def vendor_dir() -> Path:
    """VENDOR_DIR, default ../shared/vendor beside the clone (as qemu/build.py finds it)."""
    return Path(os.environ.get("VENDOR_DIR") or REPO.parent / "shared" / "vendor")


@pytest.fixture(scope="module")
def header_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The vendored cryptodev-linux source, unpacked: the directory holding crypto/cryptodev.h."""
    tar = vendor_dir() / TARBALL
    if not tar.is_file():
        pytest.fail(f"{tar} is missing: set VENDOR_DIR to the folder holding {TARBALL}")
    dest = tmp_path_factory.mktemp("cryptodev")
    with tarfile.open(tar) as tf:
        tf.extractall(dest, filter="data")
    (root,) = [p for p in dest.iterdir() if (p / "crypto" / "cryptodev.h").is_file()]
    return root


def _tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed (scripts/apt-packages.txt lists {package})")
    return path


def _expected(lay: oc.Layout) -> dict[str, int]:
    """Every number the header decides, from the Python layout: offsets, sizes, ioctls."""
    out: dict[str, int] = {}
    for t in oc.TABLES:
        out[f"sizeof {t.name}"] = ctypes.sizeof(lay.structs[t.name])
        for field, off in lay.offsets(t).items():
            out[f"offsetof {t.name} {field}"] = off
    out.update({f"ioctl {k}": v for k, v in lay.ioctls.items()})
    return out


def _c_expr(key: str) -> str:
    kind, *rest = key.split()
    if kind == "sizeof":
        return f"sizeof(struct {rest[0]})"
    if kind == "offsetof":
        return f"offsetof(struct {rest[0]}, {rest[1]})"
    return f"(unsigned long)({rest[0]})"


PRELUDE = "#include <stddef.h>\n#include <linux/ioctl.h>\n#include <crypto/cryptodev.h>\n"


@pytest.mark.parametrize(("flag", "abi"), [("-m64", "x86_64"), ("-m32", "i386")])
def test_layout_matches_gcc(header_root: Path, tmp_path: Path, flag: str, abi: str) -> None:
    want = _expected(oc.layout(oc.ABIS[abi]))
    got = gcc_numbers({k: _c_expr(k) for k in want}, PRELUDE, [header_root], flag, tmp_path)
    assert got == want
    # and the sizes the module's authors care about, spelled out once
    if abi == "x86_64":
        assert got["sizeof crypt_auth_op"] == 72 and got["ioctl CIOCAUTHCRYPT"] == 0xC048636D
    else:
        assert got["sizeof crypt_auth_op"] == 44 and got["ioctl CIOCAUTHCRYPT"] == 0xC02C636D


@pytest.mark.parametrize(
    ("target", "include", "abi"),
    [
        ("mips-linux-gnu", "mips-linux-gnu", "mips"),
        ("mipsel-linux-gnu", "mips-linux-gnu", "mipsel"),
        ("mips64-linux-gnuabi64", "mips-linux-gnu", "mips64"),
        ("arm-linux-gnueabihf", "arm-linux-gnueabihf", "arm"),
    ],
)
def test_layout_matches_clang_cross(
    header_root: Path, tmp_path: Path, target: str, include: str, abi: str
) -> None:
    """Cross ABIs at compile time: one _Static_assert per number (the failing one names it)."""
    clang = _tool("clang", "clang")
    inc = Path("/usr") / include / "include"
    if not (inc / "asm" / "ioctl.h").is_file():
        pytest.fail(f"{inc}/asm/ioctl.h is missing (scripts/apt-packages.txt lists its package)")
    want = _expected(oc.layout(oc.ABIS[abi]))
    asserts = [f'_Static_assert({_c_expr(k)} == {v}u, "{k} != {v}");' for k, v in want.items()]
    src = tmp_path / "layout.c"
    src.write_text(PRELUDE + "\n".join(asserts) + "\n")
    res = subprocess.run(
        [clang, f"--target={target}", "-fsyntax-only", "-nostdlibinc", "-isystem", str(inc),
         "-I", str(header_root), str(src)],
        capture_output=True,
        text=True,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    # the encoding differs where it should: _IOW sets bit 31 on MIPS, bit 30 elsewhere
    assert want["ioctl CIOCFSESSION"] == (0x80046367 if abi.startswith("mips") else 0x40046367)


def test_ioc_limits_and_encodings() -> None:
    generic, mips = oc.ABIS["x86_64"], oc.ABIS["mips"]
    assert oc.ioc(generic, "", 0x63, 1, 0) == 0x6301
    assert oc.ioc(mips, "", 0x63, 1, 0) == 0x20006301  # _IOC_NONE is 1 on MIPS
    assert oc.ioc(generic, "r", 0x63, 1, 4) == 0x80046301
    assert oc.ioc(mips, "r", 0x63, 1, 4) == 0x40046301
    oc.ioc(generic, "rw", 0x63, 1, (1 << 14) - 1)
    with pytest.raises(ValueError, match="mips"):
        oc.ioc(mips, "rw", 0x63, 1, 1 << 13)


@pytest.mark.parametrize(
    ("machine", "ptr", "name"),
    [
        ("x86_64", 8, "x86_64"),
        ("x86_64", 4, "i386"),  # a 32-bit Python on a 64-bit kernel
        ("i686", 4, "i386"),
        ("aarch64", 8, "aarch64"),
        ("armv7l", 4, "arm"),
        ("riscv64", 8, "riscv64"),
    ],
)
def test_host_abi_from_uname(machine: str, ptr: int, name: str) -> None:
    assert oc.host_abi(machine, ptr).name == name


def test_host_abi_mips_follows_byte_order(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "byteorder", "big")
    assert oc.host_abi("mips", 4).name == "mips"
    assert oc.host_abi("mips64", 8).name == "mips64"
    monkeypatch.setattr(sys, "byteorder", "little")
    assert oc.host_abi("mips", 4).name == "mipsel"
    unknown = oc.host_abi("loongarch64", 8)
    assert unknown.ioc is oc.IocEncoding.GENERIC and "assumed" in unknown.name


def test_layout_independent_of_host_alignment() -> None:
    """A u64 in a table follows the ABI, not the host: 4-aligned on i386, 8 on ARM EABI."""
    table = oc.StructTable("t", (("a", oc.U32), ("b", oc.U64), ("p", oc.PTR)))
    for abi, (b_off, p_off, size) in {"i386": (4, 12, 16), "arm": (8, 16, 24)}.items():
        cls = struct_type(table, oc.ABIS[abi])
        assert (cls.b.offset, cls.p.offset, ctypes.sizeof(cls)) == (b_off, p_off, size)


def test_big_endian_layout_encodes_big_endian() -> None:
    sop = oc.layout(oc.ABIS["mips"]).structs["session_op"]()
    sop.cipher, sop.key = oc.Alg.AES_GCM, 0x01020304
    raw = bytes(sop)
    assert raw[:4] == (50).to_bytes(4, "big") and raw[12:16] == bytes([1, 2, 3, 4])


class _Recorder:
    """An ioctl stand-in that records the request and fails with a chosen errno."""

    def __init__(self, err: int = 0) -> None:
        self.err = err
        self.calls: list[tuple[int, bytes]] = []

    def __call__(self, fd: int, request: int, arg: Any, mutate: bool) -> int:
        self.calls.append((request, bytes(arg)))
        if self.err:
            raise OSError(self.err, os.strerror(self.err))
        if request == oc.HOST_LAYOUT.ioctls["CIOCGSESSION"]:
            arg.ses = 0x1234
        return 0


def test_session_request_and_error_text() -> None:
    rec = _Recorder()
    dev = oc.Cryptodev("/dev/null", ioctl=rec)
    ses = dev.open_session(oc.Alg.AES_CBC, b"K" * 16)
    assert ses.ses == 0x1234 and ses.algorithm == "cbc(aes)"
    request, raw = rec.calls[0]
    assert request == oc.HOST_LAYOUT.ioctls["CIOCGSESSION"]
    sop = oc.HOST_LAYOUT.structs["session_op"].from_buffer_copy(raw)
    assert (sop.cipher, sop.mac, sop.keylen, sop.mackeylen) == (11, 0, 16, 0)
    rec.err = 22
    with pytest.raises(oc.CryptodevError) as ei:
        dev.open_session(oc.Alg.AES_GCM, b"S3CRETKEY-bytes!", oc.Alg.SHA2_256_HMAC, b"M" * 32)
    msg = str(ei.value)
    assert "CIOCGSESSION" in msg and "gcm(aes)+hmac(sha256)" in msg
    assert "Invalid argument" in msg and "EINVAL" in msg and ei.value.errno == 22
    assert "S3CRET" not in msg and "MMMM" not in msg
    ses.close()
    dev.close()


def test_missing_device_names_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No /dev/crypto: the error names the open, ENOENT, and the module to load."""
    missing = str(tmp_path / "crypto")
    monkeypatch.setattr(oc, "DEVICE", missing)
    with pytest.raises(oc.CryptodevError) as ei:
        oc.Cryptodev(missing)
    assert f"open {missing}" in str(ei.value) and "ENOENT" in str(ei.value)
    assert "modprobe cryptodev" in str(ei.value)
