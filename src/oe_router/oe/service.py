"""The OE daemon service: the asyncio edge that runs ``OeManager`` against a datapath.

Why a thin edge: every decision is in ``manager.py`` (sans-IO); this file only
performs actions (datapath calls, negotiator calls), feeds their results back, turns
datapath events into manager events and keeps the clock. It owns the datapath: at
start it reconciles what an earlier run left (keeping the persistent "private"
policies so those destinations stay blocked across a crash), installs the group
policies, then consumes ACQUIRE/EXPIRE events until stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import itertools
import logging
import time
from collections.abc import Callable, Coroutine, Iterable, Mapping
from dataclasses import asdict, replace
from typing import TYPE_CHECKING, Any, Protocol

import dns.name

from oe_router.config.schema import OeConfig
from oe_router.control.events import Events
from oe_router.control.protocol import CommandError, CommandTable, Request
from oe_router.control.status import StatusContribution, TunnelStatus
from oe_router.datapath.base import (
    Acquire,
    ChildSaSpec,
    Datapath,
    DatapathError,
    DatapathEvent,
    Expire,
    IPAddress,
    IPNetwork,
    PolicyExpire,
    PolicySpec,
)
from oe_router.datapath.kernel import Ownership, XfrmDatapath
from oe_router.oe.actions import (
    Action,
    CheckTraffic,
    InstallChild,
    InstallPolicy,
    MoveChild,
    Negotiate,
    NegotiationResult,
    Negotiator,
    Rekey,
    RemoveChild,
    RemovePolicy,
    SendDelete,
    TunnelResult,
    UpdateCat,
)
from oe_router.oe.lan import LanError, LanGateway, Peers6, cat_remove_script, cat_script
from oe_router.oe.manager import OeManager
from oe_router.oe.peerauth import PublishedKey
from oe_router.oe.policy import PolicyTable

if TYPE_CHECKING:
    from oe_router.devview import OeSnapshot

__all__ = ["DatapathFactory", "EspOfferHooks", "NftRunner", "OeService", "kernel_datapath"]

log = logging.getLogger("oe_router.oe")

#: How long a negotiation waits for a non-empty ESP offer (the kernel datapath's first
#: self-test is still running) before it fails like any other negotiation.
OFFER_WAIT = 10.0

DatapathFactory = Callable[[OeConfig], Datapath]
#: Runs one ``nft -f`` script (``lan.apply_nft``); raises ``LanError`` with nft's words.
NftRunner = Callable[[str], None]


class EspOfferHooks(Protocol):
    """What the OE service needs from the daemon's ESP offer (``esp_offer.EspOffer``).

    Why here: the offer can be empty for a moment (the kernel datapath offers a transform
    only once its self-test passed) and can lose transforms whose kernel driver failed;
    the OE side waits for the first, and moves live Child SAs off the second.
    """

    def empty_reason(self) -> str | None:
        """None while at least one transform is offered, else why none is."""
        ...

    async def wait_offer(self, timeout: float) -> str | None:
        """Wait (at most ``timeout``) while an empty offer may still fill; None once one
        transform is offered, else why none is."""
        ...

    def withdrawn(self, spec: ChildSaSpec) -> str | None:
        """Why this Child SA's transform was taken out of the offer (its driver failed),
        or None: it may stay."""
        ...

    async def rekey_child(self, peer: IPAddress, spec: ChildSaSpec) -> str | None:
        """Rekey the Child SA with the current offer; None once done, else why not."""
        ...


class OeService:
    """Daemon ``Service`` "oe": policy groups, tunnels and shunts over one datapath."""

    def __init__(
        self,
        *,
        datapath_factory: DatapathFactory,
        negotiator: Negotiator,
        wan: Mapping[int, IPAddress],
        lan: Iterable[IPNetwork] = (),
        dns_upstream: Iterable[IPAddress] = (),
        trap_reqid: int = Ownership().reqid_max,
        nft: NftRunner | None = None,
        clock: Callable[[], float] = time.monotonic,
        wan_devices: Iterable[str] = ("wan",),
    ) -> None:
        """``nft``: how to apply the LAN gateway's nftables table (``lan.py``); None
        (tests, a router without LAN) leaves netfilter alone. ``wan_devices``: the WAN's
        Linux devices (the platform resolved the configured networks), IPv4's first."""
        self._wan_devices = tuple(wan_devices) or ("wan",)
        self._factory = datapath_factory
        self._negotiator = negotiator
        self._wan = dict(wan)
        self._lan = tuple(lan)
        self._dns_upstream = tuple(dns_upstream)
        self._trap_reqid = trap_reqid
        self._idle_timeout = 300.0  # oe.ike.idle_timeout, set by start() and reload()
        self._repoll = False
        self._nft = nft
        self._cat_table = False  # the CAT table (lan.cat_script) was written
        self._peers6: Peers6 | None = None
        self._keep_nat_on_stop = True
        self._clock = clock
        #: names the crypto engine of a Child SA for ``oe status`` (the daemon sets it)
        self.engine_of: Callable[[ChildSaSpec], str] | None = None
        #: the ESP offer (the daemon sets it): negotiations wait for a first transform,
        #: and Child SAs move off withdrawn ones (``offer_changed``)
        self.offer: EspOfferHooks | None = None
        #: where ``oe.shunt`` goes when a shunt is installed (the daemon sets it)
        self.events: Events | None = None
        self._dp: Datapath | None = None
        self._mgr: OeManager | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._waiters: dict[int, asyncio.Future[bool]] = {}
        self._next_waiter = 1
        self._wake = asyncio.Event()

    @property
    def name(self) -> str:
        return "oe"

    @property
    def manager(self) -> OeManager:
        if self._mgr is None:
            raise RuntimeError("the oe service is not running")
        return self._mgr

    def _table(self, config: OeConfig) -> PolicyTable:
        return PolicyTable.from_config(
            config.policy, lan=self._lan, dns_upstream=self._dns_upstream
        )

    # ------------------------------------------------------------------ lifecycle
    async def start(self, config: OeConfig) -> None:
        table = self._table(config)
        self._dp = dp = self._factory(config)
        await dp.start()
        self._idle_timeout = config.ike.idle_timeout
        self._mgr = mgr = OeManager(
            table,
            self._wan,
            trap_reqid=self._trap_reqid,
            shunt_lifetime=config.shunt_lifetime,
            idle_timeout=self._idle_timeout,
            # LAN-sourced IPv6 traps only where the gateway NATs LAN flows into tunnels
            lan6=self._lan6_gateway(),
        )
        # An earlier run's SAs go (their IKE SAs died with it), but every one of its
        # policies stays until this run's group table is in: a Child SA's policy may be
        # all that keeps a "private" peer's packets from leaving in the clear, and with
        # its SA gone it traps (drops) them instead. Only then do leftovers go, except
        # what must never lapse ("private" traps and drop shunts, which the kernel still
        # expires by their lifetime).
        report = await dp.reconcile(adopt_policy=lambda p: True)
        await self._perform(mgr.start())
        self._keep_nat_on_stop = config.keep_private_on_stop
        self._peers6 = self._lan_gateway(config)
        # the leftovers' removal (and the packet hold's table) and the LAN gateway's whole
        # table (with an empty oe_peers6) touch nothing of each other's: their nft runs
        # overlap (each ~0.1-0.3 s of a TCG router's start)
        removed, _ = await asyncio.gather(
            dp.release_adopted(keep=lambda p: p.persistent), self._sync_peers6()
        )
        log.info(
            "datapath %s (%s); earlier run: %d SAs removed, %d policies kept, %d removed",
            dp.name,
            dp.reason,
            report.removed_sas,
            report.adopted_policies - removed,
            removed,
        )
        self._spawn(self._consume_events(dp))
        await self._perform(self._orphaned_acquires(dp))
        self._spawn(self._timers())

    def _orphaned_acquires(self, dp: Datapath) -> list[Action]:
        """ACQUIREs the datapath holds for a dead predecessor: answered now, or a
        private-or-clear destination stalls until the datapath lets them go."""
        now = self._clock()
        actions: list[Action] = []
        for event in dp.orphaned_acquires(self._trap_reqid):
            actions += self.manager.acquire(event, now)
        return actions

    async def reload(self, config: OeConfig) -> None:
        mgr = self.manager
        table = self._table(config)  # ValueError names the entry; the daemon rolls back
        mgr.shunt_lifetime = config.shunt_lifetime
        p6 = self._peers6
        private4, private6 = _private(config, 4), _private(config, 6)
        if p6 is not None and (p6.gw.private4, p6.gw.private6) != (private4, private6):
            p6.gw = replace(p6.gw, private4=private4, private6=private6)
            p6.failed()  # rewrite the whole table with the new private sets at the next sync
        if config.ike.idle_timeout != self._idle_timeout:
            self._idle_timeout = mgr.idle_timeout = config.ike.idle_timeout
            self._repoll = True  # a shorter timeout needs the shorter poll period now
            self._wake.set()
        await self._perform(mgr.replace_table(table))

    async def stop(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5.0)
        for fut in self._waiters.values():
            if not fut.done():
                fut.set_result(False)
        self._waiters.clear()
        if self._mgr is not None:
            peers = {c.remote for c in self._mgr.children()}
            for peer in peers:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self._negotiator.delete(peer, None), 1.0)
        if self._dp is not None:
            # removes our SAs and policies except persistent ones (keep_private_on_stop)
            await self._dp.close()
        await self._stop_lan_gateway()
        if self._cat_table:  # CAT: the SAs it translated for are gone
            self._cat_table = not await self._run_nft(cat_remove_script())
        self._dp = None
        self._mgr = None

    def status(self) -> StatusContribution:
        if self._mgr is None or self._dp is None:
            return StatusContribution()
        now = self._clock()
        return StatusContribution(
            tunnels=self._mgr.tunnels(now, self._dp.read_counters, self.engine_of),
            shunts=self._mgr.shunts(now),
            datapath=f"{self._dp.name} ({self._dp.reason})",
            datapath_stats=self._dp.stats(),
        )

    def view_snapshot(self, tunnels: tuple[TunnelStatus, ...]) -> OeSnapshot | None:
        """What the per-device view (``devview``) needs of OE now; ``tunnels``: every
        tunnel row of the status (with the IKE engine's). None when OE is not running."""
        if self._mgr is None:
            return None
        from oe_router.devview import snapshot  # a request's (docs/footprint.md)

        return snapshot(self._mgr, self._lan, tunnels, self._clock())

    # ------------------------------------------------------------------ control
    def register_commands(self, commands: CommandTable) -> None:
        """Add ``flush`` to the daemon's control commands."""
        commands.register(
            "flush", self._cmd_flush, "remove every pass and drop shunt: the next flows negotiate"
        )

    async def _cmd_flush(self, request: Request) -> dict[str, object]:
        if self._mgr is None:
            raise CommandError("the oe service is not running")
        return {"flushed": await self.flush()}

    async def flush(self) -> int:
        """Remove every pass and drop shunt now; how many shunt policies went."""
        n, actions = self.manager.flush_shunts()
        await self._perform(actions)
        return n

    # ------------------------------------------------------------------ DNS front entry
    async def ensure_tunnel(
        self, name: dns.name.Name, addresses: tuple[IPAddress, ...], key: PublishedKey
    ) -> bool:
        """``dns.hold.TunnelRequester``: True once every address is protected."""
        if self._mgr is None:
            return False
        waiter = self._next_waiter
        self._next_waiter += 1
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._waiters[waiter] = fut
        await self._perform(self._mgr.ensure_tunnel(waiter, name, addresses, key, self._clock()))
        try:
            return await fut
        finally:
            self._waiters.pop(waiter, None)

    async def pass_keyless(
        self, name: dns.name.Name, addresses: tuple[IPAddress, ...], ttl: float, reason: str
    ) -> frozenset[IPAddress]:
        """``dns.hold.KeylessPasser``: the addresses of a name proven keyless that pass
        in the clear, their shunts installed in the datapath when this returns."""
        if self._mgr is None:
            return frozenset()
        actions, passed = self._mgr.pass_keyless(name, addresses, ttl, reason, self._clock())
        await self._perform(actions)
        return passed

    def keyless_passed(self, addresses: tuple[IPAddress, ...]) -> bool:
        """``dns.hold.KeylessPasser``: does a pass shunt stand for every address now?
        (Without a manager no trap of ours waits for them either.)"""
        if self._mgr is None:
            return True
        return self._mgr.keyless_passed(addresses, self._clock())

    # ------------------------------------------------------------------ IKE engine entries
    async def peer_deleted(self, peer: IPAddress, spis: Iterable[int] | None) -> None:
        """The IKE engine received DELETE from ``peer``."""
        await self._perform(self.manager.peer_deleted(peer, spis, self._clock()))

    async def liveness_failed(self, peer: IPAddress) -> None:
        """The IKE engine's liveness check of ``peer`` went unanswered."""
        await self._perform(self.manager.liveness_failed(peer, self._clock()))

    def refuses_peer(self, peer: str) -> str | None:
        """IKE responder filter: why ``peer`` may not start IKE with us, or None."""
        if self._mgr is None:
            return "the OE manager is not running"
        empty = self.offer.empty_reason() if self.offer is not None else None
        if empty is not None:  # the peer retransmits and is answered once there is one
            return empty
        try:
            return self._mgr.refuses_peer(ipaddress.ip_address(peer))
        except ValueError:
            return f"{peer!r} is not an address"

    def authorize_inbound(self, peer: IPAddress, spec: ChildSaSpec) -> str | None:
        """Responder: may ``peer`` have this Child SA? None if yes, else why not."""
        return self.manager.authorize_inbound(peer, spec)

    async def adopt_inbound(self, peer: IPAddress, spec: ChildSaSpec) -> None:
        """Responder: install a Child SA that ``authorize_inbound`` allowed."""
        await self._perform(self.manager.adopt_inbound(peer, spec, self._clock()))

    def offer_changed(self) -> None:
        """The ESP offer changed: Child SAs on a withdrawn transform move (a rekey)."""
        if self._mgr is not None and self.offer is not None:
            self._spawn(self._withdraw())

    async def _withdraw(self) -> None:
        if self._mgr is not None and self.offer is not None:
            await self._perform(self._mgr.withdraw(self.offer.withdrawn, self._clock()))

    # ------------------------------------------------------------------ LAN gateway
    def _lan_gateway(self, config: OeConfig) -> Peers6 | None:
        """The SNAT table's inputs, or None when there is no LAN to NAT (or no nft)."""
        if self._nft is None or not self._lan:
            return None
        lan4 = tuple(n for n in self._lan if isinstance(n, ipaddress.IPv4Network))
        lan6 = tuple(n for n in self._lan if isinstance(n, ipaddress.IPv6Network))
        wan4, wan6 = self._wan.get(4), self._wan.get(6)
        gw = LanGateway(
            wan_ifname=self._wan_devices[0],
            extra_wan_ifnames=self._wan_devices[1:],
            tunnel_ifnames=tuple(d for d in (self._tunnel_device(),) if d),
            lan4=lan4,
            lan6=lan6,
            wan4=wan4 if isinstance(wan4, ipaddress.IPv4Address) else None,
            wan6=wan6 if isinstance(wan6, ipaddress.IPv6Address) else None,
            private6=_private(config, 6),
            private4=_private(config, 4),
        )
        return Peers6(gw)

    def _tunnel_device(self) -> str | None:
        return None if self._dp is None else self._dp.tunnel_device

    def _lan6_gateway(self) -> tuple[ipaddress.IPv6Network, ...]:
        """The LAN IPv6 prefixes whose flows ``_lan_gateway``'s table can NAT to WAN6.

        Without nft or a WAN IPv6 address a LAN-sourced trap would only drop packets
        that no tunnel could ever carry, so there are none."""
        if self._nft is None or not isinstance(self._wan.get(6), ipaddress.IPv6Address):
            return ()
        return tuple(n for n in self._lan if isinstance(n, ipaddress.IPv6Network))

    async def _run_nft(self, script: str) -> bool:
        if not script or self._nft is None:
            return True
        try:
            await asyncio.to_thread(self._nft, script)
        except LanError as exc:
            log.error("LAN gateway: %s", exc)
            return False
        return True

    async def _sync_peers6(self) -> None:
        """Bring ``oe_peers6`` to the IPv6 peers that have a Child SA now.

        Runs before a DNS answer is released (``TunnelResult``) and after every batch of
        actions, so a LAN device's first packet to a new IPv6 peer is already NATed
        into the tunnel, and a removed tunnel's peer is reached unNATed again.
        """
        p6, mgr = self._peers6, self._mgr
        if p6 is None or mgr is None:
            return
        before = p6.applied
        script = p6.update(p6.wanted((c.local, c.remote) for c in mgr.children()))
        if not script:
            return
        if not await self._run_nft(script):
            p6.failed()
        elif before is not None:
            now = ", ".join(str(a) for a in sorted(p6.applied or ())) or "none"
            log.info("LAN IPv6 flows NATed into tunnels to: %s", now)

    async def _stop_lan_gateway(self) -> None:
        """Empty ``oe_peers6`` (their SAs are gone); keep the SNAT of "private" flows while
        their policies stay (keep_private_on_stop): they catch LAN flows only after SNAT.
        The rest is masqueraded from now on (``lan.py``): the WAN may change meanwhile."""
        p6, self._peers6 = self._peers6, None
        if p6 is None:
            return
        if self._keep_nat_on_stop:
            p6.gw = replace(p6.gw, stopped=True, tunnel_ifnames=())
            p6.failed()
            await self._run_nft(p6.update(()))
        else:
            await self._run_nft(f"delete table inet {p6.gw.table}\n")

    # ------------------------------------------------------------------ internals
    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("internal task failed: %r", task.exception())

    async def _consume_events(self, dp: Datapath) -> None:
        async for event in dp.events():
            try:
                await self._perform(self._event(event))
            except Exception as exc:  # one bad event must not stop OE
                log.error("handling %s failed: %s", type(event).__name__, exc)

    def _event(self, event: DatapathEvent) -> list[Action]:
        mgr, now = self.manager, self._clock()
        if isinstance(event, Acquire):
            return mgr.acquire(event, now)
        if isinstance(event, Expire):
            return mgr.expired(event, now)
        if isinstance(event, PolicyExpire):
            return mgr.policy_expired(event, now)
        return []  # MappingChange: NAT-T address updates belong to the IKE engine

    @property
    def poll_period(self) -> float:
        """How often the counters are read: a quarter of ``idle_timeout``, 1 s to 60 s.

        Activity is noticed when a poll sees the byte count change, so an SA's last
        activity is known to within one period: with a quarter, an idle SA goes between
        1 and 1.5 times ``idle_timeout`` after its last packet (before the IKE core's
        rekey, for any sane lifetime); the bounds keep the cost flat at the extremes.
        """
        return min(60.0, max(1.0, self._idle_timeout / 4))

    async def _timers(self) -> None:
        next_poll = self._clock() + self.poll_period
        while True:
            mgr = self.manager
            if self._repoll:
                self._repoll = False
                next_poll = min(next_poll, self._clock() + self.poll_period)
            deadline = mgr.next_deadline()
            now = self._clock()
            wait = min(next_poll, deadline if deadline is not None else next_poll) - now
            self._wake.clear()
            # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancellation
            # that races with the event, which hung stop() for a whole poll interval
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, wait)):
                    await self._wake.wait()
            now = self._clock()
            await self._perform(mgr.tick(now))
            if now >= next_poll:
                next_poll = now + self.poll_period
                await self._perform(mgr.poll_traffic())

    async def _perform(self, actions: list[Action]) -> None:
        dp = self._dp
        if dp is None:
            return
        for installs, run in itertools.groupby(actions, lambda a: isinstance(a, InstallPolicy)):
            if installs:
                await self._install(dp, list(run))  # type: ignore[arg-type]
                continue
            for action in run:
                try:
                    await self._one(dp, action)
                except DatapathError as exc:
                    log.error("%s", exc)
        await self._sync_peers6()
        if any(isinstance(a, InstallPolicy) for a in actions):
            self._wake.set()  # a new shunt may expire before the timer's current deadline

    async def _install(self, dp: Datapath, actions: list[InstallPolicy]) -> None:
        """Consecutive InstallPolicy actions in one datapath step (the start's 60-odd traps
        and passes: 0.6 s of the TCG router's start as one netlink send each). If the
        datapath refuses any, each is installed again on its own, so that every refusal
        is logged by name and every installed shunt announced, as one by one."""
        if len(actions) > 1:
            if any(a.nat_first for a in actions):
                await self._sync_peers6()
            try:
                await dp.install_policies([a.policy for a in actions])
            except DatapathError:
                pass  # named below, one by one
            else:
                for action in actions:
                    self._announce(action.policy)
                return
        for action in actions:
            try:
                await self._one(dp, action)
            except DatapathError as exc:
                log.error("%s", exc)

    def _announce(self, policy: PolicySpec) -> None:
        if self.events is not None:
            shunt = self.manager.shunt_status(policy, self._clock())
            if shunt is not None:
                self.events.publish("oe.shunt", asdict(shunt))

    async def _one(self, dp: Datapath, action: Action) -> None:
        mgr = self.manager
        if isinstance(action, InstallPolicy):
            if action.nat_first:
                await self._sync_peers6()
            await dp.install_policy(action.policy)
            self._announce(action.policy)
        elif isinstance(action, RemovePolicy):
            await dp.remove_policy(action.policy)
        elif isinstance(action, Negotiate):
            self._spawn(self._negotiate(action))
        elif isinstance(action, Rekey):
            self._spawn(self._rekey(action))
        elif isinstance(action, MoveChild):
            self._spawn(self._move(action))
        elif isinstance(action, InstallChild):
            try:
                spec = await dp.install_child_sa(action.spec)
            except DatapathError as exc:
                await self._perform(mgr.installed(action.ticket, None, str(exc), self._clock()))
            else:
                await self._perform(mgr.installed(action.ticket, spec, None, self._clock()))
                if self.offer is not None:  # negotiated before its transform was withdrawn
                    await self._perform(mgr.withdraw(self.offer.withdrawn, self._clock()))
        elif isinstance(action, RemoveChild):
            await dp.remove_child_sa(action.spec, remove_policies=action.remove_policies)
        elif isinstance(action, SendDelete):
            self._spawn(self._delete(action))
        elif isinstance(action, CheckTraffic):
            try:
                c = await dp.counters(action.spec)
            except DatapathError:
                total = 0  # gone from the kernel: count it as idle
            else:
                total = c.inbound.bytes + c.outbound.bytes
            soft = action.soft_expired
            await self._perform(mgr.traffic(action.child_id, total, self._clock(), soft))
        elif isinstance(action, UpdateCat):  # CAT: LAN flows to a peer use its inner address
            self._cat_table = True
            await self._run_nft(cat_script(self._lan, action.inner, wan=self._wan.values()))
        elif isinstance(action, TunnelResult):
            await self._sync_peers6()  # the answer's first packet must find the SNAT
            fut = self._waiters.get(action.waiter)
            if fut is not None and not fut.done():
                fut.set_result(action.ok)

    async def _negotiate(self, action: Negotiate) -> None:
        try:
            empty = None if self.offer is None else await self.offer.wait_offer(OFFER_WAIT)
            if empty is not None:
                result = NegotiationResult(None, empty)
            else:
                result = await self._negotiator.negotiate(action.request, self._clock())
        except Exception as exc:  # the engine's failure is a failed negotiation
            result = NegotiationResult(None, f"IKE engine error: {exc}")
        await self._perform(self.manager.negotiated(action.ticket, result, self._clock()))

    async def _rekey(self, action: Rekey) -> None:
        try:
            result = await self._negotiator.rekey(action.peer, action.child, self._clock())
        except Exception as exc:
            result = NegotiationResult(None, f"IKE engine error: {exc}")
        await self._perform(self.manager.negotiated(action.ticket, result, self._clock()))

    async def _move(self, action: MoveChild) -> None:
        if self.offer is None:
            error: str | None = "no IKE rekey available to move it"
        else:
            try:
                error = await self.offer.rekey_child(action.peer, action.spec)
            except Exception as exc:
                error = f"IKE engine error: {exc}"
        await self._perform(self.manager.moved(action.child_id, error, self._clock()))

    async def _delete(self, action: SendDelete) -> None:
        try:
            await self._negotiator.delete(action.peer, action.child)
        except Exception as exc:
            log.warning("DELETE to %s failed: %s", action.peer, exc)


