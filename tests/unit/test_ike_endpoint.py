"""The IKE UDP endpoint on loopback: two real endpoints (ours both sides) over UDP.

Ports are chosen by the kernel (port 0) and XFRM hooks are off (this tier needs no
root); the XFRM bypass and ESP-in-UDP setup are exercised by the host tier.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
import time
from collections.abc import AsyncIterator

import pytest

from oe_router.ike.endpoint import NON_ESP_MARKER, Address, IkeEndpoint
from oe_router.ike.events import (
    ChildSaEstablished,
    IkeSaDeleted,
    IkeSaEstablished,
    IkeSaFailed,
)
from oe_router.ike.sa import IkeSaConfig
from tests.aio import running
from tests.ike_loop import Recorder, run_async
from tests.ike_pair import config

#: An IKE_AUTH request header (SPIs nobody holds), length 36 incl. 8 bytes of payload.
UNKNOWN_SA_REQUEST = b"\x01" * 8 + b"\x02" * 8 + b"\x00\x20\x23\x08" + bytes(4) + bytes(12)


Pair = tuple[IkeEndpoint, IkeEndpoint, Recorder, Recorder, list[tuple[Address, Address]]]


def responder_policy(seen: list[tuple[Address, Address]]):  # type: ignore[no-untyped-def]
    def policy(local: Address, remote: Address) -> IkeSaConfig:
        seen.append((local, remote))
        return config(local, remote)

    return policy


@contextlib.asynccontextmanager
async def pair(**kw: object) -> AsyncIterator[Pair]:
    """Two endpoints on loopback (initiator, responder with ``kw``), their recorders and
    the responder policy's calls; both started for the block and stopped after it."""
    ri, rr = Recorder(), Recorder()
    seen: list[tuple[Address, Address]] = []
    ini = IkeEndpoint(["127.0.0.1"], on_event=ri, clock=time.monotonic, ike_port=0, natt_port=0)
    res = IkeEndpoint(
        ["127.0.0.1"],
        on_event=rr,
        responder_policy=responder_policy(seen),
        clock=time.monotonic,
        ike_port=0,
        natt_port=0,
        **kw,  # type: ignore[arg-type]
    )
    async with running(ini), running(res):
        yield ini, res, ri, rr, seen


def ini_config(ini: IkeEndpoint, res: IkeEndpoint, local_ip: str = "127.0.0.1") -> IkeSaConfig:
    return config((local_ip, ini.ike_port), ("127.0.0.1", res.ike_port))


@run_async
async def test_null_auth_over_udp_then_delete() -> None:
    async with pair() as (ini, res, ri, rr, seen):
        h = ini.initiate(ini_config(ini, res), remote_natt_port=res.natt_port)
        (ci,) = await ri.wait_for(ChildSaEstablished)
        (cr,) = await rr.wait_for(ChildSaEstablished)
        assert isinstance(ci, ChildSaEstablished) and isinstance(cr, ChildSaEstablished)
        assert ci.spi_in == cr.spi_out and ci.encr_key_in == cr.encr_key_out
        assert not ci.udp_encap and not h.natt  # no NAT: IKE stays on the IKE port
        assert seen == [(("127.0.0.1", res.ike_port), ("127.0.0.1", ini.ike_port))]
        assert res.half_open_count() == 0
        assert len(res.handles()) == 1 and res.handles()[0].established_at is not None
        ini.delete(h)
        await ri.wait_for(IkeSaDeleted)
        await rr.wait_for(IkeSaDeleted)
        assert ini.handles() == [] and res.handles() == []


@run_async
async def test_sas_on_one_socket_share_its_address_tuple() -> None:
    """Every IKE SA on a socket holds the same (address, port) object, not a copy each
    (docs/footprint.md: per-peer memory); the address is still the socket's."""
    async with pair() as (ini, res, ri, rr, seen):
        h1 = ini.initiate(ini_config(ini, res), remote_natt_port=res.natt_port)
        h2 = ini.initiate(ini_config(ini, res), remote_natt_port=res.natt_port)
        await ri.wait_for(ChildSaEstablished, 2)
        await rr.wait_for(ChildSaEstablished, 2)
        assert h1.local == ("127.0.0.1", ini.ike_port) and h1.local is h2.local
        r1, r2 = res.handles()
        assert r1.local == ("127.0.0.1", res.ike_port) and r1.local is r2.local
        assert seen[0][0] is seen[1][0] is r1.local


@run_async
async def test_nat_detected_floats_to_natt_port_with_marker() -> None:
    """The initiator claims a private source address (as if behind a NAT): both see the
    NAT_DETECTION mismatch, IKE_AUTH goes out on the NAT-T sockets with the marker."""
    async with pair() as (ini, res, ri, rr, _):
        cfg = dataclasses.replace(ini_config(ini, res), local_address=("10.9.9.9", ini.ike_port))
        h = ini.initiate(cfg, remote_natt_port=res.natt_port, via="127.0.0.1")
        (ev,) = await ri.wait_for(IkeSaEstablished)
        assert isinstance(ev, IkeSaEstablished) and ev.nat_local and not ev.nat_remote
        (evr,) = await rr.wait_for(IkeSaEstablished)
        assert isinstance(evr, IkeSaEstablished) and evr.nat_remote
        (ci,) = await ri.wait_for(ChildSaEstablished)
        assert isinstance(ci, ChildSaEstablished) and ci.udp_encap
        assert h.natt and h.remote == ("127.0.0.1", res.natt_port)
        assert ini.counters.floated == 1 and res.counters.floated == 1
        assert res.handles()[0].natt  # the responder answers from its NAT-T socket
        assert h.keepalive_at is not None  # we are the NATed side: keepalives scheduled
        ini.tick(h.keepalive_at)
        await asyncio.sleep(0.05)
        assert ini.counters.keepalives_out == 1 and res.counters.keepalives_in == 1


