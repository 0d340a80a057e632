"""Sans-IO IKE SA state machine: IKE_SA_INIT + IKE_AUTH, initiator and responder.

Feed it datagrams (``receive_datagram``) and timer ticks (``handle_timer``) with
the current time as a value; collect ``datagrams_to_send()`` and
``next_event()``. No sockets, no clocks: the endpoint owns those.

Scope today: one IKE SA and its first Child SA; NULL auth (RFC 7619) and
RFC 7427 / RSA method-1 signatures, in any asymmetric combination;
INVALID_KE_PAYLOAD and COOKIE retries as initiator; NAT detection;
retransmission with back-off; the responder replays its cached reply;
liveness (empty INFORMATIONAL) answers. Not yet: CREATE_CHILD_SA, rekeys,
Delete, fragments on send, cookies demanded as responder.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from . import auth as ike_auth
from .constants import (
    AuthMethod,
    DhId,
    EncrId,
    EsnId,
    ExchangeType,
    HeaderFlag,
    IdType,
    IntegId,
    NotifyType,
    PayloadType,
    PrfId,
    ProtocolId,
    TransformType,
    notify_name,
)
from .crypto import KeyExchange, SkCipher, dh_group, sk_cipher
from .errors import IkeCryptoError, IkeDecodeError, IkeError, IkeProtocolError
from .events import (
    ChildSaDeleted,
    ChildSaEstablished,
    ChildSaFailed,
    Event,
    IkeSaDeleted,
    IkeSaEstablished,
    IkeSaFailed,
)
from .keys import IkeSaKeys, Prf, child_keymat, ike_sa_keys, skeyseed, split_child_keymat
from .message import FragmentReassembler, Message, decrypt
from .payloads import (
    AUTH,
    KE,
    SA,
    SKF,
    Delete,
    IDi,
    IDr,
    Nonce,
    Notify,
    Payload,
    Proposal,
    TrafficSelector,
    Transform,
    TSi,
    TSr,
    decode_uint16_list,
    encode_uint16_list,
)
from .selectors import covered, narrow

Address = tuple[str, int]


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class IkeProposalSpec:
    """One IKE SA transform set we accept; ``integ`` None for AEAD ciphers."""

    encr: int
    key_bits: int | None
    prf: int
    integ: int | None
    dh_groups: tuple[int, ...]


@dataclass(frozen=True)
class EspProposalSpec:
    """One ESP transform set we accept, in the order the offload layer prefers."""

    encr: int
    key_bits: int | None
    integ: int | None
    esn: tuple[int, ...] = (EsnId.NO_ESN,)


_GROUPS = (DhId.CURVE25519, DhId.ECP_256, DhId.MODP_2048)

DEFAULT_IKE_PROPOSALS: tuple[IkeProposalSpec, ...] = (
    IkeProposalSpec(EncrId.AES_GCM_16, 256, PrfId.HMAC_SHA2_256, None, _GROUPS),
    IkeProposalSpec(EncrId.CHACHA20_POLY1305, None, PrfId.HMAC_SHA2_256, None, _GROUPS),
    IkeProposalSpec(EncrId.AES_GCM_16, 128, PrfId.HMAC_SHA2_256, None, _GROUPS),
    IkeProposalSpec(EncrId.AES_CBC, 256, PrfId.HMAC_SHA2_256, IntegId.HMAC_SHA2_256_128, _GROUPS),
    IkeProposalSpec(EncrId.AES_CBC, 256, PrfId.HMAC_SHA2_512, IntegId.HMAC_SHA2_512_256, _GROUPS),
)

DEFAULT_ESP_PROPOSALS: tuple[EspProposalSpec, ...] = (
    EspProposalSpec(EncrId.AES_GCM_16, 256, None, (EsnId.NO_ESN, EsnId.ESN)),
    EspProposalSpec(EncrId.AES_GCM_16, 128, None, (EsnId.NO_ESN, EsnId.ESN)),
    EspProposalSpec(EncrId.CHACHA20_POLY1305, None, None, (EsnId.NO_ESN, EsnId.ESN)),
    EspProposalSpec(EncrId.AES_CBC, 256, IntegId.HMAC_SHA2_256_128, (EsnId.NO_ESN, EsnId.ESN)),
    EspProposalSpec(EncrId.AES_CBC, 128, IntegId.HMAC_SHA2_256_128, (EsnId.NO_ESN, EsnId.ESN)),
)


@dataclass(frozen=True)
class IkeSaConfig:
    """Everything one IKE SA needs to know, fixed at creation.

    ``private_key`` None means we authenticate with NULL auth; ``peer_public_key``
    None means we require NULL auth from the peer (the OE default both ways).
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


