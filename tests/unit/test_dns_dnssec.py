"""The sans-IO DNSSEC validator against signed zones built in memory.

Each test builds a root -> test. -> example.test. hierarchy (plus siblings),
signs it with keys generated here (dnspython's sign_zone for NSEC zones, a small
NSEC3 signer below for NSEC3 zones), and answers the validator's queries with
`World.answer`: a tiny resolver-with-CD=1 stand-in that serves those zones the
way a recursive upstream would (DS from the parent, CNAMEs chased, NSEC/NSEC3
proofs in the authority section). This is the unit tier of the core; the host
tier runs the same cases against knot.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from dataclasses import dataclass, field
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
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from dns.rdtypes.ANY.NSEC3 import NSEC3, Bitmap
from dns.rdtypes.ANY.NSEC3PARAM import NSEC3PARAM
from hypothesis import given, settings
from hypothesis import strategies as st

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

N = dns.name.from_text
NOW = 1_800_000_000.0
DAY = 86400
IN = dns.rdataclass.IN
T = dns.rdatatype

PrivKey = Any


def _keygen(alg: int) -> PrivKey:
    if alg == 8:
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if alg == 13:
        return ec.generate_private_key(ec.SECP256R1())
    if alg == 14:
        return ec.generate_private_key(ec.SECP384R1())
    if alg == 15:
        return ed25519.Ed25519PrivateKey.generate()
    raise ValueError(alg)


@pytest.fixture(scope="module")
def keys() -> dict[str, PrivKey]:
    """Keys are generated once per module run (RSA generation is slow)."""
    return {
        "root": _keygen(13),
        "test": _keygen(13),
        "ex8": _keygen(8),
        "ex13": _keygen(13),
        "ex15": _keygen(15),
        "other": _keygen(15),
        "n3": _keygen(13),
        "rogue": _keygen(13),
        "p384": _keygen(14),
    }


@dataclass
class ZoneDef:
    origin: str
    text: str  #: records, zone-file syntax, relative to origin
    key: PrivKey | None  #: None: unsigned zone
    alg: int = 13
    nsec3: bool = False
    optout: bool = False
    iterations: int = 0
    inception: float = NOW - DAY
    expiration: float = NOW + 30 * DAY
    ds_in_parent: bool = True
    ds_key: PrivKey | None = None  #: sign the DS with a different key (DS mismatch)


def _dnskey(key: PrivKey, alg: int) -> Any:
    return dns.dnssec.make_dnskey(key.public_key(), alg, flags=257)


def _sign_rrset(rrset: dns.rrset.RRset, origin: dns.name.Name, key: PrivKey, zd: ZoneDef) -> Any:
    return dns.dnssec.sign(
        rrset,
        key,
        origin,
        _dnskey(key, zd.alg),
        inception=zd.inception,
        expiration=zd.expiration,
    )


def _hash(name: dns.name.Name, iterations: int) -> str:
    return dns.dnssec.nsec3_hash(name, b"\xab\xcd", iterations, 1).lower()


def _sign_nsec3(zone: dns.zone.Zone, zd: ZoneDef) -> None:
    """NSEC3 signer (dnspython's sign_zone does not do NSEC3 yet)."""
    origin = zone.origin
    assert origin is not None and zd.key is not None
    dnskey = _dnskey(zd.key, zd.alg)
    with zone.writer() as txn:
        txn.add(origin, 3600, dnskey)
        txn.add(
            origin,
            0,
            NSEC3PARAM(IN, T.NSEC3PARAM, 1, 0, zd.iterations, b"\xab\xcd"),
        )
    names = sorted(zone.nodes.keys())
    absolute = [n.derelativize(origin) for n in names]
    delegations = {n for n in absolute if n != origin and zone.get_rdataset(n, T.NS) is not None}

    def below_cut(n: dns.name.Name) -> bool:
        return any(n.is_subdomain(d) and n != d for d in delegations)

    chain: dict[dns.name.Name, set[int]] = {}
    with zone.writer() as txn:
        for name in absolute:
            if below_cut(name):
                continue
            node = zone.get_node(name)
            assert node is not None
            signed = False
            for rds in list(node.rdatasets):
                if name in delegations and rds.rdtype != T.DS:
                    continue
                rrset = dns.rrset.from_rdata_list(name, rds.ttl, list(rds))
                txn.add(name, rds.ttl, _sign_rrset(rrset, origin, zd.key, zd))
                signed = True
            types = {rds.rdtype for rds in node.rdatasets}
            if signed:
                types.add(T.RRSIG)
            insecure_cut = name in delegations and T.DS not in types
            if zd.optout and insecure_cut:
                continue
            chain[name] = types
            parent = name.parent()
            while parent != origin and parent.is_subdomain(origin):
                chain.setdefault(parent, set())
                parent = parent.parent()
    hashed = sorted((_hash(n, zd.iterations), types) for n, types in chain.items())
    with zone.writer() as txn:
        for i, (h, types) in enumerate(hashed):
            nxt = hashed[(i + 1) % len(hashed)][0]
            rd = NSEC3(
                IN,
                T.NSEC3,
                1,
                1 if zd.optout else 0,
                zd.iterations,
                b"\xab\xcd",
                base64.b32hexdecode(nxt.upper()),
                Bitmap.from_rdtypes(sorted(types)),
            )
            owner = dns.name.Name((h.encode(), *origin.labels))
            rrset = dns.rrset.from_rdata(owner, 3600, rd)
            txn.add(owner, 3600, rd)
            txn.add(owner, 3600, _sign_rrset(rrset, origin, zd.key, zd))


def build_zone(zd: ZoneDef) -> dns.zone.Zone:
    origin = N(zd.origin)
    head = "@ 3600 IN SOA ns host 1 3600 600 86400 300\n@ 3600 IN NS ns\n"
    zone = dns.zone.from_text(head + zd.text, origin=origin, relativize=False)
    if zd.key is None:
        return zone
    if zd.nsec3:
        _sign_nsec3(zone, zd)
    else:
        dns.dnssec.sign_zone(
            zone,
            keys=[(zd.key, _dnskey(zd.key, zd.alg))],
            inception=zd.inception,
            expiration=zd.expiration,
        )
    return zone


def ds_text(name: str, key: PrivKey, alg: int, digest: str = "SHA256") -> str:
    ds = dns.dnssec.make_ds(N(name), _dnskey(key, alg), digest)
    return f"{name} 3600 IN DS {ds.to_text()}\n"


@dataclass
class World:
    """Signed zones plus a resolver-like answer function over them."""

    zones: dict[dns.name.Name, dns.zone.Zone]
    anchor: str
    mutate: Callable[[Query, dns.message.Message], dns.message.Message | None] | None = None
    log: list[Query] = field(default_factory=list)

    def zone_for(self, name: dns.name.Name, for_ds: bool) -> dns.zone.Zone:
        best: dns.zone.Zone | None = None
        for origin, zone in self.zones.items():
            if not name.is_subdomain(origin):
                continue
            if for_ds and origin == name and origin != dns.name.root:
                continue
            if best is None or len(origin) > len(best.origin or dns.name.root):
                best = zone
        assert best is not None
        return best

    def answer(self, q: Query) -> dns.message.Message | None:
        self.log.append(q)
        query = dns.message.make_query(q.qname, q.rdtype, want_dnssec=True)
        query.flags |= dns.flags.CD
        msg = dns.message.make_response(query)
        name = q.qname
        for _ in range(10):
            zone = self.zone_for(name, q.rdtype == T.DS)
            target = self._lookup(msg, zone, name, q.rdtype)
            if target is None:
                break
            name = target
        out: dns.message.Message | None = msg
        if self.mutate is not None:
            out = self.mutate(q, msg)
        # Through the wire, as from a socket (also drops dnspython's lookup index).
        return None if out is None else dns.message.from_wire(out.to_wire())

    @staticmethod
    def _add(
        msg: dns.message.Message,
        section: Any,
        zone: dns.zone.Zone,
        owner: Any,
        rdtype: int,
        as_name: dns.name.Name | None = None,
    ) -> bool:
        rds = zone.get_rdataset(owner, rdtype)
        if rds is None:
            return False
        name = as_name or owner
        msg.find_rrset(section, name, IN, rdtype, create=True).update(rds)
        sigs = zone.get_rdataset(owner, T.RRSIG, covers=rdtype)
        if sigs is not None:
            msg.find_rrset(section, name, IN, T.RRSIG, rdtype, create=True).update(sigs)
        return True

    def _lookup(
        self, msg: dns.message.Message, zone: dns.zone.Zone, name: dns.name.Name, rdtype: int
    ) -> dns.name.Name | None:
        origin = zone.origin
        assert origin is not None
        node = zone.get_node(name)
        if node is not None:
            if self._add(msg, msg.answer, zone, name, rdtype):
                return None
            cname = zone.get_rdataset(name, T.CNAME)
            if cname is not None and rdtype != T.CNAME:
                self._add(msg, msg.answer, zone, name, T.CNAME)
                return cname[0].target  # type: ignore[no-any-return]
            self._negative(msg, zone, name, nodata=True)
            return None
        ent = any(n.derelativize(origin).is_subdomain(name) for n in zone.nodes)
        if ent:
            self._negative(msg, zone, name, nodata=True)
            return None
        # wildcard
        ce = self._closest_encloser(zone, name)
        wild = dns.name.Name((b"*", *ce.labels))
        if zone.get_node(wild) is not None:
            if self._add(msg, msg.answer, zone, wild, rdtype, as_name=name):
                self._cover(msg, zone, name, ce)
                return None
            self._wild_nodata(msg, zone, name, ce, wild)
            return None
        msg.set_rcode(dns.rcode.NXDOMAIN)
        self._negative(msg, zone, name, nodata=False)
        return None

    @staticmethod
    def _closest_encloser(zone: dns.zone.Zone, name: dns.name.Name) -> dns.name.Name:
        assert zone.origin is not None
        cand = name.parent()
        while cand != zone.origin:
            if zone.get_node(cand) is not None or any(
                n.derelativize(zone.origin).is_subdomain(cand) for n in zone.nodes
            ):
                return cand
            cand = cand.parent()
        return cand

    def _nsec_for(self, zone: dns.zone.Zone, name: dns.name.Name, match: bool) -> Any:
        assert zone.origin is not None
        best = None
        for owner in sorted(n.derelativize(zone.origin) for n in zone.nodes):
            rds = zone.get_rdataset(owner, T.NSEC)
            if rds is None:
                continue
            if match and owner == name:
                return owner
            if not match and owner < name:
                best = owner
        if not match and best is None:  # wrap-around: the last NSEC covers it
            best = max(
                n.derelativize(zone.origin)
                for n in zone.nodes
                if zone.get_rdataset(n, T.NSEC) is not None
            )
        return best

    def _nsec3_for(self, zone: dns.zone.Zone, name: dns.name.Name, match: bool) -> Any:
        assert zone.origin is not None
        param = zone.get_rdataset(zone.origin, T.NSEC3PARAM)
        assert param is not None
        h = _hash(name, param[0].iterations)
        owners = sorted(
            n.derelativize(zone.origin)
            for n in zone.nodes
            if zone.get_rdataset(n, T.NSEC3) is not None
        )
        labels = [o.labels[0].decode().lower() for o in owners]
        if match:
            return owners[labels.index(h)] if h in labels else None
        prev = [o for o, lab in zip(owners, labels, strict=True) if lab < h]
        return prev[-1] if prev else owners[-1]

    def _cover(
        self, msg: dns.message.Message, zone: dns.zone.Zone, name: dns.name.Name, ce: dns.name.Name
    ) -> None:
        assert zone.origin is not None
        if zone.get_rdataset(zone.origin, T.NSEC3PARAM) is not None:
            nearer = dns.name.Name(name.labels[len(name.labels) - len(ce) - 1 :])
            self._add(msg, msg.authority, zone, self._nsec3_for(zone, nearer, False), T.NSEC3)
        elif zone.get_rdataset(zone.origin, T.DNSKEY) is not None:
            self._add(msg, msg.authority, zone, self._nsec_for(zone, name, False), T.NSEC)

    def _wild_nodata(
        self,
        msg: dns.message.Message,
        zone: dns.zone.Zone,
        name: dns.name.Name,
        ce: dns.name.Name,
        wild: dns.name.Name,
    ) -> None:
        assert zone.origin is not None
        self._add(msg, msg.authority, zone, zone.origin, T.SOA)
        if zone.get_rdataset(zone.origin, T.NSEC3PARAM) is not None:
            self._add(msg, msg.authority, zone, self._nsec3_for(zone, ce, True), T.NSEC3)
            self._cover(msg, zone, name, ce)
            self._add(msg, msg.authority, zone, self._nsec3_for(zone, wild, True), T.NSEC3)
        else:
            self._add(msg, msg.authority, zone, self._nsec_for(zone, name, False), T.NSEC)
            self._add(msg, msg.authority, zone, self._nsec_for(zone, wild, True), T.NSEC)

    def _negative(
        self, msg: dns.message.Message, zone: dns.zone.Zone, name: dns.name.Name, nodata: bool
    ) -> None:
        assert zone.origin is not None
        self._add(msg, msg.authority, zone, zone.origin, T.SOA)
        if zone.get_rdataset(zone.origin, T.DNSKEY) is None:
            return
        nsec3 = zone.get_rdataset(zone.origin, T.NSEC3PARAM) is not None
        if nodata:
            if nsec3:
                owner = self._nsec3_for(zone, name, True)
                if owner is not None:
                    self._add(msg, msg.authority, zone, owner, T.NSEC3)
                    return
                ce = self._closest_encloser(zone, name)  # opt-out delegation
                self._add(msg, msg.authority, zone, self._nsec3_for(zone, ce, True), T.NSEC3)
                self._cover(msg, zone, name, ce)
                return
            owner = self._nsec_for(zone, name, True) or self._nsec_for(zone, name, False)
            self._add(msg, msg.authority, zone, owner, T.NSEC)
            return
        ce = self._closest_encloser(zone, name)
        wild = dns.name.Name((b"*", *ce.labels))
        if nsec3:
            self._add(msg, msg.authority, zone, self._nsec3_for(zone, ce, True), T.NSEC3)
            self._cover(msg, zone, name, ce)
            self._add(msg, msg.authority, zone, self._nsec3_for(zone, wild, False), T.NSEC3)
        else:
            self._add(msg, msg.authority, zone, self._nsec_for(zone, name, False), T.NSEC)
            self._add(msg, msg.authority, zone, self._nsec_for(zone, wild, False), T.NSEC)


def make_world(keys: dict[str, PrivKey], **over: Any) -> World:
    """root -> test. -> {example, other, n3, optout, insecure, p384}.test."""
    ex_alg = over.pop("ex_alg", 13)
    ex_key = keys[{8: "ex8", 13: "ex13", 15: "ex15"}[ex_alg]]
    ipseckey_raw = base64.b64encode(
        keys["other"]
        .public_key()
        .public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    ).decode()
    defs = {
        "example": ZoneDef(
            "example.test.",
            "ns 3600 IN A 192.0.2.53\n"
            "host 3600 IN A 192.0.2.10\nhost 3600 IN A 192.0.2.11\n"
            f"host 3600 IN IPSECKEY 10 0 4 . {ipseckey_raw}\n"
            "nokey 3600 IN A 192.0.2.12\n"
            "www 3600 IN CNAME host.other.test.\n"
            "a.deep 3600 IN A 192.0.2.13\n"
            "*.wild 3600 IN A 192.0.2.14\n",
            ex_key,
            alg=ex_alg,
        ),
        "other": ZoneDef(
            "other.test.",
            "ns 3600 IN A 192.0.2.53\nhost 3600 IN A 192.0.2.20\n"
            f"host 3600 IN IPSECKEY 5 1 4 192.0.2.99 {ipseckey_raw}\n",
            keys["other"],
            alg=15,
        ),
        "n3": ZoneDef(
            "n3.test.",
            "ns 3600 IN A 192.0.2.53\nhost 3600 IN A 192.0.2.30\n"
            "a.deep 3600 IN A 192.0.2.31\n"
            "*.wild 3600 IN A 192.0.2.32\n",
            keys["n3"],
            nsec3=True,
        ),
        "optout": ZoneDef(
            "optout.test.",
            "ns 3600 IN A 192.0.2.53\nhost 3600 IN A 192.0.2.40\n"
            "unsigned 3600 IN NS ns.unsigned\nns.unsigned 3600 IN A 192.0.2.41\n",
            keys["n3"],
            nsec3=True,
            optout=True,
        ),
        "unsignedoptout": ZoneDef(
            "unsigned.optout.test.", "host 3600 IN A 192.0.2.42\n", None, ds_in_parent=False
        ),
        "insecure": ZoneDef(
            "insecure.test.", "host 3600 IN A 192.0.2.50\n", None, ds_in_parent=False
        ),
        "p384": ZoneDef("p384.test.", "host 3600 IN A 192.0.2.60\n", keys["p384"], alg=14),
    }
    for name, value in over.items():
        for attr, v in value.items():
            setattr(defs[name], attr, v)
    test_text = "ns 3600 IN A 192.0.2.53\n"
    for zd in defs.values():
        if zd.origin.count(".") != 2:
            continue
        rel = zd.origin.split(".")[0]
        test_text += f"{rel} 3600 IN NS ns.{zd.origin}\n"
        if zd.key is not None and zd.ds_in_parent:
            test_text += ds_text(zd.origin, zd.ds_key or zd.key, zd.alg).replace(zd.origin, rel, 1)
    root = ZoneDef(
        ".", "test. 3600 IN NS ns.test.\n" + ds_text("test.", keys["test"], 13), keys["root"]
    )
    test = ZoneDef("test.", test_text, keys["test"])
    optout_def = defs["optout"]
    optout_def.text += ""  # the unsigned child is delegated in the zone text above
    zones = {N(zd.origin): build_zone(zd) for zd in (root, test, *defs.values())}
    anchor = ds_text(".", keys["root"], 13)
    return World(zones=zones, anchor=anchor)


def validate(
    world: World, qname: str, rdtype: str, now: float = NOW, validator: Validator | None = None
) -> Result:
    v = validator or Validator(load_trust_anchors(world.anchor))
    return drive(v.start(qname, rdtype, now), world.answer, lambda: now)


# --------------------------------------------------------------------------- secure answers


@pytest.mark.parametrize("alg", [8, 13, 15])
def test_secure_ipseckey_each_algorithm(keys: dict[str, PrivKey], alg: int) -> None:
    world = make_world(keys, ex_alg=alg)
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


def test_multiple_a_records_and_cache_hits(keys: dict[str, PrivKey]) -> None:
    world = make_world(keys)
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


def test_ttl_clamped_to_signature_expiry(keys: dict[str, PrivKey]) -> None:
    world = make_world(keys, example={"expiration": NOW + 100})
    result = validate(world, "host.example.test.", "A")
    assert result.status is Status.SECURE
    assert result.ttl == 100


def test_cname_chain_across_zones(keys: dict[str, PrivKey]) -> None:
    world = make_world(keys)
    result = validate(world, "www.example.test.", "IPSECKEY")
    assert result.status is Status.SECURE, result.reason
    assert [c.name for c in result.cnames] == [N("www.example.test.")]
    assert result.rrset is not None and result.rrset.name == N("host.other.test.")
    assert result.zone == N("other.test.")
    keyset = interpret_rrset(result.rrset, owner=result.qname)
    assert keyset.best is not None and keyset.best.owner == N("www.example.test.")
    assert len(keyset.warnings) == 1 and keyset.warnings[0].gateway == "192.0.2.99"


def test_wildcard_answer_with_proof(keys: dict[str, PrivKey]) -> None:
    world = make_world(keys)
    for name in ("x.wild.example.test.", "x.wild.n3.test."):
        result = validate(world, name, "A")
        assert result.status is Status.SECURE, result.reason
        assert "wildcard" in result.reason


# --------------------------------------------------------------------------- denials


@pytest.mark.parametrize("zone", ["example", "n3"])
def test_secure_nodata(keys: dict[str, PrivKey], zone: str) -> None:
    world = make_world(keys)
    result = validate(world, f"host.{zone}.test.", "IPSECKEY" if zone == "n3" else "AAAA")
    assert result.status is Status.SECURE, result.reason
    assert result.denial is Denial.NODATA and result.rrset is None
    assert ("NSEC3" in result.reason) == (zone == "n3")


@pytest.mark.parametrize("zone", ["example", "n3"])
def test_secure_nodata_empty_non_terminal(keys: dict[str, PrivKey], zone: str) -> None:
    world = make_world(keys)
    result = validate(world, f"deep.{zone}.test.", "IPSECKEY")
    assert result.status is Status.SECURE, result.reason
    assert result.denial is Denial.NODATA


@pytest.mark.parametrize("zone", ["example", "n3"])
def test_secure_nxdomain(keys: dict[str, PrivKey], zone: str) -> None:
    world = make_world(keys)
    result = validate(world, f"nothere.{zone}.test.", "IPSECKEY")
    assert result.status is Status.SECURE, result.reason
    assert result.denial is Denial.NXDOMAIN


def test_nxdomain_of_cname_target(keys: dict[str, PrivKey]) -> None:
    world = make_world(
        keys, example={"text": "ns 3600 IN A 192.0.2.53\ndangling 3600 IN CNAME gone.n3.test.\n"}
    )
    result = validate(world, "dangling.example.test.", "A")
    assert result.status is Status.SECURE, result.reason
    assert result.denial is Denial.NXDOMAIN and len(result.cnames) == 1


# --------------------------------------------------------------------------- insecure


def test_insecure_delegation(keys: dict[str, PrivKey]) -> None:
    world = make_world(keys)
    result = validate(world, "host.insecure.test.", "A")
    assert result.status is Status.INSECURE, result.reason
    assert result.zone == N("insecure.test.")
    assert "unsigned delegation" in result.reason
    nodata = validate(world, "host.insecure.test.", "IPSECKEY")
    assert nodata.status is Status.INSECURE and nodata.denial is Denial.NODATA


def test_insecure_nsec3_optout_delegation(keys: dict[str, PrivKey]) -> None:
    world = make_world(keys)
    result = validate(world, "host.unsigned.optout.test.", "A")
    assert result.status is Status.INSECURE, result.reason
    assert "opt-out" in result.reason


def test_unsupported_algorithm_is_insecure(keys: dict[str, PrivKey]) -> None:
    world = make_world(keys)
    result = validate(world, "host.p384.test.", "A")
    assert result.status is Status.INSECURE, result.reason
    assert "unsupported" in result.reason


def test_no_anchor_is_indeterminate(keys: dict[str, PrivKey]) -> None:
    world = make_world(keys)
    v = Validator(load_trust_anchors(ds_text("elsewhere.", keys["root"], 13)))
    result = drive(v.start("host.example.test.", "A", NOW), world.answer, lambda: NOW)
    assert result.status is Status.INDETERMINATE and "no trust anchor" in result.reason
    assert world.log == []  # nothing it could validate is worth an upstream query


def test_upstream_silence_is_indeterminate(keys: dict[str, PrivKey]) -> None:
    world = make_world(keys)
    v = Validator(load_trust_anchors(world.anchor))
    result = drive(v.start("host.example.test.", "A", NOW), lambda q: None, lambda: NOW)
    assert result.status is Status.INDETERMINATE and "no answer" in result.reason


# --------------------------------------------------------------------------- bogus


def _strip(
    section: str, rdtype: int, covers: int = 0, only: str | None = None
) -> Callable[[Query, dns.message.Message], dns.message.Message]:
    def mutate(q: Query, msg: dns.message.Message) -> dns.message.Message:
        if only is None or str(q) == only:
            sec = getattr(msg, section)
            sec[:] = [r for r in sec if not (r.rdtype == rdtype and r.covers == covers)]
        return msg

    return mutate


def test_bogus_bad_signature(keys: dict[str, PrivKey]) -> None:
    world = make_world(keys)

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


def test_bogus_tampered_data(keys: dict[str, PrivKey]) -> None:
    world = make_world(keys)

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
    keys: dict[str, PrivKey], times: dict[str, float], needle: str
) -> None:
    world = make_world(keys, example=times)
    result = validate(world, "host.example.test.", "IPSECKEY")
    assert result.status is Status.BOGUS
    assert needle in result.reason and "example.test." in result.reason


