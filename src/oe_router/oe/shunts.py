"""Shunts: the pass or drop policies a failed negotiation leaves, and their back-off.

Why its own state: a shunt outlives the negotiation that caused it; it expires (the
kernel's hard lifetime, or ``tick`` if that event was lost), is replaced by a Child
SA's or a pass's policy of the same identity, is flushed by the admin, and is listed
in ``oe status``. A drop shunt's lifetime doubles with each failure in a row per peer,
until a Child SA with the peer comes up.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable, Mapping
from dataclasses import replace

from oe_router.control.status import ProposalOffers, ShuntStatus
from oe_router.datapath.base import (
    Direction,
    IPAddress,
    Lifetime,
    PolicyAction,
    PolicyExpire,
    PolicySpec,
    TrafficSelector,
)
from oe_router.decisions import DecisionLog, duration
from oe_router.oe.actions import Action, InstallPolicy, RemovePolicy
from oe_router.oe.groups import GroupPolicies
from oe_router.oe.policy import Group, selector_rank
from oe_router.oe.selectors import PolicyKey, describe, host_net, key_of, policy_key
from oe_router.records import record

__all__ = ["DROP_SHUNT_FIRST", "KEYLESS_LIMIT", "KEYLESS_MIN", "Shunt", "Shunts"]

log = logging.getLogger("oe_router.oe")

#: Seconds of a peer's first drop shunt ("private" failed); doubles per failure in a row
#: up to ``shunt_lifetime``, and starts again once a Child SA with the peer is up.
DROP_SHUNT_FIRST = 5.0

#: Most keyless pass shunts at once (``Shunts.keyless``): any LAN client can look up
#: names, and each shunt costs a kernel policy (two or more for IPv6 with LAN prefixes).
#: Past it, a keyless name's first packet meets the trap as with ``keyless probe``.
KEYLESS_LIMIT = 1024
#: Seconds a keyless pass shunt lives at least, whatever the answer's TTL: a client
#: connects right after its answer, even one with TTL 0.
KEYLESS_MIN = 30.0


@record
class Shunt:
    policy: PolicySpec
    peer: IPAddress
    group: Group
    reason: str
    expires: float
    offers: ProposalOffers | None = None
    keyless: bool = False  #: a DNS answer proved the name keyless (not an IKE failure)


class Shunts:
    """Every shunt policy by identity, and each peer's drop shunts in a row."""

    def __init__(
        self,
        wan: Mapping[int, IPAddress],
        lan6: tuple[ipaddress.IPv6Network, ...],
        lifetime: float,
        groups: GroupPolicies,
        decisions: DecisionLog,
    ) -> None:
        self._wan, self._lan6 = dict(wan), lan6
        self.lifetime = lifetime  #: ``shunt_lifetime``: the longest a shunt lives
        self._groups = groups
        self._decisions = decisions
        self._shunts: dict[PolicyKey, Shunt] = {}
        self._by_peer: dict[IPAddress, set[PolicyKey]] = {}  # what ``passes`` looks at
        self._keyless = 0  # keyless shunt policies, against KEYLESS_LIMIT
        self._drop_failures: dict[IPAddress, int] = {}

    def add(
        self,
        peer: IPAddress,
        selector: TrafficSelector,
        group: Group,
        reason: str,
        now: float,
        summary: str,
        who: str,
        offers: ProposalOffers | None = None,
        lifetime_s: float | None = None,
        keyless: bool = False,
        tell: bool = True,
    ) -> list[Action]:
        """The group's failure shunt for ``peer``'s flow; ``who`` is the decision line's
        subject, ``summary`` its reason in a few words (default ``reason``); ``offers``
        what each side offered when no proposal matched (its status row);
        ``lifetime_s`` a shorter life than ``shunt_lifetime`` (a keyless answer's TTL);
        ``tell`` False: no decision line (a refresh of one told already)."""
        action = group.failure_action
        local = self._wan.get(peer.version)
        if action is None or local is None:
            return []
        longest = self.lifetime if lifetime_s is None else min(lifetime_s, self.lifetime)
        lifetime = max(1, round(longest))
        if action is PolicyAction.DROP:
            # A drop shunt never leaks; it only spaces out negotiations. Its lifetime
            # doubles with each failure in a row, so a peer that was only restarting (a
            # liveness failure's one retry met its empty port) gets its tunnel back within
            # seconds, and one that is gone costs an IKE_SA_INIT ever more rarely.
            n = self._drop_failures.get(peer, 0)
            self._drop_failures[peer] = n + 1
            lifetime = min(lifetime, round(DROP_SHUNT_FIRST * 2**n))
        rank = selector_rank(selector.net, selector.proto, selector.port)
        policy = PolicySpec(
            TrafficSelector(host_net(local), selector.proto, None),
            selector,
            Direction.OUT,
            action,
            rank,
            lifetime=Lifetime(hard_seconds=lifetime),
            persistent=group is Group.PRIVATE,
        )
        policies = [policy]
        if action is PolicyAction.PASS and peer.version == 6:
            # The LAN-sourced trap caught LAN flows too: they pass as long as ours do.
            # (A drop shunt needs no twin: LAN flows to "private" destinations are NATed
            # and meet the WAN-sourced one.)
            policies += [
                replace(policy, src=TrafficSelector(net, selector.proto, None))
                for net in self._lan6
            ]
        for pol in policies:
            self._put(key_of(pol), Shunt(pol, peer, group, reason, now + lifetime, offers, keyless))
        log.debug(
            "%s %s: %s shunt for %ds (%s)%s",
            group.value,
            describe(selector),
            action.value,
            lifetime,
            reason,
            " (LAN flows too)" if len(policies) > 1 else "",
        )
        verdict = "clear" if action is PolicyAction.PASS else "blocked"
        level = logging.INFO if action is PolicyAction.PASS else logging.WARNING
        line = f"{verdict} for {duration(lifetime)}, {summary or reason}"
        if group is Group.PRIVATE:
            line += f" (group {group.value})"
        if tell:
            self._decisions.decide(level, who, line, now)
        return [InstallPolicy(pol) for pol in policies]

    def keyless(
        self,
        peer: IPAddress,
        selector: TrafficSelector,
        group: Group,
        reason: str,
        ttl: float,
        now: float,
        who: str,
    ) -> list[Action] | None:
        """A pass shunt for ``peer``, whose DNS name proved it has no key (``reason``),
        for the answer's ``ttl`` (at least ``KEYLESS_MIN``, at most ``shunt_lifetime``).

        A shunt that already passes the flow that long stays as it is (nothing to do);
        a shorter one is replaced (a new answer refreshes its expiry, silently for an
        earlier keyless one). None: ``KEYLESS_LIMIT`` keyless shunts stand already."""
        if group.failure_action is not PolicyAction.PASS or peer.version not in self._wan:
            return []
        lifetime = min(max(ttl, KEYLESS_MIN), self.lifetime)
        rank = selector_rank(selector.net, selector.proto, selector.port)
        out = PolicySpec(
            TrafficSelector(host_net(self._wan[peer.version]), selector.proto, None),
            selector,
            Direction.OUT,
            PolicyAction.PASS,
            rank,
        )
        old = self._shunts.get(key_of(out))
        if old is not None and old.expires >= now + round(lifetime):
            return []
        if old is None and self._keyless >= KEYLESS_LIMIT:
            return None
        tell = old is None or not old.keyless  # a refresh: its decision was told already
        return self.add(peer, selector, group, reason, now, reason, who, None, lifetime, True, tell)

    def passes(self, peer: IPAddress, now: float) -> bool:
        """A pass shunt towards ``peer`` (any protocol) stands, past ``now``."""
        for k in self._by_peer.get(peer, ()):
            s = self._shunts[k]
            if s.policy.action is PolicyAction.PASS and s.expires > now:
                return True
        return False

    def succeeded(self, peer: IPAddress) -> None:
        """A Child SA with ``peer`` is up: its next drop shunt is short again."""
        self._drop_failures.pop(peer, None)

    def replaced(self, keys: Iterable[PolicyKey]) -> None:
        """Policies of these identities replaced their shunts in the kernel: forget them."""
        for k in keys:
            self._pop(k)

    def expired(self, ev: PolicyExpire) -> list[Action]:
        """The kernel removed a shunt at its hard lifetime: the group's policy returns."""
        if not ev.hard:
            return []
        shunt = self._pop(policy_key(ev.src, ev.dst, ev.direction))
        if shunt is None:
            return []
        log.info("%s shunt for %s expired", shunt.policy.action.value, describe(ev.dst))
        return self._groups.restore([key_of(shunt.policy)])

    def tick(self, now: float) -> list[Action]:
        """Remove shunts past their lifetime (in case the kernel's event was lost)."""
        actions: list[Action] = []
        for k, s in list(self._shunts.items()):
            if s.expires <= now:
                self._pop(k)
                actions.append(RemovePolicy(s.policy))
                actions += self._groups.restore([k])
        return actions

    def _put(self, k: PolicyKey, shunt: Shunt) -> None:
        self._pop(k)
        self._shunts[k] = shunt
        self._by_peer.setdefault(shunt.peer, set()).add(k)
        self._keyless += shunt.keyless

    def _pop(self, k: PolicyKey) -> Shunt | None:
        shunt = self._shunts.pop(k, None)
        if shunt is not None:
            keys = self._by_peer.get(shunt.peer)
            if keys is not None:
                keys.discard(k)
                if not keys:
                    del self._by_peer[shunt.peer]
            self._keyless -= shunt.keyless
        return shunt

    def next_deadline(self) -> float | None:
        return min((s.expires for s in self._shunts.values()), default=None)

    def policies(self) -> list[PolicySpec]:
        return [s.policy for s in self._shunts.values()]

    def keys(self) -> set[PolicyKey]:
        return set(self._shunts)

    def rows(self, now: float) -> tuple[ShuntStatus, ...]:
        """One row per shunted destination: a shunt is a policy per direction (out, and in
        and fwd for a pass), which an admin sees as one decision."""
        rows: dict[tuple[str, str, str], ShuntStatus] = {}
        for s in self._shunts.values():
            row = _row(s, now)
            key = _row_key(row)
            if key not in rows or (row.expires_s or 0.0) > (rows[key].expires_s or 0.0):
                rows[key] = row
        return tuple(rows.values())

    def status(self, policy: PolicySpec, now: float) -> ShuntStatus | None:
        """``policy``'s status row if it is one of the shunts, else None."""
        s = self._shunts.get(key_of(policy))
        return None if s is None or s.policy != policy else _row(s, now)

    def flush(self) -> tuple[int, list[Action]]:
        """Remove every pass and drop shunt; the back-off starts over. Returns how many
        shunts go (as ``rows`` lists them), and the actions."""
        actions: list[Action] = []
        gone = [
            k
            for k, s in self._shunts.items()
            if s.policy.action in (PolicyAction.PASS, PolicyAction.DROP)
        ]
        rows = {_row_key(_row(self._shunts[k], 0.0)) for k in gone}
        for k in gone:
            actions.append(RemovePolicy(self._shunts[k].policy))
            self._pop(k)
            actions += self._groups.restore([k])
        self._drop_failures.clear()
        if gone:
            log.info("flush: %d shunt(s) removed; the next flows negotiate again", len(rows))
        return len(rows), actions


def _row_key(row: ShuntStatus) -> tuple[str, str, str]:
    """What makes two shunt policies one row of ``oe status``."""
    return (row.destination, row.kind, row.reason)


def _row(s: Shunt, now: float) -> ShuntStatus:
    return ShuntStatus(
        destination=describe(s.policy.dst),
        kind=s.policy.action.value,
        reason=f"{s.group.value}: {s.reason}",
        expires_s=round(max(0.0, s.expires - now), 3),
        offers=s.offers,
    )
