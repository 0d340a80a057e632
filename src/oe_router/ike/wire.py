"""A tiny declarative struct codec: each wire format is a table of fields.

Why: IKEv2 has a dozen nested TLV-ish formats. Declaring each once as a
``FIELDS`` table and deriving both decode and encode from it keeps parse and
serialise in agreement and makes every decode path bounds-checked in one place,
so malformed input can only ever raise :class:`IkeDecodeError`.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable
from dataclasses import field
from typing import Any, ClassVar, Self

from oe_router.records import record

from .errors import IkeDecodeError


class Reader:
    """Bounds-checked cursor over a byte string; ``end`` narrows inside structs."""

    __slots__ = ("data", "end", "pos")

    def __init__(self, data: bytes, pos: int = 0, end: int | None = None) -> None:
        self.data = data
        self.pos = pos
        self.end = len(data) if end is None else end

    @property
    def remaining(self) -> int:
        return self.end - self.pos

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > self.end:
            raise IkeDecodeError(f"{what}: needs {n} bytes, {self.remaining} left")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def uint(self, width: int, what: str) -> int:
        return int.from_bytes(self.take(width, what), "big")


@record
class _Ctx:
    """Per-struct scratch state while decoding or encoding one struct."""

    start: int
    sizes: dict[str, int] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    length_patch: tuple[int, int] | None = None  # (offset, width)
    last: bool = True


class Field:
    """One entry of a struct's field table."""

    name: str = ""

    def read(self, r: Reader, vals: dict[str, Any], ctx: _Ctx, owner: str) -> None:
        raise NotImplementedError

    def write(self, obj: Any, out: bytearray, ctx: _Ctx) -> None:
        raise NotImplementedError


class Uint(Field):
    """Unsigned big-endian integer of ``width`` bytes."""

    def __init__(self, name: str, width: int) -> None:
        self.name, self.width = name, width

    def read(self, r: Reader, vals: dict[str, Any], ctx: _Ctx, owner: str) -> None:
        vals[self.name] = r.uint(self.width, f"{owner}.{self.name}")

    def write(self, obj: Any, out: bytearray, ctx: _Ctx) -> None:
        value: int = getattr(obj, self.name)
        out += value.to_bytes(self.width, "big")


def U8(name: str) -> Uint:
    return Uint(name, 1)


def U16(name: str) -> Uint:
    return Uint(name, 2)


def U32(name: str) -> Uint:
    return Uint(name, 4)


class Reserved(Field):
    """RESERVED bytes: ignored on receipt, sent as zero (RFC 7296 §3)."""

    def __init__(self, width: int) -> None:
        self.width = width

    def read(self, r: Reader, vals: dict[str, Any], ctx: _Ctx, owner: str) -> None:
        r.take(self.width, f"{owner}.reserved")

    def write(self, obj: Any, out: bytearray, ctx: _Ctx) -> None:
        out += bytes(self.width)


class Length(Field):
    """Total length of the enclosing struct, counted from its first byte."""

    def __init__(self, width: int, minimum: int) -> None:
        self.width, self.minimum = width, minimum

    def read(self, r: Reader, vals: dict[str, Any], ctx: _Ctx, owner: str) -> None:
        n = r.uint(self.width, f"{owner}.length")
        if n < self.minimum or ctx.start + n > r.end:
            raise IkeDecodeError(f"{owner}: length {n} outside {self.minimum}..{r.end - ctx.start}")
        r.end = ctx.start + n

    def write(self, obj: Any, out: bytearray, ctx: _Ctx) -> None:
        ctx.length_patch = (len(out), self.width)
        out += bytes(self.width)


