"""XFRM wire format: our field tables against C layouts computed by ctypes.

The ctypes structures below are transcribed independently from
include/uapi/linux/xfrm.h; ctypes applies the platform C ABI, so a padding
mistake in xfrm_msg's tables shows up as a size or byte mismatch here.
"""

from __future__ import annotations

import ctypes
import ipaddress
import platform
import socket
import struct
from typing import Any, ClassVar

import pytest
from hypothesis import given
from hypothesis import strategies as st

from oe_router.datapath import xfrm_msg as X
from oe_router.datapath.base import (
    Acquire,
    ChildSaSpec,
    DatapathError,
    Direction,
    Lifetime,
    Mode,
    NatTEncap,
    PolicyAction,
    PolicySpec,
    SaKeys,
    TrafficSelector,
    encr_algorithm,
    integ_algorithm,
)
from oe_router.datapath.kernel import _DIRS, _selector, _selector_from, parse_event, sa_request

u8, u16, u32, u64, s32 = (
    ctypes.c_uint8,
    ctypes.c_uint16,
    ctypes.c_uint32,
    ctypes.c_uint64,
    ctypes.c_int32,
)
ADDR = ctypes.c_uint32 * 4  # xfrm_address_t: a union of __be32 words, so 4-aligned


class C(ctypes.Structure):
    _fields_: ClassVar[list[tuple[str, Any]]] = []


class xfrm_id(C):
    _fields_: ClassVar = [("daddr", ADDR), ("spi", u32), ("proto", u8)]


class xfrm_selector(C):
    _fields_: ClassVar = [
        ("daddr", ADDR), ("saddr", ADDR), ("dport", u16), ("dport_mask", u16),
        ("sport", u16), ("sport_mask", u16), ("family", u16), ("prefixlen_d", u8),
        ("prefixlen_s", u8), ("proto", u8), ("ifindex", s32), ("user", u32),
    ]  # fmt: skip


class xfrm_lifetime_cfg(C):
    _fields_: ClassVar = [(n, u64) for n in (
        "soft_byte_limit", "hard_byte_limit", "soft_packet_limit", "hard_packet_limit",
        "soft_add_expires_seconds", "hard_add_expires_seconds",
        "soft_use_expires_seconds", "hard_use_expires_seconds")]  # fmt: skip


class xfrm_lifetime_cur(C):
    _fields_: ClassVar = [(n, u64) for n in ("bytes", "packets", "add_time", "use_time")]


class xfrm_stats(C):
    _fields_: ClassVar = [("replay_window", u32), ("replay", u32), ("integrity_failed", u32)]


class xfrm_usersa_info(C):
    _fields_: ClassVar = [
        ("sel", xfrm_selector), ("id", xfrm_id), ("saddr", ADDR), ("lft", xfrm_lifetime_cfg),
        ("curlft", xfrm_lifetime_cur), ("stats", xfrm_stats), ("seq", u32), ("reqid", u32),
        ("family", u16), ("mode", u8), ("replay_window", u8), ("flags", u8),
    ]  # fmt: skip


class xfrm_usersa_id(C):
    _fields_: ClassVar = [("daddr", ADDR), ("spi", u32), ("family", u16), ("proto", u8)]


class xfrm_userspi_info(C):
    _fields_: ClassVar = [("info", xfrm_usersa_info), ("min", u32), ("max", u32)]


class xfrm_userpolicy_info(C):
    _fields_: ClassVar = [
        ("sel", xfrm_selector), ("lft", xfrm_lifetime_cfg), ("curlft", xfrm_lifetime_cur),
        ("priority", u32), ("index", u32), ("dir", u8), ("action", u8), ("flags", u8),
        ("share", u8),
    ]  # fmt: skip


class xfrm_userpolicy_id(C):
    _fields_: ClassVar = [("sel", xfrm_selector), ("index", u32), ("dir", u8)]


class xfrm_user_tmpl(C):
    _fields_: ClassVar = [
        ("id", xfrm_id), ("family", u16), ("saddr", ADDR), ("reqid", u32), ("mode", u8),
        ("share", u8), ("optional", u8), ("aalgos", u32), ("ealgos", u32), ("calgos", u32),
    ]  # fmt: skip


