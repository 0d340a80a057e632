"""What the daemon asks of a service, and how a service refuses a config.

Why its own module: the services (DNS front, IKE, OE, offload) raise ``ServiceError``
and the daemon, the layer above them, catches it; declared in daemon.py it made a
service import the daemon. Here it sits below both.
"""

from __future__ import annotations

from typing import Protocol

from oe_router.config.schema import OeConfig
from oe_router.control.status import StatusContribution

__all__ = ["Service", "ServiceError"]


class Service(Protocol):
    """A long-lived part of the daemon (IKE endpoint, datapath, DNS front, OE manager).

    `start` and `reload` raise `ServiceError` to refuse a config; `reload` must
    leave the service running its previous config when it refuses. `status`
    is cheap and synchronous: it is called for every `oe status`.
    """

    @property
    def name(self) -> str: ...

    async def start(self, config: OeConfig) -> None: ...

    async def reload(self, config: OeConfig) -> None: ...

    async def stop(self) -> None: ...

    def status(self) -> StatusContribution: ...


class ServiceError(Exception):
    """A service refuses a config or cannot start; the message names the culprit."""
