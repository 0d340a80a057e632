"""The LAN gateway's nftables rules: LAN flows source-NATed to the router's WAN address.

Why: OE tunnels are host-to-host between the router's WAN address and the peer (that
is what libreswan and RFC 7619 NULL-auth peers accept). A LAN device's packet is
forwarded with its own source address; after source NAT to the WAN address the
kernel repeats the XFRM policy lookup (``nf_xfrm_me_harder``) and the packet then
matches the peer's Child SA (or the trap that negotiates it), whose selectors are
exactly WAN address <-> peer address. Without this SNAT no LAN packet ever matches.

IPv4: every LAN -> WAN flow is source-NATed to the WAN address (what OpenWrt's
masquerading does anyway; our rules sit just before fw4's srcnat so they also hold when
masquerading is off). Flows into the "private" group's networks (set ``oe_private4``)
get ``snat to <WAN4>``, the source their traps (persistent: they outlive the daemon)
were made for: if the WAN address changes while the daemon is down they keep the old
source, match the kept traps and stay dropped (fail closed; masqueraded to a new address
they would match no trap and leave in the clear). Every other flow is masqueraded: it
leaves from the address the WAN has at that moment, and when an address goes the kernel
drops the NAT of the flows masqueraded to it (nf_nat_masquerade's notifier), so nothing
leaves from an address the router lost, whether the daemon runs, is stopped (the table
stays for the private drops) or died. The exception is the userspace datapath while it
runs: LAN flows get a fixed ``snat to <WAN4>`` (into its TUN as well), because
masquerading lost the packet after a held first one (tests/host/test_userspace_oe.py, 3
of 3 runs); the daemon rewrites the table on every address event (``netwatch``), and
at a stop (``stopped``) the table falls back to masquerading.
IPv6: LAN devices keep their global addresses; only flows to peers in the set
``oe_peers6`` (peers with a tunnel, kept current by the OE service) are NATed, and
flows into the "private" group's IPv6 networks (set ``oe_private6``), so that they
meet the private trap (tunnel or drop) instead of leaving in the clear.

The script is built by a pure function (``nft_script``) and applied atomically with
``nft -f`` (``apply_nft``); the table is ours alone and replaced as a whole. ``Peers6``
is the sans-IO bookkeeping of the set: given the Child SAs that exist, it returns the
``nft -f`` script that brings ``oe_peers6`` there (the OE service runs it).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import field
from typing import Any

from oe_router.datapath.nft import NftError, run_nft
from oe_router.records import record

__all__ = [
    "CAT_TABLE",
    "LanError",
    "LanGateway",
    "apply_nft",
    "cat_remove_script",
    "cat_script",
    "nft_script",
    "peers6_update",
]

IPv4Network = ipaddress.IPv4Network
IPv6Network = ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class LanError(Exception):
    """nft refused our rules; the message carries nft's own words."""


@record(frozen=True)
class LanGateway:
    """What the SNAT rules need: the WAN device and addresses, the LAN prefixes."""

    wan_ifname: str
    lan4: tuple[IPv4Network, ...] = ()
    lan6: tuple[IPv6Network, ...] = ()
    wan4: ipaddress.IPv4Address | None = None
    wan6: ipaddress.IPv6Address | None = None
    #: The "private" group's networks: LAN flows there must never bypass the trap.
    private6: tuple[IPv6Network, ...] = ()
    private4: tuple[IPv4Network, ...] = ()
    #: Further WAN devices (a ``wan6`` network on a device of its own, e.g. 6in4-wan6).
    extra_wan_ifnames: tuple[str, ...] = ()
    #: the form kept after the daemon stopped (module doc): "private" flows keep the WAN
    #: address, the rest is masqueraded
    stopped: bool = False
    table: str = "oe_router"
    #: Devices that carry tunnelled flows besides the WAN (the userspace datapath's TUN):
    #: a LAN flow routed there is NATed as it would be on the WAN.
    tunnel_ifnames: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        names = [(self.wan_ifname, "WAN interface"), (self.table, "nft table")]
        names += [(n, "WAN interface") for n in self.extra_wan_ifnames]
        names += [(n, "tunnel interface") for n in self.tunnel_ifnames]
        for text, what in names:
            if not text or not all(c.isalnum() or c in "-_.@" for c in text) or len(text) > 31:
                raise LanError(f"{what} name {text!r} is not a valid name")