class xfrm_user_acquire(C):
    _fields_: ClassVar = [
        ("id", xfrm_id), ("saddr", ADDR), ("sel", xfrm_selector),
        ("policy", xfrm_userpolicy_info), ("aalgos", u32), ("ealgos", u32), ("calgos", u32),
        ("seq", u32),
    ]  # fmt: skip


class xfrm_user_expire(C):
    _fields_: ClassVar = [("state", xfrm_usersa_info), ("hard", u8)]


class xfrm_user_polexpire(C):
    _fields_: ClassVar = [("pol", xfrm_userpolicy_info), ("hard", u8)]


class xfrm_usersa_flush(C):
    _fields_: ClassVar = [("proto", u8)]


class xfrm_user_mapping(C):
    _fields_: ClassVar = [
        ("id", xfrm_usersa_id), ("reqid", u32), ("old_saddr", ADDR), ("new_saddr", ADDR),
        ("old_sport", u16), ("new_sport", u16),
    ]  # fmt: skip


class xfrm_algo(C):
    _fields_: ClassVar = [("alg_name", ctypes.c_char * 64), ("alg_key_len", ctypes.c_uint)]


class xfrm_algo_auth(C):
    _fields_: ClassVar = [
        ("alg_name", ctypes.c_char * 64), ("alg_key_len", ctypes.c_uint),
        ("alg_trunc_len", ctypes.c_uint),
    ]  # fmt: skip


class xfrm_algo_aead(C):
    _fields_: ClassVar = [
        ("alg_name", ctypes.c_char * 64), ("alg_key_len", ctypes.c_uint),
        ("alg_icv_len", ctypes.c_uint),
    ]  # fmt: skip


class xfrm_encap_tmpl(C):
    _fields_: ClassVar = [
        ("encap_type", u16),
        ("encap_sport", u16),
        ("encap_dport", u16),
        ("encap_oa", ADDR),
    ]


class xfrm_replay_state_esn(C):
    _fields_: ClassVar = [(n, u32) for n in (
        "bmp_len", "oseq", "seq", "oseq_hi", "seq_hi", "replay_window")]  # fmt: skip


class xfrm_mark(C):
    _fields_: ClassVar = [("v", u32), ("m", u32)]


PAIRS = [
    (X.XFRM_ID, xfrm_id),
    (X.XFRM_SELECTOR, xfrm_selector),
    (X.XFRM_LIFETIME_CFG, xfrm_lifetime_cfg),
    (X.XFRM_LIFETIME_CUR, xfrm_lifetime_cur),
    (X.XFRM_STATS, xfrm_stats),
    (X.XFRM_USERSA_INFO, xfrm_usersa_info),
    (X.XFRM_USERSA_ID, xfrm_usersa_id),
    (X.XFRM_USERPOLICY_INFO, xfrm_userpolicy_info),
    (X.XFRM_USERPOLICY_ID, xfrm_userpolicy_id),
    (X.XFRM_USER_TMPL, xfrm_user_tmpl),
    (X.XFRM_USERSPI_INFO, xfrm_userspi_info),
    (X.XFRM_USER_ACQUIRE, xfrm_user_acquire),
    (X.XFRM_USER_EXPIRE, xfrm_user_expire),
    (X.XFRM_USER_POLEXPIRE, xfrm_user_polexpire),
    (X.XFRM_USERSA_FLUSH, xfrm_usersa_flush),
    (X.XFRM_USER_MAPPING, xfrm_user_mapping),
    (X.XFRM_ALGO, xfrm_algo),
    (X.XFRM_ALGO_AUTH, xfrm_algo_auth),
    (X.XFRM_ALGO_AEAD, xfrm_algo_aead),
    (X.XFRM_ENCAP_TMPL, xfrm_encap_tmpl),
    (X.XFRM_REPLAY_STATE_ESN, xfrm_replay_state_esn),
    (X.XFRM_MARK, xfrm_mark),
]


