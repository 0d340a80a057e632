"""Key material for the lab's IPsec peers and the router, and its DNS encodings.

Encodings (what goes in IPSECKEY, RFC 4025):
  algorithm 2 (RSA):   RFC 3110 -- exponent length (1 byte, or 0 + 2 bytes),
                       exponent, modulus; identical to DNSKEY RSA keys and to
                       libreswan's ``leftrsasigkey=0s<base64>`` raw key.
  algorithm 3 (ECDSA): RFC 6605 form -- uncompressed point without the 0x04
                       prefix, X || Y (64 bytes for P-256), as in DNSKEY alg 13.
"""

from __future__ import annotations

import base64
import datetime as dt
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import NameOID

IPSECKEY_ALG_NONE = 0
IPSECKEY_ALG_RSA = 2
IPSECKEY_ALG_ECDSA = 3


def rsa_rfc3110(public: rsa.RSAPublicKey) -> bytes:
    """RFC 3110 public key bytes."""
    nums = public.public_numbers()
    exp = nums.e.to_bytes((nums.e.bit_length() + 7) // 8, "big")
    mod = nums.n.to_bytes((nums.n.bit_length() + 7) // 8, "big")
    head = bytes([len(exp)]) if len(exp) < 256 else b"\x00" + len(exp).to_bytes(2, "big")
    return head + exp + mod


def ecdsa_rfc6605(public: ec.EllipticCurvePublicKey) -> bytes:
    """X || Y of an EC public key (no 0x04 point-format byte)."""
    point = public.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    return point[1:]


def private_pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    """Unencrypted PKCS#8 PEM (what /etc/oe/ and swanctl/private/ take)."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def public_pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    """SubjectPublicKeyInfo PEM (what swanctl/pubkey/ takes)."""
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def pkcs12_for_nss(key: rsa.RSAPrivateKey, name: str, password: bytes) -> bytes:
    """PKCS#12 with ``key`` and a self-signed cert (pk12util refuses a bare key).

    libreswan then finds the private key in NSS by the CKA_ID derived from the
    public key given as ``leftrsasigkey``; the certificate is never used.
    """
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=365))
        .sign(key, hashes.SHA256())
    )
    return pkcs12.serialize_key_and_certificates(
        name.encode(), key, cert, None, serialization.BestAvailableEncryption(password)
    )


@dataclass(frozen=True)
class RsaIdentity:
    """A raw RSA key of a libreswan peer."""

    key: rsa.RSAPrivateKey

    @property
    def dns_key(self) -> bytes:
        return rsa_rfc3110(self.key.public_key())

    @property
    def libreswan_pubkey(self) -> str:
        """``leftrsasigkey=`` value."""
        return "0s" + base64.b64encode(self.dns_key).decode()


@dataclass(frozen=True)
class EcIdentity:
    """An ECDSA P-256 key (router identity, strongSwan peer)."""

    key: ec.EllipticCurvePrivateKey

    @property
    def dns_key(self) -> bytes:
        return ecdsa_rfc6605(self.key.public_key())


def new_rsa(bits: int = 2048) -> RsaIdentity:
    return RsaIdentity(rsa.generate_private_key(public_exponent=65537, key_size=bits))


def new_ec() -> EcIdentity:
    return EcIdentity(ec.generate_private_key(ec.SECP256R1()))
