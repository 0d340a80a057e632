"""oe-routerd: wiring, asyncio main loop, signals and reload.

The daemon itself knows nothing about IKE, DNS or the datapath. Each of
those is a `Service` (start/reload/stop plus a status contribution) held in
a `ServiceRegistry` that `main` builds and hands to `Daemon`. A reload
validates the whole config first, so a bad file never reaches a service,
and a service that refuses the new config rolls the others back: the last
good config keeps running either way.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from oe_router import __version__
from oe_router.config import DEFAULT_CONFIG_PATH, ConfigInvalid, OeConfig, load_config
from oe_router.conntrack import forget_address, read_flows
from oe_router.control import (
    CommandTable,
    ControlServer,
    DaemonStatus,
    ReloadResult,
    Request,
    SocketBindError,
    Status,
    StatusContribution,
)
from oe_router.control.events import Events
from oe_router.control.ubus import UbusShim
from oe_router.datapath.base import Datapath, IPAddress
from oe_router.datapath.kernel import XfrmSocketHooks
from oe_router.devcommands import DEFAULT_LEASES, DeviceCommands, FlowReader
from oe_router.dns.access import LanAccess
from oe_router.dns.capture import DnsCapture
from oe_router.dns.hold import KeyLookup, TunnelRequester
from oe_router.dns.identity_keys import IdentityKeys
from oe_router.dns.service import DnsService, dns_wanted
from oe_router.esp_offer import ConfiguredEspOffer, EspOffer
from oe_router.ike.service import IkeService
from oe_router.ike.tunnel_events import TunnelEvents
from oe_router.logs import DEV_LOG, NOTICE, configure_logging, level_from_name
from oe_router.netwatch import NetlinkWatch
from oe_router.oe.lan import apply_nft
from oe_router.oe.negotiator import IkeNegotiator
from oe_router.oe.service import DatapathFactory, OeService, kernel_datapath
from oe_router.offload.service import OffloadService
from oe_router.platform import Platform, network_change, probe_network, probe_platform
from oe_router.services import Service, ServiceError

if TYPE_CHECKING:
    from oe_router.devview import OeSnapshot

log = logging.getLogger("oe_router.daemon")

PROG = "oe-routerd"


class ServiceRegistry:
    """Ordered services: started in order, stopped in reverse, reloaded all-or-nothing."""

    def __init__(self, services: Iterable[Service] = ()) -> None:
        self._services: list[Service] = []
        self._running: list[Service] = []
        for service in services:
            self.add(service)

    def add(self, service: Service) -> None:
        if any(s.name == service.name for s in self._services):
            raise ValueError(f"service {service.name!r} is already registered")
        self._services.append(service)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self._services)

    @property
    def running(self) -> bool:
        return bool(self._running)

    async def start_all(self, config: OeConfig) -> None:
        """Start every service; if one fails, stop those already started and raise."""
        for service in self._services:
            try:
                await service.start(config)
            except Exception as exc:
                await self.stop_all()
                raise ServiceError(f"{service.name}: {exc}") from None
            self._running.append(service)
            log.info("service %s started", service.name)

    async def warm_all(self) -> None:
        """Let each running service that has a ``warm`` pay its first-use costs now, at
        idle, rather than in the first flow it serves (``IkeService.warm``)."""
        for service in tuple(self._running):
            warm = getattr(service, "warm", None)
            if warm is not None:
                await warm()

    async def stop_all(self) -> None:
        while self._running:
            service = self._running.pop()
            try:
                await service.stop()
            except Exception as exc:
                log.error("service %s failed to stop cleanly: %s", service.name, exc)
            else:
                log.info("service %s stopped", service.name)

    async def reload_all(self, old: OeConfig, new: OeConfig) -> list[str]:
        """Reload running services with `new`; on a refusal, put the others back on `old`."""
        done: list[Service] = []
        for service in self._running:
            try:
                await service.reload(new)
            except Exception as exc:
                problem = f"{service.name}: {exc}"
                for undo in reversed(done):
                    try:
                        await undo.reload(old)
                    except Exception as undo_exc:
                        log.error("service %s failed to roll back: %s", undo.name, undo_exc)
                return [problem]
            done.append(service)
        return []

    def __iter__(self) -> Iterator[Service]:
        return iter(tuple(self._services))

    def contributions(self) -> list[StatusContribution]:
        return [s.status() for s in self._running]


class Daemon:
    """Runs the control socket and the services until SIGTERM/SIGINT; SIGHUP reloads."""

    def __init__(
        self,
        config_path: Path,
        config: OeConfig,
        registry: ServiceRegistry,
        socket_path: Path,
        socket_mode: int = 0o600,
        loader: Callable[[Path], OeConfig] = load_config,
        clock: Callable[[], float] = time.monotonic,
        pid: int | None = None,
        ubus: UbusShim | None = None,
        on_config: Callable[[OeConfig], None] | None = None,
        early_hups: list[int] | None = None,
        platform: Platform | None = None,
        network: Callable[[OeConfig, Platform], Platform] | None = None,
        build: Callable[[OeConfig, Platform], ServiceRegistry] | None = None,
        watch_network: bool = True,
        forget_flows: Callable[[Iterable[IPAddress]], int] | None = None,
        read_flows: FlowReader | None = None,
        leases: Path = Path(DEFAULT_LEASES),
    ) -> None:
        self.config_path = config_path
        self.config = config
        self.generation = 1
        self.last_reload: ReloadResult | None = None
        self.registry = registry
        self.socket_path = socket_path
        self.commands = CommandTable()
        self._server = ControlServer(socket_path, self.commands, mode=socket_mode)
        self._loader = loader
        self._clock = clock
        self._started_at = clock()
        self._pid = os.getpid() if pid is None else pid
        #: the ubus object ``oe`` (started after the services, stopped before them)
        self.ubus = ubus
        self._on_config = on_config
        #: SIGHUPs that came before the loop's handler (start-up): one reload once running
        self._early_hups = early_hups if early_hups is not None else []
        #: what ``registry`` was built for; with ``network`` and ``build`` a reload looks at
        #: the addresses again and rebuilds the services when they changed
        self.platform = platform
        self._network = network
        self._build = build
        self._service_commands: list[str] = []
        #: follow the kernel's address and link events (``netwatch``); with ``network``
        self.watch_network = watch_network
        #: deletes the conntrack entries of WAN addresses that went (``conntrack``); None
        #: in tests that run no kernel
        self.forget_flows = forget_flows
        self._netwatch: NetlinkWatch | None = None
        self._stop = asyncio.Event()
        self._reload_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[Any]] = set()
        self.commands.register("status", self._cmd_status, "the status document")
        self.commands.register("reload", self._cmd_reload, "re-read the config file")
        self.commands.register("help", self._cmd_help, "list the commands")
        #: ``devices`` and ``explain``: conntrack (``read_flows``, None in tests without a
        #: kernel) and dnsmasq's ``leases`` against the OE service's state
        self.devices = DeviceCommands(self.status, self._oe_snapshot, read_flows, leases)
        self.devices.register(self.commands)

    # control commands -------------------------------------------------
    async def _cmd_status(self, request: Request) -> dict[str, object]:
        return {"status": self.status().to_json()}

    async def _cmd_reload(self, request: Request) -> dict[str, object]:
        result = await self.reload()
        return {"reload": result.to_json()}

    async def _cmd_help(self, request: Request) -> dict[str, object]:
        return {"commands": self.commands.help()}

    def _oe_snapshot(self, status: Status) -> OeSnapshot | None:
        oe = next((s for s in self.registry if isinstance(s, OeService)), None)
        return None if oe is None else oe.view_snapshot(status.tunnels)

    # state --------------------------------------------------------------
    def uptime(self) -> float:
        return self._clock() - self._started_at

    def status(self) -> Status:
        parts = self.registry.contributions()
        datapath = next((p.datapath for p in parts if p.datapath), "none")
        stats = next((p.datapath_stats for p in parts if p.datapath_stats), {})
        daemon = DaemonStatus(
            version=__version__,
            pid=self._pid,
            uptime_s=self.uptime(),
            config_path=str(self.config_path),
            config_generation=self.generation,
            enabled=self.config.enabled,
            datapath=datapath,
            last_reload=self.last_reload,
            services=self.registry.names,
            datapath_stats=stats,
            network=self.platform.network_status() if self.platform is not None else {},
        )
        return Status.merge(daemon, parts)

    async def reload(self) -> ReloadResult:
        """Re-read the config file; apply it only if it validates and every service accepts."""
        async with self._reload_lock:
            problems = await self._try_reload()
            if problems:
                for problem in problems:
                    log.warning("reload refused: %s", problem)
                log.warning(
                    "reload refused: %d problem(s) in %s; keeping config generation %d",
                    len(problems),
                    self.config_path,
                    self.generation,
                )
                result = ReloadResult(False, self.generation, tuple(problems), self.uptime())
            else:
                log.log(NOTICE, "reload accepted: config generation %d", self.generation)
                result = ReloadResult(True, self.generation, (), self.uptime())
            self.last_reload = result
            return result

    def adopt_commands(self) -> None:
        """Register the services' own control commands (oe up/down, flush), replacing those
        of the registry before, so the control socket and ubus reach the running services."""
        for name in self._service_commands:
            self.commands.unregister(name)
        before = set(self.commands.names())
        for service in self.registry:
            register = getattr(service, "register_commands", None)
            if register is not None:
                register(self.commands)
        self._service_commands = sorted(set(self.commands.names()) - before)

    def _rebuild_reason(self, new: OeConfig) -> tuple[Platform, str] | None:
        """The platform as it is now, and why the services must be rebuilt for it, or None
        to reload them in place: the addresses changed, ``packet_hold`` was turned on or
        off, or a trust anchor appeared for a daemon that started without its DNS front (a
        vanished one stays a refused reload)."""
        if self._network is None or self._build is None or self.platform is None:
            return None
        fresh = self._network(new, self.platform)
        change = network_change(self.platform, fresh)
        if change:
            return fresh, f"network changed ({change})"
        if new.packet_hold != self.config.packet_hold and "oe" in self.registry.names:
            # the datapath is made with or without the hold: a new one, not a reload
            return fresh, f"packet_hold {'on' if new.packet_hold else 'off'}"
        if dns_wanted(new) and "dns" not in self.registry.names:
            return fresh, "DNS front: a trust anchor is there now"
        return None

    async def _rebuild(self, new: OeConfig, fresh: Platform, reason: str) -> list[str]:
        """Stop the services, build them again for ``fresh`` and start them with ``new``.

        Why a rebuild, not a reload: every part was made for the addresses it was given
        (IKE's sockets and identities, the LAN's SNAT table, the DNS front's access list),
        and the SAs of an old WAN address are dead anyway. The "private" drops stay in
        place across the stop (keep_private_on_stop), so nothing leaks meanwhile.
        """
        assert self._build is not None
        log.warning("%s: restarting the services", reason)
        await self.registry.stop_all()
        lost = set(self.platform.wan_addresses if self.platform else ()) - set(fresh.wan_addresses)
        if lost and self.forget_flows is not None:
            gone = await asyncio.to_thread(self.forget_flows, sorted(lost, key=str))
            log.info("conntrack: %d flow(s) of the old WAN address %s forgotten", gone,
                     ", ".join(sorted(map(str, lost))))  # fmt: skip
        self.platform = fresh
        self.registry = self._build(new, fresh)
        self.adopt_commands()
        try:
            await self.registry.start_all(new)
        except ServiceError as exc:
            return [str(exc)]
        return []

    async def _try_reload(self) -> list[str]:
        try:
            new = self._loader(self.config_path)
        except ConfigInvalid as exc:
            return [str(p) for p in exc.problems] or [str(exc)]
        except OSError as exc:
            return [f"{self.config_path}: {exc.strerror or exc}"]
        except Exception as exc:  # a bug in the config layer must not kill the daemon
            return [f"{self.config_path}: internal error ({type(exc).__name__}: {exc})"]
        old = self.config
        rebuild = self._rebuild_reason(new) if new.enabled else None
        if rebuild is not None:
            problems = await self._rebuild(new, *rebuild)
            if problems:
                return problems
        elif new.enabled and self.registry.running:
            problems = await self.registry.reload_all(old, new)
            if problems:
                return problems
        elif new.enabled:  # enabled again, or after a rebuild whose start failed
            try:
                await self.registry.start_all(new)
            except ServiceError as exc:
                return [str(exc)]
        elif self.registry.running:
            log.log(NOTICE, "oe disabled in %s: stopping services", self.config_path)
            await self.registry.stop_all()
        if new.control_socket != old.control_socket:
            log.warning(
                "control_socket changed to %s: it takes effect at the next restart",
                new.control_socket,
            )
        self.config = new
        self.generation += 1
        if self._on_config is not None:
            self._on_config(new)
        return []

    def request_stop(self) -> None:
        self._stop.set()

    async def network_event(self) -> bool:
        """The kernel said a link or address changed: look at the network again (the
        config stays) and rebuild the services when their addresses or devices changed.
        True when they were rebuilt."""
        if self._network is None or self.platform is None:
            return False
        async with self._reload_lock:
            fresh = self._network(self.config, self.platform)
            change = network_change(self.platform, fresh)
            if not change or not self.config.enabled:
                self.platform = fresh  # the status shows the latest look
                return False
            problems = await self._rebuild(self.config, fresh, f"network changed ({change})")
            for problem in problems:
                log.warning("after the network change: %s", problem)
            return True

    def _on_network_event(self) -> None:
        task = asyncio.get_running_loop().create_task(self.network_event())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _on_sighup(self) -> None:
        log.info("SIGHUP: reloading %s", self.config_path)
        task = asyncio.get_running_loop().create_task(self.reload())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # main loop ----------------------------------------------------------
    async def run(self) -> int:
        """Serve until asked to stop; raises SocketBindError if the socket is unusable."""
        loop = asyncio.get_running_loop()
        await self._server.start()
        signals = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
        try:
            loop.add_signal_handler(signal.SIGTERM, self.request_stop)
            loop.add_signal_handler(signal.SIGINT, self.request_stop)
            loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
            if self.config.enabled:
                try:
                    await self.registry.start_all(self.config)
                except ServiceError as exc:
                    log.error("cannot start: %s", exc)
                    return 1
            else:
                log.log(NOTICE, "oe disabled in %s: services not started", self.config_path)
            if self.ubus is not None:
                await self.ubus.start()  # never fails: without ubus, one line
            if self.watch_network and self._network is not None:
                self._netwatch = NetlinkWatch(self._on_network_event)
                self._netwatch.start()  # never fails: without rtnetlink, one line
            log.log(
                NOTICE,
                "%s %s running (pid %d, config %s, services: %s)",
                PROG,
                __version__,
                self._pid,
                self.config_path,
                ", ".join(self.registry.names) or "none yet",
            )
            warming = loop.create_task(self.registry.warm_all())
            self._tasks.add(warming)
            warming.add_done_callback(self._tasks.discard)
            if self._early_hups:
                log.info("SIGHUP during start-up: reloading once")
                self._early_hups.clear()
                self._on_sighup()
            await self._stop.wait()
            log.info("stopping")
            return 0
        finally:
            for sig in signals:
                loop.remove_signal_handler(sig)
            if self._netwatch is not None:
                self._netwatch.stop()
            for task in list(self._tasks):
                task.cancel()
            if self.ubus is not None:
                await self.ubus.stop()
            await self.registry.stop_all()
            await self._server.stop()
            log.log(NOTICE, "stopped")


# entry point ---------------------------------------------------------------


class StatusOnly:
    """Stands where IKE/OE would run when the machine cannot: ``oe status`` says why."""

    def __init__(self, datapath: str) -> None:
        self._datapath = datapath

    @property
    def name(self) -> str:
        return "oe"

    async def start(self, config: OeConfig) -> None:
        log.warning("OE is off: %s", self._datapath)

    async def reload(self, config: OeConfig) -> None:
        return None

    async def stop(self) -> None:
        return None

    def status(self) -> StatusContribution:
        return StatusContribution(datapath=self._datapath)


class _IkeWithNegotiator:
    """The IKE service plus its OE negotiator adapter, stopped together (queued SA events)."""

    def __init__(self, ike: IkeService, negotiator: IkeNegotiator) -> None:
        self.ike = ike
        self.negotiator = negotiator

    @property
    def name(self) -> str:
        return self.ike.name

    async def start(self, config: OeConfig) -> None:
        self.negotiator.cat = config.ike.cat
        try:
            await self.ike.start(config)
        except OSError as exc:
            raise ServiceError(f"IKE sockets on {', '.join(self.ike.addresses)}: {exc}") from None

    async def reload(self, config: OeConfig) -> None:
        self.negotiator.cat = config.ike.cat  # for IKE SAs from now on
        await self.ike.reload(config)

    async def stop(self) -> None:
        await self.ike.stop()
        await asyncio.sleep(0)
        await self.negotiator.stop()

    async def warm(self) -> None:
        await self.ike.warm()

    def status(self) -> StatusContribution:
        return self.ike.status()

    def register_commands(self, commands: CommandTable) -> None:
        self.ike.register_commands(commands)


def _userspace_datapath(
    config: OeConfig, plat: Platform, ike: IkeService, offload: OffloadService, offer: EspOffer
) -> DatapathFactory:
    """The userspace datapath, made once: IKE's NAT-T socket shares UDP 4500 with it (the
    socket hooks), IKE always asks for UDP encapsulation (the workers receive ESP only
    there), and the workers get the offload layer's engine choice."""
    from oe_router.datapath.userspace import UserspaceDatapath

    dp = UserspaceDatapath(
        wan_ifname=plat.wan_devices[0] if plat.wan_devices else "wan",
        reason=plat.datapath_reason,
        on_canary_failure=offload.report_failure,
    )
    ike.socket_hooks += (dp,)
    ike.force_udp_encap = True
    offer.attach_userspace(dp)

    def make(cfg: OeConfig) -> Datapath:
        dp.keep_persistent_on_stop = cfg.keep_private_on_stop
        return dp

    return make


