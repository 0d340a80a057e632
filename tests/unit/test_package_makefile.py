"""package/python-oe/Makefile: the OpenWrt package recipe agrees with pyproject and files/.

The OpenWrt buildroot does not exist on this host, so the recipe is not built here. These
tests check what can be checked without it: the openwrt/packages conventions (includes,
Py3Package, -src package), that GNU make parses the file with empty stand-ins for the
buildroot's include files, that every installed file and entry point exists, that the
known-answer vectors ship, and which dependencies are hard (DEPENDS: what the default
kernel datapath uses) and which are only named in the description (the userspace
datapath and optional features: OpenWrt has no "Recommends").
"""

from __future__ import annotations

import fnmatch
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

from oe_router.offload.engine import TRANSFORMS
from oe_router.offload.kat import vector_file

REPO = Path(__file__).resolve().parents[2]
MAKEFILE = REPO / "package" / "python-oe" / "Makefile"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())

#: Hard dependencies beyond the Python ones: kernel ESP, AF_ALG (the KATs of the kernel's
#: own drivers; crypto_user.ko for offload_demote), veth for the ESP self-test, and nft
#: with its NAT module for the LAN gateway's SNAT table (the daemon runs `nft -f`).
KERNEL_DATAPATH = {
    "nftables-json",
    "kmod-nft-nat",
    "kmod-ipsec",
    "kmod-ipsec4",
    "kmod-ipsec6",
    "kmod-crypto-user",
    "kmod-crypto-gcm",
    "kmod-crypto-seqiv",
    "kmod-crypto-sha256",
    "kmod-crypto-sha512",
    "kmod-veth",
    "kmod-nft-queue",  # packet_hold (on by default): first packets wait for their SA
}
#: Kernel config the ESP self-test needs (network namespaces), selected with "+@".
KERNEL_CONFIG = {"KERNEL_NAMESPACES", "KERNEL_NET_NS"}
#: Only the userspace datapath or an optional feature uses these: never hard dependencies,
#: always named in the description. kmod-nft-compat + kmod-ipt-nfqueue are the xt
#: NFQUEUE fallback when nft's queue expression (kmod-nft-queue) is missing.
OPTIONAL = {
    "kmod-tun",
    "kmod-nfnetlink-queue",
    "kmod-nft-netdev",
    "kmod-nft-compat",
    "kmod-ipt-nfqueue",
    "kmod-cryptodev",
    "python3-pyudev",
}
#: pyproject names whose OpenWrt feed package is not python3-<name>.
FEED_NAMES = {"cryptography": "python3-cryptography", "dnspython": "python3-dns"}


def _text() -> str:
    return MAKEFILE.read_text()


def _var(name: str) -> str:
    m = re.search(rf"^{name}:=(.*)$", _text(), re.M)
    assert m, f"{name} is not set in {MAKEFILE}"
    return m.group(1).strip()


def _define(name: str) -> str:
    m = re.search(rf"^define {re.escape(name)}\n(.*?)^endef$", _text(), re.M | re.S)
    assert m, f"define {name} missing"
    return m.group(1)


def test_makefile_has_the_openwrt_packages_skeleton_in_order() -> None:
    text = _text()
    order = [
        "include $(TOPDIR)/rules.mk",
        "PKG_NAME:=python-oe",
        "include $(INCLUDE_DIR)/package.mk",
        "/lang/python/python3-package.mk",
        "define Package/python3-oe\n",
        "$(eval $(call Py3Package,python3-oe))",
        "$(eval $(call BuildPackage,python3-oe))",
        "$(eval $(call BuildPackage,python3-oe-src))",
    ]
    positions = [text.index(marker) for marker in order]
    assert positions == sorted(positions)