class SizeOf(Field):
    """A byte count that sizes a later ``Sized`` field named ``target``."""

    def __init__(self, width: int, target: str) -> None:
        self.width, self.target = width, target

    def read(self, r: Reader, vals: dict[str, Any], ctx: _Ctx, owner: str) -> None:
        ctx.sizes[self.target] = r.uint(self.width, f"{owner}.{self.target}_size")

    def write(self, obj: Any, out: bytearray, ctx: _Ctx) -> None:
        value: bytes = getattr(obj, self.target)
        out += len(value).to_bytes(self.width, "big")


class CountOf(Field):
    """An item count for a later list field named ``target``."""

    def __init__(self, width: int, target: str) -> None:
        self.width, self.target = width, target

    def read(self, r: Reader, vals: dict[str, Any], ctx: _Ctx, owner: str) -> None:
        ctx.counts[self.target] = r.uint(self.width, f"{owner}.{self.target}_count")

    def write(self, obj: Any, out: bytearray, ctx: _Ctx) -> None:
        items: list[Any] = getattr(obj, self.target)
        out += len(items).to_bytes(self.width, "big")


class LastFlag(Field):
    """'Last Substruc' octet: 0 on the last item of a list, ``more`` otherwise."""

    def __init__(self, more: int) -> None:
        self.more = more

    def read(self, r: Reader, vals: dict[str, Any], ctx: _Ctx, owner: str) -> None:
        value = r.uint(1, f"{owner}.last_substruc")
        if value not in (0, self.more):
            raise IkeDecodeError(
                f"{owner}: last-substruc value {value} is neither 0 nor {self.more}"
            )

    def write(self, obj: Any, out: bytearray, ctx: _Ctx) -> None:
        out.append(0 if ctx.last else self.more)


class Fixed(Field):
    """Exactly ``size`` bytes."""

    def __init__(self, name: str, size: int) -> None:
        self.name, self.size = name, size

    def read(self, r: Reader, vals: dict[str, Any], ctx: _Ctx, owner: str) -> None:
        vals[self.name] = r.take(self.size, f"{owner}.{self.name}")

    def write(self, obj: Any, out: bytearray, ctx: _Ctx) -> None:
        value: bytes = getattr(obj, self.name)
        if len(value) != self.size:
            raise ValueError(f"{self.name} must be {self.size} bytes, not {len(value)}")
        out += value


class Sized(Field):
    """Bytes whose length an earlier ``SizeOf`` gave."""

    def __init__(self, name: str) -> None:
        self.name = name

    def read(self, r: Reader, vals: dict[str, Any], ctx: _Ctx, owner: str) -> None:
        vals[self.name] = r.take(ctx.sizes[self.name], f"{owner}.{self.name}")

    def write(self, obj: Any, out: bytearray, ctx: _Ctx) -> None:
        out += getattr(obj, self.name)


class SizedBy(Field):
    """Bytes whose length a function of earlier values and the bytes left decides."""

    def __init__(self, name: str, size: Callable[[dict[str, Any], int], int]) -> None:
        self.name, self.size = name, size

    def read(self, r: Reader, vals: dict[str, Any], ctx: _Ctx, owner: str) -> None:
        vals[self.name] = r.take(self.size(vals, r.remaining), f"{owner}.{self.name}")

    def write(self, obj: Any, out: bytearray, ctx: _Ctx) -> None:
        out += getattr(obj, self.name)


class Rest(Field):
    """All bytes up to the end of the enclosing struct."""

    def __init__(self, name: str) -> None:
        self.name = name

    def read(self, r: Reader, vals: dict[str, Any], ctx: _Ctx, owner: str) -> None:
        vals[self.name] = r.take(r.remaining, f"{owner}.{self.name}")

    def write(self, obj: Any, out: bytearray, ctx: _Ctx) -> None:
        out += getattr(obj, self.name)


