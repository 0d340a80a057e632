"""Fault injection, a testing aid: an engine that starts corrupting what it seals.

Why: the failure the canary exists for is an engine that keeps answering but answers
wrong (SafeXcel's AES-GCM on OpenWrt 25.12 dropped ESP silently). ``FaultyEngine`` wraps
a real engine and flips a byte of every ciphertext it returns once its trigger fires:

* ``corrupt_after=N``: after N seals counted across all its ciphers (in this process);
* ``corrupt_when=PATH``: while the file PATH exists (looked at every 50 ms at most), so a
  test can break the engine at the moment it chooses, for the daemon and the datapath's
  worker processes alike (seal counts differ between processes: the daemon also seals
  for its KATs and measurements).

It keeps the inner engine's name, kind and drivers, so nothing but a known-answer test
can tell it apart.

It is switched on only by the environment, never by configuration:
``OE_ROUTER_FAULT="afalg:virtio_crypto_aes_cbc:corrupt_after=500"`` or
``OE_ROUTER_FAULT="afalg:virtio_crypto_aes_cbc:corrupt_when=/tmp/oe-fault"`` (several
specs separated by ``;``). ``offload.make_engine`` reads it, so the daemon and the
datapath's worker processes (which inherit the environment) all build the faulty engine.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence

from oe_router.records import record

from .engine import Engine, EngineKind, EspCipher, OpenRequest, SealRequest, Transform

__all__ = ["FAULT_ENV", "Fault", "FaultyEngine", "apply_faults", "parse_faults"]

FAULT_ENV = "OE_ROUTER_FAULT"
_TRIGGER_POLL = 0.05  # seconds between looks at a corrupt_when file


@record(frozen=True)
class Fault:
    """One engine's trigger, as OE_ROUTER_FAULT spells it."""

    corrupt_after: int | None = None
    corrupt_when: str | None = None


