"""XFRM netlink wire format, declared once from include/uapi/linux/xfrm.h.

pyroute2 ships no XFRM SA/policy messages, so this module declares them.
Every C structure is written here exactly once, as a table of (member, type)
rows in header order.  `CStruct` lays the table out with the C ABI's natural
alignment (so the 8-byte alignment of __u64 that makes xfrm_usersa_info 224
bytes on x86_64, ARM and MIPS is computed, not hand-padded) and produces both
the flat field list pyroute2's message classes want and a stand-alone
pack/unpack used for arrays (templates) and for setsockopt(IP_XFRM_POLICY).
"""

from __future__ import annotations

import ctypes
import struct
from collections.abc import Mapping
from functools import cached_property
from typing import Any, Final

from pyroute2.netlink import nla, nlmsg

from oe_router.records import record

# --- message types (enum in xfrm.h, XFRM_MSG_BASE = 0x10) -------------------
XFRM_MSG_NEWSA: Final = 0x10
XFRM_MSG_DELSA: Final = 0x11
XFRM_MSG_GETSA: Final = 0x12
XFRM_MSG_NEWPOLICY: Final = 0x13
XFRM_MSG_DELPOLICY: Final = 0x14
XFRM_MSG_GETPOLICY: Final = 0x15
XFRM_MSG_ALLOCSPI: Final = 0x16
XFRM_MSG_ACQUIRE: Final = 0x17
XFRM_MSG_EXPIRE: Final = 0x18
XFRM_MSG_UPDPOLICY: Final = 0x19
XFRM_MSG_UPDSA: Final = 0x1A
XFRM_MSG_POLEXPIRE: Final = 0x1B
XFRM_MSG_FLUSHSA: Final = 0x1C
XFRM_MSG_FLUSHPOLICY: Final = 0x1D
XFRM_MSG_MAPPING: Final = 0x26

# --- multicast groups (enum xfrm_nlgroups) -----------------------------------
XFRMNLGRP_ACQUIRE: Final = 1
XFRMNLGRP_EXPIRE: Final = 2
XFRMNLGRP_SA: Final = 3
XFRMNLGRP_POLICY: Final = 4
XFRMNLGRP_MAPPING: Final = 8

# --- constants -----------------------------------------------------------------
XFRM_INF: Final = 0xFFFFFFFFFFFFFFFF
XFRM_POLICY_IN: Final = 0
XFRM_POLICY_OUT: Final = 1
XFRM_POLICY_FWD: Final = 2
XFRM_POLICY_ALLOW: Final = 0
XFRM_POLICY_BLOCK: Final = 1
XFRM_POLICY_TYPE_MAIN: Final = 0
XFRM_SHARE_ANY: Final = 0
XFRM_MODE_TRANSPORT: Final = 0
XFRM_MODE_TUNNEL: Final = 1
XFRM_STATE_NOECN: Final = 1
XFRM_STATE_DECAP_DSCP: Final = 2
XFRM_STATE_NOPMTUDISC: Final = 4
XFRM_STATE_WILDRECV: Final = 8
XFRM_STATE_ICMP: Final = 16
XFRM_STATE_AF_UNSPEC: Final = 32
XFRM_STATE_ALIGN4: Final = 64
XFRM_STATE_ESN: Final = 128
UDP_ENCAP_ESPINUDP: Final = 2
IPPROTO_ESP: Final = 50
IPPROTO_AH: Final = 51

