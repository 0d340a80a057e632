"""One IKE SA "link": SPIs, role, keys, the message-ID window and reassembly.

Why apart from ``IkeSa``: an IKE SA rekey (RFC 7296 §2.18) replaces exactly this
part (new SPIs, new keys, message IDs from zero) while the Child SAs, the request
queue and the events stay. So a rekey makes a new ``IkeLink`` and the old one is
kept as a retired link until the Delete exchange ends; nothing is swapped field by
field. The keys of each direction follow from the role the link's keys were derived
for (as aioquic's ``CryptoPair``), so no caller asks "are we the initiator?" to seal or
open.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import field

from oe_router.records import record

from .constants import ExchangeType, HeaderFlag
from .crypto import SkCipher, sk_cipher
from .fragments import FragmentLimits, FragmentReassembler, FragmentStats
from .keys import IkeSaKeys, Prf, ike_sa_keys, prf_of, rekey_skeyseed, skeyseed
from .message import Message, decrypt
from .payloads import SKF, Payload
from .proposals import IkeChoice

ZERO_SPI = bytes(8)


@record(frozen=True, repr=False, slots=True)
class KeyContext:
    """What protects one direction of an IKE SA: the SK cipher with SK_e and SK_a."""

    cipher: SkCipher
    sk_e: bytes
    sk_a: bytes

    def __repr__(self) -> str:
        return f"KeyContext({type(self.cipher).__name__})"


@record(frozen=True, slots=True)
class LinkKeys:
    """The transforms and SK_* keys of one IKE SA; the send and receive contexts and
    SK_p of each side follow from our role. They are made at each use, not kept: two
    ``KeyContext`` objects per IKE SA are ~150 bytes per peer (docs/footprint.md)."""

    choice: IkeChoice
    prf: Prf = field(repr=False)
    keys: IkeSaKeys = field(repr=False)
    cipher: SkCipher = field(repr=False)
    we_initiate: bool

    @classmethod
    def derive(
        cls,
        choice: IkeChoice,
        seed: bytes,
        nonces: tuple[bytes, bytes],
        spis: tuple[bytes, bytes],
        we_initiate: bool,
    ) -> LinkKeys:
        """{SK_d | SK_ai | SK_ar | SK_ei | SK_er | SK_pi | SK_pr} from SKEYSEED (§2.14)."""
        s = choice.spec
        prf = prf_of(s.prf)
        cipher = sk_cipher(s.encr, s.key_bits, s.integ)
        k = ike_sa_keys(
            prf,
            seed,
            nonces[0],
            nonces[1],
            spis[0],
            spis[1],
            integ_key_len=cipher.integ_key_len,
            encr_key_len=cipher.encr_key_len,
        )
        return cls(choice, prf, k, cipher, we_initiate)

    @property
    def send(self) -> KeyContext:
        k, ours = self.keys, self.we_initiate
        return KeyContext(self.cipher, k.sk_ei if ours else k.sk_er, k.sk_ai if ours else k.sk_ar)

    @property
    def recv(self) -> KeyContext:
        k, ours = self.keys, self.we_initiate
        return KeyContext(self.cipher, k.sk_er if ours else k.sk_ei, k.sk_ar if ours else k.sk_ai)

    @property
    def sk_p_ours(self) -> bytes:
        """Our SK_p, for AUTH (RFC 7296 §2.15)."""
        return self.keys.sk_pi if self.we_initiate else self.keys.sk_pr

    @property
    def sk_p_peer(self) -> bytes:
        return self.keys.sk_pr if self.we_initiate else self.keys.sk_pi


@record(frozen=True, slots=True)
class LinkSettings:
    """The parts of the IKE SA's configuration a link works by."""

    retransmit_timeout: float
    retransmit_tries: int
    fragment_size: int
    fragment_limits: FragmentLimits

    @staticmethod
    @functools.lru_cache(maxsize=32)
    def shared(
        retransmit_timeout: float,
        retransmit_tries: int,
        fragment_size: int,
        fragment_limits: FragmentLimits,
    ) -> LinkSettings:
        """One shared (frozen) object per distinct configuration, not one per IKE SA."""
        return LinkSettings(retransmit_timeout, retransmit_tries, fragment_size, fragment_limits)


