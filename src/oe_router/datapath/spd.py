"""Userspace SPD and SAD with XFRM's semantics, for the userspace ESP datapath.

Pure data: no I/O, no threads, time passed in. The kernel datapath is the reference,
so a policy set behaves the same on either datapath:

* Policies are keyed like XFRM (net/xfrm/xfrm_policy.c, ``xfrm_policy_insert``): the
  kernel selector (addresses, prefix lengths, protocol, ports and their masks, with an
  ICMP type in the source-port field whichever side carries it), the direction and the
  mark (value and mask). Installing a policy with the same key replaces it.
* Order is the kernel's ordered list (``xfrm_policy_insert_list``): by priority, lower
  first, where the priority is ``2 * rank + persistent`` as ``kernel.Ownership`` builds
  it (the base offset changes no order); a new policy goes behind every policy of
  equal priority, so on ties the earlier-installed wins; a replacement of equal priority
  takes the old one's place, one of another priority goes behind its new equals. (Since
  6.12 the kernel breaks ties between its hash chains and inexact bins with an
  insertion counter that a replacement renews; 6.1, the lab's kernel, ranks inexact
  policies by list position. Both agree with this list where it matters here: distinct
  selectors at equal priority go by installation order.)
* A lookup returns the first policy in that order whose selector matches: source and
  destination prefix, protocol (0 = any), the ports under their masks (ICMP type/code
  in the port fields, as ``packet.flow`` reads them) and ``flow_mark & mask == value``.
* The SAD finds inbound SAs by SPI and outbound SAs by the policy's template (source,
  destination, reqid; reqid 0 = any), preferring, as ``xfrm_state_look_at`` does, an SA
  that is not dying (soft-expired) and then the newest: during a rekey the new SA takes
  over as soon as it is installed.

Speed: policies are bucketed by destination prefix length, so a lookup costs a dict
probe per distinct destination prefix length plus the candidates in matching buckets,
not a scan of every policy. ``match`` also caches its result per flow key, coarsened
to (version, src, dst) when no installed policy of that direction looks at the protocol
or ports (and the mark only when some policy has one); every change clears the caches.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Final

from oe_router.datapath.base import (
    DatapathError,
    Direction,
    IPAddress,
    PolicyExpire,
    PolicySpec,
    Template,
)
from oe_router.datapath.esp import InboundSa, OutboundSa
from oe_router.datapath.packet import Flow

__all__ = ["Sad", "Spd", "SpdEntry", "key_of"]

_DIR_NUM: Final = {Direction.IN: 0, Direction.OUT: 1, Direction.FWD: 2}  # XFRM_POLICY_*
_MISS: Final = object()
_POS_BITS: Final = 40  # order = priority << 40 | position


def _mask(bits: int, plen: int) -> int:
    return ((1 << plen) - 1) << (bits - plen)


class SpdEntry:
    """One installed policy, compiled for matching; what ``Spd.match`` returns.

    ``sa_key`` is the first template as ``Sad.outbound`` takes it (None for policies
    without templates); ``index`` is the kernel-style policy index (direction in the
    low 3 bits, kept across replacement) for ``Acquire.policy_index``.
    """

    __slots__ = ("action", "add_time", "dmask", "dnet", "dport", "dport_mask", "index", "key",
                 "mark_m", "mark_v", "order", "policy", "priority", "proto", "sa_key",
                 "smask", "snet", "soft_done", "sport", "sport_mask", "version")  # fmt: skip

    def __init__(self, policy: PolicySpec, index: int, pos: int, now: float) -> None:
        src, dst = policy.src, policy.dst
        self.policy = policy
        self.action = policy.action
        self.version = v = src.net.version
        bits = 32 if v == 4 else 128
        self.snet = int(src.net.network_address)
        self.smask = _mask(bits, src.net.prefixlen)
        self.dnet = int(dst.net.network_address)
        self.dmask = _mask(bits, dst.net.prefixlen)
        self.proto = dst.proto or src.proto
        # the kernel selector (kernel._selector): an ICMP type sits in sport either way
        icmp = src.icmp_type if src.icmp_type is not None else dst.icmp_type
        sport = src.port if icmp is None else icmp
        self.sport = sport or 0
        self.sport_mask = 0xFFFF if sport is not None else 0
        self.dport = dst.port or 0
        self.dport_mask = 0xFFFF if dst.port is not None else 0
        mark = policy.mark
        self.mark_v, self.mark_m = (mark.value, mark.mask) if mark is not None else (0, 0)
        self.priority = 2 * policy.priority + int(policy.persistent)
        self.order = self.priority << _POS_BITS | pos
        self.index = index
        self.key = key_of(policy)
        self.add_time = now
        self.soft_done = False
        t = policy.templates[0] if policy.templates else None
        self.sa_key = (int(t.src), int(t.dst), t.reqid) if t is not None else None

    def matches(self, flow: Flow, mark: int = 0) -> bool:
        """The kernel's xfrm_selector_match plus the mark test (for tests and slow paths)."""
        _, src, dst, proto, sport, dport = flow
        return (
            flow.version == self.version
            and src & self.smask == self.snet
            and dst & self.dmask == self.dnet
            and (not self.proto or self.proto == proto)
            and not (sport ^ self.sport) & self.sport_mask
            and not (dport ^ self.dport) & self.dport_mask
            and mark & self.mark_m == self.mark_v
        )


