"""Per-LAN-device view: which destinations each LAN device talks to, protected or not, and why.

Why: ``local`` in a tunnel row is always the WAN address and every DNS client behind
dnsmasq is 127.0.0.1, so nothing else answers "is my laptop's traffic to X encrypted?".
Sans-IO: conntrack flows (their original tuple: LAN source -> destination; the router
SNATs them to the WAN address later), dnsmasq's leases and a snapshot of the OE state
(group table, tunnel and shunt rows, DNS names) in; the view out. The edges read
conntrack (``conntrack.read_flows``, once per request, capped) and the lease file.

A flow is classified by its destination as the kernel would treat a new packet of it:
a tunnel (OE row with a Child SA for the flow's selector), else a shunt, else its
group (``PolicyTable.lookup``, exclusions first). ``explain`` answers the same for an
address and adds what a new flow to it would meet.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import asdict, field
from typing import Any

from oe_router.control.status import ShuntStatus, TunnelStatus
from oe_router.datapath.base import IPAddress, IPNetwork
from oe_router.decisions import duration
from oe_router.devcommands import DEFAULT_LEASES, MAX_FLOWS
from oe_router.oe.manager import OeManager
from oe_router.oe.policy import Group, PolicyTable, Rule
from oe_router.oe.shunts import DROP_SHUNT_FIRST
from oe_router.records import record

__all__ = [
    "DEFAULT_LEASES",
    "MAX_FLOWS",
    "Destination",
    "Device",
    "DevicesView",
    "Explanation",
    "Flow",
    "Lease",
    "OeSnapshot",
    "Verdict",
    "build_view",
    "classify",
    "explain",
    "parse_leases",
    "snapshot",
]

JsonObject = dict[str, Any]


#: Verdict states: the flow's packets ride a tunnel, leave in the clear, are dropped,
#: or wait (held or trapped) for IKE.
PROTECTED, CLEAR, BLOCKED, PENDING = "protected", "clear", "blocked", "pending"

_PROTO_NAMES = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmpv6", 132: "sctp"}


@record(frozen=True)
class Flow:
    """One conntrack entry's original direction."""

    src: IPAddress
    dst: IPAddress
    proto: int
    dport: int | None = None


@record(frozen=True)
class Lease:
    """One dnsmasq lease: the device's MAC ("" for DHCPv6: dnsmasq writes the IAID) and
    hostname ("" when the client sent none)."""

    address: IPAddress
    mac: str = ""
    hostname: str = ""


def parse_leases(text: str) -> tuple[dict[IPAddress, Lease], int]:
    """dnsmasq's lease file (``expiry mac ip hostname client-id``, IPv6 leases after a
    ``duid`` line with the IAID where the MAC was): the leases by address, and how many
    lines were malformed (skipped)."""
    leases: dict[IPAddress, Lease] = {}
    bad = 0
    for line in text.splitlines():
        parts = line.split()
        if not parts or parts[0] == "duid":
            continue
        if len(parts) < 4 or not parts[0].isdigit():
            bad += 1
            continue
        try:
            addr = ipaddress.ip_address(parts[2])
        except ValueError:
            bad += 1
            continue
        mac = parts[1].lower() if _is_mac(parts[1]) else ""
        host = "" if parts[3] == "*" else parts[3][:63]
        leases[addr] = Lease(addr, mac, host)
    return leases, bad


def _is_mac(text: str) -> bool:
    octets = text.split(":")
    return len(octets) == 6 and all(
        len(o) == 2 and all(c in "0123456789abcdefABCDEF" for c in o) for o in octets
    )


@record(frozen=True)
class OeSnapshot:
    """What the OE manager knows now, as the view needs it (``OeService.view_snapshot``).

    ``tunnels``: every tunnel row of the status (the OE manager's and the IKE engine's);
    ``names``: the DNS name that led to each peer; ``auth``: how a peer with a DNS key
    must authenticate (others: NULL auth)."""

    table: PolicyTable
    wan: Mapping[int, IPAddress]
    lan: tuple[IPNetwork, ...] = ()
    tunnels: tuple[TunnelStatus, ...] = ()
    shunts: tuple[ShuntStatus, ...] = ()
    names: Mapping[IPAddress, str] = field(default_factory=dict)
    auth: Mapping[IPAddress, str] = field(default_factory=dict)
    shunt_lifetime: float = 900.0


