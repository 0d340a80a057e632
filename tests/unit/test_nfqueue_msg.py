"""NFQUEUE wire format: byte-exact against messages built by hand from nfnetlink_queue.h.

The expected bytes below are laid out field by field from the header (nlmsghdr in host
order, nfgenmsg with res_id big-endian, NLAs with 4-byte padding, the packed structs
nfqnl_msg_packet_hdr = 7 bytes and nfqnl_msg_config_params = 5 bytes), never produced by
the code under test. Hostile input: the reader raises NfQueueMessageError and nothing else,
and an NfQueue fed garbage counts it, drops what it can identify, and keeps reading.
"""

from __future__ import annotations

import socket
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from oe_router.datapath import nfqueue as Q

NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4


def nlmsg(mtype: int, flags: int, seq: int, body: bytes) -> bytes:
    return struct.pack("=IHHII", 16 + len(body), mtype, flags, seq, 0) + body


def nfgen(family: int, queue: int) -> bytes:
    return struct.pack("=BB", family, 0) + struct.pack(">H", queue)


def attr(atype: int, data: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(data), atype) + data
    return raw + bytes(-len(raw) % 4)


def test_config_bind_is_byte_exact() -> None:
    cmd = attr(1, bytes([1, 0]) + struct.pack(">H", 0))  # command BIND, _pad, pf
    want = nlmsg(0x0302, NLM_F_REQUEST | NLM_F_ACK, 9, nfgen(0, 7) + cmd)
    got = Q.encode_config(7, command=Q.NFQNL_CFG_CMD_BIND, seq=9)
    assert got == want
    assert len(got) == 28


def test_config_params_maxlen_flags_are_byte_exact() -> None:
    params = attr(2, struct.pack(">I", 0xFFFB) + bytes([2]))  # 9-byte NLA, 3 pad bytes
    assert len(params) == 12 and params[:2] == struct.pack("=H", 9)
    body = (
        nfgen(0, 0x1234)
        + params
        + attr(3, struct.pack(">I", 4096))
        + attr(4, struct.pack(">I", 0b111))
        + attr(5, struct.pack(">I", 0b001))
    )
    want = nlmsg(0x0302, NLM_F_REQUEST | NLM_F_ACK, 3, body)
    got = Q.encode_config(
        0x1234,
        copy_mode=Q.NFQNL_COPY_PACKET,
        copy_range=0xFFFB,
        maxlen=4096,
        flags=Q.NFQA_CFG_F_FAIL_OPEN,
        mask=Q.NFQA_CFG_F_FAIL_OPEN | Q.NFQA_CFG_F_CONNTRACK | Q.NFQA_CFG_F_GSO,
        seq=3,
    )
    assert got == want


def test_verdict_with_mark_and_payload_is_byte_exact() -> None:
    payload = b"\x45\x00\x00\x1d" + bytes(25)  # 29 bytes: 3 pad bytes after it
    body = (
        nfgen(0, 5)
        + attr(2, struct.pack(">II", 1, 0xDEADBEEF))
        + attr(3, struct.pack(">I", 0x42))
        + attr(10, payload)
    )
    want = nlmsg(0x0301, NLM_F_REQUEST, 0, body)
    got = Q.encode_verdict(5, 0xDEADBEEF, Q.NF_ACCEPT, mark=0x42, payload=payload)
    assert got == want


def test_verdict_batch_is_byte_exact() -> None:
    want = nlmsg(0x0303, NLM_F_REQUEST, 0, nfgen(0, 5) + attr(2, struct.pack(">II", 0, 77)))
    assert Q.encode_verdict(5, 77, Q.NF_DROP, batch=True) == want
    with pytest.raises(ValueError, match="payload"):
        Q.encode_verdict(5, 77, Q.NF_DROP, batch=True, payload=b"x")


def packet_message(
    *, packet_id: int = 0x01020304, payload: bytes = b"\x45" + bytes(27), extra: bytes = b""
) -> bytes:
    """An NFQNL_MSG_PACKET as the kernel builds it (nfqnl_build_packet_message)."""
    hdr = struct.pack(">IHB", packet_id, 0x0800, 4)  # POST_ROUTING
    assert len(hdr) == 7
    body = (
        nfgen(2, 3)
        + attr(1, hdr)
        + attr(3, struct.pack(">I", 0xCAFE))
        + attr(6, struct.pack(">I", 9))
        + attr(4, struct.pack(">QQ", 1_700_000_000, 250_000))
        + attr(14, struct.pack(">I", Q.NFQA_SKB_CSUMNOTREADY))
        + attr(13, struct.pack(">I", 1500))
        + attr(10, payload)
        + extra
    )
    return nlmsg(0x0300, 0, 0, body)


def test_packet_decodes_every_field() -> None:
    payload = b"\x45" + bytes(27)
    p = Q.decode_packet(packet_message(payload=payload))
    assert p == Q.QueuedPacket(
        id=0x01020304,
        queue=3,
        family=2,
        hook=4,
        hw_protocol=0x0800,
        payload=payload,
        length=1500,
        mark=0xCAFE,
        indev=None,
        outdev=9,
        timestamp=1_700_000_000.25,
        skb_info=Q.NFQA_SKB_CSUMNOTREADY,
    )
    assert p.truncated
    assert "payload" not in repr(p)


