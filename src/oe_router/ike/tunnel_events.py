"""``oe.tunnel.up`` / ``oe.tunnel.down``: the IKE service's Child SAs as daemon events.

Why a sink in front of the sink: every Child SA the daemon has, negotiated for OE, by
``oe up`` or by a peer, is born and dies at the IKE service's ``ChildSaSink``. This one
publishes each to the daemon's ``Events`` and passes it on unchanged to the real sink
(the OE negotiator, or the recorder when there is no datapath). Event bodies name the
peer and the SPIs, never a key.
"""

from __future__ import annotations

from oe_router.control.events import Events, JsonObject
from oe_router.ike.events import ChildSaDeleted, ChildSaEstablished, ChildSaRekeyed
from oe_router.ike.service import ChildSaSink, PeerSa
from oe_router.ike.status_view import ts_text


def up_body(peer: PeerSa, child: ChildSaEstablished) -> JsonObject:
    return {
        "peer": peer.peer,
        "local": str(peer.handle.local[0]),
        "spi_in": child.spi_in.hex(),
        "spi_out": child.spi_out.hex(),
        "mode": child.mode,
        "ts_local": ts_text(child.ts_local),
        "ts_remote": ts_text(child.ts_remote),
        "udp_encap": child.udp_encap,
        "rekey_of": child.old_spi_in.hex() if isinstance(child, ChildSaRekeyed) else "",
    }


def down_body(peer: PeerSa, child: ChildSaDeleted, *, dead: bool) -> JsonObject:
    return {
        "peer": peer.peer,
        "local": str(peer.handle.local[0]),
        "spi_in": child.spi_in.hex(),
        "spi_out": child.spi_out.hex(),
        "reason": child.reason,
        "dead": dead,
    }


class TunnelEvents:
    """A ``ChildSaSink`` that publishes, then forwards to ``inner``."""

    def __init__(self, inner: ChildSaSink, events: Events) -> None:
        self.inner = inner
        self.events = events

    def child_sa_established(self, peer: PeerSa, child: ChildSaEstablished) -> None:
        self.events.publish("oe.tunnel.up", up_body(peer, child))
        self.inner.child_sa_established(peer, child)

    def child_sa_deleted(self, peer: PeerSa, child: ChildSaDeleted) -> None:
        self.events.publish("oe.tunnel.down", down_body(peer, child, dead=False))
        self.inner.child_sa_deleted(peer, child)

    def peer_dead(self, peer: PeerSa, children: tuple[ChildSaDeleted, ...]) -> None:
        for child in children:
            self.events.publish("oe.tunnel.down", down_body(peer, child, dead=True))
        self.inner.peer_dead(peer, children)