def snapshot(
    mgr: OeManager, lan: Iterable[IPNetwork], tunnels: tuple[TunnelStatus, ...], now: float
) -> OeSnapshot:
    """The manager's state now as the view reads it (``tunnels``: the status's rows)."""
    peers = mgr.dns_peers()
    return OeSnapshot(
        table=mgr.table,
        wan=dict(mgr.wan),
        lan=tuple(lan),
        tunnels=tunnels,
        shunts=mgr.shunts(now),
        names={p: name for p, (name, _) in peers.items() if name},
        auth={p: words for p, (_, words) in peers.items()},
        shunt_lifetime=mgr.shunt_lifetime,
    )


@record(frozen=True)
class TunnelRef:
    """The tunnel a protected flow rides, as the tunnel rows have it."""

    peer: str
    selector: str
    state: str
    transform: str = ""
    local_auth: str = ""
    remote_auth: str = ""
    remote_id: str = ""
    ike_spis: str = ""
    spi_in: str = ""
    spi_out: str = ""
    engine: str = ""


@record(frozen=True)
class Verdict:
    """How the flows to one destination are treated now, and why."""

    state: str
    reason: str
    group: str = ""
    entry: str = ""
    tunnel: TunnelRef | None = None
    shunt: str = ""  #: ``pass``/``drop``/``hold`` when a shunt decides
    expires_s: float | None = None


@record(frozen=True)
class Destination:
    """One destination of a device: its verdict, its flows and the DNS name behind it."""

    address: str
    state: str
    reason: str
    flows: int
    services: tuple[str, ...] = ()
    group: str = ""
    entry: str = ""
    dns_name: str = ""
    tunnel: TunnelRef | None = None
    shunt: str = ""
    expires_s: float | None = None


@record(frozen=True)
class Device:
    """One LAN device (by source address) and where it talks to."""

    address: str
    mac: str = ""
    hostname: str = ""
    flows_protected: int = 0
    flows_clear: int = 0
    flows_blocked: int = 0
    flows_pending: int = 0
    destinations: tuple[Destination, ...] = ()


@record(frozen=True)
class DevicesView:
    """The devices, and how complete the look was (``truncated``: conntrack held more than
    ``MAX_FLOWS`` entries; ``notes``: what could not be read)."""

    devices: tuple[Device, ...] = ()
    flows_read: int = 0
    truncated: bool = False
    notes: tuple[str, ...] = ()

    def to_json(self) -> JsonObject:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: JsonObject) -> DevicesView:
        devices = []
        for d in obj["devices"]:
            dests = tuple(
                Destination(
                    **{
                        **x,
                        "services": tuple(x.get("services", ())),
                        "tunnel": None if x.get("tunnel") is None else TunnelRef(**x["tunnel"]),
                    }
                )
                for x in d["destinations"]
            )
            devices.append(Device(**{**d, "destinations": dests}))
        return cls(
            devices=tuple(devices),
            flows_read=int(obj.get("flows_read", 0)),
            truncated=bool(obj.get("truncated", False)),
            notes=tuple(str(n) for n in obj.get("notes", ())),
        )


# ------------------------------------------------------------------ classification


@record(frozen=True)
class _Selector:
    net: IPNetwork
    proto: int = 0
    port: int | None = None

    def covers(self, addr: IPAddress, proto: int, port: int | None) -> bool:
        if addr.version != self.net.version or addr not in self.net:
            return False
        if self.proto and proto and self.proto != proto:
            return False
        return self.port is None or port is None or self.port == port

    @property
    def rank(self) -> tuple[int, int, int]:
        return (self.net.prefixlen, 1 if self.proto else 0, 1 if self.port is not None else 0)


def _selector(text: str) -> _Selector | None:
    """``203.0.113.10/32 proto 6 port 443`` (``selectors.describe``) back to its parts."""
    words = text.split()
    try:
        net = ipaddress.ip_network(words[0], strict=False)
        rest = dict(zip(words[1::2], words[2::2], strict=False))
        proto = int(rest.get("proto", 0))
        port = int(rest["port"]) if "port" in rest else None
    except (ValueError, IndexError):
        return None
    return _Selector(net, proto, port)


