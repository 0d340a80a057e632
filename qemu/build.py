"""Build the QEMU lab's kernel, initramfs and disk images, cached under ~/.cache/oe-router.

Why this shape: every input of an image (package list, guest init, kernel version, project wheel,
pinned requirements) is hashed into the image's file name, so an unchanged input never costs a
rebuild and a changed one can never be silently ignored. Nothing here needs a loop device or a
mount: the root filesystems are written by `mke2fs -d`.

Run `python qemu/build.py` (what `make image` does); `--force` rebuilds everything.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import lzma
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import tomllib
import urllib.request
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

FORMAT = "4"  # bump when this file changes what goes into an image
SUITE = "bookworm"
QEMU_DIR = Path(__file__).resolve().parent
REPO = QEMU_DIR.parent
GUEST = QEMU_DIR / "guest"
# The router's own boot files (procd's /sbin/init hand-over, /etc/preinit stand-in, logd and
# the lab agent as rc.d services), laid over the image as they are.
ROUTER_FILES = GUEST / "router"
sys.path.insert(0, str(REPO / "package"))
import ipk  # noqa: E402  (package/ipk.py: the .ipk `make package` builds)

# userland.py does `from build import ...`: run as a script, this module is that module too.
sys.modules.setdefault("build", sys.modules[__name__])
DPKG_EXCLUDES = (
    "/usr/share/man/*",
    "/usr/share/doc/*",
    "/usr/share/info/*",
    "/usr/share/locale/*",
    "/usr/share/lintian/*",
)
# Parts of the kernel's module tree the guests can need (everything else is hardware we lack).
MODULE_SUBTREES = (
    "kernel/net",
    "kernel/crypto",
    "kernel/lib",
    "kernel/arch/x86/crypto",
    "kernel/fs/9p",
    "kernel/fs/netfs",
    "kernel/fs/fscache",
    "kernel/fs/ext4",
    "kernel/fs/jbd2",
    "kernel/fs/mbcache.ko",
    "kernel/drivers/virtio",
    "kernel/drivers/crypto/virtio",
    "kernel/drivers/net/virtio_net.ko",
    "kernel/drivers/net/net_failover.ko",
    "kernel/drivers/net/veth.ko",
    "kernel/drivers/net/tun.ko",
    "kernel/drivers/net/dummy.ko",
    "kernel/drivers/block/virtio_blk.ko",
    "kernel/drivers/char/virtio_console.ko",
    "kernel/drivers/char/hw_random",
)
MODULE_SKIP = ("kernel/net/wireless", "kernel/net/mac80211", "kernel/net/bluetooth")
INITRAMFS_MODULES = ("virtio_pci", "virtio_blk", "ext4", "crc32c_generic")

Log = Callable[[str], None]


class BuildError(Exception):
    """A build step failed; the message names the step and where its log is."""


@dataclass(frozen=True)
class Kernel:
    """A kernel ready for PVH boot plus the module tree the images carry."""

    version: str
    vmlinux: Path
    initramfs: Path
    modules: Path  # directory holding lib/modules/<version>


@dataclass(frozen=True)
class Images:
    """Everything lab.py needs to boot the lab."""

    kernel: Kernel
    router: Path
    world: Path


def default_cache() -> Path:
    return Path(os.environ.get("OE_ROUTER_CACHE", Path.home() / ".cache" / "oe-router"))


def _run(cmd: list[str], log_file: Path | None = None, **kw: object) -> str:
    """Run a build command; on failure raise one error naming the command and its log."""
    res = subprocess.run(cmd, capture_output=True, text=True, **kw)  # type: ignore[call-overload]
    if log_file is not None:
        log_file.write_text(res.stdout + res.stderr)
    if res.returncode != 0:
        tail = "\n".join((res.stdout + res.stderr).strip().splitlines()[-15:])
        where = f" (full log: {log_file})" if log_file else ""
        raise BuildError(f"{cmd[0]} failed with rc {res.returncode}{where}:\n{tail}")
    return str(res.stdout)


def _sha(parts: Iterable[bytes | str]) -> str:
    h = hashlib.sha256()
    for p in parts:
        b = p.encode() if isinstance(p, str) else p
        h.update(len(b).to_bytes(8, "big") + b)
    return h.hexdigest()[:16]


def read_list(path: Path) -> list[str]:
    """One item a line; '#' starts a comment."""
    items = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            items.append(line)
    return items


def apt_sources() -> list[str]:
    """The machine's Debian apt sources as one-line entries for mmdebstrap."""
    lines: list[str] = []
    src = Path("/etc/apt")
    for f in sorted((src / "sources.list.d").glob("*.sources")):
        for stanza in f.read_text().split("\n\n"):
            fields: dict[str, str] = {}
            for raw in stanza.splitlines():
                if raw.startswith("#") or ":" not in raw:
                    continue
                k, v = raw.split(":", 1)
                fields[k.strip().lower()] = v.strip()
            if "deb" not in fields.get("types", "").split():
                continue
            for uri in fields.get("uris", "").split():
                for suite in fields.get("suites", "").split():
                    if "debian" in uri and suite.startswith(SUITE):
                        lines.append(f"deb {uri} {suite} {fields.get('components', 'main')}")
    lists = [src / "sources.list", *sorted((src / "sources.list.d").glob("*.list"))]
    for f in lists:
        if not f.exists():
            continue
        for raw in f.read_text().splitlines():
            parts = re.sub(r"\[[^]]*\]", "", raw).split()
            is_debian = len(parts) >= 4 and parts[0] == "deb" and "debian" in parts[1]
            if is_debian and parts[2].startswith(SUITE):
                lines.append(" ".join(parts))
    if not lines:
        lines = [f"deb http://deb.debian.org/debian {SUITE} main"]
    return lines


