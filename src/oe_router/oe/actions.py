"""What the OE manager exchanges with the world: the IKE seam and the actions.

Why apart from the manager: the service (``service.py``) performs these actions and
the IKE adapter (``negotiator.py``) answers the seam; neither needs the manager's
state to do so, and the manager's collaborators (shunts, passes) emit the same
actions. ``manager.py`` re-exports every name here.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Protocol

from oe_router.control.status import ProposalOffers
from oe_router.datapath.base import ChildSaSpec, IPAddress, PolicySpec, TrafficSelector
from oe_router.oe.peerauth import PeerAuth
from oe_router.records import record

__all__ = [
    "Action",
    "CheckTraffic",
    "ChildRequest",
    "InstallChild",
    "InstallPolicy",
    "MoveChild",
    "Negotiate",
    "NegotiationResult",
    "Negotiator",
    "Rekey",
    "RemoveChild",
    "RemovePolicy",
    "SendDelete",
    "TunnelResult",
    "UpdateCat",
]

# --------------------------------------------------------------------------- the IKE seam


@record(frozen=True)
class ChildRequest:
    """One Child SA to negotiate: host-to-host between our WAN address and the peer.

    ``local_ts``/``remote_ts`` are what to propose; the peer may narrow protocol and
    port, but the addresses must stay exactly ``local``/``peer`` (containment).
    """

    peer: IPAddress
    local: IPAddress
    auth: PeerAuth
    local_ts: TrafficSelector
    remote_ts: TrafficSelector


@record(frozen=True)
class NegotiationResult:
    """What the IKE engine made of a request: a complete Child SA, or why not."""

    child_sa: ChildSaSpec | None
    error: str | None = None
    #: CAT: the inner address the peer gave us (CP); the Child SA's local side is this
    inner: IPAddress | None = None
    #: the failure in a few words for the decision line ("IKE refused (NO_PROPOSAL_CHOSEN)")
    summary: str = ""
    #: NO_PROPOSAL_CHOSEN either way: what each side offered (the shunt's status row)
    offers: ProposalOffers | None = None


class Negotiator(Protocol):
    """What the OE manager needs from the IKE engine (src/oe_router/ike/).

    The engine keeps one IKE SA per peer and creates Child SAs on it; it allocates
    inbound SPIs through the datapath (``allocate_spi``) and returns complete specs
    (keys, algorithms, mode tunnel, ``reqid`` 0 or from ``allocate_reqid``). It never
    installs SAs itself: the manager installs them after its containment check.
    """

    def negotiate(self, request: ChildRequest, now: float) -> Awaitable[NegotiationResult]:
        """Create (IKE_SA_INIT + IKE_AUTH, or CREATE_CHILD_SA on an existing IKE SA)."""
        ...

    def rekey(
        self, peer: IPAddress, child: ChildSaSpec, now: float
    ) -> Awaitable[NegotiationResult]:
        """Rekey ``child`` (CREATE_CHILD_SA with REKEY_SA); the engine deletes the old one
        with the peer, the manager swaps it in the kernel."""
        ...

    def delete(self, peer: IPAddress, child: ChildSaSpec | None) -> Awaitable[None]:
        """Send INFORMATIONAL DELETE for ``child`` (None: the whole IKE SA) and forget it;
        best effort: a dead peer must not block this."""
        ...


# --------------------------------------------------------------------------- actions


@record(frozen=True)
class InstallPolicy:
    policy: PolicySpec
    #: A LAN PASS towards a peer with a tunnel: the LAN gateway's NAT set must hold the
    #: peer first, or a LAN packet could pass un-NATed (in the clear) in between.
    nat_first: bool = False


@record(frozen=True)
class RemovePolicy:
    policy: PolicySpec


@record(frozen=True)
class Negotiate:
    """Call ``Negotiator.negotiate``; feed the result to ``negotiated(ticket, ...)``."""

    ticket: int
    request: ChildRequest


@record(frozen=True)
class Rekey:
    """Call ``Negotiator.rekey``; feed the result to ``negotiated(ticket, ...)``."""

    ticket: int
    peer: IPAddress
    child: ChildSaSpec


@record(frozen=True)
class MoveChild:
    """Rekey the Child SA now (CREATE_CHILD_SA with REKEY_SA) with the current ESP offer,
    which no longer holds its transform (``reason`` says why). The new SA comes back as
    any rekey does (``adopt_inbound`` supersedes this one); feed the rekey's outcome to
    ``moved(child_id, error, ...)``."""

    child_id: int
    peer: IPAddress
    spec: ChildSaSpec
    reason: str


@record(frozen=True)
class InstallChild:
    """Install the Child SA; feed the installed spec (or the error) to ``installed``."""

    ticket: int
    spec: ChildSaSpec


@record(frozen=True)
class RemoveChild:
    spec: ChildSaSpec
    remove_policies: bool = True


@record(frozen=True)
class SendDelete:
    """Tell the IKE engine to delete ``child`` (None: the IKE SA) with the peer."""

    peer: IPAddress
    child: ChildSaSpec | None


@record(frozen=True)
class CheckTraffic:
    """Read the Child SA's counters; feed in+out bytes to ``traffic(child_id, ...)``."""

    child_id: int
    spec: ChildSaSpec
    soft_expired: bool


@record(frozen=True)
class UpdateCat:
    """CAT: source-NAT LAN flows to each listed peer to the inner address it gave us
    (``lan.cat_script``); the complete current map, (peer, inner address) pairs."""

    inner: tuple[tuple[IPAddress, IPAddress], ...]


@record(frozen=True)
class TunnelResult:
    """Answer an ``ensure_tunnel`` waiter: True when every address is protected."""

    waiter: int
    ok: bool


Action = (
    InstallPolicy
    | RemovePolicy
    | Negotiate
    | Rekey
    | MoveChild
    | InstallChild
    | RemoveChild
    | SendDelete
    | CheckTraffic
    | TunnelResult
    | UpdateCat
)
