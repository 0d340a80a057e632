"""The IKE manager: a daemon ``Service`` holding one IKE SA per peer and its Child SAs.

Why one IKE SA per peer: the LAN devices behind the router all reach a peer through
the router's own address, so they share one IKE SA and get one Child SA each.
An IKE SA per device would look like a flood to the peer (strongSwan demands
cookies after three half-open SAs from one address).

The manager owns the ``IkeEndpoint`` (sockets, timers) and turns control
commands into IKE SAs: ``up`` resolves when the IKE SA and its first Child SA
are up, or raises ``IkeUpError`` saying why not; ``down`` deletes with the peer.
Incoming IKE is answered by the responder policy: NULL-auth OE by default, the
peer's key when one is known, and containment (a peer only ever gets selectors for
its own address). Its collaborators each own one concern: ``peers.PeerTable`` the
IKE SAs held and what their events do (Child SAs to the ``ChildSaSink``, waiters
settled), ``identity.LocalIdentity`` our identity and key, ``status_view`` the
``oe status`` rows, ``commands.IkeCommands`` the ``up``/``down`` control commands.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict
from typing import Literal

from oe_router.config.schema import OeConfig
from oe_router.control.protocol import CommandTable
from oe_router.control.status import StatusContribution, TunnelStatus
from oe_router.ratelimit import RateLimit

from .auth import PrivateKey, PublicKey
from .commands import IkeCommands
from .constants import IdType
from .endpoint import Address, IkeEndpoint, SaHandle
from .errors import IkeError
from .events import ChildSaEstablished, Event, IkeSaFailed, PeerKeyNeeded
from .identity import LocalIdentity, load_private_key, load_public_key, parse_identity
from .payloads import TrafficSelector
from .peer_keys import PeerKeyLookup, PeerKeyLookups
from .peers import ChildSaSink, IkeUpError, PeerSa, PeerTable, RecordingSink, log_limited
from .sa import (
    DEFAULT_ESP_PROPOSALS,
    DEFAULT_IKE_PROPOSALS,
    EspProposalSpec,
    IkeProposalSpec,
    IkeSaConfig,
)
from .selectors import host_selector
from .sockets import SocketHooks
from .states import ChildState, IkeState
from .status_view import mismatch_rows, tunnel_rows

__all__ = [
    "REKEY_REFUSED",
    "AuthChoice",
    "ChildSaSink",
    "IkeService",
    "IkeUpError",
    "PeerSa",
    "RecordingSink",
    "any_selector",
    "host_selector",
    "load_private_key",
    "load_public_key",
    "parse_identity",
]

log = logging.getLogger("oe_router.ike")

AuthChoice = Literal["null", "pubkey"]


def any_selector(address: str) -> TrafficSelector:
    """Every address of ``address``'s family (0.0.0.0/0 or ::/0)."""
    ip = ipaddress.ip_address(address)
    return TrafficSelector.for_network(f"{ip}/0")


#: ``IkeService.rekey_child``: the peer answered the rekey with a refusal
REKEY_REFUSED = "the peer refused the rekey"


# --------------------------------------------------------------------------- the service


