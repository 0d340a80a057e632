"""``record``: what ``dataclasses.dataclass`` makes, with no per-class cost until used.

Why: ``dataclass`` writes ``__init__`` (and a frozen class's ``__setattr__`` and
``__delattr__``, ``__repr__``, ``__eq__``, ``__hash__``) as source text and
``exec``-compiles it per class, at import, never cached in a .pyc, and checks each
field's annotation on the way. For the daemon's ~240 classes that was 2.0 s of a TCG
router's start (under cProfile), and a code object per method for the process's life,
though most classes are never instantiated in a given run. Here:

- ``__repr__``, ``__eq__``, ``__hash__`` and a frozen class's ``__setattr__`` and
  ``__delattr__`` are small closures over one code object each;
- ``__init__`` is compiled on the class's first instantiation, then replaces itself;
- the fields are collected as ``dataclass`` collects them, without its per-annotation
  type checks (a string annotation is ``ClassVar`` or a field; ``InitVar`` and
  ``KW_ONLY``, which the project does not use, are refused by name):
  ``dataclasses.fields``, ``replace`` and ``asdict`` work on records as on dataclasses,
  and ``__match_args__`` and slots are as it makes them. ``dataclass`` itself is never
  called.

What the methods do is what ``dataclass`` (Python 3.11) generates: the repr
``QualName(a=1, b='x')`` over the ``repr`` fields (``...`` for a recursive call);
``__eq__`` compares tuples of the ``compare`` fields when both objects are of the same
class, else ``NotImplemented``; ``__hash__`` hashes that tuple (fields whose ``hash`` is
not ``None`` decide for themselves), set only for ``eq`` and ``frozen`` classes, while an
``eq`` class that is not frozen gets ``__hash__ = None``; a method the class body defines
is kept; a frozen instance refuses to set or delete a field (``FrozenInstanceError``),
and a frozen slotted one pickles and copies. ``tests/unit/test_records.py`` checks each
against ``dataclass``'s.
"""

from __future__ import annotations

import _thread
import abc
import dataclasses
import re
from collections.abc import Callable
from operator import attrgetter
from typing import Any, ClassVar, TypeVar, dataclass_transform, overload

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


def _init_source(
    cls: type, fields: tuple[dataclasses.Field[Any], ...], frozen: bool
) -> Callable[..., None]:
    """Compile the ``__init__`` ``dataclass`` would have written for ``cls``."""
    names: dict[str, Any] = {"__set": object.__setattr__, "__FACTORY": _FACTORY}
    params, body = ["self"], []
    slots = "__slots__" in cls.__dict__
    for f in fields:
        value: str | None = f.name
        if f.default_factory is not dataclasses.MISSING:
            names[f"__f_{f.name}"] = f.default_factory
            if f.init:
                params.append(f"{f.name}=__FACTORY")
                value = f"__f_{f.name}() if {f.name} is __FACTORY else {f.name}"
            else:
                value = f"__f_{f.name}()"
        elif f.default is not dataclasses.MISSING:
            names[f"__d_{f.name}"] = f.default
            if f.init:
                params.append(f"{f.name}=__d_{f.name}")
            else:
                value = f"__d_{f.name}" if slots else None
        elif f.init:
            params.append(f.name)
        if value is not None:
            body.append(
                f"__set(self, {f.name!r}, {value})" if frozen else f"self.{f.name} = {value}"
            )
    if hasattr(cls, "__post_init__"):
        body.append("self.__post_init__()")
    source = f"def __init__({', '.join(params)}):\n " + "\n ".join(body or ["pass"])
    exec(source, names)  # the same generated text as dataclass's
    init: Callable[..., None] = names["__init__"]
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    init.__annotations__ = {f.name: f.type for f in fields if f.init} | {"return": None}
    return init


class _Factory:
    """The default of a parameter whose field has a ``default_factory``."""

    def __repr__(self) -> str:
        return "<factory>"


_FACTORY = _Factory()


def _lazy_init(cls: type, fields: tuple[dataclasses.Field[Any], ...], frozen: bool) -> Any:
    """An ``__init__`` that compiles the real one on first use and puts it in its place."""
    seen_default = False
    for f in fields:  # dataclass's own check, at class creation as dataclass does it
        if not f.init:
            continue
        has_default = not (
            f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        )
        if seen_default and not has_default:
            raise TypeError(f"non-default argument {f.name!r} follows default argument")
        seen_default = seen_default or has_default

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        init = _init_source(cls, fields, frozen)
        type.__setattr__(cls, "__init__", init)
        init(self, *args, **kwargs)

    __init__.__qualname__ = f"{cls.__qualname__}.__init__"
    return __init__


