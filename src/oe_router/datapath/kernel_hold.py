"""First packets of the kernel datapath: held over NFQUEUE before source NAT, released into
their SA.

Why: a forwarded LAN packet is source-NATed at postrouting to the WAN address; nf_nat's
out hook then repeats the XFRM lookup with that source (nf_xfrm_me_harder), meets the
trap policy (its selector's source is the WAN address, ``oe/policy.py``) with no SA, and
the kernel drops it whatever xfrm_larval_drop says: that lookup never queues. So the
first SYN of every packet-triggered flow was lost (a 1 s retransmission).

Here a chain at the prerouting hook, before conntrack, queues the packets arriving from
anywhere but the WAN and routed out of it whose destination is in a trap (``trap4``: the
TRAP policies' destinations, a superset) and not in ``known4`` (the destinations already
decided: SA up, pass or drop shunt, clear); IPv6 likewise (``trap6``, ``known6``), for
the LAN prefixes whose flows the LAN gateway NATs into tunnels. Before conntrack,
because a held packet carries the conntrack entry it was given on arrival: the second
echo request of a ping held beside the first got its own unconfirmed entry with the same
tuple, which clashes with the first's when both are released and is dropped (ICMP and
TCP allow no clash; measured on the host, tests/host/test_kernel_hold.py). Released one
by one before conntrack, each later packet finds its flow's entry the first one
confirmed.

``FirstPackets`` holds them and raises the ACQUIRE the kernel would have raised after
NAT; once the SA (or a shunt) is in, the destination becomes known and the held packets
are accepted in order: they go on through conntrack, the firewall's forward chains (which
judge them as any other packet) and srcnat, and the lookup after NAT finds the SA, so the
first SYN leaves as ESP. A destination known to be clear adds no userspace hop to later
flows.

Fail closed: the queue has no bypass, so with the daemon dead (even after kill -9) the
kernel drops what would have been queued; and whatever we accept still meets XFRM after
NAT, so a wrong answer here can only cost a packet, never leak a "private" one.

IPv6: LAN devices keep their addresses, so XFRM looks a LAN packet up twice: at routing
time with its own source, where a LAN-sourced trap twin (``oe/policy.py``) catches it and
the kernel drops it while it raises the ACQUIRE; and, if a LAN-sourced pass let it on
(the peer has a tunnel, or the destination is "private") and the LAN gateway NATs it to
the WAN address, once more after NAT. ``KernelDecider`` looks it up the same two ways.

The nft text is pure (``render_table``, ``trap_script``, ``known_script``, and
``known_changes`` for the same known-set changes as nfnetlink set elements); the edge is
``HeldXfrmDatapath`` (an ``XfrmDatapath`` that keeps a mirror of what it installs). It
writes the known sets over nfnetlink (``nft_setelem``: one batch, no process), and falls
back to ``nft -f`` for good, once, when the kernel cannot take that path.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import field
from typing import Any, Final

from oe_router.records import record
from oe_router.tasks import spawn_tracked

from .base import (
    ChildSaSpec,
    DatapathError,
    DatapathEvent,
    Direction,
    Expire,
    PolicyAction,
    PolicyExpire,
    PolicySpec,
    child_policies,
)
from .firstpackets import FirstPackets, HoldLimits, Outcome, Ruling
from .kernel import XfrmDatapath
from .nft import run_nft
from .nft_setelem import ElemChange, NftSetError, SetElem, SetElemWriter, unsupported
from .nft_spd import NftSpdError, insert_xt_queue, queue_backend
from .packet import Flow
from .spd import Spd

__all__ = [
    "HeldXfrmDatapath",
    "HoldSettings",
    "KernelDecider",
    "known_changes",
    "known_script",
    "render_table",
    "trap_networks",
    "trap_script",
]

log = logging.getLogger("oe_router.datapath")

QUEUE_CHAIN: Final = "first"
_END: Final = object()  # the kernel's event stream ended


@record(frozen=True)
class HoldSettings:
    """The hold's nft table, queue and bounds (``config oe``: ``packet_hold``)."""

    table: str = "oe_hold"
    queue_num: int = 4501
    limits: HoldLimits = field(default_factory=lambda: HoldLimits(4.0, 64, 1024))
    known_seconds: int = 600  # a clear or no-lifetime answer is asked again after this
    known_size: int = 65536