def test_version_license_and_source_match_pyproject() -> None:
    project = PYPROJECT["project"]
    assert _var("PKG_VERSION") == project["version"]
    assert _var("PKG_LICENSE") == project["license"]["text"]
    # setuptools names the sdist after the normalised distribution name.
    dist = project["name"].replace("-", "_")
    assert _var("PKG_SOURCE") == f"{dist}-$(PKG_VERSION).tar.gz"
    assert _var("PKG_BUILD_DIR") == f"$(BUILD_DIR)/{dist}-$(PKG_VERSION)"
    assert _var("PKG_SOURCE_URL").startswith("file://")
    for name in ("PKG_RELEASE", "PKG_HASH", "PKG_MAINTAINER", "PKG_LICENSE_FILES"):
        assert _var(name)


def _feed_name(requirement: str) -> str:
    name = re.split(r"[<>=!~ \[]", requirement, maxsplit=1)[0]
    return FEED_NAMES.get(name, f"python3-{name}")


def _depends() -> tuple[set[str], set[str]]:
    """(packages, kernel config symbols) of DEPENDS; every entry must be selecting (+)."""
    body = _define("Package/python3-oe")
    m = re.search(r"^\s*DEPENDS:=((?:.*\\\n)*.*)$", body, re.M)
    assert m, "DEPENDS missing"
    entries = m.group(1).replace("\\\n", " ").split()
    assert all(e.startswith("+") for e in entries), entries
    packages = {e[1:] for e in entries if not e.startswith("+@")}
    symbols = {e[2:] for e in entries if e.startswith("+@")}
    return packages, symbols


def _description() -> str:
    return " ".join(_define("Package/python3-oe/description").split())


def test_depends_cover_every_runtime_dependency_with_feed_names() -> None:
    body = _define("Package/python3-oe")
    for key in ("SECTION", "CATEGORY", "TITLE", "URL"):
        assert re.search(rf"^\s*{key}:=\S", body, re.M), key
    depends, _ = _depends()
    for requirement in PYPROJECT["project"]["dependencies"]:
        assert _feed_name(requirement) in depends, requirement
    assert {"python3-light", "python3-asyncio", "python3-logging"} <= depends


def test_hard_depends_are_exactly_what_the_kernel_datapath_uses() -> None:
    """Python, its runtime libraries, kernel ESP, AF_ALG, the ESP self-test's veth and
    network namespaces, nft and its NAT module (the LAN gateway's SNAT table): nothing
    else lands on a router that never runs the userspace datapath."""
    depends, symbols = _depends()
    python = {"python3-light", "python3-asyncio", "python3-logging", "python3-ctypes"}
    python |= {_feed_name(r) for r in PYPROJECT["project"]["dependencies"]}
    assert depends == python | KERNEL_DATAPATH
    assert symbols == KERNEL_CONFIG


def test_userspace_datapath_and_optional_features_are_named_not_installed() -> None:
    depends, _ = _depends()
    assert not depends & OPTIONAL, f"{sorted(depends & OPTIONAL)} must not be hard DEPENDS"
    text = _description()
    for name in sorted(OPTIONAL):
        assert re.search(rf"\b{re.escape(name)}\b", text), f"{name} not in the description"
    assert "option datapath userspace" in text
    assert "nft_compat" in text and "5.16" in text and "24.10" in text
    # why these are not DEPENDS is said where a packager reads it
    assert 'OpenWrt has no "Recommends"' in _text()


def test_optional_python_extras_are_described_not_depended_on() -> None:
    depends, _ = _depends()
    extras = PYPROJECT["project"].get("optional-dependencies", {})
    assert extras, "pyproject lost its optional dependencies (pyudev for hotplug)"
    for requirements in extras.values():
        for r in requirements:
            name = _feed_name(r)
            assert name not in depends and name in _description(), r


def test_every_kmod_the_code_or_docs_name_is_a_dependency_or_described() -> None:
    """An error message or a doc telling the user to install kmod-X: the package says so
    too (as a dependency or in its description)."""
    depends, _ = _depends()
    text = _description()
    named: dict[str, str] = {}
    for path in [*(REPO / "src").rglob("*.py"), *(REPO / "docs").glob("*.md"), REPO / "README.md"]:
        for kmod in re.findall(r"\bkmod-[a-z0-9]+(?:-[a-z0-9]+)*", path.read_text()):
            named.setdefault(kmod, str(path.relative_to(REPO)))
    assert "kmod-veth" in named and "kmod-cryptodev" in named
    for kmod, where in sorted(named.items()):
        assert kmod in depends or re.search(rf"\b{kmod}\b", text), f"{kmod} (named in {where})"