# --- attribute types (enum xfrm_attr_type_t) -----------------------------------
XFRMA_ALG_AUTH: Final = 1
XFRMA_ALG_CRYPT: Final = 2
XFRMA_ALG_COMP: Final = 3
XFRMA_ENCAP: Final = 4
XFRMA_TMPL: Final = 5
XFRMA_SA: Final = 6
XFRMA_POLICY: Final = 7
XFRMA_SEC_CTX: Final = 8
XFRMA_LTIME_VAL: Final = 9
XFRMA_REPLAY_VAL: Final = 10
XFRMA_REPLAY_THRESH: Final = 11
XFRMA_ETIMER_THRESH: Final = 12
XFRMA_SRCADDR: Final = 13
XFRMA_COADDR: Final = 14
XFRMA_LASTUSED: Final = 15
XFRMA_POLICY_TYPE: Final = 16
XFRMA_MIGRATE: Final = 17
XFRMA_ALG_AEAD: Final = 18
XFRMA_KMADDRESS: Final = 19
XFRMA_ALG_AUTH_TRUNC: Final = 20
XFRMA_MARK: Final = 21
XFRMA_TFCPAD: Final = 22
XFRMA_REPLAY_ESN_VAL: Final = 23
XFRMA_SA_EXTRA_FLAGS: Final = 24
XFRMA_PROTO: Final = 25
XFRMA_ADDRESS_FILTER: Final = 26
XFRMA_PAD: Final = 27
XFRMA_OFFLOAD_DEV: Final = 28
XFRMA_SET_MARK: Final = 29
XFRMA_SET_MARK_MASK: Final = 30
XFRMA_IF_ID: Final = 31


# --- C layout engine -----------------------------------------------------------
@record(frozen=True)
class CType:
    """A C scalar or byte array: its struct code and its ABI alignment."""

    code: str
    align: int

    @property
    def size(self) -> int:
        return struct.calcsize(self.code if self.code[0] in "<>=!" else "=" + self.code)


U8 = CType("B", 1)
U16 = CType("H", 2)
U32 = CType("I", 4)
S32 = CType("i", 4)
# __u64 alignment is the one ABI-dependent fact (4 on i386, 8 elsewhere).
U64 = CType("Q", ctypes.alignment(ctypes.c_uint64))
BE16 = CType(">H", 2)
BE32 = CType(">I", 4)
XFRM_ADDRESS = CType("16s", 4)  # xfrm_address_t: union of __be32 a4 / __be32 a6[4]
ALG_NAME = CType("64s", 1)  # char alg_name[64]

Member = tuple[str, "CType | CStruct"]
Field = tuple[str, str]


@record(frozen=True)
class CStruct:
    """A C struct laid out with natural alignment, flattened for pyroute2.

    Nested members are flattened as "<member>_<field>"; padding becomes
    "__padN" fields of format "Nx" so the encoded bytes equal the C layout.
    """

    name: str
    members: tuple[Member, ...]

    def _layout(self) -> tuple[tuple[Field, ...], int, int]:
        fields: list[Field] = []
        offset = 0
        align = 1
        pads = 0

        def pad_to(boundary: int) -> None:
            nonlocal offset, pads
            gap = -offset % boundary
            if gap:
                fields.append((f"__pad{pads}", f"{gap}x"))
                pads += 1
                offset += gap

        for mname, mtype in self.members:
            if isinstance(mtype, CType):
                pad_to(mtype.align)
                fields.append((mname, mtype.code))
                offset += mtype.size
                align = max(align, mtype.align)
            else:
                pad_to(mtype.align)
                for fname, fcode in mtype.fields:
                    if fname.startswith("__pad"):
                        fields.append((f"__pad{pads}", fcode))
                        pads += 1
                    else:
                        fields.append((f"{mname}_{fname}", fcode))
                offset += mtype.size
                align = max(align, mtype.align)
        pad_to(align)
        return tuple(fields), offset, align

    @cached_property
    def fields(self) -> tuple[Field, ...]:
        return self._layout()[0]

    @cached_property
    def size(self) -> int:
        return self._layout()[1]

    @cached_property
    def align(self) -> int:
        return self._layout()[2]

    @cached_property
    def offsets(self) -> Mapping[str, tuple[int, str]]:
        """Flat field name -> (byte offset, struct code): where a prepared message is patched."""
        out: dict[str, tuple[int, str]] = {}
        offset = 0
        for fname, code in self.fields:
            if not fname.startswith("__pad"):
                out[fname] = (offset, code)
            offset += struct.calcsize(code if code[0] in "<>=!" else "=" + code)
        return out

    def pack(self, values: Mapping[str, Any]) -> bytes:
        """Encode flat field values (missing ones are zero)."""
        out = bytearray()
        for fname, code in self.fields:
            if code.endswith("x"):
                out += bytes(struct.calcsize(code))
                continue
            fmt = code if code[0] in "<>=!" else "=" + code
            default: Any = b"" if code.endswith("s") else 0
            out += struct.pack(fmt, values.get(fname, default))
        return bytes(out)

    def unpack(self, data: bytes, offset: int = 0) -> dict[str, Any]:
        """Decode flat field values from `data` at `offset`."""
        values: dict[str, Any] = {}
        for fname, code in self.fields:
            fmt = code if code[0] in "<>=!" else "=" + code
            size = struct.calcsize(fmt)
            if not code.endswith("x"):
                values[fname] = struct.unpack_from(fmt, data, offset)[0]
            offset += size
        return values


