"""offload.probe: engines from a recorded /proc/crypto and the AF_ALG and /dev/crypto facts;
the digest that decides whether a re-probe is due; the hotplug watcher (rescan and udev)."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import types
from pathlib import Path

import pytest

from oe_router.offload.engine import TRANSFORMS, EngineKind
from oe_router.offload.probe import (
    EngineSpec,
    HostSnapshot,
    HotplugWatcher,
    afalg_available,
    discover,
    probe_host,
)


def _entry(name: str, driver: str, module: str, priority: int, type_: str, **kw: str) -> str:
    fields = {
        "name": name,
        "driver": driver,
        "module": module,
        "priority": str(priority),
        "refcnt": kw.pop("refcnt", "1"),
        "selftest": kw.pop("selftest", "passed"),
        "internal": kw.pop("internal", "no"),
        "type": type_,
        **kw,
    }
    return "".join(f"{k:<13}: {v}\n" for k, v in fields.items()) + "\n"


# As the lab router (Debian 6.1, -cpu max, virtio-crypto) shows it, shortened.
VIRTIO_CBC = _entry("cbc(aes)", "virtio_crypto_aes_cbc", "virtio_crypto", 150, "skcipher")
PROC = "".join(
    [
        _entry("rfc4106(gcm(aes))", "rfc4106-gcm-aesni", "aesni_intel", 400, "aead"),
        _entry("gcm(aes)", "generic-gcm-aesni", "aesni_intel", 400, "aead"),
        _entry("__cbc(aes)", "__cbc-aes-aesni", "aesni_intel", 400, "skcipher", internal="yes"),
        _entry("cbc(aes)", "cbc-aes-aesni", "aesni_intel", 400, "skcipher"),
        VIRTIO_CBC,
        _entry("akcipher", "virtio-crypto-rsa", "virtio_crypto", 150, "akcipher",
               selftest="unknown"),
        _entry("hmac(sha256)", "hmac(sha256-generic)", "kernel", 100, "shash"),
        _entry("sha256", "sha256-generic", "kernel", 100, "shash"),
        _entry("authenc(hmac(sha256),cbc(aes))",
               "authenc(hmac(sha256-generic),virtio_crypto_aes_cbc)", "authenc", 2150, "aead"),
        # an accelerator's GCM whose self-test failed: the kernel never hands it out
        _entry("gcm(aes)", "safexcel-gcm-aes", "crypto_safexcel", 300, "aead",
               selftest="unknown"),
        # an accelerator's whole ESP AEAD, built in (module "kernel"), named by its driver
        _entry("rfc4106(gcm(aes))", "rfc4106-gcm-aes-eip93", "kernel", 300, "aead"),
        _entry("chacha20", "chacha20-simd", "chacha_x86_64", 300, "skcipher"),
    ]
)  # fmt: skip

ALL = tuple(TRANSFORMS)
#: AES-CBC with HMAC-SHA2-256/384/512: what a cbc(aes) driver serves through authenc
CBC = tuple(n for n, t in TRANSFORMS.items() if t.hmac_hash is not None)
GCM = ("aes128gcm16", "aes256gcm16")


def test_software_afalg_hardware_drivers_and_cryptodev_are_found() -> None:
    specs = discover(HostSnapshot(PROC, afalg=True, dev_crypto=True))
    assert [s.name for s in specs] == [
        "software",
        "afalg",
        "afalg:rfc4106-gcm-aes-eip93",
        "afalg:virtio_crypto_aes_cbc",
        "cryptodev",
    ]
    by = {s.name: s for s in specs}
    assert by["software"] == EngineSpec(
        "software", EngineKind.CPU, tuple((t, "openssl") for t in ALL)
    )
    # virtio's cbc(aes) serves both CBC transforms (through authenc), nothing else
    virtio = by["afalg:virtio_crypto_aes_cbc"]
    assert virtio.kind is EngineKind.HARDWARE and virtio.transforms == CBC
    assert virtio.driver("aes256-sha256") == "virtio_crypto_aes_cbc"
    assert by["afalg:rfc4106-gcm-aes-eip93"].transforms == GCM
    # the kernel's pick: the registered driver with the highest priority (aesni here,
    # not virtio; not the authenc template instance that merely wraps virtio)
    afalg = by["afalg"]
    assert afalg.kind is EngineKind.CPU and afalg.transforms == ALL
    assert afalg.driver("aes256gcm16") == "rfc4106-gcm-aesni"
    assert afalg.driver("aes256-sha256") == "cbc-aes-aesni"
    assert afalg.driver("chacha20poly1305") == ""  # a template, built on first use
    assert by["cryptodev"].transforms == ALL


def test_without_af_alg_or_dev_crypto_only_software_remains() -> None:
    assert [s.name for s in discover(HostSnapshot(PROC, afalg=False, dev_crypto=False))] == [
        "software"
    ]
    names = [s.name for s in discover(HostSnapshot(PROC, afalg=False, dev_crypto=True))]
    assert names == ["software", "cryptodev"]
    # an empty /proc/crypto (no crypto API): AF_ALG still names the kernel's pick
    names = [s.name for s in discover(HostSnapshot("", afalg=True, dev_crypto=False))]
    assert names == ["software", "afalg"]


def test_digest_ignores_refcounts_and_template_instances_but_not_drivers() -> None:
    base = HostSnapshot(PROC, True, False)
    busy = PROC.replace("refcnt       : 1", "refcnt       : 7")
    assert busy != PROC and HostSnapshot(busy, True, False).digest == base.digest
    # our own KAT instantiating a template adds an entry: not a new engine
    used = PROC + _entry(
        "rfc7539esp(chacha20,poly1305)",
        "rfc7539esp(chacha20-simd,poly1305-simd)",
        "chacha20poly1305",
        300,
        "aead",
    )
    assert HostSnapshot(used, True, False).digest == base.digest
    assert discover(HostSnapshot(used, True, False)) == discover(base)
    # the module leaving: another digest, the engine gone
    gone = PROC.replace(VIRTIO_CBC, "")
    assert HostSnapshot(gone, True, False).digest != base.digest
    assert "afalg:virtio_crypto_aes_cbc" not in [
        s.name for s in discover(HostSnapshot(gone, True, False))
    ]
    # /dev/crypto appearing, AF_ALG going
    assert HostSnapshot(PROC, True, True).digest != base.digest
    assert HostSnapshot(PROC, False, False).digest != base.digest
    # the same entries in another order: the same machine
    parts = PROC.split("\n\n")
    assert HostSnapshot("\n\n".join(reversed(parts)), True, False).digest == base.digest


def test_probe_host_reads_the_given_files(tmp_path: Path) -> None:
    proc = tmp_path / "crypto"
    proc.write_text(PROC)
    dev = tmp_path / "crypto-dev"
    snap = probe_host(str(proc), str(dev))
    assert snap.proc_crypto == PROC and snap.dev_crypto is False
    dev.write_bytes(b"")
    assert probe_host(str(proc), str(dev)).dev_crypto is True
    assert probe_host(str(tmp_path / "missing"), str(dev)).proc_crypto == ""


def test_afalg_available_agrees_with_opening_a_socket() -> None:
    try:
        socket.socket(socket.AF_ALG, socket.SOCK_SEQPACKET, 0).close()
        expected = True
    except OSError:
        expected = False
    assert afalg_available() is expected


class _Machine:
    """A machine whose /proc/crypto a test edits; counts reads."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.reads = 0

    def snapshot(self) -> HostSnapshot:
        self.reads += 1
        return HostSnapshot(self.text, True, False)


