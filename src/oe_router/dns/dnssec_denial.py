"""Denial-of-existence proofs (NSEC, NSEC3) for one DNSSEC validation run.

Why a collaborator of its own: NXDOMAIN, NODATA, a DS's absence at a cut and "no
closer name" behind a wildcard answer are all proven from the same signed NSEC/NSEC3
records with the same RFC 4035 / RFC 5155 rules; the proofs themselves are pure
functions of the records, and `DenialProver` only picks the signed records out of a
reply (through the run's `SignatureChecker`) and turns an unproven claim into BOGUS.
"""

from __future__ import annotations

import base64
import enum
from collections.abc import Iterable
from typing import Any

import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
from dns.rdatatype import RdataType

from oe_router.records import record

from .dnssec_crypto import nsec3_digest
from .dnssec_sigs import SignatureChecker
from .dnssec_values import Abort, Name, RunState, Status, Zone, label_count, tname

_NSEC3_SHA1 = 1
_OPT_OUT = 0x01


class Proof(enum.Enum):
    NODATA = "nodata"
    NXDOMAIN = "nxdomain"
    OPTOUT = "optout"  #: an opt-out span covers the name: nothing is proven


@record(frozen=True)
class ProofResult:
    kind: Proof
    has_ns: bool = False  #: NODATA at a delegation point (NS without SOA)
    note: str = ""


def _types(rdata: Any) -> set[int]:
    """The type bitmap of an NSEC/NSEC3 rdata as a set of type numbers."""
    out: set[int] = set()
    for window, bitmap in rdata.windows:
        for i, byte in enumerate(bitmap):
            for bit in range(8):
                if byte & (0x80 >> bit):
                    out.add(window * 256 + i * 8 + bit)
    return out


def _common(a: Name, b: Name) -> Name:
    _, _, nlabels = a.fullcompare(b)
    return Name(a.labels[len(a.labels) - nlabels :])


def _covers(owner: Name, nxt: Name, name: Name) -> bool:
    """NSEC span test in canonical order, including the wrap-around last span."""
    if owner < nxt:
        return bool(owner < name < nxt)
    return bool(name > owner or name < nxt)


def _hcovers(owner: bytes, nxt: bytes, h: bytes) -> bool:
    if owner < nxt:
        return owner < h < nxt
    return h > owner or h < nxt