@pytest.mark.parametrize(("ours", "ctype"), PAIRS, ids=[p[0].name for p in PAIRS])
def test_struct_size_matches_c_abi(ours: X.CStruct, ctype: type[ctypes.Structure]) -> None:
    assert ours.size == ctypes.sizeof(ctype)
    assert ours.align == ctypes.alignment(ctype)
    assert X.XFRM_USERSA_INFO in X.ALL_STRUCTS


@pytest.mark.skipif(platform.machine() != "x86_64", reason="literal sizes are x86_64 figures")
def test_known_x86_64_sizes() -> None:
    sizes = {s.name: s.size for s in X.ALL_STRUCTS}
    assert sizes["xfrm_usersa_info"] == 224
    assert sizes["xfrm_userpolicy_info"] == 168
    assert sizes["xfrm_selector"] == 56
    assert sizes["xfrm_user_tmpl"] == 64
    assert sizes["xfrm_user_acquire"] == 280
    assert sizes["xfrm_userspi_info"] == 232
    assert sizes["xfrm_usersa_id"] == 24


def _ip(a: str) -> bytes:
    return ipaddress.ip_address(a).packed.ljust(16, b"\0")


def _fill_addr(field: Any, raw: bytes) -> None:
    ctypes.memmove(ctypes.addressof(field), raw, 16)


def _nla(nla_type: int, payload: bytes) -> bytes:
    hdr = struct.pack("=HH", 4 + len(payload), nla_type)
    return hdr + payload + bytes(-len(payload) % 4)


def test_newsa_bytes_equal_c_layout() -> None:
    key = bytes(range(20))
    fields = {
        "sel_family": socket.AF_INET,
        "id_daddr": _ip("192.0.2.7"),
        "id_spi": 0xC0FFEE01,
        "id_proto": X.IPPROTO_ESP,
        "saddr": _ip("10.0.0.1"),
        "lft_soft_byte_limit": X.XFRM_INF,
        "lft_hard_add_expires_seconds": 3600,
        "reqid": 0x4F450001,
        "family": socket.AF_INET,
        "mode": X.XFRM_MODE_TUNNEL,
        "replay_window": 32,
        "flags": X.XFRM_STATE_ESN,
    }
    aead = {
        "alg_name": b"rfc4106(gcm(aes))",
        "alg_key_len": 160,
        "alg_icv_len": 128,
        "alg_key": key,
    }
    data = X.encode(X.XFRM_MSG_NEWSA, fields, [("XFRMA_ALG_AEAD", aead)])

    c = xfrm_usersa_info()
    c.sel.family = socket.AF_INET
    _fill_addr(c.id.daddr, _ip("192.0.2.7"))
    c.id.spi = socket.htonl(0xC0FFEE01)
    c.id.proto = 50
    _fill_addr(c.saddr, _ip("10.0.0.1"))
    c.lft.soft_byte_limit = X.XFRM_INF
    c.lft.hard_add_expires_seconds = 3600
    c.reqid = 0x4F450001
    c.family = socket.AF_INET
    c.mode = 1
    c.replay_window = 32
    c.flags = 128
    a = xfrm_algo_aead(b"rfc4106(gcm(aes))", 160, 128)
    body = bytes(c) + _nla(X.XFRMA_ALG_AEAD, bytes(a) + key)
    hdr = struct.pack("=IHHII", 16 + len(body), X.XFRM_MSG_NEWSA, 0, 0, 0)
    assert data == hdr + body