# --- the structures of xfrm.h, in header order ---------------------------------
XFRM_ID = CStruct("xfrm_id", (("daddr", XFRM_ADDRESS), ("spi", BE32), ("proto", U8)))
XFRM_SELECTOR = CStruct(
    "xfrm_selector",
    (
        ("daddr", XFRM_ADDRESS),
        ("saddr", XFRM_ADDRESS),
        ("dport", BE16),
        ("dport_mask", BE16),
        ("sport", BE16),
        ("sport_mask", BE16),
        ("family", U16),
        ("prefixlen_d", U8),
        ("prefixlen_s", U8),
        ("proto", U8),
        ("ifindex", S32),
        ("user", U32),
    ),
)
XFRM_LIFETIME_CFG = CStruct(
    "xfrm_lifetime_cfg",
    (
        ("soft_byte_limit", U64),
        ("hard_byte_limit", U64),
        ("soft_packet_limit", U64),
        ("hard_packet_limit", U64),
        ("soft_add_expires_seconds", U64),
        ("hard_add_expires_seconds", U64),
        ("soft_use_expires_seconds", U64),
        ("hard_use_expires_seconds", U64),
    ),
)
XFRM_LIFETIME_CUR = CStruct(
    "xfrm_lifetime_cur",
    (("bytes", U64), ("packets", U64), ("add_time", U64), ("use_time", U64)),
)
XFRM_REPLAY_STATE = CStruct("xfrm_replay_state", (("oseq", U32), ("seq", U32), ("bitmap", U32)))
XFRM_REPLAY_STATE_ESN = CStruct(  # followed by __u32 bmp[bmp_len]
    "xfrm_replay_state_esn",
    (
        ("bmp_len", U32),
        ("oseq", U32),
        ("seq", U32),
        ("oseq_hi", U32),
        ("seq_hi", U32),
        ("replay_window", U32),
    ),
)
XFRM_ALGO = CStruct("xfrm_algo", (("alg_name", ALG_NAME), ("alg_key_len", U32)))  # + key
XFRM_ALGO_AUTH = CStruct(
    "xfrm_algo_auth",
    (("alg_name", ALG_NAME), ("alg_key_len", U32), ("alg_trunc_len", U32)),
)
XFRM_ALGO_AEAD = CStruct(
    "xfrm_algo_aead",
    (("alg_name", ALG_NAME), ("alg_key_len", U32), ("alg_icv_len", U32)),
)
XFRM_STATS = CStruct(
    "xfrm_stats", (("replay_window", U32), ("replay", U32), ("integrity_failed", U32))
)
XFRM_USER_TMPL = CStruct(
    "xfrm_user_tmpl",
    (
        ("id", XFRM_ID),
        ("family", U16),
        ("saddr", XFRM_ADDRESS),
        ("reqid", U32),
        ("mode", U8),
        ("share", U8),
        ("optional", U8),
        ("aalgos", U32),
        ("ealgos", U32),
        ("calgos", U32),
    ),
)
XFRM_ENCAP_TMPL = CStruct(
    "xfrm_encap_tmpl",
    (
        ("encap_type", U16),
        ("encap_sport", BE16),
        ("encap_dport", BE16),
        ("encap_oa", XFRM_ADDRESS),
    ),
)
XFRM_USERPOLICY_TYPE = CStruct(
    "xfrm_userpolicy_type", (("type", U8), ("reserved1", U16), ("reserved2", U8))
)
XFRM_MARK = CStruct("xfrm_mark", (("v", U32), ("m", U32)))
XFRM_USERSA_INFO = CStruct(
    "xfrm_usersa_info",
    (
        ("sel", XFRM_SELECTOR),
        ("id", XFRM_ID),
        ("saddr", XFRM_ADDRESS),
        ("lft", XFRM_LIFETIME_CFG),
        ("curlft", XFRM_LIFETIME_CUR),
        ("stats", XFRM_STATS),
        ("seq", U32),
        ("reqid", U32),
        ("family", U16),
        ("mode", U8),
        ("replay_window", U8),
        ("flags", U8),
    ),
)
XFRM_USERSA_ID = CStruct(
    "xfrm_usersa_id",
    (("daddr", XFRM_ADDRESS), ("spi", BE32), ("family", U16), ("proto", U8)),
)
XFRM_USERSPI_INFO = CStruct(
    "xfrm_userspi_info", (("info", XFRM_USERSA_INFO), ("min", U32), ("max", U32))
)
XFRM_USERPOLICY_INFO = CStruct(
    "xfrm_userpolicy_info",
    (
        ("sel", XFRM_SELECTOR),
        ("lft", XFRM_LIFETIME_CFG),
        ("curlft", XFRM_LIFETIME_CUR),
        ("priority", U32),
        ("index", U32),
        ("dir", U8),
        ("action", U8),
        ("flags", U8),
        ("share", U8),
    ),
)
XFRM_USERPOLICY_ID = CStruct(
    "xfrm_userpolicy_id", (("sel", XFRM_SELECTOR), ("index", U32), ("dir", U8))
)
XFRM_USER_ACQUIRE = CStruct(
    "xfrm_user_acquire",
    (
        ("id", XFRM_ID),
        ("saddr", XFRM_ADDRESS),
        ("sel", XFRM_SELECTOR),
        ("policy", XFRM_USERPOLICY_INFO),
        ("aalgos", U32),
        ("ealgos", U32),
        ("calgos", U32),
        ("seq", U32),
    ),
)
XFRM_USER_EXPIRE = CStruct("xfrm_user_expire", (("state", XFRM_USERSA_INFO), ("hard", U8)))
XFRM_USER_POLEXPIRE = CStruct("xfrm_user_polexpire", (("pol", XFRM_USERPOLICY_INFO), ("hard", U8)))
XFRM_USERSA_FLUSH = CStruct("xfrm_usersa_flush", (("proto", U8),))
XFRM_USER_MAPPING = CStruct(
    "xfrm_user_mapping",
    (
        ("id", XFRM_USERSA_ID),
        ("reqid", U32),
        ("old_saddr", XFRM_ADDRESS),
        ("new_saddr", XFRM_ADDRESS),
        ("old_sport", BE16),
        ("new_sport", BE16),
    ),
)
XFRM_EMPTY = CStruct("empty", ())  # FLUSHPOLICY carries only attributes

