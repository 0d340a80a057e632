"""Build the python3-oe and luci-app-oe .ipks from their recipes, without the OpenWrt SDK.

The recipe is the one source of truth: GNU make evaluates it over small stand-ins for the
buildroot's include files (package/standin/), which write out its control fields and its
conffiles/postinst/prerm defines and run its install section, Py3Package's default steps
included. Only the Python side of the buildroot is replaced: the source is the recipe's
PKG_SOURCE (the sdist, built here), the wheel is built from it and installed into
PKG_INSTALL_DIR, as python3-package.mk does. This module then packs what make staged in
the format opkg installs (OpenWrt's scripts/ipkg-build): a gzip'd tar of ./debian-binary,
./data.tar.gz and ./control.tar.gz, every member owned by 0:0 with mtime SOURCE_DATE_EPOCH,
names sorted, so the same tree gives the same bytes.

luci-app-oe (package/luci-app-oe/Makefile, luci.mk style) goes the same way over a
stand-in for the luci feed's luci.mk (package/standin/feeds/luci/luci.mk): no sources to
build, its install section copies htdocs/ and root/ (``build_luci``).

It lives beside the recipes it reads. `make package` runs it (`python package/ipk.py`);
the image builder and the tests import it (`build`, `read_ipk`, `declare_provided`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gzip
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: The recipe, relative to the repository.
RECIPE = Path("package", "python-oe")
STANDIN = REPO / "package" / "standin"
#: The binary package the recipe builds (its `define Package/...`).
PACKAGE = "python3-oe"
#: The LuCI app's recipe and the package it builds.
LUCI_RECIPE = Path("package", "luci-app-oe")
LUCI_PACKAGE = "luci-app-oe"
#: The feed name the recipe's header tells a buildroot to use (`src-link oe ...`): the
#: control file's Source is feeds/<feed>/<recipe folder>, as in a feed build.
FEED = "oe"
#: The scripts' interpreter on the router (python3-package.mk's FixShebang result).
INTERPRETER = "/usr/bin/python3"
#: The sdist's contents: what setuptools reads (pyproject's readme and packages).
SDIST_INPUTS = ("pyproject.toml", "README.md", "LICENSE", "MANIFEST.in", "src")

#: The control file's fields in the order OpenWrt's package-pack.mk writes them, each
#: with the recipe variable it comes from (None: computed here). Empty ones are left out.
CONTROL_FIELDS: tuple[tuple[str, str | None], ...] = (
    ("Package", None),
    ("Version", "VERSION"),
    ("Depends", None),
    ("Conflicts", None),
    ("Provides", None),
    ("Source", "SOURCE"),
    ("SourceName", "PKG_NAME"),
    ("License", "LICENSE"),
    ("LicenseFiles", "LICENSE_FILES"),
    ("Section", "SECTION"),
    ("SourceDateEpoch", None),
    ("URL", "URL"),
    ("Maintainer", "MAINTAINER"),
    ("Architecture", "PKGARCH"),
    ("Installed-Size", None),
)

#: Recipe defines that become control files, with the name and mode they get. postinst
#: and prerm are OpenWrt's wrappers (below), which source the *-pkg ones.
DEFINE_FILES: dict[str, tuple[str, int]] = {
    "conffiles": ("conffiles", 0o644),
    "preinst": ("preinst", 0o755),
    "postinst": ("postinst-pkg", 0o755),
    "prerm": ("prerm-pkg", 0o755),
    "postrm": ("postrm", 0o755),
}

# OpenWrt's generic maintainer scripts: base-files' default_postinst (run uci-defaults and
# enable+start the init scripts; offline, with IPKG_INSTROOT, only enable) and
# default_prerm (the package's prerm-pkg, then stop+disable). Both find the package's name
# from the script's own path ($0) and skip everything on a root without base-files.
POSTINST = """#!/bin/sh
[ "${IPKG_NO_SCRIPT}" = "1" ] && exit 0
[ -s ${IPKG_INSTROOT}/lib/functions.sh ] || exit 0
. ${IPKG_INSTROOT}/lib/functions.sh
default_postinst $0 $@
"""
PRERM = """#!/bin/sh
[ -s ${IPKG_INSTROOT}/lib/functions.sh ] || exit 0
. ${IPKG_INSTROOT}/lib/functions.sh
default_prerm $0 $@
"""


class PackageError(Exception):
    """The package cannot be built; the message names the culprit."""


@dataclass(frozen=True)
class Recipe:
    """One binary package of the recipe, as the buildroot evaluated it."""

    name: str
    fields: Mapping[str, str]
    defines: Mapping[str, str]

    @property
    def depends(self) -> list[str]:
        """Depends of the control file: DEPENDS without the kernel-config selections
        (`+@SYMBOL`) and without the `+` that only tells menuconfig to select."""
        names = []
        for entry in self.fields["DEPENDS"].split():
            if entry.startswith(("@", "+@")):
                continue
            name = entry.removeprefix("+")
            if not name or any(c in name for c in ":()!|&"):
                raise PackageError(f"DEPENDS entry {entry!r}: conditional dependencies unsupported")
            names.append(name)
        return names

    @property
    def conffiles(self) -> list[str]:
        return self.defines.get("conffiles", "").split()

    @property
    def filename(self) -> str:
        return f"{self.name}_{self.fields['VERSION']}_{self.fields['PKGARCH']}.ipk"


@dataclass(frozen=True)
class Ipk:
    """A built package: where it is and what is in it."""

    path: Path
    #: the recipe's PKG_SOURCE (python3-oe's sdist); None for a package without sources
    sdist: Path | None
    recipe: Recipe
    control: str
    installed_size: int
    #: data.tar.gz's members as installed: path -> (mode, size); folders end with "/".
    files: Mapping[str, tuple[int, int]]

    @property
    def size(self) -> int:
        return self.path.stat().st_size


def source_date_epoch(repo: Path = REPO) -> int:
    """SOURCE_DATE_EPOCH from the environment, else the last commit's time: every mtime in
    the package, the .pyc hash seed and SourceDateEpoch come from it."""
    value = os.environ.get("SOURCE_DATE_EPOCH")
    if value is None:
        proc = subprocess.run(
            ["git", "-C", str(repo), "log", "-1", "--format=%ct"],
            capture_output=True,
            text=True,
            check=False,
        )
        value = proc.stdout.strip()
        if proc.returncode != 0 or not value:
            raise PackageError(f"no SOURCE_DATE_EPOCH and no git commit in {repo}: set one")
    if not value.isdigit():
        raise PackageError(f"SOURCE_DATE_EPOCH={value!r} is not a number of seconds")
    return int(value)


def _run(argv: list[str], cwd: Path, what: str, env: Mapping[str, str] | None = None) -> str:
    proc = subprocess.run(
        argv, cwd=cwd, capture_output=True, text=True, check=False, env=env, timeout=600
    )
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise PackageError(f"{what} failed (exit {proc.returncode}): " + " | ".join(tail))
    return proc.stdout


def _build_meta(hook: str, source: Path, out: Path, epoch: int) -> Path:
    """Run setuptools' PEP 517 hook (build_sdist or build_wheel) in a child, in `source`."""
    code = f"import sys, setuptools.build_meta as b; print(b.{hook}(sys.argv[1]))"
    env = {**os.environ, "SOURCE_DATE_EPOCH": str(epoch)}
    stdout = _run([sys.executable, "-c", code, str(out)], source, hook, env)
    return out / stdout.strip().splitlines()[-1]


