"""An established Child SA as the datapath's install request (keys, selectors, encap).

Why here: the conversion needs both the IKE events and the datapath's types, and
neither layer may import the other; OE, which drives both, owns the translation.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from oe_router.datapath import base as dp
from oe_router.ike.events import ChildSaEstablished
from oe_router.ike.payloads import TrafficSelector

__all__ = ["child_sa_spec"]


def _dp_selectors(ts: Iterable[TrafficSelector]) -> tuple[dp.TrafficSelector, ...]:
    out: list[dp.TrafficSelector] = []
    for t in ts:
        full = (t.start_port, t.end_port) == (0, 65535)
        if not full and t.start_port != t.end_port:
            raise dp.DatapathError(f"port range {t.start_port}-{t.end_port} has no XFRM selector")
        port = None if full else t.start_port
        for net in ipaddress.summarize_address_range(t.start, t.end):
            out.append(dp.TrafficSelector(net, t.ip_protocol, port))
    return tuple(out)


def child_sa_spec(
    child: ChildSaEstablished,
    local: str,
    remote: str,
    *,
    local_natt_port: int = 4500,
    remote_natt_port: int = 4500,
) -> dp.ChildSaSpec:
    """The datapath's install request for an established Child SA (keys, selectors, encap)."""
    integ = dp.integ_algorithm(child.integ) if child.integ is not None else None
    return dp.ChildSaSpec(
        local=ipaddress.ip_address(local),
        remote=ipaddress.ip_address(remote),
        inbound=dp.SaKeys(
            int.from_bytes(child.spi_in, "big"), child.encr_key_in, child.integ_key_in
        ),
        outbound=dp.SaKeys(
            int.from_bytes(child.spi_out, "big"), child.encr_key_out, child.integ_key_out
        ),
        encr=dp.encr_algorithm(child.encr),
        integ=integ,
        mode=dp.Mode.TRANSPORT if child.mode == "transport" else dp.Mode.TUNNEL,
        local_ts=_dp_selectors(child.ts_local),
        remote_ts=_dp_selectors(child.ts_remote),
        encap=dp.NatTEncap(local_natt_port, remote_natt_port) if child.udp_encap else None,
        esn=child.esn,
    )