# ---------------------------------------------------------------------------------------- kernel


def extract_vmlinux(bzimage: bytes) -> bytes:
    """Find the compressed payload in a bzImage and inflate it (the kernel's extract-vmlinux)."""
    candidates: list[tuple[int, str]] = []
    for name, magic in (
        ("xz", b"\xfd7zXZ\x00"),
        ("zstd", b"\x28\xb5\x2f\xfd"),
        ("gz", b"\x1f\x8b\x08"),
    ):
        start = 0
        while (pos := bzimage.find(magic, start)) >= 0:
            candidates.append((pos, name))
            start = pos + 1
    for pos, name in sorted(candidates):
        data = bzimage[pos:]
        try:
            if name == "xz":
                out = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data)
            elif name == "gz":
                import zlib

                out = zlib.decompressobj(wbits=31).decompress(data)
            else:
                out = subprocess.run(
                    ["zstd", "-dc"], input=data, capture_output=True, check=False
                ).stdout
        except (lzma.LZMAError, ValueError, OSError):
            continue
        if out.startswith(b"\x7fELF"):
            return out
    raise BuildError("no ELF kernel found inside the bzImage (unknown compression?)")


def _kernel_package() -> str:
    out = _run(["apt-cache", "depends", "linux-image-amd64"])
    m = re.search(r"Depends:\s+(linux-image-\d\S*)", out)
    if not m:
        raise BuildError("apt-cache depends linux-image-amd64 names no versioned kernel package")
    return m.group(1)


def _module_deps(moddir: Path) -> dict[str, list[str]]:
    deps: dict[str, list[str]] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        path, _, rest = line.partition(":")
        deps[path] = rest.split()
    return deps


def _mod_index(deps: dict[str, list[str]]) -> dict[str, str]:
    """Module name (with - and _ equal) -> path in modules.dep."""
    return {Path(p).name.removesuffix(".ko").replace("-", "_"): p for p in deps}


def ensure_kernel(cache: Path, log: Log, force: bool = False) -> Kernel:
    pkg = _kernel_package()
    kdir = cache / "kernel" / pkg
    done = kdir / "done"
    if done.exists() and not force:
        version = done.read_text().strip()
        return Kernel(version, kdir / "vmlinux", kdir / "initramfs.cpio", kdir / "modules")
    t0 = time.monotonic()
    log(f"kernel: fetching {pkg} with apt-get download")
    shutil.rmtree(kdir, ignore_errors=True)
    (kdir / "deb").mkdir(parents=True)
    _run(["apt-get", "download", pkg], cwd=kdir / "deb")
    deb = next((kdir / "deb").glob("*.deb"))
    unpack = kdir / "unpack"
    _run(["dpkg-deb", "-x", str(deb), str(unpack)])
    version = next((unpack / "lib" / "modules").iterdir()).name
    log(f"kernel: {version}: extracting vmlinux for PVH boot")
    (kdir / "vmlinux").write_bytes(
        extract_vmlinux((unpack / "boot" / f"vmlinuz-{version}").read_bytes())
    )

    src = unpack / "lib" / "modules" / version
    dst = kdir / "modules" / "lib" / "modules" / version
    dst.mkdir(parents=True)
    for sub in MODULE_SUBTREES:
        s = src / sub
        if s.is_dir():
            shutil.copytree(
                s,
                dst / sub,
                ignore=lambda d, names: [
                    n for n in names if any((Path(d) / n).match(f"*/{x}") for x in MODULE_SKIP)
                ],
            )
        elif s.exists():
            (dst / sub).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(s, dst / sub)
    for f in ("modules.order", "modules.builtin", "modules.builtin.modinfo"):
        if (src / f).exists():
            shutil.copy2(src / f, dst / f)
    _run(["depmod", "-b", str(kdir / "modules"), version])

    log("kernel: building the busybox initramfs")
    _build_initramfs(kdir, dst, version)
    shutil.rmtree(unpack)
    shutil.rmtree(kdir / "deb")
    done.write_text(version + "\n")
    log(f"kernel: ready in {time.monotonic() - t0:.1f}s")
    return Kernel(version, kdir / "vmlinux", kdir / "initramfs.cpio", kdir / "modules")