# --------------------------------------------------------------------------- negotiation


@dataclass(frozen=True)
class _IkeChoice:
    spec: IkeProposalSpec
    dh: int

    def proposal(self) -> Proposal:
        s = self.spec
        ts = [
            Transform.make(TransformType.ENCR, s.encr, s.key_bits),
            Transform.make(TransformType.PRF, s.prf),
        ]
        if s.integ is not None:
            ts.append(Transform.make(TransformType.INTEG, s.integ))
        ts.append(Transform.make(TransformType.DH, self.dh))
        return Proposal(1, ProtocolId.IKE, b"", ts)


def _encr_matches(t: Transform, encr: int, key_bits: int | None) -> bool:
    if t.transform_id != encr:
        return False
    kl = t.key_length
    if encr == EncrId.CHACHA20_POLY1305:
        return kl in (None, 256)
    return kl == key_bits


def _ike_proposals(specs: tuple[IkeProposalSpec, ...]) -> list[Proposal]:
    out = []
    for n, s in enumerate(specs, start=1):
        ts = [
            Transform.make(TransformType.ENCR, s.encr, s.key_bits),
            Transform.make(TransformType.PRF, s.prf),
        ]
        if s.integ is not None:
            ts.append(Transform.make(TransformType.INTEG, s.integ))
        ts += [Transform.make(TransformType.DH, g) for g in s.dh_groups]
        out.append(Proposal(n, ProtocolId.IKE, b"", ts))
    return out


def _match_ike(p: Proposal, s: IkeProposalSpec, ke_group: int | None) -> _IkeChoice | None:
    if p.protocol_id != ProtocolId.IKE:
        return None
    if not any(_encr_matches(t, s.encr, s.key_bits) for t in p.of_type(TransformType.ENCR)):
        return None
    if s.prf not in [t.transform_id for t in p.of_type(TransformType.PRF)]:
        return None
    integs = [t.transform_id for t in p.of_type(TransformType.INTEG)]
    if (s.integ is None and integs not in ([], [IntegId.NONE])) or (
        s.integ is not None and s.integ not in integs
    ):
        return None
    groups = [t.transform_id for t in p.of_type(TransformType.DH) if t.transform_id in s.dh_groups]
    if not groups:
        return None
    return _IkeChoice(s, ke_group if ke_group in groups else groups[0])


def select_ike_proposal(
    offered: list[Proposal], ours: tuple[IkeProposalSpec, ...], ke_group: int | None
) -> _IkeChoice | None:
    """Responder's choice: the peer's first proposal that one of our specs accepts."""
    for p in offered:
        for s in ours:
            choice = _match_ike(p, s, ke_group)
            if choice is not None:
                return choice
    return None


@dataclass(frozen=True)
class _EspChoice:
    spec: EspProposalSpec
    esn: int
    peer_spi: bytes

    def proposal(self, number: int, our_spi: bytes) -> Proposal:
        s = self.spec
        ts = [Transform.make(TransformType.ENCR, s.encr, s.key_bits)]
        if s.integ is not None:
            ts.append(Transform.make(TransformType.INTEG, s.integ))
        ts.append(Transform.make(TransformType.ESN, self.esn))
        return Proposal(number, ProtocolId.ESP, our_spi, ts)