def test_policy_with_templates_bytes_equal_c_layout() -> None:
    tmpl = {
        "id_daddr": _ip("192.0.2.7"),
        "id_proto": X.IPPROTO_ESP,
        "family": socket.AF_INET,
        "saddr": _ip("10.0.0.1"),
        "reqid": 77,
        "mode": X.XFRM_MODE_TUNNEL,
        "aalgos": 0xFFFFFFFF,
        "ealgos": 0xFFFFFFFF,
        "calgos": 0xFFFFFFFF,
    }
    fields = {
        "sel_daddr": _ip("192.0.2.0"),
        "sel_saddr": _ip("10.0.0.1"),
        "sel_dport": 443,
        "sel_dport_mask": 0xFFFF,
        "sel_family": socket.AF_INET,
        "sel_prefixlen_d": 24,
        "sel_prefixlen_s": 32,
        "sel_proto": 6,
        "priority": 0x7E000010,
        "dir": X.XFRM_POLICY_OUT,
    }
    mark = {"v": 0x42, "m": 0xFF}
    data = X.encode(
        X.XFRM_MSG_UPDPOLICY, fields, [("XFRMA_TMPL", [tmpl, tmpl]), ("XFRMA_MARK", mark)]
    )
    p = xfrm_userpolicy_info()
    _fill_addr(p.sel.daddr, _ip("192.0.2.0"))
    _fill_addr(p.sel.saddr, _ip("10.0.0.1"))
    p.sel.dport = socket.htons(443)
    p.sel.dport_mask = 0xFFFF
    p.sel.family = socket.AF_INET
    p.sel.prefixlen_d, p.sel.prefixlen_s, p.sel.proto = 24, 32, 6
    p.priority = 0x7E000010
    p.dir = 1
    t = xfrm_user_tmpl()
    _fill_addr(t.id.daddr, _ip("192.0.2.7"))
    t.id.proto = 50
    t.family = socket.AF_INET
    _fill_addr(t.saddr, _ip("10.0.0.1"))
    t.reqid, t.mode = 77, 1
    t.aalgos = t.ealgos = t.calgos = 0xFFFFFFFF
    body = (
        bytes(p)
        + _nla(X.XFRMA_TMPL, bytes(t) * 2)
        + _nla(X.XFRMA_MARK, bytes(xfrm_mark(0x42, 0xFF)))
    )
    assert data[16:] == body
    back = X.decode(data)
    assert back["priority"] == 0x7E000010
    assert back["sel_dport"] == 443
    tmpls = back.get_attr("XFRMA_TMPL")
    assert len(tmpls) == 2
    assert tmpls[1]["reqid"] == 77
    assert tmpls[1]["saddr"] == _ip("10.0.0.1")
    assert back.get_attr("XFRMA_MARK")["v"] == 0x42


def _cbc_spec(**kw: Any) -> ChildSaSpec:
    args: dict[str, Any] = {
        "local": ipaddress.ip_address("10.0.0.1"),
        "remote": ipaddress.ip_address("192.0.2.7"),
        "inbound": SaKeys(0x1001, bytes(range(32)), bytes(range(32, 64))),
        "outbound": SaKeys(0x2002, bytes(range(64, 96)), bytes(range(96, 128))),
        "encr": encr_algorithm(12),
        "integ": integ_algorithm(12),
        "reqid": 5,
    }
    args.update(kw)
    return ChildSaSpec(**args)


def test_cbc_sha256_uses_auth_trunc_with_rfc4868_length() -> None:
    """hmac(sha256) must travel in ALG_AUTH_TRUNC with 128 bits, never plain ALG_AUTH (96)."""
    spec = _cbc_spec(encap=NatTEncap(4500, 31337), lifetime=Lifetime(soft_bytes=1000))
    fields, attrs = sa_request(spec, spec.local, spec.remote, spec.outbound)
    data = X.encode(X.XFRM_MSG_NEWSA, fields, attrs)
    msg = X.decode(data)
    names = [a[0] for a in msg["attrs"]]
    assert "XFRMA_ALG_AUTH" not in names
    auth = msg.get_attr("XFRMA_ALG_AUTH_TRUNC")
    assert auth["alg_name"] == "hmac(sha256)"
    assert auth["alg_trunc_len"] == 128
    assert auth["alg_key_len"] == 256
    assert auth["alg_key"] == bytes(range(96, 128))
    crypt = msg.get_attr("XFRMA_ALG_CRYPT")
    assert crypt["alg_name"] == "cbc(aes)"
    assert crypt["alg_key"] == bytes(range(64, 96))
    encap = msg.get_attr("XFRMA_ENCAP")
    assert (encap["encap_type"], encap["encap_sport"], encap["encap_dport"]) == (2, 4500, 31337)
    assert msg["id_spi"] == 0x2002
    assert msg["lft_soft_byte_limit"] == 1000
    assert msg["lft_hard_byte_limit"] == X.XFRM_INF
    # inbound: the peer's ports are the source
    fields, attrs = sa_request(spec, spec.remote, spec.local, spec.inbound)
    encap = X.decode(X.encode(X.XFRM_MSG_NEWSA, fields, attrs)).get_attr("XFRMA_ENCAP")
    assert (encap["encap_sport"], encap["encap_dport"]) == (31337, 4500)