def _build_initramfs(kdir: Path, moddir: Path, version: str) -> None:
    deps = _module_deps(moddir)
    index = _mod_index(deps)
    want: list[str] = []
    todo = [index[m] for m in INITRAMFS_MODULES if m in index]
    while todo:
        p = todo.pop()
        if p not in want:
            want.append(p)
            todo.extend(deps[p])
    with tempfile.TemporaryDirectory(dir=kdir) as tmp:
        root = Path(tmp)
        for d in ("bin", "proc", "sys", "dev", "newroot", f"lib/modules/{version}"):
            (root / d).mkdir(parents=True, exist_ok=True)
        shutil.copy2("/bin/busybox", root / "bin" / "busybox")
        (root / "bin" / "sh").symlink_to("busybox")
        shutil.copy2(GUEST / "initramfs-init", root / "init")
        (root / "init").chmod(0o755)
        mroot = root / "lib" / "modules" / version
        for p in want:
            (mroot / p).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(moddir / p, mroot / p)
        (mroot / "modules.dep").write_text("".join(f"{p}: {' '.join(deps[p])}\n" for p in want))
        files = subprocess.run(["find", "."], cwd=root, capture_output=True, check=True).stdout
        with open(kdir / "initramfs.cpio", "wb") as out:
            subprocess.run(
                ["cpio", "--quiet", "-o", "-H", "newc", "-R", "0:0"],
                cwd=root,
                input=files,
                stdout=out,
                check=True,
            )


# ---------------------------------------------------------------------------------------- rootfs


def ensure_base(cache: Path, name: str, packages: list[str], log: Log, force: bool) -> Path:
    """A minbase tarball with `packages`, made by mmdebstrap from the machine's apt sources."""
    sources = apt_sources()
    key = _sha([FORMAT, SUITE, *sources, *sorted(packages), *DPKG_EXCLUDES])
    out = cache / "base" / f"{name}-{key}.tar"
    if out.exists() and not force:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    for old in out.parent.glob(f"{name}-*.tar"):
        old.unlink()
    t0 = time.monotonic()
    log(f"{name}: mmdebstrap --variant=minbase ({len(packages)} packages), about a minute")
    tmp = out.with_suffix(f".tar.part{os.getpid()}")
    cmd = [
        "mmdebstrap",
        "--variant=minbase",
        "--mode=root",
        "--format=tar",
        f"--include={','.join(packages)}",
        '--aptopt=Acquire::Languages "none"',
        *[f"--dpkgopt=path-exclude={p}" for p in DPKG_EXCLUDES],
        SUITE,
        str(tmp),
        *sources,
    ]
    _run(cmd, log_file=cache / "base" / f"{name}.log")
    tmp.rename(out)
    log(f"{name}: base root built in {time.monotonic() - t0:.1f}s")
    return out