def test_the_kat_vectors_ship_with_the_package() -> None:
    """The daemon reads offload/vectors/*.json from disk before it trusts an engine: they
    are package data of the wheel, and the recipe keeps Py3Package's default filespec,
    which installs all of site-packages (only *.py are compiled away)."""
    text = _text()
    assert "Py3Package/python3-oe/filespec" not in text, "a filespec could leave data out"
    assert "-|" not in text
    assert "vectors" in text
    package_dir = REPO / "src" / "oe_router"
    globs = PYPROJECT["tool"]["setuptools"]["package-data"]["oe_router"]
    folder = package_dir / "offload" / "vectors"
    files = sorted(p for p in folder.iterdir() if p.is_file())
    needed = {vector_file(t) for t in TRANSFORMS.values()}
    assert needed <= {p.name for p in files}
    for p in files:
        rel = p.relative_to(package_dir).as_posix()
        assert any(fnmatch.fnmatch(rel, g) for g in globs), f"{rel} is not package data"


def test_conffiles_list_the_uci_config() -> None:
    assert _define("Package/python3-oe/conffiles").split() == ["/etc/config/oe"]


def test_installed_files_exist_and_entry_points_are_the_project_scripts() -> None:
    body = _define("Py3Package/python3-oe/install")
    sources = re.findall(r"\$\(CURDIR\)/\.\./\.\./(\S+)", body)
    assert sorted(sources) == [
        "files/etc/config/oe",
        "files/etc/init.d/oe",
        "files/etc/uci-defaults/90_oe-firewall",
        "files/etc/uci-defaults/91_oe-dns",
        "files/lib/upgrade/keep.d/python3-oe",
        "files/usr/share/rpcd/acl.d/oe.json",
    ]
    for rel in sources:
        assert (REPO / rel).is_file(), f"{rel} is installed by the package but does not exist"
    assert "$(INSTALL_BIN) $(CURDIR)/../../files/etc/init.d/oe" in body
    assert "$(INSTALL_CONF) $(CURDIR)/../../files/etc/config/oe" in body
    for script in ("90_oe-firewall", "91_oe-dns"):
        assert f"$(INSTALL_BIN) $(CURDIR)/../../files/etc/uci-defaults/{script}" in body
    # sysupgrade keeps /etc/oe: the RFC 5011 anchor state and the identity key
    keep = "$(INSTALL_DATA) $(CURDIR)/../../files/lib/upgrade/keep.d/python3-oe"
    assert keep in body
    kept = (REPO / "files/lib/upgrade/keep.d/python3-oe").read_text().splitlines()
    assert [line for line in kept if line and not line.startswith("#")] == ["/etc/oe/"]
    # rpcd's ACL for the ubus object: read and write granted separately
    assert "$(INSTALL_DATA) $(CURDIR)/../../files/usr/share/rpcd/acl.d/oe.json" in body
    wrappers = set(re.findall(r"\$\(PKG_INSTALL_DIR\)/usr/bin/(\S+)", body))
    assert wrappers == set(PYPROJECT["project"]["scripts"])


