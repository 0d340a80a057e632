"""Typed events an IKE SA hands to its owner (the endpoint / tunnel manager).

Why events: the sans-IO core never calls out; its owner polls
``IkeSa.next_event()`` after feeding it datagrams or timer ticks, as with h11.
"""

from __future__ import annotations

from dataclasses import field

from oe_router.records import record

from .payloads import IpAddress, TrafficSelector
from .proposals import ProposalMismatch


class Event:
    """Base class of all IKE events."""

    __slots__ = ()  # the events have slots: a Child SA record keeps its event for life


@record(frozen=True, slots=True)
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


@record(frozen=True, slots=True)
class PeerKeyNeeded(Event):
    """As responder: the initiator signs as ``name`` (ID_FQDN) and we hold no key for it.

    The IKE_AUTH request waits (state AUTH_PENDING) until the owner answers with
    ``IkeSa.peer_key_found`` (the DNSSEC-validated key of that name, or None); the
    SA fails by itself if no answer comes within ``IkeSaConfig.peer_key_timeout``.
    """

    identity: tuple[int, bytes]  # (ID type, data) as the initiator sent it
    name: str  # the FQDN, as text


@record(frozen=True, slots=True)
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
    encr_key_in: bytes = field(repr=False)
    integ_key_in: bytes = field(repr=False)
    encr_key_out: bytes = field(repr=False)
    integ_key_out: bytes = field(repr=False)
    ts_local: tuple[TrafficSelector, ...]
    ts_remote: tuple[TrafficSelector, ...]
    udp_encap: bool  # NAT detected: ESP goes in UDP 4500 (RFC 3948)
    request_id: int | None = None  # what ``IkeSa.create_child`` returned; None for the first
    # CP(CFG_REPLY) INTERNAL_IP4/6_ADDRESS: as initiator what the peer gave us (CAT),
    # as responder what we gave the peer
    internal_addresses: tuple[IpAddress, ...] = ()


@record(frozen=True, slots=True)
class ChildSaRekeyed(ChildSaEstablished):
    """A new ESP SA pair replaces ``old_spi_in``/``old_spi_out`` (RFC 7296 §2.8).

    A subclass of ChildSaEstablished so a consumer that installs every
    established SA installs this one too; it should move outbound traffic to
    the new SA now. The old pair is removed on the ChildSaDeleted that follows
    once the old SA's Delete exchange is done.
    """

    old_spi_in: bytes = b""
    old_spi_out: bytes = b""


@record(frozen=True, slots=True)
class IkeSaFailed(Event):
    """The IKE SA could not be set up or was refused; ``notify`` is the cause if known.

    ``unanswered``: an established IKE SA's request (a liveness check, a rekey, a
    CREATE_CHILD_SA) went unanswered through every retransmission, so the peer is dead
    (RFC 7296 §2.4): its owner tears the Child SAs down as a dead peer's (the OE
    manager's liveness fallback), not as an ordinary failure.
    """

    reason: str
    notify: int | None = None
    unanswered: bool = False
    #: NO_PROPOSAL_CHOSEN either way: what each side offered (``oe status``, the log)
    offers: ProposalMismatch | None = None


@record(frozen=True, slots=True)
class ChildSaFailed(Event):
    """IKE SA is up but the Child SA was refused (e.g. TS_UNACCEPTABLE) or its rekey failed."""

    reason: str
    notify: int | None = None
    request_id: int | None = None  # what ``IkeSa.create_child`` returned
    rekey_of: bytes | None = None  # our inbound SPI of the Child SA whose rekey failed
    #: NO_PROPOSAL_CHOSEN either way: what each side offered (``oe status``, the log)
    offers: ProposalMismatch | None = None


@record(frozen=True, slots=True)
class IkeSaDeleted(Event):
    """The IKE SA is gone (either side deleted it); its Child SAs went with it."""

    spi_i: bytes
    spi_r: bytes
    reason: str


@record(frozen=True, slots=True)
class ChildSaDeleted(Event):
    """A Child SA is gone (deleted by either side, replaced by a rekey, or expired);
    the datapath should remove both directions."""

    spi_in: bytes
    spi_out: bytes
    reason: str = ""


@record(frozen=True, slots=True)
class IkeSaRekeyed(Event):
    """The IKE SA now runs under new SPIs and keys (RFC 7296 §2.18); its Child SAs moved.

    The endpoint re-indexes the IkeSa object under the new SPIs; it keeps
    answering on the old SPIs until the old SA's Delete exchange is done.
    """

    old_spi_i: bytes
    old_spi_r: bytes
    spi_i: bytes
    spi_r: bytes
    is_initiator: bool  # our role in the new IKE SA (who sent the rekey request)


@record(frozen=True, slots=True)
class InitialContact(Event):
    """The peer sent INITIAL_CONTACT (RFC 7296 §2.4): it has no other SAs with us any more,
    so the owner should delete older IKE and Child SAs with this peer identity."""

    peer_id: tuple[int, bytes]
    peer_address: str
    spi_i: bytes
    spi_r: bytes
