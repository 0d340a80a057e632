"""The sans-IO DNSSEC validator against signed zones built in memory.

Each test builds a root -> test. -> example.test. hierarchy (plus siblings) with
tests/dnssec_world.py's ``make_world`` (signed with the ``zone_keys`` fixture of
tests/unit/conftest.py), and answers the validator's queries with ``World.answer``:
a tiny resolver-with-CD=1 stand-in that serves those zones the way a recursive
upstream would (DS from the parent, CNAMEs chased, NSEC/NSEC3 proofs in the
authority section). This is the unit tier of the core; the host tier runs the same
cases against knot.
"""

from __future__ import annotations

from typing import Any

import dns.dnssec
import dns.flags
import dns.message
import dns.name
import dns.node
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdataset
import dns.rdatatype
import dns.rrset
import dns.zone
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from oe_router.dns import dnssec_crypto, dnssec_sigs
from oe_router.dns.dnssec import (
    MAX_KEYS_PER_TAG,
    MAX_SIGNATURE_CHECKS,
    MAX_SIGNATURE_FAILURES,
    Denial,
    Query,
    Result,
    Status,
    TrustAnchorError,
    ValidationCache,
    Validator,
    drive,
    load_trust_anchors,
)
from oe_router.dns.ipseckey import KeyKind, PeerKey, interpret_rrset
from tests.dnssec_world import (
    DAY,
    IN,
    NOW,
    N,
    PrivKey,
    T,
    World,
    ZoneDef,
    ds_text,
    make_world,
    sign_rrset,
    strip_records,
    zone_dnskey,
)


def validate(
    world: World, qname: str, rdtype: str, now: float = NOW, validator: Validator | None = None
) -> Result:
    v = validator or Validator(load_trust_anchors(world.anchor))
    return drive(v.start(qname, rdtype, now), world.answer, lambda: now)


# --------------------------------------------------------------------------- secure answers


@pytest.mark.parametrize("alg", [8, 13, 15])
def test_secure_ipseckey_each_algorithm(zone_keys: dict[str, PrivKey], alg: int) -> None:
    world = make_world(zone_keys, ex_alg=alg)
    result = validate(world, "host.example.test.", "IPSECKEY")
    assert result.status is Status.SECURE, result.reason
    assert result.zone == N("example.test.")
    assert result.rrset is not None and result.rrset.rdtype == T.IPSECKEY
    keyset = interpret_rrset(result.rrset)
    best = keyset.best
    assert isinstance(best, PeerKey) and best.kind is KeyKind.ED25519
    assert best.owner == N("host.example.test.") and best.gateway_ignored is None
    assert 0 < result.ttl <= 3600
    assert [str(q) for q in world.log] == [
        "host.example.test./IPSECKEY",
        "./DNSKEY",
        "test./DS",
        "test./DNSKEY",
        "example.test./DS",
        "example.test./DNSKEY",
        "host.example.test./DS",
    ]


def test_multiple_a_records_and_cache_hits(zone_keys: dict[str, PrivKey]) -> None:
    world = make_world(zone_keys)
    v = Validator(load_trust_anchors(world.anchor), ValidationCache())
    result = validate(world, "host.example.test.", "A", validator=v)
    assert result.status is Status.SECURE, result.reason
    assert result.rrset is not None
    assert sorted(rd.address for rd in result.rrset) == ["192.0.2.10", "192.0.2.11"]
    first = len(world.log)
    again = validate(world, "host.example.test.", "A", now=NOW + 10, validator=v)
    assert again.status is Status.SECURE and len(world.log) == first  # answer cached
    assert again.ttl == result.ttl - 10 and again.rrset == result.rrset
    other = validate(world, "nokey.example.test.", "A", now=NOW + 10, validator=v)
    assert other.status is Status.SECURE
    assert [str(q) for q in world.log[first:]] == [
        "nokey.example.test./A",
        "nokey.example.test./DS",
    ]  # chain (keys, cuts) came from the cache
    later = validate(world, "host.example.test.", "A", now=NOW + 4000, validator=v)
    assert later.status is Status.SECURE and len(world.log) > first + 2  # TTL expired


