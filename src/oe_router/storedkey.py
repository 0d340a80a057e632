"""A peer's P-256 public key kept as its encoded point, not as an OpenSSL object.

Why: the daemon keeps the key of every keyed peer for as long as it knows the peer (the
DNS answer, the OE peer table and the IKE SA's configuration hold the same object), and
cryptography's P-256 key object is an OpenSSL EC key with its own copy of the curve
group: ~2,090 bytes of RSS, where the point is 65 (docs/footprint.md). A
``StoredP256Key`` is an ``ec.EllipticCurvePublicKey`` (``isinstance`` holds, every method
of the interface works, it compares equal to the same key in either form) that loads the
OpenSSL key for each use: an IKE_AUTH signature check, an export, a comparison.
"""

from __future__ import annotations

from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

__all__ = ["StoredP256Key"]


class StoredP256Key(ec.EllipticCurvePublicKey):
    """A P-256 public key as its 65-byte uncompressed point (0x04 || X || Y)."""

    __slots__ = ("point",)

    def __init__(self, point: bytes) -> None:
        """ValueError, as ``from_encoded_point`` raises it, for a point not on P-256."""
        self.point = bytes(point)
        self._key()  # refused now, not at first use

    def _key(self) -> ec.EllipticCurvePublicKey:
        return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), self.point)

    @property
    def curve(self) -> ec.EllipticCurve:
        return ec.SECP256R1()

    @property
    def key_size(self) -> int:
        return 256

    def public_numbers(self) -> ec.EllipticCurvePublicNumbers:
        return self._key().public_numbers()

    def public_bytes(self, encoding: Encoding, format: PublicFormat) -> bytes:
        return self._key().public_bytes(encoding, format)

    def verify(
        self,
        signature: bytes,
        data: bytes,
        signature_algorithm: ec.EllipticCurveSignatureAlgorithm,
    ) -> None:
        self._key().verify(signature, data, signature_algorithm)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, StoredP256Key):
            return self.point == other.point
        if isinstance(other, ec.EllipticCurvePublicKey):
            return bool(self._key() == other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # as cryptography's own key objects

    def __copy__(self) -> StoredP256Key:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> StoredP256Key:
        return self

    def __repr__(self) -> str:
        return f"StoredP256Key({self.point[1:9].hex()}...)"
