"""AUTH payload computation and verification (RFC 7296 §2.15, RFC 7619, RFC 7427, RFC 8420).

Why one module: every method signs the same <SignedOctets>; only the
primitive differs, and the choice of primitive is a negotiation
(SIGNATURE_HASH_ALGORITHMS) that belongs next to it.
"""

from __future__ import annotations

import hmac as _stdlib_hmac
from collections.abc import Iterable

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from oe_router.records import record

from .constants import AuthMethod, HashAlgorithm, NotifyType
from .errors import IkeProtocolError
from .keys import Prf
from .payloads import AUTH, IDi, IDr

KEY_PAD = b"Key Pad for IKEv2"

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey


def _checking_copy(key: PublicKey) -> PublicKey:
    """A short-lived copy of a peer's key to verify a signature with. OpenSSL 3 keeps what
    a verification prepares on the key object for as long as it lives (~1.9 KB for a
    P-256 key), and the daemon keeps each keyed peer's key object for as long as it
    knows the peer (docs/footprint.md); the copy costs ~25 us per IKE_AUTH."""
    der = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    copy = serialization.load_der_public_key(der)
    assert isinstance(copy, rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey)
    return copy


def signed_octets(
    message: bytes, peer_nonce: bytes, prf: Prf, sk_p: bytes, ident: IDi | IDr
) -> bytes:
    """<SignedOctets> = RealMessage | Nonce(peer) | prf(SK_px, IDx') (RFC 7296 §2.15).

    ``message`` is the exact IKE_SA_INIT message this side sent; ``ident`` its own ID
    payload (IDx' is the body without the generic header).
    """
    return message + peer_nonce + prf(sk_p, ident.encode())


def shared_key_auth(prf: Prf, secret: bytes, octets: bytes) -> bytes:
    """AUTH = prf(prf(Shared Secret, "Key Pad for IKEv2"), <SignedOctets>)."""
    return prf(prf(secret, KEY_PAD), octets)


def null_auth(prf: Prf, sk_p: bytes, octets: bytes) -> AUTH:
    """NULL authentication (RFC 7619 §2.1): the shared-key formula keyed with SK_pi/SK_pr."""
    return AUTH(AuthMethod.NULL, shared_key_auth(prf, sk_p, octets))


def verify_shared_key(auth: AUTH, method: int, prf: Prf, secret: bytes, octets: bytes) -> None:
    if auth.method != method:
        raise _auth_failed(f"AUTH method {auth.method}, expected {method}")
    if not _stdlib_hmac.compare_digest(auth.data, shared_key_auth(prf, secret, octets)):
        raise _auth_failed("AUTH value does not match")


def verify_null_auth(auth: AUTH, prf: Prf, sk_p: bytes, octets: bytes) -> None:
    """Check a peer's NULL AUTH; proves only that the peer knows the IKE SA keys."""
    verify_shared_key(auth, AuthMethod.NULL, prf, sk_p, octets)


def _auth_failed(why: str) -> IkeProtocolError:
    return IkeProtocolError(NotifyType.AUTHENTICATION_FAILED, why)


# --------------------------------------------------------------------------- RFC 7427 schemes


def _pss_algid(hash_oid: bytes, salt: int, trailer: bool) -> bytes:
    """DER of id-RSASSA-PSS with hash, MGF1(hash) and salt length (RFC 4055)."""
    h = b"\x30\x0d\x06\x09" + hash_oid + b"\x05\x00"
    mgf = b"\x30\x1a\x06\x09\x2a\x86\x48\x86\xf7\x0d\x01\x01\x08" + h
    params = b"\xa0\x0f" + h + b"\xa1\x1c" + mgf + b"\xa2\x03\x02\x01" + bytes([salt])
    if trailer:
        params += b"\xa3\x03\x02\x01\x01"
    body = b"\x06\x09\x2a\x86\x48\x86\xf7\x0d\x01\x01\x0a" + b"\x30" + bytes([len(params)]) + params
    return b"\x30" + bytes([len(body)]) + body


_SHA256_OID = bytes.fromhex("608648016503040201")
_SHA384_OID = bytes.fromhex("608648016503040202")
_SHA512_OID = bytes.fromhex("608648016503040203")