def key_of(policy: PolicySpec) -> tuple[object, ...]:
    """What makes two policies the same XFRM policy: selector, direction, mark."""
    src, dst = policy.src, policy.dst
    icmp = src.icmp_type if src.icmp_type is not None else dst.icmp_type
    sport = src.port if icmp is None else icmp
    mark = (policy.mark.value, policy.mark.mask) if policy.mark is not None else (0, 0)
    return (policy.direction, src.net, dst.net, dst.proto or src.proto, sport, dst.port, mark)


class Spd:
    """The policies of the three directions, in kernel order, with a lookup cache."""

    def __init__(self, *, cache_size: int = 1 << 16) -> None:
        self._entries: dict[tuple[object, ...], SpdEntry] = {}
        self._pos = 0
        self._index = 0
        self._cache_size = cache_size
        # Enum members hash in Python (slow): per-direction state sits in attributes,
        # found by identity, so a lookup hashes only its cache key.
        self._in, self._out, self._fwd = _DirState(), _DirState(), _DirState()

    def _dir(self, direction: Direction) -> _DirState:
        if direction is _OUT:
            return self._out
        return self._in if direction is _IN else self._fwd

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def cached(self) -> int:
        """Flow keys in the lookup caches (bounded by ``cache_size`` per direction)."""
        return sum(len(st.cache) for st in (self._in, self._out, self._fwd))

    # -- changes --
    def install(self, policy: PolicySpec, *, now: float = 0.0) -> SpdEntry:
        """Add ``policy``, or replace the one with the same selector, direction and mark
        (UPDPOLICY). ``now`` starts its lifetime, as the kernel's add_time."""
        if len(policy.templates) > 1:
            raise DatapathError(
                f"policy {policy.describe()}: the userspace datapath runs one ESP template "
                f"per policy, got {len(policy.templates)}"
            )
        key = key_of(policy)
        old = self._entries.get(key)
        if old is not None and old.priority == 2 * policy.priority + int(policy.persistent):
            pos = old.order & ((1 << _POS_BITS) - 1)  # same priority: keeps its place
        else:
            self._pos += 1
            pos = self._pos
        if old is not None:
            index = old.index
        else:
            self._index += 1
            index = self._index << 3 | _DIR_NUM[policy.direction]
        entry = SpdEntry(policy, index, pos, now)
        self._entries[key] = entry
        self._changed(policy.direction)
        return entry

    def remove(self, policy: PolicySpec) -> bool:
        """Remove the policy with ``policy``'s key; False if there was none."""
        if self._entries.pop(key_of(policy), None) is None:
            return False
        self._changed(policy.direction)
        return True

    def clear(self) -> None:
        self._entries.clear()
        for d in _DIR_NUM:
            self._changed(d)

    def _changed(self, direction: Direction) -> None:
        st = self._dir(direction)
        st.tables = None
        st.cache.clear()

    def expire(self, now: float) -> list[PolicyExpire]:
        """Lifetimes by add time (soft once, hard removes), as the kernel's policy timer.

        ``priority`` in the events is the policy's rank (``PolicySpec.priority``). Idle
        (use-time) lifetimes are not kept here: they would cost a clock per packet.
        """
        events: list[PolicyExpire] = []
        for e in list(self._entries.values()):
            lft = e.policy.lifetime
            p = e.policy
            if lft.hard_seconds and now >= e.add_time + lft.hard_seconds:
                del self._entries[e.key]
                self._changed(p.direction)
                events.append(PolicyExpire(p.src, p.dst, p.direction, p.priority, True))
            elif lft.soft_seconds and not e.soft_done and now >= e.add_time + lft.soft_seconds:
                e.soft_done = True
                events.append(PolicyExpire(p.src, p.dst, p.direction, p.priority, False))
        return events

    # -- queries --
    def policies(self, direction: Direction | None = None) -> list[PolicySpec]:
        """Installed policies in lookup order (one direction, or all by direction)."""
        dirs = list(_DIR_NUM) if direction is None else [direction]
        out: list[PolicySpec] = []
        for d in dirs:
            es = sorted((e for e in self._entries.values() if e.policy.direction is d),
                        key=lambda e: e.order)  # fmt: skip
            out.extend(e.policy for e in es)
        return out

    def get(self, policy: PolicySpec) -> SpdEntry | None:
        """The installed entry with ``policy``'s key (its current version), if any."""
        return self._entries.get(key_of(policy))

    def lookup(self, direction: Direction, flow: Flow, mark: int = 0) -> PolicySpec | None:
        """The policy XFRM would apply to ``flow`` in ``direction``, or None."""
        e = self.match(direction, flow, mark)
        return e.policy if e is not None else None

    def match(self, direction: Direction, flow: Flow, mark: int = 0) -> SpdEntry | None:
        """``lookup`` for the worker: the compiled entry (action, sa_key), cached."""
        st = self._out if direction is _OUT else self._dir(direction)
        key: object = flow if st.fine else flow[:3]
        if st.marked:
            key = (key, mark)
        cache = st.cache
        hit = cache.get(key, _MISS)
        if hit is not _MISS:
            return hit  # type: ignore[return-value]
        e = self._search(st, direction, flow, mark)
        if len(cache) >= self._cache_size:
            cache.clear()
        cache[key] = e
        return e

    def search(self, direction: Direction, flow: Flow, mark: int = 0) -> SpdEntry | None:
        """The uncached lookup: a probe per destination prefix length in use."""
        return self._search(self._dir(direction), direction, flow, mark)

    def _search(
        self, st: _DirState, direction: Direction, flow: Flow, mark: int
    ) -> SpdEntry | None:
        tables = st.tables
        if tables is None:
            tables = self._build(st, direction)
        best: SpdEntry | None = None
        best_order = 1 << 80
        version, src, dst, proto, sport, dport = flow
        for dmask, buckets in tables[version]:
            candidates = buckets.get(dst & dmask)
            if candidates is None:
                continue
            for e in candidates:
                if e.order >= best_order:
                    break
                if (
                    src & e.smask == e.snet
                    and (not e.proto or e.proto == proto)
                    and not (sport ^ e.sport) & e.sport_mask
                    and not (dport ^ e.dport) & e.dport_mask
                    and mark & e.mark_m == e.mark_v
                ):
                    best, best_order = e, e.order
                    break
        return best

    def _build(self, st: _DirState, direction: Direction) -> _Tables:
        by_len: dict[tuple[int, int], dict[int, list[SpdEntry]]] = {}
        fine = marked = False
        for e in self._entries.values():
            if e.policy.direction is not direction:
                continue
            by_len.setdefault((e.version, e.dmask), {}).setdefault(e.dnet, []).append(e)
            fine = fine or bool(e.proto or e.sport_mask or e.dport_mask)
            marked = marked or bool(e.mark_m)
        tables: _Tables = {4: [], 6: []}
        for (version, dmask), buckets in sorted(by_len.items(), key=lambda kv: -kv[0][1]):
            for lst in buckets.values():
                lst.sort(key=lambda e: e.order)
            tables[version].append((dmask, buckets))
        st.tables, st.fine, st.marked = tables, fine, marked
        st.cache.clear()
        return tables


