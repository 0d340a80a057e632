"""datapath.sa_table: the reqids it hands out, kept by count rather than rebuilt per install.

The workers are left out (a pool that accepts every install); what is observable is the
reqid each installed spec comes back with.
"""

from __future__ import annotations

import asyncio
import ipaddress
from typing import Any

from oe_router.datapath.base import ChildSaSpec, SaKeys, TrafficSelector, encr_algorithm
from oe_router.datapath.sa_table import _FIRST_REQID, SaTable

WAN = ipaddress.IPv4Address("203.0.113.2")
PEER = ipaddress.IPv4Address("198.51.100.7")


class _Pool:
    """Accepts every worker message (the SA table only needs installs and sends)."""

    async def install(self, role: str, msg: dict[str, Any]) -> None:
        return None

    def send(self, role: str, msg: dict[str, Any]) -> None:
        return None


def _spec(spi: int, reqid: int = 0) -> ChildSaSpec:
    host = TrafficSelector(ipaddress.ip_network(PEER))
    return ChildSaSpec(
        WAN, PEER, SaKeys(spi, bytes(36)), SaKeys(spi + 1, bytes(36)), encr_algorithm(20),
        local_ts=(TrafficSelector(ipaddress.ip_network(WAN)),), remote_ts=(host,), reqid=reqid,
    )  # fmt: skip


def test_reqids_skip_those_in_use_and_follow_detach() -> None:
    async def run() -> None:
        table = SaTable(_Pool(), replay_window=64, clock=lambda: 0.0)  # type: ignore[arg-type]
        a = await table.install(_spec(0x1000))
        assert a.reqid == _FIRST_REQID
        # two SAs share an explicit reqid (a rekey's old and new): it stays in use
        # until both are gone
        b = await table.install(_spec(0x2000, reqid=_FIRST_REQID + 1))
        b2 = await table.install(_spec(0x3000, reqid=_FIRST_REQID + 1))
        c = await table.install(_spec(0x4000))
        assert c.reqid == _FIRST_REQID + 2
        table.detach(b)
        table._next_reqid = _FIRST_REQID + 1  # as if the counter came round again
        d = await table.install(_spec(0x5000))
        assert d.reqid == _FIRST_REQID + 3  # +1 still held by b2, +2 by c
        table.detach(b2)
        table.detach(c)
        table._next_reqid = _FIRST_REQID + 1
        e = await table.install(_spec(0x6000))
        assert e.reqid == _FIRST_REQID + 1  # free again
        # installing over the same (local, SPI) replaces the entry and its reqid
        await table.install(_spec(0x6000, reqid=_FIRST_REQID + 9))
        table._next_reqid = _FIRST_REQID + 1
        f = await table.install(_spec(0x7000))
        assert f.reqid == _FIRST_REQID + 1
        assert sorted(s.reqid for s in table.specs()) == sorted(
            [a.reqid, d.reqid, _FIRST_REQID + 9, f.reqid]
        )

    asyncio.run(run())