def _set(items: Iterable[object]) -> str:
    return "{ " + ", ".join(str(i) for i in items) + " }"


def _names(devices: Iterable[str]) -> str:
    """``"wan"`` for one device, ``{ "wan", "oe-esp0" }`` for more (as nft lists them)."""
    quoted = [f'"{d}"' for d in devices]
    return quoted[0] if len(quoted) == 1 else _set(quoted)


def nft_script(gw: LanGateway, peers6: Iterable[ipaddress.IPv6Address] = ()) -> str:
    """The whole ``inet <table>`` as one atomic ``nft -f`` script (replaces an old one)."""
    t = gw.table
    lines = [
        f"table inet {t}",  # create-if-missing, so the delete below never fails
        f"delete table inet {t}",
        f"table inet {t} {{",
        "\tset oe_peers6 {",
        "\t\ttype ipv6_addr",
    ]
    peers = sorted(set(peers6))
    if peers:
        lines.append(f"\t\telements = {_set(peers)}")
    lines.append("\t}")
    merged6 = list(ipaddress.collapse_addresses(gw.private6))  # nft refuses overlaps
    merged4 = list(ipaddress.collapse_addresses(gw.private4))
    sets: tuple[tuple[int, list[Any]], ...] = ((6, merged6), (4, merged4))
    for v, merged in sets:
        lines += ["", f"\tset oe_private{v} {{", f"\t\ttype ipv{v}_addr", "\t\tflags interval"]
        if merged:
            lines.append(f"\t\telements = {_set(merged)}")
        lines.append("\t}")
    lines += [
        "",
        "\tchain srcnat {",
        "\t\ttype nat hook postrouting priority srcnat - 5; policy accept;",
    ]
    wans = [gw.wan_ifname, *gw.extra_wan_ifnames]
    wan = _names([*wans, *gw.tunnel_ifnames])
    if gw.wan4 is not None and gw.lan4:
        out, lan4 = _names(wans), _set(gw.lan4)
        to_private = f"ip daddr @oe_private4 snat ip to {gw.wan4}"
        lines.append(f"\t\toifname {out} ip saddr {lan4} {to_private}")
        if gw.tunnel_ifnames and not gw.stopped:
            tun = _names(gw.tunnel_ifnames)
            lines.append(f"\t\toifname {tun} ip saddr {lan4} snat ip to {gw.wan4}")
        fixed = gw.tunnel_ifnames and not gw.stopped  # the userspace datapath runs
        rest = f"snat ip to {gw.wan4}" if fixed else "masquerade"
        lines.append(f"\t\toifname {out} ip saddr {lan4} {rest}")
    if gw.wan6 is not None and gw.lan6:
        lines.append(
            f"\t\toifname {wan} ip6 saddr {_set(gw.lan6)} ip6 daddr @oe_peers6 "
            f"snat ip6 to {gw.wan6}"
        )
        lines.append(
            f"\t\toifname {wan} ip6 saddr {_set(gw.lan6)} ip6 daddr @oe_private6 "
            f"snat ip6 to {gw.wan6}"
        )
    lines += ["\t}", "}", ""]
    return "\n".join(lines)


def peers6_update(
    gw: LanGateway,
    add: Iterable[ipaddress.IPv6Address] = (),
    remove: Iterable[ipaddress.IPv6Address] = (),
) -> str:
    """An ``nft -f`` script that adds/removes IPv6 peers to/from ``oe_peers6``."""
    lines = []
    add, remove = sorted(set(add)), sorted(set(remove))
    if add:
        lines.append(f"add element inet {gw.table} oe_peers6 {_set(add)}")
    if remove:
        lines.append(f"delete element inet {gw.table} oe_peers6 {_set(remove)}")
    return "\n".join(lines) + ("\n" if lines else "")


