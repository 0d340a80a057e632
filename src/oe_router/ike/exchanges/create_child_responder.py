"""CREATE_CHILD_SA as the exchange's responder: a peer's new Child SA, Child SA
rekey or IKE SA rekey, with the collision and TEMPORARY_FAILURE rules of
RFC 7296 §2.8.1, §2.8.2 and §2.25.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..child import ChildRecord, Collision, has_notify
from ..constants import NotifyType, ProtocolId
from ..crypto import dh_group
from ..errors import IkeProtocolError
from ..events import ChildSaFailed
from ..message import Message
from ..payloads import KE, SA, Nonce, Notify, Payload, TSi, TSr
from ..proposals import select_child_proposal, select_ike_proposal
from ..states import ChildState, IkeState

if TYPE_CHECKING:
    from ..sa import IkeSa


def got_create_child(sa: IkeSa, msg: Message, now: float) -> None:
    """Answer a peer's CREATE_CHILD_SA: new Child SA, Child rekey or IKE rekey."""
    if sa._retired or sa.state == IkeState.DELETING or sa._delete_requested:
        sa._refuse(msg, NotifyType.TEMPORARY_FAILURE)  # §2.25.2: SA being closed
        return
    sa_p = msg.first(SA)
    if not isinstance(sa_p, SA):
        sa._refuse(msg, NotifyType.INVALID_SYNTAX)
        return
    rekey = next(
        (p for p in msg.payloads if isinstance(p, Notify) and p.notify_type == NotifyType.REKEY_SA),
        None,
    )
    busy = sa._inflight.kind if sa._inflight is not None else ""
    if rekey is None and any(p.protocol_id == ProtocolId.IKE for p in sa_p.proposals):
        if busy and busy != "rekey-ike":
            sa._refuse(msg, NotifyType.TEMPORARY_FAILURE)  # finish ours first
            return
        respond_ike_rekey(sa, msg, sa_p, now)
        return
    if busy == "rekey-ike" or sa._ike_collision is not None:
        sa._refuse(msg, NotifyType.TEMPORARY_FAILURE)  # §2.25: we are rekeying the IKE SA
        return
    old: ChildRecord | None = None
    if rekey is not None:
        old = next((c for c in sa._children.values() if c.spi_out == rekey.spi), None)
        if old is None and busy in ("create", "rekey-child"):
            # it may be the SA our own exchange made, whose answer we have not seen
            sa._refuse(msg, NotifyType.TEMPORARY_FAILURE)
            return
        if old is None:
            sa._refuse(msg, NotifyType.CHILD_SA_NOT_FOUND, spi=rekey.spi)
            return
        if old.state not in (ChildState.INSTALLED, ChildState.REKEYING):
            sa._refuse(msg, NotifyType.TEMPORARY_FAILURE)  # §2.25.1: being closed
            return
    try:
        child, payloads, nr = responder_new_child(sa, msg, sa_p, now, old)
    except IkeProtocolError as e:
        sa._refuse(msg, e.notify, e.data)
        if old is None:
            sa._events.append(ChildSaFailed(f"refused the peer's Child SA: {e}", e.notify))
        return
    sa._respond_encrypted(msg, payloads)
    if old is None:
        sa._report(child)
    elif old.state == ChildState.REKEYING:  # simultaneous rekey (§2.8.1): decided when ours ends
        nonce = msg.first(Nonce)
        assert isinstance(nonce, Nonce)
        old.collision = Collision(nonce.data, nr, child)
    else:
        old.set_state(ChildState.REKEYED)  # the peer deletes it
        sa._report(child, old)