def _extract(tar: Path, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    _run(["tar", "-x", "-p", "--numeric-owner", "-f", str(tar), "-C", str(dest)])


def _common_overlay(root: Path, kernel: Kernel) -> None:
    """What every guest image gets on top of Debian: our init, agent, kernel modules."""
    shutil.copy2(GUEST / "init", root / "sbin" / "oe-lab-init")
    (root / "sbin" / "oe-lab-init").chmod(0o755)
    (root / "usr" / "lib" / "oe-lab").mkdir(parents=True, exist_ok=True)
    shutil.copy2(GUEST / "agent.py", root / "usr" / "lib" / "oe-lab" / "agent.py")
    mods = root / "lib" / "modules" / kernel.version
    shutil.rmtree(mods, ignore_errors=True)
    shutil.copytree(kernel.modules / "lib" / "modules" / kernel.version, mods)
    index = _mod_index(_module_deps(mods))
    wanted = [m for m in read_list(GUEST / "modules.txt") if m.replace("-", "_") in index]
    (root / "etc" / "oe-lab").mkdir(parents=True, exist_ok=True)
    (root / "etc" / "oe-lab" / "modules").write_text("\n".join(wanted) + "\n")
    (root / "etc" / "hostname").write_text("lab\n")
    (root / "etc" / "hosts").write_text("127.0.0.1 localhost\n::1 localhost\n")


def _mke2fs(root: Path, image: Path, log: Log) -> None:
    used_kib = int(_run(["du", "-sk", "--apparent-size", str(root)]).split()[0])
    size_kib = int(used_kib * 1.3) + 256 * 1024
    tmp = image.with_suffix(f".part{os.getpid()}")
    tmp.unlink(missing_ok=True)
    _run(
        [
            "mke2fs", "-q", "-F", "-t", "ext4", "-O", "^has_journal", "-L", "labroot",
            "-d", str(root), str(tmp), f"{size_kib}k",
        ]
    )  # fmt: skip
    tmp.rename(image)
    log(f"{image.name}: {used_kib // 1024} MiB of files in a {size_kib // 1024} MiB ext4 image")


def _replace_old(image: Path) -> None:
    prefix = image.name.rsplit("-", 1)[0]
    for old in image.parent.glob(f"{prefix}-*.ext4"):
        if old != image:
            old.unlink()


def _files_digest(paths: Iterable[Path]) -> list[bytes]:
    parts: list[bytes] = []
    for p in sorted(paths):
        if p.is_file():
            parts += [str(p.relative_to(REPO)).encode(), p.read_bytes()]
    return parts


# ------------------------------------------------------------------------------ cryptodev module

# cryptodev-linux, pinned: the router gets a real /dev/crypto (`modprobe cryptodev`, not loaded
# at boot) built against Debian's linux-headers for the lab kernel's exact ABI version.
CRYPTODEV_COMMIT = "08644db02d43478f802755903212f5ee506af73b"
CRYPTODEV_TARBALL = f"cryptodev-linux-{CRYPTODEV_COMMIT[:7]}.tar.gz"
CRYPTODEV_URL = (
    f"https://github.com/cryptodev-linux/cryptodev-linux/archive/{CRYPTODEV_COMMIT}.tar.gz"
)
# sha256 over the snapshot's files (path below the top folder, content), computed from the
# vendored tarball. A content hash, because GitHub's archive names its top folder after the
# whole commit id, so its bytes cannot equal the vendored file's.
CRYPTODEV_TREE_SHA256 = "0b503da53787eec7ec7687d1ec7faf48b3d3b28fbd55313c872d96a7ca2a47bc"
CRYPTODEV_RECIPE = "1"  # bump when the module's build or install below changes


def vendor_dir() -> Path:
    """VENDOR_DIR, default ../shared/vendor beside the repository (CI has it there)."""
    return Path(os.environ.get("VENDOR_DIR") or REPO.parent / "shared" / "vendor")


def _tree_sha256(tar: Path) -> str:
    h = hashlib.sha256()
    with tarfile.open(tar) as tf:
        members = sorted((m for m in tf if m.isfile() or m.issym()), key=lambda m: m.name)
        for m in members:
            rel = m.name.split("/", 1)[-1].encode()
            f = tf.extractfile(m) if m.isfile() else None
            data = f.read() if f is not None else b"->" + m.linkname.encode()
            h.update(len(rel).to_bytes(8, "big") + rel + len(data).to_bytes(8, "big") + data)
    return h.hexdigest()


def cryptodev_source(cache: Path, log: Log) -> Path:
    """The pinned cryptodev-linux snapshot: VENDOR_DIR's, else upstream's; hash-checked."""
    vendored = vendor_dir() / CRYPTODEV_TARBALL
    src = vendored
    if not vendored.is_file():
        src = cache / "src" / f"cryptodev-linux-{CRYPTODEV_COMMIT}.tar.gz"
        if not src.is_file():
            log(f"cryptodev: {vendored} missing, fetching {CRYPTODEV_URL}")
            src.parent.mkdir(parents=True, exist_ok=True)
            tmp = src.with_suffix(f".part{os.getpid()}")
            try:
                with urllib.request.urlopen(CRYPTODEV_URL, timeout=60) as r:
                    tmp.write_bytes(r.read())
            except OSError as exc:
                tmp.unlink(missing_ok=True)
                raise BuildError(
                    f"cryptodev-linux {CRYPTODEV_COMMIT[:12]}: no {CRYPTODEV_TARBALL} in "
                    f"{vendored.parent} (set VENDOR_DIR to the folder holding it) and "
                    f"fetching {CRYPTODEV_URL} failed: {exc}"
                ) from None
            tmp.rename(src)
    try:
        digest = _tree_sha256(src)
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise BuildError(f"cryptodev-linux source {src} is not a readable tarball: {exc}") from None
    if digest != CRYPTODEV_TREE_SHA256:
        raise BuildError(
            f"cryptodev-linux source {src}: its files hash to {digest}, not the pinned "
            f"{CRYPTODEV_TREE_SHA256} of commit {CRYPTODEV_COMMIT[:12]} (wrong or altered snapshot)"
        )
    return src


def _headers_packages(version: str) -> list[str]:
    """linux-headers-<version> and the -common and linux-kbuild packages it needs."""
    pkg = f"linux-headers-{version}"
    out = _run(["apt-cache", "depends", pkg])
    deps = re.findall(r"Depends:\s+(linux-(?:headers|kbuild)-\S+)", out)
    if not any(d.endswith("-common") for d in deps):
        raise BuildError(f"apt-cache depends {pkg} names no -common headers package:\n{out}")
    return [pkg, *deps]


def ensure_cryptodev(cache: Path, kernel: Kernel, log: Log, force: bool = False) -> Path:
    """cryptodev.ko for the lab kernel, cached by kernel version, snapshot and recipe."""
    key = _sha([CRYPTODEV_RECIPE, kernel.version, CRYPTODEV_TREE_SHA256])
    out = cache / "cryptodev" / f"{kernel.version}-{key}"
    if (out / "cryptodev.ko").is_file() and not force:
        return out / "cryptodev.ko"
    t0 = time.monotonic()
    source = cryptodev_source(cache, log)
    pkgs = _headers_packages(kernel.version)
    log(f"cryptodev: building {CRYPTODEV_COMMIT[:12]} against {pkgs[0]}")
    (cache / "cryptodev").mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache / "cryptodev") as tmp:
        work = Path(tmp)
        (work / "deb").mkdir()
        _run(["apt-get", "download", *pkgs], cwd=work / "deb")
        debs = sorted((work / "deb").glob("*.deb"))
        for deb in debs:
            _run(["dpkg-deb", "-x", str(deb), str(work / "root")])
        headers = work / "root" / "usr" / "src" / pkgs[0]
        # Debian's arch Makefile includes the -common tree by its installed, absolute path.
        mk = headers / "Makefile"
        mk.write_text(mk.read_text().replace("/usr/src/", f"{work}/root/usr/src/"))
        with tarfile.open(source) as tf:
            tf.extractall(work / "src", filter="data")
        srcdir = next(p for p in (work / "src").iterdir() if (p / "ioctl.c").is_file())
        _run(
            ["make", "-C", str(srcdir), f"KERNEL_DIR={headers}", "-j2"],
            log_file=cache / "cryptodev" / "build.log",
        )
        ko = srcdir / "cryptodev.ko"
        vermagic = _run(["modinfo", "-F", "vermagic", str(ko)]).strip()
        if not vermagic.startswith(kernel.version + " "):
            raise BuildError(f"cryptodev.ko has vermagic {vermagic!r}, not {kernel.version}")
        _run(["strip", "--strip-debug", str(ko)])
        stage = work / "out"
        stage.mkdir()
        shutil.copy2(ko, stage / "cryptodev.ko")
        versions = ", ".join(d.name.removesuffix(".deb") for d in debs)
        (stage / "BUILT").write_text(
            f"cryptodev-linux {CRYPTODEV_COMMIT} ({source.name}, files sha256 "
            f"{CRYPTODEV_TREE_SHA256})\nbuilt for {kernel.version} against {versions}\n"
            "not loaded at boot: modprobe cryptodev\n"
        )
        shutil.rmtree(out, ignore_errors=True)
        stage.rename(out)
    log(f"cryptodev: module built in {time.monotonic() - t0:.1f}s")
    return out / "cryptodev.ko"


