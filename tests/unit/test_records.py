"""``records.record`` does what ``dataclasses.dataclass`` does, with shared method bodies.

Each case declares one class body twice, once with ``dataclass`` and once with ``record``,
and compares what a caller can observe: repr (with a recursive value), equality against
an equal, an unequal and a foreign object, hashability and hash values, frozenness, and
which methods a body of its own keeps.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import math
import re
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import pytest

from oe_router.records import record

Decorator = Callable[..., Any]


def shapes(deco: Decorator) -> dict[str, Any]:
    """The same class bodies under ``deco``: the shapes the project's records take."""

    @deco(frozen=True)
    class Frozen:
        a: int
        b: str = "x"
        hidden: int = dataclasses.field(default=0, repr=False)
        ignored: int = dataclasses.field(default=0, compare=False)
        unhashed: float = dataclasses.field(default=0.0, hash=False)
        kind: ClassVar[str] = "k"

    @deco(frozen=True, slots=True)
    class Slotted:
        a: int
        b: tuple[int, ...] = ()

    @deco
    class Plain:
        a: Any
        b: list[int] = dataclasses.field(default_factory=list)

    @deco(slots=True)
    class PlainSlots:
        a: int

    @deco(eq=False)
    class NoEq:
        a: int

    @deco(frozen=True, repr=False)
    class NoRepr:
        a: int

    @deco(frozen=True)
    class Empty:
        pass

    @deco(frozen=True)
    class One:
        a: float

    @deco(frozen=True)
    class OwnMethods:
        a: int

        def __repr__(self) -> str:
            return "own"

        def __hash__(self) -> int:
            return 7

    @deco(frozen=True)
    class OwnEq:
        a: int

        def __eq__(self, other: object) -> bool:
            return True

    @deco(frozen=True)
    class Child(Frozen):
        c: int = 3

    @deco(frozen=True)
    class Built:
        a: int
        made: list[int] = dataclasses.field(default_factory=list)
        late: int = dataclasses.field(default=4, init=False)
        listed: list[int] = dataclasses.field(default_factory=lambda: [1], init=False)

        def __post_init__(self) -> None:
            object.__setattr__(self, "late", self.a * 2)

    @deco(frozen=True, slots=True)
    class SlottedLate:
        a: int
        late: int = dataclasses.field(default=4, init=False)

    return {
        "Frozen": Frozen,
        "Slotted": Slotted,
        "Plain": Plain,
        "PlainSlots": PlainSlots,
        "NoEq": NoEq,
        "NoRepr": NoRepr,
        "Empty": Empty,
        "One": One,
        "OwnMethods": OwnMethods,
        "OwnEq": OwnEq,
        "Child": Child,
        "Built": Built,
        "SlottedLate": SlottedLate,
    }


#: (class, positional arguments, arguments of an unequal object)
CASES = [
    ("Frozen", (1, "y", 5, 6, 0.5), (2, "y", 5, 6, 0.5)),
    ("Frozen", (1, "y", 5, 6, 0.5), (1, "y", 5, 99, 0.5)),  # compare=False: equal
    ("Frozen", (1, "y", 5, 6, 0.5), (1, "y", 9, 6, 0.5)),  # repr=False: still compared
    ("Slotted", (1, (2, 3)), (1, (2,))),
    ("Plain", ([1], [2]), ([1], [3])),
    ("PlainSlots", (1,), (2,)),
    ("NoEq", (1,), (1,)),
    ("NoRepr", (1,), (2,)),
    ("Empty", (), ()),
    ("One", (math.nan,), (1.0,)),  # NaN: tuple comparison's identity shortcut
    ("OwnMethods", (1,), (2,)),
    ("OwnEq", (1,), (2,)),
    ("Child", (1, "y", 5, 6, 0.5, 4), (1, "y", 5, 6, 0.5, 5)),
    ("Built", (1, [2]), (2,)),
    ("Built", (1,), (1, [3])),
    ("SlottedLate", (1,), (2,)),
]


def observe(cls: type, args: tuple[Any, ...], other_args: tuple[Any, ...]) -> dict[str, Any]:
    obj, same, other = cls(*args), cls(*args), cls(*other_args)
    try:
        identity = hash(obj) == object.__hash__(obj)
        hashes: Any = ("identity" if identity else hash(obj), hash(obj) == hash(same))
    except TypeError as exc:
        hashes = str(exc)
    if cls.__name__ == "One":
        same = obj  # a NaN field is equal to itself only through identity
    try:
        obj.a = 5
        frozen = "mutable"
    except dataclasses.FrozenInstanceError as exc:
        frozen = str(exc)
    return {
        "repr": repr(obj).replace(hex(id(obj)), "ID"),
        "eq_same": obj == same,
        "eq_other": obj == other,
        "ne_other": obj != other,
        "eq_foreign": obj == ("not", "it"),
        "hash": hashes,
        "frozen": frozen,
        "unhashable": cls.__hash__ is None,
        "fields": [f.name for f in dataclasses.fields(cls)],
        "signature": str(inspect.signature(cls)),
        "values": [getattr(obj, f.name) for f in dataclasses.fields(cls)],
        "copies": [copy.copy(obj) == obj, copy.deepcopy(obj) == obj],
        "replaced": dataclasses.replace(obj) == obj,
        "asdict": dataclasses.asdict(obj),
        "match_args": cls.__match_args__,
        "slots": getattr(cls, "__slots__", None),
        "class_attributes": {
            f.name: _class_attribute(cls, f.name) for f in dataclasses.fields(cls)
        },
    } | {"del": deleted(obj)}


