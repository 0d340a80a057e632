"""Build OpenWrt's userland (libubox, ubus, uci, ucode, procd, rpcd, opkg ...) from source, cached.

Why: OpenWrt's binaries cannot be downloaded here, but their sources build on Debian with
cmake in about half a minute. The tests use the result as the reference (the real libuci
judges the project's UCI parser, the real ubusd hosts the ubus shim, the real opkg installs
the .ipk), and the router image will carry it.

Sources are pinned snapshots: ``VENDOR_DIR/openwrt/NAME-SHA7.tar.gz`` (VENDOR_DIR defaults to
../shared/vendor beside the repository), else the same commit from GitHub, checked against
the hashes in SNAPSHOTS as OpenWrt's PKG_SOURCE/PKG_HASH check theirs. The staging root
(``usr/bin``, ``usr/lib``, ``usr/include``, ``sbin``, ``lib`` ... as installed, executables at
OpenWrt's paths) is cached under ``~/.cache/oe-router/userland/<key>/root``, the key hashing
the snapshots, the recipes below and the host compiler; ``stamp.json`` beside it says what
was built, from where, and how long each component took.

Run ``python qemu/userland.py`` (``--components uci,ubus``, ``--print-root``, ``--force``).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import ctypes
import fcntl
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from build import BuildError, _sha, _tree_sha256, default_cache, vendor_dir

FORMAT = "1"  # bump when the build steps below change what lands in the root
FILES = Path(__file__).resolve().parent / "userland-files"
#: GitHub's archive endpoint; OE_USERLAND_FETCH_BASE overrides it (a mirror, a test server,
#: or "off" to never fetch)
FETCH_BASE = "https://codeload.github.com"

Log = Callable[[str], None]


@dataclass(frozen=True)
class Snapshot:
    """One pinned upstream commit and the hashes that identify its files.

    ``archive_sha256`` is the vendored file's; ``tree_sha256`` hashes its files (path below
    the top folder, content), the same for GitHub's archive of the commit, whose top folder
    and compression differ.
    """

    name: str
    repo: str
    commit: str
    archive_sha256: str
    tree_sha256: str

    @property
    def archive(self) -> str:
        return f"{self.name}-{self.commit[:7]}.tar.gz"


# Hashes computed from the vendored archives (git archive of each commit, 2026-12-06).
SNAPSHOTS = {
    s.name: s
    for s in (
        Snapshot(
            "libubox",
            "openwrt/libubox",
            "1aa36ee774c8db4d7a396903e0d2e1fb79ee8bf1",
            "356985ae10f651acafad1522282c1283284963927a9552085a86dd15cc5297ba",
            "6c81b85c458652cd82eeb6b4d8a82c14beb5bf612dfe0511fdf6537c897ac545",
        ),
        Snapshot(
            "ubus",
            "openwrt/ubus",
            "3cc98db1a422dcf560f2d6347fd410f17565a89d",
            "e6165c35251bbfa94a700c5c9990d1fb413df0d6251f14db05c7e45dcf8f54f3",
            "1a926b0bf1c511193075966ab1c505db7e9d0d86dedd8a037d6c57d0096a8b3c",
        ),
        Snapshot(
            "uci",
            "openwrt/uci",
            "66127cd76c5d0bd46d5a90302cc6110f53a4e2f8",
            "1a2c65a337a921ceb405641f1352e8238c2e526a0b546a33b7428961ae41cbf4",
            "ebb5dcdcfb957b5b7adf87228deafb3fa4fb9da65aea4595618cbd68bf11850e",
        ),
        Snapshot(
            "ucode",
            "jow-/ucode",
            "81205a25437a83e3b9e1eb55ac169be84453d53b",
            "bab3abb69644cb592fca78aa3028b454ec4dfae43b8828bd866df9a008aff030",
            "868e1bb39fde588151d0289027c29dc79bf44f4c02e1c4b7e18ba7fa5a634da1",
        ),
        Snapshot(
            "udebug",
            "openwrt/udebug",
            "875e1a7af6ca9d86524d18169c3a79f4a1920053",
            "92a84f330a72733bb342d68340354e454ba40d785ff9cead423ffe1970f328ec",
            "b73b1babadd8ed396e4edce3a74b035c39d7ee0e202bd160e6c0b8a6965f05c4",
        ),
        Snapshot(
            "ubox",
            "openwrt/ubox",
            "6f78fa496bf36c55864a41e353df7d13f04b1077",
            "a078b7b4316fe7151024c5fc45cc0f73f5348a01fa99b237a7a7cd319e4471e2",
            "f8945863639bee2bd8507486c7f7e8740248572b9666f0e75b6778ea8589608b",
        ),
        Snapshot(
            "jsonpath",
            "openwrt/jsonpath",
            "e5a07f468508f5e599723373445d442623ece70d",
            "9749ffcb8c4c8bf2cfd2bee8511f692285a2021986fe258968fa06b5960e391b",
            "5d2f1174238a19ea2aa71c94142769466c8cad81fb1b9871b26ec65aac93a1a4",
        ),
        Snapshot(
            "procd",
            "openwrt/procd",
            "2c1834abae171261f2d9161e5a28c36cbcc394a4",
            "9f62a8e51a853a3acb514c5199aa66f45863c518f39f466178186a9f89a61f8b",
            "700f6304f41de914dbbba8b6ca8779e1cdb9fb2bdc70f63e59dfb410a00fa33c",
        ),
        Snapshot(
            "rpcd",
            "openwrt/rpcd",
            "4476687403d8c6e988eaa1ecc892e998838e6da9",
            "447bcb5bb09169987b404989c1dfdc2b2ddf1735d8d48c6d02b3d5e7ba7bc270",
            "77113d619e1fe94561a1fc1096db2af494627f66785597f75b6170627a1b60ce",
        ),
        Snapshot(
            "uhttpd",
            "openwrt/uhttpd",
            "f682ccabee9ed5f39dd3b0aaf96228975eeb478d",
            "aa57a8bb4e1871ab83f25c453e111bb89c0784b8371164e339aed5735189436c",
            "aa0a2b3d1d6427ad3a3b7db4e8fe2b2a1f10c3f510d62612af43713a4f9eceb2",
        ),
        Snapshot(
            "opkg-lede",
            "openwrt/opkg-lede",
            "38eccbb1fd694d4798ac1baf88f9ba83d1eac616",
            "49a9b0c857154911a4d1fcae9ee3ad4ebbd4e4cccf5057cc7f8945dc9ece11e1",
            "a6d6c0425e110cb6be1d769e32139185534bf9a3da1760459095e4f5fb5682dd",
        ),
        Snapshot(
            "libnl-tiny",
            "openwrt/libnl-tiny",
            "feca1d341d4baa9579ec62762672aa0f20edf564",
            "1d05accdb2f4ff72b088c3a5a2f8f0ff8937fe8beba10d4db1a8ff9572e6502e",
            "53905aaf383c4fbfbbf8a523449be091c37e6c7d264c0297aac3815d3cb0f671",
        ),
        Snapshot(
            "netifd",
            "openwrt/netifd",
            "e97e36f9b5b545866c40d9803bd39e257389647e",
            "9514f271c87fb0c1dbb33f9f280293d62bfed4f981c3759c2282a8e6063ae0ef",
            "45cf480643b169b9d5b19f7052f5a1ad289a0ba592f2b943df469e01fa9182d4",
        ),
        Snapshot(
            "iwinfo",
            "openwrt/iwinfo",
            "f5dd57a84cc31a403a1383dd14944fa2e2b5824a",
            "7614726792bac3024d1631493ea8c941f99a4bec14f90b6400b59352a26b851c",
            "5e550b7a64d15975c5b9a6b3ee3b895871e2ef6a3d6f4ce8c71f6e99ba532888",
        ),
        Snapshot(
            "lucihttp",
            "jow-/lucihttp",
            "9b5b683fbb2bb0010aa031d620d0ab8105516757",
            "6d3a1deb6b72a0a654d17a199051d237a8e5bc7cb5f1ba19fdf478d86f35d7d5",
            "99a8e4b6bda688e6008072d6583ec2069484b12a84e8657425c119e7a3ed4438",
        ),
        Snapshot(
            "cgi-io",
            "openwrt/cgi-io",
            "901b0f0463c9d16a8cf5b9ed37118d8484bc9176",
            "56afd630f0a4c59001aaccf12e06a48ad192d9f990549e4ceec5b7a3902973dc",
            "93824f2157f789113f31f596bf6718d4ec2ae7eba24a0a05b7a2c153cc094307",
        ),
        # A fork of openwrt/luci (upstream's repository is too large to vendor); its archive
        # carries no commit id, so the pin is the 12-digit prefix the vendor README gives
        # (GitHub's archive endpoint resolves it).
        Snapshot(
            "luci",
            "MorseMicro/luci",
            "d5950a9fa5a5",
            "21887ae3623848ca777fa0ba41168ff6f54305f2db80aea9706b7b62d0f843ec",
            "46d484a176cd7a0dfd1527c3b3b05118c4a67acdaec327d2291bac476d1fc10a",
        ),
        Snapshot(
            "firewall4",
            "openwrt/firewall4",
            "b6e5157527d361f99ad52eaa6da273cb0f2dfd59",
            "51f3714d34ca88054ef761c923430fd800d1ad863a40d1872984ba3671b26724",
            "5bf8d6e66ebc531e936727277b4470ec23cdb14847741b5566da9dc7d1dae9a4",
        ),
    )
}

#: VENDOR_DIR/openwrt/base-files: copies of single files from openwrt/openwrt (rc.common,
#: functions.sh, procd.sh ... see its SOURCES.md). There is no one upstream commit to fetch
#: them from, so they must be vendored; this hashes the folder as the snapshots' trees are.
BASE_FILES_SHA256 = "f343b0f11f46bc70115324be6a96b06733cf3887dd879da150b74a18f1260b0d"


@dataclass(frozen=True)
class Component:
    """How one snapshot is built and where its files go.

    ``cflags`` hold the glibc/gcc-12 fixes BUILD-NOTES.md measured; ``layout`` moves what
    cmake installed under /usr to the path OpenWrt's package puts it (scripts name
    /sbin/uci, /sbin/validate_data, /usr/bin/jsonfilter ...). ``stage_includes`` are
    folders below the stage's usr/include (a library's .pc names the router's
    /usr/include/X, not the stage's); ``compat_includes`` are folders of userland-files
    searched before the system headers (names of newer kernel uapi headers than the host's).
    ``copies`` are folders or files of the source tree that OpenWrt's package copies into
    the root beside what cmake installs (netifd's shell helpers into /lib/netifd).
    """

    name: str
    needs: tuple[str, ...] = ()
    cmake: tuple[str, ...] = ()
    cflags: tuple[str, ...] = ()
    ldflags: tuple[str, ...] = ()
    strl_compat: bool = False
    stage_includes: tuple[str, ...] = ()
    compat_includes: tuple[str, ...] = ()
    patches: tuple[str, ...] = ()
    in_source: bool = False
    layout: tuple[tuple[str, str], ...] = ()
    copies: tuple[tuple[str, str], ...] = ()
    files: str | None = None  # not built: this folder of the snapshot is copied into the root
    #: the snapshot it is built from (default: its own name; the luci archive holds several
    #: packages) and the folder of it that is the package's source
    snapshot: str | None = None
    subdir: str = ""
    #: how it is built: "cmake"; "make" (a plain Makefile: ``args`` are make's); "cc" (one
    #: compiler call, ``args``; ucode-mod-html); "luci" (luci.mk's install: ucode/ to
    #: /usr/share/ucode/luci, htdocs/ to /www, root/ to /, and src/Makefile when present)
    kind: str = "cmake"
    args: tuple[str, ...] = ()
    #: for "make" and "cc": files of the build folder -> their path in the root (the package
    #: Makefile's install step); folders are copied whole
    installs: tuple[tuple[str, str], ...] = ()
    #: symlinks the package makes: path in the root -> target
    links: tuple[tuple[str, str], ...] = ()

    @property
    def source(self) -> str:
        """The snapshot (or base-files) this component is built from."""
        return self.snapshot or self.name


# In build order; a component only starts when those it needs are installed in the stage.
COMPONENTS = {
    c.name: c
    for c in (
        Component("libubox", cmake=("-DBUILD_LUA=OFF", "-DBUILD_EXAMPLES=OFF")),
        Component(
            "ubus",
            ("libubox",),
            cmake=("-DBUILD_LUA=OFF", "-DBUILD_EXAMPLES=OFF"),
            layout=(("usr/sbin/ubusd", "sbin/ubusd"), ("usr/bin/ubus", "bin/ubus")),
        ),
        Component(
            "uci",
            ("libubox",),
            cmake=("-DBUILD_LUA=OFF",),
            layout=(("usr/bin/uci", "sbin/uci"),),
        ),
        Component(
            "opkg-lede",
            ("libubox",),
            # VERSION: cmake would ask git, and a snapshot has no .git
            cmake=(
                "-DBUILD_TESTS=OFF",
                "-DENABLE_USIGN=OFF",
                f"-DVERSION={SNAPSHOTS['opkg-lede'].commit[:7]}",
            ),
            layout=(("usr/bin/opkg-cl", "bin/opkg"),),
        ),
        Component(
            "ucode",
            ("libubox", "ubus", "uci"),
            # rtnl/nl80211 need libnl-tiny; ucode defines _GNU_SOURCE itself (its users below
            # need -D_GNU_SOURCE=: vasprintf in ucode's util.h, which musl always declares)
            cmake=(
                "-DRTNL_SUPPORT=OFF",
                "-DNL80211_SUPPORT=OFF",
                "-DUBUS_SUPPORT=ON",
                "-DUCI_SUPPORT=ON",
                "-DULOOP_SUPPORT=ON",
                "-DZLIB_SUPPORT=ON",
                "-DDIGEST_SUPPORT=ON",
            ),
        ),
        Component(
            "udebug",
            ("libubox", "ubus", "ucode"),
            layout=(("usr/sbin/udebugd", "sbin/udebugd"),),
        ),
        Component(
            "ubox",
            ("libubox", "ubus", "uci", "udebug"),
            strl_compat=True,  # no -D_GNU_SOURCE: lsbloader.c defines __USE_GNU itself
            layout=tuple(
                (f"usr/sbin/{b}", f"sbin/{b}")
                for b in ("kmodloader", "validate_data", "logd", "logread")
            ),
        ),
        Component(
            "procd",
            ("libubox", "ubus", "uci", "udebug"),
            cmake=("-DSECCOMP_SUPPORT=OFF", "-DJAIL_SUPPORT=OFF", "-DUTRACE_SUPPORT=OFF"),
            # gcc 12: a NULL %s in signal.c; glibc < 2.38 has no strlcpy
            cflags=("-Wno-error=format-overflow",),
            strl_compat=True,
            layout=tuple(
                (f"usr/sbin/{b}", f"sbin/{b}") for b in ("procd", "init", "askfirst", "udevtrigger")
            ),
        ),
        Component(
            "rpcd",
            ("libubox", "ubus", "uci", "ucode"),
            cmake=("-DIWINFO_SUPPORT=OFF",),
            # empty, so the sources' own #define _GNU_SOURCE is no redefinition
            cflags=("-D_GNU_SOURCE=",),
            strl_compat=True,
            layout=(("usr/sbin/rpcd", "sbin/rpcd"),),
            # its InstallDev: the plugin API rpcd-mod-luci builds against; its package: the
            # ACL group that lets the null session log in over /ubus
            copies=(
                ("include/rpcd", "usr/include/rpcd"),
                ("unauthenticated.json", "usr/share/rpcd/acl.d/unauthenticated.json"),
            ),
        ),
        Component(
            "uhttpd",
            ("libubox", "ubus", "ucode"),
            cmake=("-DTLS_SUPPORT=OFF", "-DLUA_SUPPORT=OFF"),
            # gcc 12 false positive in client.c
            cflags=("-D_GNU_SOURCE=", "-Wno-error=stringop-overread"),
            layout=(("usr/bin/uhttpd", "usr/sbin/uhttpd"),),
        ),
        Component(
            "jsonpath",
            ("libubox",),
            patches=("jsonpath-stdin.patch",),
            in_source=True,  # lemon writes contrib/lemon and parser.c beside the sources
            layout=(("usr/bin/jsonpath", "usr/bin/jsonfilter"),),
        ),
        Component("libnl-tiny"),
        Component(
            "netifd",
            ("libubox", "ubus", "uci", "ucode", "udebug", "libnl-tiny"),
            # ucode's util.h needs vasprintf, as for rpcd; the C33 PSE names of Linux >= 6.11
            # uapi that Debian 12's 6.1 headers lack; libnl-tiny.pc names /usr/include/libnl-tiny
            cflags=("-D_GNU_SOURCE=",),
            stage_includes=("libnl-tiny",),
            compat_includes=("uapi-compat",),
            in_source=True,  # its cmake runs ./make_ethtool_modes_h.sh in the build folder
            layout=(("usr/sbin/netifd", "sbin/netifd"),),
            # netifd-proto.sh, utils.sh ...: what protocol handlers source (package Makefile:
            # $(CP) $(PKG_BUILD_DIR)/scripts/* $(1)/lib/netifd/)
            copies=(("scripts", "lib/netifd"),),
        ),
        # LuCI's stack (luci-base's DEPENDS, built as their OpenWrt Makefiles install them)
        Component(
            "iwinfo",
            ("libubox", "ubus", "uci", "libnl-tiny"),
            # rpcd-mod-luci's PKG_BUILD_DEPENDS: its header, and the library luci.so
            # dlopens (/usr/lib/libiwinfo.so*); the nl80211 backend, as on x86 targets
            kind="make",
            args=("libiwinfo.so", "BACKENDS=nl80211", "SOVERSION=0"),
            # struct ucred (libnl-tiny's msg.h) and FNM_CASEFOLD: glibc declares them only
            # under _GNU_SOURCE (musl always)
            cflags=("-D_GNU_SOURCE=",),
            stage_includes=("libnl-tiny",),
            installs=(
                ("libiwinfo.so.0", "usr/lib/libiwinfo.so.0"),
                ("include/iwinfo.h", "usr/include/iwinfo.h"),
                ("include/iwinfo", "usr/include/iwinfo"),
                ("devices.txt", "usr/share/libiwinfo/devices.txt"),
            ),
            links=(("usr/lib/libiwinfo.so", "libiwinfo.so.0"),),
        ),
        Component(
            "lucihttp",
            ("ucode",),
            cmake=("-DBUILD_LUA=OFF", "-DBUILD_UCODE=ON", "-DBUILD_TESTS=OFF"),
            cflags=("-D_GNU_SOURCE=",),  # ucode's util.h (vasprintf)
        ),
        Component(
            "cgi-io",
            ("libubox", "ubus"),
            # its package: /usr/libexec/cgi-io, called as the CGIs of /www/cgi-bin
            layout=(("usr/sbin/cgi-io", "usr/libexec/cgi-io"),),
            links=tuple(
                (f"www/cgi-bin/cgi-{n}", "../../usr/libexec/cgi-io")
                for n in ("upload", "download", "backup", "exec")
            ),
        ),
        Component(
            "ucode-mod-html",
            ("ucode",),
            snapshot="luci",
            subdir="contrib/package/ucode-mod-html/src",
            kind="cc",
            cflags=("-D_GNU_SOURCE=",),
            args=("-Wall", "-ffunction-sections", "-Wl,--gc-sections", "-shared"),
            installs=(("html.so", "usr/lib/ucode/html.so"),),
        ),
        Component(
            "rpcd-mod-luci",
            ("libubox", "ubus", "uci", "rpcd", "iwinfo", "libnl-tiny"),
            snapshot="luci",
            subdir="libs/rpcd-mod-luci/src",
            cmake=("-DLIBNL_LIBS=-lnl-tiny",),
            cflags=("-D_GNU_SOURCE=",),
            stage_includes=("libnl-tiny",),
            layout=(("usr/lib/luci.so", "usr/lib/rpcd/luci.so"),),
        ),
        Component(
            "luci-base",
            # its DEPENDS (built first, so `--components luci-base` brings the whole stack)
            ("ucode", "rpcd", "uhttpd", "rpcd-mod-luci", "cgi-io", "ucode-mod-html", "lucihttp"),
            snapshot="luci",
            subdir="modules/luci-base",
            kind="luci",
            # core.so's link line names -lcrypt before its objects, so the toolchain's
            # --as-needed drops it: luci.core's crypt() then fails to bind (glibc keeps
            # crypt in libcrypt; musl, in libc)
            ldflags=("-Wl,--no-as-needed", "-lcrypt"),
        ),
        Component(
            "luci-theme-bootstrap",
            ("luci-base",),
            snapshot="luci",
            subdir="themes/luci-theme-bootstrap",
            kind="luci",
        ),
        Component("firewall4", files="root"),
        Component("base-files"),
    )
}
DEFAULT = tuple(COMPONENTS)


@dataclass(frozen=True)
class UserlandBuild:
    """A built staging root and how to run its tools on this host."""

    root: Path

    def tool(self, name: str) -> Path:
        """The executable ``name`` in the root's bin, sbin, usr/bin or usr/sbin."""
        for sub in ("bin", "sbin", "usr/bin", "usr/sbin"):
            path = self.root / sub / name
            if path.is_file():
                return path
        built = ", ".join(self.stamp().get("components", {})) or "nothing"
        raise FileNotFoundError(f"{name}: not in {self.root} (built: {built})")

    def env(self) -> dict[str, str]:
        """This process's environment plus what the root's tools need to run here.

        LD_LIBRARY_PATH finds the root's libraries (they are installed for /usr/lib of a
        router, without rpath); PATH puts the root's tools first, so scripts that call
        ``uci`` or ``jsonfilter`` get these ones.
        """
        env = dict(os.environ)
        libs = [str(self.root / "usr" / "lib"), str(self.root / "lib")]
        if env.get("LD_LIBRARY_PATH"):
            libs.append(env["LD_LIBRARY_PATH"])
        env["LD_LIBRARY_PATH"] = ":".join(libs)
        bins = [str(self.root / d) for d in ("usr/sbin", "usr/bin", "sbin", "bin")]
        env["PATH"] = ":".join([*bins, env.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")])
        return env

    @property
    def stamp_path(self) -> Path:
        return self.root.parent / "stamp.json"

    def stamp(self) -> dict[str, Any]:
        """What was built, from which snapshot, and the build times (stamp.json)."""
        try:
            data: dict[str, Any] = json.loads(self.stamp_path.read_text())
        except (OSError, ValueError):
            return {}
        return data


#: other names the components go by (the program or OpenWrt package name)
ALIASES = {"opkg": "opkg-lede", "jsonfilter": "jsonpath", "fw4": "firewall4"}


def select(components: Sequence[str] | None) -> list[str]:
    """The components asked for plus those they need, in build order."""
    wanted = {ALIASES.get(c, c) for c in (DEFAULT if components is None else components)}
    unknown = sorted(wanted - set(COMPONENTS))
    if unknown:
        raise BuildError(
            f"unknown userland component(s) {', '.join(unknown)}; known: {', '.join(COMPONENTS)}"
        )
    todo = list(wanted)
    while todo:
        for dep in COMPONENTS[todo.pop()].needs:
            if dep not in wanted:
                wanted.add(dep)
                todo.append(dep)
    return [c for c in COMPONENTS if c in wanted]


def _libc_has_strlcpy() -> bool:
    return hasattr(ctypes.CDLL(None), "strlcpy")


def _host() -> dict[str, str]:
    """What of this host goes into the binaries (and so into the cache key)."""
    try:
        gcc = subprocess.run(
            ["gcc", "-dumpfullversion"], capture_output=True, text=True, check=False
        ).stdout.strip()
    except OSError:
        gcc = "none"
    libc = " ".join(platform.libc_ver())
    return {
        "machine": platform.machine(),
        "gcc": gcc or "none",
        "libc": libc,
        "strlcpy": "libc" if _libc_has_strlcpy() else "compat header",
    }


def _recipe_parts(names: Sequence[str], host: dict[str, str]) -> list[bytes | str]:
    parts: list[bytes | str] = [FORMAT, json.dumps(host, sort_keys=True)]
    for name in names:
        comp = COMPONENTS[name]
        parts.append(repr(comp))
        parts.append(
            BASE_FILES_SHA256 if name == "base-files" else SNAPSHOTS[comp.source].tree_sha256
        )
        parts += [(FILES / p).read_bytes() for p in comp.patches]
        parts += [dir_sha256(FILES / d) for d in comp.compat_includes]
        if comp.strl_compat:
            parts.append((FILES / "strl-compat.h").read_bytes())
    return parts


def cache_key(names: Sequence[str]) -> str:
    return _sha(_recipe_parts(names, _host()))


# ------------------------------------------------------------------------------------- sources


def dir_sha256(folder: Path) -> str:
    """sha256 over a folder's files (relative path, content), as _tree_sha256 hashes a tarball."""
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() or p.is_symlink()):
        rel = str(path.relative_to(folder)).encode()
        data = b"->" + os.readlink(path).encode() if path.is_symlink() else path.read_bytes()
        h.update(len(rel).to_bytes(8, "big") + rel + len(data).to_bytes(8, "big") + data)
    return h.hexdigest()


def _fetch_base() -> str:
    return os.environ.get("OE_USERLAND_FETCH_BASE", FETCH_BASE).rstrip("/")


def fetch_url(snap: Snapshot) -> str:
    return f"{_fetch_base()}/{snap.repo}/tar.gz/{snap.commit}"


def _fetch(snap: Snapshot, cache: Path, log: Log) -> Path:
    """GitHub's archive of the pinned commit, kept in the cache once its files hash right."""
    dest = cache / "userland" / "src" / f"{snap.name}-{snap.commit}.tar.gz"
    if dest.is_file():
        return dest
    if _fetch_base() in ("", "off"):
        raise OSError("fetching is off (OE_USERLAND_FETCH_BASE)")
    url = fetch_url(snap)
    log(f"userland: fetching {snap.name} {snap.commit[:12]} from {url}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(f".part{os.getpid()}")
    try:
        with urllib.request.urlopen(url, timeout=60) as r:
            tmp.write_bytes(r.read())
        digest = _tree_sha256(tmp)
    except (tarfile.TarError, EOFError) as exc:
        tmp.unlink(missing_ok=True)
        raise OSError(f"{url} is not a readable tarball: {exc}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if digest != snap.tree_sha256:
        tmp.unlink(missing_ok=True)
        raise BuildError(
            f"{snap.name}: {url} has files hashing to {digest}, not the pinned "
            f"{snap.tree_sha256} of commit {snap.commit[:12]} (wrong or altered snapshot)"
        )
    tmp.rename(dest)
    return dest


def sources(
    names: Sequence[str], vendor: Path, cache: Path, log: Log
) -> dict[str, tuple[Path, str]]:
    """Each component's checked source (archive, or base-files' folder) and where it came from.

    Vendored archives must match their recorded sha256; missing ones are fetched by commit
    and must match the recorded file hash. Everything that is missing is named in one error.
    """
    found: dict[str, tuple[Path, str]] = {}
    missing: list[str] = []
    for name in names:
        if name == "base-files":
            folder = vendor / "openwrt" / "base-files"
            if not folder.is_dir():
                missing.append(f"base-files (folder {folder}; vendored only, not fetchable)")
                continue
            digest = dir_sha256(folder)
            if digest != BASE_FILES_SHA256:
                raise BuildError(
                    f"base-files: {folder} hashes to {digest}, not the pinned {BASE_FILES_SHA256}"
                )
            found[name] = (folder, f"vendored {folder}")
            continue
        snap = SNAPSHOTS[COMPONENTS[name].source]
        vendored = vendor / "openwrt" / snap.archive
        if vendored.is_file():
            digest = hashlib.sha256(vendored.read_bytes()).hexdigest()
            if digest != snap.archive_sha256:
                raise BuildError(
                    f"{name}: {vendored} has sha256 {digest}, not the pinned "
                    f"{snap.archive_sha256} (wrong or altered snapshot)"
                )
            found[name] = (vendored, f"vendored {vendored}")
            continue
        try:
            path = _fetch(snap, cache, log)
        except OSError as exc:
            missing.append(f"{name} {snap.commit[:12]} ({snap.archive}; fetch: {exc})")
            continue
        found[name] = (path, f"fetched {fetch_url(snap)}")
    if missing:
        raise BuildError(
            f"OpenWrt userland sources missing: not in {vendor / 'openwrt'} (set VENDOR_DIR to "
            f"the folder holding openwrt/) and not fetchable: {'; '.join(missing)}"
        )
    return found


# --------------------------------------------------------------------------------------- build


def _run(cmd: list[str], log_file: Path, cwd: Path | None = None) -> None:
    """Run one build step, appending its output to the component's log; fail naming both."""
    with log_file.open("a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        res = subprocess.run(cmd, cwd=cwd, stdout=f, stderr=subprocess.STDOUT, check=False)
    if res.returncode != 0:
        tail = "\n".join(log_file.read_text(errors="replace").strip().splitlines()[-15:])
        raise BuildError(f"{cmd[0]} failed with rc {res.returncode} (log: {log_file}):\n{tail}")


def _extract(archive: Path, dest: Path) -> Path:
    """Unpack a snapshot; returns its one top folder."""
    dest.mkdir(parents=True)
    with tarfile.open(archive) as tf:
        tf.extractall(dest, filter="data")
    tops = list(dest.iterdir())
    if len(tops) != 1 or not tops[0].is_dir():
        raise BuildError(f"{archive}: expected one top folder, found {[p.name for p in tops]}")
    return tops[0]


def _copy_tree(src: Path, dest: Path) -> None:
    """Copy files into the root with plain modes (the vendored copies are read-only)."""
    for path in sorted(src.rglob("*")):
        target = dest / path.relative_to(src)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        elif path.is_symlink():
            target.parent.mkdir(parents=True, exist_ok=True)
            target.unlink(missing_ok=True)
            target.symlink_to(os.readlink(path))
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.unlink(missing_ok=True)
            shutil.copyfile(path, target)
            target.chmod(0o755 if os.access(path, os.X_OK) else 0o644)


def _build_one(
    comp: Component, source: Path, work: Path, stage: Path, logs: Path, jobs: int, strl: bool
) -> float:
    """Unpack, patch, configure, make and install one component into the stage; seconds."""
    t0 = time.monotonic()
    log_file = logs / f"{comp.name}.log"
    if comp.name == "base-files":
        _copy_tree(source, stage)
        (stage / "SOURCES.md").unlink(missing_ok=True)
        return time.monotonic() - t0
    src = _extract(source, work / "src" / comp.name)
    if comp.files is not None:
        _copy_tree(src / comp.files, stage)
        return time.monotonic() - t0
    src = src / comp.subdir if comp.subdir else src
    for patch in comp.patches:
        _run(["patch", "-p1", "--forward", "-i", str(FILES / patch)], log_file, cwd=src)
    bdir = src if comp.in_source else work / "build" / comp.name
    usr = stage / "usr"
    cflags = [f"-I{FILES / d}" for d in comp.compat_includes]
    cflags += [f"-I{usr}/include", *(f"-I{usr}/include/{d}" for d in comp.stage_includes)]
    cflags += comp.cflags
    if comp.strl_compat and strl:
        cflags += ["-include", str(FILES / "strl-compat.h")]
    ldflags = " ".join((f"-L{usr}/lib -Wl,-rpath-link,{usr}/lib", *comp.ldflags))
    if comp.kind != "cmake":
        _build_plain(comp, src, stage, log_file, jobs, " ".join(cflags), ldflags)
        return time.monotonic() - t0
    _run(
        [
            "cmake",
            "-S",
            str(src),
            "-B",
            str(bdir),
            "-DCMAKE_INSTALL_PREFIX=/usr",
            "-DCMAKE_INSTALL_LIBDIR=lib",
            f"-DCMAKE_PREFIX_PATH={usr}",
            f"-DCMAKE_C_FLAGS={' '.join(cflags)}",
            f"-DCMAKE_EXE_LINKER_FLAGS={ldflags}",
            f"-DCMAKE_SHARED_LINKER_FLAGS={ldflags}",
            f"-DCMAKE_MODULE_LINKER_FLAGS={ldflags}",
            *comp.cmake,
        ],
        log_file,
    )
    _run(["make", "-C", str(bdir), f"-j{jobs}"], log_file)
    _run(["make", "-C", str(bdir), "install", f"DESTDIR={stage}"], log_file)
    for path, dest in comp.copies:
        if (src / path).is_file():
            (stage / dest).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src / path, stage / dest)
        else:
            _copy_tree(src / path, stage / dest)
    return time.monotonic() - t0


def _layout(stage: Path, names: Sequence[str]) -> None:
    """Executables to OpenWrt's paths, once every build has found its libraries in the stage;
    then the packages' symlinks."""
    for name in names:
        for have, want in COMPONENTS[name].layout:
            src, dest = stage / have, stage / want
            if not src.exists():
                raise BuildError(f"{name}: expected {have} in the installed files, not there")
            dest.parent.mkdir(parents=True, exist_ok=True)
            src.rename(dest)
        for link, target in COMPONENTS[name].links:
            (stage / link).parent.mkdir(parents=True, exist_ok=True)
            (stage / link).unlink(missing_ok=True)
            (stage / link).symlink_to(target)


def _install_files(comp: Component, src: Path, stage: Path) -> None:
    """The package Makefile's install step: build-folder paths to root paths."""
    for have, want in comp.installs:
        path, dest = src / have, stage / want
        if path.is_dir():
            _copy_tree(path, dest)
        elif path.is_file():
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, dest)
        else:
            raise BuildError(f"{comp.name}: expected {have} in the build folder, not there")


def _build_plain(
    comp: Component, src: Path, stage: Path, log_file: Path, jobs: int, cflags: str, ldflags: str
) -> None:
    """The components without cmake: a Makefile (iwinfo), one compiler call (ucode-mod-html),
    or a LuCI package laid out as luci.mk's Package/install does."""
    if comp.kind == "make":
        flags = [f"CFLAGS={cflags}", f"LDFLAGS={ldflags}", "FPIC=-fPIC"]
        _run(["make", "-C", str(src), f"-j{jobs}", *flags, *comp.args], log_file)
        _install_files(comp, src, stage)
    elif comp.kind == "cc":
        cfiles = sorted(str(p.name) for p in src.glob("*.c"))
        out = comp.installs[0][0]
        cmd = ["cc", *cflags.split(), *ldflags.split(), "-fPIC", *comp.args, "-o", out, *cfiles]
        _run(cmd, log_file, cwd=src)
        _install_files(comp, src, stage)
    elif comp.kind == "luci":
        _install_luci(comp, src, stage, log_file, jobs, cflags, ldflags)
    else:
        raise BuildError(f"{comp.name}: unknown build kind {comp.kind!r}")


#: luci.mk's SubstituteVersion stamps resource URLs with a random revision on every build;
#: here it is the snapshot's commit, so an unchanged input gives unchanged files
def _luci_revision(comp: Component) -> str:
    return SNAPSHOTS[comp.source].commit[:12]


def _install_luci(
    comp: Component, src: Path, stage: Path, log_file: Path, jobs: int, cflags: str, ldflags: str
) -> None:
    """luci.mk's Package/install: ucode/ -> /usr/share/ucode/luci (templates' resource URLs
    get ``?v=REV``), htdocs/ -> /www (not minified), root/ -> /, and src/'s own install
    (luci-base: core.so, version.uc). No po/: the snapshot's translations were removed."""
    rev = _luci_revision(comp)
    if (src / "src" / "Makefile").is_file():
        flags = [
            f"CFLAGS={cflags}",
            f"LDFLAGS={ldflags}",
            "FPIC=-fPIC",
            f"LUCI_VERSION={rev}",
            "LUCI_GITBRANCH=LuCI",
        ]
        _run(["make", "-C", str(src / "src"), f"-j{jobs}", *flags, "clean", "compile"], log_file)
        _run(["make", "-C", str(src / "src"), *flags, "install", f"DESTDIR={stage}"], log_file)
    if (src / "ucode").is_dir():
        dest = stage / "usr" / "share" / "ucode" / "luci"
        _copy_tree(src / "ucode", dest)
        resource = re.compile(r'"(\{\{ *(?:media|resource) *\}\}[^"]*\.(?:js|css))"')
        for tpl in sorted((src / "ucode").rglob("*.ut")):
            out = dest / tpl.relative_to(src / "ucode")
            text = re.sub(r"\{# *([^ ]*)PKG_VERSION *#\}", rf"\g<1>{rev}", out.read_text())
            out.write_text(resource.sub(rf'"\1?v={rev}"', text))
    if (src / "htdocs").is_dir():
        _copy_tree(src / "htdocs", stage / "www")
    if (src / "root").is_dir():
        _copy_tree(src / "root", stage)


def _schedule(names: list[str], run: Callable[[str], float], workers: int) -> dict[str, float]:
    """Run components in parallel where their needs allow; first failure wins."""
    seconds: dict[str, float] = {}
    pending = list(names)
    running: dict[concurrent.futures.Future[float], str] = {}
    error: BaseException | None = None
    with concurrent.futures.ThreadPoolExecutor(workers) as ex:
        while (pending and error is None) or running:
            if error is None:
                for name in list(pending):
                    if len(running) >= workers:
                        break
                    needs = [d for d in COMPONENTS[name].needs if d in names]
                    if all(d in seconds for d in needs):
                        pending.remove(name)
                        running[ex.submit(run, name)] = name
            if not running:
                break
            done, _ = concurrent.futures.wait(
                running, return_when=concurrent.futures.FIRST_COMPLETED
            )
            for fut in done:
                name = running.pop(fut)
                exc = fut.exception()
                if exc is not None:
                    error = error or exc
                else:
                    seconds[name] = fut.result()
    if error is not None:
        raise error
    return seconds


def _find(cache: Path, keys: Sequence[str]) -> UserlandBuild | None:
    for key in keys:
        out = cache / "userland" / key
        if (out / "stamp.json").is_file() and (out / "root").is_dir():
            return UserlandBuild(out / "root")
    return None


def build(
    components: Sequence[str] | None = None,
    vendor_dir: Path | None = None,
    *,
    log: Log | None = None,
    force: bool = False,
) -> UserlandBuild:
    """The staging root holding ``components`` (default: all) and what they need.

    A cached root with the same sources, recipes and host compiler is returned as is (the
    full default build also serves any subset). Raises BuildError naming what is missing
    or which step failed, with its log.
    """
    say: Log = log or (lambda _msg: None)
    names = select(components)
    cache = default_cache()
    host = _host()
    key = _sha(_recipe_parts(names, host))
    full = _sha(_recipe_parts(list(DEFAULT), host))
    if not force and (hit := _find(cache, [key, full])) is not None:
        return hit
    (cache / "userland").mkdir(parents=True, exist_ok=True)
    with (cache / "userland" / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building the same root
        if not force and (hit := _find(cache, [key, full])) is not None:
            return hit
        return _build_locked(names, key, host, vendor_dir, cache, say)


def _build_locked(
    names: list[str],
    key: str,
    host: dict[str, str],
    vendor: Path | None,
    cache: Path,
    log: Log,
) -> UserlandBuild:
    t0 = time.monotonic()
    vendor = vendor_dir() if vendor is None else vendor
    srcs = sources(names, vendor, cache, log)
    jobs = int(os.environ.get("OE_USERLAND_JOBS", "2"))
    out = cache / "userland" / key
    with tempfile.TemporaryDirectory(dir=cache / "userland", prefix=f".{key}-") as tmp:
        work = Path(tmp)
        stage = work / "out" / "root"
        stage.mkdir(parents=True)
        # Beside the cache entries, not in the temporary folder: a failure names its log.
        logs = cache / "userland" / "logs" / key
        shutil.rmtree(logs, ignore_errors=True)
        logs.mkdir(parents=True)
        strl = host["strlcpy"] != "libc"

        def run(name: str) -> float:
            log(f"userland: building {name}")
            secs = _build_one(COMPONENTS[name], srcs[name][0], work, stage, logs, jobs, strl)
            log(f"userland: {name} done in {secs:.1f}s")
            return secs

        seconds = _schedule(names, run, workers=2)
        _layout(stage, names)
        total = time.monotonic() - t0
        stamp = {
            "format": FORMAT,
            "key": key,
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "host": host,
            "jobs": jobs,
            "total_seconds": round(total, 1),
            "components": {
                name: {
                    "commit": SNAPSHOTS[COMPONENTS[name].source].commit
                    if name != "base-files"
                    else None,
                    "tree_sha256": SNAPSHOTS[COMPONENTS[name].source].tree_sha256
                    if name != "base-files"
                    else BASE_FILES_SHA256,
                    "source": srcs[name][1],
                    "seconds": round(seconds[name], 1),
                    "cmake": list(COMPONENTS[name].cmake),
                    "cflags": [f"-I{FILES.name}/{d}" for d in COMPONENTS[name].compat_includes]
                    + [f"-I/usr/include/{d}" for d in COMPONENTS[name].stage_includes]
                    + list(COMPONENTS[name].cflags)
                    + (["-include strl-compat.h"] if COMPONENTS[name].strl_compat and strl else []),
                    "ldflags": list(COMPONENTS[name].ldflags),
                    "kind": COMPONENTS[name].kind,
                    "patches": list(COMPONENTS[name].patches),
                }
                for name in names
            },
        }
        (work / "out" / "stamp.json").write_text(json.dumps(stamp, indent=2) + "\n")
        shutil.rmtree(out, ignore_errors=True)
        (work / "out").rename(out)
    log(f"userland: {len(names)} components in {total:.1f}s: {out / 'root'}")
    return UserlandBuild(out / "root")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--components", help=f"comma-separated (default all: {','.join(DEFAULT)})")
    ap.add_argument("--vendor-dir", type=Path, help="default: $VENDOR_DIR or ../shared/vendor")
    ap.add_argument("--force", action="store_true", help="rebuild even when cached")
    ap.add_argument("--print-root", action="store_true", help="print only the root's path")
    args = ap.parse_args(argv)
    t0 = time.monotonic()

    def log(msg: str) -> None:
        if not args.print_root:
            print(f"[userland {time.monotonic() - t0:5.1f}s] {msg}", flush=True)

    comps = [c for c in args.components.split(",") if c] if args.components else None
    try:
        result = build(comps, args.vendor_dir, log=log, force=args.force)
    except BuildError as exc:
        print(f"userland: {exc}", file=sys.stderr)
        return 1
    if args.print_root:
        print(result.root)
        return 0
    stamp = result.stamp()
    for name, info in stamp.get("components", {}).items():
        log(f"{name:10} {info['seconds']:5.1f}s  {info['source']}")
    log(f"built in {stamp.get('total_seconds')}s at {stamp.get('built_at')}: {result.root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