def build_services(
    config: OeConfig,
    tunnels: TunnelRequester | None = None,
    platform: Platform | None = None,
    events: Events | None = None,
    capture: DnsCapture | None = None,
) -> ServiceRegistry:
    """The daemon's services in start order: oe (datapath + OE manager), ike, dns.

    Implementations are chosen from what ``platform`` (probed when None) found: no
    WAN address means no IKE and no OE; no kernel ESP means IKE without a datapath
    (SAs are negotiated, not installed). Either way ``oe status`` names the reason.
    ``tunnels`` overrides the DNS front's tunnel requester (tests); by default it is
    the OE service. ``events`` gets ``oe.tunnel.up``/``down`` (every Child SA of the IKE
    service) and ``oe.shunt`` (the OE service's shunts). ``capture`` is the DNS front's
    redirect of this machine's outgoing DNS (the daemon's own; tests leave it None).
    """
    plat = probe_platform(config) if platform is None else platform
    registry = ServiceRegistry()
    oe: OeService | None = None
    ike: IkeService | None = None
    dns_service: DnsService | None = None
    # first: software is proven (a quick KAT) before any SA; the rest comes in the background
    # reads offload_canary at start and at every reload; on the kernel datapath only the
    # kernel's own pick is measured (the proposal order), the rest on request
    # kernel ESP runs on the kernel's own pick (afalg), never chosen by the table: the
    # canary checks it anyway
    kernel = plat.datapath == "kernel"
    offload = OffloadService(
        measure_only=("afalg",) if kernel else None, canary_engines=("afalg",) if kernel else ()
    )
    registry.add(offload)
    if not plat.wan:
        registry.add(StatusOnly(f"none ({plat.wan_reason or 'no WAN address'})"))
    else:
        ike = IkeService([str(a) for a in plat.wan.values()], socket_hooks=(XfrmSocketHooks(),))
        if plat.datapath in ("kernel", "userspace"):
            offer = EspOffer(ike, offload, plat.datapath)
            factory: DatapathFactory
            if plat.datapath == "userspace":
                factory = _userspace_datapath(config, plat, ike, offload, offer)
            else:
                factory = kernel_datapath(
                    reason=plat.datapath_reason,
                    wan_devices=plat.wan_devices,
                    wan4=plat.wan.get(4),
                    lan=plat.lan,
                    wan6=plat.wan.get(6),
                )
            registry.add(offer)
            negotiator = IkeNegotiator(ike)
            oe = OeService(
                datapath_factory=factory,
                negotiator=negotiator,
                wan=plat.wan,
                lan=plat.lan,
                dns_upstream=plat.dns_upstream,
                nft=apply_nft,  # the LAN gateway's SNAT table (oe/lan.py)
                wan_devices=plat.wan_devices,
            )
            negotiator.inbound = oe
            ike.inbound_filter = oe.refuses_peer
            oe.engine_of = offer.engine_for
            oe.offer = offer  # negotiations wait for a first transform; moves off withdrawn ones
            offer.listeners.append(oe.offer_changed)
            registry.add(oe)
            registry.add(_IkeWithNegotiator(ike, negotiator))
        else:
            registry.add(StatusOnly(f"none ({plat.datapath_reason}; SAs are not installed)"))
            registry.add(ConfiguredEspOffer(ike))  # esp_proposal still says what IKE offers
            registry.add(ike)
        if events is not None:
            ike.sink = TunnelEvents(ike.sink, events)
            if oe is not None:
                oe.events = events
    if dns_wanted(config):
        access = LanAccess(
            lan=plat.lan,
            wan_addresses=plat.wan_addresses or tuple(plat.wan.values()),
            lan_interface=plat.lan_device,
            wan_devices=plat.wan_devices,
        )
        dns_service = DnsService(
            tunnels=tunnels if tunnels is not None else oe, access=access, capture=capture
        )
        registry.add(dns_service)
    elif config.dns.trust_anchor:
        log.warning(
            "DNS front off: no trust anchor at %s (oe.dns.trust_anchor)", config.dns.trust_anchor
        )
    else:
        log.warning(
            "DNS front off: no trust anchor: neither %s (oe.dns.auto_trust_anchor) nor the"
            " IANA root anchors shipped with oe-router exist",
            config.dns.auto_trust_anchor,
        )
    if ike is not None:
        # A signing initiator we hold no key for: its FQDN identity's IPSECKEY, through
        # the DNS front's validator, cache and bogus memory (none without a trust anchor).
        front = dns_service

        def key_lookup() -> KeyLookup | None:
            resolver = front.resolver if front is not None else None
            return resolver.key_lookup if resolver is not None else None

        ike.peer_key_lookup = IdentityKeys(key_lookup)
    return registry


