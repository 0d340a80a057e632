"""Typed events an IKE SA hands to its owner (the endpoint / tunnel manager).

Why events: the sans-IO core never calls out; its owner polls
``IkeSa.next_event()`` after feeding it datagrams or timer ticks, as with h11.
"""

from __future__ import annotations

from dataclasses import dataclass

from .payloads import TrafficSelector


class Event:
    """Base class of all IKE events."""


@dataclass(frozen=True)
class IkeSaEstablished(Event):
    """IKE_AUTH finished: both sides authenticated, SK_* keys in use."""

    spi_i: bytes
    spi_r: bytes
    is_initiator: bool
    local_id: tuple[int, bytes]  # (ID type, data)
    peer_id: tuple[int, bytes]
    local_auth_method: int
    peer_auth_method: int
    encr: int
    encr_key_bits: int | None
    prf: int
    integ: int | None
    dh_group: int
    nat_local: bool  # our address is translated (NAT_DETECTION_DESTINATION_IP mismatch)
    nat_remote: bool  # the peer's address is translated


@dataclass(frozen=True)
class ChildSaEstablished(Event):
    """An ESP SA pair is ready for the datapath.

    ``spi_in`` is the SPI we chose (inbound packets carry it); ``spi_out`` the peer's.
    Keys are split per direction from KEYMAT (RFC 7296 §2.17); ``*_in`` decrypt
    traffic from the peer.
    """

    ike_spi_i: bytes
    ike_spi_r: bytes
    spi_in: bytes
    spi_out: bytes
    mode: str  # "tunnel" or "transport"
    encr: int
    encr_key_bits: int | None
    integ: int | None
    esn: bool
    encr_key_in: bytes
    integ_key_in: bytes
    encr_key_out: bytes
    integ_key_out: bytes
    ts_local: tuple[TrafficSelector, ...]
    ts_remote: tuple[TrafficSelector, ...]
    udp_encap: bool  # NAT detected: ESP goes in UDP 4500 (RFC 3948)


@dataclass(frozen=True)
class IkeSaFailed(Event):
    """The IKE SA could not be set up or was refused; ``notify`` is the cause if known."""

    reason: str
    notify: int | None = None


@dataclass(frozen=True)
class ChildSaFailed(Event):
    """IKE SA is up but the peer refused the Child SA (e.g. TS_UNACCEPTABLE)."""

    reason: str
    notify: int | None = None


@dataclass(frozen=True)
class IkeSaDeleted(Event):
    """The IKE SA is gone (either side deleted it); its Child SAs went with it."""

    spi_i: bytes
    spi_r: bytes
    reason: str


@dataclass(frozen=True)
class ChildSaDeleted(Event):
    """The peer deleted a Child SA; the datapath should remove both directions."""

    spi_in: bytes
    spi_out: bytes
