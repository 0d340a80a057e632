"""The userspace datapath's ESP worker processes, seen from the daemon.

Why its own object: the processes (one sends, one receives; ``worker.py``), their
control channels (``workerctl.py``), the counter memory they share with us and what
every new worker must be told (the offload layer's engine table, the canary interval)
have one lifetime, from ``start`` to ``stop``, whatever the SAs and policies do. The
rest of the datapath only sends messages through it and reads the counters.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import field
from typing import Any, Final

from oe_router.logs import syslog_address
from oe_router.records import record

from .base import DatapathError
from .workerctl import ControlError, SharedCounters, recv_message, send_message

__all__ = ["ROLES", "WorkerPool"]

log = logging.getLogger("oe_router.datapath")

ROLES: Final = ("tx", "rx")
#: counter slots of the workers' own drop counters (SharedCounters slot per role)
_DROP_SLOTS: Final = (("tx", 0), ("rx", 1))


@record(eq=False)
class _Worker:
    role: str
    proc: asyncio.subprocess.Process
    ctl: socket.socket
    ready: asyncio.Future[int] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class WorkerPool:
    """The tx and rx workers: spawned, told, listened to, stopped."""

    def __init__(
        self,
        python: str,
        on_canary_failure: Callable[[str, str, str], None] | None = None,
    ) -> None:
        self._python = python
        self._on_canary_failure = on_canary_failure
        self._workers: dict[str, _Worker] = {}
        self._installing: dict[int, asyncio.Future[None]] = {}  # slot -> worker's answer
        self._engine_table: dict[str, Any] = {}
        self._canary_interval = 0.0
        self._running = False
        #: the counter slots the workers write; None while no worker runs
        self.counters: SharedCounters | None = None

    @property
    def engine_table(self) -> Mapping[str, Any]:
        return self._engine_table

    async def start(self, tun_fd: int) -> None:
        """Spawn the workers on ``tun_fd`` and wait until each is ready (``stop`` undoes
        a half-done start)."""
        self.counters = SharedCounters()
        for role in ROLES:
            self._workers[role] = await self._spawn(role, tun_fd, self.counters)
        for w in self._workers.values():
            await asyncio.wait_for(asyncio.shield(w.ready), 30.0)
        if self._engine_table:
            self.broadcast({"op": "engines", "table": self._engine_table})
        if self._canary_interval:
            self.broadcast({"op": "canary", "interval": self._canary_interval})
        self._running = True

    def describe(self) -> str:
        return ", ".join(f"{r} pid {w.proc.pid}" for r, w in self._workers.items())

    async def _spawn(self, role: str, tun_fd: int, counters: SharedCounters) -> _Worker:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        fds = (child.fileno(), tun_fd, counters.fd)
        env = dict(os.environ)
        src = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH", "")) if p)
        try:
            proc = await asyncio.create_subprocess_exec(
                self._python,
                "-m",
                "oe_router.datapath.worker",
                role,
                "--control-fd",
                str(fds[0]),
                "--tun-fd",
                str(fds[1]),
                "--counters-fd",
                str(fds[2]),
                *(("--syslog", dev_log) if (dev_log := syslog_address()) else ()),
                pass_fds=fds,
                stdin=subprocess.DEVNULL,
                env=env,
                # its own session: a signal to the daemon's process group must not take
                # the workers first; they go with the daemon (the control channel closes)
                start_new_session=True,
            )
        finally:
            child.close()
        parent.setblocking(False)
        w = _Worker(role, proc, parent)
        asyncio.get_running_loop().add_reader(parent.fileno(), self._on_worker, w)
        return w

    def _on_worker(self, w: _Worker) -> None:
        while True:
            try:
                msg, fds = recv_message(w.ctl)
            except (BlockingIOError, InterruptedError):
                return
            except (EOFError, ConnectionError, OSError):
                asyncio.get_running_loop().remove_reader(w.ctl.fileno())
                if self._running:
                    log.error("ESP worker %s (pid %d) is gone", w.role, w.proc.pid)
                if not w.ready.done():
                    w.ready.set_exception(DatapathError(f"ESP worker {w.role} did not start"))
                return
            except ControlError as exc:
                log.error("ESP worker %s: %s", w.role, exc)
                continue
            for fd in fds:
                os.close(fd)
            self._event(w, msg)

    def _event(self, w: _Worker, msg: Mapping[str, Any]) -> None:
        ev = msg["ev"]
        if ev == "installed":
            fut = self._installing.pop(int(msg["slot"]), None)
            if fut is not None and not fut.done():
                fut.set_result(None)
        elif ev == "ready" and not w.ready.done():
            w.ready.set_result(int(msg["pid"]))
        elif ev == "canary_failed":
            log.error(
                "engine %s failed its canary for %s in the %s worker: %s; "
                "its SAs moved to the next engine",
                msg["engine"],
                msg["transform"],
                w.role,
                msg["reason"],
            )
            if self._on_canary_failure is not None:
                self._on_canary_failure(msg["engine"], msg["transform"], msg["reason"])
        elif ev == "error":
            log.error("ESP worker %s: %s", w.role, msg["text"])

    def send(self, role: str, msg: Mapping[str, Any], fds: tuple[int, ...] = ()) -> None:
        w = self._workers.get(role)
        if w is None:
            raise DatapathError(f"the ESP {role} worker is not running")
        try:
            w.ctl.setblocking(True)
            send_message(w.ctl, msg, fds)
        except OSError as exc:
            raise DatapathError(f"ESP {role} worker (pid {w.proc.pid}): {exc}") from None
        finally:
            w.ctl.setblocking(False)

    async def install(self, role: str, msg: Mapping[str, Any]) -> None:
        """Send an add_in/add_out and wait until the worker has it in effect: a route into
        the TUN must not exist before the SA that takes its packets."""
        slot = int(msg["slot"])
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._installing[slot] = fut
        try:
            self.send(role, msg)
            await asyncio.wait_for(fut, 5.0)
        except TimeoutError:
            raise DatapathError(
                f"ESP {role} worker did not install SA slot {slot} in 5 s"
            ) from None
        finally:
            self._installing.pop(slot, None)

    def broadcast(self, msg: Mapping[str, Any], fds: tuple[int, ...] = ()) -> None:
        for role in self._workers:
            self.send(role, msg, fds)

    def set_engines(self, table: Mapping[str, Any], canary_interval: float) -> None:
        """The offload layer's engine choice: kept for workers to come, sent to those running."""
        self._engine_table = dict(table)
        self._canary_interval = canary_interval
        if self._workers:
            self.broadcast({"op": "engines", "table": self._engine_table})
            self.broadcast({"op": "canary", "interval": canary_interval})

    def engine_bands(self, transform: str) -> str:
        """Which engine runs ``transform``, by packet size, for ``oe status``
        ("software", or "software <=511, afalg:virtio_crypto_aes_cbc >=512")."""
        entry = self._engine_table.get("transforms", {}).get(transform, {})
        bands = [(str(b["engine"]), b.get("max_size")) for b in entry.get("bands", ())]
        if len(bands) <= 1:
            return bands[0][0] if bands else "software"
        out, lo = [], 1
        for engine, hi in bands:
            out.append(
                f"{engine} {f'>={lo}' if hi is None else f'{lo}-{hi}' if lo > 1 else f'<={hi}'}"
            )
            lo = (hi or 0) + 1
        return ", ".join(out)

    def drops(self) -> dict[str, int]:
        """The workers' own drop counters (no SA, selector mismatch, I/O errors)."""
        if self.counters is None:
            return {}
        out: dict[str, int] = {}
        for role, slot in _DROP_SLOTS:
            c = self.counters.read(slot)
            out[f"{role}_no_sa"] = c.replay_errors
            out[f"{role}_selector_mismatch"] = c.integrity_failures
            out[f"{role}_io_errors"] = c.dropped
        return out

    async def stop(self) -> None:
        """Tell every worker to stop, and make sure it did (terminate, then kill)."""
        self._running = False
        loop = asyncio.get_running_loop()
        for w in self._workers.values():
            with contextlib.suppress(Exception):
                loop.remove_reader(w.ctl.fileno())
            with contextlib.suppress(OSError, DatapathError):
                send_message(w.ctl, {"op": "stop"})
            w.ctl.close()
            with contextlib.suppress(ProcessLookupError):
                w.proc.terminate()
        for w in self._workers.values():
            try:
                await asyncio.wait_for(w.proc.wait(), 5.0)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    w.proc.kill()
        self._workers.clear()
        if self.counters is not None:
            self.counters.close()
            self.counters = None
