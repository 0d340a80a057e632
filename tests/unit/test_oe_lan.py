"""The LAN gateway's nft script: pure text, checked line by line."""

from __future__ import annotations

import ipaddress

import pytest

from oe_router.oe.lan import LanError, LanGateway, nft_script, peers6_update


def _gw(**kw: object) -> LanGateway:
    base: dict[str, object] = {
        "wan_ifname": "wan",
        "lan4": (ipaddress.IPv4Network("192.168.1.0/24"),),
        "lan6": (ipaddress.IPv6Network("2001:db8:1::/64"),),
        "wan4": ipaddress.IPv4Address("198.51.100.1"),
        "wan6": ipaddress.IPv6Address("2001:db8:ff::1"),
    }
    base.update(kw)
    return LanGateway(**base)  # type: ignore[arg-type]


def test_script_replaces_the_table_atomically_and_nats_lan_to_wan() -> None:
    s = nft_script(_gw(), [ipaddress.IPv6Address("2001:db8::7")])
    lines = [line.strip() for line in s.splitlines()]
    assert lines[:3] == ["table inet oe_router", "delete table inet oe_router",
                         "table inet oe_router {"]  # fmt: skip
    assert "elements = { 2001:db8::7 }" in lines
    assert (
        'oifname "wan" ip saddr { 192.168.1.0/24 } ip daddr @oe_private4 '
        "snat ip to 198.51.100.1" in lines
    )
    # the rest is masqueraded: the kernel drops its NAT when the WAN's address goes
    assert 'oifname "wan" ip saddr { 192.168.1.0/24 } masquerade' in lines
    # with the userspace datapath's TUN: a fixed SNAT there and on the WAN
    tun = nft_script(_gw(tunnel_ifnames=("oe-esp0",)))
    assert 'oifname "oe-esp0" ip saddr { 192.168.1.0/24 } snat ip to 198.51.100.1' in tun
    assert 'oifname "wan" ip saddr { 192.168.1.0/24 } snat ip to 198.51.100.1' in tun
    assert "masquerade" not in tun
    assert (
        'oifname "wan" ip6 saddr { 2001:db8:1::/64 } ip6 daddr @oe_peers6 '
        "snat ip6 to 2001:db8:ff::1" in lines
    )
    # before fw4's own srcnat (priority 100), so it holds with masquerading off too
    assert "type nat hook postrouting priority srcnat - 5; policy accept;" in lines


def test_a_family_without_a_wan_address_gets_no_rule() -> None:
    s = nft_script(_gw(wan6=None))
    assert "snat ip6" not in s and "snat ip to" in s
    assert "elements" not in s


def test_peer_set_updates() -> None:
    a, b = ipaddress.IPv6Address("2001:db8::7"), ipaddress.IPv6Address("2001:db8::8")
    assert peers6_update(_gw(), add=[b, a], remove=[a]) == (
        "add element inet oe_router oe_peers6 { 2001:db8::7, 2001:db8::8 }\n"
        "delete element inet oe_router oe_peers6 { 2001:db8::7 }\n"
    )
    assert peers6_update(_gw()) == ""


def test_bad_interface_name_is_refused_naming_it() -> None:
    with pytest.raises(LanError, match=r"WAN interface name 'wan; flush ruleset'"):
        _gw(wan_ifname="wan; flush ruleset")


def test_the_stopped_form_keeps_private_on_the_old_address_and_masquerades_the_rest() -> None:
    """After a stop the table stays; the WAN may change before the daemon is back. Flows to
    "private" networks keep the address their persistent traps match (dropped, never
    clear); every other LAN flow follows the WAN's address of the moment."""
    gw = _gw(private4=(ipaddress.IPv4Network("10.8.0.0/16"), ipaddress.IPv4Network("10.8.1.0/24")),
             tunnel_ifnames=("oe-esp0",), stopped=True)  # fmt: skip
    lines = [line.strip() for line in nft_script(gw).splitlines()]
    assert "elements = { 10.8.0.0/16 }" in lines  # collapsed: nft refuses overlaps
    assert (
        'oifname "wan" ip saddr { 192.168.1.0/24 } ip daddr @oe_private4 '
        "snat ip to 198.51.100.1" in lines
    )
    assert 'oifname "wan" ip saddr { 192.168.1.0/24 } masquerade' in lines
    assert not any("oe-esp0" in line and "ip saddr" in line for line in lines)  # TUN gone
