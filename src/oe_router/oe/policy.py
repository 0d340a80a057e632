"""Policy groups: which group a destination falls in, and the kernel policies that enforce it.

Why one module for both: the lookup (used by the manager on every ACQUIRE and DNS
request) and the kernel policy table (what the kernel does with a packet before the
manager ever hears of it) must agree, or a destination could be encrypted by one and
sent in the clear by the other. Both derive from one ordering, ``Rule.rank``:

* the most specific entry wins: longest prefix, then an entry with a protocol beats
  one without, then one with a port (or an ICMP type) beats one with a protocol only;
* kernel policy priority = our band's base + rank (see ``datapath.kernel.Ownership``),
  so the kernel's lowest-priority-value-wins picks the same entry the lookup picks.

Overlapping entries of equal specificity are identical entries (same network, same
protocol, same port), which the config layer refuses in two groups, so the order is
total wherever it matters.

Group -> kernel (libreswan's semantics, thought through for a trap-based kernel):

=================  =========================================================
private            TRAP (out): ACQUIRE, negotiate; failure -> DROP shunt.
                   Persistent: survives a clean stop and a crash.
private-or-clear   TRAP (out): ACQUIRE, negotiate; failure -> PASS shunt.
clear-or-private   PASS (out, in, fwd): we never initiate, we only respond.
                   It needs a PASS policy: a broader trap (``0.0.0.0/0`` in
                   private-or-clear) would otherwise capture it.
clear              PASS (out, in, fwd).
block              DROP (out, in, fwd); never negotiated.
=================  =========================================================

Exclusions (rank band 0, beat every group entry, SA and shunt):

* the router's own IKE sockets: bypassed per socket (``bypass_socket``), not here;
* the LAN prefixes: traffic between router and LAN must never be trapped;
* the upstream DNS resolvers on udp/tcp 53: the DNS front must fetch IPSECKEY
  records while a negotiation waits, or a trap on the resolver would deadlock it;
* link-local and multicast (``169.254.0.0/16``, ``224.0.0.0/4``,
  ``255.255.255.255/32``, ``fe80::/10``, ``ff00::/8``): neighbour discovery,
  DHCP and router advertisements on the WAN link keep working whatever the groups;
* ICMPv6 neighbour discovery to and from any address (types 133-137, see
  ``ND_TYPES``); every other ICMPv6 message (echo included) follows its
  destination's group like any other protocol.

Trap and runtime selectors (SAs, shunts) have source = the router's WAN address, so
only the router's own packets and LAN packets *after* source NAT to that address
match them (the kernel repeats the XFRM lookup after NAT); PASS/DROP policies have
source = any, so they also hold for forwarded packets before NAT (FWD direction).
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Iterable, Mapping

from oe_router.config.schema import PolicyConfig, PolicyEntry
from oe_router.datapath.base import (
    Direction,
    IPAddress,
    IPNetwork,
    Mode,
    PolicyAction,
    PolicySpec,
    Template,
    TrafficSelector,
)
from oe_router.records import record

__all__ = [
    "EXCLUSION_BAND",
    "GROUP_BAND",
    "LINK_EXCLUSIONS",
    "ND_TYPES",
    "Exclusion",
    "Group",
    "PolicyTable",
    "Rule",
    "flow_selector",
    "selector_rank",
    "specificity",
]

#: Rank bands: exclusions beat group entries (and SAs/shunts, which rank like entries).
EXCLUSION_BAND = 0
GROUP_BAND = 400
_SPEC_SPAN = 3 * 128 + 2  # specificity values 0..386


class Group(enum.Enum):
    """libreswan's five policy groups; the value is the UCI name."""

    PRIVATE = "private"
    PRIVATE_OR_CLEAR = "private-or-clear"
    CLEAR_OR_PRIVATE = "clear-or-private"
    CLEAR = "clear"
    BLOCK = "block"

    @property
    def initiates(self) -> bool:
        """Groups whose packets make us negotiate (TRAP in the kernel)."""
        return self in (Group.PRIVATE, Group.PRIVATE_OR_CLEAR)

    @property
    def accepts_inbound(self) -> bool:
        """Groups a peer may build a tunnel for as initiator."""
        return self in (Group.PRIVATE, Group.PRIVATE_OR_CLEAR, Group.CLEAR_OR_PRIVATE)

    @property
    def failure_action(self) -> PolicyAction | None:
        """The shunt installed when negotiation fails (None: nothing to install)."""
        if self is Group.PRIVATE:
            return PolicyAction.DROP
        if self is Group.PRIVATE_OR_CLEAR:
            return PolicyAction.PASS
        return None


def specificity(
    net: IPNetwork, proto: int | None, port: int | None, icmp_type: int | None = None
) -> int:
    """Higher is more specific: prefix length first, then protocol, then port (or ICMP type)."""
    level = 0 if not proto else (2 if port is not None or icmp_type is not None else 1)
    return 3 * net.prefixlen + level


def selector_rank(
    net: IPNetwork, proto: int | None, port: int | None, icmp_type: int | None = None
) -> int:
    """Rank (lower wins) of a group entry, SA or shunt with this destination selector."""
    return GROUP_BAND + _SPEC_SPAN - specificity(net, proto, port, icmp_type)


