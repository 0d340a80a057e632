"""Child SA bookkeeping for one IKE SA: records, pending exchanges, CP helpers.

Why apart from ``sa``: these are plain data and pure helpers shared by every
exchange handler (IKE_AUTH, CREATE_CHILD_SA in both roles, INFORMATIONAL
deletes); keeping them here keeps the state machine readable.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .constants import CfgAttrType, CfgType
from .crypto import KeyExchange
from .events import ChildSaEstablished, ChildSaRekeyed
from .keys import Prf, child_keymat, split_child_keymat
from .message import Message
from .payloads import CP, CfgAttribute, IpAddress, Notify, Payload, TrafficSelector
from .proposals import EspChoice, esp_key_lengths
from .states import ChildState, log_change

if TYPE_CHECKING:
    from .sa import IkeSa


@dataclass(frozen=True)
class ChildSaInfo:
    """A read-only view of one Child SA, for status output (``oe status``)."""

    spi_in: bytes
    spi_out: bytes
    mode: str
    ts_local: tuple[TrafficSelector, ...]
    ts_remote: tuple[TrafficSelector, ...]
    established_at: float
    rekey_at: float | None
    expire_at: float | None
    state: ChildState


@dataclass
class Collision:
    """The peer's rekey of a Child or IKE SA that we were rekeying too (RFC 7296 §2.8.1/2)."""

    ni: bytes
    nr: bytes
    child: ChildRecord | None = None
    link: IkeSa | None = None  # the peer's new IKE SA link, for an IKE SA collision


@dataclass
class ChildRecord:
    """One ESP SA pair carried by the IKE SA.

    ``state``: installed (in use); rekeying (our rekey in flight); rekeyed
    (replaced, waiting for its Delete); redundant (lost a rekey collision,
    the peer deletes it); deleting (our Delete is queued or in flight).
    ``reported`` is False for an SA the owner never heard of (so its removal
    is not reported either).
    """

    event: ChildSaEstablished
    choice: EspChoice
    transport: bool
    created: float
    rekey_at: float | None
    expire_at: float | None
    state: ChildState = ChildState.INSTALLED
    reported: bool = True
    collision: Collision | None = None

    def set_state(self, new: ChildState) -> None:
        """The one way a Child SA's state changes (logged at debug)."""
        log_change(f"Child SA {self.spi_in.hex()}", self.state, new)
        self.state = new

    @property
    def spi_in(self) -> bytes:
        return self.event.spi_in

    @property
    def spi_out(self) -> bytes:
        return self.event.spi_out

    def info(self) -> ChildSaInfo:
        e = self.event
        return ChildSaInfo(
            e.spi_in,
            e.spi_out,
            e.mode,
            e.ts_local,
            e.ts_remote,
            self.created,
            self.rekey_at if self.state == ChildState.INSTALLED else None,
            self.expire_at,
            self.state,
        )

    def rekeyed_event(self, old: ChildRecord) -> ChildSaRekeyed:
        """This (new) SA announced as the replacement of ``old``."""
        e = self.event
        kw = {f.name: getattr(e, f.name) for f in dataclasses.fields(e)}
        return ChildSaRekeyed(**kw, old_spi_in=old.spi_in, old_spi_out=old.spi_out)


@dataclass
class Request:
    """One exchange we initiate; queued until the window (size 1) is free.

    ``kind``: create | rekey-child | rekey-ike | delete-child | delete-ike | info.
    """

    kind: str
    request_id: int | None = None
    ts_local: tuple[TrafficSelector, ...] = ()
    ts_remote: tuple[TrafficSelector, ...] = ()
    transport: bool = False
    child: bytes = b""  # our inbound SPI of the Child SA being rekeyed or deleted
    payloads: list[Payload] = field(default_factory=list)
    reason: str = ""
    not_before: float = 0.0
    temp_failures: int = 0
    group: int | None = None  # DH group to use (after INVALID_KE_PAYLOAD)
    ke_retried: bool = False
    pfs: bool = True  # cleared when the peer refused our PFS proposals (NO_PROPOSAL_CHOSEN)
    orphaned: bool = False  # the SA being rekeyed was deleted by the peer meanwhile
    # filled when sent / answered
    ni: bytes = b""
    nr: bytes = b""
    ke: KeyExchange | None = None
    new_spi: bytes = b""