ALL_STRUCTS: Final = (
    XFRM_ID,
    XFRM_SELECTOR,
    XFRM_LIFETIME_CFG,
    XFRM_LIFETIME_CUR,
    XFRM_REPLAY_STATE,
    XFRM_REPLAY_STATE_ESN,
    XFRM_ALGO,
    XFRM_ALGO_AUTH,
    XFRM_ALGO_AEAD,
    XFRM_STATS,
    XFRM_USER_TMPL,
    XFRM_ENCAP_TMPL,
    XFRM_USERPOLICY_TYPE,
    XFRM_MARK,
    XFRM_USERSA_INFO,
    XFRM_USERSA_ID,
    XFRM_USERSPI_INFO,
    XFRM_USERPOLICY_INFO,
    XFRM_USERPOLICY_ID,
    XFRM_USER_ACQUIRE,
    XFRM_USER_EXPIRE,
    XFRM_USER_POLEXPIRE,
    XFRM_USERSA_FLUSH,
    XFRM_USER_MAPPING,
)


def _strip_pads(msg: dict[str, Any]) -> None:
    for key in [k for k in msg if isinstance(k, str) and k.startswith("__pad")]:
        del msg[key]


# --- attribute (NLA) classes ------------------------------------------------------
class _struct_nla(nla):  # type: ignore[misc]
    """An NLA whose payload is one fixed C struct (``fixed``)."""

    __slots__ = ()
    fixed: CStruct = XFRM_EMPTY

    def decode(self) -> None:
        nla.decode(self)
        _strip_pads(self)


