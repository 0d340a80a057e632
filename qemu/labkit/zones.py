"""Declarative DNSSEC hierarchy builder: zone specs in, signed zone files + trust anchor out.

Why our own signer instead of ``dns.dnssec.sign_zone``: we need NSEC3 (dnspython
does not implement it) and *deliberate* breakage (bad signatures, expired
signatures, DS mismatch, signatures by another zone's key) applied to chosen
RRsets, which a correct signer must never produce.

Every signed zone gets one fresh CSK (flags 257) per build.  Parents get the NS
delegation (to the hierarchy's single name server) and the DS of each child
automatically, so a spec only lists a zone's own data.

Trust anchor files (what the router and validators read), both in zone-file
format, one RR a line, absolute owner names, class IN:
  ``trust-anchor.ds``      ``. 3600 IN DS <tag> <alg> 2 <sha256 hex>``
  ``trust-anchor.dnskey``  ``. 3600 IN DNSKEY 257 3 <alg> <base64>``
"""

from __future__ import annotations

import base64
import datetime as dt
import enum
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import dns.dnssec
import dns.name
import dns.rdata
import dns.rdataclass
import dns.rdataset
import dns.rdatatype
import dns.rdtypes.ANY.DNSKEY
import dns.rdtypes.ANY.NSEC
import dns.rdtypes.ANY.NSEC3
import dns.rdtypes.ANY.NSEC3PARAM
import dns.rdtypes.ANY.RRSIG
import dns.rrset
import dns.zone
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey


class ZoneSpecError(ValueError):
    """A zone spec is inconsistent; the message names the zone and the culprit."""


class Algorithm(enum.IntEnum):
    """The DNSSEC algorithms the router must validate (issue 6)."""

    RSASHA256 = 8
    ECDSAP256SHA256 = 13
    ED25519 = 15


class Denial(enum.Enum):
    """Authenticated denial of existence flavour of a signed zone."""

    NSEC = "nsec"
    NSEC3 = "nsec3"


class BreakKind(enum.Enum):
    """Ways a zone is deliberately made bogus."""

    BAD_SIGNATURE = "bad-signature"  # target RRSIGs have a flipped signature byte
    EXPIRED_SIGNATURE = "expired-signature"  # target RRSIGs expired 10 days ago
    DS_MISMATCH = "ds-mismatch"  # parent's DS is of a key the child never uses
    OTHER_ZONE_KEY = "other-zone-key"  # target RRSIGs made by another zone's key/signer


@dataclass(frozen=True)
class Breakage:
    """How a zone is broken.

    ``targets``: (owner relative to the zone, rdtype) RRsets to break, e.g.
    ``("www", "A")``; empty means every RRset except those at the apex.  Not used
    by DS_MISMATCH (which breaks the whole zone).  ``other_zone``: the signed zone
    whose key and signer name sign the targets for OTHER_ZONE_KEY.
    """

    kind: BreakKind
    targets: tuple[tuple[str, str], ...] = ()
    other_zone: str | None = None


@dataclass(frozen=True)
class ZoneSpec:
    """One zone.  ``records`` are zone-file lines relative to ``origin`` (``$TTL``
    applies), e.g. ``"www A 203.0.113.20"``.  SOA and apex NS are added for you.
    ``algorithm=None`` makes the zone unsigned (its parent then has no DS for it).
    """

    origin: str
    records: tuple[str, ...] = ()
    algorithm: Algorithm | None = Algorithm.ED25519
    denial: Denial = Denial.NSEC
    breakage: Breakage | None = None


@dataclass(frozen=True)
class HierarchySpec:
    """A set of zones, served by one name server ``nameserver`` at ``ns_addresses``.

    The root zone "." must be present and signed: it carries the trust anchor.
    """

    zones: tuple[ZoneSpec, ...]
    ns_addresses: tuple[str, ...]
    nameserver: str = "ns.test."
    ttl: int = 300
    signature_lifetime: dt.timedelta = dt.timedelta(days=14)


