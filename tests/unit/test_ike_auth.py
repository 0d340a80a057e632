"""AUTH payloads: RFC 7427 AlgorithmIdentifiers, signatures, NULL auth, negotiation.

Sources:
- RFC 7427 Appendix A (A.1.2-A.1.4 sha*WithRSAEncryption, A.3.2 ecdsa-with-SHA256,
  A.4.3 RSASSA-PSS with SHA-256): exact DER bytes, cross-checked against the
  transcriptions in public IKE code (a Go IKEv2 library's Asn* constants).
- RFC 8420 §2/§3: Ed25519 in IKEv2 (id-Ed25519 AlgorithmIdentifier, hash IDENTITY).
- RFC 7296 §2.15: <SignedOctets> and the shared-key AUTH formula; RFC 7619 §2.1: NULL auth.
"""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from oe_router.ike.auth import (
    ECDSA_P256_SHA256,
    ED25519,
    KEY_PAD,
    RSA_PKCS1_SHA256,
    RSA_PKCS1_SHA384,
    RSA_PKCS1_SHA512,
    RSA_PSS_SHA256,
    RSA_PSS_SHA384,
    RSA_PSS_SHA512,
    PrivateKey,
    choose_scheme,
    null_auth,
    signature_auth,
    signed_octets,
    verify_null_auth,
    verify_signature_auth,
)
from oe_router.ike.constants import AuthMethod, HashAlgorithm, IdType, NotifyType, PrfId
from oe_router.ike.errors import IkeProtocolError
from oe_router.ike.keys import Prf
from oe_router.ike.payloads import AUTH, IDi


def test_rfc7427_appendix_a_algorithm_identifiers() -> None:
    assert RSA_PKCS1_SHA256.algorithm_identifier.hex() == "300d06092a864886f70d01010b0500"  # A.1.2
    assert RSA_PKCS1_SHA384.algorithm_identifier.hex() == "300d06092a864886f70d01010c0500"  # A.1.3
    assert RSA_PKCS1_SHA512.algorithm_identifier.hex() == "300d06092a864886f70d01010d0500"  # A.1.4
    assert ECDSA_P256_SHA256.algorithm_identifier.hex() == "300a06082a8648ce3d040302"  # A.3.2
    assert RSA_PSS_SHA256.algorithm_identifier.hex() == (  # A.4.3
        "304606092a864886f70d01010a3039a00f300d06096086480165030402010500a11c301a06092a864886"
        "f70d010108300d06096086480165030402010500a203020120a303020101"
    )
    assert ED25519.algorithm_identifier.hex() == "300506032b6570"  # RFC 8420 §3


def test_pss_variants_and_strict_der_spelling() -> None:
    # Strict DER omits the default trailerField; both spellings must verify.
    assert RSA_PSS_SHA256.also_accepted[0].hex() == (
        "304106092a864886f70d01010a3034a00f300d06096086480165030402010500a11c301a06092a864886"
        "f70d010108300d06096086480165030402010500a203020120"
    )
    assert RSA_PSS_SHA384.also_accepted[0].hex() == (
        "304106092a864886f70d01010a3034a00f300d06096086480165030402020500a11c301a06092a864886"
        "f70d010108300d06096086480165030402020500a203020130"
    )
    assert RSA_PSS_SHA512.also_accepted[0].hex() == (
        "304106092a864886f70d01010a3034a00f300d06096086480165030402030500a11c301a06092a864886"
        "f70d010108300d06096086480165030402030500a203020140"
    )


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(65537, 2048)


def _keys(rsa_key: rsa.RSAPrivateKey) -> dict[str, PrivateKey]:
    return {
        "rsa": rsa_key,
        "p256": ec.generate_private_key(ec.SECP256R1()),
        "ed25519": ed25519.Ed25519PrivateKey.generate(),
    }


ALL_HASHES = [1, 2, 3, 4, 5]


@pytest.mark.parametrize(
    ("kind", "peer_hashes", "expected"),
    [
        ("rsa", ALL_HASHES, RSA_PSS_SHA256),
        ("rsa", [HashAlgorithm.SHA2_512], RSA_PSS_SHA512),
        ("p256", ALL_HASHES, ECDSA_P256_SHA256),
        ("ed25519", ALL_HASHES, ED25519),
        ("ed25519", [HashAlgorithm.SHA2_256], None),
        ("p256", [HashAlgorithm.SHA2_384], None),
        ("rsa", None, None),
    ],
)
def test_choose_scheme(
    rsa_key: rsa.RSAPrivateKey, kind: str, peer_hashes: list[int] | None, expected: object
) -> None:
    assert choose_scheme(_keys(rsa_key)[kind], peer_hashes) == expected