_Tables = dict[int, list[tuple[int, dict[int, list[SpdEntry]]]]]
_IN: Final = Direction.IN
_OUT: Final = Direction.OUT


class _DirState:
    """One direction's lookup structures: version -> [(dmask, {dnet: entries by order})]
    (None until the first lookup after a change), the result cache and its key shape."""

    __slots__ = ("cache", "fine", "marked", "tables")

    def __init__(self) -> None:
        self.tables: _Tables | None = None
        self.cache: dict[object, SpdEntry | None] = {}
        self.fine = False
        self.marked = False


def _template_key(t: Template) -> tuple[int, int, int]:
    return int(t.src), int(t.dst), t.reqid


class Sad:
    """SAs of the userspace datapath: inbound by SPI, outbound by template."""

    def __init__(self) -> None:
        self._in: dict[int, InboundSa] = {}
        self._out: dict[tuple[int, int, int], list[OutboundSa]] = {}
        self._out_any: dict[tuple[int, int], list[OutboundSa]] = {}  # templates with reqid 0

    def __len__(self) -> int:
        return len(self._in) + sum(len(v) for v in self._out.values())

    # -- inbound --
    def add_inbound(self, sa: InboundSa) -> None:
        if sa.spi in self._in:
            raise DatapathError(f"inbound SA spi {sa.spi:#010x} is installed already")
        self._in[sa.spi] = sa

    def inbound(self, spi: int) -> InboundSa | None:
        return self._in.get(spi)

    def remove_inbound(self, spi: int) -> InboundSa | None:
        return self._in.pop(spi, None)

    # -- outbound --
    def add_outbound(self, src: IPAddress, dst: IPAddress, reqid: int, sa: OutboundSa) -> None:
        """Install an outbound SA; the newest of equal standing wins lookups."""
        key = (int(src), int(dst), reqid)
        if any(s.spi == sa.spi for s in self._out.get(key, ())):
            raise DatapathError(f"outbound SA spi {sa.spi:#010x} to {dst} is installed already")
        self._out.setdefault(key, []).append(sa)
        self._out_any.setdefault((key[0], key[1]), []).append(sa)

    def remove_outbound(self, src: IPAddress, dst: IPAddress, reqid: int, spi: int) -> bool:
        """Remove the outbound SA ``spi`` of that template; False if it was not there."""
        key = (int(src), int(dst), reqid)
        lst = self._out.get(key, [])
        keep = [s for s in lst if s.spi != spi]
        if len(keep) == len(lst):
            return False
        if keep:
            self._out[key] = keep
        else:
            del self._out[key]
        pair = (key[0], key[1])
        rest = [s for s in self._out_any.get(pair, []) if s.spi != spi]
        if rest:
            self._out_any[pair] = rest
        else:
            self._out_any.pop(pair, None)
        return True

    def outbound(self, sa_key: tuple[int, int, int]) -> OutboundSa | None:
        """The SA for a template key (``SpdEntry.sa_key``): not expired, not dying if
        possible, newest first (xfrm_state_look_at). Reqid 0 takes any reqid."""
        src, dst, reqid = sa_key
        lst = self._out.get(sa_key) if reqid else self._out_any.get((src, dst))
        if not lst:
            return None
        sa = lst[-1]
        if not sa.dying:
            return sa
        best = None
        for s in reversed(lst):
            if not s.dying:
                return s
            if best is None and not s.expired:
                best = s
        return best

    def outbound_for(self, template: Template) -> OutboundSa | None:
        return self.outbound(_template_key(template))

    def outbound_sas(self) -> Iterator[OutboundSa]:
        for lst in self._out.values():
            yield from lst

    def inbound_sas(self) -> Iterator[InboundSa]:
        yield from self._in.values()