@run_async
async def test_garbage_esp_and_unknown_spis_are_counted_not_fatal() -> None:
    async with pair() as (ini, res, ri, _, _):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for data, port in (
            (b"\x01\x02\x03", res.ike_port),  # too short
            (bytes(40), res.ike_port),  # version 0
            (b"\x12\x34\x56\x78" + bytes(40), res.natt_port),  # ESP, no marker
            (NON_ESP_MARKER + UNKNOWN_SA_REQUEST, res.natt_port),
        ):
            s.sendto(data, ("127.0.0.1", port))
        s.close()
        await asyncio.sleep(0.1)
        c = res.counters
        assert (c.malformed, c.esp_dropped, c.unknown_spi) == (2, 1, 1)
        h = ini.initiate(ini_config(ini, res), remote_natt_port=res.natt_port)
        await ri.wait_for(ChildSaEstablished)
        assert h.sa.state == "established"


@run_async
async def test_half_open_limit_drops_new_initiators_without_cookie_support() -> None:
    async with pair(half_open_limit=0) as (ini, res, _, _, seen):
        h = ini.initiate(ini_config(ini, res), remote_natt_port=res.natt_port)
        await asyncio.sleep(0.2)
        assert seen == [] and h.sa.state == "init-sent"
        assert res.counters.half_open_dropped >= 1 or res.counters.cookies_sent >= 1


@run_async
async def test_retransmits_then_fails_against_silence() -> None:
    ri = Recorder()
    ini = IkeEndpoint(["127.0.0.1"], on_event=ri, clock=time.monotonic, ike_port=0, natt_port=0)
    await ini.start()
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.1", 0))
    silent.setblocking(False)
    try:
        cfg = config(
            ("127.0.0.1", ini.ike_port),
            ("127.0.0.1", silent.getsockname()[1]),
            retransmit_timeout=0.02,
            retransmit_tries=2,
        )
        ini.initiate(cfg)
        (f,) = await ri.wait_for(IkeSaFailed)
        assert isinstance(f, IkeSaFailed) and "no answer" in f.reason
        got = 0
        while True:
            try:
                silent.recv(4096)
                got += 1
            except BlockingIOError:
                break
        assert got == 3  # the first try and two retransmits
        assert ini.handles() == []
    finally:
        silent.close()
        await ini.stop()


@run_async
async def test_address_in_use_is_one_clear_error() -> None:
    blocker = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    blocker.bind(("127.0.0.1", 0))
    port = blocker.getsockname()[1]
    ep = IkeEndpoint(["127.0.0.1"], on_event=Recorder(), clock=time.monotonic, ike_port=port)
    try:
        with pytest.raises(Exception, match=f"cannot open IKE sockets on 127.0.0.1 ports {port}"):
            await ep.start()
    finally:
        blocker.close()


@run_async
async def test_cookie_demanded_above_threshold_and_honoured() -> None:
    async with pair(cookie_threshold=0, half_open_limit=5) as (ini, res, ri, _, seen):
        h = ini.initiate(ini_config(ini, res), remote_natt_port=res.natt_port)
        await ri.wait_for(ChildSaEstablished)
        assert h.sa.state == "established"
        assert res.counters.cookies_sent == 1 and len(seen) == 1


@run_async
async def test_liveness_checks_on_a_quiet_peer_then_failure_when_it_is_gone() -> None:
    async with pair() as (ini, res, ri, _, _):
        ini.dpd_delay = 0.05
        cfg = dataclasses.replace(ini_config(ini, res), retransmit_timeout=0.02, retransmit_tries=1)
        h = ini.initiate(cfg, remote_natt_port=res.natt_port)
        await ri.wait_for(ChildSaEstablished)
        received = res.counters.received
        await asyncio.sleep(0.2)  # quiet peer: checks go out and are answered
        assert res.counters.received > received and h.sa.state == "established"
        await res.stop()
        (f,) = await ri.wait_for(IkeSaFailed)
        assert isinstance(f, IkeSaFailed) and "no answer" in f.reason


@run_async
async def test_forged_datagram_with_known_spis_moves_nothing() -> None:
    """A packet with the right SPIs but no valid integrity (from another port, on the
    NAT-T socket) must not make the responder float or follow the new source."""
    async with pair() as (ini, res, _, rr, _):
        h = ini.initiate(ini_config(ini, res), remote_natt_port=res.natt_port)
        await rr.wait_for(ChildSaEstablished)
        (rh,) = res.handles()
        where, natt = rh.remote, rh.natt
        # INFORMATIONAL request, message ID 2, from the initiator: SK payload of junk
        forged = (
            h.sa.spi_i + h.sa.spi_r + b"\x2e\x20\x25\x08" + (2).to_bytes(4, "big")
            + (28 + 40).to_bytes(4, "big") + b"\x00\x00\x00\x28" + bytes(36)
        )  # fmt: skip
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.sendto(NON_ESP_MARKER + forged, ("127.0.0.1", res.natt_port))
        s.close()
        await asyncio.sleep(0.1)
        assert res.counters.received >= 3 and (rh.remote, rh.natt) == (where, natt)
        assert res.counters.floated == 0
