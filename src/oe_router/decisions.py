"""One readable log line per decision a person cares about, never one per packet or query.

"example.org (198.51.100.7): protected, NULL auth, AES-GCM-256 (DNS)",
"203.0.113.9: clear, no key (DNS)", "203.0.113.10: clear for 15m, IKE refused
(NO_PROPOSAL_CHOSEN)": what happened to a destination and why, in words, without key
bytes (the callers pass names, addresses, algorithm names and reasons only).

Anyone on the LAN can cause decisions (a lookup, a packet to a new address), so the
same line for the same subject goes out at most once per ``repeat`` seconds, and each
level at most ``burst`` lines per ``window`` (``RateLimit``): a flood of "clear" lines
cannot hide a "protected" one. The next line that gets out says how many were left out.
Sans-IO: ``now`` comes from the caller.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterable

from oe_router.ratelimit import RateLimit

__all__ = ["DecisionLog", "duration", "subject"]


def subject(addresses: Iterable[object], name: object = None) -> str:
    """``example.org (198.51.100.7, 2001:db8::7)``, or the addresses alone without a name."""
    addrs = ", ".join(str(a) for a in addresses)
    if name is None:
        return addrs
    text = str(name)
    text = text[:-1] if text.endswith(".") and len(text) > 1 else text
    return f"{text} ({addrs})" if addrs else text


def duration(seconds: float) -> str:
    """900 -> ``15m``, 5 -> ``5s``, 5400 -> ``1h30m``: a shunt's lifetime as a person says it."""
    s = max(0, round(seconds))
    if s < 60 or s % 60:
        return f"{s}s" if s < 60 else f"{s // 60}m{s % 60}s"
    m = s // 60
    if m < 60:
        return f"{m}m"
    return f"{m // 60}h" + (f"{m % 60}m" if m % 60 else "")


class DecisionLog:
    """Logs ``"<subject>: <verdict>"`` lines on ``logger``, deduplicated and rate-limited."""

    def __init__(
        self,
        logger: logging.Logger,
        window: float = 60.0,
        burst: int = 30,
        repeat: float = 600.0,
        remember: int = 1024,
    ) -> None:
        self.logger = logger
        self.window = window
        self.burst = burst
        self.repeat = repeat
        self.remember = remember
        self._limits: dict[int, RateLimit] = {}
        self._seen: OrderedDict[tuple[str, str], float] = OrderedDict()

    def decide(self, level: int, who: str, verdict: str, now: float, key: str = "") -> bool:
        """Log ``who: verdict`` at ``level`` unless it went out within ``repeat`` seconds
        (for the same ``key``, default ``who``) or the level's budget is spent. True when
        the line went out."""
        if not self.logger.isEnabledFor(level):
            return False
        seen = (key or who, verdict)
        last = self._seen.get(seen)
        if last is not None and now - last < self.repeat:
            return False
        limit = self._limits.get(level)
        if limit is None:
            limit = self._limits[level] = RateLimit(self.window, self.burst)
        if not limit.allow(now):
            return False
        self._seen[seen] = now
        self._seen.move_to_end(seen)
        while len(self._seen) > self.remember:
            self._seen.popitem(last=False)
        if suppressed := limit.take_suppressed():
            self.logger.log(level, "%d more decision line(s) were suppressed", suppressed)
        self.logger.log(level, "%s: %s", who, verdict)
        return True
