"""IKE_SA_INIT (RFC 7296 §1.2) as initiator and responder: proposals, KE and
nonces, NAT detection (§2.23), the COOKIE and INVALID_KE_PAYLOAD retries of the
initiator (§2.6, §1.2), and the keys of the new link (§2.14).

Cookies demanded as responder are stateless and live in ``cookies``.
"""

from __future__ import annotations

import hashlib
import ipaddress
from dataclasses import field
from typing import TYPE_CHECKING

from oe_router.records import record

from .. import auth as ike_auth
from ..constants import ExchangeType, HeaderFlag, NotifyType, TransformType, notify_name
from ..crypto import KeyExchange, dh_group
from ..errors import IkeDecodeError, IkeProtocolError
from ..link import ZERO_SPI
from ..message import Message
from ..payloads import KE, SA, Nonce, Notify, Payload, decode_uint16_list, encode_uint16_list
from ..proposals import IkeChoice, ProposalMismatch, ike_proposals, select_ike_proposal, single
from ..states import IkeState
from .base import Responder, Task
from .ike_auth import IkeAuthTask

if TYPE_CHECKING:
    from ..sa import Address, IkeSa


@record(slots=True)
class Handshake:
    """What IKE_AUTH signs from IKE_SA_INIT (§2.15): both messages as sent, and
    the hash algorithms the peer accepts for signatures (RFC 7427)."""

    ours: bytes = b""  # our IKE_SA_INIT message (request or response)
    theirs: bytes = b""
    peer_hashes: list[int] | None = field(default=None)


def nat_hash(spi_i: bytes, spi_r: bytes, address: Address) -> bytes:
    """NAT_DETECTION_*_IP data: SHA-1(SPIi | SPIr | IP | Port) (RFC 7296 §2.23)."""
    ip = ipaddress.ip_address(address[0]).packed
    return hashlib.sha1(spi_i + spi_r + ip + address[1].to_bytes(2, "big")).digest()


def _hash_list(msg: Message) -> list[int] | None:
    for p in msg.payloads:
        if isinstance(p, Notify) and p.notify_type == NotifyType.SIGNATURE_HASH_ALGORITHMS:
            try:
                return decode_uint16_list(p.data)
            except IkeDecodeError:
                return None
    return None


def _our_notifies(sa: IkeSa, spi_r: bytes) -> list[Payload]:
    """NAT detection, fragmentation support and signature hashes, both roles."""
    c = sa.config
    source = nat_hash(sa.link.spi_i, spi_r, c.local_address)
    if c.force_udp_encap:
        # a source hash that matches no address: the peer sees us behind a NAT and
        # sends ESP in UDP (strongSwan's encap=yes does the same)
        source = hashlib.sha1(b"oe-router: UDP encapsulation forced" + source).digest()
    hashes = encode_uint16_list(list(ike_auth.OUR_HASH_ALGORITHMS))
    return [
        Notify.status(NotifyType.NAT_DETECTION_SOURCE_IP, source),
        Notify.status(
            NotifyType.NAT_DETECTION_DESTINATION_IP,
            nat_hash(sa.link.spi_i, spi_r, c.remote_address),
        ),
        Notify.status(NotifyType.IKEV2_FRAGMENTATION_SUPPORTED),
        Notify.status(NotifyType.SIGNATURE_HASH_ALGORITHMS, hashes),
    ]


def _learn(sa: IkeSa, msg: Message, remote: Address) -> None:
    """From the peer's IKE_SA_INIT: NAT (§2.23: no source hash matching means the
    peer is NATed, a destination hash not matching our address means we are),
    fragmentation support and signature hashes."""
    notifies = [p for p in msg.payloads if isinstance(p, Notify)]
    src = [n.data for n in notifies if n.notify_type == NotifyType.NAT_DETECTION_SOURCE_IP]
    dst = [n.data for n in notifies if n.notify_type == NotifyType.NAT_DETECTION_DESTINATION_IP]
    peer = sa.peer
    if src:
        peer.nat_remote = nat_hash(msg.spi_i, msg.spi_r, remote) not in src
    if dst:
        peer.nat_local = nat_hash(msg.spi_i, msg.spi_r, sa.config.local_address) not in dst
    if sa.config.force_udp_encap:
        peer.nat_local = True  # as we told the peer: float to 4500, send keepalives
    sa.link.peer_frag = any(
        n.notify_type == NotifyType.IKEV2_FRAGMENTATION_SUPPORTED for n in notifies
    )
    sa.handshake.peer_hashes = _hash_list(msg)


