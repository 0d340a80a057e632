"""SK payload protection and DH groups against published vectors.

Sources:
- RFC 7634 Appendix B: ChaCha20-Poly1305 protecting a whole IKEv2 INFORMATIONAL
  message (key 80..9f, salt a0..a3, IV 10..17, SPIs c0..c7/d0..d7, message ID 9).
- RFC 5903 §8.1: 256-bit random ECP group (group 19) test vector.
- RFC 7748 §6.1: X25519 Diffie-Hellman test vector.
- RFC 3526 §3: 2048-bit MODP group, p = 2^2048 - 2^1984 - 1 + 2^64 * ([2^1918 pi] + 124476).
"""

from __future__ import annotations

import pytest

from oe_router.ike.constants import EncrId, ExchangeType, IntegId, NotifyType
from oe_router.ike.crypto import (
    MODP_2048_P,
    Ecp256Exchange,
    Modp2048Exchange,
    X25519Exchange,
    sk_cipher,
)
from oe_router.ike.errors import IkeCryptoError, IkeDecodeError, IkeProtocolError
from oe_router.ike.message import Message, decrypt
from oe_router.ike.payloads import Notify
from tests.ike_vectors import RFC7634_IV, RFC7634_KEY, RFC7634_MESSAGE


def test_rfc7634_appendix_b_decrypt() -> None:
    cipher = sk_cipher(EncrId.CHACHA20_POLY1305, None, None)
    msg = decrypt(RFC7634_MESSAGE, cipher, RFC7634_KEY, b"")
    assert msg.exchange_type == ExchangeType.INFORMATIONAL and msg.message_id == 9
    assert msg.payloads == [Notify(0, NotifyType.SET_WINDOW_SIZE, b"", bytes.fromhex("0000000a"))]


def test_rfc7634_appendix_b_encrypt_byte_exact() -> None:
    cipher = sk_cipher(EncrId.CHACHA20_POLY1305, 256, None)
    msg = Message(
        bytes(range(0xC0, 0xC8)),
        bytes(range(0xD0, 0xD8)),
        ExchangeType.INFORMATIONAL,
        0,
        9,
        [Notify.status(NotifyType.SET_WINDOW_SIZE, bytes.fromhex("0000000a"))],
    )
    assert msg.encrypt(cipher, RFC7634_KEY, b"", RFC7634_IV) == RFC7634_MESSAGE


def test_rfc7634_tampering_detected() -> None:
    cipher = sk_cipher(EncrId.CHACHA20_POLY1305, None, None)
    for i in range(len(RFC7634_MESSAGE)):
        bad = bytearray(RFC7634_MESSAGE)
        bad[i] ^= 0x01
        with pytest.raises((IkeCryptoError, IkeDecodeError)):
            decrypt(bytes(bad), cipher, RFC7634_KEY, b"")


@pytest.mark.parametrize(
    ("encr", "bits", "integ"),
    [
        (EncrId.AES_GCM_16, 128, None),
        (EncrId.AES_GCM_16, 256, None),
        (EncrId.CHACHA20_POLY1305, None, None),
        (EncrId.AES_CBC, 128, IntegId.HMAC_SHA2_256_128),
        (EncrId.AES_CBC, 256, IntegId.HMAC_SHA2_256_128),
        (EncrId.AES_CBC, 256, IntegId.HMAC_SHA2_512_256),
    ],
)
def test_sk_round_trip_and_integrity(encr: int, bits: int | None, integ: int | None) -> None:
    cipher = sk_cipher(encr, bits, integ)
    ke = bytes(range(cipher.encr_key_len))
    ka = bytes(range(100, 100 + cipher.integ_key_len))
    msg = Message(b"A" * 8, b"B" * 8, ExchangeType.INFORMATIONAL, 0x08, 7, [Notify.status(16384)])
    wire = msg.encrypt(cipher, ke, ka, bytes(cipher.iv_len))
    assert Message.decode(wire).message_id == 7  # outer header parses, length right
    assert decrypt(wire, cipher, ke, ka).payloads == msg.payloads
    body_len = len(wire) - 32 - cipher.iv_len - cipher.icv_len
    assert body_len % cipher.block_len == 0
    bad = bytearray(wire)
    bad[-1] ^= 0x80
    with pytest.raises(IkeCryptoError):
        decrypt(bytes(bad), cipher, ke, ka)
    bad = bytearray(wire)
    bad[20] ^= 0x01  # header byte (message ID) is authenticated too
    with pytest.raises(IkeCryptoError):
        decrypt(bytes(bad), cipher, ke, ka)


