"""IkeNegotiator: the OE manager's Negotiator over two real IkeServices on loopback.

Why: it is the one place where Child SAs reach the OE manager, so these check that a
negotiated Child SA comes back as a complete spec and is NOT also handed to the inbound path
(no double install), that the peer's side arrives through adopt_inbound, that a second
request rides the same IKE SA, that a peer's DELETE reaches peer_deleted, and that a peer
which stops answering reaches liveness_failed (once, instead of per-Child-SA deletes).
"""

from __future__ import annotations

import asyncio
import ipaddress
from contextlib import asynccontextmanager
from typing import Any

from oe_router.config.schema import IkeConfig, OeConfig
from oe_router.datapath.base import ChildSaSpec, IPAddress
from oe_router.ike.service import IkeService
from oe_router.oe.negotiator import IkeNegotiator
from tests.aio import stopping
from tests.ike_loop import linked
from tests.oe_loopback import LO, Inbound, request


@asynccontextmanager
async def pair(config_a: OeConfig | None = None) -> Any:
    a = IkeService([str(LO)], ike_port=0, natt_port=0)
    b = IkeService([str(LO)], ike_port=0, natt_port=0)
    ia, ib = Inbound(), Inbound()
    na, nb = IkeNegotiator(a, ia), IkeNegotiator(b, ib)
    async with stopping(na, nb), linked(a, b, config_a):
        yield na, nb, ia, ib


def test_negotiate_returns_a_complete_spec_once_and_the_peer_adopts_its_side() -> None:
    async def go() -> None:
        async with pair() as (na, _nb, ia, ib):
            result = await na.negotiate(request(), 0.0)
            assert result.error is None and result.child_sa is not None
            spec = result.child_sa
            assert spec.local == spec.remote == LO
            assert spec.remote_ts[0].net == ipaddress.ip_network("127.0.0.1/32")
            await asyncio.sleep(0.05)
            assert ia.adopted == []  # ours goes back to the manager only: no double install
            ((peer, theirs),) = ib.adopted  # the responder's side through adopt_inbound
            assert peer == LO
            assert theirs.inbound.spi == spec.outbound.spi
            assert theirs.outbound.encr_key == spec.inbound.encr_key
            # a second flow rides the same IKE SA (CREATE_CHILD_SA), not a new one
            again = await na.negotiate(request(), 0.0)
            assert again.child_sa is not None
            assert again.child_sa.inbound.spi != spec.inbound.spi
            assert len(na.ike.sas) == 1
            # our DELETE of the first Child SA reaches the peer's OE side as peer_deleted
            await na.delete(LO, spec)
            await asyncio.sleep(0.1)
            assert (LO, [spec.inbound.spi]) in ib.deleted

    asyncio.run(go())


def test_negotiate_failure_is_a_result_with_the_reason() -> None:
    async def go() -> None:
        async with pair() as (na, _nb, _ia, _ib):
            na.ike.up_timeout = 2.0
            na.ike.remote_ike_port = 9  # nobody answers IKE there
            na.ike.config = OeConfig()
            result = await na.negotiate(request(), 0.0)
            assert result.child_sa is None and result.error
            assert "127.0.0.1" in result.error

    asyncio.run(go())


def test_a_peer_that_stops_answering_reaches_liveness_failed_once() -> None:
    """The peer's endpoint goes silent (no DELETE): our liveness check goes unanswered, the
    OE side gets liveness_failed for the peer exactly once and no per-Child-SA
    peer_deleted, the IKE SA is gone, and the manager's best-effort DELETE of the whole
    IKE SA afterwards returns at once instead of waiting on the dead peer."""

    async def go() -> None:
        fast = IkeConfig(dpd_delay=0.3, retransmit_timeout=0.1, retransmit_tries=2)
        async with pair(OeConfig(ike=fast)) as (na, nb, ia, _ib):
            first = await na.negotiate(request(), 0.0)
            second = await na.negotiate(request(), 0.0)
            assert first.child_sa is not None and second.child_sa is not None
            await asyncio.sleep(0.5)  # checks are answered while the peer lives
            assert ia.dead == [] and len(na.ike.sas) == 1
            assert nb.ike.endpoint is not None
            await nb.ike.endpoint.stop()  # silent: no DELETE, no answers
            for _ in range(60):
                if ia.dead:
                    break
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.2)
            assert ia.dead == [LO]
            assert ia.deleted == []  # both Child SAs covered by the one liveness event
            assert na.ike.sas == []
            t0 = asyncio.get_running_loop().time()
            await na.delete(LO, None)
            assert asyncio.get_running_loop().time() - t0 < 0.2

    asyncio.run(go())


def test_a_dead_ike_sa_beside_a_live_one_only_deletes_its_own_child_sas() -> None:
    """The peer restarted and came back on a new IKE SA before the old one's check gave up:
    the old one's Child SAs go as a DELETE, and the peer is NOT reported dead (that would
    tear down the new tunnel and shunt the peer)."""
    from types import SimpleNamespace

    from oe_router.ike.events import ChildSaDeleted

    async def go() -> None:
        ike = IkeService([str(LO)], ike_port=0, natt_port=0)
        inbound = Inbound()
        neg = IkeNegotiator(ike, inbound)

        def sa(state: str) -> Any:
            return SimpleNamespace(peer="127.0.0.1", state=state)

        dead, fresh = sa("failed"), sa("established")
        gone = (ChildSaDeleted(b"\x00\x00\x00\x01", b"\x00\x00\x00\x02"),)
        ike.sas = [fresh]
        neg.peer_dead(dead, gone)
        await asyncio.sleep(0.01)
        assert inbound.deleted == [(LO, [2])] and inbound.dead == []
        ike.sas = []  # no other IKE SA: the peer is dead
        neg.peer_dead(dead, gone)
        await asyncio.sleep(0.01)
        assert inbound.dead == [LO]
        await neg.stop()

    asyncio.run(go())


def test_a_child_sa_whose_ike_sa_went_before_its_install_is_not_installed() -> None:
    """The responder's install job runs after the handler: if the IKE SA failed in
    between (the initiator refused our signature after our IKE_AUTH answer), the Child
    SA is not installed, so it cannot black-hole the peer's cleartext meanwhile."""

    class SlowInbound(Inbound):
        def __init__(self) -> None:
            super().__init__()
            self.gate = asyncio.Event()

        async def adopt_inbound(self, peer: IPAddress, spec: ChildSaSpec) -> None:
            await self.gate.wait()  # a slow install of an earlier Child SA, say
            await super().adopt_inbound(peer, spec)

    async def go() -> None:
        async with pair() as (na, nb, _ia, _ib):
            slow = SlowInbound()
            nb.inbound = slow
            first = await na.negotiate(request(), 0.0)  # b's adopt now waits at the gate
            assert first.child_sa is not None
            second = await na.negotiate(request(), 0.0)  # queued behind the first
            assert second.child_sa is not None
            (p,) = nb.ike.sas
            nb.ike.sas.remove(p)  # its IKE SA is gone before the queued job runs
            slow.gate.set()
            await asyncio.sleep(0.1)
            installed = {spec.inbound.spi for _, spec in slow.adopted}
            assert first.child_sa.outbound.spi in installed  # was already installing
            assert second.child_sa.outbound.spi not in installed

    asyncio.run(go())
