"""Fault injection, a testing aid: an engine that starts corrupting what it seals.

Why: the failure the canary exists for is an engine that keeps answering but answers
wrong (SafeXcel's AES-GCM on OpenWrt 25.12 dropped ESP silently). ``FaultyEngine`` wraps
a real engine and, after ``corrupt_after`` seals counted across all its ciphers, flips a
byte of every ciphertext it returns. It keeps the inner engine's name, kind and drivers,
so nothing but a known-answer test can tell it apart.

It is switched on only by the environment, never by configuration:
``OE_ROUTER_FAULT="afalg:virtio_crypto_aes_cbc:corrupt_after=500"`` (several specs
separated by ``;``). ``offload.make_engine`` reads it, so the daemon and the datapath's
worker processes (which inherit the environment) all build the faulty engine.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence

from .engine import Engine, EngineKind, EspCipher, OpenRequest, SealRequest, Transform

__all__ = ["FAULT_ENV", "FaultyEngine", "apply_faults", "parse_faults"]

FAULT_ENV = "OE_ROUTER_FAULT"


class _Counter:
    """Seals done across one engine's ciphers (ciphers may run in different threads)."""

    def __init__(self, after: int) -> None:
        self.n = 0
        self.after = after
        self._lock = threading.Lock()

    def take(self, n: int) -> int:
        """Count ``n`` more seals; return how many were done before them."""
        with self._lock:
            before = self.n
            self.n += n
            return before


def _flip(sealed: bytes) -> bytes:
    """The first ciphertext byte inverted: a corrupt packet the peer's ICV check rejects."""
    if not sealed:
        return sealed
    return bytes([sealed[0] ^ 0xFF]) + sealed[1:]


class _FaultyCipher:
    def __init__(self, inner: EspCipher, counter: _Counter) -> None:
        self._inner = inner
        self._counter = counter

    @property
    def transform(self) -> Transform:
        return self._inner.transform

    def seal(self, hdr: bytes, seq_hi: int | None, iv: bytes, plaintext: bytes) -> bytes:
        out = self._inner.seal(hdr, seq_hi, iv, plaintext)
        return _flip(out) if self._counter.take(1) >= self._counter.after else out

    def open(self, hdr: bytes, seq_hi: int | None, iv: bytes, sealed: bytes) -> bytes:
        return self._inner.open(hdr, seq_hi, iv, sealed)

    def seal_many(self, batch: Sequence[SealRequest]) -> list[bytes]:
        out = self._inner.seal_many(batch)
        first, after = self._counter.take(len(out)), self._counter.after
        return [_flip(c) if first + i >= after else c for i, c in enumerate(out)]

    def open_many(self, batch: Sequence[OpenRequest]) -> list[bytes | None]:
        return self._inner.open_many(batch)

    def close(self) -> None:
        self._inner.close()


class FaultyEngine:
    """``inner``, except that every seal after the first ``corrupt_after`` is corrupted."""

    def __init__(self, inner: Engine, *, corrupt_after: int) -> None:
        if corrupt_after < 0:
            raise ValueError(f"{FAULT_ENV}: corrupt_after must be >= 0, got {corrupt_after}")
        self._inner = inner
        self._counter = _Counter(corrupt_after)

    @property
    def name(self) -> str:
        return self._inner.name

    @property
    def kind(self) -> EngineKind:
        return self._inner.kind

    @property
    def corrupt_after(self) -> int:
        return self._counter.after

    @corrupt_after.setter
    def corrupt_after(self, n: int) -> None:
        """Move the trigger (a test arms the fault once the engine is proven and in use)."""
        self._counter.after = n

    @property
    def seals(self) -> int:
        """Seals done so far by all of this engine's ciphers."""
        return self._counter.n

    def transforms(self) -> tuple[Transform, ...]:
        return self._inner.transforms()

    def driver(self, transform: Transform) -> str:
        return self._inner.driver(transform)

    def cipher(self, transform: Transform, encr_key: bytes, integ_key: bytes = b"") -> EspCipher:
        return _FaultyCipher(self._inner.cipher(transform, encr_key, integ_key), self._counter)


def parse_faults(text: str) -> dict[str, int]:
    """``ENGINE:corrupt_after=N[;ENGINE:corrupt_after=N...]`` -> {engine: N}.

    The engine name may hold a colon itself (``afalg:<driver>``): the setting is what
    follows the last one. ValueError names the bad part.
    """
    out: dict[str, int] = {}
    for part in text.split(";"):
        part = part.strip()
        if not part:
            continue
        engine, sep, setting = part.rpartition(":")
        key, eq, value = setting.partition("=")
        if not sep or not engine or key.strip() != "corrupt_after" or not eq:
            raise ValueError(
                f"{FAULT_ENV}: {part!r} is not ENGINE:corrupt_after=N "
                "(e.g. afalg:virtio_crypto_aes_cbc:corrupt_after=500)"
            )
        try:
            n = int(value)
        except ValueError:
            raise ValueError(
                f"{FAULT_ENV}: {part!r}: corrupt_after {value!r} is not a number"
            ) from None
        if n < 0:
            raise ValueError(f"{FAULT_ENV}: {part!r}: corrupt_after must be >= 0")
        out[engine.strip()] = n
    return out


def apply_faults(engine: Engine, environ: Mapping[str, str]) -> Engine:
    """``engine`` wrapped in a FaultyEngine if ``environ``'s OE_ROUTER_FAULT names it."""
    text = environ.get(FAULT_ENV, "")
    if not text:
        return engine
    after = parse_faults(text).get(engine.name)
    if after is None:
        return engine
    return FaultyEngine(engine, corrupt_after=after)