def test_sk_cipher_key_lengths() -> None:
    assert sk_cipher(EncrId.AES_GCM_16, 256, None).encr_key_len == 36
    assert sk_cipher(EncrId.AES_GCM_16, 128, None).encr_key_len == 20
    assert sk_cipher(EncrId.CHACHA20_POLY1305, None, None).encr_key_len == 36
    c = sk_cipher(EncrId.AES_CBC, 128, IntegId.HMAC_SHA2_512_256)
    assert (c.encr_key_len, c.integ_key_len, c.icv_len) == (16, 64, 32)
    with pytest.raises(ValueError):
        sk_cipher(EncrId.AES_CBC, 128, None)


# ---------------------------------------------------------------- DH


def test_rfc5903_ecp256_vector() -> None:
    i = Ecp256Exchange.from_private_value(
        int("C88F01F510D9AC3F70A292DAA2316DE544E9AAB8AFE84049C62A9C57862D1433", 16)
    )
    r = Ecp256Exchange.from_private_value(
        int("C6EF9C5D78AE012A011164ACB397CE2088685D8F06BF9BE0B283AB46476BEE53", 16)
    )
    gi = bytes.fromhex(
        "DAD0B65394221CF9B051E1FECA5787D098DFE637FC90B9EF945D0C3772581180"
        "5271A0461CDB8252D61F1C456FA3E59AB1F45B33ACCF5F58389E0577B8990BB3"
    )
    gr = bytes.fromhex(
        "D12DFB5289C8D4F81208B70270398C342296970A0BCCB74C736FC7554494BF63"
        "56FBF3CA366CC23E8157854C13C58D6AAC23F046ADA30F8353E74F33039872AB"
    )
    girx = bytes.fromhex("D6840F6B42F6EDAFD13116E0E12565202FEF8E9ECE7DCE03812464D04B9442DE")
    assert i.public_bytes == gi and r.public_bytes == gr  # KE payload is x || y
    assert i.shared_secret(gr) == girx == r.shared_secret(gi)  # g^ir is x only


def test_rfc7748_x25519_vector() -> None:
    a = X25519Exchange.from_private_bytes(
        bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
    )
    b = X25519Exchange.from_private_bytes(
        bytes.fromhex("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb")
    )
    assert (
        a.public_bytes.hex() == "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
    )
    assert (
        b.public_bytes.hex() == "de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f"
    )
    k = "4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742"
    assert a.shared_secret(b.public_bytes).hex() == k == b.shared_secret(a.public_bytes).hex()


def _pi_scaled(bits: int) -> int:
    """floor(pi * 2^bits) by Machin's formula in integers (independent of our constant)."""
    guard = 64
    one = 1 << (bits + guard)

    def atan_inv(x: int) -> int:
        total, term, n, sign = 0, one // x, 1, 1
        while term:
            total += sign * (term // n)
            term //= x * x
            n += 2
            sign = -sign
        return total

    return (16 * atan_inv(5) - 4 * atan_inv(239)) >> guard


def test_rfc3526_modp2048_prime() -> None:
    expected = 2**2048 - 2**1984 - 1 + 2**64 * (_pi_scaled(1918) + 124476)
    assert expected == MODP_2048_P
    h = f"{MODP_2048_P:X}"
    assert h.startswith("FFFFFFFFFFFFFFFFC90FDAA22168C234C4C6628B80DC1CD1")
    assert h.endswith("15728E5A8AACAA68FFFFFFFFFFFFFFFF")


def test_modp2048_agreement_and_padding() -> None:
    a = Modp2048Exchange.from_private_value(12345678901234567890)
    b = Modp2048Exchange.generate()
    assert len(a.public_bytes) == 256
    assert a.shared_secret(b.public_bytes) == b.shared_secret(a.public_bytes)
    assert len(a.shared_secret(b.public_bytes)) == 256


@pytest.mark.parametrize(
    "bad",
    [
        (0).to_bytes(256, "big"),
        (1).to_bytes(256, "big"),
        (MODP_2048_P - 1).to_bytes(256, "big"),
        MODP_2048_P.to_bytes(256, "big"),
        b"\x02" * 255,
    ],
)
def test_modp2048_public_value_checks(bad: bytes) -> None:
    with pytest.raises(IkeProtocolError) as exc:
        Modp2048Exchange.generate().shared_secret(bad)
    assert exc.value.notify == NotifyType.INVALID_SYNTAX


def test_ecp256_rejects_off_curve_and_wrong_length() -> None:
    e = Ecp256Exchange.generate()
    off_curve = bytearray(e.public_bytes)
    off_curve[-1] ^= 1
    for bad in (bytes(off_curve), bytes(64), e.public_bytes[:63]):
        with pytest.raises(IkeProtocolError):
            e.shared_secret(bad)


def test_x25519_rejects_low_order_point() -> None:
    with pytest.raises(IkeProtocolError):
        X25519Exchange.generate().shared_secret(bytes(32))
    with pytest.raises(IkeProtocolError):
        X25519Exchange.generate().shared_secret(bytes(31))