@pytest.mark.parametrize(
    ("integ_id", "name", "key_bytes", "trunc"),
    [(13, "hmac(sha384)", 48, 192), (14, "hmac(sha512)", 64, 256)],
)
def test_cbc_sha384_sha512_auth_trunc_lengths(
    integ_id: int, name: str, key_bytes: int, trunc: int
) -> None:
    """RFC 4868: HMAC-SHA2-384-192 and -512-256 in ALG_AUTH_TRUNC with the hash's full key
    and half of it as the ICV, as the kernel's ESP must truncate them."""
    key = bytes(range(key_bytes))
    out = SaKeys(0x2002, bytes(range(64, 96)), key)
    spec = _cbc_spec(integ=integ_algorithm(integ_id), outbound=out,
                     inbound=SaKeys(0x1001, bytes(32), bytes(key_bytes)))  # fmt: skip
    fields, attrs = sa_request(spec, spec.local, spec.remote, spec.outbound)
    msg = X.decode(X.encode(X.XFRM_MSG_NEWSA, fields, attrs))
    assert "XFRMA_ALG_AUTH" not in [a[0] for a in msg["attrs"]]
    auth = msg.get_attr("XFRMA_ALG_AUTH_TRUNC")
    assert (auth["alg_name"], auth["alg_trunc_len"]) == (name, trunc)
    assert (auth["alg_key_len"], auth["alg_key"]) == (key_bytes * 8, key)


def test_esn_and_wide_window_use_replay_esn_attr() -> None:
    spec = _cbc_spec(esn=True, replay_window=128)
    fields, attrs = sa_request(spec, spec.remote, spec.local, spec.inbound)
    msg = X.decode(X.encode(X.XFRM_MSG_NEWSA, fields, attrs))
    esn = msg.get_attr("XFRMA_REPLAY_ESN_VAL")
    assert esn["bmp_len"] == 4
    assert esn["replay_window"] == 128
    assert esn["bmp"] == bytes(16)
    assert msg["flags"] & X.XFRM_STATE_ESN


def test_aead_spec_keys_include_salt() -> None:
    gcm = encr_algorithm(20)
    spec = _cbc_spec(
        encr=gcm,
        integ=None,
        inbound=SaKeys(1, bytes(36)),
        outbound=SaKeys(2, bytes(36)),
        mode=Mode.TRANSPORT,
    )
    fields, attrs = sa_request(spec, spec.local, spec.remote, spec.outbound)
    aead = X.decode(X.encode(X.XFRM_MSG_NEWSA, fields, attrs)).get_attr("XFRMA_ALG_AEAD")
    assert aead["alg_name"] == "rfc4106(gcm(aes))"
    assert (aead["alg_key_len"], aead["alg_icv_len"]) == (288, 128)


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        ({"integ": None}, "needs an integrity algorithm"),
        ({"inbound": SaKeys(1, bytes(31), bytes(32))}, "inbound AES_CBC key is 31 bytes"),
        ({"outbound": SaKeys(2, bytes(32), bytes(20))}, "outbound HMAC_SHA2_256_128 key"),
        ({"remote": ipaddress.ip_address("2001:db8::1")}, "address families differ"),
    ],
)
def test_bad_child_sa_spec_names_the_culprit(kw: dict[str, Any], needle: str) -> None:
    with pytest.raises(DatapathError, match=needle):
        _cbc_spec(**kw)


def test_unknown_transform_is_one_clear_error() -> None:
    with pytest.raises(DatapathError, match="ESP encryption transform 3 is not supported"):
        encr_algorithm(3)


