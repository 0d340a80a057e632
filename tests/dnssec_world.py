"""Signed DNS zones built in memory, and a resolver stand-in that serves them.

``make_world`` signs a root -> test. -> example.test. hierarchy (plus siblings) with
keys from ``make_keys`` (dnspython's sign_zone for NSEC zones, a small NSEC3 signer here
for NSEC3 zones); ``World.answer`` answers a validator's queries the way a recursive
upstream with CD=1 would (DS from the parent, CNAMEs chased, NSEC/NSEC3 proofs in the
authority section). Shared by the unit tests of the validator and of the key lookup
(fixtures ``zone_keys`` and ``base_world`` in tests/unit/conftest.py).
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
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from dns.rdtypes.ANY.NSEC3 import NSEC3, Bitmap
from dns.rdtypes.ANY.NSEC3PARAM import NSEC3PARAM

from oe_router.dns.dnssec import Query

N = dns.name.from_text
NOW = 1_800_000_000.0
DAY = 86400
IN = dns.rdataclass.IN
T = dns.rdatatype

PrivKey = Any


def keygen(alg: int) -> PrivKey:
    if alg == 8:
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if alg == 13:
        return ec.generate_private_key(ec.SECP256R1())
    if alg == 14:
        return ec.generate_private_key(ec.SECP384R1())
    if alg == 15:
        return ed25519.Ed25519PrivateKey.generate()
    raise ValueError(alg)


def make_keys() -> dict[str, PrivKey]:
    """The zones' keys by role (``make_world`` takes them); slow: RSA keys are generated."""
    return {
        "root": keygen(13),
        "test": keygen(13),
        "ex8": keygen(8),
        "ex13": keygen(13),
        "ex15": keygen(15),
        "other": keygen(15),
        "n3": keygen(13),
        "rogue": keygen(13),
        "p384": keygen(14),
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


def zone_dnskey(key: PrivKey, alg: int) -> Any:
    return dns.dnssec.make_dnskey(key.public_key(), alg, flags=257)


def sign_rrset(rrset: dns.rrset.RRset, origin: dns.name.Name, key: PrivKey, zd: ZoneDef) -> Any:
    return dns.dnssec.sign(
        rrset,
        key,
        origin,
        zone_dnskey(key, zd.alg),
        inception=zd.inception,
        expiration=zd.expiration,
    )


def _hash(name: dns.name.Name, iterations: int) -> str:
    return dns.dnssec.nsec3_hash(name, b"\xab\xcd", iterations, 1).lower()


def _sign_nsec3(zone: dns.zone.Zone, zd: ZoneDef) -> None:
    """NSEC3 signer (dnspython's sign_zone does not do NSEC3 yet)."""
    origin = zone.origin
    assert origin is not None and zd.key is not None
    dnskey = zone_dnskey(zd.key, zd.alg)
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
                txn.add(name, rds.ttl, sign_rrset(rrset, origin, zd.key, zd))
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
            txn.add(owner, 3600, sign_rrset(rrset, origin, zd.key, zd))


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
            keys=[(zd.key, zone_dnskey(zd.key, zd.alg))],
            inception=zd.inception,
            expiration=zd.expiration,
        )
    return zone


def ds_text(name: str, key: PrivKey, alg: int, digest: str = "SHA256") -> str:
    ds = dns.dnssec.make_ds(N(name), zone_dnskey(key, alg), digest)
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


def strip_records(
    section: str, rdtype: int, covers: int = 0, only: str | None = None
) -> Callable[[Query, dns.message.Message], dns.message.Message]:
    def mutate(q: Query, msg: dns.message.Message) -> dns.message.Message:
        if only is None or str(q) == only:
            sec = getattr(msg, section)
            sec[:] = [r for r in sec if not (r.rdtype == rdtype and r.covers == covers)]
        return msg

    return mutate
