"""The validator's own DNSSEC operations agree with dnspython's ``dns.dnssec``, which the
daemon no longer imports (docs/footprint.md): signatures dnspython makes verify, anything
changed does not, and key tags, DS digests and NSEC3 hashes are the same values."""

from __future__ import annotations

import base64
import time
from typing import Any

import dns.dnssec
import dns.name
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from dns.dnssectypes import DSDigest
from hypothesis import given, settings
from hypothesis import strategies as st

from oe_router.dns.dnssec_crypto import (
    SignatureError,
    ds_digest,
    key_tag,
    nsec3_digest,
    signed_data,
    verify_rrsig,
)

IN = dns.rdataclass.IN
NOW = time.time()
ZONE = dns.name.from_text("Example.TEST.")

PRIVATE: dict[int, Any] = {
    8: rsa.generate_private_key(65537, 2048),
    13: ec.generate_private_key(ec.SECP256R1()),
    15: ed25519.Ed25519PrivateKey.generate(),
}


def dnskey(algorithm: int, flags: int = 257) -> Any:
    return dns.dnssec.make_dnskey(PRIVATE[algorithm].public_key(), algorithm, flags=flags)


def signed(rrset: dns.rrset.RRset, algorithm: int, **kw: Any) -> Any:
    return dns.dnssec.sign(
        rrset,
        PRIVATE[algorithm],
        ZONE,
        dnskey(algorithm),
        inception=int(NOW) - 3600,
        expiration=int(NOW) + 3600,
        **kw,
    )


labels = st.text("abcXYZ019-", min_size=1, max_size=8)
owners = st.lists(labels, min_size=0, max_size=3).map(
    lambda ls: dns.name.Name(tuple(label.encode() for label in ls)).concatenate(ZONE)
)
records = st.one_of(
    st.tuples(st.just("A"), st.lists(st.ip_addresses(v=4).map(str), min_size=1, max_size=4)),
    st.tuples(st.just("AAAA"), st.lists(st.ip_addresses(v=6).map(str), min_size=1, max_size=3)),
    st.tuples(st.just("MX"), st.lists(labels.map(lambda h: f"10 {h}.Mail.Test."), min_size=1)),
    st.tuples(st.just("TXT"), st.lists(labels.map(lambda t: f'"{t}"'), min_size=1, max_size=3)),
)


def rrset_of(owner: dns.name.Name, rdtype: str, texts: list[str]) -> dns.rrset.RRset:
    return dns.rrset.from_text_list(owner, 300, IN, rdtype, texts)