def test_clock_skew_allowance(keys: dict[str, PrivKey]) -> None:
    world = make_world(keys, example={"inception": NOW + 100})
    assert validate(world, "host.example.test.", "A").status is Status.SECURE


def test_bogus_ds_mismatch(keys: dict[str, PrivKey]) -> None:
    world = make_world(keys, example={"ds_key": keys["rogue"]})
    result = validate(world, "host.example.test.", "IPSECKEY")
    assert result.status is Status.BOGUS
    assert "no DNSKEY matches its DS" in result.reason and "example.test." in result.reason


def test_bogus_key_of_another_zone(keys: dict[str, PrivKey]) -> None:
    """host.example.test data re-signed with test.'s (valid, trusted) key."""
    world = make_world(keys)
    test_zd = ZoneDef("test.", "", keys["test"])

    def resign(q: Query, msg: dns.message.Message) -> dns.message.Message:
        if str(q) == "host.example.test./IPSECKEY":
            data = msg.get_rrset(msg.answer, q.qname, IN, T.IPSECKEY)
            assert data is not None
            msg.answer = [data]
            sig = _sign_rrset(data, N("test."), keys["test"], test_zd)
            msg.answer.append(dns.rrset.from_rdata(q.qname, 3600, sig))
        return msg

    world.mutate = resign
    result = validate(world, "host.example.test.", "IPSECKEY")
    assert result.status is Status.BOGUS
    assert "signed by test." in result.reason and "zone example.test." in result.reason


