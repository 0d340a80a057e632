"""The IKE manager: a daemon ``Service`` holding one IKE SA per peer and its Child SAs.

Why one IKE SA per peer: the LAN devices behind the router all reach a peer through
the router's own address, so they share one IKE SA and get one Child SA each.
An IKE SA per device would look like a flood to the peer (strongSwan demands
cookies after three half-open SAs from one address).

The manager owns the ``IkeEndpoint`` (sockets, timers) and turns control
commands into IKE SAs: ``up`` resolves when the IKE SA and its first Child SA
are up, or raises ``IkeUpError`` saying why not; ``down`` deletes with the peer.
Established and deleted Child SAs go to a ``ChildSaSink`` (the datapath or the
OE manager plugs in there). Incoming IKE is answered by the responder policy:
NULL-auth OE by default, the peer's key when one is known, and containment (a
peer only ever gets selectors for its own address).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from oe_router.config.schema import OeConfig
from oe_router.control.protocol import CommandError, CommandTable, Request
from oe_router.control.status import ChildSaStatus, StatusContribution, TunnelStatus
from oe_router.datapath import base as dp
from oe_router.dns.ipseckey import rdata_text
from oe_router.ratelimit import RateLimit

from .auth import PrivateKey, PublicKey
from .child import ChildSaInfo
from .constants import AuthMethod, DhId, EncrId, IdType, IntegId, PrfId
from .endpoint import Address, IkeEndpoint, SaHandle, SocketHooks
from .errors import IkeError
from .events import (
    ChildSaDeleted,
    ChildSaEstablished,
    ChildSaFailed,
    Event,
    IkeSaDeleted,
    IkeSaEstablished,
    IkeSaFailed,
    IkeSaRekeyed,
    InitialContact,
)
from .hostkey import generate_key_file, publish_line
from .payloads import TrafficSelector
from .sa import (
    DEFAULT_ESP_PROPOSALS,
    DEFAULT_IKE_PROPOSALS,
    EspProposalSpec,
    IkeProposalSpec,
    IkeSaConfig,
)
from .states import ChildState, IkeState

__all__ = [
    "REKEY_REFUSED",
    "AuthChoice",
    "ChildSaSink",
    "IkeService",
    "IkeUpError",
    "PeerSa",
    "RecordingSink",
    "child_sa_spec",
    "load_private_key",
    "load_public_key",
    "parse_identity",
]

log = logging.getLogger("oe_router.ike")

AuthChoice = Literal["null", "pubkey"]


class IkeUpError(Exception):
    """``up`` failed; the message names the peer and the reason.

    ``notify`` is the peer's error notify when it refused (AUTHENTICATION_FAILED lets
    the OE negotiator retry with the other authentication).
    """

    def __init__(self, message: str, notify: int | None = None) -> None:
        super().__init__(message)
        self.notify = notify


# --------------------------------------------------------------------------- the sink


class ChildSaSink(Protocol):
    """Where established and deleted Child SAs go (datapath, OE manager, a test recorder).

    Called synchronously from the endpoint's datagram handler: schedule slow work
    (netlink) as a task, do not block.
    """

    def child_sa_established(self, peer: PeerSa, child: ChildSaEstablished) -> None: ...

    def child_sa_deleted(self, peer: PeerSa, child: ChildSaDeleted) -> None: ...

    def peer_dead(self, peer: PeerSa, children: tuple[ChildSaDeleted, ...]) -> None:
        """``peer`` stopped answering an established IKE SA (liveness check, rekey): the
        IKE SA is already forgotten, ``children`` went with it. Called INSTEAD of
        ``child_sa_deleted`` for them, so the owner can fall back per policy in one step
        rather than treating each as an ordinary DELETE."""
        ...


@dataclass
class RecordingSink:
    """A sink that only records, for tests and for running without a datapath."""

    established: list[tuple[str, ChildSaEstablished]] = field(default_factory=list)
    deleted: list[tuple[str, ChildSaDeleted]] = field(default_factory=list)
    dead: list[tuple[str, tuple[ChildSaDeleted, ...]]] = field(default_factory=list)

    def child_sa_established(self, peer: PeerSa, child: ChildSaEstablished) -> None:
        self.established.append((peer.peer, child))

    def child_sa_deleted(self, peer: PeerSa, child: ChildSaDeleted) -> None:
        self.deleted.append((peer.peer, child))

    def peer_dead(self, peer: PeerSa, children: tuple[ChildSaDeleted, ...]) -> None:
        self.dead.append((peer.peer, children))


# --------------------------------------------------------------------------- keys, identities


_PRIVATE_KINDS = (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey, ed25519.Ed25519PrivateKey)
_PUBLIC_KINDS = (rsa.RSAPublicKey, ec.EllipticCurvePublicKey, ed25519.Ed25519PublicKey)
_KINDS = "RSA, ECDSA, Ed25519"


def load_private_key(pem: bytes, what: str) -> PrivateKey:
    """A PEM private key of a kind IKE can sign with; ValueError names ``what``."""
    try:
        key = serialization.load_pem_private_key(pem, None)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{what}: not a usable PEM private key ({exc})") from None
    if not isinstance(
        key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
    ):
        raise ValueError(
            f"{what}: {type(key).__name__} keys are not supported (RSA, ECDSA, Ed25519)"
        )
    return key


def load_public_key(pem: bytes, what: str) -> PublicKey:
    """A PEM public key (SubjectPublicKeyInfo); ValueError names ``what``."""
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{what}: not a PEM public key ({exc})") from None
    if not isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey):
        raise ValueError(
            f"{what}: {type(key).__name__} keys are not supported (RSA, ECDSA, Ed25519)"
        )
    return key


def parse_identity(text: str, address: str) -> tuple[int, bytes]:
    """``%null``, ``@fqdn`` or an IP address -> (ID type, data); ``%address`` uses ``address``."""
    if text == "%null":
        return IdType.ID_NULL, b""
    if text.startswith("@") and len(text) > 1:
        return IdType.ID_FQDN, text[1:].encode("idna")
    ip = ipaddress.ip_address(address if text == "%address" else text)
    return (IdType.ID_IPV4_ADDR if ip.version == 4 else IdType.ID_IPV6_ADDR), ip.packed


def identity_text(ident: tuple[int, bytes]) -> str:
    t, data = ident
    if t == IdType.ID_NULL:
        return "%null"
    if t in (IdType.ID_FQDN, IdType.ID_RFC822_ADDR):
        return ("@" if t == IdType.ID_FQDN else "") + data.decode("ascii", "replace")
    if t in (IdType.ID_IPV4_ADDR, IdType.ID_IPV6_ADDR) and len(data) in (4, 16):
        return str(ipaddress.ip_address(data))
    return f"{IdType(t).name if t in IdType._value2member_map_ else t}:{data.hex()}"


def _key_kind(key: PrivateKey | PublicKey | None) -> str:
    if isinstance(key, rsa.RSAPrivateKey | rsa.RSAPublicKey):
        return f"RSA-{key.key_size}"
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        return {"secp256r1": "ECDSA-P256", "secp384r1": "ECDSA-P384"}.get(
            key.curve.name, f"ECDSA-{key.curve.name}"
        )
    if isinstance(key, ed25519.Ed25519PrivateKey | ed25519.Ed25519PublicKey):
        return "Ed25519"
    return ""


def _auth_text(method: int, key: PrivateKey | PublicKey | None) -> str:
    if method == AuthMethod.NULL:
        return "null"
    name = AuthMethod(method).name if method in AuthMethod._value2member_map_ else str(method)
    kind = _key_kind(key)
    return f"{name.lower()}({kind})" if kind else name.lower()


def _name(enum: Any, value: int | None) -> str:
    if value is None:
        return ""
    try:
        return str(enum(value).name)
    except ValueError:
        return str(value)


def _encr_text(encr: int, bits: int | None) -> str:
    return _name(EncrId, encr) + (f"_{bits}" if bits else "")


def _ts_text(ts: Iterable[TrafficSelector]) -> str:
    out = []
    for t in ts:
        nets = ipaddress.summarize_address_range(t.start, t.end)
        text = ",".join(str(n) for n in nets)
        if t.ip_protocol:
            text += f"[{t.ip_protocol}"
            if (t.start_port, t.end_port) != (0, 65535):
                text += f"/{t.start_port}" + (
                    f"-{t.end_port}" if t.end_port != t.start_port else ""
                )
            text += "]"
        out.append(text)
    return " ".join(out)


def _until(info: ChildSaInfo | None, now: float) -> float | None:
    return None if info is None or info.rekey_at is None else round(info.rekey_at - now, 3)


def host_selector(address: str) -> TrafficSelector:
    ip = ipaddress.ip_address(address)
    return TrafficSelector.from_range(ip, ip)


def any_selector(address: str) -> TrafficSelector:
    """Every address of ``address``'s family (0.0.0.0/0 or ::/0)."""
    ip = ipaddress.ip_address(address)
    return TrafficSelector.for_network(f"{ip}/0")


