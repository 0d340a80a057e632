"""The front's hot-path wire reader agrees with dnspython on every message it accepts."""

from __future__ import annotations

import ipaddress

import dns.flags
import dns.message
import dns.name
import dns.rdatatype
import dns.rrset
from hypothesis import given, settings
from hypothesis import strategies as st

from oe_router.dns.wire import read_query, read_reply, rewrite_ttls

labels = st.lists(st.from_regex(r"[A-Za-z0-9-]{1,12}", fullmatch=True), min_size=1, max_size=4)
rdtypes = st.sampled_from(["A", "AAAA", "IPSECKEY", "TXT", "MX"])


@settings(max_examples=200, deadline=None)
@given(labels, rdtypes, st.booleans(), st.integers(0, 65535), st.booleans(), st.booleans())
def test_read_query_matches_dnspython(
    parts: list[str], rdtype: str, edns: bool, payload: int, do: bool, cd: bool
) -> None:
    query = dns.message.make_query(
        ".".join(parts) + ".",
        rdtype,
        use_edns=0 if edns else False,
        payload=payload if edns else None,
        want_dnssec=do and edns,
    )
    if cd:
        query.flags |= dns.flags.CD
    view = read_query(query.to_wire())
    assert view is not None
    assert view.id == query.id and view.qtype == dns.rdatatype.from_text(rdtype)
    assert dns.name.Name((*view.labels, b"")) == query.question[0].name
    assert all(label == label.lower() for label in view.labels)
    assert view.edns == edns and view.do == (do and edns) and view.cd == cd
    if edns:
        assert view.payload == query.payload


def test_read_query_leaves_unusual_queries_to_dnspython() -> None:
    wire = dns.message.make_query("a.example.", "A").to_wire()
    assert read_query(wire + b"\x00") is None  # trailing bytes
    assert read_query(wire[:-1]) is None  # cut short
    response = bytearray(wire)
    response[2] |= 0x80
    assert read_query(bytes(response)) is None  # QR set
    notify = bytearray(wire)
    notify[2] |= 4 << 3
    assert read_query(bytes(notify)) is None  # opcode NOTIFY
    edns1 = dns.message.make_query("a.example.", "A", use_edns=1).to_wire()
    assert read_query(edns1) is None  # EDNS version 1: BADVERS is dnspython's
    compressed = wire[:12] + b"\xc0\x0c" + wire[-4:]
    assert read_query(compressed) is None


def _query_for_labels(sizes: list[int]) -> bytes:
    """A one-question A query whose name has labels of ``sizes`` octets (built by hand:
    dnspython refuses to make an over-long name)."""
    qname = b"".join(bytes([n]) + b"a" * n for n in sizes) + b"\x00"
    return b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00" + qname + b"\x00\x01\x00\x01"


def test_read_query_name_length_limit_is_255_octets_with_the_root() -> None:
    """RFC 1035 §3.1: 255 octets in all, the root label's byte included. A name one octet
    longer is left to dnspython (which refuses it), never handed on as a question the
    front cannot name (the fuzzer's dns_wire crash: NameTooLong from Question.of_view)."""
    longest = [63, 63, 63, 61]  # 64+64+64+62 = 254 octets, + the root = 255
    view = read_query(_query_for_labels(longest))
    assert view is not None
    assert len(dns.name.Name((*view.labels, b"")).to_wire()) == 255
    assert read_query(_query_for_labels([63, 63, 63, 62])) is None  # 256 octets


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.integers(0, 2**31 - 1), min_size=1, max_size=5),
    st.integers(0, 90000),
    st.integers(0, 5000),
    st.one_of(st.none(), st.integers(0, 90000)),
    st.booleans(),
)
def test_read_reply_and_rewrite_match_dnspython(
    ttls: list[int], soa_min: int, elapsed: int, cap: int | None, nx: bool
) -> None:
    query = dns.message.make_query("www.example.", "A", use_edns=0, want_dnssec=True)
    reply = dns.message.make_response(query)
    reply.use_edns(0, dns.flags.DO, 1232)  # the OPT TTL field holds flags: never aged
    if nx:
        reply.set_rcode(dns.rcode.NXDOMAIN)
    else:
        reply.answer.append(
            dns.rrset.from_text("www.example.", ttls[0], "IN", "CNAME", "host.example.")
        )
        for i, ttl in enumerate(ttls[1:]):
            reply.answer.append(
                dns.rrset.from_text(f"host{i}.example.", ttl, "IN", "A", f"192.0.2.{i}")
            )
        reply.answer.append(
            dns.rrset.from_text("host.example.", ttls[0], "IN", "AAAA", "2001:db8::1")
        )
    soa = f"ns.example. h.example. 1 2 3 4 {soa_min}"
    reply.authority.append(dns.rrset.from_text("example.", ttls[-1], "IN", "SOA", soa))
    wire = reply.to_wire()
    view = read_reply(wire)
    assert view is not None and view.rcode == reply.rcode()
    expected_min = min([*ttls, soa_min]) if not nx else min(ttls[-1], soa_min)
    assert view.min_ttl == expected_min
    want = [] if nx else [ipaddress.ip_address(f"192.0.2.{i}") for i in range(len(ttls) - 1)]
    want += [] if nx else [ipaddress.ip_address("2001:db8::1")]
    assert list(view.addresses) == want
    out = dns.message.from_wire(rewrite_ttls(wire, 0x1234, view.ttl_offsets, elapsed, cap))
    assert out.id == 0x1234 and out.edns == 0 and out.ednsflags & dns.flags.DO
    for before, after in zip(
        [*reply.answer, *reply.authority], [*out.answer, *out.authority], strict=True
    ):
        aged = max(0, before.ttl - elapsed)
        assert after.ttl == (aged if cap is None else min(aged, cap))


def test_read_reply_refuses_malformed() -> None:
    query = dns.message.make_query("www.example.", "A")
    reply = dns.message.make_response(query)
    reply.answer.append(dns.rrset.from_text("www.example.", 60, "IN", "A", "192.0.2.1"))
    wire = reply.to_wire()
    assert read_reply(wire) is not None
    assert read_reply(wire[:-1]) is None
    assert read_reply(wire + b"\x00") is None
    assert read_reply(wire[:5]) is None