def test_acquire_event_parses() -> None:
    fields = {
        "id_daddr": _ip("192.0.2.7"),
        "id_proto": X.IPPROTO_ESP,
        "saddr": _ip("10.0.0.1"),
        "sel_daddr": _ip("192.0.2.7"),
        "sel_saddr": _ip("10.0.0.1"),
        "sel_dport": 53,
        "sel_dport_mask": 0xFFFF,
        "sel_family": socket.AF_INET,
        "sel_prefixlen_d": 32,
        "sel_prefixlen_s": 32,
        "sel_proto": 17,
        "policy_sel_family": socket.AF_INET,
        "policy_priority": 99,
        "seq": 12345,
    }
    tmpl = {"reqid": 0x4F450003, "family": socket.AF_INET}
    msg = X.decode(X.encode(X.XFRM_MSG_ACQUIRE, fields, [("XFRMA_TMPL", [tmpl])]))
    ev = parse_event(msg)
    assert ev is not None
    assert type(ev).__name__ == "Acquire"
    assert str(ev.selector_dst.net) == "192.0.2.7/32"
    assert ev.selector_dst.port == 53
    assert ev.selector_src.port is None
    assert ev.reqid == 0x4F450003
    assert ev.seq == 12345


addr16 = st.binary(min_size=16, max_size=16)
u32s = st.integers(0, 0xFFFFFFFF)


@given(
    daddr=addr16,
    saddr=addr16,
    spi=u32s,
    reqid=u32s,
    bytes_=st.integers(0, 2**64 - 1),
    mode=st.integers(0, 4),
    key=st.binary(max_size=64),
)
def test_usersa_info_round_trip(
    daddr: bytes, saddr: bytes, spi: int, reqid: int, bytes_: int, mode: int, key: bytes
) -> None:
    fields = {
        "id_daddr": daddr,
        "saddr": saddr,
        "id_spi": spi,
        "reqid": reqid,
        "curlft_bytes": bytes_,
        "mode": mode,
        "family": socket.AF_INET6,
    }
    crypt = {"alg_name": b"cbc(aes)", "alg_key_len": len(key) * 8, "alg_key": key}
    data = X.encode(X.XFRM_MSG_NEWSA, fields, [("XFRMA_ALG_CRYPT", crypt)])
    assert len(data) == 16 + 224 + ((4 + 68 + len(key) + 3) & ~3)
    back = X.decode(data)
    for k, v in fields.items():
        assert back[k] == v
    assert X.XFRM_USERSA_INFO.unpack(data, 16) == {
        k: back[k] for k in X.XFRM_USERSA_INFO.unpack(data, 16)
    }
    assert back.get_attr("XFRMA_ALG_CRYPT")["alg_key"] == key


@given(
    st.fixed_dictionaries(
        {"reqid": u32s, "id_spi": u32s, "aalgos": u32s, "mode": st.integers(0, 255)}
    )
)
def test_struct_pack_unpack_round_trip(values: dict[str, int]) -> None:
    raw = X.XFRM_USER_TMPL.pack(values)
    assert len(raw) == X.XFRM_USER_TMPL.size
    back = X.XFRM_USER_TMPL.unpack(raw)
    assert {k: back[k] for k in values} == values


# --- ICMP types in selectors ---------------------------------------------------------
# The kernel matches an ICMP/ICMPv6 flow's type in the selector's sport and its code in
# dport, in every direction (xfrm_flowi_sport/_dport, include/net/xfrm.h): a policy
# naming a type has it in sport whether the remote side is the destination or the source.

_ANY6 = ipaddress.ip_network("::/0")


def _nd_policy_bytes(direction: int, src: TrafficSelector, dst: TrafficSelector) -> bytes:
    fields = {**_selector(src, dst, "sel_"), "priority": 0x7E000300, "dir": direction}
    return X.encode(X.XFRM_MSG_UPDPOLICY, fields, [])