def _decode_fixed_plus_tail(msg: Any, fixed: CStruct, tail: str) -> None:
    """Decode an NLA holding `fixed` followed by variable bytes stored under `tail`.

    pyroute2's generic decoder reads a trailing "s" field as one byte, so
    variable-length keys and bitmaps are decoded here instead.
    """
    (length,) = struct.unpack_from("=H", msg.data, msg.offset)
    msg.length = length
    payload = bytes(msg.data[msg.offset + 4 : msg.offset + length])
    msg.update(fixed.unpack(payload))
    msg[tail] = payload[fixed.size :]
    for key in ("header", "attrs", "value"):
        msg.pop(key, None)
    msg.decoded = True


class _keyed_nla(nla):  # type: ignore[misc]
    """A C struct followed by a key of alg_key_len bits (xfrm_algo*)."""

    __slots__ = ()
    fixed: CStruct = XFRM_ALGO

    def decode(self) -> None:
        _decode_fixed_plus_tail(self, self.fixed, "alg_key")
        self["alg_name"] = self["alg_name"].rstrip(b"\0").decode("ascii", "replace")


class _array_nla(nla):  # type: ignore[misc]
    """An NLA holding back-to-back C structs with no per-item header (XFRMA_TMPL)."""

    __slots__ = ()
    fields = (("raw", "s"),)
    item: CStruct = XFRM_USER_TMPL

    def encode(self) -> None:
        items = self.value if isinstance(self.value, list) else []
        self["raw"] = b"".join(self.item.pack(i) for i in items)
        nla.encode(self)

    def decode(self) -> None:
        _decode_fixed_plus_tail(self, XFRM_EMPTY, "raw")
        raw = self.pop("raw")
        size = self.item.size
        items = [self.item.unpack(raw, off) for off in range(0, len(raw) - size + 1, size)]
        self.value = items  # type: ignore[misc]  # `value` is a slot of pyroute2's base


class _address_nla(nla):  # type: ignore[misc]
    """xfrm_address_t as a 16-byte string."""

    __slots__ = ()
    fixed = CStruct("xfrm_address", (("value", XFRM_ADDRESS),))
    fields = fixed.fields


class _esn_nla(nla):  # type: ignore[misc]
    """xfrm_replay_state_esn followed by bmp_len 32-bit bitmap words."""

    __slots__ = ()
    fixed = XFRM_REPLAY_STATE_ESN
    fields = (*XFRM_REPLAY_STATE_ESN.fields, ("bmp", "s"))

    def decode(self) -> None:
        _decode_fixed_plus_tail(self, XFRM_REPLAY_STATE_ESN, "bmp")


def _nla_class(name: str, struct_: CStruct, base: type = _struct_nla) -> type:
    return type(name, (base,), {"__slots__": (), "fields": struct_.fields, "fixed": struct_})


