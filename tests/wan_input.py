"""What the lab router's WAN input may accept: the rules (by name, as fw4 comments them)
of OpenWrt's default firewall (qemu/guest/router/etc/config/firewall) that accept input
from wan, and the package's two (files/etc/uci-defaults/90_oe-firewall). The host tier
checks fw4's rendering against it, the QEMU tier the router's live table."""

from __future__ import annotations

#: OpenWrt's default input rules from wan: DHCP(v6) replies, ping, IGMP, MLD, ICMPv6.
OPENWRT_DEFAULT = frozenset(
    {
        "Allow-DHCP-Renew",
        "Allow-Ping",
        "Allow-IGMP",
        "Allow-DHCPv6",
        "Allow-MLD",
        "Allow-ICMPv6-Input",
    }
)
#: The package's rules: IKE (UDP 500, 4500) and ESP.
PACKAGE = frozenset({"Allow-OE-IKE", "Allow-OE-ESP"})
#: All that fw4's input_wan chain may accept once the package is installed.
ACCEPTED = OPENWRT_DEFAULT | PACKAGE