def test_ttl_clamped_to_signature_expiry(zone_keys: dict[str, PrivKey]) -> None:
    world = make_world(zone_keys, example={"expiration": NOW + 100})
    result = validate(world, "host.example.test.", "A")
    assert result.status is Status.SECURE
    assert result.ttl == 100


def test_cname_chain_across_zones(zone_keys: dict[str, PrivKey]) -> None:
    world = make_world(zone_keys)
    result = validate(world, "www.example.test.", "IPSECKEY")
    assert result.status is Status.SECURE, result.reason
    assert [c.name for c in result.cnames] == [N("www.example.test.")]
    assert result.rrset is not None and result.rrset.name == N("host.other.test.")
    assert result.zone == N("other.test.")
    keyset = interpret_rrset(result.rrset, owner=result.qname)
    assert keyset.best is not None and keyset.best.owner == N("www.example.test.")
    assert len(keyset.warnings) == 1 and keyset.warnings[0].gateway == "192.0.2.99"


def test_wildcard_answer_with_proof(zone_keys: dict[str, PrivKey]) -> None:
    world = make_world(zone_keys)
    for name in ("x.wild.example.test.", "x.wild.n3.test."):
        result = validate(world, name, "A")
        assert result.status is Status.SECURE, result.reason
        assert "wildcard" in result.reason


# --------------------------------------------------------------------------- denials


@pytest.mark.parametrize("zone", ["example", "n3"])
def test_secure_nodata(zone_keys: dict[str, PrivKey], zone: str) -> None:
    world = make_world(zone_keys)
    result = validate(world, f"host.{zone}.test.", "IPSECKEY" if zone == "n3" else "AAAA")
    assert result.status is Status.SECURE, result.reason
    assert result.denial is Denial.NODATA and result.rrset is None
    assert ("NSEC3" in result.reason) == (zone == "n3")


@pytest.mark.parametrize("zone", ["example", "n3"])
def test_secure_nodata_empty_non_terminal(zone_keys: dict[str, PrivKey], zone: str) -> None:
    world = make_world(zone_keys)
    result = validate(world, f"deep.{zone}.test.", "IPSECKEY")
    assert result.status is Status.SECURE, result.reason
    assert result.denial is Denial.NODATA


@pytest.mark.parametrize("zone", ["example", "n3"])
def test_secure_nxdomain(zone_keys: dict[str, PrivKey], zone: str) -> None:
    world = make_world(zone_keys)
    result = validate(world, f"nothere.{zone}.test.", "IPSECKEY")
    assert result.status is Status.SECURE, result.reason
    assert result.denial is Denial.NXDOMAIN


def test_nxdomain_of_cname_target(zone_keys: dict[str, PrivKey]) -> None:
    world = make_world(
        zone_keys,
        example={"text": "ns 3600 IN A 192.0.2.53\ndangling 3600 IN CNAME gone.n3.test.\n"},
    )
    result = validate(world, "dangling.example.test.", "A")
    assert result.status is Status.SECURE, result.reason
    assert result.denial is Denial.NXDOMAIN and len(result.cnames) == 1


# --------------------------------------------------------------------------- insecure


def test_insecure_delegation(zone_keys: dict[str, PrivKey]) -> None:
    world = make_world(zone_keys)
    result = validate(world, "host.insecure.test.", "A")
    assert result.status is Status.INSECURE, result.reason
    assert result.zone == N("insecure.test.")
    assert "unsigned delegation" in result.reason
    nodata = validate(world, "host.insecure.test.", "IPSECKEY")
    assert nodata.status is Status.INSECURE and nodata.denial is Denial.NODATA


def test_insecure_nsec3_optout_delegation(zone_keys: dict[str, PrivKey]) -> None:
    world = make_world(zone_keys)
    result = validate(world, "host.unsigned.optout.test.", "A")
    assert result.status is Status.INSECURE, result.reason
    assert "opt-out" in result.reason


