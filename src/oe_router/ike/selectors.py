"""Traffic selector arithmetic: intersection and narrowing (RFC 7296 §2.9).

Why separate: the responder narrows with it, the initiator checks the answer
with it, and the OE policy uses it to confine a peer to its own address.
"""

from __future__ import annotations

from collections.abc import Iterable

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
    return TrafficSelector(
        a.ts_type, proto, lo_port, hi_port, lo.to_bytes(n, "big"), hi.to_bytes(n, "big")
    )


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


def contains(outer: TrafficSelector, inner: TrafficSelector) -> bool:
    """True when every packet ``inner`` matches also matches ``outer``."""
    return intersect(outer, inner) == inner


def covered(inner: Iterable[TrafficSelector], outer: Iterable[TrafficSelector]) -> bool:
    """True when each of ``inner`` lies within some selector of ``outer``."""
    outer = list(outer)
    return all(any(contains(o, i) for o in outer) for i in inner)