class DenialProver:
    """Proves a run's negative answers from `zone`'s signed NSEC/NSEC3 records."""

    def __init__(self, run: RunState, sigs: SignatureChecker) -> None:
        self.run = run
        self.sigs = sigs

    def prove(
        self, msg: dns.message.Message, qname: Name, rdtype: RdataType, zone: Zone
    ) -> ProofResult:
        """Prove NXDOMAIN/NODATA for qname/rdtype from `zone`'s signed NSEC(3)s."""
        want_nx = msg.rcode() == dns.rcode.NXDOMAIN
        nsecs: list[tuple[Name, Any]] = []
        nsec3s: list[tuple[Name, Any]] = []
        failures: list[str] = []
        for rrset in msg.authority:
            if rrset.rdtype not in (dns.rdatatype.NSEC, dns.rdatatype.NSEC3):
                continue
            if not rrset.name.is_subdomain(zone.name):
                continue
            sigs = msg.get_rrset(
                msg.authority, rrset.name, dns.rdataclass.IN, dns.rdatatype.RRSIG, rrset.rdtype
            )
            try:
                self.sigs.verify(rrset, sigs, zone, tname(rrset.rdtype))
            except Abort as exc:
                if exc.limit:
                    raise
                failures.append(exc.reason)
                continue
            target = nsecs if rrset.rdtype == dns.rdatatype.NSEC else nsec3s
            target.extend((rrset.name, rd) for rd in rrset)
        what = "NXDOMAIN" if want_nx else "NODATA"
        label = f"{qname}/{tname(rdtype)}"
        if not nsecs and not nsec3s:
            detail = "; ".join(failures) if failures else "no NSEC or NSEC3 records"
            raise Abort(
                Status.BOGUS,
                f"{what} for {label} in zone {zone.name} is unproven: {detail}",
                zone.name,
            )
        result: ProofResult | None = None
        why = ""
        if nsecs:
            result, why = _nsec_proof(nsecs, qname, rdtype, zone.name, want_nx)
        if result is None and nsec3s:
            result, why = _nsec3_proof(
                nsec3s, qname, rdtype, zone.name, want_nx, self.run.v.nsec3_max_iterations
            )
        if result is None:
            if failures:
                why = f"{why}; also: {'; '.join(failures)}"
            raise Abort(
                Status.BOGUS,
                f"{what} for {label} in zone {zone.name} is unproven: {why}",
                zone.name,
            )
        soa = msg.get_rrset(msg.authority, zone.name, dns.rdataclass.IN, dns.rdatatype.SOA)
        if soa is not None and len(soa) > 0:
            self.run.clamp(self.run.now + min(soa.ttl, soa[0].minimum))
        return result

    def wildcard_check(
        self, msg: dns.message.Message, rrset: dns.rrset.RRset, sig: Any, zone: Zone
    ) -> bool:
        """For an answer synthesized from a wildcard, prove no closer name exists.

        RFC 4035 section 5.3.4, RFC 7129 section 5.3, RFC 5155 section 8.8: the
        RRSIG's labels name the wildcard (*.closest); the denial must show that
        `closest` is the closest encloser of the owner, i.e. that the owner does
        not exist and neither does any name between it and `closest` (an empty
        non-terminal counts as existing).
        """
        owner = rrset.name
        if sig.labels >= label_count(owner):
            return False
        closest = Name(owner.labels[len(owner.labels) - sig.labels - 1 :])
        if not closest.is_subdomain(zone.name):
            raise Abort(
                Status.BOGUS,
                f"wildcard answer for {owner}: RRSIG labels {sig.labels} put the wildcard "
                f"above zone {zone.name}",
                zone.name,
            )
        nsecs: list[tuple[Name, Any]] = []
        nsec3s: list[tuple[Name, Any]] = []
        for rr in msg.authority:
            if rr.rdtype not in (dns.rdatatype.NSEC, dns.rdatatype.NSEC3):
                continue
            sigs = msg.get_rrset(
                msg.authority, rr.name, dns.rdataclass.IN, dns.rdatatype.RRSIG, rr.rdtype
            )
            try:
                self.sigs.verify(rr, sigs, zone, tname(rr.rdtype))
            except Abort as exc:
                if exc.limit:
                    raise
                continue
            (nsecs if rr.rdtype == dns.rdatatype.NSEC else nsec3s).extend(
                (rr.name, rd) for rd in rr
            )
        why = "no signed NSEC or NSEC3 records"
        if nsecs:
            found, why = _nsec_name_error(nsecs, owner, zone.name)
            if found is not None:
                nsec_owner, encloser = found
                if encloser == closest:
                    return True
                why = (
                    f"NSEC {nsec_owner} makes {encloser} the closest encloser, "
                    f"not the wildcard's parent {closest}"
                )
        if nsec3s:
            hashes = _Nsec3Set(nsec3s, zone.name, self.run.v.nsec3_max_iterations)
            depth = len(closest) + 1
            next_closer = Name(owner.labels[len(owner.labels) - depth :])
            if hashes.usable and hashes.cover(next_closer) is not None:
                return True
            why = f"no NSEC3 covers the next closer name {next_closer}"
        raise Abort(
            Status.BOGUS,
            f"wildcard answer for {owner} (from *.{closest}) lacks proof that no closer "
            f"name exists: {why}",
            zone.name,
        )


# --------------------------------------------------------------------------- NSEC / NSEC3 proofs


