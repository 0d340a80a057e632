"""IKE SA payload protection (SK/SKF) and Diffie-Hellman groups, on ``cryptography``.

Why a small interface: the message layer only needs "seal these bytes under
this header" and "open them"; which cipher, IV rule and ICV rule applies is
decided once, here, from the negotiated transform IDs.
"""

from __future__ import annotations

import functools
import hmac as _stdlib_hmac
from abc import ABC, abstractmethod
from collections.abc import Callable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as crypto_hmac
from cryptography.hazmat.primitives.asymmetric import dh, ec, x25519
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from oe_router.records import record

from .constants import DhId, EncrId, IntegId, NotifyType
from .errors import IkeCryptoError, IkeProtocolError

RandomBytes = Callable[[int], bytes]

# --------------------------------------------------------------------------- SK protection


class SkCipher(ABC):
    """How one negotiated ENCR(+INTEG) protects an SK or SKF payload body.

    ``head`` is every message byte before the IV (IKE header, SK/SKF header and,
    for SKF, the fragment numbers): AAD for AEADs, MAC prefix for CBC+HMAC.
    """

    encr_key_len: int  # bytes of SK_e (for AEADs this includes the 4-byte salt)
    integ_key_len: int  # bytes of SK_a (0 for AEADs)
    iv_len: int
    icv_len: int
    block_len: int  # plaintext (incl. Pad Length octet) is padded to a multiple of this

    def padded(self, plaintext: bytes) -> bytes:
        """Append zero padding and the Pad Length octet (RFC 7296 §3.14)."""
        pad = (-(len(plaintext) + 1)) % self.block_len
        return plaintext + bytes(pad) + bytes([pad])

    def sealed_len(self, plaintext_len: int) -> int:
        """Length of IV||ciphertext||ICV for an unpadded plaintext of this length."""
        padded = plaintext_len + 1 + (-(plaintext_len + 1)) % self.block_len
        return self.iv_len + padded + self.icv_len

    @abstractmethod
    def seal(self, sk_e: bytes, sk_a: bytes, iv: bytes, head: bytes, plaintext: bytes) -> bytes:
        """Return IV || ciphertext || ICV for ``plaintext`` (padding added here)."""

    @abstractmethod
    def open(self, sk_e: bytes, sk_a: bytes, head: bytes, body: bytes) -> bytes:
        """Verify and decrypt IV || ciphertext || ICV; return plaintext without padding."""

    @staticmethod
    def unpad(padded: bytes) -> bytes:
        if not padded or padded[-1] + 1 > len(padded):
            raise IkeCryptoError("bad Pad Length in decrypted SK payload")
        return padded[: len(padded) - 1 - padded[-1]]


class AeadSkCipher(SkCipher):
    """AES-GCM-16 (RFC 5282) or ChaCha20-Poly1305 (RFC 7634): 8-byte explicit IV,
    nonce = 4-byte salt (tail of SK_e) || IV, 16-byte ICV, AAD = header bytes."""

    def __init__(self, encr_id: int, key_bytes: int) -> None:
        self.encr_id = encr_id
        self.encr_key_len = key_bytes + 4
        self.integ_key_len = 0
        self.iv_len = 8
        self.icv_len = 16
        self.block_len = 1  # no alignment needed for AEADs in IKE (RFC 7634 App. B)

    def _aead(self, key: bytes) -> AESGCM | ChaCha20Poly1305:
        return ChaCha20Poly1305(key) if self.encr_id == EncrId.CHACHA20_POLY1305 else AESGCM(key)

    def seal(self, sk_e: bytes, sk_a: bytes, iv: bytes, head: bytes, plaintext: bytes) -> bytes:
        if len(iv) != 8 or len(sk_e) != self.encr_key_len:
            raise ValueError("AEAD SK: wrong IV or key length")
        key, salt = sk_e[:-4], sk_e[-4:]
        return iv + self._aead(key).encrypt(salt + iv, self.padded(plaintext), head)

    def open(self, sk_e: bytes, sk_a: bytes, head: bytes, body: bytes) -> bytes:
        if len(body) < self.iv_len + self.icv_len + 1:
            raise IkeCryptoError(f"SK payload of {len(body)} bytes is too short")
        key, salt = sk_e[:-4], sk_e[-4:]
        try:
            padded = self._aead(key).decrypt(salt + body[:8], body[8:], head)
        except InvalidTag:
            raise IkeCryptoError("SK payload failed its integrity check") from None
        return self.unpad(padded)