def _private(config: OeConfig, version: int) -> tuple[Any, ...]:
    """The "private" group's networks of one IP version (a proto/port entry NATs its whole
    network to the WAN address: more flows NATed than needed, none that bypasses the trap)."""
    return tuple(e.network for e in config.policy.private if e.network.version == version)


def kernel_datapath(
    netns: str | None = None,
    reason: str | None = None,
    wan_devices: Iterable[str] = (),
    wan4: IPAddress | None = None,
    lan: Iterable[IPNetwork] = (),
    wan6: IPAddress | None = None,
) -> DatapathFactory:
    """The XFRM datapath, keeping "private" policies at stop as the config says;
    ``reason`` is why it was chosen (``oe status``). With ``packet_hold`` (and a WAN
    device, and a WAN IPv4 address or a WAN IPv6 address and LAN IPv6 prefixes) LAN
    flows' first packets wait for their SA (``datapath.kernel_hold``, imported only
    then)."""
    devices = tuple(wan_devices)
    lan4 = tuple(n for n in lan if isinstance(n, ipaddress.IPv4Network))
    lan6 = tuple(n for n in lan if isinstance(n, ipaddress.IPv6Network))
    w4 = wan4 if isinstance(wan4, ipaddress.IPv4Address) else None
    w6 = wan6 if isinstance(wan6, ipaddress.IPv6Address) and lan6 else None

    def make(config: OeConfig) -> Datapath:
        if config.packet_hold and devices and (w4 is not None or w6 is not None):
            from oe_router.datapath.kernel_hold import HeldXfrmDatapath

            return HeldXfrmDatapath(
                wan_devices=devices,
                wan4=w4,
                lan4=lan4,
                wan6=w6,
                lan6=lan6,
                keep_persistent_on_stop=config.keep_private_on_stop,
                netns=netns,
                reason=reason or "kernel has ESP and XFRM netlink",
            )
        if reason is None:
            return XfrmDatapath(keep_persistent_on_stop=config.keep_private_on_stop, netns=netns)
        return XfrmDatapath(
            keep_persistent_on_stop=config.keep_private_on_stop, netns=netns, reason=reason
        )

    return make