xfrm_algo_nla = type(
    "xfrm_algo_nla",
    (_keyed_nla,),
    {"__slots__": (), "fields": (*XFRM_ALGO.fields, ("alg_key", "s")), "fixed": XFRM_ALGO},
)
xfrm_algo_auth_nla = type(
    "xfrm_algo_auth_nla",
    (_keyed_nla,),
    {
        "__slots__": (),
        "fields": (*XFRM_ALGO_AUTH.fields, ("alg_key", "s")),
        "fixed": XFRM_ALGO_AUTH,
    },
)
xfrm_algo_aead_nla = type(
    "xfrm_algo_aead_nla",
    (_keyed_nla,),
    {
        "__slots__": (),
        "fields": (*XFRM_ALGO_AEAD.fields, ("alg_key", "s")),
        "fixed": XFRM_ALGO_AEAD,
    },
)

# The one attribute table shared by every XFRM message: (type, name, class name).
XFRMA_MAP: Final = (
    (XFRMA_ALG_AUTH, "XFRMA_ALG_AUTH", "xfrm_algo_nla"),
    (XFRMA_ALG_CRYPT, "XFRMA_ALG_CRYPT", "xfrm_algo_nla"),
    (XFRMA_ALG_COMP, "XFRMA_ALG_COMP", "xfrm_algo_nla"),
    (XFRMA_ENCAP, "XFRMA_ENCAP", "xfrm_encap_tmpl_nla"),
    (XFRMA_TMPL, "XFRMA_TMPL", "xfrm_user_tmpl_nla"),
    (XFRMA_SA, "XFRMA_SA", "xfrm_usersa_info_nla"),
    (XFRMA_POLICY, "XFRMA_POLICY", "xfrm_userpolicy_info_nla"),
    (XFRMA_SEC_CTX, "XFRMA_SEC_CTX", "hex"),
    (XFRMA_LTIME_VAL, "XFRMA_LTIME_VAL", "xfrm_lifetime_cur_nla"),
    (XFRMA_REPLAY_VAL, "XFRMA_REPLAY_VAL", "xfrm_replay_state_nla"),
    (XFRMA_REPLAY_THRESH, "XFRMA_REPLAY_THRESH", "uint32"),
    (XFRMA_ETIMER_THRESH, "XFRMA_ETIMER_THRESH", "uint32"),
    (XFRMA_SRCADDR, "XFRMA_SRCADDR", "xfrm_address_nla"),
    (XFRMA_COADDR, "XFRMA_COADDR", "xfrm_address_nla"),
    (XFRMA_LASTUSED, "XFRMA_LASTUSED", "uint64"),
    (XFRMA_POLICY_TYPE, "XFRMA_POLICY_TYPE", "xfrm_userpolicy_type_nla"),
    (XFRMA_MIGRATE, "XFRMA_MIGRATE", "hex"),
    (XFRMA_ALG_AEAD, "XFRMA_ALG_AEAD", "xfrm_algo_aead_nla"),
    (XFRMA_KMADDRESS, "XFRMA_KMADDRESS", "hex"),
    (XFRMA_ALG_AUTH_TRUNC, "XFRMA_ALG_AUTH_TRUNC", "xfrm_algo_auth_nla"),
    (XFRMA_MARK, "XFRMA_MARK", "xfrm_mark_nla"),
    (XFRMA_TFCPAD, "XFRMA_TFCPAD", "uint32"),
    (XFRMA_REPLAY_ESN_VAL, "XFRMA_REPLAY_ESN_VAL", "xfrm_replay_state_esn_nla"),
    (XFRMA_SA_EXTRA_FLAGS, "XFRMA_SA_EXTRA_FLAGS", "uint32"),
    (XFRMA_PROTO, "XFRMA_PROTO", "uint8"),
    (XFRMA_ADDRESS_FILTER, "XFRMA_ADDRESS_FILTER", "hex"),
    (XFRMA_PAD, "XFRMA_PAD", "hex"),
    (XFRMA_OFFLOAD_DEV, "XFRMA_OFFLOAD_DEV", "hex"),
    (XFRMA_SET_MARK, "XFRMA_SET_MARK", "uint32"),
    (XFRMA_SET_MARK_MASK, "XFRMA_SET_MARK_MASK", "uint32"),
    (XFRMA_IF_ID, "XFRMA_IF_ID", "uint32"),
)


