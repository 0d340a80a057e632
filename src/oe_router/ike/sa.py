"""Sans-IO IKE SA (RFC 7296), initiator and responder: the queue, the window,
the Child SA table and the events of one IKE SA with a peer.

Feed it datagrams (``receive_datagram``), timer ticks (``handle_timer``) and
commands (``create_child``, ``rekey_child``, ``rekey``, ``delete_child``,
``delete``, ``send_liveness_check``) with the current time as a value; collect
``datagrams_to_send()`` and ``next_event()``. No sockets, no clocks: the
endpoint owns those. Randomness (SPIs, nonces, rekey jitter, retry delays)
comes from the injected ``random`` function.

Each exchange is a task (``tasks/``): IKE_SA_INIT, IKE_AUTH, CREATE_CHILD_SA
(new Child SA, Child SA rekey, IKE SA rekey), INFORMATIONAL (Delete, liveness)
and their responder sides. Messages reach them through one table keyed by
(exchange, request or response, state). SPIs, keys and message IDs live in an
``IkeLink``; an IKE SA rekey switches to a new link (IkeSaRekeyed) and keeps the
old one as a ``RetiredLink`` until its Delete exchange ends. An unexpected error
while handling a message fails the SA (IkeSaFailed) rather than leave it
half-updated. Cookies demanded as responder live in ``cookies`` (stateless).
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
from collections.abc import Callable
from dataclasses import field

from oe_router.records import record

from . import auth as ike_auth
from .child import ChildRecord, ChildSaInfo, ChildTable, child_keys
from .constants import AuthMethod, ExchangeType, IdType, PayloadType, ProtocolId
from .errors import IkeCryptoError, IkeDecodeError, IkeError
from .events import (
    ChildSaEstablished,
    Event,
    IkeSaDeleted,
    IkeSaFailed,
    IkeSaRekeyed,
)
from .fragments import DEFAULT_FRAGMENT_LIMITS, FragmentLimits, FragmentStats
from .keys import IkeSaKeys
from .link import ZERO_SPI, IkeLink, LinkSettings
from .message import Message
from .payloads import IpAddress, Notify, Payload, TrafficSelector
from .proposals import (
    DEFAULT_ESP_PROPOSALS,
    DEFAULT_IKE_PROPOSALS,
    EspChoice,
    EspProposalSpec,
    IkeChoice,
    IkeProposalSpec,
    ProposalMismatch,
    esp_key_lengths,
    select_esp_proposal,
    select_ike_proposal,
)
from .retired import RetiredLink
from .selectors import ContainmentPolicy, reuse
from .states import ChildState, IkeState, TaskState, log_change
from .tasks.base import Responder, Task
from .tasks.child_sa import CreateChildTask, RekeyChildTask
from .tasks.ike_auth import IkeAuthResponder
from .tasks.ike_init import Handshake, IkeInitResponder, IkeInitTask, nat_hash
from .tasks.ike_rekey import IkeRekeyTask, create_child_responder
from .tasks.informational import (
    DeleteChildTask,
    DeleteIkeTask,
    InformationalResponder,
    LivenessTask,
)
from .ts_policy import TsPolicy

log = logging.getLogger("oe_router.ike")

Address = tuple[str, int]

DEFAULT_CONTAINMENT = ContainmentPolicy()  # frozen: NULL and address-bound peers confined

# Old private names, kept for code that imported them.
_IkeChoice = IkeChoice
_EspChoice = EspChoice


# --------------------------------------------------------------------------- configuration


@record(frozen=True, slots=True)
class IkeSaConfig:
    """Everything one IKE SA needs to know, fixed at creation.

    ``private_key`` None means we authenticate with NULL auth; ``peer_public_key``
    None means we require NULL auth from the peer (the OE default both ways).

    Lifetimes (seconds, None = never): an SA is rekeyed at a random moment in
    ``[L * (1 - rekey_margin - rekey_jitter), L * (1 - rekey_margin)]`` and
    deleted at ``L`` if the rekey did not happen. ``fragment_size`` is the
    largest encrypted IKE message (without the non-ESP marker) sent whole
    when the peer supports RFC 7383 fragmentation; ``fragment_limits`` bound
    what the peer's fragments may make us hold (``fragments``).
    """

    local_address: Address
    remote_address: Address
    local_ts: tuple[TrafficSelector, ...]
    remote_ts: tuple[TrafficSelector, ...]
    ike_proposals: tuple[IkeProposalSpec, ...] = DEFAULT_IKE_PROPOSALS
    esp_proposals: tuple[EspProposalSpec, ...] = DEFAULT_ESP_PROPOSALS
    local_id: tuple[int, bytes] = (IdType.ID_NULL, b"")
    private_key: ike_auth.PrivateKey | None = None
    peer_public_key: ike_auth.PublicKey | None = None
    transport_mode: bool = False
    rsa_pss: bool = True
    nonce_len: int = 32
    retransmit_timeout: float = 0.5
    retransmit_tries: int = 6
    # CREATE_CHILD_SA: PFS (a KE of the IKE SA's group) for new and rekeyed Child SAs
    child_pfs: bool = True
    ike_lifetime: float | None = None
    child_lifetime: float | None = None
    rekey_margin: float = 0.1
    rekey_jitter: float = 0.1
    # TEMPORARY_FAILURE: wait a random delay in this range, at most this many times
    retry_delay: tuple[float, float] = (1.0, 4.0)
    retry_tries: int = 5
    fragment_size: int = 1280
    fragment_limits: FragmentLimits = DEFAULT_FRAGMENT_LIMITS
    # CP: ask the responder for inner addresses (CAT); as responder, hand these out
    request_internal_address: bool = False
    internal_addresses: tuple[str, ...] = ()
    containment: ContainmentPolicy = DEFAULT_CONTAINMENT
    peer_key_address_bound: bool = False  # the peer's key came from DNS for its address
    # As responder without peer_public_key: a signing initiator with an FQDN identity is
    # not refused at once; its IKE_AUTH waits (PeerKeyNeeded) for the owner to look its
    # key up (``IkeSa.peer_key_found``), at most peer_key_timeout seconds.
    lookup_peer_key: bool = False
    peer_key_timeout: float = 10.0
    initial_contact: bool = False  # send INITIAL_CONTACT in our IKE_AUTH request
    retire_timeout: float = 30.0  # how long a replaced IKE SA waits for its Delete
    # Pretend to be behind a NAT (RFC 7296 §2.23 allows it): ESP then always travels in
    # UDP 4500 (RFC 3948), which is all a userspace datapath without kernel ESP receives.
    force_udp_encap: bool = False

    def __post_init__(self) -> None:
        def bad(option: str, why: str) -> ValueError:
            return ValueError(f"IKE SA config for peer {self.remote_address[0]}: {option} {why}")

        for name in ("ike_lifetime", "child_lifetime"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise bad(name, f"must be positive, not {value}")
        if (
            self.rekey_margin < 0
            or self.rekey_jitter < 0
            or (self.rekey_margin + self.rekey_jitter >= 1)
        ):
            raise bad("rekey_margin + rekey_jitter", "must be within [0, 1)")
        if self.fragment_size < 256:
            raise bad("fragment_size", f"{self.fragment_size} is below 256 bytes")
        lo, hi = self.retry_delay
        if not 0 <= lo <= hi:
            raise bad("retry_delay", f"{self.retry_delay} is not a (min, max) range")
        for text in self.internal_addresses:
            try:
                ipaddress.ip_address(text)
            except ValueError:
                raise bad("internal_addresses", f"holds {text!r}, not an address") from None


@record(frozen=True, slots=True)
class NegotiatedKeys:
    """The IKE SA's transforms, nonces and SK_* keys: for key logs and cross-checks."""

    spi_i: bytes
    spi_r: bytes
    ni: bytes
    nr: bytes
    encr: int
    encr_key_bits: int | None
    integ: int | None
    prf: int
    dh_group: int
    keys: IkeSaKeys = field(repr=False)


