"""IPSECKEY (RFC 4025) records turned into typed peer keys.

Only the key is taken from a record. The gateway field is never used to send
traffic anywhere: a record that names a gateway could otherwise make the router
deliver a client's traffic to a third party. The key is bound to the queried
host's own addresses, and the ignored gateway is reported so the caller can log
it.

Key formats (IANA "IPSECKEY Resource Record Parameters", checked against
libreswan's showhostkey/pluto):

- 0: no key. libreswan publishes this to say "I take anonymous (NULL-auth) OE".
- 2: RSA, RFC 3110 section 2 (exponent length, exponent, modulus).
- 3: ECDSA, RFC 6605 section 4 via RFC 8005: raw X || Y (64 bytes for P-256).
  libreswan emits exactly that and also accepts a leading 0x04 point-format
  octet, so we do too.
- 4: EdDSA, RFC 8080 section 3 via RFC 9373: the raw 32-byte Ed25519 key
  (libreswan's `showhostkey --ipseckey` for an EdDSA host key).
- 5: not IANA-assigned; libreswan's `showhostkey --ipseckey --pubkey` emits a
  DER SubjectPublicKeyInfo under this value. Accepted for RSA, P-256 and
  Ed25519 keys because libreswan hosts publish it.
"""

from __future__ import annotations

import base64
import enum
from collections.abc import Iterable
from dataclasses import field

import dns.name
import dns.rdatatype
import dns.rrset
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat, load_der_public_key
from dns.rdtypes.IN.IPSECKEY import IPSECKEY

from oe_router.records import record
from oe_router.storedkey import StoredP256Key

__all__ = [
    "ALG_ECDSA",
    "ALG_EDDSA",
    "ALG_LIBRESWAN_SPKI",
    "ALG_NONE",
    "ALG_RSA",
    "GatewayIgnored",
    "IpseckeyError",
    "IpseckeySet",
    "KeyKind",
    "PeerKey",
    "PublicKey",
    "interpret",
    "interpret_rrset",
    "rdata_text",
]

ALG_NONE = 0
ALG_DSA = 1
ALG_RSA = 2
ALG_ECDSA = 3
ALG_EDDSA = 4
ALG_LIBRESWAN_SPKI = 5

GATEWAY_NONE = 0
_GATEWAY_NAMES = {1: "IPv4", 2: "IPv6", 3: "name"}

#: RFC 8247 asks for at least 2048-bit RSA in IKEv2; smaller keys are refused.
DEFAULT_MIN_RSA_BITS = 2048

PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey


class KeyKind(enum.Enum):
    """What the IKE side must do to authenticate this peer."""

    NONE = "none"  #: algorithm 0: the host takes NULL-auth (anonymous) OE
    RSA = "rsa"
    ECDSA_P256 = "ecdsa_p256"
    ED25519 = "ed25519"


@record(frozen=True)
class GatewayIgnored:
    """A record named a gateway; we used its key for the host only (log this)."""

    owner: dns.name.Name
    gateway_type: int
    gateway: str

    @property
    def message(self) -> str:
        kind = _GATEWAY_NAMES.get(self.gateway_type, str(self.gateway_type))
        return (
            f"IPSECKEY at {self.owner} names {kind} gateway {self.gateway}; the gateway is "
            f"ignored and the key is used only for {self.owner}'s own addresses"
        )


@record(frozen=True)
class PeerKey:
    """A usable key from one IPSECKEY record (only meaningful if DNSSEC-secure)."""

    kind: KeyKind
    public_key: PublicKey | None  #: None exactly when kind is KeyKind.NONE
    precedence: int  #: lower is preferred (RFC 4025 section 2.2)
    owner: dns.name.Name  #: the host name that was queried
    algorithm: int  #: the record's algorithm field as published
    gateway_ignored: GatewayIgnored | None = None


@record(frozen=True)
class IpseckeyError:
    """One record could not be used; `message` names it and says why."""

    owner: dns.name.Name
    record: str  #: the record in presentation format
    reason: str

    @property
    def message(self) -> str:
        return f"IPSECKEY {self.owner} {self.record}: {self.reason}"