def test_choose_scheme_pkcs1_when_pss_off(rsa_key: rsa.RSAPrivateKey) -> None:
    assert choose_scheme(rsa_key, ALL_HASHES, rsa_pss=False) == RSA_PKCS1_SHA256


@pytest.mark.parametrize("kind", ["rsa", "p256", "ed25519"])
@pytest.mark.parametrize("pss", [True, False])
def test_signature_auth_round_trip_and_tamper(
    rsa_key: rsa.RSAPrivateKey, kind: str, pss: bool
) -> None:
    key = _keys(rsa_key)[kind]
    octets = b"signed octets" * 7
    auth = signature_auth(key, octets, ALL_HASHES, rsa_pss=pss)
    assert auth.method == AuthMethod.DIGITAL_SIGNATURE
    blob_len = auth.data[0]
    scheme = verify_signature_auth(auth, key.public_key(), octets)
    assert scheme is not None and auth.data[1 : 1 + blob_len] == scheme.algorithm_identifier
    with pytest.raises(IkeProtocolError) as exc:
        verify_signature_auth(auth, key.public_key(), octets + b"!")
    assert exc.value.notify == NotifyType.AUTHENTICATION_FAILED
    other = _keys(rsa.generate_private_key(65537, 1024) if kind == "rsa" else rsa_key)[kind]
    with pytest.raises(IkeProtocolError):
        verify_signature_auth(auth, other.public_key(), octets)


def test_pss_strict_der_blob_from_peer_verifies(rsa_key: rsa.RSAPrivateKey) -> None:
    octets = b"hello"
    sig = rsa_key.sign(
        octets, padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32), hashes.SHA256()
    )
    blob = RSA_PSS_SHA256.also_accepted[0]
    auth = AUTH(AuthMethod.DIGITAL_SIGNATURE, bytes([len(blob)]) + blob + sig)
    assert verify_signature_auth(auth, rsa_key.public_key(), octets) == RSA_PSS_SHA256


def test_rsa_method_1_fallback(rsa_key: rsa.RSAPrivateKey) -> None:
    auth = signature_auth(rsa_key, b"data", None)
    assert auth.method == AuthMethod.RSA_DIGITAL_SIGNATURE
    rsa_key.public_key().verify(auth.data, b"data", padding.PKCS1v15(), hashes.SHA1())
    assert verify_signature_auth(auth, rsa_key.public_key(), b"data") is None
    with pytest.raises(IkeProtocolError):
        signature_auth(ed25519.Ed25519PrivateKey.generate(), b"data", None)


@pytest.mark.parametrize("data", [b"", b"\x40" + b"\x00" * 10, b"\x05\x30\x03\x06\x01\x00sig"])
def test_malformed_signature_auth_refused(rsa_key: rsa.RSAPrivateKey, data: bytes) -> None:
    with pytest.raises(IkeProtocolError):
        verify_signature_auth(AUTH(AuthMethod.DIGITAL_SIGNATURE, data), rsa_key.public_key(), b"x")


def test_signed_octets_and_null_auth() -> None:
    prf = Prf(PrfId.HMAC_SHA2_256)
    sk_pi = bytes(range(32))
    ident = IDi(IdType.ID_NULL, b"")
    octets = signed_octets(b"MSG", b"NONCE", prf, sk_pi, ident)
    assert octets == b"MSG" + b"NONCE" + prf(sk_pi, bytes([IdType.ID_NULL, 0, 0, 0]))
    auth = null_auth(prf, sk_pi, octets)
    assert auth.method == AuthMethod.NULL and int(AuthMethod.NULL) == 13
    assert (
        auth.data == prf(prf(sk_pi, b"Key Pad for IKEv2"), octets)
        and KEY_PAD == b"Key Pad for IKEv2"
    )
    verify_null_auth(auth, prf, sk_pi, octets)
    with pytest.raises(IkeProtocolError):
        verify_null_auth(auth, prf, bytes(32), octets)
    with pytest.raises(IkeProtocolError):
        verify_null_auth(AUTH(AuthMethod.SHARED_KEY_MIC, auth.data), prf, sk_pi, octets)
