"""The task interface: what an exchange we initiate, or answer, looks like.

An initiator task is queued on the IKE SA, ``build`` makes its request when the
window (size 1) is free, and ``process`` takes the peer's response. A responder
task is made for one request of the peer; ``process`` handles it and answers.
A rekey task whose peer rekeyed the same SA at the same time keeps the peer's
responder task and settles the collision in ``collide`` (RFC 7296 §2.8).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from ..constants import ExchangeType
from ..message import Message
from ..payloads import Payload
from ..states import TaskState, log_change

if TYPE_CHECKING:
    from ..sa import IkeSa


class Task:
    """An exchange we initiate on ``sa``."""

    exchange: ClassVar[ExchangeType] = ExchangeType.CREATE_CHILD_SA

    def __init__(self, sa: IkeSa, not_before: float = 0.0) -> None:
        self.sa = sa
        self.not_before = not_before
        self.state = TaskState.QUEUED

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.state.value})"

    def set_state(self, new: TaskState) -> None:
        """The one way a task's state changes (logged at debug)."""
        log_change(f"task {type(self).__name__}", self.state, new)
        self.state = new

    def build(self, now: float) -> list[Payload] | None:
        """The request's payloads; None when there is nothing to do any more."""
        raise NotImplementedError

    def process(self, msg: Message, now: float) -> None:
        """Take the (decrypted) response to our request."""
        raise NotImplementedError

    def migrate(self) -> None:
        """Our request went out on an IKE SA that was just replaced: undo what
        sending it changed, so the task can be sent again on the new one."""

    def cancelled(self) -> None:
        """Dropped from the queue because the IKE SA is being deleted."""


class Responder:
    """The answer to one request of the peer."""

    def __init__(self, sa: IkeSa) -> None:
        self.sa = sa

    def process(self, msg: Message, now: float) -> None:
        raise NotImplementedError


__all__ = ["Responder", "Task"]