@record(frozen=True)
class IpseckeySet:
    """All records of one owner, interpreted: keys best-first, plus what to log."""

    owner: dns.name.Name
    keys: tuple[PeerKey, ...] = ()
    errors: tuple[IpseckeyError, ...] = ()
    warnings: tuple[GatewayIgnored, ...] = field(default=())

    @property
    def best(self) -> PeerKey | None:
        """The preferred key (lowest precedence), or None if no record was usable."""
        return self.keys[0] if self.keys else None


class _BadKey(ValueError):
    """A key blob that does not decode; turned into IpseckeyError here."""


def rsa_from_rfc3110(blob: bytes, min_bits: int) -> rsa.RSAPublicKey:
    """An RSA key in RFC 3110 form (IPSECKEY and DNSKEY alike); ValueError if it is not one
    or its modulus is shorter than ``min_bits``."""
    if not blob:
        raise _BadKey("empty RSA key")
    if blob[0] == 0:
        if len(blob) < 3:
            raise _BadKey("RSA key truncated in the exponent length")
        exp_len = int.from_bytes(blob[1:3], "big")
        rest = blob[3:]
    else:
        exp_len = blob[0]
        rest = blob[1:]
    if exp_len == 0 or len(rest) <= exp_len:
        raise _BadKey("RSA key has no modulus after its exponent")
    exponent = int.from_bytes(rest[:exp_len], "big")
    modulus = int.from_bytes(rest[exp_len:], "big")
    bits = modulus.bit_length()
    if bits < min_bits:
        raise _BadKey(f"RSA modulus is {bits} bits, below the minimum of {min_bits}")
    try:
        return rsa.RSAPublicNumbers(exponent, modulus).public_key()
    except ValueError as exc:
        raise _BadKey(f"invalid RSA key: {exc}") from None


def _p256_from_raw(blob: bytes) -> ec.EllipticCurvePublicKey:
    if len(blob) == 65 and blob[0] == 0x04:
        point = blob
    elif len(blob) == 64:
        point = b"\x04" + blob
    elif len(blob) in (96, 97, 132, 133):
        raise _BadKey("ECDSA key is not on P-256 (P-384/P-521 are not supported)")
    else:
        raise _BadKey(f"ECDSA key has {len(blob)} bytes; P-256 needs 64 (X || Y)")
    try:
        return StoredP256Key(point)  # 65 bytes kept, not an OpenSSL key (docs/footprint.md)
    except ValueError:
        raise _BadKey("ECDSA key is not a point on P-256") from None


def _ed25519_from_raw(blob: bytes) -> ed25519.Ed25519PublicKey:
    if len(blob) == 57:
        raise _BadKey("EdDSA key is Ed448, which is not supported")
    if len(blob) != 32:
        raise _BadKey(f"EdDSA key has {len(blob)} bytes; Ed25519 needs 32")
    return ed25519.Ed25519PublicKey.from_public_bytes(blob)


def _from_spki(blob: bytes, min_bits: int) -> tuple[KeyKind, PublicKey]:
    try:
        key = load_der_public_key(blob)
    except (ValueError, UnsupportedAlgorithm):
        raise _BadKey("key is not a DER SubjectPublicKeyInfo") from None
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < min_bits:
            raise _BadKey(f"RSA modulus is {key.key_size} bits, below the minimum of {min_bits}")
        return KeyKind.RSA, key
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, ec.SECP256R1):
            raise _BadKey(f"ECDSA curve {key.curve.name} is not supported (only P-256)")
        point = key.public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
        return KeyKind.ECDSA_P256, StoredP256Key(point)
    if isinstance(key, ed25519.Ed25519PublicKey):
        return KeyKind.ED25519, key
    raise _BadKey(f"public key type {type(key).__name__} is not supported")


def _decode(algorithm: int, blob: bytes, min_bits: int) -> tuple[KeyKind, PublicKey | None]:
    if algorithm == ALG_NONE:
        if blob:
            raise _BadKey("algorithm 0 (no key) but a key is present")
        return KeyKind.NONE, None
    if algorithm == ALG_RSA:
        return KeyKind.RSA, rsa_from_rfc3110(blob, min_bits)
    if algorithm == ALG_ECDSA:
        return KeyKind.ECDSA_P256, _p256_from_raw(blob)
    if algorithm == ALG_EDDSA:
        return KeyKind.ED25519, _ed25519_from_raw(blob)
    if algorithm == ALG_LIBRESWAN_SPKI:
        return _from_spki(blob, min_bits)
    if algorithm == ALG_DSA:
        raise _BadKey("algorithm 1 (DSA) is not supported")
    raise _BadKey(f"unknown algorithm {algorithm}")