@record(frozen=True)
class SignatureScheme:
    """One RFC 7427 signature algorithm: its AlgorithmIdentifier and how to use it."""

    name: str
    algorithm_identifier: bytes
    hash_algorithm: HashAlgorithm
    kind: str  # "rsa-pkcs1", "rsa-pss", "ecdsa-p256", "ed25519"
    also_accepted: tuple[bytes, ...] = ()

    def _hash(self) -> hashes.HashAlgorithm:
        return {
            HashAlgorithm.SHA1: hashes.SHA1(),
            HashAlgorithm.SHA2_256: hashes.SHA256(),
            HashAlgorithm.SHA2_384: hashes.SHA384(),
            HashAlgorithm.SHA2_512: hashes.SHA512(),
        }[self.hash_algorithm]

    def _pss(self) -> padding.PSS:
        h = self._hash()
        return padding.PSS(mgf=padding.MGF1(h), salt_length=h.digest_size)

    def suits(self, key: PrivateKey | PublicKey) -> bool:
        if self.kind.startswith("rsa"):
            return isinstance(key, rsa.RSAPrivateKey | rsa.RSAPublicKey)
        if self.kind == "ecdsa-p256":
            return isinstance(
                key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey
            ) and isinstance(key.curve, ec.SECP256R1)
        return isinstance(key, ed25519.Ed25519PrivateKey | ed25519.Ed25519PublicKey)

    def sign(self, key: PrivateKey, data: bytes) -> bytes:
        if not self.suits(key):
            raise ValueError(f"{self.name} cannot sign with a {type(key).__name__}")
        if isinstance(key, rsa.RSAPrivateKey):
            pad = self._pss() if self.kind == "rsa-pss" else padding.PKCS1v15()
            return key.sign(data, pad, self._hash())
        if isinstance(key, ec.EllipticCurvePrivateKey):
            return key.sign(data, ec.ECDSA(self._hash()))  # DER Ecdsa-Sig-Value (RFC 7427 §3)
        return key.sign(data)

    def verify(self, key: PublicKey, signature: bytes, data: bytes) -> bool:
        if not self.suits(key):
            return False
        key = _checking_copy(key)
        try:
            if isinstance(key, rsa.RSAPublicKey):
                pad = self._pss() if self.kind == "rsa-pss" else padding.PKCS1v15()
                key.verify(signature, data, pad, self._hash())
            elif isinstance(key, ec.EllipticCurvePublicKey):
                key.verify(signature, data, ec.ECDSA(self._hash()))
            else:
                key.verify(signature, data)
        except (InvalidSignature, ValueError):
            return False
        return True


RSA_PKCS1_SHA256 = SignatureScheme(
    "rsa-pkcs1-sha256",
    bytes.fromhex("300d06092a864886f70d01010b0500"),
    HashAlgorithm.SHA2_256,
    "rsa-pkcs1",
)
RSA_PKCS1_SHA384 = SignatureScheme(
    "rsa-pkcs1-sha384",
    bytes.fromhex("300d06092a864886f70d01010c0500"),
    HashAlgorithm.SHA2_384,
    "rsa-pkcs1",
)
RSA_PKCS1_SHA512 = SignatureScheme(
    "rsa-pkcs1-sha512",
    bytes.fromhex("300d06092a864886f70d01010d0500"),
    HashAlgorithm.SHA2_512,
    "rsa-pkcs1",
)
# RFC 7427 A.4.3 writes the (default) trailerField explicitly; strict-DER encoders omit
# it, so both spellings are accepted on receipt.
RSA_PSS_SHA256 = SignatureScheme(
    "rsa-pss-sha256",
    _pss_algid(_SHA256_OID, 32, True),
    HashAlgorithm.SHA2_256,
    "rsa-pss",
    (_pss_algid(_SHA256_OID, 32, False),),
)
RSA_PSS_SHA384 = SignatureScheme(
    "rsa-pss-sha384",
    _pss_algid(_SHA384_OID, 48, True),
    HashAlgorithm.SHA2_384,
    "rsa-pss",
    (_pss_algid(_SHA384_OID, 48, False),),
)
RSA_PSS_SHA512 = SignatureScheme(
    "rsa-pss-sha512",
    _pss_algid(_SHA512_OID, 64, True),
    HashAlgorithm.SHA2_512,
    "rsa-pss",
    (_pss_algid(_SHA512_OID, 64, False),),
)
ECDSA_P256_SHA256 = SignatureScheme(
    "ecdsa-p256-sha256",
    bytes.fromhex("300a06082a8648ce3d040302"),
    HashAlgorithm.SHA2_256,
    "ecdsa-p256",
)
ED25519 = SignatureScheme(
    "ed25519", bytes.fromhex("300506032b6570"), HashAlgorithm.IDENTITY, "ed25519"
)