@record(frozen=True)
class Exclusion:
    """A destination never captured by OE, and why (shown in logs and docs)."""

    entry: PolicyEntry
    reason: str


def _ex(cidr: str, reason: str) -> Exclusion:
    return Exclusion(PolicyEntry(ipaddress.ip_network(cidr)), reason)


#: ICMPv6 neighbour discovery (RFC 4861): RS, RA, NS, NA, Redirect. NS/NA also go to
#: and come from global unicast addresses (NUD probes, a neighbour resolving our WAN
#: address), so the link dies if a trap, an SA or a drop policy catches them.
ND_TYPES: Mapping[int, str] = {
    133: "router solicitation",
    134: "router advertisement",
    135: "neighbour solicitation",
    136: "neighbour advertisement",
    137: "redirect",
}
# Not excluded, on purpose:
# * MLD (130-132, 143) always goes to multicast from link-local or unspecified
#   sources: ff00::/8 and fe80::/10 above already keep it out of OE.
# * Errors (1 Destination Unreachable, 2 Packet Too Big, 3 Time Exceeded, 4 Parameter
#   Problem): those from on-path routers pass already (no group traps inbound; an SA's
#   inbound policy names only its peer, which sends its own errors inside ESP), and
#   the ones we send quote the offending packet, so about a protected flow they must
#   follow the peer's SA, not leak its inner headers in the clear.
# * Echo (128/129) and the rest: ordinary traffic, the destination's group decides.


def _icmp6(icmp_type: int, name: str) -> Exclusion:
    entry = PolicyEntry(ipaddress.ip_network("::/0"), 58, icmp_type=icmp_type)
    return Exclusion(entry, f"ICMPv6 neighbour discovery ({name})")


#: The WAN link's own plumbing: always excluded.
LINK_EXCLUSIONS: tuple[Exclusion, ...] = (
    _ex("169.254.0.0/16", "IPv4 link-local"),
    _ex("224.0.0.0/4", "IPv4 multicast"),
    _ex("255.255.255.255/32", "IPv4 broadcast (DHCP)"),
    _ex("fe80::/10", "IPv6 link-local (neighbour discovery, DHCPv6)"),
    _ex("ff00::/8", "IPv6 multicast"),
    *(_icmp6(t, name) for t, name in ND_TYPES.items()),
)


@record(frozen=True)
class Rule:
    """One entry of the table: a group entry or an exclusion, with its rank."""

    entry: PolicyEntry
    group: Group
    rank: int
    exclusion: str | None = None  # the reason, for exclusions

    def matches(
        self, addr: IPAddress, proto: int, port: int | None, icmp_type: int | None = None
    ) -> bool:
        """Does a flow to ``addr`` fall under this rule? A type-narrowed rule needs the type."""
        e = self.entry
        if addr.version != e.network.version or addr not in e.network:
            return False
        if e.proto and e.proto != proto:
            return False
        if e.icmp_type is not None and e.icmp_type != icmp_type:
            return False
        return e.port is None or e.port == port


def flow_selector(peer: IPAddress, rule: Rule | None) -> TrafficSelector:
    """The destination selector of a peer's SA or shunt: the host, narrowed like the rule."""
    host = ipaddress.ip_network(peer)
    if rule is None:
        return TrafficSelector(host)
    e = rule.entry
    return TrafficSelector(host, e.proto or 0, e.port, e.icmp_type)


def _dst_ts(entry: PolicyEntry) -> TrafficSelector:
    return TrafficSelector(entry.network, entry.proto or 0, entry.port, entry.icmp_type)


def _any(version: int) -> IPNetwork:
    return ipaddress.ip_network("0.0.0.0/0" if version == 4 else "::/0")


def _unspecified(version: int) -> IPAddress:
    return ipaddress.ip_address("0.0.0.0" if version == 4 else "::")