def _best(
    rows: Iterable[tuple[_Selector, Any]], dst: IPAddress, proto: int, port: int | None
) -> Any:
    hits = [(sel.rank, i, row) for i, (sel, row) in enumerate(rows) if sel.covers(dst, proto, port)]
    return max(hits, key=lambda h: (h[0], -h[1]))[2] if hits else None


def _tunnel(snap: OeSnapshot, dst: IPAddress, proto: int, port: int | None) -> TunnelStatus | None:
    """The OE manager's row for ``dst``'s flow: a Child SA, or a negotiation under way."""
    rows = []
    for t in snap.tunnels:
        if t.source == "ike" or t.peer != str(dst):
            continue
        sel = _selector(t.remote)
        if sel is not None:
            rows.append((sel, t))
    row: TunnelStatus | None = _best(rows, dst, proto, port)
    return row


def _tunnel_ref(snap: OeSnapshot, row: TunnelStatus, dst: IPAddress) -> TunnelRef:
    """The OE row with the IKE engine's facts on the same peer (auth, SPIs)."""
    ike = next((t for t in snap.tunnels if t.source == "ike" and t.peer == row.peer), None)
    spi_in = spi_out = ""
    if ike is not None and ike.children:
        child = next((c for c in ike.children if _ts_covers(c.ts_remote, dst)), ike.children[0])
        spi_in, spi_out = child.spi_in, child.spi_out
    return TunnelRef(
        peer=row.peer,
        selector=row.remote,
        state=row.state,
        transform=row.transform or (ike.transform if ike is not None else ""),
        local_auth="" if ike is None else ike.local_auth,
        remote_auth="" if ike is None else ike.remote_auth,
        remote_id="" if ike is None else ike.remote_id,
        ike_spis="" if ike is None else ike.ike_spis,
        spi_in=spi_in,
        spi_out=spi_out,
        engine=row.engine,
    )


def _ts_covers(text: str, dst: IPAddress) -> bool:
    """Does an IKE traffic selector text (``198.51.100.7/32``, or a range ``a-b``,
    possibly with ``[proto/port]``) name ``dst``?"""
    for part in text.replace(",", " ").split():
        base = part.split("[", 1)[0]
        try:
            if "-" in base:
                lo, hi = (ipaddress.ip_address(x) for x in base.split("-", 1))
                if lo.version == dst.version and lo <= dst <= hi:  # type: ignore[operator]
                    return True
            elif dst in ipaddress.ip_network(base, strict=False):
                return True
        except (ValueError, TypeError):
            continue
    return False


def _shunt(snap: OeSnapshot, dst: IPAddress, proto: int, port: int | None) -> ShuntStatus | None:
    rows = []
    for s in snap.shunts:
        sel = _selector(s.destination)
        if sel is not None:
            rows.append((sel, s))
    row: ShuntStatus | None = _best(rows, dst, proto, port)
    return row


def _entry(rule: Rule) -> str:
    return f"{rule.group.value} {rule.entry}" if rule.exclusion is None else str(rule.entry)


def classify(snap: OeSnapshot, dst: IPAddress, proto: int = 0, port: int | None = None) -> Verdict:
    """How a flow to ``dst`` (``proto``/``port`` when known) is treated now, and why."""
    rule = snap.table.lookup(dst, proto, port)
    group = "" if rule is None else rule.group.value
    entry = "" if rule is None else _entry(rule)
    if rule is not None and rule.exclusion is not None:
        return Verdict(CLEAR, f"excluded from OE ({rule.exclusion})", "", entry)
    row = _tunnel(snap, dst, proto, port)
    if row is not None:
        ref = _tunnel_ref(snap, row, dst)
        if row.state in ("negotiating", "queued"):
            why = f"IKE with {row.peer} is {row.state}; packets wait for it"
            return Verdict(PENDING, why, group, entry, ref)
        auth = f"auth {ref.remote_auth}" if ref.remote_auth else snap.auth.get(dst, "NULL auth")
        return Verdict(PROTECTED, f"tunnel to {row.peer} ({auth})", group, entry, ref)
    shunt = _shunt(snap, dst, proto, port)
    if shunt is not None:
        return _shunt_verdict(shunt, group, entry)
    return _group_verdict(snap, dst, rule, group, entry)