def _esp_proposals(specs: tuple[EspProposalSpec, ...], spi: bytes) -> list[Proposal]:
    out = []
    for n, s in enumerate(specs, start=1):
        ts = [Transform.make(TransformType.ENCR, s.encr, s.key_bits)]
        if s.integ is not None:
            ts.append(Transform.make(TransformType.INTEG, s.integ))
        ts += [Transform.make(TransformType.ESN, e) for e in s.esn]
        out.append(Proposal(n, ProtocolId.ESP, spi, ts))
    return out


def select_esp_proposal(
    offered: list[Proposal], ours: tuple[EspProposalSpec, ...]
) -> tuple[int, _EspChoice] | None:
    """Responder's choice of ESP transforms; returns (proposal number, choice)."""
    for p in offered:
        if p.protocol_id != ProtocolId.ESP or len(p.spi) != 4 or p.of_type(TransformType.DH):
            continue
        for s in ours:
            if not any(_encr_matches(t, s.encr, s.key_bits) for t in p.of_type(TransformType.ENCR)):
                continue
            integs = [t.transform_id for t in p.of_type(TransformType.INTEG)]
            if s.integ is None and integs not in ([], [IntegId.NONE]):
                continue
            if s.integ is not None and s.integ not in integs:
                continue
            esns = [t.transform_id for t in p.of_type(TransformType.ESN)] or [EsnId.NO_ESN]
            esn = next((e for e in esns if e in s.esn), None)
            if esn is not None:
                return p.number, _EspChoice(s, esn, p.spi)
    return None


def _single(p: Proposal, ttype: int) -> Transform | None:
    found = p.of_type(ttype)
    if len(found) > 1:
        raise IkeProtocolError(
            NotifyType.NO_PROPOSAL_CHOSEN,
            f"chosen proposal has {len(found)} transforms of type {ttype}",
        )
    return found[0] if found else None


def esp_key_lengths(encr: int, key_bits: int | None, integ: int | None) -> tuple[int, int]:
    """(encryption key bytes incl. salt, integrity key bytes) for an ESP transform set."""
    if encr == EncrId.AES_GCM_16:
        e = (key_bits or 0) // 8 + 4
    elif encr == EncrId.CHACHA20_POLY1305:
        e = 36
    else:
        e = (key_bits or 0) // 8
    sizes: dict[int | None, int] = {IntegId.HMAC_SHA2_256_128: 32, IntegId.HMAC_SHA2_512_256: 64}
    a = sizes.get(integ, 0)
    return e, a


def nat_hash(spi_i: bytes, spi_r: bytes, address: Address) -> bytes:
    """NAT_DETECTION_*_IP data: SHA-1(SPIi | SPIr | IP | Port) (RFC 7296 §2.23)."""
    ip = ipaddress.ip_address(address[0]).packed
    return hashlib.sha1(spi_i + spi_r + ip + address[1].to_bytes(2, "big")).digest()


# --------------------------------------------------------------------------- the state machine


@dataclass
class _Negotiated:
    choice: _IkeChoice
    prf: Prf
    cipher: SkCipher
    keys: IkeSaKeys


