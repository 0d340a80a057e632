"""Wire codec: round trips for every payload type, a real capture, and fuzzing.

Real-world capture: the IKE_SA_INIT request of Wireshark's sample
"Dissection of encrypted (and UDP-encapsulated) IKEv2 and ESP messages"
(https://wiki.wireshark.org/SampleCaptures), as transcribed byte for byte in
CybercentreCanada/sawp, sawp-ike/tests/ikev2_parse.rs (case ike_sa_init_request).
"""

from __future__ import annotations

import contextlib
import ipaddress

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from oe_router.ike.constants import (
    CfgAttrType,
    CfgType,
    DhId,
    EncrId,
    ExchangeType,
    IdType,
    NotifyType,
    PayloadType,
    PrfId,
    ProtocolId,
    TransformType,
)
from oe_router.ike.crypto import sk_cipher
from oe_router.ike.errors import IkeCryptoError, IkeDecodeError
from oe_router.ike.fragments import FragmentReassembler
from oe_router.ike.message import Message, decrypt
from oe_router.ike.payloads import (
    AUTH,
    CERT,
    CERTREQ,
    CP,
    KE,
    PAYLOAD_CLASSES,
    SA,
    SK,
    SKF,
    CfgAttribute,
    Delete,
    IDi,
    IDr,
    Nonce,
    Notify,
    Payload,
    Proposal,
    TrafficSelector,
    Transform,
    TransformAttribute,
    TSi,
    TSr,
    UnknownPayload,
    VendorID,
    decode_uint16_list,
    ike_proposal,
)
from tests.ike_vectors import RFC7634_KEY, RFC7634_MESSAGE

WIRESHARK_IKE_SA_INIT = bytes.fromhex(
    "89922c915f35570e000000000000000021202208000000000000012c2200002800000024010100030300000c"
    "01000014800e0100030000080200000500000008040000132800004800130000db253178440ce776a794133c"
    "b8b69e5eb074733536570c64d7b630549c899c0712d828b37168500885e051024578afc75c101f73b8943cad"
    "62d74a30f2be1fca2b00002c09cb538b2c3dbd4d0bb0eec8d318cb801a9b4715b207828d9b5ff1f4ec64ed58"
    "863707bcf14ccf052b000014eb4c1b788afd4a9cb7730a68d56c53212b000014c61baca1f1a60cc108000000"
    "000000002b0000184048b7d56ebce88525e7de7f00d6c2d3c0000000290000144048b7d56ebce88525e7de7f"
    "00d6c2d3290000080000402e2900000800004016000000100000402f0001000200030004"
)


def test_wireshark_ike_sa_init_decodes_and_reencodes_byte_exact() -> None:
    assert len(WIRESHARK_IKE_SA_INIT) == 300
    msg = Message.decode(WIRESHARK_IKE_SA_INIT)
    assert (
        msg.exchange_type == ExchangeType.IKE_SA_INIT and msg.is_initiator and not msg.is_response
    )
    assert msg.spi_i.hex() == "89922c915f35570e" and msg.spi_r == bytes(8)
    sa = msg.payloads[0]
    assert isinstance(sa, SA)
    (prop,) = sa.proposals
    assert prop.protocol_id == ProtocolId.IKE
    encr, prf, dh = prop.transforms
    assert (encr.transform_type, encr.transform_id, encr.key_length) == (1, EncrId.AES_GCM_16, 256)
    assert (prf.transform_id, dh.transform_id) == (PrfId.HMAC_SHA2_256, DhId.ECP_256)
    ke = msg.payloads[1]
    assert isinstance(ke, KE) and ke.group == DhId.ECP_256 and len(ke.data) == 64
    assert isinstance(msg.payloads[2], Nonce) and len(msg.payloads[2].data) == 40
    assert [type(p) for p in msg.payloads[3:7]] == [VendorID] * 4
    notifies = [p for p in msg.payloads if isinstance(p, Notify)]
    assert [n.notify_type for n in notifies] == [
        NotifyType.IKEV2_FRAGMENTATION_SUPPORTED,
        NotifyType.REDIRECT_SUPPORTED,
        NotifyType.SIGNATURE_HASH_ALGORITHMS,
    ]
    assert decode_uint16_list(notifies[2].data) == [1, 2, 3, 4]
    assert msg.encode() == WIRESHARK_IKE_SA_INIT


# ---------------------------------------------------------------- strategies

