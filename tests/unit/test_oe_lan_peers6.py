"""``Peers6``: the set of IPv6 peers whose LAN flows are NATed into their tunnel (sans-IO).

Why it matters: a LAN device's IPv6 flow matches a host-to-host SA only after SNAT to
the WAN address, and only peers in ``oe_peers6`` are NATed. A peer missing from the set
means its LAN flows bypass the tunnel; a stale peer means flows keep being NATed to a
destination that no SA carries any more.
"""

from __future__ import annotations

import ipaddress

from oe_router.oe.lan import LanGateway, Peers6

WAN4 = ipaddress.IPv4Address("203.0.113.2")
WAN6 = ipaddress.IPv6Address("2001:db8:1::2")
P1 = ipaddress.IPv6Address("2001:db8:1::31")
P2 = ipaddress.IPv6Address("2001:db8:1::32")
V4PEER = ipaddress.IPv4Address("203.0.113.31")


def _gw() -> LanGateway:
    return LanGateway(
        wan_ifname="wan",
        lan4=(ipaddress.IPv4Network("192.168.1.0/24"),),
        lan6=(ipaddress.IPv6Network("fd00:1::/64"),),
        wan4=WAN4,
        wan6=WAN6,
    )


def test_first_update_writes_the_whole_table() -> None:
    p = Peers6(_gw())
    script = p.update([])
    assert script.startswith("table inet oe_router\ndelete table inet oe_router\n")
    assert "ip6 saddr { fd00:1::/64 } ip6 daddr @oe_peers6 snat ip6 to 2001:db8:1::2" in script
    assert "snat ip to 203.0.113.2" in script
    assert p.applied == frozenset()


def test_only_ipv6_children_at_our_wan_address_are_wanted() -> None:
    p = Peers6(_gw())
    children = [
        (WAN6, P1),
        (WAN4, V4PEER),  # IPv4 LAN flows are NATed anyway
        (ipaddress.IPv6Address("2001:db8:99::7"), P2),  # a CAT inner address, not ours
    ]
    assert p.wanted(children) == frozenset({P1})


def test_updates_add_and_remove_exactly_the_difference() -> None:
    p = Peers6(_gw())
    p.update([])
    assert p.update([P1]) == "add element inet oe_router oe_peers6 { 2001:db8:1::31 }\n"
    assert p.update([P1]) == ""  # nothing changed: no nft run at all
    assert p.update([P1, P2]) == "add element inet oe_router oe_peers6 { 2001:db8:1::32 }\n"
    assert p.update([P2]) == "delete element inet oe_router oe_peers6 { 2001:db8:1::31 }\n"
    assert p.update([]) == "delete element inet oe_router oe_peers6 { 2001:db8:1::32 }\n"
    assert p.applied == frozenset()


def test_after_a_refused_script_the_whole_table_is_rewritten() -> None:
    """A failed delta leaves the kernel's set unknown: the next update is the full table
    with exactly the wanted peers, not another delta on a guess."""
    p = Peers6(_gw())
    p.update([])
    p.update([P1])
    p.failed()
    script = p.update([P2])
    assert "delete table inet oe_router" in script
    assert "elements = { 2001:db8:1::32 }" in script
    assert "2001:db8:1::31" not in script


def test_private_ipv6_networks_are_natted_into_the_trap() -> None:
    """LAN IPv6 flows into the "private" group must meet the private trap (tunnel or drop),
    which matches only after SNAT to the WAN address; nested entries are merged, since nft
    refuses overlapping intervals."""
    gw = LanGateway(
        wan_ifname="wan",
        lan6=(ipaddress.IPv6Network("fd00:1::/64"),),
        wan6=WAN6,
        private6=(
            ipaddress.IPv6Network("2001:db8:5::/48"),
            ipaddress.IPv6Network("2001:db8:5:1::/64"),
            ipaddress.IPv6Network("2001:db8:7::/48"),
        ),
    )
    script = Peers6(gw).update([])
    assert "flags interval" in script
    assert "elements = { 2001:db8:5::/48, 2001:db8:7::/48 }" in script
    assert (
        'oifname "wan" ip6 saddr { fd00:1::/64 } ip6 daddr @oe_private6 snat ip6 to 2001:db8:1::2'
    ) in script


def test_no_private_ipv6_networks_leaves_the_set_empty() -> None:
    script = Peers6(_gw()).update([])
    private = script[script.index("set oe_private6") : script.index("chain srcnat")]
    assert "elements" not in private
