"""Typed states of the IKE core: IKE SA, Child SA and exchange task.

Why a module of their own: the service, the endpoint and the OE negotiator read
these states, and the core changes them; both sides name them from here. They are
``StrEnum`` so ``oe status`` prints the same words as before and a comparison with
the old strings still holds.
"""

from __future__ import annotations

import logging
from enum import StrEnum
from typing import TypeVar

log = logging.getLogger("oe_router.ike.states")


class IkeState(StrEnum):
    """Life of one IKE SA with a peer (RFC 7296 §1.2, §1.4.1)."""

    IDLE = "idle"  # responder waiting for IKE_SA_INIT
    INIT_SENT = "init-sent"  # initiator: IKE_SA_INIT request out
    INIT_DONE = "init-done"  # responder: IKE_SA_INIT answered, waiting for IKE_AUTH
    AUTH_SENT = "auth-sent"  # initiator: IKE_AUTH request out
    AUTH_PENDING = "auth-pending"  # responder: IKE_AUTH held while the peer's key is looked up
    ESTABLISHED = "established"
    DELETING = "deleting"  # our Delete of the IKE SA is in flight
    FAILED = "failed"
    CLOSED = "closed"

    @property
    def half_open(self) -> bool:
        """Not authenticated yet: counted against the endpoint's half-open limits."""
        return self in _HALF_OPEN

    @property
    def over(self) -> bool:
        """Nothing more will happen on this SA."""
        return self in (IkeState.FAILED, IkeState.CLOSED)


_HALF_OPEN = frozenset(
    {
        IkeState.IDLE,
        IkeState.INIT_SENT,
        IkeState.AUTH_SENT,
        IkeState.INIT_DONE,
        IkeState.AUTH_PENDING,
    }
)


class ChildState(StrEnum):
    """Life of one Child SA (ESP pair) carried by an IKE SA."""

    INSTALLED = "installed"  # in use
    REKEYING = "rekeying"  # our rekey in flight
    REKEYED = "rekeyed"  # replaced, waiting for the peer's Delete
    REDUNDANT = "redundant"  # lost a rekey collision: the peer deletes it
    DELETING = "deleting"  # our Delete is queued or in flight


class TaskState(StrEnum):
    """Life of one exchange task (an exchange we initiate)."""

    QUEUED = "queued"  # waiting for the window or its not_before time
    ACTIVE = "active"  # request sent, answer awaited
    DONE = "done"  # answered (or given up)


S = TypeVar("S", IkeState, ChildState, TaskState)


def log_change(what: str, old: S, new: S) -> None:
    """The one debug line every state setter writes."""
    if old is not new:
        log.debug("%s: %s -> %s", what, old.value, new.value)


__all__ = ["ChildState", "IkeState", "TaskState", "log_change"]