u8 = st.integers(0, 255)
u16 = st.integers(0, 0xFFFF)
small = st.binary(max_size=40)

attributes = st.one_of(
    st.builds(
        TransformAttribute, st.integers(0, 0x7FFF), st.binary(min_size=2, max_size=2), st.just(True)
    ),
    st.builds(TransformAttribute, st.integers(0, 0x7FFF), small, st.just(False)),
)
transforms = st.builds(Transform, u8, u16, st.lists(attributes, max_size=3))
proposals = st.builds(Proposal, u8, u8, st.binary(max_size=8), st.lists(transforms, max_size=5))
ipv4 = st.builds(ipaddress.IPv4Address, st.integers(0, 2**32 - 1))
ipv6 = st.builds(ipaddress.IPv6Address, st.integers(0, 2**128 - 1))
selectors = st.one_of(
    st.builds(TrafficSelector.from_range, ipv4, ipv4, u8, u16, u16),
    st.builds(TrafficSelector.from_range, ipv6, ipv6, u8, u16, u16),
)
spi4 = st.binary(min_size=4, max_size=4)

payloads: st.SearchStrategy[Payload] = st.one_of(
    st.builds(SA, st.lists(proposals, min_size=1, max_size=3)),
    st.builds(KE, u16, st.binary(max_size=300)),
    st.builds(IDi, u8, small),
    st.builds(IDr, u8, small),
    st.builds(CERT, u8, small),
    st.builds(CERTREQ, u8, small),
    st.builds(AUTH, u8, small),
    st.builds(Nonce, small),
    st.builds(Notify, u8, u16, st.binary(max_size=8), small),
    st.builds(Delete, st.just(ProtocolId.ESP), st.just(4), st.lists(spi4, max_size=5)),
    st.builds(Delete, st.just(ProtocolId.IKE), st.just(0), st.just([])),
    st.builds(VendorID, small),
    st.builds(TSi, st.lists(selectors, max_size=4)),
    st.builds(TSr, st.lists(selectors, max_size=4)),
    st.builds(CP, u8, st.lists(st.builds(CfgAttribute, st.integers(0, 0x7FFF), small), max_size=4)),
    st.builds(UnknownPayload, st.integers(60, 255), st.booleans(), small),
)


@given(payloads.filter(lambda p: not isinstance(p, UnknownPayload)))
def test_payload_body_round_trip(p: Payload) -> None:
    assert type(p).decode(p.encode()) == p


@given(st.lists(payloads, max_size=6), u8, u8, st.integers(0, 2**32 - 1))
def test_message_round_trip(ps: list[Payload], exch: int, flags: int, mid: int) -> None:
    msg = Message(b"i" * 8, b"r" * 8, exch, flags, mid, ps)
    wire = msg.encode()
    assert Message.decode(wire) == msg
    assert Message.decode(wire).encode() == wire


@given(
    st.lists(payloads.filter(lambda p: not isinstance(p, UnknownPayload)), min_size=1, max_size=5),
    st.integers(0, 2**32 - 1),
)
def test_encrypted_message_round_trip(ps: list[Payload], mid: int) -> None:
    cipher = sk_cipher(EncrId.AES_GCM_16, 256, None)
    ke = bytes(range(36))
    msg = Message(b"i" * 8, b"r" * 8, ExchangeType.IKE_AUTH, 0x08, mid, ps)
    assert decrypt(msg.encrypt(cipher, ke, b"", b"\x01" * 8), cipher, ke, b"").payloads == ps


def test_fragments_reassemble_in_any_order() -> None:
    cipher = sk_cipher(EncrId.AES_CBC, 128, 12)
    ke, ka = bytes(16), bytes(range(32))
    inner: list[Payload] = [IDi(IdType.ID_NULL, b""), AUTH(13, b"x" * 32), Nonce(b"n" * 600)]
    msg = Message(b"i" * 8, b"r" * 8, ExchangeType.IKE_AUTH, 0x08, 1, inner)
    frags = msg.encrypt_fragments(cipher, ke, ka, [bytes([i]) * 16 for i in range(10)], 256)
    assert len(frags) > 2 and all(len(f) <= 256 for f in frags)
    first = Message.decode(frags[0]).payloads[0]
    assert isinstance(first, SKF) and first.first_inner == PayloadType.IDi
    r = FragmentReassembler(cipher, ke, ka)
    order = list(reversed(frags))
    results = [r.add(f) for f in order]
    assert results[:-1] == [None] * (len(frags) - 1)
    done = results[-1]
    assert done is not None and done.payloads == inner and done.message_id == 1
    forged = bytearray(frags[1])
    forged[-3] ^= 1
    with pytest.raises(IkeCryptoError):
        FragmentReassembler(cipher, ke, ka).add(bytes(forged))