def _nsec_proof(
    nsecs: list[tuple[Name, Any]], qname: Name, rdtype: RdataType, zone: Name, want_nx: bool
) -> tuple[ProofResult | None, str]:
    """RFC 4035 section 5.4 with RFC 4592 wildcards; (None, why) when unproven."""

    def nodata_ok(owner: Name, rd: Any, label: str) -> tuple[ProofResult | None, str]:
        types = _types(rd)
        if rdtype in types:
            return None, f"NSEC at {owner} lists {tname(rdtype)}"
        if dns.rdatatype.CNAME in types and rdtype != dns.rdatatype.CNAME:
            return None, f"NSEC at {owner} lists CNAME"
        delegation = dns.rdatatype.NS in types and dns.rdatatype.SOA not in types
        if rdtype == dns.rdatatype.DS:
            if dns.rdatatype.SOA in types and owner != zone:
                return None, f"NSEC at {owner} is from the child apex, not the parent"
        elif delegation:
            return None, f"NSEC at {owner} is a delegation point, not authoritative data"
        return ProofResult(Proof.NODATA, has_ns=delegation, note=label), ""

    if not want_nx:
        for owner, rd in nsecs:
            if owner == qname:
                return nodata_ok(owner, rd, f"NSEC at {owner}")
        for owner, rd in nsecs:
            if _covers(owner, rd.next, qname) and rd.next.is_subdomain(qname) and rd.next != qname:
                return ProofResult(Proof.NODATA, note=f"empty non-terminal, NSEC {owner}"), ""
    found, why = _nsec_name_error(nsecs, qname, zone)
    if found is None:
        return None, why
    owner, encloser = found
    wildcard = Name((b"*", *encloser.labels))
    for w_owner, w_rd in nsecs:
        if w_owner == wildcard:
            if want_nx:
                return None, f"wildcard {wildcard} exists, so {qname} is not NXDOMAIN"
            res, why = nodata_ok(w_owner, w_rd, f"NSEC {owner} and wildcard NSEC {wildcard}")
            return res, why
    if not want_nx:
        return None, f"NODATA claimed but NSEC {owner} shows {qname} does not exist"
    for w_owner, w_rd in nsecs:
        if _covers(w_owner, w_rd.next, wildcard):
            return ProofResult(
                Proof.NXDOMAIN, note=f"NSEC {owner} covers the name, NSEC {w_owner} the wildcard"
            ), ""
    return None, f"no NSEC proves that wildcard {wildcard} does not exist"


def _nsec_name_error(
    nsecs: list[tuple[Name, Any]], qname: Name, zone: Name
) -> tuple[tuple[Name, Name] | None, str]:
    """The NSEC proving that `qname` does not exist, and the closest encloser it implies.

    RFC 4035 section 5.4, RFC 7129 section 5: the NSEC covers `qname`; it is no
    delegation or DNAME above `qname` (that proves nothing below the cut); its
    next name is not below `qname` (then `qname` is an empty non-terminal, which
    exists). The closest encloser is the longer of the names `qname` shares with
    the NSEC's owner and with its next name. Returns ((owner, encloser), "") or
    (None, why).
    """
    for owner, rd in nsecs:
        if not _covers(owner, rd.next, qname):
            continue
        types = _types(rd)
        if (
            qname.is_subdomain(owner)
            and owner != zone
            and (
                (dns.rdatatype.NS in types and dns.rdatatype.SOA not in types)
                or dns.rdatatype.DNAME in types
            )
        ):
            return None, f"NSEC at {owner} is a delegation/DNAME above {qname}"
        if rd.next.is_subdomain(qname) and rd.next != qname:
            return None, f"NSEC {owner} shows {qname} is an empty non-terminal"
        a, b = _common(qname, owner), _common(qname, rd.next)
        encloser = a if len(a) >= len(b) else b
        if not encloser.is_subdomain(zone):
            encloser = zone
        return (owner, encloser), ""
    return None, f"no NSEC covers {qname}"


