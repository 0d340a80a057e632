"""CAT inner addresses and the PASS policies that let flows reach the NAT (CAT, LAN6).

Why its own state: while a peer has Child SAs, some flows to it must skip the trap at
routing time so that POSTROUTING can NAT them and the post-NAT lookup puts them into
the Child SA: the router's own flows when the peer gave us an inner address (CAT), and
LAN IPv6 flows (before the NAT to the WAN address). These passes, and the inner address
each peer gave, come with a peer's first Child SA and go with its last.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Mapping

from oe_router.datapath.base import Direction, IPAddress, PolicyAction, PolicySpec, TrafficSelector
from oe_router.oe.actions import Action, InstallPolicy, RemovePolicy, UpdateCat
from oe_router.oe.groups import GroupPolicies
from oe_router.oe.policy import selector_rank
from oe_router.oe.selectors import PolicyKey, host_net, key_of
from oe_router.oe.shunts import Shunts

__all__ = ["Passes"]

log = logging.getLogger("oe_router.oe")


class Passes:
    """Per peer: the inner address it gave us (CAT), and which passes are installed."""

    def __init__(
        self,
        wan: Mapping[int, IPAddress],
        lan6: tuple[ipaddress.IPv6Network, ...],
        shunts: Shunts,
        groups: GroupPolicies,
    ) -> None:
        self._wan, self._lan6 = dict(wan), lan6
        self._shunts, self._groups = shunts, groups
        self._inner: dict[IPAddress, IPAddress] = {}  # CAT: peer -> inner address it gave us
        self._cat_pass: set[IPAddress] = set()  # CAT peers with the own-flow PASS installed
        self._lan_pass: set[IPAddress] = set()  # IPv6 peers with the LAN PASS installed

    def inner(self, peer: IPAddress) -> IPAddress | None:
        """CAT: the inner address ``peer`` gave us, which its Child SAs start at."""
        return self._inner.get(peer)

    def inner_error(self, peer: IPAddress, inner: IPAddress) -> str | None:
        """Why the inner address ``peer`` gave us (CP) is unusable, or None (CAT)."""
        why = ""
        if inner.version != peer.version:
            why = f"is IPv{inner.version}, the peer IPv{peer.version}"
        elif inner == self._wan.get(peer.version) or inner == peer:
            why = "is our WAN address or the peer's own"
        elif inner.is_unspecified or inner.is_multicast or inner.is_loopback:
            why = "is not a unicast address"
        elif any(a == inner and p != peer for p, a in self._inner.items()):
            why = "is the inner address another peer gave us"
        if not why:
            return None
        return f"peer {peer}: inner address {inner} {why}; CAT refused"

    def cat_map(self) -> tuple[tuple[IPAddress, IPAddress], ...]:
        """CAT: (peer, inner address) for every peer whose Child SAs use one."""
        return tuple(sorted(self._inner.items(), key=lambda pr: (pr[0].version, pr[0].packed)))

    def lan_keys(self) -> set[PolicyKey]:
        """The identities of the LAN passes installed now."""
        return {key_of(pol) for peer in self._lan_pass for pol in self._lan_passes(peer)}

    def child_up(self, peer: IPAddress, inner: IPAddress | None, private: bool) -> list[Action]:
        """A Child SA with ``peer`` is in (``inner``: the inner address it gave, CAT;
        ``private``: the peer is in group "private"). Before any waiter hears of the
        tunnel: its first packets need the SNAT and the passes."""
        actions: list[Action] = []
        if inner is not None and self._inner.get(peer) != inner:
            log.info("peer %s gave us inner address %s: LAN flows to it use it", peer, inner)
            self._inner[peer] = inner
            actions.append(UpdateCat(self.cat_map()))
            if private:
                # The PASS would outlive a crash of ours while the CAT table may not:
                # a "private" peer's own-flow traffic stays trapped (never in the clear).
                log.info("peer %s is private: the router's own flows to it are not CATed", peer)
            else:
                own = self._cat_own_flows(peer)
                self._shunts.replaced([key_of(own)])  # a pass shunt of that key is replaced
                self._cat_pass.add(peer)
                actions.append(InstallPolicy(own))
        return actions + self._add_lan_pass(peer)

    def last_child_gone(self, peer: IPAddress) -> list[Action]:
        """``peer``'s last Child SA went: its inner address and passes go with it."""
        actions: list[Action] = []
        if self._inner.pop(peer, None) is not None:
            log.info("peer %s: last Child SA gone, its inner address with it", peer)
            actions.append(UpdateCat(self.cat_map()))
            if peer in self._cat_pass:
                self._cat_pass.discard(peer)
                own = self._cat_own_flows(peer)
                actions += [RemovePolicy(own), *self._groups.restore([key_of(own)])]
        return actions + self._remove_lan_pass(peer)

    def _cat_own_flows(self, peer: IPAddress) -> PolicySpec:
        """CAT for the router's own flows: a PASS for ``WAN -> peer`` (out).

        Their routing-time XFRM lookup has source WAN and would hit the trap (a new
        ACQUIRE, the packet dropped); passed, they reach POSTROUTING, where the CAT table
        NATs them to the inner address and the kernel's post-NAT lookup puts them into
        the peer's Child SA. IKE (UDP 500/4500) and ESP stay un-NATed (lan.cat_script).
        """
        ours, theirs = host_net(self._wan[peer.version]), host_net(peer)
        rank = selector_rank(theirs, 0, None)
        return PolicySpec(
            TrafficSelector(ours), TrafficSelector(theirs), Direction.OUT, PolicyAction.PASS, rank
        )

    def _lan_passes(self, peer: IPAddress) -> list[PolicySpec]:
        """While ``peer`` has a Child SA: a PASS for ``LAN6 prefix -> peer`` (out), each.

        A LAN device's IPv6 packet is looked up (direction out) with its own source at
        routing time, before the NAT to the WAN address; there the LAN-sourced trap
        would catch it again (ACQUIRE, packet dropped) although the tunnel is up. Passed,
        it reaches POSTROUTING, is NATed (``oe_peers6``, or CAT's map) and the post-NAT
        lookup puts it into the Child SA, as with IPv4. A protocol the Child SA does not
        carry meets the WAN-sourced trap after NAT and is negotiated from there.
        """
        if peer.version != 6:
            return []
        theirs = TrafficSelector(host_net(peer))
        rank = selector_rank(theirs.net, 0, None)
        return [
            PolicySpec(TrafficSelector(net), theirs, Direction.OUT, PolicyAction.PASS, rank)
            for net in self._lan6
        ]

    def _add_lan_pass(self, peer: IPAddress) -> list[Action]:
        """A Child SA with ``peer`` is up: LAN flows to it pass to the NAT (once)."""
        if peer in self._lan_pass:
            return []
        passes = self._lan_passes(peer)
        if not passes:
            return []
        self._lan_pass.add(peer)
        self._shunts.replaced(key_of(pol) for pol in passes)  # LAN pass shunts of those keys
        return [InstallPolicy(pol, nat_first=True) for pol in passes]

    def _remove_lan_pass(self, peer: IPAddress) -> list[Action]:
        """The peer's last Child SA went: its LAN flows meet the LAN trap again."""
        if peer not in self._lan_pass:
            return []
        self._lan_pass.discard(peer)
        actions: list[Action] = []
        for pol in self._lan_passes(peer):
            actions += [RemovePolicy(pol), *self._groups.restore([key_of(pol)])]
        return actions