class _Trigger:
    """Seals done across one engine's ciphers (they may run in different threads), and
    whether the next ones are to be corrupted."""

    def __init__(
        self, after: int | None, when: str | None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.n = 0
        self.after = after
        self.when = when
        self._clock = clock
        self._checked = float("-inf")
        self._exists = False
        self._lock = threading.Lock()

    def _file(self) -> bool:
        if self.when is None:
            return False
        now = self._clock()
        if now - self._checked >= _TRIGGER_POLL:
            self._checked = now
            self._exists = os.path.exists(self.when)
        return self._exists

    def take(self, n: int) -> list[bool]:
        """Count ``n`` more seals; for each, whether it is to be corrupted."""
        with self._lock:
            before = self.n
            self.n += n
            on = self._file()
            after = self.after
        return [on or (after is not None and before + i >= after) for i in range(n)]


def _flip(sealed: bytes) -> bytes:
    """The first ciphertext byte inverted: a corrupt packet the peer's ICV check rejects."""
    if not sealed:
        return sealed
    return bytes([sealed[0] ^ 0xFF]) + sealed[1:]


class _FaultyCipher:
    def __init__(self, inner: EspCipher, trigger: _Trigger) -> None:
        self._inner = inner
        self._trigger = trigger

    @property
    def transform(self) -> Transform:
        return self._inner.transform

    def seal(self, hdr: bytes, seq_hi: int | None, iv: bytes, plaintext: bytes) -> bytes:
        out = self._inner.seal(hdr, seq_hi, iv, plaintext)
        return _flip(out) if self._trigger.take(1)[0] else out

    def open(self, hdr: bytes, seq_hi: int | None, iv: bytes, sealed: bytes) -> bytes:
        return self._inner.open(hdr, seq_hi, iv, sealed)

    def seal_many(self, batch: Sequence[SealRequest]) -> list[bytes]:
        out = self._inner.seal_many(batch)
        bad = self._trigger.take(len(out))
        return [_flip(c) if b else c for c, b in zip(out, bad, strict=True)]

    def open_many(self, batch: Sequence[OpenRequest]) -> list[bytes | None]:
        return self._inner.open_many(batch)

    def close(self) -> None:
        self._inner.close()


class FaultyEngine:
    """``inner``, except that seals are corrupted once a trigger fires (see the module)."""

    def __init__(
        self,
        inner: Engine,
        *,
        corrupt_after: int | None = None,
        corrupt_when: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if corrupt_after is None and corrupt_when is None:
            raise ValueError(f"{FAULT_ENV}: give corrupt_after or corrupt_when")
        if corrupt_after is not None and corrupt_after < 0:
            raise ValueError(f"{FAULT_ENV}: corrupt_after must be >= 0, got {corrupt_after}")
        self._inner = inner
        self._trigger = _Trigger(corrupt_after, corrupt_when, clock)

    @property
    def name(self) -> str:
        return self._inner.name

    @property
    def kind(self) -> EngineKind:
        return self._inner.kind

    @property
    def corrupt_after(self) -> int | None:
        return self._trigger.after

    @corrupt_after.setter
    def corrupt_after(self, n: int | None) -> None:
        """Move the trigger (a test arms the fault once the engine is proven and in use)."""
        self._trigger.after = n

    @property
    def corrupt_when(self) -> str | None:
        return self._trigger.when

    @property
    def seals(self) -> int:
        """Seals done so far by all of this engine's ciphers."""
        return self._trigger.n

    def transforms(self) -> tuple[Transform, ...]:
        return self._inner.transforms()

    def driver(self, transform: Transform) -> str:
        return self._inner.driver(transform)

    def cipher(self, transform: Transform, encr_key: bytes, integ_key: bytes = b"") -> EspCipher:
        return _FaultyCipher(self._inner.cipher(transform, encr_key, integ_key), self._trigger)

    def __getattr__(self, name: str) -> object:
        # what else the inner engine offers (why_not, hardware) stays reachable
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._inner, name)


_USAGE = (
    "is not ENGINE:corrupt_after=N or ENGINE:corrupt_when=PATH "
    "(e.g. afalg:virtio_crypto_aes_cbc:corrupt_after=500)"
)


def parse_faults(text: str) -> dict[str, Fault]:
    """``ENGINE:corrupt_after=N`` / ``ENGINE:corrupt_when=PATH``, ``;``-separated ->
    {engine: Fault}. The engine name may hold a colon itself (``afalg:<driver>``): the
    setting starts at the last ``:corrupt_``. ValueError names the bad part."""
    out: dict[str, Fault] = {}
    for part in text.split(";"):
        part = part.strip()
        if not part:
            continue
        cut = part.rfind(":corrupt_")
        engine, setting = (part[:cut].strip(), part[cut + 1 :]) if cut > 0 else ("", "")
        key, eq, value = setting.partition("=")
        if not engine or not eq or key not in ("corrupt_after", "corrupt_when"):
            raise ValueError(f"{FAULT_ENV}: {part!r} {_USAGE}")
        if key == "corrupt_when":
            if not value:
                raise ValueError(f"{FAULT_ENV}: {part!r}: corrupt_when needs a file path")
            out[engine] = Fault(corrupt_when=value)
            continue
        try:
            n = int(value)
        except ValueError:
            raise ValueError(
                f"{FAULT_ENV}: {part!r}: corrupt_after {value!r} is not a number"
            ) from None
        if n < 0:
            raise ValueError(f"{FAULT_ENV}: {part!r}: corrupt_after must be >= 0")
        out[engine] = Fault(corrupt_after=n)
    return out


def apply_faults(engine: Engine, environ: Mapping[str, str]) -> Engine:
    """``engine`` wrapped in a FaultyEngine if ``environ``'s OE_ROUTER_FAULT names it."""
    text = environ.get(FAULT_ENV, "")
    if not text:
        return engine
    fault = parse_faults(text).get(engine.name)
    if fault is None:
        return engine
    return FaultyEngine(engine, corrupt_after=fault.corrupt_after, corrupt_when=fault.corrupt_when)
