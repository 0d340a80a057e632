"""IKEv2 key schedule against published vectors.

Sources:
- RFC 4868 §2.7.1 (PRF-HMAC-SHA-256/512 test cases, taken from RFC 4231).
- NIST ACVP "kdf-components / ikev2" sample vectors (usnistgov/ACVP-Server gen-val) were
  examined but not used: their g^ir lengths are not whole bytes (e.g. 5829 bits), which an
  IKE implementation never sees and HMAC over bytes cannot reproduce.
- libreswan's IKEv2 KDF CAVS tool (programs/cavp, Stephan Mueller / Andrew Cagney),
  whose comment records the output of NSS for one SHA-1 input set: an independent
  implementation's derivation of SKEYSEED, DKM, DKM(Child SA), DKM(Child SA D-H) and
  SKEYSEED(Rekey).
"""

from __future__ import annotations

import pytest

from oe_router.ike.constants import PrfId
from oe_router.ike.keys import (
    Prf,
    child_keymat,
    ike_sa_keys,
    rekey_skeyseed,
    skeyseed,
    split_child_keymat,
)


@pytest.mark.parametrize(
    ("prf_id", "key", "data", "expected"),
    [
        # RFC 4868 §2.7.1 Test Case PRF-1 (= RFC 4231 test case 1)
        (
            PrfId.HMAC_SHA2_256,
            bytes([0x0B] * 20),
            b"Hi There",
            "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7",
        ),
        # RFC 4868 §2.7.1 Test Case PRF-2 ("Jefe")
        (
            PrfId.HMAC_SHA2_256,
            b"Jefe",
            b"what do ya want for nothing?",
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843",
        ),
        # RFC 4868 §2.7.1 Test Case PRF-1 for PRF-HMAC-SHA-512
        (
            PrfId.HMAC_SHA2_512,
            bytes([0x0B] * 20),
            b"Hi There",
            "87aa7cdea5ef619d4ff0b4241a1d6cb02379f4e2ce4ec2787ad0b30545e17cde"
            "daa833b7d6b8a702038b274eaea3f4e4be9d914eeb61f1702e696c203a126854",
        ),
    ],
)
def test_prf_rfc4868(prf_id: int, key: bytes, data: bytes, expected: str) -> None:
    assert Prf(prf_id)(key, data).hex() == expected