@dataclass(frozen=True)
class ZoneKey:
    """A zone's signing key (CSK)."""

    private: PrivateKey
    dnskey: dns.rdtypes.ANY.DNSKEY.DNSKEY

    @property
    def tag(self) -> int:
        return dns.dnssec.key_id(self.dnskey)


@dataclass(frozen=True)
class BuiltZone:
    """A zone written to disk."""

    origin: str
    path: Path
    signed: bool
    key: ZoneKey | None
    ds: tuple[str, ...]  # the DS rdata the parent publishes ("" tuple if unsigned)
    breakage: BreakKind | None


@dataclass(frozen=True)
class BuiltHierarchy:
    """The result of :func:`build_hierarchy`."""

    zone_dir: Path
    zones: dict[str, BuiltZone]
    trust_anchor_ds: Path
    trust_anchor_dnskey: Path
    nameserver: str
    ns_addresses: tuple[str, ...]
    inception: dt.datetime = field(compare=False)

    def zone_file_name(self, origin: str) -> str:
        return self.zones[origin].path.name


def zone_file_name(origin: str) -> str:
    """File name for a zone: ``root.zone`` for ".", else ``example.test.zone``."""
    name = origin.rstrip(".")
    return "root.zone" if not name else f"{name}.zone"


def generate_key(algorithm: Algorithm) -> ZoneKey:
    """Fresh CSK (KSK+ZSK in one, SEP flag set) for ``algorithm``."""
    private: PrivateKey
    if algorithm is Algorithm.RSASHA256:
        private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    elif algorithm is Algorithm.ECDSAP256SHA256:
        private = ec.generate_private_key(ec.SECP256R1())
    else:
        private = ed25519.Ed25519PrivateKey.generate()
    dnskey = dns.dnssec.make_dnskey(private.public_key(), int(algorithm), flags=257)
    return ZoneKey(private, dnskey)


def _name(text: str) -> dns.name.Name:
    return dns.name.from_text(text)


def _parent_zone(origin: dns.name.Name, origins: Iterable[dns.name.Name]) -> dns.name.Name | None:
    """Closest enclosing zone of ``origin`` among ``origins`` (excluding itself)."""
    best: dns.name.Name | None = None
    for other in origins:
        if (
            origin != other
            and origin.is_subdomain(other)
            and (best is None or len(other) > len(best))
        ):
            best = other
    return best


def _enclosing_zone(name: dns.name.Name, origins: Iterable[dns.name.Name]) -> dns.name.Name | None:
    best: dns.name.Name | None = None
    for other in origins:
        if name.is_subdomain(other) and (best is None or len(other) > len(best)):
            best = other
    return best


def _check(spec: HierarchySpec) -> None:
    origins = [_name(z.origin) for z in spec.zones]
    seen: set[dns.name.Name] = set()
    for zone, origin in zip(spec.zones, origins, strict=True):
        if origin in seen:
            raise ZoneSpecError(f"zone {zone.origin!r} is listed twice")
        seen.add(origin)
    if dns.name.root not in seen:
        raise ZoneSpecError('the hierarchy has no root zone "."')
    by_origin = {o: z for o, z in zip(origins, spec.zones, strict=True)}
    if by_origin[dns.name.root].algorithm is None:
        raise ZoneSpecError('the root zone "." must be signed: it carries the trust anchor')
    for origin, zone in by_origin.items():
        br = zone.breakage
        if br is None:
            continue
        if zone.algorithm is None:
            raise ZoneSpecError(f"zone {zone.origin!r}: breakage {br.kind.value} needs signing")
        if br.kind is BreakKind.DS_MISMATCH and origin == dns.name.root:
            raise ZoneSpecError('zone ".": ds-mismatch needs a parent zone')
        if br.kind is BreakKind.OTHER_ZONE_KEY:
            other = by_origin.get(_name(br.other_zone or ""))
            if br.other_zone is None or other is None or other.algorithm is None:
                raise ZoneSpecError(
                    f"zone {zone.origin!r}: other-zone-key needs other_zone naming a signed "
                    f"zone of the hierarchy, got {br.other_zone!r}"
                )
        for rel, rdtype in br.targets:
            try:
                dns.rdatatype.from_text(rdtype)
                dns.name.from_text(rel, origin)
            except Exception as exc:
                raise ZoneSpecError(
                    f"zone {zone.origin!r}: bad breakage target {(rel, rdtype)!r}: {exc}"
                ) from None