async def _reads(machine: _Machine, n: int) -> None:
    """Wait (on a loaded machine, up to 5 s) until ``n`` more rescans have run."""
    target = machine.reads + n
    for _ in range(250):
        if machine.reads >= target:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{machine.reads} rescans, wanted {target}")


def test_rescan_calls_back_once_per_change_and_not_for_noise() -> None:
    async def go() -> None:
        machine = _Machine(PROC)
        seen: list[HostSnapshot] = []
        w = HotplugWatcher(seen.append, snapshot=machine.snapshot, rescan_interval=0.02,
                           use_udev=False)  # fmt: skip
        await w.start(machine.snapshot())
        assert w.mode == "rescan"
        await _reads(machine, 3)  # rescans with no change: no callback
        assert seen == []
        machine.text = PROC.replace("refcnt       : 1", "refcnt       : 3")  # noise
        await _reads(machine, 3)
        assert seen == []
        machine.text = PROC.replace(VIRTIO_CBC, "")  # rmmod virtio_crypto
        for _ in range(50):
            if seen:
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.1)
        await w.stop()
        assert len(seen) == 1 and seen[0].proc_crypto == machine.text
        reads = machine.reads
        await asyncio.sleep(0.06)
        assert machine.reads == reads  # stopped

    asyncio.run(go())


