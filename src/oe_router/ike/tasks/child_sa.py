"""CREATE_CHILD_SA for Child SAs: a new one, or a rekey (RFC 7296 §1.3.1, §1.3.3),
as initiator and as responder, with PFS, INVALID_KE_PAYLOAD, TEMPORARY_FAILURE
(§2.25) and simultaneous-rekey collisions (§2.8.1).

Why one module: both roles share the proposal and selector rules, and a rekey
collision pairs our initiator task with the peer's responder task.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..child import ChildRecord, has_notify
from ..constants import NotifyType, ProtocolId, TransformType, notify_name
from ..crypto import SUPPORTED_DH_GROUPS, KeyExchange, dh_group
from ..errors import IkeProtocolError
from ..events import ChildSaFailed
from ..message import Message
from ..payloads import KE, SA, Nonce, Notify, Payload, Proposal, TrafficSelector, TSi, TSr
from ..proposals import (
    ProposalMismatch,
    esp_accepted,
    esp_proposals,
    select_child_proposal,
    single,
)
from ..states import ChildState
from .base import Responder, Task

if TYPE_CHECKING:
    from ..sa import IkeSa


def errors_of(msg: Message) -> list[Notify]:
    return [p for p in msg.payloads if isinstance(p, Notify) and p.is_error]


class RetryingTask(Task):
    """A CREATE_CHILD_SA task that may be sent again: after TEMPORARY_FAILURE
    (a few times, after a random delay) or INVALID_KE_PAYLOAD (once, with the
    group the peer wants)."""

    def __init__(self, sa: IkeSa, not_before: float = 0.0) -> None:
        super().__init__(sa, not_before)
        self.temp_failures = 0
        self.group: int | None = None  # DH group to use (after INVALID_KE_PAYLOAD)
        self.ke_retried = False
        self.ke: KeyExchange | None = None
        self.ni = self.nr = b""
        self.new_spi = b""
        self.offered: list[Proposal] = []  # the SA payload of our last request

    def retry_later(self, now: float) -> bool:
        """TEMPORARY_FAILURE (§2.25): requeue after a random delay, a few times."""
        c = self.sa.config
        if self.temp_failures >= c.retry_tries:
            return False
        self.temp_failures += 1
        lo, hi = c.retry_delay
        self.not_before = now + lo + (hi - lo) * self.sa.uniform()
        self.sa.enqueue(self)
        return True

    def retry_group(self, n: Notify) -> bool:
        """INVALID_KE_PAYLOAD: redo once with the group the peer wants."""
        if self.ke_retried or len(n.data) != 2:
            return False
        group = int.from_bytes(n.data, "big")
        if group not in SUPPORTED_DH_GROUPS:
            return False
        self.group, self.ke_retried = group, True
        self.sa.enqueue(self, front=True)
        return True


class CreateChildTask(RetryingTask):
    """Ask for a new Child SA with given selectors (or, as ``RekeyChildTask``,
    replace one)."""

    def __init__(
        self,
        sa: IkeSa,
        not_before: float = 0.0,
        request_id: int | None = None,
        ts: tuple[tuple[TrafficSelector, ...], tuple[TrafficSelector, ...]] = ((), ()),
        transport: bool = False,
    ) -> None:
        super().__init__(sa, not_before)
        self.request_id = request_id
        self.ts_local, self.ts_remote = ts
        self.transport = transport
        self.pfs = True  # cleared when the peer refused our PFS proposals
        # peer SPIs deleted before this exchange's answer told us they are ours
        self.early_deletes: set[bytes] = set()

    def old(self) -> ChildRecord | None:
        """The Child SA being replaced (None for a new one)."""
        return None

    def cancelled(self) -> None:
        self.sa.emit(ChildSaFailed("the IKE SA is being deleted", None, self.request_id))

    def build(self, now: float) -> list[Payload] | None:
        return self.request_payloads(None)

    def request_payloads(self, old: ChildRecord | None) -> list[Payload]:
        """CREATE_CHILD_SA request for a new Child SA or a rekey (§1.3.1, §1.3.3)."""
        sa = self.sa
        keys = sa.link.keys
        assert keys is not None
        self.ni = sa.random(sa.config.nonce_len)
        self.new_spi = sa.spi4()
        self.ke = None
        groups: tuple[int, ...] = ()
        if sa.config.child_pfs and self.pfs:
            # KE of the IKE SA's group (or the one the peer asked for), but offer every
            # group we accept: a peer whose Child SA proposals name another group answers
            # INVALID_KE_PAYLOAD instead of NO_PROPOSAL_CHOSEN (charon with
            # esp_proposals = ...-modp2048 on an X25519 IKE SA)
            group = self.group or keys.choice.dh
            self.ke = dh_group(group).generate()
            others = (g for s in sa.config.ike_proposals for g in s.dh_groups)
            groups = tuple(dict.fromkeys(g for g in (group, *others) if g in SUPPORTED_DH_GROUPS))
        payloads: list[Payload] = []
        if old is not None:
            payloads.append(Notify(ProtocolId.ESP, NotifyType.REKEY_SA, old.spi_in))
        if self.transport:
            payloads.append(Notify.status(NotifyType.USE_TRANSPORT_MODE))
        self.offered = esp_proposals(sa.config.esp_proposals, self.new_spi, groups)
        payloads += [SA(self.offered)]
        payloads.append(Nonce(self.ni))
        if self.ke is not None:
            payloads.append(KE(self.ke.group, self.ke.public_bytes))
        payloads += [TSi(list(self.ts_local)), TSr(list(self.ts_remote))]
        return payloads

    def process(self, msg: Message, now: float) -> None:
        sa, old = self.sa, self.old()
        errors = errors_of(msg)
        if errors:
            n = errors[0]
            if n.notify_type == NotifyType.TEMPORARY_FAILURE:
                if old is not None and old.state == ChildState.REKEYING and not self.colliding:
                    old.set_state(ChildState.INSTALLED)
                    self.not_before = now  # re-checked at send time
                if (old is None or not self.colliding) and self.retry_later(now):
                    return
            elif n.notify_type == NotifyType.INVALID_KE_PAYLOAD and self.retry_group(n):
                self._unmark(old)
                return
            elif (
                n.notify_type == NotifyType.NO_PROPOSAL_CHOSEN and self.ke is not None and self.pfs
            ):
                # a peer without PFS in its Child SA proposals (strongSwan's default
                # esp_proposals) refuses every proposal with DH: ask once more without
                # PFS rather than let the Child SA expire (the IKE SA is authenticated,
                # so only the peer itself can refuse)
                self.pfs = False
                self._unmark(old)
                sa.enqueue(self, front=True)
                return
            elif n.notify_type == NotifyType.CHILD_SA_NOT_FOUND and old is not None:
                # §2.25: forget it and create a fresh Child SA with the same selectors
                sa.remove_child(old, "the peer no longer has it")
                ts = (self.ts_local, self.ts_remote)
                sa.enqueue(CreateChildTask(sa, 0.0, None, ts, self.transport))
                return
            why = f"peer refused the Child SA: {notify_name(n.notify_type)}"
            offers = None
            if n.notify_type == NotifyType.NO_PROPOSAL_CHOSEN:
                offers = ProposalMismatch.peer_refused("ESP", self.offered)
            self.failed(old, why, n.notify_type, offers)
            return
        try:
            child = self.accept(msg, now)
        except IkeProtocolError as e:
            self.failed(old, str(e), e.notify)
            return
        if child is None:
            self._unmark(old)
            return
        self.concluded(child, old, now)

    @property
    def colliding(self) -> bool:
        return False

    @staticmethod
    def _unmark(old: ChildRecord | None) -> None:
        if old is not None and old.state == ChildState.REKEYING:
            old.set_state(ChildState.INSTALLED)

    def failed(
        self,
        old: ChildRecord | None,
        reason: str,
        notify: int | None,
        offers: ProposalMismatch | None = None,
    ) -> None:
        self._unmark(old)
        spi = old.spi_in if old is not None else None
        self.sa.emit(ChildSaFailed(reason, notify, self.request_id, spi, offers))

    def concluded(self, child: ChildRecord, old: ChildRecord | None, now: float) -> None:
        self.sa.report(child)

    def accept(self, msg: Message, now: float) -> ChildRecord | None:
        """Check the response and derive the new Child SA (initiator side)."""
        sa = self.sa
        sa_p, nonce, ke = msg.first(SA), msg.first(Nonce), msg.first(KE)
        tsi, tsr = msg.first(TSi), msg.first(TSr)
        if sa_p is None or nonce is None or tsi is None or tsr is None or len(sa_p.proposals) != 1:
            raise IkeProtocolError(
                NotifyType.INVALID_SYNTAX, "CREATE_CHILD_SA response lacks SA/Nonce/TSi/TSr"
            )
        if not 16 <= len(nonce.data) <= 256:
            raise IkeProtocolError(NotifyType.INVALID_SYNTAX, f"nonce of {len(nonce.data)} bytes")
        prop = sa_p.proposals[0]
        for ttype in (TransformType.ENCR, TransformType.INTEG, TransformType.DH, TransformType.ESN):
            single(prop, ttype)
        group = self.ke.group if self.ke is not None else None
        picked = select_child_proposal(
            [prop], sa.config.esp_proposals, group, (group,) if group is not None else ()
        )
        if picked is None or (self.ke is not None and picked[1].dh is None):
            raise IkeProtocolError(
                NotifyType.NO_PROPOSAL_CHOSEN, "peer chose ESP transforms we did not offer"
            )
        shared: bytes | None = None
        if self.ke is not None:
            if ke is None or ke.group != self.ke.group:
                raise IkeProtocolError(NotifyType.INVALID_SYNTAX, "response lacks the PFS KE")
            shared = self.ke.shared_secret(ke.data)
        self.nr = nonce.data
        transport = self.transport and has_notify(msg, NotifyType.USE_TRANSPORT_MODE)
        child = sa.new_child(
            picked[1],
            self.new_spi,
            (tsi.selectors, tsr.selectors),
            transport,
            (self.ni, nonce.data),
            shared,
            True,
            now,
            self.request_id,
        )
        if child.spi_out in self.early_deletes:  # the peer deleted it before we saw it
            self.early_deletes.discard(child.spi_out)
            sa.children.pop(child.spi_in)
            return None
        policy = sa.ts_policy()
        why = policy.initiator_problem(tsi.selectors, tsr.selectors, self.ts_local, self.ts_remote)
        if why:
            sa.queue_delete(child, why, now)  # the responder installed it: remove it
            raise IkeProtocolError(NotifyType.TS_UNACCEPTABLE, why)
        return child


class RekeyChildTask(CreateChildTask):
    """Replace one Child SA (by our inbound SPI) with a new one, then delete it."""

    def __init__(self, sa: IkeSa, child: bytes, not_before: float = 0.0) -> None:
        super().__init__(sa, not_before)
        self.child = child
        self.orphaned = False  # the SA being rekeyed was deleted by the peer meanwhile
        self.collision: ChildResponder | None = None  # the peer's rekey of the same SA
        self.result: ChildRecord | None = None  # our new SA, once answered

    def old(self) -> ChildRecord | None:
        return self.sa.children.get(self.child)

    @property
    def colliding(self) -> bool:
        return self.collision is not None

    def cancelled(self) -> None:
        pass

    def build(self, now: float) -> list[Payload] | None:
        old = self.old()
        if old is None or old.state != ChildState.INSTALLED:
            return None  # deleted or rekeyed by the peer meanwhile
        old.set_state(ChildState.REKEYING)
        self.ts_local, self.ts_remote = old.event.ts_local, old.event.ts_remote
        self.transport = old.transport
        return self.request_payloads(old)

    def migrate(self) -> None:
        self._unmark(self.old())

    def failed(
        self,
        old: ChildRecord | None,
        reason: str,
        notify: int | None,
        offers: ProposalMismatch | None = None,
    ) -> None:
        if old is not None and self.collision is not None:
            self.collide(self.collision, 0.0)  # ours failed: the peer's wins
            return
        super().failed(old, reason, notify, offers)

    def concluded(self, child: ChildRecord, old: ChildRecord | None, now: float) -> None:
        if old is None or self.orphaned:
            # the SA we rekeyed was deleted by the peer meanwhile: drop the new one (§2.25.1)
            self.sa.queue_delete(child, "replaced SA is gone", now)
            return
        if self.collision is not None:
            self.result = child
            self.collide(self.collision, now)
            return
        self.sa.report(child, old)
        self.sa.queue_delete(old, "rekeyed", now)

    def collide(self, passive: ChildResponder, now: float) -> None:
        """Settle a simultaneous rekey of our Child SA (§2.8.1), once our exchange is
        over: if ours failed (no ``result``) the peer's SA replaces it; otherwise the
        exchange with the lowest of the four nonces made the redundant SA, which its
        maker deletes, and the survivor's maker deletes the old SA."""
        sa, theirs, ours, old = self.sa, passive.child, self.result, self.old()
        self.collision = None
        assert theirs is not None and old is not None
        if ours is None:
            old.set_state(ChildState.REKEYED)
            sa.report(theirs, old)
        elif min(self.ni, self.nr, passive.ni, passive.nr) in (self.ni, self.nr):
            sa.report(ours)
            sa.queue_delete(ours, "redundant after a rekey collision", now)
            sa.report(theirs, old)
            old.set_state(ChildState.REKEYED)  # the peer, who made the survivor, deletes it
        else:
            sa.report(ours, old)
            sa.report(theirs)
            theirs.set_state(ChildState.REDUNDANT)  # the peer deletes it
            sa.queue_delete(old, "rekeyed", now)


