"""The chain of trust of one DNSSEC validation run: from the anchor down to a name's zone.

Why a collaborator of its own: finding where a name lives (each zone cut below the
anchor proven by a signed DS, or by a signed denial that there is none) is the part
of a run that asks the most questions and the part whose findings are shared across
runs: trusted DNSKEY sets and cut decisions go into the validator's cache. `Fetcher`
is the run's one way to ask the upstream, counted against `max_queries`.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Generator, Sequence
from dataclasses import replace
from typing import Any

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdataset
import dns.rdatatype
from dns.rdatatype import RdataType

from oe_router.records import record

from .dnssec_denial import DenialProver, Proof
from .dnssec_sigs import SignatureChecker
from .dnssec_values import (
    SUPPORTED_ALGORITHMS,
    SUPPORTED_DIGESTS,
    Abort,
    Name,
    Query,
    RunState,
    Status,
    Zone,
)


class _Step(enum.Enum):
    CUT = "cut"
    NOT_CUT = "not-cut"
    INSECURE = "insecure"
    NXDOMAIN = "nxdomain"


@record(frozen=True)
class _DsStep:
    kind: _Step
    ds: tuple[Any, ...] = ()
    reason: str = ""
    expires: float = math.inf


class Fetcher:
    """The run's questions to the upstream: counted, and each reply checked to answer it."""

    def __init__(self, run: RunState) -> None:
        self.run = run
        self.queries = 0

    def ask(self, qname: Name, rdtype: RdataType) -> Generator[Query, Any, dns.message.Message]:
        if self.queries >= self.run.v.max_queries:
            raise Abort(
                Status.INDETERMINATE,
                f"gave up after {self.queries} queries while validating {self.run.qname}",
            )
        self.queries += 1
        query = Query(qname, rdtype)
        msg = yield query
        if msg is None:
            raise Abort(Status.INDETERMINATE, f"no answer from upstream for {query}")
        if not isinstance(msg, dns.message.Message) or not msg.flags & dns.flags.QR:
            raise Abort(Status.INDETERMINATE, f"upstream reply for {query} is not a response")
        if len(msg.question) != 1:
            raise Abort(Status.INDETERMINATE, f"upstream reply for {query} has no single question")
        q = msg.question[0]
        if q.name != qname or q.rdtype != rdtype or q.rdclass != dns.rdataclass.IN:
            raise Abort(Status.INDETERMINATE, f"upstream reply does not match query {query}")
        rcode = msg.rcode()
        if rcode not in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
            raise Abort(
                Status.INDETERMINATE,
                f"upstream answered {dns.rcode.to_text(rcode)} for {query}",
            )
        return msg


