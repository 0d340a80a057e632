"""Looking up a signing initiator's key by its FQDN identity, for the responder.

Why an edge of its own: the sans-IO ``IkeSa`` holds an IKE_AUTH request and says
``PeerKeyNeeded``; somebody must run the (asynchronous, DNSSEC-validated) lookup
with a deadline and hand the answer back with ``IkeSa.peer_key_found``. The lookup
itself is injected (``PeerKeyLookup``, the composition root's: daemon.py wires the
DNS front's validator in), so nothing under ``ike/`` knows about DNS.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from oe_router.ratelimit import RateLimit

from .auth import PublicKey
from .endpoint import SaHandle
from .events import PeerKeyNeeded
from .peers import log_limited

__all__ = ["PeerKeyLookup", "PeerKeyLookups"]

log = logging.getLogger("oe_router.ike")

#: name -> (its validated key, or None; what the lookup found, for the log)
PeerKeyLookup = Callable[[str], Awaitable[tuple[PublicKey | None, str]]]


class PeerKeyLookups:
    """Runs one lookup per held IKE_AUTH and feeds each answer back to its SA.

    ``lookup``: called with the name (None: no lookup exists, every request is
    refused). ``flush``: after the answer, send what the SA queued and deliver its
    events (``IkeEndpoint.flush``); ``alive``: whether the endpoint still holds the
    SA (it may have given up on it meanwhile).
    """

    def __init__(
        self,
        lookup: Callable[[], PeerKeyLookup | None],
        flush: Callable[[SaHandle], None],
        alive: Callable[[SaHandle], bool],
        clock: Callable[[], float],
        timeout: float,
    ) -> None:
        self._lookup, self._flush, self._alive = lookup, flush, alive
        self._clock = clock
        self.timeout = timeout
        self._tasks: set[asyncio.Task[None]] = set()
        self._lines = RateLimit()  # anyone who completes IKE_SA_INIT may cause a line
        #: lookups that gave a key, and those refused (bogus, none, no anchor, timeout)
        self.found = self.refused = 0

    def needed(self, handle: SaHandle, ev: PeerKeyNeeded) -> None:
        """The endpoint's event: start the lookup (never inside the endpoint's call)."""
        task = asyncio.get_running_loop().create_task(self._run(handle, ev))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, handle: SaHandle, ev: PeerKeyNeeded) -> None:
        lookup = self._lookup()
        key: PublicKey | None = None
        if lookup is None:
            why = "no key lookup for initiator identities (no DNS front)"
        else:
            try:
                async with asyncio.timeout(self.timeout):
                    key, why = await lookup(ev.name)
            except TimeoutError:
                why = f"no answer within {self.timeout:g}s"
            except Exception as exc:  # the lookup's fault must not stop the responder
                why = f"lookup failed: {exc!r}"
        peer = handle.remote[0]
        if key is None:
            self.refused += 1
        else:
            self.found += 1
        msg = "IKE_AUTH from %s as %s: " + ("key found (%s)" if key is not None else "refused: %s")
        log_limited(self._lines, self._clock(), logging.INFO, msg, peer, ev.name, why)
        if not self._alive(handle):
            return
        handle.sa.peer_key_found(key, self._clock(), why)
        self._flush(handle)

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
