"""blobmsg, libubox's binary JSON-like format, in pure Python: what ubus carries.

Why not libblobmsg_json: a call's arguments come from any local process (through ubusd),
so they are parsed here, bounded, in Python, where a malformed blob becomes a
`BlobmsgError` and never a read past a C buffer; and a reply is built here in one pass,
not one C call per field. The format is fixed by libubox's blob.h/blobmsg.h (facts about
its wire format, declared below once):

- an attribute is a big-endian u32 header (bit 31: extended, i.e. a blobmsg attribute with
  a name; bits 24-30: the type; bits 0-23: the length, header included), then the
  payload, then zero padding to a multiple of 4 before the next attribute;
- a blobmsg attribute's payload starts with its name: a big-endian u16 length, the bytes,
  a NUL, zero padding to a multiple of 4 (from the payload's start); then the value;
- tables and arrays hold attributes; a table's have names, an array's have empty ones;
- a message (a call's arguments, a reply, an event's data) is a table without a name of
  its own: a plain (not extended) attribute whose payload is the list of its members.

JSON values map as libblobmsg_json maps them: null is UNSPEC without data, true/false
INT8 (blobmsg's BOOL), an integer INT32 when it fits, else INT64; a float DOUBLE.
"""

from __future__ import annotations

import enum
import math
import struct
from collections.abc import Mapping
from typing import Any

JsonObject = dict[str, Any]


class BlobmsgType(enum.IntEnum):
    """blobmsg.h ``enum blobmsg_type`` (BOOL is INT8)."""

    UNSPEC = 0
    ARRAY = 1
    TABLE = 2
    STRING = 3
    INT64 = 4
    INT32 = 5
    INT16 = 6
    INT8 = 7
    DOUBLE = 8


BOOL = BlobmsgType.INT8

ATTR_HEADER = struct.Struct(">I")
NAME_LEN = struct.Struct(">H")
ATTR_EXTENDED = 0x80000000
ATTR_ID_SHIFT = 24
ATTR_ID_MASK = 0x7F000000
ATTR_LEN_MASK = 0x00FFFFFF
ALIGN = 4

#: The fixed-size value types and their encodings (blob_check_type wants exactly this size).
FIXED: Mapping[BlobmsgType, struct.Struct] = {
    BlobmsgType.INT64: struct.Struct(">q"),
    BlobmsgType.INT32: struct.Struct(">i"),
    BlobmsgType.INT16: struct.Struct(">h"),
    BlobmsgType.INT8: struct.Struct(">B"),
    BlobmsgType.DOUBLE: struct.Struct(">d"),
}

#: How ``ubus -v list`` names a policy's type in a method's signature (its cli.c names
#: these five; any other shows as "(unknown)").
TYPE_NAMES: Mapping[BlobmsgType, str] = {
    BlobmsgType.INT8: "Boolean",
    BlobmsgType.INT32: "Integer",
    BlobmsgType.STRING: "String",
    BlobmsgType.ARRAY: "Array",
    BlobmsgType.TABLE: "Table",
}

_INT32 = range(-(2**31), 2**31)
_INT64 = range(-(2**63), 2**63)


class BlobmsgError(ValueError):
    """A blob that is not well-formed blobmsg, or a value blobmsg cannot carry."""


def _pad(n: int) -> int:
    return -n % ALIGN


def _attr(header: int, payload: bytes) -> bytes:
    raw = ATTR_HEADER.size + len(payload)
    if raw > ATTR_LEN_MASK:
        raise BlobmsgError(f"attribute of {raw} bytes (blob lengths end at {ATTR_LEN_MASK})")
    return ATTR_HEADER.pack(header | raw) + payload + bytes(_pad(raw))


# ------------------------------------------------------------------ encoding


def _name(name: str) -> bytes:
    raw = name.encode("utf-8")
    if b"\0" in raw:
        raise BlobmsgError(f"name {name[:40]!r} contains NUL")
    if len(raw) > 0xFFFF:
        raise BlobmsgError("name longer than 65535 bytes")
    head = NAME_LEN.pack(len(raw)) + raw + b"\0"
    return head + bytes(_pad(len(head)))


