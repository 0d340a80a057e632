"""IKE message assembly and parsing, including SK (RFC 7296 §3.14) and SKF (RFC 7383).

Why here: payload bodies know nothing about chaining; this module owns the
Next Payload chain, the header's length, and the rule that an SK/SKF payload
ends the chain and names the first inner payload.
"""

from __future__ import annotations

from dataclasses import field
from typing import TypeVar

from oe_router.records import record

from .constants import GENERIC_HEADER_LEN, IKE_HEADER_LEN, IKE_VERSION, HeaderFlag, PayloadType
from .crypto import SkCipher
from .errors import IkeCryptoError, IkeDecodeError
from .payloads import PAYLOAD_CLASSES, SK, SKF, GenericHeader, IkeHeader, Payload, UnknownPayload
from .wire import Reader

P = TypeVar("P", bound=Payload)

CRITICAL = 0x80


def payload_type(p: Payload) -> int:
    return p.payload_type if isinstance(p, UnknownPayload) else p.TYPE


def encode_chain(payloads: list[Payload]) -> bytes:
    """Serialise payloads with their generic headers, chaining Next Payload fields."""
    out = bytearray()
    for i, p in enumerate(payloads):
        if isinstance(p, SK | SKF):
            if i != len(payloads) - 1:
                raise ValueError("SK/SKF must be the last payload")
            nxt = p.first_inner
        else:
            nxt = payload_type(payloads[i + 1]) if i + 1 < len(payloads) else 0
        body = p.encode()
        flags = CRITICAL if isinstance(p, UnknownPayload) and p.critical else 0
        GenericHeader(nxt, flags, GENERIC_HEADER_LEN + len(body)).write(out)
        out += body
    return bytes(out)


def decode_chain(data: bytes, first: int, *, pos: int = 0) -> tuple[list[Payload], int]:
    """Parse a payload chain starting with type ``first``.

    Returns the payloads and the offset where the last one's body started (for
    SK/SKF this is where the IV begins, needed for the AAD/MAC range).
    """
    r = Reader(data, pos)
    payloads: list[Payload] = []
    ptype = first
    body_start = pos
    while ptype != PayloadType.NONE:
        start = r.pos
        gh = GenericHeader.read(r)
        if gh.length < GENERIC_HEADER_LEN or start + gh.length > r.end:
            raise IkeDecodeError(f"payload type {ptype}: length {gh.length} overruns the message")
        body_start = r.pos
        body = r.take(gh.length - GENERIC_HEADER_LEN, f"payload {ptype}")
        p: Payload
        if ptype == PayloadType.SK:
            p = SK(gh.next_payload, body)
        elif ptype == PayloadType.SKF:
            sub = Reader(body)
            num, total = sub.uint(2, "SKF.fragment_number"), sub.uint(2, "SKF.total_fragments")
            if num < 1 or num > total:
                raise IkeDecodeError(f"SKF: fragment {num} of {total}")
            p = SKF(gh.next_payload, num, total, body[4:])
        elif ptype in PAYLOAD_CLASSES:
            p = PAYLOAD_CLASSES[ptype].decode(body)
        else:
            p = UnknownPayload(ptype, bool(gh.flags & CRITICAL), body)
        payloads.append(p)
        if isinstance(p, SK | SKF):
            if r.remaining:
                raise IkeDecodeError(f"{r.remaining} bytes after the encrypted payload")
            break
        ptype = gh.next_payload
    if r.remaining:
        raise IkeDecodeError(f"{r.remaining} bytes after the last payload")
    return payloads, body_start


