"""Fixtures of the QEMU tier: one lab per session, artifacts on failure.

Tests read like:

    def test_x(lab: Lab) -> None:
        with lab.capture_wan() as cap:
            page = lab.client("curl -s http://plain.example.test/").check().stdout
        assert cap.esp() == 0
        lab.router("oe status --json")

Why session scope: a warm boot costs up to a minute under TCG, so scenarios share one lab and
must leave it as they found it (stop what they start).
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "qemu"))

import build  # noqa: E402
import oelab  # noqa: E402
from lab import Lab, LabError  # noqa: E402

ARTIFACTS = REPO / "test-results" / "artifacts"
_FAILED = pytest.StashKey[bool]()


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:120]


def _printer(config: pytest.Config) -> Callable[[str], None]:
    """Progress lines that reach the terminal even while pytest captures output."""
    capman = config.pluginmanager.getplugin("capturemanager")

    def log(msg: str) -> None:
        if capman is not None:
            with capman.global_and_fixture_disabled():
                print(f"\n[lab] {msg}", flush=True, end="")
        else:
            print(f"[lab] {msg}", flush=True)

    return log


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    report = yield
    if report.failed:  # type: ignore[attr-defined]
        item.stash[_FAILED] = True
    return report


@pytest.fixture(scope="session")
def lab_images(pytestconfig: pytest.Config) -> build.Images:
    """Kernel and images, built or taken from ~/.cache/oe-router (cheap when unchanged)."""
    log = _printer(pytestconfig)
    t0 = time.monotonic()
    images = build.build_all(log=log)
    log(f"images ready in {time.monotonic() - t0:.1f}s")
    return images


@pytest.fixture(scope="session")
def lab(pytestconfig: pytest.Config, lab_images: build.Images) -> Iterator[Lab]:
    """The booted lab (router + world), powered off at the end of the session.

    The router has a virtio-crypto device (the lab's hardware engine) and ``-cpu max``:
    AES-NI still outranks virtio for the kernel's own pick of ``cbc(aes)``, so every
    scenario sees the CPU drivers it always did, and the offload tests bind the virtio
    driver by name (or unbind the device to see it go)."""
    yield from _booted(
        Lab(lab_images, crypto=True, cpu="max", log=_printer(pytestconfig)), "lab-start"
    )


#: seconds the first-boot router's WAN stays down after oe-routerd opened its socket
FIRST_BOOT_WAN_DELAY = 30
#: the world hosts the first-boot tests talk to: the DNS (authoritative and resolver) and
#: the keyed host; the rest of the world keeps its addresses with nothing running
FIRST_BOOT_SERVICES = ("ns", "resolver", "oe-null")


@pytest.fixture(scope="module")
def first_boot_lab(pytestconfig: pytest.Config, lab_images: build.Images) -> Iterator[Lab]:
    """A lab of its own whose router boots as a user flashes it (``Lab(first_boot=True)``):
    procd starts oe-routerd at boot, the shipped configuration but for the trust anchor.
    One boot per module that uses it; powered off at the module's end. Its router's WAN
    comes up only FIRST_BOOT_WAN_DELAY seconds after the daemon has started (a slow link:
    the daemon runs without a WAN address meanwhile), so the boot gets a longer deadline."""
    yield from _booted(
        Lab(
            lab_images,
            first_boot=True,
            wan_delay=FIRST_BOOT_WAN_DELAY,
            services=FIRST_BOOT_SERVICES,
            log=_printer(pytestconfig),
        ),
        "first-boot-lab-start",
        timeout=240 + FIRST_BOOT_WAN_DELAY,
    )


def _booted(the_lab: Lab, artifacts: str, timeout: float = 300) -> Iterator[Lab]:
    """Start ``the_lab`` within ``timeout`` seconds (a failure fails the test with its
    artifacts kept under ``artifacts``), yield it, power it off. The session lab is
    all-ready after about 75 s alone on 2 cores; 300 s, as ``make demo`` gives it, because
    a busy machine (another build, benchmarks) made its world's start scripts miss 120 s
    while nothing was wrong."""
    log = the_lab.log
    try:
        the_lab.start(timeout)
    except (LabError, OSError) as exc:
        dest = the_lab.collect_artifacts(ARTIFACTS / artifacts)
        the_lab.close()
        pytest.fail(f"the lab did not start: {exc}\n(artifacts in {dest})", pytrace=False)
    log(
        f"warm boot to all-ready {the_lab.timings.all_ready:.1f}s "
        f"(agents {the_lab.timings.boot_to_agents:.1f}s); run dir {the_lab.run_dir}"
    )
    for m in the_lab.missing:
        log(f"MISSING: {m}")
    try:
        yield the_lab
    finally:
        the_lab.close()


#: the fixtures that hold a booted lab, whose state a failed test keeps
LAB_FIXTURES = ("lab", "first_boot_lab")


@pytest.fixture(autouse=True)
def _lab_artifacts(request: pytest.FixtureRequest) -> Iterator[None]:
    """On a failed lab test, copy consoles, pcaps, daemon logs and VM state to test-results."""
    yield
    if not request.node.stash.get(_FAILED, False):
        return
    for name in LAB_FIXTURES:
        if name in request.fixturenames:
            the_lab: Lab = request.getfixturevalue(name)
            dest = the_lab.collect_artifacts(ARTIFACTS / _safe(request.node.nodeid))
            _printer(request.config)(f"artifacts of {request.node.nodeid}: {dest}")


@pytest.fixture(scope="module")
def oe_lab(lab: Lab, request: pytest.FixtureRequest) -> Iterator[Lab]:
    """oe-routerd running (its DNS front capturing dnsmasq's forwards) with the module's
    ROUTER_ID, then stopped."""
    import oelab

    oelab.start_daemon(lab, local_id=request.module.ROUTER_ID)
    try:
        yield lab
    finally:
        oelab.stop_daemon(lab)


INTEROP = REPO / "test-results" / "interop.json"


@pytest.fixture(scope="session")
def interop(lab: Lab) -> Iterator[oelab.Interop]:
    """The run's interop table (oelab.Interop), written to test-results/interop.json and
    interop.md when the session ends."""
    table = oelab.Interop(lab, INTEROP)
    yield table
    table.write()


@pytest.fixture(scope="module")
def figures(request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
    """Numbers a module saw in this run, written as JSON to its RESULTS path."""
    out: dict[str, Any] = {}
    yield out
    path: Path = request.module.RESULTS
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(out, indent=2, sort_keys=True) + "\n")


FAULTY_SOURCE = Path(__file__).resolve().parent / "data" / "esp_faulty.c"


def _kernel_headers(kernel: build.Kernel, work: Path) -> Path:
    """Debian's linux-headers for the lab kernel, unpacked under ``work`` (as build.py's
    cryptodev recipe fetches them)."""
    pkgs = build._headers_packages(kernel.version)
    (work / "deb").mkdir()
    build._run(["apt-get", "download", *pkgs], cwd=work / "deb")
    for deb in sorted((work / "deb").glob("*.deb")):
        build._run(["dpkg-deb", "-x", str(deb), str(work / "root")])
    headers = work / "root" / "usr" / "src" / pkgs[0]
    mk = headers / "Makefile"
    mk.write_text(mk.read_text().replace("/usr/src/", f"{work}/root/usr/src/"))
    return headers


@pytest.fixture(scope="module")
def esp_faulty_ko(lab: Lab) -> Path:
    """esp_faulty.ko (data/esp_faulty.c: a TEST-ONLY rfc4106(gcm(aes)) driver that can flip a
    ciphertext bit or fail encryption) for the lab kernel, built once and cached by kernel
    and source, copied to the lab share as /lab/esp_faulty.ko. Loading it is the test's."""
    import hashlib
    import shutil
    import subprocess
    import tempfile

    source = FAULTY_SOURCE.read_text()
    kernel = lab.images.kernel
    key = hashlib.sha256(kernel.version.encode() + source.encode()).hexdigest()[:16]
    out = build.default_cache() / "testmod" / f"{kernel.version}-{key}" / "esp_faulty.ko"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out.parent.parent) as tmp:
            work = Path(tmp)
            headers = _kernel_headers(kernel, work)
            src = work / "src"
            src.mkdir()
            (src / "esp_faulty.c").write_text(source)
            (src / "Kbuild").write_text("obj-m := esp_faulty.o\n")
            build._run(["make", "-C", str(headers), f"M={src}", "modules"])
            ko = src / "esp_faulty.ko"
            vermagic = build._run(["modinfo", "-F", "vermagic", str(ko)]).strip()
            assert vermagic.startswith(kernel.version + " "), vermagic
            subprocess.run(["strip", "--strip-debug", str(ko)], check=True)
            shutil.copy2(ko, out)
    shutil.copy2(out, lab.run_dir / "esp_faulty.ko")
    return out


@pytest.fixture(scope="module")
def crypto_user_module(lab: Lab) -> Iterator[None]:
    """crypto_user (NETLINK_CRYPTO) loaded for the module's tests; unloaded after if it was
    not loaded before (the lab never loads it at boot)."""
    was = lab.router("grep -q '^crypto_user ' /proc/modules").rc == 0
    lab.router("modprobe crypto_user").check()
    yield
    if not was:
        lab.router("rmmod crypto_user").check()


@pytest.fixture
def running_daemon(lab: Lab) -> Iterator[Lab]:
    """oe-routerd with the shipped configuration on the session lab (``oelab.start_daemon``),
    stopped afterwards with what it keeps on purpose (``oelab.stop_daemon``)."""
    oelab.start_daemon(lab)
    try:
        yield lab
    finally:
        oelab.stop_daemon(lab)