# --------------------------------------------------------------------------- the IKE SA


@record(slots=True)
class PeerFacts:
    """What IKE_SA_INIT and IKE_AUTH taught us about the peer (and how we proved
    ourselves): its address, NAT on either side, the AUTH methods."""

    ip: str
    nat_local: bool = False
    nat_remote: bool = False
    auth_method: int = AuthMethod.NULL
    local_auth_method: int = AuthMethod.NULL
    #: the key the peer must prove: the config's, or one looked up for its identity
    public_key: ike_auth.PublicKey | None = field(default=None, repr=False)
    #: ``public_key`` was looked up for the identity it sent, not known in advance
    key_by_identity: bool = False


class IkeSa:
    """One IKE SA with a peer, as initiator or responder.

    Create with :meth:`initiator` / :meth:`responder`. ``is_initiator`` is our
    role in the *current* IKE SA (after a rekey it is whoever sent the rekey).
    Its public attributes and the methods under "for the tasks" are the context
    the exchange tasks work in.
    """

    # one per peer: no instance dict (docs/footprint.md)
    __slots__ = (
        "_children",
        "_events",
        "_frag_stats",
        "_ike_expire_at",
        "_ike_rekey_at",
        "_next_request_id",
        "_out",
        "_queue",
        "_retired",
        "active",
        "config",
        "delete_requested",
        "established_at",
        "handshake",
        "link",
        "peer",
        "pending_auth",
        "random",
        "state",
    )

    def __init__(
        self, config: IkeSaConfig, is_initiator: bool, random: Callable[[int], bytes] = os.urandom
    ) -> None:
        self.config, self.random = config, random
        self.state = IkeState.IDLE
        self.established_at: float | None = None
        self.peer = PeerFacts(config.remote_address[0], public_key=config.peer_public_key)
        self.pending_auth: IkeAuthResponder | None = None  # IKE_AUTH held for a key lookup
        self.handshake = Handshake()
        self.active: Task | None = None  # the exchange we initiated, awaiting its answer
        self.delete_requested = False
        self._events: list[Event] = []  # a list, not a deque: 56 bytes, not 760, per SA
        self._out: list[bytes] = []
        self._frag_stats = FragmentStats()  # of every link, current and retired
        settings = LinkSettings.shared(
            config.retransmit_timeout,
            config.retransmit_tries,
            config.fragment_size,
            config.fragment_limits,
        )
        self.link = IkeLink(
            ZERO_SPI,
            ZERO_SPI,
            is_initiator,
            sink=self._out,
            random=random,
            stats=self._frag_stats,
            settings=settings,
        )
        # replaced / redundant links; a tuple: none (nearly always) is the shared ()
        self._retired: tuple[RetiredLink, ...] = ()
        self._children = ChildTable(self._events)  # by our inbound SPI
        self._queue: list[Task] = []
        self._next_request_id = 1
        self._ike_rekey_at: float | None = None
        self._ike_expire_at: float | None = None

    def __repr__(self) -> str:  # never the keys
        role = "initiator" if self.is_initiator else "responder"
        spis = f"{self.spi_i.hex()}/{self.spi_r.hex()}"
        return f"IkeSa({self.config.remote_address[0]} {role} {spis} {self.state.value})"

    def set_state(self, new: IkeState) -> None:
        """The one way the IKE SA's state changes (logged at debug)."""
        log_change(f"IKE SA {self.spi_i.hex()}/{self.spi_r.hex()}", self.state, new)
        self.state = new

    @classmethod
    def initiator(
        cls, config: IkeSaConfig, now: float, random: Callable[[int], bytes] = os.urandom
    ) -> IkeSa:
        """Start an IKE SA: queues the IKE_SA_INIT request."""
        sa = cls(config, True, random)
        sa.link.spi_i = sa.spi8()
        sa.link.ni = random(config.nonce_len)
        task = IkeInitTask(sa)
        sa.active = task
        task.set_state(TaskState.ACTIVE)
        task.send(now)
        return sa

    @classmethod
    def responder(cls, config: IkeSaConfig, random: Callable[[int], bytes] = os.urandom) -> IkeSa:
        """A responder waiting for its first IKE_SA_INIT request (see ``cookies`` first)."""
        return cls(config, False, random)

    # ---------------------------------------------------------------- public API: I/O

    def datagrams_to_send(self) -> list[bytes]:
        out = list(self._out)
        self._out.clear()  # the links hold this list
        return out

    def next_event(self) -> Event | None:
        return self._events.pop(0) if self._events else None

    def get_timer(self) -> float | None:
        """When ``handle_timer`` next has work: retransmission, rekey, expiry or a retry."""
        times = [self.link.get_timer(), *(r.get_timer() for r in self._retired)]
        if self.pending_auth is not None:
            times.append(self.pending_auth.deadline)
        if self.state == IkeState.ESTABLISHED:
            times += [self._ike_rekey_at, self._ike_expire_at, *self._children.timers()]
            if self.active is None:
                times += [t.not_before for t in self._queue]
        return min((t for t in times if t is not None), default=None)

    def handle_timer(self, now: float) -> None:
        """Retransmit with exponential back-off (or give up), rekey, expire, retry;
        drop what is left of a fragmented message that never completed."""
        for r in self._retired:
            r.handle_timer(now)
        self._retired = tuple(r for r in self._retired if not r.over)
        self.link.expire_fragments(now)
        held = self.pending_auth
        if held is not None and now >= held.deadline:
            self.peer_key_found(None, now, f"no key within {self.config.peer_key_timeout:g}s")
            return
        if not self.link.retransmit(now):
            self.fail(
                f"no answer from {self.config.remote_address[0]} after {self.link.tries} tries",
                unanswered=self.state == IkeState.ESTABLISHED,
            )
            return
        if self.state == IkeState.ESTABLISHED:
            self._lifetimes(now)
        self._pump(now)

    def receive_datagram(self, data: bytes, now: float, remote: Address | None = None) -> None:
        """Process one IKE datagram (no non-ESP marker). Garbage is dropped silently
        (RFC 7296 §2.21); an error of ours while handling it fails the SA."""
        if self.state.over:
            return
        data = bytes(data)
        try:
            msg = Message.decode(data)
        except IkeDecodeError:
            return
        try:
            with contextlib.suppress(IkeDecodeError, IkeCryptoError):
                self._route(msg, data, now, remote or self.config.remote_address)
        except Exception as e:
            log.warning("IKE SA with %s: internal error: %r", self.peer.ip, e)
            self.fail(f"internal error handling a message from {self.peer.ip}: {e!r}")
            return
        self._retired = tuple(r for r in self._retired if not r.over)
        self._pump(now)

    # ---------------------------------------------------------------- public API: queries

    @property
    def spi_i(self) -> bytes:
        return self.link.spi_i

    @property
    def spi_r(self) -> bytes:
        return self.link.spi_r

    @property
    def is_initiator(self) -> bool:
        return self.link.is_initiator

    @property
    def half_open(self) -> bool:
        """True until IKE_AUTH completes: the endpoint counts these against its limits."""
        return self.state.half_open

    @property
    def fragment_bytes(self) -> int:
        """Bytes of the peer's fragments held for messages not complete yet (RFC 7383)."""
        return self.link.fragment_bytes + sum(r.link.fragment_bytes for r in self._retired)

    def take_fragment_stats(self) -> FragmentStats:
        """Fragments dropped and messages abandoned since the last call (the endpoint
        adds them to its counters)."""
        return self._frag_stats.take()

    def drop_fragments(self, reason: str) -> None:
        """Abandon every incomplete fragmented message held (the endpoint is over its
        total limit); counted in ``take_fragment_stats``."""
        for link in (self.link, *(r.link for r in self._retired)):
            link.drop_fragments(reason)

    def spis(self) -> list[tuple[bytes, bytes]]:
        """Every (SPIi, SPIr) this object answers for: the current SA, then replaced ones."""
        return [(self.spi_i, self.spi_r)] + [(r.link.spi_i, r.link.spi_r) for r in self._retired]

    def child_sas(self) -> list[ChildSaInfo]:
        """The Child SAs this IKE SA carries, for status output."""
        return [c.info() for c in self._children.values()]

    @property
    def nat_detected(self) -> tuple[bool, bool]:
        """(we are behind a NAT, the peer is), known once IKE_SA_INIT is answered."""
        return self.peer.nat_local, self.peer.nat_remote

    @property
    def ike_rekey_at(self) -> float | None:
        return self._ike_rekey_at

    def negotiated_keys(self) -> NegotiatedKeys | None:
        """The current IKE SA's transforms, nonces and keys (None before IKE_SA_INIT ends)."""
        k, link = self.link.keys, self.link
        if k is None:
            return None
        s = k.choice.spec
        return NegotiatedKeys(
            link.spi_i,
            link.spi_r,
            link.ni,
            link.nr,
            s.encr,
            s.key_bits,
            s.integ,
            s.prf,
            k.choice.dh,
            k.keys,
        )

    # ---------------------------------------------------------------- public API: commands

    def peer_key_found(self, key: ike_auth.PublicKey | None, now: float, why: str = "") -> None:
        """The owner's answer to PeerKeyNeeded: the validated key of the identity the
        initiator sent, or None (``why``: what the lookup found). The held IKE_AUTH is
        checked with it and answered; no key fails the SA with AUTHENTICATION_FAILED.
        A late answer (the SA gave up or moved on) is ignored."""
        held, self.pending_auth = self.pending_auth, None
        if held is None or self.state != IkeState.AUTH_PENDING:
            return
        try:
            held.resume(key, now, why)
        except Exception as e:
            log.warning("IKE SA with %s: internal error: %r", self.peer.ip, e)
            self.fail(f"internal error resuming IKE_AUTH from {self.peer.ip}: {e!r}")
            return
        self._pump(now)

    def create_child(
        self,
        ts_local: tuple[TrafficSelector, ...],
        ts_remote: tuple[TrafficSelector, ...],
        transport: bool = False,
        now: float = 0.0,
    ) -> int:
        """Ask for one more Child SA on this IKE SA (CREATE_CHILD_SA, §1.3.1).

        Returns a request id that the resulting ChildSaEstablished or
        ChildSaFailed carries. May be called before the IKE SA is up: the
        request waits for it (window size 1 queues the rest).
        """
        if self.state.over or self.state == IkeState.DELETING or self.delete_requested:
            raise IkeError(f"IKE SA with {self.peer.ip} is {self.state}: no new Child SAs")
        rid = self._next_request_id
        self._next_request_id += 1
        ts = (tuple(ts_local), tuple(ts_remote))
        self.enqueue(CreateChildTask(self, now, rid, ts, transport))
        self._pump(now)
        return rid

    def rekey_child(self, spi_in: bytes, now: float) -> None:
        """Rekey one Child SA (by our inbound SPI); ChildSaRekeyed follows, then
        ChildSaDeleted for the old pair."""
        c = self._children.get(spi_in)
        if self.state != IkeState.ESTABLISHED or c is None or c.state != ChildState.INSTALLED:
            raise IkeError(f"no installed Child SA with inbound SPI {spi_in.hex()}")
        if any(isinstance(t, RekeyChildTask) and t.child == spi_in for t in self._queue):
            return
        self.enqueue(RekeyChildTask(self, spi_in, now))
        self._pump(now)

    def rekey(self, now: float) -> None:
        """Rekey the IKE SA itself (§2.18); IkeSaRekeyed follows."""
        if self.state != IkeState.ESTABLISHED:
            raise IkeError("only an established IKE SA can be rekeyed")
        if any(isinstance(t, IkeRekeyTask) for t in (*self._queue, self.active)):
            return
        self.enqueue(IkeRekeyTask(self, now))
        self._pump(now)

    def send_liveness_check(self, now: float) -> None:
        """Empty INFORMATIONAL request (RFC 7296 §1.4); no answer after the retries fails the SA."""
        if self.state != IkeState.ESTABLISHED:
            raise IkeError("liveness checks need an established IKE SA")
        if self.active is not None:
            raise IkeError("a request is still outstanding (window size 1)")
        self.enqueue(LivenessTask(self, now), front=True)
        self._pump(now)

    def delete_child(self, spi_in: bytes, now: float) -> None:
        """Delete one Child SA by our inbound SPI; ChildSaDeleted follows the peer's answer."""
        c = self._children.get(spi_in)
        if self.state != IkeState.ESTABLISHED or c is None or c.state == ChildState.DELETING:
            raise IkeError(f"no Child SA with inbound SPI {spi_in.hex()}")
        self.queue_delete(c, "deleted by us", now)
        self._pump(now)

    def abort(self, reason: str) -> None:
        """Fail now, before establishment: the transport learned that the peer cannot be
        reached (an ICMP unreachable quoting our own request), so retransmitting would
        only delay the caller's fallback. IkeSaFailed follows; a no-op once established."""
        if self.state in (IkeState.INIT_SENT, IkeState.INIT_DONE, IkeState.AUTH_SENT):
            self.fail(reason)

    def delete(self, now: float) -> None:
        """Delete the IKE SA and its Child SAs (RFC 7296 §1.4.1); IkeSaDeleted follows."""
        if self.state != IkeState.ESTABLISHED or self.delete_requested:
            raise IkeError("only an established IKE SA can be deleted")
        self.delete_requested = True
        for t in self._queue:
            t.cancelled()
        self._queue.clear()
        self.enqueue(DeleteIkeTask(self, now))
        self._pump(now)

    # ---------------------------------------------------------------- for the tasks

    @property
    def children(self) -> ChildTable:
        return self._children

    def spi8(self) -> bytes:
        spi = self.random(8)
        return spi if spi != ZERO_SPI else b"\x00" * 7 + b"\x01"

    def spi4(self) -> bytes:
        spi = self.random(4)
        return spi if int.from_bytes(spi, "big") > 255 else b"\x00\x00\x01\x00"

    def uniform(self) -> float:
        """A value in [0, 1) from the injected randomness (rekey jitter, retry delays)."""
        return int.from_bytes(self.random(4), "big") / 2**32

    def emit(self, event: Event) -> None:
        self._events.append(event)

    def send_plain(self, datagram: bytes) -> None:
        """An unprotected datagram outside the window (an IKE_SA_INIT refusal)."""
        self._out.append(datagram)

    def fail(
        self,
        reason: str,
        notify: int | None = None,
        *,
        unanswered: bool = False,
        offers: ProposalMismatch | None = None,
    ) -> None:
        self.pending_auth = None
        self.set_state(IkeState.FAILED)
        self.link.close()
        self.emit(IkeSaFailed(reason, notify, unanswered, offers))

    def close(self, reason: str) -> None:
        self.set_state(IkeState.CLOSED)
        self.link.close()
        self._queue.clear()
        self.emit(IkeSaDeleted(self.spi_i, self.spi_r, reason))

    def established(self, now: float) -> None:
        self.set_state(IkeState.ESTABLISHED)
        self.established_at = now
        # both ends' AUTH are done: IKE_SA_INIT's bytes are signed nowhere else (~600 B)
        self.handshake.ours = self.handshake.theirs = b""
        self.handshake.peer_hashes = None
        self._ike_rekey_at, self._ike_expire_at = self._lifetime(self.config.ike_lifetime, now)

    def enqueue(self, task: Task, front: bool = False) -> None:
        """Queue an exchange of ours; it starts when the window is free."""
        task.set_state(TaskState.QUEUED)
        if front:
            self._queue.insert(0, task)
        else:
            self._queue.append(task)

    def start(self, task: Task, now: float) -> None:
        """Send ``task``'s request now (the window is free)."""
        payloads = task.build(now)
        if payloads is None:
            task.set_state(TaskState.DONE)
            return
        self.active = task
        task.set_state(TaskState.ACTIVE)
        self.link.request(task.exchange, payloads, now)

    def respond(self, request: Message, payloads: list[Payload]) -> None:
        self.link.respond(request, payloads)

    def refuse(self, request: Message, notify: int, data: bytes = b"", spi: bytes = b"") -> None:
        proto = ProtocolId.ESP if spi else 0
        self.link.respond(request, [Notify(proto, notify, spi, data)])

    def ts_policy(self) -> TsPolicy:
        # A key looked up for the peer's name is confined as one looked up for its
        # address: the name proves who it is, not which addresses it may speak for.
        bound = self.config.peer_key_address_bound or self.peer.key_by_identity
        confined = self.config.containment.confines(self.peer.auth_method == AuthMethod.NULL, bound)
        return TsPolicy(self.config, self.peer.ip, confined)

    def new_child(
        self,
        choice: EspChoice,
        our_spi: bytes,
        ts: tuple[list[TrafficSelector], list[TrafficSelector]],
        transport: bool,
        nonces: tuple[bytes, bytes],
        shared: bytes | None,
        we_initiated: bool,
        now: float,
        request_id: int | None = None,
        addresses: tuple[IpAddress, ...] = (),
    ) -> ChildRecord:
        """Derive the keys of a new Child SA (``ts``: our side, the peer's) and record
        it, not yet reported."""
        keys = self.link.keys
        assert keys is not None
        sk_d = keys.keys.sk_d
        ein, ain, eout, aout = child_keys(choice, keys.prf, sk_d, *nonces, shared, we_initiated)
        s, p = choice.spec, self.peer
        ev = ChildSaEstablished(
            self.spi_i,
            self.spi_r,
            our_spi,
            choice.peer_spi,
            "transport" if transport else "tunnel",
            s.encr,
            s.key_bits,
            s.integ,
            choice.esn == 1,
            ein,
            ain,
            eout,
            aout,
            reuse(ts[0], self.config.local_ts),
            reuse(ts[1], self.config.remote_ts),
            p.nat_local or p.nat_remote,
            request_id,
            addresses,
        )
        rekey_at, expire_at = self._lifetime(self.config.child_lifetime, now)
        rec = ChildRecord(ev, choice, transport, now, rekey_at, expire_at, reported=False)
        self._children[our_spi] = rec
        return rec

    def report(self, child: ChildRecord, old: ChildRecord | None = None) -> None:
        self._children.report(child, old)

    def remove_child(self, child: ChildRecord, reason: str) -> None:
        self._children.remove(child, reason)

    def queue_delete(self, child: ChildRecord, reason: str, now: float) -> None:
        child.set_state(ChildState.DELETING)
        self.enqueue(DeleteChildTask(self, child.spi_in, reason, now), front=True)

    def switch_to(self, link: IkeLink, now: float) -> RetiredLink:
        """Run on ``link`` from now on (an IKE SA rekey); the replaced link is retired
        and returned. An exchange of ours still in flight on it is sent again on the
        new one, unless it is the IKE rekey itself."""
        old = self.retire(self.link, now + self.config.retire_timeout)
        pending, self.active = self.active, None
        if pending is not None and not isinstance(pending, IkeRekeyTask):
            old.link.answered()  # the replaced SA will not complete it
            pending.migrate()
            self.enqueue(pending, front=True)
        self.link = link
        self._ike_rekey_at, self._ike_expire_at = self._lifetime(self.config.ike_lifetime, now)
        self.emit(
            IkeSaRekeyed(old.link.spi_i, old.link.spi_r, self.spi_i, self.spi_r, self.is_initiator)
        )
        return old

    def retire(self, link: IkeLink, retire_at: float | None) -> RetiredLink:
        """Keep ``link`` only to finish its Delete exchange (or until ``retire_at``)."""
        retired = RetiredLink(link, retire_at)
        self._retired = (*self._retired, retired)
        return retired

    # ---------------------------------------------------------------- internals

    def _lifetime(self, lifetime: float | None, now: float) -> tuple[float | None, float | None]:
        """(rekey_at, expire_at) for an SA created now: rekey randomized in its window."""
        if lifetime is None:
            return None, None
        c = self.config
        rekey = lifetime * (1 - c.rekey_margin - c.rekey_jitter * self.uniform())
        return now + rekey, now + lifetime

    def _lifetimes(self, now: float) -> None:
        if self._ike_expire_at is not None and now >= self._ike_expire_at:
            self._ike_expire_at = self._ike_rekey_at = None
            if not self.delete_requested:
                self.delete(now)
            return
        if self._ike_rekey_at is not None and now >= self._ike_rekey_at:
            self._ike_rekey_at = None
            self.rekey(now)
        for c in list(self._children.values()):
            if c.expire_at is not None and now >= c.expire_at and c.state != ChildState.DELETING:
                c.expire_at = None
                self.queue_delete(c, "lifetime expired", now)
            elif c.rekey_at is not None and now >= c.rekey_at and c.state == ChildState.INSTALLED:
                c.rekey_at = None
                self.rekey_child(c.spi_in, now)

    def _pump(self, now: float) -> None:
        """Start the next queued exchange when the window is free."""
        while self.active is None and self.state == IkeState.ESTABLISHED and self._queue:
            ready = next((t for t in self._queue if t.not_before <= now), None)
            if ready is None:
                return
            self._queue.remove(ready)
            self.start(ready, now)

    def _route(self, msg: Message, data: bytes, now: float, remote: Address) -> None:
        """To a retired link by its SPIs, or through the dispatch table."""
        spis = (msg.spi_i, msg.spi_r)
        for r in self._retired:
            if spis == (r.link.spi_i, r.link.spi_r):
                r.receive(msg, data, now)
                return
        if msg.spi_i != self.spi_i:
            if self.is_initiator or self.state != IkeState.IDLE:
                return
        elif msg.spi_r not in (self.spi_r, ZERO_SPI) and self.spi_r != ZERO_SPI:
            return
        link = self.link
        if msg.is_response and not link.awaits(msg):
            return
        if not msg.is_response and not link.is_new_request(msg):
            return
        handler = DISPATCH.get((msg.exchange_type, msg.is_response, self.state))
        if handler is not None:
            handler(self, msg, data, now, remote)