@record
class Message:
    """One IKE message: header fields plus its (outer, or decrypted inner) payloads."""

    spi_i: bytes
    spi_r: bytes
    exchange_type: int
    flags: int
    message_id: int
    payloads: list[Payload] = field(default_factory=list)
    version: int = IKE_VERSION

    @property
    def is_response(self) -> bool:
        return bool(self.flags & HeaderFlag.RESPONSE)

    @property
    def is_initiator(self) -> bool:
        """Set when the original initiator of the IKE SA sent this message."""
        return bool(self.flags & HeaderFlag.INITIATOR)

    def get(self, cls: type[Payload]) -> list[Payload]:
        return [p for p in self.payloads if type(p) is cls]

    def first(self, cls: type[P]) -> P | None:
        """The first payload of type ``cls``, typed as such (None when absent)."""
        for p in self.payloads:
            if type(p) is cls:  # exact type, as ``get``: IDi is not IDr
                return p
        return None

    def _header(self, next_payload: int, length: int) -> bytes:
        return IkeHeader(
            self.spi_i,
            self.spi_r,
            next_payload,
            self.version,
            self.exchange_type,
            self.flags,
            self.message_id,
            length,
        ).encode()

    def encode(self) -> bytes:
        """Serialise as-is (payloads may include an already sealed SK/SKF)."""
        chain = encode_chain(self.payloads)
        first = payload_type(self.payloads[0]) if self.payloads else 0
        return self._header(first, IKE_HEADER_LEN + len(chain)) + chain

    @classmethod
    def decode(cls, data: bytes) -> Message:
        """Parse a datagram (without any non-ESP marker) into a Message."""
        data = bytes(data)
        r = Reader(data)
        hdr = IkeHeader.read(r)
        if hdr.version >> 4 != 2:
            raise IkeDecodeError(f"IKE major version {hdr.version >> 4}")
        if hdr.length != len(data):
            raise IkeDecodeError(f"header length {hdr.length} but datagram has {len(data)} bytes")
        payloads, _ = decode_chain(data, hdr.next_payload, pos=IKE_HEADER_LEN)
        return cls(
            hdr.spi_i,
            hdr.spi_r,
            hdr.exchange_type,
            hdr.flags,
            hdr.message_id,
            payloads,
            hdr.version,
        )

    # ----------------------------------------------------------------- protection

    def encrypt(self, cipher: SkCipher, sk_e: bytes, sk_a: bytes, iv: bytes) -> bytes:
        """Serialise with ``payloads`` sealed inside one SK payload."""
        inner = encode_chain(self.payloads)
        first = payload_type(self.payloads[0]) if self.payloads else 0
        sealed_len = cipher.sealed_len(len(inner))
        total = IKE_HEADER_LEN + GENERIC_HEADER_LEN + sealed_len
        head = (
            self._header(PayloadType.SK, total)
            + GenericHeader(first, 0, GENERIC_HEADER_LEN + sealed_len).encode()
        )
        return head + cipher.seal(sk_e, sk_a, iv, head, inner)

    def encrypt_fragments(
        self, cipher: SkCipher, sk_e: bytes, sk_a: bytes, ivs: list[bytes], max_len: int
    ) -> list[bytes]:
        """Seal into SKF fragments of at most ``max_len`` bytes each (RFC 7383 §2.5).

        ``ivs`` must hold at least as many fresh IVs as fragments are produced.
        """
        inner = encode_chain(self.payloads)
        first = payload_type(self.payloads[0]) if self.payloads else 0
        overhead = IKE_HEADER_LEN + GENERIC_HEADER_LEN + 4 + cipher.sealed_len(0)
        room = max_len - overhead
        room -= room % cipher.block_len
        if room < 1:
            raise ValueError(f"fragment size {max_len} leaves no room for data")
        chunks = [inner[i : i + room] for i in range(0, len(inner), room)] or [b""]
        if len(chunks) > len(ivs):
            raise ValueError(f"{len(chunks)} fragments need as many IVs")
        return [
            self.encrypt_fragment(cipher, sk_e, sk_a, ivs[n - 1], chunk, n, len(chunks), first)
            for n, chunk in enumerate(chunks, start=1)
        ]

    def encrypt_fragment(
        self,
        cipher: SkCipher,
        sk_e: bytes,
        sk_a: bytes,
        iv: bytes,
        chunk: bytes,
        number: int,
        total: int,
        first_inner: int,
    ) -> bytes:
        """Seal one SKF fragment: ``chunk`` of the inner payload chain, fragment ``number``
        of ``total`` (only fragment 1 names the first inner payload, RFC 7383 §2.5)."""
        sealed_len = cipher.sealed_len(len(chunk))
        length = IKE_HEADER_LEN + GENERIC_HEADER_LEN + 4 + sealed_len
        head = (
            self._header(PayloadType.SKF, length)
            + GenericHeader(
                first_inner if number == 1 else 0, 0, GENERIC_HEADER_LEN + 4 + sealed_len
            ).encode()
            + number.to_bytes(2, "big")
            + total.to_bytes(2, "big")
        )
        return head + cipher.seal(sk_e, sk_a, iv, head, chunk)


def decrypt(data: bytes, cipher: SkCipher, sk_e: bytes, sk_a: bytes) -> Message:
    """Parse and open a message protected by an SK payload.

    Returns a Message whose payloads are the unencrypted ones before SK followed by
    the decrypted inner payloads. Raises IkeDecodeError or IkeCryptoError.
    """
    msg = Message.decode(data)
    if not msg.payloads or not isinstance(msg.payloads[-1], SK):
        raise IkeDecodeError("message has no SK payload")
    sk = msg.payloads[-1]
    head_len = len(data) - len(sk.data)
    plain = cipher.open(sk_e, sk_a, bytes(data[:head_len]), sk.data)
    inner, _ = decode_chain(plain, sk.first_inner)
    msg.payloads = msg.payloads[:-1] + inner
    return msg


__all__ = [
    "IkeCryptoError",
    "Message",
    "decode_chain",
    "decrypt",
    "encode_chain",
    "payload_type",
]
