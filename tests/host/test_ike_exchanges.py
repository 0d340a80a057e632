"""The second half of IKEv2 over real UDP between network namespaces.

CREATE_CHILD_SA (Child SA rekey with PFS, IKE SA rekey, simultaneous-rekey
collisions), INFORMATIONAL (Child SA delete, liveness checks), INVALID_KE_PAYLOAD
retries, COOKIEs and RFC 7383 fragmentation: ours with ours, and ours with real
strongSwan charon 5.9.8 (kernel-libipsec) in both roles. Every test is bounded
by short lifetimes (seconds) and asserts what the peers report: SPIs in
``swanctl --list-sas``, Child SA keys equal to charon's level-4 key log, charon's
own log lines for the exchanges it saw, and our service's events and rows.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from oe_router.config.schema import IkeConfig, OeConfig
from oe_router.ike.events import ChildSaEstablished, ChildSaRekeyed
from oe_router.ike.payloads import TrafficSelector
from oe_router.ike.service import IkeService, PeerSa, RecordingSink

from .charon import available, namespaces

pytestmark = pytest.mark.host

TCP, UDP, ICMP = 6, 17, 1


@pytest.fixture(scope="module", autouse=True)
def _need_netns() -> None:
    why = available()
    if why is not None:
        pytest.skip(f"IKE exchanges over netns: {why}")


# --------------------------------------------------------------------------- helpers


async def until(what: str, cond: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll ``cond`` (every 20 ms) until it holds; fail naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for: {what}")
        await asyncio.sleep(0.02)


def ike_config(**kw: Any) -> OeConfig:
    """Fast retransmits, no liveness checks unless asked, and the given lifetimes."""
    base: dict[str, Any] = {"retransmit_timeout": 0.3, "retransmit_tries": 3, "dpd_delay": 0.0}
    return OeConfig(ike=IkeConfig(**(base | kw)))


def service(ns: str, address: str, **kw: Any) -> IkeService:
    return IkeService([address], netns=ns, **kw)


def sink(svc: IkeService) -> RecordingSink:
    assert isinstance(svc.sink, RecordingSink)
    return svc.sink


def only(svc: IkeService) -> PeerSa:
    """The one IKE SA ``svc`` holds."""
    assert len(svc.sas) == 1, [p.state for p in svc.sas]
    return svc.sas[0]


def children(svc: IkeService) -> dict[bytes, ChildSaEstablished]:
    return {spi: c.event for p in svc.sas for spi, c in p.children.items()}


def pairs_agree(a: IkeService, b: IkeService) -> bool:
    """Each side holds the mirror image of the other's Child SAs (SPIs and keys)."""
    ca, cb = children(a), children(b)
    if not ca or len(ca) != len(cb):
        return False
    for spi_in, ev in ca.items():
        peer = cb.get(ev.spi_out)
        if peer is None or peer.spi_out != spi_in:
            return False
        if (ev.encr_key_in, ev.encr_key_out) != (peer.encr_key_out, peer.encr_key_in):
            return False
    return True


def ike_spis(svc: IkeService) -> str:
    return only(svc).handle.sa.spis()[0][0].hex() + only(svc).handle.sa.spis()[0][1].hex()


def host_ts(address: str, proto: int = 0, port: int | None = None) -> TrafficSelector:
    ip = ipaddress.ip_address(address)
    lo, hi = (0, 65535) if port is None else (port, port)
    return TrafficSelector.from_range(ip, ip, proto, lo, hi)


def flush(svc: IkeService, p: PeerSa) -> None:
    assert svc.endpoint is not None
    svc.endpoint.flush(p.handle)


# --------------------------------------------------------------------------- ours <-> ours


@pytest.fixture(scope="module")
def pair_ns() -> Iterator[tuple[str, str]]:
    with namespaces("x") as net:
        a, b = net.add("a"), net.add("b")
        net.link(a, "10.0.3.1/24", b, "10.0.3.2/24")
        yield a, b


A, B = "10.0.3.1", "10.0.3.2"


