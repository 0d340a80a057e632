"""The pure-Python blobmsg codec: exact bytes for known messages, round trips of any JSON
value, and every malformed blob refused with BlobmsgError (never another exception).

The bytes below are worked out from libubox's blob.h/blobmsg.h by hand; the host tier
(tests/host/test_ubus_shim.py) checks the codec against the real libblobmsg_json.
"""

from __future__ import annotations

import math
import struct
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from oe_router.control.blobmsg import (
    ATTR_EXTENDED,
    BlobmsgError,
    BlobmsgType,
    decode,
    encode,
    message_length,
)


def _hdr(kind: int, raw_len: int, extended: bool = True) -> bytes:
    return struct.pack(">I", (ATTR_EXTENDED if extended else 0) | (kind << 24) | raw_len)


def test_a_string_member_byte_for_byte() -> None:
    # {"ab": "xyz"}: member = header 4 + name (2 + 2 + NUL = 5, padded to 8) + "xyz\0" = 16
    member = _hdr(BlobmsgType.STRING, 16) + b"\x00\x02ab\x00\x00\x00\x00" + b"xyz\x00"
    assert encode({"ab": "xyz"}) == _hdr(0, 20, extended=False) + member
    assert message_length(encode({"ab": "xyz"})) == 20


def test_numbers_take_the_types_libblobmsg_json_gives_them() -> None:
    blob = encode({"a": 1, "b": -(2**31), "c": 2**31, "d": True, "e": 0.5, "f": None})
    kinds = []
    pos = 4
    while pos < len(blob):
        (word,) = struct.unpack_from(">I", blob, pos)
        kinds.append((word >> 24) & 0x7F)
        raw = word & 0xFFFFFF
        pos += raw + (-raw % 4)
    assert kinds == [
        BlobmsgType.INT32, BlobmsgType.INT32, BlobmsgType.INT64, BlobmsgType.INT8,
        BlobmsgType.DOUBLE, BlobmsgType.UNSPEC,
    ]  # fmt: skip


def test_padding_between_members_is_zero_and_counted_in_the_table() -> None:
    blob = encode({"x": "a", "yy": [1, "b"], "t": {"k": False}})
    assert len(blob) % 4 == 0 and message_length(blob) == len(blob)
    assert decode(blob) == {"x": "a", "yy": [1, "b"], "t": {"k": False}}


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\0")),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(
        st.text(
            alphabet=st.characters(codec="utf-8", exclude_characters="\0"),
            min_size=1,
            max_size=8,
        ),
        inner,
        max_size=4,
    ),
    max_leaves=20,
)


@given(
    st.dictionaries(
        st.text(min_size=1, max_size=8).filter(lambda s: "\0" not in s), json_values, max_size=6
    )
)
def test_any_json_object_round_trips(obj: dict[str, Any]) -> None:
    assert decode(encode(obj), max_depth=64) == obj


@given(st.binary(max_size=200))
def test_random_bytes_are_refused_cleanly(blob: bytes) -> None:
    _decodes_or_refuses(blob)


@given(st.data())
def test_damaged_messages_are_refused_cleanly(data: st.DataObject) -> None:
    blob = bytearray(encode({"peer": "192.0.2.7", "list": [1, {"a": "b"}], "f": 1.5}))
    i = data.draw(st.integers(0, len(blob) - 1))
    blob[i] = data.draw(st.integers(0, 255))
    _decodes_or_refuses(bytes(blob))


def _decodes_or_refuses(blob: bytes) -> None:
    """BlobmsgError, or a JSON object that survives its own round trip."""
    try:
        obj = decode(blob)
    except BlobmsgError:
        return
    assert isinstance(obj, dict) and decode(encode(obj)) == obj


def _message(*members: bytes) -> bytes:
    body = b"".join(m + bytes(-len(m) % 4) for m in members)
    return _hdr(0, 4 + len(body), extended=False) + body


def _member(kind: int, name: bytes, value: bytes, *, raw_len: int | None = None) -> bytes:
    head = struct.pack(">H", len(name)) + name + b"\0"
    head += bytes(-len(head) % 4)
    payload = head + value
    return _hdr(kind, raw_len if raw_len is not None else 4 + len(payload)) + payload


@pytest.mark.parametrize(
    ("blob", "why"),
    [
        (b"\x00\x00", "shorter than its header"),
        (_hdr(0, 64, extended=False), "outside its 4 bytes"),
        (_message(_member(BlobmsgType.STRING, b"a", b"x\0", raw_len=200)), "outside"),
        (_message(_member(BlobmsgType.STRING, b"a", b"xy")), "without its NUL"),
        (_message(_member(BlobmsgType.STRING, b"a", b"x\0y\0")), "contains NUL"),
        (_message(_member(BlobmsgType.STRING, b"a", b"\xff\0")), "not UTF-8"),
        (_message(_member(BlobmsgType.STRING, b"", b"x\0")), "without a name"),
        (_message(_member(BlobmsgType.INT32, b"a", b"\0\0")), "INT32 of 2 bytes"),
        (_message(_member(BlobmsgType.INT8, b"a", b"")), "INT8 of 0 bytes"),
        (_message(_member(12, b"a", b"")), "unknown blobmsg type 12"),
        (_message(_hdr(BlobmsgType.STRING, 8, extended=False) + b"ab\0\0"), "blobmsg name"),
        (
            _message(
                _member(BlobmsgType.STRING, b"a", b"1\0"), _member(BlobmsgType.STRING, b"a", b"2\0")
            ),
            "appears twice",
        ),
        (
            _message(_member(BlobmsgType.DOUBLE, b"a", struct.pack(">d", math.nan))),
            "not a JSON number",
        ),
    ],
)
def test_malformed_messages_name_what_is_wrong(blob: bytes, why: str) -> None:
    with pytest.raises(BlobmsgError, match=why):
        decode(blob)


def test_depth_and_size_are_bounded() -> None:
    deep: Any = "x"
    for _ in range(12):
        deep = {"a": deep}
    with pytest.raises(BlobmsgError, match="nested deeper than 8"):
        decode(encode(deep))
    assert decode(encode(deep), max_depth=13) == deep
    with pytest.raises(BlobmsgError, match="max 100"):
        decode(encode({"a": "x" * 200}), max_size=100)


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ({"a": 2**63}, "does not fit"),
        ({"a": math.inf}, "not a JSON number"),
        ({"a": "x\0y"}, "contains NUL"),
        ({"": 1}, "non-empty"),
        ({"a": object()}, "has no blobmsg type"),
    ],
)
def test_values_blobmsg_cannot_carry_are_refused(value: dict[str, Any], why: str) -> None:
    with pytest.raises(BlobmsgError, match=why):
        encode(value)
