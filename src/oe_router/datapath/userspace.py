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

``UserspaceDatapath`` composes the pieces, each owning its own state: the worker
processes (``workerpool.py``), the Child SAs handed to them (``sa_table.py``), the
policies with their nftables projection (``policies.py``), the held first packets
(``firstpackets.py``), the TUN device with its routes (``tun.py``) and the ESP sockets
beside IKE's (``steering.py``). The workers keep the keys of the SAs they run.
Everything the kernel holds for us (TUN, routes, rules, nftables, NFQUEUE binding) is
ours alone and goes at ``close``, except the "private" policies when they must survive
a stop: their NFQUEUE rules then drop, because nobody listens (fail closed).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any

from oe_router.records import record
from oe_router.tasks import spawn_tracked

from .base import (
    Acquire,
    ChildSaCounters,
    ChildSaSpec,
    DatapathError,
    DatapathEvent,
    FeatureMissing,
    IPAddress,
    IPNetwork,
    Mode,
    PolicySpec,
    ReconcileReport,
    child_policies,
)
from .firstpackets import FirstPackets, HoldLimits, SpdDecider
from .nft_spd import SpdProjection
from .policies import PolicyTable
from .sa_table import SaTable, expire_events, transform_of
from .steering import EspSockets
from .tun import TUN_MTU, TunDevice, TunError
from .workerpool import WorkerPool

__all__ = ["UserspaceDatapath", "UserspaceSettings"]

log = logging.getLogger("oe_router.datapath")