class ListOf(Field):
    """Items of one struct type: as many as an earlier ``CountOf`` says, else to the end."""

    def __init__(self, name: str, item: type[Struct]) -> None:
        self.name, self.item = name, item

    def read(self, r: Reader, vals: dict[str, Any], ctx: _Ctx, owner: str) -> None:
        items: list[Struct] = []
        count = ctx.counts.get(self.name)
        while (len(items) < count) if count is not None else (r.remaining > 0):
            items.append(self.item.read(r))
        vals[self.name] = items

    def write(self, obj: Any, out: bytearray, ctx: _Ctx) -> None:
        items: list[Struct] = getattr(obj, self.name)
        for i, item in enumerate(items):
            item.write(out, last=i == len(items) - 1)


class BytesList(Field):
    """``CountOf`` items of ``size_field`` bytes each (e.g. the SPIs of a Delete)."""

    def __init__(self, name: str, size_field: str) -> None:
        self.name, self.size_field = name, size_field

    def read(self, r: Reader, vals: dict[str, Any], ctx: _Ctx, owner: str) -> None:
        size: int = vals[self.size_field]
        count = ctx.counts.get(self.name, 0)
        if size * count > r.remaining:
            raise IkeDecodeError(f"{owner}: {count} items of {size} bytes exceed {r.remaining}")
        vals[self.name] = [r.take(size, f"{owner}.{self.name}") for _ in range(count)]

    def write(self, obj: Any, out: bytearray, ctx: _Ctx) -> None:
        size: int = getattr(obj, self.size_field)
        for item in getattr(obj, self.name):
            if len(item) != size:
                raise ValueError(f"{self.name}: item of {len(item)} bytes, declared {size}")
            out += item


class Struct:
    """Base for wire structs: subclasses are dataclasses with a ``FIELDS`` table."""

    FIELDS: ClassVar[tuple[Field, ...]] = ()

    @classmethod
    def read(cls, r: Reader) -> Self:
        ctx = _Ctx(start=r.pos)
        saved_end = r.end
        vals: dict[str, Any] = {}
        for f in cls.FIELDS:
            f.read(r, vals, ctx, cls.__name__)
        if r.end != saved_end:  # a Length field bounded this struct
            if r.pos != r.end:
                raise IkeDecodeError(f"{cls.__name__}: {r.end - r.pos} unparsed bytes")
            r.end = saved_end
        return cls(**vals)

    @classmethod
    def decode(cls, data: bytes) -> Self:
        """Parse ``data`` as exactly one struct (trailing bytes are an error)."""
        r = Reader(bytes(data))
        obj = cls.read(r)
        if r.remaining:
            raise IkeDecodeError(f"{cls.__name__}: {r.remaining} trailing bytes")
        return obj

    def write(self, out: bytearray, *, last: bool = True) -> None:
        ctx = _Ctx(start=len(out), last=last)
        for f in self.FIELDS:
            f.write(self, out, ctx)
        if ctx.length_patch is not None:
            pos, width = ctx.length_patch
            out[pos : pos + width] = (len(out) - ctx.start).to_bytes(width, "big")

    def encode(self) -> bytes:
        out = bytearray()
        self.write(out)
        return bytes(out)


_UINT_CODES = {1: "B", 2: "H", 4: "I", 8: "Q"}


def packer(fields: Iterable[Field]) -> struct.Struct:
    """A ``struct.Struct`` for a run of fixed-width fields (big-endian, in table order).

    Why: a hot path (answering a flood with COOKIEs) cannot afford building objects,
    but its layout must still come from the one table that declares the format.
    Integers (and sizes, counts, lengths) unpack as ints, ``Fixed`` as bytes;
    ``Reserved`` bytes are skipped. A variable-length field is a ``ValueError``.
    """
    codes = ["!"]
    for f in fields:
        if isinstance(f, Uint | SizeOf | CountOf | Length):
            codes.append(_UINT_CODES[f.width])
        elif isinstance(f, Fixed):
            codes.append(f"{f.size}s")
        elif isinstance(f, Reserved):
            codes.append(f"{f.width}x")
        else:
            raise ValueError(f"{type(f).__name__} {f.name or ''} has no fixed width")
    return struct.Struct("".join(codes))
