"""IKE_AUTH (RFC 7296 §1.2, §2.15) as initiator and responder: identities, AUTH
(NULL auth, RFC 7427 and RSA signatures, asymmetric), INITIAL_CONTACT, the first
Child SA with its selectors and CP inner addresses, and AUTHENTICATION_FAILED
(§2.21.2).

A responder that holds no key for a signing initiator with an FQDN identity may
look it up (``IkeSaConfig.lookup_peer_key``): the request is held in AUTH_PENDING,
PeerKeyNeeded goes to the owner, and ``IkeSa.peer_key_found`` resumes it here.
"""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING

from .. import auth as ike_auth
from ..child import ChildRecord, cp_reply, cp_reply_addresses, cp_request, has_notify
from ..constants import AuthMethod, ExchangeType, IdType, NotifyType, TransformType
from ..errors import IkeProtocolError
from ..events import ChildSaFailed, IkeSaEstablished, InitialContact, PeerKeyNeeded
from ..message import Message
from ..payloads import AUTH, CP, SA, IDi, IDr, IpAddress, Notify, Payload, Proposal, TSi, TSr
from ..proposals import ProposalMismatch, esp_accepted, esp_proposals, select_esp_proposal
from ..states import IkeState
from .base import Responder, Task

if TYPE_CHECKING:
    from ..sa import IkeSa


def _octets(sa: IkeSa, ours: bool, ident: IDi | IDr) -> tuple[bytes, bytes]:
    """(signed octets, SK_p) for our AUTH or for checking the peer's (§2.15)."""
    link, hs = sa.link, sa.handshake
    keys = link.keys
    assert keys is not None
    our_nonce, peer_nonce = (link.ni, link.nr) if link.is_initiator else (link.nr, link.ni)
    if ours:
        sk_p = keys.sk_p_ours
        return ike_auth.signed_octets(hs.ours, peer_nonce, keys.prf, sk_p, ident), sk_p
    sk_p = keys.sk_p_peer
    return ike_auth.signed_octets(hs.theirs, our_nonce, keys.prf, sk_p, ident), sk_p


def make_auth(sa: IkeSa, ident: IDi | IDr) -> AUTH:
    assert sa.link.keys is not None
    octets, sk_p = _octets(sa, True, ident)
    c = sa.config
    if c.private_key is None:
        auth = ike_auth.null_auth(sa.link.keys.prf, sk_p, octets)
    else:
        auth = ike_auth.signature_auth(
            c.private_key, octets, sa.handshake.peer_hashes, rsa_pss=c.rsa_pss
        )
    sa.peer.local_auth_method = auth.method
    return auth


def verify_auth(sa: IkeSa, auth: AUTH, ident: IDi | IDr) -> None:
    assert sa.link.keys is not None
    octets, sk_p = _octets(sa, False, ident)
    if sa.peer.public_key is None:
        ike_auth.verify_null_auth(auth, sa.link.keys.prf, sk_p, octets)
    else:
        ike_auth.verify_signature_auth(auth, sa.peer.public_key, octets)
    sa.peer.auth_method = auth.method


def _authenticated(sa: IkeSa, msg: Message, peer: IDi | IDr, now: float) -> None:
    """Both sides proven: the IKE SA is up; tell the owner (and of INITIAL_CONTACT)."""
    sa.established(now)
    keys = sa.link.keys
    assert keys is not None
    s, p, link = keys.choice.spec, sa.peer, sa.link
    sa.emit(
        IkeSaEstablished(
            link.spi_i,
            link.spi_r,
            link.is_initiator,
            sa.config.local_id,
            (peer.id_type, peer.data),
            p.local_auth_method,
            p.auth_method,
            s.encr,
            s.key_bits,
            s.prf,
            s.integ,
            keys.choice.dh,
            p.nat_local,
            p.nat_remote,
        )
    )
    if has_notify(msg, NotifyType.INITIAL_CONTACT):
        ident = (peer.id_type, peer.data)
        sa.emit(InitialContact(ident, p.ip, link.spi_i, link.spi_r))