# --------------------------------------------------------------------------- datapath adapter


def _dp_selectors(ts: Iterable[TrafficSelector]) -> tuple[dp.TrafficSelector, ...]:
    out: list[dp.TrafficSelector] = []
    for t in ts:
        full = (t.start_port, t.end_port) == (0, 65535)
        if not full and t.start_port != t.end_port:
            raise dp.DatapathError(f"port range {t.start_port}-{t.end_port} has no XFRM selector")
        port = None if full else t.start_port
        for net in ipaddress.summarize_address_range(t.start, t.end):
            out.append(dp.TrafficSelector(net, t.ip_protocol, port))
    return tuple(out)


def child_sa_spec(
    child: ChildSaEstablished,
    local: str,
    remote: str,
    *,
    local_natt_port: int = 4500,
    remote_natt_port: int = 4500,
) -> dp.ChildSaSpec:
    """The datapath's install request for an established Child SA (keys, selectors, encap)."""
    integ = dp.integ_algorithm(child.integ) if child.integ is not None else None
    return dp.ChildSaSpec(
        local=ipaddress.ip_address(local),
        remote=ipaddress.ip_address(remote),
        inbound=dp.SaKeys(
            int.from_bytes(child.spi_in, "big"), child.encr_key_in, child.integ_key_in
        ),
        outbound=dp.SaKeys(
            int.from_bytes(child.spi_out, "big"), child.encr_key_out, child.integ_key_out
        ),
        encr=dp.encr_algorithm(child.encr),
        integ=integ,
        mode=dp.Mode.TRANSPORT if child.mode == "transport" else dp.Mode.TUNNEL,
        local_ts=_dp_selectors(child.ts_local),
        remote_ts=_dp_selectors(child.ts_remote),
        encap=dp.NatTEncap(local_natt_port, remote_natt_port) if child.udp_encap else None,
        esn=child.esn,
    )


