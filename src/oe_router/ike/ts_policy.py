"""Traffic selector rules of one IKE SA: what we accept as initiator and what we
narrow to as responder (RFC 7296 §2.9), with the containment of NULL-authenticated
and address-bound peers and CP inner addresses (CAT).

Why apart: the IKE_AUTH and CREATE_CHILD_SA tasks of both roles apply the same
rules, and they depend only on the configuration and on who the peer proved to be.
"""

from __future__ import annotations

from typing import Protocol

from oe_router.records import record

from .constants import NotifyType
from .errors import IkeProtocolError
from .payloads import IpAddress, TrafficSelector
from .selectors import ContainmentPolicy, covered, host_selector, narrow


class SelectorConfig(Protocol):
    """The parts of ``IkeSaConfig`` these rules read."""

    @property
    def local_address(self) -> tuple[str, int]: ...
    @property
    def local_ts(self) -> tuple[TrafficSelector, ...]: ...
    @property
    def remote_ts(self) -> tuple[TrafficSelector, ...]: ...
    @property
    def containment(self) -> ContainmentPolicy: ...
    @property
    def request_internal_address(self) -> bool: ...


@record(frozen=True)
class TsPolicy:
    """The selector rules for one peer (``confined``: NULL-authenticated or
    address-bound, held to its own address)."""

    config: SelectorConfig
    peer_ip: str
    confined: bool

    def initiator_problem(
        self,
        tsi: list[TrafficSelector],
        tsr: list[TrafficSelector],
        ours_local: tuple[TrafficSelector, ...],
        ours_remote: tuple[TrafficSelector, ...],
    ) -> str:
        """Why the responder's selectors are unacceptable ("" when they are fine)."""
        if not covered(tsi, ours_local) or not covered(tsr, ours_remote):
            return "peer widened the traffic selectors"
        if self.confined and not self.config.containment.initiator_accepts(tsr, self.peer_ip):
            return f"confined peer {self.peer_ip} claimed selectors beyond its own address"
        return ""

    def inner_problem(self, tsi: list[TrafficSelector], assigned: tuple[IpAddress, ...]) -> str:
        """With CP requested our TSi offers more than our address (the wide range an inner
        address is narrowed from, RFC 7296 §2.9); the answer must come back as exactly our
        address or exactly an inner address the peer gave us, nothing wider (CAT)."""
        if not self.config.request_internal_address:
            return ""
        ours = [self.config.local_address[0], *(str(a) for a in assigned)]
        for ts in tsi:
            if ts.start != ts.end or str(ts.start) not in ours:
                given = ", ".join(str(a) for a in assigned) or "none"
                return (
                    f"peer {self.peer_ip} narrowed our selector to {ts.start}-{ts.end}, "
                    f"neither our address nor an inner address it gave us ({given})"
                )
        return ""

    def responder_selectors(
        self,
        tsi: list[TrafficSelector],
        tsr: list[TrafficSelector],
        assigned: tuple[IpAddress, ...],
    ) -> tuple[list[TrafficSelector], list[TrafficSelector]]:
        """(peer side, our side) after policy, containment and CP; TS_UNACCEPTABLE if empty."""
        c = self.config
        if assigned:
            peer_side = narrow(tsi, [host_selector(str(a)) for a in assigned])
        elif self.confined:
            peer_side = c.containment.responder_peer_side(tsi, self.peer_ip)
            peer_side = narrow(peer_side, c.remote_ts)
        else:
            peer_side = narrow(tsi, c.remote_ts)
        our_side = narrow(tsr, c.local_ts)
        if not peer_side or not our_side:
            raise IkeProtocolError(
                NotifyType.TS_UNACCEPTABLE,
                f"traffic selectors of {self.peer_ip} outside our policy"
                + (" (confined to its own address)" if self.confined else ""),
            )
        return peer_side, our_side


__all__ = ["TsPolicy"]
