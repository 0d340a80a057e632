"""`make package`'s .ipk under the real opkg (opkg-lede built from source, with uci and
base-files, by qemu/userland.py), in an offline root as an image builder uses it.

The root is what the router image holds of OpenWrt: base-files' shell libraries
(/lib/functions.sh, /etc/rc.common, procd.sh, jshn.sh) and firewall4's default
/etc/config/firewall. Its python3, python3 libraries and kernel modules come from Debian,
so the root declares them installed in opkg's status file (ipk.declare_provided), as the
image will: without that opkg refuses the package.

opkg runs maintainer scripts in an offline root only with --force-postinstall, with
IPKG_INSTROOT naming the root (OpenWrt's image build does the same): then default_postinst
enables the service (rc.d links) but leaves uci-defaults to the first boot, and the
recipe's prerm undoes them with uci working on the root's /etc/config. The first boot's
uci-defaults run is done here as /etc/init.d/boot does it, with the root's /etc mounted
over /etc (tests/host/router_etc.py), so the real uci and the scripts' own paths (/etc/oe)
are the root's. tests/host/test_package_uci_defaults.py tests those scripts in detail.
"""

from __future__ import annotations

import hashlib
import io
import os
import platform
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Mapping
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "package"))

import ipk  # noqa: E402

from .router_etc import OPENWRT_DHCP, RouterEtc  # noqa: E402

pytestmark = pytest.mark.host

#: What the root takes from the userland build: base-files and firewall4's config.
ROOT_PARTS = ("etc", "lib", "usr/share/libubox")


@pytest.fixture(scope="module")
def package(oe_ipk: ipk.Ipk) -> ipk.Ipk:
    return oe_ipk


@pytest.fixture(scope="module")
def payload(package: ipk.Ipk) -> dict[str, tarfile.TarInfo | bytes]:
    """data.tar.gz's files: path -> bytes, and path + '#' -> its header."""
    out: dict[str, tarfile.TarInfo | bytes] = {}
    data = ipk.read_ipk(package.path)["data.tar.gz"]
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        for m in tar.getmembers():
            handle = tar.extractfile(m)
            if m.isfile() and handle is not None:
                out[m.name.removeprefix(".")] = handle.read()
                out[m.name.removeprefix(".") + "#"] = m
    return out


def provided_by_debian(depends: list[str]) -> dict[str, str]:
    """Every dependency with the version the lab's Debian parts carry: python3 and its
    modules are Debian's python3, the libraries the project's runtime pins, the kmod-*
    modules built into or shipped with Debian's kernel (and nftables-json, Debian's nft,
    declared with the kernel's version too: only its presence matters here)."""
    libraries = {
        "python3-cryptography": "cryptography",
        "python3-dns": "dnspython",
        "python3-pyroute2": "pyroute2",
    }
    out = {}
    for name in depends:
        if name in libraries:
            out[name] = version(libraries[name])
        elif name.startswith("python3-"):
            out[name] = platform.python_version()
        else:
            out[name] = os.uname().release
    return out


@dataclass
class Root:
    """An offline root and the userland's opkg and uci working on it."""

    path: Path
    env: Mapping[str, str]
    opkg_bin: Path
    etc: RouterEtc

    def opkg(self, *args: str) -> subprocess.CompletedProcess[str]:
        argv = [str(self.opkg_bin), "--offline-root", str(self.path), "--force-postinstall"]
        return subprocess.run(
            [*argv, *args],
            env={**self.env, "IPKG_INSTROOT": str(self.path)},
            capture_output=True,
            text=True,
            timeout=120,
        )

    def uci(self, *args: str) -> str:
        return self.etc.uci(*args)

    def installed(self) -> dict[str, str]:
        out = self.opkg("list-installed").stdout
        return dict(line.split(" - ", 1) for line in out.splitlines() if " - " in line)

    def first_boot(self) -> None:
        """/etc/init.d/boot's uci-defaults step, with this root's /etc as /etc."""
        self.etc.apply_defaults()


