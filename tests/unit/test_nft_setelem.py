"""nf_tables set-element messages: byte-exact against what nft 1.0.6 sends, and the ACKs.

The expected bytes are laid out by hand from ``nft --debug=mnl add element ...`` dumps
(nftables 1.0.6, on this project's host), attribute by attribute: nlmsghdr in host
order, nfgenmsg with res_id big-endian, nested attributes flagged NLA_F_NESTED, keys and
timeouts big-endian. nft also sends NFTA_SET_ELEM_LIST_SET_ID (only meaningful for a set
made in the same batch), which we leave out. Never produced by the code under test.
"""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from oe_router.datapath import nft_setelem as E
from oe_router.datapath.kernel_hold import HoldSettings, KnownOp, known_changes

NLM_F_REQUEST, NLM_F_ACK, NLM_F_CREATE = 0x1, 0x4, 0x400
NESTED = 0x8000


def nlmsg(mtype: int, flags: int, seq: int, body: bytes) -> bytes:
    return struct.pack("=IHHII", 16 + len(body), mtype, flags, seq, 0) + body


def attr(atype: int, data: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(data), atype) + data
    return raw + bytes(-len(raw) % 4)


def batch(seq_begin: int, *messages: bytes) -> bytes:
    end_seq = seq_begin + len(messages) + 1
    begin = nlmsg(0x10, NLM_F_REQUEST, seq_begin, bytes([0, 0]) + struct.pack(">H", 10))
    end = nlmsg(0x11, NLM_F_REQUEST, end_seq, bytes([0, 0]) + struct.pack(">H", 10))
    return begin + b"".join(messages) + end


def addr(text: str) -> ipaddress.IPv4Address:
    return ipaddress.IPv4Address(text)


def test_known_set_element_with_timeout_is_what_nft_sends() -> None:
    # nft --debug=mnl add element inet t known4 { 198.51.100.9 timeout 600s }
    elem = attr(
        1 | NESTED,
        attr(4, struct.pack(">Q", 600_000)) + attr(1 | NESTED, attr(1, bytes([198, 51, 100, 9]))),
    )
    body = (
        bytes([1, 0, 0, 0])  # NFPROTO_INET, v0, res_id 0
        + attr(1, b"t\0")
        + attr(2, b"known4\0")
        + attr(3 | NESTED, elem)
    )
    msg = nlmsg(0x0A0C, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE, 8, body)
    change = E.ElemChange("t", "known4", True, (E.SetElem(addr("198.51.100.9"), timeout=600),))
    got = E.encode_batch([change], seq=7)
    assert got.data == batch(7, msg)
    assert list(got.messages) == [8] and (got.begin_seq, got.end_seq) == (7, 9)


def test_verdict_map_interval_is_what_nft_sends() -> None:
    # nft --debug=mnl add element inet t m { 198.51.100.20 : goto q }
    verdict = attr(
        2 | NESTED,
        attr(2 | NESTED, attr(1, struct.pack(">i", -4)) + attr(2, b"q\0")),
    )
    start = attr(1 | NESTED, attr(1 | NESTED, attr(1, bytes([198, 51, 100, 20]))) + verdict)
    end = attr(
        1 | NESTED,
        attr(3, struct.pack(">I", 1)) + attr(1 | NESTED, attr(1, bytes([198, 51, 100, 21]))),
    )
    body = bytes([1, 0, 0, 0]) + attr(1, b"t\0") + attr(2, b"m\0") + attr(3 | NESTED, start + end)
    msg = nlmsg(0x0A0C, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE, 2, body)
    pair = E.interval(ipaddress.ip_network("198.51.100.20/32"), (E.NFT_GOTO, "q"))
    assert pair is not None
    assert E.encode_batch([E.ElemChange("t", "m", True, pair)]).data == batch(1, msg)


