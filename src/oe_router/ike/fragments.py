"""Reassembly of RFC 7383 IKE fragments (SKF), with limits on what a peer can make us hold.

Why a module of its own: anyone who finished IKE_SA_INIT with us (NULL authentication
lets anyone) holds keys that make its fragments authentic, and RFC 7383 §2.6 has the
receiver keep every fragment until the last one arrives. Without limits one peer sent
836 valid fragments that never completed and 20 MB stayed buffered, for good on an
established SA. So a reassembler here

* refuses a Total Fragments above ``max_fragments`` before spending a decryption on it;
* holds at most ``max_sa_bytes`` (fragment datagrams, all messages of one IKE SA link);
  a fragment that would exceed it abandons the message it belongs to (it can never
  complete, so holding the rest only costs memory), as charon does with ``max_packet``;
* abandons a message still incomplete ``timeout`` seconds after its first fragment
  (the sender retransmits the whole set, which completes on its own);
* keeps a message being received from the peer (a request) apart from a response to our
  request, each bound to its message ID, so fragments of two messages never mix.

The endpoint adds the one limit no single IKE SA can see, ``max_total_bytes`` across all
of them (``IkeEndpoint``), and reports the counters kept in ``FragmentStats``.
Time is passed in; nothing here logs (a flood must not log per packet).
"""

from __future__ import annotations

from dataclasses import field
from typing import Generic, TypeVar

from oe_router.ratelimit import RateLimit
from oe_router.records import record

from .crypto import SkCipher
from .errors import IkeCryptoError, IkeDecodeError
from .message import Message, decode_chain
from .payloads import SKF

__all__ = [
    "DEFAULT_FRAGMENT_LIMITS",
    "FragmentBudget",
    "FragmentLimits",
    "FragmentReassembler",
    "FragmentStats",
]

H = TypeVar("H")  # whatever the endpoint names an IKE SA by


@record(frozen=True)
class FragmentLimits:
    """How much of a peer's unfinished fragmented messages we hold, and for how long.

    ``max_fragments`` is charon's MAX_FRAGMENTS (255; the field allows 65535). A peer
    splitting even charon's largest message (``max_packet``, 10000 bytes) into fragments
    of the 576-byte IPv4 minimum stays far below both byte limits: ``max_sa_bytes``
    (64 KiB, what one unfragmented IKE datagram can be) per IKE SA and
    ``max_total_bytes`` (1 MiB) across every IKE SA of the endpoint. ``timeout`` (30 s,
    the half-open timeout) spans several of a peer's retransmissions, whose fragments
    a partial message may still combine with.
    """

    max_fragments: int = 255
    max_sa_bytes: int = 64 * 1024
    max_total_bytes: int = 1024 * 1024
    timeout: float = 30.0

    def __post_init__(self) -> None:
        if not 1 <= self.max_fragments <= 65535:
            raise ValueError(f"fragment limits: max_fragments {self.max_fragments} not in 1..65535")
        if self.max_sa_bytes < 1 or self.max_total_bytes < self.max_sa_bytes:
            raise ValueError(
                f"fragment limits: need 0 < max_sa_bytes ({self.max_sa_bytes}) "
                f"<= max_total_bytes ({self.max_total_bytes})"
            )
        if self.timeout <= 0:
            raise ValueError(f"fragment limits: timeout {self.timeout} must be positive")


DEFAULT_FRAGMENT_LIMITS = FragmentLimits()


@record
class FragmentStats:
    """What reassembly refused since the counters were last taken (``take``).

    ``dropped``: fragments not kept because of a limit, a message ID outside the window,
    or a failed integrity check. ``abandoned``: messages given up incomplete (timeout, a
    byte limit, superseded, evicted). ``reason``: the latest why, for one log line.
    """

    dropped: int = 0
    abandoned: int = 0
    reason: str = ""

    def drop(self, reason: str) -> None:
        self.dropped += 1
        self.reason = reason

    def abandon(self, reason: str) -> None:
        self.abandoned += 1
        self.reason = reason

    def add(self, other: FragmentStats) -> None:
        self.dropped += other.dropped
        self.abandoned += other.abandoned
        self.reason = other.reason or self.reason

    def take(self) -> FragmentStats:
        """Return the counts so far and start again from zero."""
        out = FragmentStats(self.dropped, self.abandoned, self.reason)
        self.dropped = self.abandoned = 0
        self.reason = ""
        return out

    def __bool__(self) -> bool:
        return bool(self.dropped or self.abandoned)


@record
class _Partial:
    """The fragments of one message received so far."""

    message_id: int
    total: int
    started: float
    parts: dict[int, bytes] = field(default_factory=dict)
    size: int = 0  # bytes of the fragment datagrams held
    first_inner: int = 0
    template: Message | None = None  # fragment 1's header (the message's own)