def test_ts_and_cp_semantics() -> None:
    ts = TrafficSelector.for_network("192.0.2.0/24", 6)
    assert (str(ts.start), str(ts.end), ts.ip_protocol) == ("192.0.2.0", "192.0.2.255", 6)
    body = TSi([ts]).encode()
    assert body[:4] == b"\x01\x00\x00\x00" and body[4:6] == b"\x07\x06" and len(body) == 20
    cp = CP(CfgType.CFG_REQUEST, [CfgAttribute(CfgAttrType.INTERNAL_IP4_ADDRESS)])
    assert cp.encode() == bytes.fromhex("0100000000010000")
    with pytest.raises(IkeDecodeError):  # v4 selector with v6-sized addresses
        TSi.decode(bytes.fromhex("01000000") + bytes.fromhex("07000028") + bytes(36))


def test_ike_proposal_layout() -> None:
    prop = ike_proposal(1, EncrId.AES_GCM_16, 256, PrfId.HMAC_SHA2_256, None, [DhId.CURVE25519])
    wire = SA([prop]).encode()
    # proposal header: last, reserved, length, number 1, IKE, spi size 0, 3 transforms
    assert wire[:8] == bytes([0, 0]) + len(wire).to_bytes(2, "big") + bytes([1, 1, 0, 3])
    assert [t.transform_type for t in prop.transforms] == [
        TransformType.ENCR,
        TransformType.PRF,
        TransformType.DH,
    ]


# ---------------------------------------------------------------- fuzzing

VALID_SAMPLES = [WIRESHARK_IKE_SA_INIT, RFC7634_MESSAGE]


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=400))
def test_random_bytes_only_raise_decode_error(data: bytes) -> None:
    with contextlib.suppress(IkeDecodeError):
        Message.decode(data)


@settings(max_examples=500)
@given(st.data())
def test_mutated_messages_only_raise_decode_error(data: st.DataObject) -> None:
    raw = bytearray(data.draw(st.sampled_from(VALID_SAMPLES)))
    for _ in range(data.draw(st.integers(1, 6))):
        kind = data.draw(st.sampled_from(["flip", "set", "cut", "insert"]))
        pos = data.draw(st.integers(0, max(0, len(raw) - 1)))
        if kind == "flip" and raw:
            raw[pos] ^= 1 << data.draw(st.integers(0, 7))
        elif kind == "set" and raw:
            raw[pos] = data.draw(u8)
        elif kind == "cut":
            del raw[pos:]
        else:
            raw[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
    if data.draw(st.booleans()) and len(raw) >= 28:  # keep header length consistent
        raw[24:28] = len(raw).to_bytes(4, "big")
    try:
        msg = Message.decode(bytes(raw))
    except IkeDecodeError:
        return
    assert Message.decode(msg.encode()) == msg


@settings(max_examples=300)
@given(st.binary(max_size=200), st.integers(0, 68))
def test_mutated_encrypted_only_raise_ike_errors(junk: bytes, cut: int) -> None:
    cipher = sk_cipher(EncrId.CHACHA20_POLY1305, None, None)
    for raw in (RFC7634_MESSAGE[:cut] + junk, junk):
        with contextlib.suppress(IkeDecodeError, IkeCryptoError):
            decrypt(raw, cipher, RFC7634_KEY, b"")
        with contextlib.suppress(IkeDecodeError, IkeCryptoError):
            FragmentReassembler(cipher, RFC7634_KEY, b"").add(raw)


@settings(max_examples=300)
@given(
    st.sampled_from(sorted(c.TYPE for c in (SA, KE, IDi, Notify, Delete, TSi, CP, AUTH))),
    st.binary(max_size=80),
)
def test_random_payload_bodies_only_raise_decode_error(ptype: int, body: bytes) -> None:
    with contextlib.suppress(IkeDecodeError):
        PAYLOAD_CLASSES[ptype].decode(body)


def test_sk_must_be_last() -> None:
    with pytest.raises(ValueError):
        Message(b"i" * 8, b"r" * 8, 37, 0, 0, [SK(0, b""), Nonce(b"x")]).encode()