def build_sdist(repo: Path, work: Path, epoch: int) -> Path:
    """The recipe's PKG_SOURCE. Built from a copy of the sources setuptools reads, so the
    tree's own build/ and egg-info are neither used nor touched."""
    tree = work / "sdist-src"
    tree.mkdir()
    junk = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in SDIST_INPUTS:
        path = repo / name
        if path.is_dir():
            shutil.copytree(path, tree / name, ignore=junk)
        elif path.is_file():
            shutil.copy2(path, tree / name)
    return _build_meta("build_sdist", tree, work, epoch)


def build_wheel(sdist: Path, work: Path, epoch: int) -> tuple[Path, Path]:
    """Unpack the sdist (PKG_BUILD_DIR) and build the wheel from it, as the feed's
    Py3Build/Compile does (`python -m build --wheel`, setuptools' backend)."""
    with tarfile.open(sdist) as tar:
        tar.extractall(work, filter="data")
    build_dir = work / sdist.name.removesuffix(".tar.gz")
    wheels = work / "wheels"
    wheels.mkdir()
    return build_dir, _build_meta("build_wheel", build_dir, wheels, epoch)


def install_wheel(wheel: Path, dest: Path, site_packages: str) -> None:
    """Py3Build/Install: the wheel into PKG_INSTALL_DIR with prefix /usr and no bytecode
    (the package's install compiles it), scripts run by the router's python3."""
    from installer import install
    from installer.destinations import SchemeDictionaryDestination
    from installer.sources import WheelFile

    scheme = {
        "purelib": site_packages,
        "platlib": site_packages,
        "scripts": "/usr/bin",
        "data": "/usr",
        "headers": "/usr/include",
    }
    destination = SchemeDictionaryDestination(
        scheme, interpreter=INTERPRETER, script_kind="posix", destdir=str(dest)
    )
    with WheelFile.open(wheel) as source:
        install(source, destination, additional_metadata={})