@record(frozen=True)
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
        self._reason = reason
        self.keep_persistent_on_stop = keep_persistent_on_stop
        self.settings = s = settings or UserspaceSettings()
        self._events: asyncio.Queue[DatapathEvent] = asyncio.Queue()
        emit = self._events.put_nowait
        self._tun = TunDevice(
            s.tun_name,
            mtu=s.mtu,
            table=s.table,
            rule_priority=s.rule_priority,
            fwmark=s.fwmark,
            netns=netns,
        )
        self._workers = WorkerPool(s.workers_python, on_canary_failure)
        self._sockets = EspSockets(self._workers, fwmark=s.fwmark, netns=netns)
        self._sas = SaTable(self._workers, replay_window=s.replay_window, clock=clock)
        projection = SpdProjection(
            wan=wan_ifname,
            tun=s.tun_name,
            queue_num=s.queue_num,
            bypass_mark=s.fwmark,
            ike_ports=s.ike_ports,
            netns=netns,
        )
        self._policies = PolicyTable(projection, emit, lambda: self._first.release())
        self._first = FirstPackets(
            queue_num=s.queue_num,
            limits=HoldLimits(s.hold_limit, s.hold_per_destination, s.hold_total),
            decider=SpdDecider(self._policies, self._sas),
            seal=self._sas.send,
            emit=emit,
            stolen_mark=s.stolen_mark,
            wan=wan_ifname,
            egress_table=f"oe_{s.tun_name.replace('-', '_')}_egress",
            netns=netns,
            clock=clock,
        )
        self._tasks: set[asyncio.Task[Any]] = set()
        self._started = False

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

    @property
    def queue_stats(self) -> dict[str, int]:
        """What became of the queued first packets (counters since start)."""
        return self._first.stats

    def stats(self) -> dict[str, int]:
        return {
            **self._first.stats,
            "held_now": self._first.held_now,
            "policies": len(self._policies),  # SPD entries, projected into nftables
            **self._first.queue_stats(),
            **self.worker_drops(),
        }

    def worker_drops(self) -> dict[str, int]:
        """The workers' own drop counters (no SA, selector mismatch, I/O errors)."""
        return self._workers.drops()

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Make the TUN device, the routing rules and the workers (before IKE binds)."""
        if self._started:
            return
        try:
            tun_fd = self._tun.open()
        except TunError as exc:
            raise FeatureMissing(str(exc)) from None
        try:
            await asyncio.to_thread(self._tun.setup)
            await self._policies.projection.probe()
            await self._first.open()
            await self._workers.start(tun_fd)
        except BaseException:
            await self._teardown()
            raise
        spawn_tracked(self._tasks, self._lifetimes(), log, "userspace SA lifetimes")
        spawn_tracked(self._tasks, self._first.expire(), log, "userspace held packets")
        self._started = True
        log.info(
            "userspace ESP on %s (mtu %d, workers %s)",
            self.settings.tun_name,
            self.settings.mtu,
            self._workers.describe(),
        )

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        self._policies.close()
        for spec in self._sas.specs():
            with contextlib.suppress(DatapathError):
                await self.remove_child_sa(spec)
        try:
            await self._policies.leave(self.keep_persistent_on_stop)
        except DatapathError as exc:
            log.error("leaving the policy projection: %s", exc)
        self._first.drop_all()
        await self._teardown()

    async def _teardown(self) -> None:
        self._started = False
        await self._workers.stop()
        self._first.close()
        self._sockets.close()
        self._policies.close()
        self._tun.close()

    # ------------------------------------------------------------------ IKE socket hooks
    def before_bind(self, sock: socket.socket, natt: bool) -> None:
        self._sockets.before_bind(sock, natt)

    def after_bind(self, sock: socket.socket, natt: bool, ip: str) -> None:
        self._sockets.after_bind(sock, natt, ip)

    def closing(self, ip: str) -> None:
        self._sockets.closing(ip)

    # ------------------------------------------------------------------ engines
    def set_engine_table(self, table: Mapping[str, Any], canary_interval: float = 0.0) -> None:
        """The offload layer's choice (engine per transform and size) for new and live SAs."""
        self._workers.set_engines(table, canary_interval)

    def engine_for(self, spec: ChildSaSpec) -> str:
        """Which engine runs this Child SA's transform, by packet size, for ``oe status``."""
        try:
            t = transform_of(spec)
        except DatapathError:
            return ""
        return self._workers.engine_bands(t.name)

    # ------------------------------------------------------------------ SAs
    async def allocate_spi(self, local: IPAddress, remote: IPAddress, reqid: int) -> int:
        return self._sas.allocate_spi()

    async def install_child_sa(self, spec: ChildSaSpec) -> ChildSaSpec:
        if not self._started:
            raise DatapathError("the userspace datapath is not running")
        if spec.mode is not Mode.TUNNEL:
            raise FeatureMissing(
                f"Child SA {spec.local}<->{spec.remote}: the userspace datapath runs tunnel "
                "mode only (transport mode needs kernel ESP)"
            )
        spec = await self._sas.install(spec)
        for net in self._routed(spec):
            await self._tun.route_ref(net, +1)
        if spec.install_policies:
            await self._policies.install(child_policies(spec))
        self._first.release()
        return spec

    async def remove_child_sa(self, spec: ChildSaSpec, *, remove_policies: bool = True) -> None:
        child = self._sas.detach(spec)
        if remove_policies and spec.install_policies:
            await self._policies.remove(child_policies(spec))
        if child is None:
            return
        self._sas.retire(child)
        for net in self._routed(spec):
            await self._tun.route_ref(net, -1)

    @staticmethod
    def _routed(spec: ChildSaSpec) -> list[IPNetwork]:
        """What a Child SA routes into the TUN: its remote selectors, or its peer."""
        return [ts.net for ts in spec.remote_ts] or [ipaddress.ip_network(spec.remote)]

    def read_counters(self, spec: ChildSaSpec) -> ChildSaCounters:
        return self._sas.read_counters(spec)

    async def counters(self, spec: ChildSaSpec) -> ChildSaCounters:
        return self.read_counters(spec)

    def orphaned_acquires(self, trap_reqid: int) -> list[Acquire]:
        """None: a trapped packet lives in this process's queue and died with it."""
        return []

    async def _lifetimes(self) -> None:
        """The kernel's SA lifetimes, emulated: soft -> Expire(hard=False), hard -> gone."""
        while True:
            await asyncio.sleep(1.0)
            for spec, hard in self._sas.expiring():
                if hard:
                    await self.remove_child_sa(spec)
                for ev in expire_events(spec, hard):
                    self._events.put_nowait(ev)

    # ------------------------------------------------------------------ policies
    async def install_policy(self, policy: PolicySpec) -> None:
        await self.install_policies((policy,))

    async def install_policies(self, policies: Sequence[PolicySpec]) -> None:
        await self._policies.install(list(policies))

    async def remove_policy(self, policy: PolicySpec) -> None:
        await self._policies.remove([policy])

    def policies(self) -> list[PolicySpec]:
        return self._policies.policies()

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
        await self._policies.go_live()
        return 0
