"""Child SA bookkeeping for one IKE SA: records, the table of them, CP helpers.

Why apart from ``sa``: these are plain data and pure helpers shared by every
exchange handler (IKE_AUTH, CREATE_CHILD_SA in both roles, INFORMATIONAL
deletes); keeping them here keeps the state machine readable.
"""

from __future__ import annotations

import dataclasses
import ipaddress

from oe_router.records import record

from .constants import CfgAttrType, CfgType
from .events import ChildSaDeleted, ChildSaEstablished, ChildSaRekeyed, Event
from .keys import Prf, child_keymat, split_child_keymat
from .message import Message
from .payloads import CP, CfgAttribute, IpAddress, Notify, TrafficSelector
from .proposals import EspChoice, esp_key_lengths
from .states import ChildState, log_change


@record(frozen=True, slots=True)
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


@record(slots=True)
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


class ChildTable(dict[bytes, ChildRecord]):
    """The Child SAs one IKE SA carries, by our inbound SPI; reports what the owner
    hears about them on ``events``."""

    __slots__ = ("_events",)  # one per IKE SA: no instance dict

    def __init__(self, events: list[Event]) -> None:
        super().__init__()
        self._events = events

    def by_peer_spi(self, spi_out: bytes) -> ChildRecord | None:
        return next((c for c in self.values() if c.spi_out == spi_out), None)

    def report(self, child: ChildRecord, old: ChildRecord | None = None) -> None:
        """Announce ``child`` (as the replacement of ``old`` after a rekey)."""
        child.reported = True
        self._events.append(child.event if old is None else child.rekeyed_event(old))

    def remove(self, child: ChildRecord, reason: str) -> None:
        if self.pop(child.spi_in, None) is not None and child.reported:
            self._events.append(ChildSaDeleted(child.spi_in, child.spi_out, reason))

    def timers(self) -> list[float | None]:
        """Rekey times of installed SAs and expiry times of those not being deleted."""
        times: list[float | None] = []
        for c in self.values():
            if c.state == ChildState.INSTALLED:
                times.append(c.rekey_at)
            if c.state != ChildState.DELETING:
                times.append(c.expire_at)
        return times


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
    "ChildTable",
    "child_keys",
    "cp_reply",
    "cp_reply_addresses",
    "cp_request",
    "has_notify",
]