class CbcHmacSkCipher(SkCipher):
    """AES-CBC with a block-sized random IV and a truncated HMAC over head||IV||ciphertext."""

    _INTEG = {
        IntegId.HMAC_SHA2_256_128: (hashes.SHA256, 32, 16),
        IntegId.HMAC_SHA2_384_192: (hashes.SHA384, 48, 24),
        IntegId.HMAC_SHA2_512_256: (hashes.SHA512, 64, 32),
        IntegId.HMAC_SHA1_96: (hashes.SHA1, 20, 12),
    }

    def __init__(self, key_bytes: int, integ_id: int) -> None:
        if integ_id not in self._INTEG:
            raise ValueError(f"unsupported IKE integrity transform {integ_id}")
        self.hash, self.integ_key_len, self.icv_len = self._INTEG[IntegId(integ_id)]
        self.encr_key_len = key_bytes
        self.iv_len = 16
        self.block_len = 16

    def _mac(self, sk_a: bytes, data: bytes) -> bytes:
        h = crypto_hmac.HMAC(sk_a, self.hash())
        h.update(data)
        return h.finalize()[: self.icv_len]

    def seal(self, sk_e: bytes, sk_a: bytes, iv: bytes, head: bytes, plaintext: bytes) -> bytes:
        if len(iv) != 16:
            raise ValueError("AES-CBC SK: IV must be 16 bytes")
        enc = Cipher(algorithms.AES(sk_e), modes.CBC(iv)).encryptor()
        ct = enc.update(self.padded(plaintext)) + enc.finalize()
        return iv + ct + self._mac(sk_a, head + iv + ct)

    def open(self, sk_e: bytes, sk_a: bytes, head: bytes, body: bytes) -> bytes:
        ct_len = len(body) - self.iv_len - self.icv_len
        if ct_len <= 0 or ct_len % self.block_len:
            raise IkeCryptoError(f"SK payload of {len(body)} bytes is not IV+blocks+ICV")
        icv = body[-self.icv_len :]
        if not _stdlib_hmac.compare_digest(icv, self._mac(sk_a, head + body[: -self.icv_len])):
            raise IkeCryptoError("SK payload failed its integrity check")
        iv, ct = body[:16], body[16 : -self.icv_len]
        dec = Cipher(algorithms.AES(sk_e), modes.CBC(iv)).decryptor()
        return self.unpad(dec.update(ct) + dec.finalize())


