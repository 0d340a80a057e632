"""Fail fast on ICMP unreachable (IP_RECVERR) in the IKE endpoint, on loopback.

Why: an OE negotiation to a host without IKE used to wait out every retransmission
while the kernel dropped the packets of the flow that triggered it. A closed UDP port
on loopback makes the kernel answer with a real ICMP port unreachable, which is what
most such hosts send; the retransmit timeout here is long (5 s), so only the ICMP
path can fail the SA within the asserted second.
"""

from __future__ import annotations

import asyncio
import socket
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from oe_router.ike.endpoint import IkeEndpoint
from oe_router.ike.events import IkeSaFailed
from oe_router.ike.sa import IkeSaConfig
from oe_router.ike.sockets import SockExtendedErr
from tests import ike_pair
from tests.aio import running
from tests.ike_loop import Recorder, run_async


def closed_port(family: int, addr: str) -> int:
    """A UDP port nobody listens on (bound, read, closed)."""
    s = socket.socket(family, socket.SOCK_DGRAM)
    s.bind((addr, 0))
    port = int(s.getsockname()[1])
    s.close()
    return port


def config(ep: IkeEndpoint, addr: str, port: int, tries: int = 3) -> IkeSaConfig:
    return ike_pair.config(
        (addr, ep.ike_port),
        (addr, port),
        retransmit_timeout=5.0,
        retransmit_tries=tries,
    )


@asynccontextmanager
async def endpoint(addr: str) -> AsyncIterator[tuple[IkeEndpoint, Recorder]]:
    """An endpoint on ``addr`` and its recorder, started for the block."""
    rec = Recorder()
    ep = IkeEndpoint([addr], on_event=rec, clock=time.monotonic, ike_port=0, natt_port=0)
    async with running(ep):
        yield ep, rec


async def fails_fast(family: int, addr: str) -> None:
    async with endpoint(addr) as (ep, rec):
        t0 = time.monotonic()
        ep.initiate(config(ep, addr, closed_port(family, addr)))
        (f,) = await rec.wait_for(IkeSaFailed, timeout=1.0)
        took = time.monotonic() - t0
        assert isinstance(f, IkeSaFailed) and "unreachable" in f.reason, f
        assert took < 1.0, took
        assert ep.counters.unreachable == 1 and ep.counters.icmp_errors >= 1
        assert ep.handles() == []


@run_async
async def test_port_unreachable_fails_ike_sa_init_at_once_ipv4() -> None:
    await fails_fast(socket.AF_INET, "127.0.0.1")


@run_async
async def test_port_unreachable_fails_ike_sa_init_at_once_ipv6() -> None:
    await fails_fast(socket.AF_INET6, "::1")


@run_async
async def test_icmp_for_one_peer_leaves_another_negotiation_alone() -> None:
    """Two SAs started back to back: the ICMP about the first may be pending on the socket
    when the second is sent (it would fail that sendto); the second still goes out and
    keeps waiting for its silent peer."""
    async with endpoint("127.0.0.1") as (ep, rec):
        silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        silent.bind(("127.0.0.1", 0))
        silent.setblocking(False)
        try:
            dead = ep.initiate(config(ep, "127.0.0.1", closed_port(socket.AF_INET, "127.0.0.1")))
            await asyncio.sleep(0.05)  # the ICMP is queued; nothing has read it yet or just did
            alive = ep.initiate(config(ep, "127.0.0.1", silent.getsockname()[1]))
            (f,) = await rec.wait_for(IkeSaFailed, timeout=1.0)
            await asyncio.sleep(0.1)
            assert [h for h, e in rec.events if isinstance(e, IkeSaFailed)] == [dead], f
            assert ep.handles() == [alive]
            assert silent.recv(4096)[:8] == alive.sa.spi_i  # its IKE_SA_INIT was not lost
        finally:
            silent.close()


@run_async
async def test_icmp_quoting_another_spi_or_port_fails_nothing() -> None:
    """An unreachable must quote our SPI and come for the SA's own peer address and port."""
    async with endpoint("127.0.0.1") as (ep, rec):
        h = ep.initiate(config(ep, "127.0.0.1", 4999))
        unreach = SockExtendedErr(111, 2, 3, 3, 0, 0, 0)
        ep._icmp_error(False, b"\x07" * 8 + bytes(20), ("127.0.0.1", 4999), unreach)
        ep._icmp_error(False, h.sa.spi_i + bytes(20), ("127.0.0.1", 5000), unreach)
        ep._icmp_error(False, h.sa.spi_i[:4], ("127.0.0.1", 4999), unreach)  # quoted too little
        frag = SockExtendedErr(90, 2, 3, 4, 0, 1400, 0)  # fragmentation needed: not unreachable
        ep._icmp_error(False, h.sa.spi_i + bytes(20), ("127.0.0.1", 4999), frag)
        # host unreachable (our own router's, when ARP for the next hop times out): soft
        host = SockExtendedErr(113, 2, 3, 1, 0, 0, 0)
        ep._icmp_error(False, h.sa.spi_i + bytes(20), ("127.0.0.1", 4999), host)
        assert ep.counters.unreachable_soft == 1
        assert ep.handles() == [h] and rec.of(IkeSaFailed) == []
        ep._icmp_error(False, h.sa.spi_i + bytes(20), ("127.0.0.1", 4999), unreach)
        assert ep.handles() == [] and len(rec.of(IkeSaFailed)) == 1


def test_sock_extended_err_table() -> None:
    raw = (111).to_bytes(4, sys.byteorder) + bytes([2, 3, 3, 0]) + bytes(8)
    ee = SockExtendedErr.parse(raw)
    assert ee is not None and ee.unreachable and "type 3 code 3" in ee.describe()
    assert SockExtendedErr.parse(raw[:10]) is None
    assert not SockExtendedErr(113, 3, 2, 0, 0, 1280, 0).unreachable  # ICMPv6 packet too big
    assert SockExtendedErr(113, 3, 1, 4, 0, 0, 0).unreachable  # ICMPv6 port unreachable


def test_only_port_protocol_and_prohibited_unreachables_are_definite() -> None:
    """RFC 1122 4.2.3.9: network and host unreachable are soft errors (a next hop not
    resolved yet); port, protocol and "administratively prohibited" say the peer takes no
    IKE, so the negotiation fails at once."""
    v4 = {c: SockExtendedErr(113, 2, 3, c, 0, 0, 0).definite for c in range(16) if c != 4}
    assert {c for c, d in v4.items() if d} == {2, 3, 9, 10, 13}
    v6 = {c: SockExtendedErr(113, 3, 1, c, 0, 0, 0).definite for c in range(8)}
    assert {c for c, d in v6.items() if d} == {1, 4, 5, 6}
    assert not SockExtendedErr(90, 2, 3, 4, 0, 1400, 0).definite  # fragmentation needed
    assert not SockExtendedErr(113, 3, 2, 0, 0, 1280, 0).definite  # ICMPv6 packet too big
