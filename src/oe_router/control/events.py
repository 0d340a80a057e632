"""The daemon's events: what happened, for listeners outside it (ubus today).

Why a hub: the services that see a tunnel come up or a shunt go in (the IKE sink, the
OE service) must not know who listens (the ubus shim sits at the daemon's edge, and may
be absent or disconnected). They ``publish``; the daemon's edges ``subscribe``. Sans-IO
and synchronous: a listener only queues what it sends, and one that raises is logged
(rate-limited) and does not stop the others or the publisher.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

from oe_router.ratelimit import RateLimit

log = logging.getLogger("oe_router.control")

JsonObject = dict[str, Any]
Listener = Callable[[str, JsonObject], None]

#: Every event the daemon publishes and what it means (docs/control.md lists their fields).
EVENTS: Mapping[str, str] = MappingProxyType(
    {
        "oe.tunnel.up": "a Child SA with a peer is up (negotiated, or a rekey's new pair)",
        "oe.tunnel.down": "a Child SA with a peer is gone (deleted, expired, replaced, dead)",
        "oe.shunt": "a pass or drop shunt went in for a destination without a tunnel",
    }
)


class Events:
    """Publish/subscribe of ``EVENTS``; ``published`` counts what was published, by name."""

    def __init__(self) -> None:
        self._listeners: list[Listener] = []
        self.published: dict[str, int] = dict.fromkeys(EVENTS, 0)
        self._errors = RateLimit()

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def unsubscribe(self, listener: Listener) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    def publish(self, name: str, body: JsonObject) -> None:
        if name not in EVENTS:
            raise ValueError(f"unknown event {name!r} (declare it in EVENTS)")
        self.published[name] += 1
        for listener in tuple(self._listeners):
            try:
                listener(name, body)
            except Exception as exc:
                if self._errors.allow(time.monotonic()):
                    log.error("event %s: a listener failed: %s: %s", name, type(exc).__name__, exc)