def _class_attribute(cls: type, name: str) -> Any:
    value = cls.__dict__.get(name, "-")
    return "slot" if isinstance(value, types.MemberDescriptorType) else value


def deleted(obj: Any) -> str:
    try:
        del obj.a
    except (dataclasses.FrozenInstanceError, AttributeError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return "deleted"


@pytest.mark.parametrize(("name", "args", "other_args"), CASES)
def test_record_behaves_as_dataclass(
    name: str, args: tuple[Any, ...], other_args: tuple[Any, ...]
) -> None:
    ours = observe(shapes(record)[name], args, other_args)
    theirs = observe(shapes(dataclasses.dataclass)[name], args, other_args)
    assert ours == theirs


def test_recursive_repr_and_qualnames_match_dataclass() -> None:
    for deco in (record, dataclasses.dataclass):
        plain = shapes(deco)["Plain"]
        obj = plain(None)
        obj.a = obj
        assert repr(obj).endswith(".Plain(a=..., b=[])")
    ours = shapes(record)["Frozen"]
    assert ours.__repr__.__qualname__.endswith("Frozen.__repr__")
    assert ours.__eq__.__qualname__.endswith("Frozen.__eq__")
    assert ours.__hash__.__qualname__.endswith("Frozen.__hash__")


def test_records_share_one_code_object_per_method() -> None:
    """What saves the memory: two classes' methods are closures over the same code."""
    a, b = shapes(record)["Frozen"], shapes(record)["Slotted"]
    for method in ("__repr__", "__eq__", "__hash__"):
        assert getattr(a, method).__code__ is getattr(b, method).__code__


def test_oe_router_declares_its_dataclasses_with_record() -> None:
    """A plain ``@dataclass`` in the daemon's code would bring back its exec-compiled
    methods (docs/footprint.md, third pass)."""
    src = Path(__file__).resolve().parents[2] / "src" / "oe_router"
    plain = [
        f"{path.relative_to(src)}:{number}"
        for path in sorted(src.rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if re.match(r"\s*@(dataclasses\.)?dataclass\b", line)
    ]
    assert plain == []


def test_init_is_compiled_on_first_use_and_replaces_itself() -> None:
    """What saves the start: no class pays for its ``__init__`` until it is built."""
    a, b = shapes(record)["Frozen"], shapes(record)["Plain"]
    assert a.__init__.__code__ is b.__init__.__code__  # both still the shared stub
    lazy = a.__init__
    a(1)
    assert a.__init__ is not lazy and a.__init__.__qualname__.endswith("Frozen.__init__")
    assert a.__init__.__code__ is not b.__init__.__code__


def test_a_plain_subclass_builds_through_the_records_init() -> None:
    frozen = shapes(record)["Frozen"]

    class Sub(frozen):  # type: ignore[misc, valid-type]
        pass

    assert Sub(1).a == 1 and frozen(2).a == 2
    sub = Sub(1)
    sub.extra = 5  # not a field, and Sub is not the record: allowed, as with dataclass
    assert sub.extra == 5


def test_wrong_arguments_fail_as_dataclass_does() -> None:
    for deco in (record, dataclasses.dataclass):
        frozen = shapes(deco)["Frozen"]
        with pytest.raises(TypeError, match="missing 1 required positional argument: 'a'"):
            frozen()
        with pytest.raises(TypeError, match="unexpected keyword argument 'z'"):
            frozen(1, z=2)


def test_a_field_without_default_after_one_with_fails_at_class_creation() -> None:
    for deco in (record, dataclasses.dataclass):
        with pytest.raises(TypeError, match="non-default argument 'b' follows default argument"):

            @deco
            class Bad:
                a: int = 1
                b: int


def test_what_a_record_refuses_it_refuses_as_dataclass_does() -> None:
    for deco in (record, dataclasses.dataclass):
        with pytest.raises(ValueError, match="mutable default <class 'list'> for field a"):

            @deco
            class Mutable:
                a: list[int] = []

        with pytest.raises(TypeError, match="'a' is a field but has no type annotation"):

            @deco
            class Unannotated:
                a = dataclasses.field(default=1)


def test_a_record_refuses_what_it_does_not_implement() -> None:
    with pytest.raises(TypeError, match=r"record has no dataclasses\.InitVar"):

        @record
        class Init:
            a: dataclasses.InitVar[int]


def test_a_record_on_a_dataclass_base_takes_its_fields_not_its_class_variables() -> None:
    @dataclasses.dataclass(frozen=True)
    class Base:
        a: int
        kind: ClassVar[str] = "k"

    for deco in (record, dataclasses.dataclass):

        @deco(frozen=True)
        class Sub(Base):
            b: int = 2

        assert [f.name for f in dataclasses.fields(Sub)] == ["a", "b"]
        assert Sub(1) == Sub(1, 2) and Sub(1).kind == "k"