#: ``IkeService.rekey_child``: the peer answered the rekey with a refusal
REKEY_REFUSED = "the peer refused the rekey"


# --------------------------------------------------------------------------- per-peer state


@dataclass
class _Child:
    event: ChildSaEstablished
    since: float


@dataclass(eq=False)
class PeerSa:
    """One IKE SA with one peer, and the Child SAs it carries."""

    peer: str
    handle: SaHandle
    local_key: PrivateKey | None
    peer_key: PublicKey | None
    ike: IkeSaEstablished | None = None
    children: dict[bytes, _Child] = field(default_factory=dict)  # by our inbound SPI
    error: str | None = None
    notify: int | None = None  #: the notify of the failure, if the peer sent one
    child_error: str | None = None  #: why the first Child SA failed (the IKE SA stays up)
    done: asyncio.Future[None] | None = None
    pending: dict[int, asyncio.Future[str | None]] = field(default_factory=dict)  # create_child

    @property
    def state(self) -> IkeState:
        if self.error is not None:
            return IkeState.FAILED
        return self.handle.sa.state


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
        xfrm: bool = True,
        up_timeout: float = 30.0,
        random: Callable[[int], bytes] = os.urandom,
        socket_hooks: SocketHooks | None = None,
        force_udp_encap: bool = False,
    ) -> None:
        self.addresses = tuple(str(ipaddress.ip_address(a)) for a in addresses)
        self.sink: ChildSaSink = sink if sink is not None else RecordingSink()
        self._clock = clock
        self._ports = (ike_port, natt_port)
        self.remote_ike_port = remote_ike_port
        self.remote_natt_port = remote_natt_port
        self._key_override = private_key
        self._id_override = local_id
        self.peer_keys: dict[str, PublicKey] = dict(peer_keys or {})
        # Who may start IKE with us: peer address -> None, or why not (the OE policy groups).
        self.inbound_filter: Callable[[str], str | None] | None = None
        self.ike_proposals = ike_proposals
        #: ESP transforms in preference order; the offload layer may replace them
        #: (new IKE SAs and Child SAs use the new order).
        self.esp_proposals = esp_proposals
        self.keepalive_interval = keepalive_interval
        self._netns = netns
        self._xfrm = xfrm
        self.up_timeout = up_timeout
        self._random = random
        #: the datapath's hooks on our sockets (the userspace datapath shares UDP 4500)
        self.socket_hooks = socket_hooks
        #: ESP always in UDP 4500 (a datapath that only receives ESP there needs it)
        self.force_udp_encap = force_udp_encap
        self.config = OeConfig()
        self.private_key: PrivateKey | None = private_key
        self.key_note = ""
        self.endpoint: IkeEndpoint | None = None
        self.sas: list[PeerSa] = []
        self._refusals = RateLimit()  # one line per 10 s, however many requests
        self._early_failures = RateLimit()

    @property
    def name(self) -> str:
        return "ike"

    def now(self) -> float:
        """The service's clock (what ``IkeSa`` commands take as ``now``)."""
        return self._clock()

    def _log_limited(self, limit: RateLimit, level: int, msg: str, *args: object) -> None:
        """Log what anyone can cause with a packet (a refused IKE_SA_INIT, a responder IKE
        SA failing before IKE_AUTH) as ``limit`` allows; the next line that gets out says
        how many were left out meanwhile."""
        if not limit.allow(self._clock()):
            return
        if left_out := limit.take_suppressed():
            msg += " (and %d more like it in the last %.0fs)"
            args += (left_out, limit.window)
        log.log(level, msg, *args)

    # ------------------------------------------------------------------ lifecycle
    def _load_key(self, config: OeConfig) -> None:
        if self._key_override is not None:
            self.private_key, self.key_note = self._key_override, "given"
            return
        path = Path(config.identity.private_key)
        local_id = config.identity.local_id
        try:
            if local_id != "%null" and not path.exists():
                self.private_key = self._first_key(path, local_id)
            else:
                self.private_key = load_private_key(path.read_bytes(), str(path))
            self.key_note = str(path)
        except OSError as exc:
            self.private_key = None
            self.key_note = f"{path}: {exc.strerror}"
            if config.identity.local_id != "%null":
                raise IkeError(
                    f"identity.private_key {path}: {exc.strerror}; local_id "
                    f"{config.identity.local_id} needs a key (or set local_id %null)"
                ) from None

    @staticmethod
    def _first_key(path: Path, local_id: str) -> PrivateKey:
        """The identity needs a key and there is none yet: make it (hostkey.py)."""
        try:
            key = generate_key_file(path)
        except FileExistsError:  # made meanwhile: take that one
            return load_private_key(path.read_bytes(), str(path))
        log.info(
            "identity %s: no key at %s, made one (ECDSA P-256, mode 0600); publish: %s",
            local_id,
            path,
            publish_line(local_id, key.public_key()),
        )
        return key

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
            xfrm=self._xfrm,
            random=self._random,
            socket_hooks=self.socket_hooks,
        )
        await self.endpoint.start()

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
        if self.endpoint is None:
            return
        for p in list(self.sas):
            if p.state == IkeState.ESTABLISHED:
                with contextlib.suppress(IkeError):
                    self.endpoint.delete(p.handle)
        await asyncio.sleep(0)
        await self.endpoint.stop()
        for p in list(self.sas):
            self._drop(p, "IKE service stopped")
        self.endpoint = None

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
        text = self._id_override or self.config.identity.local_id
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
                self._log_limited(self._refusals, logging.INFO, msg, remote[0], reason)
                return None
        peer_key = self.peer_keys.get(remote[0])
        local_id = self._id_override or self.config.identity.local_id
        sign = self.private_key is not None and (peer_key is not None or local_id != "%null")
        cfg = self._sa_config(local, remote, "pubkey" if sign else "null", peer_key, True)
        return cfg

    # ------------------------------------------------------------------ commands
    def find(self, peer: str) -> PeerSa | None:
        """The best IKE SA with ``peer``: established first, then one in progress."""
        live = [p for p in self.sas if p.peer == peer and not p.state.over]
        live.sort(key=lambda p: p.state != IkeState.ESTABLISHED)
        return live[0] if live else None

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
            p = self._track(handle, addr, cfg)
        if p.state == IkeState.ESTABLISHED and p.children:
            return p
        assert p.done is not None
        try:
            async with asyncio.timeout(self.up_timeout):
                await asyncio.shield(p.done)
        except TimeoutError:
            raise IkeUpError(f"peer {peer}: no IKE SA after {self.up_timeout:.0f}s") from None
        if p.error is not None:
            raise IkeUpError(f"peer {peer}: {p.error}", p.notify)
        if not p.children and p.child_error is not None:
            raise IkeUpError(f"peer {peer}: {p.child_error}", p.notify)
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
            raise IkeUpError(f"peer {peer}: {error}")
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
                self._drop(p, "taken down")
        if waits:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await asyncio.gather(*waits)
        for p in mine:
            if p in self.sas:  # the peer never answered: forget it anyway
                ep.delete(p.handle)
                self._drop(p, "taken down (peer did not confirm)")
        return len(mine)

    # ------------------------------------------------------------------ events
    def _track(self, handle: SaHandle, addr: str, cfg: IkeSaConfig) -> PeerSa:
        p = PeerSa(addr, handle, cfg.private_key, cfg.peer_public_key)
        p.done = asyncio.get_running_loop().create_future()
        handle.owner = p
        self.sas.append(p)
        return p

    def _settle(self, p: PeerSa, request_id: int | None = None, error: str | None = None) -> None:
        if p.done is not None and not p.done.done():
            p.done.set_result(None)
        for rid, fut in list(p.pending.items()):
            if (request_id is None or rid == request_id) and not fut.done():
                fut.set_result(error if request_id is not None else p.error or "IKE SA gone")

    def _drop(self, p: PeerSa, reason: str, *, dead: bool = False) -> None:
        gone = []
        for spi in list(p.children):
            child = p.children.pop(spi).event
            gone.append(ChildSaDeleted(child.spi_in, child.spi_out, reason))
        if dead:
            self.sink.peer_dead(p, tuple(gone))
        else:
            for ev in gone:
                self.sink.child_sa_deleted(p, ev)
        if p in self.sas:
            self.sas.remove(p)
        if p.error is None and p.ike is None:
            p.error = reason
        self._settle(p)

    def _on_event(self, handle: SaHandle, ev: Event) -> None:
        p = handle.owner
        if not isinstance(p, PeerSa):  # a peer initiated: track its IKE SA
            cfg = handle.sa.config
            p = PeerSa(handle.remote[0], handle, cfg.private_key, cfg.peer_public_key)
            handle.owner = p
            self.sas.append(p)
        now = self._clock()
        if isinstance(ev, IkeSaEstablished):
            p.ike = ev
            log.info(
                "IKE SA with %s established (%s, peer id %s)",
                p.peer,
                "initiator" if ev.is_initiator else "responder",
                identity_text(ev.peer_id),
            )
            if not handle.sa.is_initiator:
                self._settle(p)
        elif isinstance(ev, ChildSaEstablished):  # ChildSaRekeyed too: install the new pair
            p.children[ev.spi_in] = _Child(ev, now)
            log.info("Child SA with %s up: in %s out %s", p.peer, ev.spi_in.hex(), ev.spi_out.hex())
            self.sink.child_sa_established(p, ev)
            if ev.request_id is not None:
                self._settle(p, ev.request_id)
            self._settle(p)
        elif isinstance(ev, ChildSaFailed):
            log.warning("peer %s: Child SA refused: %s", p.peer, ev.reason)
            if ev.request_id is not None:
                self._settle(p, ev.request_id, f"Child SA refused: {ev.reason}")
            elif ev.rekey_of is None and not p.children:
                p.child_error = f"IKE SA up but the Child SA failed: {ev.reason}"
                p.notify = ev.notify
                self._settle(p)
        elif isinstance(ev, ChildSaDeleted):
            gone = p.children.pop(ev.spi_in, None)
            if gone is not None:
                self.sink.child_sa_deleted(p, ev)
        elif isinstance(ev, IkeSaRekeyed):
            log.info(
                "IKE SA with %s rekeyed: now %s_i %s_r", p.peer, ev.spi_i.hex(), ev.spi_r.hex()
            )
        elif isinstance(ev, InitialContact):
            for old in [o for o in self.sas if o.peer == p.peer and o is not p]:
                log.info("peer %s sent INITIAL_CONTACT: forgetting its older IKE SA", p.peer)
                self._ep().forget(old.handle)
                self._drop(old, "replaced: the peer sent INITIAL_CONTACT")
        elif isinstance(ev, IkeSaFailed):
            dead = ev.unanswered and p.ike is not None
            if dead:
                log.warning("peer %s stopped answering its IKE SA: %s", p.peer, ev.reason)
            elif p.ike is None and not handle.sa.is_initiator:
                # a request that failed at once (a proposal we refuse, a bad body): a
                # spoofed flood of them must not become a line each
                msg, why = "IKE SA with %s failed: %s", ev.reason
                self._log_limited(self._early_failures, logging.WARNING, msg, p.peer, why)
            elif p.ike is None:
                # our attempt: the OE manager's decision line says what became of the
                # flow ("clear for 15m, IKE refused (...)"), at the level that deserves
                log.info("IKE SA with %s failed: %s", p.peer, ev.reason)
            else:
                log.warning("IKE SA with %s failed: %s", p.peer, ev.reason)
            p.error = ev.reason
            p.notify = ev.notify
            self._drop(p, ev.reason, dead=dead)
        elif isinstance(ev, IkeSaDeleted):
            log.info("IKE SA with %s deleted: %s", p.peer, ev.reason)
            self._drop(p, ev.reason)

    # ------------------------------------------------------------------ status
    def rows(self, now: float | None = None) -> tuple[TunnelStatus, ...]:
        """One status row per IKE SA, Child SAs nested (``oe status``)."""
        now = self._clock() if now is None else now
        out = []
        for p in self.sas:
            h, ev = p.handle, p.ike
            since = h.established_at
            age = None if since is None else round(now - since, 3)
            at = h.sa.ike_rekey_at if h.sa.state == IkeState.ESTABLISHED else None
            rekey = None if at is None else round(at - now, 3)
            infos = {c.spi_in: c for c in h.sa.child_sas()}
            transform = ""
            nat = ""
            local_id = remote_id = local_auth = remote_auth = ""
            if ev is not None:
                transform = "/".join(
                    x
                    for x in (
                        _encr_text(ev.encr, ev.encr_key_bits),
                        _name(IntegId, ev.integ),
                        _name(PrfId, ev.prf),
                        _name(DhId, ev.dh_group),
                    )
                    if x
                )
                nat = ",".join(
                    n for n, on in (("local", ev.nat_local), ("remote", ev.nat_remote)) if on
                )
                local_id, remote_id = identity_text(ev.local_id), identity_text(ev.peer_id)
                local_auth = _auth_text(ev.local_auth_method, p.local_key)
                remote_auth = _auth_text(ev.peer_auth_method, p.peer_key)
            children = tuple(
                ChildSaStatus(
                    spi_in=c.event.spi_in.hex(),
                    spi_out=c.event.spi_out.hex(),
                    mode=c.event.mode,
                    transform="/".join(
                        x
                        for x in (
                            _encr_text(c.event.encr, c.event.encr_key_bits),
                            _name(IntegId, c.event.integ),
                            "ESN" if c.event.esn else "",
                        )
                        if x
                    ),
                    ts_local=_ts_text(c.event.ts_local),
                    ts_remote=_ts_text(c.event.ts_remote),
                    udp_encap=c.event.udp_encap,
                    established_s=round(now - c.since, 3),
                    rekey_in_s=_until(infos.get(c.event.spi_in), now),
                )
                for c in p.children.values()
            )
            out.append(
                TunnelStatus(
                    peer=p.peer,
                    local=f"{h.local[0]}[{h.local[1] if not h.natt else self._ep().natt_port}]",
                    remote=f"{h.remote[0]}[{h.remote[1]}]",
                    state=p.state,
                    transform=transform,
                    established_s=age,
                    source="ike",
                    role="initiator" if h.sa.is_initiator else "responder",
                    local_id=local_id,
                    remote_id=remote_id,
                    local_auth=local_auth,
                    remote_auth=remote_auth,
                    ike_spis=f"{h.sa.spi_i.hex()}_i {h.sa.spi_r.hex()}_r",
                    nat=nat,
                    rekey_in_s=rekey,
                    children=children,
                )
            )
        return tuple(out)

    def status(self) -> StatusContribution:
        return StatusContribution(
            tunnels=self.rows(),
            ike={
                **self.counters(),
                "identity": self.identity(),
                "addresses": list(self.addresses),
            },
        )

    def identity(self) -> dict[str, object]:
        """Who we say we are, and the public half of our key in the IPSECKEY form to
        publish for that identity (``oe status`` "ike" -> "identity")."""
        out: dict[str, object] = {"local_id": self._id_override or self.config.identity.local_id}
        if self.private_key is not None:
            out["key"] = f"{_key_kind(self.private_key)} {self.key_note}"
            with contextlib.suppress(ValueError):
                out["ipseckey"] = rdata_text(self.private_key.public_key())
        return out

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
        commands.register(
            "up", self._cmd_up, "bring up an IKE SA + Child SA: peer, auth, peer_key (PEM)"
        )
        commands.register("down", self._cmd_down, "delete the IKE SAs with a peer: peer")

    async def _cmd_up(self, request: Request) -> dict[str, object]:
        args = request.args
        peer = args.get("peer")
        if not isinstance(peer, str) or not peer:
            raise CommandError('up needs "peer" (an address or a name)')
        auth = args.get("auth", "null")
        if auth not in ("null", "pubkey"):
            raise CommandError(f"auth {auth!r}: use null or pubkey")
        pem = args.get("peer_key")
        key = None
        if pem is not None:
            if not isinstance(pem, str):
                raise CommandError("peer_key must be a PEM string")
            try:
                key = load_public_key(pem.encode(), "peer_key")
            except ValueError as exc:
                raise CommandError(str(exc)) from None
        mode = args.get("mode", "tunnel")
        if mode not in ("tunnel", "transport"):
            raise CommandError(f"mode {mode!r}: use tunnel or transport")
        try:
            p = await self.up(peer, auth, key, transport=mode == "transport")
        except (IkeUpError, IkeError) as exc:
            raise CommandError(str(exc)) from None
        row = next((r for r in self.rows() if r.ike_spis.startswith(p.handle.sa.spi_i.hex())), None)
        return {"ike": asdict(row) if row is not None else None}

    async def _cmd_down(self, request: Request) -> dict[str, object]:
        peer = request.args.get("peer")
        if not isinstance(peer, str) or not peer:
            raise CommandError('down needs "peer"')
        try:
            n = await self.down(peer)
        except (IkeUpError, IkeError) as exc:
            raise CommandError(str(exc)) from None
        if n == 0:
            raise CommandError(f"no IKE SA with {peer}")
        return {"deleted": n}
