"""What a peer may do with us: start IPsec at all, and which Child SA it may have.

Why apart: these are the security checks of OE (a peer protects only its own address,
to our WAN address or the inner address it gave us; a group that takes no IPsec takes
none), asked by the IKE responder before any state exists and by the manager before
every install. They read the current group table and the CAT inner addresses and
change nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from oe_router.datapath.base import ChildSaSpec, IPAddress
from oe_router.oe.groups import GroupPolicies
from oe_router.oe.passes import Passes
from oe_router.oe.selectors import host_net

__all__ = ["Admission"]

log = logging.getLogger("oe_router.oe")


class Admission:
    """The checks, over the manager's group table and CAT inner addresses."""

    def __init__(self, wan: Mapping[int, IPAddress], groups: GroupPolicies, passes: Passes) -> None:
        self._wan, self._groups, self._passes = dict(wan), groups, passes

    def refuses_peer(self, peer: IPAddress) -> str | None:
        """Before any IKE: why ``peer`` may not start IPsec with us, or None.

        Refusing before IKE_SA_INIT is answered lets the peer's own fallback (its failure
        shunt) take over, instead of an SA that is set up only to be deleted again.
        """
        group = self._groups.table.group_of(peer, 0, None)
        if not group.accepts_inbound:
            return f"peer {peer} is in group {group.value}, which takes no IPsec"
        return None

    def authorize_inbound(self, peer: IPAddress, spec: ChildSaSpec) -> str | None:
        """Responder side: may ``peer`` have this Child SA? None if yes, else why not."""
        error = self.containment_error(peer, spec)
        if error is not None:
            log.error("%s; Child SA refused", error)
            return error
        proto = spec.remote_ts[0].proto if spec.remote_ts else 0
        port = spec.remote_ts[0].port if spec.remote_ts else None
        group = self._groups.table.group_of(peer, proto, port)
        if not group.accepts_inbound:
            return f"peer {peer}: is in group {group.value}, which takes no IPsec"
        return None

    def containment_error(
        self, peer: IPAddress, spec: ChildSaSpec, inner: IPAddress | None = None
    ) -> str | None:
        """Why ``spec`` may not be installed for ``peer`` (None: it may).

        A peer may protect only its own address, and only to our WAN address: any
        other selector would let it capture traffic meant for someone else. With CAT
        the local side is instead the inner address this very peer gave us (``inner``
        for a new one, else the one it gave before).
        """
        local = self._wan.get(peer.version)
        if inner is not None:
            error = self._passes.inner_error(peer, inner)
            if error is not None:
                return error
        if local is None:
            return f"peer {peer}: no WAN address of IPv{peer.version} to protect traffic with"
        if spec.remote != peer:
            return f"peer {peer}: Child SA goes to {spec.remote}, not to the peer itself"
        if spec.local != local:
            return f"peer {peer}: Child SA starts at {spec.local}, not at our WAN address {local}"
        for ts in spec.remote_ts:
            if ts.net != host_net(peer):
                return (
                    f"peer {peer}: refused selector {ts.net}: "
                    "a peer may only protect its own address"
                )
        inner = inner if inner is not None else self._passes.inner(peer)
        mine = host_net(local) if inner is None else host_net(inner)
        for ts in spec.local_ts:
            if ts.net != mine:
                return (
                    f"peer {peer}: refused local selector {ts.net}: "
                    f"only {mine.network_address} may be protected"
                )
        return None