class IkeInitTask(Task):
    """Our IKE_SA_INIT request, retried with a cookie or another DH group."""

    exchange = ExchangeType.IKE_SA_INIT

    def __init__(self, sa: IkeSa) -> None:
        super().__init__(sa)
        first = sa.config.ike_proposals[0].dh_groups[0]
        self.ke: KeyExchange = dh_group(first).generate()
        self.cookie = b""

    def build(self, now: float) -> list[Payload] | None:
        payloads: list[Payload] = []
        if self.cookie:
            payloads.append(Notify.status(NotifyType.COOKIE, self.cookie))
        payloads += [
            SA(ike_proposals(self.sa.config.ike_proposals)),
            KE(self.ke.group, self.ke.public_bytes),
            Nonce(self.sa.link.ni),
        ]
        return payloads + _our_notifies(self.sa, ZERO_SPI)

    def send(self, now: float) -> None:
        """IKE_SA_INIT travels in the clear, always as message 0."""
        link = self.sa.link
        payloads = self.build(now)
        assert payloads is not None
        flags = link.flags(False)
        msg = Message(link.spi_i, ZERO_SPI, ExchangeType.IKE_SA_INIT, flags, 0, payloads)
        self.sa.handshake.ours = msg.encode()
        link.next_mid = 1
        self.sa.set_state(IkeState.INIT_SENT)
        link.send_request([self.sa.handshake.ours], now)

    def process(self, msg: Message, now: float) -> None:
        raise NotImplementedError("IKE_SA_INIT needs the raw message: process_init")

    def process_init(self, msg: Message, raw: bytes, remote: Address, now: float) -> None:
        """The responder's answer: a cookie or group to retry with, a refusal, or
        its SA, KE and nonce, from which the link's keys follow; IKE_AUTH next."""
        sa = self.sa
        for n in (p for p in msg.payloads if isinstance(p, Notify)):
            if n.notify_type == NotifyType.COOKIE and len(n.data) <= 64:
                self.cookie = n.data
                self.send(now)
                return
            if n.notify_type == NotifyType.INVALID_KE_PAYLOAD and len(n.data) == 2:
                group = int.from_bytes(n.data, "big")
                ours = {g for s in sa.config.ike_proposals for g in s.dh_groups}
                if group == self.ke.group:
                    # A late copy of the refusal we already obeyed (the peer answered our
                    # retransmitted first request too): the retry with this group is in flight.
                    return
                if group in ours:
                    self.ke = dh_group(group).generate()
                    self.send(now)
                else:
                    sa.fail(f"peer wants DH group {group}, which we do not offer", n.notify_type)
                return
            if n.is_error:
                offers = None
                if n.notify_type == NotifyType.NO_PROPOSAL_CHOSEN:
                    offered = ike_proposals(sa.config.ike_proposals)
                    offers = ProposalMismatch.peer_refused("IKE", offered)
                why = f"peer refused IKE_SA_INIT: {notify_name(n.notify_type)}"
                sa.fail(why, n.notify_type, offers=offers)
                return
        try:
            choice, nonce, shared = self._accept(msg)
        except IkeProtocolError as e:
            sa.fail(f"bad IKE_SA_INIT response: {e}", e.notify)
            return
        sa.link.spi_r = msg.spi_r
        sa.link.nr = nonce
        sa.handshake.theirs = raw
        _learn(sa, msg, remote)
        sa.link.derive(choice, shared)
        sa.start(IkeAuthTask(sa), now)

    def _accept(self, msg: Message) -> tuple[IkeChoice, bytes, bytes]:
        sa_p, ke, nonce = msg.first(SA), msg.first(KE), msg.first(Nonce)
        if sa_p is None or ke is None or nonce is None:
            raise IkeProtocolError(
                NotifyType.INVALID_SYNTAX, "IKE_SA_INIT response lacks SA, KE or Nonce"
            )
        if len(sa_p.proposals) != 1:
            raise IkeProtocolError(
                NotifyType.NO_PROPOSAL_CHOSEN, "responder chose more than one proposal"
            )
        prop = sa_p.proposals[0]
        for ttype in (TransformType.ENCR, TransformType.PRF, TransformType.INTEG, TransformType.DH):
            single(prop, ttype)
        choice = select_ike_proposal([prop], self.sa.config.ike_proposals, self.ke.group)
        if choice is None or choice.dh != self.ke.group or ke.group != self.ke.group:
            raise IkeProtocolError(
                NotifyType.NO_PROPOSAL_CHOSEN, "responder chose transforms we did not offer"
            )
        if not 16 <= len(nonce.data) <= 256:
            raise IkeProtocolError(NotifyType.INVALID_SYNTAX, f"nonce of {len(nonce.data)} bytes")
        if msg.spi_r == ZERO_SPI:
            raise IkeProtocolError(NotifyType.INVALID_SYNTAX, "responder SPI is zero")
        return choice, nonce.data, self.ke.shared_secret(ke.data)