def _unsigned_zone(
    zone: ZoneSpec,
    spec: HierarchySpec,
    origins: Sequence[dns.name.Name],
    children_ds: dict[dns.name.Name, list[str]],
    serial: int,
) -> dns.zone.Zone:
    origin = _name(zone.origin)
    ns = _name(spec.nameserver)
    hostmaster = dns.name.Name(("hostmaster", *origin.labels))
    lines = [
        f"$TTL {spec.ttl}",
        f"@ SOA {ns} {hostmaster} {serial} 3600 900 604800 {spec.ttl}",
        f"@ NS {ns}",
    ]
    lines.extend(zone.records)
    for child in origins:
        if _parent_zone(child, origins) != origin:
            continue
        lines.append(f"{child} NS {ns}")
        lines.extend(f"{child} DS {ds}" for ds in children_ds.get(child, []))
    # NS addresses: authoritative data if ns lives in this zone, glue if below a cut.
    if ns.is_subdomain(origin):
        for addr in spec.ns_addresses:
            rdtype = "AAAA" if ":" in addr else "A"
            lines.append(f"{ns} {rdtype} {addr}")
    text = "\n".join(lines) + "\n"
    try:
        return dns.zone.from_text(text, origin=origin, relativize=False, check_origin=True)
    except dns.exception.DNSException as exc:
        raise ZoneSpecError(f"zone {zone.origin!r}: bad record data: {exc}") from None


def _cuts(zone: dns.zone.Zone) -> list[dns.name.Name]:
    assert zone.origin is not None
    return [
        name
        for name, node in zone.nodes.items()
        if name != zone.origin and node.get_rdataset(zone.rdclass, dns.rdatatype.NS) is not None
    ]


def _authoritative_names(zone: dns.zone.Zone) -> list[dns.name.Name]:
    """Names with data this zone is authoritative for, cut points included, glue excluded."""
    cuts = _cuts(zone)
    out = []
    for name in zone.nodes:
        if any(name != cut and name.is_subdomain(cut) for cut in cuts):
            continue
        out.append(name)
    return sorted(out)