class xfrm_base(nlmsg):  # type: ignore[misc]
    """Base of all XFRM messages: the shared attribute table and pad hiding."""

    __slots__ = ()
    nla_map = XFRMA_MAP
    xfrm_algo_nla = xfrm_algo_nla
    xfrm_algo_auth_nla = xfrm_algo_auth_nla
    xfrm_algo_aead_nla = xfrm_algo_aead_nla
    xfrm_encap_tmpl_nla = _nla_class("xfrm_encap_tmpl_nla", XFRM_ENCAP_TMPL)
    xfrm_user_tmpl_nla = _array_nla
    xfrm_usersa_info_nla = _nla_class("xfrm_usersa_info_nla", XFRM_USERSA_INFO)
    xfrm_userpolicy_info_nla = _nla_class("xfrm_userpolicy_info_nla", XFRM_USERPOLICY_INFO)
    xfrm_lifetime_cur_nla = _nla_class("xfrm_lifetime_cur_nla", XFRM_LIFETIME_CUR)
    xfrm_replay_state_nla = _nla_class("xfrm_replay_state_nla", XFRM_REPLAY_STATE)
    xfrm_address_nla = _address_nla
    xfrm_userpolicy_type_nla = _nla_class("xfrm_userpolicy_type_nla", XFRM_USERPOLICY_TYPE)
    xfrm_mark_nla = _nla_class("xfrm_mark_nla", XFRM_MARK)
    xfrm_replay_state_esn_nla = _esn_nla

    def decode(self) -> None:
        nlmsg.decode(self)
        _strip_pads(self)


def _msg_class(name: str, struct_: CStruct) -> type:
    return type(name, (xfrm_base,), {"__slots__": (), "fields": struct_.fields})


xfrm_usersa_info_msg = _msg_class("xfrm_usersa_info_msg", XFRM_USERSA_INFO)
xfrm_usersa_id_msg = _msg_class("xfrm_usersa_id_msg", XFRM_USERSA_ID)
xfrm_userspi_info_msg = _msg_class("xfrm_userspi_info_msg", XFRM_USERSPI_INFO)
xfrm_userpolicy_info_msg = _msg_class("xfrm_userpolicy_info_msg", XFRM_USERPOLICY_INFO)
xfrm_userpolicy_id_msg = _msg_class("xfrm_userpolicy_id_msg", XFRM_USERPOLICY_ID)
xfrm_usersa_flush_msg = _msg_class("xfrm_usersa_flush_msg", XFRM_USERSA_FLUSH)
xfrm_flushpolicy_msg = _msg_class("xfrm_flushpolicy_msg", XFRM_EMPTY)
xfrm_user_acquire_msg = _msg_class("xfrm_user_acquire_msg", XFRM_USER_ACQUIRE)
xfrm_user_expire_msg = _msg_class("xfrm_user_expire_msg", XFRM_USER_EXPIRE)
xfrm_user_polexpire_msg = _msg_class("xfrm_user_polexpire_msg", XFRM_USER_POLEXPIRE)
xfrm_user_mapping_msg = _msg_class("xfrm_user_mapping_msg", XFRM_USER_MAPPING)