def _shunt_verdict(shunt: ShuntStatus, group: str, entry: str) -> Verdict:
    why = shunt.reason.split(": ", 1)[1] if ": " in shunt.reason else shunt.reason
    if shunt.kind == "pass":
        what = "no key" if why.startswith("no key") else "IKE failed"
        return Verdict(
            CLEAR, f"pass shunt ({what}): {why}", group, entry, None, "pass", shunt.expires_s
        )
    if shunt.kind == "drop":
        return Verdict(
            BLOCKED, f"drop shunt (IKE failed): {why}", group, entry, None, "drop", shunt.expires_s
        )
    return Verdict(PENDING, f"{shunt.kind} shunt: {why}", group, entry, None, shunt.kind,
                   shunt.expires_s)  # fmt: skip


def _group_verdict(
    snap: OeSnapshot, dst: IPAddress, rule: Rule | None, group: str, entry: str
) -> Verdict:
    if rule is None:
        return Verdict(CLEAR, "not in any policy group")
    g = rule.group
    no_wan = dst.version not in snap.wan
    if g is Group.CLEAR:
        return Verdict(CLEAR, "policy group clear", group, entry)
    if g is Group.CLEAR_OR_PRIVATE:
        return Verdict(CLEAR, "clear-or-private: the router never initiates, the peer did not",
                       group, entry)  # fmt: skip
    if g is Group.BLOCK:
        return Verdict(BLOCKED, "policy group block", group, entry)
    if g is Group.PRIVATE:
        if no_wan:
            return Verdict(BLOCKED, f"private, no IPv{dst.version} WAN address: dropped",
                           group, entry)  # fmt: skip
        return Verdict(PENDING, "private: no SA now; packets are trapped until IKE succeeds",
                       group, entry)  # fmt: skip
    if no_wan:
        return Verdict(CLEAR, f"private-or-clear, no IPv{dst.version} WAN address", group, entry)
    return Verdict(PENDING, "private-or-clear: no SA or shunt now; the next packet triggers IKE",
                   group, entry)  # fmt: skip


def _service(flow: Flow) -> str:
    name = _PROTO_NAMES.get(flow.proto, f"proto {flow.proto}")
    return name if flow.dport is None else f"{name} {flow.dport}"


def _in_lan(addr: IPAddress, lan: Iterable[IPNetwork]) -> bool:
    return any(addr.version == n.version and addr in n for n in lan)


def build_view(
    snap: OeSnapshot,
    flows: Iterable[Flow],
    leases: Mapping[IPAddress, Lease],
    *,
    device: IPAddress | None = None,
    flows_read: int = 0,
    truncated: bool = False,
    notes: Iterable[str] = (),
) -> DevicesView:
    """Every LAN device with flows (or only ``device``, listed even without flows): its
    destinations outside the LAN, each classified once per (destination, protocol,
    port), counted per flow."""
    per_dev: dict[IPAddress, dict[IPAddress, list[Flow]]] = {}
    if device is not None:
        per_dev[device] = {}
    for f in flows:
        if not _in_lan(f.src, snap.lan) or _in_lan(f.dst, snap.lan):
            continue
        if device is not None and f.src != device:
            continue
        per_dev.setdefault(f.src, {}).setdefault(f.dst, []).append(f)
    devices = []
    for addr in sorted(per_dev, key=lambda a: (a.version, a)):
        dests: list[Destination] = []
        counts = {PROTECTED: 0, CLEAR: 0, BLOCKED: 0, PENDING: 0}
        for dst in sorted(per_dev[addr], key=lambda a: (a.version, a)):
            dflows = per_dev[addr][dst]
            verdicts: dict[tuple[int, int | None], Verdict] = {}
            for f in dflows:
                key = (f.proto, f.dport)
                if key not in verdicts:
                    verdicts[key] = classify(snap, dst, f.proto, f.dport)
                counts[verdicts[key].state] += 1
            # one row per destination and verdict (a narrowed entry may split them)
            by_verdict: dict[Verdict, list[Flow]] = {}
            for f in dflows:
                by_verdict.setdefault(verdicts[(f.proto, f.dport)], []).append(f)
            for v, vflows in by_verdict.items():
                dests.append(
                    Destination(
                        address=str(dst),
                        state=v.state,
                        reason=v.reason,
                        flows=len(vflows),
                        services=tuple(sorted({_service(f) for f in vflows})),
                        group=v.group,
                        entry=v.entry,
                        dns_name=snap.names.get(dst, ""),
                        tunnel=v.tunnel,
                        shunt=v.shunt,
                        expires_s=v.expires_s,
                    )
                )
        lease = leases.get(addr)
        devices.append(
            Device(
                address=str(addr),
                mac="" if lease is None else lease.mac,
                hostname="" if lease is None else lease.hostname,
                flows_protected=counts[PROTECTED],
                flows_clear=counts[CLEAR],
                flows_blocked=counts[BLOCKED],
                flows_pending=counts[PENDING],
                destinations=tuple(dests),
            )
        )
    return DevicesView(tuple(devices), flows_read, truncated, tuple(notes))