def _cavp_checks(
    prf: Prf,
    ni: bytes,
    nr: bytes,
    gir: bytes,
    gir_new: bytes,
    spi_i: bytes,
    spi_r: bytes,
    exp_seed: str,
    exp_dkm: str,
    exp_child: str,
    exp_child_dh: str,
    exp_rekey: str,
) -> None:
    """SP 800-135 IKEv2 KDF: SKEYSEED, DKM = prf+(SKEYSEED, Ni|Nr|SPIi|SPIr), SK_d = the
    first prf-length bytes of DKM, child DKMs and the rekey SKEYSEED."""
    seed = skeyseed(prf, ni, nr, gir)
    assert seed.hex() == exp_seed.lower()
    dkm = prf.plus(seed, ni + nr + spi_i + spi_r, len(exp_dkm) // 2)
    assert dkm.hex() == exp_dkm.lower()
    sk_d = dkm[: prf.output_len]
    assert child_keymat(prf, sk_d, ni, nr, len(exp_child) // 2).hex() == exp_child.lower()
    assert (
        child_keymat(prf, sk_d, ni, nr, len(exp_child_dh) // 2, gir_new).hex()
        == exp_child_dh.lower()
    )
    assert rekey_skeyseed(prf, sk_d, gir_new, ni, nr).hex() == exp_rekey.lower()


def test_kdf_libreswan_nss_sha1_cross_check() -> None:
    """Same inputs through libreswan+NSS (-h 2 = PRF HMAC-SHA1, -l 132 bytes)."""
    _cavp_checks(
        Prf(PrfId.HMAC_SHA1),
        ni=bytes.fromhex("32b50d5f4a3763f3"),
        nr=bytes.fromhex("9206a04b26564cb1"),
        gir=bytes.fromhex("4b2c1f971981a8ad8d0abeafabf38cf75fc8349c148142465ed9c8b516b8be52"),
        gir_new=bytes.fromhex("863f3c9d06efd39d2b907b97f8699e5dd5251ef64a2a176f36ee40c87d4f9330"),
        spi_i=bytes.fromhex("34c9e7c188868785"),
        spi_r=bytes.fromhex("3ff77d760d2b2199"),
        exp_seed="a9a7b222b59f8f48645f28a1db5b5f5d7479cba7",
        exp_dkm="a14293677cc80ff8f9cc0eee30d895da9d8f405666e30ef0dfcb63c634a46002a2a63080e514a062768b76606f9fa5e992204fc5a670bde3f10d6b027113936a5c55b648a194ae587b0088d52204b702c979fa280870d2ed41efa9c549fd11198af1670b143d384bd275c5f594cf266b05ebadca855e4249520a441a81157435a7a56cc4",
        exp_child="8059e3ee8810e6c3a91bc8bcd2a7a41151b8d0e6ae239c7b38093ad85ef4c5811a8e7b5d1cdabd9560b2d5e092d1f24e2d4b85eccdf0ad0dc9abd94b51ee71814ca6dbc8bb51b6309f5b9545c7eb35cf5580b1e521a8fe20754a2d883ba0c2cf285f524aea6545b33106bc03e614296d319d41d4b50b3f510b1c0a22f3e664994d234cb4",
        exp_child_dh="bb43244c1860ad65ee1e211ffe8bb3661750c8f89cb9f547df7f4fa61d37301628190e38c66232eab4b3ab14c400a5197dd3730ed4820a8a10394d51e1c0400052f63ebd36b0e7ef53aaed31eba4a5080d7d4b5666023a8bbb5ffb7857240f9a05884d1b7d2f933708450b7b3288f1fc863ab49fa901227cffc06e27899c7054d56fd74c",
        exp_rekey="63e81194946ebd05df7df5ebf5d8750056bf1f1d",
    )


def test_ike_sa_keys_split_order_and_sizes() -> None:
    """The seven keys are consecutive slices of one prf+ stream in RFC 7296 §2.14 order."""
    prf = Prf(PrfId.HMAC_SHA2_256)
    seed = bytes(range(32))
    ni, nr, si, sr = b"n" * 32, b"r" * 32, b"i" * 8, b"s" * 8
    keys = ike_sa_keys(prf, seed, ni, nr, si, sr, integ_key_len=32, encr_key_len=16)
    stream = prf.plus(seed, ni + nr + si + sr, 32 * 3 + 32 * 2 + 16 * 2)
    assert keys.sk_d == stream[:32]
    assert keys.sk_ai == stream[32:64] and keys.sk_ar == stream[64:96]
    assert keys.sk_ei == stream[96:112] and keys.sk_er == stream[112:128]
    assert keys.sk_pi == stream[128:160] and keys.sk_pr == stream[160:192]
    aead = ike_sa_keys(prf, seed, ni, nr, si, sr, integ_key_len=0, encr_key_len=36)
    assert aead.sk_ai == b"" and len(aead.sk_ei) == 36 and aead.sk_ei == stream[32:68]


def test_split_child_keymat() -> None:
    km = bytes(range(2 * (20 + 32)))
    k = split_child_keymat(km, 20, 32)
    assert (k.encr_i, k.integ_i) == (km[:20], km[20:52])
    assert (k.encr_r, k.integ_r) == (km[52:72], km[72:])


def test_prf_plus_limit() -> None:
    prf = Prf(PrfId.HMAC_SHA2_256)
    assert len(prf.plus(b"k", b"s", 255 * 32)) == 255 * 32
    with pytest.raises(ValueError):
        prf.plus(b"k", b"s", 255 * 32 + 1)