def interpret(
    owner: dns.name.Name,
    rdata: IPSECKEY,
    *,
    min_rsa_bits: int = DEFAULT_MIN_RSA_BITS,
) -> PeerKey | IpseckeyError:
    """Turn one record of `owner` into a key for `owner`'s own addresses, or an error.

    Never raises for bad record content: the error value names the record.
    """
    try:
        kind, key = _decode(rdata.algorithm, rdata.key, min_rsa_bits)
    except _BadKey as exc:
        return IpseckeyError(owner=owner, record=str(rdata), reason=str(exc))
    ignored = None
    if rdata.gateway_type != GATEWAY_NONE:
        ignored = GatewayIgnored(
            owner=owner, gateway_type=rdata.gateway_type, gateway=str(rdata.gateway)
        )
    return PeerKey(
        kind=kind,
        public_key=key,
        precedence=rdata.precedence,
        owner=owner,
        algorithm=rdata.algorithm,
        gateway_ignored=ignored,
    )


def interpret_rrset(
    rrset: dns.rrset.RRset | Iterable[IPSECKEY],
    owner: dns.name.Name | None = None,
    *,
    min_rsa_bits: int = DEFAULT_MIN_RSA_BITS,
) -> IpseckeySet:
    """Interpret every record; keys come out sorted by precedence (best first).

    `owner` is the name the LAN client asked for. It defaults to the RRset's
    owner; pass the original query name when the answer came through a CNAME,
    because the key belongs to the host that was asked about.
    """
    if owner is None:
        if not isinstance(rrset, dns.rrset.RRset):
            raise TypeError("owner is required when records are not an RRset")
        owner = rrset.name
    keys: list[PeerKey] = []
    errors: list[IpseckeyError] = []
    warnings: list[GatewayIgnored] = []
    for rdata in rrset:
        if not isinstance(rdata, IPSECKEY):
            errors.append(
                IpseckeyError(owner=owner, record=str(rdata), reason="not an IPSECKEY record")
            )
            continue
        item = interpret(owner, rdata, min_rsa_bits=min_rsa_bits)
        if isinstance(item, IpseckeyError):
            errors.append(item)
            continue
        keys.append(item)
        if item.gateway_ignored is not None:
            warnings.append(item.gateway_ignored)
    keys.sort(key=lambda k: k.precedence)
    return IpseckeySet(
        owner=owner, keys=tuple(keys), errors=tuple(errors), warnings=tuple(warnings)
    )


def is_ipseckey_rrset(rrset: dns.rrset.RRset) -> bool:
    """True if the RRset holds IPSECKEY records (helper for callers)."""
    return rrset.rdtype == dns.rdatatype.IPSECKEY


def _rsa_to_rfc3110(key: rsa.RSAPublicKey) -> bytes:
    numbers = key.public_numbers()
    exponent = numbers.e.to_bytes((numbers.e.bit_length() + 7) // 8, "big")
    modulus = numbers.n.to_bytes((numbers.n.bit_length() + 7) // 8, "big")
    length = bytes([len(exponent)]) if len(exponent) < 256 else b"\0" + len(exponent).to_bytes(2)
    return length + exponent + modulus


def rdata_text(key: PublicKey, precedence: int = 10) -> str:
    """Our own public key as IPSECKEY rdata, no gateway: what to publish for our identity
    (``10 0 3 . <base64>``), in the form ``interpret`` reads back (RFC 4025 section 2.1,
    algorithm 3 raw X || Y, 4 raw Ed25519, 2 RFC 3110)."""
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        algorithm = ALG_ECDSA
        blob = key.public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)[1:]
    elif isinstance(key, ed25519.Ed25519PublicKey):
        algorithm, blob = ALG_EDDSA, key.public_bytes(Encoding.Raw, PublicFormat.Raw)
    elif isinstance(key, rsa.RSAPublicKey):
        algorithm, blob = ALG_RSA, _rsa_to_rfc3110(key)
    else:
        raise ValueError(f"{type(key).__name__} keys cannot be published in IPSECKEY here")
    return f"{precedence} {GATEWAY_NONE} {algorithm} . {base64.b64encode(blob).decode()}"
