"""DNSSEC's cryptographic operations, for the algorithms and digests the validator accepts.

Why not ``dns.dnssec``: importing it imports ``dns.zone``, ``dns.transaction``, every
DNSSEC algorithm dnspython knows (DSA, Ed448 ...) and ``serialization.ssh``: ~0.8 MB of a
router's RAM and ~0.2 s of its start, for four functions. These are those four, on
cryptography and hashlib, with dnspython's rdata classes for the canonical forms
(RFC 4034 sections 3.1.8.1, 5.1.4, 6 and appendix B; RFC 5155 section 5; RFC 6840
section 5.1). The validator (`dnssec_sigs`, `anchors`) decides which keys and
signatures are tried; this module only computes.
"""

from __future__ import annotations

import hashlib
import struct
from typing import Any

import dns.name
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, utils

from .ipseckey import rsa_from_rfc3110

ZONE_KEY = 0x0100
#: DS digest types the validator accepts (RFC 4509, RFC 6605); SHA-1 DS records are not
#: used, as dnspython's default policy refused them.
_DIGESTS = {2: "sha256", 4: "sha384"}
_RSASHA256, _ECDSAP256SHA256, _ED25519 = 8, 13, 15
_RRSIG_HEADER = struct.Struct("!HBBIIIH")  # type covered .. key tag (RFC 4034 3.1)
_RR_FIXED = struct.Struct("!HHI")  # type, class, original TTL
_RDLENGTH = struct.Struct("!H")


class SignatureError(ValueError):
    """A signature that does not verify, or a key or signature that cannot be used."""


def key_tag(key: Any) -> int:
    """RFC 4034 appendix B: the 16-bit checksum of a DNSKEY's RDATA."""
    rdata = key.to_wire()
    if key.algorithm == 1:  # RSA/MD5: the modulus' second-to-last two octets
        return int(struct.unpack("!H", rdata[-3:-1])[0])
    total = 0
    for i, octet in enumerate(rdata):
        total += octet if i & 1 else octet << 8
    total += (total >> 16) & 0xFFFF
    return total & 0xFFFF


def ds_digest(owner: dns.name.Name, key: Any, digest_type: int) -> bytes:
    """RFC 4034 5.1.4: the digest of a DS record for ``key`` at ``owner``."""
    name = _DIGESTS.get(digest_type)
    if name is None:
        raise ValueError(f"DS digest type {digest_type} unsupported")
    return hashlib.new(name, owner.to_digestable() + key.to_wire()).digest()


def nsec3_digest(name: dns.name.Name, salt: bytes, iterations: int) -> bytes:
    """RFC 5155 section 5: the SHA-1 NSEC3 hash of ``name`` (hash algorithm 1)."""
    digest = hashlib.sha1(name.to_digestable() + salt).digest()
    for _ in range(iterations):
        digest = hashlib.sha1(digest + salt).digest()
    return digest


def verify_rrsig(rrset: Any, sig: Any, key: Any, now: float) -> None:
    """Raise SignatureError unless ``key`` (a DNSKEY) made ``sig`` over ``rrset`` and
    ``now`` lies within the signature's validity period."""
    if sig.expiration < now:
        raise SignatureError("expired")
    if sig.inception > now:
        raise SignatureError("not yet valid")
    if (
        key.algorithm != sig.algorithm
        or key_tag(key) != sig.key_tag
        or not key.flags & ZONE_KEY
        or key.protocol != 3
    ):
        raise SignatureError("the key is not the signature's zone key")
    data = signed_data(rrset, sig)
    try:
        _verify(sig.algorithm, key.key, sig.signature, data)
    except InvalidSignature:
        raise SignatureError("verify failure") from None


def signed_data(rrset: Any, sig: Any) -> bytes:
    """RFC 4034 3.1.8.1: what an RRSIG signs; a wildcard-expanded owner is signed as the
    wildcard its labels field names (RFC 4035 5.3.2). An owner that is itself a wildcard
    must be signed as that wildcard, as dnspython requires."""
    signer: dns.name.Name = sig.signer
    owner: dns.name.Name = rrset.name
    if not owner.is_subdomain(signer):
        raise SignatureError("rrset not signed by signer")
    labels = len(owner) - 1
    if owner.is_wild() and sig.labels != labels - 1:  # the "*" is not counted (RFC 4035 5.3.1)
        raise SignatureError("wild owner name has wrong label length")
    if labels < sig.labels:
        raise SignatureError("owner name longer than RRSIG labels")
    if sig.labels < labels:
        owner = dns.name.Name((b"*", *owner.labels[-(sig.labels + 1) :]))
    header = _RRSIG_HEADER.pack(
        sig.type_covered,
        sig.algorithm,
        sig.labels,
        sig.original_ttl,
        sig.expiration,
        sig.inception,
        sig.key_tag,
    )
    prefix = owner.to_digestable() + _RR_FIXED.pack(rrset.rdtype, rrset.rdclass, sig.original_ttl)
    parts = [header, signer.to_digestable()]
    for rdata in sorted(rd.to_digestable(signer) for rd in rrset):
        parts += (prefix, _RDLENGTH.pack(len(rdata)), rdata)
    return b"".join(parts)


def _verify(algorithm: int, blob: bytes, signature: bytes, data: bytes) -> None:
    """One public-key check; InvalidSignature if it fails, SignatureError if the key or
    signature cannot be used at all."""
    if algorithm == _RSASHA256:
        try:
            rsa_key = rsa_from_rfc3110(blob, 0)
        except ValueError as exc:
            raise SignatureError(f"bad RSA key: {exc}") from None
        rsa_key.verify(signature, data, padding.PKCS1v15(), hashes.SHA256())
    elif algorithm == _ECDSAP256SHA256:
        if len(blob) != 64 or len(signature) != 64:
            raise SignatureError("ECDSA P-256 key or signature is not 64 octets")
        try:
            ec_key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), b"\x04" + blob)
        except ValueError:
            raise SignatureError("ECDSA key is not a point on P-256") from None
        der = utils.encode_dss_signature(
            int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
        )
        ec_key.verify(der, data, ec.ECDSA(hashes.SHA256()))
    elif algorithm == _ED25519:
        try:
            ed_key = ed25519.Ed25519PublicKey.from_public_bytes(blob)
        except ValueError:
            raise SignatureError("Ed25519 key is not 32 octets") from None
        ed_key.verify(signature, data)
    else:
        raise SignatureError(f"algorithm {algorithm} unsupported")
