"""Conntrack over netlink: forget a lost WAN address's flows; read the flows for a view.

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

import ipaddress
import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING

from oe_router.datapath.base import IPAddress

if TYPE_CHECKING:
    from oe_router.devview import Flow

__all__ = ["forget_address", "read_flows"]

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


def read_flows(limit: int) -> tuple[list[Flow], int, bool]:
    """Up to ``limit`` conntrack entries' original tuples (``oe status --device``): the
    flows, how many entries were read, and whether more were left unread. One dump per
    call, on demand (never per packet). Blocking: run it in a thread. Raises OSError
    when conntrack cannot be read (no module, no permission)."""
    try:
        from pyroute2.conntrack import Conntrack
    except ImportError as exc:  # pragma: no cover - a runtime dependency
        raise OSError(f"pyroute2's conntrack is missing ({exc})") from None
    from oe_router.devview import Flow  # a request's, not the start's (docs/footprint.md)

    flows: list[Flow] = []
    read = 0
    truncated = False
    try:
        with Conntrack() as ct:
            for entry in ct.dump_entries():
                if read >= limit:
                    truncated = True
                    break
                read += 1
                t = entry.tuple_orig
                try:
                    src, dst = ipaddress.ip_address(t.saddr), ipaddress.ip_address(t.daddr)
                except ValueError:
                    continue
                dport = t.dport if t.proto in (6, 17, 132) else None
                flows.append(Flow(src, dst, int(t.proto or 0), dport))
    except OSError:
        raise
    except Exception as exc:  # pyroute2's NetlinkError and parse errors
        raise OSError(str(exc)) from None
    return flows, read, truncated