def test_gnu_make_parses_the_recipe_with_empty_buildroot_standins(tmp_path: Path) -> None:
    """Stand-ins for rules.mk/package.mk/python3-package.mk: this checks syntax, not a build."""
    make = shutil.which("make")
    assert make is not None, "GNU make is needed (scripts/apt-packages.txt)"
    include = tmp_path / "include"
    pylang = tmp_path / "feeds" / "packages" / "lang" / "python"
    include.mkdir()
    pylang.mkdir(parents=True)
    (tmp_path / "rules.mk").write_text("BUILD_DIR:=/build\n")
    (include / "package.mk").write_text("")
    (pylang / "python3-package.mk").write_text("Py3Package=\nBuildPackage=\n")
    probe = tmp_path / "probe.mk"
    probe.write_text(
        "probe:\n"
        "\t@echo 'NAME=$(PKG_NAME)'\n"
        "\t@echo 'BUILD_DIR=$(PKG_BUILD_DIR)'\n"
        "\t@echo 'CONFFILES=$(strip $(Package/python3-oe/conffiles))'\n"
    )
    proc = subprocess.run(
        [
            make,
            "-s",
            "-C",
            str(MAKEFILE.parent),
            "-f",
            "Makefile",
            "-f",
            str(probe),
            "probe",
            f"TOPDIR={tmp_path}",
            f"INCLUDE_DIR={include}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "NAME=python-oe",
        f"BUILD_DIR=/build/python_oe-{PYPROJECT['project']['version']}",
        "CONFFILES=/etc/config/oe",
    ]


def test_uci_defaults_put_the_userspace_tun_device_in_the_wan_zone() -> None:
    """fw4 forwards only between zones: the TUN device the userspace datapath routes LAN
    flows into must be in the wan zone, under the name the datapath gives it."""
    from oe_router.datapath.userspace import UserspaceSettings

    script = (REPO / "files/etc/uci-defaults/90_oe-firewall").read_text()
    assert f"dev={UserspaceSettings().tun_name}\n" in script
    assert 'uci add_list "firewall.$zone.device=$dev"' in script
    assert "name='wan'" in script and "uci commit firewall" in script
    assert subprocess.run(["sh", "-n", "-c", script]).returncode == 0


def test_uci_defaults_open_ike_and_esp_on_wan_and_prerm_deletes_those_rules() -> None:
    """The firewall rules are sections the package names (found again on a re-run); the
    prerm deletes exactly those. tests/host/test_package_uci_defaults.py runs both."""
    script = (REPO / "files/etc/uci-defaults/90_oe-firewall").read_text()
    created = re.findall(r"^\s*set firewall\.(\w+)=rule$", script, re.M)
    assert created == ["oe_ike", "oe_esp"]
    for name in created:
        assert f"set firewall.{name}.src='wan'" in script
        assert f"set firewall.{name}.target='ACCEPT'" in script
        assert f"set firewall.{name}.family='any'" in script
    assert "add_list firewall.oe_ike.dest_port='500'" in script
    assert "add_list firewall.oe_ike.dest_port='4500'" in script
    assert "set firewall.oe_esp.proto='esp'" in script
    prerm = _define("Package/python3-oe/prerm")
    assert f"for rule in {' '.join(created)}; do" in prerm


def test_dns_uci_defaults_and_prerm_share_the_old_packages_record() -> None:
    """91_oe-dns (the migration at upgrade) and the prerm (removal) undo the same record an
    older package wrote (under /etc/oe, which sysupgrade keeps), and neither points dnsmasq
    at the front any more: the daemon's DNS capture does that while the front runs."""
    script = (REPO / "files/etc/uci-defaults/91_oe-dns").read_text()
    prerm = _define("Package/python3-oe/prerm").replace("$$", "$")
    assert "record=/etc/oe/dnsmasq.undo\n" in script
    assert 'record="${IPKG_INSTROOT}/etc/oe/dnsmasq.undo"' in prerm
    kept = (REPO / "files/lib/upgrade/keep.d/python3-oe").read_text().split()
    assert "/etc/oe/" in kept
    for text in (script, prerm):
        assert "add_list" not in text and "noresolv=1" not in text
        assert subprocess.run(["sh", "-n", "-c", text]).returncode == 0


def test_nft_the_daemon_runs_is_the_variant_firewall4_uses() -> None:
    """The daemon execs nft (datapath/nft.py, datapath/nft_spd.py): DEPENDS names the
    nftables variant fw4 depends on (nftables-nojson conflicts with it), and says why."""
    sources = "\n".join(
        p.read_text() for p in (REPO / "src" / "oe_router" / "datapath").glob("nft*.py")
    )
    assert 'nft: str = "nft"' in sources
    depends, _ = _depends()
    assert "nftables-json" in depends and "nftables-nojson" not in depends
    assert "firewall4" in _text() and "nftables-nojson conflicts" in _text()