# --- the pure part: nft text from data ------------------------------------------------
Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def trap_networks(policies: Iterable[PolicySpec], version: int = 4) -> list[Network]:
    """The destinations of one IP version any outbound TRAP covers, merged (an nft
    interval set refuses overlapping elements)."""
    nets = [
        p.dst.net
        for p in policies
        if p.direction is Direction.OUT
        and p.action is PolicyAction.TRAP
        and p.dst.net.version == version
    ]
    return list(ipaddress.collapse_addresses(nets))  # type: ignore[type-var]


def _elements(items: Iterable[object]) -> str:
    return ", ".join(str(i) for i in items)


def _of(version: int, items: Iterable[Any]) -> list[Any]:
    return [i for i in items if i.version == version]


def render_table(
    s: HoldSettings,
    wan_devices: Sequence[str],
    traps: Sequence[Network],
    sources: Sequence[Network] = (),
    *,
    ipv4: bool = True,
) -> str:
    """The whole ``inet <table>`` (replacing an old one) as one atomic ``nft -f`` script.

    The queue chain holds only ``drop``: ``queue`` goes ahead of it (``queue_rule``, or
    the xt NFQUEUE target where the kernel lacks nft's queue), so a packet meets a drop,
    never an accept, if the queue rule is missing. ``sources``: the LAN prefixes the LAN
    gateway NATs to the WAN address (``oe/lan.py``). IPv4: only their packets meet the
    traps after NAT, so only theirs are held (none given: any source; ``ipv4=False``: no
    IPv4 rule, there is no WAN IPv4 address). IPv6: held only from the IPv6 prefixes given
    (the ones with LAN-sourced trap twins); none given, no IPv6 rule.
    """
    t = s.table
    devs = _elements([f'"{d}"' for d in wan_devices])
    rules = []
    for v, ip in ((4, "ip"), (6, "ip6")):
        nets = _of(v, sources)
        if (v == 4 and not ipv4) or (v == 6 and not nets):
            continue
        src = f"{ip} saddr {{ {_elements(nets)} }} " if nets else ""
        # prerouting at priority raw: after defragmentation (-400), before conntrack (-200)
        rules.append(
            f"\t\tmeta nfproto ipv{v} iifname != {{ {devs} }} {src}{ip} daddr @trap{v} "
            f"{ip} daddr != @known{v} fib daddr oifname {{ {devs} }} counter jump {QUEUE_CHAIN}\n"
        )
    sets = ""
    for v in (4, 6):
        nets = _of(v, traps)
        elems = f"\t\telements = {{ {_elements(nets)} }}\n" if nets else ""
        sets += f"\tset trap{v} {{\n\t\ttype ipv{v}_addr\n\t\tflags interval\n{elems}\t}}\n"
        sets += (
            f"\tset known{v} {{\n\t\ttype ipv{v}_addr\n\t\tflags timeout\n"
            f"\t\tsize {s.known_size}\n\t}}\n"
        )
    return (
        f"table inet {t}\ndelete table inet {t}\n"
        f"table inet {t} {{\n{sets}"
        f"\tchain hold {{\n"
        f"\t\ttype filter hook prerouting priority raw; policy accept;\n"
        f"{''.join(rules)}"
        f"\t}}\n"
        f"\tchain {QUEUE_CHAIN} {{\n\t\tcounter drop\n\t}}\n"
        f"}}\n"
    )


def queue_rule(s: HoldSettings) -> str:
    """nft's own queue rule, at the head of the queue chain (no bypass: fail closed)."""
    return f"insert rule inet {s.table} {QUEUE_CHAIN} queue num {s.queue_num}\n"


def trap_script(s: HoldSettings, traps: Sequence[Network]) -> str:
    """Replace ``trap4`` and ``trap6`` (one atomic step: no moment without them); forget
    the known sets, whose answers were given under the old traps."""
    t = s.table
    out = "".join(f"flush set inet {t} {name}\n" for name in ("trap4", "trap6", "known4", "known6"))
    for v in (4, 6):
        nets = _of(v, traps)
        if nets:
            out += f"add element inet {t} trap{v} {{ {_elements(nets)} }}\n"
    return out


def known_script(
    s: HoldSettings,
    add: Iterable[tuple[Address, int]] = (),
    remove: Iterable[Address] = (),
    flush: bool = False,
) -> str:
    """Changes to ``known4``/``known6``: (address, timeout seconds) in, addresses out
    (each delete its own script line: nft fails the whole script on an absent element, so
    the caller runs removals one by one)."""
    t = s.table
    out = f"flush set inet {t} known4\nflush set inet {t} known6\n" if flush else ""
    adds = list(add)
    for v in (4, 6):
        elems = [f"{a} timeout {max(1, secs)}s" for a, secs in adds if a.version == v]
        if elems:
            out += f"add element inet {t} known{v} {{ {_elements(elems)} }}\n"
    return out + "".join(f"delete element inet {t} known{a.version} {{ {a} }}\n" for a in remove)


