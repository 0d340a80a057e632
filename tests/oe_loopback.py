"""OE negotiations between two of our IKE services on loopback: what the negotiator hands
the OE side (``Inbound``), and a host-to-host Child SA request."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from oe_router.datapath.base import ChildSaSpec, IPAddress, TrafficSelector
from oe_router.oe.actions import ChildRequest
from oe_router.oe.peerauth import PeerAuth

LO = ipaddress.ip_address("127.0.0.1")


class Inbound:
    """Records what the negotiator hands to the OE service."""

    def __init__(self) -> None:
        self.adopted: list[tuple[IPAddress, ChildSaSpec]] = []
        self.deleted: list[tuple[IPAddress, list[int] | None]] = []
        self.dead: list[IPAddress] = []

    async def adopt_inbound(self, peer: IPAddress, spec: ChildSaSpec) -> None:
        self.adopted.append((peer, spec))

    async def peer_deleted(self, peer: IPAddress, spis: Iterable[int] | None) -> None:
        self.deleted.append((peer, None if spis is None else list(spis)))

    async def liveness_failed(self, peer: IPAddress) -> None:
        self.dead.append(peer)


def request() -> ChildRequest:
    host = TrafficSelector(ipaddress.ip_network("127.0.0.1/32"))
    return ChildRequest(LO, LO, PeerAuth(), host, host)
