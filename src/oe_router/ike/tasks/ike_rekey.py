"""CREATE_CHILD_SA for the IKE SA itself: rekey (RFC 7296 §1.3.2, §2.18) as
initiator and responder, with simultaneous-rekey collisions (§2.8.2); and the
choice of responder for any CREATE_CHILD_SA request of the peer.

A rekey makes a new ``IkeLink``; the IKE SA switches to it and the old link is
retired until its Delete exchange ends.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..constants import ExchangeType, NotifyType, ProtocolId, notify_name
from ..crypto import dh_group
from ..errors import IkeProtocolError
from ..link import IkeLink
from ..message import Message
from ..payloads import KE, SA, Nonce, Notify, Payload
from ..proposals import ike_proposals, select_ike_proposal
from ..states import ChildState, IkeState
from .base import Responder
from .child_sa import ChildResponder, CreateChildTask, RetryingTask, errors_of

if TYPE_CHECKING:
    from ..sa import IkeSa


class IkeRekeyTask(RetryingTask):
    """Rekey the IKE SA: on success switch to the new link and delete the old."""

    exchange = ExchangeType.CREATE_CHILD_SA

    def __init__(self, sa: IkeSa, not_before: float = 0.0) -> None:
        super().__init__(sa, not_before)
        self.collision: IkeRekeyResponder | None = None  # the peer's rekey at the same time
        self.result: IkeLink | None = None
        self.old_deleted = False  # the peer deleted the old IKE SA before answering us

    def build(self, now: float) -> list[Payload] | None:
        sa = self.sa
        keys = sa.link.keys
        assert keys is not None
        group = self.group or keys.choice.dh
        self.ke = dh_group(group).generate()
        self.ni = sa.random(sa.config.nonce_len)
        self.new_spi = sa.spi8()
        return [
            SA(ike_proposals(sa.config.ike_proposals, self.new_spi, group)),
            Nonce(self.ni),
            KE(group, self.ke.public_bytes),
        ]

    def process(self, msg: Message, now: float) -> None:
        sa = self.sa
        errors = errors_of(msg)
        try:
            if errors:
                n = errors[0]
                if self.collision is None:  # with a collision, the peer's rekey simply wins
                    if n.notify_type == NotifyType.TEMPORARY_FAILURE and self.retry_later(now):
                        return
                    if n.notify_type == NotifyType.INVALID_KE_PAYLOAD and self.retry_group(n):
                        return
                raise IkeProtocolError(
                    n.notify_type, f"peer refused the IKE rekey: {notify_name(n.notify_type)}"
                )
            sa_p, nonce, ke = msg.first(SA), msg.first(Nonce), msg.first(KE)
            if sa_p is None or nonce is None or ke is None or len(sa_p.proposals) != 1:
                raise IkeProtocolError(NotifyType.INVALID_SYNTAX, "IKE rekey response incomplete")
            prop = sa_p.proposals[0]
            assert self.ke is not None
            choice = select_ike_proposal([prop], sa.config.ike_proposals, self.ke.group)
            if (
                choice is None
                or choice.dh != self.ke.group
                or ke.group != self.ke.group
                or len(prop.spi) != 8
                or not 16 <= len(nonce.data) <= 256
            ):
                raise IkeProtocolError(NotifyType.NO_PROPOSAL_CHOSEN, "bad IKE rekey response")
            shared = self.ke.shared_secret(ke.data)
        except IkeProtocolError:
            if self.collision is not None:
                self.collide(self.collision, now)
            return
        self.nr = nonce.data
        spis = (self.new_spi, prop.spi)
        self.result = sa.link.rekeyed(choice, shared, (self.ni, self.nr), spis, True)
        if self.collision is not None:
            self.collide(self.collision, now)
        else:
            sa.switch_to(self.result, now).start_delete(now)

    def collide(self, passive: IkeRekeyResponder, now: float) -> None:
        """Settle a simultaneous IKE SA rekey (§2.8.2). If ours failed, or the peer
        deleted the old SA first, the peer's new SA is the one. Otherwise the
        exchange with the lowest of the four nonces made the redundant SA, and its
        maker deletes it; the old SA is deleted by the other side."""
        sa, ours, theirs = self.sa, self.result, passive.link
        self.collision = None
        assert theirs is not None
        if ours is None:
            old = sa.switch_to(theirs, now)
            if self.old_deleted:
                old.close()
        elif min(self.ni, self.nr, passive.ni, passive.nr) in (self.ni, self.nr):
            sa.switch_to(theirs, now)
            sa.retire(ours, None).start_delete(now)  # redundant: we delete it
        else:
            sa.switch_to(ours, now).start_delete(now)
            sa.retire(theirs, now + sa.config.retire_timeout)  # the peer deletes it


class IkeRekeyResponder(Responder):
    """The peer rekeys the IKE SA."""

    def __init__(self, sa: IkeSa, sa_p: SA) -> None:
        super().__init__(sa)
        self.sa_p = sa_p
        self.ni = self.nr = b""
        self.link: IkeLink | None = None

    def process(self, msg: Message, now: float) -> None:
        sa = self.sa
        nonce, ke = msg.first(Nonce), msg.first(KE)
        try:
            if nonce is None or ke is None:
                raise IkeProtocolError(NotifyType.INVALID_SYNTAX, "IKE rekey lacks Nonce or KE")
            if not 16 <= len(nonce.data) <= 256:
                raise IkeProtocolError(NotifyType.INVALID_SYNTAX, "bad nonce length")
            picked = next(
                (
                    (p, c)
                    for p in self.sa_p.proposals
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
            sa.refuse(msg, e.notify, e.data)
            return
        self.ni, self.nr = nonce.data, sa.random(sa.config.nonce_len)
        spi = sa.spi8()
        nonces, spis = (self.ni, self.nr), (prop.spi, spi)
        self.link = sa.link.rekeyed(choice, shared, nonces, spis, False)
        sa.respond(
            msg, [SA([choice.proposal(spi)]), Nonce(self.nr), KE(choice.dh, mine.public_bytes)]
        )
        active = sa.active
        if isinstance(active, IkeRekeyTask):
            active.collision = self  # settled when ours ends
        else:
            sa.switch_to(self.link, now)  # the old SA waits for the peer's Delete


def create_child_responder(sa: IkeSa, msg: Message) -> Responder | None:
    """Which responder answers the peer's CREATE_CHILD_SA request; None when it was
    refused here already (§2.25: TEMPORARY_FAILURE while busy or closing)."""
    if sa.state == IkeState.DELETING or sa.delete_requested:
        sa.refuse(msg, NotifyType.TEMPORARY_FAILURE)  # §2.25.2: SA being closed
        return None
    sa_p = msg.first(SA)
    if sa_p is None:
        sa.refuse(msg, NotifyType.INVALID_SYNTAX)
        return None
    rekey = next(
        (p for p in msg.payloads if isinstance(p, Notify) and p.notify_type == NotifyType.REKEY_SA),
        None,
    )
    active = sa.active
    rekeying_ike = isinstance(active, IkeRekeyTask)
    if rekey is None and any(p.protocol_id == ProtocolId.IKE for p in sa_p.proposals):
        if active is not None and not rekeying_ike:
            sa.refuse(msg, NotifyType.TEMPORARY_FAILURE)  # finish ours first
            return None
        return IkeRekeyResponder(sa, sa_p)
    if rekeying_ike:
        sa.refuse(msg, NotifyType.TEMPORARY_FAILURE)  # §2.25: we are rekeying the IKE SA
        return None
    old = None
    if rekey is not None:
        old = sa.children.by_peer_spi(rekey.spi)
        if old is None and isinstance(active, CreateChildTask):
            # it may be the SA our own exchange made, whose answer we have not seen
            sa.refuse(msg, NotifyType.TEMPORARY_FAILURE)
            return None
        if old is None:
            sa.refuse(msg, NotifyType.CHILD_SA_NOT_FOUND, spi=rekey.spi)
            return None
        if old.state not in (ChildState.INSTALLED, ChildState.REKEYING):
            sa.refuse(msg, NotifyType.TEMPORARY_FAILURE)  # §2.25.1: being closed
            return None
    return ChildResponder(sa, sa_p, old)


__all__ = ["IkeRekeyResponder", "IkeRekeyTask", "create_child_responder"]