def test_unsupported_algorithm_is_insecure(zone_keys: dict[str, PrivKey]) -> None:
    world = make_world(zone_keys)
    result = validate(world, "host.p384.test.", "A")
    assert result.status is Status.INSECURE, result.reason
    assert "unsupported" in result.reason


def test_no_anchor_is_indeterminate(zone_keys: dict[str, PrivKey]) -> None:
    world = make_world(zone_keys)
    v = Validator(load_trust_anchors(ds_text("elsewhere.", zone_keys["root"], 13)))
    result = drive(v.start("host.example.test.", "A", NOW), world.answer, lambda: NOW)
    assert result.status is Status.INDETERMINATE and "no trust anchor" in result.reason
    assert world.log == []  # nothing it could validate is worth an upstream query


def test_upstream_silence_is_indeterminate(zone_keys: dict[str, PrivKey]) -> None:
    world = make_world(zone_keys)
    v = Validator(load_trust_anchors(world.anchor))
    result = drive(v.start("host.example.test.", "A", NOW), lambda q: None, lambda: NOW)
    assert result.status is Status.INDETERMINATE and "no answer" in result.reason


# --------------------------------------------------------------------------- bogus


def test_bogus_bad_signature(zone_keys: dict[str, PrivKey]) -> None:
    world = make_world(zone_keys)

    def corrupt(q: Query, msg: dns.message.Message) -> dns.message.Message:
        for rrset in msg.answer:
            if rrset.rdtype == T.RRSIG and rrset.covers == T.IPSECKEY:
                rd = rrset[0]
                sig = bytearray(rd.signature)
                sig[5] ^= 0xFF
                rrset.clear()
                rrset.add(rd.replace(signature=bytes(sig)))
        return msg

    world.mutate = corrupt
    result = validate(world, "host.example.test.", "IPSECKEY")
    assert result.status is Status.BOGUS
    assert "does not verify" in result.reason and "host.example.test." in result.reason


def test_bogus_tampered_data(zone_keys: dict[str, PrivKey]) -> None:
    world = make_world(zone_keys)

    def swap(q: Query, msg: dns.message.Message) -> dns.message.Message:
        for rrset in msg.answer:
            if rrset.rdtype == T.A:
                rrset.clear()
                rrset.add(dns.rdata.from_text(IN, T.A, "203.0.113.66"))
        return msg

    world.mutate = swap
    assert validate(world, "host.example.test.", "A").status is Status.BOGUS


@pytest.mark.parametrize(
    ("times", "needle"),
    [
        ({"expiration": NOW - 1000, "inception": NOW - DAY}, "expired"),
        ({"inception": NOW + 1000, "expiration": NOW + DAY}, "not valid before"),
    ],
)
def test_bogus_signature_window(
    zone_keys: dict[str, PrivKey], times: dict[str, float], needle: str
) -> None:
    world = make_world(zone_keys, example=times)
    result = validate(world, "host.example.test.", "IPSECKEY")
    assert result.status is Status.BOGUS
    assert needle in result.reason and "example.test." in result.reason


def test_clock_skew_allowance(zone_keys: dict[str, PrivKey]) -> None:
    world = make_world(zone_keys, example={"inception": NOW + 100})
    assert validate(world, "host.example.test.", "A").status is Status.SECURE


def test_bogus_ds_mismatch(zone_keys: dict[str, PrivKey]) -> None:
    world = make_world(zone_keys, example={"ds_key": zone_keys["rogue"]})
    result = validate(world, "host.example.test.", "IPSECKEY")
    assert result.status is Status.BOGUS
    assert "no DNSKEY matches its DS" in result.reason and "example.test." in result.reason


def test_bogus_key_of_another_zone(zone_keys: dict[str, PrivKey]) -> None:
    """host.example.test data re-signed with test.'s (valid, trusted) key."""
    world = make_world(zone_keys)
    test_zd = ZoneDef("test.", "", zone_keys["test"])

    def resign(q: Query, msg: dns.message.Message) -> dns.message.Message:
        if str(q) == "host.example.test./IPSECKEY":
            data = msg.get_rrset(msg.answer, q.qname, IN, T.IPSECKEY)
            assert data is not None
            msg.answer = [data]
            sig = sign_rrset(data, N("test."), zone_keys["test"], test_zd)
            msg.answer.append(dns.rrset.from_rdata(q.qname, 3600, sig))
        return msg

    world.mutate = resign
    result = validate(world, "host.example.test.", "IPSECKEY")
    assert result.status is Status.BOGUS
    assert "signed by test." in result.reason and "zone example.test." in result.reason


