"""The OE manager core, sans-IO: datapath and IKE events in, actions out, ``now`` passed in.

Why sans-IO: the decisions here (which group, negotiate or not, which shunt, when to
rekey, what a peer may protect) are the security-relevant part of packet-triggered OE
and must be testable without a kernel, sockets or clocks. ``service.py`` performs the
actions (datapath, negotiator) and feeds their results back as events.

Per peer there is at most one negotiation in flight ("one negotiation per peer"):
acquires for the same peer and flow selector coalesce into it, acquires for other
flow selectors of the same peer queue behind it and then ride the same IKE SA (the
IKE engine keeps one IKE SA per peer; each flow selector is one Child SA).
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Protocol

import dns.name

from oe_router.control.status import ShuntStatus, TunnelStatus
from oe_router.datapath.base import (
    Acquire,
    ChildSaCounters,
    ChildSaSpec,
    DatapathError,
    Direction,
    Expire,
    IPAddress,
    Lifetime,
    PolicyAction,
    PolicyExpire,
    PolicySpec,
    TrafficSelector,
)
from oe_router.decisions import DecisionLog, duration, subject
from oe_router.dns.ipseckey import KeyKind, PeerKey
from oe_router.logs import NOTICE
from oe_router.oe.policy import Group, PolicyTable, Rule, flow_selector, selector_rank

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
    "OeManager",
    "PeerAuth",
    "Rekey",
    "RemoveChild",
    "RemovePolicy",
    "SendDelete",
    "TunnelResult",
    "UpdateCat",
]

log = logging.getLogger("oe_router.oe")

#: Seconds of a peer's first drop shunt ("private" failed); doubles per failure in a row
#: up to ``shunt_lifetime``, and starts again once a Child SA with the peer is up.
DROP_SHUNT_FIRST = 5.0


# --------------------------------------------------------------------------- the IKE seam


@dataclass(frozen=True)
class PeerAuth:
    """How the peer must authenticate: NULL (RFC 7619) or a DNSSEC-validated key."""

    key: PeerKey | None = None
    name: dns.name.Name | None = None  #: the DNS name the key was published under

    @property
    def null(self) -> bool:
        """NULL auth: no key, or a published key of kind NONE ("I take anonymous OE")."""
        return self.key is None or self.key.kind is KeyKind.NONE


@dataclass(frozen=True)
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


@dataclass(frozen=True)
class NegotiationResult:
    """What the IKE engine made of a request: a complete Child SA, or why not."""

    child_sa: ChildSaSpec | None
    error: str | None = None
    #: CAT: the inner address the peer gave us (CP); the Child SA's local side is this
    inner: IPAddress | None = None
    #: the failure in a few words for the decision line ("IKE refused (NO_PROPOSAL_CHOSEN)")
    summary: str = ""


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


@dataclass(frozen=True)
class InstallPolicy:
    policy: PolicySpec
    #: A LAN PASS towards a peer with a tunnel: the LAN gateway's NAT set must hold the
    #: peer first, or a LAN packet could pass un-NATed (in the clear) in between.
    nat_first: bool = False


@dataclass(frozen=True)
class RemovePolicy:
    policy: PolicySpec


@dataclass(frozen=True)
class Negotiate:
    """Call ``Negotiator.negotiate``; feed the result to ``negotiated(ticket, ...)``."""

    ticket: int
    request: ChildRequest


@dataclass(frozen=True)
class Rekey:
    """Call ``Negotiator.rekey``; feed the result to ``negotiated(ticket, ...)``."""

    ticket: int
    peer: IPAddress
    child: ChildSaSpec


@dataclass(frozen=True)
class MoveChild:
    """Rekey the Child SA now (CREATE_CHILD_SA with REKEY_SA) with the current ESP offer,
    which no longer holds its transform (``reason`` says why). The new SA comes back as
    any rekey does (``adopt_inbound`` supersedes this one); feed the rekey's outcome to
    ``moved(child_id, error, ...)``."""

    child_id: int
    peer: IPAddress
    spec: ChildSaSpec
    reason: str


@dataclass(frozen=True)
class InstallChild:
    """Install the Child SA; feed the installed spec (or the error) to ``installed``."""

    ticket: int
    spec: ChildSaSpec


@dataclass(frozen=True)
class RemoveChild:
    spec: ChildSaSpec
    remove_policies: bool = True


@dataclass(frozen=True)
class SendDelete:
    """Tell the IKE engine to delete ``child`` (None: the IKE SA) with the peer."""

    peer: IPAddress
    child: ChildSaSpec | None


@dataclass(frozen=True)
class CheckTraffic:
    """Read the Child SA's counters; feed in+out bytes to ``traffic(child_id, ...)``."""

    child_id: int
    spec: ChildSaSpec
    soft_expired: bool


@dataclass(frozen=True)
class UpdateCat:
    """CAT: source-NAT LAN flows to each listed peer to the inner address it gave us
    (``lan.cat_script``); the complete current map, (peer, inner address) pairs."""

    inner: tuple[tuple[IPAddress, IPAddress], ...]


@dataclass(frozen=True)
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

# --------------------------------------------------------------------------- state

PolicyKey = tuple[object, ...]


def _key(src: TrafficSelector, dst: TrafficSelector, direction: Direction) -> PolicyKey:
    """The kernel's identity of a policy (priority is not part of it)."""
    proto = src.proto or dst.proto
    return (src.net, dst.net, proto, src.port, dst.port, direction)


def _pkey(p: PolicySpec) -> PolicyKey:
    return _key(p.src, p.dst, p.direction)


def _host(addr: IPAddress) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(addr)


@dataclass
class _Child:
    id: int
    peer: IPAddress
    spec: ChildSaSpec
    selector: TrafficSelector
    group: Group
    since: float
    bytes_seen: int = 0
    active_at: float = 0.0
    rekeying: bool = False
    moving: str = ""  #: why it is being rekeyed onto the current ESP offer (MoveChild)