def evaluate(
    recipe_dir: Path,
    ipk_dir: Path,
    work: Path,
    pkg_install_dir: Path,
    epoch: int,
    package: str = PACKAGE,
) -> Recipe:
    """Run the recipe's install section for ``package`` into ipk_dir with GNU make over
    the stand-ins, and read back its fields and defines."""
    meta = work / "meta"
    meta.mkdir()
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    make = shutil.which("make")
    if make is None:
        raise PackageError("GNU make is needed (scripts/apt-packages.txt: make)")
    _run(
        [
            make,
            "-s",
            "-C",
            str(recipe_dir),
            "-f",
            "Makefile",
            f"TOPDIR={STANDIN}",
            f"INCLUDE_DIR={STANDIN / 'include'}",
            f"BUILD_DIR={work / 'build_dir'}",
            f"PKG_INSTALL_DIR={pkg_install_dir}",
            f"PYTHON3_VERSION={python}",
            f"HOST_PYTHON3_BIN={sys.executable}",
            f"SOURCE_DATE_EPOCH={epoch}",
            f"IPK_PACKAGE={package}",
            f"IPK_FEED={FEED}",
            f"IPK_META={meta}",
            f"IPK_DIR={ipk_dir}",
            "ipk-install",
        ],
        recipe_dir,
        f"make ipk-install ({recipe_dir / 'Makefile'})",
    )
    if not (meta / "VERSION").exists():
        raise PackageError(f"{recipe_dir / 'Makefile'} has no BuildPackage for {package}")
    fields = {}
    defines = {}
    for path in meta.iterdir():
        text = path.read_text()
        if path.name.isupper():
            fields[path.name] = text.strip()
        else:
            defines[path.name] = text
    for name in ("USERID", "ALTERNATIVES"):
        if fields.get(name):
            raise PackageError(f"{name} is set: this builder does not make users/alternatives")
    if not fields["PKGARCH"]:
        raise PackageError(f"{package} sets no PKGARCH (a pure-Python package is 'all')")
    return Recipe(package, fields, defines)


def control_text(recipe: Recipe, installed_size: int, epoch: int) -> str:
    """The control file as package-pack.mk writes it: fields in its order, empty ones left
    out, then the description with every line's leading white space made one space."""
    computed = {
        "Package": recipe.name,
        "Depends": ", ".join(recipe.depends),
        "Conflicts": ", ".join(recipe.fields["CONFLICTS"].split()),
        "Provides": ", ".join(recipe.fields["PROVIDES"].split()),
        "SourceDateEpoch": str(epoch),
        "Installed-Size": str(installed_size),
    }
    lines = []
    for field, variable in CONTROL_FIELDS:
        value = computed[field] if variable is None else recipe.fields[variable]
        if value:
            lines.append(f"{field}: {value}")
    description = recipe.defines.get("description") or recipe.fields["TITLE"]
    body = "\n".join(" " + line.lstrip() for line in description.rstrip("\n").split("\n"))
    lines.append(f"Description:{body}")
    return "\n".join(lines) + "\n"


def _walk(root: Path) -> Iterator[Path]:
    """Every path under root, depth first, names in byte order (tar --sort=name)."""
    for entry in sorted(root.iterdir(), key=lambda p: os.fsencode(p.name)):
        yield entry
        if entry.is_dir() and not entry.is_symlink():
            yield from _walk(entry)


