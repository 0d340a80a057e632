"""Prepared XFRM requests sent as one netlink batch: the sans-IO half of the fast path.

Why: a Child SA is five kernel objects (two SAs, out/in/fwd policies). Encoding each
with pyroute2's generic encoder and waiting for its ACK before the next one made an
install about 7x slower than ``ip -batch``. Here every message *shape* (algorithm, key
lengths, family, flags...) is encoded once by the declared wire format (xfrm_msg, through
pyroute2), and ``Prototype`` remembers where the fields that differ between installs sit
(addresses, SPI, reqid, keys, selector). An install copies the prototypes into one
``Batch`` buffer, patches those fields, numbers the messages and goes out in one send.
Only a send's last message asks for an ACK (NLM_F_ACK): the kernel handles a send's
messages in order and answers every failed one anyway, so that ACK arriving means every
message before it without an error went in (as many answers fewer to build and read).
``read_acks`` maps each answer back to its message by sequence number, so an error
names the object that failed.

Key material: a rendered batch holds keys. Prototypes are encoded with zero keys, nothing
here has a repr showing bytes, and ``Batch.wipe`` zeroes the buffer once it is sent.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import field
from typing import Any, Final, NamedTuple

from oe_router.datapath import xfrm_msg as X
from oe_router.records import record

# --- netlink framing (include/uapi/linux/netlink.h), declared as tables like xfrm.h's ---
NLMSGHDR: Final = X.CStruct(
    "nlmsghdr", (("len", X.U32), ("type", X.U16), ("flags", X.U16), ("seq", X.U32), ("pid", X.U32))
)
NLMSGERR: Final = X.CStruct("nlmsgerr", (("error", X.S32), ("msg", NLMSGHDR)))
NLATTR: Final = X.CStruct("nlattr", (("len", X.U16), ("type", X.U16)))
NLMSG_ERROR: Final = 2
NLM_F_REQUEST: Final = 0x1
NLM_F_ACK: Final = 0x4
NLM_F_CAPPED: Final = 0x100  # the error carries only the request's header (NETLINK_CAP_ACK)
NLM_F_ACK_TLVS: Final = 0x200  # extended ACK attributes follow (NETLINK_EXT_ACK)
NLMSGERR_ATTR_MSG: Final = 1
NLA_TYPE_MASK: Final = 0x3FFF

_HDR: Final = struct.Struct("=IHHII")  # NLMSGHDR's fields, all native: checked below
_FLAGS_SEQ: Final = struct.Struct("=HI")  # nlmsghdr.flags and .seq, contiguous
_SEQ: Final = struct.Struct("=I")
_FLAGS: Final = struct.Struct("=H")
_ERR: Final = struct.Struct("=i")
_ATTR: Final = struct.Struct("=HH")
assert _HDR.size == NLMSGHDR.size and _ERR.size + _HDR.size == NLMSGERR.size
assert NLMSGHDR.offsets["flags"][0] + 2 == NLMSGHDR.offsets["seq"][0] == 8

#: A field to patch: a fixed-part field by its flat name ("id_spi"), or
#: (XFRMA_* type, item index, field) inside an attribute; a field name the attribute's
#: struct does not have means the bytes after it (the key of an xfrm_algo*).
Path = str | tuple[int, int, str]


def _packer(code: str) -> Callable[..., None]:
    return struct.Struct(code if code[0] in "<>=!" else "=" + code).pack_into


def locate(data: bytes, msg_type: int, path: Path) -> tuple[int, str]:
    """Where ``path`` sits in an encoded message: (byte offset, struct code)."""
    fixed = X.message_struct(msg_type)
    if isinstance(path, str):
        off, code = fixed.offsets[path]
        return NLMSGHDR.size + off, code
    attr_type, index, name = path
    (end,) = struct.unpack_from("=I", data, 0)
    off = NLMSGHDR.size + ((fixed.size + 3) & ~3)
    while off + NLATTR.size <= end:
        alen, atype = _ATTR.unpack_from(data, off)
        if alen < NLATTR.size:
            break
        if atype & NLA_TYPE_MASK == attr_type:
            item = X.attr_struct(attr_type)
            base = off + NLATTR.size + index * item.size
            if name in item.offsets:
                foff, code = item.offsets[name]
                return base + foff, code
            return base + item.size, f"{alen - NLATTR.size - item.size}s"
        off += (alen + 3) & ~3
    raise KeyError(f"attribute {attr_type} not in message type {msg_type:#x}")


@record(frozen=True, repr=False)
class Prototype:
    """One message shape, encoded once; ``Batch.add`` copies it and patches ``slots``."""

    msg_type: int
    data: bytes
    slots: tuple[tuple[int, Callable[..., None]], ...]

    def __repr__(self) -> str:
        size, slots = len(self.data), len(self.slots)
        return f"<Prototype type {self.msg_type:#x}, {size} bytes, {slots} slots>"


def prototype(
    msg_type: int,
    fields: Mapping[str, Any],
    attrs: list[tuple[str, Any]],
    variable: Sequence[Path],
) -> Prototype:
    """Encode ``fields``/``attrs`` with the declared wire format and note where each
    ``variable`` field lies. The values given for variable fields do not matter (they
    are patched on every use); give zero keys, so no key material is cached."""
    data = X.encode(msg_type, fields, attrs)
    slots = []
    for path in variable:
        off, code = locate(data, msg_type, path)
        slots.append((off, _packer(code)))
    return Prototype(msg_type, data, tuple(slots))


@record(frozen=True, repr=False)
class Group:
    """Several prototypes sent one after the other, joined into one: an install copies
    the whole group at once and patches its slots (offsets from the group's start), so
    a Child SA costs one copy, not one per message."""

    data: bytes
    heads: tuple[int, ...]  # where each message starts
    ends: tuple[int, ...]  # where each message ends
    slots: tuple[tuple[int, Callable[..., None]], ...]

    def __repr__(self) -> str:
        size, slots = len(self.data), len(self.slots)
        return f"<Group of {len(self.heads)} messages, {size} bytes, {slots} slots>"


def group(protos: Sequence[Prototype]) -> Group:
    """The prototypes joined in order; their slots' values go in the same order."""
    data = bytearray()
    heads, ends, slots = [], [], []
    for proto in protos:
        base = len(data)
        data += proto.data
        _FLAGS_SEQ.pack_into(data, base + 6, NLM_F_REQUEST, 0)  # seq: per add
        heads.append(base)
        ends.append(len(data))
        slots += [(base + off, pack_into) for off, pack_into in proto.slots]
    return Group(bytes(data), tuple(heads), tuple(ends), tuple(slots))


@record(repr=False)
class Batch:
    """Messages for one send, each with a caller's tag naming its object.

    Message i carries sequence number ``seq0 + i`` and NLM_F_REQUEST; ``ask_ack`` adds
    NLM_F_ACK to the last message of each send. The kernel answers a failed message
    with its errno, and the one asking with an ACK (error 0) or its errno.
    """

    seq0: int
    buf: bytearray = field(default_factory=bytearray)
    tags: list[Any] = field(default_factory=list)
    ends: list[int] = field(default_factory=list)

    def add(self, proto: Prototype, values: Sequence[Any], tag: Any) -> None:
        buf = self.buf
        base = len(buf)
        buf += proto.data
        _FLAGS_SEQ.pack_into(
            buf, base + 6, NLM_F_REQUEST, (self.seq0 + len(self.tags)) & 0xFFFFFFFF
        )
        for (off, pack_into), value in zip(proto.slots, values, strict=True):
            pack_into(buf, base + off, value)
        self.tags.append(tag)
        self.ends.append(len(buf))

    def add_group(self, grp: Group, values: Sequence[Any], tags: Sequence[Any]) -> None:
        """``add`` for each message of ``grp`` (one tag each), in one copy."""
        if len(tags) != len(grp.heads):
            raise ValueError(f"{len(tags)} tags for a group of {len(grp.heads)} messages")
        buf = self.buf
        base = len(buf)
        buf += grp.data
        seq = self.seq0 + len(self.tags)
        pack_seq = _SEQ.pack_into
        for head in grp.heads:
            pack_seq(buf, base + head + 8, seq & 0xFFFFFFFF)
            seq += 1
        for (off, pack_into), value in zip(grp.slots, values, strict=True):
            pack_into(buf, base + off, value)
        self.tags += tags
        self.ends += [base + end for end in grp.ends]

    def ask_ack(self, item: int) -> None:
        """Have message ``item`` answered even when it succeeds (the last of a send)."""
        head = self.ends[item - 1] if item else 0
        (flags,) = _FLAGS.unpack_from(self.buf, head + 6)
        _FLAGS.pack_into(self.buf, head + 6, flags | NLM_F_ACK)

    def __len__(self) -> int:
        return len(self.tags)

    def __repr__(self) -> str:
        return f"<Batch seq {self.seq0}, {len(self.tags)} messages, {len(self.buf)} bytes>"

    def chunks(self, max_messages: int) -> Iterator[tuple[int, int, int, int]]:
        """(first index, end index, first byte, end byte) of sends of at most
        ``max_messages`` messages each (bounded so that their ACKs fit the socket)."""
        for first in range(0, len(self.tags), max_messages):
            last = min(first + max_messages, len(self.tags))
            yield first, last, self.ends[first - 1] if first else 0, self.ends[last - 1]

    def wipe(self) -> None:
        """Zero the buffer (it held keys) once the kernel has it."""
        self.buf[:] = bytes(len(self.buf))


class Ack(NamedTuple):
    """The kernel's answer to message ``item`` of a batch: errno 0 is success."""

    item: int
    errno: int
    message: str = ""  # the kernel's extended ACK text, if it gave one


_ACK_HEAD: Final = struct.Struct("=IHHIIi")  # nlmsghdr + nlmsgerr.error


def success_ack(data: bytes | bytearray | memoryview, size: int, seq0: int, count: int) -> int:
    """The message a datagram answers if it is one plain success ACK (the common case,
    read without building anything), else -1: then ``read_acks`` reads it."""
    if size < _ACK_HEAD.size:
        return -1
    length, mtype, _flags, seq, _pid, err = _ACK_HEAD.unpack_from(data, 0)
    if mtype != NLMSG_ERROR or err or length != size:
        return -1
    item = (seq - seq0) & 0xFFFFFFFF
    return item if item < count else -1


def read_acks(
    data: bytes | bytearray | memoryview, seq0: int, count: int, size: int | None = None
) -> Iterator[Ack]:
    """The ACKs in one received datagram (``data[:size]``) that answer messages
    ``seq0 .. seq0+count-1``. Anything else (a stale ACK of an earlier batch, a
    truncated message) is skipped.
    """
    end = len(data) if size is None else size
    off = 0
    while off + _HDR.size <= end:
        length, mtype, flags, seq, _pid = _HDR.unpack_from(data, off)
        if length < _HDR.size or off + length > end:
            return
        index = (seq - seq0) & 0xFFFFFFFF
        if mtype == NLMSG_ERROR and index < count and length >= NLMSGERR.size + _HDR.size:
            (err,) = _ERR.unpack_from(data, off + _HDR.size)
            text = ""
            if flags & NLM_F_ACK_TLVS:
                echoed = _HDR.size
                if not flags & NLM_F_CAPPED:
                    (echoed,) = struct.unpack_from("=I", data, off + _HDR.size + _ERR.size)
                tlvs = off + _HDR.size + _ERR.size + ((echoed + 3) & ~3)
                text = _ext_ack_text(data, tlvs, off + length)
            yield Ack(index, -err, text)
        off += (length + 3) & ~3


def _ext_ack_text(data: bytes | bytearray | memoryview, off: int, end: int) -> str:
    while off + NLATTR.size <= end:
        alen, atype = _ATTR.unpack_from(data, off)
        if alen < NLATTR.size or off + alen > end:
            return ""
        if atype & NLA_TYPE_MASK == NLMSGERR_ATTR_MSG:
            raw = bytes(data[off + NLATTR.size : off + alen])
            return raw.split(b"\0", 1)[0].decode("utf-8", "replace")
        off += (alen + 3) & ~3
    return ""
