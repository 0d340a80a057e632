"""Forget the conntrack entries of a WAN address the router no longer has.

Why: LAN flows are source-NATed to the WAN address with a fixed ``snat`` (``oe/lan.py``),
and the router's own IKE and ESP flows start from it. When the address goes (a new DHCP
lease, a PPPoE reconnect), conntrack keeps NATing an existing flow's packets to the old
address until the entry times out (UDP: minutes), so a VoIP stream or a game's UDP flow
stays dead although new flows work. The kernel does this itself only for masqueraded
flows (nf_nat_masquerade's address notifier). Deleting every entry whose reply goes to
the old address makes the next packet of such a flow a new connection, NATed to the new
address. A TCP connection cannot survive the change of its source either way.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from oe_router.datapath.base import IPAddress

__all__ = ["forget_address"]

log = logging.getLogger("oe_router.daemon")


def forget_address(addresses: Iterable[IPAddress]) -> int:
    """Delete the conntrack entries whose reply is addressed to one of ``addresses``
    (flows NATed to, or started from, them); how many went. Blocking: run it in a thread.
    Without netfilter's conntrack netlink (no module, no permission) one log line, 0."""
    addresses = tuple(addresses)
    gone = 0
    try:
        from pyroute2.conntrack import Conntrack
        from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple
    except ImportError:  # pragma: no cover - a runtime dependency
        return 0
    try:
        with Conntrack() as ct:
            for addr in addresses:
                family = 2 if addr.version == 4 else 10
                want = NFCTAttrTuple(family=family, daddr=str(addr))
                for entry in list(ct.dump_entries(tuple_reply=want)):
                    try:
                        ct.delete(entry)
                        gone += 1
                    except Exception:  # the entry went meanwhile
                        continue
    except Exception as exc:
        where = ", ".join(map(str, addresses))
        log.warning("conntrack: cannot forget the flows of %s (%s)", where, exc)
    return gone