class FragmentReassembler:
    """Collects the SKF fragments (RFC 7383 §2.6) one IKE SA link receives, bounded.

    Every fragment is verified and decrypted before it may change anything: a forged
    one is dropped without disturbing the ones held. At most two messages are in
    progress, a request from the peer and a response to ours; the caller passes only
    message IDs inside the window (RFC 7296 §2.3), and a fragment for another message
    ID of the same direction supersedes (abandons) the one held.
    """

    def __init__(
        self,
        cipher: SkCipher,
        sk_e: bytes,
        sk_a: bytes,
        limits: FragmentLimits = DEFAULT_FRAGMENT_LIMITS,
        stats: FragmentStats | None = None,
    ) -> None:
        self.cipher, self.sk_e, self.sk_a = cipher, sk_e, sk_a
        self.limits = limits
        self.stats = stats if stats is not None else FragmentStats()
        self._partials: dict[bool, _Partial] = {}  # by "is a response"

    @property
    def buffered(self) -> int:
        """Bytes of fragment datagrams held now."""
        return sum(p.size for p in self._partials.values())

    def deadline(self) -> float | None:
        """When the oldest incomplete message times out (None: nothing held)."""
        return min((p.started + self.limits.timeout for p in self._partials.values()), default=None)

    def expire(self, now: float) -> None:
        """Abandon every message still incomplete ``timeout`` after its first fragment."""
        limit = self.limits.timeout
        for key, p in list(self._partials.items()):
            if now >= p.started + limit:
                self._abandon(key, f"message {p.message_id} incomplete after {limit:g} s")

    def abandon_all(self, reason: str) -> None:
        """Give up every message held (the endpoint needs the memory back)."""
        for key in list(self._partials):
            self._abandon(key, reason)

    def _abandon(self, key: bool, reason: str) -> None:
        p = self._partials.pop(key)
        have = len(p.parts)
        self.stats.abandon(f"{reason} ({have} of {p.total} fragments, {p.size} bytes)")

    def add(self, data: bytes, now: float = 0.0, msg: Message | None = None) -> Message | None:
        """Feed one fragment datagram (``msg``: it, already decoded); returns the whole
        decrypted message once complete. Raises IkeDecodeError for what is not one SKF
        fragment and IkeCryptoError for a forgery (both counted as dropped)."""
        if msg is None:
            msg = Message.decode(data)
        if len(msg.payloads) != 1 or not isinstance(msg.payloads[0], SKF):
            raise IkeDecodeError("not an SKF fragment message")
        skf = msg.payloads[0]
        num, total, limits = skf.fragment_number, skf.total_fragments, self.limits
        if total > limits.max_fragments:
            self.stats.drop(f"{total} fragments announced, at most {limits.max_fragments} taken")
            return None
        key = msg.is_response
        held = self._partials.get(key)
        if held is not None and held.message_id == msg.message_id:
            if total < held.total:
                self.stats.drop(f"fragment of an older fragmentation ({total} < {held.total})")
                return None
            if total == held.total and num in held.parts:
                return None  # a duplicate (a retransmission): nothing new, nothing held
        head_len = len(data) - len(skf.data)
        try:
            plain = self.cipher.open(self.sk_e, self.sk_a, bytes(data[:head_len]), skf.data)
        except IkeCryptoError:
            self.stats.drop("fragment failed its integrity check")
            raise
        if held is not None and held.message_id != msg.message_id:
            self._abandon(key, f"message {held.message_id} superseded by {msg.message_id}")
            held = None
        elif held is not None and total > held.total:
            # RFC 7383 §2.6: the sender re-fragmented (smaller fragments, more of them)
            del self._partials[key]
            held = None
        size = len(data)
        if self.buffered + size > limits.max_sa_bytes:
            self.stats.drop(f"over {limits.max_sa_bytes} bytes held for one IKE SA")
            if held is not None:
                self._abandon(key, f"message {held.message_id} over {limits.max_sa_bytes} bytes")
            return None
        if held is None:
            held = self._partials[key] = _Partial(msg.message_id, total, now)
        held.parts[num] = plain
        held.size += size
        if num == 1:
            held.first_inner, held.template = skf.first_inner, msg
        if len(held.parts) < held.total or held.template is None:
            return None
        del self._partials[key]
        inner, _ = decode_chain(
            b"".join(held.parts[i] for i in range(1, held.total + 1)), held.first_inner
        )
        t = held.template
        return Message(t.spi_i, t.spi_r, t.exchange_type, t.flags, t.message_id, inner, t.version)


class FragmentBudget(Generic[H]):
    """The endpoint's part of the limits: bytes held across every IKE SA (``held``), which
    SA gives its messages up when the sum passes ``max_total_bytes`` (the biggest holder,
    so one flooding peer cannot starve a small legitimate reassembly elsewhere), and when
    a log line about what was dropped is due (at most one per ``log_interval``)."""

    def __init__(self, limits: FragmentLimits, log_interval: float = 10.0) -> None:
        self.limits = limits
        self.held = 0
        self._by: dict[H, int] = {}
        self._unlogged = FragmentStats()
        self._log = RateLimit(log_interval)

    def hold(self, who: H, size: int) -> None:
        """``who`` holds ``size`` bytes now (0: nothing, or it is gone)."""
        self.held += size - self._by.pop(who, 0)
        if size:
            self._by[who] = size

    def victim(self) -> H | None:
        """The holder to take bytes back from, while the sum is over the limit."""
        if self.held <= self.limits.max_total_bytes or not self._by:
            return None
        return max(self._by, key=self._by.__getitem__)

    def report(self, stats: FragmentStats, now: float) -> FragmentStats | None:
        """Note ``stats``; return everything not yet logged when a line is due."""
        if not stats:
            return None
        self._unlogged.add(stats)
        return self._unlogged.take() if self._log.allow(now) else None