@functools.lru_cache(maxsize=32)
def sk_cipher(encr_id: int, key_bits: int | None, integ_id: int | None) -> SkCipher:
    """The SkCipher for a negotiated IKE ENCR (+ key length) and INTEG transform; one
    shared object per transform (they hold no keys), not one per IKE SA."""
    if encr_id == EncrId.AES_GCM_16 and key_bits in (128, 192, 256):
        return AeadSkCipher(encr_id, key_bits // 8)
    if encr_id == EncrId.CHACHA20_POLY1305 and key_bits in (None, 256):
        return AeadSkCipher(encr_id, 32)
    if encr_id == EncrId.AES_CBC and key_bits in (128, 192, 256) and integ_id is not None:
        return CbcHmacSkCipher(key_bits // 8, integ_id)
    raise ValueError(f"unsupported IKE cipher: encr {encr_id}/{key_bits} integ {integ_id}")


# --------------------------------------------------------------------------- Diffie-Hellman

MODP_2048_P = int(
    "FFFFFFFFFFFFFFFFC90FDAA22168C234C4C6628B80DC1CD129024E088A67CC74"
    "020BBEA63B139B22514A08798E3404DDEF9519B3CD3A431B302B0A6DF25F1437"
    "4FE1356D6D51C245E485B576625E7EC6F44C42E9A637ED6B0BFF5CB6F406B7ED"
    "EE386BFB5A899FA5AE9F24117C4B1FE649286651ECE45B3DC2007CB8A163BF05"
    "98DA48361C55D39A69163FA8FD24CF5F83655D23DCA3AD961C62F356208552BB"
    "9ED529077096966D670C354E4ABC9804F1746C08CA18217C32905E462E36CE3B"
    "E39E772C180E86039B2783A2EC07A28FB5C55DF06F4C52C9DE2BCBF695581718"
    "3995497CEA956AE515D2261898FA051015728E5A8AACAA68FFFFFFFFFFFFFFFF",
    16,
)  # RFC 3526 §3, generator 2
MODP_2048_G = 2


class KeyExchange(ABC):
    """Our half of one Diffie-Hellman exchange."""

    group: int
    public_len: int

    @property
    @abstractmethod
    def public_bytes(self) -> bytes:
        """KE payload data for our public value."""

    @abstractmethod
    def shared_secret(self, peer_public: bytes) -> bytes:
        """g^ir; raises IkeProtocolError(INVALID_SYNTAX) for an invalid peer value."""

    def _bad(self, why: str) -> IkeProtocolError:
        return IkeProtocolError(NotifyType.INVALID_SYNTAX, f"DH group {self.group}: {why}")


class Ecp256Exchange(KeyExchange):
    """Group 19: public value x||y (RFC 5903 §7), shared secret is x only."""

    group = DhId.ECP_256
    public_len = 64

    def __init__(self, private: ec.EllipticCurvePrivateKey) -> None:
        self._private = private

    @classmethod
    def generate(cls) -> Ecp256Exchange:
        return cls(ec.generate_private_key(ec.SECP256R1()))

    @classmethod
    def from_private_value(cls, value: int) -> Ecp256Exchange:
        return cls(ec.derive_private_key(value, ec.SECP256R1()))

    @property
    def public_bytes(self) -> bytes:
        nums = self._private.public_key().public_numbers()
        return nums.x.to_bytes(32, "big") + nums.y.to_bytes(32, "big")

    def shared_secret(self, peer_public: bytes) -> bytes:
        if len(peer_public) != 64:
            raise self._bad(f"public value of {len(peer_public)} bytes, expected 64")
        try:
            peer = ec.EllipticCurvePublicKey.from_encoded_point(
                ec.SECP256R1(), b"\x04" + peer_public
            )
            return self._private.exchange(ec.ECDH(), peer)
        except ValueError:
            raise self._bad("public value is not a point on P-256") from None


class X25519Exchange(KeyExchange):
    """Group 31 (RFC 8031): 32-byte u-coordinates; an all-zero result is refused."""

    group = DhId.CURVE25519
    public_len = 32

    def __init__(self, private: x25519.X25519PrivateKey) -> None:
        self._private = private

    @classmethod
    def generate(cls) -> X25519Exchange:
        return cls(x25519.X25519PrivateKey.generate())

    @classmethod
    def from_private_bytes(cls, data: bytes) -> X25519Exchange:
        return cls(x25519.X25519PrivateKey.from_private_bytes(data))

    @property
    def public_bytes(self) -> bytes:
        return self._private.public_key().public_bytes_raw()

    def shared_secret(self, peer_public: bytes) -> bytes:
        if len(peer_public) != 32:
            raise self._bad(f"public value of {len(peer_public)} bytes, expected 32")
        try:
            secret = self._private.exchange(x25519.X25519PublicKey.from_public_bytes(peer_public))
        except ValueError:
            raise self._bad("low-order public value (all-zero shared secret)") from None
        if secret == bytes(32):
            raise self._bad("all-zero shared secret")
        return secret


class Modp2048Exchange(KeyExchange):
    """Group 14 (RFC 3526): 256-byte values; peer y must satisfy 1 < y < p-1."""

    group = DhId.MODP_2048
    public_len = 256

    def __init__(self, private: dh.DHPrivateKey) -> None:
        self._private = private

    @staticmethod
    def _numbers() -> dh.DHParameterNumbers:
        return dh.DHParameterNumbers(MODP_2048_P, MODP_2048_G)

    @classmethod
    def generate(cls) -> Modp2048Exchange:
        return cls(cls._numbers().parameters().generate_private_key())

    @classmethod
    def from_private_value(cls, x: int) -> Modp2048Exchange:
        pn = cls._numbers()
        pub = dh.DHPublicNumbers(pow(MODP_2048_G, x, MODP_2048_P), pn)
        return cls(dh.DHPrivateNumbers(x, pub).private_key())

    @property
    def public_bytes(self) -> bytes:
        return self._private.public_key().public_numbers().y.to_bytes(256, "big")

    def shared_secret(self, peer_public: bytes) -> bytes:
        if len(peer_public) != 256:
            raise self._bad(f"public value of {len(peer_public)} bytes, expected 256")
        y = int.from_bytes(peer_public, "big")
        if not 1 < y < MODP_2048_P - 1:
            raise self._bad("public value outside 1 < y < p-1")
        try:
            peer = dh.DHPublicNumbers(y, self._numbers()).public_key()
            secret = self._private.exchange(peer)
        except ValueError:
            raise self._bad("public value refused") from None
        return secret.rjust(256, b"\x00")


@record(frozen=True)
class DhGroupInfo:
    group: int
    public_len: int
    generate: Callable[[], KeyExchange]


def dh_group(group: int) -> DhGroupInfo:
    """The supported DH group with this IANA number; ValueError if unsupported."""
    if group == DhId.ECP_256:
        return DhGroupInfo(group, 64, Ecp256Exchange.generate)
    if group == DhId.CURVE25519:
        return DhGroupInfo(group, 32, X25519Exchange.generate)
    if group == DhId.MODP_2048:
        return DhGroupInfo(group, 256, Modp2048Exchange.generate)
    raise ValueError(f"unsupported DH group {group}")


SUPPORTED_DH_GROUPS = (DhId.CURVE25519, DhId.ECP_256, DhId.MODP_2048)