# ------------------------------------------------------------------ explain


@record(frozen=True)
class Explanation:
    """``oe explain ADDRESS``: the group and entry that cover it, what exists now, and
    what a new flow to it would meet."""

    address: str
    group: str
    entry: str
    now: str
    new_flow: str
    state: str
    reason: str
    dns_name: str = ""
    tunnel: TunnelRef | None = None

    def to_json(self) -> JsonObject:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: JsonObject) -> Explanation:
        t = obj.get("tunnel")
        return cls(**{**obj, "tunnel": None if t is None else TunnelRef(**t)})


def explain(snap: OeSnapshot, addr: IPAddress) -> Explanation:
    """What covers ``addr`` and what would happen to a new flow to it (any protocol)."""
    v = classify(snap, addr)
    rule = snap.table.lookup(addr)
    auth = snap.auth.get(addr, "NULL auth")
    name = snap.names.get(addr, "")
    if rule is not None and rule.exclusion is not None:
        now = "nothing (excluded)"
        if rule.exclusion == "LAN":
            new = "stays on the LAN: never trapped, never OE"
        else:
            new = f"goes in the clear, never trapped ({rule.exclusion})"
    elif v.tunnel is not None and v.state == PROTECTED:
        t = v.tunnel
        now = f"tunnel to {t.peer} ({t.selector}, {t.state})"
        if t.spi_in:
            now += f", SPIs {t.spi_in}/{t.spi_out}"
        new = f"rides the tunnel ({f'auth {t.remote_auth}' if t.remote_auth else auth})"
    elif v.tunnel is not None:
        now = f"IKE with {v.tunnel.peer} {v.tunnel.state}"
        new = "is held until IKE settles"
    elif v.shunt:
        left = "" if v.expires_s is None else f" for {duration(v.expires_s)}"
        now = v.reason + ("" if v.expires_s is None else f" ({duration(v.expires_s)} left)")
        new = {"pass": "goes in the clear", "drop": "is dropped"}.get(v.shunt, "is held")
        new += f"{left}, then meets its group's policy again"
    else:
        now = "no SA, no shunt"
        new = _new_flow(snap, addr, rule, auth)
    group = "" if rule is None else ("" if rule.exclusion else rule.group.value)
    entry = "" if rule is None else _entry(rule)
    return Explanation(str(addr), group, entry, now, new, v.state, v.reason, name, v.tunnel)


def _new_flow(snap: OeSnapshot, addr: IPAddress, rule: Rule | None, auth: str) -> str:
    if rule is None:
        return "goes in the clear (no policy group covers it)"
    g, no_wan = rule.group, addr.version not in snap.wan
    if g is Group.CLEAR:
        return "goes in the clear"
    if g is Group.CLEAR_OR_PRIVATE:
        return "goes in the clear (a tunnel only if the peer starts IKE)"
    if g is Group.BLOCK:
        return "is dropped"
    if no_wan:
        what = "is dropped" if g is Group.PRIVATE else "goes in the clear"
        return f"{what} (no IPv{addr.version} WAN address to negotiate from)"
    held = f"is held and triggers IKE with {auth}; on failure: "
    if g is Group.PRIVATE:
        return held + f"dropped (a drop shunt, {DROP_SHUNT_FIRST:g}s at first, doubling)"
    return held + f"clear for {duration(snap.shunt_lifetime)}"