# --------------------------------------------------------------------------- dispatch

Handler = Callable[[IkeSa, Message, bytes, float, Address], None]


def _init_response(sa: IkeSa, msg: Message, raw: bytes, now: float, remote: Address) -> None:
    if isinstance(sa.active, IkeInitTask):
        sa.active.process_init(msg, raw, remote, now)


def _response(sa: IkeSa, msg: Message, raw: bytes, now: float, remote: Address) -> None:
    """An encrypted response: to the task that sent the request."""
    task = sa.active
    if task is None or task.exchange != msg.exchange_type or sa.link.keys is None:
        return
    inner = sa.link.open(raw, msg, now)
    if inner is None:
        return
    sa.active = None
    sa.link.answered()
    task.set_state(TaskState.DONE)
    task.process(inner, now)


def _init_request(sa: IkeSa, msg: Message, raw: bytes, now: float, remote: Address) -> None:
    IkeInitResponder(sa).process_init(msg, raw, remote)


def _request(make: Callable[[IkeSa, Message], Responder | None]) -> Handler:
    """An encrypted request, answered by the responder ``make`` picks."""

    def handle(sa: IkeSa, msg: Message, raw: bytes, now: float, remote: Address) -> None:
        if sa.link.keys is None:
            return
        inner = sa.link.open(raw, msg, now)
        if inner is None:
            return
        responder = make(sa, inner)
        if responder is not None:
            responder.process(inner, now)

    return handle


