"""The software engine: ESP transforms on ``cryptography`` (OpenSSL), the always-there fallback.

Why it is an engine like the others: the chooser compares it with the hardware on the
same footing (same KATs, same measurement), and the datapath falls back to it without
a special case. ``cryptography`` is imported when a cipher is first made, so a daemon on
the kernel datapath never pays for it here.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence
from typing import Any

from .engine import (
    TRANSFORMS,
    AuthenticationFailed,
    EngineError,
    EngineKind,
    OpenRequest,
    SealRequest,
    Transform,
    open_each,
    seal_each,
)

__all__ = ["SoftwareEngine"]


def _aad(hdr: bytes, seq_hi: int | None) -> bytes:
    """RFC 4106 §5 / RFC 7634 §2.1: SPI || seq_lo, or SPI || seq_hi || seq_lo with ESN."""
    if seq_hi is None:
        return hdr
    return hdr[:4] + seq_hi.to_bytes(4, "big") + hdr[4:8]


def check_keys(engine: str, t: Transform, encr_key: bytes, integ_key: bytes) -> None:
    """EngineError naming the engine and transform when the key sizes do not fit."""
    if len(encr_key) != t.encr_key_len:
        raise EngineError(
            f"{engine}: {t.name} needs {t.encr_key_len} bytes of encryption key "
            f"(cipher {t.cipher_key_len} + salt {t.salt_len}), got {len(encr_key)}"
        )
    if len(integ_key) != t.auth_key_len:
        raise EngineError(
            f"{engine}: {t.name} needs {t.auth_key_len} bytes of integrity key, "
            f"got {len(integ_key)}"
        )


class _AeadCipher:
    """AES-GCM (RFC 4106) or ChaCha20-Poly1305 (RFC 7634): nonce = salt || IV."""

    def __init__(self, t: Transform, encr_key: bytes) -> None:
        from cryptography.hazmat.primitives.ciphers import aead

        key, self._salt = encr_key[: t.cipher_key_len], encr_key[t.cipher_key_len :]
        self._t = t
        impl: Any = aead.AESGCM(key) if t.cipher == "gcm(aes)" else aead.ChaCha20Poly1305(key)
        self._enc = impl.encrypt
        self._dec = impl.decrypt
        from cryptography.exceptions import InvalidTag

        self._invalid = InvalidTag

    @property
    def transform(self) -> Transform:
        return self._t

    def seal(self, hdr: bytes, seq_hi: int | None, iv: bytes, plaintext: bytes) -> bytes:
        out: bytes = self._enc(self._salt + iv, plaintext, _aad(hdr, seq_hi))
        return out

    def open(self, hdr: bytes, seq_hi: int | None, iv: bytes, sealed: bytes) -> bytes:
        try:
            out: bytes = self._dec(self._salt + iv, sealed, _aad(hdr, seq_hi))
        except self._invalid:
            raise AuthenticationFailed(f"{self._t.name}: ICV mismatch") from None
        return out

    def seal_many(self, batch: Sequence[SealRequest]) -> list[bytes]:
        return seal_each(self, batch)

    def open_many(self, batch: Sequence[OpenRequest]) -> list[bytes | None]:
        return open_each(self, batch)

    def close(self) -> None:
        return None


def _xor3(a: bytes, b: bytes, c: bytes) -> bytes:
    return (
        int.from_bytes(a, "big") ^ int.from_bytes(b, "big") ^ int.from_bytes(c, "big")
    ).to_bytes(16, "big")


class _CbcHmacCipher:
    """AES-CBC with HMAC-SHA2 (RFC 4303 §3.3.2, RFC 4868): encrypt, then MAC over
    SPI || seq_lo || IV || C (|| seq_hi with ESN), truncated to the ICV length.

    Why one running CBC context per direction instead of a new one per packet: building
    a ``Cipher`` costs about 5 us, four times the AES work of a full packet. A running
    CBC context chains from the last block it produced (``_last``); feeding it
    P1 ^ IV ^ last as the first block makes it compute E(P1 ^ IV), which is exactly CBC
    under this packet's IV, and the rest chains as usual. Decryption mirrors it: the
    running decryptor XORs the first block with its last input instead of the IV, so the
    IV is put back. The result is CBC with the caller's (random) IV, bit for bit.
    """

    def __init__(self, t: Transform, encr_key: bytes, integ_key: bytes) -> None:
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

        self._t = t
        zero = bytes(16)
        self._enc = Cipher(algorithms.AES(encr_key), modes.CBC(zero)).encryptor()
        self._dec = Cipher(algorithms.AES(encr_key), modes.CBC(zero)).decryptor()
        self._enc_last = zero
        self._dec_last = zero
        self._mac = hmac.new(integ_key, digestmod=t.hmac_hash or "sha256")

    @property
    def transform(self) -> Transform:
        return self._t

    def _icv(self, hdr: bytes, seq_hi: int | None, iv: bytes, ct: bytes) -> bytes:
        m = self._mac.copy()
        m.update(hdr)
        m.update(iv)
        m.update(ct)
        if seq_hi is not None:
            m.update(seq_hi.to_bytes(4, "big"))
        return m.digest()[: self._t.icv_len]

    def seal(self, hdr: bytes, seq_hi: int | None, iv: bytes, plaintext: bytes) -> bytes:
        if not plaintext or len(plaintext) % 16 or len(iv) != 16:
            raise EngineError(f"{self._t.name}: plaintext is not whole 16-byte blocks")
        first = _xor3(plaintext[:16], iv, self._enc_last)
        ct: bytes = self._enc.update(first + plaintext[16:])
        self._enc_last = ct[-16:]
        return ct + self._icv(hdr, seq_hi, iv, ct)

    def open(self, hdr: bytes, seq_hi: int | None, iv: bytes, sealed: bytes) -> bytes:
        n = self._t.icv_len
        ct, icv = sealed[:-n], sealed[-n:]
        if len(sealed) < n + 16 or len(ct) % 16 or len(iv) != 16:
            raise AuthenticationFailed(f"{self._t.name}: {len(sealed)} bytes is no ESP payload")
        if not hmac.compare_digest(icv, self._icv(hdr, seq_hi, iv, ct)):
            raise AuthenticationFailed(f"{self._t.name}: ICV mismatch")
        out: bytes = self._dec.update(ct)
        first = _xor3(out[:16], self._dec_last, iv)
        self._dec_last = ct[-16:]
        return first + out[16:]

    def seal_many(self, batch: Sequence[SealRequest]) -> list[bytes]:
        return seal_each(self, batch)

    def open_many(self, batch: Sequence[OpenRequest]) -> list[bytes | None]:
        return open_each(self, batch)

    def close(self) -> None:
        return None


class SoftwareEngine:
    """ESP on the CPU through OpenSSL (``cryptography``): every transform, always."""

    name = "software"
    kind = EngineKind.CPU

    def transforms(self) -> tuple[Transform, ...]:
        return tuple(TRANSFORMS.values())

    def driver(self, transform: Transform) -> str:
        return "openssl"

    def cipher(
        self, transform: Transform, encr_key: bytes, integ_key: bytes = b""
    ) -> _AeadCipher | _CbcHmacCipher:
        check_keys(self.name, transform, encr_key, integ_key)
        if transform.is_aead:
            return _AeadCipher(transform, encr_key)
        return _CbcHmacCipher(transform, encr_key, integ_key)