@dataclass
class IkeSa:
    """One IKE SA, as initiator or responder. Create with :meth:`initiator` / :meth:`responder`."""

    config: IkeSaConfig
    is_initiator: bool
    random: Callable[[int], bytes] = os.urandom
    state: str = "idle"
    spi_i: bytes = bytes(8)
    spi_r: bytes = bytes(8)
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
    _child_spi: bytes = b""
    _next_mid: int = 0  # initiator: next request message ID
    _expect_mid: int = 0  # responder: next request message ID we accept
    _last_request: list[bytes] = field(default_factory=list)
    _retransmit_at: float | None = None
    _tries: int = 0
    _cached_mid: int = -1
    _cached_response: list[bytes] = field(default_factory=list)
    _iv_counter: int = 0
    _reassembler: FragmentReassembler | None = None
    _local_auth_method: int = AuthMethod.NULL
    _children: dict[bytes, bytes] = field(default_factory=dict)  # peer SPI -> our SPI
    _deleting_child: tuple[bytes, bytes] | None = None  # (our SPI, peer SPI)

    # ---------------------------------------------------------------- construction

    @classmethod
    def initiator(
        cls, config: IkeSaConfig, now: float, random: Callable[[int], bytes] = os.urandom
    ) -> IkeSa:
        """Start an IKE SA: queues the IKE_SA_INIT request."""
        sa = cls(config, True, random)
        sa.spi_i = sa._spi8()
        sa._ni = random(config.nonce_len)
        first = config.ike_proposals[0].dh_groups[0]
        sa._ke = dh_group(first).generate()
        sa._send_init_request(now)
        return sa

    @classmethod
    def responder(cls, config: IkeSaConfig, random: Callable[[int], bytes] = os.urandom) -> IkeSa:
        """A responder waiting for its first IKE_SA_INIT request."""
        return cls(config, False, random)

    # ---------------------------------------------------------------- public API

    def datagrams_to_send(self) -> list[bytes]:
        out, self._out = self._out, []
        return out

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    @property
    def nat_detected(self) -> tuple[bool, bool]:
        """(our address is translated, the peer's is): known once IKE_SA_INIT is done,
        so the endpoint can float to port 4500 before IKE_AUTH goes out."""
        return self._nat_local, self._nat_remote

    def get_timer(self) -> float | None:
        return self._retransmit_at

    def handle_timer(self, now: float) -> None:
        """Retransmit the outstanding request with exponential back-off, or give up."""
        if self._retransmit_at is None or now < self._retransmit_at:
            return
        if self._tries >= self.config.retransmit_tries:
            self._fail(f"no answer from {self.config.remote_address[0]} after {self._tries} tries")
            return
        self._tries += 1
        self._out += self._last_request
        self._retransmit_at = now + self.config.retransmit_timeout * (2**self._tries)

    def receive_datagram(self, data: bytes, now: float, remote: Address | None = None) -> None:
        """Process one IKE datagram (no non-ESP marker). Garbage is dropped silently."""
        if self.state in ("failed", "closed"):
            return
        try:
            self._receive(bytes(data), now, remote or self.config.remote_address)
        except (IkeDecodeError, IkeCryptoError):
            return  # RFC 7296 §2.21: ignore what fails to parse or authenticate

    # ---------------------------------------------------------------- helpers

    def _spi8(self) -> bytes:
        spi = self.random(8)
        return spi if spi != bytes(8) else b"\x00" * 7 + b"\x01"

    def _flags(self, response: bool) -> int:
        return (HeaderFlag.INITIATOR if self.is_initiator else 0) | (
            HeaderFlag.RESPONSE if response else 0
        )

    def _fail(self, reason: str, notify: int | None = None) -> None:
        self.state = "failed"
        self._retransmit_at = None
        self._events.append(IkeSaFailed(reason, notify))

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

    def _seal(self, msg: Message) -> bytes:
        assert self._neg is not None
        k = self._neg.keys
        ke, ka = (k.sk_ei, k.sk_ai) if self.is_initiator else (k.sk_er, k.sk_ar)
        return msg.encrypt(self._neg.cipher, ke, ka, self._iv(self._neg.cipher))

    def _open(self, data: bytes) -> Message | None:
        assert self._neg is not None
        k = self._neg.keys
        ke, ka = (k.sk_er, k.sk_ar) if self.is_initiator else (k.sk_ei, k.sk_ai)
        first = Message.decode(data)
        if first.payloads and isinstance(first.payloads[-1], SKF):
            if self._reassembler is None:
                self._reassembler = FragmentReassembler(self._neg.cipher, ke, ka)
            whole = self._reassembler.add(data)
            if whole is not None:
                self._reassembler = None
            return whole
        return decrypt(data, self._neg.cipher, ke, ka)

    def _nat_notifies(self, spi_r: bytes) -> list[Payload]:
        c = self.config
        return [
            Notify.status(
                NotifyType.NAT_DETECTION_SOURCE_IP, nat_hash(self.spi_i, spi_r, c.local_address)
            ),
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

    def _common_init_notifies(self) -> list[Payload]:
        return [
            Notify.status(NotifyType.IKEV2_FRAGMENTATION_SUPPORTED),
            Notify.status(
                NotifyType.SIGNATURE_HASH_ALGORITHMS,
                encode_uint16_list(list(ike_auth.OUR_HASH_ALGORITHMS)),
            ),
        ]

    def _derive(self, choice: _IkeChoice, shared: bytes) -> None:
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

    def _child_event(
        self,
        choice: _EspChoice,
        our_spi: bytes,
        ts_local: list[TrafficSelector],
        ts_remote: list[TrafficSelector],
        transport: bool,
    ) -> ChildSaEstablished:
        assert self._neg is not None
        self._children[choice.peer_spi] = our_spi
        s = choice.spec
        e, a = esp_key_lengths(s.encr, s.key_bits, s.integ)
        km = split_child_keymat(
            child_keymat(self._neg.prf, self._neg.keys.sk_d, self._ni, self._nr, 2 * (e + a)), e, a
        )
        if self.is_initiator:
            ein, ain, eout, aout = km.encr_r, km.integ_r, km.encr_i, km.integ_i
        else:
            ein, ain, eout, aout = km.encr_i, km.integ_i, km.encr_r, km.integ_r
        return ChildSaEstablished(
            self.spi_i,
            self.spi_r,
            our_spi,
            choice.peer_spi,
            "transport" if transport else "tunnel",
            s.encr,
            s.key_bits,
            s.integ,
            choice.esn == EsnId.ESN,
            ein,
            ain,
            eout,
            aout,
            tuple(ts_local),
            tuple(ts_remote),
            self._nat_local or self._nat_remote,
        )

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

    # ---------------------------------------------------------------- dispatch

    def _receive(self, data: bytes, now: float, remote: Address) -> None:
        msg = Message.decode(data)  # header + outer payloads (SK still sealed)
        if msg.spi_i != self.spi_i and not (not self.is_initiator and self.state == "idle"):
            return
        if msg.is_response:
            if msg.message_id != self._next_mid - 1 or self._retransmit_at is None:
                return
            if self.is_initiator and msg.exchange_type == ExchangeType.IKE_SA_INIT:
                if self.state == "init-sent":
                    self._initiator_got_init(msg, data, now, remote)
            elif self.is_initiator and msg.exchange_type == ExchangeType.IKE_AUTH:
                inner = self._open(data)
                if inner is not None and self.state == "auth-sent":
                    self._initiator_got_auth(inner)
            elif (
                msg.exchange_type == ExchangeType.INFORMATIONAL
                and self._neg is not None
                and self._open(data) is not None
            ):
                self._retransmit_at = None
                if self.state == "deleting":
                    self._closed("deleted by us")
                elif self._deleting_child is not None:
                    ours, peer = self._deleting_child
                    self._deleting_child = None
                    self._events.append(ChildSaDeleted(ours, peer))
            return
        if msg.message_id == self._cached_mid:
            self._out += self._cached_response  # retransmitted request: replay (RFC 7296 §2.1)
            return
        if msg.message_id != self._expect_mid:
            return
        if not self.is_initiator and msg.exchange_type == ExchangeType.IKE_SA_INIT:
            if self.state == "idle":
                self._responder_got_init(msg, data, remote)
        elif not self.is_initiator and msg.exchange_type == ExchangeType.IKE_AUTH:
            inner = self._open(data)
            if inner is not None and self.state == "init-done":
                self._responder_got_auth(inner)
        elif msg.exchange_type == ExchangeType.INFORMATIONAL and self.state in (
            "established",
            "deleting",
        ):
            inner = self._open(data)
            if inner is not None:
                self._got_informational(inner)

    def _got_informational(self, request: Message) -> None:
        """Answer a peer's INFORMATIONAL: liveness (empty), or Delete (RFC 7296 §1.4.1)."""
        reply: list[Payload] = []
        deletes = [p for p in request.payloads if isinstance(p, Delete)]
        if any(d.protocol_id == ProtocolId.IKE for d in deletes):
            self._respond_encrypted(request, [])
            self._closed("deleted by the peer")
            return
        gone: list[bytes] = []
        for d in deletes:
            if d.protocol_id != ProtocolId.ESP:
                continue
            for peer_spi in d.spis:
                ours = self._children.pop(peer_spi, None)
                if ours is not None:
                    gone.append(ours)
                    self._events.append(ChildSaDeleted(ours, peer_spi))
        if gone:
            reply.append(Delete(ProtocolId.ESP, 4, gone))
        self._respond_encrypted(request, reply)

    def _closed(self, reason: str) -> None:
        self.state = "closed"
        self._retransmit_at = None
        self._events.append(IkeSaDeleted(self.spi_i, self.spi_r, reason))

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
        self._cached_response = [self._seal(reply)]
        self._expect_mid = request.message_id + 1
        self._out += self._cached_response

    # ---------------------------------------------------------------- initiator

    def _send_init_request(self, now: float) -> None:
        assert self._ke is not None
        payloads: list[Payload] = []
        if self._cookie:
            payloads.append(Notify.status(NotifyType.COOKIE, self._cookie))
        payloads += [
            SA(_ike_proposals(self.config.ike_proposals)),
            KE(self._ke.group, self._ke.public_bytes),
            Nonce(self._ni),
        ]
        payloads += self._nat_notifies(bytes(8)) + self._common_init_notifies()
        msg = Message(
            self.spi_i, bytes(8), ExchangeType.IKE_SA_INIT, self._flags(False), 0, payloads
        )
        self._init_request = msg.encode()
        self._next_mid = 1
        self.state = "init-sent"
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
                if group in ours and self._ke is not None and group != self._ke.group:
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
                _single(prop, ttype)
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
            if msg.spi_r == bytes(8):
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
        if c.transport_mode:
            payloads.append(Notify.status(NotifyType.USE_TRANSPORT_MODE))
        payloads += [
            SA(_esp_proposals(c.esp_proposals, self._child_spi)),
            TSi(list(c.local_ts)),
            TSr(list(c.remote_ts)),
        ]
        msg = Message(
            self.spi_i, self.spi_r, ExchangeType.IKE_AUTH, self._flags(False), 1, payloads
        )
        self._next_mid = 2
        self.state = "auth-sent"
        self._send_request([self._seal(msg)], now)

    def _spi4(self) -> bytes:
        spi = self.random(4)
        return spi if int.from_bytes(spi, "big") > 255 else b"\x00\x00\x01\x00"

    def _initiator_got_auth(self, msg: Message) -> None:
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
            self._fail(f"responder authentication failed: {e}", e.notify)
            return
        self.state = "established"
        self._events.append(self._ike_event(ident, auth.method, self._local_auth_method))
        self._finish_child_initiator(msg, errors)

    def _finish_child_initiator(self, msg: Message, errors: list[Notify]) -> None:
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
        if not covered(tsi.selectors, self.config.local_ts) or not covered(
            tsr.selectors, self.config.remote_ts
        ):
            self._events.append(
                ChildSaFailed("peer widened the traffic selectors", NotifyType.TS_UNACCEPTABLE)
            )
            return
        transport = self.config.transport_mode and any(
            isinstance(p, Notify) and p.notify_type == NotifyType.USE_TRANSPORT_MODE
            for p in msg.payloads
        )
        self._events.append(
            self._child_event(picked[1], self._child_spi, tsi.selectors, tsr.selectors, transport)
        )

    # ---------------------------------------------------------------- responder

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
                bytes(8),
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
        self.state = "init-done"
        self._out.append(self._init_response)

    def _responder_got_auth(self, msg: Message) -> None:
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
        self.state = "established"
        self._events.append(self._ike_event(ident, auth.method, self._local_auth_method))
        child, extra = self._responder_child(msg)
        self._respond_encrypted(msg, reply + extra)
        if isinstance(child, ChildSaEstablished | ChildSaFailed):
            self._events.append(child)

    def _responder_child(self, msg: Message) -> tuple[Event | None, list[Payload]]:
        sa, tsi, tsr = msg.first(SA), msg.first(TSi), msg.first(TSr)
        if not isinstance(sa, SA) or not isinstance(tsi, TSi) or not isinstance(tsr, TSr):
            return None, []  # childless IKE SA (RFC 6023)
        picked = select_esp_proposal(sa.proposals, self.config.esp_proposals)
        if picked is None:
            return ChildSaFailed("no acceptable ESP proposal", NotifyType.NO_PROPOSAL_CHOSEN), [
                Notify.status(NotifyType.NO_PROPOSAL_CHOSEN)
            ]
        # Initiator's TSi is our remote side; TSr our local side.
        ts_remote = narrow(tsi.selectors, self.config.remote_ts)
        ts_local = narrow(tsr.selectors, self.config.local_ts)
        if not ts_remote or not ts_local:
            return ChildSaFailed(
                "traffic selectors outside our policy", NotifyType.TS_UNACCEPTABLE
            ), [Notify.status(NotifyType.TS_UNACCEPTABLE)]
        number, choice = picked
        our_spi = self._spi4()
        transport = self.config.transport_mode and any(
            isinstance(p, Notify) and p.notify_type == NotifyType.USE_TRANSPORT_MODE
            for p in msg.payloads
        )
        extra: list[Payload] = [Notify.status(NotifyType.USE_TRANSPORT_MODE)] if transport else []
        extra += [SA([choice.proposal(number, our_spi)]), TSi(ts_remote), TSr(ts_local)]
        return self._child_event(choice, our_spi, ts_local, ts_remote, transport), extra

    # ---------------------------------------------------------------- liveness

    def _informational_request(self, payloads: list[Payload], now: float) -> None:
        if self._retransmit_at is not None:
            raise IkeError("a request is still outstanding (window size 1)")
        msg = Message(
            self.spi_i,
            self.spi_r,
            ExchangeType.INFORMATIONAL,
            self._flags(False),
            self._next_mid,
            payloads,
        )
        self._next_mid += 1
        self._send_request([self._seal(msg)], now)

    def send_liveness_check(self, now: float) -> None:
        """Empty INFORMATIONAL request (RFC 7296 §1.4); no answer after the retries fails the SA."""
        if self.state != "established":
            raise IkeError("liveness checks need an established IKE SA")
        self._informational_request([], now)

    def delete_child(self, spi_in: bytes, now: float) -> None:
        """Delete one Child SA by our inbound SPI; ChildSaDeleted follows the peer's answer."""
        peer = next((p for p, o in self._children.items() if o == spi_in), None)
        if self.state != "established" or peer is None:
            raise IkeError(f"no Child SA with inbound SPI {spi_in.hex()}")
        self._informational_request([Delete(ProtocolId.ESP, 4, [spi_in])], now)
        del self._children[peer]
        self._deleting_child = (spi_in, peer)

    def delete(self, now: float) -> None:
        """Delete the IKE SA and its Child SAs (RFC 7296 §1.4.1); IkeSaDeleted follows."""
        if self.state != "established":
            raise IkeError("only an established IKE SA can be deleted")
        self._informational_request([Delete(ProtocolId.IKE, 0, [])], now)
        self.state = "deleting"


__all__ = [
    "DEFAULT_ESP_PROPOSALS",
    "DEFAULT_IKE_PROPOSALS",
    "EspProposalSpec",
    "IkeProposalSpec",
    "IkeSa",
    "IkeSaConfig",
    "PayloadType",
    "esp_key_lengths",
    "nat_hash",
    "select_esp_proposal",
    "select_ike_proposal",
]