class IkeAuthTask(Task):
    """Our IKE_AUTH request with the first Child SA, and the responder's answer."""

    exchange = ExchangeType.IKE_AUTH

    def __init__(self, sa: IkeSa) -> None:
        super().__init__(sa)
        self.child_spi = b""
        self.offered: list[Proposal] = []  # our ESP proposals for the first Child SA

    def build(self, now: float) -> list[Payload] | None:
        sa, c = self.sa, self.sa.config
        t, d = c.local_id
        ident = IDi(t, d)
        self.child_spi = sa.spi4()
        payloads: list[Payload] = [ident, make_auth(sa, ident)]
        if c.initial_contact:
            payloads.append(Notify.status(NotifyType.INITIAL_CONTACT))
        if c.request_internal_address:  # of the family our selectors are in
            payloads.append(cp_request(ipaddress.ip_address(c.local_address[0]).version))
        if c.transport_mode:
            payloads.append(Notify.status(NotifyType.USE_TRANSPORT_MODE))
        self.offered = esp_proposals(c.esp_proposals, self.child_spi)
        payloads += [
            SA(self.offered),
            TSi(list(c.local_ts)),
            TSr(list(c.remote_ts)),
        ]
        sa.set_state(IkeState.AUTH_SENT)
        return payloads

    def process(self, msg: Message, now: float) -> None:
        sa = self.sa
        errors = [p for p in msg.payloads if isinstance(p, Notify) and p.is_error]
        ident, auth = msg.first(IDr), msg.first(AUTH)
        if ident is None or auth is None:
            n = errors[0].notify_type if errors else None
            why = "peer refused IKE_AUTH" + (f" with notify {n}" if n else ": no IDr/AUTH")
            # a peer that refuses our ESP proposals may refuse the whole IKE_AUTH (OpenIKED)
            sa.fail(why, n, offers=self._refused(n))
            return
        try:
            verify_auth(sa, auth, ident)
        except IkeProtocolError as e:
            # §2.21.2: tell the responder, which believes the IKE SA is up, then give up
            sa.link.notify_once([Notify.status(NotifyType.AUTHENTICATION_FAILED)])
            sa.fail(f"responder authentication failed: {e}", e.notify)
            return
        _authenticated(sa, msg, ident, now)
        self._first_child(msg, errors, now)

    def _refused(self, notify: int | None) -> ProposalMismatch | None:
        """Our ESP offer, when the peer said NO_PROPOSAL_CHOSEN."""
        if notify != NotifyType.NO_PROPOSAL_CHOSEN:
            return None
        return ProposalMismatch.peer_refused("ESP", self.offered)

    def _first_child(self, msg: Message, errors: list[Notify], now: float) -> None:
        sa = self.sa
        if errors:
            n = errors[0].notify_type
            sa.emit(ChildSaFailed("peer refused the Child SA", n, offers=self._refused(n)))
            return
        sa_p, tsi, tsr = msg.first(SA), msg.first(TSi), msg.first(TSr)
        if sa_p is None or tsi is None or tsr is None or len(sa_p.proposals) != 1:
            sa.emit(ChildSaFailed("IKE_AUTH response lacks SA/TSi/TSr", NotifyType.INVALID_SYNTAX))
            return
        picked = select_esp_proposal(sa_p.proposals, sa.config.esp_proposals)
        if picked is None or len(sa_p.proposals[0].of_type(TransformType.ESN)) > 1:
            why = "peer chose ESP transforms we did not offer"
            sa.emit(ChildSaFailed(why, NotifyType.NO_PROPOSAL_CHOSEN))
            return
        transport = sa.config.transport_mode and has_notify(msg, NotifyType.USE_TRANSPORT_MODE)
        addresses = cp_reply_addresses(msg.first(CP))
        child = sa.new_child(
            picked[1],
            self.child_spi,
            (tsi.selectors, tsr.selectors),
            transport,
            (sa.link.ni, sa.link.nr),
            None,
            True,
            now,
            None,
            addresses,
        )
        c, policy = sa.config, sa.ts_policy()
        why = policy.initiator_problem(
            tsi.selectors, tsr.selectors, c.local_ts, c.remote_ts
        ) or policy.inner_problem(tsi.selectors, addresses)
        if why:
            sa.queue_delete(child, why, now)
            sa.emit(ChildSaFailed(why, NotifyType.TS_UNACCEPTABLE))
            return
        sa.report(child)


_SIGNATURES = (AuthMethod.DIGITAL_SIGNATURE, AuthMethod.RSA_DIGITAL_SIGNATURE)


def fqdn_text(data: bytes) -> str | None:
    """An ID_FQDN's data as a host name (letters, digits, '-', '.'), or None."""
    try:
        text = data.decode("ascii").rstrip(".")
    except UnicodeDecodeError:
        return None
    labels = text.split(".")
    if not text or len(text) > 253 or any(not 0 < len(x) < 64 for x in labels):
        return None
    if not all(c.isalnum() or c in "-_" for x in labels for c in x):
        return None
    return text