def test_bogus_missing_rrsig(zone_keys: dict[str, PrivKey]) -> None:
    world = make_world(zone_keys)
    world.mutate = strip_records("answer", T.RRSIG, T.IPSECKEY)
    result = validate(world, "host.example.test.", "IPSECKEY")
    assert result.status is Status.BOGUS and "missing RRSIG" in result.reason


def test_bogus_stripped_dnskey(zone_keys: dict[str, PrivKey]) -> None:
    world = make_world(zone_keys)
    world.mutate = strip_records("answer", T.DNSKEY, only="example.test./DNSKEY")
    result = validate(world, "host.example.test.", "IPSECKEY")
    assert result.status is Status.BOGUS and "no DNSKEY set" in result.reason


def test_bogus_stripped_ds_proof(zone_keys: dict[str, PrivKey]) -> None:
    """Removing the DS (to fake an unsigned delegation) is caught."""
    world = make_world(zone_keys)

    def drop_ds(q: Query, msg: dns.message.Message) -> dns.message.Message:
        if str(q) == "example.test./DS":
            msg.answer = []
        return msg

    world.mutate = drop_ds
    result = validate(world, "host.example.test.", "IPSECKEY")
    assert result.status is Status.BOGUS and "unproven" in result.reason


def test_bogus_unsigned_denial(zone_keys: dict[str, PrivKey]) -> None:
    world = make_world(zone_keys)
    world.mutate = strip_records("authority", T.RRSIG, T.NSEC)
    result = validate(world, "host.example.test.", "AAAA")
    assert result.status is Status.BOGUS


def test_bogus_nxdomain_claimed_for_existing_name(zone_keys: dict[str, PrivKey]) -> None:
    world = make_world(zone_keys)

    def fake_nx(q: Query, msg: dns.message.Message) -> dns.message.Message | None:
        if str(q) == "host.example.test./IPSECKEY":
            forged = world.answer(Query(N("nothere.example.test."), T.IPSECKEY))
            assert forged is not None
            forged.question = msg.question
            return forged
        return msg

    world.mutate = fake_nx
    result = validate(world, "host.example.test.", "IPSECKEY")
    assert result.status is Status.BOGUS


# --------------------------------------------------------------------------- anchors


def test_dnskey_trust_anchor(zone_keys: dict[str, PrivKey]) -> None:
    world = make_world(zone_keys)
    key = zone_dnskey(zone_keys["root"], 13)
    v = Validator(load_trust_anchors(f". 0 IN DNSKEY {key.to_text()}\n"))
    result = drive(v.start("host.example.test.", "IPSECKEY", NOW), world.answer, lambda: NOW)
    assert result.status is Status.SECURE, result.reason


def test_sha384_ds_anchor(zone_keys: dict[str, PrivKey]) -> None:
    world = make_world(zone_keys)
    v = Validator(load_trust_anchors(ds_text(".", zone_keys["root"], 13, "SHA384")))
    result = drive(v.start("host.example.test.", "A", NOW), world.answer, lambda: NOW)
    assert result.status is Status.SECURE, result.reason


@pytest.mark.parametrize(
    ("text", "needle"),
    [("", "holds no DS"), (". IN A 192.0.2.1", "only DS and DNSKEY"), ("garbage here", "parse")],
)
def test_bad_trust_anchor_named(text: str, needle: str) -> None:
    with pytest.raises(TrustAnchorError, match=needle):
        load_trust_anchors(text)


