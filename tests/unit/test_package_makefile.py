"""package/python-oe/Makefile: the OpenWrt package recipe agrees with pyproject and files/.

The OpenWrt buildroot does not exist on this host, so the recipe is not built here. These
tests check what can be checked without it: the openwrt/packages conventions (includes,
Py3Package, -src package), that GNU make parses the file with empty stand-ins for the
buildroot's include files, and that every installed file and entry point exists.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MAKEFILE = REPO / "package" / "python-oe" / "Makefile"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


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


def test_depends_cover_every_runtime_dependency_with_feed_names() -> None:
    body = _define("Package/python3-oe")
    for key in ("SECTION", "CATEGORY", "TITLE", "URL"):
        assert re.search(rf"^\s*{key}:=\S", body, re.M), key
    depends = set(re.findall(r"\+([\w.-]+)", body))
    feed = {"cryptography": "python3-cryptography", "dnspython": "python3-dns"}
    for requirement in PYPROJECT["project"]["dependencies"]:
        name = re.split(r"[<>=!~ ]", requirement, maxsplit=1)[0]
        assert feed.get(name, f"python3-{name}") in depends, requirement
    assert {"python3-light", "python3-asyncio", "python3-logging"} <= depends


def test_conffiles_list_the_uci_config() -> None:
    assert _define("Package/python3-oe/conffiles").split() == ["/etc/config/oe"]


def test_installed_files_exist_and_entry_points_are_the_project_scripts() -> None:
    body = _define("Py3Package/python3-oe/install")
    sources = re.findall(r"\$\(CURDIR\)/\.\./\.\./(\S+)", body)
    assert sorted(sources) == ["files/etc/config/oe", "files/etc/init.d/oe"]
    for rel in sources:
        assert (REPO / rel).is_file(), f"{rel} is installed by the package but does not exist"
    assert "$(INSTALL_BIN) $(CURDIR)/../../files/etc/init.d/oe" in body
    assert "$(INSTALL_CONF) $(CURDIR)/../../files/etc/config/oe" in body
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