class _FakeDevice:
    action, subsystem, sys_name = "add", "module", "virtio_crypto"


class _FakeMonitor:
    """pyudev.Monitor's surface that the watcher uses, on a socketpair."""

    def __init__(self) -> None:
        self.r, self.w = socket.socketpair()
        self.r.setblocking(False)
        self.filters: list[str] = []
        self.started = False

    def filter_by(self, subsystem: str) -> None:
        self.filters.append(subsystem)

    def start(self) -> None:
        self.started = True

    def fileno(self) -> int:
        return self.r.fileno()

    def poll(self, timeout: float = 0) -> _FakeDevice | None:
        try:
            self.r.recv(1)
        except BlockingIOError:
            return None
        return _FakeDevice()


def test_udev_events_trigger_one_settled_check(monkeypatch: pytest.MonkeyPatch) -> None:
    async def go() -> None:
        monitor = _FakeMonitor()
        sources: list[str] = []
        fake = types.ModuleType("pyudev")
        fake.Context = lambda: object()  # type: ignore[attr-defined]
        fake.Monitor = types.SimpleNamespace(  # type: ignore[attr-defined]
            from_netlink=lambda ctx, source: sources.append(source) or monitor
        )
        monkeypatch.setitem(sys.modules, "pyudev", fake)
        machine = _Machine(PROC)
        seen: list[HostSnapshot] = []
        w = HotplugWatcher(seen.append, snapshot=machine.snapshot, rescan_interval=3600,
                           settle=0.05)  # fmt: skip
        await w.start(machine.snapshot())
        assert w.mode == "udev" and monitor.started and "module" in monitor.filters
        assert sources == ["kernel"]  # raw uevents: OpenWrt has no udevd
        reads = machine.reads
        machine.text = PROC.replace(VIRTIO_CBC, "")
        monitor.w.send(b"xxxxx")  # a burst of five events: one check after they settle
        await asyncio.sleep(0.3)
        assert len(seen) == 1
        assert machine.reads == reads + 1
        await w.stop()
        monitor.r.close()
        monitor.w.close()

    asyncio.run(go())


def test_without_pyudev_the_watcher_rescans(monkeypatch: pytest.MonkeyPatch) -> None:
    async def go() -> None:
        monkeypatch.setitem(sys.modules, "pyudev", None)  # import fails
        w = HotplugWatcher(lambda s: None, snapshot=_Machine(PROC).snapshot, rescan_interval=60)
        await w.start()
        assert w.mode == "rescan"
        await w.stop()
        assert w.mode == "stopped"

    asyncio.run(go())


def test_proc_crypto_of_this_machine_parses_into_specs() -> None:
    """Whatever this kernel lists, discovery runs on it and keeps software first."""
    snap = probe_host()
    assert os.path.exists("/proc/crypto") and snap.proc_crypto
    specs = discover(snap)
    assert specs[0].name == "software"
    assert all(s.kind is EngineKind.HARDWARE for s in specs if s.name.startswith("afalg:"))


def test_the_lab_routers_recorded_proc_crypto() -> None:
    """/proc/crypto of the QEMU router (-cpu max, virtio-crypto): AES-NI is the kernel's
    pick, virtio-crypto is the one hardware engine, for the CBC transforms."""
    text = (Path(__file__).parent / "data" / "proc_crypto_lab_router.txt").read_text()
    specs = {s.name: s for s in discover(HostSnapshot(text, afalg=True, dev_crypto=False))}
    assert list(specs) == ["software", "afalg", "afalg:virtio_crypto_aes_cbc"]
    assert specs["afalg:virtio_crypto_aes_cbc"].transforms == CBC
    assert specs["afalg:virtio_crypto_aes_cbc"].kind is EngineKind.HARDWARE
    assert specs["afalg"].driver("aes256gcm16") == "rfc4106-gcm-aesni"
    assert specs["afalg"].driver("aes128-sha256") == "cbc-aes-aesni"
