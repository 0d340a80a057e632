"""``record``: ``dataclasses.dataclass`` whose ``__repr__``, ``__eq__`` and ``__hash__``
share one compiled body across classes.

Why: ``dataclass`` writes each method as source text and ``exec``-compiles it per class
(never cached in a .pyc): the daemon's ~230 dataclasses held ~610 such functions for
``__repr__``, ``__eq__`` and ``__hash__`` alone, ~0.5 MB of RSS for its life and ~0.07 s
of every start on a PC (more under TCG). Here each class gets small closures over one
code object and an ``operator.attrgetter`` of its fields instead; ``__init__`` and a
frozen class's ``__setattr__``/``__delattr__`` are still ``dataclass``'s own.

What they do is what ``dataclass`` (Python 3.11) generates: the repr
``QualName(a=1, b='x')`` over the ``repr`` fields (``...`` for a recursive call);
``__eq__`` compares tuples of the ``compare`` fields when both objects are of the same
class, else ``NotImplemented``; ``__hash__`` hashes that tuple (fields whose ``hash`` is
not ``None`` decide for themselves), set only for ``eq`` and ``frozen`` classes, while an
``eq`` class that is not frozen gets ``__hash__ = None``; a method the class body defines
is kept. ``tests/unit/test_records.py`` checks each against ``dataclass``'s.
"""

from __future__ import annotations

import _thread
import dataclasses
from collections.abc import Callable
from operator import attrgetter
from typing import Any, TypeVar, dataclass_transform, overload

__all__ = ["record"]

T = TypeVar("T")


def _getter(names: tuple[str, ...]) -> Callable[[Any], tuple[Any, ...]]:
    """The fields' values as a tuple (``attrgetter`` of one name gives the bare value)."""
    if len(names) == 1:
        one = attrgetter(names[0])
        return lambda obj: (one(obj),)
    if not names:
        return lambda obj: ()
    return attrgetter(*names)


def _repr_of(cls: type, names: tuple[str, ...]) -> Callable[[Any], str]:
    running: set[tuple[int, int]] = set()

    def __repr__(self: Any) -> str:
        key = id(self), _thread.get_ident()
        if key in running:
            return "..."
        running.add(key)
        try:
            qualname: str = self.__class__.__qualname__
            return (
                qualname
                + "("
                + ", ".join([f"{name}={getattr(self, name)!r}" for name in names])
                + ")"
            )
        finally:
            running.discard(key)

    __repr__.__qualname__ = f"{cls.__qualname__}.__repr__"
    return __repr__


def _eq_of(cls: type, names: tuple[str, ...]) -> Callable[[Any, Any], Any]:
    values = _getter(names)

    def __eq__(self: Any, other: Any) -> Any:
        if other.__class__ is self.__class__:
            return values(self) == values(other)
        return NotImplemented

    __eq__.__qualname__ = f"{cls.__qualname__}.__eq__"
    return __eq__


def _hash_of(cls: type, names: tuple[str, ...]) -> Callable[[Any], int]:
    values = _getter(names)

    def __hash__(self: Any) -> int:
        return hash(values(self))

    __hash__.__qualname__ = f"{cls.__qualname__}.__hash__"
    return __hash__


def _process(cls: type[T], frozen: bool, eq: bool, repr: bool, slots: bool) -> type[T]:
    body = cls.__dict__
    own_repr, own_eq = "__repr__" in body, "__eq__" in body
    class_hash = body.get("__hash__", dataclasses.MISSING)
    explicit_hash = not (class_hash is dataclasses.MISSING or (class_hash is None and own_eq))
    made: type[T] = dataclasses.dataclass(cls, frozen=frozen, eq=False, repr=False, slots=slots)
    fields = dataclasses.fields(made)  # type: ignore[arg-type]
    if repr and not own_repr:
        made.__repr__ = _repr_of(made, tuple(f.name for f in fields if f.repr))  # type: ignore[method-assign]
    if eq:
        if not own_eq:
            made.__eq__ = _eq_of(made, tuple(f.name for f in fields if f.compare))  # type: ignore[method-assign]
        if not explicit_hash:
            if frozen:
                hashed = (f.name for f in fields if (f.compare if f.hash is None else f.hash))
                made.__hash__ = _hash_of(made, tuple(hashed))  # type: ignore[assignment]
            else:
                made.__hash__ = None  # type: ignore[assignment]
    return made


@overload
def record(cls: type[T], /) -> type[T]: ...


@overload
def record(
    *, frozen: bool = False, eq: bool = True, repr: bool = True, slots: bool = False
) -> Callable[[type[T]], type[T]]: ...


@dataclass_transform(field_specifiers=(dataclasses.field, dataclasses.Field))
def record(
    cls: type[T] | None = None,
    /,
    *,
    frozen: bool = False,
    eq: bool = True,
    repr: bool = True,
    slots: bool = False,
) -> type[T] | Callable[[type[T]], type[T]]:
    """``@dataclass`` with the same arguments (those the project uses) and behaviour."""

    def wrap(klass: type[T]) -> type[T]:
        return _process(klass, frozen, eq, repr, slots)

    return wrap if cls is None else wrap(cls)