def child_keys(
    choice: EspChoice,
    prf: Prf,
    sk_d: bytes,
    ni: bytes,
    nr: bytes,
    shared: bytes | None,
    we_initiated: bool,
) -> tuple[bytes, bytes, bytes, bytes]:
    """(encr_in, integ_in, encr_out, integ_out) from KEYMAT (RFC 7296 §2.17).

    The "initiator" direction is that of whoever sent the request that
    created the Child SA (IKE_AUTH or CREATE_CHILD_SA).
    """
    s = choice.spec
    e, a = esp_key_lengths(s.encr, s.key_bits, s.integ)
    km = split_child_keymat(child_keymat(prf, sk_d, ni, nr, 2 * (e + a), shared), e, a)
    if we_initiated:
        return km.encr_r, km.integ_r, km.encr_i, km.integ_i
    return km.encr_i, km.integ_i, km.encr_r, km.integ_r


def cp_request(version: int | None = None) -> CP:
    """CP(CFG_REQUEST) asking for an inner address (RFC 7296 §3.15): of IP ``version``
    (the family the Child SA carries), or of both when None."""
    attrs = [
        CfgAttribute(t)
        for v, t in ((4, CfgAttrType.INTERNAL_IP4_ADDRESS), (6, CfgAttrType.INTERNAL_IP6_ADDRESS))
        if version in (None, v)
    ]
    return CP(CfgType.CFG_REQUEST, attrs)


def cp_reply_addresses(cp: CP | None) -> tuple[IpAddress, ...]:
    """INTERNAL_IP4/6_ADDRESS values of a CFG_REPLY; malformed values are skipped."""
    if cp is None or cp.cfg_type != CfgType.CFG_REPLY:
        return ()
    out: list[IpAddress] = []
    for raw in cp.values(CfgAttrType.INTERNAL_IP4_ADDRESS):
        if len(raw) == 4:
            out.append(ipaddress.IPv4Address(raw))
    for raw in cp.values(CfgAttrType.INTERNAL_IP6_ADDRESS):
        if len(raw) == 17:  # address and prefix length
            out.append(ipaddress.IPv6Address(raw[:16]))
    return tuple(out)


def cp_reply(request: CP, addresses: tuple[str, ...]) -> tuple[CP, tuple[IpAddress, ...]]:
    """Our CFG_REPLY to a CFG_REQUEST: the configured addresses of the requested families."""
    asked = {a.attr_type & 0x7FFF for a in request.attributes}
    want4 = CfgAttrType.INTERNAL_IP4_ADDRESS in asked
    want6 = CfgAttrType.INTERNAL_IP6_ADDRESS in asked
    attrs: list[CfgAttribute] = []
    given: list[IpAddress] = []
    for text in addresses:
        a = ipaddress.ip_address(text)
        if a.version == 4 and want4:
            attrs.append(CfgAttribute(CfgAttrType.INTERNAL_IP4_ADDRESS, a.packed))
            given.append(a)
        elif a.version == 6 and want6:
            attrs.append(CfgAttribute(CfgAttrType.INTERNAL_IP6_ADDRESS, a.packed + bytes([128])))
            given.append(a)
    return CP(CfgType.CFG_REPLY, attrs), tuple(given)


def has_notify(msg: Message, notify_type: int) -> bool:
    return any(isinstance(p, Notify) and p.notify_type == notify_type for p in msg.payloads)


__all__ = [
    "ChildRecord",
    "ChildSaInfo",
    "Collision",
    "Request",
    "child_keys",
    "cp_reply",
    "cp_reply_addresses",
    "cp_request",
    "has_notify",
]
