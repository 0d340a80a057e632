"""Sans-IO IKE SA state machine (RFC 7296), initiator and responder.

Feed it datagrams (``receive_datagram``), timer ticks (``handle_timer``) and
commands (``create_child``, ``rekey_child``, ``rekey``, ``delete_child``,
``delete``, ``send_liveness_check``) with the current time as a value; collect
``datagrams_to_send()`` and ``next_event()``. No sockets, no clocks: the
endpoint owns those. Randomness (SPIs, nonces, rekey jitter, retry delays)
comes from the injected ``random`` function.

One object is one IKE SA *with a peer*, across IKE SA rekeys: after a rekey
it runs under new SPIs (IkeSaRekeyed) and finishes the old SA's Delete
exchange on the side. It carries many Child SAs.

Scope: IKE_SA_INIT and IKE_AUTH (NULL auth, RFC 7427 and RSA method-1
signatures, asymmetric); INVALID_KE_PAYLOAD and COOKIE retries as initiator;
NAT detection; CREATE_CHILD_SA for new Child SAs, Child SA rekey with PFS and
IKE SA rekey, with simultaneous-rekey collisions (§2.8.1, §2.8.2) and
TEMPORARY_FAILURE (§2.25); lifetimes with jitter; INFORMATIONAL Delete,
liveness, INITIAL_CONTACT and AUTHENTICATION_FAILED; CP for inner addresses;
containment of NULL-authenticated and address-bound peers; fragmentation
(RFC 7383) both ways; retransmission with back-off, replayed responses,
window size 1. Cookies demanded as responder live in ``cookies`` (stateless).
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import os
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from . import auth as ike_auth
from .child import (
    ChildRecord,
    ChildSaInfo,
    Collision,
    Request,
    child_keys,
    cp_reply,
    cp_reply_addresses,
    cp_request,
    has_notify,
)
from .constants import (
    AuthMethod,
    ExchangeType,
    HeaderFlag,
    IdType,
    NotifyType,
    PayloadType,
    ProtocolId,
    TransformType,
    notify_name,
)
from .crypto import SUPPORTED_DH_GROUPS, KeyExchange, SkCipher, dh_group, sk_cipher
from .errors import IkeCryptoError, IkeDecodeError, IkeError, IkeProtocolError
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
from .exchanges import create_child_initiator, create_child_responder
from .fragments import DEFAULT_FRAGMENT_LIMITS, FragmentLimits, FragmentReassembler, FragmentStats
from .keys import IkeSaKeys, Prf, ike_sa_keys, rekey_skeyseed, skeyseed
from .message import Message, decrypt
from .payloads import (
    AUTH,
    CP,
    KE,
    SA,
    SKF,
    Delete,
    IDi,
    IDr,
    IpAddress,
    Nonce,
    Notify,
    Payload,
    TrafficSelector,
    TSi,
    TSr,
    decode_uint16_list,
    encode_uint16_list,
)
from .proposals import (
    DEFAULT_ESP_PROPOSALS,
    DEFAULT_IKE_PROPOSALS,
    EspChoice,
    EspProposalSpec,
    IkeChoice,
    IkeProposalSpec,
    esp_key_lengths,
    esp_proposals,
    ike_proposals,
    select_esp_proposal,
    select_ike_proposal,
    single,
)
from .selectors import ContainmentPolicy, covered, host_selector, narrow
from .states import ChildState, IkeState, log_change

Address = tuple[str, int]

DEFAULT_CONTAINMENT = ContainmentPolicy()  # frozen: NULL and address-bound peers confined

# Old private names, kept for code that imported them.
_IkeChoice = IkeChoice
_EspChoice = EspChoice


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
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


def nat_hash(spi_i: bytes, spi_r: bytes, address: Address) -> bytes:
    """NAT_DETECTION_*_IP data: SHA-1(SPIi | SPIr | IP | Port) (RFC 7296 §2.23)."""
    ip = ipaddress.ip_address(address[0]).packed
    return hashlib.sha1(spi_i + spi_r + ip + address[1].to_bytes(2, "big")).digest()


@dataclass(frozen=True)
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


# --------------------------------------------------------------------------- the state machine


@dataclass
class _Negotiated:
    choice: IkeChoice
    prf: Prf
    cipher: SkCipher = field(repr=False)
    keys: IkeSaKeys = field(repr=False)


# Fields that make up one IKE SA "link" (SPIs, keys, message IDs, retransmission
# state); an IKE SA rekey swaps them, Child SAs and the request queue stay.
_LINK_FIELDS = (
    "spi_i",
    "spi_r",
    "is_initiator",
    "_neg",
    "_ni",
    "_nr",
    "_next_mid",
    "_expect_mid",
    "_last_request",
    "_retransmit_at",
    "_tries",
    "_cached_mid",
    "_cached_response",
    "_iv_counter",
    "_reassembler",
    "_inflight",
)

_BYTES_NONE = bytes(8)


@dataclass(repr=False)
class IkeSa:
    """One IKE SA with a peer, as initiator or responder.

    Create with :meth:`initiator` / :meth:`responder`. ``is_initiator`` is our
    role in the *current* IKE SA (after a rekey it is whoever sent the rekey).
    No dataclass repr: the object holds SK_* keys, and a logged repr must not.
    """

    config: IkeSaConfig
    is_initiator: bool
    random: Callable[[int], bytes] = os.urandom
    state: IkeState = IkeState.IDLE
    spi_i: bytes = _BYTES_NONE
    spi_r: bytes = _BYTES_NONE
    established_at: float | None = None
    _events: deque[Event] = field(default_factory=deque)
    _out: list[bytes] = field(default_factory=list)
    _ke: KeyExchange | None = None
    _ni: bytes = b""
    _nr: bytes = b""
    _init_request: bytes = b""
    _init_response: bytes = b""
    _neg: _Negotiated | None = None
    _cookie: bytes = b""
    _peer_hashes: list[int] | None = None
    _nat_local: bool = False
    _nat_remote: bool = False
    _peer_frag: bool = False
    _peer_ip: str = ""
    _peer_auth_method: int = AuthMethod.NULL
    _child_spi: bytes = b""
    _next_mid: int = 0  # next message ID of our requests
    _expect_mid: int = 0  # next message ID of the peer's requests
    _last_request: list[bytes] = field(default_factory=list)
    _retransmit_at: float | None = None
    _tries: int = 0
    _cached_mid: int = -1
    _cached_response: list[bytes] = field(default_factory=list)
    _iv_counter: int = 0
    _reassembler: FragmentReassembler | None = None
    _frag_stats: FragmentStats = field(default_factory=FragmentStats)  # not per link
    _local_auth_method: int = AuthMethod.NULL
    _children: dict[bytes, ChildRecord] = field(default_factory=dict)  # by our inbound SPI
    _queue: deque[Request] = field(default_factory=deque)
    _inflight: Request | None = None
    _next_request_id: int = 1
    _delete_requested: bool = False
    _ike_rekey_at: float | None = None
    _ike_expire_at: float | None = None
    _ike_collision: Collision | None = None
    _aux: list[IkeSa] = field(default_factory=list)  # replaced / redundant IKE SAs
    _retired: bool = False  # an aux link: answers Delete and replays, refuses the rest
    _retire_at: float | None = None
    _early_deletes: set[bytes] = field(default_factory=set)  # peer SPIs deleted before known

    def __repr__(self) -> str:
        role = "initiator" if self.is_initiator else "responder"
        return (
            f"IkeSa({self.config.remote_address[0]} {role} {self.spi_i.hex()}/"
            f"{self.spi_r.hex()} {self.state.value})"
        )

    def set_state(self, new: IkeState) -> None:
        """The one way the IKE SA's state changes (logged at debug)."""
        log_change(f"IKE SA {self.spi_i.hex()}/{self.spi_r.hex()}", self.state, new)
        self.state = new

    # ---------------------------------------------------------------- construction

    @classmethod
    def initiator(
        cls, config: IkeSaConfig, now: float, random: Callable[[int], bytes] = os.urandom
    ) -> IkeSa:
        """Start an IKE SA: queues the IKE_SA_INIT request."""
        sa = cls(config, True, random)
        sa._peer_ip = config.remote_address[0]
        sa.spi_i = sa._spi8()
        sa._ni = random(config.nonce_len)
        first = config.ike_proposals[0].dh_groups[0]
        sa._ke = dh_group(first).generate()
        sa._send_init_request(now)
        return sa

    @classmethod
    def responder(cls, config: IkeSaConfig, random: Callable[[int], bytes] = os.urandom) -> IkeSa:
        """A responder waiting for its first IKE_SA_INIT request (see ``cookies`` first)."""
        sa = cls(config, False, random)
        sa._peer_ip = config.remote_address[0]
        return sa

    # ---------------------------------------------------------------- public API: I/O

    def datagrams_to_send(self) -> list[bytes]:
        out, self._out = self._out, []
        return out

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    def get_timer(self) -> float | None:
        """When ``handle_timer`` next has work: retransmission, rekey, expiry or a retry."""
        times = [self._retransmit_at, self._retire_at]
        times += [a.get_timer() for a in self._aux]
        if self._reassembler is not None:
            times.append(self._reassembler.deadline())
        if self.state == IkeState.ESTABLISHED and not self._retired:
            times += [self._ike_rekey_at, self._ike_expire_at]
            for c in self._children.values():
                if c.state == ChildState.INSTALLED:
                    times.append(c.rekey_at)
                if c.state != ChildState.DELETING:
                    times.append(c.expire_at)
            if self._inflight is None:
                times += [r.not_before for r in self._queue]
        return min((t for t in times if t is not None), default=None)

    def handle_timer(self, now: float) -> None:
        """Retransmit with exponential back-off (or give up), rekey, expire, retry;
        drop what is left of a fragmented message that never completed."""
        self._tick_aux(now)
        if self._reassembler is not None:
            self._reassembler.expire(now)
        if self._retire_at is not None and now >= self._retire_at and self._retired:
            self.set_state(IkeState.CLOSED)
            self._retransmit_at = self._retire_at = None
            return
        if self._retransmit_at is not None and now >= self._retransmit_at:
            if self._tries >= self.config.retransmit_tries:
                self._fail(
                    f"no answer from {self.config.remote_address[0]} after {self._tries} tries",
                    unanswered=self.state == IkeState.ESTABLISHED,
                )
                return
            self._tries += 1
            self._out += self._last_request
            self._retransmit_at = now + self.config.retransmit_timeout * (2**self._tries)
        if self.state == IkeState.ESTABLISHED and not self._retired:
            self._lifetimes(now)
        self._pump(now)

    def receive_datagram(self, data: bytes, now: float, remote: Address | None = None) -> None:
        """Process one IKE datagram (no non-ESP marker). Garbage is dropped silently."""
        if self.state in (IkeState.FAILED, IkeState.CLOSED):
            return
        try:
            msg = Message.decode(bytes(data))
        except IkeDecodeError:
            return
        target = self._route(msg)
        if target is None:
            return
        # RFC 7296 §2.21: ignore what fails to parse or authenticate
        with contextlib.suppress(IkeDecodeError, IkeCryptoError):
            target._receive(msg, bytes(data), now, remote or self.config.remote_address)
        if target is not self:
            self._collect_aux()
        self._pump(now)

    # ---------------------------------------------------------------- public API: queries

    @property
    def half_open(self) -> bool:
        """True until IKE_AUTH completes: the endpoint counts these against its limits."""
        return self.state.half_open

    @property
    def fragment_bytes(self) -> int:
        """Bytes of the peer's fragments held for messages not complete yet (RFC 7383)."""
        held = self._reassembler.buffered if self._reassembler is not None else 0
        return held + sum(a.fragment_bytes for a in self._aux)

    def take_fragment_stats(self) -> FragmentStats:
        """Fragments dropped and messages abandoned since the last call (the endpoint
        adds them to its counters)."""
        self._collect_aux_stats()
        return self._frag_stats.take()

    def drop_fragments(self, reason: str) -> None:
        """Abandon every incomplete fragmented message held (the endpoint is over its
        total limit); counted in ``take_fragment_stats``."""
        for link in (self, *self._aux):
            if link._reassembler is not None:
                link._reassembler.abandon_all(reason)

    def spis(self) -> list[tuple[bytes, bytes]]:
        """Every (SPIi, SPIr) this object answers for: the current SA, then replaced ones."""
        return [(self.spi_i, self.spi_r)] + [(a.spi_i, a.spi_r) for a in self._aux]

    def child_sas(self) -> list[ChildSaInfo]:
        """The Child SAs this IKE SA carries, for status output."""
        return [c.info() for c in self._children.values()]

    @property
    def nat_detected(self) -> tuple[bool, bool]:
        """(we are behind a NAT, the peer is), known once IKE_SA_INIT is answered."""
        return self._nat_local, self._nat_remote

    @property
    def ike_rekey_at(self) -> float | None:
        return self._ike_rekey_at

    def negotiated_keys(self) -> NegotiatedKeys | None:
        """The current IKE SA's transforms, nonces and keys (None before IKE_SA_INIT ends)."""
        if self._neg is None:
            return None
        s = self._neg.choice.spec
        return NegotiatedKeys(
            self.spi_i,
            self.spi_r,
            self._ni,
            self._nr,
            s.encr,
            s.key_bits,
            s.integ,
            s.prf,
            self._neg.choice.dh,
            self._neg.keys,
        )

    # ---------------------------------------------------------------- public API: commands

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
        if self.state.over or self.state == IkeState.DELETING or self._delete_requested:
            raise IkeError(f"IKE SA with {self._peer_ip} is {self.state}: no new Child SAs")
        rid = self._next_request_id
        self._next_request_id += 1
        self._queue.append(
            Request("create", rid, tuple(ts_local), tuple(ts_remote), transport, not_before=now)
        )
        self._pump(now)
        return rid

    def rekey_child(self, spi_in: bytes, now: float) -> None:
        """Rekey one Child SA (by our inbound SPI); ChildSaRekeyed follows, then
        ChildSaDeleted for the old pair."""
        c = self._children.get(spi_in)
        if self.state != IkeState.ESTABLISHED or c is None or c.state != ChildState.INSTALLED:
            raise IkeError(f"no installed Child SA with inbound SPI {spi_in.hex()}")
        if any(r.kind == "rekey-child" and r.child == spi_in for r in self._queue):
            return
        self._queue.append(Request("rekey-child", child=spi_in, not_before=now))
        self._pump(now)

    def rekey(self, now: float) -> None:
        """Rekey the IKE SA itself (§2.18); IkeSaRekeyed follows."""
        if self.state != IkeState.ESTABLISHED or self._retired:
            raise IkeError("only an established IKE SA can be rekeyed")
        if any(r.kind == "rekey-ike" for r in self._queue) or (
            self._inflight is not None and self._inflight.kind == "rekey-ike"
        ):
            return
        self._queue.append(Request("rekey-ike", not_before=now))
        self._pump(now)

    def send_liveness_check(self, now: float) -> None:
        """Empty INFORMATIONAL request (RFC 7296 §1.4); no answer after the retries fails the SA."""
        if self.state != IkeState.ESTABLISHED:
            raise IkeError("liveness checks need an established IKE SA")
        if self._inflight is not None:
            raise IkeError("a request is still outstanding (window size 1)")
        self._queue.appendleft(Request("info", not_before=now))
        self._pump(now)

    def delete_child(self, spi_in: bytes, now: float) -> None:
        """Delete one Child SA by our inbound SPI; ChildSaDeleted follows the peer's answer."""
        c = self._children.get(spi_in)
        if self.state != IkeState.ESTABLISHED or c is None or c.state == ChildState.DELETING:
            raise IkeError(f"no Child SA with inbound SPI {spi_in.hex()}")
        self._queue_delete(c, "deleted by us", now)
        self._pump(now)

    def abort(self, reason: str) -> None:
        """Fail now, before establishment: the transport learned that the peer cannot be
        reached (an ICMP unreachable quoting our own request), so retransmitting would
        only delay the caller's fallback. IkeSaFailed follows; a no-op once established."""
        if self.state in (IkeState.INIT_SENT, IkeState.INIT_DONE, IkeState.AUTH_SENT):
            self._fail(reason)

    def delete(self, now: float) -> None:
        """Delete the IKE SA and its Child SAs (RFC 7296 §1.4.1); IkeSaDeleted follows."""
        if self.state != IkeState.ESTABLISHED or self._delete_requested:
            raise IkeError("only an established IKE SA can be deleted")
        self._delete_requested = True
        for r in list(self._queue):
            if r.kind == "create":
                self._events.append(
                    ChildSaFailed("the IKE SA is being deleted", None, r.request_id)
                )
        self._queue.clear()
        self._queue.append(Request("delete-ike", not_before=now))
        self._pump(now)

    # ---------------------------------------------------------------- helpers

    def _spi8(self) -> bytes:
        spi = self.random(8)
        return spi if spi != _BYTES_NONE else b"\x00" * 7 + b"\x01"

    def _spi4(self) -> bytes:
        spi = self.random(4)
        return spi if int.from_bytes(spi, "big") > 255 else b"\x00\x00\x01\x00"

    def _uniform(self) -> float:
        """A value in [0, 1) from the injected randomness (rekey jitter, retry delays)."""
        return int.from_bytes(self.random(4), "big") / 2**32

    def _flags(self, response: bool) -> int:
        return (HeaderFlag.INITIATOR if self.is_initiator else 0) | (
            HeaderFlag.RESPONSE if response else 0
        )

    def _fail(self, reason: str, notify: int | None = None, *, unanswered: bool = False) -> None:
        self.set_state(IkeState.FAILED)
        self._retransmit_at = None
        self._reassembler = None
        self._events.append(IkeSaFailed(reason, notify, unanswered))

    def _send_request(self, datagrams: list[bytes], now: float) -> None:
        self._last_request = datagrams
        self._out += datagrams
        self._tries = 0
        self._retransmit_at = now + self.config.retransmit_timeout

    def _iv(self, cipher: SkCipher) -> bytes:
        if cipher.iv_len == 8:  # AEAD: a counter never repeats under one key
            self._iv_counter += 1
            return self._iv_counter.to_bytes(8, "big")
        return self.random(cipher.iv_len)

    def _out_keys(self) -> tuple[bytes, bytes]:
        assert self._neg is not None
        k = self._neg.keys
        return (k.sk_ei, k.sk_ai) if self.is_initiator else (k.sk_er, k.sk_ar)

    def _seal(self, msg: Message) -> bytes:
        assert self._neg is not None
        ke, ka = self._out_keys()
        return msg.encrypt(self._neg.cipher, ke, ka, self._iv(self._neg.cipher))

    def _protect(self, msg: Message) -> list[bytes]:
        """Seal ``msg``; as SKF fragments (RFC 7383) when the peer supports them and
        the whole message would exceed ``fragment_size``."""
        whole = self._seal(msg)
        size = self.config.fragment_size
        if not self._peer_frag or len(whole) <= size:
            return [whole]
        assert self._neg is not None
        ke, ka = self._out_keys()
        ivs = [self._iv(self._neg.cipher) for _ in range(len(whole) // (size // 2) + 2)]
        return msg.encrypt_fragments(self._neg.cipher, ke, ka, ivs, size)

    def _open(self, data: bytes, first: Message, now: float) -> Message | None:
        """Decrypt an in-window message, or add a fragment of one (None until complete)."""
        assert self._neg is not None
        k = self._neg.keys
        ke, ka = (k.sk_er, k.sk_ar) if self.is_initiator else (k.sk_ei, k.sk_ai)
        if first.payloads and isinstance(first.payloads[-1], SKF):
            if self._reassembler is None:
                self._reassembler = FragmentReassembler(
                    self._neg.cipher, ke, ka, self.config.fragment_limits, self._frag_stats
                )
            return self._reassembler.add(data, now, first)
        return decrypt(data, self._neg.cipher, ke, ka)

    def _stray(self, msg: Message, why: str) -> None:
        """Count a fragment for a message ID outside the window: never buffered."""
        if msg.payloads and isinstance(msg.payloads[-1], SKF):
            self._frag_stats.drop(f"fragment of message {msg.message_id}: {why}")

    def _nat_notifies(self, spi_r: bytes) -> list[Payload]:
        c = self.config
        source = nat_hash(self.spi_i, spi_r, c.local_address)
        if c.force_udp_encap:
            # a source hash that matches no address: the peer sees us behind a NAT and
            # sends ESP in UDP (strongSwan's encap=yes does the same)
            source = hashlib.sha1(b"oe-router: UDP encapsulation forced" + source).digest()
        return [
            Notify.status(NotifyType.NAT_DETECTION_SOURCE_IP, source),
            Notify.status(
                NotifyType.NAT_DETECTION_DESTINATION_IP,
                nat_hash(self.spi_i, spi_r, c.remote_address),
            ),
        ]

    def _check_nat(self, msg: Message, remote: Address) -> None:
        """RFC 7296 §2.23: no source hash matching means the peer is NATed; a
        destination hash not matching our address means we are."""
        notifies = [p for p in msg.payloads if isinstance(p, Notify)]
        src = [n.data for n in notifies if n.notify_type == NotifyType.NAT_DETECTION_SOURCE_IP]
        dst = [n.data for n in notifies if n.notify_type == NotifyType.NAT_DETECTION_DESTINATION_IP]
        if src:
            self._nat_remote = nat_hash(msg.spi_i, msg.spi_r, remote) not in src
        if dst:
            self._nat_local = nat_hash(msg.spi_i, msg.spi_r, self.config.local_address) not in dst
        if self.config.force_udp_encap:
            self._nat_local = True  # as we told the peer: float to 4500, send keepalives
        self._peer_frag = any(
            n.notify_type == NotifyType.IKEV2_FRAGMENTATION_SUPPORTED for n in notifies
        )

    def _common_init_notifies(self) -> list[Payload]:
        return [
            Notify.status(NotifyType.IKEV2_FRAGMENTATION_SUPPORTED),
            Notify.status(
                NotifyType.SIGNATURE_HASH_ALGORITHMS,
                encode_uint16_list(list(ike_auth.OUR_HASH_ALGORITHMS)),
            ),
        ]

    def _derive(self, choice: IkeChoice, shared: bytes) -> None:
        s = choice.spec
        prf = Prf(s.prf)
        cipher = sk_cipher(s.encr, s.key_bits, s.integ)
        seed = skeyseed(prf, self._ni, self._nr, shared)
        keys = ike_sa_keys(
            prf,
            seed,
            self._ni,
            self._nr,
            self.spi_i,
            self.spi_r,
            integ_key_len=cipher.integ_key_len,
            encr_key_len=cipher.encr_key_len,
        )
        self._neg = _Negotiated(choice, prf, cipher, keys)

    def _id_payload(self, initiator: bool) -> IDi | IDr:
        t, d = self.config.local_id
        return IDi(t, d) if initiator else IDr(t, d)

    def _make_auth(self, ident: IDi | IDr) -> AUTH:
        auth = self._compute_auth(ident)
        self._local_auth_method = auth.method
        return auth

    def _compute_auth(self, ident: IDi | IDr) -> AUTH:
        assert self._neg is not None
        k = self._neg.keys
        if self.is_initiator:
            octets = ike_auth.signed_octets(
                self._init_request, self._nr, self._neg.prf, k.sk_pi, ident
            )
            sk_p = k.sk_pi
        else:
            octets = ike_auth.signed_octets(
                self._init_response, self._ni, self._neg.prf, k.sk_pr, ident
            )
            sk_p = k.sk_pr
        if self.config.private_key is None:
            return ike_auth.null_auth(self._neg.prf, sk_p, octets)
        return ike_auth.signature_auth(
            self.config.private_key, octets, self._peer_hashes, rsa_pss=self.config.rsa_pss
        )

    def _verify_auth(self, auth: AUTH, ident: IDi | IDr) -> None:
        assert self._neg is not None
        k = self._neg.keys
        if self.is_initiator:  # verifying the responder
            octets = ike_auth.signed_octets(
                self._init_response, self._ni, self._neg.prf, k.sk_pr, ident
            )
            sk_p = k.sk_pr
        else:
            octets = ike_auth.signed_octets(
                self._init_request, self._nr, self._neg.prf, k.sk_pi, ident
            )
            sk_p = k.sk_pi
        if self.config.peer_public_key is None:
            ike_auth.verify_null_auth(auth, self._neg.prf, sk_p, octets)
        else:
            ike_auth.verify_signature_auth(auth, self.config.peer_public_key, octets)
        self._peer_auth_method = auth.method

    def _ike_event(self, peer: IDi | IDr, peer_auth: int, local_auth: int) -> IkeSaEstablished:
        assert self._neg is not None
        s = self._neg.choice.spec
        return IkeSaEstablished(
            self.spi_i,
            self.spi_r,
            self.is_initiator,
            self.config.local_id,
            (peer.id_type, peer.data),
            local_auth,
            peer_auth,
            s.encr,
            s.key_bits,
            s.prf,
            s.integ,
            self._neg.choice.dh,
            self._nat_local,
            self._nat_remote,
        )

    def _lifetime(self, lifetime: float | None, now: float) -> tuple[float | None, float | None]:
        """(rekey_at, expire_at) for an SA created now: rekey randomized in its window."""
        if lifetime is None:
            return None, None
        c = self.config
        rekey = lifetime * (1 - c.rekey_margin - c.rekey_jitter * self._uniform())
        return now + rekey, now + lifetime

    def _established(self, now: float) -> None:
        self.set_state(IkeState.ESTABLISHED)
        self.established_at = now
        self._ike_rekey_at, self._ike_expire_at = self._lifetime(self.config.ike_lifetime, now)

    # ---------------------------------------------------------------- Child SA records

    def _confined(self) -> bool:
        return self.config.containment.confines(
            self._peer_auth_method == AuthMethod.NULL, self.config.peer_key_address_bound
        )

    def _new_child(
        self,
        choice: EspChoice,
        our_spi: bytes,
        ts_local: list[TrafficSelector],
        ts_remote: list[TrafficSelector],
        transport: bool,
        nonces: tuple[bytes, bytes],
        shared: bytes | None,
        we_initiated: bool,
        now: float,
        request_id: int | None = None,
        addresses: tuple[IpAddress, ...] = (),
    ) -> ChildRecord:
        """Derive the keys of a new Child SA and record it (not yet reported)."""
        assert self._neg is not None
        ein, ain, eout, aout = child_keys(
            choice, self._neg.prf, self._neg.keys.sk_d, nonces[0], nonces[1], shared, we_initiated
        )
        s = choice.spec
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
            tuple(ts_local),
            tuple(ts_remote),
            self._nat_local or self._nat_remote,
            request_id,
            addresses,
        )
        rekey_at, expire_at = self._lifetime(self.config.child_lifetime, now)
        rec = ChildRecord(ev, choice, transport, now, rekey_at, expire_at, reported=False)
        self._children[our_spi] = rec
        return rec

    def _report(self, child: ChildRecord, old: ChildRecord | None = None) -> None:
        child.reported = True
        self._events.append(child.event if old is None else child.rekeyed_event(old))

    def _remove_child(self, child: ChildRecord, reason: str) -> None:
        if self._children.pop(child.spi_in, None) is not None and child.reported:
            self._events.append(ChildSaDeleted(child.spi_in, child.spi_out, reason))

    def _queue_delete(self, child: ChildRecord, reason: str, now: float) -> None:
        child.set_state(ChildState.DELETING)
        self._queue.appendleft(
            Request("delete-child", child=child.spi_in, reason=reason, not_before=now)
        )

    def _lifetimes(self, now: float) -> None:
        if self._ike_expire_at is not None and now >= self._ike_expire_at:
            self._ike_expire_at = self._ike_rekey_at = None
            if not self._delete_requested:
                self.delete(now)
            return
        if self._ike_rekey_at is not None and now >= self._ike_rekey_at:
            self._ike_rekey_at = None
            self.rekey(now)
        for c in list(self._children.values()):
            if c.expire_at is not None and now >= c.expire_at and c.state != ChildState.DELETING:
                c.expire_at = None
                self._queue_delete(c, "lifetime expired", now)
            elif c.rekey_at is not None and now >= c.rekey_at and c.state == ChildState.INSTALLED:
                c.rekey_at = None
                self.rekey_child(c.spi_in, now)

    # ---------------------------------------------------------------- replaced IKE SAs

    def _tick_aux(self, now: float) -> None:
        for a in self._aux:
            a.handle_timer(now)
        self._collect_aux()

    def _collect_aux_stats(self) -> None:
        for a in self._aux:
            self._frag_stats.add(a.take_fragment_stats())

    def _collect_aux(self) -> None:
        """Forward what replaced/redundant IKE SAs send; forget them once closed."""
        self._collect_aux_stats()
        for a in self._aux:
            self._out += a.datagrams_to_send()
            while a.next_event() is not None:
                pass  # their deletion is internal: the Child SAs live on in this object
        self._aux = [a for a in self._aux if a.state not in (IkeState.CLOSED, IkeState.FAILED)]

    def _route(self, msg: Message) -> IkeSa | None:
        for a in self._aux:
            if (msg.spi_i, msg.spi_r) == (a.spi_i, a.spi_r):
                return a
        if msg.spi_i != self.spi_i:
            return self if (not self.is_initiator and self.state == IkeState.IDLE) else None
        if msg.spi_r not in (self.spi_r, _BYTES_NONE) and self.spi_r != _BYTES_NONE:
            return None
        return self

    def _link(self, spi_i: bytes, spi_r: bytes, initiator: bool, neg: _Negotiated) -> IkeSa:
        """A bare IKE SA link sharing our config: a rekeyed, replaced or redundant SA."""
        link = IkeSa(self.config, initiator, self.random)
        link.spi_i, link.spi_r, link._neg = spi_i, spi_r, neg
        link.set_state(IkeState.ESTABLISHED)
        link._retired = True
        link._peer_frag, link._peer_ip = self._peer_frag, self._peer_ip
        link._nat_local, link._nat_remote = self._nat_local, self._nat_remote
        return link

    def _rekeyed_link(
        self,
        choice: IkeChoice,
        shared: bytes,
        ni: bytes,
        nr: bytes,
        spis: tuple[bytes, bytes],
        we_initiated: bool,
    ) -> IkeSa:
        """Keys of the new IKE SA: SKEYSEED = prf(SK_d (old), g^ir (new) | Ni | Nr) (§2.18)."""
        assert self._neg is not None
        s = choice.spec
        prf = Prf(s.prf)
        cipher = sk_cipher(s.encr, s.key_bits, s.integ)
        seed = rekey_skeyseed(self._neg.prf, self._neg.keys.sk_d, shared, ni, nr)
        keys = ike_sa_keys(
            prf,
            seed,
            ni,
            nr,
            spis[0],
            spis[1],
            integ_key_len=cipher.integ_key_len,
            encr_key_len=cipher.encr_key_len,
        )
        link = self._link(spis[0], spis[1], we_initiated, _Negotiated(choice, prf, cipher, keys))
        link._ni, link._nr = ni, nr
        return link

    def _switch_to(self, new: IkeSa, now: float) -> IkeSa:
        """Run as ``new`` from now on; return the replaced SA as a retired link."""
        assert self._neg is not None
        old = self._link(self.spi_i, self.spi_r, self.is_initiator, self._neg)
        for name in _LINK_FIELDS:
            setattr(old, name, getattr(self, name))
            setattr(self, name, getattr(new, name))
        old._retire_at = now + self.config.retire_timeout
        pending, old._inflight = old._inflight, None
        if pending is not None and pending.kind != "rekey-ike":
            # sent on the replaced SA, which will not complete it: redo it on the new one
            old._retransmit_at = None
            c = self._children.get(pending.child)
            if pending.kind == "rekey-child" and c is not None and c.state == ChildState.REKEYING:
                c.set_state(ChildState.INSTALLED)
            self._queue.appendleft(pending)
        self._aux.append(old)
        self._ike_rekey_at, self._ike_expire_at = self._lifetime(self.config.ike_lifetime, now)
        self._events.append(
            IkeSaRekeyed(old.spi_i, old.spi_r, self.spi_i, self.spi_r, self.is_initiator)
        )
        return old

    # ---------------------------------------------------------------- dispatch

    def _receive(self, msg: Message, data: bytes, now: float, remote: Address) -> None:
        if msg.is_response:
            if msg.message_id != self._next_mid - 1:
                self._stray(msg, f"outside the window (our request is {self._next_mid - 1})")
                return
            if self._retransmit_at is None:
                return  # a late copy of a response already taken
            if self.is_initiator and msg.exchange_type == ExchangeType.IKE_SA_INIT:
                if self.state == IkeState.INIT_SENT:
                    self._initiator_got_init(msg, data, now, remote)
            elif self.is_initiator and msg.exchange_type == ExchangeType.IKE_AUTH:
                if self.state == IkeState.AUTH_SENT and self._neg is not None:
                    inner = self._open(data, msg, now)
                    if inner is not None:
                        self._initiator_got_auth(inner, now)
            elif self._inflight is not None and self._neg is not None:
                inner = self._open(data, msg, now)
                if inner is not None:
                    self._got_response(inner, now)
            return
        if msg.message_id == self._cached_mid:
            # a retransmitted request: replay (RFC 7296 §2.1), for fragments only on #1
            skf = msg.payloads[-1] if msg.payloads else None
            if not isinstance(skf, SKF) or skf.fragment_number == 1:
                self._out += self._cached_response
            return
        if msg.message_id != self._expect_mid:
            self._stray(msg, f"outside the window (expecting {self._expect_mid})")
            return
        if not self.is_initiator and msg.exchange_type == ExchangeType.IKE_SA_INIT:
            if self.state == IkeState.IDLE:
                self._responder_got_init(msg, data, remote)
            return
        if self._neg is None:
            return
        if msg.exchange_type == ExchangeType.IKE_AUTH:
            if not self.is_initiator and self.state == IkeState.INIT_DONE:
                inner = self._open(data, msg, now)
                if inner is not None:
                    self._responder_got_auth(inner, now)
        elif self.state in (IkeState.ESTABLISHED, IkeState.DELETING):
            inner = self._open(data, msg, now)
            if inner is None:
                return
            if msg.exchange_type == ExchangeType.INFORMATIONAL:
                self._got_informational(inner, now)
            elif msg.exchange_type == ExchangeType.CREATE_CHILD_SA:
                self._got_create_child(inner, now)

    def _respond_encrypted(self, request: Message, payloads: list[Payload]) -> None:
        reply = Message(
            self.spi_i,
            self.spi_r,
            request.exchange_type,
            self._flags(True),
            request.message_id,
            payloads,
        )
        self._cached_mid = request.message_id
        self._cached_response = self._protect(reply)
        self._expect_mid = request.message_id + 1
        self._out += self._cached_response

    def _refuse(self, request: Message, notify: int, data: bytes = b"", spi: bytes = b"") -> None:
        proto = ProtocolId.ESP if spi else 0
        self._respond_encrypted(request, [Notify(proto, notify, spi, data)])

    # ---------------------------------------------------------------- our requests

    def _pump(self, now: float) -> None:
        """Start the next queued exchange when the window is free."""
        while (
            self._inflight is None
            and self.state == IkeState.ESTABLISHED
            and not self._retired
            and self._queue
        ):
            ready = next((r for r in self._queue if r.not_before <= now), None)
            if ready is None:
                return
            self._queue.remove(ready)
            self._start(ready, now)

    def _start(self, req: Request, now: float) -> None:
        assert self._neg is not None
        exchange = ExchangeType.CREATE_CHILD_SA
        payloads: list[Payload]
        if req.kind in ("create", "rekey-child"):
            old = self._children.get(req.child) if req.kind == "rekey-child" else None
            if req.kind == "rekey-child":
                if old is None or old.state != ChildState.INSTALLED:
                    return  # deleted or rekeyed by the peer meanwhile
                old.set_state(ChildState.REKEYING)
                req.ts_local, req.ts_remote = old.event.ts_local, old.event.ts_remote
                req.transport = old.transport
            payloads = self._child_request(req, old)
        elif req.kind == "rekey-ike":
            group = req.group or self._neg.choice.dh
            req.ke = dh_group(group).generate()
            req.ni = self.random(self.config.nonce_len)
            req.new_spi = self._spi8()
            payloads = [
                SA(ike_proposals(self.config.ike_proposals, req.new_spi, group)),
                Nonce(req.ni),
                KE(group, req.ke.public_bytes),
            ]
        else:
            exchange = ExchangeType.INFORMATIONAL
            if req.kind == "delete-child":
                if req.child not in self._children:
                    return
                payloads = [Delete(ProtocolId.ESP, 4, [req.child])]
            elif req.kind == "delete-ike":
                self.set_state(IkeState.DELETING)
                payloads = [Delete(ProtocolId.IKE, 0, [])]
            else:
                payloads = req.payloads
        msg = Message(
            self.spi_i, self.spi_r, exchange, self._flags(False), self._next_mid, payloads
        )
        self._next_mid += 1
        self._inflight = req
        self._send_request(self._protect(msg), now)

    def _child_request(self, req: Request, old: ChildRecord | None) -> list[Payload]:
        """CREATE_CHILD_SA request for a new Child SA or a rekey (§1.3.1, §1.3.3)."""
        assert self._neg is not None
        req.ni = self.random(self.config.nonce_len)
        req.new_spi = self._spi4()
        req.ke = None
        groups: tuple[int, ...] = ()
        if self.config.child_pfs and req.pfs:
            # KE of the IKE SA's group (or the one the peer asked for), but offer every
            # group we accept: a peer whose Child SA proposals name another group answers
            # INVALID_KE_PAYLOAD instead of NO_PROPOSAL_CHOSEN (charon with
            # esp_proposals = ...-modp2048 on an X25519 IKE SA)
            group = req.group or self._neg.choice.dh
            req.ke = dh_group(group).generate()
            others = (g for s in self.config.ike_proposals for g in s.dh_groups)
            groups = tuple(dict.fromkeys(g for g in (group, *others) if g in SUPPORTED_DH_GROUPS))
        payloads: list[Payload] = []
        if old is not None:
            payloads.append(Notify(ProtocolId.ESP, NotifyType.REKEY_SA, old.spi_in))
        if req.transport:
            payloads.append(Notify.status(NotifyType.USE_TRANSPORT_MODE))
        payloads += [SA(esp_proposals(self.config.esp_proposals, req.new_spi, groups))]
        payloads.append(Nonce(req.ni))
        if req.ke is not None:
            payloads.append(KE(req.ke.group, req.ke.public_bytes))
        payloads += [TSi(list(req.ts_local)), TSr(list(req.ts_remote))]
        return payloads

    def _got_response(self, msg: Message, now: float) -> None:
        req = self._inflight
        assert req is not None
        want = (
            ExchangeType.CREATE_CHILD_SA
            if req.kind in ("create", "rekey-child", "rekey-ike")
            else ExchangeType.INFORMATIONAL
        )
        if msg.exchange_type != want:
            return
        self._inflight = None
        self._retransmit_at = None
        if req.kind in ("create", "rekey-child"):
            self._child_response(req, msg, now)
            self._early_deletes.clear()
        elif req.kind == "rekey-ike":
            self._ike_rekey_response(req, msg, now)
        elif req.kind == "delete-child":
            child = self._children.get(req.child)
            if child is not None:
                self._remove_child(child, req.reason)
        elif req.kind == "delete-ike":
            self._closed("deleted by us")

    def _retry_later(self, req: Request, now: float) -> bool:
        """TEMPORARY_FAILURE (§2.25): requeue after a random delay, a few times."""
        if req.temp_failures >= self.config.retry_tries:
            return False
        req.temp_failures += 1
        lo, hi = self.config.retry_delay
        req.not_before = now + lo + (hi - lo) * self._uniform()
        self._queue.append(req)
        return True

    def _retry_group(self, req: Request, n: Notify) -> bool:
        """INVALID_KE_PAYLOAD in CREATE_CHILD_SA: redo once with the group the peer wants."""
        if req.ke_retried or len(n.data) != 2:
            return False
        group = int.from_bytes(n.data, "big")
        if group not in SUPPORTED_DH_GROUPS:
            return False
        req.group, req.ke_retried = group, True
        self._queue.appendleft(req)
        return True

    # ---------------------------------------------------------------- CREATE_CHILD_SA

    def _child_response(self, req: Request, msg: Message, now: float) -> None:
        create_child_initiator.child_response(self, req, msg, now)

    def _ike_rekey_response(self, req: Request, msg: Message, now: float) -> None:
        create_child_initiator.ike_rekey_response(self, req, msg, now)

    def _got_create_child(self, msg: Message, now: float) -> None:
        create_child_responder.got_create_child(self, msg, now)

    def _initiator_ts_problem(
        self,
        tsi: list[TrafficSelector],
        tsr: list[TrafficSelector],
        ours_local: tuple[TrafficSelector, ...],
        ours_remote: tuple[TrafficSelector, ...],
    ) -> str:
        if not covered(tsi, ours_local) or not covered(tsr, ours_remote):
            return "peer widened the traffic selectors"
        if self._confined() and not self.config.containment.initiator_accepts(tsr, self._peer_ip):
            return f"confined peer {self._peer_ip} claimed selectors beyond its own address"
        return ""

    def _responder_selectors(
        self,
        tsi: list[TrafficSelector],
        tsr: list[TrafficSelector],
        assigned: tuple[IpAddress, ...],
    ) -> tuple[list[TrafficSelector], list[TrafficSelector]]:
        """(peer side, our side) after policy, containment and CP; TS_UNACCEPTABLE if empty."""
        if assigned:
            peer_side = narrow(tsi, [host_selector(str(a)) for a in assigned])
        elif self._confined():
            peer_side = self.config.containment.responder_peer_side(tsi, self._peer_ip)
            peer_side = narrow(peer_side, self.config.remote_ts)
        else:
            peer_side = narrow(tsi, self.config.remote_ts)
        our_side = narrow(tsr, self.config.local_ts)
        if not peer_side or not our_side:
            raise IkeProtocolError(
                NotifyType.TS_UNACCEPTABLE,
                f"traffic selectors of {self._peer_ip} outside our policy"
                + (" (confined to its own address)" if self._confined() else ""),
            )
        return peer_side, our_side

    # ---------------------------------------------------------------- INFORMATIONAL

    def _got_informational(self, request: Message, now: float) -> None:
        """Answer a peer's INFORMATIONAL: liveness (empty), Delete (RFC 7296 §1.4.1),
        or AUTHENTICATION_FAILED for our IKE_AUTH response (§2.21.2)."""
        if has_notify(request, NotifyType.AUTHENTICATION_FAILED):
            self._respond_encrypted(request, [])
            self._fail(
                f"{self._peer_ip} rejected our authentication", NotifyType.AUTHENTICATION_FAILED
            )
            return
        deletes = [p for p in request.payloads if isinstance(p, Delete)]
        if any(d.protocol_id == ProtocolId.IKE for d in deletes):
            self._respond_encrypted(request, [])
            col = self._ike_collision
            if col is not None and col.link is not None and not self._retired:
                # §2.25.2 with a collision: the peer won and deletes the old SA
                self._ike_collision = None
                old = self._switch_to(col.link, now)
                old._closed("replaced")
                self._collect_aux()
                return
            self._closed("deleted by the peer")
            return
        reply: list[Payload] = []
        gone: list[bytes] = []
        for d in deletes:
            if d.protocol_id != ProtocolId.ESP:
                continue
            for peer_spi in d.spis:
                c = next((c for c in self._children.values() if c.spi_out == peer_spi), None)
                if c is None:
                    if self._inflight is not None and self._inflight.kind in (
                        "create",
                        "rekey-child",
                    ):
                        self._early_deletes.add(peer_spi)  # made by our exchange, still unseen
                    continue
                if c.state != ChildState.DELETING:  # both deleting: answer without it (§1.4.1)
                    gone.append(c.spi_in)
                if (
                    c.state == ChildState.REKEYING
                    and self._inflight is not None
                    and self._inflight.child == c.spi_in
                ):
                    self._inflight.orphaned = True
                self._remove_child(c, "deleted by the peer")
        if gone:
            reply.append(Delete(ProtocolId.ESP, 4, gone))
        self._respond_encrypted(request, reply)

    def _closed(self, reason: str) -> None:
        self.set_state(IkeState.CLOSED)
        self._retransmit_at = None
        self._reassembler = None
        self._queue.clear()
        self._events.append(IkeSaDeleted(self.spi_i, self.spi_r, reason))

    # ------------------------------------------------------- IKE_SA_INIT / IKE_AUTH, initiator

    def _send_init_request(self, now: float) -> None:
        assert self._ke is not None
        payloads: list[Payload] = []
        if self._cookie:
            payloads.append(Notify.status(NotifyType.COOKIE, self._cookie))
        payloads += [
            SA(ike_proposals(self.config.ike_proposals)),
            KE(self._ke.group, self._ke.public_bytes),
            Nonce(self._ni),
        ]
        payloads += self._nat_notifies(_BYTES_NONE) + self._common_init_notifies()
        msg = Message(
            self.spi_i, _BYTES_NONE, ExchangeType.IKE_SA_INIT, self._flags(False), 0, payloads
        )
        self._init_request = msg.encode()
        self._next_mid = 1
        self.set_state(IkeState.INIT_SENT)
        self._send_request([self._init_request], now)

    def _initiator_got_init(self, msg: Message, raw: bytes, now: float, remote: Address) -> None:
        notifies = [p for p in msg.payloads if isinstance(p, Notify)]
        for n in notifies:
            if n.notify_type == NotifyType.COOKIE and len(n.data) <= 64:
                self._cookie = n.data
                self._send_init_request(now)
                return
            if n.notify_type == NotifyType.INVALID_KE_PAYLOAD and len(n.data) == 2:
                group = int.from_bytes(n.data, "big")
                ours = {g for s in self.config.ike_proposals for g in s.dh_groups}
                if self._ke is not None and group == self._ke.group:
                    # A late copy of the refusal we already obeyed (the peer answered our
                    # retransmitted first request too): the retry with this group is in flight.
                    return
                if group in ours and self._ke is not None:
                    self._ke = dh_group(group).generate()
                    self._send_init_request(now)
                else:
                    self._fail(f"peer wants DH group {group}, which we do not offer", n.notify_type)
                return
            if n.is_error:
                self._fail(
                    f"peer refused IKE_SA_INIT: {notify_name(n.notify_type)}",
                    n.notify_type,
                )
                return
        try:
            sa = msg.first(SA)
            ke = msg.first(KE)
            nonce = msg.first(Nonce)
            if not isinstance(sa, SA) or not isinstance(ke, KE) or not isinstance(nonce, Nonce):
                raise IkeProtocolError(
                    NotifyType.INVALID_SYNTAX, "IKE_SA_INIT response lacks SA, KE or Nonce"
                )
            if len(sa.proposals) != 1:
                raise IkeProtocolError(
                    NotifyType.NO_PROPOSAL_CHOSEN, "responder chose more than one proposal"
                )
            prop = sa.proposals[0]
            for ttype in (
                TransformType.ENCR,
                TransformType.PRF,
                TransformType.INTEG,
                TransformType.DH,
            ):
                single(prop, ttype)
            assert self._ke is not None
            choice = select_ike_proposal([prop], self.config.ike_proposals, self._ke.group)
            if choice is None or choice.dh != self._ke.group or ke.group != self._ke.group:
                raise IkeProtocolError(
                    NotifyType.NO_PROPOSAL_CHOSEN, "responder chose transforms we did not offer"
                )
            if not 16 <= len(nonce.data) <= 256:
                raise IkeProtocolError(
                    NotifyType.INVALID_SYNTAX, f"nonce of {len(nonce.data)} bytes"
                )
            if msg.spi_r == _BYTES_NONE:
                raise IkeProtocolError(NotifyType.INVALID_SYNTAX, "responder SPI is zero")
            shared = self._ke.shared_secret(ke.data)
        except IkeProtocolError as e:
            self._fail(f"bad IKE_SA_INIT response: {e}", e.notify)
            return
        self.spi_r = msg.spi_r
        self._nr = nonce.data
        self._init_response = raw
        self._peer_hashes = self._hash_list(msg)
        self._check_nat(msg, remote)
        self._derive(choice, shared)
        self._send_auth_request(now)

    @staticmethod
    def _hash_list(msg: Message) -> list[int] | None:
        for p in msg.payloads:
            if isinstance(p, Notify) and p.notify_type == NotifyType.SIGNATURE_HASH_ALGORITHMS:
                try:
                    return decode_uint16_list(p.data)
                except IkeDecodeError:
                    return None
        return None

    def _send_auth_request(self, now: float) -> None:
        c = self.config
        ident = self._id_payload(True)
        self._child_spi = self._spi4()
        payloads: list[Payload] = [ident, self._make_auth(ident)]
        if c.initial_contact:
            payloads.append(Notify.status(NotifyType.INITIAL_CONTACT))
        if c.request_internal_address:  # of the family our selectors are in
            payloads.append(cp_request(ipaddress.ip_address(c.local_address[0]).version))
        if c.transport_mode:
            payloads.append(Notify.status(NotifyType.USE_TRANSPORT_MODE))
        payloads += [
            SA(esp_proposals(c.esp_proposals, self._child_spi)),
            TSi(list(c.local_ts)),
            TSr(list(c.remote_ts)),
        ]
        msg = Message(
            self.spi_i, self.spi_r, ExchangeType.IKE_AUTH, self._flags(False), 1, payloads
        )
        self._next_mid = 2
        self.set_state(IkeState.AUTH_SENT)
        self._send_request(self._protect(msg), now)

    def _initiator_got_auth(self, msg: Message, now: float) -> None:
        self._retransmit_at = None
        errors = [p for p in msg.payloads if isinstance(p, Notify) and p.is_error]
        ident, auth = msg.first(IDr), msg.first(AUTH)
        if not isinstance(ident, IDr) or not isinstance(auth, AUTH):
            n = errors[0].notify_type if errors else None
            self._fail("peer refused IKE_AUTH" + (f" with notify {n}" if n else ": no IDr/AUTH"), n)
            return
        try:
            self._verify_auth(auth, ident)
        except IkeProtocolError as e:
            # §2.21.2: tell the responder, which believes the IKE SA is up, then give up
            note = Message(
                self.spi_i,
                self.spi_r,
                ExchangeType.INFORMATIONAL,
                self._flags(False),
                self._next_mid,
                [Notify.status(NotifyType.AUTHENTICATION_FAILED)],
            )
            self._next_mid += 1
            self._out += self._protect(note)
            self._fail(f"responder authentication failed: {e}", e.notify)
            return
        self._established(now)
        self._events.append(self._ike_event(ident, auth.method, self._local_auth_method))
        if has_notify(msg, NotifyType.INITIAL_CONTACT):
            self._events.append(
                InitialContact((ident.id_type, ident.data), self._peer_ip, self.spi_i, self.spi_r)
            )
        self._finish_child_initiator(msg, errors, now)

    def _finish_child_initiator(self, msg: Message, errors: list[Notify], now: float) -> None:
        if errors:
            self._events.append(ChildSaFailed("peer refused the Child SA", errors[0].notify_type))
            return
        sa, tsi, tsr = msg.first(SA), msg.first(TSi), msg.first(TSr)
        if (
            not isinstance(sa, SA)
            or not isinstance(tsi, TSi)
            or not isinstance(tsr, TSr)
            or len(sa.proposals) != 1
        ):
            self._events.append(
                ChildSaFailed("IKE_AUTH response lacks SA/TSi/TSr", NotifyType.INVALID_SYNTAX)
            )
            return
        picked = select_esp_proposal(sa.proposals, self.config.esp_proposals)
        if picked is None or len(sa.proposals[0].of_type(TransformType.ESN)) > 1:
            self._events.append(
                ChildSaFailed(
                    "peer chose ESP transforms we did not offer", NotifyType.NO_PROPOSAL_CHOSEN
                )
            )
            return
        transport = self.config.transport_mode and has_notify(msg, NotifyType.USE_TRANSPORT_MODE)
        cp = msg.first(CP)
        child = self._new_child(
            picked[1],
            self._child_spi,
            tsi.selectors,
            tsr.selectors,
            transport,
            (self._ni, self._nr),
            None,
            True,
            now,
            None,
            cp_reply_addresses(cp if isinstance(cp, CP) else None),
        )
        why = self._initiator_ts_problem(
            tsi.selectors, tsr.selectors, self.config.local_ts, self.config.remote_ts
        ) or self._inner_ts_problem(tsi.selectors, child.event.internal_addresses)
        if why:
            self._queue_delete(child, why, now)
            self._events.append(ChildSaFailed(why, NotifyType.TS_UNACCEPTABLE))
            return
        self._report(child)

    def _inner_ts_problem(self, tsi: list[TrafficSelector], assigned: tuple[IpAddress, ...]) -> str:
        """With CP requested our TSi offers more than our address (the wide range an inner
        address is narrowed from, RFC 7296 §2.9); the answer must come back as exactly our
        address or exactly an inner address the peer gave us, nothing wider (CAT)."""
        if not self.config.request_internal_address:
            return ""
        ours = [self.config.local_address[0], *(str(a) for a in assigned)]
        for ts in tsi:
            if ts.start != ts.end or str(ts.start) not in ours:
                given = ", ".join(str(a) for a in assigned) or "none"
                return (
                    f"peer {self._peer_ip} narrowed our selector to {ts.start}-{ts.end}, "
                    f"neither our address nor an inner address it gave us ({given})"
                )
        return ""

    # ------------------------------------------------------- IKE_SA_INIT / IKE_AUTH, responder

    def _responder_got_init(self, msg: Message, raw: bytes, remote: Address) -> None:
        sa, ke, nonce = msg.first(SA), msg.first(KE), msg.first(Nonce)
        try:
            if not isinstance(sa, SA) or not isinstance(ke, KE) or not isinstance(nonce, Nonce):
                raise IkeProtocolError(
                    NotifyType.INVALID_SYNTAX, "IKE_SA_INIT request lacks SA, KE or Nonce"
                )
            if not 16 <= len(nonce.data) <= 256:
                raise IkeProtocolError(
                    NotifyType.INVALID_SYNTAX, f"nonce of {len(nonce.data)} bytes"
                )
            choice = select_ike_proposal(sa.proposals, self.config.ike_proposals, ke.group)
            if choice is None:
                raise IkeProtocolError(NotifyType.NO_PROPOSAL_CHOSEN, "no acceptable IKE proposal")
            if choice.dh != ke.group:
                raise IkeProtocolError(
                    NotifyType.INVALID_KE_PAYLOAD,
                    f"KE group {ke.group}, we want {choice.dh}",
                    choice.dh.to_bytes(2, "big"),
                )
            my_ke = dh_group(choice.dh).generate()
            shared = my_ke.shared_secret(ke.data)
        except IkeProtocolError as e:
            reply = Message(
                msg.spi_i,
                _BYTES_NONE,
                ExchangeType.IKE_SA_INIT,
                HeaderFlag.RESPONSE,
                0,
                [Notify.status(e.notify, e.data)],
            )
            self._out.append(reply.encode())
            self._fail(f"refused IKE_SA_INIT from {remote[0]}: {e}", e.notify)
            return
        self.spi_i = msg.spi_i
        self.spi_r = self._spi8()
        self._peer_ip = remote[0]
        self._ni = nonce.data
        self._nr = self.random(self.config.nonce_len)
        self._init_request = raw
        self._peer_hashes = self._hash_list(msg)
        self._check_nat(msg, remote)
        payloads: list[Payload] = [
            SA([choice.proposal()]),
            KE(choice.dh, my_ke.public_bytes),
            Nonce(self._nr),
        ]
        payloads += self._nat_notifies(self.spi_r) + self._common_init_notifies()
        reply = Message(
            self.spi_i, self.spi_r, ExchangeType.IKE_SA_INIT, HeaderFlag.RESPONSE, 0, payloads
        )
        self._init_response = reply.encode()
        self._derive(choice, shared)
        self._cached_mid, self._cached_response = 0, [self._init_response]
        self._expect_mid = 1
        self.set_state(IkeState.INIT_DONE)
        self._out.append(self._init_response)

    def _responder_got_auth(self, msg: Message, now: float) -> None:
        ident, auth = msg.first(IDi), msg.first(AUTH)
        try:
            if not isinstance(ident, IDi) or not isinstance(auth, AUTH):
                raise IkeProtocolError(
                    NotifyType.INVALID_SYNTAX, "IKE_AUTH request lacks IDi or AUTH"
                )
            self._verify_auth(auth, ident)
        except IkeProtocolError as e:
            self._respond_encrypted(msg, [Notify.status(e.notify, e.data)])
            self._fail(f"initiator authentication failed: {e}", e.notify)
            return
        my_id = self._id_payload(False)
        reply: list[Payload] = [my_id, self._make_auth(my_id)]
        self._established(now)
        self._events.append(self._ike_event(ident, auth.method, self._local_auth_method))
        if has_notify(msg, NotifyType.INITIAL_CONTACT):
            self._events.append(
                InitialContact((ident.id_type, ident.data), self._peer_ip, self.spi_i, self.spi_r)
            )
        child, extra = self._responder_child(msg, now)
        self._respond_encrypted(msg, reply + extra)
        if isinstance(child, ChildRecord):
            self._report(child)
        elif isinstance(child, ChildSaFailed):
            self._events.append(child)

    def _responder_child(
        self, msg: Message, now: float
    ) -> tuple[ChildRecord | ChildSaFailed | None, list[Payload]]:
        sa, tsi, tsr = msg.first(SA), msg.first(TSi), msg.first(TSr)
        if not isinstance(sa, SA) or not isinstance(tsi, TSi) or not isinstance(tsr, TSr):
            return None, []  # childless IKE SA (RFC 6023)
        picked = select_esp_proposal(sa.proposals, self.config.esp_proposals)
        if picked is None:
            return ChildSaFailed("no acceptable ESP proposal", NotifyType.NO_PROPOSAL_CHOSEN), [
                Notify.status(NotifyType.NO_PROPOSAL_CHOSEN)
            ]
        extra: list[Payload] = []
        assigned: tuple[IpAddress, ...] = ()
        cp = msg.first(CP)
        if isinstance(cp, CP) and cp.cfg_type == 1:  # CFG_REQUEST
            reply_cp, assigned = cp_reply(cp, self.config.internal_addresses)
            extra.append(reply_cp)
        try:
            ts_remote, ts_local = self._responder_selectors(tsi.selectors, tsr.selectors, assigned)
        except IkeProtocolError as e:
            return ChildSaFailed(str(e), e.notify), [Notify.status(e.notify)]
        number, choice = picked
        our_spi = self._spi4()
        transport = self.config.transport_mode and has_notify(msg, NotifyType.USE_TRANSPORT_MODE)
        if transport:
            extra.append(Notify.status(NotifyType.USE_TRANSPORT_MODE))
        extra += [SA([choice.proposal(number, our_spi)]), TSi(ts_remote), TSr(ts_local)]
        child = self._new_child(
            choice,
            our_spi,
            ts_local,
            ts_remote,
            transport,
            (self._ni, self._nr),
            None,
            False,
            now,
            None,
            assigned,
        )
        return child, extra


__all__ = [
    "DEFAULT_ESP_PROPOSALS",
    "DEFAULT_IKE_PROPOSALS",
    "ChildSaInfo",
    "EspProposalSpec",
    "IkeProposalSpec",
    "IkeSa",
    "IkeSaConfig",
    "NegotiatedKeys",
    "PayloadType",
    "esp_key_lengths",
    "nat_hash",
    "select_esp_proposal",
    "select_ike_proposal",
]
