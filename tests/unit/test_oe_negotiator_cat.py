"""IkeNegotiator with CAT, over two real IkeServices on loopback: the CP request, an inner
address coming back as ``NegotiationResult.inner``, and the fallback for a peer that refuses
the first Child SA of a CP request but keeps the IKE SA (strongSwan without pools does that,
with INTERNAL_ADDRESS_FAILURE; here a responder that takes only its peer's exact address).
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
from contextlib import asynccontextmanager
from typing import Any

from oe_router.ike.sa import Address, IkeSaConfig
from oe_router.ike.selectors import ContainmentPolicy
from oe_router.ike.service import IkeService
from oe_router.oe.negotiator import IkeNegotiator
from tests.aio import stopping
from tests.ike_loop import linked
from tests.oe_loopback import LO, Inbound, request


class Responder(IkeService):
    """Our IKE service as a responder with an address pool or strict selectors."""

    def __init__(self, pool: tuple[str, ...] = (), strict: bool = False, **kw: Any) -> None:
        super().__init__([str(LO)], ike_port=0, natt_port=0, **kw)
        self.pool, self.strict = pool, strict

    def _responder_config(self, local: Address, remote: Address) -> IkeSaConfig | None:
        cfg = super()._responder_config(local, remote)
        assert cfg is not None
        if self.strict:  # exactly the peer's address on its side, or TS_UNACCEPTABLE
            strict = ContainmentPolicy(narrow=False)
            return dataclasses.replace(cfg, containment=strict)
        return dataclasses.replace(cfg, internal_addresses=self.pool)


@asynccontextmanager
async def pair(responder: Responder, cat: bool = True) -> Any:
    a = IkeService([str(LO)], ike_port=0, natt_port=0)
    ia = Inbound()
    na = IkeNegotiator(a, ia, cat=cat)
    IkeNegotiator(responder, Inbound())
    async with stopping(na), linked(a, responder, mutual=False):
        yield na, a


def test_a_pool_peer_gives_an_inner_address_and_narrows_our_side_to_it() -> None:
    async def go() -> None:
        async with pair(Responder(pool=("10.9.0.7",))) as (na, _a):
            result = await na.negotiate(request(), 0.0)
            assert result.error is None and result.child_sa is not None
            inner = ipaddress.ip_address("10.9.0.7")
            assert result.inner == inner
            assert [ts.net for ts in result.child_sa.local_ts] == [ipaddress.ip_network(inner)]
            assert result.child_sa.local == LO  # the outer (tunnel) address stays ours

    asyncio.run(go())


def test_a_peer_without_a_pool_keeps_us_host_to_host() -> None:
    async def go() -> None:
        async with pair(Responder()) as (na, _a):
            result = await na.negotiate(request(), 0.0)
            assert result.error is None and result.child_sa is not None
            assert result.inner is None
            assert [ts.net for ts in result.child_sa.local_ts] == [ipaddress.ip_network(LO)]

    asyncio.run(go())


def test_a_peer_refusing_the_cp_child_sa_gets_a_host_to_host_one_on_the_same_ike_sa() -> None:
    async def go() -> None:
        async with pair(Responder(strict=True)) as (na, a):
            result = await na.negotiate(request(), 0.0)
            assert result.error is None and result.child_sa is not None, result.error
            assert result.inner is None
            assert [ts.net for ts in result.child_sa.local_ts] == [ipaddress.ip_network(LO)]
            (p,) = a.sas  # one IKE SA: the Child SA came by CREATE_CHILD_SA on it
            assert len(p.children) == 1
            # that peer is not asked again: a new IKE SA after `down` goes without CP
            await a.down(str(LO))
            again = await na.negotiate(request(), 1.0)
            assert again.child_sa is not None and again.error is None
            (p2,) = a.sas
            assert not p2.handle.sa.config.request_internal_address

    asyncio.run(go())


def test_cat_off_sends_no_cp_request() -> None:
    async def go() -> None:
        async with pair(Responder(pool=("10.9.0.7",)), cat=False) as (na, a):
            result = await na.negotiate(request(), 0.0)
            assert result.child_sa is not None and result.inner is None
            (p,) = a.sas
            assert not p.handle.sa.config.request_internal_address

    asyncio.run(go())