def _octal(text: str) -> int:
    try:
        value = int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an octal mode: {text!r}") from None
    if not 0 <= value <= 0o777:
        raise argparse.ArgumentTypeError(f"mode out of range: {text!r}")
    return value


def _help_formatter(prog: str) -> argparse.HelpFormatter:
    """argparse's formatter, told the width as ``shutil.get_terminal_size`` finds it
    ($COLUMNS, the terminal, else 80): left to find it itself, argparse imports shutil
    (with bz2, lzma: ~0.7 MB of RSS for the daemon's whole life, docs/footprint.md)."""
    try:
        columns = int(os.environ.get("COLUMNS", ""))
    except ValueError:
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
        except (AttributeError, ValueError, OSError):
            columns = 0
    return argparse.HelpFormatter(prog, width=(columns or 80) - 2)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Opportunistic IPsec router daemon.",
        formatter_class=_help_formatter,
    )
    parser.add_argument("--config", type=Path, default=Path(DEFAULT_CONFIG_PATH), metavar="FILE")
    parser.add_argument(
        "--foreground",
        action="store_true",
        default=True,
        help="run in the foreground (the default and only mode: procd supervises)",
    )
    parser.add_argument("--socket", type=Path, metavar="PATH", help="control socket path")
    parser.add_argument(
        "--socket-mode", type=_octal, default=0o600, metavar="MODE", help="octal, default 0600"
    )
    parser.add_argument(
        "--ubus-socket",
        metavar="PATH",
        help="ubusd's socket for the ubus object oe (default: libubus's, /var/run/ubus/ubus.sock)",
    )
    parser.add_argument("--no-ubus", action="store_true", help="do not register the ubus object oe")
    parser.add_argument(
        "--dhcp-leases",
        type=Path,
        default=Path(DEFAULT_LEASES),
        metavar="FILE",
        help=f"dnsmasq's lease file: MACs and hostnames in oe devices (default {DEFAULT_LEASES})",
    )
    parser.add_argument(
        "--syslog",
        nargs="?",
        const=DEV_LOG,
        metavar="PATH",
        help=f"log to syslog (logd) at each line's priority through PATH (default {DEV_LOG});"
        " without it, lines go to stderr",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None, hups: list[int] | None = None) -> int:
    """Run the daemon; ``hups`` holds the SIGHUPs taken before this module was imported
    (oe_router.routerd, the entry point). Until the loop's handler is installed, a HUP
    (procd's reload right after starting us) is remembered, never the default action that
    ends the process, and becomes a reload once the services run."""
    early: list[int] = [] if hups is None else hups
    signal.signal(signal.SIGHUP, lambda signum, frame: early.append(signum))
    args = parse_args(argv)
    root = configure_logging(syslog=args.syslog)
    config_path: Path = args.config.absolute()
    try:
        config = load_config(config_path)
    except ConfigInvalid as exc:
        for problem in exc.problems:
            log.error("%s", problem)
        log.error(
            "cannot start: %s has %d problem(s); run 'oe config check %s'",
            config_path,
            len(exc.problems),
            config_path,
        )
        return 1
    except OSError as exc:
        log.error("cannot start: cannot read %s: %s", config_path, exc.strerror or exc)
        return 1
    root.setLevel(level_from_name(config.log_level))
    socket_path = args.socket if args.socket is not None else Path(config.control_socket)
    events = Events()

    def build(cfg: OeConfig, plat: Platform) -> ServiceRegistry:
        # a new capture per build: the services they replace stop (and drop theirs) first
        return build_services(cfg, platform=plat, events=events, capture=DnsCapture())

    platform = probe_platform(config)
    daemon = Daemon(
        config_path=config_path,
        config=config,
        registry=build(config, platform),
        socket_path=socket_path,
        socket_mode=args.socket_mode,
        on_config=lambda c: root.setLevel(level_from_name(c.log_level)),
        early_hups=early,
        platform=platform,
        network=probe_network,
        build=build,
        forget_flows=forget_address,
        read_flows=read_flows,
        leases=args.dhcp_leases,
    )
    if not args.no_ubus:
        daemon.ubus = UbusShim(daemon.commands, args.ubus_socket, events=events)
    daemon.adopt_commands()  # oe up / oe down, flush
    try:
        return asyncio.run(daemon.run())
    except SocketBindError as exc:
        log.error("cannot start: %s", exc)
        return 1
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
