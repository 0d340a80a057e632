"""package/ipk.py: `make package`'s .ipk is what package/python-oe/Makefile describes.

The builder evaluates the recipe with GNU make; these tests read the recipe on their own
(regular expressions over its variables, defines and install lines) and compare the built
archive with it: the outer format opkg reads, control fields, conffiles and maintainer
scripts, the installed file list, modes, owners and times, and identical bytes from a
second build under another umask. The packaged code itself runs (its wrapper, its .pyc
modules, its config file). opkg installing it is tests/host/test_package_opkg.py.
"""

from __future__ import annotations

import fnmatch
import gzip
import importlib.util
import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "package"))

import ipk  # noqa: E402

EPOCH = 1_700_000_000
#: What the builder reads from the tree: a snapshot keeps a concurrent edit out of the run.
INPUTS = ("pyproject.toml", "README.md", "src", "files", "package/python-oe")
#: Install commands of the buildroot's rules.mk and the modes they give.
INSTALL_MODES = {"INSTALL_BIN": 0o755, "INSTALL_CONF": 0o600, "INSTALL_DATA": 0o644}
DIST_INFO = {"METADATA", "RECORD", "WHEEL", "entry_points.txt", "top_level.txt"}


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    snap = tmp_path_factory.mktemp("tree")
    junk = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for rel in INPUTS:
        src, dest = REPO / rel, snap / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dest, ignore=junk)
        else:
            shutil.copy2(src, dest)
    return snap


@pytest.fixture(scope="module")
def built(tree: Path, tmp_path_factory: pytest.TempPathFactory) -> ipk.Ipk:
    return ipk.build(tmp_path_factory.mktemp("out"), repo=tree, epoch=EPOCH)


@pytest.fixture(scope="module")
def members(built: ipk.Ipk) -> dict[str, bytes]:
    return ipk.read_ipk(built.path)