# Message type -> (class, C struct of its fixed part).  Used both to build
# requests and to parse what the kernel sends (replies, dumps, multicast).
MESSAGES: Final = (
    (XFRM_MSG_NEWSA, xfrm_usersa_info_msg, XFRM_USERSA_INFO),
    (XFRM_MSG_UPDSA, xfrm_usersa_info_msg, XFRM_USERSA_INFO),
    (XFRM_MSG_DELSA, xfrm_usersa_id_msg, XFRM_USERSA_ID),
    (XFRM_MSG_GETSA, xfrm_usersa_id_msg, XFRM_USERSA_ID),
    (XFRM_MSG_ALLOCSPI, xfrm_userspi_info_msg, XFRM_USERSPI_INFO),
    (XFRM_MSG_NEWPOLICY, xfrm_userpolicy_info_msg, XFRM_USERPOLICY_INFO),
    (XFRM_MSG_UPDPOLICY, xfrm_userpolicy_info_msg, XFRM_USERPOLICY_INFO),
    (XFRM_MSG_DELPOLICY, xfrm_userpolicy_id_msg, XFRM_USERPOLICY_ID),
    (XFRM_MSG_GETPOLICY, xfrm_userpolicy_id_msg, XFRM_USERPOLICY_ID),
    (XFRM_MSG_FLUSHSA, xfrm_usersa_flush_msg, XFRM_USERSA_FLUSH),
    (XFRM_MSG_FLUSHPOLICY, xfrm_flushpolicy_msg, XFRM_EMPTY),
    (XFRM_MSG_ACQUIRE, xfrm_user_acquire_msg, XFRM_USER_ACQUIRE),
    (XFRM_MSG_EXPIRE, xfrm_user_expire_msg, XFRM_USER_EXPIRE),
    (XFRM_MSG_POLEXPIRE, xfrm_user_polexpire_msg, XFRM_USER_POLEXPIRE),
    (XFRM_MSG_MAPPING, xfrm_user_mapping_msg, XFRM_USER_MAPPING),
)


def message_class(msg_type: int) -> type:
    """The pyroute2 class for an XFRM message type; KeyError names unknown types."""
    for mtype, cls, _ in MESSAGES:
        if mtype == msg_type:
            return cls
    raise KeyError(f"unknown XFRM message type {msg_type:#x}")


def message_struct(msg_type: int) -> CStruct:
    """The C struct of an XFRM message type's fixed part; KeyError names unknown types."""
    for mtype, _, struct_ in MESSAGES:
        if mtype == msg_type:
            return struct_
    raise KeyError(f"unknown XFRM message type {msg_type:#x}")


def attr_struct(attr_type: int) -> CStruct:
    """The C struct an XFRMA_* attribute's payload starts with (per item for XFRMA_TMPL);
    bytes after it (keys, bitmaps) are the attribute's tail. KeyError for opaque types."""
    for atype, _, cls_name in XFRMA_MAP:
        if atype == attr_type:
            cls = getattr(xfrm_base, cls_name, None)
            struct_ = getattr(cls, "item", None) or getattr(cls, "fixed", None)
            if isinstance(struct_, CStruct):
                return struct_
    raise KeyError(f"XFRM attribute {attr_type} has no declared struct")


def build(msg_type: int, fields: Mapping[str, Any], attrs: list[tuple[str, Any]]) -> Any:
    """A message object ready for encode(): flat fields plus (XFRMA_*, value) attributes."""
    msg = message_class(msg_type)()
    for fname, code in msg.fields:
        if code.endswith("s"):
            msg[fname] = b""  # pyroute2 defaults every field to the integer 0
    msg.update(fields)
    msg["attrs"] = [list(a) for a in attrs]
    msg["header"]["type"] = msg_type
    return msg


def encode(msg_type: int, fields: Mapping[str, Any], attrs: list[tuple[str, Any]]) -> bytes:
    """The wire bytes of one message (nlmsghdr included, seq/pid zero)."""
    msg = build(msg_type, fields, attrs)
    msg.encode()
    return bytes(msg.data)


def decode(data: bytes, offset: int = 0) -> Any:
    """Parse one XFRM message from `data` (type read from its nlmsghdr)."""
    (msg_type,) = struct.unpack_from("=H", data, offset + 4)
    msg = message_class(msg_type)(bytearray(data), offset=offset)
    msg.decode()
    return msg