@record
class Peers6:
    """The IPv6 peers ``oe_peers6`` holds, kept in step with the Child SAs (sans-IO).

    Why a set of peers with a tunnel, not every IPv6 destination: LAN devices keep
    their global IPv6 addresses (no NAT66 for ordinary traffic); only a flow that an
    SA can carry is NATed to the WAN address, so the post-NAT XFRM lookup finds it.
    ``applied`` is what the kernel holds; None means unknown (nothing written yet, or
    a script failed), and the next update then rewrites the whole table.
    """

    gw: LanGateway
    applied: frozenset[ipaddress.IPv6Address] | None = field(default=None)

    def wanted(
        self, children: Iterable[tuple[IPAddress, IPAddress]]
    ) -> frozenset[ipaddress.IPv6Address]:
        """Peers of the (local, remote) Child SAs that start at our WAN IPv6 address."""
        return frozenset(
            remote
            for local, remote in children
            if isinstance(remote, ipaddress.IPv6Address) and local == self.gw.wan6
        )

    def update(self, wanted: Iterable[ipaddress.IPv6Address]) -> str:
        """The script that makes the set exactly ``wanted`` ("" when it already is)."""
        want = frozenset(wanted)
        if self.applied is None:
            script = nft_script(self.gw, want)
        else:
            script = peers6_update(self.gw, want - self.applied, self.applied - want)
        self.applied = want
        return script

    def failed(self) -> None:
        """The last script was refused: the kernel's set is unknown, rewrite it next time."""
        self.applied = None


def apply_nft(script: str, *, netns: str | None = None, nft: str = "nft") -> None:
    """Run ``nft -f -`` with ``script`` (atomic); LanError with nft's message on refusal."""
    try:
        run_nft(script, netns=netns, nft=nft, what="LAN gateway rules")
    except NftError as exc:
        raise LanError(str(exc)) from None


# --------------------------------------------------------------------------- CAT

#: Our own table for client address translation, apart from the SNAT table above so
#: either can be replaced without the other.
CAT_TABLE = "oe_cat"


def cat_script(
    lan: Iterable[IPv4Network | IPv6Network],
    inner: Iterable[tuple[IPAddress, IPAddress]],
    *,
    wan: Iterable[IPAddress] = (),
    table: str = CAT_TABLE,
) -> str:
    """The whole ``inet <table>`` for CAT as one atomic ``nft -f`` script.

    Why: a peer that gave us an inner address A (CP) protects only ``A <-> peer``, so
    LAN flows to that peer must leave with source A, and only flows to that peer
    (containment: A means nothing to anyone else). The maps ``oe_cat4``/``oe_cat6``
    (peer -> inner address) drive the SNAT rules; a peer not in the map falls through
    to the next rule and to the WAN-address SNAT after us (priority ``srcnat - 10``,
    before ``oe_router``'s table and fw4's masquerading: the first NAT binding of a
    connection wins). The router's own flows (source ``wan``) are NATed too, except
    IKE (UDP 500/4500) and ESP, which must keep the WAN address. ``inner`` empty: the
    table holds empty maps.
    """
    pairs = sorted(set(inner), key=lambda pr: (pr[0].version, pr[0].packed))
    lan4 = sorted({n for n in lan if n.version == 4})
    lan6 = sorted({n for n in lan if n.version == 6})
    wans = sorted(set(wan), key=lambda a: (a.version, a.packed))
    lines = [
        f"table inet {table}",  # create-if-missing, so the delete below never fails
        f"delete table inet {table}",
        f"table inet {table} {{",
    ]
    for v, kind in ((4, "ipv4_addr"), (6, "ipv6_addr")):
        elems = [f"{peer} : {addr}" for peer, addr in pairs if peer.version == v]
        lines += [f"\tmap oe_cat{v} {{", f"\t\ttype {kind} : {kind}"]
        if elems:
            lines.append(f"\t\telements = {_set(elems)}")
        lines.append("\t}")
    lines += [
        "",
        "\tchain srcnat {",
        "\t\ttype nat hook postrouting priority srcnat - 10; policy accept;",
    ]
    for v, ip, nets in ((4, "ip", lan4), (6, "ip6", lan6)):
        to = f"snat {ip} to {ip} daddr map @oe_cat{v}"
        if nets:
            lines.append(f"\t\t{ip} saddr {_set(nets)} {to}")
        for a in (a for a in wans if a.version == v):
            lines.append(f"\t\t{ip} saddr {a} meta l4proto != {{ esp, udp }} {to}")
            lines.append(f"\t\t{ip} saddr {a} udp sport != {{ 500, 4500 }} {to}")
    lines += ["\t}", "}", ""]
    return "\n".join(lines)


def cat_remove_script(table: str = CAT_TABLE) -> str:
    """Remove the CAT table (at stop); harmless if it does not exist."""
    return f"table inet {table}\ndelete table inet {table}\n"