@record(frozen=True)
class KnownOp:
    """One change to the known sets, as the writer queues it: additions (address, timeout
    seconds), one removal (``quiet``: it may be gone already), or a flush (both sets)."""

    add: tuple[tuple[Address, int], ...] = ()
    remove: Address | None = None
    flush: bool = False

    @property
    def quiet(self) -> bool:
        return self.remove is not None


def known_changes(s: HoldSettings, op: KnownOp) -> list[ElemChange]:
    """``op`` as nfnetlink set-element changes (the same as ``known_script``'s text)."""
    out: list[ElemChange] = []
    what = "packet hold"
    if op.flush:
        out += [ElemChange(s.table, f"known{v}", add=False, what=what) for v in (4, 6)]
    for v in (4, 6):
        elems = tuple(SetElem(a, timeout=max(1, secs)) for a, secs in op.add if a.version == v)
        if elems:
            out.append(ElemChange(s.table, f"known{v}", add=True, elems=elems, what=what))
    if op.remove is not None:
        r = op.remove
        out.append(
            ElemChange(s.table, f"known{r.version}", add=False, elems=(SetElem(r),), what=what)
        )
    return out


# --- the rule: a mirror of the kernel's policies, looked up as XFRM will ---------------
class KernelDecider:
    """What XFRM will do with a held packet (a mirror of the policies we installed: an
    ``Spd``). IPv4: looked up once, with the source replaced by the WAN address (every
    LAN IPv4 flow is NATed). IPv6: looked up with the LAN source (the routing-time
    lookup); where a pass lets it on, once more with the WAN address as source (the
    lookup after the NAT the LAN gateway applies to peers with a tunnel and to
    "private" destinations; for any other destination a LAN pass has a WAN twin that
    says the same)."""

    def __init__(
        self, wan4: ipaddress.IPv4Address | None, wan6: ipaddress.IPv6Address | None = None
    ) -> None:
        self.spd = Spd()
        self.live = False  # True once this run's policy set is complete (release_adopted)
        self._wan = {4: wan4, 6: wan6}

    @property
    def has_wan4(self) -> bool:
        return self._wan[4] is not None

    def natted(self, f: Flow) -> Flow:
        wan = self._wan.get(f.version)
        return f if wan is None else f._replace(src=int(wan))

    def install(self, policy: PolicySpec) -> None:
        try:
            self.spd.install(policy)
        except DatapathError as exc:  # more than one template: not ours to hold for
            log.debug("hold mirror: %s", exc)

    def remove(self, policy: PolicySpec) -> None:
        self.spd.remove(policy)

    def rule(self, f: Flow) -> Ruling:
        if f.version == 6:
            pol = self.spd.lookup(Direction.OUT, f)
            if pol is None or pol.action is not PolicyAction.PASS:
                return _ruling(pol, f)
            nf = self.natted(f)
            after = self.spd.lookup(Direction.OUT, nf)
            return _ruling(pol, f) if after is None else _ruling(after, nf)
        nf = self.natted(f)
        return _ruling(self.spd.lookup(Direction.OUT, nf), nf)


def _ruling(pol: PolicySpec | None, f: Flow) -> Ruling:
    """What XFRM does with flow ``f`` (as looked up) that policy ``pol`` covers."""
    action = None if pol is None else pol.action
    if action is None or action is PolicyAction.PASS:
        return Ruling(Outcome.CLEAR, policy=pol)
    if action is PolicyAction.DROP:
        return Ruling(Outcome.DROP, policy=pol)
    if action is PolicyAction.IPSEC:
        return Ruling(Outcome.SA_UP, policy=pol)  # its SA went in before its policy
    if action is PolicyAction.TRAP:
        return Ruling(Outcome.HOLD, trap=pol, flow=f)
    return Ruling(Outcome.HOLD)


def _host(p: PolicySpec) -> Address | None:
    net = p.dst.net
    if net.prefixlen == net.max_prefixlen:
        return net.network_address
    return None