@dataclass
class _Want:
    selector: TrafficSelector
    rule: Rule
    waiters: set[int] = field(default_factory=set)
    cause: str = ""  #: why we negotiate again (a shunt's reason names it)
    #: Child SAs the new one replaces (make-before-break: a move the peer refused as a
    #: rekey); they go once it is in, or when the negotiation fails
    replaces: set[int] = field(default_factory=set)


@dataclass
class _Peer:
    addr: IPAddress
    in_flight: int | None = None  # ticket
    queue: dict[TrafficSelector, _Want] = field(default_factory=dict)
    children: dict[int, _Child] = field(default_factory=dict)

    @property
    def idle(self) -> bool:
        return self.in_flight is None and not self.queue and not self.children


@dataclass
class _Shunt:
    policy: PolicySpec
    peer: IPAddress
    group: Group
    reason: str
    expires: float


@dataclass
class _Ticket:
    peer: IPAddress
    want: _Want | None = None  # a negotiation
    child_id: int | None = None  # a rekey of this child
    responder: _Child | None = None  # an inbound child being installed
    waiters: set[int] = field(default_factory=set)  # DNS answers held for ``responder``
    spec: ChildSaSpec | None = None  # what InstallChild was asked to install
    inner: IPAddress | None = None  # CAT: the inner address the peer gave us


@dataclass
class _Waiter:
    pending: set[tuple[IPAddress, TrafficSelector]]
    ok: bool = True