def test_delete_and_flush() -> None:
    rm = E.ElemChange("t", "known4", False, (E.SetElem(addr("192.0.2.1")),))
    flush = E.ElemChange("t", "known4", False)
    body_rm = (
        bytes([1, 0, 0, 0])
        + attr(1, b"t\0")
        + attr(2, b"known4\0")
        + attr(3 | NESTED, attr(1 | NESTED, attr(1 | NESTED, attr(1, bytes([192, 0, 2, 1])))))
    )
    body_flush = bytes([1, 0, 0, 0]) + attr(1, b"t\0") + attr(2, b"known4\0")
    got = E.encode_batch([rm, flush], seq=1).data
    assert got == batch(
        1,
        nlmsg(0x0A0E, NLM_F_REQUEST | NLM_F_ACK, 2, body_rm),
        nlmsg(0x0A0E, NLM_F_REQUEST | NLM_F_ACK, 3, body_flush),
    )


def test_intervals_at_the_top_and_in_ipv6() -> None:
    assert E.interval(ipaddress.ip_network("255.255.255.255/32")) is None
    assert E.interval(ipaddress.ip_network("128.0.0.0/1")) is None
    pair = E.interval(ipaddress.ip_network("2001:db8::/32"), (E.NF_DROP, None))
    assert pair is not None
    assert pair[0].key == ipaddress.IPv6Address("2001:db8::") and pair[0].verdict == (0, None)
    assert pair[1].key == ipaddress.IPv6Address("2001:db9::")
    assert pair[1].flags == E.NFT_SET_ELEM_INTERVAL_END


def _decode(msg: bytes) -> E.nft_setelem_msg:
    m = E.nft_setelem_msg(msg)
    m.decode()
    return m


@given(
    st.lists(st.tuples(st.integers(0, 2**32 - 1), st.integers(1, 86400)), min_size=1, max_size=1200)
)
def test_templates_give_the_classes_bytes_and_parse_back(items: list[tuple[int, int]]) -> None:
    """The fast path (templates) equals encoding every element through the classes, and
    pyroute2's parser reads each key and timeout (ms) back; >512 elements: 2 messages."""
    elems = tuple(E.SetElem(ipaddress.IPv4Address(a), timeout=t) for a, t in items)
    ch = E.ElemChange("oe_hold", "known4", True, elems)
    fast, slow = E.encode_batch([ch], seq=100), E.encode_batch([ch], seq=100, fast=False)
    assert fast.data == slow.data
    assert len(fast.messages) == (len(items) + E.ELEMS_PER_MSG - 1) // E.ELEMS_PER_MSG
    seen: list[tuple[int, int]] = []
    off = 20  # after BATCH_BEGIN
    for seq, sent in fast.messages.items():
        length = struct.unpack_from("=I", fast.data, off)[0]
        m = _decode(fast.data[off : off + length])
        assert m["header"]["sequence_number"] == seq
        assert m.get_attr("NFTA_SET_ELEM_LIST_SET") == "known4"
        for el in m.get_attr("NFTA_SET_ELEM_LIST_ELEMENTS"):
            key = el.get_attr("NFTA_SET_ELEM_KEY").get_attr("NFTA_DATA_VALUE")
            seen.append((int.from_bytes(key, "big"), el.get_attr("NFTA_SET_ELEM_TIMEOUT")))
        assert len(sent.elem_at) == len(sent.elems)
        off += length
    assert seen == [(a, t * 1000) for a, t in items]


def _ack(seq: int, err: int, offs: int | None = None, text: str = "") -> bytes:
    """NLMSG_ERROR as the kernel sends it with NETLINK_CAP_ACK and NETLINK_EXT_ACK."""
    tlvs = b""
    flags = 0x100  # NLM_F_CAPPED
    if offs is not None:
        tlvs += attr(2, struct.pack("=I", offs))
    if text:
        tlvs += attr(1, text.encode() + b"\0")
    if tlvs:
        flags |= 0x200  # NLM_F_ACK_TLVS
    req = struct.pack("=IHHII", 100, 0x0A0C, 5, seq, 0)
    return nlmsg(2, flags, seq, struct.pack("=i", -err) + req + tlvs)


