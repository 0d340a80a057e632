"""Published IKEv2 test vectors, shared by the unit tests of the codec and of the crypto."""

from __future__ import annotations

#: RFC 7634 Appendix B: an INFORMATIONAL message protected with ChaCha20-Poly1305
RFC7634_KEY = bytes(range(0x80, 0xA0)) + bytes.fromhex("a0a1a2a3")
RFC7634_IV = bytes(range(0x10, 0x18))
RFC7634_MESSAGE = bytes.fromhex(
    "c0c1c2c3c4c5c6c7d0d1d2d3d4d5d6d7"  # SPIi, SPIr
    "2e202500"  # next SK, version 2.0, INFORMATIONAL, flags 0
    "00000009"  # message ID
    "00000045"  # length 69
    "29000029"  # SK payload: next Notify, length 41
    "1011121314151617"  # IV
    "6103947 01f8d017f7c12924889".replace(" ", "")  # ciphertext of notify + pad length
    + "6b71bfe25236efd7cdc670669063 15b2".replace(" ", "")  # ICV
)
