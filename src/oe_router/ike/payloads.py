"""IKEv2 payload bodies (RFC 7296 §3), each declared once as a field table.

A payload object is the body only; the 4-byte generic payload header (next
payload, critical bit, length) is produced and consumed by ``message``.
"""

from __future__ import annotations

import ipaddress
from dataclasses import field
from types import MappingProxyType
from typing import Any, ClassVar

from oe_router.records import record

from .constants import (
    IKE_VERSION,
    CfgAttrType,
    DhId,
    EncrId,
    NotifyType,
    PayloadType,
    ProtocolId,
    TransformAttrType,
    TransformType,
    TsType,
)
from .errors import IkeDecodeError
from .wire import (
    U8,
    U16,
    U32,
    BytesList,
    CountOf,
    Field,
    Fixed,
    LastFlag,
    Length,
    ListOf,
    Reader,
    Reserved,
    Rest,
    Sized,
    SizedBy,
    SizeOf,
    Struct,
    _Ctx,
)

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# --------------------------------------------------------------------------- headers


@record
class IkeHeader(Struct):
    """The fixed 28-byte IKE header (RFC 7296 §3.1)."""

    spi_i: bytes
    spi_r: bytes
    next_payload: int
    version: int
    exchange_type: int
    flags: int
    message_id: int
    length: int
    FIELDS = (
        Fixed("spi_i", 8),
        Fixed("spi_r", 8),
        U8("next_payload"),
        U8("version"),
        U8("exchange_type"),
        U8("flags"),
        U32("message_id"),
        U32("length"),
    )


@record
class GenericHeader(Struct):
    """Generic payload header (RFC 7296 §3.2); ``flags`` bit 0x80 is Critical."""

    next_payload: int
    flags: int
    length: int
    FIELDS = (U8("next_payload"), U8("flags"), U16("length"))


# --------------------------------------------------------------------------- SA


class _AttrValue(Field):
    """Transform attribute: AF=1 gives a 2-byte TV value, AF=0 a length-prefixed TLV."""

    def read(self, r: Reader, vals: dict[str, Any], ctx: _Ctx, owner: str) -> None:
        raw = r.uint(2, f"{owner}.type")
        vals["tv"] = bool(raw & 0x8000)
        vals["attr_type"] = raw & 0x7FFF
        size = 2 if vals["tv"] else r.uint(2, f"{owner}.length")
        vals["value"] = r.take(size, f"{owner}.value")

    def write(self, obj: Any, out: bytearray, ctx: _Ctx) -> None:
        a: TransformAttribute = obj
        out += ((0x8000 if a.tv else 0) | a.attr_type).to_bytes(2, "big")
        if a.tv:
            if len(a.value) != 2:
                raise ValueError("a TV attribute value is exactly 2 bytes")
        else:
            out += len(a.value).to_bytes(2, "big")
        out += a.value


@record
class TransformAttribute(Struct):
    attr_type: int
    value: bytes
    tv: bool = True
    FIELDS = (_AttrValue(),)

    @classmethod
    def key_length(cls, bits: int) -> TransformAttribute:
        return cls(TransformAttrType.KEY_LENGTH, bits.to_bytes(2, "big"), True)


@record
class Transform(Struct):
    """Transform substructure (RFC 7296 §3.3.2)."""

    transform_type: int
    transform_id: int
    attributes: list[TransformAttribute] = field(default_factory=list)
    FIELDS = (
        LastFlag(3),
        Reserved(1),
        Length(2, 8),
        U8("transform_type"),
        Reserved(1),
        U16("transform_id"),
        ListOf("attributes", TransformAttribute),
    )

    @property
    def key_length(self) -> int | None:
        """Key Length attribute in bits, or None when absent."""
        for a in self.attributes:
            if a.attr_type == TransformAttrType.KEY_LENGTH and len(a.value) == 2:
                return int.from_bytes(a.value, "big")
        return None

    @classmethod
    def make(cls, ttype: int, tid: int, key_bits: int | None = None) -> Transform:
        attrs = [] if key_bits is None else [TransformAttribute.key_length(key_bits)]
        return cls(ttype, tid, attrs)


@record
class Proposal(Struct):
    """Proposal substructure (RFC 7296 §3.3.1)."""

    number: int
    protocol_id: int
    spi: bytes
    transforms: list[Transform]
    FIELDS = (
        LastFlag(2),
        Reserved(1),
        Length(2, 8),
        U8("number"),
        U8("protocol_id"),
        SizeOf(1, "spi"),
        CountOf(1, "transforms"),
        Sized("spi"),
        ListOf("transforms", Transform),
    )

    def of_type(self, ttype: int) -> list[Transform]:
        return [t for t in self.transforms if t.transform_type == ttype]


@record
class Payload(Struct):
    """Base of payload bodies; ``TYPE`` is the IANA payload type number."""

    TYPE: ClassVar[int] = 0


