"""Discovery: which engines this machine has, from /proc/crypto, AF_ALG and /dev/crypto.

Why a pure core: what an engine list should be is a function of /proc/crypto's text and
of two facts (does AF_ALG open, does /dev/crypto exist), so it is tested from recorded
files; ``probe_host`` is the only part that reads the machine. ``HotplugWatcher`` turns
udev events (pyudev, when installed) or a periodic rescan into "look again" calls; the
digest of what discovery reads decides whether anything changed, so an event storm
(a module load emits dozens) costs one re-probe.

Engines found:

* ``software``: always, every transform (OpenSSL through ``cryptography``);
* ``afalg``: the kernel's pick for each transform, when an AF_ALG socket opens;
* ``afalg:<driver>``: each HARDWARE driver (``procfs.classify``) that implements one of
  our transforms' AEADs or bare ciphers; a ``cbc(aes)`` driver serves the CBC transforms
  through the kernel's authenc template, a ``gcm(aes)`` one the GCM transforms through
  rfc4106;
* ``cryptodev``: /dev/crypto's pick, when /dev/crypto exists.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import socket
from collections.abc import Callable, Iterable
from typing import Any

from oe_router.records import record

from .engine import TRANSFORMS, EngineKind, Transform
from .procfs import CryptoAlg, classify, drivers_for, parse_proc_crypto

__all__ = [
    "DEV_CRYPTO",
    "PROC_CRYPTO",
    "EngineSpec",
    "HostSnapshot",
    "HotplugWatcher",
    "afalg_available",
    "discover",
    "probe_host",
]

log = logging.getLogger("oe_router.offload")

PROC_CRYPTO = "/proc/crypto"
DEV_CRYPTO = "/dev/crypto"

# udev subsystems whose events may change the engine list: a crypto driver's module
# loading or unloading, a device appearing on a bus (virtio-crypto, a PCI/platform
# accelerator), /dev/crypto (a misc device) coming or going.
UDEV_SUBSYSTEMS = ("module", "crypto", "virtio", "pci", "platform", "misc")


@record(frozen=True)
class EngineSpec:
    """One engine discovery found: its ``make_engine`` name and what /proc/crypto says.

    ``drivers`` maps transform names to the driver /proc/crypto says will run them
    ("" where the kernel instantiates a template on first use and lists nothing yet);
    the engine itself has the last word (``Engine.transforms``/``driver``). A spec that
    changes between two probes (the kernel's pick moved) is a different engine: its
    proofs do not carry over.
    """

    name: str
    kind: EngineKind
    drivers: tuple[tuple[str, str], ...]

    @property
    def transforms(self) -> tuple[str, ...]:
        return tuple(t for t, _ in self.drivers)

    def driver(self, transform: str) -> str:
        return dict(self.drivers).get(transform, "")


@record(frozen=True)
class HostSnapshot:
    """What discovery reads from the machine, as values (the I/O edge fills it)."""

    proc_crypto: str
    afalg: bool
    dev_crypto: bool

    @property
    def digest(self) -> str:
        """Changes whenever discovery could come out differently.

        Only drivers a module or the kernel registered count, by name, driver, module,
        priority and state: reference counts move with every socket, and template
        instances ("rfc4106(gcm_base(...))") appear whenever something first uses an
        algorithm (our own KATs do), neither of which is a new engine.
        """
        h = hashlib.sha256(b"afalg=%d dev_crypto=%d" % (self.afalg, self.dev_crypto))
        for a in _registered(parse_proc_crypto(self.proc_crypto)):
            h.update(
                f"\0{a.name}|{a.driver}|{a.module}|{a.priority}|{a.selftest}|{a.internal}".encode()
            )
        return h.hexdigest()


def _registered(algs: Iterable[CryptoAlg]) -> list[CryptoAlg]:
    """Entries registered by a driver, without template instances (their driver names
    hold parentheses), sorted so the file's order does not matter."""
    return sorted(
        (a for a in algs if "(" not in a.driver), key=lambda a: (a.name, a.driver, a.priority)
    )


def _kernel_pick(algs: Iterable[CryptoAlg], t: Transform) -> str:
    """The registered driver the kernel builds ``t`` on: its AEAD's, else its cipher's.

    Template instances are left out on purpose: they appear once something used the
    algorithm, and an engine spec must not change because we ran a KAT on it.
    """
    base = _registered(algs)
    for name in (t.aead, t.cipher):
        found = drivers_for(base, name)
        if found:
            return found[0].driver
    return ""


def _hardware_drivers(algs: Iterable[CryptoAlg]) -> dict[str, list[str]]:
    """Hardware driver -> the transforms it implements (as their AEAD or bare cipher).

    Template instances ("authenc(hmac(sha256-generic),virtio_crypto_aes_cbc)") are
    skipped: the engine driver inside them is listed on its own and named that way.
    """
    out: dict[str, list[str]] = {}
    for alg in algs:
        if alg.internal or alg.selftest != "passed" or "(" in alg.driver:
            continue
        served = [t.name for t in TRANSFORMS.values() if alg.name in (t.aead, t.cipher)]
        if not served or classify(alg) is not EngineKind.HARDWARE:
            continue
        names = out.setdefault(alg.driver, [])
        names += [t for t in served if t not in names]
    return out


def discover(snapshot: HostSnapshot) -> tuple[EngineSpec, ...]:
    """The engines ``snapshot`` shows, software first, then AF_ALG, then cryptodev."""
    algs = parse_proc_crypto(snapshot.proc_crypto)
    specs = [
        EngineSpec("software", EngineKind.CPU, tuple((t, "openssl") for t in TRANSFORMS)),
    ]
    if snapshot.afalg:
        picks = tuple((t.name, _kernel_pick(algs, t)) for t in TRANSFORMS.values())
        specs.append(EngineSpec("afalg", EngineKind.CPU, picks))
        for driver, served in sorted(_hardware_drivers(algs).items()):
            order = [t for t in TRANSFORMS if t in served]
            specs.append(
                EngineSpec(
                    f"afalg:{driver}", EngineKind.HARDWARE, tuple((t, driver) for t in order)
                )
            )
    if snapshot.dev_crypto:
        picks = tuple((t.name, _kernel_pick(algs, t)) for t in TRANSFORMS.values())
        specs.append(EngineSpec("cryptodev", EngineKind.CPU, picks))
    return tuple(specs)


# --- the I/O edge -------------------------------------------------------------------


def afalg_available() -> bool:
    """True when this kernel opens AF_ALG sockets (CONFIG_CRYPTO_USER_API_*)."""
    family = getattr(socket, "AF_ALG", None)
    if family is None:
        return False
    try:
        socket.socket(family, socket.SOCK_SEQPACKET, 0).close()
    except OSError:
        return False
    return True


def probe_host(proc_crypto: str = PROC_CRYPTO, dev_crypto: str = DEV_CRYPTO) -> HostSnapshot:
    """Read what discovery needs from this machine (no exception for a missing part)."""
    try:
        with open(proc_crypto, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:
        text = ""
    return HostSnapshot(text, afalg_available(), os.path.exists(dev_crypto))


class HotplugWatcher:
    """Calls ``on_change`` (on the loop) when a re-probe would give another answer.

    With pyudev: udev events of ``UDEV_SUBSYSTEMS`` schedule a check ``settle`` seconds
    later (the kernel registers a driver's algorithms after the module event). Without
    it: a check every ``rescan_interval`` seconds. Either way a check reads the machine
    (``snapshot``) and compares its digest with the last one, so events that change
    nothing cost nothing more. ``rescan_interval`` also runs with pyudev, as a net
    for events udev never sends (a built-in driver finishing its self-test late).
    """

    def __init__(
        self,
        on_change: Callable[[HostSnapshot], None],
        *,
        snapshot: Callable[[], HostSnapshot] = probe_host,
        rescan_interval: float = 10.0,
        settle: float = 0.5,
        use_udev: bool = True,
    ) -> None:
        self._on_change = on_change
        self._snapshot = snapshot
        self._interval = rescan_interval
        self._settle = settle
        self._use_udev = use_udev
        self._digest: str | None = None
        self._monitor: Any = None
        self._task: asyncio.Task[None] | None = None
        self._pending: asyncio.TimerHandle | None = None
        self._checking = False
        self._checks: set[asyncio.Task[None]] = set()
        self.mode = "stopped"

    async def start(self, initial: HostSnapshot | None = None) -> None:
        """Begin watching; ``initial`` is the snapshot the caller already acted on."""
        loop = asyncio.get_running_loop()
        if initial is not None:
            self._digest = initial.digest
        if self._use_udev:
            self._monitor = self._udev_monitor()
        if self._monitor is not None:
            loop.add_reader(self._monitor.fileno(), self._on_udev)
            self.mode = "udev"
        else:
            self.mode = "rescan"
        self._task = loop.create_task(self._rescan_loop())

    async def stop(self) -> None:
        if self._monitor is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._monitor.fileno())
            self._monitor = None
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None
        for check in list(self._checks):
            check.cancel()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self.mode = "stopped"

    @staticmethod
    def _udev_monitor() -> Any:
        """A started pyudev monitor, or None (pyudev absent or no udev netlink here)."""
        try:
            import pyudev
        except ImportError:
            log.info("pyudev not installed: rescanning /proc/crypto for new engines")
            return None
        try:
            # the kernel's own uevents: OpenWrt has no udevd to re-broadcast them (procd
            # handles hotplug), and a nudge needs no device database anyway
            monitor = pyudev.Monitor.from_netlink(pyudev.Context(), source="kernel")
            for subsystem in UDEV_SUBSYSTEMS:
                monitor.filter_by(subsystem)
            monitor.start()
        except Exception as exc:  # no udev netlink in a container, permissions
            log.info("pyudev cannot watch (%s): rescanning /proc/crypto instead", exc)
            return None
        return monitor

    def _on_udev(self) -> None:
        try:
            device = self._monitor.poll(timeout=0)
        except Exception as exc:
            log.warning("udev monitor failed (%s): rescanning /proc/crypto instead", exc)
            asyncio.get_running_loop().remove_reader(self._monitor.fileno())
            self._monitor = None
            self.mode = "rescan"
            return
        if device is None:
            return
        log.debug("udev %s %s %s", device.action, device.subsystem, device.sys_name)
        self.nudge()

    def nudge(self) -> None:
        """Something may have changed: check after ``settle`` seconds (coalesced)."""
        if self._pending is not None:
            return
        loop = asyncio.get_running_loop()
        self._pending = loop.call_later(self._settle, self._fire)

    def _fire(self) -> None:
        self._pending = None
        task = asyncio.get_running_loop().create_task(self._safe_check())
        self._checks.add(task)
        task.add_done_callback(self._checks.discard)

    async def _safe_check(self) -> None:
        try:
            await self.check()
        except Exception as exc:  # a bad read must not end the watch
            log.warning("engine rescan failed: %s", exc)

    async def check(self) -> bool:
        """Read the machine; call ``on_change`` and return True if it changed."""
        if self._checking:
            return False
        self._checking = True
        try:
            snap = await asyncio.to_thread(self._snapshot)
        finally:
            self._checking = False
        if snap.digest == self._digest:
            return False
        first = self._digest is None
        self._digest = snap.digest
        if not first:
            self._on_change(snap)
        return not first

    async def _rescan_loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            await self._safe_check()