def test_bogus_missing_rrsig(keys: dict[str, PrivKey]) -> None:
    world = make_world(keys)
    world.mutate = _strip("answer", T.RRSIG, T.IPSECKEY)
    result = validate(world, "host.example.test.", "IPSECKEY")
    assert result.status is Status.BOGUS and "missing RRSIG" in result.reason


def test_bogus_stripped_dnskey(keys: dict[str, PrivKey]) -> None:
    world = make_world(keys)
    world.mutate = _strip("answer", T.DNSKEY, only="example.test./DNSKEY")
    result = validate(world, "host.example.test.", "IPSECKEY")
    assert result.status is Status.BOGUS and "no DNSKEY set" in result.reason


def test_bogus_stripped_ds_proof(keys: dict[str, PrivKey]) -> None:
    """Removing the DS (to fake an unsigned delegation) is caught."""
    world = make_world(keys)

    def drop_ds(q: Query, msg: dns.message.Message) -> dns.message.Message:
        if str(q) == "example.test./DS":
            msg.answer = []
        return msg

    world.mutate = drop_ds
    result = validate(world, "host.example.test.", "IPSECKEY")
    assert result.status is Status.BOGUS and "unproven" in result.reason


def test_bogus_unsigned_denial(keys: dict[str, PrivKey]) -> None:
    world = make_world(keys)
    world.mutate = _strip("authority", T.RRSIG, T.NSEC)
    result = validate(world, "host.example.test.", "AAAA")
    assert result.status is Status.BOGUS