def _tar(data: bytes) -> list[tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        return tar.getmembers()


def _tar_files(data: bytes) -> dict[str, bytes]:
    out = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        for m in tar.getmembers():
            handle = tar.extractfile(m)
            if m.isfile() and handle is not None:
                out[m.name.removeprefix(".")] = handle.read()
    return out


# -- the recipe, read independently of the builder -------------------------------------


def _makefile(tree: Path) -> str:
    return (tree / "package/python-oe/Makefile").read_text()


def _var(tree: Path, name: str) -> str:
    m = re.search(rf"^{name}:=(.*)$", _makefile(tree), re.M)
    assert m, name
    return m.group(1).strip()


def _define(tree: Path, name: str) -> str:
    m = re.search(rf"^define {re.escape(name)}\n(.*?)^endef$", _makefile(tree), re.M | re.S)
    assert m, f"define {name} missing"
    return m.group(1)


def _package_var(tree: Path, key: str) -> str:
    body = _define(tree, "Package/python3-oe")
    m = re.search(rf"^\s*{key}:=((?:.*\\\n)*.*)$", body, re.M)
    assert m, key
    return " ".join(m.group(1).replace("\\\n", " ").split())


def _expected_install(tree: Path) -> dict[str, tuple[int, str]]:
    """The install section's files: destination -> (mode, source as written)."""
    out = {}
    body = _define(tree, "Py3Package/python3-oe/install")
    for cmd, src, dest in re.findall(r"\$\((INSTALL_[A-Z]+)\) (\S+) \$\(1\)(\S+)", body):
        path = dest + src.rsplit("/", 1)[1] if dest.endswith("/") else dest
        out[path] = (INSTALL_MODES[cmd], src)
    return out


def _expected_python(tree: Path, site: str) -> set[str]:
    """Py3Package's default filespec: every module compiled (legacy .pyc beside where the
    .py was), package data as is, the wheel's metadata."""
    pyproject = tomllib.loads((tree / "pyproject.toml").read_text())
    globs = pyproject["tool"]["setuptools"]["package-data"]["oe_router"]
    pkg = tree / "src" / "oe_router"
    out = set()
    for path in pkg.rglob("*"):
        rel = path.relative_to(pkg).as_posix()
        if path.suffix == ".py":
            out.add(f"{site}/oe_router/{rel}c")
        elif path.is_file() and any(fnmatch.fnmatch(rel, g) for g in globs):
            out.add(f"{site}/oe_router/{rel}")
    name, version = pyproject["project"]["name"], pyproject["project"]["version"]
    dist_info = f"{site}/{name.replace('-', '_')}-{version}.dist-info"
    return out | {f"{dist_info}/{n}" for n in DIST_INFO}


SITE = f"/usr/lib/python{sys.version_info.major}.{sys.version_info.minor}/site-packages"


# -- the outer format ------------------------------------------------------------------


def test_outer_archive_is_the_gzipped_tar_opkg_reads(built: ipk.Ipk) -> None:
    raw = built.path.read_bytes()
    assert built.path.name == "python3-oe_0.1.0-r1_all.ipk"
    # gzip -n: no file name, no time (flag FNAME unset, MTIME zero)
    assert raw[:3] == b"\x1f\x8b\x08" and raw[3] & 0x08 == 0 and raw[4:8] == b"\0\0\0\0"
    outer = _tar(raw)
    assert [m.name for m in outer] == ["./debian-binary", "./data.tar.gz", "./control.tar.gz"]
    assert all(m.isfile() and m.mode == 0o644 for m in outer)
    assert ipk.read_ipk(built.path)["debian-binary"] == b"2.0\n"


def test_every_member_is_root_owned_with_the_fixed_time(members: dict[str, bytes]) -> None:
    for blob in (members["data.tar.gz"], members["control.tar.gz"]):
        assert blob[4:8] == b"\0\0\0\0"
        for m in _tar(blob):
            assert (m.uid, m.gid, m.uname, m.gname) == (0, 0, "", ""), m.name
            assert m.mtime == EPOCH, m.name
            # tarfile reads a folder's name without its trailing slash: "./" is "."
            assert m.name == "." or m.name.startswith("./"), m.name


# -- control ---------------------------------------------------------------------------


def test_control_fields_are_the_makefiles(tree: Path, members: dict[str, bytes]) -> None:
    fields = ipk.control_fields(members["control/control"].decode())
    depends = [e[1:] for e in _package_var(tree, "DEPENDS").split() if not e.startswith("+@")]
    assert depends and all(d.startswith(("python3-", "kmod-", "nftables-")) for d in depends)
    assert fields["Package"] == "python3-oe"
    assert fields["Version"] == f"{_var(tree, 'PKG_VERSION')}-r{_var(tree, 'PKG_RELEASE')}"
    assert fields["Depends"].split(", ") == depends
    assert fields["Architecture"] == _package_var(tree, "PKGARCH") == "all"
    assert fields["Section"] == _package_var(tree, "SECTION")
    assert fields["URL"] == _package_var(tree, "URL")
    assert fields["SourceName"] == _var(tree, "PKG_NAME")
    assert fields["License"] == _var(tree, "PKG_LICENSE")
    assert fields["Maintainer"] == _var(tree, "PKG_MAINTAINER")
    assert fields["Source"] == "feeds/oe/python-oe"
    assert "src-link oe " in _makefile(tree), "Source names the feed the header tells to use"
    assert fields["SourceDateEpoch"] == str(EPOCH)
    described = " ".join(_define(tree, "Package/python3-oe/description").split())
    assert " ".join(fields["Description"].split()) == described
    text = members["control/control"].decode()
    order = [line.split(":")[0] for line in text.splitlines() if not line.startswith(" ")]
    assert order[:2] == ["Package", "Version"] and order[-2:] == ["Installed-Size", "Description"]


def test_installed_size_is_the_unpacked_data_archive(
    members: dict[str, bytes], built: ipk.Ipk
) -> None:
    fields = ipk.control_fields(members["control/control"].decode())
    assert int(fields["Installed-Size"]) == len(gzip.decompress(members["data.tar.gz"]))
    assert built.installed_size == int(fields["Installed-Size"])


def test_control_archive_holds_conffiles_and_maintainer_scripts(
    tree: Path, members: dict[str, bytes]
) -> None:
    control = {m.name: m for m in _tar(members["control.tar.gz"])}
    assert set(control) == {
        ".",
        "./control",
        "./conffiles",
        "./postinst",
        "./prerm",
        "./prerm-pkg",
        "./postrm",
    }
    for name in ("./control", "./conffiles"):
        assert control[name].mode == 0o644
    for name in ("./postinst", "./prerm", "./prerm-pkg", "./postrm"):
        assert control[name].mode == 0o755
    conffiles = members["control/conffiles"].decode().split()
    assert conffiles == _define(tree, "Package/python3-oe/conffiles").split() == ["/etc/config/oe"]
    # OpenWrt's wrappers hand over to base-files, which finds the package by $0
    assert "default_postinst $0 $@" in members["control/postinst"].decode()
    assert "default_prerm $0 $@" in members["control/prerm"].decode()
    # the recipe's defines, expanded once as the buildroot does ($$ is the shell's $)
    for define, name in (("prerm", "prerm-pkg"), ("postrm", "postrm")):
        text = _define(tree, f"Package/python3-oe/{define}").replace("$$", "$")
        assert members[f"control/{name}"].decode() == text
    for name in ("postinst", "prerm", "prerm-pkg", "postrm"):
        script = members[f"control/{name}"].decode()
        assert script.startswith("#!/bin/sh\n")
        assert subprocess.run(["sh", "-n", "-c", script]).returncode == 0, name


# -- data ------------------------------------------------------------------------------


def test_data_is_exactly_the_install_section(tree: Path, members: dict[str, bytes]) -> None:
    files = _tar_files(members["data.tar.gz"])
    install = _expected_install(tree)
    # the regular expression read the section (whatever else it installs later)
    assert set(install) >= {
        "/usr/bin/oe",
        "/usr/bin/oe-routerd",
        "/etc/config/oe",
        "/etc/init.d/oe",
        "/etc/uci-defaults/90_oe-firewall",
        "/etc/uci-defaults/91_oe-dns",
    }
    assert set(files) == set(install) | _expected_python(tree, SITE)
    for dest, (_mode, src) in install.items():
        if src.startswith("$(CURDIR)/../../"):
            assert files[dest] == (tree / src.removeprefix("$(CURDIR)/../../")).read_bytes()
    assert not [f for f in files if f.endswith(".py")], "sources are the -src package's"


def test_modes_are_the_install_commands(tree: Path, members: dict[str, bytes]) -> None:
    entries = {m.name.removeprefix(".") or "/": m for m in _tar(members["data.tar.gz"])}
    install = _expected_install(tree)
    assert entries["/etc/config/oe"].mode == 0o600  # INSTALL_CONF
    for name, m in entries.items():
        if m.isdir():
            assert m.mode == 0o755, name
        elif name in install:
            assert m.mode == install[name][0], name
        else:
            assert m.isfile() and m.mode == 0o644, name
    # every folder of every file is there, as opkg creates them from the archive
    for name in entries:
        assert (name.rsplit("/", 1)[0] or "/") in entries, name


def test_entry_points_run_on_the_routers_python(members: dict[str, bytes]) -> None:
    files = _tar_files(members["data.tar.gz"])
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    for script, target in pyproject["project"]["scripts"].items():
        text = files[f"/usr/bin/{script}"].decode()
        module, func = target.split(":")
        assert text.startswith("#!/usr/bin/python3\n"), script
        assert f"from {module} import {func}" in text, script
    magic = importlib.util.MAGIC_NUMBER
    compiled = [data for name, data in files.items() if name.endswith(".pyc")]
    assert compiled and all(data[:4] == magic for data in compiled)


def test_the_packaged_code_runs(members: dict[str, bytes], tmp_path: Path) -> None:
    """Unpacked as opkg would, the wrapper imports the compiled modules from the package
    (not from this checkout) and validates the packaged config."""
    with tarfile.open(fileobj=io.BytesIO(members["data.tar.gz"]), mode="r:gz") as tar:
        tar.extractall(tmp_path, filter="data")
    site = tmp_path / SITE.lstrip("/")
    env = {**os.environ, "PYTHONPATH": str(site), "PYTHONDONTWRITEBYTECODE": "1"}
    where = subprocess.run(
        [sys.executable, "-c", "import oe_router.cli as m; print(m.__file__)"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert where == str(site / "oe_router" / "cli.pyc")
    check = subprocess.run(
        [
            sys.executable,
            str(tmp_path / "usr/bin/oe"),
            "config",
            "check",
            str(tmp_path / "etc/config/oe"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert check.returncode == 0, check.stdout + check.stderr


# -- reproducible ----------------------------------------------------------------------


def test_same_tree_and_epoch_give_the_same_bytes(
    tree: Path, built: ipk.Ipk, tmp_path: Path
) -> None:
    """A second build elsewhere, under umask 077, is byte for byte the first."""
    old = os.umask(0o077)
    try:
        again = ipk.build(tmp_path / "again", repo=tree, epoch=EPOCH)
    finally:
        os.umask(old)
    assert again.path.read_bytes() == built.path.read_bytes()
    other = ipk.build(tmp_path / "later", repo=tree, epoch=EPOCH + 1)
    assert other.path.read_bytes() != built.path.read_bytes()


def test_epoch_defaults_to_the_last_commit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    last = subprocess.run(
        ["git", "-C", str(REPO), "log", "-1", "--format=%ct"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert ipk.source_date_epoch(REPO) == int(last)
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "12345")
    assert ipk.source_date_epoch(REPO) == 12345
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "yesterday")
    with pytest.raises(ipk.PackageError, match="SOURCE_DATE_EPOCH='yesterday'"):
        ipk.source_date_epoch(REPO)


# -- the recipe's errors are named -----------------------------------------------------


def test_a_recipe_the_builder_cannot_follow_is_named(tree: Path, tmp_path: Path) -> None:
    broken = tmp_path / "tree"
    shutil.copytree(tree, broken)
    makefile = broken / "package/python-oe/Makefile"
    makefile.write_text(makefile.read_text().replace("\t+kmod-veth \\", "\t+kmod-veth:foo \\"))
    with pytest.raises(ipk.PackageError, match="kmod-veth:foo"):
        ipk.build(tmp_path / "out", repo=broken, epoch=EPOCH)
    makefile.write_text(makefile.read_text().replace("files/etc/init.d/oe", "files/nowhere"))
    with pytest.raises(ipk.PackageError, match="make ipk-install"):
        ipk.build(tmp_path / "out", repo=broken, epoch=EPOCH)
    assert not list((tmp_path / "out").iterdir()), "nothing is left half-built"