def _frozen_of(cls: type, fields: tuple[dataclasses.Field[Any], ...]) -> None:
    """``__setattr__``/``__delattr__`` that refuse a field (any name on ``cls`` itself)."""
    names = frozenset(f.name for f in fields)
    owner: Any = cls

    def __setattr__(self: Any, name: str, value: Any) -> None:
        if type(self) is cls or name in names:
            raise dataclasses.FrozenInstanceError(f"cannot assign to field {name!r}")
        super(owner, self).__setattr__(name, value)

    def __delattr__(self: Any, name: str) -> None:
        if type(self) is cls or name in names:
            raise dataclasses.FrozenInstanceError(f"cannot delete field {name!r}")
        super(owner, self).__delattr__(name)

    for method in (__setattr__, __delattr__):
        if method.__name__ in cls.__dict__:
            raise TypeError(f"Cannot overwrite attribute {method.__name__} in class {cls.__name__}")
        method.__qualname__ = f"{cls.__qualname__}.{method.__name__}"
        setattr(cls, method.__name__, method)
    if "__slots__" in cls.__dict__:
        slot_names = tuple(f.name for f in fields)

        def __getstate__(self: Any) -> list[Any]:
            return [getattr(self, name) for name in slot_names]

        def __setstate__(self: Any, state: list[Any]) -> None:
            for name, value in zip(slot_names, state, strict=False):
                object.__setattr__(self, name, value)

        for state_method in (__getstate__, __setstate__):
            setattr(cls, state_method.__name__, state_method)


#: The marker ``dataclasses.fields`` keeps a field by (a private name of the stdlib's
#: dataclasses, stable since 3.7; ``tests/unit/test_records.py`` checks ``fields``,
#: ``replace`` and ``asdict`` on records).
_FIELD = dataclasses._FIELD  # type: ignore[attr-defined]
_MISSING = dataclasses.MISSING
_CLASSVAR = re.compile(r"(?:typing\.)?ClassVar\b")
_UNSUPPORTED = re.compile(r"(?:dataclasses\.)?(?:InitVar|KW_ONLY)\b")


def _fields_of(cls: type) -> dict[str, dataclasses.Field[Any]]:
    """The fields ``dataclass`` would collect: its bases' (nearest dataclass ancestor
    first), then the class's own annotations in order, ``ClassVar`` ones left out; a
    ``field()`` default is replaced on the class by its plain default (or removed)."""
    fields: dict[str, dataclasses.Field[Any]] = {}
    for base in cls.__mro__[-1:0:-1]:
        inherited = getattr(base, "__dataclass_fields__", None) or {}
        fields.update((n, f) for n, f in inherited.items() if f._field_type is _FIELD)
    body = cls.__dict__
    annotations: dict[str, Any] = body.get("__annotations__", {})
    for name, annotation in annotations.items():
        if (
            annotation is ClassVar
            or (isinstance(annotation, str) and _CLASSVAR.match(annotation))
            or getattr(annotation, "__origin__", None) is ClassVar
        ):
            continue
        if isinstance(annotation, str) and _UNSUPPORTED.match(annotation):
            raise TypeError(f"{cls.__qualname__}.{name}: record has no {annotation}")
        default = body.get(name, _MISSING)
        if isinstance(default, dataclasses.Field):
            f = default
            if f.default is _MISSING:
                delattr(cls, name)
            else:
                setattr(cls, name, f.default)
        else:
            f = dataclasses.field(default=default)
        if f.default.__class__.__hash__ is None:
            raise ValueError(
                f"mutable default {type(f.default)} for field {name} is not allowed:"
                " use default_factory"
            )
        f.name, f.type, f._field_type = name, annotation, _FIELD  # type: ignore[attr-defined]
        if f.kw_only is _MISSING:
            f.kw_only = False
        fields[name] = f
    for name, value in body.items():
        if isinstance(value, dataclasses.Field) and name not in annotations:
            raise TypeError(f"{name!r} is a field but has no type annotation")
    return fields


def _slotted(cls: type[T], names: tuple[str, ...]) -> type[T]:
    """``cls`` again with ``__slots__`` for the fields its bases do not slot already."""
    inherited: set[str] = set()
    for base in cls.__mro__[1:-1]:
        slots = base.__dict__.get("__slots__", ())
        inherited.update((slots,) if isinstance(slots, str) else slots)
    namespace = dict(cls.__dict__)
    namespace["__slots__"] = tuple(n for n in names if n not in inherited)
    for name in (*names, "__dict__", "__weakref__"):
        namespace.pop(name, None)
    metaclass: Any = type(cls)
    made: type[T] = metaclass(cls.__name__, cls.__bases__, namespace)
    made.__qualname__ = cls.__qualname__
    return made


def _process(cls: type[T], frozen: bool, eq: bool, repr: bool, slots: bool) -> type[T]:
    body = cls.__dict__
    own_repr, own_eq, own_init = "__repr__" in body, "__eq__" in body, "__init__" in body
    class_hash = body.get("__hash__", _MISSING)
    explicit_hash = not (class_hash is _MISSING or (class_hash is None and own_eq))
    by_name = _fields_of(cls)
    cls.__dataclass_fields__ = by_name  # type: ignore[attr-defined]
    fields = tuple(by_name.values())
    if "__match_args__" not in body:
        type.__setattr__(cls, "__match_args__", tuple(f.name for f in fields if f.init))
    made = _slotted(cls, tuple(by_name)) if slots else cls
    if not own_init:
        type.__setattr__(made, "__init__", _lazy_init(made, fields, frozen))
    if frozen:
        _frozen_of(made, fields)
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
    abc.update_abstractmethods(made)
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
