"""The DNS front as a daemon ``Service``: start, reload, stop and ``oe status`` counters.

Why here and not in daemon.py: the daemon only knows the Service protocol. This
module turns ``config dns`` into listeners, an upstream client, a key lookup and
a hold policy, and applies a reload without dropping the old listeners until the
new ones are bound (a refused reload keeps the old ones running).
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from oe_router.config.schema import DnsConfig, Endpoint, OeConfig
from oe_router.control.status import StatusContribution, TrustAnchorStatus
from oe_router.dns.access import LanAccess
from oe_router.dns.anchors import Timers
from oe_router.dns.autotrust import ManagedAnchors, seed_exists, timers_from_environ
from oe_router.dns.capture import CAPTURE_MARK, DnsCapture
from oe_router.dns.dnssec import TrustAnchorError, TrustAnchors, load_trust_anchor_file
from oe_router.dns.front import AnswerCache, DnsFront, FrontBindError, FrontStats, Resolver
from oe_router.dns.hold import HoldPolicy, KeyLookup, TunnelRequester
from oe_router.dns.keylookup import Resolving, ValidatingKeyLookup
from oe_router.dns.upstream import (
    ResolvConfSource,
    StaticSource,
    UpstreamClient,
    UpstreamSettings,
    UpstreamStats,
)
from oe_router.services import ServiceError

__all__ = ["DnsService", "KeyLookupFactory", "dns_wanted", "validating_key_lookup"]

log = logging.getLogger("oe_router.dns.service")

#: Builds the KeyLookup for a config; raises ValueError naming the option on bad input.
KeyLookupFactory = Callable[[DnsConfig, UpstreamClient], KeyLookup | None]


def dns_wanted(config: OeConfig) -> bool:
    """Whether the daemon runs the DNS front: whenever it has a trust anchor.

    Why: without an anchor not one IPSECKEY can be validated. A fixed
    ``oe.dns.trust_anchor`` must be a file (a router pointed at a missing one has not
    been set up for DNS-triggered OE; the packet-triggered path still works). Not set
    (the default), the managed anchors of ``oe.dns.auto_trust_anchor`` are used, seeded
    from the IANA anchors shipped with the package: the front runs out of the box.
    ``config dns`` has no ``enabled`` option yet; when it gets one, it decides here.
    Once started, a missing fixed anchor on reload is a ServiceError naming
    ``oe.dns.trust_anchor``.
    """
    dns = config.dns
    if dns.trust_anchor:
        return os.path.isfile(dns.trust_anchor)
    return os.path.isfile(dns.auto_trust_anchor) or seed_exists()


def validating_key_lookup(config: DnsConfig, upstream: UpstreamClient) -> KeyLookup:
    """The KeyLookup of a fixed anchor: DNSSEC from the file ``oe.dns.trust_anchor``."""
    if not os.path.isfile(config.trust_anchor):
        raise ValueError(
            f"oe.dns.trust_anchor: {config.trust_anchor} does not exist; install the root"
            " trust anchor (DS or DNSKEY records) there or point the option at one"
        )
    try:
        anchors = load_trust_anchor_file(config.trust_anchor)
    except TrustAnchorError as exc:
        raise ValueError(f"oe.dns.trust_anchor: {exc}") from None
    return ValidatingKeyLookup(anchors, upstream)


def _source(config: DnsConfig) -> StaticSource | ResolvConfSource:
    if config.upstream:
        return StaticSource(config.upstream)
    return ResolvConfSource(config.resolv_file, exclude=config.listen)


class DnsService:
    """Service ``dns``: the LAN-facing resolver that holds A/AAAA answers.

    ``tunnels`` is the OE manager (None until it exists: keyed answers go out
    clear). ``key_lookup_factory`` defaults to DNSSEC validation from the trust
    anchor: the fixed file ``trust_anchor``, or else the RFC 5011-managed anchors of
    ``auto_trust_anchor`` (``managed``: probed on this loop, ``anchor_timers`` from the
    environment by default, see autotrust.py); tests pass their own. ``access`` is what
    the daemon's platform probe found of the LAN and the WAN (access.py); the default
    knows neither, so a non-loopback listener answers loopback clients only.
    ``capture`` redirects this machine's outgoing DNS to the front while it runs, in
    ``oe.dns.mode`` 'dnsmasq' (capture.py); None (tests, the default) never captures.
    """

    name = "dns"

    def __init__(
        self,
        tunnels: TunnelRequester | None = None,
        key_lookup_factory: KeyLookupFactory | None = None,
        upstream_settings: UpstreamSettings | None = None,
        cache_entries: int = 4096,
        clock: Callable[[], float] = time.monotonic,
        access: LanAccess | None = None,
        anchor_timers: Timers | None = None,
        wall_clock: Callable[[], float] = time.time,
        capture: DnsCapture | None = None,
    ) -> None:
        self._tunnels = tunnels
        self.capture = capture
        self.access = access or LanAccess()
        self._factory = key_lookup_factory
        self._anchor_timers = anchor_timers
        self._wall_clock = wall_clock
        #: the RFC 5011 trust point in use (None: a fixed anchor file, or a test's lookup)
        self.managed: ManagedAnchors | None = None
        self._settings = upstream_settings or UpstreamSettings()
        self._cache_entries = cache_entries
        self._clock = clock
        self.stats = FrontStats()
        self.upstream_stats = UpstreamStats()
        self._config: DnsConfig | None = None
        self._front: DnsFront | None = None
        self.resolver: Resolver | None = None
        self._started_at = 0.0

    @property
    def bound(self) -> tuple[Endpoint, ...]:
        """Where the front listens (the real ports when the config said 0)."""
        return self._front.bound if self._front is not None else ()

    def _parts(
        self, config: DnsConfig
    ) -> tuple[UpstreamClient, KeyLookup | None, ManagedAnchors | None]:
        settings = self._settings
        if self._captures(config):
            settings = replace(settings, mark=self.capture.mark if self.capture else CAPTURE_MARK)
        upstream = UpstreamClient(_source(config), settings, self.upstream_stats)
        managed: ManagedAnchors | None = None
        try:
            if self._factory is not None:
                key_lookup = self._factory(config, upstream)
            elif config.trust_anchor:
                key_lookup = validating_key_lookup(config, upstream)
            else:
                managed = self._managed_for(config)
                key_lookup = ValidatingKeyLookup(managed.anchors, upstream)
        except ValueError as exc:
            raise ServiceError(str(exc)) from None
        return upstream, key_lookup, managed

    def _captures(self, config: DnsConfig) -> bool:
        return self.capture is not None and config.mode == "dnsmasq"

    def _update_capture(self, config: DnsConfig) -> None:
        """Capture on (mode 'dnsmasq') at the listeners bound now, or off."""
        if self.capture is None:
            return
        if self._captures(config):
            self.capture.start(self.bound)
        else:
            self.capture.stop(f"oe.dns.mode is '{config.mode}'")

    def _managed_for(self, config: DnsConfig) -> ManagedAnchors:
        """The trust point kept in ``auto_trust_anchor``: the running one if it is that file."""
        if self.managed is not None and self.managed.path == Path(config.auto_trust_anchor):
            return self.managed
        timers = self._anchor_timers or timers_from_environ()
        return ManagedAnchors(config.auto_trust_anchor, timers, clock=self._wall_clock)

    async def _use_anchors(self, managed: ManagedAnchors | None) -> None:
        """Probe ``managed`` from now on (and no longer the one before)."""
        if managed is self.managed:
            return
        previous, self.managed = self.managed, managed
        if previous is not None:
            await previous.stop()
        if managed is not None:
            managed.listeners.append(self._anchors_changed)
            managed.start(self._current_upstream)

    def _current_upstream(self) -> Resolving | None:
        upstream = self.resolver.upstream if self.resolver is not None else None
        return upstream if isinstance(upstream, UpstreamClient) else None

    def _anchors_changed(self, anchors: TrustAnchors) -> None:
        """RFC 5011 moved a key: the key lookup validates from the new trusted keys."""
        lookup = self.resolver.key_lookup if self.resolver is not None else None
        if isinstance(lookup, ValidatingKeyLookup):
            lookup.set_anchors(anchors)

    def _build(self, config: DnsConfig) -> tuple[Resolver, ManagedAnchors | None]:
        upstream, key_lookup, managed = self._parts(config)
        resolver = Resolver(
            upstream,
            HoldPolicy.from_config(config),
            key_lookup=key_lookup,
            tunnels=self._tunnels,
            cache=AnswerCache(self._cache_entries, max_ttl=_cache_ttl(config)),
            stats=self.stats,
            doh_canary=config.doh_canary,
        )
        return resolver, managed

    def _new_front(self, config: DnsConfig) -> DnsFront:
        for endpoint in config.listen:
            problem = self.access.listen_problem(endpoint)
            if problem is not None:
                raise ServiceError(f"oe.dns.listen: {problem}")
        if not self.access.lan and any(
            not self.access.open_listener(e.host) for e in config.listen
        ):
            log.warning(
                "oe.dns.listen: no LAN prefixes known (oe.global.lan_interface %r has no"
                " global address): only loopback clients are answered",
                self.access.lan_interface,
            )
        return DnsFront(
            self._handle,
            tcp_idle=config.tcp_timeout,
            fast=self._fast,
            access=self.access,
            stats=self.stats,
        )

    async def start(self, config: OeConfig) -> None:
        dns_config = config.dns
        resolver, managed = self._build(dns_config)
        front = self._new_front(dns_config)
        self.resolver = resolver
        try:
            await front.start(dns_config.listen)
        except FrontBindError as exc:
            self.resolver = None
            raise ServiceError(f"oe.dns.listen: {exc.strerror}") from None
        self._front = front
        self._config = dns_config
        self._started_at = self._clock()
        self._update_capture(dns_config)  # the front answers: now its queries may come
        await self._use_anchors(managed)

    async def reload(self, config: OeConfig) -> None:
        new = config.dns
        old = self._config
        if old is None or new == old:
            return
        upstream, key_lookup, managed = self._parts(new)  # refuses before anything changes
        if new.listen != old.listen:
            front = self._new_front(new)
            try:
                await front.start(new.listen)
            except FrontBindError as exc:
                if exc.errno != errno.EADDRINUSE or self._front is None:
                    raise ServiceError(f"oe.dns.listen: {exc.strerror}") from None
                await self._hand_over(front, new.listen, old.listen)
            else:
                previous, self._front = self._front, front
                if previous is not None:
                    await previous.stop()
        elif self._front is not None:
            self._front.tcp_idle = self._front.tcp_write = new.tcp_timeout
        resolver = self.resolver
        if resolver is not None:
            # in place: answers held right now keep their negotiation and timers
            resolver.upstream = upstream
            resolver.key_lookup = key_lookup
            resolver.policy = HoldPolicy.from_config(new)
            resolver.cache = AnswerCache(self._cache_entries, max_ttl=_cache_ttl(new))
            resolver.doh_canary = new.doh_canary
        await self._use_anchors(managed)
        self._config = new
        self._update_capture(new)
        log.info("DNS front reloaded")

    async def _hand_over(
        self, front: DnsFront, listen: tuple[Endpoint, ...], previous: tuple[Endpoint, ...]
    ) -> None:
        """The new listen addresses overlap the old ones (``0.0.0.0:53`` after
        ``192.168.1.1:53``: the kernel refuses both at once), so the old listeners go
        first; if the new ones still cannot be bound, the old ones come back."""
        assert self._front is not None
        await self._front.stop()
        try:
            await front.start(listen)
        except FrontBindError as exc:
            try:
                await self._front.start(previous)
            except FrontBindError as again:
                log.error("DNS front: cannot listen again on the old addresses: %s", again)
            raise ServiceError(f"oe.dns.listen: {exc.strerror}") from None
        self._front = front

    async def stop(self) -> None:
        if self.capture is not None:
            self.capture.stop()  # first: dnsmasq's next query goes to its upstreams
        await self._use_anchors(None)
        if self._front is not None:
            await self._front.stop()
            self._front = None
        if self.resolver is not None:
            await self.resolver.close()
            self.resolver = None
        self._config = None

    async def _handle(self, wire: bytes, client: tuple[str, int], limit: int) -> bytes | None:
        resolver = self.resolver
        if resolver is None:
            return None
        if limit == 65535:
            self.stats.tcp += 1
        else:
            self.stats.udp += 1
        return await resolver.handle(wire, client, limit)

    def _fast(self, wire: bytes, limit: int) -> bytes | None:
        resolver = self.resolver
        if resolver is None:
            return None
        reply = resolver.answer_now(wire, limit)
        if reply is not None:
            self.stats.udp += 1
        return reply

    def status(self) -> StatusContribution:
        config = self._config
        doc: dict[str, object] = dict(self.stats.to_json())
        doc.update(self.upstream_stats.to_json())
        if self.capture is not None:
            doc["capture"] = self.capture.describe()
        elif config is not None:
            doc["capture"] = "off: not run by the daemon"
        if config is not None and self.resolver is not None:
            upstream = self.resolver.upstream
            doc["listen"] = [str(e) for e in self.bound]
            doc["lan_prefixes"] = [str(n) for n in self.access.lan]
            doc["tcp_clients_now"] = self._front.tcp_clients if self._front is not None else 0
            if isinstance(upstream, UpstreamClient):
                doc["upstreams"] = [str(e) for e in upstream.servers()]
                doc["upstream_source"] = upstream.source.describe()
            doc["hold_limit_s"] = config.hold_limit
            doc["ttl_cap_s"] = config.ttl_cap
            doc["bogus_action"] = config.bogus_action
            doc["keyless"] = config.keyless
            doc["ipseckey_trigger"] = "on" if self.resolver.key_lookup is not None else "off"
            doc["oe_manager"] = "connected" if self._tunnels is not None else "none"
            doc["held_now"] = self.resolver.core.in_flight
            doc["negotiations_now"] = self.resolver.core.negotiations
            doc["cache_entries"] = len(self.resolver.cache) if self.resolver.cache else 0
            if self.managed is not None:
                doc.update(self.managed.describe())
            elif config.trust_anchor:
                doc["trust_anchor"] = f"file {config.trust_anchor}"
        rows = self.managed.point.rows() if self.managed is not None else []
        anchors = tuple(TrustAnchorStatus.from_json(r) for r in rows)
        return StatusContribution(dns=doc, trust_anchors=anchors)


def _cache_ttl(config: DnsConfig) -> int:
    return int(config.ttl_cap) if config.ttl_cap > 0 else 86400