@pytest.fixture
def root(openwrt_userland: Any, tmp_path: Path) -> Root:
    path = tmp_path / "root"
    for part in ROOT_PARTS:
        shutil.copytree(openwrt_userland.root / part, path / part, symlinks=True)
    # the userland's own first-boot scripts (luci-theme-bootstrap's) are not this package's
    shutil.rmtree(path / "etc" / "uci-defaults", ignore_errors=True)
    for folder in ("etc/rc.d", "tmp", "var/lock", "usr/lib/opkg"):
        (path / folder).mkdir(parents=True, exist_ok=True)
    (path / "etc/opkg.conf").write_text(ipk.OPKG_CONF)
    (path / "etc/config/dhcp").write_text(OPENWRT_DHCP)  # dnsmasq's, on a real router
    return Root(
        path,
        openwrt_userland.env(),
        openwrt_userland.tool("opkg"),
        RouterEtc(path / "etc", openwrt_userland),
    )


def _depends(package: ipk.Ipk) -> list[str]:
    return ipk.control_fields(package.control)["Depends"].split(", ")


def test_opkg_refuses_the_package_until_the_root_declares_its_dependencies(
    root: Root, package: ipk.Ipk
) -> None:
    refused = root.opkg("install", str(package.path))
    assert refused.returncode != 0
    for name in _depends(package):
        assert f"cannot find dependency {name} for python3-oe" in refused.stderr, name
    assert not (root.path / "usr/bin/oe").exists()
    assert "python3-oe" not in root.installed()


def test_install_first_boot_and_remove(
    root: Root,
    package: ipk.Ipk,
    payload: dict[str, tarfile.TarInfo | bytes],
) -> None:
    provided = provided_by_debian(_depends(package))
    ipk.declare_provided(root.path, provided)
    firewall_before = root.uci("show", "firewall")
    exported = root.etc.export("firewall", "dhcp")

    done = root.opkg("install", str(package.path))
    assert done.returncode == 0, done.stdout + done.stderr
    installed = root.installed()
    assert installed["python3-oe"] == ipk.control_fields(package.control)["Version"]
    assert {name: installed[name] for name in provided} == provided  # the image's form

    # every file landed, with its bytes and mode; opkg's file list is the package's
    files = {name for name in payload if not name.endswith("#")}
    for name in files:
        on_disk = root.path / name.lstrip("/")
        header = payload[name + "#"]
        assert isinstance(header, tarfile.TarInfo)
        assert on_disk.read_bytes() == payload[name], name
        assert on_disk.stat().st_mode & 0o7777 == header.mode, name
    listed = (root.path / "usr/lib/opkg/info/python3-oe.list").read_text().split()
    assert set(listed) == files
    # the conffile is recorded with the hash of what was installed
    status = (root.path / "usr/lib/opkg/status").read_text()
    paragraph = next(p for p in status.split("\n\n") if p.startswith("Package: python3-oe\n"))
    digest = hashlib.sha256((root.path / "etc/config/oe").read_bytes()).hexdigest()
    assert f"Conffiles:\n /etc/config/oe {digest}" in paragraph
    # default_postinst, offline: the service enabled from the init script's START/STOP,
    # the uci-defaults left for the first boot
    assert os.readlink(root.path / "etc/rc.d/S90oe") == "../init.d/oe"
    assert os.readlink(root.path / "etc/rc.d/K10oe") == "../init.d/oe"
    assert root.etc.pending_defaults() == ["90_oe-firewall", "91_oe-dns"]
    assert root.etc.export("firewall", "dhcp") == exported

    # first boot: the uci-defaults open IKE and ESP on wan, put the userspace datapath's
    # device in the wan zone
    root.first_boot()
    assert root.etc.pending_defaults() == []
    after_boot = root.uci("show", "firewall").splitlines()
    added = sorted(set(after_boot) - set(firewall_before.splitlines()))
    assert "firewall.@zone[1].device='oe-esp0'" in added
    assert {"firewall.oe_ike=rule", "firewall.oe_esp=rule"} <= set(added)
    assert root.uci("get", "firewall.@zone[1].name").strip() == "wan"
    # dnsmasq keeps its config (the daemon redirects its queries while the front runs)
    assert root.etc.export("dhcp") == {"dhcp": exported["dhcp"]}
    assert not (root.path / "etc/oe/dnsmasq.undo").exists()

    # the user changes the package's config: a conffile opkg must keep
    root.etc.sh("uci set oe.global.enabled=0 && uci commit oe")

    gone = root.opkg("remove", "python3-oe")
    assert gone.returncode == 0, gone.stdout + gone.stderr
    assert "Not deleting modified conffile" in gone.stdout + gone.stderr
    # the prerm undid the uci-defaults, default_prerm disabled the service
    assert root.uci("show", "firewall") == firewall_before
    assert root.etc.export("firewall", "dhcp") == exported
    assert not (root.path / "etc/oe").exists()
    assert not list((root.path / "etc/rc.d").iterdir())
    # nothing of the package is left but the modified conffile, not even its folders
    left = sorted(name for name in files if (root.path / name.lstrip("/")).exists())
    assert left == ["/etc/config/oe"]
    assert root.uci("get", "oe.global.enabled").strip() == "0"
    site = root.path / f"usr/lib/python{sys.version_info.major}.{sys.version_info.minor}"
    assert not list((site / "site-packages").iterdir())  # the folder is python3's
    assert not list((root.path / "usr/lib/opkg/info").glob("python3-oe.*"))
    installed = root.installed()
    assert "python3-oe" not in installed and set(provided) <= set(installed)