def test_bogus_nxdomain_claimed_for_existing_name(keys: dict[str, PrivKey]) -> None:
    world = make_world(keys)

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


def test_dnskey_trust_anchor(keys: dict[str, PrivKey]) -> None:
    world = make_world(keys)
    key = _dnskey(keys["root"], 13)
    v = Validator(load_trust_anchors(f". 0 IN DNSKEY {key.to_text()}\n"))
    result = drive(v.start("host.example.test.", "IPSECKEY", NOW), world.answer, lambda: NOW)
    assert result.status is Status.SECURE, result.reason


def test_sha384_ds_anchor(keys: dict[str, PrivKey]) -> None:
    world = make_world(keys)
    v = Validator(load_trust_anchors(ds_text(".", keys["root"], 13, "SHA384")))
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


@pytest.fixture(scope="module")
def base_world(keys: dict[str, PrivKey]) -> World:
    return make_world(keys)


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


def test_nsec3_iterations_above_limit_is_insecure(keys: dict[str, PrivKey]) -> None:
    """RFC 9276: a denial that costs too many hash iterations proves nothing."""
    world = make_world(keys, n3={"iterations": 200})
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
    """Counts public-key operations where dnspython performs them, one per (RRSIG, DNSKEY)."""
    count = [0]
    real = dns.dnssec._validate_signature

    def counting(sig: bytes, data: bytes, key: Any) -> None:
        count[0] += 1
        real(sig, data, key)

    monkeypatch.setattr(dns.dnssec, "_validate_signature", counting)
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
        rrset, key, signer, _dnskey(key, alg), inception=NOW - DAY, expiration=NOW + DAY
    )
    section.append(dns.rrset.from_rdata(owner, 3600, sig))
    return rrset