class ChildResponder(Responder):
    """The peer's new Child SA or Child SA rekey (``old`` is the SA it replaces)."""

    def __init__(self, sa: IkeSa, sa_p: SA, old: ChildRecord | None) -> None:
        super().__init__(sa)
        self.sa_p, self.old = sa_p, old
        self.ni = self.nr = b""
        self.child: ChildRecord | None = None
        self.offers: ProposalMismatch | None = None  # set when no proposal matched

    def process(self, msg: Message, now: float) -> None:
        sa, old = self.sa, self.old
        try:
            payloads = self.build(msg, now)
        except IkeProtocolError as e:
            sa.refuse(msg, e.notify, e.data)
            if old is None:
                why = f"refused the peer's Child SA: {e}"
                sa.emit(ChildSaFailed(why, e.notify, offers=self.offers))
            return
        sa.respond(msg, payloads)
        assert self.child is not None
        if old is None:
            sa.report(self.child)
            return
        active = sa.active
        if (
            old.state == ChildState.REKEYING
            and isinstance(active, RekeyChildTask)
            and active.child == old.spi_in
        ):
            active.collision = self  # simultaneous rekey (§2.8.1): settled when ours ends
        else:
            old.set_state(ChildState.REKEYED)  # the peer deletes it
            sa.report(self.child, old)

    def build(self, msg: Message, now: float) -> list[Payload]:
        sa, old = self.sa, self.old
        nonce, ke, tsi, tsr = msg.first(Nonce), msg.first(KE), msg.first(TSi), msg.first(TSr)
        if nonce is None or tsi is None or tsr is None:
            raise IkeProtocolError(NotifyType.INVALID_SYNTAX, "request lacks Nonce/TSi/TSr")
        if not 16 <= len(nonce.data) <= 256:
            raise IkeProtocolError(NotifyType.INVALID_SYNTAX, f"nonce of {len(nonce.data)} bytes")
        ke_group = ke.group if ke is not None else None
        picked = select_child_proposal(self.sa_p.proposals, sa.config.esp_proposals, ke_group)
        if picked is None:
            ours = esp_accepted(sa.config.esp_proposals)
            self.offers = ProposalMismatch.we_refused("ESP", self.sa_p.proposals, ours)
            raise IkeProtocolError(NotifyType.NO_PROPOSAL_CHOSEN, "no acceptable ESP proposal")
        number, choice = picked
        shared: bytes | None = None
        reply_ke: list[Payload] = []
        if choice.dh is not None:
            if ke is None or ke.group != choice.dh:
                raise IkeProtocolError(
                    NotifyType.INVALID_KE_PAYLOAD,
                    f"KE group {ke_group}, we want {choice.dh}",
                    choice.dh.to_bytes(2, "big"),
                )
            mine = dh_group(choice.dh).generate()
            shared = mine.shared_secret(ke.data)
            reply_ke = [KE(choice.dh, mine.public_bytes)]
        ts_remote, ts_local = sa.ts_policy().responder_selectors(tsi.selectors, tsr.selectors, ())
        transport = (
            old.transport
            if old is not None
            else sa.config.transport_mode and has_notify(msg, NotifyType.USE_TRANSPORT_MODE)
        )
        self.ni, self.nr = nonce.data, sa.random(sa.config.nonce_len)
        our_spi = sa.spi4()
        self.child = sa.new_child(
            choice,
            our_spi,
            (ts_local, ts_remote),
            transport,
            (self.ni, self.nr),
            shared,
            False,
            now,
        )
        payloads: list[Payload] = (
            [Notify.status(NotifyType.USE_TRANSPORT_MODE)] if transport else []
        )
        payloads += [SA([choice.proposal(number, our_spi)]), Nonce(self.nr), *reply_ke]
        payloads += [TSi(ts_remote), TSr(ts_local)]
        return payloads


__all__ = ["ChildResponder", "CreateChildTask", "RekeyChildTask", "RetryingTask", "errors_of"]
