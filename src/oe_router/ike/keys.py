"""IKEv2 key schedule (RFC 7296 §2.13, §2.14, §2.17, §2.18).

Pure functions of their inputs, so they can be checked against published KDF
vectors (NIST SP 800-135 IKEv2 KDF) and against a peer's key log.
"""

from __future__ import annotations

import functools
from dataclasses import field

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as crypto_hmac

from oe_router.records import record

from .constants import PrfId


class Prf:
    """An HMAC-based IKE PRF; ``output_len`` is also its preferred key length."""

    __slots__ = ("_hash", "output_len", "prf_id")  # two per IKE SA

    _HASHES: dict[int, type[hashes.HashAlgorithm]] = {
        PrfId.HMAC_SHA1: hashes.SHA1,
        PrfId.HMAC_SHA2_256: hashes.SHA256,
        PrfId.HMAC_SHA2_384: hashes.SHA384,
        PrfId.HMAC_SHA2_512: hashes.SHA512,
    }

    def __init__(self, prf_id: int) -> None:
        if prf_id not in self._HASHES:
            raise ValueError(f"unsupported PRF transform {prf_id}")
        self.prf_id = prf_id
        self._hash = self._HASHES[prf_id]
        self.output_len: int = self._hash().digest_size

    def __call__(self, key: bytes, data: bytes) -> bytes:
        h = crypto_hmac.HMAC(key, self._hash())
        h.update(data)
        return h.finalize()

    def plus(self, key: bytes, seed: bytes, length: int) -> bytes:
        """prf+ (RFC 7296 §2.13): T1 = prf(K, S | 0x01), Tn = prf(K, Tn-1 | S | n)."""
        if length > 255 * self.output_len:
            raise ValueError(f"prf+ cannot produce {length} bytes")
        out = bytearray()
        t = b""
        n = 1
        while len(out) < length:
            t = self(key, t + seed + bytes([n]))
            out += t
            n += 1
        return bytes(out[:length])


@functools.lru_cache(maxsize=8)
def prf_of(prf_id: int) -> Prf:
    """The one shared ``Prf`` of a transform (it holds no key): not two per IKE SA."""
    return Prf(prf_id)


def skeyseed(prf: Prf, ni: bytes, nr: bytes, shared: bytes) -> bytes:
    """SKEYSEED = prf(Ni | Nr, g^ir) (RFC 7296 §2.14)."""
    return prf(ni + nr, shared)


def rekey_skeyseed(prf: Prf, sk_d_old: bytes, shared_new: bytes, ni: bytes, nr: bytes) -> bytes:
    """SKEYSEED for a rekeyed IKE SA = prf(SK_d (old), g^ir (new) | Ni | Nr) (§2.18).

    ``prf`` is the PRF of the *old* IKE SA.
    """
    return prf(sk_d_old, shared_new + ni + nr)


@record(frozen=True, slots=True)
class IkeSaKeys:
    """SK_* of one IKE SA; never in a repr (a logged object must not leak them)."""

    sk_d: bytes = field(repr=False)
    sk_ai: bytes = field(repr=False)
    sk_ar: bytes = field(repr=False)
    sk_ei: bytes = field(repr=False)
    sk_er: bytes = field(repr=False)
    sk_pi: bytes = field(repr=False)
    sk_pr: bytes = field(repr=False)


def ike_sa_keys(
    prf: Prf,
    seed: bytes,
    ni: bytes,
    nr: bytes,
    spi_i: bytes,
    spi_r: bytes,
    *,
    integ_key_len: int,
    encr_key_len: int,
) -> IkeSaKeys:
    """{SK_d | SK_ai | SK_ar | SK_ei | SK_er | SK_pi | SK_pr} = prf+(SKEYSEED, Ni|Nr|SPIi|SPIr).

    ``encr_key_len`` includes the 4-byte salt for AEADs; ``integ_key_len`` is 0 for them.
    """
    p = prf.output_len
    total = 3 * p + 2 * integ_key_len + 2 * encr_key_len
    km = prf.plus(seed, ni + nr + spi_i + spi_r, total)
    cuts = [p, integ_key_len, integ_key_len, encr_key_len, encr_key_len, p, p]
    parts: list[bytes] = []
    pos = 0
    for n in cuts:
        parts.append(km[pos : pos + n])
        pos += n
    return IkeSaKeys(*parts)


def child_keymat(
    prf: Prf, sk_d: bytes, ni: bytes, nr: bytes, length: int, shared_new: bytes | None = None
) -> bytes:
    """KEYMAT = prf+(SK_d, [g^ir (new) |] Ni | Nr) (RFC 7296 §2.17)."""
    return prf.plus(sk_d, (shared_new or b"") + ni + nr, length)


@record(frozen=True, slots=True)
class ChildSaKeys:
    """ESP keys per direction: *_i protect initiator->responder traffic."""

    encr_i: bytes = field(repr=False)
    integ_i: bytes = field(repr=False)
    encr_r: bytes = field(repr=False)
    integ_r: bytes = field(repr=False)


def split_child_keymat(keymat: bytes, encr_key_len: int, integ_key_len: int) -> ChildSaKeys:
    """Cut KEYMAT: encryption then integrity key for i->r, then the same for r->i (§2.17)."""
    e, a = encr_key_len, integ_key_len
    if len(keymat) != 2 * (e + a):
        raise ValueError("KEYMAT length does not match the key sizes")
    return ChildSaKeys(
        keymat[:e], keymat[e : e + a], keymat[e + a : 2 * e + a], keymat[2 * e + a :]
    )