def test_ours_with_ours_command_stream(pair_ns: tuple[str, str]) -> None:
    """One IKE SA carries four Child SAs (different protocol/port selectors); both sides
    rekey two of them at once (PFS), both sides rekey the IKE SA (the Child SAs move
    with it), one side deletes a Child SA, and a liveness check is answered."""

    async def go() -> None:
        a, b = service(pair_ns[0], A), service(pair_ns[1], B)
        await a.start(ike_config())
        await b.start(ike_config())
        try:
            p = await a.up(B)
            sa = p.handle.sa
            for proto, port in ((TCP, 80), (UDP, 53), (ICMP, None)):
                sa.create_child((host_ts(A, proto),), (host_ts(B, proto, port),), False, a.now())
            flush(a, p)
            await until("4 Child SAs on both sides", lambda: len(children(b)) == 4)
            assert pairs_agree(a, b)
            assert {ev.ts_remote[0].ip_protocol for ev in children(a).values()} == {
                0,
                TCP,
                UDP,
                ICMP,
            }
            q = only(b)
            assert q.handle.sa is not sa and q.handle.sa.spis()[0] == sa.spis()[0]

            # rekeys from both ends at once: a two, b the other two
            before = set(children(a))
            a_spis = sorted(before)
            for spi in a_spis[:2]:
                sa.rekey_child(spi, a.now())
            for spi in a_spis[2:]:
                q.handle.sa.rekey_child(children(a)[spi].spi_out, b.now())
            flush(a, p)
            flush(b, q)
            await until(
                "all four Child SAs replaced on both sides",
                lambda: not (set(children(a)) & before) and len(children(a)) == 4
                and pairs_agree(a, b),
            )  # fmt: skip
            rekeyed = [ev for _, ev in sink(a).established if isinstance(ev, ChildSaRekeyed)]
            assert {ev.old_spi_in for ev in rekeyed} == before
            assert len(sink(a).deleted) == 4 and len(sink(b).deleted) == 4

            # IKE SA rekeyed by a, then by b: Child SAs move, SPIs stay
            kids = set(children(a))
            for svc, peer in ((a, p), (b, q)):
                old = ike_spis(a)
                peer.handle.sa.rekey(svc.now())
                flush(svc, peer)
                await until(
                    "IKE SA rekeyed on both sides",
                    lambda old=old: ike_spis(a) != old and ike_spis(a) == ike_spis(b),  # type: ignore[misc]
                )
                assert set(children(a)) == kids and pairs_agree(a, b)
            assert only(a).handle.sa.is_initiator is False  # b sent the last rekey

            # b deletes one Child SA
            gone = sorted(children(b))[0]
            q.handle.sa.delete_child(gone, b.now())
            flush(b, q)
            await until("3 Child SAs on both sides", lambda: len(children(a)) == 3)
            assert pairs_agree(a, b) and gone not in children(b)

            # liveness check from a, answered by b
            ea, eb = a.endpoint, b.endpoint
            assert ea is not None and eb is not None
            for _ in range(2):  # the second check is only allowed once the first is answered
                rx = (ea.counters.received + 1, eb.counters.received + 1)
                sa.send_liveness_check(a.now())
                flush(a, p)
                await until(
                    "the check answered",
                    lambda rx=rx: (ea.counters.received, eb.counters.received) == rx,  # type: ignore[misc]
                )
            assert sa.state == "established" and p.error is None

            assert await a.down(B) == 1
            await until("b saw the Delete", lambda: b.sas == [])
        finally:
            await a.stop()
            await b.stop()

    asyncio.run(go())


def test_ours_with_ours_simultaneous_rekeys(pair_ns: tuple[str, str]) -> None:
    """Both ends rekey the same Child SA in the same instant (RFC 7296 §2.8.1: the
    SA with the lowest nonce is redundant and deleted), then the IKE SA (§2.8.2)."""

    async def go() -> None:
        a, b = service(pair_ns[0], A), service(pair_ns[1], B)
        await a.start(ike_config())
        await b.start(ike_config())
        try:
            p = await a.up(B)
            await until("b has the Child SA", lambda: len(children(b)) == 1)
            q = only(b)
            (old,) = children(a)
            p.handle.sa.rekey_child(old, a.now())
            q.handle.sa.rekey_child(children(a)[old].spi_out, b.now())
            flush(a, p)
            flush(b, q)  # both requests are on the wire before either is answered
            await until(
                "one surviving Child SA on both sides",
                lambda: len(children(a)) == 1 and old not in children(a) and pairs_agree(a, b)
                and len(sink(a).deleted) == 2 and len(sink(b).deleted) == 2,
            )  # fmt: skip
            # the collision made two new pairs on each side: one survived, one was redundant
            assert len(sink(a).established) == 3 and len(sink(b).established) == 3
            await asyncio.sleep(0.2)
            assert len(children(a)) == 1 and pairs_agree(a, b)

            spis = ike_spis(a)
            p.handle.sa.rekey(a.now())
            q.handle.sa.rekey(b.now())
            flush(a, p)
            flush(b, q)
            await until(
                "IKE SA rekeyed once on both sides",
                lambda: ike_spis(a) != spis and ike_spis(a) == ike_spis(b),
            )
            await asyncio.sleep(0.2)
            assert ike_spis(a) == ike_spis(b) and pairs_agree(a, b)
            assert p.error is None and q.error is None
            # the IKE SA that lost the collision is deleted: only the winner answers
            assert len(p.handle.sa.spis()) == 1 and len(q.handle.sa.spis()) == 1
            await a.down(B)
        finally:
            await a.stop()
            await b.stop()

    asyncio.run(go())


def test_ours_with_ours_equal_lifetimes(pair_ns: tuple[str, str]) -> None:
    """Both sides with the same short lifetimes and no jitter (child 3 s, IKE 4.5 s,
    rekey 1 s before): both rekey at about the same moment, from their own timers;
    whatever collides, one consistent Child SA and IKE SA remain, nothing expires."""

    async def go() -> None:
        cfg = ike_config(child_lifetime=3.0, ike_lifetime=4.5, rekey_margin=1.0, rekey_jitter=0)
        a, b = service(pair_ns[0], A), service(pair_ns[1], B)
        await a.start(cfg)
        await b.start(cfg)
        try:
            p = await a.up(B)
            t0 = time.monotonic()
            await until("b has the Child SA", lambda: len(children(b)) == 1)
            (first,) = children(a)
            spis = ike_spis(a)
            await until(
                "Child SA rekeyed by the timers",
                lambda: first not in children(a) and pairs_agree(a, b),
                timeout=3.0,
            )
            assert time.monotonic() - t0 < 3.0, "the Child SA expired instead of rekeying"
            await until(
                "IKE SA rekeyed by the timers",
                lambda: ike_spis(a) != spis and ike_spis(a) == ike_spis(b),
                timeout=3.5,
            )
            await asyncio.sleep(0.3)
            assert pairs_agree(a, b) and len(children(a)) == 1
            assert p.error is None and only(b).error is None
            assert all(s == "established" for s in (p.state, only(b).state))
            await a.down(B)
        finally:
            await a.stop()
            await b.stop()

    asyncio.run(go())