class OeManager:
    """Policy groups, tunnels and shunts for packet- and DNS-triggered OE.

    Feed events, perform the returned actions in order, feed their results back.
    Call ``tick(now)`` at ``next_deadline()``.
    """

    def __init__(
        self,
        table: PolicyTable,
        wan: Mapping[int, IPAddress],
        *,
        trap_reqid: int,
        shunt_lifetime: float = 900.0,
        idle_timeout: float = 300.0,
        lan6: Iterable[ipaddress.IPv6Network] = (),
    ) -> None:
        """``lan6``: the LAN IPv6 prefixes the LAN gateway NATs into tunnels (empty when
        there is no gateway, or no WAN IPv6 address): their flows get LAN-sourced traps
        (``PolicyTable.kernel_policies``), pass shunts and, while a peer has a Child SA,
        a PASS towards it (``_lan_pass``)."""
        self.table = table
        self.wan = dict(wan)
        self.trap_reqid = trap_reqid
        self.shunt_lifetime = shunt_lifetime
        self.idle_timeout = idle_timeout
        self.lan6 = tuple(lan6) if 6 in self.wan else ()
        self._group_policies = table.kernel_policies(
            self.wan, trap_reqid=trap_reqid, lan6=self.lan6
        )
        self._by_key: dict[PolicyKey, PolicySpec] = {_pkey(p): p for p in self._group_policies}
        self._peers: dict[IPAddress, _Peer] = {}
        self._shunts: dict[PolicyKey, _Shunt] = {}
        self._tickets: dict[int, _Ticket] = {}
        self._waiters: dict[int, _Waiter] = {}
        self._keys: dict[IPAddress, PeerAuth] = {}
        self._inner: dict[IPAddress, IPAddress] = {}  # CAT: peer -> inner address it gave us
        self._cat_pass: set[IPAddress] = set()  # CAT peers with the own-flow PASS installed
        self._lan_pass: set[IPAddress] = set()  # IPv6 peers with the LAN PASS installed
        self._drop_failures: dict[IPAddress, int] = {}  # drop shunts in a row, per peer
        self._next = 1
        #: "example.org (198.51.100.7): protected, ..." lines, rate-limited
        self.decisions = DecisionLog(log)

    # ------------------------------------------------------------------ helpers
    def _id(self) -> int:
        n = self._next
        self._next += 1
        return n

    def _peer(self, addr: IPAddress) -> _Peer:
        return self._peers.setdefault(addr, _Peer(addr))

    def _gc(self, addr: IPAddress) -> None:
        p = self._peers.get(addr)
        if p is not None and p.idle:
            del self._peers[addr]

    def group_policies(self) -> tuple[PolicySpec, ...]:
        """The group table's kernel policies (what ``start`` installs)."""
        return self._group_policies

    def start(self) -> list[Action]:
        """Install the group policies (replacing any adopted from an earlier run)."""
        return [InstallPolicy(p) for p in self._group_policies]

    def _restore(self, keys: Iterable[PolicyKey]) -> list[Action]:
        """A runtime policy with a group policy's identity was removed: put the group's back."""
        return [InstallPolicy(self._by_key[k]) for k in keys if k in self._by_key]

    @staticmethod
    def _child_keys(spec: ChildSaSpec) -> list[PolicyKey]:
        lts = spec.local_ts or (TrafficSelector(_host(spec.local)),)
        rts = spec.remote_ts or (TrafficSelector(_host(spec.remote)),)
        keys = []
        for lt in lts:
            for rt in rts:
                keys.append(_key(lt, rt, Direction.OUT))
                keys.append(_key(rt, lt, Direction.IN))
                keys.append(_key(rt, lt, Direction.FWD))
        return keys

    def _find_child(self, child_id: int) -> _Child | None:
        for p in self._peers.values():
            if child_id in p.children:
                return p.children[child_id]
        return None

    def _child_for(self, peer: IPAddress, selector: TrafficSelector) -> _Child | None:
        p = self._peers.get(peer)
        if p is None:
            return None
        return next((c for c in p.children.values() if c.selector == selector), None)

    def _installing(self, peer: IPAddress, selector: TrafficSelector) -> _Ticket | None:
        """The peer's own Child SA for ``selector`` while the datapath installs it: a
        packet or an answer for it waits for that install instead of negotiating a
        second Child SA (which one side would then delete, taking the flow with it)."""
        return next(
            (
                t
                for t in self._tickets.values()
                if t.responder is not None and t.peer == peer and t.responder.selector == selector
            ),
            None,
        )

    # ------------------------------------------------------------------ containment
    def containment_error(
        self, peer: IPAddress, spec: ChildSaSpec, inner: IPAddress | None = None
    ) -> str | None:
        """Why ``spec`` may not be installed for ``peer`` (None: it may).

        A peer may protect only its own address, and only to our WAN address: any
        other selector would let it capture traffic meant for someone else. With CAT
        the local side is instead the inner address this very peer gave us (``inner``
        for a new one, else the one it gave before).
        """
        local = self.wan.get(peer.version)
        if inner is not None:
            error = self._inner_error(peer, inner)
            if error is not None:
                return error
        if local is None:
            return f"peer {peer}: no WAN address of IPv{peer.version} to protect traffic with"
        if spec.remote != peer:
            return f"peer {peer}: Child SA goes to {spec.remote}, not to the peer itself"
        if spec.local != local:
            return f"peer {peer}: Child SA starts at {spec.local}, not at our WAN address {local}"
        for ts in spec.remote_ts:
            if ts.net != _host(peer):
                return (
                    f"peer {peer}: refused selector {ts.net}: "
                    "a peer may only protect its own address"
                )
        inner = inner if inner is not None else self._inner.get(peer)
        mine = _host(local) if inner is None else _host(inner)
        for ts in spec.local_ts:
            if ts.net != mine:
                return (
                    f"peer {peer}: refused local selector {ts.net}: "
                    f"only {mine.network_address} may be protected"
                )
        return None

    def _inner_error(self, peer: IPAddress, inner: IPAddress) -> str | None:
        """Why the inner address ``peer`` gave us (CP) is unusable, or None (CAT)."""
        why = ""
        if inner.version != peer.version:
            why = f"is IPv{inner.version}, the peer IPv{peer.version}"
        elif inner == self.wan.get(peer.version) or inner == peer:
            why = "is our WAN address or the peer's own"
        elif inner.is_unspecified or inner.is_multicast or inner.is_loopback:
            why = "is not a unicast address"
        elif any(a == inner and p != peer for p, a in self._inner.items()):
            why = "is the inner address another peer gave us"
        if not why:
            return None
        return f"peer {peer}: inner address {inner} {why}; CAT refused"

    def _cat_own_flows(self, peer: IPAddress) -> PolicySpec:
        """CAT for the router's own flows: a PASS for ``WAN -> peer`` (out).

        Their routing-time XFRM lookup has source WAN and would hit the trap (a new
        ACQUIRE, the packet dropped); passed, they reach POSTROUTING, where the CAT table
        NATs them to the inner address and the kernel's post-NAT lookup puts them into
        the peer's Child SA. IKE (UDP 500/4500) and ESP stay un-NATed (lan.cat_script).
        """
        ours, theirs = _host(self.wan[peer.version]), _host(peer)
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
        theirs = TrafficSelector(_host(peer))
        rank = selector_rank(theirs.net, 0, None)
        return [
            PolicySpec(TrafficSelector(net), theirs, Direction.OUT, PolicyAction.PASS, rank)
            for net in self.lan6
        ]

    def _add_lan_pass(self, peer: IPAddress) -> list[Action]:
        """A Child SA with ``peer`` is up: LAN flows to it pass to the NAT (once)."""
        if peer in self._lan_pass:
            return []
        passes = self._lan_passes(peer)
        if not passes:
            return []
        self._lan_pass.add(peer)
        for pol in passes:
            self._shunts.pop(_pkey(pol), None)  # a LAN pass shunt of that key is replaced
        return [InstallPolicy(pol, nat_first=True) for pol in passes]

    def _remove_lan_pass(self, peer: IPAddress) -> list[Action]:
        """The peer's last Child SA went: its LAN flows meet the LAN trap again."""
        if peer not in self._lan_pass:
            return []
        self._lan_pass.discard(peer)
        actions: list[Action] = []
        for pol in self._lan_passes(peer):
            actions += [RemovePolicy(pol), *self._restore([_pkey(pol)])]
        return actions

    def cat_map(self) -> tuple[tuple[IPAddress, IPAddress], ...]:
        """CAT: (peer, inner address) for every peer whose Child SAs use one."""
        return tuple(sorted(self._inner.items(), key=lambda pr: (pr[0].version, pr[0].packed)))

    # ------------------------------------------------------------------ negotiation
    def _start_next(self, p: _Peer, now: float) -> list[Action]:
        if p.in_flight is not None or not p.queue:
            self._gc(p.addr)
            return []
        want = next(iter(p.queue.values()))
        local = self._inner.get(p.addr, self.wan[p.addr.version])  # CAT: the inner address
        ticket = self._id()
        self._tickets[ticket] = _Ticket(p.addr, want=want)
        p.in_flight = ticket
        auth = self._keys.get(p.addr, PeerAuth())
        local_ts = TrafficSelector(_host(local), want.selector.proto, None)
        request = ChildRequest(p.addr, local, auth, local_ts, want.selector)
        log.info(
            "negotiating with %s (%s, %s auth) for %s",
            p.addr,
            want.rule.group.value,
            "NULL" if auth.null else "DNSSEC key",
            _describe(want.selector),
        )
        return [Negotiate(ticket, request)]

    def _want(
        self, peer: IPAddress, rule: Rule, waiter: int | None, now: float, cause: str = ""
    ) -> list[Action]:
        selector = flow_selector(peer, rule)
        p = self._peer(peer)
        want = p.queue.get(selector)
        if want is None:
            want = p.queue[selector] = _Want(selector, rule, cause=cause)
        if waiter is not None:
            want.waiters.add(waiter)
        return self._start_next(p, now)

    def acquire(self, ev: Acquire, now: float) -> list[Action]:
        """The kernel trapped a packet with no SA: negotiate for its destination."""
        peer = ev.selector_dst.net.network_address
        rule = self.table.lookup(peer, ev.selector_dst.proto, ev.selector_dst.port)
        if rule is None or not rule.group.initiates:
            group = "no group" if rule is None else rule.group.value
            log.info("ignoring ACQUIRE for %s: %s does not initiate", peer, group)
            return []
        if peer.version not in self.wan:
            log.warning("ignoring ACQUIRE for %s: no IPv%d WAN address", peer, peer.version)
            return []
        selector = flow_selector(peer, rule)
        if self._child_for(peer, selector) is not None:
            return []  # the SA arrived while the packet was trapped
        if self._installing(peer, selector) is not None:
            log.debug("ACQUIRE for %s: the peer's Child SA is being installed", peer)
            return []  # held packets go when it is in
        return self._want(peer, rule, None, now)

    def ensure_tunnel(
        self,
        waiter: int,
        name: dns.name.Name,
        addresses: tuple[IPAddress, ...],
        key: PeerKey,
        now: float,
    ) -> list[Action]:
        """DNS front: protect every address of ``name`` with ``key``; answer ``waiter``."""
        w = self._waiters[waiter] = _Waiter(set(), ok=bool(addresses))
        actions: list[Action] = []
        for addr in addresses:
            rule = self.table.lookup(addr)
            group = Group.CLEAR if rule is None else rule.group
            if rule is None or not group.initiates or addr.version not in self.wan:
                why = "no WAN address" if addr.version not in self.wan else f"group {group.value}"
                self.decisions.decide(logging.INFO, subject([addr], name), f"clear, {why}", now)
                w.ok = False
                continue
            self._keys[addr] = PeerAuth(key, name)
            selector = flow_selector(addr, rule)
            if self._child_for(addr, selector) is not None:
                continue
            w.pending.add((addr, selector))
            installing = self._installing(addr, selector)
            if installing is not None:  # answered once the peer's Child SA is in
                installing.waiters.add(waiter)
                continue
            actions += self._want(addr, rule, waiter, now)
        if not w.pending:
            del self._waiters[waiter]
            actions.append(TunnelResult(waiter, w.ok))
        return actions

    def _resolve(self, want: _Want, peer: IPAddress, ok: bool) -> list[Action]:
        return self._settle(want.waiters, peer, want.selector, ok)

    def _settle(
        self, waiters: set[int], peer: IPAddress, selector: TrafficSelector, ok: bool
    ) -> list[Action]:
        """``peer``'s ``selector`` is protected (ok) or not: answer the waiters that
        waited only for it."""
        out: list[Action] = []
        for waiter in sorted(waiters):
            w = self._waiters.get(waiter)
            if w is None:
                continue
            w.pending.discard((peer, selector))
            w.ok = w.ok and ok
            if not w.pending:
                del self._waiters[waiter]
                out.append(TunnelResult(waiter, w.ok))
        return out

    def _fail(
        self, p: _Peer, want: _Want, reason: str, now: float, summary: str = ""
    ) -> list[Action]:
        """Negotiation failed: the group's failure shunt, waiters told, next in queue."""
        p.queue.pop(want.selector, None)
        summary = summary or reason
        if want.cause:
            reason = f"{want.cause}, then {reason}"
        actions = self._drop_replaced(want)  # a broken driver's SA goes either way
        actions += self._shunt(p.addr, want.selector, want.rule.group, reason, now, summary)
        actions += self._resolve(want, p.addr, False)
        p.in_flight = None
        return actions + self._start_next(p, now)

    def _shunt(
        self,
        peer: IPAddress,
        selector: TrafficSelector,
        group: Group,
        reason: str,
        now: float,
        summary: str = "",
    ) -> list[Action]:
        action = group.failure_action
        local = self.wan.get(peer.version)
        if action is None or local is None:
            return []
        lifetime = max(1, round(self.shunt_lifetime))
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
            TrafficSelector(_host(local), selector.proto, None),
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
                replace(policy, src=TrafficSelector(net, selector.proto, None)) for net in self.lan6
            ]
        for pol in policies:
            self._shunts[_pkey(pol)] = _Shunt(pol, peer, group, reason, now + lifetime)
        log.debug(
            "%s %s: %s shunt for %ds (%s)%s",
            group.value,
            _describe(selector),
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
        self.decisions.decide(level, self._who(peer, selector), line, now)
        return [InstallPolicy(pol) for pol in policies]

    def _who(self, peer: IPAddress, selector: TrafficSelector | None = None) -> str:
        """The decision line's subject: the DNS name that asked for ``peer`` (if one did),
        the address, and the protocol and port when the flow selector narrows them."""
        auth = self._keys.get(peer)
        return subject([_target(selector) if selector else peer], auth and auth.name)

    def negotiated(self, ticket: int, result: NegotiationResult, now: float) -> list[Action]:
        """The negotiator answered a ``Negotiate`` or ``Rekey``."""
        t = self._tickets.get(ticket)
        if t is None:
            return []
        p = self._peers.get(t.peer)
        if t.child_id is not None:
            return self._rekeyed(ticket, t, result, now)
        if p is None or t.want is None:
            del self._tickets[ticket]
            return []
        spec = result.child_sa
        if spec is None:
            del self._tickets[ticket]
            why = result.error or "negotiation failed"
            return self._fail(p, t.want, why, now, result.summary)
        error = self.containment_error(t.peer, spec, result.inner)
        if error is not None:
            del self._tickets[ticket]
            log.error("%s; Child SA refused", error)
            return [SendDelete(t.peer, spec), *self._fail(p, t.want, error, now)]
        sel = t.want.selector
        spec = replace(spec, policy_priority=selector_rank(sel.net, sel.proto, sel.port))
        t.spec, t.inner = spec, result.inner
        return [InstallChild(ticket, spec)]

    def installed(
        self, ticket: int, spec: ChildSaSpec | None, error: str | None, now: float
    ) -> list[Action]:
        """The datapath installed an ``InstallChild`` (spec with its reqid) or failed."""
        t = self._tickets.pop(ticket, None)
        if t is None:
            return []
        p = self._peer(t.peer)
        if t.responder is not None:
            inbound = t.responder
            if spec is None:
                log.error("peer %s: installing its Child SA failed: %s", t.peer, error)
                actions: list[Action] = [SendDelete(t.peer, inbound.spec)]
                rule = self.table.lookup(t.peer)
                for waiter in sorted(t.waiters):  # negotiate ours for the held answers
                    if rule is not None and waiter in self._waiters:
                        actions += self._want(t.peer, rule, waiter, now)
                self._gc(t.peer)
                return actions
            inbound.spec = spec
            prev = self._child_for(t.peer, inbound.selector)
            if prev is not None:  # e.g. the IKE core's rekey: idleness carries over
                inbound.active_at = prev.active_at
            actions = self._supersede(p, inbound.selector)
            p.children[inbound.id] = inbound
            self.decisions.decide(
                NOTICE,
                self._who(t.peer, inbound.selector),
                f"protected, {cipher_name(spec)} (the peer initiated)",
                now,
            )
            self._drop_failures.pop(t.peer, None)
            actions += self._add_lan_pass(t.peer)
            actions += self._settle(t.waiters, t.peer, inbound.selector, True)
            return actions + self._drop_shunts(self._child_keys(spec))
        if t.child_id is not None:  # a rekey
            c = p.children.get(t.child_id)
            if c is None:
                self._gc(t.peer)
                return [RemoveChild(spec)] if spec is not None else []
            c.rekeying = False
            if spec is None:
                log.error("peer %s: installing the rekeyed Child SA failed: %s", t.peer, error)
                return [SendDelete(t.peer, t.spec)]
            old, c.spec, c.since = c.spec, spec, now
            c.bytes_seen, c.active_at = 0, now  # counters start again with the new SA
            log.info("peer %s: Child SA rekeyed", t.peer)
            return [RemoveChild(old, remove_policies=False)]
        want = t.want
        assert want is not None
        p.in_flight = None
        if spec is None:
            reason = f"installing the Child SA failed: {error}"
            return [SendDelete(t.peer, t.spec), *self._fail(p, want, reason, now)]
        p.queue.pop(want.selector, None)
        self._drop_failures.pop(t.peer, None)
        c = _Child(self._id(), t.peer, spec, want.selector, want.rule.group, now, active_at=now)
        superseded = self._supersede(p, want.selector)
        p.children[c.id] = c
        log.info("peer %s: Child SA up for %s", t.peer, _describe(want.selector))
        auth = self._keys.get(t.peer, PeerAuth())
        self.decisions.decide(
            NOTICE,
            self._who(t.peer, want.selector),
            f"protected, {auth_words(auth)}, {cipher_name(spec)}"
            f" ({'DNS' if want.waiters else 'packet'})",
            now,
        )
        actions = superseded + self._drop_shunts(self._child_keys(spec))
        if t.inner is not None and self._inner.get(t.peer) != t.inner:
            # before the waiters hear of the tunnel: their first packets need the SNAT
            log.info("peer %s gave us inner address %s: LAN flows to it use it", t.peer, t.inner)
            self._inner[t.peer] = t.inner
            actions.append(UpdateCat(self.cat_map()))
            if self.table.group_of(t.peer, 0, None) is Group.PRIVATE:
                # The PASS would outlive a crash of ours while the CAT table may not:
                # a "private" peer's own-flow traffic stays trapped (never in the clear).
                log.info("peer %s is private: the router's own flows to it are not CATed", t.peer)
            else:
                own = self._cat_own_flows(t.peer)
                self._shunts.pop(_pkey(own), None)  # a pass shunt of the same key is replaced
                self._cat_pass.add(t.peer)
                actions.append(InstallPolicy(own))
        actions += self._add_lan_pass(t.peer)  # before the waiters' first packets
        actions += self._drop_replaced(want)  # (a same-selector one was superseded above)
        actions += self._resolve(want, t.peer, True)
        return actions + self._start_next(p, now)

    def _drop_replaced(self, want: _Want) -> list[Action]:
        actions: list[Action] = []
        for child_id in sorted(want.replaces):
            c = self._find_child(child_id)
            if c is not None:
                actions += self._remove_child(c, tell_peer=True)
        want.replaces.clear()
        return actions

    def _supersede(self, p: _Peer, selector: TrafficSelector) -> list[Action]:
        """A new Child SA for a flow that already has one (both ends initiated, or the
        peer restarted): the new one's policies replaced the old one's in the kernel,
        so the old SAs go without their policies, and the peer is told."""
        actions: list[Action] = []
        for old in [c for c in p.children.values() if c.selector == selector]:
            del p.children[old.id]
            actions += [RemoveChild(old.spec, remove_policies=False), SendDelete(p.addr, old.spec)]
        return actions

    def _drop_shunts(self, keys: Iterable[PolicyKey]) -> list[Action]:
        """The Child SA's policies replaced these shunts in the kernel: forget them."""
        for k in keys:
            self._shunts.pop(k, None)
        return []

    # ------------------------------------------------------------------ inbound
    def refuses_peer(self, peer: IPAddress) -> str | None:
        """Before any IKE: why ``peer`` may not start IPsec with us, or None.

        Refusing before IKE_SA_INIT is answered lets the peer's own fallback (its failure
        shunt) take over, instead of an SA that is set up only to be deleted again.
        """
        group = self.table.group_of(peer, 0, None)
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
        group = self.table.group_of(peer, proto, port)
        if not group.accepts_inbound:
            return f"peer {peer}: is in group {group.value}, which takes no IPsec"
        return None

    def adopt_inbound(self, peer: IPAddress, spec: ChildSaSpec, now: float) -> list[Action]:
        """Responder side: install an authorized Child SA the peer initiated."""
        if self.authorize_inbound(peer, spec) is not None:
            return [SendDelete(peer, spec)]
        rts = spec.remote_ts[0] if spec.remote_ts else TrafficSelector(_host(peer))
        rule = self.table.lookup(peer, rts.proto, rts.port)
        group = Group.CLEAR_OR_PRIVATE if rule is None else rule.group
        sel = TrafficSelector(_host(peer), rts.proto, rts.port)
        spec = replace(spec, policy_priority=selector_rank(sel.net, sel.proto, sel.port))
        ticket = self._id()
        child = _Child(self._id(), peer, spec, sel, group, now, active_at=now)
        self._tickets[ticket] = _Ticket(peer, responder=child)
        return [InstallChild(ticket, spec)]

    # ------------------------------------------------------------------ lifecycle
    def _remove_child(self, c: _Child, *, tell_peer: bool) -> list[Action]:
        p = self._peers[c.peer]
        del p.children[c.id]
        actions: list[Action] = [RemoveChild(c.spec)]
        if tell_peer:
            actions.append(SendDelete(c.peer, c.spec))
        actions += self._restore(self._child_keys(c.spec))
        if not p.children and self._inner.pop(c.peer, None) is not None:
            log.info("peer %s: last Child SA gone, its inner address with it", c.peer)
            actions.append(UpdateCat(self.cat_map()))
            if c.peer in self._cat_pass:
                self._cat_pass.discard(c.peer)
                own = self._cat_own_flows(c.peer)
                actions += [RemovePolicy(own), *self._restore([_pkey(own)])]
        if not p.children:
            actions += self._remove_lan_pass(c.peer)
        self._gc(c.peer)
        return actions

    def _child_by_spi(self, dst: IPAddress, spi: int) -> _Child | None:
        for p in self._peers.values():
            for c in p.children.values():
                s = c.spec
                if (dst, spi) in ((s.local, s.inbound.spi), (s.remote, s.outbound.spi)):
                    return c
        return None

    def expired(self, ev: Expire, now: float) -> list[Action]:
        """An SA hit its lifetime: hard -> gone; soft -> rekey if it carried traffic."""
        c = self._child_by_spi(ev.dst, ev.spi)
        if c is None:
            return []
        if ev.hard:
            log.info("peer %s: Child SA expired (spi %#010x)", c.peer, ev.spi)
            return self._remove_child(c, tell_peer=True)
        if c.rekeying:
            return []
        return [CheckTraffic(c.id, c.spec, soft_expired=True)]

    def traffic(self, child_id: int, total_bytes: int, now: float, soft: bool) -> list[Action]:
        """Counters of a ``CheckTraffic``: an SA idle for ``idle_timeout`` goes (at any
        check: the IKE core rekeys Child SAs on its own timer, so waiting for a soft
        expiry would rekey idle SAs forever); at a soft expiry a busy one is rekeyed."""
        c = self._find_child(child_id)
        if c is None:
            return []
        if total_bytes != c.bytes_seen:
            c.bytes_seen = total_bytes
            c.active_at = now
        if c.rekeying:
            return []
        if now - c.active_at >= self.idle_timeout:
            log.info("peer %s: idle Child SA not rekeyed; removed", c.peer)
            return self._remove_child(c, tell_peer=True)
        if not soft:
            return []
        c.rekeying = True
        ticket = self._id()
        self._tickets[ticket] = _Ticket(c.peer, child_id=c.id)
        return [Rekey(ticket, c.peer, c.spec)]

    def _rekeyed(
        self, ticket: int, t: _Ticket, result: NegotiationResult, now: float
    ) -> list[Action]:
        assert t.child_id is not None
        c = self._find_child(t.child_id)
        if c is None:
            del self._tickets[ticket]
            return [SendDelete(t.peer, result.child_sa)] if result.child_sa else []
        spec = result.child_sa
        error = result.error or "rekey failed"
        if spec is not None:
            error = self.containment_error(t.peer, spec) or ""
        if spec is None or error:
            del self._tickets[ticket]
            c.rekeying = False
            log.warning("peer %s: %s; the Child SA lives until it expires", t.peer, error)
            return [SendDelete(t.peer, spec)] if spec is not None else []
        spec = replace(spec, policy_priority=c.spec.policy_priority)
        t.spec = spec
        return [InstallChild(ticket, spec)]

    def withdraw(self, why: Callable[[ChildSaSpec], str | None], now: float) -> list[Action]:
        """The ESP offer lost transforms (their kernel driver failed a test): move every
        Child SA that uses one onto what is still offered, by a rekey with the new offer
        (the peer chooses among it), so its traffic leaves the broken driver.

        ``why(spec)`` says why a Child SA's transform was withdrawn, None if it was not.
        One move per Child SA at a time; call again whenever the offer changes."""
        actions: list[Action] = []
        for c in self._all_children():
            reason = why(c.spec)
            if reason is None or c.moving:
                continue
            c.moving = reason
            log.warning(
                "peer %s: Child SA %s (%s): %s; rekeying it onto the current ESP offer",
                c.peer,
                _describe(c.selector),
                c.spec.encr.ike_name,
                reason,
            )
            actions.append(MoveChild(c.id, c.peer, c.spec, reason))
        return actions

    def moved(self, child_id: int, error: str | None, now: float) -> list[Action]:
        """The outcome of a ``MoveChild``. Success: the rekeyed SA supersedes this one
        (``adopt_inbound``), nothing to do here. Failure (the peer refused the rekey:
        libreswan keeps a rekeyed Child SA on its old algorithms, as RFC 7296 2.8 says it
        SHOULD; or the IKE SA could not rekey): for a group that initiates, a new Child SA
        for the flow is negotiated with the new offer next to the old one (make before
        break), which it replaces once it is in; if that fails too, the old one goes and
        the group's failure shunt follows with both reasons. Other groups just lose it."""
        c = self._find_child(child_id)
        if c is None:
            return []
        if error is None:
            c.moving = ""
            return []
        reason = c.moving or "its transform was withdrawn"
        rule = self.table.lookup(c.peer, c.selector.proto, c.selector.port)
        if rule is None or not rule.group.initiates or c.peer.version not in self.wan:
            log.warning("peer %s: moving its Child SA failed: %s; removing it", c.peer, error)
            return self._remove_child(c, tell_peer=True)
        log.warning(
            "peer %s: the rekey was refused (%s); negotiating a new Child SA to replace it",
            c.peer,
            error,
        )
        c.moving = f"{reason}; replacing it (the rekey failed: {error})"
        actions = self._want(c.peer, rule, None, now, f"{reason}; the rekey failed: {error}")
        want = self._peer(c.peer).queue.get(flow_selector(c.peer, rule))
        if want is not None:
            want.replaces.add(c.id)
        else:  # nothing to replace it with: it goes
            actions += self._remove_child(c, tell_peer=True)
        return actions

    def peer_deleted(self, peer: IPAddress, spis: Iterable[int] | None, now: float) -> list[Action]:
        """The peer sent DELETE: for these ESP SPIs (its inbound = our outbound), or None
        for its IKE SA with every Child SA."""
        p = self._peers.get(peer)
        if p is None:
            return []
        wanted = None if spis is None else set(spis)
        actions: list[Action] = []
        for c in list(p.children.values()):
            if wanted is None or c.spec.outbound.spi in wanted:
                log.info("peer %s deleted its Child SA (spi %#010x)", peer, c.spec.outbound.spi)
                actions += self._remove_child(c, tell_peer=False)
        return actions

    def liveness_failed(self, peer: IPAddress, now: float) -> list[Action]:
        """The peer stopped answering its IKE SA: tear its Child SAs down, fall back per group.

        No DELETE goes out: the IKE engine reported the IKE SA dead and forgot it, so a
        DELETE would be a second deletion, and could take down a fresh IKE SA the peer
        starts after a reboot. Each flow of a group that initiates is negotiated once
        more at once: a peer that only rebooted is back in a tunnel, and one that is
        gone fails that attempt (the retransmissions) and gets the group's failure shunt
        (private-or-clear: pass, private: drop) with the liveness failure in its reason.
        Meanwhile the group's trap holds the flow, so nothing leaves in the clear
        before the decision. Flows of responder-only groups (clear-or-private) just lose
        their SA and pass in the clear, as before the peer initiated.
        """
        p = self._peers.get(peer)
        if p is None:
            return []
        log.warning("peer %s stopped answering liveness checks: tearing down", peer)
        actions: list[Action] = []
        rules: list[Rule] = []
        for c in list(p.children.values()):
            actions += self._remove_child(c, tell_peer=False)
            rule = self.table.lookup(peer, c.selector.proto, c.selector.port)
            if rule is not None and rule.group.initiates and peer.version in self.wan:
                rules.append(rule)
        for rule in rules:
            actions += self._want(peer, rule, None, now, "peer stopped answering liveness checks")
        return actions

    def policy_expired(self, ev: PolicyExpire, now: float) -> list[Action]:
        """The kernel removed a shunt at its hard lifetime."""
        if not ev.hard:
            return []
        shunt = self._shunts.pop(_key(ev.src, ev.dst, ev.direction), None)
        if shunt is None:
            return []
        log.info("%s shunt for %s expired", shunt.policy.action.value, _describe(ev.dst))
        return self._restore([_pkey(shunt.policy)])

    def tick(self, now: float) -> list[Action]:
        """Remove shunts past their lifetime (in case the kernel's event was lost)."""
        actions: list[Action] = []
        for k, s in list(self._shunts.items()):
            if s.expires <= now:
                del self._shunts[k]
                actions.append(RemovePolicy(s.policy))
                actions += self._restore([k])
        return actions

    def poll_traffic(self) -> list[Action]:
        """Read every Child SA's counters (periodically), so idleness is measured."""
        return [
            CheckTraffic(c.id, c.spec, soft_expired=False)
            for p in self._peers.values()
            for c in p.children.values()
        ]

    def replace_table(self, table: PolicyTable) -> list[Action]:
        """A reload changed the groups: swap the group policies (tunnels stay)."""
        old = self._by_key
        self.table = table
        self._group_policies = table.kernel_policies(
            self.wan, trap_reqid=self.trap_reqid, lan6=self.lan6
        )
        self._by_key = {_pkey(p): p for p in self._group_policies}
        live = {k for s in self._shunts.values() for k in [_pkey(s.policy)]}
        live |= {_pkey(pol) for peer in self._lan_pass for pol in self._lan_passes(peer)}
        live |= {k for c in self._all_children() for k in self._child_keys(c.spec)}
        actions: list[Action] = [
            RemovePolicy(p) for k, p in old.items() if k not in self._by_key and k not in live
        ]
        actions += [InstallPolicy(p) for k, p in self._by_key.items() if k not in live]
        return actions

    def _all_children(self) -> list[_Child]:
        return [c for p in self._peers.values() for c in p.children.values()]

    def next_deadline(self) -> float | None:
        return min((s.expires for s in self._shunts.values()), default=None)

    def children(self) -> list[ChildSaSpec]:
        return [c.spec for p in self._peers.values() for c in p.children.values()]

    def shunt_policies(self) -> list[PolicySpec]:
        return [s.policy for s in self._shunts.values()]

    # ------------------------------------------------------------------ status
    def tunnels(
        self,
        now: float,
        counters: Callable[[ChildSaSpec], ChildSaCounters] | None = None,
        engine: Callable[[ChildSaSpec], str] | None = None,
    ) -> tuple[TunnelStatus, ...]:
        """One row per Child SA and per queued negotiation; ``counters`` reads a Child
        SA's datapath counters (``Datapath.read_counters``), None leaves them at 0;
        ``engine`` names the crypto engine that runs a Child SA's ESP."""
        out: list[TunnelStatus] = []
        for p in self._peers.values():
            for c in p.children.values():
                n = _read(counters, c.spec)
                out.append(
                    TunnelStatus(
                        peer=str(p.addr),
                        local=str(c.spec.local),
                        remote=_describe(c.selector),
                        state="rekeying" if c.rekeying or c.moving else "established",
                        policy=c.group.value,
                        transform=c.spec.encr.ike_name,
                        established_s=round(now - c.since, 3),
                        bytes_in=0 if n is None else n.inbound.bytes,
                        bytes_out=0 if n is None else n.outbound.bytes,
                        packets_in=0 if n is None else n.inbound.packets,
                        packets_out=0 if n is None else n.outbound.packets,
                        engine="" if engine is None else engine(c.spec),
                        replay_errors=0 if n is None else n.inbound.replay_errors,
                        integrity_failures=0 if n is None else n.inbound.integrity_failures,
                    )
                )
            for want in p.queue.values():
                out.append(
                    TunnelStatus(
                        peer=str(p.addr),
                        local=str(self.wan.get(p.addr.version, "")),
                        remote=_describe(want.selector),
                        state="negotiating" if p.in_flight is not None else "queued",
                        policy=want.rule.group.value,
                    )
                )
        return tuple(out)

    def shunts(self, now: float) -> tuple[ShuntStatus, ...]:
        """One row per shunted destination: a shunt is a policy per direction (out, and in
        and fwd for a pass), which an admin sees as one decision."""
        rows: dict[tuple[str, str, str], ShuntStatus] = {}
        for s in self._shunts.values():
            row = _shunt_row(s, now)
            key = _row_key(row)
            if key not in rows or (row.expires_s or 0.0) > (rows[key].expires_s or 0.0):
                rows[key] = row
        return tuple(rows.values())

    def shunt_status(self, policy: PolicySpec, now: float) -> ShuntStatus | None:
        """``policy``'s status row if it is one of the shunts (the ``oe.shunt`` event's
        body), else None (a group's or a tunnel's policy)."""
        s = self._shunts.get(_pkey(policy))
        return None if s is None or s.policy != policy else _shunt_row(s, now)

    def flush_shunts(self) -> tuple[int, list[Action]]:
        """Remove every pass and drop shunt (``oe flush``): the next flow to each of those
        destinations meets its group's trap and negotiates again, and a drop shunt's
        back-off starts over. Returns how many shunts go (as ``shunts`` lists them: one per
        destination and decision, whatever its policies), and the actions."""
        actions: list[Action] = []
        gone = [
            k
            for k, s in self._shunts.items()
            if s.policy.action in (PolicyAction.PASS, PolicyAction.DROP)
        ]
        rows = {_row_key(_shunt_row(self._shunts[k], 0.0)) for k in gone}
        for k in gone:
            actions.append(RemovePolicy(self._shunts.pop(k).policy))
            actions += self._restore([k])
        self._drop_failures.clear()
        if gone:
            log.info("flush: %d shunt(s) removed; the next flows negotiate again", len(rows))
        return len(rows), actions


def _row_key(row: ShuntStatus) -> tuple[str, str, str]:
    """What makes two shunt policies one row of ``oe status``."""
    return (row.destination, row.kind, row.reason)


def _shunt_row(s: _Shunt, now: float) -> ShuntStatus:
    return ShuntStatus(
        destination=_describe(s.policy.dst),
        kind=s.policy.action.value,
        reason=f"{s.group.value}: {s.reason}",
        expires_s=round(max(0.0, s.expires - now), 3),
    )


def _read(
    counters: Callable[[ChildSaSpec], ChildSaCounters] | None, spec: ChildSaSpec
) -> ChildSaCounters | None:
    """A Child SA's counters for the status, or None when they cannot be read (it left the
    kernel between the event and this look: the status shows 0, never fails)."""
    if counters is None:
        return None
    try:
        return counters(spec)
    except DatapathError:
        return None


def _target(ts: TrafficSelector) -> str:
    """``203.0.113.10``, or ``203.0.113.10 proto 6 port 443`` for a narrowed flow."""
    net = ts.net
    text = str(net.network_address if net.prefixlen == net.max_prefixlen else net)
    if ts.proto:
        text += f" proto {ts.proto}"
    if ts.port is not None:
        text += f" port {ts.port}"
    return text


#: IKE transform names as a person reads them
_CIPHERS = {"AES_GCM_16": "AES-GCM", "CHACHA20_POLY1305": "ChaCha20-Poly1305", "AES_CBC": "AES-CBC"}


def cipher_name(spec: ChildSaSpec) -> str:
    """``AES-GCM-256``, ``ChaCha20-Poly1305``, ``AES-CBC-128 HMAC_SHA2_256_128``: the
    algorithms and key size, never the keys (only their length is looked at)."""
    name = _CIPHERS.get(spec.encr.ike_name, spec.encr.ike_name)
    if name.startswith("AES"):
        name += f"-{len(spec.outbound.encr_key) * 8 - spec.encr.salt_bits}"
    return name if spec.integ is None else f"{name} {spec.integ.ike_name}"


def auth_words(auth: PeerAuth) -> str:
    """How the peer proved who it is: ``NULL auth`` or ``ED25519 key from DNSSEC``."""
    if auth.null or auth.key is None:
        return "NULL auth"
    return f"{auth.key.kind.value.upper()} key from DNSSEC"


def _describe(ts: TrafficSelector) -> str:
    text = str(ts.net)
    if ts.proto:
        text += f" proto {ts.proto}"
    if ts.port is not None:
        text += f" port {ts.port}"
    return text