# --------------------------------------------------------------------------- fuzz


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_fuzz_mutated_responses_never_raise(base_world: World, data: st.DataObject) -> None:
    """Random byte flips/truncations of real responses: never an exception,
    never SECURE for data that differs from what was signed."""
    world = base_world
    target = data.draw(
        st.sampled_from(
            [
                "host.example.test./IPSECKEY",
                "nothere.n3.test./A",
                "host.example.test./AAAA",
                "www.example.test./IPSECKEY",
            ]
        )
    )
    victim = data.draw(st.integers(0, 7))
    count = [0]

    def mutate_wire(q: Query) -> dns.message.Message | None:
        world.mutate = None
        msg = world.answer(q)
        assert msg is not None
        count[0] += 1
        if count[0] - 1 != victim:
            return msg
        wire = bytearray(msg.to_wire())
        ops = data.draw(
            st.lists(
                st.tuples(st.integers(0, len(wire) - 1), st.integers(1, 255)),
                min_size=1,
                max_size=4,
            )
        )
        for pos, x in ops:
            wire[pos] ^= x
        if data.draw(st.booleans()):
            wire = wire[: data.draw(st.integers(0, len(wire)))]
        try:
            return dns.message.from_wire(bytes(wire))
        except Exception:
            return None  # the driver drops what does not parse, like a timeout

    qname, _, rdtype = target.partition("/")
    v = Validator(load_trust_anchors(world.anchor))
    result = drive(v.start(qname, rdtype, NOW), mutate_wire, lambda: NOW)
    clean = validate(world, qname, rdtype)
    assert "malformed DNS data" not in result.reason, result.reason
    if result.status is Status.SECURE:
        # A flip that survived must not have changed what was proven.
        assert result.rrset == clean.rrset and result.denial == clean.denial
    else:
        assert result.status in (Status.BOGUS, Status.INDETERMINATE), result.reason


@settings(max_examples=100, deadline=None)
@given(blob=st.binary(min_size=0, max_size=300))
def test_fuzz_random_bytes_never_raise(blob: bytes) -> None:
    anchors = load_trust_anchors(". 0 IN DS 12345 13 2 " + "00" * 32)
    v = Validator(anchors)
    validation = v.start("host.example.test.", "IPSECKEY", NOW)
    try:
        msg: dns.message.Message | None = dns.message.from_wire(blob)
    except Exception:
        msg = None
    result = validation.feed(msg, NOW)
    assert isinstance(result, Result)
    assert result.status in (Status.BOGUS, Status.INDETERMINATE)


def test_nsec3_iterations_above_limit_is_insecure(zone_keys: dict[str, PrivKey]) -> None:
    """RFC 9276: a denial that costs too many hash iterations proves nothing."""
    world = make_world(zone_keys, n3={"iterations": 200})
    result = validate(world, "host.n3.test.", "IPSECKEY")
    assert result.status is Status.INSECURE, result.reason
    assert "iterations 200" in result.reason
    # The cut below n3.test cannot be disproven cheaply, so its data is insecure too.
    assert validate(world, "host.n3.test.", "A").status is Status.INSECURE


# --------------------------------------------------------------------------- work bounds (KeyTrap)

EX = N("example.test.")
HOST = N("host.example.test.")