def responder_new_child(
    sa: IkeSa, msg: Message, sa_p: SA, now: float, old: ChildRecord | None
) -> tuple[ChildRecord, list[Payload], bytes]:
    nonce, ke, tsi, tsr = msg.first(Nonce), msg.first(KE), msg.first(TSi), msg.first(TSr)
    if not (isinstance(nonce, Nonce) and isinstance(tsi, TSi) and isinstance(tsr, TSr)):
        raise IkeProtocolError(NotifyType.INVALID_SYNTAX, "request lacks Nonce/TSi/TSr")
    if not 16 <= len(nonce.data) <= 256:
        raise IkeProtocolError(NotifyType.INVALID_SYNTAX, f"nonce of {len(nonce.data)} bytes")
    ke_group = ke.group if isinstance(ke, KE) else None
    picked = select_child_proposal(sa_p.proposals, sa.config.esp_proposals, ke_group)
    if picked is None:
        raise IkeProtocolError(NotifyType.NO_PROPOSAL_CHOSEN, "no acceptable ESP proposal")
    number, choice = picked
    shared: bytes | None = None
    reply_ke: list[Payload] = []
    if choice.dh is not None:
        if not isinstance(ke, KE) or ke.group != choice.dh:
            raise IkeProtocolError(
                NotifyType.INVALID_KE_PAYLOAD,
                f"KE group {ke_group}, we want {choice.dh}",
                choice.dh.to_bytes(2, "big"),
            )
        mine = dh_group(choice.dh).generate()
        shared = mine.shared_secret(ke.data)
        reply_ke = [KE(choice.dh, mine.public_bytes)]
    ts_remote, ts_local = sa._responder_selectors(tsi.selectors, tsr.selectors, ())
    transport = (
        old.transport
        if old is not None
        else sa.config.transport_mode and has_notify(msg, NotifyType.USE_TRANSPORT_MODE)
    )
    nr = sa.random(sa.config.nonce_len)
    our_spi = sa._spi4()
    child = sa._new_child(
        choice, our_spi, ts_local, ts_remote, transport, (nonce.data, nr), shared, False, now
    )
    payloads: list[Payload] = [Notify.status(NotifyType.USE_TRANSPORT_MODE)] if transport else []
    payloads += [SA([choice.proposal(number, our_spi)]), Nonce(nr), *reply_ke]
    payloads += [TSi(ts_remote), TSr(ts_local)]
    return child, payloads, nr


def respond_ike_rekey(sa: IkeSa, msg: Message, sa_p: SA, now: float) -> None:
    nonce, ke = msg.first(Nonce), msg.first(KE)
    try:
        if not isinstance(nonce, Nonce) or not isinstance(ke, KE):
            raise IkeProtocolError(NotifyType.INVALID_SYNTAX, "IKE rekey lacks Nonce or KE")
        if not 16 <= len(nonce.data) <= 256:
            raise IkeProtocolError(NotifyType.INVALID_SYNTAX, "bad nonce length")
        picked = next(
            (
                (p, c)
                for p in sa_p.proposals
                if len(p.spi) == 8
                and (c := select_ike_proposal([p], sa.config.ike_proposals, ke.group))
            ),
            None,
        )
        if picked is None:
            raise IkeProtocolError(NotifyType.NO_PROPOSAL_CHOSEN, "no acceptable IKE proposal")
        prop, choice = picked
        if choice.dh != ke.group:
            raise IkeProtocolError(
                NotifyType.INVALID_KE_PAYLOAD, "KE group", choice.dh.to_bytes(2, "big")
            )
        mine = dh_group(choice.dh).generate()
        shared = mine.shared_secret(ke.data)
    except IkeProtocolError as e:
        sa._refuse(msg, e.notify, e.data)
        return
    nr = sa.random(sa.config.nonce_len)
    spi = sa._spi8()
    link = sa._rekeyed_link(choice, shared, nonce.data, nr, (prop.spi, spi), False)
    sa._respond_encrypted(
        msg, [SA([choice.proposal(spi)]), Nonce(nr), KE(choice.dh, mine.public_bytes)]
    )
    if sa._inflight is not None and sa._inflight.kind == "rekey-ike":
        sa._ike_collision = Collision(nonce.data, nr, link=link)  # decided when ours ends
    else:
        sa._switch_to(link, now)  # the old SA waits for the peer's Delete