def test_an_unchanged_conffile_goes_with_the_package(root: Root, package: ipk.Ipk) -> None:
    ipk.declare_provided(root.path, provided_by_debian(_depends(package)))
    assert root.opkg("install", str(package.path)).returncode == 0
    assert (root.path / "etc/config/oe").is_file()
    gone = root.opkg("remove", "python3-oe")
    assert gone.returncode == 0, gone.stdout + gone.stderr
    assert not (root.path / "etc/config/oe").exists()
    assert (root.path / "etc/config/firewall").is_file()


def test_luci_app_installs_over_python3_oe_and_holds_it(root: Root, package: ipk.Ipk) -> None:
    """luci-app-oe, as the QEMU image installs it (qemu/build.py): refused without its
    dependencies; with python3-oe installed and luci-base declared (the image has it from
    the userland build) it installs its files; then opkg refuses to remove python3-oe
    under it, and removing the app first leaves none of its files."""
    luci = ipk.build_luci(root.path.parent / "luci-ipk")
    refused = root.opkg("install", str(luci.path))
    assert refused.returncode != 0
    assert "cannot find dependency" in refused.stderr, refused.stderr
    ipk.declare_provided(root.path, provided_by_debian(_depends(package)))
    assert root.opkg("install", str(package.path)).returncode == 0
    ipk.declare_provided(root.path, {"luci-base": "git-d5950a9fa5a5"})
    done = root.opkg("install", str(luci.path))
    assert done.returncode == 0, done.stdout + done.stderr
    assert root.installed()["luci-app-oe"] == ipk.control_fields(luci.control)["Version"]
    files = sorted(name for name in luci.files if not name.endswith("/"))
    for name in files:
        assert (root.path / name.lstrip("/")).is_file(), name
    listed = (root.path / "usr/lib/opkg/info/luci-app-oe.list").read_text().split()
    assert sorted(listed) == files
    held = root.opkg("remove", "python3-oe")
    assert held.returncode != 0 and "luci-app-oe" in held.stdout + held.stderr
    assert (root.path / "usr/bin/oe-routerd").is_file()
    gone = root.opkg("remove", "luci-app-oe")
    assert gone.returncode == 0, gone.stdout + gone.stderr
    assert not [n for n in files if (root.path / n.lstrip("/")).exists()]
    assert root.opkg("remove", "python3-oe").returncode == 0
