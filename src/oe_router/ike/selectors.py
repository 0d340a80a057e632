"""Traffic selector arithmetic: intersection and narrowing (RFC 7296 §2.9).

Why separate: the responder narrows with it, the initiator checks the answer
with it, and the OE policy uses it to confine a peer to its own address.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from oe_router.records import record

from .payloads import TrafficSelector


def _as_int(raw: bytes) -> int:
    return int.from_bytes(raw, "big")


def intersect(a: TrafficSelector, b: TrafficSelector) -> TrafficSelector | None:
    """The selector both ``a`` and ``b`` allow, or None. IP protocol 0 means any."""
    if a.ts_type != b.ts_type or len(a.start_address) != len(b.start_address):
        return None
    if a.ip_protocol and b.ip_protocol and a.ip_protocol != b.ip_protocol:
        return None
    proto = a.ip_protocol or b.ip_protocol
    lo_port, hi_port = max(a.start_port, b.start_port), min(a.end_port, b.end_port)
    lo = max(_as_int(a.start_address), _as_int(b.start_address))
    hi = min(_as_int(a.end_address), _as_int(b.end_address))
    if lo_port > hi_port or lo > hi:
        return None
    n = len(a.start_address)
    first = lo.to_bytes(n, "big")
    last = first if hi == lo else hi.to_bytes(n, "big")  # one host: one bytes object
    return TrafficSelector(a.ts_type, proto, lo_port, hi_port, first, last)


def narrow(
    proposed: Iterable[TrafficSelector], allowed: Iterable[TrafficSelector]
) -> list[TrafficSelector]:
    """Every non-empty intersection of a proposed selector with an allowed one."""
    allowed = list(allowed)
    out: list[TrafficSelector] = []
    for p in proposed:
        for a in allowed:
            x = intersect(p, a)
            if x is not None and x not in out:
                out.append(x)
    return out


def reuse(
    selectors: Iterable[TrafficSelector], known: Iterable[TrafficSelector]
) -> tuple[TrafficSelector, ...]:
    """``selectors``, each replaced by an equal one of ``known`` where there is one: a
    Child SA that got the selectors its IKE SA was configured with keeps no copies of
    them (~200 bytes per Child SA; selectors are never changed after they are made)."""
    known = tuple(known)
    got = tuple(next((k for k in known if k == s), s) for s in selectors)
    same = len(got) == len(known) and all(a is b for a, b in zip(got, known, strict=True))
    return known if same else got  # all of them: the configured tuple itself


def contains(outer: TrafficSelector, inner: TrafficSelector) -> bool:
    """True when every packet ``inner`` matches also matches ``outer``."""
    return intersect(outer, inner) == inner


def covered(inner: Iterable[TrafficSelector], outer: Iterable[TrafficSelector]) -> bool:
    """True when each of ``inner`` lies within some selector of ``outer``."""
    outer = list(outer)
    return all(any(contains(o, i) for o in outer) for i in inner)


def host_selector(address: str) -> TrafficSelector:
    """The selector matching exactly one address, any protocol and port."""
    a = ipaddress.ip_address(address)
    return TrafficSelector.from_range(a, a)


def only_address(selectors: Iterable[TrafficSelector], address: str) -> bool:
    """True when every selector covers exactly ``address`` (ports/protocol may be narrower)."""
    raw = ipaddress.ip_address(address).packed
    sel = list(selectors)
    return bool(sel) and all(s.start_address == raw == s.end_address for s in sel)


@record(frozen=True)
class ContainmentPolicy:
    """Which peers may only protect their own address (DESIGN: "a peer may only
    protect its own address").

    A peer authenticated by NULL auth proved nothing about who it is; a key
    from DNS (IPSECKEY) is bound to the address it was looked up for. Either
    may claim only selectors for that address, or it could steer other
    hosts' traffic into its tunnel.

    - ``confine_null`` / ``confine_address_keys``: which peers are confined;
    - ``narrow``: as responder, narrow a wider TSi that contains the peer's
      address down to it (True) or refuse anything but exactly it (False);
      a TSi without the peer's address is refused with TS_UNACCEPTABLE;
    - ``check_responder``: as initiator, refuse a confined responder's TSr
      unless it is exactly the responder's address.
    """

    confine_null: bool = True
    confine_address_keys: bool = True
    narrow: bool = True
    check_responder: bool = True

    def confines(self, null_auth: bool, address_bound_key: bool) -> bool:
        return (null_auth and self.confine_null) or (
            address_bound_key and self.confine_address_keys
        )

    def responder_peer_side(
        self, proposed: Iterable[TrafficSelector], peer_address: str
    ) -> list[TrafficSelector]:
        """The confined peer's own-side selectors we accept; empty means TS_UNACCEPTABLE."""
        proposed = list(proposed)
        if only_address(proposed, peer_address):
            return proposed
        if not self.narrow:
            return []
        return narrow(proposed, [host_selector(peer_address)])

    def initiator_accepts(self, ts_peer: Iterable[TrafficSelector], peer_address: str) -> bool:
        """As initiator: may a confined responder have these selectors on its side?"""
        return not self.check_responder or only_address(ts_peer, peer_address)


NO_CONTAINMENT = ContainmentPolicy(False, False, True, False)