@settings(max_examples=60, deadline=None)
@given(owner=owners, data=records, algorithm=st.sampled_from([8, 13, 15]))
def test_what_dnspython_signs_verifies_and_nothing_else(
    owner: dns.name.Name, data: tuple[str, list[str]], algorithm: int
) -> None:
    rrset = rrset_of(owner, *data)
    sig = signed(rrset, algorithm)
    key = dnskey(algorithm)
    verify_rrsig(rrset, sig, key, NOW)
    assert signed_data(rrset, sig) == dns.dnssec._make_rrsig_signature_data(rrset, sig)
    other = 13 if algorithm != 13 else 15
    with pytest.raises(SignatureError):
        verify_rrsig(rrset, sig, dnskey(other), NOW)  # another key
    flipped = bytearray(sig.signature)
    flipped[len(flipped) // 2] ^= 1
    with pytest.raises(SignatureError):
        verify_rrsig(rrset, sig.replace(signature=bytes(flipped)), key, NOW)
    with pytest.raises(SignatureError):
        verify_rrsig(rrset, sig.replace(original_ttl=sig.original_ttl + 1), key, NOW)
    changed = (
        rrset_of(owner, "TXT", ['"changed"'])
        if data[0] != "TXT"
        else rrset_of(owner, "TXT", ['"x"', *data[1]])
    )
    with pytest.raises(SignatureError):
        verify_rrsig(changed, sig.replace(type_covered=changed.rdtype), key, NOW)


@pytest.mark.parametrize("algorithm", [8, 13, 15])
def test_case_and_order_of_the_records_do_not_matter(algorithm: int) -> None:
    """The canonical form: names in rdata and the owner lower-cased, records sorted."""
    rrset = rrset_of(ZONE, "MX", ["20 B.mail.test.", "10 a.MAIL.test."])
    sig = signed(rrset, algorithm)
    same = rrset_of(
        dns.name.from_text("example.test."), "MX", ["10 a.mail.test.", "20 b.mail.test."]
    )
    verify_rrsig(same, sig, dnskey(algorithm), NOW)


@pytest.mark.parametrize("algorithm", [8, 13, 15])
def test_a_wildcard_expansion_verifies_as_the_wildcard(algorithm: int) -> None:
    wild = rrset_of(dns.name.from_text("*.example.test."), "A", ["192.0.2.1"])
    sig = signed(wild, algorithm)
    expanded = rrset_of(dns.name.from_text("a.b.example.test."), "A", ["192.0.2.1"])
    verify_rrsig(expanded, sig, dnskey(algorithm), NOW)
    dns.dnssec.validate_rrsig(
        expanded, sig, {ZONE: dns.rrset.from_rdata(ZONE, 0, dnskey(algorithm))}
    )
    with pytest.raises(SignatureError, match="longer than RRSIG labels"):
        verify_rrsig(expanded, sig.replace(labels=5), dnskey(algorithm), NOW)


@pytest.mark.parametrize("algorithm", [8, 13, 15])
def test_a_wildcard_owner_is_only_signed_as_itself(algorithm: int) -> None:
    """A literal ``*`` owner: its labels field must not count the ``*`` (RFC 4035 5.3.1),
    and it is not accepted as synthesised from a wildcard above it (dnspython neither)."""
    key = dnskey(algorithm)
    wild = rrset_of(dns.name.from_text("*.example.test."), "A", ["192.0.2.1"])
    sig = signed(wild, algorithm)
    verify_rrsig(wild, sig, key, NOW)
    with pytest.raises(SignatureError, match="wild owner name has wrong label length"):
        verify_rrsig(wild, sig.replace(labels=3), key, NOW)
    lower = rrset_of(dns.name.from_text("*.a.example.test."), "A", ["192.0.2.1"])
    with pytest.raises(SignatureError, match="wild owner name has wrong label length"):
        verify_rrsig(lower, sig, key, NOW)


def test_time_key_and_signer_checks() -> None:
    rrset = rrset_of(ZONE, "A", ["192.0.2.1"])
    sig = signed(rrset, 13)
    key = dnskey(13)
    with pytest.raises(SignatureError, match="expired"):
        verify_rrsig(rrset, sig, key, NOW + 7200)
    with pytest.raises(SignatureError, match="not yet valid"):
        verify_rrsig(rrset, sig, key, NOW - 7200)
    not_zone = dnskey(13, flags=0)
    with pytest.raises(SignatureError, match="zone key"):
        verify_rrsig(rrset, sig.replace(key_tag=key_tag(not_zone)), not_zone, NOW)
    outside = rrset_of(dns.name.from_text("example.org."), "A", ["192.0.2.1"])
    with pytest.raises(SignatureError, match="not signed by signer"):
        verify_rrsig(outside, sig, key, NOW)


@pytest.mark.parametrize(
    ("algorithm", "blob", "why"),
    [
        (13, b"\x01" * 64, "not a point on P-256"),
        (13, b"\x01" * 32, "not 64 octets"),
        (15, b"\x01" * 31, "not 32 octets"),
        (8, b"\x03\x01\x00", "RSA key"),
        (14, b"\x01" * 96, "algorithm 14 unsupported"),
    ],
)
def test_a_key_that_cannot_be_used_is_named(algorithm: int, blob: bytes, why: str) -> None:
    key = dns.rdata.from_wire(
        IN, dns.rdatatype.DNSKEY, bytes([1, 1, 3, algorithm]) + blob, 0, 4 + len(blob)
    )
    rrset = rrset_of(ZONE, "A", ["192.0.2.1"])
    sig = signed(rrset, 13).replace(algorithm=algorithm, key_tag=key_tag(key))
    with pytest.raises(SignatureError, match=why):
        verify_rrsig(rrset, sig, key, NOW)


@settings(max_examples=200, deadline=None)
@given(flags=st.integers(0, 0xFFFF), algorithm=st.integers(1, 255), blob=st.binary(max_size=300))
def test_key_tags_are_dnspythons(flags: int, algorithm: int, blob: bytes) -> None:
    if algorithm == 1 and len(blob) < 3:
        blob += b"\x00\x00\x00"
    wire = flags.to_bytes(2, "big") + bytes([3, algorithm]) + blob
    key: Any = dns.rdata.from_wire(IN, dns.rdatatype.DNSKEY, wire, 0, len(wire))
    assert key_tag(key) == dns.dnssec.key_id(key)


@pytest.mark.parametrize("digest_type", [2, 4])
@pytest.mark.parametrize("algorithm", [8, 13, 15])
def test_ds_digests_are_dnspythons(digest_type: int, algorithm: int) -> None:
    for owner in (dns.name.root, ZONE):
        expected = dns.dnssec.make_ds(owner, dnskey(algorithm), DSDigest(digest_type)).digest
        assert ds_digest(owner, dnskey(algorithm), digest_type) == expected


def test_a_ds_digest_outside_the_accepted_ones_is_refused() -> None:
    for digest_type in (1, 3, 5):
        with pytest.raises(ValueError, match=f"digest type {digest_type} unsupported"):
            ds_digest(ZONE, dnskey(13), digest_type)


@settings(max_examples=100, deadline=None)
@given(owner=owners, salt=st.binary(max_size=16), iterations=st.integers(0, 20))
def test_nsec3_hashes_are_dnspythons(owner: dns.name.Name, salt: bytes, iterations: int) -> None:
    text = dns.dnssec.nsec3_hash(owner, salt, iterations, 1)
    assert nsec3_digest(owner, salt, iterations) == base64.b32hexdecode(text)
