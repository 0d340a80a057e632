"""RFC 4303 ESP for the userspace datapath, sans-IO: one object per SA direction.

Why objects per direction and not a Child SA: the worker sends on one SA and receives
on another, each with its own sequence state, and rekeying replaces them one at a time.
An ``OutboundSa`` turns an inner packet into the ESP payload of a UDP 4500 datagram
(RFC 3948: no non-ESP marker in front of ESP); an ``InboundSa`` does the reverse with
the anti-replay window of RFC 4303 §3.4.3 and Appendix A. Bytes in, bytes out, no
sockets, no clocks: time-based lifetimes are the caller's timers, and packet/byte
lifetimes are reported through ``poll_expire()``.

The crypto is an ``offload.engine.EspCipher``; this module owns what lies around it:
sequence numbers (ESN included), IVs, padding and the trailer, anti-replay, counters.
Every dropped packet raises (or, in the batched forms, returns) an ``EspError``
subclass and bumps the counter the kernel would bump, so ``oe status`` reads the same
numbers from either datapath.

Hot paths are written flat on purpose (locals, no helper calls per packet): the worker
budget is a few microseconds of Python per packet, and the cipher alone takes ~1.5.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Sequence
from typing import Final

from oe_router.datapath.base import ChildSaSpec, Lifetime, SaCounters
from oe_router.offload.engine import (
    AuthenticationFailed,
    Engine,
    EspCipher,
    OpenRequest,
    SealRequest,
    transform,
)

__all__ = [
    "ESP_HEADER",
    "ESP_TRAILER",
    "NEXT_HEADER_IPV4",
    "NEXT_HEADER_IPV6",
    "NEXT_HEADER_NONE",
    "DummyPacket",
    "EspError",
    "InboundSa",
    "IntegrityFailed",
    "LifetimeExpired",
    "Malformed",
    "OutboundSa",
    "Replayed",
    "SequenceExhausted",
    "sa_pair",
]

# --- wire format (RFC 4303 §2) -----------------------------------------------------------
#: ESP header: SPI, then the low 32 bits of the sequence number (ESN's high bits are
#: never sent; they enter the ICV only).
ESP_HEADER: Final = struct.Struct("!II")
#: ESP trailer, the last two bytes of the encrypted part: pad length, next header.
ESP_TRAILER: Final = struct.Struct("!BB")

_pack_header: Final = ESP_HEADER.pack
_unpack_header: Final = ESP_HEADER.unpack_from

NEXT_HEADER_IPV4: Final = 4  # tunnel mode, inner IPv4 (IPPROTO_IPIP)
NEXT_HEADER_IPV6: Final = 41  # tunnel mode, inner IPv6
NEXT_HEADER_NONE: Final = 59  # RFC 4303 §2.6 dummy packet (traffic flow confidentiality)

#: RFC 4303 §2.4: padding bytes are 1, 2, 3, ... (at most 255 of them).
_PADDING: Final = bytes(range(1, 256))
#: ``_PAD_CHECK[n]`` = the padding of length n followed by the pad-length byte n.
_PAD_CHECK: Final = tuple(_PADDING[:n] + bytes((n,)) for n in range(256))
_M32: Final = 0xFFFFFFFF
_M64: Final = (1 << 64) - 1
_NO_LIMIT: Final = 1 << 64  # a counter never reaches it
_IV_POOL: Final = 4096  # bytes of random IVs fetched per getrandom() for CBC
_PENDING: Final = (0, b"")  # open_many's placeholder while a batch is in the engine


# --- errors ------------------------------------------------------------------------------
class EspError(Exception):
    """A packet the SA refused; it is counted already. ``spi`` names the SA."""

    def __init__(self, spi: int, message: str) -> None:
        super().__init__(f"ESP SA {spi:#010x}: {message}")
        self.spi = spi


class Malformed(EspError):
    """Too short, wrong SPI, misaligned, or a bad trailer (pad length or padding bytes)."""


class Replayed(EspError):
    """The sequence number was seen already, or lies left of the window (``too_old``)."""

    def __init__(self, spi: int, seq: int, *, too_old: bool) -> None:
        what = "left of the replay window" if too_old else "replayed"
        super().__init__(spi, f"sequence number {seq} {what}")
        self.seq = seq
        self.too_old = too_old


class IntegrityFailed(EspError, AuthenticationFailed):
    """The ICV did not verify: forged, corrupt, or (ESN) from an unexpected 2^32 epoch."""


class DummyPacket(EspError):
    """Next header 59: an authentic RFC 4303 §2.6 dummy packet, dropped on purpose."""


class LifetimeExpired(EspError):
    """The SA reached its hard packet or byte limit (or its sequence space): rekey."""


class SequenceExhausted(LifetimeExpired):
    """The next sequence number would wrap (2^32-1 without ESN, 2^64-1 with): rekey."""


# --- lifetimes ---------------------------------------------------------------------------
class _Limits:
    """Soft/hard packet and byte limits checked like xfrm_state_check_expire: before a
    packet is processed, hard refuses it once a counter has reached the limit (so
    ``hard_packets=N`` lets exactly N through) and soft is reported once."""

    __slots__ = ("_hard_b", "_hard_p", "_pending", "_soft_b", "_soft_p", "hard", "soft")

    def __init__(self, lifetime: Lifetime | None) -> None:
        lft = lifetime or Lifetime()
        self._soft_p = lft.soft_packets or _NO_LIMIT
        self._soft_b = lft.soft_bytes or _NO_LIMIT
        self._hard_p = lft.hard_packets or _NO_LIMIT
        self._hard_b = lft.hard_bytes or _NO_LIMIT
        self.soft = False
        self.hard = False
        self._pending: list[bool] = []

    def thresholds(self) -> tuple[int, int]:
        """The counter values at which the SA must call ``check`` again."""
        if self.hard:
            return 0, 0
        if self.soft:
            return self._hard_p, self._hard_b
        return min(self._soft_p, self._hard_p), min(self._soft_b, self._hard_b)

    def check(self, packets: int, nbytes: int) -> bool:
        """Update the flags; True if the SA must refuse the packet (hard limit)."""
        if not self.hard and (packets >= self._hard_p or nbytes >= self._hard_b):
            self.hard = True
            self._pending.append(True)
        if not self.soft and (packets >= self._soft_p or nbytes >= self._soft_b):
            self.soft = True
            self._pending.insert(0, False)
        return self.hard

    def kill(self) -> None:
        if not self.hard:
            self.hard = True
            self._pending.append(True)

    def poll(self) -> bool | None:
        return self._pending.pop(0) if self._pending else None


class _Sa:
    """Counters and limits shared by both directions (the kernel's curlft and stats)."""

    __slots__ = ("_cipher", "_icv", "_iv", "_lim_b", "_lim_p", "_limits", "bytes", "esn",
                 "packets", "spi", "transform")  # fmt: skip

    def __init__(self, spi: int, cipher: EspCipher, esn: bool, lifetime: Lifetime | None) -> None:
        if not 0 <= spi <= _M32:
            raise ValueError(f"ESP SA: SPI {spi} is not a 32-bit value")
        self.spi = spi
        self._cipher = cipher
        self.transform = cipher.transform
        self._iv = self.transform.iv_len
        self._icv = self.transform.icv_len
        self.esn = esn
        self.packets = 0  # packets processed (inner packets, like the kernel's curlft)
        self.bytes = 0  # bytes of those inner packets
        self._limits = _Limits(lifetime)
        self._lim_p, self._lim_b = self._limits.thresholds()

    @property
    def cipher(self) -> EspCipher:
        """The engine's cipher in use; assignable (same transform) to move the SA to
        another engine between packets, e.g. by packet size or after a canary failure."""
        return self._cipher

    @cipher.setter
    def cipher(self, cipher: EspCipher) -> None:
        if cipher is self._cipher:
            return
        if cipher.transform is not self.transform and cipher.transform != self.transform:
            raise ValueError(
                f"ESP SA {self.spi:#010x}: cipher runs {cipher.transform.name}, "
                f"the SA {self.transform.name}"
            )
        self._cipher = cipher
        self._bind(cipher)

    def _bind(self, cipher: EspCipher) -> None:
        raise NotImplementedError

    def _check_limits(self) -> None:
        """Slow path, taken when a counter reached a threshold; raises on hard expiry."""
        refuse = self._limits.check(self.packets, self.bytes)
        self._lim_p, self._lim_b = self._limits.thresholds()
        if refuse:
            raise self._refusal()

    def _refusal(self) -> LifetimeExpired:
        return LifetimeExpired(self.spi, "hard lifetime reached, the SA needs a rekey")

    def poll_expire(self) -> bool | None:
        """Once per event: False when a soft limit was crossed (rekey now), True when
        the SA reached a hard limit or its sequence space (it refuses packets); None
        when nothing new happened. The caller turns these into ``base.Expire``."""
        return self._limits.poll()

    @property
    def expired(self) -> bool:
        """True once the SA refuses packets (hard lifetime or sequence space)."""
        return self._limits.hard

    @property
    def dying(self) -> bool:
        """True once a soft limit was crossed (XFRM's km.dying): a rekey is due, and a
        newer SA of the same policy is preferred (``spd.Sad``)."""
        return self._limits.soft or self._limits.hard

    def close(self) -> None:
        """Release the cipher's kernel objects; the SA is unusable after."""
        self._cipher.close()


# --- outbound ----------------------------------------------------------------------------
class OutboundSa(_Sa):
    """One outbound SA: ``seal(inner, next_header)`` -> SPI || seq || IV || C || ICV.

    IVs: AEADs use the 64-bit sequence number XOR ``iv_mask`` (unique per key, which is
    all RFC 4106 §3.1 and RFC 7634 §2 ask; the kernel's seqiv XORs a random salt, 0 is
    the plain counter). CBC takes 16 bytes from a pool refilled by ``rng`` (os.urandom)
    4 KiB at a time: unpredictable as RFC 4303 needs, and at ~60 ns per packet cheaper
    than one getrandom() per packet (~280 ns) or an AES-ECB of the counter through
    ``cryptography`` (~950 ns). An SA belongs to one process: a copy made by fork would
    repeat sequence numbers (and, for CBC, IVs).

    ``first_seq`` exists for tests (cross 2^32 without 4 billion packets) and byte-exact
    vectors; sequence numbers start at 1 otherwise.
    """

    __slots__ = ("_bs", "_cbc", "_iv_mask", "_max", "_pool", "_pool_off", "_rng", "_seal",
                 "_seal_many", "_seq", "_tails")  # fmt: skip

    def __init__(
        self,
        spi: int,
        cipher: EspCipher,
        *,
        esn: bool,
        lifetime: Lifetime | None = None,
        iv_mask: int = 0,
        rng: Callable[[int], bytes] = os.urandom,
        first_seq: int = 1,
    ) -> None:
        super().__init__(spi, cipher, esn, lifetime)
        t = self.transform
        self._max = _M64 if esn else _M32
        if not 1 <= first_seq <= self._max + 1:
            raise ValueError(f"ESP SA {spi:#010x}: first sequence number {first_seq} invalid")
        self._seq = first_seq - 1  # the last one sent
        self._bs = t.block_size
        self._cbc = not t.is_aead
        self._iv_mask = iv_mask & _M64
        self._rng = rng
        self._pool = b""
        self._pool_off = _IV_POOL  # empty: the first CBC packet fills it
        self._bind(cipher)
        self._tails: dict[int, bytes] = {}  # (next header << 8 | pad length) -> trailer
        if first_seq > self._max:
            self._limits.kill()
            self._lim_p, self._lim_b = self._limits.thresholds()

    def _bind(self, cipher: EspCipher) -> None:
        self._seal = cipher.seal
        self._seal_many = cipher.seal_many

    @property
    def seq(self) -> int:
        """The last sequence number sent (0 before the first packet)."""
        return self._seq

    def _refusal(self) -> LifetimeExpired:
        if self._seq >= self._max:
            return SequenceExhausted(
                self.spi, f"sequence number {self._seq} was the last one, the SA needs a rekey"
            )
        return super()._refusal()

    def _refuse(self) -> None:
        """Out of sequence numbers: the SA is dead from now on (reported as hard)."""
        self._limits.kill()
        self._lim_p, self._lim_b = self._limits.thresholds()
        raise self._refusal()

    def _tail(self, n: int, next_header: int) -> bytes:
        """Padding (1, 2, 3, ...) to the block size, pad length, next header."""
        pad = -(n + 2) % self._bs
        key = next_header << 8 | pad  # an invalid next header never hits a valid key
        tail = self._tails.get(key)
        if tail is None:
            if not 0 <= next_header <= 0xFF:
                raise ValueError(f"ESP SA {self.spi:#010x}: next header {next_header}")
            tail = self._tails[key] = _PADDING[:pad] + ESP_TRAILER.pack(pad, next_header)
        return tail

    def _next_iv(self) -> bytes:
        off = self._pool_off
        if off >= _IV_POOL:
            self._pool = self._rng(_IV_POOL)
            off = 0
        self._pool_off = off + 16
        return self._pool[off : off + 16]

    def seal(self, inner: bytes, next_header: int) -> bytes:
        """The ESP packet carrying ``inner`` (an IP packet in tunnel mode: next header 4
        or 41). Raises ``SequenceExhausted``/``LifetimeExpired`` when the SA is done."""
        if self.packets >= self._lim_p or self.bytes >= self._lim_b:
            self._check_limits()
        seq = self._seq
        if seq >= self._max:
            self._refuse()
        seq += 1
        self._seq = seq
        n = len(inner)
        self.packets += 1
        self.bytes += n
        tail = self._tails.get(next_header << 8 | -(n + 2) % self._bs)
        if tail is None:
            tail = self._tail(n, next_header)
        hdr = _pack_header(self.spi, seq & _M32)
        iv = self._next_iv() if self._cbc else (seq ^ self._iv_mask).to_bytes(8, "big")
        sealed = self._seal(hdr, seq >> 32 if self.esn else None, iv, inner + tail)
        return hdr + iv + sealed

    def seal_many(self, batch: Sequence[tuple[bytes, int]]) -> list[bytes]:
        """``seal`` for each (inner, next header), the crypto in one engine call.

        If the SA runs out (hard lifetime, sequence space) inside the batch, the result
        is the sealed prefix (shorter than ``batch``) and ``poll_expire()`` says True;
        if it cannot seal even the first packet it raises, as ``seal`` does.
        """
        reqs: list[SealRequest] = []
        heads: list[bytes] = []
        esn, cbc, bs, spi, mask = self.esn, self._cbc, self._bs, self.spi, self._iv_mask
        tails = self._tails
        for inner, next_header in batch:
            try:
                if self.packets >= self._lim_p or self.bytes >= self._lim_b:
                    self._check_limits()
                if self._seq >= self._max:
                    self._refuse()
            except LifetimeExpired:
                if not reqs:
                    raise
                break
            seq = self._seq = self._seq + 1
            n = len(inner)
            self.packets += 1
            self.bytes += n
            tail = tails.get(next_header << 8 | -(n + 2) % bs) or self._tail(n, next_header)
            hdr = _pack_header(spi, seq & _M32)
            iv = self._next_iv() if cbc else (seq ^ mask).to_bytes(8, "big")
            reqs.append(SealRequest(hdr, seq >> 32 if esn else None, iv, inner + tail))
            heads.append(hdr + iv)
        return [h + s for h, s in zip(heads, self._seal_many(reqs), strict=True)]

    def counters(self, add_time: int = 0, use_time: int = 0) -> SaCounters:
        """The kernel-shaped counters; times are the caller's (this core has no clock)."""
        return SaCounters(self.bytes, self.packets, add_time, use_time)


# --- inbound -----------------------------------------------------------------------------
class InboundSa(_Sa):
    """One inbound SA: ``open(packet)`` -> (next header, inner), anti-replay included.

    The window is an int bitmap: bit d says whether ``top - d`` arrived, where ``top`` is
    the highest authenticated sequence number (64-bit with ESN). Sequence number 0 starts
    out as seen, so it is refused like any replay. With ESN the high 32 bits are inferred
    from the window (RFC 4303 Appendix A2.2) and only ever enter the ICV: a wrong guess
    fails authentication. The window moves only after the ICV verified (§3.4.3), and only
    for packets with a sound trailer (as the kernel: a bad trailer fails before its
    xfrm_replay_advance). ``replay_window=0`` turns the replay check off, as in XFRM.

    Padding bytes are checked (RFC 4303 §2.4: the receiver SHOULD); the kernel does not
    (esp_remove_trailer checks only that the pad length leaves a payload), so a peer
    padding with anything but 1, 2, 3, ... works with the kernel and not here unless
    ``check_padding=False``. ``highest_seq`` starts the window as if that number had
    arrived (the kernel's replay state given at SA creation, XFRMA_REPLAY_ESN_VAL): for
    migration and for tests that cross 2^32. Inner packets are returned with any TFC padding (§2.7)
    still behind them; the IP stack trims to the IP length when they are written to TUN.
    """

    __slots__ = (
        "_align",
        "_bitmap",
        "_check_pad",
        "_hlen",
        "_min",
        "_open",
        "_open_many",
        "_top",
        "_wcheck",
        "_window",
        "_winf",
        "_wmask",
        "dummy_packets",
        "integrity_failures",
        "malformed",
        "replay_errors",
        "replay_window_errors",
    )  # fmt: skip

    def __init__(
        self,
        spi: int,
        cipher: EspCipher,
        *,
        esn: bool,
        replay_window: int = 64,
        lifetime: Lifetime | None = None,
        check_padding: bool = True,
        highest_seq: int = 0,
    ) -> None:
        super().__init__(spi, cipher, esn, lifetime)
        if replay_window < 0:
            raise ValueError(f"ESP SA {spi:#010x}: replay window {replay_window} < 0")
        t = self.transform
        self._hlen = 8 + t.iv_len
        # smallest packet worth decrypting: header, IV, one block of payload, ICV
        self._min = self._hlen + t.block_size + t.icv_len
        self._align = 0 if t.is_aead else t.block_size  # the kernel checks CBC only
        self._bind(cipher)
        self._check_pad = check_padding
        self._window = replay_window
        self._wcheck = replay_window > 0
        self._winf = max(replay_window, 1)  # the W of the ESN inference
        self._wmask = (1 << replay_window) - 1 if replay_window else 1
        if not 0 <= highest_seq <= (_M64 if esn else _M32):
            raise ValueError(f"ESP SA {spi:#010x}: highest sequence {highest_seq} invalid")
        self._top = highest_seq  # highest authenticated sequence number (64-bit with ESN)
        self._bitmap = 1  # bit d: top - d was received; top (seq 0 at first) counts as seen
        self.replay_errors = 0  # duplicates (the kernel's stats.replay)
        self.replay_window_errors = 0  # left of the window (stats.replay_window)
        self.integrity_failures = 0  # ICV mismatch (stats.integrity_failed)
        self.malformed = 0  # too short, misaligned, bad trailer (XfrmInStateProtoError)
        self.dummy_packets = 0  # authentic next-header-59 packets, dropped

    def _bind(self, cipher: EspCipher) -> None:
        self._open = cipher.open
        self._open_many = cipher.open_many

    @property
    def highest_seq(self) -> int:
        """The highest authenticated sequence number (0 before the first packet)."""
        return self._top

    # -- sequence numbers --
    def _infer(self, seq_lo: int) -> int:
        """RFC 4303 A2.2: the full 64-bit number a received low half most likely means.

        Returns -1 when the only candidate lies outside 0..2^64-1 (older than the first
        epoch, or past the last): no sender can produce it, so it is a replay or forgery.
        """
        top = self._top
        tl, th, w = top & _M32, top >> 32, self._winf
        if tl >= w - 1:  # window within one epoch
            th = th if seq_lo >= tl - w + 1 else th + 1
        elif seq_lo >= (tl - w + 1) & _M32:  # window spans two epochs: the older one
            th -= 1
        if not 0 <= th <= _M32:
            return -1
        return th << 32 | seq_lo

    def _check_replay(self, seq: int) -> None:
        """Raise (and count) if ``seq`` must not be decrypted: before the ICV check."""
        top = self._top
        if seq > top:
            return
        d = top - seq
        if d >= self._window:
            self.replay_window_errors += 1
            raise Replayed(self.spi, seq, too_old=True)
        if self._bitmap >> d & 1:
            self.replay_errors += 1
            raise Replayed(self.spi, seq, too_old=False)

    def _advance(self, seq: int) -> None:
        """Move the window to an authenticated ``seq`` above ``top``."""
        top = self._top
        self._top = seq
        if self._wcheck:
            self._bitmap = (self._bitmap << (seq - top) | 1) & self._wmask

    def _late(self, seq: int) -> None:
        """Record an authenticated ``seq`` at or below ``top``: checked again first, as
        the window may have moved since ``_check_replay`` (a batch, an async engine)."""
        if self._wcheck:
            self._check_replay(seq)
            self._bitmap |= 1 << (self._top - seq)

    def _bad(self, message: str) -> Malformed:
        self.malformed += 1
        return Malformed(self.spi, message)

    # -- packets --
    def _prepare(self, packet: bytes) -> tuple[int, int | None]:
        """Checks before the ICV: length, SPI, alignment, window. (seq, seq_hi)."""
        n = len(packet)
        if n < self._min:
            raise self._bad(f"{n}-byte packet is shorter than header, IV, one block and ICV")
        spi, seq_lo = _unpack_header(packet)
        if spi != self.spi:
            raise self._bad(f"packet carries SPI {spi:#010x}")
        if self._align and (n - self._hlen - self._icv) % self._align:
            raise self._bad(f"ciphertext is not a multiple of {self._align} bytes")
        if self.esn:
            seq = self._infer(seq_lo)
            seq_hi: int | None = seq >> 32 if seq >= 0 else None
        else:
            seq, seq_hi = seq_lo, None
        if seq < 0:
            self.replay_window_errors += 1
            raise Replayed(self.spi, seq_lo, too_old=True)
        if self._wcheck:
            self._check_replay(seq)
        return seq, seq_hi

    def _finish(self, seq: int, pt: bytes) -> tuple[int, bytes]:
        """After the ICV verified: trailer, padding, window, counters."""
        n = len(pt)
        pad = pt[-2]
        if pad + 3 > n:
            raise self._bad(f"pad length {pad} leaves no payload in {n} bytes")
        if self._check_pad and not pt.endswith(_PAD_CHECK[pad], 0, n - 1):
            raise self._bad("padding bytes are not 1, 2, 3, ... (RFC 4303 §2.4)")
        if seq > self._top:
            self._advance(seq)
        else:
            self._late(seq)
        next_header = pt[-1]
        if next_header == NEXT_HEADER_NONE:
            self.dummy_packets += 1
            raise DummyPacket(self.spi, f"dummy packet (next header 59), sequence {seq}")
        inner = pt[: n - 2 - pad]
        self.packets += 1
        self.bytes += len(inner)
        return next_header, inner

    def open(self, packet: bytes) -> tuple[int, bytes]:
        """(next header, inner packet) of an ESP packet (SPI || seq || IV || C || ICV).

        Raises ``Malformed``, ``Replayed``, ``IntegrityFailed`` (an
        ``AuthenticationFailed``), ``DummyPacket`` or ``LifetimeExpired``, each counted.
        The same steps as ``_prepare`` and ``_finish``, inlined: this is the hot path.
        """
        if self.packets >= self._lim_p or self.bytes >= self._lim_b:
            self._check_limits()
        n = len(packet)
        if n < self._min:
            raise self._bad(f"{n}-byte packet is shorter than header, IV, one block and ICV")
        spi, seq = _unpack_header(packet)
        if spi != self.spi:
            raise self._bad(f"packet carries SPI {spi:#010x}")
        if self._align and (n - self._hlen - self._icv) % self._align:
            raise self._bad(f"ciphertext is not a multiple of {self._align} bytes")
        seq_hi: int | None = None
        if self.esn:
            seq_lo, seq = seq, self._infer(seq)
            if seq < 0:
                self.replay_window_errors += 1
                raise Replayed(self.spi, seq_lo, too_old=True)
            seq_hi = seq >> 32
        if seq <= self._top and self._wcheck:
            self._check_replay(seq)
        hlen = self._hlen
        try:
            pt = self._open(packet[:8], seq_hi, packet[8:hlen], packet[hlen:])
        except AuthenticationFailed:
            self.integrity_failures += 1
            raise IntegrityFailed(self.spi, f"ICV mismatch, sequence {seq}") from None
        n = len(pt)
        pad = pt[-2]
        if pad + 3 > n:
            raise self._bad(f"pad length {pad} leaves no payload in {n} bytes")
        if pad and self._check_pad and not pt.endswith(_PAD_CHECK[pad], 0, n - 1):
            raise self._bad("padding bytes are not 1, 2, 3, ... (RFC 4303 §2.4)")
        top = self._top
        if seq > top:
            self._top = seq
            if self._wcheck:
                self._bitmap = (self._bitmap << (seq - top) | 1) & self._wmask
        else:
            self._late(seq)
        next_header = pt[-1]
        if next_header == NEXT_HEADER_NONE:
            self.dummy_packets += 1
            raise DummyPacket(self.spi, f"dummy packet (next header 59), sequence {seq}")
        n -= 2 + pad
        self.packets += 1
        self.bytes += n
        return next_header, pt[:n]

    def open_many(self, packets: Sequence[bytes]) -> list[tuple[int, bytes] | EspError]:
        """``open`` for each packet, the crypto in one engine call; errors are returned
        in place of results (and counted), never raised.

        Equal to calling ``open`` in order for every packet it accepts; it may name a
        different reason for a drop (the window moves after the batch's crypto, so an
        ESN packet far behind a newer one in the same batch is "too old" here and an ICV
        failure there).
        """
        out: list[tuple[int, bytes] | EspError] = []
        reqs: list[OpenRequest] = []
        slots: list[tuple[int, int]] = []  # (index in out, seq) of each request
        hlen = self._hlen
        for packet in packets:
            try:
                if self.packets >= self._lim_p or self.bytes >= self._lim_b:
                    self._check_limits()
                seq, seq_hi = self._prepare(packet)
            except EspError as exc:
                out.append(exc)
                continue
            slots.append((len(out), seq))
            out.append(_PENDING)
            reqs.append(OpenRequest(packet[:8], seq_hi, packet[8:hlen], packet[hlen:]))
        if not reqs:
            return out
        for (i, seq), pt in zip(slots, self._open_many(reqs), strict=True):
            if pt is None:
                self.integrity_failures += 1
                out[i] = IntegrityFailed(self.spi, f"ICV mismatch, sequence {seq}")
                continue
            try:
                out[i] = self._finish(seq, pt)
            except EspError as exc:
                out[i] = exc
        return out

    def counters(self, add_time: int = 0, use_time: int = 0) -> SaCounters:
        """The kernel-shaped counters (replay_errors = duplicates + too old, as in
        ``ip xfrm state``'s replay column plus replay-window); times are the caller's."""
        return SaCounters(
            self.bytes,
            self.packets,
            add_time,
            use_time,
            replay_errors=self.replay_errors + self.replay_window_errors,
            integrity_failures=self.integrity_failures,
        )


# --- construction from a Child SA spec ---------------------------------------------------
def sa_pair(spec: ChildSaSpec, engine: Engine) -> tuple[InboundSa, OutboundSa]:
    """Both SAs of a Child SA on ``engine`` (the ciphers' transform from the spec's IDs)."""
    enc = spec.encr
    integ = spec.integ.ike_id if spec.integ is not None else None
    made: list[EspCipher] = []
    try:
        for keys in (spec.inbound, spec.outbound):
            bits = (len(keys.encr_key) - enc.salt_bits // 8) * 8
            t = transform(enc.ike_id, bits, integ)
            made.append(engine.cipher(t, keys.encr_key, keys.integ_key))
    except Exception:
        for c in made:
            c.close()
        raise
    inbound = InboundSa(
        spec.inbound.spi,
        made[0],
        esn=spec.esn,
        replay_window=spec.replay_window,
        lifetime=spec.lifetime,
    )
    outbound = OutboundSa(spec.outbound.spi, made[1], esn=spec.esn, lifetime=spec.lifetime)
    return inbound, outbound
