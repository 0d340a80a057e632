"""What every fuzz target process shares: instrumentation, the libFuzzer entry, determinism.

Why a separate module from ``run``: this one runs inside the fuzzed process (atheris
imported, oe_router instrumented), ``run`` is the parent that starts and measures it.
Targets import oe_router only inside ``instrumented()``, so libFuzzer sees edges in our
code (not in dnspython's or cryptography's), and a crash is any exception the target
does not list as the module's documented refusal.
"""

from __future__ import annotations

import hashlib
import logging
import struct
import sys
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager

import atheris

__all__ = ["Records", "Stream", "fuzz_main", "instrumented", "record"]

#: one step of a stateful target's input: op, body length, body
RECORD = struct.Struct("!BH")


def instrumented() -> AbstractContextManager[object]:
    """Import oe_router modules inside this block to give libFuzzer their coverage."""
    return atheris.instrument_imports(include=["oe_router"])  # type: ignore[no-any-return]


class _FormatEverything(logging.Handler):
    """Formats every log record and drops it: a bad format string or argument raises
    (a crash for libFuzzer) instead of printing per input and slowing the run."""

    def emit(self, record: logging.LogRecord) -> None:
        record.getMessage()


def fuzz_main(test_one_input: Callable[[bytes], None]) -> None:
    """Hand the process to libFuzzer (argv carries its flags and corpus dirs); never returns."""
    root = logging.getLogger()
    root.handlers[:] = [_FormatEverything()]
    root.setLevel(logging.DEBUG)
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


class Stream:
    """A deterministic byte source (SHA-256 in counter mode) standing in for os.urandom.

    Reset per input, so the same input replays the same SPIs, nonces and DH keys.
    """

    def __init__(self, seed: bytes) -> None:
        self._seed = seed
        self.reset()

    def reset(self) -> None:
        self._counter = 0
        self._buf = b""

    def __call__(self, n: int) -> bytes:
        while len(self._buf) < n:
            self._counter += 1
            self._buf += hashlib.sha256(self._seed + self._counter.to_bytes(8, "big")).digest()
        out, self._buf = self._buf[:n], self._buf[n:]
        return out


class Records:
    """Splits an input into (op, body) records (``RECORD`` then ``length`` body bytes).

    A truncated last record yields what is left as its body: every input means something.
    """

    def __init__(self, data: bytes, max_records: int) -> None:
        self._data = data
        self._max = max_records

    def __iter__(self) -> Iterator[tuple[int, bytes]]:
        pos, n = 0, 0
        while pos + RECORD.size <= len(self._data) and n < self._max:
            op, length = RECORD.unpack_from(self._data, pos)
            pos += RECORD.size
            body = self._data[pos : pos + length]
            pos += length
            n += 1
            yield op, body


def record(op: int, body: bytes = b"") -> bytes:
    """Encode one record (the seed generator's side of ``Records``)."""
    return RECORD.pack(op, len(body)) + body