class ChainWalker:
    """Finds (and caches) the secure zone holding a name, or the insecure cut above it."""

    def __init__(
        self, run: RunState, fetch: Fetcher, sigs: SignatureChecker, denial: DenialProver
    ) -> None:
        self.run = run
        self.fetch = fetch
        self.sigs = sigs
        self.denial = denial

    def zone_keys(
        self, name: Name, ds: Sequence[Any], anchor_keys: Sequence[Any] = ()
    ) -> Generator[Query, Any, Zone]:
        """Fetch `name`'s DNSKEY set and trust it via DS (or anchor keys)."""
        cached = self.run.v.cache.get(("zone", name, 0), self.run.now)
        if isinstance(cached, Zone):
            self.run.clamp(cached.expires)
            return cached
        if ds:
            usable_ds = [
                d
                for d in ds
                if d.digest_type in SUPPORTED_DIGESTS and d.algorithm in SUPPORTED_ALGORITHMS
            ]
            if not usable_ds:
                return Zone(
                    name,
                    False,
                    reason=f"DS of {name} uses only unsupported algorithms/digests",
                )
        else:
            usable_anchor = [k for k in anchor_keys if k.algorithm in SUPPORTED_ALGORITHMS]
            if not usable_anchor:
                return Zone(
                    name, False, reason=f"trust anchor keys of {name} use unsupported algorithms"
                )
        msg = yield from self.fetch.ask(name, dns.rdatatype.DNSKEY)
        rrset = msg.get_rrset(msg.answer, name, dns.rdataclass.IN, dns.rdatatype.DNSKEY)
        sigs = msg.get_rrset(
            msg.answer, name, dns.rdataclass.IN, dns.rdatatype.RRSIG, dns.rdatatype.DNSKEY
        )
        if rrset is None or len(rrset) == 0:
            raise Abort(Status.BOGUS, f"zone {name}: no DNSKEY set returned", name)
        if ds:
            trusted = self.sigs.ds_trusted(name, rrset, usable_ds)
            if not trusted:
                tags = ", ".join(str(d.key_tag) for d in usable_ds)
                raise Abort(
                    Status.BOGUS, f"zone {name}: no DNSKEY matches its DS (key tags {tags})", name
                )
        else:
            trusted = [k for k in rrset if k in usable_anchor]
            if not trusted:
                raise Abort(Status.BOGUS, f"zone {name}: trust anchor key not in DNSKEY set", name)
        before = self.run.expires
        self.run.expires = math.inf
        self.sigs.verify(
            rrset, sigs, Zone(name, True, dns.rdataset.from_rdata_list(0, trusted)), "DNSKEY"
        )
        expires = self.run.expires
        self.run.expires = min(before, expires)
        zone = Zone(name, True, keys=rrset.to_rdataset(), expires=expires)
        return zone

    def anchor_zone(self, name: Name) -> Generator[Query, Any, Zone]:
        anchor = self.run.v.anchors.closest(name)
        if anchor is None:
            raise Abort(Status.INDETERMINATE, f"no trust anchor covers {name}")
        zone = yield from self.zone_keys(anchor.name, anchor.ds, anchor.dnskeys)
        if zone.secure:
            self.run.v.cache.put(("zone", zone.name, 0), zone, zone.expires, self.run.now)
        return zone

    def zone_for(self, target: Name) -> Generator[Query, Any, Zone]:
        """The deepest secure zone holding `target`, or the insecure cut above it."""
        zone = yield from self.anchor_zone(target)
        if not zone.secure:
            return zone
        depth = len(zone.name)
        while depth < len(target):
            depth += 1
            name = Name(target.labels[len(target.labels) - depth :])
            step = yield from self.ds_step(zone, name)
            self.run.clamp(step.expires)
            if step.kind is _Step.NXDOMAIN:
                break
            if step.kind is _Step.NOT_CUT:
                continue
            if step.kind is _Step.INSECURE:
                return Zone(name, False, reason=step.reason, expires=step.expires)
            child = yield from self.zone_keys(name, step.ds)
            if not child.secure:
                return child
            self.run.v.cache.put(("zone", child.name, 0), child, child.expires, self.run.now)
            zone = child
        return zone

    def ds_step(self, parent: Zone, name: Name) -> Generator[Query, Any, _DsStep]:
        """Is `name` a zone cut below `parent`, and is it signed? (proven)."""
        key = ("ds", name, 0)
        cached = self.run.v.cache.get(key, self.run.now)
        if isinstance(cached, _DsStep):
            return cached
        outer = self.run.expires
        self.run.expires = math.inf
        step = yield from self._ds_step(parent, name)
        step = replace(step, expires=min(step.expires, self.run.expires))
        self.run.expires = outer
        self.run.v.cache.put(key, step, step.expires, self.run.now)
        return step

    def _ds_step(self, parent: Zone, name: Name) -> Generator[Query, Any, _DsStep]:
        msg = yield from self.fetch.ask(name, dns.rdatatype.DS)
        ds = msg.get_rrset(msg.answer, name, dns.rdataclass.IN, dns.rdatatype.DS)
        if ds is not None and len(ds) > 0 and msg.rcode() == dns.rcode.NOERROR:
            sigs = msg.get_rrset(
                msg.answer, name, dns.rdataclass.IN, dns.rdatatype.RRSIG, dns.rdatatype.DS
            )
            self.sigs.verify(ds, sigs, parent, "DS")
            usable = [
                d
                for d in ds
                if d.digest_type in SUPPORTED_DIGESTS and d.algorithm in SUPPORTED_ALGORITHMS
            ]
            if not usable:
                return _DsStep(
                    _Step.INSECURE,
                    reason=f"DS of {name} uses only unsupported algorithms/digests",
                )
            return _DsStep(_Step.CUT, ds=tuple(ds))
        cname = msg.get_rrset(msg.answer, name, dns.rdataclass.IN, dns.rdatatype.CNAME)
        if cname is not None and len(cname) > 0:
            sigs = msg.get_rrset(
                msg.answer, name, dns.rdataclass.IN, dns.rdatatype.RRSIG, dns.rdatatype.CNAME
            )
            self.sigs.verify(cname, sigs, parent, "CNAME")
            return _DsStep(_Step.NOT_CUT)
        proof = self.denial.prove(msg, name, dns.rdatatype.DS, parent)
        if proof.kind is Proof.NXDOMAIN:
            return _DsStep(_Step.NXDOMAIN)
        if proof.kind is Proof.OPTOUT:
            return _DsStep(
                _Step.INSECURE,
                reason=f"no secure DS denial for {name} in {parent.name} ({proof.note})",
            )
        if proof.has_ns:
            return _DsStep(
                _Step.INSECURE, reason=f"unsigned delegation from {parent.name} to {name}"
            )
        return _DsStep(_Step.NOT_CUT)
