"""What the daemon and its ESP worker processes say to each other, and the counters they share.

Why processes: per-packet work in Python is a few microseconds, and the daemon's event
loop must never sit on the packet path, nor the packet path on the GIL of the event
loop. So ESP runs in worker processes (one sends, one receives) and the daemon only
tells them about SAs. The control channel is a SOCK_SEQPACKET pair carrying one JSON
object per message (rare: SA installs, engine choices), each message declared once
below with its fields; file descriptors (the ESP sockets) ride along as SCM_RIGHTS.

Counters are written by the workers into shared memory (a memfd the daemon maps too),
one fixed-size slot per SA direction, so ``read_counters`` in the daemon is a memory
read, never a round trip. Slot 0 of each worker holds that worker's own drop counters.
Key material crosses the channel (hex) and goes nowhere else: never logged, never in
an error message.
"""

from __future__ import annotations

import json
import mmap
import os
import socket
import struct
from collections.abc import Mapping
from typing import Any, Final

from oe_router.records import record

__all__ = [
    "EVENTS",
    "OPS",
    "SLOT",
    "SLOTS",
    "ControlError",
    "CounterSlot",
    "SharedCounters",
    "decode",
    "encode",
    "recv_message",
    "send_message",
]

_MAX_MESSAGE: Final = 1 << 20

#: daemon -> worker: op name -> (field, type) in order. Keys are hex strings.
OPS: Final[Mapping[str, tuple[tuple[str, type], ...]]] = {
    "add_in": (
        ("slot", int),
        ("spi", int),
        ("transform", str),
        ("encr_key", str),
        ("integ_key", str),
        ("esn", bool),
        ("window", int),
        ("local_ts", list),  # networks (str) the inner destination must be in
        ("remote_ts", list),  # networks the inner source must be in
    ),
    "add_out": (
        ("slot", int),
        ("spi", int),
        ("transform", str),
        ("encr_key", str),
        ("integ_key", str),
        ("esn", bool),
        ("src", str),  # outer addresses and the peer's NAT-T port
        ("dst", str),
        ("port", int),
        ("local_ts", list),
        ("remote_ts", list),
    ),
    "remove": (("slot", int),),
    "engines": (("table", dict),),  # offload.chooser's ChoiceTable as JSON
    "socket": (("ip", str),),  # + one fd: the ESP socket of local address ``ip``
    "close_socket": (("ip", str),),
    "send": (("slot", int), ("packets", list)),  # inner packets (hex) to seal and send
    "canary": (("interval", float),),
    "stop": (),
}

#: worker -> daemon.
EVENTS: Final[Mapping[str, tuple[tuple[str, type], ...]]] = {
    "ready": (("role", str), ("pid", int)),
    "installed": (("slot", int),),  # an add_in/add_out is in effect
    "canary_failed": (("engine", str), ("transform", str), ("reason", str)),
    "engine_switched": (("slot", int), ("engine", str)),
    "error": (("text", str),),
}


class ControlError(Exception):
    """A control message that does not follow its declaration (names the op and field)."""


def _check(table: Mapping[str, tuple[tuple[str, type], ...]], msg: Mapping[str, Any]) -> None:
    kind = msg.get("op", msg.get("ev"))
    if not isinstance(kind, str) or kind not in table:
        raise ControlError(f"unknown control message {kind!r}")
    for name, typ in table[kind]:
        value = msg.get(name)
        # bool is an int in Python: a declared int must not accept a bool
        if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
            raise ControlError(f"control message {kind}: field {name} is not {typ.__name__}")


def encode(msg: Mapping[str, Any]) -> bytes:
    """One declared message as bytes (checked against its declaration)."""
    _check(OPS if "op" in msg else EVENTS, msg)
    return json.dumps(msg, separators=(",", ":")).encode()


def decode(data: bytes) -> dict[str, Any]:
    """Bytes back to a message; ControlError for anything undeclared or malformed."""
    try:
        msg = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise ControlError("control message is not JSON") from None
    if not isinstance(msg, dict):
        raise ControlError("control message is not an object")
    _check(OPS if "op" in msg else EVENTS, msg)
    return msg


def send_message(sock: socket.socket, msg: Mapping[str, Any], fds: tuple[int, ...] = ()) -> None:
    data = encode(msg)
    if fds:
        socket.send_fds(sock, [data], list(fds))
    else:
        sock.send(data)


def recv_message(sock: socket.socket) -> tuple[dict[str, Any], list[int]]:
    """The next message and the descriptors it carried; EOFError when the peer is gone."""
    data, fds, _flags, _addr = socket.recv_fds(sock, _MAX_MESSAGE, 4)
    if not data:
        for fd in fds:
            os.close(fd)
        raise EOFError("control channel closed")
    try:
        return decode(data), fds
    except ControlError:
        for fd in fds:
            os.close(fd)
        raise


#: One counter slot: bytes, packets, replay errors, integrity failures, other drops,
#: sequence number (last sent, or highest received), last use (epoch seconds).
SLOT: Final = struct.Struct("<6Qd8x")
SLOTS: Final = 4096


@record(frozen=True)
class CounterSlot:
    bytes: int
    packets: int
    replay_errors: int
    integrity_failures: int
    dropped: int
    seq: int
    last_use: float


class SharedCounters:
    """The memfd of counter slots, mapped in the daemon and in every worker."""

    def __init__(self, fd: int | None = None, slots: int = SLOTS) -> None:
        self.slots = slots
        size = SLOT.size * slots
        self.owner = fd is None
        if fd is None:
            fd = os.memfd_create("oe-esp-counters", os.MFD_CLOEXEC)
            os.ftruncate(fd, size)
        self.fd = fd
        self._map = mmap.mmap(fd, size)

    def write(
        self,
        slot: int,
        nbytes: int,
        packets: int,
        replay: int,
        integrity: int,
        dropped: int,
        seq: int,
        last_use: float,
    ) -> None:
        SLOT.pack_into(
            self._map, slot * SLOT.size, nbytes, packets, replay, integrity, dropped, seq, last_use
        )

    def read(self, slot: int) -> CounterSlot:
        return CounterSlot(*SLOT.unpack_from(self._map, slot * SLOT.size))

    def clear(self, slot: int) -> None:
        self._map[slot * SLOT.size : (slot + 1) * SLOT.size] = bytes(SLOT.size)

    def close(self) -> None:
        self._map.close()
        if self.owner:
            os.close(self.fd)