class IkeLink:
    """SPIs, role, keys and the window (size 1) of one IKE SA.

    Our requests: ``next_mid``, the datagrams of the one in flight, its
    retransmission time and tries. The peer's requests: ``expect_mid`` and the
    cached reply to the last one, replayed for a retransmission (RFC 7296 §2.1).
    Datagrams go to ``sink``, the owner's output list.
    """

    # one per IKE SA (and per retired one): no instance dict (docs/footprint.md)
    __slots__ = (
        "_cached_mid",
        "_cached_response",
        "_iv_counter",
        "_last_request",
        "_random",
        "_reassembler",
        "_sink",
        "_stats",
        "expect_mid",
        "is_initiator",
        "keys",
        "next_mid",
        "ni",
        "nr",
        "peer_frag",
        "retransmit_at",
        "settings",
        "spi_i",
        "spi_r",
        "tries",
    )

    def __init__(
        self,
        spi_i: bytes,
        spi_r: bytes,
        is_initiator: bool,
        *,
        sink: list[bytes],
        random: Callable[[int], bytes],
        stats: FragmentStats,
        settings: LinkSettings,
    ) -> None:
        self.spi_i, self.spi_r, self.is_initiator = spi_i, spi_r, is_initiator
        self.keys: LinkKeys | None = None
        self.ni = self.nr = b""
        self.peer_frag = False  # the peer supports RFC 7383 fragmentation
        self.next_mid = 0  # of our next request
        self.expect_mid = 0  # of the peer's next request
        self.retransmit_at: float | None = None
        self.tries = 0
        self._sink, self._random, self._stats = sink, random, stats
        self.settings = settings
        # () while empty: a shared tuple, not a 56-byte list per link (docs/footprint.md)
        self._last_request: Sequence[bytes] = ()
        self._cached_mid = -1
        self._cached_response: Sequence[bytes] = ()
        self._iv_counter = 0
        self._reassembler: FragmentReassembler | None = None

    def __repr__(self) -> str:
        return f"IkeLink({self.spi_i.hex()}/{self.spi_r.hex()})"

    # ------------------------------------------------------------------ keys

    def derive(self, choice: IkeChoice, shared: bytes) -> None:
        """Keys of a fresh IKE SA: SKEYSEED = prf(Ni | Nr, g^ir) (§2.14)."""
        seed = skeyseed(prf_of(choice.spec.prf), self.ni, self.nr, shared)
        spis = (self.spi_i, self.spi_r)
        self.keys = LinkKeys.derive(choice, seed, (self.ni, self.nr), spis, self.is_initiator)

    def rekeyed(
        self,
        choice: IkeChoice,
        shared: bytes,
        nonces: tuple[bytes, bytes],
        spis: tuple[bytes, bytes],
        we_initiate: bool,
    ) -> IkeLink:
        """The link of the new IKE SA: SKEYSEED = prf(SK_d (old), g^ir (new) | Ni | Nr)
        (§2.18), under the old PRF."""
        assert self.keys is not None
        seed = rekey_skeyseed(self.keys.prf, self.keys.keys.sk_d, shared, *nonces)
        link = IkeLink(
            spis[0],
            spis[1],
            we_initiate,
            sink=self._sink,
            random=self._random,
            stats=self._stats,
            settings=self.settings,
        )
        link.ni, link.nr = nonces
        link.peer_frag = self.peer_frag
        link.keys = LinkKeys.derive(choice, seed, nonces, spis, we_initiate)
        return link

    # ------------------------------------------------------------------ protection

    def flags(self, response: bool) -> int:
        return (HeaderFlag.INITIATOR if self.is_initiator else 0) | (
            HeaderFlag.RESPONSE if response else 0
        )

    def _iv(self, cipher: SkCipher) -> bytes:
        if cipher.iv_len == 8:  # AEAD: a counter never repeats under one key
            self._iv_counter += 1
            return self._iv_counter.to_bytes(8, "big")
        return self._random(cipher.iv_len)

    def protect(self, msg: Message) -> list[bytes]:
        """Seal ``msg``; as SKF fragments (RFC 7383) when the peer supports them and
        the whole message would exceed the fragment size."""
        assert self.keys is not None
        out = self.keys.send
        whole = msg.encrypt(out.cipher, out.sk_e, out.sk_a, self._iv(out.cipher))
        size = self.settings.fragment_size
        if not self.peer_frag or len(whole) <= size:
            return [whole]
        ivs = [self._iv(out.cipher) for _ in range(len(whole) // (size // 2) + 2)]
        return msg.encrypt_fragments(out.cipher, out.sk_e, out.sk_a, ivs, size)

    def open(self, data: bytes, first: Message, now: float) -> Message | None:
        """Decrypt an in-window message, or add a fragment of one (None until complete)."""
        assert self.keys is not None
        inc = self.keys.recv
        if first.payloads and isinstance(first.payloads[-1], SKF):
            if self._reassembler is None:
                self._reassembler = FragmentReassembler(
                    inc.cipher,
                    inc.sk_e,
                    inc.sk_a,
                    self.settings.fragment_limits,
                    self._stats,
                )
            return self._reassembler.add(data, now, first)
        return decrypt(data, inc.cipher, inc.sk_e, inc.sk_a)

    # ------------------------------------------------------------------ our requests

    def send_request(self, datagrams: list[bytes], now: float) -> None:
        """Send a request and arm its retransmission."""
        self._last_request = datagrams
        self._sink.extend(datagrams)
        self.tries = 0
        self.retransmit_at = now + self.settings.retransmit_timeout

    def request(self, exchange: ExchangeType, payloads: list[Payload], now: float) -> None:
        """Seal and send our next request, under the next message ID."""
        msg = Message(self.spi_i, self.spi_r, exchange, self.flags(False), self.next_mid, payloads)
        self.next_mid += 1
        self.send_request(self.protect(msg), now)

    def notify_once(self, payloads: list[Payload]) -> None:
        """An INFORMATIONAL request sent once, not retransmitted (§2.21.2)."""
        msg = Message(
            self.spi_i,
            self.spi_r,
            ExchangeType.INFORMATIONAL,
            self.flags(False),
            self.next_mid,
            payloads,
        )
        self.next_mid += 1
        self._sink.extend(self.protect(msg))

    def retransmit(self, now: float) -> bool:
        """Resend the request in flight when due; False once the tries are used up."""
        if self.retransmit_at is None or now < self.retransmit_at:
            return True
        if self.tries >= self.settings.retransmit_tries:
            return False
        self.tries += 1
        self._sink.extend(self._last_request)
        self.retransmit_at = now + self.settings.retransmit_timeout * (2**self.tries)
        return True

    def awaits(self, msg: Message) -> bool:
        """A response to our request in flight (not a late copy, not another ID)?"""
        if msg.message_id != self.next_mid - 1:
            self.stray(msg, f"outside the window (our request is {self.next_mid - 1})")
            return False
        return self.retransmit_at is not None

    def answered(self) -> None:
        self.retransmit_at = None
        self._last_request = ()  # never resent now: an idle IKE SA holds no old request

    # ------------------------------------------------------------------ the peer's requests

    def is_new_request(self, msg: Message) -> bool:
        """The peer's next request? A retransmitted one gets the cached reply again
        (for fragments only on #1); anything else is dropped."""
        if msg.message_id == self._cached_mid:
            skf = msg.payloads[-1] if msg.payloads else None
            if not isinstance(skf, SKF) or skf.fragment_number == 1:
                self._sink.extend(self._cached_response)
            return False
        if msg.message_id != self.expect_mid:
            self.stray(msg, f"outside the window (expecting {self.expect_mid})")
            return False
        return True

    def cache_reply(self, message_id: int, datagrams: list[bytes]) -> None:
        self._cached_mid, self._cached_response = message_id, datagrams
        self.expect_mid = message_id + 1
        self._sink.extend(datagrams)

    def respond(self, request: Message, payloads: list[Payload]) -> None:
        """Seal our answer to ``request``, remember it for replays and send it."""
        reply = Message(
            self.spi_i,
            self.spi_r,
            request.exchange_type,
            self.flags(True),
            request.message_id,
            payloads,
        )
        self.cache_reply(request.message_id, self.protect(reply))

    def stray(self, msg: Message, why: str) -> None:
        """Count a fragment for a message ID outside the window: never buffered."""
        if msg.payloads and isinstance(msg.payloads[-1], SKF):
            self._stats.drop(f"fragment of message {msg.message_id}: {why}")

    # ------------------------------------------------------------------ housekeeping

    def get_timer(self) -> float | None:
        times = [self.retransmit_at]
        if self._reassembler is not None:
            times.append(self._reassembler.deadline())
        return min((t for t in times if t is not None), default=None)

    def expire_fragments(self, now: float) -> None:
        if self._reassembler is not None:
            self._reassembler.expire(now)

    @property
    def fragment_bytes(self) -> int:
        return self._reassembler.buffered if self._reassembler is not None else 0

    def drop_fragments(self, reason: str) -> None:
        if self._reassembler is not None:
            self._reassembler.abandon_all(reason)

    def close(self) -> None:
        """No more retransmissions or reassembly on this link."""
        self.retransmit_at = None
        self._reassembler = None


__all__ = ["ZERO_SPI", "IkeLink", "KeyContext", "LinkKeys", "LinkSettings"]