@record
class SA(Payload):
    TYPE = PayloadType.SA
    proposals: list[Proposal]
    FIELDS = (ListOf("proposals", Proposal),)


# --------------------------------------------------------------------------- simple payloads


@record
class KE(Payload):
    """Key Exchange (RFC 7296 §3.4); ECP groups carry x||y (RFC 5903 §7)."""

    TYPE = PayloadType.KE
    group: int
    data: bytes
    FIELDS = (U16("group"), Reserved(2), Rest("data"))


@record
class _Id(Payload):
    id_type: int
    data: bytes
    FIELDS = (U8("id_type"), Reserved(3), Rest("data"))


@record
class IDi(_Id):
    TYPE = PayloadType.IDi


@record
class IDr(_Id):
    TYPE = PayloadType.IDr


@record
class CERT(Payload):
    TYPE = PayloadType.CERT
    encoding: int
    data: bytes
    FIELDS = (U8("encoding"), Rest("data"))


@record
class CERTREQ(Payload):
    TYPE = PayloadType.CERTREQ
    encoding: int
    data: bytes
    FIELDS = (U8("encoding"), Rest("data"))


@record
class AUTH(Payload):
    TYPE = PayloadType.AUTH
    method: int
    data: bytes
    FIELDS = (U8("method"), Reserved(3), Rest("data"))


@record
class Nonce(Payload):
    TYPE = PayloadType.NONCE
    data: bytes
    FIELDS = (Rest("data"),)


@record
class Notify(Payload):
    """Notify (RFC 7296 §3.10)."""

    TYPE = PayloadType.NOTIFY
    protocol_id: int
    notify_type: int
    spi: bytes = b""
    data: bytes = b""
    FIELDS = (
        U8("protocol_id"),
        SizeOf(1, "spi"),
        U16("notify_type"),
        Sized("spi"),
        Rest("data"),
    )

    @classmethod
    def status(cls, notify_type: int, data: bytes = b"") -> Notify:
        return cls(0, notify_type, b"", data)

    @property
    def is_error(self) -> bool:
        return self.notify_type < 16384


@record
class Delete(Payload):
    """Delete (RFC 7296 §3.11); IKE SA deletes have spi_size 0 and no SPIs."""

    TYPE = PayloadType.DELETE
    protocol_id: int
    spi_size: int
    spis: list[bytes]
    FIELDS = (U8("protocol_id"), U8("spi_size"), CountOf(2, "spis"), BytesList("spis", "spi_size"))


@record
class VendorID(Payload):
    TYPE = PayloadType.VENDOR_ID
    data: bytes
    FIELDS = (Rest("data"),)


# --------------------------------------------------------------------------- traffic selectors


def _ts_address_size(vals: dict[str, Any], remaining: int) -> int:
    expected = {TsType.TS_IPV4_ADDR_RANGE: 8, TsType.TS_IPV6_ADDR_RANGE: 32}.get(vals["ts_type"])
    if expected is not None and remaining != expected:
        raise IkeDecodeError(
            f"TrafficSelector: type {vals['ts_type']} with {remaining} address bytes"
        )
    if remaining % 2:
        raise IkeDecodeError("TrafficSelector: odd address length")
    return remaining // 2


@record
class TrafficSelector(Struct):
    """One selector (RFC 7296 §3.13.1); addresses are raw bytes, see ``start``/``end``."""

    ts_type: int
    ip_protocol: int
    start_port: int
    end_port: int
    start_address: bytes
    end_address: bytes
    FIELDS = (
        U8("ts_type"),
        U8("ip_protocol"),
        Length(2, 8),
        U16("start_port"),
        U16("end_port"),
        SizedBy("start_address", _ts_address_size),
        SizedBy("end_address", lambda vals, remaining: remaining),
    )

    @classmethod
    def from_range(
        cls,
        start: IpAddress,
        end: IpAddress,
        ip_protocol: int = 0,
        start_port: int = 0,
        end_port: int = 65535,
    ) -> TrafficSelector:
        if start.version != end.version:
            raise ValueError("selector range mixes IPv4 and IPv6")
        ts_type = TsType.TS_IPV4_ADDR_RANGE if start.version == 4 else TsType.TS_IPV6_ADDR_RANGE
        first = start.packed
        last = first if end == start else end.packed  # one host: one bytes object, not two
        return cls(ts_type, ip_protocol, start_port, end_port, first, last)

    @classmethod
    def for_network(cls, net: str, ip_protocol: int = 0) -> TrafficSelector:
        n = ipaddress.ip_network(net, strict=False)
        return cls.from_range(n.network_address, n.broadcast_address, ip_protocol)

    @property
    def start(self) -> IpAddress:
        return _address(self.start_address)

    @property
    def end(self) -> IpAddress:
        return _address(self.end_address)


def _address(raw: bytes) -> IpAddress:
    if len(raw) not in (4, 16):
        raise IkeDecodeError(f"address of {len(raw)} bytes")
    return ipaddress.ip_address(raw)


