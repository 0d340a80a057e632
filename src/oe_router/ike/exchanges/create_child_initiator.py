"""CREATE_CHILD_SA as the exchange's initiator: handling the answers to our
new-Child-SA, Child-rekey and IKE-rekey requests (RFC 7296 §1.3, §2.8, §2.25).

Why a module of functions over ``IkeSa``: one role per module keeps ``sa``
readable; the state stays in the IkeSa object they are given.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..child import ChildRecord, Request, has_notify
from ..constants import NotifyType, TransformType, notify_name
from ..errors import IkeProtocolError
from ..events import ChildSaFailed
from ..message import Message
from ..payloads import KE, SA, Nonce, Notify, TSi, TSr
from ..proposals import select_child_proposal, select_ike_proposal, single
from ..states import ChildState, IkeState

if TYPE_CHECKING:
    from ..sa import IkeSa


def child_failed(
    sa: IkeSa, req: Request, old: ChildRecord | None, reason: str, notify: int | None
) -> None:
    if old is not None:
        if old.collision is not None and old.collision.child is not None:
            winner = old.collision.child  # our rekey failed: the peer's wins
            old.collision = None
            old.set_state(ChildState.REKEYED)
            sa._report(winner, old)
            return
        if old.state == ChildState.REKEYING:
            old.set_state(ChildState.INSTALLED)
    sa._events.append(ChildSaFailed(reason, notify, req.request_id, old.spi_in if old else None))


def child_response(sa: IkeSa, req: Request, msg: Message, now: float) -> None:
    old = sa._children.get(req.child) if req.kind == "rekey-child" else None
    errors = [p for p in msg.payloads if isinstance(p, Notify) and p.is_error]
    if errors:
        n = errors[0]
        if n.notify_type == NotifyType.TEMPORARY_FAILURE:
            if old is not None and old.state == ChildState.REKEYING and old.collision is None:
                old.set_state(ChildState.INSTALLED)
                req.not_before = now  # re-checked at send time
            if (old is None or old.collision is None) and sa._retry_later(req, now):
                return
        elif n.notify_type == NotifyType.INVALID_KE_PAYLOAD and sa._retry_group(req, n):
            if old is not None and old.state == ChildState.REKEYING:
                old.set_state(ChildState.INSTALLED)
            return
        elif n.notify_type == NotifyType.NO_PROPOSAL_CHOSEN and req.ke is not None and req.pfs:
            # a peer without PFS in its Child SA proposals (strongSwan's default
            # esp_proposals) refuses every proposal with DH: ask once more without
            # PFS rather than let the Child SA expire (the IKE SA is authenticated,
            # so only the peer itself can refuse)
            req.pfs = False
            if old is not None and old.state == ChildState.REKEYING:
                old.set_state(ChildState.INSTALLED)
            sa._queue.appendleft(req)
            return
        elif n.notify_type == NotifyType.CHILD_SA_NOT_FOUND and old is not None:
            # §2.25: forget it and create a fresh Child SA with the same selectors
            sa._remove_child(old, "the peer no longer has it")
            sa._queue.append(Request("create", None, req.ts_local, req.ts_remote, req.transport))
            return
        child_failed(
            sa, req, old, f"peer refused the Child SA: {notify_name(n.notify_type)}", n.notify_type
        )
        return
    try:
        child = accept_child(sa, req, msg, now)
    except IkeProtocolError as e:
        child_failed(sa, req, old, str(e), e.notify)
        return
    if child is None:
        if old is not None and old.state == ChildState.REKEYING:
            old.set_state(ChildState.INSTALLED)
        return
    if req.kind == "create":
        sa._report(child)
        return
    if old is None or req.orphaned:
        # the SA we rekeyed was deleted by the peer meanwhile: drop the new one (§2.25.1)
        sa._queue_delete(child, "replaced SA is gone", now)
        return
    col, old.collision = old.collision, None
    if col is not None and col.child is not None:
        theirs = col.child
        if min(req.ni, req.nr, col.ni, col.nr) in (req.ni, req.nr):
            # our exchange holds the lowest nonce: our new SA is redundant (§2.8.1)
            sa._report(child)
            sa._queue_delete(child, "redundant after a rekey collision", now)
            sa._report(theirs, old)
            old.set_state(ChildState.REKEYED)  # the peer, who made the survivor, deletes it
        else:
            sa._report(child, old)
            sa._report(theirs)
            theirs.set_state(ChildState.REDUNDANT)  # the peer deletes it
            sa._queue_delete(old, "rekeyed", now)
        return
    sa._report(child, old)
    sa._queue_delete(old, "rekeyed", now)


def accept_child(sa: IkeSa, req: Request, msg: Message, now: float) -> ChildRecord | None:
    """Check a CREATE_CHILD_SA response and derive the new Child SA (initiator side)."""
    sa_p, nonce, ke = msg.first(SA), msg.first(Nonce), msg.first(KE)
    tsi, tsr = msg.first(TSi), msg.first(TSr)
    if not (
        isinstance(sa_p, SA)
        and isinstance(nonce, Nonce)
        and isinstance(tsi, TSi)
        and isinstance(tsr, TSr)
        and len(sa_p.proposals) == 1
    ):
        raise IkeProtocolError(
            NotifyType.INVALID_SYNTAX, "CREATE_CHILD_SA response lacks SA/Nonce/TSi/TSr"
        )
    if not 16 <= len(nonce.data) <= 256:
        raise IkeProtocolError(NotifyType.INVALID_SYNTAX, f"nonce of {len(nonce.data)} bytes")
    prop = sa_p.proposals[0]
    for ttype in (TransformType.ENCR, TransformType.INTEG, TransformType.DH, TransformType.ESN):
        single(prop, ttype)
    group = req.ke.group if req.ke is not None else None
    picked = select_child_proposal(
        [prop], sa.config.esp_proposals, group, (group,) if group is not None else ()
    )
    if picked is None or (req.ke is not None and picked[1].dh is None):
        raise IkeProtocolError(
            NotifyType.NO_PROPOSAL_CHOSEN, "peer chose ESP transforms we did not offer"
        )
    shared: bytes | None = None
    if req.ke is not None:
        if not isinstance(ke, KE) or ke.group != req.ke.group:
            raise IkeProtocolError(NotifyType.INVALID_SYNTAX, "response lacks the PFS KE")
        shared = req.ke.shared_secret(ke.data)
    req.nr = nonce.data
    transport = req.transport and has_notify(msg, NotifyType.USE_TRANSPORT_MODE)
    child = sa._new_child(
        picked[1],
        req.new_spi,
        tsi.selectors,
        tsr.selectors,
        transport,
        (req.ni, nonce.data),
        shared,
        True,
        now,
        req.request_id,
    )
    if child.spi_out in sa._early_deletes:  # the peer deleted it before we saw it
        sa._early_deletes.discard(child.spi_out)
        del sa._children[child.spi_in]
        return None
    why = sa._initiator_ts_problem(tsi.selectors, tsr.selectors, req.ts_local, req.ts_remote)
    if why:
        sa._queue_delete(child, why, now)  # the responder installed it: remove it
        raise IkeProtocolError(NotifyType.TS_UNACCEPTABLE, why)
    return child


def ike_rekey_response(sa: IkeSa, req: Request, msg: Message, now: float) -> None:
    errors = [p for p in msg.payloads if isinstance(p, Notify) and p.is_error]
    theirs = sa._ike_collision
    try:
        if errors:
            n = errors[0]
            if theirs is None:  # with a collision, the peer's rekey simply wins
                if n.notify_type == NotifyType.TEMPORARY_FAILURE and sa._retry_later(req, now):
                    return
                if n.notify_type == NotifyType.INVALID_KE_PAYLOAD and sa._retry_group(req, n):
                    return
            raise IkeProtocolError(
                n.notify_type, f"peer refused the IKE rekey: {notify_name(n.notify_type)}"
            )
        sa_p, nonce, ke = msg.first(SA), msg.first(Nonce), msg.first(KE)
        if not (
            isinstance(sa_p, SA)
            and isinstance(nonce, Nonce)
            and isinstance(ke, KE)
            and len(sa_p.proposals) == 1
        ):
            raise IkeProtocolError(NotifyType.INVALID_SYNTAX, "IKE rekey response incomplete")
        prop = sa_p.proposals[0]
        assert req.ke is not None
        choice = select_ike_proposal([prop], sa.config.ike_proposals, req.ke.group)
        if (
            choice is None
            or choice.dh != req.ke.group
            or ke.group != req.ke.group
            or len(prop.spi) != 8
            or not 16 <= len(nonce.data) <= 256
        ):
            raise IkeProtocolError(NotifyType.NO_PROPOSAL_CHOSEN, "bad IKE rekey response")
        shared = req.ke.shared_secret(ke.data)
    except IkeProtocolError:
        if theirs is not None and theirs.link is not None:
            sa._ike_collision = None
            sa._switch_to(theirs.link, now)
        return
    ours = sa._rekeyed_link(choice, shared, req.ni, nonce.data, (req.new_spi, prop.spi), True)
    sa._ike_collision = None
    if theirs is not None and theirs.link is not None:
        if min(req.ni, nonce.data, theirs.ni, theirs.nr) in (req.ni, nonce.data):
            # ours is redundant (§2.8.2): we delete it; the peer deletes the old SA
            sa._switch_to(theirs.link, now)
            sa._aux.append(ours)
            ours._retired = True
            ours.set_state(IkeState.ESTABLISHED)
            ours._start(Request("delete-ike"), now)
        else:
            old = sa._switch_to(ours, now)
            old._start(Request("delete-ike"), now)
            theirs.link._retire_at = now + sa.config.retire_timeout
            sa._aux.append(theirs.link)  # the peer deletes its redundant SA
    else:
        old = sa._switch_to(ours, now)
        old._start(Request("delete-ike"), now)
    sa._collect_aux()
