"""Signature checks of one DNSSEC validation run, within the run's work budget.

Why a collaborator of its own: every public-key operation of a run goes through here,
so the KeyTrap limits (`MAX_SIGNATURE_CHECKS`, `MAX_SIGNATURE_FAILURES`,
`MAX_KEYS_PER_TAG`, CVE-2023-50387) are counted in one place whoever asks: the chain
walker (DNSKEY, DS), the denial prover (NSEC, NSEC3) or the answer itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import dns.exception
import dns.name
import dns.rdatatype
import dns.rrset

from .dnssec_crypto import ds_digest, verify_rrsig
from .dnssec_values import (
    REVOKE,
    SUPPORTED_ALGORITHMS,
    Abort,
    Name,
    RunState,
    Status,
    Zone,
    index_keys,
    label_count,
    tname,
)


class SignatureChecker:
    """RRSIG and DS checks for one run; counts its public-key operations and failures."""

    def __init__(self, run: RunState) -> None:
        self.run = run
        self.checks = 0  #: public-key operations spent (MAX_SIGNATURE_CHECKS)
        self.failures = 0  #: of which failed (MAX_SIGNATURE_FAILURES)

    def verify(
        self, rrset: dns.rrset.RRset, sigs: dns.rrset.RRset | None, zone: Zone, what: str
    ) -> Any:
        """Check `rrset` against RRSIGs by `zone`'s keys; return the RRSIG used."""
        assert zone.keys is not None
        label = f"{what} {rrset.name}/{tname(rrset.rdtype)}"
        if sigs is None or len(sigs) == 0:
            raise Abort(Status.BOGUS, f"{label}: missing RRSIG in secure zone {zone.name}")
        by_zone = [s for s in sigs if s.signer == zone.name]
        if not by_zone:
            signers = ", ".join(sorted({str(s.signer) for s in sigs}))
            raise Abort(
                Status.BOGUS,
                f"{label}: signed by {signers}, but the data belongs to zone {zone.name}",
                zone.name,
            )
        owner_labels = label_count(rrset.name)
        problems: list[str] = []
        skew = self.run.v.clock_skew
        for sig in by_zone:
            if sig.type_covered != rrset.rdtype:
                continue
            if sig.algorithm not in SUPPORTED_ALGORITHMS:
                problems.append(f"RRSIG algorithm {sig.algorithm} unsupported")
                continue
            if sig.labels > owner_labels:
                problems.append(f"RRSIG labels {sig.labels} > owner labels {owner_labels}")
                continue
            if sig.expiration + skew < self.run.now:
                problems.append(f"RRSIG (key {sig.key_tag}) expired at {sig.expiration}")
                continue
            if sig.inception - skew > self.run.now:
                problems.append(f"RRSIG (key {sig.key_tag}) not valid before {sig.inception}")
                continue
            cands = [
                k
                for k in zone.by_tag.get((sig.algorithm, sig.key_tag), ())
                if not (k.flags & REVOKE and rrset.rdtype != dns.rdatatype.DNSKEY)
            ]
            if not cands:
                problems.append(f"no DNSKEY {sig.key_tag}/alg {sig.algorithm} in {zone.name}")
                continue
            if len(cands) > self.run.v.max_keys_per_tag:
                self.run.limit(
                    f"{len(cands)} DNSKEYs of {zone.name} share key tag {sig.key_tag} "
                    f"(limit {self.run.v.max_keys_per_tag})",
                    zone.name,
                )
            inside = min(max(self.run.now, float(sig.inception)), float(sig.expiration))
            failed = ""
            for key in cands:
                failed = self.check(rrset, sig, key, zone.name, inside)
                if not failed:
                    ttl = min(rrset.ttl, sig.original_ttl)
                    self.run.clamp(min(self.run.now + ttl, float(sig.expiration)))
                    return sig
            problems.append(f"signature by key {sig.key_tag} does not verify ({failed})")
        if len(problems) > 3:
            problems[3:] = [f"{len(problems) - 3} more"]
        detail = "; ".join(problems) if problems else "no RRSIG covers the type"
        raise Abort(Status.BOGUS, f"{label} in zone {zone.name}: {detail}", zone.name)

    def check(self, rrset: dns.rrset.RRset, sig: Any, key: Any, signer: Name, when: float) -> str:
        """One public-key operation within the run's budget: "" if `key` made `sig`, else why."""
        if self.checks >= self.run.v.max_signature_checks:
            self.run.limit(f"{self.checks} signature checks", signer)
        self.checks += 1
        try:
            verify_rrsig(rrset, sig, key, when)
        except (dns.exception.DNSException, ValueError) as exc:
            self.failures += 1
            if self.failures >= self.run.v.max_signature_failures:
                self.run.limit(f"{self.failures} failed signature checks", signer)
            return str(exc) or type(exc).__name__
        return ""

    def ds_trusted(self, name: Name, rrset: dns.rrset.RRset, usable_ds: Sequence[Any]) -> list[Any]:
        """The DNSKEYs some DS matches; each key is hashed at most once per digest type."""
        by_tag = index_keys(k for k in rrset if not k.flags & REVOKE)
        digests: dict[tuple[int, int], bytes | None] = {}
        trusted: dict[int, Any] = {}
        for d in usable_ds:
            cands = by_tag.get((d.algorithm, d.key_tag), ())
            if len(cands) > self.run.v.max_keys_per_tag:
                self.run.limit(
                    f"{len(cands)} DNSKEYs of {name} share DS key tag {d.key_tag} "
                    f"(limit {self.run.v.max_keys_per_tag})",
                    name,
                )
            for key in cands:
                memo = (id(key), d.digest_type)
                if memo not in digests:
                    try:
                        digests[memo] = ds_digest(name, key, d.digest_type)
                    except (dns.exception.DNSException, ValueError):
                        digests[memo] = None
                if digests[memo] == d.digest:
                    trusted[id(key)] = key
        return list(trusted.values())