def test_acks_name_the_set_and_the_element() -> None:
    elems = tuple(E.SetElem(addr(f"198.51.100.{i}"), timeout=60) for i in (5, 6, 7))
    b = E.encode_batch([E.ElemChange("oe_hold", "known4", True, elems, what="packet hold")])
    sent = b.messages[2]
    acks = E.parse_acks(_ack(2, 0) + _ack(99, 0))
    assert [(a.seq, a.errno) for a in acks] == [(2, 0), (99, 0)]
    E.check_acks(b, acks)  # all done: nothing raised

    with pytest.raises(E.NftSetError) as exc:
        E.check_acks(b, E.parse_acks(_ack(2, 2, sent.set_at)))
    assert exc.value.errno == 2
    assert str(exc.value) == (
        "packet hold: set inet oe_hold known4: 3 elements from 198.51.100.5: no such set (ENOENT)"
    )
    with pytest.raises(E.NftSetError, match=r"element 198\.51\.100\.7: set full \(ENFILE\)"):
        E.check_acks(b, E.parse_acks(_ack(2, 23, sent.elem_at[2])))
    with pytest.raises(E.NftSetError, match=r"no such table \(ENOENT\): gone$"):
        E.check_acks(b, E.parse_acks(_ack(2, 2, sent.table_at, "gone")))
    assert E.unsupported(E.NftSetError(95, "x")) and not E.unsupported(E.NftSetError(2, "x"))


def test_malformed_acks_raise_value_error() -> None:
    good = _ack(2, 0)
    with pytest.raises(ValueError):
        E.parse_acks(good[:-4] + struct.pack("=I", 0), len(good) - 1)
    with pytest.raises(ValueError):
        E.parse_acks(struct.pack("=IHHII", 20, 2, 0, 1, 0) + b"\0" * 4)


def test_known_changes_match_the_known_script() -> None:
    s = HoldSettings(table="oe_hold")
    a, b = addr("192.0.2.1"), addr("192.0.2.2")
    assert known_changes(s, KnownOp(add=((a, 30), (b, 0)))) == [
        E.ElemChange(
            "oe_hold",
            "known4",
            True,
            (E.SetElem(a, timeout=30), E.SetElem(b, timeout=1)),
            what="packet hold",
        )
    ]
    flush_then_rm = known_changes(s, KnownOp(remove=a, flush=True))
    assert [(c.set, c.add, c.elems) for c in flush_then_rm] == [
        ("known4", False, ()),
        ("known6", False, ()),
        ("known4", False, (E.SetElem(a),)),
    ]
    c6 = ipaddress.IPv6Address("2001:db8::7")
    mixed = known_changes(s, KnownOp(add=((a, 30), (c6, 60)), remove=c6))
    assert [(c.set, c.add, c.elems) for c in mixed] == [
        ("known4", True, (E.SetElem(a, timeout=30),)),
        ("known6", True, (E.SetElem(c6, timeout=60),)),
        ("known6", False, (E.SetElem(c6),)),
    ]
    assert KnownOp(remove=a).quiet and not KnownOp(flush=True).quiet


@given(
    st.lists(
        st.tuples(st.integers(0, 2**32 - 2), st.integers(8, 32), st.sampled_from([0, 1, 2])),
        min_size=1,
        max_size=40,
    )
)
def test_mixed_element_shapes_give_the_classes_bytes(items: list[tuple[int, int, int]]) -> None:
    """Interval starts with accept/drop/goto verdicts and flagged ends in one message:
    each element from its own shape's template, the same bytes as the classes give."""
    verdicts = [(E.NF_ACCEPT, None), (E.NF_DROP, None), (E.NFT_GOTO, "oe_queue")]
    elems: list[E.SetElem] = []
    for a, plen, v in items:
        pair = E.interval(ipaddress.ip_network((a, plen), strict=False), verdicts[v])
        if pair is not None:
            elems.extend(pair)
    if not elems:
        return
    ch = E.ElemChange("oe_spd", "out_1", True, tuple(elems))
    assert E.encode_batch([ch]).data == E.encode_batch([ch], fast=False).data


def test_a_thousand_elements_split_into_acked_messages_of_512() -> None:
    elems = tuple(E.SetElem(ipaddress.IPv4Address(0xC0000200 + i), timeout=60) for i in range(1000))
    ch = E.ElemChange("oe_hold", "known4", True, elems)
    b = E.encode_batch([ch, ch], seq=1)  # consecutive changes to one set: merged
    assert [len(m.elems) for m in b.messages.values()] == [512, 512, 512, 464]
    assert b.data == E.encode_batch([ch, ch], seq=1, fast=False).data
    assert all(len(m.elem_at) == len(m.elems) for m in b.messages.values())
