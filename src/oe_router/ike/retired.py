"""A retired IKE SA link: replaced by a rekey (RFC 7296 §2.18) or redundant after
a rekey collision (§2.8.2), kept only to finish its Delete exchange.

Why apart: it answers replays, the peer's INFORMATIONAL requests (a Delete closes
it) and refuses new Child SAs (§2.25.2), or sends its own Delete; nothing else.
Its Child SAs already live on in the IKE SA that replaced it.
"""

from __future__ import annotations

from .child import has_notify
from .constants import ExchangeType, NotifyType, ProtocolId
from .link import IkeLink
from .message import Message
from .payloads import Delete, Notify
from .states import IkeState, log_change


class RetiredLink:
    """One replaced or redundant link, until its Delete is answered, the peer's
    Delete arrives, its retransmissions give up or ``retire_at`` passes."""

    def __init__(self, link: IkeLink, retire_at: float | None) -> None:
        self.link = link
        self.retire_at = retire_at
        self.state = IkeState.ESTABLISHED

    def __repr__(self) -> str:
        return f"RetiredLink({self.link.spi_i.hex()}/{self.link.spi_r.hex()} {self.state.value})"

    def set_state(self, new: IkeState) -> None:
        log_change(f"retired IKE SA {self.link.spi_i.hex()}", self.state, new)
        self.state = new

    @property
    def over(self) -> bool:
        return self.state.over

    def start_delete(self, now: float) -> None:
        """Send our Delete of this IKE SA."""
        self.set_state(IkeState.DELETING)
        self.link.request(ExchangeType.INFORMATIONAL, [Delete(ProtocolId.IKE, 0, [])], now)

    def close(self) -> None:
        self.set_state(IkeState.CLOSED)
        self.link.close()

    def get_timer(self) -> float | None:
        times = [self.link.get_timer(), self.retire_at]
        return min((t for t in times if t is not None), default=None)

    def handle_timer(self, now: float) -> None:
        self.link.expire_fragments(now)
        if self.retire_at is not None and now >= self.retire_at:
            self.retire_at = None
            self.close()
            return
        if not self.link.retransmit(now):
            self.set_state(IkeState.FAILED)
            self.link.close()

    def receive(self, msg: Message, data: bytes, now: float) -> None:
        link = self.link
        if msg.is_response:
            if not link.awaits(msg) or self.state != IkeState.DELETING:
                return
            if msg.exchange_type != ExchangeType.INFORMATIONAL:
                return
            if link.open(data, msg, now) is not None:
                link.answered()
                self.close()
            return
        if not link.is_new_request(msg):
            return
        if msg.exchange_type not in (ExchangeType.INFORMATIONAL, ExchangeType.CREATE_CHILD_SA):
            return
        inner = link.open(data, msg, now)
        if inner is None:
            return
        if msg.exchange_type == ExchangeType.CREATE_CHILD_SA:
            link.respond(inner, [Notify(0, NotifyType.TEMPORARY_FAILURE, b"", b"")])
            return
        link.respond(inner, [])
        if has_notify(inner, NotifyType.AUTHENTICATION_FAILED):
            self.set_state(IkeState.FAILED)
            link.close()
        elif any(isinstance(p, Delete) and p.protocol_id == ProtocolId.IKE for p in inner.payloads):
            self.close()


__all__ = ["RetiredLink"]