def _tar_gz(members: list[tuple[str, bytes | None, int, str]], epoch: int) -> bytes:
    """A gzip'd GNU tar of (name, content or None for a folder, mode, symlink target)
    members, owned by 0:0 with no user/group names, every mtime `epoch`; gzip without
    name or time (gzip -n)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, content, mode, target in members:
            info = tarfile.TarInfo(name)
            info.mode = mode
            info.mtime = epoch
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            if target:
                info.type = tarfile.SYMTYPE
                info.linkname = target
                tar.addfile(info)
            elif content is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
    return gzip.compress(raw.getvalue(), compresslevel=9, mtime=0)


def _tree_members(root: Path) -> list[tuple[str, bytes | None, int, str]]:
    members: list[tuple[str, bytes | None, int, str]] = [("./", None, 0o755, "")]
    for path in _walk(root):
        name = "./" + path.relative_to(root).as_posix()
        mode = path.lstat().st_mode & 0o7777
        if path.is_symlink():
            members.append((name, b"", 0o777, os.readlink(path)))
        elif path.is_dir():
            members.append((name + "/", None, mode, ""))
        elif path.is_file():
            members.append((name, path.read_bytes(), mode, ""))
        else:
            raise PackageError(f"{path}: only files, folders and symlinks can be packaged")
    return members


def _uncompressed_size(tar_gz: bytes) -> int:
    return len(gzip.decompress(tar_gz))


@contextlib.contextmanager
def _workdir(out_dir: Path) -> Iterator[Path]:
    """A scratch directory for one package build, with umask 022 meanwhile (the packed
    modes must not depend on the caller's umask); out_dir made first."""
    out_dir.mkdir(parents=True, exist_ok=True)
    old_umask = os.umask(0o022)
    try:
        with tempfile.TemporaryDirectory(prefix="oe-ipk-") as tmp:
            yield Path(tmp)
    finally:
        os.umask(old_umask)


def build(out_dir: Path, *, repo: Path = REPO, epoch: int | None = None) -> Ipk:
    """Build the sdist and the .ipk into out_dir; the .ipk's bytes depend only on the tree
    and the epoch (umask, build paths and time do not matter)."""
    epoch = source_date_epoch(repo) if epoch is None else epoch
    with _workdir(out_dir) as work:
        sdist = build_sdist(repo, work, epoch)
        _build_dir, wheel = build_wheel(sdist, work, epoch)
        python = f"{sys.version_info.major}.{sys.version_info.minor}"
        pkg_install = work / "ipkg-install"
        install_wheel(wheel, pkg_install, f"/usr/lib/python{python}/site-packages")
        ipk_dir = work / "ipkg" / PACKAGE
        recipe = evaluate(repo / RECIPE, ipk_dir, work, pkg_install, epoch)
        ipk = _pack(recipe, ipk_dir, out_dir, epoch)
        sdist_out = out_dir / sdist.name
        shutil.copyfile(sdist, sdist_out)
    return dataclasses.replace(ipk, sdist=sdist_out)


def build_luci(out_dir: Path, *, repo: Path = REPO, epoch: int | None = None) -> Ipk:
    """Build luci-app-oe's .ipk into out_dir from package/luci-app-oe/Makefile (luci.mk's
    install: htdocs/ to /www, root/ to /). Reproducible as ``build``'s."""
    epoch = source_date_epoch(repo) if epoch is None else epoch
    with _workdir(out_dir) as work:
        ipk_dir = work / "ipkg" / LUCI_PACKAGE
        recipe = evaluate(
            repo / LUCI_RECIPE, ipk_dir, work, work / "ipkg-install", epoch, LUCI_PACKAGE
        )
        return _pack(recipe, ipk_dir, out_dir, epoch)


def _pack(recipe: Recipe, ipk_dir: Path, out_dir: Path, epoch: int) -> Ipk:
    """What make staged in ipk_dir, with the recipe's control files, as an .ipk."""
    data_members = _tree_members(ipk_dir)
    data = _tar_gz(data_members, epoch)
    installed_size = _uncompressed_size(data)
    control = control_text(recipe, installed_size, epoch)
    control_members = _control_members(recipe, control, ipk_dir)
    ipk = _tar_gz(
        [
            ("./debian-binary", b"2.0\n", 0o644, ""),
            ("./data.tar.gz", data, 0o644, ""),
            ("./control.tar.gz", _tar_gz(control_members, epoch), 0o644, ""),
        ],
        epoch,
    )
    path = out_dir / recipe.filename
    path.write_bytes(ipk)
    files = {
        name[1:] or "/": (mode, len(content or b""))
        for name, content, mode, _target in data_members
    }
    return Ipk(path, None, recipe, control, installed_size, files)


def _control_members(
    recipe: Recipe, control: str, ipk_dir: Path
) -> list[tuple[str, bytes | None, int, str]]:
    """control.tar.gz: control, OpenWrt's postinst/prerm wrappers, and the recipe's
    defines as files; conffiles lists only those the package holds (as ipkg-build)."""
    files: dict[str, tuple[bytes, int]] = {
        "control": (control.encode(), 0o644),
        "postinst": (POSTINST.encode(), 0o755),
        "prerm": (PRERM.encode(), 0o755),
    }
    for define, (name, mode) in DEFINE_FILES.items():
        text = recipe.defines.get(define)
        if text is None:
            continue
        if define == "conffiles":
            held = [p for p in recipe.conffiles if (ipk_dir / p.lstrip("/")).is_file()]
            if not held:
                continue
            text = "".join(f"{p}\n" for p in sorted(held, key=os.fsencode))
        files[name] = (text.encode(), mode)
    members: list[tuple[str, bytes | None, int, str]] = [("./", None, 0o755, "")]
    for name in sorted(files):
        content, mode = files[name]
        members.append((f"./{name}", content, mode, ""))
    return members


def read_ipk(path: Path) -> dict[str, bytes]:
    """The members of an .ipk (outer tar) and of its control.tar.gz, the latter as
    `control/<name>`: what opkg reads before it unpacks data.tar.gz."""
    out: dict[str, bytes] = {}
    with tarfile.open(path, mode="r:gz") as outer:
        for member in outer.getmembers():
            handle = outer.extractfile(member)
            if handle is not None:
                out[member.name.removeprefix("./")] = handle.read()
    with tarfile.open(fileobj=io.BytesIO(out["control.tar.gz"]), mode="r:gz") as control:
        for member in control.getmembers():
            handle = control.extractfile(member)
            if handle is not None:
                out["control/" + member.name.removeprefix("./")] = handle.read()
    return out


def control_fields(text: str) -> dict[str, str]:
    """A control (or opkg status) paragraph as {field: value}; continuation lines join the
    field before them with newlines."""
    fields: dict[str, str] = {}
    last = None
    for line in text.splitlines():
        if line.startswith((" ", "\t")) and last is not None:
            fields[last] += "\n" + line
        elif ":" in line:
            last, _, value = line.partition(":")
            fields[last] = value.strip()
    return fields


#: A minimal /etc/opkg.conf for a root assembled off the router: the root destination and
#: the lists folder (no feeds: packages are installed from files).
OPKG_CONF = "dest root /\nlists_dir ext /var/opkg-lists\n"


def declare_provided(root: Path, provided: Mapping[str, str]) -> None:
    """Record packages ({name: version}) as installed in root's opkg database although
    their files come from elsewhere (Debian's python3 and kernel modules in the lab's
    image). An OpenWrt image lists every package it carries in /usr/lib/opkg/status, and
    opkg resolves Depends against that file only: without these entries `opkg install`
    refuses with "cannot find dependency". Each gets an empty file list, as a package that
    owns no file would have."""
    info = root / "usr" / "lib" / "opkg" / "info"
    info.mkdir(parents=True, exist_ok=True)
    with (root / "usr" / "lib" / "opkg" / "status").open("a") as status:
        for name, version in provided.items():
            status.write(
                f"Package: {name}\nVersion: {version}\nStatus: install ok installed\n"
                f"Architecture: all\nInstalled-Time: 0\n\n"
            )
            (info / f"{name}.list").touch()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "dist", help="output folder")
    args = parser.parse_args(argv)
    try:
        built = [build(args.out), build_luci(args.out)]
    except PackageError as exc:
        print(f"package: {exc}", file=sys.stderr)
        return 1
    for ipk in built:
        shown = os.path.relpath(ipk.path)
        count = sum(1 for name in ipk.files if not name.endswith("/"))
        print(
            f"{shown}: {ipk.size} bytes ({ipk.size / 1024:.1f} KiB); installs {count} files, "
            f"{ipk.installed_size} bytes (Installed-Size)"
        )
        if ipk.sdist is not None:
            print(f"{os.path.relpath(ipk.sdist)}: the recipe's PKG_SOURCE")
    return 0


if __name__ == "__main__":
    sys.exit(main())