@dataclass
class _Signer:
    """Signs RRsets of one zone, applying its breakage to the targeted RRsets."""

    origin: dns.name.Name
    key: ZoneKey
    inception: dt.datetime
    expiration: dt.datetime
    breakage: Breakage | None
    other_key: ZoneKey | None
    other_origin: dns.name.Name | None

    def _targeted(self, name: dns.name.Name, rdtype: dns.rdatatype.RdataType) -> bool:
        br = self.breakage
        if br is None or br.kind is BreakKind.DS_MISMATCH:
            return False
        if not br.targets:
            differs: bool = name != self.origin
            return differs
        for rel, t in br.targets:
            same_name: bool = dns.name.from_text(rel, self.origin) == name
            if same_name and dns.rdatatype.from_text(t) == rdtype:
                return True
        return False

    def sign(self, rrset: dns.rrset.RRset) -> dns.rdtypes.ANY.RRSIG.RRSIG:
        key, signer = self.key, self.origin
        inception, expiration = self.inception, self.expiration
        broken = self._targeted(rrset.name, rrset.rdtype)
        kind = self.breakage.kind if self.breakage and broken else None
        if kind is BreakKind.EXPIRED_SIGNATURE:
            inception = self.inception - dt.timedelta(days=30)
            expiration = self.inception - dt.timedelta(days=10)
        if kind is BreakKind.OTHER_ZONE_KEY:
            assert self.other_key is not None and self.other_origin is not None
            key, signer = self.other_key, self.other_origin
        rrsig = dns.dnssec.sign(
            rrset,
            key.private,
            signer,
            key.dnskey,
            inception=inception,
            expiration=expiration,
            origin=self.origin,
        )
        if kind is BreakKind.BAD_SIGNATURE:
            sig = bytearray(rrsig.signature)
            sig[len(sig) // 2] ^= 0x5A
            return cast(dns.rdtypes.ANY.RRSIG.RRSIG, rrsig.replace(signature=bytes(sig)))
        return rrsig


def _signed_rrsets(zone: dns.zone.Zone) -> Iterator[dns.rrset.RRset]:
    """RRsets a signer signs: all authoritative ones; at cuts only DS."""
    cuts = set(_cuts(zone))
    for name in _authoritative_names(zone):
        node = zone.nodes[name]
        for rds in node.rdatasets:
            if rds.rdtype == dns.rdatatype.RRSIG:
                continue
            if name in cuts and rds.rdtype != dns.rdatatype.DS:
                continue
            yield dns.rrset.from_rdata_list(name, rds.ttl, list(rds))


def _add(zone: dns.zone.Zone, name: dns.name.Name, ttl: int, rdata: dns.rdata.Rdata) -> None:
    rds = zone.find_rdataset(name, rdata.rdtype, rdata.covers(), create=True)
    rds.add(rdata, ttl)


def _types_at(zone: dns.zone.Zone, name: dns.name.Name) -> set[dns.rdatatype.RdataType]:
    node = zone.nodes.get(name)
    return {rds.rdtype for rds in node.rdatasets} if node is not None else set()


def _add_nsec(zone: dns.zone.Zone, ttl: int) -> None:
    names = _authoritative_names(zone)
    assert zone.origin is not None
    for i, name in enumerate(names):
        nxt = names[(i + 1) % len(names)]
        types = _types_at(zone, name) | {dns.rdatatype.NSEC, dns.rdatatype.RRSIG}
        nsec = dns.rdtypes.ANY.NSEC.NSEC(  # type: ignore[no-untyped-call]
            zone.rdclass,
            dns.rdatatype.NSEC,
            nxt,
            dns.rdtypes.ANY.NSEC.Bitmap.from_rdtypes(sorted(types)),
        )
        _add(zone, name, ttl, nsec)


def _add_nsec3(zone: dns.zone.Zone, ttl: int) -> None:
    """NSEC3 chain per RFC 5155 with RFC 9276 parameters: SHA-1, 0 iterations, no salt,
    no opt-out (so insecure delegations get their own NSEC3)."""
    assert zone.origin is not None
    origin = zone.origin
    param = dns.rdtypes.ANY.NSEC3PARAM.NSEC3PARAM(  # type: ignore[no-untyped-call]
        zone.rdclass, dns.rdatatype.NSEC3PARAM, 1, 0, 0, b""
    )
    _add(zone, origin, 0, param)
    cuts = set(_cuts(zone))
    names = set(_authoritative_names(zone))
    for name in list(names):  # empty non-terminals
        parent = name
        while parent != origin:
            parent = parent.parent()
            names.add(parent)
    hashed: list[tuple[bytes, dns.name.Name]] = []
    for name in names:
        b32 = dns.dnssec.nsec3_hash(name, None, 0, "SHA1")
        hashed.append((base64.b32hexdecode(b32), name))
    hashed.sort()
    for i, (digest, name) in enumerate(hashed):
        nxt = hashed[(i + 1) % len(hashed)][0]
        types = _types_at(zone, name)
        signed_here = bool(types) and (name not in cuts or dns.rdatatype.DS in types)
        if signed_here:
            types |= {dns.rdatatype.RRSIG}
        nsec3 = dns.rdtypes.ANY.NSEC3.NSEC3(  # type: ignore[no-untyped-call]
            zone.rdclass,
            dns.rdatatype.NSEC3,
            1,
            0,
            0,
            b"",
            nxt,
            dns.rdtypes.ANY.NSEC3.Bitmap.from_rdtypes(sorted(types)),
        )
        owner = dns.name.Name((base64.b32hexencode(digest).decode().lower(), *origin.labels))
        _add(zone, owner, ttl, nsec3)


def _sign_zone(zone: dns.zone.Zone, zspec: ZoneSpec, signer: _Signer, spec: HierarchySpec) -> None:
    assert zone.origin is not None
    _add(zone, zone.origin, spec.ttl, signer.key.dnskey)
    if zspec.denial is Denial.NSEC:
        _add_nsec(zone, spec.ttl)
    else:
        _add_nsec3(zone, spec.ttl)
    rrsigs: list[tuple[dns.name.Name, int, dns.rdtypes.ANY.RRSIG.RRSIG]] = []
    for rrset in _signed_rrsets(zone):
        rrsigs.append((rrset.name, rrset.ttl, signer.sign(rrset)))
    for name, ttl, rrsig in rrsigs:
        _add(zone, name, ttl, rrsig)


def _text(rdata: dns.rdata.Rdata) -> str:
    text: str = rdata.to_text()
    return text


def _render(zone: dns.zone.Zone) -> str:
    """Zone file text.  Rdata knot cannot read back from dnspython's presentation
    (IPSECKEY without a key) is written in RFC 3597 generic form."""
    out = []
    for name in sorted(zone.nodes):
        node = zone.nodes[name]
        for rds in sorted(node.rdatasets, key=lambda r: (r.rdtype, r.covers)):
            for rdata in rds:
                if rdata.rdtype == dns.rdatatype.IPSECKEY and not rdata.key:
                    text = rdata.to_generic().to_text()
                else:
                    text = rdata.to_text()
                rdtype = dns.rdatatype.to_text(rds.rdtype)
                out.append(f"{name} {rds.ttl} IN {rdtype} {text}")
    return "\n".join(out) + "\n"


def build_hierarchy(
    spec: HierarchySpec, zone_dir: Path, now: dt.datetime | None = None
) -> BuiltHierarchy:
    """Generate keys, sign and write every zone of ``spec`` to ``zone_dir``, plus the
    trust anchor files.  ``now`` (UTC) sets signature inception (now - 1 h)."""
    _check(spec)
    now = now or dt.datetime.now(dt.UTC)
    inception = now - dt.timedelta(hours=1)
    expiration = now + spec.signature_lifetime
    serial = int(now.timestamp())
    zone_dir.mkdir(parents=True, exist_ok=True)
    origins = [_name(z.origin) for z in spec.zones]
    by_origin = dict(zip(origins, spec.zones, strict=True))
    keys = {o: generate_key(z.algorithm) for o, z in by_origin.items() if z.algorithm is not None}

    children_ds: dict[dns.name.Name, list[str]] = {}
    built: dict[str, BuiltZone] = {}
    # children first: a parent needs its children's DS before it is signed.
    for origin in sorted(origins, key=len, reverse=True):
        zspec = by_origin[origin]
        zone = _unsigned_zone(zspec, spec, origins, children_ds, serial)
        key = keys.get(origin)
        ds_text: tuple[str, ...] = ()
        if key is not None:
            assert zspec.algorithm is not None
            br = zspec.breakage
            other = _name(br.other_zone) if br and br.other_zone else None
            signer = _Signer(
                origin,
                key,
                inception,
                expiration,
                br,
                keys.get(other) if other else None,
                other,
            )
            _sign_zone(zone, zspec, signer, spec)
            published = key.dnskey
            if br is not None and br.kind is BreakKind.DS_MISMATCH:
                published = generate_key(zspec.algorithm).dnskey  # a key the child never uses
            ds_text = (_text(dns.dnssec.make_ds(origin, published, "SHA256")),)
            children_ds[origin] = list(ds_text)
        path = zone_dir / zone_file_name(zspec.origin)
        path.write_text(_render(zone))
        built[origin.to_text()] = BuiltZone(
            origin=origin.to_text(),
            path=path,
            signed=key is not None,
            key=key,
            ds=ds_text,
            breakage=zspec.breakage.kind if zspec.breakage else None,
        )

    root_key = keys[dns.name.root]
    ta_ds = zone_dir / "trust-anchor.ds"
    ta_dnskey = zone_dir / "trust-anchor.dnskey"
    root_ds = dns.dnssec.make_ds(dns.name.root, root_key.dnskey, "SHA256")
    ta_ds.write_text(f". 3600 IN DS {_text(root_ds)}\n")
    ta_dnskey.write_text(f". 3600 IN DNSKEY {_text(root_key.dnskey)}\n")
    return BuiltHierarchy(
        zone_dir=zone_dir,
        zones=built,
        trust_anchor_ds=ta_ds,
        trust_anchor_dnskey=ta_dnskey,
        nameserver=_name(spec.nameserver).to_text(),
        ns_addresses=spec.ns_addresses,
        inception=inception,
    )


def ipseckey_none(precedence: int = 10) -> str:
    """IPSECKEY rdata "no gateway, no key" (algorithm 0, RFC 4025 section 2.4) in
    RFC 3597 generic form, because dnspython cannot parse an empty key in text."""
    return f"\\# 3 {precedence:02x}0000"


def ipseckey(algorithm: int, public_key: bytes, precedence: int = 10) -> str:
    """IPSECKEY rdata text with no gateway (the key is for the owner name's own
    addresses only) and ``public_key`` in the algorithm's DNS wire format."""
    return f"{precedence} 0 {algorithm} . {base64.b64encode(public_key).decode()}"


def resign_zone(
    built: BuiltZone,
    dnskeys: Sequence[dns.rdtypes.ANY.DNSKEY.DNSKEY],
    dnskey_signers: Sequence[tuple[PrivateKey, dns.rdtypes.ANY.DNSKEY.DNSKEY]],
    data_signer: ZoneKey,
    now: dt.datetime | None = None,
    lifetime: dt.timedelta = dt.timedelta(days=14),
) -> None:
    """One step of a key rollover: rewrite ``built``'s zone file in place.

    Its DNSKEY RRset becomes ``dnskeys`` (a revoked key is its DNSKEY with flag 0x0080,
    RFC 5011), signed by each of ``dnskey_signers``: (private key, the DNSKEY it signs
    as; a revoked key signs as its revoked form, which proves the revocation). Every
    other RRset is signed by ``data_signer`` only, and the SOA serial goes up by one.
    The NSEC/NSEC3 chain stays (the apex keeps its types). Serve it with
    ``knotc zone-reload``. No breakage is applied.
    """
    origin = _name(built.origin)
    zone = dns.zone.from_file(str(built.path), origin=origin, relativize=False)
    now = now or dt.datetime.now(dt.UTC)
    inception, expiration = now - dt.timedelta(hours=1), now + lifetime
    old_keys = zone.get_rdataset(origin, dns.rdatatype.DNSKEY)
    ttl = old_keys.ttl if old_keys is not None else 300
    for name, node in list(zone.nodes.items()):
        for rds in list(node.rdatasets):
            if rds.rdtype == dns.rdatatype.RRSIG:
                zone.delete_rdataset(name, rds.rdtype, rds.covers)
    zone.delete_rdataset(origin, dns.rdatatype.DNSKEY)
    for key in dnskeys:
        _add(zone, origin, ttl, key)
    soa_rds = zone.find_rdataset(origin, dns.rdatatype.SOA)
    soa = soa_rds[0]
    soa_ttl = soa_rds.ttl
    zone.delete_rdataset(origin, dns.rdatatype.SOA)
    _add(zone, origin, soa_ttl, soa.replace(serial=soa.serial + 1))
    rrsigs: list[tuple[dns.name.Name, int, dns.rdtypes.ANY.RRSIG.RRSIG]] = []
    for rrset in _signed_rrsets(zone):
        if rrset.rdtype == dns.rdatatype.DNSKEY:
            signers = list(dnskey_signers)
        else:
            signers = [(data_signer.private, data_signer.dnskey)]
        for private, dnskey in signers:
            sig = dns.dnssec.sign(
                rrset, private, origin, dnskey, inception=inception, expiration=expiration,
                origin=origin,
            )  # fmt: skip
            rrsigs.append((rrset.name, rrset.ttl, sig))
    for name, ttl_, rrsig in rrsigs:
        _add(zone, name, ttl_, rrsig)
    built.path.write_text(_render(zone))