@pytest.mark.parametrize(
    ("direction", "remote_is_src"),
    [(X.XFRM_POLICY_OUT, False), (X.XFRM_POLICY_IN, True), (X.XFRM_POLICY_FWD, True)],
)
def test_icmpv6_type_goes_to_sport_in_every_direction(direction: int, remote_is_src: bool) -> None:
    remote = TrafficSelector(_ANY6, 58, icmp_type=135)
    local = TrafficSelector(_ANY6, 58)
    src, dst = (remote, local) if remote_is_src else (local, remote)
    data = _nd_policy_bytes(direction, src, dst)
    p = xfrm_userpolicy_info()
    p.sel.sport = socket.htons(135)
    p.sel.sport_mask = 0xFFFF  # the code (dport) stays wildcard: every NS, whatever its code
    p.sel.family = socket.AF_INET6
    p.sel.proto = 58
    p.priority = 0x7E000300
    p.dir = direction
    assert data[16:] == bytes(p)
    # and back: the type returns to the remote side, the spec compares equal
    back = _selector_from(X.decode(data), "sel_", {v: k for k, v in _DIRS.items()}[direction])
    assert back == (src, dst)


def test_tcp_ports_are_unchanged_by_icmp_support() -> None:
    """TCP keeps port semantics: the destination's port in dport, the source's in sport."""
    src = TrafficSelector(ipaddress.ip_network("10.0.0.1/32"), 6, 40000)
    dst = TrafficSelector(ipaddress.ip_network("192.0.2.0/24"), 6, 443)
    f = _selector(src, dst, "sel_")
    assert (f["sel_sport"], f["sel_sport_mask"], f["sel_dport"], f["sel_dport_mask"]) == (
        40000, 0xFFFF, 443, 0xFFFF
    )  # fmt: skip


def test_icmpv6_echo_acquire_picks_the_type_not_a_port() -> None:
    """An ACQUIRE for ping -6: type 128 in sport, code 0 in dport, both masked (as the
    kernel's init_tempsel writes them). The destination selector gets the type, no port."""
    fields = {
        "id_daddr": _ip("2001:db8::7"),
        "id_proto": X.IPPROTO_ESP,
        "saddr": _ip("2001:db8:ffff::1"),
        "sel_daddr": _ip("2001:db8::7"),
        "sel_saddr": _ip("2001:db8:ffff::1"),
        "sel_sport": 128,
        "sel_sport_mask": 0xFFFF,
        "sel_dport": 0,
        "sel_dport_mask": 0xFFFF,
        "sel_family": socket.AF_INET6,
        "sel_prefixlen_d": 128,
        "sel_prefixlen_s": 128,
        "sel_proto": 58,
        "policy_sel_family": socket.AF_INET6,
        "seq": 7,
    }
    msg = X.decode(X.encode(X.XFRM_MSG_ACQUIRE, fields, [("XFRMA_TMPL", [{"reqid": 3}])]))
    ev = parse_event(msg)
    assert isinstance(ev, Acquire)
    assert ev.selector_dst == TrafficSelector(ipaddress.ip_network("2001:db8::7/128"), 58,
                                              icmp_type=128)  # fmt: skip
    assert ev.selector_src == TrafficSelector(ipaddress.ip_network("2001:db8:ffff::1/128"), 58)


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        ({"proto": 6, "icmp_type": 135}, "an ICMP type needs protocol icmp or icmpv6"),
        ({"proto": 58, "port": 1, "icmp_type": 135}, "and no port"),
        ({"proto": 58, "icmp_type": 256}, "ICMP type 256 out of range"),
    ],
)
def test_bad_icmp_selector_names_the_culprit(kw: dict[str, Any], needle: str) -> None:
    with pytest.raises(DatapathError, match=needle):
        TrafficSelector(_ANY6, **kw)


def test_icmp_type_on_both_sides_is_refused() -> None:
    a = TrafficSelector(_ANY6, 58, icmp_type=128)
    b = TrafficSelector(_ANY6, 58, icmp_type=129)
    with pytest.raises(DatapathError, match="an ICMP type goes on one side"):
        PolicySpec(a, b, Direction.OUT, PolicyAction.PASS)
    # a protocol filled in from the other side keeps the type
    p = PolicySpec(TrafficSelector(_ANY6), b, Direction.OUT, PolicyAction.PASS)
    assert (p.src.proto, p.dst.icmp_type) == (58, 129)
