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
import itertools
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace

import dns.name

from oe_router.control.status import ProposalOffers, ShuntStatus, TunnelStatus
from oe_router.datapath.base import (
    Acquire,
    ChildSaCounters,
    ChildSaSpec,
    Expire,
    IPAddress,
    PolicyExpire,
    PolicySpec,
    TrafficSelector,
)
from oe_router.decisions import DecisionLog, subject
from oe_router.logs import NOTICE
from oe_router.oe.actions import (
    Action,
    ChildRequest,
    InstallChild,
    InstallPolicy,
    MoveChild,
    Negotiate,
    NegotiationResult,
    RemovePolicy,
    SendDelete,
)
from oe_router.oe.admission import Admission
from oe_router.oe.answers import HeldAnswers
from oe_router.oe.groups import GroupPolicies
from oe_router.oe.passes import Passes
from oe_router.oe.peerauth import PublishedKey, peer_auth
from oe_router.oe.peers import Child, Peer, Peers, Want
from oe_router.oe.policy import Group, PolicyTable, Rule, flow_selector, selector_rank
from oe_router.oe.selectors import child_keys, describe, host_net, target
from oe_router.oe.shunts import KEYLESS_LIMIT, Shunts
from oe_router.oe.tickets import InboundTicket, NegotiationTicket, RekeyTicket, Tickets
from oe_router.oe.upkeep import Upkeep

__all__ = ["OeManager"]

