"""C structure layouts per userland ABI, for the ctypes bindings (cryptodev, libubus).

Why per ABI and not ctypes' own layout: a binding must be checkable for every ABI
OpenWrt targets on one development host, and ctypes lays a structure out only for the
host. ``struct_type(table, abi)`` lays a declared table out the way the C compiler does
for ``abi`` (natural alignment, a 64-bit integer's alignment taken from the ABI: 4 on
i386, 8 on ARM EABI and MIPS o32), with explicit padding and ``_pack_ = 1``, so the
result never depends on the host's ctypes. The tables themselves (which fields, in which
order) are facts about a library's ABI, declared by each binding
(``ocf_cryptodev``, ``control.ubus_abi``); their tests compare the offsets with what a
compiler reading the real header says.

Pointers (and ``long``, pointer-sized on every Linux ABI: LP64 and ILP32) are integer
fields holding an address.
"""

from __future__ import annotations

import ctypes
import enum
import os
import sys
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Literal

from oe_router.records import record

__all__ = [
    "ABIS",
    "I8",
    "I32",
    "PTR",
    "U8",
    "U16",
    "U32",
    "U64",
    "Abi",
    "Char",
    "IocEncoding",
    "StructTable",
    "field_offsets",
    "host_abi",
    "struct_type",
]


class IocEncoding(enum.Enum):
    """How _IOC packs direction and size: asm-generic, or the MIPS/PowerPC/SPARC/Alpha way."""

    GENERIC = "generic"  # dir bits 30-31 (write 1, read 2), size bits 16-29
    THREE_BIT_DIR = "three-bit-dir"  # dir bits 29-31 (none 1, read 2, write 4), size 16-28


@record(frozen=True)
class Abi:
    """What a userland ABI changes in structures (and, for ioctls, their numbers)."""

    name: str
    pointer_size: int
    u64_align: int
    ioc: IocEncoding
    byteorder: Literal["little", "big"]


_G, _M = IocEncoding.GENERIC, IocEncoding.THREE_BIT_DIR

#: The ABIs OpenWrt targets, by the name ``host_abi`` gives them.
ABIS: Mapping[str, Abi] = MappingProxyType(
    {
        a.name: a
        for a in (
            Abi("x86_64", 8, 8, _G, "little"),
            Abi("i386", 4, 4, _G, "little"),
            Abi("aarch64", 8, 8, _G, "little"),
            Abi("arm", 4, 8, _G, "little"),  # EABI: __u64 8-aligned
            Abi("mips", 4, 8, _M, "big"),  # o32 (and n32: same pointers and alignment)
            Abi("mipsel", 4, 8, _M, "little"),
            Abi("mips64", 8, 8, _M, "big"),  # n64
            Abi("mips64el", 8, 8, _M, "little"),
            Abi("powerpc", 4, 8, _M, "big"),
            Abi("powerpc64", 8, 8, _M, "big"),
            Abi("powerpc64le", 8, 8, _M, "little"),
            Abi("riscv64", 8, 8, _G, "little"),
        )
    }
)


def host_abi(machine: str | None = None, pointer_size: int | None = None) -> Abi:
    """This process's ABI from ``uname -m`` and its own pointer size (a 32-bit Python on a
    64-bit kernel is the 32-bit ABI). An unknown machine is assumed asm-generic."""
    m = machine if machine is not None else os.uname().machine
    p = pointer_size if pointer_size is not None else ctypes.sizeof(ctypes.c_void_p)
    little = sys.byteorder == "little"
    if m in ("x86_64", "amd64") or (m.startswith("i") and m.endswith("86")):
        return ABIS["x86_64" if p == 8 else "i386"]
    if m in ("aarch64", "arm64") or m.startswith("arm"):
        return ABIS["aarch64" if p == 8 else "arm"]
    if m.startswith("mips"):
        return ABIS[("mips64" if p == 8 else "mips") + ("el" if little else "")]
    if m.startswith(("ppc", "powerpc")):
        return ABIS["powerpc" if p == 4 else "powerpc64le" if little else "powerpc64"]
    if m == "riscv64":
        return ABIS["riscv64"]
    u64 = ctypes.alignment(ctypes.c_uint64)
    return Abi(f"{m} (assumed asm-generic ioctl)", p, u64, _G, "little" if little else "big")


# ----------------------------------------------------------------------------- field kinds


class _Ptr:
    """A pointer (or ``long``) field: 4 or 8 bytes by ABI (held as an address integer)."""


PTR = _Ptr()
U8, I8 = ctypes.c_uint8, ctypes.c_int8  # also C's bool (one byte on every Linux ABI)
U16, U32, I32, U64 = ctypes.c_uint16, ctypes.c_uint32, ctypes.c_int32, ctypes.c_uint64


@record(frozen=True)
class Char:
    """A char array field (``char name[n]``)."""

    n: int


@record(frozen=True)
class StructTable:
    """One C structure as a table of (field, type), in header order; a type is a ctypes
    integer, ``PTR``, ``Char(n)`` or another ``StructTable`` (embedded, not pointed to)."""

    name: str
    fields: tuple[tuple[str, Any], ...]


def struct_type(
    table: StructTable, abi: Abi, done: dict[str, type[Any]] | None = None
) -> type[Any]:
    """The ctypes class of ``table`` laid out for ``abi`` (natural alignment, explicit pads).

    ``done`` caches the classes of one layout by table name (embedded tables are made once).
    """
    done = {} if done is None else done
    if table.name in done:
        return done[table.name]
    native = abi.byteorder == sys.byteorder
    base: type[Any] = (
        ctypes.Structure
        if native
        else ctypes.BigEndianStructure
        if abi.byteorder == "big"
        else ctypes.LittleEndianStructure
    )
    fields: list[tuple[str, Any]] = []
    offset, max_align = 0, 1
    for name, kind in table.fields:
        ctype: Any
        if isinstance(kind, _Ptr):
            ctype = U64 if abi.pointer_size == 8 else U32
            size = align = abi.pointer_size
        elif isinstance(kind, Char):
            ctype, size, align = ctypes.c_char * kind.n, kind.n, 1
        elif isinstance(kind, StructTable):
            ctype = struct_type(kind, abi, done)
            size, align = ctypes.sizeof(ctype), ctype._c_align_
        else:
            ctype, size = kind, ctypes.sizeof(kind)
            align = abi.u64_align if size == 8 else size
        pad = -offset % align
        if pad:
            fields.append((f"_pad{offset}", ctypes.c_uint8 * pad))
            offset += pad
        fields.append((name, ctype))
        offset += size
        max_align = max(max_align, align)
    tail = -offset % max_align
    if tail:
        fields.append((f"_pad{offset}", ctypes.c_uint8 * tail))
    cls: type[Any] = type(
        f"{table.name}_{abi.name}",
        (base,),
        {"_pack_": 1, "_fields_": fields, "_c_align_": max_align},
    )
    done[table.name] = cls
    return cls


def field_offsets(cls: type[Any]) -> dict[str, int]:
    """Every field's offset in a ``struct_type`` class, nested ones as ``outer.inner``
    (what offsetof reports)."""
    out: dict[str, int] = {}

    def walk(c: Any, prefix: str, base: int) -> None:
        for name, kind in c._fields_:
            if name.startswith("_pad"):
                continue
            off = base + getattr(c, name).offset
            out[prefix + name] = off
            if isinstance(kind, type) and issubclass(kind, ctypes.Structure):
                walk(kind, f"{prefix}{name}.", off)

    walk(cls, "", 0)
    return out
