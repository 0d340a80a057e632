"""Traffic selectors as the OE layer keys and names them.

Why one place: the manager, its shunts and its passes all replace one another's
kernel policies, and must agree on what makes two policies the same one (the
kernel's identity, ``PolicyKey``) and say flows the same way in log lines and
``oe status``.
"""

from __future__ import annotations

import ipaddress

from oe_router.datapath.base import ChildSaSpec, Direction, IPAddress, PolicySpec, TrafficSelector

__all__ = ["PolicyKey", "child_keys", "describe", "host_net", "key_of", "policy_key", "target"]

PolicyKey = tuple[object, ...]


def policy_key(src: TrafficSelector, dst: TrafficSelector, direction: Direction) -> PolicyKey:
    """The kernel's identity of a policy (priority is not part of it)."""
    proto = src.proto or dst.proto
    return (src.net, dst.net, proto, src.port, dst.port, direction)


def key_of(p: PolicySpec) -> PolicyKey:
    return policy_key(p.src, p.dst, p.direction)


def host_net(addr: IPAddress) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(addr)


def child_keys(spec: ChildSaSpec) -> list[PolicyKey]:
    """The identities of a Child SA's policies (out, in and fwd per selector pair)."""
    lts = spec.local_ts or (TrafficSelector(host_net(spec.local)),)
    rts = spec.remote_ts or (TrafficSelector(host_net(spec.remote)),)
    keys = []
    for lt in lts:
        for rt in rts:
            keys.append(policy_key(lt, rt, Direction.OUT))
            keys.append(policy_key(rt, lt, Direction.IN))
            keys.append(policy_key(rt, lt, Direction.FWD))
    return keys


def describe(ts: TrafficSelector) -> str:
    """``203.0.113.10/32 proto 6 port 443``: a selector in log lines and ``oe status``."""
    return str(ts.net) + _narrowed(ts)


def target(ts: TrafficSelector) -> str:
    """``203.0.113.10``, or ``203.0.113.10 proto 6 port 443`` for a narrowed flow."""
    net = ts.net
    return str(net.network_address if net.prefixlen == net.max_prefixlen else net) + _narrowed(ts)


def _narrowed(ts: TrafficSelector) -> str:
    text = f" proto {ts.proto}" if ts.proto else ""
    return text if ts.port is None else f"{text} port {ts.port}"