def _held(sa: IkeSa, msg: Message, raw: bytes, now: float, remote: Address) -> None:
    """The initiator retransmitted the IKE_AUTH held for its key lookup: the first copy
    is answered when the key comes (nothing to replay yet, nothing to do twice)."""


_X = ExchangeType
_S = IkeState
_UP = (_S.ESTABLISHED, _S.DELETING)
_AUTH = _request(lambda sa, msg: IkeAuthResponder(sa))
_INFO = _request(lambda sa, msg: InformationalResponder(sa))
_CREATE = _request(create_child_responder)

# (exchange, is a response, IKE SA state) -> handler; anything else is dropped
DISPATCH: dict[tuple[int, bool, IkeState], Handler] = {
    (_X.IKE_SA_INIT, True, _S.INIT_SENT): _init_response,
    (_X.IKE_AUTH, True, _S.AUTH_SENT): _response,
    **{(x, True, s): _response for x in (_X.CREATE_CHILD_SA, _X.INFORMATIONAL) for s in _UP},
    (_X.IKE_SA_INIT, False, _S.IDLE): _init_request,
    (_X.IKE_AUTH, False, _S.INIT_DONE): _AUTH,
    (_X.IKE_AUTH, False, _S.AUTH_PENDING): _held,
    **{(_X.INFORMATIONAL, False, s): _INFO for s in _UP},
    **{(_X.CREATE_CHILD_SA, False, s): _CREATE for s in _UP},
}


__all__ = [
    "DEFAULT_ESP_PROPOSALS",
    "DEFAULT_IKE_PROPOSALS",
    "DISPATCH",
    "ChildSaInfo",
    "ChildState",
    "EspProposalSpec",
    "IkeProposalSpec",
    "IkeSa",
    "IkeSaConfig",
    "IkeState",
    "NegotiatedKeys",
    "PayloadType",
    "PeerFacts",
    "esp_key_lengths",
    "nat_hash",
    "select_esp_proposal",
    "select_ike_proposal",
]