def _install_cryptodev(root: Path, kernel: Kernel, ko: Path) -> None:
    """cryptodev.ko into the image's module tree (extra/, depmod) and its note in /etc/oe-lab."""
    dest = root / "lib" / "modules" / kernel.version / "extra" / "cryptodev.ko"
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(ko, dest)
    _run(["depmod", "-b", str(root), kernel.version])
    shutil.copy2(ko.parent / "BUILT", root / "etc" / "oe-lab" / "cryptodev")


# ---------------------------------------------------------------------------------------- router


def project_version() -> str:
    return str(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"])


def build_wheels(cache: Path, log: Log) -> tuple[list[Path], str]:
    """The project wheel plus the pinned runtime deps; returns them and a content hash."""
    req = (REPO / "requirements.txt").read_bytes()
    deps_dir = cache / "wheels" / f"deps-{_sha([req, sys.version])}"
    if not (deps_dir / "done").exists():
        log("router: downloading pinned runtime wheels (requirements.txt)")
        shutil.rmtree(deps_dir, ignore_errors=True)
        deps_dir.mkdir(parents=True)
        _run(
            [sys.executable, "-m", "pip", "wheel", "-q", "--disable-pip-version-check",
             "-r", str(REPO / "requirements.txt"), "-w", str(deps_dir)],
            log_file=cache / "wheels" / "deps.log",
        )  # fmt: skip
        (deps_dir / "done").touch()
    # A private directory per build: two builds at once (two developers, CI) never collide.
    proj_dir = Path(tempfile.mkdtemp(prefix="project-", dir=cache / "wheels"))
    for old in (cache / "wheels").glob("project-*"):
        if old != proj_dir and time.time() - old.stat().st_mtime > 3600:
            shutil.rmtree(old, ignore_errors=True)
    with tempfile.TemporaryDirectory() as tmp:
        # Build from a copy so setuptools' build/ and egg-info never land in the shared checkout.
        src = Path(tmp) / "src"
        shutil.copytree(
            REPO,
            src,
            ignore=shutil.ignore_patterns(
                ".git", ".venv", "test-results", "build", "dist", "*.egg-info", "__pycache__",
                ".mypy_cache", ".ruff_cache", ".pytest_cache", ".hypothesis", "bench",
            ),
        )  # fmt: skip
        _run(
            [sys.executable, "-m", "pip", "wheel", "-q", "--disable-pip-version-check",
             "--no-deps", "--no-build-isolation", "-w", str(proj_dir), str(src)],
            log_file=cache / "wheels" / "project.log",
        )  # fmt: skip
    wheels = sorted(deps_dir.glob("*.whl")) + sorted(proj_dir.glob("*.whl"))
    parts: list[bytes] = []
    for w in wheels:
        with zipfile.ZipFile(w) as z:
            for n in sorted(z.namelist()):
                if not n.endswith("RECORD"):
                    parts += [n.encode(), z.read(n)]
    return wheels, _sha(parts)


BANNER = """\
oe-router QEMU lab image
------------------------
OpenWrt's userland built from source on Debian's kernel and libc (glibc, not musl).
procd is PID 1 and runs /etc/rc.d/S*; ubusd, logd, rpcd, netifd, uci, ucode, firewall4's
fw4, opkg and base-files' shell libraries come from pinned upstream snapshots (what was
built and from which commit: /etc/oe-lab/userland.json). netifd sets the static wan and
lan from /etc/config/network, started by the lab's own /etc/init.d/network. The kernel,
python3, iproute2, nftables, dnsmasq and busybox (/bin/sh) are Debian bookworm's.
uhttpd (S50) serves LuCI (luci-base and the bootstrap theme, English only; luci-app-oe
from its .ipk: Services -> Opportunistic IPsec) at /cgi-bin/luci and ubus JSON-RPC at
/ubus; rpcd logs root in with root's lab password.
This is not an OpenWrt release: no LuCI admin modules, no wireless, no DHCP client, no musl.
"""
#: rc.d links the boot runs (as `/etc/init.d/X enable` makes them): START number, script
RC_D = (
    (10, "uci-defaults"), (12, "log"), (12, "rpcd"), (19, "firewall"), (20, "network"),
    (50, "uhttpd"), (99, "oe-lab"),
)  # fmt: skip
#: the package's rc.d links (as its default_postinst made them) that the image leaves out,
#: one "NAME TARGET" a line: qemu/guest/router/usr/lib/oe-lab/first-boot restores them
RC_D_DEFERRED = "etc/oe-lab/rc.d-deferred"
#: root's password in the lab image: LuCI's login and rpcd's ($p$root in /etc/config/rpcd)
#: check it against /etc/shadow. A known lab password, never a product default.
ROOT_PASSWORD = "oe-lab-root"
#: fixed, so the same inputs give the same image
ROOT_PASSWORD_SALT = "oelabsalt"
#: the unprivileged user procd starts ubusd as (OpenWrt's base-files passwd entry)
UBUS_USER = ("ubus:x:81:81:ubus:/var/run/ubus:/bin/false\n", "ubus:x:81:\n")
#: what the router image does not need from the userland stage (build-time files)
STAGE_SKIP = ("usr/include", "usr/lib/pkgconfig", "usr/share/cmake", "usr/lib/cmake")


def _set_root_password(root: Path) -> None:
    """root's /etc/shadow entry gets ROOT_PASSWORD (SHA-512 crypt, which glibc's crypt and
    so rpcd's login check read)."""
    hashed = _run(["openssl", "passwd", "-6", "-salt", ROOT_PASSWORD_SALT, ROOT_PASSWORD])
    shadow = root / "etc" / "shadow"
    lines = shadow.read_text().splitlines()
    for i, line in enumerate(lines):
        fields = line.split(":")
        if fields[0] == "root":
            fields[1] = hashed.strip()
            lines[i] = ":".join(fields)
            break
    else:
        raise BuildError(f"router: no root entry in {shadow}")
    shadow.write_text("\n".join(lines) + "\n")


def _merge_tree(src: Path, dest: Path) -> None:
    """Copy ``src`` over ``dest``, through dest's own links (Debian's /bin -> usr/bin)."""
    for dirpath, dirnames, filenames in os.walk(src):
        rel = Path(dirpath).relative_to(src)
        if any(str(rel) == s or str(rel).startswith(s + "/") for s in STAGE_SKIP):
            dirnames[:] = []
            continue
        (dest / rel).mkdir(parents=True, exist_ok=True)
        for name in filenames + [d for d in dirnames if (Path(dirpath) / d).is_symlink()]:
            s, d = Path(dirpath) / name, dest / rel / name
            if name.endswith(".a"):
                continue
            if d.is_symlink() or d.is_file():
                d.unlink()
            shutil.copy2(s, d, follow_symlinks=False)


def _openwrt_overlay(root: Path, stage: Path, stamp: dict[str, object]) -> None:
    """OpenWrt's userland into the router root: procd as init, busybox ash as /bin/sh."""
    _merge_tree(stage, root)
    _merge_tree(ROUTER_FILES, root)
    # /bin/sh and /bin/ash are busybox's ash, as on OpenWrt (procd.sh needs ash or bash:
    # `let`, `&>`; not Debian's dash). It is Debian's dynamic busybox (router.packages), not
    # the host's busybox-static, which is built to prefer its own applets
    # (FEATURE_SH_STANDALONE): that ash ran busybox's ps, logread and ip instead of procps',
    # ubox's and iproute2's. This one finds commands on PATH.
    busybox = root / "bin" / "busybox"
    if not busybox.is_file():
        raise BuildError("router: no /bin/busybox in the base root (busybox in router.packages)")
    for name in ("sh", "ash"):
        (root / "bin" / name).unlink(missing_ok=True)
        (root / "bin" / name).symlink_to("busybox")
    rcd = root / "etc" / "rc.d"
    rcd.mkdir(exist_ok=True)
    for start, script in RC_D:
        init = root / "etc" / "init.d" / script
        if not init.is_file() or not os.access(init, os.X_OK):
            # procd runs the rc.d links as programs: a script without x is skipped silently
            raise BuildError(f"router: /etc/init.d/{script} missing or not executable")
        (rcd / f"S{start:02d}{script}").symlink_to(f"../init.d/{script}")
    for path, line in zip(("passwd", "group"), UBUS_USER, strict=True):
        f = root / "etc" / path
        if "\nubus:" not in "\n" + f.read_text():
            f.write_text(f.read_text() + line)
    _set_root_password(root)
    # the stage's libraries sit in /usr/lib, as on OpenWrt, without rpath
    (root / "etc" / "ld.so.conf.d" / "openwrt.conf").write_text("/usr/lib\n")
    _run(["ldconfig", "-r", str(root)])
    (root / "etc" / "oe-lab" / "userland.json").write_text(json.dumps(stamp, indent=2) + "\n")


#: opkg's python3-* names of the pinned runtime libraries -> their distribution (wheel) names
RUNTIME_DISTS = {
    "python3-cryptography": "cryptography",
    "python3-dns": "dnspython",
    "python3-pyroute2": "pyroute2",
}


def _wheel_version(wheels: list[Path], dist: str) -> str:
    for w in wheels:
        name, version = w.name.split("-")[:2]
        if name.lower().replace("_", "-") == dist:
            return version
    raise BuildError(f"router: no {dist} wheel among the pinned runtime wheels")


def _debian_version(root: Path, package: str) -> str:
    """The upstream version of a Debian package installed in root (dpkg's status file)."""
    for para in (root / "var" / "lib" / "dpkg" / "status").read_text().split("\n\n"):
        fields = ipk.control_fields(para)
        if fields.get("Package") == package and "Version" in fields:
            return fields["Version"].split(":")[-1].split("-")[0]
    raise BuildError(f"router: Debian package {package} is not installed in the base root")


#: opkg names of the package's other Depends -> the Debian package of the image that
#: stands in for it (Debian's nft has JSON support too, as nftables-json's)
DEBIAN_STANDINS = {"nftables-json": "nftables"}


def provided_by_image(
    depends: list[str],
    wheels: list[Path],
    kernel: str,
    python: str,
    debian: dict[str, str] | None = None,
) -> dict[str, str]:
    """The package's Depends with the versions the image's Debian parts carry: python3 and
    its modules are Debian's python3 (``python``), the libraries are the pinned wheels,
    kmod-* are in or beside Debian's kernel, and ``debian`` gives the versions of the
    DEBIAN_STANDINS (Debian's nftables for nftables-json)."""
    out = {}
    for name in depends:
        if name in RUNTIME_DISTS:
            out[name] = _wheel_version(wheels, RUNTIME_DISTS[name])
        elif debian is not None and name in debian:
            out[name] = debian[name]
        elif name.startswith("python3-"):
            out[name] = python
        elif name.startswith("kmod-"):
            out[name] = kernel
        else:
            raise BuildError(f"router: the package depends on {name}, which the image lacks")
    return out


def _router_overlay(root: Path, wheels: list[Path]) -> None:
    """The pinned runtime libraries (the package's python3-* dependencies) into site-packages;
    the project itself comes from its .ipk (``_opkg_install``)."""
    pydirs = sorted((root / "usr" / "lib").glob("python3.[0-9]*"))
    if not pydirs:
        raise BuildError("router: no /usr/lib/python3.X in the base root")
    site = pydirs[-1] / "site-packages"
    site.mkdir(exist_ok=True)
    deps = [w for w in wheels if not w.name.startswith("python_oe-")]
    _run(
        [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check",
         "--no-deps", "--no-index", "--no-warn-script-location", "--target", str(site),
         *map(str, deps)],
    )  # fmt: skip
    shutil.rmtree(site / "bin", ignore_errors=True)
    # Debian's python3 only searches dist-packages: point it at OpenWrt's site-packages.
    (root / "usr" / "lib" / "python3" / "dist-packages" / "openwrt-layout.pth").write_text(
        f"/usr/lib/{pydirs[-1].name}/site-packages\n"
    )
    (root / "etc" / "banner").write_text(BANNER)
    (root / "etc" / "oe-lab" / "role").write_text("router\n")


#: what the luci-app-oe package stands on that the image has from the userland stage, not
#: from an .ipk (luci-base: qemu/userland.py builds and installs it)
LUCI_PROVIDED = ("luci-base",)


def _stage_commit(stamp: dict[str, object], component: str) -> str:
    """The snapshot commit a userland component was built from (its stamp), for the
    version opkg's status gives it."""
    components = stamp.get("components")
    info = components.get(component) if isinstance(components, dict) else None
    commit = info.get("commit") if isinstance(info, dict) else None
    return str(commit) if commit else "unknown"


def _opkg_run(root: Path, opkg: Path, env: dict[str, str], package: Path,
              installs: str) -> str:  # fmt: skip
    """`opkg install` one .ipk into the image root, as OpenWrt's image builder does (offline
    root, IPKG_INSTROOT, maintainer scripts forced); ``installs``: a file (relative to the
    root) it must have put there. Returns opkg's output."""
    res = subprocess.run(
        [str(opkg), "--offline-root", str(root), "--force-postinstall", "install", str(package)],
        env={**env, "IPKG_INSTROOT": str(root)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    if res.returncode != 0 or not (root / installs).is_file():
        raise BuildError(f"router: opkg install {package.name} failed:\n{res.stdout}{res.stderr}")
    return res.stdout + res.stderr


def _opkg_install(root: Path, opkg: Path, env: dict[str, str], package: Path,
                  provided: dict[str, str], luci: Path | None = None) -> str:  # fmt: skip
    """`opkg install` python3-oe's .ipk into the image root, then luci-app-oe's (``luci``,
    which depends on it and on the stage's luci-base): default_postinst enables the service
    and leaves the uci-defaults for the first boot. Returns opkg's output."""
    (root / "etc" / "opkg.conf").write_text(ipk.OPKG_CONF)
    for folder in ("usr/lib/opkg", "var/opkg-lists"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    ipk.declare_provided(root, provided)
    out = _opkg_run(root, opkg, env, package, "usr/bin/oe-routerd")
    if luci is not None:
        out += _opkg_run(root, opkg, env, luci, "www/luci-static/resources/view/oe/status.js")
    # The session lab's tests start the service themselves (/etc/init.d/oe start), each
    # with the configuration it needs (the lab root's anchor, an identity): not at boot.
    # The links are recorded (name, target): the lab's first-boot mode puts them back.
    deferred = []
    for link in sorted((root / "etc" / "rc.d").glob("[SK][0-9][0-9]oe")):
        deferred.append(f"{link.name} {os.readlink(link)}\n")
        link.unlink()
    (root / RC_D_DEFERRED).write_text("".join(deferred))
    return out


def ensure_router(cache: Path, kernel: Kernel, log: Log, force: bool = False) -> Path:
    packages = read_list(GUEST / "router.packages")
    base = ensure_base(cache, "router", packages, log, force)
    wheels, wheel_hash = build_wheels(cache, log)
    cryptodev_ko = ensure_cryptodev(cache, kernel, log, force)
    import userland  # imports this module: not at the top

    stage = userland.build(log=log, force=force)
    stamp = stage.stamp()
    package = ipk.build(cache / "ipk")
    luci = ipk.build_luci(cache / "ipk")
    for old in (cache / "ipk").glob("*"):
        if old not in (package.path, package.sdist, luci.path):
            old.unlink()
    files = [p for p in (REPO / "files").rglob("*")]
    key = _sha(
        [FORMAT, base.name, kernel.version, wheel_hash, project_version(),
         (REPO / "requirements.txt").read_bytes(), *_files_digest(files),
         *_files_digest([GUEST / "init", GUEST / "modules.txt"]),
         *_files_digest(ROUTER_FILES.rglob("*")), str(stamp.get("key")),
         *_files_digest([QEMU_DIR / "build.py"]),  # the router recipe is this file
         package.path.read_bytes(), luci.path.read_bytes(),
         cryptodev_ko.read_bytes(), (cryptodev_ko.parent / "BUILT").read_bytes()]
    )  # fmt: skip
    image = cache / "images" / f"router-{key}.ext4"
    if image.exists() and not force:
        log(f"router: cached {image}")
        return image
    t0 = time.monotonic()
    image.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        root = Path(tmp) / "root"
        _extract(base, root)
        _common_overlay(root, kernel)
        _router_overlay(root, wheels)
        _openwrt_overlay(root, stage.root, stamp)
        depends = ipk.control_fields(package.control)["Depends"].split(", ")
        python = _debian_version(root, "python3-minimal")
        debian = {n: _debian_version(root, d) for n, d in DEBIAN_STANDINS.items() if n in depends}
        provided = provided_by_image(depends, wheels, kernel.version, python, debian)
        luci_base = _stage_commit(stamp, "luci-base")
        for name in ipk.control_fields(luci.control)["Depends"].split(", "):
            if name in LUCI_PROVIDED:
                provided[name] = f"git-{luci_base}"
            elif name != package.recipe.name:
                raise BuildError(f"router: luci-app-oe depends on {name}, which the image lacks")
        out = _opkg_install(
            root, stage.tool("opkg"), stage.env(), package.path, provided, luci.path
        )
        (root / "etc" / "oe-lab" / "opkg-install.log").write_text(out)
        _install_cryptodev(root, kernel, cryptodev_ko)
        _mke2fs(root, image, log)
    _replace_old(image)
    log(f"router: image built in {time.monotonic() - t0:.1f}s")
    return image


def ensure_world(cache: Path, kernel: Kernel, log: Log, force: bool = False) -> Path:
    wpk = read_list(GUEST / "world.packages")
    spk = read_list(GUEST / "swroot.packages")
    with concurrent.futures.ThreadPoolExecutor(2) as ex:
        fw = ex.submit(ensure_base, cache, "world", wpk, log, force)
        fs = ex.submit(ensure_base, cache, "swroot", spk, log, force)
        base, swbase = fw.result(), fs.result()
    key = _sha(
        [FORMAT, base.name, swbase.name, kernel.version,
         *_files_digest([GUEST / "init", GUEST / "modules.txt"])]
    )  # fmt: skip
    image = cache / "images" / f"world-{key}.ext4"
    if image.exists() and not force:
        log(f"world: cached {image}")
        return image
    t0 = time.monotonic()
    image.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        root = Path(tmp) / "root"
        _extract(base, root)
        _extract(swbase, root / "opt" / "swroot")
        _common_overlay(root, kernel)
        (root / "etc" / "oe-lab" / "role").write_text("world\n")
        _mke2fs(root, image, log)
    _replace_old(image)
    log(f"world: image built in {time.monotonic() - t0:.1f}s")
    return image


def build_all(cache: Path | None = None, log: Log = print, force: bool = False) -> Images:
    """Make sure kernel and both images exist and are current; cheap when nothing changed."""
    cache = cache or default_cache()
    cache.mkdir(parents=True, exist_ok=True)
    kernel = ensure_kernel(cache, log, force)
    with concurrent.futures.ThreadPoolExecutor(2) as ex:
        fr = ex.submit(ensure_router, cache, kernel, log, force)
        fw = ex.submit(ensure_world, cache, kernel, log, force)
        return Images(kernel, fr.result(), fw.result())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--force", action="store_true", help="rebuild everything, ignoring the cache")
    ap.add_argument(
        "--cache", type=Path, default=None, help="cache dir (default ~/.cache/oe-router)"
    )
    args = ap.parse_args(argv)
    t0 = time.monotonic()

    def log(msg: str) -> None:
        print(f"[build {time.monotonic() - t0:6.1f}s] {msg}", flush=True)

    try:
        images = build_all(args.cache, log, args.force)
    except BuildError as exc:
        print(f"build: {exc}", file=sys.stderr)
        return 1
    log(f"kernel {images.kernel.version}: {images.kernel.vmlinux}")
    log(f"router image: {images.router}")
    log(f"world image:  {images.world}")
    log(f"total build time {time.monotonic() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
