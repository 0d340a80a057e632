"""Who the DNS front answers: the LAN, never the WAN (sans-IO, no sockets here).

Why its own module: the front is a resolver that triggers IKE negotiations, so a
query from outside the LAN is an attack surface (amplification, tunnel churn on the
router's behalf). The rules are pure functions of the client's address, the local
address the query was sent to and the interface it came in on; front.py reads those
off the socket and asks here. The daemon fills ``LanAccess`` from the same probe the
OE service uses (``platform.Platform``: the LAN interface's prefixes, the WAN's
addresses), so both agree on what the LAN is.

The rules, first match wins:

1. arrived on the WAN interface, or sent to a WAN address: DROP (no reply at all, so
   a spoofed source is never sent anything);
2. the listener is bound to a loopback address, or the query came in over ``lo`` or
   from a loopback address: ANSWER (only this machine reaches those);
3. the client is in a LAN prefix, or is link-local on the LAN interface: ANSWER;
4. anything else: REFUSE (REFUSED over UDP; a TCP connection is closed).
"""

from __future__ import annotations

import enum
import ipaddress

from oe_router.config.schema import Endpoint
from oe_router.records import record

__all__ = ["IPAddress", "IPNetwork", "LanAccess", "Verdict", "client_address"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_LOOPBACK_IF = "lo"


class Verdict(enum.Enum):
    ANSWER = "answer"
    #: a REFUSED reply over UDP; over TCP the connection is closed (``refused_not_lan``)
    REFUSE = "refuse"
    #: no reply at all: it came over the WAN (``dropped_wan``)
    DROP = "drop"


def client_address(text: str) -> IPAddress | None:
    """A socket's address text as an address: zone index dropped, IPv4-mapped unwrapped."""
    try:
        addr = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


@record(frozen=True)
class LanAccess:
    """The LAN and the WAN as the daemon's platform probe found them at start.

    The default (nothing known) answers loopback clients only on a non-loopback
    listener: without LAN prefixes nobody else can be told apart from the Internet.
    """

    lan: tuple[IPNetwork, ...] = ()
    wan_addresses: tuple[IPAddress, ...] = ()
    #: the LAN's and the WAN's Linux devices (``platform`` resolved the configured networks)
    lan_interface: str = ""
    wan_devices: tuple[str, ...] = ()

    def listen_problem(self, endpoint: Endpoint) -> str | None:
        """Why the front must not listen on ``endpoint`` (a WAN address), or None."""
        addr = client_address(endpoint.host)
        if addr is not None and addr in self.wan_addresses:
            return (
                f"{endpoint} is an address of the WAN ({', '.join(self.wan_devices) or '?'};"
                " oe.global.wan_interface); the DNS front answers the LAN only: listen on"
                " a LAN or loopback address"
            )
        return None

    def open_listener(self, host: str) -> bool:
        """Whether a listener bound to ``host`` answers everyone (loopback: this machine only)."""
        addr = client_address(host)
        return addr is not None and addr.is_loopback

    def verdict(self, client: IPAddress, local: IPAddress | None, ifname: str | None) -> Verdict:
        """The rules above for one query. ``local``/``ifname`` None: not known (TCP)."""
        if ifname is not None and ifname in self.wan_devices:
            return Verdict.DROP
        if local is not None and local in self.wan_addresses:
            return Verdict.DROP
        if ifname == _LOOPBACK_IF or client.is_loopback:
            return Verdict.ANSWER
        if (local is not None and local.is_loopback) or any(client in net for net in self.lan):
            return Verdict.ANSWER
        if client.is_link_local and ifname is not None and ifname == self.lan_interface:
            return Verdict.ANSWER
        return Verdict.REFUSE

    def describe(self) -> str:
        """For ``oe status`` and the start log: what is answered."""
        nets = ", ".join(map(str, self.lan)) or "none"
        return f"loopback and {self.lan_interface or '?'} ({nets})"
