"""The userspace SPD projected into nftables: XFRM policy verdicts without XFRM.

Why: a kernel without ESP has no XFRM policies, yet the OE semantics must hold in the
kernel's fast path. Packets leaving through the WAN device whose best policy is PASS go
out in the clear with no userspace hop, DROP are dropped in the kernel, TRAP/HOLD/IPSEC
are queued (NFQUEUE) to the daemon, which raises an ACQUIRE, holds them, and later
encrypts or releases them. Inbound cleartext whose IN/FWD policy requires IPsec is
dropped unless it came decrypted out of the datapath's TUN device.

Everything here but the edge (``apply_script``, ``install``, ``queue_backend``,
``insert_xt_queue``, and ``SpdProjection``, which keeps what the kernel holds) is pure:
policies in, an intermediate rule form (``SpdTable``) out, rendered to one atomic
``nft -f`` script for ``table inet oe_spd`` (create-if-missing, delete, recreate, like
oe/lan.py); ``update`` turns policy changes into map element changes when it can;
``evaluate`` runs the intermediate form for tests.

Semantics (XFRM's): among the policies of a direction that match a packet, the one with
the LOWEST priority value wins; ties go to the earlier policy (input order). A packet no
policy matches is accepted. Verdicts:

=========  ==================  ===============================================
action     OUT (WAN egress)    IN / FWD (cleartext arrivals)
=========  ==================  ===============================================
PASS       accept              accept
DROP       drop                drop
TRAP       queue               drop (IPsec required; TUN arrivals are exempt)
IPSEC      queue               drop (IPsec required; TUN arrivals are exempt)
HOLD       queue               drop
=========  ==================  ===============================================

Hooks, and why there:

* ``out``: postrouting at ``srcnat + 10``, ``oifname <wan>`` only. After source NAT
  (oe/lan.py's SNAT sits at ``srcnat - 5``, fw4's masquerading at ``srcnat``), so a LAN
  flow is seen with the WAN address the policies' selectors use (the kernel's own XFRM
  repeats its lookup after NAT for the same reason). NAT mangles the packet in place at
  its hook, for every packet of the connection, so later chains see the new header
  (checked on the real kernel by tests/host/test_nft_spd.py).
* ``inbound``: prerouting at ``dstnat - 10``: before conntrack's destination NAT and
  the de-NAT of replies to SNATed flows, i.e. on the *wire* addresses (peer -> WAN
  address), which are what XFRM checks too (its decode of a NATed packet,
  ``nf_nat_decode_session``, restores the pre-NAT view). Routing has not happened yet,
  so IN versus FWD is decided by the wire destination: a local (or broadcast/multicast)
  address goes to the ``in_policies`` chain, anything else to ``fwd_policies``. This
  differs from the kernel only for NATed flows (a reply to a SNATed LAN flow is addressed
  to the WAN address on the wire, so it meets IN where XFRM would check FWD with the same
  wire addresses); the OE manager installs identical IN and FWD selectors for every SA
  and shunt, so the verdicts agree. Exempt: ``lo``, the TUN device (decrypted and checked
  by the datapath) and, when ``ike_ports`` is given, UDP to those ports on a local
  address (IKE and ESP-in-UDP must reach the daemon: the kernel datapath bypasses them
  per socket).
* queueing goes through the regular chain ``oe_queue`` (vmaps can only ``goto`` a chain;
  ``queue`` is not a verdict). ``queue num N`` without ``bypass``: fail closed, with no
  process bound the kernel drops. Kernels without nft's ``queue`` expression (CONFIG_NFT_QUEUE
  unset, like this project's CI host) get ``oe_queue { drop }`` from the script and the
  xt NFQUEUE target inserted ahead of the drop through nft_compat (``insert_xt_queue``):
  until the insert lands (a few ms after a full replacement) queued packets are dropped,
  never passed.
* ``meta mark & bypass_mark == bypass_mark`` accepts first in ``out``: the daemon marks
  its IKE/NAT-T socket (SO_MARK) so its own IKE and ESP-in-UDP never meet a trap.

Compile algorithm (per direction; ``_compile_direction``):

1. Sort the policies stably by priority; each becomes an ``Entry``: family, the *key*
   prefix (the remote side: destination for OUT, source for IN/FWD), the fixed prefix
   (the other side), protocol, ports, ICMP type, verdict, and its order (priority,
   input index).
2. Walk the entries in order, building a list of ``Block``s (each renders as ONE nft
   rule): entries of the same *shape* (everything but the key prefix) share a block,
   whose keys live in a named interval verdict map (``ip daddr vmap @out_3``). An entry
   joins the last block of its shape when
   (a) its key overlaps no key already there (a packet then matches at most one
       element, so order inside a block is irrelevant; nft also refuses overlapping
       intervals); an *identical* key means an identical selector, which can never win
       over the earlier one: the entry is shadowed and dropped; and
   (b) it conflicts with no entry of any block after that one, where two entries
       conflict when some packet matches both and their verdicts differ.
   Moving an entry earlier past entries it does not conflict with changes no packet's
   verdict (a packet matching both gets the same verdict either way), so the blocks
   in order give every packet the verdict of its best policy. Otherwise the entry
   opens a new block at the end.
3. A block with the single key ``/0`` renders as a plain rule; every other block as a
   rule + named map, even with one element, so shunts and SAs can come and go as map
   elements (``update``) without replacing the table.

Thousands of host shunts or SA entries of one shape and priority (OE's ranks put every
``/32`` shunt at the same rank) thus cost one rule and one map lookup on the WAN path.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import struct
import subprocess
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import field, replace
from typing import Any, Final

from oe_router.datapath.base import (
    ICMP_PROTOS,
    DatapathError,
    Direction,
    IPAddress,
    IPNetwork,
    PolicyAction,
    PolicySpec,
)
from oe_router.datapath.nft import run_nft
from oe_router.datapath.nft_setelem import (
    NF_ACCEPT,
    NF_DROP,
    NFT_GOTO,
    ElemChange,
    NftSetError,
    SetElemWriter,
    interval,
    unsupported,
)
from oe_router.netns import in_netns
from oe_router.records import record
from oe_router.tasks import spawn_tracked

__all__ = [
    "DEFAULT_TABLE",
    "Block",
    "Entry",
    "Flow",
    "NftSpdError",
    "SpdProjection",
    "SpdTable",
    "Verdict",
    "apply_script",
    "best_policy",
    "compile_spd",
    "evaluate",
    "insert_xt_queue",
    "install",
    "queue_backend",
    "remove_script",
    "render",
    "update",
    "update_elements",
]

_log = logging.getLogger("oe_router.datapath")

DEFAULT_TABLE: Final = "oe_spd"
QUEUE_CHAIN: Final = "oe_queue"
#: Chain priorities (see the module docstring for why).
OUT_PRIORITY: Final = "srcnat + 10"
INBOUND_PRIORITY: Final = "dstnat - 10"
#: Protocols whose selectors may carry ports (XFRM reads ports only for these).
PORT_PROTOS: Final = frozenset({6, 17, 33, 132, 136})


class NftSpdError(DatapathError):
    """A policy cannot be expressed, or nft refused the script (nft's words included)."""


class Verdict(enum.Enum):
    ACCEPT = "accept"
    DROP = "drop"
    QUEUE = "queue"


class Side(enum.Enum):
    SRC = "saddr"
    DST = "daddr"


_OUT_VERDICT: Final[Mapping[PolicyAction, Verdict]] = {
    PolicyAction.PASS: Verdict.ACCEPT,
    PolicyAction.DROP: Verdict.DROP,
    PolicyAction.TRAP: Verdict.QUEUE,
    PolicyAction.HOLD: Verdict.QUEUE,
    PolicyAction.IPSEC: Verdict.QUEUE,
}
_IN_VERDICT: Final[Mapping[PolicyAction, Verdict]] = {
    PolicyAction.PASS: Verdict.ACCEPT,
    PolicyAction.DROP: Verdict.DROP,
    PolicyAction.TRAP: Verdict.DROP,
    PolicyAction.HOLD: Verdict.DROP,
    PolicyAction.IPSEC: Verdict.DROP,
}


def verdict_of(direction: Direction, action: PolicyAction) -> Verdict:
    """What the kernel does with a cleartext packet this policy wins for."""
    return (_OUT_VERDICT if direction is Direction.OUT else _IN_VERDICT)[action]


# --- the intermediate form ------------------------------------------------------
@record(frozen=True)
class Shape:
    """Everything a block's entries share: all match fields but the key prefix."""

    family: int
    key_side: Side
    fixed: IPNetwork  # the non-key side's prefix (/0: not matched)
    proto: int = 0
    sport: int | None = None
    dport: int | None = None
    icmp_type: int | None = None


@record(frozen=True)
class Entry:
    """One policy as the compiler sees it."""

    shape: Shape
    key: IPNetwork
    verdict: Verdict
    order: tuple[int, int]  # (priority, input index): lower wins
    policy: PolicySpec = field(compare=False, repr=False)


@record(frozen=True)
class Block:
    """One nft rule: the shape's fixed match, then a lookup of the key in map ``name``."""

    name: str
    shape: Shape
    entries: tuple[Entry, ...]

    @property
    def plain(self) -> bool:
        """A lone /0 key: rendered as a rule with a verdict, no map."""
        return len(self.entries) == 1 and self.entries[0].key.prefixlen == 0


@record(frozen=True)
class SpdTable:
    """The compiled table: blocks per direction, and what the chains need to know."""

    wan: str
    tun: str
    queue_num: int
    blocks: Mapping[Direction, tuple[Block, ...]]
    shadowed: tuple[Entry, ...] = ()
    bypass_mark: int | None = None
    ike_ports: tuple[int, ...] = ()
    table: str = DEFAULT_TABLE
    next_index: int = 0


def _check_name(text: str, what: str) -> str:
    if not text or len(text) > 15 or not all(c.isalnum() or c in "-_.@" for c in text):
        raise NftSpdError(f"{what} {text!r} is not a valid interface or table name")
    return text


def _entry(policy: PolicySpec, index: int) -> Entry:
    src, dst = policy.src, policy.dst
    if policy.mark is not None:
        raise NftSpdError(
            f"policy {policy.describe()}: marked policies are not projected into nftables "
            f"(nothing in OE installs one); leave the mark out in userspace mode"
        )
    proto = src.proto or dst.proto
    icmp = src.icmp_type if src.icmp_type is not None else dst.icmp_type
    for ts in (src, dst):
        if ts.port is not None and proto not in PORT_PROTOS:
            raise NftSpdError(
                f"policy {policy.describe()}: port {ts.port} needs a protocol with ports "
                f"(tcp, udp, udplite, sctp, dccp), got protocol {proto}"
            )
    if icmp is not None and proto not in ICMP_PROTOS:
        raise NftSpdError(f"policy {policy.describe()}: ICMP type {icmp} needs icmp/icmpv6")
    out = policy.direction is Direction.OUT
    key_side = Side.DST if out else Side.SRC
    key, fixed = (dst.net, src.net) if out else (src.net, dst.net)
    shape = Shape(src.net.version, key_side, fixed, proto, src.port, dst.port, icmp)
    verdict = verdict_of(policy.direction, policy.action)
    return Entry(shape, key, verdict, (policy.priority, index), policy)


def _nets_overlap(a: IPNetwork, b: IPNetwork) -> bool:
    """Two prefixes overlap iff one holds the other, i.e. their address ranges meet
    (compared as integers: ``subnet_of`` made each added shunt's scan of its map's
    keys cost ~2 us a key)."""
    return (
        a.version == b.version
        and int(a.network_address) <= int(b.broadcast_address)
        and int(b.network_address) <= int(a.broadcast_address)
    )


def _shapes_overlap(a: Shape, b: Shape) -> bool:
    """Can one packet match both shapes (ignoring the key prefixes)?"""
    if a.family != b.family or (a.proto and b.proto and a.proto != b.proto):
        return False
    for x, y in ((a.sport, b.sport), (a.dport, b.dport), (a.icmp_type, b.icmp_type)):
        if x is not None and y is not None and x != y:
            return False
    # A port (or type) needs its protocol: a port on one side excludes an ICMP type there.
    ports = a.sport is not None or a.dport is not None or b.sport is not None or b.dport is not None
    icmps = a.icmp_type is not None or b.icmp_type is not None
    if ports and icmps:
        return False
    if a.key_side is b.key_side:
        return _nets_overlap(a.fixed, b.fixed)
    return True  # different key sides never share a direction; kept total for safety


def _conflicts(e: Entry, block: Block) -> list[Entry]:
    """Entries of ``block`` that some packet matches together with ``e``, verdict differing."""
    if not _shapes_overlap(e.shape, block.shape):
        return []
    return [o for o in block.entries if o.verdict is not e.verdict and _nets_overlap(o.key, e.key)]


def _key_clash(e: Entry, block: Block) -> bool:
    """Does ``e``'s key overlap (or equal) a key of the block?"""
    return any(_nets_overlap(o.key, e.key) for o in block.entries)


class _Keys:
    """A block's keys, with the prefix lengths present (host lookups by supernet)."""

    def __init__(self) -> None:
        self.by_net: dict[IPNetwork, Entry] = {}
        self.lens: dict[int, int] = {}

    def add(self, e: Entry) -> None:
        self.by_net[e.key] = e
        self.lens[e.key.prefixlen] = self.lens.get(e.key.prefixlen, 0) + 1

    def overlaps(self, key: IPNetwork) -> bool:
        """Does ``key`` overlap a key here? (Identical keys are checked before.)"""
        if key.prefixlen == key.max_prefixlen:
            return any(
                key.supernet(new_prefix=n) in self.by_net for n in self.lens if n < key.prefixlen
            )
        return any(_nets_overlap(k, key) for k in self.by_net)


def _compile_direction(entries: Sequence[Entry], prefix: str) -> tuple[list[Block], list[Entry]]:
    blocks: list[Block] = []  # shape and name; entries filled in at the end
    members: list[list[Entry]] = []
    keysets: list[_Keys] = []
    shadowed: list[Entry] = []
    last_of_shape: dict[Shape, int] = {}
    for e in sorted(entries, key=lambda x: x.order):
        b = last_of_shape.get(e.shape)
        if b is not None:
            keys = keysets[b]
            if e.key in keys.by_net:
                shadowed.append(e)  # identical selector: the earlier policy wins forever
                continue
            if not keys.overlaps(e.key) and not any(
                _conflicts(e, replace(blocks[i], entries=tuple(members[i])))
                for i in range(b + 1, len(blocks))
            ):
                members[b].append(e)
                keys.add(e)
                continue
        last_of_shape[e.shape] = len(blocks)
        blocks.append(Block(f"{prefix}_{len(blocks)}", e.shape, ()))
        members.append([e])
        keysets.append(_Keys())
        keysets[-1].add(e)
    out = [replace(blk, entries=tuple(m)) for blk, m in zip(blocks, members, strict=True)]
    return out, shadowed


_PREFIX: Final = {Direction.OUT: "out", Direction.IN: "in", Direction.FWD: "fwd"}


def compile_spd(
    policies: Iterable[PolicySpec],
    *,
    wan: str,
    tun: str,
    queue_num: int,
    bypass_mark: int | None = None,
    ike_ports: Iterable[int] = (),
    table: str = DEFAULT_TABLE,
) -> SpdTable:
    """Compile policies (any order; ties on priority: earlier wins) into the table form."""
    if not 0 <= queue_num <= 0xFFFF:
        raise NftSpdError(f"NFQUEUE number {queue_num} out of range 0..65535")
    if bypass_mark is not None and not 0 < bypass_mark <= 0xFFFFFFFF:
        raise NftSpdError(f"bypass mark {bypass_mark:#x} must be a non-zero 32-bit value")
    per_dir: dict[Direction, list[Entry]] = {d: [] for d in Direction}
    index = 0
    for index, policy in enumerate(policies):
        per_dir[policy.direction].append(_entry(policy, index))
    blocks: dict[Direction, tuple[Block, ...]] = {}
    shadowed: list[Entry] = []
    for d in Direction:
        compiled, shadow = _compile_direction(per_dir[d], _PREFIX[d])
        blocks[d] = tuple(compiled)
        shadowed += shadow
    return SpdTable(
        wan=_check_name(wan, "WAN device"),
        tun=_check_name(tun, "TUN device"),
        queue_num=queue_num,
        blocks=blocks,
        shadowed=tuple(shadowed),
        bypass_mark=bypass_mark,
        ike_ports=tuple(sorted(set(ike_ports))),
        table=_check_name(table, "nft table"),
        next_index=index + 1,
    )


# --- rendering ----------------------------------------------------------------------
_CHAIN: Final = {
    Direction.OUT: "out_policies",
    Direction.IN: "in_policies",
    Direction.FWD: "fwd_policies",
}


def _verdict_text(v: Verdict) -> str:
    return f"goto {QUEUE_CHAIN}" if v is Verdict.QUEUE else v.value


def _match_text(shape: Shape) -> str:
    ip = "ip" if shape.family == 4 else "ip6"
    parts = [f"meta nfproto {'ipv4' if shape.family == 4 else 'ipv6'}"]
    fixed_side = Side.SRC if shape.key_side is Side.DST else Side.DST
    if shape.fixed.prefixlen:
        parts.append(f"{ip} {fixed_side.value} {_net(shape.fixed)}")
    if shape.proto:
        parts.append(f"meta l4proto {shape.proto}")
    if shape.sport is not None:
        parts.append(f"th sport {shape.sport}")
    if shape.dport is not None:
        parts.append(f"th dport {shape.dport}")
    if shape.icmp_type is not None:
        parts.append(f"{'icmp' if shape.family == 4 else 'icmpv6'} type {shape.icmp_type}")
    return " ".join(parts)


def _net(net: IPNetwork) -> str:
    return str(net.network_address) if net.prefixlen == net.max_prefixlen else str(net)


def _elements(entries: Iterable[Entry]) -> str:
    return ", ".join(f"{_net(e.key)} : {_verdict_text(e.verdict)}" for e in entries)


def _map_text(block: Block) -> list[str]:
    kind = "ipv4_addr" if block.shape.family == 4 else "ipv6_addr"
    lines = [f"\tmap {block.name} {{", f"\t\ttype {kind} : verdict", "\t\tflags interval"]
    if block.entries:
        lines.append(f"\t\telements = {{ {_elements(block.entries)} }}")
    return [*lines, "\t}"]


def _rule_text(block: Block) -> str:
    match = _match_text(block.shape)
    ip = "ip" if block.shape.family == 4 else "ip6"
    if block.plain:
        return f"\t\t{match} {_verdict_text(block.entries[0].verdict)}"
    return f"\t\t{match} {ip} {block.shape.key_side.value} vmap @{block.name}"


def map_names(spd: SpdTable) -> list[str]:
    """The maps ``render`` declares for ``spd`` (what the kernel holds after it)."""
    return [b.name for d in Direction for b in spd.blocks[d] if not b.plain]


def render(
    spd: SpdTable,
    *,
    xt_queue: bool = False,
    maps_present: Sequence[str] | None = None,
    keep_queue: bool = False,
) -> str:
    """The whole ``inet <table>`` as one atomic ``nft -f`` script (replaces an old one).

    ``xt_queue``: the kernel lacks nft's ``queue`` (see ``queue_backend``): ``oe_queue``
    then holds only ``drop`` and ``insert_xt_queue`` puts the xt NFQUEUE target ahead.

    ``maps_present``: the maps the table holds now (``present_maps``). Given, the table is
    emptied in place (flush, delete those maps, refill) and its base chains stay
    registered: unregistering a hook makes the kernel drop every packet held in a
    queue, i.e. every first packet waiting for its SA. None: the table is deleted and
    made anew (for a table of unknown shape).

    ``keep_queue`` (with ``maps_present``, for a table this process wrote): the queue
    chain keeps its rules, so an xt NFQUEUE rule inserted over netlink stays and no
    packet meets the chain's bare ``drop`` while the rest is rewritten.
    """
    t = spd.table
    if maps_present is None:
        lines = [f"table inet {t}", f"delete table inet {t}", f"table inet {t} {{"]
    else:
        lines = [f"table inet {t}"]
        if keep_queue:
            chains = ["out", *(_CHAIN[d] for d in Direction), "inbound"]
            lines += [f"flush chain inet {t} {c}" for c in chains]
        else:
            lines.append(f"flush table inet {t}")
        lines += [f"delete map inet {t} {m}" for m in maps_present]
        lines.append(f"table inet {t} {{")
    for d in Direction:
        for block in spd.blocks[d]:
            if not block.plain:
                lines += _map_text(block)
    lines += ["", f"\tchain {QUEUE_CHAIN} {{"]
    if not (keep_queue and maps_present is not None):
        lines.append("\t\tdrop" if xt_queue else f"\t\tqueue num {spd.queue_num}")
    lines += ["\t}", "", "\tchain out {"]
    lines.append(f"\t\ttype filter hook postrouting priority {OUT_PRIORITY}; policy accept;")
    lines.append(f'\t\toifname != "{spd.wan}" accept')
    if spd.bypass_mark is not None:
        m = f"{spd.bypass_mark:#010x}"
        lines.append(f"\t\tmeta mark & {m} == {m} accept")
    lines.append(f"\t\tgoto {_CHAIN[Direction.OUT]}")
    lines += ["\t}", "", f"\tchain {_CHAIN[Direction.OUT]} {{"]
    lines += [_rule_text(b) for b in spd.blocks[Direction.OUT]]
    lines += ["\t}", "", "\tchain inbound {"]
    lines.append(f"\t\ttype filter hook prerouting priority {INBOUND_PRIORITY}; policy accept;")
    lines.append('\t\tiifname "lo" accept')
    lines.append(f'\t\tiifname "{spd.tun}" accept')
    if spd.ike_ports:
        ports = ", ".join(str(p) for p in spd.ike_ports)
        lines.append(f"\t\tmeta l4proto udp th dport {{ {ports} }} fib daddr type local accept")
    # A large IKE message (IKE_AUTH with a certificate, before RFC 7383 fragmentation
    # is agreed) may come IP-fragmented. Only the first fragment carries the UDP port;
    # with no conntrack here nothing reassembles before this hook, so the rest would
    # meet the peer's inbound SPD as cleartext and be dropped. Local delivery
    # reassembles after this hook, and the datagram is then judged by its first
    # fragment (checked above or by the SPD below; the kernel discards overlapping
    # fragments), so later fragments to a local address may pass.
    lines.append("\t\tip frag-off & 0x1fff != 0 fib daddr type local accept")
    lines.append("\t\tfrag frag-off != 0 fib daddr type local accept")
    lines.append(
        f"\t\tfib daddr type {{ local, broadcast, multicast }} goto {_CHAIN[Direction.IN]}"
    )
    lines.append(f"\t\tgoto {_CHAIN[Direction.FWD]}")
    lines.append("\t}")
    for d in (Direction.IN, Direction.FWD):
        lines += ["", f"\tchain {_CHAIN[d]} {{"]
        lines += [_rule_text(b) for b in spd.blocks[d]]
        lines.append("\t}")
    lines += ["}", ""]
    return "\n".join(lines)


def remove_script(table: str = DEFAULT_TABLE) -> str:
    """Remove the table (at stop); harmless if it does not exist."""
    return f"table inet {table}\ndelete table inet {table}\n"


# --- incremental updates ---------------------------------------------------------
def _same_selector(a: PolicySpec, b: PolicySpec) -> bool:
    return a.direction is b.direction and a.src == b.src and a.dst == b.dst and a.mark == b.mark


def update(
    spd: SpdTable, *, add: Iterable[PolicySpec] = (), remove: Iterable[PolicySpec] = ()
) -> tuple[SpdTable, str] | None:
    """The new table and an ``nft -f`` script of map element changes only, or None.

    None means the change needs a new rule or reorders rules: compile and ``render``
    the whole table instead (still atomic). Removal matches policies like XFRM does, by
    direction and selector (the first such policy). Added policies rank after existing
    ones of the same priority, as a policy inserted into XFRM would.

    The script carries only what the kernel's maps must change: an element deleted and
    added again in the same map with the same verdict (a Child SA's IPSEC policy
    replacing the TRAP, or an identical policy, of the same selector) nets out, so the
    script is "" and no nft needs to run.
    """
    step = update_elements(spd, add=add, remove=remove)
    return None if step is None else (step[0], step[1])


_NL_VERDICT: Final[Mapping[Verdict, tuple[int, str | None]]] = {
    Verdict.ACCEPT: (NF_ACCEPT, None),
    Verdict.DROP: (NF_DROP, None),
    Verdict.QUEUE: (NFT_GOTO, QUEUE_CHAIN),
}


def _net_changes(
    table: str,
    deleted: Iterable[tuple[str, IPNetwork]],
    added: Mapping[tuple[str, IPNetwork], Entry],
) -> list[ElemChange] | None:
    """The same element changes as set-element messages (deletions first, as in the
    script), or None if one of them is no plain start/end pair (a prefix reaching the
    top of the address space: nft writes those its own way)."""
    what = "policy projection"
    out: list[ElemChange] = []
    for name, key in deleted:
        pair = interval(key)  # a deletion names the interval, as nft's does: no verdict
        if pair is None:
            return None
        out.append(ElemChange(table, name, add=False, elems=pair, what=what))
    for (name, key), e in added.items():
        pair = interval(key, _NL_VERDICT[e.verdict])
        if pair is None:
            return None
        out.append(ElemChange(table, name, add=True, elems=pair, what=what))
    return out


def update_elements(
    spd: SpdTable, *, add: Iterable[PolicySpec] = (), remove: Iterable[PolicySpec] = ()
) -> tuple[SpdTable, str, list[ElemChange] | None] | None:
    """``update``, with the element changes also as nfnetlink set-element changes (None
    when one is not a plain interval: then only the script can carry them)."""
    blocks = {d: list(bs) for d, bs in spd.blocks.items()}
    # the net element changes, per (map, key): deleted with the old verdict, added entry
    deleted: dict[tuple[str, IPNetwork], Verdict] = {}
    added: dict[tuple[str, IPNetwork], Entry] = {}
    t = spd.table
    for policy in remove:
        found = None
        for bi, blk in enumerate(blocks[policy.direction]):
            for e in blk.entries:
                if _same_selector(e.policy, policy):
                    found = (bi, e)
                    break
            if found:
                break
        if found is None:
            if any(_same_selector(s.policy, policy) for s in spd.shadowed):
                return None
            continue  # absent: not an error, as for the Datapath interface
        bi, e = found
        blk = blocks[policy.direction][bi]
        if blk.plain or any(
            s.shape == e.shape and s.key == e.key for s in spd.shadowed
        ):  # a rule to delete, or a shadowed twin to promote
            return None
        blocks[policy.direction][bi] = replace(
            blk, entries=tuple(x for x in blk.entries if x is not e)
        )
        k = (blk.name, e.key)
        if added.pop(k, None) is None:
            deleted[k] = e.verdict
    index = spd.next_index
    for policy in add:
        e = _entry(policy, index)
        index += 1
        bs = blocks[policy.direction]
        target = _place(e, bs)
        if target is None:
            return None
        blk = bs[target]
        bs[target] = replace(blk, entries=(*blk.entries, e))
        k = (blk.name, e.key)
        if deleted.get(k) is e.verdict:
            del deleted[k]  # the kernel's element stays as it is
        else:
            added[k] = e
    new = replace(spd, blocks={d: tuple(bs) for d, bs in blocks.items()}, next_index=index)
    lines = [f"delete element inet {t} {name} {{ {_net(key)} }}" for name, key in deleted]
    lines += [
        f"add element inet {t} {name} {{ {_elements([e])} }}" for (name, _), e in added.items()
    ]
    return new, "\n".join(lines) + ("\n" if lines else ""), _net_changes(t, deleted, added)


def _place(e: Entry, blocks: Sequence[Block]) -> int | None:
    """A map block ``e`` can join without changing any packet's verdict, or None.

    Not a map emptied by removals if ``e``'s key is ``/0``: the block would then read as
    a plain rule (``Block.plain``) while the kernel holds a vmap rule and its map, so
    ``map_names`` would lose the map; the whole table is rendered instead."""
    for b in range(len(blocks) - 1, -1, -1):
        blk = blocks[b]
        if blk.shape != e.shape or blk.plain or _key_clash(e, blk):
            continue
        if not blk.entries and e.key.prefixlen == 0:
            continue
        ok = True
        for i, other in enumerate(blocks):
            if i == b:
                continue
            for o in _conflicts(e, other):
                if (o.order < e.order) != (i < b):
                    ok = False
                    break
            if not ok:
                break
        if ok:
            return b
    return None


# --- reference semantics (tests) ------------------------------------------------------
@record(frozen=True)
class Flow:
    """A packet as the policies see it (after SNAT outbound, before any NAT inbound)."""

    src: IPAddress
    dst: IPAddress
    proto: int
    sport: int | None = None
    dport: int | None = None
    icmp_type: int | None = None


def _port_ok(want: int | None, have: int | None, proto: int) -> bool:
    return want is None or (proto in PORT_PROTOS and have == want)


def _flow_matches(shape: Shape, key: IPNetwork, flow: Flow) -> bool:
    if flow.src.version != shape.family:
        return False
    src, dst = (flow.src, flow.dst)
    k, f = (dst, src) if shape.key_side is Side.DST else (src, dst)
    if k not in key or f not in shape.fixed:
        return False
    if shape.proto and shape.proto != flow.proto:
        return False
    if not (_port_ok(shape.sport, flow.sport, flow.proto)):
        return False
    if not (_port_ok(shape.dport, flow.dport, flow.proto)):
        return False
    if shape.icmp_type is not None:
        return flow.proto in ICMP_PROTOS and flow.icmp_type == shape.icmp_type
    return True


def evaluate(spd: SpdTable, direction: Direction, flow: Flow) -> Verdict:
    """What the compiled rules of ``direction`` do with ``flow`` (the policy chains only)."""
    for block in spd.blocks[direction]:
        for e in block.entries:  # keys in one block never overlap: at most one matches
            if _flow_matches(block.shape, e.key, flow):
                return e.verdict
    return Verdict.ACCEPT


def best_policy(
    policies: Sequence[PolicySpec], direction: Direction, flow: Flow
) -> PolicySpec | None:
    """Brute force XFRM lookup: lowest priority among matches, earliest on ties."""
    best: tuple[int, int] | None = None
    winner = None
    for i, p in enumerate(policies):
        if p.direction is not direction:
            continue
        e = _entry(p, i)
        if _flow_matches(e.shape, e.key, flow) and (best is None or e.order < best):
            best, winner = e.order, p
    return winner


# --- the edge: nft and the xt NFQUEUE fallback --------------------------------------
def apply_script(script: str, *, netns: str | None = None, nft: str = "nft") -> None:
    """Run ``nft -f -`` with ``script`` (atomic); NftSpdError with nft's words on refusal."""
    if not script.strip():
        return
    argv = [nft, "-f", "-"]
    if netns is not None:
        argv = ["ip", "netns", "exec", netns, *argv]
    try:
        done = subprocess.run(argv, input=script, capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        raise NftSpdError(f"{nft} not found: the userspace datapath needs nftables") from None
    except subprocess.TimeoutExpired:
        raise NftSpdError("nft did not finish within 30 s") from None
    if done.returncode != 0:
        detail = " | ".join(line for line in done.stderr.splitlines() if line.strip())
        raise NftSpdError(f"nft refused the SPD table: {detail or done.returncode}")


def queue_backend(*, netns: str | None = None, nft: str = "nft") -> str:
    """ "nft" when the kernel has nft's queue expression, else "xt" (checked, not committed)."""
    probe = "table inet oe_spd_probe {\n\tchain q {\n\t\tqueue num 0\n\t}\n}\n"
    argv = [nft, "-c", "-f", "-"]
    if netns is not None:
        argv = ["ip", "netns", "exec", netns, *argv]
    done = subprocess.run(argv, input=probe, capture_output=True, text=True, timeout=30)
    return "nft" if done.returncode == 0 else "xt"


#: struct xt_NFQ_info_v3 (include/uapi/linux/netfilter/xt_NFQUEUE.h): queuenum,
#: queues_total, flags, all host-endian __u16.
XT_NFQ_INFO_V3: Final = struct.Struct("=HHH")
NFQ_FLAG_BYPASS: Final = 0x01
NFPROTO_INET: Final = 1
NFPROTO_IPV4: Final = 2


def insert_xt_queue(
    queue_num: int,
    *,
    table: str = DEFAULT_TABLE,
    chain: str = QUEUE_CHAIN,
    family: int = NFPROTO_INET,
    bypass: bool = False,
    netns: str | None = None,
) -> None:
    """Insert ``xt target NFQUEUE --queue-num N`` at the head of ``chain`` (nft_compat).

    For kernels without CONFIG_NFT_QUEUE: nft cannot parse xt statements, so the rule is
    built here as an nf_tables netlink batch (the way iptables-nft writes it).
    """
    from pyroute2.netlink import NLM_F_ACK, NLM_F_CREATE, NLM_F_REQUEST
    from pyroute2.netlink.exceptions import NetlinkError
    from pyroute2.netlink.nfnetlink import NFNL_SUBSYS_NFTABLES, nfgen_msg
    from pyroute2.netlink.nfnetlink.nftsocket import NFT_MSG_NEWRULE, NFTSocket, nft_rule_msg

    info = XT_NFQ_INFO_V3.pack(queue_num, 1, NFQ_FLAG_BYPASS if bypass else 0)
    target = [
        ["NFTA_TARGET_NAME", "NFQUEUE"],
        ["NFTA_TARGET_REV", 3],
        ["NFTA_TARGET_INFO", info],
    ]
    expr: dict[str, Any] = {
        "attrs": [["NFTA_EXPR_NAME", "target"], ["NFTA_EXPR_DATA", {"attrs": target}]]
    }
    rule = nft_rule_msg()
    rule["nfgen_family"] = family
    rule["attrs"] = [
        ["NFTA_RULE_TABLE", table],
        ["NFTA_RULE_CHAIN", chain],
        ["NFTA_RULE_EXPRESSIONS", [expr]],
    ]
    rule["header"]["type"] = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWRULE
    rule["header"]["flags"] = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE  # no APPEND: head
    batch = []
    for kind in (0x10, 0x11):  # NFNL_MSG_BATCH_BEGIN / _END
        m = nfgen_msg()
        m["res_id"] = NFNL_SUBSYS_NFTABLES
        m["header"]["type"] = kind
        m["header"]["flags"] = NLM_F_REQUEST
        batch.append(m)
    with in_netns(netns):
        sock = NFTSocket(nfgen_family=family)
    try:
        list(sock.nlm_request_batch([batch[0], rule, batch[1]]))
    except NetlinkError as exc:
        raise NftSpdError(
            f"xt NFQUEUE {queue_num} rule for inet {table} {chain} refused by the kernel: "
            f"{exc.args[1] if len(exc.args) > 1 else exc}"
        ) from None
    finally:
        sock.close()


def present_maps(
    table: str = DEFAULT_TABLE, *, netns: str | None = None, nft: str = "nft"
) -> list[str] | None:
    """The maps ``inet <table>`` holds now ([] if the table is absent), or None when
    they cannot be read (then the table is replaced whole)."""
    argv = [nft, "-j", "list", "table", "inet", table]
    if netns is not None:
        argv = ["ip", "netns", "exec", netns, *argv]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return [] if "No such file or directory" in done.stderr else None
    try:
        items = json.loads(done.stdout).get("nftables", [])
    except ValueError:
        return None
    return [i["map"]["name"] for i in items if isinstance(i, dict) and "map" in i]


def install(
    spd: SpdTable,
    *,
    netns: str | None = None,
    backend: str | None = None,
    nft: str = "nft",
    previous: SpdTable | None = None,
) -> str:
    """Replace the kernel's table with ``spd`` (atomic), queueing by ``backend``.

    ``backend``: "nft" or "xt" (None: ask the kernel, ``queue_backend``). Returns the
    backend used, so callers probe once and pass it on later calls. The table's base
    chains stay registered when it can be emptied in place (``render``'s
    ``maps_present``), so packets held in the queue survive the replacement.

    ``previous``: the table this process wrote last (None: unknown). Given, its maps are
    known without asking the kernel and the queue chain (with its xt rule) is kept.
    """
    backend = backend or queue_backend(netns=netns, nft=nft)
    xt = backend == "xt"
    ours = previous is not None and previous.table == spd.table
    maps = map_names(previous) if ours and previous is not None else None
    if maps is None:
        maps = present_maps(spd.table, netns=netns, nft=nft)
    try:
        script = render(spd, xt_queue=xt, maps_present=maps, keep_queue=ours)
        apply_script(script, netns=netns, nft=nft)
    except NftSpdError:
        if maps is None:
            raise
        # a table of another shape (an older version's chains): replace it whole
        ours = False
        apply_script(render(spd, xt_queue=xt), netns=netns, nft=nft)
    if xt and not ours:
        insert_xt_queue(spd.queue_num, table=spd.table, netns=netns)
    return backend


class SpdProjection:
    """The policy set as ``table inet oe_spd`` holds it, kept in step by one process.

    Why an object: the table this process wrote last (so a change is a few map elements,
    not a new table), the queue backend probed once, and whether writing has begun at
    all: nothing is written before the first complete policy set (``go_live``), since a
    half-built table could let a "private" packet out while an earlier run's complete
    one still holds it.

    Ordering (why batching is safe): every change is applied to ``_table`` (what the
    kernel will hold) at once, in the order ``project`` is called, and goes to the
    kernel in that same order: element scripts collect in one open batch, a batch and a
    whole-table write each run under one lock, FIFO, one nft at a time, and a write
    waits for the batch opened before it. A batch opens on the first change of an
    event-loop turn and closes when its nft run starts, so changes of the same turn, and
    those arriving while the previous run is in flight, share one nft process; there is
    no timer. Each ``project`` returns only once its own changes are in the kernel (or
    raises), exactly as with a run of its own, so the datapath still installs an SA's
    policies before it reports the SA installed, and what the kernel enforces meanwhile
    is what it enforced before the change (an IPSEC verdict is queueing, as the TRAP
    before it). A failed run marks the kernel's table unknown: the batches behind it
    (computed on top of it) become a whole-table write of the current policies.
    """

    def __init__(
        self,
        *,
        wan: str,
        tun: str,
        queue_num: int,
        bypass_mark: int,
        ike_ports: tuple[int, ...],
        netns: str | None = None,
    ) -> None:
        self._wan = wan
        self._tun = tun
        self._queue_num = queue_num
        self._bypass_mark = bypass_mark
        self._ike_ports = ike_ports
        self._netns = netns
        self._table: SpdTable | None = None  # what the kernel holds (None: not written yet)
        self._backend: str | None = None
        self.live = False  # False until the first complete policy set (go_live)
        self._lock = asyncio.Lock()  # one nft run at a time, in the order of the changes
        self._batch: list[tuple[str, list[ElemChange] | None]] = []  # not yet written
        self._elems: SetElemWriter | None = SetElemWriter(netns=netns)  # None: nft -f only
        self._batch_done: asyncio.Future[None] | None = None  # the open batch's outcome
        self._writes_pending = 0  # whole-table writes asked for and not yet through
        self._stale = False  # an nft run failed: the kernel's table is not ``_table``
        self._policies: Callable[[], list[PolicySpec]] = list
        self._tasks: set[asyncio.Task[Any]] = set()
        #: writes so far (element batches, whole-table writes), for tests and benches; of
        #: the element batches, ``nft`` went to an nft process (not netlink)
        self.runs = {"elements": 0, "whole": 0, "nft": 0}

    async def probe(self) -> None:
        """Ask the kernel once how it queues (nft's queue expression or xt's target)."""
        self._backend = await asyncio.to_thread(queue_backend, netns=self._netns)

    def _write(self, policies: list[PolicySpec]) -> SpdTable:
        """Compile and install the whole table (in a worker thread); the table written."""
        table = compile_spd(
            policies,
            wan=self._wan,
            tun=self._tun,
            queue_num=self._queue_num,
            bypass_mark=self._bypass_mark,
            ike_ports=self._ike_ports,
        )
        self._backend = install(
            table, netns=self._netns, backend=self._backend, previous=self._table
        )
        return table

    def _run_elements(self, script: str, changes: list[ElemChange] | None = None) -> None:
        """Apply element changes (in a worker thread): over nfnetlink when they are all
        plain intervals and the kernel takes them, else with ``nft -f``."""
        if changes is not None and self._elems is not None:
            try:
                self._elems.apply(changes)
                return
            except (NftSetError, OSError) as exc:
                if not unsupported(exc):
                    if isinstance(exc, NftSetError):
                        raise
                    raise NftSpdError(f"set elements over netlink: {exc}") from None
                _log.info("policy projection: map elements written with nft from now on: %s", exc)
                self._elems.close()
                self._elems = None
        self.runs["nft"] += 1
        run_nft(script, netns=self._netns, what="policy projection")

    async def go_live(self, policies: list[PolicySpec]) -> None:
        """The first complete policy set: write it (replacing an earlier run's table
        atomically), and follow every change from now on."""
        self.live = True
        await self._whole(lambda: policies)

    async def project(
        self,
        policies: Callable[[], list[PolicySpec]],
        add: Sequence[PolicySpec] = (),
        remove: Sequence[PolicySpec] = (),
    ) -> None:
        """Bring the kernel's table to ``policies()``: element changes when they suffice
        (none at all when the elements stay as they are), else the whole table (atomic
        either way); returns once the kernel holds the change."""
        if not self.live:
            return
        self._policies = policies
        if self._table is not None and not self._writes_pending and not self._stale:
            step = update_elements(self._table, add=add, remove=remove)
            if step is not None:
                self._table, script, changes = step
                if script:
                    await self._elements(script, changes)
                return
        await self._whole(policies)

    async def _elements(self, script: str, changes: list[ElemChange] | None) -> None:
        """Into the open batch (opening one if none is); wait for its write."""
        if self._batch_done is None:
            self._batch_done = asyncio.get_running_loop().create_future()
            spawn_tracked(self._tasks, self._flush(), _log, "policy projection batch")
        done = self._batch_done
        self._batch.append((script, changes))
        await asyncio.shield(done)  # a caller cancelled leaves the others' run alone

    async def _flush(self) -> None:
        async with self._lock:
            script = "".join(sc for sc, _ in self._batch)
            parts = [ch for _, ch in self._batch]
            changes = (
                None if any(ch is None for ch in parts) else [c for ch in parts for c in ch or ()]
            )
            done = self._batch_done
            self._batch, self._batch_done = [], None
            assert done is not None
            try:
                if self._stale:  # computed on a table the kernel never got
                    self._table = await self._write_now(self._policies())
                else:
                    self.runs["elements"] += 1
                    await asyncio.to_thread(self._run_elements, script, changes)
            except Exception as exc:  # NftSpdError, or nft not startable at all
                self._table, self._stale = None, True
                if isinstance(exc, DatapathError):
                    exc = DatapathError(f"policy projection into nftables: {exc}")
                done.set_exception(exc)
                done.exception()  # retrieved: every waiter may have gone
            else:
                done.set_result(None)
            finally:
                if not done.done():  # cancelled (stop): no waiter hangs on it
                    done.cancel()

    async def _write_now(self, policies: list[PolicySpec]) -> SpdTable:
        """A whole-table write (the lock held); clears the unknown state on success."""
        self.runs["whole"] += 1
        table = await asyncio.to_thread(self._write, policies)
        self._stale = False
        return table

    async def _whole(self, policies: Callable[[], list[PolicySpec]]) -> None:
        """The whole table, after the batch opened before it (policies read at run time)."""
        self._writes_pending += 1
        try:
            before = self._batch_done
            if before is not None:
                with contextlib.suppress(DatapathError):
                    await asyncio.shield(before)
            async with self._lock:
                try:
                    table = await self._write_now(policies())
                except DatapathError as exc:
                    self._table, self._stale = None, True
                    raise DatapathError(f"policy projection into nftables: {exc}") from None
                except Exception:
                    self._table, self._stale = None, True
                    raise
                self._table = table
        finally:
            self._writes_pending -= 1

    async def leave(self, keep: list[PolicySpec]) -> None:
        """At stop: only ``keep`` stays (queueing to nobody, which the kernel turns into
        drops: fail closed), or the table goes."""
        async with self._lock:
            if keep:
                self._table = await asyncio.to_thread(self._write, keep)
            else:
                await asyncio.to_thread(run_nft, remove_script(), netns=self._netns)
            if self._elems is not None:
                self._elems.close()
