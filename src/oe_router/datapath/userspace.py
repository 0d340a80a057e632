"""The userspace ESP datapath: the Datapath interface for kernels without ESP.

How a packet travels (docs/userspace-datapath.md has the whole picture):

* **out, SA known**: a route in our table (``not fwmark`` rule, as charon's
  kernel-libipsec) sends the peer's address into the TUN device; source NAT has run by
  then; the ``tx`` worker seals the packet and sends it in UDP from port 4500.
* **in**: ESP in UDP 4500 reaches the ``rx`` worker through the reuseport steering
  (``steering.py``); it is opened, checked against the SA's selectors and written to
  the TUN device, so conntrack undoes the NAT and the kernel forwards it.
* **first packets** (no SA yet): the policies are projected into nftables
  (``nft_spd.py``): after source NAT, PASS leaves in the clear with no userspace hop,
  DROP drops in the kernel, and only what a TRAP (or an SA) covers is queued over
  NFQUEUE (``nfqueue.py``) to this process, which raises an ACQUIRE and holds the
  packet until the SA is in (then the ``tx`` worker sends it into the SA), a pass shunt
  lets it go, a drop shunt drops it, or the hold limit passes.

The daemon keeps the policy database and SA bookkeeping here (sans-IO parts in
``spd.py`` and ``esp.py``); the workers keep the keys of the SAs they run. Everything
the kernel holds for us (TUN, routes, rules, nftables, NFQUEUE binding) is ours alone
and goes at ``close``, except the "private" policies when they must survive a stop:
their NFQUEUE rules then drop, because nobody listens (fail closed).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Final

from oe_router.logs import syslog_address
from oe_router.offload import EngineError, Transform, transform

from .base import (
    ICMP_PROTOS,
    Acquire,
    ChildSaCounters,
    ChildSaSpec,
    DatapathError,
    DatapathEvent,
    Direction,
    Expire,
    FeatureMissing,
    IPAddress,
    IPNetwork,
    Lifetime,
    Mode,
    PolicyAction,
    PolicyExpire,
    PolicySpec,
    ReconcileReport,
    SaCounters,
    TrafficSelector,
    child_policies,
)
from .netns import in_netns
from .nfqueue import NfQueue, NfQueueError, QueuedPacket
from .nft import run_nft
from .nft_spd import NftSpdError, SpdTable, compile_spd, install, queue_backend, remove_script
from .nft_spd import update as nft_update
from .packet import Flow, MalformedPacket, flow
from .spd import Spd, key_of
from .steering import attach_steering
from .tun import TUN_MTU, TunError, open_tun
from .workerctl import ControlError, SharedCounters, recv_message, send_message

__all__ = ["UserspaceDatapath", "UserspaceSettings"]

log = logging.getLogger("oe_router.datapath")

_SO_MARK: Final = 36
_BUFFER: Final = 4 << 20  # ESP socket buffers: a burst of 1400-byte packets at line rate
_ROLES: Final = ("tx", "rx")


@dataclass(frozen=True)
class UserspaceSettings:
    """Names and numbers the userspace datapath claims in the kernel (all ours alone)."""

    tun_name: str = "oe-esp0"
    fwmark: int = 0x1000000  # on our IKE/ESP sockets: their packets skip the TUN routes
    #: on a queued first packet we sent into its SA ourselves: accepted (so conntrack
    #: confirms its connection and NAT binding, or the reply would find none) and then
    #: dropped at the WAN device's egress hook, after conntrack, before the wire
    stolen_mark: int = 0x2000000
    table: int = 2200  # routing table of the TUN routes
    rule_priority: int = 1000  # "not fwmark -> table" rule, before the main table
    queue_num: int = 4500  # NFQUEUE of first packets
    mtu: int = TUN_MTU
    replay_window: int = 128
    workers_python: str = sys.executable
    #: first packets held while their SA is negotiated: how long, how many
    hold_limit: float = 4.0
    hold_per_destination: int = 64
    hold_total: int = 1024
    ike_ports: tuple[int, ...] = (500, 4500)


@dataclass(eq=False)
class _Held:
    """A queued first packet waiting for its destination's SA or shunt."""

    packet_id: int
    payload: bytes = field(repr=False)
    flow: Flow
    deadline: float


@dataclass(eq=False)
class _Child:
    spec: ChildSaSpec
    transform: Transform
    slot_in: int
    slot_out: int
    added: float  # epoch seconds
    added_mono: float
    soft_fired: bool = False