SIGNATURE_SCHEMES: tuple[SignatureScheme, ...] = (
    RSA_PSS_SHA256,
    RSA_PSS_SHA384,
    RSA_PSS_SHA512,
    RSA_PKCS1_SHA256,
    RSA_PKCS1_SHA384,
    RSA_PKCS1_SHA512,
    ECDSA_P256_SHA256,
    ED25519,
)

# Hash algorithms we announce in SIGNATURE_HASH_ALGORITHMS (RFC 7427 §4, RFC 8420 §2).
OUR_HASH_ALGORITHMS: tuple[HashAlgorithm, ...] = (
    HashAlgorithm.SHA2_256,
    HashAlgorithm.SHA2_384,
    HashAlgorithm.SHA2_512,
    HashAlgorithm.IDENTITY,
)


def scheme_for_algorithm_identifier(blob: bytes) -> SignatureScheme | None:
    for s in SIGNATURE_SCHEMES:
        if blob == s.algorithm_identifier or blob in s.also_accepted:
            return s
    return None


def choose_scheme(
    key: PrivateKey, peer_hashes: Iterable[int] | None, *, rsa_pss: bool = True
) -> SignatureScheme | None:
    """Our first scheme the key can make and the peer's hash list allows.

    ``peer_hashes`` None means the peer sent no SIGNATURE_HASH_ALGORITHMS: then only
    RSA method 1 remains (the caller's fallback), so None is returned.
    """
    if peer_hashes is None:
        return None
    allowed = set(peer_hashes)
    for s in SIGNATURE_SCHEMES:
        if s.kind == "rsa-pss" and not rsa_pss:
            continue
        if s.suits(key) and s.hash_algorithm in allowed:
            return s
    return None


def signature_auth(
    key: PrivateKey, octets: bytes, peer_hashes: Iterable[int] | None, *, rsa_pss: bool = True
) -> AUTH:
    """AUTH for a private key: RFC 7427 method 14 when negotiated, else RSA method 1.

    Raises IkeProtocolError(AUTHENTICATION_FAILED) when no method fits, e.g. an
    Ed25519 key towards a peer that does not announce IDENTITY.
    """
    scheme = choose_scheme(key, peer_hashes, rsa_pss=rsa_pss)
    if scheme is not None:
        blob = scheme.algorithm_identifier
        return AUTH(
            AuthMethod.DIGITAL_SIGNATURE, bytes([len(blob)]) + blob + scheme.sign(key, octets)
        )
    if isinstance(key, rsa.RSAPrivateKey):
        return AUTH(
            AuthMethod.RSA_DIGITAL_SIGNATURE, key.sign(octets, padding.PKCS1v15(), hashes.SHA1())
        )
    raise _auth_failed(f"no signature scheme for a {type(key).__name__} that the peer accepts")


def verify_signature_auth(
    auth: AUTH,
    key: PublicKey,
    octets: bytes,
    *,
    allowed: Iterable[SignatureScheme] = SIGNATURE_SCHEMES,
) -> SignatureScheme | None:
    """Verify a method-14 or method-1 AUTH against the peer's public key.

    Returns the RFC 7427 scheme used (None for RSA method 1). Raises
    IkeProtocolError(AUTHENTICATION_FAILED) on any mismatch.
    """
    if auth.method == AuthMethod.RSA_DIGITAL_SIGNATURE:
        if not isinstance(key, rsa.RSAPublicKey):
            raise _auth_failed("RSA signature method but the peer's key is not RSA")
        checker = _checking_copy(key)
        assert isinstance(checker, rsa.RSAPublicKey)
        try:
            checker.verify(auth.data, octets, padding.PKCS1v15(), hashes.SHA1())
        except (InvalidSignature, ValueError):
            raise _auth_failed("RSA (method 1) signature does not verify") from None
        return None
    if auth.method != AuthMethod.DIGITAL_SIGNATURE:
        raise _auth_failed(f"AUTH method {auth.method} is not a signature method")
    if not auth.data or auth.data[0] + 1 > len(auth.data):
        raise _auth_failed("AUTH data has a bad AlgorithmIdentifier length")
    blob = auth.data[1 : 1 + auth.data[0]]
    scheme = scheme_for_algorithm_identifier(blob)
    if scheme is None or scheme not in tuple(allowed):
        raise _auth_failed(f"unsupported signature AlgorithmIdentifier {blob.hex()}")
    if not scheme.verify(key, auth.data[1 + auth.data[0] :], octets):
        raise _auth_failed(f"{scheme.name} signature does not verify with the peer's key")
    return scheme