def test_fast_reader_agrees_with_pyroute2_declaration() -> None:
    data = packet_message()
    msg = Q.nfqnl_msg(bytearray(data))
    msg.decode()
    hdr = msg.get_attr("NFQA_PACKET_HDR")
    p = Q.decode_packet(data)
    assert (hdr["packet_id"], hdr["hw_protocol"], hdr["hook"]) == (p.id, p.hw_protocol, p.hook)
    assert msg.get_attr("NFQA_MARK") == p.mark
    assert msg.get_attr("NFQA_IFINDEX_OUTDEV") == p.outdev
    assert msg.get_attr("NFQA_PAYLOAD") == p.payload
    assert msg["res_id"] == p.queue


def test_unknown_attribute_is_skipped() -> None:
    p = Q.decode_packet(packet_message(extra=attr(99, b"future")))
    assert p.id == 0x01020304


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"\x10\x00", "truncated"),
        (packet_message()[:-3], "does not fit"),
        (nlmsg(0x0301, 0, 0, nfgen(2, 3)), "not an NFQUEUE packet"),
        (nlmsg(0x0300, 0, 0, nfgen(2, 3) + attr(3, struct.pack(">I", 1))), "without"),
        (nlmsg(0x0300, 0, 0, nfgen(2, 3) + attr(1, b"\x00\x00")), "NFQA_PACKET_HDR is 2"),
        (nlmsg(0x0300, 0, 0, nfgen(2, 3) + struct.pack("=HH", 200, 1)), "claims 200"),
        (nlmsg(0x0300, 0, 0, nfgen(2, 3) + struct.pack("=HH", 2, 1)), "claims 2"),
    ],
)
def test_malformed_packets_raise_typed_errors(data: bytes, why: str) -> None:
    with pytest.raises(Q.NfQueueMessageError, match=why):
        Q.decode_packet(data)


@given(st.binary(max_size=300))
def test_random_bytes_never_crash_the_reader(data: bytes) -> None:
    try:
        for mtype, _flags, off, length in Q.iter_messages(data):
            if mtype == 0x0300:
                Q.decode_packet(data, off, length)
    except Q.NfQueueMessageError:
        pass


@given(st.integers(0, 200), st.binary(min_size=1, max_size=8))
def test_corrupted_packets_never_crash_the_reader(pos: int, junk: bytes) -> None:
    data = bytearray(packet_message())
    pos %= len(data)
    data[pos : pos + len(junk)] = junk
    try:
        for mtype, _flags, off, length in Q.iter_messages(bytes(data)):
            if mtype == 0x0300:
                Q.decode_packet(bytes(data), off, length)
    except Q.NfQueueMessageError:
        pass


def _queue_on_pair(copy_range: int = Q.MAX_COPY_RANGE) -> tuple[Q.NfQueue, socket.socket]:
    kernel, ours = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    q = Q.NfQueue(3, copy_range=copy_range)
    q.attach(ours)
    return q, kernel


def test_reader_survives_garbage_and_drops_what_it_can_name() -> None:
    q, kernel = _queue_on_pair()
    bad_attr = nfgen(2, 3) + attr(1, struct.pack(">IHB", 41, 0x0800, 4)) + attr(3, b"\x01")
    kernel.send(packet_message(packet_id=40))
    kernel.send(nlmsg(0x0300, 0, 0, bad_attr))  # NFQA_MARK of 1 byte: malformed, id 41
    kernel.send(b"\xff" * 7)  # not even a header
    kernel.send(packet_message(packet_id=42))
    kernel.send(nlmsg(2, 0, 0, struct.pack("=i", -2) + bytes(16)))  # a refused verdict
    got = q.read_packets()
    assert [p.id for p in got] == [40, 42]
    assert q.malformed == 2
    assert (q.verdict_errors, q.last_error) == (1, 2)
    # packet 41 was dropped (fail closed) with a verdict the kernel would understand
    sent = kernel.recv(4096)
    assert sent == Q.encode_verdict(3, 41, Q.NF_DROP)
    assert q.read_packets() == []  # drained, non-blocking
    q.close()
    kernel.close()


def test_oversized_message_is_counted_not_fatal() -> None:
    q, kernel = _queue_on_pair(copy_range=1000)  # a 5 KiB receive buffer
    big = packet_message(packet_id=7, payload=bytes(6000))
    kernel.send(big)
    kernel.send(packet_message(packet_id=8))
    assert [p.id for p in q.read_packets()] == [8]
    assert q.malformed == 1
    assert kernel.recv(4096) == Q.encode_verdict(3, 7, Q.NF_DROP)
    q.close()
    kernel.close()


def test_verdict_helpers_send_what_the_encoder_builds() -> None:
    q, kernel = _queue_on_pair()
    q.verdict(5, True, mark=1)
    q.verdicts([(6, True), (7, False)])
    q.verdict_batch(9, False)
    assert kernel.recv(4096) == Q.encode_verdict(3, 5, Q.NF_ACCEPT, mark=1)
    assert kernel.recv(4096) == Q.encode_verdict(3, 6, Q.NF_ACCEPT) + Q.encode_verdict(
        3, 7, Q.NF_DROP
    )
    assert kernel.recv(4096) == Q.encode_verdict(3, 9, Q.NF_DROP, batch=True)
    q.close()
    kernel.close()


def test_kernel_errors_name_the_queue_and_the_cause() -> None:
    err = Q._kernel_error(7, "bind", 1)
    assert "NFQUEUE 7" in str(err) and "another process" in str(err)
    assert err.errno == 1
    with pytest.raises(ValueError, match="65536"):
        Q.NfQueue(65536)