# --- the edge ------------------------------------------------------------------------
class HeldXfrmDatapath(XfrmDatapath):
    """``XfrmDatapath`` whose LAN flows' first packets wait for their SA (module doc).

    If the hold cannot be set up (no nftables, no NFQUEUE in the kernel), the datapath
    runs without it, as before, and says so once in the log and in ``stats``."""

    def __init__(
        self,
        *,
        wan_devices: Sequence[str],
        wan4: ipaddress.IPv4Address | None,
        lan4: Sequence[ipaddress.IPv4Network] = (),
        wan6: ipaddress.IPv6Address | None = None,
        lan6: Sequence[ipaddress.IPv6Network] = (),
        hold: HoldSettings | None = None,
        clock: Callable[[], float] = time.monotonic,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self._hold = hold or HoldSettings()
        self._wan_devices = tuple(wan_devices)
        self._decider = KernelDecider(wan4, wan6)
        # IPv6 is held only where there is a WAN IPv6 address and LAN prefixes to NAT
        self._sources: tuple[Network, ...] = (*lan4, *(lan6 if wan6 is not None else ()))
        self._events_q: asyncio.Queue[Any] = asyncio.Queue()
        self._first = FirstPackets(
            queue_num=self._hold.queue_num,
            limits=self._hold.limits,
            decider=self._decider,
            emit=self._events_q.put_nowait,
            netns=self._netns,
            clock=clock,
            on_rule=self._ruled,
        )
        self._holding = False  # the queue is bound (and the table is or will be in)
        self._table = False  # the table is in (made with the first trap set)
        self._traps: list[Network] = []
        self._known: dict[Address, float] = {}  # -> until (clock)
        self._clock = clock
        self._tasks: set[asyncio.Task[Any]] = set()
        self._nft_errors = 0
        self._ops: list[KnownOp] = []  # known-set changes waiting for the writer
        self._elems: SetElemWriter | None = SetElemWriter(netns=self._netns)  # None: nft -f
        self._writing = False
        self._in_child = 0  # inside install_child_sa: its policies are not mirrored yet

    # -- lifecycle --
    async def start(self) -> None:
        await super().start()
        families = self._families()
        if not self._wan_devices or not families:
            log.warning("packet hold off: no WAN device, or no WAN address to hold for")
            return
        try:
            await self._first.open()
        except (DatapathError, OSError) as exc:
            await self._off(exc)
            return
        # the table follows with the first trap set (``_make_table``: one nft run, not two);
        # until then nothing is queued but by a killed predecessor's table, and that
        # queue is ours now: its packets wait for this run's policies
        self._holding = True
        spawn_tracked(self._tasks, self._first.expire(), log, "kernel held packets")

    async def _off(self, exc: Exception) -> None:
        """The hold cannot run: said once; what it held is dropped (the clients resend),
        the queue unbound, the table (a predecessor's too) deleted."""
        log.warning(
            "packet hold off (first packets of LAN flows are lost while their SA is "
            "negotiated): %s",
            exc,
        )
        self._first.drop_all()
        self._first.close()
        self._holding = False
        await asyncio.to_thread(self._teardown)

    def _families(self) -> list[str]:
        """What the hold covers: IPv4 with a WAN IPv4 address; IPv6 with a WAN IPv6
        address and LAN IPv6 prefixes (the ones the LAN gateway NATs into tunnels)."""
        out = ["IPv4"] if self._decider.has_wan4 else []
        if any(n.version == 6 for n in self._sources):
            out.append("IPv6")
        return out

    def _setup(self) -> None:
        """The table with its trap sets and its queue rule in one ``nft`` run where the
        kernel has nft's queue expression (one process, not four with the probe and the
        trap sets: each ~0.1-0.2 s of a TCG router's start); else, or on any refusal,
        step by step, so the error names the step."""
        s = self._hold
        table = render_table(
            s, self._wan_devices, self._traps, self._sources, ipv4=self._decider.has_wan4
        )
        with contextlib.suppress(DatapathError):
            run_nft(table + queue_rule(s), netns=self._netns, what="packet hold table")
            return
        backend = queue_backend(netns=self._netns)
        run_nft(table, netns=self._netns, what="packet hold table")
        if backend == "nft":
            run_nft(queue_rule(s), netns=self._netns, what="packet hold queue rule")
        else:
            try:
                insert_xt_queue(s.queue_num, table=s.table, chain=QUEUE_CHAIN, netns=self._netns)
            except NftSpdError as exc:
                raise DatapathError(str(exc)) from None

    async def _make_table(self) -> None:
        """The table, with this run's trap sets (before the mirror is live, so no decision
        writes a known set that is not there yet)."""
        self._traps = self._trap_sets()
        try:
            await asyncio.to_thread(self._setup)
        except (DatapathError, OSError) as exc:
            await self._off(exc)
            return
        self._table = True
        log.info(
            "packet hold on (%s): new LAN flows to trapped destinations wait in NFQUEUE %d",
            ", ".join(self._families()),
            self._hold.queue_num,
        )

    def _trap_sets(self) -> list[Network]:
        """``trap4``'s and ``trap6``'s elements as the mirror's traps make them now."""
        pols = self._decider.spd.policies(Direction.OUT)
        return [*trap_networks(pols, 4), *trap_networks(pols, 6)]

    def _teardown(self) -> None:
        t = self._hold.table
        with contextlib.suppress(DatapathError):
            run_nft(f"table inet {t}\ndelete table inet {t}\n", netns=self._netns)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        self._first.drop_all()
        self._first.close()
        if self._holding:
            await asyncio.to_thread(self._teardown)
            self._holding = self._table = False
        if self._elems is not None:
            self._elems.close()
        await super().close()

    def stats(self) -> dict[str, int]:
        """The XFRM policies, and (with the hold on) what became of held first packets:
        the same counters as the userspace datapath's, ``known_now`` destinations."""
        out = super().stats()
        if self._holding:
            out.update(self._first.stats)
            out["held_now"] = self._first.held_now
            out["known_now"] = len(self._known)
            out["hold_nft_errors"] = self._nft_errors
            out.update(self._first.queue_stats())
        return out

    # -- the mirror --
    async def install_policies(self, policies: Sequence[PolicySpec]) -> None:
        """Mirrored as they went in: all of them, or on a refusal those the kernel holds
        (``install_policy`` comes here too)."""
        try:
            await super().install_policies(policies)
        except DatapathError:
            await self._mirror([p for p in policies if self._policies.get(self._key(p)) == p])
            raise
        await self._mirror(policies)

    async def _mirror(self, policies: Sequence[PolicySpec]) -> None:
        if self._in_child or not policies:
            return  # a Child SA's policies: mirrored once all of them are in
        for policy in policies:
            self._decider.install(policy)
        await self._changed(policies)

    async def remove_policy(self, policy: PolicySpec) -> None:
        await super().remove_policy(policy)
        self._decider.remove(policy)
        await self._changed([policy])

    async def install_child_sa(self, spec: ChildSaSpec) -> ChildSaSpec:
        """The held packets go once the whole Child SA is in, its inbound and forward
        policies too: released on its outbound policy alone, the first SYN left as ESP
        but the SYN-ACK, back 2 ms later, met no inbound policy and was dropped (QEMU
        lab, TCG: the client resent its SYN after 1 s)."""
        self._in_child += 1
        try:
            spec = await super().install_child_sa(spec)
        finally:
            self._in_child -= 1
        if spec.install_policies:
            pols = child_policies(spec)
            for p in pols:
                self._decider.install(p)
            await self._changed(pols)
        return spec

    async def remove_child_sa(self, spec: ChildSaSpec, *, remove_policies: bool = True) -> None:
        await super().remove_child_sa(spec, remove_policies=remove_policies)
        if remove_policies and spec.install_policies:
            pols = child_policies(spec)
            for p in pols:
                self._decider.remove(p)
            await self._changed(pols)
        else:  # its policies stay (a rekey): its peer is asked again
            self._forget([ipaddress.ip_address(spec.remote)])

    async def release_adopted(self, keep: Callable[[PolicySpec], bool]) -> int:
        n = await super().release_adopted(keep)
        if self._holding and not self._table:
            await self._make_table()
        self._decider.live = True
        await self._retrap()
        self._first.release()
        return n

    async def _changed(self, policies: Sequence[PolicySpec]) -> None:
        """Outbound policies changed: their destinations are asked again, the trap set
        follows the traps (in the kernel before this returns), and held packets are
        decided again."""
        out = [p for p in policies if p.direction is Direction.OUT]
        if not out:
            return
        if any(p.action is PolicyAction.TRAP for p in out):
            await self._retrap()
        hosts = [_host(p) for p in out]
        if any(h is None for h in hosts):
            self._forget_all()
        else:
            self._forget([h for h in hosts if h is not None])
        self._first.release()

    async def _retrap(self) -> None:
        if not self._holding or not self._decider.live:
            return
        traps = self._trap_sets()
        if traps == self._traps or not self._table:
            return
        self._traps = traps
        self._known.clear()
        try:
            await asyncio.to_thread(
                run_nft, trap_script(self._hold, traps), netns=self._netns, what="packet hold"
            )
        except DatapathError as exc:
            self._nft_errors += 1
            log.warning("%s", exc)

    def _forget(self, addrs: Iterable[Address]) -> None:
        for a in addrs:
            if self._known.pop(a, None) is not None:
                self._known_op(KnownOp(remove=a))

    def _forget_all(self) -> None:
        if self._known:
            self._known.clear()
            self._known_op(KnownOp(flush=True))

    def _ruled(self, f: Flow, r: Ruling) -> None:
        """A held or queued packet was decided: its destination needs no queue for a while
        (the answer's lifetime, or ``known_seconds``)."""
        if not self._holding:
            return
        p = r.policy
        if p is not None and (p.dst.proto or p.src.proto):
            return  # a protocol's or port's answer (a resolver's udp/53): not the address's
        dst = f.dst_address
        now = self._clock()
        if self._known.get(dst, 0.0) > now:
            return
        lft = r.policy.lifetime.hard_seconds if r.policy is not None else 0
        secs = min(lft, self._hold.known_seconds) if lft else self._hold.known_seconds
        self._known[dst] = now + secs
        if len(self._known) > self._hold.known_size:
            self._known = {a: u for a, u in self._known.items() if u > now}
        self._known_op(KnownOp(add=((dst, secs),)))

    def _known_op(self, op: KnownOp) -> None:
        """Queue ``op`` for the known-set writer, off the event loop (a known-set change
        is not on the packet's path: a packet that comes meanwhile is queued and decided
        the same way). One writer, in order: a removal never overtakes the addition it
        undoes. A quiet op's failure is expected (deleting an element already gone)."""
        self._ops.append(op)
        if not self._writing:
            self._writing = True
            spawn_tracked(self._tasks, self._write(), log, "packet hold known set")

    async def _write(self) -> None:
        """Apply the queued changes in order; consecutive additions go in one batch (a
        flood of decided destinations costs a few writes, not one each)."""
        try:
            while self._ops:
                op = self._ops.pop(0)
                adds = list(op.add)
                while not op.quiet and self._ops and self._ops[0].add and not self._ops[0].quiet:
                    adds += self._ops.pop(0).add
                op = KnownOp(add=tuple(adds), remove=op.remove, flush=op.flush)
                try:
                    await asyncio.to_thread(self._apply_known, op)
                except DatapathError as exc:
                    if not op.quiet:
                        self._nft_errors += 1
                        log.warning("%s", exc)
        finally:
            self._writing = False

    def _apply_known(self, op: KnownOp) -> None:
        """One change to the known sets (in a worker thread): over nfnetlink, or with ``nft -f``
        once the kernel has said it cannot take set elements that way."""
        if self._elems is not None:
            try:
                self._elems.apply(known_changes(self._hold, op))
                return
            except (NftSetError, OSError) as exc:
                if not unsupported(exc):
                    if isinstance(exc, NftSetError):
                        raise
                    raise DatapathError(
                        f"packet hold: set inet {self._hold.table} known sets: {exc}"
                    ) from None
                log.info("packet hold: known set written with nft from now on: %s", exc)
                self._elems.close()
                self._elems = None
        script = known_script(
            self._hold,
            add=op.add,
            remove=() if op.remove is None else [op.remove],
            flush=op.flush,
        )
        run_nft(script, netns=self._netns, what="packet hold")

    # -- events: the kernel's, and the ACQUIREs synthesized for held packets --
    async def events(self) -> AsyncIterator[DatapathEvent]:
        pump = asyncio.create_task(self._pump())
        try:
            while True:
                ev = await self._events_q.get()
                if ev is _END:
                    pump.result()  # the kernel stream's error, if it had one
                    return
                yield ev
        finally:
            pump.cancel()

    async def _pump(self) -> None:
        try:
            async for ev in super().events():
                if isinstance(ev, PolicyExpire) and ev.hard and ev.direction is Direction.OUT:
                    net = ev.dst.net
                    if net.prefixlen == net.max_prefixlen:
                        self._forget([net.network_address])
                    else:
                        self._forget_all()
                elif isinstance(ev, Expire) and ev.hard:
                    self._forget([ev.dst])
                self._events_q.put_nowait(ev)
        finally:
            self._events_q.put_nowait(_END)