class PolicyTable:
    """The group entries and exclusions, ordered once; lookup and kernel policies from it."""

    def __init__(self, rules: Iterable[Rule]) -> None:
        seen: dict[PolicyEntry, Rule] = {}
        for rule in sorted(rules, key=_order):
            other = seen.get(rule.entry)
            if other is None:
                seen[rule.entry] = rule
            elif other.exclusion is None and other.group is not rule.group:
                raise ValueError(
                    f"policy entry {rule.entry} is in both {other.group.value} and "
                    f"{rule.group.value}; keep it in one group"
                )
            # else: shadowed by an identical exclusion (or a duplicate): one kernel object
        self.rules: tuple[Rule, ...] = tuple(seen.values())

    @classmethod
    def from_config(
        cls,
        config: PolicyConfig,
        *,
        lan: Iterable[IPNetwork] = (),
        dns_upstream: Iterable[IPAddress] = (),
        link_exclusions: Iterable[Exclusion] = LINK_EXCLUSIONS,
    ) -> PolicyTable:
        """Groups from ``config``, plus the exclusions that keep the router reachable."""
        rules: list[Rule] = []
        for name, entries in config.groups().items():
            group = Group(name)
            for e in entries:
                rank = selector_rank(e.network, e.proto, e.port, e.icmp_type)
                rules.append(Rule(e, group, rank))
        exclusions = list(link_exclusions)
        exclusions += [Exclusion(PolicyEntry(net), "LAN") for net in lan]
        for addr in dns_upstream:
            host = ipaddress.ip_network(addr)
            for proto in (17, 6):
                exclusions.append(Exclusion(PolicyEntry(host, proto, 53), "upstream DNS"))
        for ex in exclusions:
            e = ex.entry
            spec = specificity(e.network, e.proto, e.port, e.icmp_type)
            rank = EXCLUSION_BAND + _SPEC_SPAN - spec
            rules.append(Rule(e, Group.CLEAR, rank, ex.reason))
        return cls(rules)

    def lookup(
        self,
        addr: IPAddress,
        proto: int = 0,
        port: int | None = None,
        icmp_type: int | None = None,
    ) -> Rule | None:
        """The winning rule for a destination, or None (no entry: clear, no policy).

        A flow whose ICMP type is not given matches no type-narrowed rule: those are
        exclusions for neighbour discovery, which never reaches a trap.
        """
        for rule in self.rules:
            if rule.matches(addr, proto, port, icmp_type):
                return rule
        return None

    def group_of(
        self,
        addr: IPAddress,
        proto: int = 0,
        port: int | None = None,
        icmp_type: int | None = None,
    ) -> Group:
        """The group a destination falls in; no entry at all means clear."""
        rule = self.lookup(addr, proto, port, icmp_type)
        return Group.CLEAR if rule is None else rule.group

    def kernel_policies(
        self,
        wan: Mapping[int, IPAddress],
        *,
        trap_reqid: int,
        lan6: Iterable[ipaddress.IPv6Network] = (),
    ) -> tuple[PolicySpec, ...]:
        """Every policy to install: traps, pass and drop policies, in rank order.

        ``wan`` maps IP version -> the router's WAN address. A family without a WAN
        address cannot negotiate: its private entries become DROP (never clear) and
        its private-or-clear entries are left out (clear).

        ``lan6``: the LAN's IPv6 prefixes whose flows the LAN gateway NATs to the WAN
        address once a peer has a tunnel (``lan.py``). LAN IPv6 flows are not NATed
        before that, so they would never meet the WAN-sourced traps: each IPv6
        private-or-clear trap gets a twin with source = the LAN prefix (same
        destination, rank and template: the SA is still WAN <-> peer), which the
        kernel's routing-time lookup of a forwarded packet hits, so the packet raises
        an ACQUIRE like the router's own. Each IPv6 private entry gets a LAN-sourced
        PASS instead: those flows are NATed anyway (``oe_private6``) and meet the WAN
        trap after NAT; without the PASS a broader LAN trap would catch them first.
        IPv4 gets none: every LAN IPv4 flow is NATed before its lookup matters.
        """
        lans = tuple(lan6)
        out: list[PolicySpec] = []
        for rule in self.rules:
            out.extend(self._policies(rule, wan, trap_reqid, lans))
        return tuple(out)

    @staticmethod
    def _policies(
        rule: Rule,
        wan: Mapping[int, IPAddress],
        trap_reqid: int,
        lan6: tuple[ipaddress.IPv6Network, ...] = (),
    ) -> list[PolicySpec]:
        version = rule.entry.network.version
        dst = _dst_ts(rule.entry)
        persistent = rule.group is Group.PRIVATE
        local = wan.get(version)
        if rule.group.initiates and local is not None:
            tmpl = Template(local, _unspecified(version), trap_reqid, Mode.TRANSPORT)
            src = TrafficSelector(ipaddress.ip_network(local))
            out = [
                PolicySpec(
                    src, dst, Direction.OUT, PolicyAction.TRAP, rule.rank, (tmpl,),
                    persistent=persistent,
                )
            ]  # fmt: skip
            if version == 6:
                lan_action = PolicyAction.PASS if persistent else PolicyAction.TRAP
                tmpls = () if persistent else (tmpl,)
                for net in lan6:
                    lan_src = TrafficSelector(net)
                    out.append(
                        PolicySpec(lan_src, dst, Direction.OUT, lan_action, rule.rank, tmpls)
                    )
            return out
        if rule.group is Group.PRIVATE_OR_CLEAR:
            return []  # no WAN address of this family: clear
        action = PolicyAction.PASS
        if rule.group in (Group.BLOCK, Group.PRIVATE):
            action = PolicyAction.DROP
        any_src = TrafficSelector(_any(version))
        return [
            PolicySpec(any_src, dst, Direction.OUT, action, rule.rank, persistent=persistent),
            PolicySpec(dst, any_src, Direction.IN, action, rule.rank, persistent=persistent),
            PolicySpec(dst, any_src, Direction.FWD, action, rule.rank, persistent=persistent),
        ]


def _order(rule: Rule) -> tuple[int, int, str]:
    # rank first; ties (different families, or non-overlapping entries) by a stable key
    return (rule.rank, rule.entry.network.version, str(rule.entry))
