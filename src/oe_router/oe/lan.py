"""The LAN gateway's nftables rules: LAN flows source-NATed to the router's WAN address.

Why: OE tunnels are host-to-host between the router's WAN address and the peer (that
is what libreswan and RFC 7619 NULL-auth peers accept). A LAN device's packet is
forwarded with its own source address; after source NAT to the WAN address the
kernel repeats the XFRM policy lookup (``nf_xfrm_me_harder``) and the packet then
matches the peer's Child SA (or the trap that negotiates it), whose selectors are
exactly WAN address <-> peer address. Without this SNAT no LAN packet ever matches.

IPv4: every LAN -> WAN flow is source-NATed (what OpenWrt's masquerading does anyway;
our rule sits just before fw4's srcnat so it also holds when masquerading is off).
IPv6: LAN devices keep their global addresses; only flows to peers in the set
``oe_peers6`` (peers with a tunnel, kept current by the OE service) are NATed.

The script is built by a pure function (``nft_script``) and applied atomically with
``nft -f`` (``apply_nft``); the table is ours alone and replaced as a whole.
"""

from __future__ import annotations

import ipaddress
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["LanError", "LanGateway", "apply_nft", "nft_script", "peers6_update"]

IPv4Network = ipaddress.IPv4Network
IPv6Network = ipaddress.IPv6Network


class LanError(Exception):
    """nft refused our rules; the message carries nft's own words."""


@dataclass(frozen=True)
class LanGateway:
    """What the SNAT rules need: the WAN device and addresses, the LAN prefixes."""

    wan_ifname: str
    lan4: tuple[IPv4Network, ...] = ()
    lan6: tuple[IPv6Network, ...] = ()
    wan4: ipaddress.IPv4Address | None = None
    wan6: ipaddress.IPv6Address | None = None
    table: str = "oe_router"

    def __post_init__(self) -> None:
        for text, what in ((self.wan_ifname, "WAN interface"), (self.table, "nft table")):
            if not text or not all(c.isalnum() or c in "-_.@" for c in text) or len(text) > 31:
                raise LanError(f"{what} name {text!r} is not a valid name")


def _set(items: Iterable[object]) -> str:
    return "{ " + ", ".join(str(i) for i in items) + " }"


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
    lines += [
        "\t}",
        "",
        "\tchain srcnat {",
        "\t\ttype nat hook postrouting priority srcnat - 5; policy accept;",
    ]
    wan = f'"{gw.wan_ifname}"'
    if gw.wan4 is not None and gw.lan4:
        lines.append(f"\t\toifname {wan} ip saddr {_set(gw.lan4)} snat ip to {gw.wan4}")
    if gw.wan6 is not None and gw.lan6:
        lines.append(
            f"\t\toifname {wan} ip6 saddr {_set(gw.lan6)} ip6 daddr @oe_peers6 "
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


def apply_nft(script: str, *, netns: str | None = None, nft: str = "nft") -> None:
    """Run ``nft -f -`` with ``script`` (atomic); LanError with nft's message on refusal."""
    if not script.strip():
        return
    argv = [nft, "-f", "-"]
    if netns is not None:
        argv = ["ip", "netns", "exec", netns, *argv]
    try:
        done = subprocess.run(argv, input=script, capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        raise LanError(f"{nft} not found: the LAN gateway needs nftables") from None
    except subprocess.TimeoutExpired:
        raise LanError("nft did not finish within 30 s") from None
    if done.returncode != 0:
        detail = " | ".join(line for line in done.stderr.splitlines() if line.strip())
        raise LanError(f"nft refused the LAN gateway rules: {detail or done.returncode}")
