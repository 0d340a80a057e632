"""The one Engine interface: ESP transforms, and the ciphers that seal and open ESP payloads.

Why one interface with the ESP layout inside it: an engine (the CPU through
``cryptography``, a kernel driver through AF_ALG, a /dev/crypto session) is only
useful to the datapath if it computes exactly what RFC 4106/4303/7634 put on the
wire. So a cipher takes the ESP header fields and returns ciphertext and ICV; where
the AAD and the IV go (and ESN's high sequence bits) is the engine's business, checked
by the same known-answer tests for every engine.

The ESP layer (``datapath/esp.py``) owns everything outside the crypto: sequence
numbers, anti-replay, padding and the trailer, IV generation. A cipher is bound to one
key (one SA direction) and is used by one thread at a time.

The layout, for an SA with SPI ``spi`` and 64-bit sequence number ``seq``:

* ``hdr`` = SPI (4 bytes) || low 32 bits of ``seq`` (4 bytes), as on the wire;
* AEADs (GCM, ChaCha20-Poly1305): nonce = salt (4, the key's last bytes) || IV (8);
  AAD = SPI || seq_lo, or SPI || seq_hi || seq_lo with ESN (RFC 4106 §5, RFC 7634 §2.1);
* AES-CBC + HMAC-SHA2 (RFC 4303 §3.3.2, RFC 4868): C = CBC(IV 16, plaintext);
  ICV = HMAC(SPI || seq_lo || IV || C [|| seq_hi with ESN]) truncated.

``plaintext`` is the whole encrypted part of the ESP payload: the inner packet, the
padding, pad length and next header; the engine never looks inside.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import NamedTuple, Protocol, runtime_checkable

from oe_router.records import record

__all__ = [
    "TRANSFORMS",
    "AuthenticationFailed",
    "Engine",
    "EngineError",
    "EngineKind",
    "EspCipher",
    "OpenRequest",
    "SealRequest",
    "Transform",
    "open_each",
    "seal_each",
    "transform",
]


class EngineError(Exception):
    """An engine cannot do what was asked (transform, key, driver); the message names both."""


class AuthenticationFailed(Exception):
    """An ICV/tag did not verify: the packet is forged or corrupt (never a plaintext)."""


class EngineKind(enum.Enum):
    """Where the work runs: on the CPU (software, CPU instructions) or a separate engine."""

    CPU = "cpu"
    HARDWARE = "hardware"


@record(frozen=True)
class Transform:
    """An ESP transform: the cipher, the integrity algorithm and their key and wire sizes.

    ``name`` is the strongSwan keyword (as in ``oe.ike.esp_proposal``); ``aead`` is the
    kernel's AEAD name (AF_ALG type "aead", XFRM). Key material handed to a cipher is
    ``cipher_key_len + salt_len`` bytes of encryption key (the salt last, as IKE derives
    it) and ``auth_key_len`` bytes of integrity key.
    """

    name: str
    aead: str
    cipher: str  # the kernel's name of the bare cipher ("gcm(aes)", "cbc(aes)", ...)
    cipher_key_len: int
    salt_len: int
    auth_key_len: int
    hmac_hash: str | None  # "sha256"/"sha384"/"sha512" for HMAC transforms, None for AEADs
    iv_len: int
    icv_len: int
    block_size: int  # the plaintext is padded to a multiple of this (at least 4)
    ike_encr: int  # IKE transform IDs (RFC 7296 registry)
    ike_integ: int | None

    @property
    def is_aead(self) -> bool:
        return self.hmac_hash is None

    @property
    def encr_key_len(self) -> int:
        """Bytes of encryption key material (cipher key and salt)."""
        return self.cipher_key_len + self.salt_len

    def overhead(self, plaintext_len: int) -> int:
        """ESP bytes added around ``plaintext_len`` inner bytes (header, IV, trailer, ICV)."""
        padded = -(-(plaintext_len + 2) // self.block_size) * self.block_size
        return 8 + self.iv_len + padded - plaintext_len + self.icv_len


def _t(
    name: str,
    aead: str,
    cipher: str,
    klen: int,
    salt: int,
    alen: int,
    hmac: str | None,
    iv: int,
    icv: int,
    block: int,
    encr: int,
    integ: int | None,
) -> Transform:
    return Transform(name, aead, cipher, klen, salt, alen, hmac, iv, icv, block, encr, integ)


# IKE IDs: ENCR_AES_CBC 12, ENCR_AES_GCM_16 20, ENCR_CHACHA20_POLY1305 28;
# AUTH_HMAC_SHA2_256_128 12, _384_192 13, _512_256 14 (RFC 4868: the ICV is half the
# hash, the key its full output size).
_GCM = "rfc4106(gcm(aes))"
_CBC = "authenc(hmac(sha256),cbc(aes))"
_CBC384 = "authenc(hmac(sha384),cbc(aes))"
_CBC512 = "authenc(hmac(sha512),cbc(aes))"
_CHACHA = "rfc7539esp(chacha20,poly1305)"
_SHA256, _SHA384, _SHA512 = 12, 13, 14

#: The ESP transforms the project negotiates, by strongSwan keyword.
TRANSFORMS: Mapping[str, Transform] = MappingProxyType(
    {
        t.name: t
        for t in (
            _t("aes128gcm16", _GCM, "gcm(aes)", 16, 4, 0, None, 8, 16, 4, 20, None),
            _t("aes256gcm16", _GCM, "gcm(aes)", 32, 4, 0, None, 8, 16, 4, 20, None),
            _t("chacha20poly1305", _CHACHA, "rfc7539(chacha20,poly1305)", 32, 4, 0, None, 8,
               16, 4, 28, None),
            _t("aes128-sha256", _CBC, "cbc(aes)", 16, 0, 32, "sha256", 16, 16, 16, 12, _SHA256),
            _t("aes256-sha256", _CBC, "cbc(aes)", 32, 0, 32, "sha256", 16, 16, 16, 12, _SHA256),
            _t("aes128-sha384", _CBC384, "cbc(aes)", 16, 0, 48, "sha384", 16, 24, 16, 12,
               _SHA384),
            _t("aes256-sha384", _CBC384, "cbc(aes)", 32, 0, 48, "sha384", 16, 24, 16, 12,
               _SHA384),
            _t("aes128-sha512", _CBC512, "cbc(aes)", 16, 0, 64, "sha512", 16, 32, 16, 12,
               _SHA512),
            _t("aes256-sha512", _CBC512, "cbc(aes)", 32, 0, 64, "sha512", 16, 32, 16, 12,
               _SHA512),
        )
    }
)  # fmt: skip


def transform(encr: int, key_bits: int, integ: int | None) -> Transform:
    """The transform for IKE IDs and the cipher key size; EngineError names unknown ones."""
    for t in TRANSFORMS.values():
        if t.ike_encr == encr and t.cipher_key_len * 8 == key_bits and t.ike_integ == integ:
            return t
    raise EngineError(
        f"no ESP transform for encryption {encr} with a {key_bits}-bit key"
        f"{'' if integ is None else f' and integrity {integ}'}"
    )


class SealRequest(NamedTuple):
    """One packet to seal (batched form): the ESP header, ESN high bits, IV, plaintext.

    A NamedTuple, not a dataclass: one is built per packet (110 ns against 470 ns)."""

    hdr: bytes
    seq_hi: int | None
    iv: bytes
    plaintext: bytes


class OpenRequest(NamedTuple):
    """One packet to open (batched form): the ESP header, ESN high bits, IV, C || ICV."""

    hdr: bytes
    seq_hi: int | None
    iv: bytes
    sealed: bytes


class _OneByOne(Protocol):
    def seal(self, hdr: bytes, seq_hi: int | None, iv: bytes, plaintext: bytes) -> bytes: ...

    def open(self, hdr: bytes, seq_hi: int | None, iv: bytes, sealed: bytes) -> bytes: ...


def seal_each(cipher: _OneByOne, batch: Sequence[SealRequest]) -> list[bytes]:
    """The batched seal of a cipher that has no faster way: one ``seal`` per request."""
    return [cipher.seal(r.hdr, r.seq_hi, r.iv, r.plaintext) for r in batch]


def open_each(cipher: _OneByOne, batch: Sequence[OpenRequest]) -> list[bytes | None]:
    """The batched open of a cipher that has no faster way: None where the ICV failed."""
    out: list[bytes | None] = []
    for r in batch:
        try:
            out.append(cipher.open(r.hdr, r.seq_hi, r.iv, r.sealed))
        except AuthenticationFailed:
            out.append(None)
    return out


@runtime_checkable
class EspCipher(Protocol):
    """One SA direction's crypto on one engine (see the module docstring for the layout).

    ``seq_hi`` is the high 32 bits of the 64-bit sequence number when the SA uses ESN,
    None otherwise. ``seal`` returns ciphertext || ICV; ``open`` returns the plaintext or
    raises ``AuthenticationFailed``; both raise ``EngineError`` when the engine fails.
    """

    @property
    def transform(self) -> Transform: ...

    def seal(self, hdr: bytes, seq_hi: int | None, iv: bytes, plaintext: bytes) -> bytes: ...

    def open(self, hdr: bytes, seq_hi: int | None, iv: bytes, sealed: bytes) -> bytes: ...

    def seal_many(self, batch: Sequence[SealRequest]) -> list[bytes]:
        """Seal each request, in order (an engine may submit them together)."""
        ...

    def open_many(self, batch: Sequence[OpenRequest]) -> list[bytes | None]:
        """Open each request, in order; None where the ICV did not verify."""
        ...

    def close(self) -> None:
        """Release kernel objects (sockets, sessions); the cipher is unusable after."""
        ...


@runtime_checkable
class Engine(Protocol):
    """A crypto engine: a way to run ESP transforms (software, AF_ALG, /dev/crypto).

    ``name`` identifies the engine in ``oe offload``, the UCI ``offload`` option and the
    worker processes (``offload.make_engine(name)`` rebuilds it there): ``software``,
    ``afalg`` (the kernel's pick per algorithm), ``afalg:<driver>`` (that driver),
    ``cryptodev`` (/dev/crypto's pick), ``cryptodev:<driver>``.
    """

    @property
    def name(self) -> str: ...

    @property
    def kind(self) -> EngineKind: ...

    def transforms(self) -> tuple[Transform, ...]:
        """The transforms this engine can run here (may probe the kernel once)."""
        ...

    def driver(self, transform: Transform) -> str:
        """The implementation that runs ``transform`` ("openssl", a kernel driver name)."""
        ...

    def cipher(self, transform: Transform, encr_key: bytes, integ_key: bytes = b"") -> EspCipher:
        """A cipher for one SA direction; EngineError if the transform or keys do not fit."""
        ...