class _Nsec3Set:
    """Verified NSEC3 records of one zone with the hash parameters they share."""

    def __init__(self, records: Iterable[tuple[Name, Any]], zone: Name, max_iter: int) -> None:
        self.zone = zone
        self.entries: list[tuple[bytes, Any]] = []
        self.params: tuple[int, bytes] | None = None
        self.too_costly = False
        self.usable = False
        for owner, rd in records:
            if owner.parent() != zone or rd.algorithm != _NSEC3_SHA1:
                continue
            if self.params is None:
                self.params = (rd.iterations, bytes(rd.salt))
            if (rd.iterations, bytes(rd.salt)) != self.params:
                continue
            try:
                h = base64.b32hexdecode(owner.labels[0].upper())
            except ValueError:
                continue
            self.entries.append((h, rd))
        if self.params is not None and self.params[0] > max_iter:
            self.too_costly = True
        self.usable = bool(self.entries) and not self.too_costly
        self._hashes: dict[Name, bytes] = {}

    def hash(self, name: Name) -> bytes:
        assert self.params is not None
        h = self._hashes.get(name)
        if h is None:
            h = nsec3_digest(name, self.params[1], self.params[0])
            self._hashes[name] = h
        return h

    def match(self, name: Name) -> Any | None:
        h = self.hash(name)
        for owner_hash, rd in self.entries:
            if owner_hash == h:
                return rd
        return None

    def cover(self, name: Name) -> Any | None:
        h = self.hash(name)
        for owner_hash, rd in self.entries:
            if _hcovers(owner_hash, bytes(rd.next), h):
                return rd
        return None

    def closest_encloser(self, qname: Name) -> tuple[Name, Name, Any] | None:
        """RFC 5155 section 8.3: (encloser, next closer, NSEC3 covering next closer)."""
        name, nearer = qname, None
        while name.is_subdomain(self.zone):
            rd = self.match(name)
            if rd is not None:
                types = _types(rd)
                if dns.rdatatype.DNAME in types:
                    return None
                if dns.rdatatype.NS in types and dns.rdatatype.SOA not in types:
                    return None
                if nearer is None:
                    return None
                cov = self.cover(nearer)
                return (name, nearer, cov) if cov is not None else None
            nearer = name
            if name == self.zone:
                break
            name = name.parent()
        return None


def _nsec3_proof(
    records: list[tuple[Name, Any]],
    qname: Name,
    rdtype: RdataType,
    zone: Name,
    want_nx: bool,
    max_iter: int,
) -> tuple[ProofResult | None, str]:
    """RFC 5155 section 8 proofs; (None, why) when unproven."""
    s = _Nsec3Set(records, zone, max_iter)
    if s.too_costly:
        assert s.params is not None
        return ProofResult(
            Proof.OPTOUT, note=f"NSEC3 iterations {s.params[0]} above the limit {max_iter}"
        ), ""
    if not s.usable:
        return None, f"no usable NSEC3 records of zone {zone}"

    def nodata_types(rd: Any, where: str) -> tuple[ProofResult | None, str]:
        types = _types(rd)
        if rdtype in types or (dns.rdatatype.CNAME in types and rdtype != dns.rdatatype.CNAME):
            return None, f"NSEC3 for {where} lists the type"
        delegation = dns.rdatatype.NS in types and dns.rdatatype.SOA not in types
        if rdtype == dns.rdatatype.DS:
            if dns.rdatatype.SOA in types and where != str(zone):
                return None, f"NSEC3 for {where} is from the child apex"
        elif delegation:
            return None, f"NSEC3 for {where} is a delegation point"
        return ProofResult(Proof.NODATA, has_ns=delegation, note=f"NSEC3 matches {where}"), ""

    if not want_nx:
        rd = s.match(qname)
        if rd is not None:
            return nodata_types(rd, str(qname))
    ce = s.closest_encloser(qname)
    if ce is None:
        return None, f"no NSEC3 closest encloser proof for {qname}"
    encloser, nearer, cover = ce
    optout = bool(cover.flags & _OPT_OUT)
    wildcard = Name((b"*", *encloser.labels))
    if not want_nx:
        wild = s.match(wildcard)
        if wild is not None:
            return nodata_types(wild, str(wildcard))
        if rdtype == dns.rdatatype.DS and optout:
            return ProofResult(Proof.OPTOUT, note=f"opt-out span covers {nearer}"), ""
        return None, f"NODATA claimed but NSEC3 shows {nearer} does not exist"
    if s.cover(wildcard) is None:
        return None, f"no NSEC3 proves that wildcard {wildcard} does not exist"
    if optout:
        return ProofResult(Proof.OPTOUT, note=f"opt-out span covers {nearer}"), ""
    return ProofResult(
        Proof.NXDOMAIN, note=f"closest encloser {encloser}, next closer {nearer} covered"
    ), ""
