"""How often a log line that anyone can cause (with a packet, a query, a connection) goes out.

Paths an attacker drives count what they see and log at most so many lines per window,
never one per packet. Every layer takes this one rule, so this module imports nothing
from the project. Sans-IO: the caller passes ``now`` from its own clock; nothing here
reads a clock or logs (the wording of a line, and of what was left out, is the caller's).
"""

from __future__ import annotations

__all__ = ["RateLimit"]


class RateLimit:
    """At most ``burst`` events per ``window`` seconds.

    A window opens with the first event after the previous one ended, so a lone event
    always gets through. ``suppressed`` counts the events refused since
    ``take_suppressed`` last ran: the next line that gets out can say how many did not.
    """

    __slots__ = ("_count", "_start", "burst", "suppressed", "window")

    def __init__(self, window: float = 10.0, burst: int = 1) -> None:
        self.window = window
        self.burst = burst
        self.suppressed = 0
        self._start = float("-inf")
        self._count = 0

    def allow(self, now: float) -> bool:
        """Whether the event at ``now`` may be logged; one that may not is counted."""
        if now >= self._start + self.window:
            self._start, self._count = now, 0
        if self._count < self.burst:
            self._count += 1
            return True
        self.suppressed += 1
        return False

    def take_suppressed(self) -> int:
        """The events refused since the last call (the count starts again at 0)."""
        n, self.suppressed = self.suppressed, 0
        return n