@dataclass(eq=False)
class _Worker:
    role: str
    proc: asyncio.subprocess.Process
    ctl: socket.socket
    ready: asyncio.Future[int] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class UserspaceDatapath:
    """ESP in worker processes over TUN and UDP 4500; see the module docstring."""

    def __init__(
        self,
        *,
        wan_ifname: str,
        reason: str = "the kernel has no ESP: ESP runs in userspace workers",
        netns: str | None = None,
        keep_persistent_on_stop: bool = True,
        settings: UserspaceSettings | None = None,
        on_canary_failure: Callable[[str, str, str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._wan = wan_ifname
        self._reason = reason
        self._netns = netns
        self.keep_persistent_on_stop = keep_persistent_on_stop
        self.settings = s = settings or UserspaceSettings()
        self._on_canary_failure = on_canary_failure
        self._clock = clock
        self._tun_fd: int | None = None
        self._tun_index = 0
        self._counters: SharedCounters | None = None
        self._workers: dict[str, _Worker] = {}
        self._esp_socks: dict[str, socket.socket] = {}
        self._free_slots = list(range(2048 - 1, 1, -1))  # 0, 1: the workers' own counters
        self._children: dict[tuple[IPAddress, int], _Child] = {}  # (local, inbound spi)
        self._spis: set[int] = set()
        self._routes: dict[IPNetwork, int] = {}  # remote selector -> Child SAs using it
        self._policy_timers: dict[tuple[Any, ...], asyncio.TimerHandle] = {}
        self._spd = Spd()
        self._nft: SpdTable | None = None  # what the kernel holds (None: not written yet)
        self._nft_backend: str | None = None
        self._nft_live = False  # False until the first complete policy set (release_adopted)
        self._queue: NfQueue | None = None
        self._held: dict[tuple[int, int], list[_Held]] = {}  # (version, dst) -> packets
        self._held_count = 0
        self._acquired: dict[tuple[int, int, int], float] = {}  # (version, dst, reqid) -> when
        self._acq_seq = 0
        self._egress_drop = False  # the WAN egress chain that drops stolen packets is in
        self._installing: dict[int, asyncio.Future[None]] = {}  # slot -> worker's answer
        self.queue_stats = {
            "queued": 0,
            "held": 0,
            "released_into_sa": 0,
            "accepted": 0,
            "dropped": 0,
            "hold_overflow": 0,
            "hold_expired": 0,
        }
        self._events: asyncio.Queue[DatapathEvent] = asyncio.Queue()
        self._engine_table: dict[str, Any] = {}
        self._canary_interval = 0.0
        self._next_reqid = 0x4F450000
        self._tasks: set[asyncio.Task[Any]] = set()
        self._started = False
        self._table_name = f"oe_{s.tun_name.replace('-', '_')}"

    # ------------------------------------------------------------------ status
    @property
    def name(self) -> str:
        return "userspace-esp"

    @property
    def reason(self) -> str:
        return self._reason

    @property
    def tunnel_device(self) -> str | None:
        return self.settings.tun_name

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Make the TUN device, the routing rules and the workers (before IKE binds)."""
        if self._started:
            return
        s = self.settings
        try:
            self._tun_fd = open_tun(s.tun_name, netns=self._netns)
        except TunError as exc:
            raise FeatureMissing(str(exc)) from None
        try:
            await asyncio.to_thread(self._setup_kernel)
            self._nft_backend = await asyncio.to_thread(queue_backend, netns=self._netns)
            await asyncio.to_thread(self._setup_egress)
            self._queue = NfQueue(s.queue_num, netns=self._netns, maxlen=4 * s.hold_total)
            await asyncio.to_thread(self._queue.open)
            asyncio.get_running_loop().add_reader(self._queue.fileno(), self._on_queue)
            self._counters = SharedCounters()
            for role in _ROLES:
                self._workers[role] = await self._spawn(role)
            for w in self._workers.values():
                await asyncio.wait_for(asyncio.shield(w.ready), 30.0)
        except BaseException:
            await self._teardown()
            raise
        if self._engine_table:
            self._broadcast({"op": "engines", "table": self._engine_table})
        if self._canary_interval:
            self._broadcast({"op": "canary", "interval": self._canary_interval})
        self._spawn_task(self._lifetimes())
        self._spawn_task(self._hold_timer())
        self._started = True
        log.info(
            "userspace ESP on %s (mtu %d, workers %s)",
            s.tun_name,
            s.mtu,
            ", ".join(f"{r} pid {w.proc.pid}" for r, w in self._workers.items()),
        )

    def _ipr(self) -> Any:
        from pyroute2 import IPRoute

        with in_netns(self._netns):
            return IPRoute()

    def _setup_kernel(self) -> None:
        s = self.settings
        with self._ipr() as ipr:
            idx = ipr.link_lookup(ifname=s.tun_name)
            if not idx:
                raise DatapathError(f"TUN device {s.tun_name} vanished after creation")
            self._tun_index = idx[0]
            ipr.link("set", index=self._tun_index, mtu=s.mtu, state="up")
            for family in (socket.AF_INET, socket.AF_INET6):
                self._rule(ipr, "del", family, missing_ok=True)  # an earlier run's
                self._rule(ipr, "add", family)
        self._sysctl(f"net/ipv4/conf/{s.tun_name}/rp_filter", "0")

    def _egress_table(self) -> str:
        return f"{self._table_name}_egress"

    def _setup_egress(self) -> None:
        """The WAN device's egress chain dropping what we sealed into an SA ourselves."""
        s, t = self.settings, self._egress_table()
        m = s.stolen_mark
        script = (
            f"table netdev {t}\ndelete table netdev {t}\n"
            f"table netdev {t} {{\n\tchain stolen {{\n"
            f'\t\ttype filter hook egress device "{self._wan}" priority 0; policy accept;\n'
            f"\t\tmeta mark & {m:#x} == {m:#x} counter drop\n\t}}\n}}\n"
        )
        try:
            run_nft(script, netns=self._netns, what="egress drop of stolen packets")
        except DatapathError as exc:
            log.warning(
                "%s; a first packet sent into its SA is dropped instead, and its "
                "connection's first reply may be lost (no netdev egress hook: Linux < 5.16, or "
                "kmod-nft-netdev missing on OpenWrt)",
                exc,
            )
            self._egress_drop = False
        else:
            self._egress_drop = True

    def _rule(self, ipr: Any, cmd: str, family: int, *, missing_ok: bool = False) -> None:
        from pyroute2.netlink.exceptions import NetlinkError

        s = self.settings
        try:
            ipr.rule(
                cmd,
                family=family,
                table=s.table,
                priority=s.rule_priority,
                fwmark=s.fwmark,
                fwmask=s.fwmark,
                flags=0x2,  # FIB_RULE_INVERT: "not fwmark"
            )
        except NetlinkError as exc:
            if not missing_ok:
                raise DatapathError(
                    f"routing rule 'not fwmark {s.fwmark:#x} lookup {s.table}': {exc}"
                ) from None

    def _sysctl(self, key: str, value: str) -> None:
        try:
            with in_netns(self._netns), open(f"/proc/sys/{key}", "w") as f:
                f.write(value)
        except OSError as exc:
            log.warning("cannot set %s=%s: %s", key.replace("/", "."), value, exc)

    async def _spawn(self, role: str) -> _Worker:
        assert self._tun_fd is not None and self._counters is not None
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        fds = (child.fileno(), self._tun_fd, self._counters.fd)
        env = dict(os.environ)
        src = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH", "")) if p)
        try:
            proc = await asyncio.create_subprocess_exec(
                self.settings.workers_python,
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
                if self._started:
                    log.error("ESP worker %s (pid %d) is gone", w.role, w.proc.pid)
                if not w.ready.done():
                    w.ready.set_exception(DatapathError(f"ESP worker {w.role} did not start"))
                return
            except ControlError as exc:
                log.error("ESP worker %s: %s", w.role, exc)
                continue
            for fd in fds:
                os.close(fd)
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

    def _send(self, role: str, msg: Mapping[str, Any], fds: tuple[int, ...] = ()) -> None:
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

    async def _install(self, role: str, msg: Mapping[str, Any]) -> None:
        """Send an add_in/add_out and wait until the worker has it in effect: a route into
        the TUN must not exist before the SA that takes its packets."""
        slot = int(msg["slot"])
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._installing[slot] = fut
        try:
            self._send(role, msg)
            await asyncio.wait_for(fut, 5.0)
        except TimeoutError:
            raise DatapathError(
                f"ESP {role} worker did not install SA slot {slot} in 5 s"
            ) from None
        finally:
            self._installing.pop(slot, None)

    def _broadcast(self, msg: Mapping[str, Any], fds: tuple[int, ...] = ()) -> None:
        for role in self._workers:
            self._send(role, msg, fds)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        children = list(self._children.values())
        for c in children:
            with contextlib.suppress(DatapathError):
                await self.remove_child_sa(c.spec)
        # what must outlive us stays in nftables: "private" traps and drop shunts queue to
        # nobody once we are gone, which the kernel turns into drops (fail closed)
        keep = [p for p in self._spd.policies() if p.persistent and self.keep_persistent_on_stop]
        try:
            if keep:
                await asyncio.to_thread(self._nft_install, keep)
            else:
                await asyncio.to_thread(run_nft, remove_script(), netns=self._netns)
        except DatapathError as exc:
            log.error("leaving the policy projection: %s", exc)
        for held in list(self._held.values()):
            for h in held:
                self._verdict(h, False, "dropped")
        self._held.clear()
        await self._teardown()

    async def _teardown(self) -> None:
        self._started = False
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
        if self._queue is not None:
            with contextlib.suppress(Exception):
                loop.remove_reader(self._queue.fileno())
            self._queue.close()
            self._queue = None
        for sock in self._esp_socks.values():
            sock.close()
        self._esp_socks.clear()
        for h in self._policy_timers.values():
            h.cancel()
        self._policy_timers.clear()
        with contextlib.suppress(Exception), self._ipr() as ipr:
            for family in (socket.AF_INET, socket.AF_INET6):
                self._rule(ipr, "del", family, missing_ok=True)
        if self._egress_drop:
            t = self._egress_table()
            with contextlib.suppress(DatapathError):
                run_nft(f"table netdev {t}\ndelete table netdev {t}\n", netns=self._netns)
            self._egress_drop = False
        if self._tun_fd is not None:
            os.close(self._tun_fd)  # the device and every route through it go with it
            self._tun_fd = None
        if self._counters is not None:
            self._counters.close()
            self._counters = None
        self._routes.clear()

    # ------------------------------------------------------------------ IKE socket hooks
    def before_bind(self, sock: socket.socket, natt: bool) -> None:
        """Mark IKE's packets (they must never enter the TUN routes); the NAT-T socket
        joins a reuseport group with our ESP sockets."""
        sock.setsockopt(socket.SOL_SOCKET, _SO_MARK, self.settings.fwmark)
        if natt:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)

    def after_bind(self, sock: socket.socket, natt: bool, ip: str) -> None:
        """IKE's NAT-T socket is bound (index 0 of the group): bind the ESP socket beside
        it, steer ESP to it, hand it to the workers."""
        if not natt:
            return
        port = sock.getsockname()[1]
        family = socket.AF_INET6 if ":" in ip else socket.AF_INET
        with in_netns(self._netns):
            esp = socket.socket(family, socket.SOCK_DGRAM)
        try:
            esp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            esp.setsockopt(socket.SOL_SOCKET, _SO_MARK, self.settings.fwmark)
            for opt, force in ((socket.SO_RCVBUF, 33), (socket.SO_SNDBUF, 32)):
                try:
                    esp.setsockopt(socket.SOL_SOCKET, force, _BUFFER)  # *BUFFORCE (root)
                except OSError:
                    esp.setsockopt(socket.SOL_SOCKET, opt, _BUFFER)
            esp.bind((ip, port))
            attach_steering(esp, 1)
        except OSError as exc:
            esp.close()
            raise DatapathError(f"ESP socket on {ip} port {port}: {exc.strerror or exc}") from None
        old = self._esp_socks.pop(ip, None)
        if old is not None:
            old.close()
        self._esp_socks[ip] = esp
        self._broadcast({"op": "socket", "ip": ip}, (esp.fileno(),))

    def closing(self, ip: str) -> None:
        sock = self._esp_socks.pop(ip, None)
        with contextlib.suppress(DatapathError):
            self._broadcast({"op": "close_socket", "ip": ip})
        if sock is not None:
            sock.close()

    # ------------------------------------------------------------------ engines
    def set_engine_table(self, table: Mapping[str, Any], canary_interval: float = 0.0) -> None:
        """The offload layer's choice (engine per transform and size) for new and live SAs."""
        self._engine_table = dict(table)
        self._canary_interval = canary_interval
        if self._workers:
            self._broadcast({"op": "engines", "table": self._engine_table})
            self._broadcast({"op": "canary", "interval": canary_interval})

    def engine_for(self, spec: ChildSaSpec) -> str:
        """Which engine runs this Child SA's transform, by packet size, for ``oe status``
        ("software", or "software <=511, afalg:virtio_crypto_aes_cbc >=512")."""
        try:
            t = self._transform(spec)
        except DatapathError:
            return ""
        entry = self._engine_table.get("transforms", {}).get(t.name, {})
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

    # ------------------------------------------------------------------ SAs
    @staticmethod
    def _transform(spec: ChildSaSpec) -> Transform:
        bits = (len(spec.outbound.encr_key) * 8) - spec.encr.salt_bits
        try:
            return transform(spec.encr.ike_id, bits, spec.integ.ike_id if spec.integ else None)
        except EngineError as exc:
            raise DatapathError(f"Child SA {spec.local}<->{spec.remote}: {exc}") from None

    async def allocate_spi(self, local: IPAddress, remote: IPAddress, reqid: int) -> int:
        while True:
            spi = secrets.randbits(32)
            if spi >= 0x100 and spi not in self._spis:
                self._spis.add(spi)
                return spi

    def _reqid(self) -> int:
        used = {c.spec.reqid for c in self._children.values()}
        while self._next_reqid in used:
            self._next_reqid += 1
        reqid, self._next_reqid = self._next_reqid, self._next_reqid + 1
        return reqid

    def _slot(self) -> int:
        if not self._free_slots:
            raise DatapathError("userspace datapath: no counter slot left (too many SAs)")
        return self._free_slots.pop()

    async def install_child_sa(self, spec: ChildSaSpec) -> ChildSaSpec:
        if not self._started:
            raise DatapathError("the userspace datapath is not running")
        if spec.mode is not Mode.TUNNEL:
            raise FeatureMissing(
                f"Child SA {spec.local}<->{spec.remote}: the userspace datapath runs tunnel "
                "mode only (transport mode needs kernel ESP)"
            )
        t = self._transform(spec)
        if spec.reqid == 0:
            spec = replace(spec, reqid=self._reqid())
        slot_in, slot_out = self._slot(), self._slot()
        local_ts = [str(ts.net) for ts in spec.local_ts] or [str(ipaddress.ip_network(spec.local))]
        remote_ts = [str(ts.net) for ts in spec.remote_ts] or [
            str(ipaddress.ip_network(spec.remote))
        ]
        port = spec.encap.remote_port if spec.encap is not None else 4500
        common = {
            "transform": t.name,
            "esn": spec.esn,
            "local_ts": local_ts,
            "remote_ts": remote_ts,
        }
        try:
            await self._install(
                "rx",
                {
                    "op": "add_in",
                    "slot": slot_in,
                    "spi": spec.inbound.spi,
                    "encr_key": spec.inbound.encr_key.hex(),
                    "integ_key": spec.inbound.integ_key.hex(),
                    "window": max(spec.replay_window, self.settings.replay_window),
                    **common,
                },
            )
            await self._install(
                "tx",
                {
                    "op": "add_out",
                    "slot": slot_out,
                    "spi": spec.outbound.spi,
                    "encr_key": spec.outbound.encr_key.hex(),
                    "integ_key": spec.outbound.integ_key.hex(),
                    "src": str(spec.local),
                    "dst": str(spec.remote),
                    "port": port,
                    **common,
                },
            )
        except DatapathError:
            self._free_slots += [slot_in, slot_out]
            raise
        now = time.time()
        child = _Child(spec, t, slot_in, slot_out, now, self._clock())
        self._children[(spec.local, spec.inbound.spi)] = child
        self._spis.add(spec.inbound.spi)
        for ts in spec.remote_ts or ():
            await self._route_ref(ts.net, +1)
        if not spec.remote_ts:
            await self._route_ref(ipaddress.ip_network(spec.remote), +1)
        if spec.install_policies:
            await self._install_policies(child_policies(spec))
        self._release_held()
        return spec

    async def remove_child_sa(self, spec: ChildSaSpec, *, remove_policies: bool = True) -> None:
        child = self._children.pop((spec.local, spec.inbound.spi), None)
        self._spis.discard(spec.inbound.spi)
        if remove_policies and spec.install_policies:
            await self._remove_policies(child_policies(spec))
        if child is None:
            return
        for role, slot in (("rx", child.slot_in), ("tx", child.slot_out)):
            with contextlib.suppress(DatapathError):
                self._send(role, {"op": "remove", "slot": slot})
            self._free_slots.insert(0, slot)  # reused last: late counter reads stay sane
        for ts in spec.remote_ts or ():
            await self._route_ref(ts.net, -1)
        if not spec.remote_ts:
            await self._route_ref(ipaddress.ip_network(spec.remote), -1)

    async def _route_ref(self, net: IPNetwork, delta: int) -> None:
        """Route ``net`` into the TUN device while at least one Child SA needs it."""
        n = self._routes.get(net, 0) + delta
        if n > 0:
            self._routes[net] = n
        else:
            self._routes.pop(net, None)
        if (delta > 0 and n == 1) or (delta < 0 and n <= 0):
            await asyncio.to_thread(self._route, "replace" if delta > 0 else "del", net)

    def _route(self, cmd: str, net: IPNetwork) -> None:
        from pyroute2.netlink.exceptions import NetlinkError

        try:
            with self._ipr() as ipr:
                ipr.route(
                    cmd,
                    dst=str(net),
                    oif=self._tun_index,
                    table=self.settings.table,
                    family=socket.AF_INET6 if net.version == 6 else socket.AF_INET,
                )
        except NetlinkError as exc:
            if cmd != "del":
                raise DatapathError(f"route {net} dev {self.settings.tun_name}: {exc}") from None

    def _read(self, slot: int, added: float) -> SaCounters:
        if self._counters is None:
            raise DatapathError("the userspace datapath is not running")
        c = self._counters.read(slot)
        return SaCounters(
            c.bytes, c.packets, int(added), int(c.last_use), c.replay_errors, c.integrity_failures
        )

    def read_counters(self, spec: ChildSaSpec) -> ChildSaCounters:
        child = self._children.get((spec.local, spec.inbound.spi))
        if child is None:
            raise DatapathError(
                f"Child SA {spec.local}<->{spec.remote} spi {spec.inbound.spi:#010x}: not installed"
            )
        return ChildSaCounters(
            self._read(child.slot_in, child.added), self._read(child.slot_out, child.added)
        )

    async def counters(self, spec: ChildSaSpec) -> ChildSaCounters:
        return self.read_counters(spec)

    def orphaned_acquires(self, trap_reqid: int) -> list[Acquire]:
        """None: a trapped packet lives in this process's queue and died with it."""
        return []

    def stats(self) -> dict[str, int]:
        q = self._queue
        nfq = (
            {}
            if q is None
            else {
                "queue_malformed": q.malformed,
                "queue_overruns": q.overruns,
                "queue_verdict_errors": q.verdict_errors,
            }
        )
        return {
            **self.queue_stats,
            "held_now": self._held_count,
            "policies": len(self._spd),  # SPD entries, projected into nftables
            **nfq,
            **self.worker_drops(),
        }

    def worker_drops(self) -> dict[str, int]:
        """The workers' own drop counters (no SA, selector mismatch, I/O errors)."""
        if self._counters is None:
            return {}
        out: dict[str, int] = {}
        for role, slot in (("tx", 0), ("rx", 1)):
            c = self._counters.read(slot)
            out[f"{role}_no_sa"] = c.replay_errors
            out[f"{role}_selector_mismatch"] = c.integrity_failures
            out[f"{role}_io_errors"] = c.dropped
        return out

    async def _lifetimes(self) -> None:
        """The kernel's SA lifetimes, emulated: soft -> Expire(hard=False), hard -> gone."""
        while True:
            await asyncio.sleep(1.0)
            now = self._clock()
            for child in list(self._children.values()):
                lft = child.spec.lifetime
                hard, soft = self._expired(child, lft, now)
                if hard:
                    await self.remove_child_sa(child.spec)
                    self._expire(child, True)
                elif soft and not child.soft_fired:
                    child.soft_fired = True
                    self._expire(child, False)

    def _expired(self, child: _Child, lft: Lifetime, now: float) -> tuple[bool, bool]:
        age = now - child.added_mono
        try:
            c = self.read_counters(child.spec)
        except DatapathError:
            return False, False
        nbytes = max(c.inbound.bytes, c.outbound.bytes)
        npkts = max(c.inbound.packets, c.outbound.packets)

        def over(limit: int, value: float) -> bool:
            return bool(limit) and value >= limit

        hard = (
            over(lft.hard_seconds, age)
            or over(lft.hard_bytes, nbytes)
            or over(lft.hard_packets, npkts)
        )
        soft = (
            over(lft.soft_seconds, age)
            or over(lft.soft_bytes, nbytes)
            or over(lft.soft_packets, npkts)
        )
        return hard, soft

    def _expire(self, child: _Child, hard: bool) -> None:
        s = child.spec
        self._events.put_nowait(Expire(s.local, s.remote, s.outbound.spi, s.reqid, hard))
        self._events.put_nowait(Expire(s.remote, s.local, s.inbound.spi, s.reqid, hard))

    # ------------------------------------------------------------------ policies
    def _current(self, policy: PolicySpec) -> PolicySpec | None:
        """The installed policy with ``policy``'s key (XFRM's: selector, direction, mark)."""
        entry = self._spd.get(policy)
        return None if entry is None else entry.policy

    async def install_policy(self, policy: PolicySpec) -> None:
        await self._install_policies([policy])

    async def _install_policies(self, policies: list[PolicySpec]) -> None:
        """Into the SPD, then one projection step for all of them (a Child SA's out, in
        and fwd policies go together: one nft run, not three)."""
        olds = []
        for policy in policies:
            old_policy = self._current(policy)
            if old_policy is not None:
                olds.append(old_policy)
            self._spd.install(policy)
            key = key_of(policy)
            old = self._policy_timers.pop(key, None)
            if old is not None:
                old.cancel()
            lft = policy.lifetime
            if lft.hard_seconds or lft.soft_seconds:
                self._policy_timers[key] = asyncio.get_running_loop().call_later(
                    float(lft.soft_seconds or lft.hard_seconds), self._policy_timer, key, policy
                )
        await self._project(add=policies, remove=olds)
        self._release_held()

    def _policy_timer(self, key: tuple[Any, ...], policy: PolicySpec) -> None:
        self._policy_timers.pop(key, None)
        if self._current(policy) is not policy:
            return
        lft = policy.lifetime
        soft_first = bool(lft.soft_seconds) and (
            not lft.hard_seconds or lft.soft_seconds < lft.hard_seconds
        )
        if soft_first:
            self._events.put_nowait(
                PolicyExpire(policy.src, policy.dst, policy.direction, policy.priority, False)
            )
            if lft.hard_seconds:
                self._policy_timers[key] = asyncio.get_running_loop().call_later(
                    float(lft.hard_seconds - lft.soft_seconds), self._policy_timer_hard, key, policy
                )
            return
        self._policy_timer_hard(key, policy)

    def _policy_timer_hard(self, key: tuple[Any, ...], policy: PolicySpec) -> None:
        self._policy_timers.pop(key, None)
        if self._current(policy) is not policy:
            return
        self._events.put_nowait(
            PolicyExpire(policy.src, policy.dst, policy.direction, policy.priority, True)
        )
        self._spawn_task(self.remove_policy(policy))

    async def remove_policy(self, policy: PolicySpec) -> None:
        await self._remove_policies([policy])

    async def _remove_policies(self, policies: list[PolicySpec]) -> None:
        gone = []
        for policy in policies:
            current = self._current(policy)
            h = self._policy_timers.pop(key_of(policy), None)
            if h is not None:
                h.cancel()
            if current is not None:
                self._spd.remove(current)
                gone.append(current)
        if gone:
            await self._project(remove=gone)
            self._release_held()

    # ------------------------------------------------------------------ nftables projection
    def _nft_install(self, policies: list[PolicySpec]) -> None:
        s = self.settings
        table = compile_spd(
            policies,
            wan=self._wan,
            tun=s.tun_name,
            queue_num=s.queue_num,
            bypass_mark=s.fwmark,
            ike_ports=s.ike_ports,
        )
        self._nft_backend = install(
            table, netns=self._netns, backend=self._nft_backend, previous=self._nft
        )
        self._nft = table

    async def _project(
        self, add: list[PolicySpec] | None = None, remove: list[PolicySpec] | None = None
    ) -> None:
        """Bring the kernel's projection to the SPD: element changes when they suffice,
        else the whole table (atomic either way). Nothing is written before the first
        complete policy set (``release_adopted``): a half-built table could let a
        "private" packet out while an earlier run's complete one still holds it."""
        if not self._nft_live:
            return
        try:
            if self._nft is not None:
                step = nft_update(self._nft, add=add or (), remove=remove or ())
                if step is not None:
                    table, script = step
                    if script:
                        await asyncio.to_thread(
                            run_nft, script, netns=self._netns, what="policy projection"
                        )
                    self._nft = table
                    return
            await asyncio.to_thread(self._nft_install, self._spd.policies())
        except (NftSpdError, DatapathError) as exc:
            self._nft = None  # unknown now: the next change writes the whole table
            raise DatapathError(f"policy projection into nftables: {exc}") from None

    def policies(self) -> list[PolicySpec]:
        return self._spd.policies()

    # ------------------------------------------------------------------ events, reconcile
    async def events(self) -> AsyncIterator[DatapathEvent]:
        while True:
            yield await self._events.get()

    async def reconcile(
        self, adopt_policy: Callable[[PolicySpec], bool] | None = None
    ) -> ReconcileReport:
        """No SA survives a crash here (the workers died with it, the TUN device with its
        descriptor); an earlier run's nftables projection stays until this run's replaces
        it atomically, so nothing leaks in between."""
        return ReconcileReport(0, 0, 0, 0)

    async def release_adopted(self, keep: Callable[[PolicySpec], bool]) -> int:
        """This run's policies are all in: write the projection (replacing an earlier
        run's table atomically) and decide the packets queued meanwhile."""
        self._nft_live = True
        await asyncio.to_thread(self._nft_install, self._spd.policies())
        self._release_held()
        return 0

    # ------------------------------------------------------------------ first packets
    def _on_queue(self) -> None:
        q = self._queue
        if q is None:
            return
        try:
            packets = q.read_packets()
        except NfQueueError as exc:
            log.error("%s", exc)
            return
        for p in packets:
            self.queue_stats["queued"] += 1
            self._queued(p)

    def _verdict(self, held: _Held, accept: bool, stat: str, mark: int | None = None) -> None:
        self.queue_stats[stat] += 1
        if self._queue is not None:
            try:
                self._queue.verdict(held.packet_id, accept, mark=mark)
            except NfQueueError as exc:
                log.warning("verdict for queued packet %d: %s", held.packet_id, exc)

    def _queued(self, p: QueuedPacket) -> None:
        try:
            f = flow(p.payload)
        except MalformedPacket:
            h = _Held(p.id, b"", Flow(0, 0, 0, 0), 0.0)
            self._verdict(h, False, "dropped")
            return
        h = _Held(p.id, p.payload, f, self._clock() + self.settings.hold_limit)
        if not self._nft_live or not self._decide(h):
            self._hold(h)

    def _decide(self, h: _Held) -> bool:
        """Settle a queued packet by the policy that covers it now; False: keep holding."""
        pol = self._spd.lookup(Direction.OUT, h.flow)
        action = None if pol is None else pol.action
        if action is None or action is PolicyAction.PASS:
            if self._covered(h.flow):
                self._verdict(h, False, "dropped")  # its tunnel exists, un-NATed: never clear
            else:
                self._verdict(h, True, "accepted")
            return True
        if action is PolicyAction.DROP:
            self._verdict(h, False, "dropped")
            return True
        if action is PolicyAction.IPSEC:
            child = self._child_for(pol)
            if child is None:
                return False  # policy ahead of its SA: a moment more
            # the verdict first: the peer's answer may be back before a late verdict, and
            # must find the connection (and its NAT binding) confirmed by conntrack
            if self._egress_drop:  # into conntrack, not onto the wire
                self._verdict(h, True, "released_into_sa", mark=self.settings.stolen_mark)
            else:
                self._verdict(h, False, "released_into_sa")
            self._send("tx", {"op": "send", "slot": child.slot_out, "packets": [h.payload.hex()]})
            return True
        if action is PolicyAction.TRAP and pol is not None:
            self._acquire(pol, h.flow)
        return False  # TRAP, HOLD: wait for the SA or a shunt

    def _child_for(self, pol: PolicySpec | None) -> _Child | None:
        if pol is None or not pol.templates:
            return None
        t = pol.templates[0]
        for c in self._children.values():
            s = c.spec
            if s.reqid == t.reqid and s.local == t.src and s.remote == t.dst:
                return c
        return None

    def _covered(self, f: Flow) -> bool:
        """A Child SA's remote selectors cover this destination."""
        dst = f.dst_address
        return any(dst in ts.net for c in self._children.values() for ts in c.spec.remote_ts)

    def _acquire(self, pol: PolicySpec, f: Flow) -> None:
        """The kernel's ACQUIRE, for a trapped packet (at most once a second per flow's
        destination and reqid while it stays trapped, like xfrm_acq_expires=1)."""
        t = pol.templates[0]
        key = (f.version, f.dst, t.reqid)
        now = self._clock()
        if now - self._acquired.get(key, -10.0) < 1.0:
            return
        self._acquired[key] = now
        src, dst = f.src_address, f.dst_address
        host = 32 if f.version == 4 else 128
        if f.proto in ICMP_PROTOS:
            sel_dst = TrafficSelector(
                ipaddress.ip_network(f"{dst}/{host}"), f.proto, icmp_type=f.sport
            )
            sel_src = TrafficSelector(ipaddress.ip_network(f"{src}/{host}"), f.proto)
        else:
            ports = f.proto in (6, 17, 132)
            sel_dst = TrafficSelector(
                ipaddress.ip_network(f"{dst}/{host}"), f.proto, f.dport if ports else None
            )
            sel_src = TrafficSelector(
                ipaddress.ip_network(f"{src}/{host}"), f.proto, f.sport if ports else None
            )
        self._acq_seq += 1
        self._events.put_nowait(
            Acquire(
                src=t.src if not t.src.is_unspecified else src,
                dst=t.dst if not t.dst.is_unspecified else dst,
                selector_src=sel_src,
                selector_dst=sel_dst,
                reqid=t.reqid,
                seq=self._acq_seq,
                policy_priority=pol.priority,
                policy_index=0,
            )
        )

    def _hold(self, h: _Held) -> None:
        key = (h.flow.version, h.flow.dst)
        bucket = self._held.setdefault(key, [])
        s = self.settings
        if len(bucket) >= s.hold_per_destination or self._held_count >= s.hold_total:
            self._verdict(h, False, "hold_overflow")
            if not bucket:
                del self._held[key]
            return
        bucket.append(h)
        self._held_count += 1
        self.queue_stats["held"] += 1

    def _release_held(self) -> None:
        """Decide again every held packet (a policy or an SA changed)."""
        if not self._nft_live or not self._held:
            return
        for key, bucket in list(self._held.items()):
            keep = [h for h in bucket if not self._decide(h)]
            self._held_count -= len(bucket) - len(keep)
            if keep:
                self._held[key] = keep
            else:
                del self._held[key]

    async def _hold_timer(self) -> None:
        while True:
            await asyncio.sleep(0.25)
            now = self._clock()
            for key, bucket in list(self._held.items()):
                keep = []
                for h in bucket:
                    if h.deadline <= now:
                        self._verdict(h, False, "hold_expired")
                        self._held_count -= 1
                    else:
                        keep.append(h)
                if keep:
                    self._held[key] = keep
                else:
                    del self._held[key]
            stale = [k for k, t in self._acquired.items() if now - t > 60]
            for k in stale:
                del self._acquired[k]

    # ------------------------------------------------------------------ internals
    def _spawn_task(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