@pytest.fixture
def pk_ops(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts public-key operations where they are performed, one per (RRSIG, DNSKEY)."""
    count = [0]
    real = dnssec_crypto._verify

    def counting(algorithm: int, blob: bytes, sig: bytes, data: bytes) -> None:
        count[0] += 1
        real(algorithm, blob, sig, data)

    monkeypatch.setattr(dnssec_crypto, "_verify", counting)
    return count


def colliding_rsa_keys(modulus: int, count: int) -> list[Any]:
    """`count` RSA zone keys (algorithm 8) sharing one key tag, as a KeyTrap zone has.

    The key tag (RFC 4034 appendix B) adds rdata bytes at even offsets as high and at
    odd offsets as low bytes; the 4-byte exponent sits at offsets 5-8, so exponents
    whose bytes keep e0 + e2 and e1 + e3 constant share the tag. Each key is a real
    RSA key: checking a signature with it costs a modular exponentiation.
    """
    out: list[Any] = []
    for e0 in range(1, 0x80):
        for e3 in range(1, 0x80, 2):
            exponent = bytes([e0, 0x81 - e3, 0x80 - e0, e3])
            key = bytes([4]) + exponent + modulus.to_bytes(256, "big")
            out.append(dns.rdata.from_wire(IN, T.DNSKEY, b"\x01\x00\x03\x08" + key, 0, 260 + 4))
            if len(out) == count:
                assert len({dns.dnssec.key_id(k) for k in out}) == 1
                return out
    raise ValueError(count)


def _resign(
    msg: dns.message.Message,
    section: Any,
    owner: dns.name.Name,
    rdtype: int,
    key: PrivKey,
    signer: dns.name.Name,
    alg: int,
) -> dns.rrset.RRset:
    """Re-sign owner/rdtype in `section` with `key` (the zone owner publishing its own data)."""
    rrset = msg.find_rrset(section, owner, IN, rdtype)
    section[:] = [r for r in section if not (r.rdtype == T.RRSIG and r.covers == rdtype)]
    sig = dns.dnssec.sign(
        rrset, key, signer, zone_dnskey(key, alg), inception=NOW - DAY, expiration=NOW + DAY
    )
    section.append(dns.rrset.from_rdata(owner, 3600, sig))
    return rrset


def keytrap_world(zone_keys: dict[str, PrivKey], n_keys: int, n_sigs: int) -> World:
    """example.test (its owner is the attacker) publishes `n_keys` DNSKEYs with one key tag
    and answers host.example.test/A with `n_sigs` RRSIGs naming that tag, none valid.
    n_keys 0: the RRSIGs name the zone's real key (a signature flood on one key)."""
    world = make_world(zone_keys, ex_alg=8)
    ksk = zone_keys["ex8"]
    colliding = colliding_rsa_keys(ksk.public_key().public_numbers().n, n_keys) if n_keys else []
    tag = dns.dnssec.key_id(colliding[0] if colliding else zone_dnskey(ksk, 8))

    def mutate(q: Query, msg: dns.message.Message) -> dns.message.Message:
        if q.qname == EX and q.rdtype == T.DNSKEY and colliding:
            rrset = msg.find_rrset(msg.answer, EX, IN, T.DNSKEY)
            for k in colliding:
                rrset.add(k)
            _resign(msg, msg.answer, EX, T.DNSKEY, ksk, EX, 8)
        if q.qname == HOST and q.rdtype == T.A:
            sigs = msg.find_rrset(msg.answer, HOST, IN, T.RRSIG, T.A)
            real = next(iter(sigs))
            sigs.clear()
            for i in range(n_sigs):
                junk = bytearray(real.signature)
                junk[-2:] = i.to_bytes(2, "big")
                sigs.add(real.replace(key_tag=tag, signature=bytes(junk)))
        msg.request_payload = 65535
        return msg

    world.mutate = mutate
    return world


#: Successful checks on the way to host.example.test's answer: DNSKEY of ., DS and DNSKEY
#: of test. and example.test., the NSEC denying a DS at host.example.test.
CHAIN_CHECKS = 6


@pytest.mark.parametrize(
    ("n_keys", "n_sigs", "before"),
    [(64, 64, 64 * 64), (4, 64, 4 * 64), (0, 200, 200)],
    ids=["keys-and-signatures", "tag-limit-keys", "signature-flood"],
)
def test_keytrap_zone_ends_bogus_within_the_work_bound(
    zone_keys: dict[str, PrivKey], pk_ops: list[int], n_keys: int, n_sigs: int, before: int
) -> None:
    """Issue 11.1: `before` public-key operations before the bound; now a few, then BOGUS."""
    world = keytrap_world(zone_keys, n_keys, n_sigs)
    result = validate(world, "host.example.test.", "A")
    assert result.status is Status.BOGUS and result.limited, result.reason
    assert "validation work limit" in result.reason
    assert result.sig_checks == pk_ops[0]
    assert pk_ops[0] <= CHAIN_CHECKS + MAX_SIGNATURE_FAILURES < before


@pytest.mark.parametrize("signed", [False, True], ids=["bogus-junk", "signed-junk"])
def test_junk_denial_records_are_bounded_per_validation(
    zone_keys: dict[str, PrivKey], pk_ops: list[int], signed: bool
) -> None:
    """Many NSEC RRsets in one denial (signed by the zone or not) cost at most the bound."""
    world = make_world(zone_keys)
    zone = world.zones[EX]
    junk: list[dns.rrset.RRset] = []
    for i in range(100):
        owner = N(f"junk{i:03d}.example.test.")
        rd = dns.rdata.from_text(IN, T.NSEC, f"junk{i:03d}a.example.test. A RRSIG NSEC")
        rrset = dns.rrset.from_rdata(owner, 300, rd)
        key = zone_keys["ex13"] if signed else zone_keys["rogue"]
        sig = dns.dnssec.sign(
            rrset,
            key,
            EX,
            zone_dnskey(zone_keys["ex13"], 13),
            inception=NOW - DAY,
            expiration=NOW + DAY,
        )
        junk += [rrset, dns.rrset.from_rdata(owner, 300, sig)]
    assert zone is not None

    def mutate(q: Query, msg: dns.message.Message) -> dns.message.Message:
        if str(q) == "host.example.test./AAAA":
            msg.authority[:0] = junk
            msg.request_payload = 65535
        return msg

    world.mutate = mutate
    result = validate(world, "host.example.test.", "AAAA")
    assert result.status is Status.BOGUS and result.limited, result.reason
    assert result.sig_checks == pk_ops[0]
    bound = MAX_SIGNATURE_CHECKS if signed else CHAIN_CHECKS + MAX_SIGNATURE_FAILURES
    assert pk_ops[0] <= bound < 100


@pytest.mark.parametrize(
    ("n_keys", "status"), [(4, Status.SECURE), (64, Status.BOGUS)], ids=["4-keys", "64-keys"]
)
def test_ds_digests_are_bounded_by_keys_not_ds_times_keys(
    zone_keys: dict[str, PrivKey], monkeypatch: pytest.MonkeyPatch, n_keys: int, status: Status
) -> None:
    """300 DS records with the colliding keys' tag: each key hashed at most once per digest
    type (before: once per DS and key); past MAX_KEYS_PER_TAG keys the DS step is BOGUS."""
    world = make_world(zone_keys, ex_alg=8)
    colliding = colliding_rsa_keys(zone_keys["ex8"].public_key().public_numbers().n, n_keys)
    tag = dns.dnssec.key_id(colliding[0])

    def mutate(q: Query, msg: dns.message.Message) -> dns.message.Message:
        if q.qname == EX and q.rdtype == T.DNSKEY:
            rrset = msg.find_rrset(msg.answer, EX, IN, T.DNSKEY)
            for k in colliding:
                rrset.add(k)
            _resign(msg, msg.answer, EX, T.DNSKEY, zone_keys["ex8"], EX, 8)
        if q.qname == EX and q.rdtype == T.DS:
            rrset = msg.find_rrset(msg.answer, EX, IN, T.DS)
            for i in range(300):
                rrset.add(dns.rdata.from_text(IN, T.DS, f"{tag} 8 2 {i:064x}"))
            _resign(msg, msg.answer, EX, T.DS, zone_keys["test"], N("test."), 13)
        msg.request_payload = 65535
        return msg

    world.mutate = mutate
    digests = [0]
    real = dnssec_sigs.ds_digest

    def counting(*args: Any, **kw: Any) -> Any:
        digests[0] += 1
        return real(*args, **kw)

    monkeypatch.setattr(dnssec_sigs, "ds_digest", counting)
    result = validate(world, "host.example.test.", "A")
    assert result.status is status, result.reason
    assert result.limited == (status is Status.BOGUS)
    # ., test. and example.test.'s own KSK once each, plus each colliding key once
    assert digests[0] <= 3 + min(n_keys, MAX_KEYS_PER_TAG) < 300


@pytest.mark.parametrize(
    ("name", "rdtype"),
    [
        ("host.example.test.", "IPSECKEY"),
        ("host.example.test.", "AAAA"),
        ("nothere.n3.test.", "A"),
        ("x.wild.example.test.", "A"),
        ("www.example.test.", "IPSECKEY"),
    ],
)
def test_honest_validations_stay_far_below_the_bound(
    zone_keys: dict[str, PrivKey], pk_ops: list[int], name: str, rdtype: str
) -> None:
    result = validate(make_world(zone_keys), name, rdtype)
    assert result.status is Status.SECURE and not result.limited, result.reason
    assert result.sig_checks == pk_ops[0] <= 16 < MAX_SIGNATURE_CHECKS


# ---------------------------------------------------------------- wildcards (RFC 4035 5.3.4)

#: *.wild has an empty non-terminal ent.wild beside it (b.ent.wild exists); *.cw likewise.
WILD_TEXT = (
    "ns 3600 IN A 192.0.2.53\n"
    "host 3600 IN A 192.0.2.10\n"
    "*.wild 3600 IN A 192.0.2.14\n"
    "b.ent.wild 3600 IN A 192.0.2.15\n"
    "*.cw 3600 IN CNAME host.example.test.\n"
    "b.ent.cw 3600 IN A 192.0.2.16\n"
)


def _forge_wildcard(world: World, qname: str, wildcard: str, rdtype: int) -> None:
    """An attacker replays `wildcard`'s signed records as an answer for `qname`, with the
    signed NSEC (or NSEC3) that covers `qname`: all genuine data, but the wrong proof."""
    zone = world.zone_for(N(qname), False)
    name, wild = N(qname), N(wildcard)
    nsec3 = zone.get_rdataset(zone.origin, T.NSEC3PARAM) is not None

    def mutate(q: Query, msg: dns.message.Message) -> dns.message.Message:
        if q.qname != name or q.rdtype != T.A:
            return msg
        forged = dns.message.make_response(dns.message.make_query(name, T.A, want_dnssec=True))
        forged.flags |= dns.flags.CD
        World._add(forged, forged.answer, zone, wild, rdtype, as_name=name)
        if rdtype == T.CNAME:  # the CNAME's target, honestly signed
            World._add(forged, forged.answer, zone, N("host.example.test."), T.A)
        if nsec3:
            owner = world._nsec3_for(zone, name, False)
            World._add(forged, forged.authority, zone, owner, T.NSEC3)
        else:
            World._add(forged, forged.authority, zone, world._nsec_for(zone, name, False), T.NSEC)
        return forged

    world.mutate = mutate


@pytest.mark.parametrize(
    ("qname", "wildcard", "rdtype", "honest"),
    [
        ("x.ent.wild.example.test.", "*.wild.example.test.", T.A, Denial.NXDOMAIN),
        ("ent.wild.example.test.", "*.wild.example.test.", T.A, Denial.NODATA),
        ("x.ent.cw.example.test.", "*.cw.example.test.", T.CNAME, Denial.NXDOMAIN),
        ("x.ent.wild.n3.test.", "*.wild.n3.test.", T.A, Denial.NXDOMAIN),
    ],
    ids=["below-ent", "at-ent", "cname-below-ent", "nsec3-below-ent"],
)
def test_wildcard_answer_needs_its_parent_as_closest_encloser(
    zone_keys: dict[str, PrivKey], qname: str, wildcard: str, rdtype: int, honest: Denial
) -> None:
    """Issue 11.2: a wildcard expansion for a name under (or at) an empty non-terminal is
    BOGUS; the honest answer is a denial. (NSEC3 already got this right.)"""
    world = make_world(zone_keys, example={"text": WILD_TEXT}, n3={"text": WILD_TEXT})
    truth = validate(world, qname, "A")
    assert truth.status is Status.SECURE and truth.denial is honest, truth.reason
    _forge_wildcard(world, qname, wildcard, rdtype)
    result = validate(world, qname, "A")
    assert result.status is Status.BOGUS, result.reason
    assert "wildcard" in result.reason and "closer" in result.reason
    if rdtype == T.A:  # a genuine expansion next to it still validates
        world.mutate = None
        sibling = validate(world, wildcard.replace("*", "y"), "A")
        assert sibling.status is Status.SECURE and "wildcard" in sibling.reason, sibling.reason