log = logging.getLogger("oe_router.oe")


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
        a PASS towards it (``Passes``)."""
        self.wan = dict(wan)
        self.lan6 = tuple(lan6) if 6 in self.wan else ()
        #: "example.org (198.51.100.7): protected, ..." lines, rate-limited
        self.decisions = DecisionLog(log)
        self._ids = itertools.count(1)  # tickets and Child SAs
        self._groups = GroupPolicies(table, self.wan, trap_reqid, self.lan6)
        self._shunts = Shunts(self.wan, self.lan6, shunt_lifetime, self._groups, self.decisions)
        self._passes = Passes(self.wan, self.lan6, self._shunts, self._groups)
        self._admission = Admission(self.wan, self._groups, self._passes)
        self._peers = Peers(self._groups, self._passes)
        self._tickets = Tickets(self._ids.__next__)
        self._upkeep = Upkeep(self._peers, self._tickets, self._admission, idle_timeout)
        self._answers = HeldAnswers()

    @property
    def table(self) -> PolicyTable:
        """The group table (``replace_table`` swaps it)."""
        return self._groups.table

    @property
    def idle_timeout(self) -> float:
        """Seconds without traffic before a Child SA goes (a reload may change it)."""
        return self._upkeep.idle_timeout

    @idle_timeout.setter
    def idle_timeout(self, seconds: float) -> None:
        self._upkeep.idle_timeout = seconds

    @property
    def shunt_lifetime(self) -> float:
        """The longest a shunt lives (``oe.shunt_lifetime``; a reload may change it)."""
        return self._shunts.lifetime

    @shunt_lifetime.setter
    def shunt_lifetime(self, seconds: float) -> None:
        self._shunts.lifetime = seconds

    def group_policies(self) -> tuple[PolicySpec, ...]:
        """The group table's kernel policies (what ``start`` installs)."""
        return self._groups.policies

    def start(self) -> list[Action]:
        """Install the group policies (replacing any adopted from an earlier run)."""
        return [InstallPolicy(p) for p in self._groups.policies]

    # ------------------------------------------------------------------ admission
    def containment_error(
        self, peer: IPAddress, spec: ChildSaSpec, inner: IPAddress | None = None
    ) -> str | None:
        """Why ``spec`` may not be installed for ``peer`` (None: it may); ``inner``: the
        CAT inner address the peer gives us with it (``Admission.containment_error``)."""
        return self._admission.containment_error(peer, spec, inner)

    def refuses_peer(self, peer: IPAddress) -> str | None:
        """Before any IKE: why ``peer`` may not start IPsec with us, or None."""
        return self._admission.refuses_peer(peer)

    def authorize_inbound(self, peer: IPAddress, spec: ChildSaSpec) -> str | None:
        """Responder side: may ``peer`` have this Child SA? None if yes, else why not."""
        return self._admission.authorize_inbound(peer, spec)

    def cat_map(self) -> tuple[tuple[IPAddress, IPAddress], ...]:
        """CAT: (peer, inner address) for every peer whose Child SAs use one."""
        return self._passes.cat_map()

    # ------------------------------------------------------------------ negotiation
    def _start_next(self, p: Peer, now: float) -> list[Action]:
        if p.in_flight is not None or not p.queue:
            self._peers.gc(p.addr)
            return []
        want = next(iter(p.queue.values()))
        inner = self._passes.inner(p.addr)  # CAT: the inner address the peer gave us
        local = self.wan[p.addr.version] if inner is None else inner
        p.in_flight = ticket = self._tickets.open(NegotiationTicket(p.addr, want))
        auth = self._answers.auth(p.addr)
        local_ts = TrafficSelector(host_net(local), want.selector.proto, None)
        request = ChildRequest(p.addr, local, auth, local_ts, want.selector)
        log.info(
            "negotiating with %s (%s, %s auth) for %s",
            p.addr,
            want.rule.group.value,
            "NULL" if auth.null else "DNSSEC key",
            describe(want.selector),
        )
        return [Negotiate(ticket, request)]

    def _want(
        self, peer: IPAddress, rule: Rule, waiter: int | None, now: float, cause: str = ""
    ) -> list[Action]:
        selector = flow_selector(peer, rule)
        p = self._peers.of(peer)
        want = p.queue.get(selector)
        if want is None:
            want = p.queue[selector] = Want(selector, rule, cause=cause)
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
        if self._peers.child_for(peer, selector) is not None:
            return []  # the SA arrived while the packet was trapped
        if self._tickets.installing(peer, selector) is not None:
            log.debug("ACQUIRE for %s: the peer's Child SA is being installed", peer)
            return []  # held packets go when it is in
        return self._want(peer, rule, None, now)

    def ensure_tunnel(
        self,
        waiter: int,
        name: dns.name.Name,
        addresses: tuple[IPAddress, ...],
        key: PublishedKey,
        now: float,
    ) -> list[Action]:
        """DNS front: protect every address of ``name`` with its DNSSEC-validated ``key``
        (OE's ``PeerAuth`` from here on); answer ``waiter``."""
        auth = peer_auth(key, name)
        self._answers.hold(waiter, ok=bool(addresses))
        actions: list[Action] = []
        for addr in addresses:
            rule = self.table.lookup(addr)
            group = Group.CLEAR if rule is None else rule.group
            if rule is None or not group.initiates or addr.version not in self.wan:
                why = "no WAN address" if addr.version not in self.wan else f"group {group.value}"
                self.decisions.decide(logging.INFO, subject([addr], name), f"clear, {why}", now)
                self._answers.refuse(waiter)
                continue
            self._answers.learn(addr, auth)
            selector = flow_selector(addr, rule)
            if self._peers.child_for(addr, selector) is not None:
                continue
            self._answers.wait_for(waiter, addr, selector)
            installing = self._tickets.installing(addr, selector)
            if installing is not None:  # answered once the peer's Child SA is in
                installing.waiters.add(waiter)
                continue
            actions += self._want(addr, rule, waiter, now)
        return actions + self._answers.release_if_done(waiter)

    def pass_keyless(
        self,
        name: dns.name.Name,
        addresses: tuple[IPAddress, ...],
        ttl: float,
        reason: str,
        now: float,
    ) -> tuple[list[Action], frozenset[IPAddress]]:
        """DNS front: ``name`` proved it has no key (``reason``: ``no key (secure
        denial)`` or ``no key (insecure zone)``), so IKE with its addresses would only
        probe. Each private-or-clear one gets a pass shunt for the answer's ``ttl``
        (``Shunts.keyless``): its first packets go in the clear at once instead of
        waiting for the probe to fail. Perform the actions before the answer goes out.

        Never shunted: an address outside private-or-clear ("private" must never pass;
        clear and block need nothing), one with a Child SA, a negotiation or a key some
        DNS name proved for it, or one past ``KEYLESS_LIMIT``. Returns the actions and
        the addresses that pass."""
        actions: list[Action] = []
        passed: set[IPAddress] = set()
        for addr in addresses:
            rule = self.table.lookup(addr)
            who = subject([addr], name)
            if rule is None or rule.group is not Group.PRIVATE_OR_CLEAR:
                continue  # the front's decision line tells it (clear, no key)
            p = self._peers.get(addr)
            if (p is not None and not p.idle) or not self._answers.auth(addr).null:
                continue  # a tunnel, a negotiation or a key: IKE decides, not a shunt
            if addr.version not in self.wan:
                continue
            selector = flow_selector(addr, rule)
            if self._tickets.installing(addr, selector) is not None:
                continue
            shunt = self._shunts.keyless(addr, selector, rule.group, reason, ttl, now, who)
            if shunt is None:
                why = f"keyless shunt limit ({KEYLESS_LIMIT}) reached, the first packet probes"
                self.decisions.decide(logging.WARNING, who, f"{reason}: {why}", now, key="limit")
                continue
            actions += shunt
            passed.add(addr)
        return actions, frozenset(passed)

    def keyless_passed(self, addresses: Iterable[IPAddress], now: float) -> bool:
        """True when a pass shunt stands for every one of ``addresses`` (the DNS front's
        cached answers of a keyless name go out without asking again)."""
        return all(self._shunts.passes(addr, now) for addr in addresses)

    def _fail(
        self,
        p: Peer,
        want: Want,
        reason: str,
        now: float,
        summary: str = "",
        offers: ProposalOffers | None = None,
    ) -> list[Action]:
        """Negotiation failed: the group's failure shunt, waiters told, next in queue."""
        p.queue.pop(want.selector, None)
        summary = summary or reason
        if want.cause:
            reason = f"{want.cause}, then {reason}"
        actions = self._drop_replaced(want)  # a broken driver's SA goes either way
        who = self._who(p.addr, want.selector)
        actions += self._shunts.add(
            p.addr, want.selector, want.rule.group, reason, now, summary, who, offers
        )
        actions += self._answers.settle(want.waiters, p.addr, want.selector, False)
        p.in_flight = None
        return actions + self._start_next(p, now)

    def _who(self, peer: IPAddress, selector: TrafficSelector) -> str:
        """The decision line's subject: the DNS name that asked for ``peer`` (if one did),
        the address, and the protocol and port when the flow selector narrows them."""
        return subject([target(selector)], self._answers.name(peer))

    def negotiated(self, ticket: int, result: NegotiationResult, now: float) -> list[Action]:
        """The negotiator answered a ``Negotiate`` or ``Rekey``."""
        t = self._tickets.get(ticket)
        if isinstance(t, RekeyTicket):
            return self._upkeep.rekeyed(ticket, t, result)
        p = None if t is None else self._peers.get(t.peer)
        if not isinstance(t, NegotiationTicket) or p is None:
            self._tickets.close(ticket)
            return []
        spec = result.child_sa
        if spec is None:
            self._tickets.close(ticket)
            why = result.error or "negotiation failed"
            return self._fail(p, t.want, why, now, result.summary, result.offers)
        error = self.containment_error(t.peer, spec, result.inner)
        if error is not None:
            self._tickets.close(ticket)
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
        t = self._tickets.close(ticket)
        if isinstance(t, InboundTicket):
            return self._inbound_installed(t, spec, error, now)
        if isinstance(t, RekeyTicket):
            return self._upkeep.installed(t, spec, error, now)
        if t is None:
            return []
        p = self._peers.of(t.peer)
        want = t.want
        p.in_flight = None
        if spec is None:
            reason = f"installing the Child SA failed: {error}"
            return [SendDelete(t.peer, t.spec), *self._fail(p, want, reason, now)]
        p.queue.pop(want.selector, None)
        c = Child(next(self._ids), t.peer, spec, want.selector, want.rule.group, now, active_at=now)
        log.info("peer %s: Child SA up for %s", t.peer, describe(want.selector))
        auth = self._answers.auth(t.peer)
        how = f"{auth.words}, {cipher_name(spec)} ({'DNS' if want.waiters else 'packet'})"
        private = t.inner is not None and self.table.group_of(t.peer, 0, None) is Group.PRIVATE
        actions = self._child_up(p, c, how, now)
        actions += self._passes.child_up(t.peer, t.inner, private)  # before the waiters
        actions += self._drop_replaced(want)  # (a same-selector one was superseded above)
        actions += self._answers.settle(want.waiters, t.peer, want.selector, True)
        return actions + self._start_next(p, now)

    def _child_up(self, p: Peer, c: Child, how: str, now: float) -> list[Action]:
        """``c`` is in: it supersedes an older Child SA of its flow and its policies
        replace the shunts of theirs; the peer's drop back-off starts over."""
        actions = self._peers.supersede(p, c.selector)
        p.children[c.id] = c
        self.decisions.decide(NOTICE, self._who(c.peer, c.selector), f"protected, {how}", now)
        self._shunts.succeeded(c.peer)
        self._shunts.replaced(child_keys(c.spec))
        return actions

    def _inbound_installed(
        self, t: InboundTicket, spec: ChildSaSpec | None, error: str | None, now: float
    ) -> list[Action]:
        p = self._peers.of(t.peer)
        inbound = t.child
        if spec is None:
            log.error("peer %s: installing its Child SA failed: %s", t.peer, error)
            actions: list[Action] = [SendDelete(t.peer, inbound.spec)]
            rule = self.table.lookup(t.peer)
            for waiter in sorted(t.waiters):  # negotiate ours for the held answers
                if rule is not None and self._answers.held(waiter):
                    actions += self._want(t.peer, rule, waiter, now)
            self._peers.gc(t.peer)
            return actions
        inbound.spec = spec
        prev = self._peers.child_for(t.peer, inbound.selector)
        if prev is not None:  # e.g. the IKE core's rekey: idleness carries over
            inbound.active_at = prev.active_at
        how = f"{cipher_name(spec)} (the peer initiated)"
        actions = self._child_up(p, inbound, how, now)
        actions += self._passes.child_up(t.peer, None, private=False)
        return actions + self._answers.settle(t.waiters, t.peer, inbound.selector, True)

    def _drop_replaced(self, want: Want) -> list[Action]:
        actions: list[Action] = []
        for child_id in sorted(want.replaces):
            c = self._peers.child(child_id)
            if c is not None:
                actions += self._peers.remove(c, tell_peer=True)
        want.replaces.clear()
        return actions

    # ------------------------------------------------------------------ inbound
    def adopt_inbound(self, peer: IPAddress, spec: ChildSaSpec, now: float) -> list[Action]:
        """Responder side: install an authorized Child SA the peer initiated."""
        if self.authorize_inbound(peer, spec) is not None:
            return [SendDelete(peer, spec)]
        rts = spec.remote_ts[0] if spec.remote_ts else TrafficSelector(host_net(peer))
        rule = self.table.lookup(peer, rts.proto, rts.port)
        group = Group.CLEAR_OR_PRIVATE if rule is None else rule.group
        sel = TrafficSelector(host_net(peer), rts.proto, rts.port)
        spec = replace(spec, policy_priority=selector_rank(sel.net, sel.proto, sel.port))
        child = Child(next(self._ids), peer, spec, sel, group, now, active_at=now)
        return [InstallChild(self._tickets.open(InboundTicket(peer, child)), spec)]

    # ------------------------------------------------------------------ lifecycle
    def expired(self, ev: Expire, now: float) -> list[Action]:
        """An SA hit its lifetime: hard -> gone; soft -> rekey if it carried traffic."""
        return self._upkeep.expired(ev)

    def traffic(self, child_id: int, total_bytes: int, now: float, soft: bool) -> list[Action]:
        """Counters of a ``CheckTraffic`` (``Upkeep.traffic``)."""
        return self._upkeep.traffic(child_id, total_bytes, now, soft)

    def withdraw(self, why: Callable[[ChildSaSpec], str | None], now: float) -> list[Action]:
        """The ESP offer lost transforms (their kernel driver failed a test): move every
        Child SA that uses one onto what is still offered, by a rekey with the new offer
        (the peer chooses among it), so its traffic leaves the broken driver.

        ``why(spec)`` says why a Child SA's transform was withdrawn, None if it was not.
        One move per Child SA at a time; call again whenever the offer changes."""
        actions: list[Action] = []
        for c in self._peers.children():
            reason = why(c.spec)
            if reason is None or c.moving:
                continue
            c.moving = reason
            log.warning(
                "peer %s: Child SA %s (%s): %s; rekeying it onto the current ESP offer",
                c.peer,
                describe(c.selector),
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
        c = self._peers.child(child_id)
        if c is None:
            return []
        if error is None:
            c.moving = ""
            return []
        reason = c.moving or "its transform was withdrawn"
        rule = self.table.lookup(c.peer, c.selector.proto, c.selector.port)
        if rule is None or not rule.group.initiates or c.peer.version not in self.wan:
            log.warning("peer %s: moving its Child SA failed: %s; removing it", c.peer, error)
            return self._peers.remove(c, tell_peer=True)
        log.warning(
            "peer %s: the rekey was refused (%s); negotiating a new Child SA to replace it",
            c.peer,
            error,
        )
        c.moving = f"{reason}; replacing it (the rekey failed: {error})"
        actions = self._want(c.peer, rule, None, now, f"{reason}; the rekey failed: {error}")
        want = self._peers.of(c.peer).queue.get(flow_selector(c.peer, rule))
        if want is not None:
            want.replaces.add(c.id)
        else:  # nothing to replace it with: it goes
            actions += self._peers.remove(c, tell_peer=True)
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
                actions += self._peers.remove(c, tell_peer=False)
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
            actions += self._peers.remove(c, tell_peer=False)
            rule = self.table.lookup(peer, c.selector.proto, c.selector.port)
            if rule is not None and rule.group.initiates and peer.version in self.wan:
                rules.append(rule)
        for rule in rules:
            actions += self._want(peer, rule, None, now, "peer stopped answering liveness checks")
        return actions

    def policy_expired(self, ev: PolicyExpire, now: float) -> list[Action]:
        """The kernel removed a shunt at its hard lifetime."""
        return self._shunts.expired(ev)

    def tick(self, now: float) -> list[Action]:
        """Remove shunts past their lifetime (in case the kernel's event was lost)."""
        return self._shunts.tick(now)

    def poll_traffic(self) -> list[Action]:
        """Read every Child SA's counters (periodically), so idleness is measured."""
        return self._upkeep.poll()

    def replace_table(self, table: PolicyTable) -> list[Action]:
        """A reload changed the groups: swap the group policies (tunnels stay)."""
        old = self._groups.load(table)
        new = self._groups.by_key
        live = self._shunts.keys() | self._passes.lan_keys()
        live |= {k for c in self._peers.children() for k in child_keys(c.spec)}
        actions: list[Action] = [
            RemovePolicy(p) for k, p in old.items() if k not in new and k not in live
        ]
        actions += [InstallPolicy(p) for k, p in new.items() if k not in live]
        return actions

    def next_deadline(self) -> float | None:
        return self._shunts.next_deadline()

    def children(self) -> list[ChildSaSpec]:
        return [c.spec for c in self._peers.children()]

    def shunt_policies(self) -> list[PolicySpec]:
        return self._shunts.policies()

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
        return self._peers.tunnels(now, self.wan, counters, engine)

    def dns_peers(self) -> dict[IPAddress, tuple[str, str]]:
        """Every peer a DNS name led to: (the name, how it must authenticate), for the
        per-device view (``devview``)."""
        return {
            peer: (auth.name.to_text(omit_final_dot=True) if auth.name else "", auth.words)
            for peer, auth in self._answers.named().items()
        }

    def shunts(self, now: float) -> tuple[ShuntStatus, ...]:
        """One row per shunted destination (a shunt is a policy per direction)."""
        return self._shunts.rows(now)

    def shunt_status(self, policy: PolicySpec, now: float) -> ShuntStatus | None:
        """``policy``'s status row if it is one of the shunts (the ``oe.shunt`` event's
        body), else None (a group's or a tunnel's policy)."""
        return self._shunts.status(policy, now)

    def flush_shunts(self) -> tuple[int, list[Action]]:
        """Remove every pass and drop shunt (``oe flush``): the next flow to each of those
        destinations meets its group's trap and negotiates again, and a drop shunt's
        back-off starts over. Returns how many shunts go (as ``shunts`` lists them: one per
        destination and decision, whatever its policies), and the actions."""
        return self._shunts.flush()


#: IKE transform names as a person reads them
_CIPHERS = {"AES_GCM_16": "AES-GCM", "CHACHA20_POLY1305": "ChaCha20-Poly1305", "AES_CBC": "AES-CBC"}


def cipher_name(spec: ChildSaSpec) -> str:
    """``AES-GCM-256``, ``ChaCha20-Poly1305``, ``AES-CBC-128 HMAC_SHA2_256_128``: the
    algorithms and key size, never the keys (only their length is looked at)."""
    name = _CIPHERS.get(spec.encr.ike_name, spec.encr.ike_name)
    if name.startswith("AES"):
        name += f"-{len(spec.outbound.encr_key) * 8 - spec.encr.salt_bits}"
    return name if spec.integ is None else f"{name} {spec.integ.ike_name}"
