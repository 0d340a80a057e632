"""INFORMATIONAL exchanges: Delete of a Child SA or of the IKE SA (RFC 7296
§1.4.1), liveness checks (§1.4), and answering the peer's, including its
AUTHENTICATION_FAILED for our IKE_AUTH response (§2.21.2).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..child import has_notify
from ..constants import ExchangeType, NotifyType, ProtocolId
from ..message import Message
from ..payloads import Delete, Payload
from ..states import ChildState, IkeState
from .base import Responder, Task
from .child_sa import CreateChildTask, RekeyChildTask
from .ike_rekey import IkeRekeyTask

if TYPE_CHECKING:
    from ..sa import IkeSa


class DeleteChildTask(Task):
    """Delete one Child SA (by our inbound SPI); ChildSaDeleted follows the answer."""

    exchange = ExchangeType.INFORMATIONAL

    def __init__(self, sa: IkeSa, child: bytes, reason: str, not_before: float = 0.0) -> None:
        super().__init__(sa, not_before)
        self.child, self.reason = child, reason

    def build(self, now: float) -> list[Payload] | None:
        if self.child not in self.sa.children:
            return None
        return [Delete(ProtocolId.ESP, 4, [self.child])]

    def process(self, msg: Message, now: float) -> None:
        child = self.sa.children.get(self.child)
        if child is not None:
            self.sa.remove_child(child, self.reason)


class DeleteIkeTask(Task):
    """Delete the IKE SA and with it every Child SA."""

    exchange = ExchangeType.INFORMATIONAL

    def build(self, now: float) -> list[Payload] | None:
        self.sa.set_state(IkeState.DELETING)
        return [Delete(ProtocolId.IKE, 0, [])]

    def process(self, msg: Message, now: float) -> None:
        self.sa.close("deleted by us")


class LivenessTask(Task):
    """An empty INFORMATIONAL request: an answer proves the peer alive; none after
    the retransmissions fails the IKE SA."""

    exchange = ExchangeType.INFORMATIONAL

    def build(self, now: float) -> list[Payload] | None:
        return []

    def process(self, msg: Message, now: float) -> None:
        pass


class InformationalResponder(Responder):
    """The peer's INFORMATIONAL request: liveness (empty), Deletes, or
    AUTHENTICATION_FAILED."""

    def process(self, msg: Message, now: float) -> None:
        sa = self.sa
        if has_notify(msg, NotifyType.AUTHENTICATION_FAILED):
            sa.respond(msg, [])
            sa.fail(f"{sa.peer.ip} rejected our authentication", NotifyType.AUTHENTICATION_FAILED)
            return
        deletes = [p for p in msg.payloads if isinstance(p, Delete)]
        active = sa.active
        if any(d.protocol_id == ProtocolId.IKE for d in deletes):
            sa.respond(msg, [])
            if isinstance(active, IkeRekeyTask) and active.collision is not None:
                # §2.25.2 with a collision: the peer won and deletes the old SA
                active.old_deleted = True
                active.collide(active.collision, now)
                return
            sa.close("deleted by the peer")
            return
        gone: list[bytes] = []
        for d in deletes:
            if d.protocol_id != ProtocolId.ESP:
                continue
            for peer_spi in d.spis:
                c = sa.children.by_peer_spi(peer_spi)
                if c is None:
                    if isinstance(active, CreateChildTask):
                        active.early_deletes.add(peer_spi)  # made by our exchange, still unseen
                    continue
                if c.state != ChildState.DELETING:  # both deleting: answer without it (§1.4.1)
                    gone.append(c.spi_in)
                if (
                    c.state == ChildState.REKEYING
                    and isinstance(active, RekeyChildTask)
                    and active.child == c.spi_in
                ):
                    active.orphaned = True
                sa.remove_child(c, "deleted by the peer")
        sa.respond(msg, [Delete(ProtocolId.ESP, 4, gone)] if gone else [])


__all__ = ["DeleteChildTask", "DeleteIkeTask", "InformationalResponder", "LivenessTask"]