def keytrap_world(keys: dict[str, PrivKey], n_keys: int, n_sigs: int) -> World:
    """example.test (its owner is the attacker) publishes `n_keys` DNSKEYs with one key tag
    and answers host.example.test/A with `n_sigs` RRSIGs naming that tag, none valid.
    n_keys 0: the RRSIGs name the zone's real key (a signature flood on one key)."""
    world = make_world(keys, ex_alg=8)
    ksk = keys["ex8"]
    colliding = colliding_rsa_keys(ksk.public_key().public_numbers().n, n_keys) if n_keys else []
    tag = dns.dnssec.key_id(colliding[0] if colliding else _dnskey(ksk, 8))

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
    keys: dict[str, PrivKey], pk_ops: list[int], n_keys: int, n_sigs: int, before: int
) -> None:
    """Issue 11.1: `before` public-key operations before the bound; now a few, then BOGUS."""
    world = keytrap_world(keys, n_keys, n_sigs)
    result = validate(world, "host.example.test.", "A")
    assert result.status is Status.BOGUS and result.limited, result.reason
    assert "validation work limit" in result.reason
    assert result.sig_checks == pk_ops[0]
    assert pk_ops[0] <= CHAIN_CHECKS + MAX_SIGNATURE_FAILURES < before


@pytest.mark.parametrize("signed", [False, True], ids=["bogus-junk", "signed-junk"])
def test_junk_denial_records_are_bounded_per_validation(
    keys: dict[str, PrivKey], pk_ops: list[int], signed: bool
) -> None:
    """Many NSEC RRsets in one denial (signed by the zone or not) cost at most the bound."""
    world = make_world(keys)
    zone = world.zones[EX]
    junk: list[dns.rrset.RRset] = []
    for i in range(100):
        owner = N(f"junk{i:03d}.example.test.")
        rd = dns.rdata.from_text(IN, T.NSEC, f"junk{i:03d}a.example.test. A RRSIG NSEC")
        rrset = dns.rrset.from_rdata(owner, 300, rd)
        key = keys["ex13"] if signed else keys["rogue"]
        sig = dns.dnssec.sign(
            rrset, key, EX, _dnskey(keys["ex13"], 13), inception=NOW - DAY, expiration=NOW + DAY
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
    keys: dict[str, PrivKey], monkeypatch: pytest.MonkeyPatch, n_keys: int, status: Status
) -> None:
    """300 DS records with the colliding keys' tag: each key hashed at most once per digest
    type (before: once per DS and key); past MAX_KEYS_PER_TAG keys the DS step is BOGUS."""
    world = make_world(keys, ex_alg=8)
    colliding = colliding_rsa_keys(keys["ex8"].public_key().public_numbers().n, n_keys)
    tag = dns.dnssec.key_id(colliding[0])

    def mutate(q: Query, msg: dns.message.Message) -> dns.message.Message:
        if q.qname == EX and q.rdtype == T.DNSKEY:
            rrset = msg.find_rrset(msg.answer, EX, IN, T.DNSKEY)
            for k in colliding:
                rrset.add(k)
            _resign(msg, msg.answer, EX, T.DNSKEY, keys["ex8"], EX, 8)
        if q.qname == EX and q.rdtype == T.DS:
            rrset = msg.find_rrset(msg.answer, EX, IN, T.DS)
            for i in range(300):
                rrset.add(dns.rdata.from_text(IN, T.DS, f"{tag} 8 2 {i:064x}"))
            _resign(msg, msg.answer, EX, T.DS, keys["test"], N("test."), 13)
        msg.request_payload = 65535
        return msg

    world.mutate = mutate
    digests = [0]
    real = dns.dnssec.make_ds

    def counting(*args: Any, **kw: Any) -> Any:
        digests[0] += 1
        return real(*args, **kw)

    monkeypatch.setattr(dns.dnssec, "make_ds", counting)
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
    keys: dict[str, PrivKey], pk_ops: list[int], name: str, rdtype: str
) -> None:
    result = validate(make_world(keys), name, rdtype)
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
    keys: dict[str, PrivKey], qname: str, wildcard: str, rdtype: int, honest: Denial
) -> None:
    """Issue 11.2: a wildcard expansion for a name under (or at) an empty non-terminal is
    BOGUS; the honest answer is a denial. (NSEC3 already got this right.)"""
    world = make_world(keys, example={"text": WILD_TEXT}, n3={"text": WILD_TEXT})
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