class IkeAuthResponder(Responder):
    """The initiator's IKE_AUTH: check it, answer with ours and the first Child SA.

    When the initiator's key must first be looked up, this object holds the request
    (``deadline``: when to give up) until ``resume``.
    """

    def __init__(self, sa: IkeSa) -> None:
        super().__init__(sa)
        self.deadline = 0.0
        self._held: tuple[Message, IDi, AUTH, str] | None = None

    def process(self, msg: Message, now: float) -> None:
        sa = self.sa
        ident, auth = msg.first(IDi), msg.first(AUTH)
        name = self._lookup_name(ident, auth)
        if name is not None and ident is not None and auth is not None:
            self._held = (msg, ident, auth, name)
            self.deadline = now + sa.config.peer_key_timeout
            sa.pending_auth = self
            sa.set_state(IkeState.AUTH_PENDING)
            sa.emit(PeerKeyNeeded((ident.id_type, ident.data), name))
            return
        self._answer(msg, ident, auth, now)

    def resume(self, key: ike_auth.PublicKey | None, now: float, why: str) -> None:
        """The looked-up key of the held request's identity (None: there is none)."""
        assert self._held is not None
        msg, ident, auth, name = self._held
        self._held = None
        sa = self.sa
        if key is None:
            e = IkeProtocolError(
                NotifyType.AUTHENTICATION_FAILED, f"no key for {name}" + (f": {why}" if why else "")
            )
            self._refuse(msg, e)
            return
        sa.peer.public_key, sa.peer.key_by_identity = key, True
        self._answer(msg, ident, auth, now)

    def _lookup_name(self, ident: IDi | None, auth: AUTH | None) -> str | None:
        """The FQDN to look the initiator's key up under, when we must; else None."""
        sa = self.sa
        if not sa.config.lookup_peer_key or sa.peer.public_key is not None:
            return None
        if ident is None or auth is None or ident.id_type != IdType.ID_FQDN:
            return None
        return fqdn_text(ident.data) if auth.method in _SIGNATURES else None

    def _refuse(self, msg: Message, e: IkeProtocolError) -> None:
        self.sa.respond(msg, [Notify.status(e.notify, e.data)])
        self.sa.fail(f"initiator authentication failed: {e}", e.notify)

    def _answer(self, msg: Message, ident: IDi | None, auth: AUTH | None, now: float) -> None:
        sa = self.sa
        try:
            if ident is None or auth is None:
                raise IkeProtocolError(
                    NotifyType.INVALID_SYNTAX, "IKE_AUTH request lacks IDi or AUTH"
                )
            verify_auth(sa, auth, ident)
        except IkeProtocolError as e:
            self._refuse(msg, e)
            return
        t, d = sa.config.local_id
        my_id = IDr(t, d)
        reply: list[Payload] = [my_id, make_auth(sa, my_id)]
        _authenticated(sa, msg, ident, now)
        child, extra = self._first_child(msg, now)
        sa.respond(msg, reply + extra)
        if isinstance(child, ChildRecord):
            sa.report(child)
        elif isinstance(child, ChildSaFailed):
            sa.emit(child)

    def _first_child(
        self, msg: Message, now: float
    ) -> tuple[ChildRecord | ChildSaFailed | None, list[Payload]]:
        sa = self.sa
        sa_p, tsi, tsr = msg.first(SA), msg.first(TSi), msg.first(TSr)
        if sa_p is None or tsi is None or tsr is None:
            return None, []  # childless IKE SA (RFC 6023)
        picked = select_esp_proposal(sa_p.proposals, sa.config.esp_proposals)
        if picked is None:
            ours = esp_accepted(sa.config.esp_proposals)
            offers = ProposalMismatch.we_refused("ESP", sa_p.proposals, ours)
            why = "no acceptable ESP proposal"
            refused = ChildSaFailed(why, NotifyType.NO_PROPOSAL_CHOSEN, offers=offers)
            return refused, [Notify.status(NotifyType.NO_PROPOSAL_CHOSEN)]
        extra: list[Payload] = []
        assigned: tuple[IpAddress, ...] = ()
        cp = msg.first(CP)
        if cp is not None and cp.cfg_type == 1:  # CFG_REQUEST
            reply_cp, assigned = cp_reply(cp, sa.config.internal_addresses)
            extra.append(reply_cp)
        try:
            policy = sa.ts_policy()
            ts_remote, ts_local = policy.responder_selectors(tsi.selectors, tsr.selectors, assigned)
        except IkeProtocolError as e:
            return ChildSaFailed(str(e), e.notify), [Notify.status(e.notify)]
        number, choice = picked
        our_spi = sa.spi4()
        transport = sa.config.transport_mode and has_notify(msg, NotifyType.USE_TRANSPORT_MODE)
        if transport:
            extra.append(Notify.status(NotifyType.USE_TRANSPORT_MODE))
        extra += [SA([choice.proposal(number, our_spi)]), TSi(ts_remote), TSr(ts_local)]
        nonces = (sa.link.ni, sa.link.nr)
        child = sa.new_child(
            choice,
            our_spi,
            (ts_local, ts_remote),
            transport,
            nonces,
            None,
            False,
            now,
            None,
            assigned,
        )
        return child, extra


__all__ = ["IkeAuthResponder", "IkeAuthTask", "fqdn_text", "make_auth", "verify_auth"]