def _value(value: Any) -> tuple[BlobmsgType, bytes]:
    if value is None:
        return BlobmsgType.UNSPEC, b""
    if isinstance(value, bool):
        return BOOL, FIXED[BOOL].pack(int(value))
    if isinstance(value, int):
        kind = BlobmsgType.INT32 if value in _INT32 else BlobmsgType.INT64
        if value not in _INT64:
            raise BlobmsgError(f"integer {value} does not fit blobmsg's INT64")
        return kind, FIXED[kind].pack(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise BlobmsgError(f"{value} is not a JSON number")
        return BlobmsgType.DOUBLE, FIXED[BlobmsgType.DOUBLE].pack(value)
    if isinstance(value, str):
        raw = value.encode("utf-8")
        if b"\0" in raw:
            raise BlobmsgError(f"string {value[:40]!r} contains NUL")
        return BlobmsgType.STRING, raw + b"\0"
    if isinstance(value, Mapping):
        return BlobmsgType.TABLE, _members(value)
    if isinstance(value, list | tuple):
        return BlobmsgType.ARRAY, b"".join(_element("", v) for v in value)
    raise BlobmsgError(f"{type(value).__name__} has no blobmsg type")


def _element(name: str, value: Any) -> bytes:
    kind, data = _value(value)
    return _attr(ATTR_EXTENDED | (kind << ATTR_ID_SHIFT), _name(name) + data)


def _members(table: Mapping[str, Any]) -> bytes:
    out = []
    for name, value in table.items():
        if not isinstance(name, str) or not name:
            raise BlobmsgError(f"table key {name!r}: blobmsg names are non-empty strings")
        out.append(_element(name, value))
    return b"".join(out)


def encode(table: Mapping[str, Any]) -> bytes:
    """A message: ``table`` as the unnamed top-level attribute ubus_send_reply,
    ubus_notify and the event call take (a ``struct blob_attr *``). Raises BlobmsgError."""
    return _attr(0, _members(table))


# ------------------------------------------------------------------ decoding


class _Reader:
    """Walks one buffer with every length checked against what is left of it."""

    def __init__(self, data: bytes, max_depth: int) -> None:
        self.data = data
        self.max_depth = max_depth

    def attrs(self, start: int, end: int) -> list[tuple[int, int, int, int]]:
        """(type, extended, payload start, payload end) of each attribute in [start, end)."""
        out = []
        pos = start
        while pos < end:
            if end - pos < ATTR_HEADER.size:
                raise BlobmsgError(f"{end - pos} stray bytes after the last attribute")
            (word,) = ATTR_HEADER.unpack_from(self.data, pos)
            raw = word & ATTR_LEN_MASK
            if raw < ATTR_HEADER.size or raw > end - pos:
                raise BlobmsgError(f"attribute length {raw} outside its {end - pos} bytes")
            kind = (word & ATTR_ID_MASK) >> ATTR_ID_SHIFT
            out.append((kind, word & ATTR_EXTENDED, pos + ATTR_HEADER.size, pos + raw))
            pos += raw + _pad(raw)
        return out

    def member(self, kind: int, extended: int, start: int, end: int) -> tuple[str, int]:
        """The name of a blobmsg attribute and where its value starts."""
        if not extended:
            raise BlobmsgError("a member without a blobmsg name header")
        if end - start < NAME_LEN.size + 1:
            raise BlobmsgError("name header cut short")
        (n,) = NAME_LEN.unpack_from(self.data, start)
        head = NAME_LEN.size + n + 1
        head += _pad(head)
        if head > end - start or self.data[start + NAME_LEN.size + n] != 0:
            raise BlobmsgError("name runs past its attribute or lacks its NUL")
        raw = self.data[start + NAME_LEN.size : start + NAME_LEN.size + n]
        return self.text(raw, "name"), start + head

    def text(self, raw: bytes, what: str) -> str:
        if b"\0" in raw:
            raise BlobmsgError(f"{what} contains NUL")
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise BlobmsgError(f"{what} is not UTF-8") from None

    def value(self, kind: int, start: int, end: int, depth: int) -> Any:
        try:
            t = BlobmsgType(kind)
        except ValueError:
            raise BlobmsgError(f"unknown blobmsg type {kind}") from None
        size = end - start
        fixed = FIXED.get(t)
        if fixed is not None:
            if size != fixed.size:
                raise BlobmsgError(f"{t.name} of {size} bytes (it has {fixed.size})")
            (v,) = fixed.unpack_from(self.data, start)
            if t is BOOL:
                return v != 0
            if t is BlobmsgType.DOUBLE and not math.isfinite(v):
                raise BlobmsgError(f"{v} is not a JSON number")
            return v
        if t is BlobmsgType.STRING:
            if size < 1 or self.data[end - 1] != 0:
                raise BlobmsgError("string without its NUL")
            return self.text(self.data[start : end - 1], "string")
        if t is BlobmsgType.UNSPEC:
            return None  # libblobmsg_json formats it as null whatever it holds
        if depth >= self.max_depth:
            raise BlobmsgError(f"nested deeper than {self.max_depth} levels")
        if t is BlobmsgType.TABLE:
            return self.table(start, end, depth + 1)
        items = []
        for k, ext, s, e in self.attrs(start, end):
            _, vstart = self.member(k, ext, s, e)  # an array member's name is ignored
            items.append(self.value(k, vstart, e, depth + 1))
        return items

    def table(self, start: int, end: int, depth: int) -> JsonObject:
        obj: JsonObject = {}
        for k, ext, s, e in self.attrs(start, end):
            name, vstart = self.member(k, ext, s, e)
            if not name:
                raise BlobmsgError("a table member without a name")
            if name in obj:
                raise BlobmsgError(f"key {name[:40]!r} appears twice")
            obj[name] = self.value(k, vstart, e, depth)
        return obj


def decode(blob: bytes, *, max_size: int = 1 << 20, max_depth: int = 8) -> JsonObject:
    """A message (as ``encode`` makes and ubus hands a method) to a dict: the exact
    attribute, its padding optional. Raises BlobmsgError for anything malformed:
    bad lengths, unknown types, names or strings without NUL or not UTF-8, duplicate
    keys, more than ``max_depth`` levels, more than ``max_size`` bytes."""
    if len(blob) > max_size:
        raise BlobmsgError(f"message of {len(blob)} bytes (max {max_size})")
    if len(blob) < ATTR_HEADER.size:
        raise BlobmsgError("message shorter than its header")
    (word,) = ATTR_HEADER.unpack_from(blob, 0)
    raw = word & ATTR_LEN_MASK
    if raw < ATTR_HEADER.size or raw > len(blob):
        raise BlobmsgError(f"message length {raw} outside its {len(blob)} bytes")
    return _Reader(blob, max_depth).table(ATTR_HEADER.size, raw, 1)


def message_length(header: bytes) -> int:
    """The length of a message from its first 4 bytes (to know how much to read)."""
    (word,) = ATTR_HEADER.unpack(header[: ATTR_HEADER.size])
    return int(word & ATTR_LEN_MASK)