@record
class _Ts(Payload):
    selectors: list[TrafficSelector]
    FIELDS = (CountOf(1, "selectors"), Reserved(3), ListOf("selectors", TrafficSelector))


@record
class TSi(_Ts):
    TYPE = PayloadType.TSi


@record
class TSr(_Ts):
    TYPE = PayloadType.TSr


# --------------------------------------------------------------------------- configuration


@record
class CfgAttribute(Struct):
    """Configuration attribute (RFC 7296 §3.15.1); top bit of the type is reserved."""

    attr_type: int
    value: bytes = b""
    FIELDS = (U16("attr_type"), SizeOf(2, "value"), Sized("value"))


@record
class CP(Payload):
    TYPE = PayloadType.CP
    cfg_type: int
    attributes: list[CfgAttribute]
    FIELDS = (U8("cfg_type"), Reserved(3), ListOf("attributes", CfgAttribute))

    def values(self, attr_type: int) -> list[bytes]:
        return [a.value for a in self.attributes if a.attr_type & 0x7FFF == attr_type]


# --------------------------------------------------------------------------- encrypted


@record
class SK(Payload):
    """Encrypted and Authenticated payload (RFC 7296 §3.14), still sealed.

    ``first_inner`` is the type of the first inner payload: on the wire it sits in
    this payload's own Next Payload field.
    """

    TYPE = PayloadType.SK
    first_inner: int
    data: bytes
    FIELDS = (Rest("data"),)


@record
class SKF(Payload):
    """Encrypted Fragment payload (RFC 7383 §2.5), still sealed."""

    TYPE = PayloadType.SKF
    first_inner: int
    fragment_number: int
    total_fragments: int
    data: bytes
    FIELDS = (U16("fragment_number"), U16("total_fragments"), Rest("data"))


@record
class UnknownPayload(Payload):
    """A payload type we do not implement; kept so ``critical`` can be honoured."""

    payload_type: int
    critical: bool
    data: bytes
    FIELDS = (Rest("data"),)


PAYLOAD_CLASSES: MappingProxyType[int, type[Payload]] = MappingProxyType(
    {
        cls.TYPE: cls
        for cls in (
            SA,
            KE,
            IDi,
            IDr,
            CERT,
            CERTREQ,
            AUTH,
            Nonce,
            Notify,
            Delete,
            VendorID,
            TSi,
            TSr,
            CP,
        )
    }
)

# --------------------------------------------------------------------------- helpers


def encode_uint16_list(values: list[int]) -> bytes:
    """Notification data made of 16-bit values (SIGNATURE_HASH_ALGORITHMS)."""
    return b"".join(v.to_bytes(2, "big") for v in values)


def decode_uint16_list(data: bytes) -> list[int]:
    if len(data) % 2:
        raise IkeDecodeError("list of 16-bit values has odd length")
    return [int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2)]


def ike_proposal(
    number: int,
    encr: int,
    key_bits: int | None,
    prf: int,
    integ: int | None,
    dh: list[int],
    spi: bytes = b"",
) -> Proposal:
    """Build an IKE proposal; ``integ`` None for AEAD ciphers (RFC 5282)."""
    ts = [
        Transform.make(TransformType.ENCR, encr, key_bits),
        Transform.make(TransformType.PRF, prf),
    ]
    if integ is not None:
        ts.append(Transform.make(TransformType.INTEG, integ))
    ts += [Transform.make(TransformType.DH, g) for g in dh]
    return Proposal(number, ProtocolId.IKE, spi, ts)


def esp_proposal(
    number: int,
    spi: bytes,
    encr: int,
    key_bits: int | None,
    integ: int | None,
    esn: list[int],
    dh: list[int] | None = None,
) -> Proposal:
    """Build an ESP proposal (ESN transforms always present, RFC 7296 §3.3.2)."""
    ts = [Transform.make(TransformType.ENCR, encr, key_bits)]
    if integ is not None:
        ts.append(Transform.make(TransformType.INTEG, integ))
    ts += [Transform.make(TransformType.DH, g) for g in dh or []]
    ts += [Transform.make(TransformType.ESN, e) for e in esn]
    return Proposal(number, ProtocolId.ESP, spi, ts)


__all__ = [
    "AUTH",
    "CERT",
    "CERTREQ",
    "CP",
    "IKE_VERSION",
    "KE",
    "PAYLOAD_CLASSES",
    "SA",
    "SK",
    "SKF",
    "CfgAttrType",
    "CfgAttribute",
    "Delete",
    "DhId",
    "EncrId",
    "GenericHeader",
    "IDi",
    "IDr",
    "IkeHeader",
    "Nonce",
    "Notify",
    "NotifyType",
    "Payload",
    "Proposal",
    "TSi",
    "TSr",
    "TrafficSelector",
    "Transform",
    "TransformAttribute",
    "UnknownPayload",
    "VendorID",
    "decode_uint16_list",
    "encode_uint16_list",
    "esp_proposal",
    "ike_proposal",
]