class IkeService:
    """Daemon ``Service`` "ike": the endpoint plus the per-peer IKE SA table.

    ``addresses`` are the local addresses to bind (the WAN addresses); ports are
    configurable for tests. ``private_key`` overrides ``identity.private_key``
    from the config; ``peer_keys`` are peers' public keys known up front (by
    address); both may also come from ``up``.
    """

    def __init__(
        self,
        addresses: Iterable[str],
        *,
        sink: ChildSaSink | None = None,
        clock: Callable[[], float] = time.monotonic,
        ike_port: int = 500,
        natt_port: int = 4500,
        remote_ike_port: int = 500,
        remote_natt_port: int = 4500,
        private_key: PrivateKey | None = None,
        local_id: str | None = None,
        peer_keys: Mapping[str, PublicKey] | None = None,
        ike_proposals: tuple[IkeProposalSpec, ...] = DEFAULT_IKE_PROPOSALS,
        esp_proposals: tuple[EspProposalSpec, ...] = DEFAULT_ESP_PROPOSALS,
        keepalive_interval: float = 20.0,
        netns: str | None = None,
        up_timeout: float = 30.0,
        random: Callable[[int], bytes] = os.urandom,
        socket_hooks: Sequence[SocketHooks] = (),
        force_udp_encap: bool = False,
    ) -> None:
        self.addresses = tuple(str(ipaddress.ip_address(a)) for a in addresses)
        self._clock = clock
        self._ports = (ike_port, natt_port)
        self.remote_ike_port = remote_ike_port
        self.remote_natt_port = remote_natt_port
        self._identity = LocalIdentity(private_key, local_id)
        self.peer_keys: dict[str, PublicKey] = dict(peer_keys or {})
        # Who may start IKE with us: peer address -> None, or why not (the OE policy groups).
        self.inbound_filter: Callable[[str], str | None] | None = None
        #: the key of a signing initiator's FQDN identity when we hold none for its
        #: address (daemon.py: the DNS front's DNSSEC validator); None: refuse it
        self.peer_key_lookup: PeerKeyLookup | None = None
        self.key_lookups = PeerKeyLookups(
            lambda: self.peer_key_lookup,
            lambda h: self._ep().flush(h),
            lambda h: self.endpoint is not None and h in self.endpoint.handles(),
            clock,
            timeout=10.0,
        )
        self.ike_proposals = ike_proposals
        #: ESP transforms in preference order; the offload layer may replace them
        #: (new IKE SAs and Child SAs use the new order).
        self.esp_proposals = esp_proposals
        self.keepalive_interval = keepalive_interval
        self._netns = netns
        self.up_timeout = up_timeout
        self._random = random
        #: the datapaths' hooks on our sockets, applied in order (XFRM bypass and
        #: ESP-in-UDP; the userspace datapath shares UDP 4500): the composition root's
        self.socket_hooks: tuple[SocketHooks, ...] = tuple(socket_hooks)
        #: ESP always in UDP 4500 (a datapath that only receives ESP there needs it)
        self.force_udp_encap = force_udp_encap
        self.config = OeConfig()
        self.endpoint: IkeEndpoint | None = None
        self.peers = PeerTable(
            sink if sink is not None else RecordingSink(), clock, lambda h: self._ep().forget(h)
        )
        self._refusals = RateLimit()  # one line per 10 s, however many requests

    @property
    def name(self) -> str:
        return "ike"

    @property
    def sas(self) -> list[PeerSa]:
        """Every IKE SA we hold (``PeerTable``)."""
        return self.peers.sas

    @sas.setter
    def sas(self, sas: list[PeerSa]) -> None:
        self.peers.sas = sas

    @property
    def sink(self) -> ChildSaSink:
        """Where Child SAs go; the OE negotiator or the daemon's event relay plugs in."""
        return self.peers.sink

    @sink.setter
    def sink(self, sink: ChildSaSink) -> None:
        self.peers.sink = sink

    @property
    def private_key(self) -> PrivateKey | None:
        return self._identity.private_key

    @property
    def key_note(self) -> str:
        """Where our key came from, or why there is none."""
        return self._identity.key_note

    def now(self) -> float:
        """The service's clock (what ``IkeSa`` commands take as ``now``)."""
        return self._clock()

    # ------------------------------------------------------------------ lifecycle
    def _load_key(self, config: OeConfig) -> None:
        self._identity.load(config)

    async def start(self, config: OeConfig) -> None:
        self.config = config
        self._load_key(config)
        ike = config.ike
        self.endpoint = IkeEndpoint(
            self.addresses,
            on_event=self._on_event,
            responder_policy=self._responder_config,
            clock=self._clock,
            ike_port=self._ports[0],
            natt_port=self._ports[1],
            half_open_limit=ike.half_open_limit,
            half_open_per_source=ike.half_open_per_source,
            half_open_per_prefix=ike.half_open_per_prefix,
            keepalive_interval=self.keepalive_interval,
            dpd_delay=ike.dpd_delay,
            netns=self._netns,
            random=self._random,
            socket_hooks=self.socket_hooks,
        )
        await self.endpoint.start()

    async def warm(self, timeout: float = 10.0) -> float | None:
        """Negotiate one IKE SA and its Child SA between two throwaway endpoints on the
        loopback, with this service's proposals and key; the seconds it took, or None if
        it could not (no loopback in the namespace, say: logged at debug).

        Why: the first negotiation of a run pays first-use costs that later ones do not:
        cryptography's OpenSSL backend module (imported by the first X25519 key), the
        ``__init__`` of each message record (``records``), OpenSSL's curve tables. On the
        lab's TCG router the first cold connect took 476-601 ms and the next ones
        112-200 ms (docs/footprint.md). The daemon calls this once every service has
        started, so a LAN device's first flow does not wait for it. Nothing of it reaches
        the peer table, the counters or the kernel; the random source is the OS's, not a
        test's.
        """
        if self.config is None:
            return None
        loop = asyncio.get_running_loop()
        done: asyncio.Future[bool] = loop.create_future()

        def on_event(handle: SaHandle, ev: Event) -> None:
            if isinstance(ev, ChildSaEstablished | IkeSaFailed) and not done.done():
                done.set_result(isinstance(ev, ChildSaEstablished))

        key = self.private_key
        auth: AuthChoice = "pubkey" if key is not None else "null"
        own_key = key.public_key() if key is not None else None

        def responder(local: Address, remote: Address) -> IkeSaConfig:
            return self._sa_config(local, remote, auth, own_key, True)

        ends = [
            IkeEndpoint(["127.0.0.1"], on_event=on_event, clock=self._clock, ike_port=0,
                        natt_port=0, netns=self._netns),
            IkeEndpoint(["127.0.0.1"], on_event=lambda h, e: None, responder_policy=responder,
                        clock=self._clock, ike_port=0, natt_port=0, netns=self._netns),
        ]  # fmt: skip
        started = time.monotonic()
        try:
            for end in ends:
                await end.start()
            ini, res = ends
            local, remote = ("127.0.0.1", ini.ike_port), ("127.0.0.1", res.ike_port)
            ini.initiate(self._sa_config(local, remote, auth, own_key, True),
                         remote_natt_port=res.natt_port)  # fmt: skip
            async with asyncio.timeout(timeout):
                ok = await done
        except (OSError, IkeError, TimeoutError) as exc:
            log.debug("IKE warm-up on the loopback: not done (%s)", exc or type(exc).__name__)
            return None
        finally:
            for end in ends:
                await end.stop()
        took = time.monotonic() - started
        log.debug("IKE warm-up on the loopback: %s in %.3f s", "done" if ok else "failed", took)
        return took if ok else None

    async def reload(self, config: OeConfig) -> None:
        """New timers and identity apply to IKE SAs created from now on; the endpoint's
        half-open limits to the next IKE_SA_INIT request, its liveness delay at once."""
        old = self.config
        self.config = config
        try:
            self._load_key(config)
        except IkeError:
            self.config = old
            self._load_key(old)
            raise
        if self.endpoint is not None:
            ike = config.ike
            self.endpoint.configure(
                half_open_limit=ike.half_open_limit,
                half_open_per_source=ike.half_open_per_source,
                half_open_per_prefix=ike.half_open_per_prefix,
                dpd_delay=ike.dpd_delay,
            )

    async def stop(self) -> None:
        await self.key_lookups.stop()
        if self.endpoint is None:
            return
        for p in list(self.sas):
            if p.state == IkeState.ESTABLISHED:
                with contextlib.suppress(IkeError):
                    self.endpoint.delete(p.handle)
        await asyncio.sleep(0)
        await self.endpoint.stop()
        for p in list(self.sas):
            self.peers.drop(p, "IKE service stopped")
        self.endpoint = None

    def _on_event(self, handle: SaHandle, ev: Event) -> None:
        """The endpoint's listener: key lookups here, everything else to the peer table."""
        if isinstance(ev, PeerKeyNeeded):
            self.key_lookups.needed(handle, ev)
        else:
            self.peers.on_event(handle, ev)

    def _ep(self) -> IkeEndpoint:
        if self.endpoint is None:
            raise IkeError("the IKE service is not running")
        return self.endpoint

    # ------------------------------------------------------------------ ESP offer
    def set_esp_proposals(self, proposals: tuple[EspProposalSpec, ...]) -> None:
        """Offer these ESP transforms from now on: new IKE SAs, and the Child SAs and
        rekeys of live ones (ours and what we accept from peers)."""
        self.esp_proposals = proposals
        for p in self.sas:
            sa = p.handle.sa
            if sa.config.esp_proposals != proposals:
                sa.config = dataclasses.replace(sa.config, esp_proposals=proposals)

    async def rekey_child(
        self,
        peer: str,
        spi_in: bytes,
        *,
        timeout: float,
        settle: float,
        clock: Callable[[], float] | None = None,
    ) -> str | None:
        """Rekey one Child SA now with the current ESP offer (CREATE_CHILD_SA, REKEY_SA).

        None once the old SA is on its way out (rekeyed, deleting, or gone with its IKE
        SA); ``REKEY_REFUSED`` when the peer refused (the Child SA is back to installed
        for ``settle`` seconds after rekeying: libreswan refuses a rekey that changes
        the algorithms, RFC 7296 §2.8); else why it could not be tried.
        """
        now = clock or self._clock
        ep = self.endpoint
        if ep is None:
            return "the IKE service is not running"
        p = next((p for p in self.sas if p.peer == peer and spi_in in p.children), None)
        if p is None:
            return f"no IKE SA with {peer} carries this Child SA"
        sa = p.handle.sa

        def state() -> ChildState | None:
            return next((c.state for c in sa.child_sas() if c.spi_in == spi_in), None)

        try:
            sa.rekey_child(spi_in, self.now())
        except IkeError as exc:
            if state() != ChildState.REKEYING:  # the core's own rekey may be on its way
                return f"cannot rekey it: {exc}"
        ep.flush(p.handle)
        seen, since = state() == ChildState.REKEYING, None
        deadline = now() + timeout
        while now() < deadline:
            current = state()
            if p not in self.sas or current not in (ChildState.INSTALLED, ChildState.REKEYING):
                return None
            if current == ChildState.REKEYING:
                seen, since = True, None
            elif seen:
                since = now() if since is None else since
                if now() - since >= settle:
                    return REKEY_REFUSED
            await asyncio.sleep(0.02)
        return f"no rekey within {timeout:g}s"

    # ------------------------------------------------------------------ configs
    def _local_for(self, peer: str) -> str:
        version = ipaddress.ip_address(peer).version
        for a in self.addresses:
            if ipaddress.ip_address(a).version == version:
                return a
        raise IkeUpError(f"peer {peer}: no local IPv{version} address to reach it from")

    def _local_id(self, auth: AuthChoice, local: str) -> tuple[int, bytes]:
        if auth == "null":
            return IdType.ID_NULL, b""
        text = self._identity.local_id(self.config)
        return parse_identity("%address" if text == "%null" else text, local)

    def _sa_config(
        self,
        local: Address,
        remote: Address,
        auth: AuthChoice,
        peer_key: PublicKey | None,
        transport: bool,
        inner: bool = False,
    ) -> IkeSaConfig:
        """``inner``: ask for an inner address (CP, for CAT): TSi then offers the whole
        address family besides our address, the range the peer narrows a lease from."""
        ike = self.config.ike
        # UCI gives the rekey margin in seconds and the jitter in percent of it; the
        # core wants fractions of the lifetime (the same for IKE and Child SAs).
        margin = min(0.4, ike.rekey_margin / max(ike.child_lifetime, 1.0))
        jitter = min(0.4, margin * ike.rekey_jitter / 100)
        local_ts: tuple[TrafficSelector, ...] = (host_selector(local[0]),)
        if inner:
            local_ts += (any_selector(local[0]),)
        return IkeSaConfig(
            local,
            remote,
            local_ts,
            (host_selector(remote[0]),),  # containment: only the peer's own address
            ike_proposals=self.ike_proposals,
            esp_proposals=self.esp_proposals,
            local_id=self._local_id(auth, local[0]),
            private_key=self.private_key if auth == "pubkey" else None,
            peer_public_key=peer_key,
            transport_mode=transport,
            # UCI counts sends of a request (docs/config.md); the core counts retransmissions
            # after the first send. Passing sends as retransmissions added one more doubling
            # wait: 4 tries gave up after 15.5 s, not the documented 7.5 s.
            retransmit_timeout=ike.retransmit_timeout,
            retransmit_tries=ike.retransmit_tries - 1,
            ike_lifetime=ike.ike_lifetime,
            child_lifetime=ike.child_lifetime,
            rekey_margin=margin,
            rekey_jitter=jitter,
            fragment_size=ike.fragment_size if ike.fragment_size else 65535,
            initial_contact=self.find(remote[0]) is None,
            request_internal_address=inner,
            force_udp_encap=self.force_udp_encap,
        )

    def _responder_config(self, local: Address, remote: Address) -> IkeSaConfig | None:
        """Answer anyone the inbound filter lets in: NULL-auth OE, or signatures when we
        know the peer's key. A refused peer gets no answer, so its own failure shunt (e.g.
        libreswan's pass for private-or-clear) takes over when it times out."""
        if self.inbound_filter is not None:
            reason = self.inbound_filter(remote[0])
            if reason is not None:
                msg = "IKE_SA_INIT from %s refused: %s"
                log_limited(self._refusals, self._clock(), logging.INFO, msg, remote[0], reason)
                return None
        peer_key = self.peer_keys.get(remote[0])
        local_id = self._identity.local_id(self.config)
        sign = self.private_key is not None and (peer_key is not None or local_id != "%null")
        cfg = self._sa_config(local, remote, "pubkey" if sign else "null", peer_key, True)
        if peer_key is None:  # a signing initiator's key may be looked up by its name
            timeout = self.key_lookups.timeout
            cfg = dataclasses.replace(cfg, lookup_peer_key=True, peer_key_timeout=timeout)
        return cfg

    # ------------------------------------------------------------------ commands
    def find(self, peer: str) -> PeerSa | None:
        """The best IKE SA with ``peer``: established first, then one in progress."""
        return self.peers.find(peer)

    async def resolve(self, peer: str) -> str:
        """An address, or a name resolved with the system resolver (first address)."""
        try:
            return str(ipaddress.ip_address(peer))
        except ValueError:
            pass
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(peer, None, type=2)  # SOCK_DGRAM
        except OSError as exc:
            raise IkeUpError(f"peer {peer}: cannot resolve ({exc})") from None
        families = {ipaddress.ip_address(a).version for a in self.addresses}
        for info in infos:
            addr = str(info[4][0])
            if ipaddress.ip_address(addr).version in families:
                return addr
        raise IkeUpError(f"peer {peer}: no address of a family we have")

    async def up(
        self,
        peer: str,
        auth: AuthChoice = "null",
        peer_key: PublicKey | None = None,
        *,
        transport: bool = False,
        inner: bool = False,
    ) -> PeerSa:
        """Bring up the IKE SA and its first Child SA with ``peer`` (reusing one that is up).

        ``inner``: a new IKE SA asks the peer for an inner address (CP, for CAT).
        """
        ep = self._ep()
        if auth not in ("null", "pubkey"):
            raise IkeUpError(f"auth {auth!r}: use null or pubkey")
        if auth == "pubkey" and self.private_key is None:
            raise IkeUpError(f"auth pubkey needs our private key ({self.key_note})")
        addr = await self.resolve(peer)
        if peer_key is not None:
            self.peer_keys[addr] = peer_key
        else:
            peer_key = self.peer_keys.get(addr)
        p = self.find(addr)
        if p is not None and p.state == IkeState.ESTABLISHED and not p.children:
            return await self._more_children(p, peer, transport)
        if p is None:
            local = self._local_for(addr)
            cfg = self._sa_config(
                (local, ep.ike_port),
                (addr, self.remote_ike_port),
                auth,
                peer_key,
                transport,
                inner,
            )
            try:
                handle = ep.initiate(cfg, remote_natt_port=self.remote_natt_port)
            except IkeError as exc:
                raise IkeUpError(f"peer {peer}: {exc}") from None
            p = self.peers.track(handle, addr, cfg)
        if p.state == IkeState.ESTABLISHED and p.children:
            return p
        assert p.done is not None
        try:
            async with asyncio.timeout(self.up_timeout):
                await asyncio.shield(p.done)
        except TimeoutError:
            raise IkeUpError(f"peer {peer}: no IKE SA after {self.up_timeout:.0f}s") from None
        if p.error is not None:
            raise IkeUpError(f"peer {peer}: {p.error}", p.notify, p.offers)
        if not p.children and p.child_error is not None:
            raise IkeUpError(f"peer {peer}: {p.child_error}", p.notify, p.offers)
        return p

    async def _more_children(self, p: PeerSa, peer: str, transport: bool) -> PeerSa:
        """A Child SA on the IKE SA we already have (CREATE_CHILD_SA), not a new IKE SA."""
        ep = self._ep()
        cfg = p.handle.sa.config
        try:
            rid = p.handle.sa.create_child(cfg.local_ts, cfg.remote_ts, transport, self._clock())
        except IkeError as exc:
            raise IkeUpError(f"peer {peer}: {exc}") from None
        fut: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        p.pending[rid] = fut
        ep.flush(p.handle)
        try:
            async with asyncio.timeout(self.up_timeout):
                error = await asyncio.shield(fut)
        except TimeoutError:
            raise IkeUpError(f"peer {peer}: no Child SA after {self.up_timeout:.0f}s") from None
        finally:
            p.pending.pop(rid, None)
        if error is not None:
            raise IkeUpError(f"peer {peer}: {error}", None, p.child_offers.pop(rid, None))
        return p

    async def down(self, peer: str, timeout: float = 3.0) -> int:
        """Delete every IKE SA with ``peer`` (telling it); returns how many there were."""
        ep = self._ep()
        addr = await self.resolve(peer)
        mine = [p for p in self.sas if p.peer == addr]
        waits = []
        for p in mine:
            if p.state == IkeState.ESTABLISHED:
                p.done = asyncio.get_running_loop().create_future()
                ep.delete(p.handle)
                waits.append(p.done)
            else:
                ep.delete(p.handle)
                self.peers.drop(p, "taken down")
        if waits:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await asyncio.gather(*waits)
        for p in mine:
            if p in self.sas:  # the peer never answered: forget it anyway
                ep.delete(p.handle)
                self.peers.drop(p, "taken down (peer did not confirm)")
        return len(mine)

    # ------------------------------------------------------------------ status
    def rows(self, now: float | None = None) -> tuple[TunnelStatus, ...]:
        """One status row per IKE SA, Child SAs nested (``oe status``)."""
        now = self._clock() if now is None else now
        natt_port = self._ports[1] if self.endpoint is None else self.endpoint.natt_port
        return tunnel_rows(self.sas, now, natt_port)

    def status(self) -> StatusContribution:
        return StatusContribution(
            tunnels=self.rows(),
            ike={
                **self.counters(),
                "peer_key_lookups_found": self.key_lookups.found,
                "peer_key_lookups_refused": self.key_lookups.refused,
                "identity": self.identity(),
                "addresses": list(self.addresses),
                "proposal_mismatches": mismatch_rows(self.peers.mismatches.values(), self._clock()),
            },
        )

    def identity(self) -> dict[str, object]:
        """Who we say we are and what to publish (``oe status`` "ike" -> "identity")."""
        return self._identity.status(self.config)

    def counters(self) -> dict[str, object]:
        """The endpoint's counters (``oe status`` "ike"): what it dropped and why, the
        bytes of incomplete fragmented messages held now, and the half-open table."""
        if self.endpoint is None:
            return {}
        ep = self.endpoint
        return {**asdict(ep.counters), "fragment_bytes": ep.fragments.held, **ep.load_status()}

    # ------------------------------------------------------------------ control
    def register_commands(self, commands: CommandTable) -> None:
        """Add ``up`` and ``down`` to the daemon's control commands."""
        IkeCommands(self).register(commands)