class IkeInitResponder(Responder):
    """The peer's IKE_SA_INIT request: choose, answer in the clear, derive keys."""

    def process(self, msg: Message, now: float) -> None:
        raise NotImplementedError("IKE_SA_INIT needs the raw message: process_init")

    def process_init(self, msg: Message, raw: bytes, remote: Address) -> None:
        sa = self.sa
        sa_p, ke, nonce = msg.first(SA), msg.first(KE), msg.first(Nonce)
        offers: ProposalMismatch | None = None
        try:
            if sa_p is None or ke is None or nonce is None:
                raise IkeProtocolError(
                    NotifyType.INVALID_SYNTAX, "IKE_SA_INIT request lacks SA, KE or Nonce"
                )
            if not 16 <= len(nonce.data) <= 256:
                raise IkeProtocolError(
                    NotifyType.INVALID_SYNTAX, f"nonce of {len(nonce.data)} bytes"
                )
            choice = select_ike_proposal(sa_p.proposals, sa.config.ike_proposals, ke.group)
            if choice is None:
                ours = ike_proposals(sa.config.ike_proposals)
                offers = ProposalMismatch.we_refused("IKE", sa_p.proposals, ours)
                raise IkeProtocolError(NotifyType.NO_PROPOSAL_CHOSEN, "no acceptable IKE proposal")
            if choice.dh != ke.group:
                raise IkeProtocolError(
                    NotifyType.INVALID_KE_PAYLOAD,
                    f"KE group {ke.group}, we want {choice.dh}",
                    choice.dh.to_bytes(2, "big"),
                )
            my_ke = dh_group(choice.dh).generate()
            shared = my_ke.shared_secret(ke.data)
        except IkeProtocolError as e:
            refusal: list[Payload] = [Notify.status(e.notify, e.data)]
            flags = HeaderFlag.RESPONSE
            reply = Message(msg.spi_i, ZERO_SPI, ExchangeType.IKE_SA_INIT, flags, 0, refusal)
            sa.send_plain(reply.encode())
            sa.fail(f"refused IKE_SA_INIT from {remote[0]}: {e}", e.notify, offers=offers)
            return
        link = sa.link
        link.spi_i, link.spi_r = msg.spi_i, sa.spi8()
        sa.peer.ip = remote[0]
        link.ni, link.nr = nonce.data, sa.random(sa.config.nonce_len)
        sa.handshake.theirs = raw
        _learn(sa, msg, remote)
        payloads: list[Payload] = [
            SA([choice.proposal()]),
            KE(choice.dh, my_ke.public_bytes),
            Nonce(link.nr),
        ]
        payloads += _our_notifies(sa, link.spi_r)
        reply = Message(
            link.spi_i, link.spi_r, ExchangeType.IKE_SA_INIT, HeaderFlag.RESPONSE, 0, payloads
        )
        sa.handshake.ours = reply.encode()
        link.derive(choice, shared)
        sa.set_state(IkeState.INIT_DONE)
        link.cache_reply(0, [sa.handshake.ours])


__all__ = ["Handshake", "IkeInitResponder", "IkeInitTask", "nat_hash"]
