"""The DNS front against hostile clients (issue 11, items 4 and 6), on 127.0.0.1.

Item 4: a TCP client that never reads its replies held its connection slot forever
(the wait for a pipeline slot and ``drain()`` ran outside any timeout); every wait is
now bounded and the slot comes back. Item 6: who is answered (``LanAccess``, pure),
and a WAN address is refused as a listen address. The socket paths of item 6 need
other interfaces than loopback: tests/host/test_dns_front_lan.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import struct
import time
from pathlib import Path
from typing import TYPE_CHECKING

import dns.message
import pytest

from oe_router.config.schema import DnsConfig, Endpoint, OeConfig
from oe_router.dns.front import DnsFront
from tests.aio import running

if TYPE_CHECKING:  # imported where used, so item 4's tests run against a tree without it
    from oe_router.dns.access import LanAccess

LEN = struct.Struct("!H")
BIG = 60000  # one reply
#: queries a hostile client pipelines: their replies (24 MB) are more than the kernel's
#: socket buffers take (tcp_wmem's maximum, 4 MB by default) plus the front's own
PIPELINED = 400
DEADLINE = 15.0


def framed(qid: int) -> bytes:
    wire = dns.message.make_query("host.example.", "TXT", id=qid).to_wire()
    return LEN.pack(len(wire)) + wire


async def big_reply(wire: bytes, client: tuple[str, int], limit: int) -> bytes:
    return wire[:2] + b"\x80" + bytes(BIG - 3)  # the query's ID, then padding


def hostile(port: int) -> socket.socket:
    """A connection with a tiny receive buffer, from a client that never reads."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
    sock.setblocking(False)
    with contextlib.suppress(BlockingIOError):
        sock.connect(("127.0.0.1", port))
    return sock


async def send_all(sock: socket.socket, data: bytes) -> None:
    loop = asyncio.get_running_loop()
    with contextlib.suppress(OSError):
        await asyncio.wait_for(loop.sock_sendall(sock, data), 5.0)


async def legit_answer(port: int, qid: int) -> bytes | None:
    """One query over a fresh connection, read like a well-behaved client; None if refused."""
    try:
        async with asyncio.timeout(3.0):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                writer.write(framed(qid))
                (size,) = LEN.unpack(await reader.readexactly(2))
                return await reader.readexactly(size)
            finally:
                writer.close()
    except (OSError, asyncio.IncompleteReadError, TimeoutError):
        return None


async def answered_within(port: int, qid: int) -> bytes | None:
    """``legit_answer`` asked again every 0.1 s until it is answered or DEADLINE passes."""
    start = time.monotonic()
    while time.monotonic() - start < DEADLINE:
        got = await legit_answer(port, qid)
        if got is not None:
            return got
        await asyncio.sleep(0.1)
    return None


def test_tcp_clients_that_never_read_give_their_slots_back() -> None:
    """As many never-reading clients as there are TCP slots, each pipelining more
    queries than the pipeline holds: today they are aborted after the timeout and
    a well-behaved client is answered; before, every slot stayed taken for good."""

    async def main() -> None:
        front = DnsFront(big_reply, tcp_idle=0.5, max_tcp_clients=3, max_tcp_pipeline=4)
        await front.start([Endpoint("127.0.0.1", 0)])
        port = front.bound[0].port
        socks = [hostile(port) for _ in range(3)]
        try:
            burst = b"".join(framed(i) for i in range(PIPELINED))
            await asyncio.gather(*(send_all(s, burst) for s in socks))
            got = await answered_within(port, 0x4242)
            assert got is not None and got[:2] == b"\x42\x42", "slots never came back"
            stats = getattr(front, "stats", None)
            assert stats is not None and stats.tcp_write_timeouts == 3
            deadline = time.monotonic() + DEADLINE
            while front.tcp_clients and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert front.tcp_clients == 0
        finally:
            for s in socks:
                s.close()
            await front.stop()

    asyncio.run(main())


def test_silent_and_slow_tcp_clients_time_out() -> None:
    """A client that sends nothing, and one that sends half a length prefix, are closed
    after ``tcp_idle`` (counted); a full house of them does not lock others out."""

    async def main() -> None:
        front = DnsFront(big_reply, tcp_idle=0.4, max_tcp_clients=2)
        await front.start([Endpoint("127.0.0.1", 0)])
        port = front.bound[0].port
        silent, slow = hostile(port), hostile(port)
        try:
            await send_all(slow, b"\x00")
            assert await answered_within(port, 7) is not None
            assert front.stats.tcp_idle_timeouts == 2
        finally:
            silent.close()
            slow.close()
            await front.stop()

    asyncio.run(main())


def test_a_reply_that_stays_unread_aborts_the_connection() -> None:
    """One client, fewer queries than the pipeline holds, never reads: the front gives
    up on the buffered replies after the timeout and resets the connection instead of
    keeping it (and its buffers) until the client reads (TCP_INFO state CLOSE)."""

    async def main() -> None:
        front = DnsFront(big_reply, tcp_idle=0.4, max_tcp_pipeline=PIPELINED + 1)
        await front.start([Endpoint("127.0.0.1", 0)])
        port = front.bound[0].port
        sock = hostile(port)
        try:
            await send_all(sock, b"".join(framed(i) for i in range(PIPELINED)))
            deadline = time.monotonic() + DEADLINE
            state = 1
            while time.monotonic() < deadline:
                state = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]
                if state == 7:  # TCP_CLOSE: the front's RST arrived
                    break
                await asyncio.sleep(0.05)
            assert state == 7, f"connection still in TCP state {state}"
            assert front.stats.tcp_write_timeouts == 1 and front.tcp_clients == 0
        finally:
            sock.close()
            await front.stop()

    asyncio.run(main())


def test_a_held_answer_outlives_the_idle_timeout() -> None:
    """Idle time counts from the last answer: a query answered after 3 x ``tcp_idle``
    (a held answer) still reaches its client, and a second query pipelined meanwhile
    too; the connection then idles out once."""

    async def slow(wire: bytes, client: tuple[str, int], limit: int) -> bytes:
        await asyncio.sleep(0.9)
        return wire[:2] + b"\x80" + bytes(20)

    async def main() -> None:
        front = DnsFront(slow, tcp_idle=0.3)
        async with running(front, [Endpoint("127.0.0.1", 0)]):
            reader, writer = await asyncio.open_connection("127.0.0.1", front.bound[0].port)
            writer.write(framed(1))
            await asyncio.sleep(0.5)
            writer.write(framed(2))
            got = []
            async with asyncio.timeout(DEADLINE):
                for _ in range(2):
                    (size,) = LEN.unpack(await reader.readexactly(2))
                    got.append((await reader.readexactly(size))[:2])
                assert await reader.read(1) == b""  # then closed for idleness
            writer.close()
            assert got == [b"\x00\x01", b"\x00\x02"]
            assert front.stats.tcp_idle_timeouts == 1 and front.stats.tcp_write_timeouts == 0

    asyncio.run(main())


# ------------------------------------------------------------------ item 6: who is answered


def _access() -> LanAccess:
    from oe_router.dns.access import LanAccess

    return LanAccess(
        lan=(ipaddress.ip_network("192.168.1.0/24"), ipaddress.ip_network("fd00:1::/64")),
        wan_addresses=(ipaddress.ip_address("203.0.113.2"), ipaddress.ip_address("2001:db8::2")),
        lan_interface="br-lan",
        wan_devices=("wan",),
    )


@pytest.mark.parametrize(
    ("client", "local", "ifname", "verdict"),
    [
        ("192.168.1.20", "192.168.1.1", "br-lan", "answer"),
        ("fd00:1::20", "fd00:1::1", "br-lan", "answer"),
        ("::ffff:192.168.1.20", None, None, "answer"),  # IPv4-mapped, TCP (no ifname)
        ("fe80::20", "fe80::1", "br-lan", "answer"),  # link-local on the LAN
        ("fe80::20", "fe80::1", "guest", "refuse"),  # link-local elsewhere
        ("127.0.0.1", "127.0.0.1", "lo", "answer"),
        ("192.168.1.1", "192.168.1.1", "lo", "answer"),  # this machine
        ("10.9.0.5", "192.168.1.1", "guest", "refuse"),  # not a LAN prefix
        ("198.51.100.7", "192.168.1.1", None, "refuse"),  # TCP from outside
        ("198.51.100.7", "203.0.113.2", "wan", "drop"),  # over the WAN
        ("192.168.1.20", "192.168.1.1", "wan", "drop"),  # spoofed LAN source over the WAN
        ("192.168.1.20", "203.0.113.2", "br-lan", "drop"),  # to a WAN address
        ("2001:db8:9::9", "2001:db8::2", "wan", "drop"),
        ("198.51.100.7", "127.0.0.1", None, "answer"),  # to loopback: only we get there
    ],
)
def test_lan_access_rules(client: str, local: str | None, ifname: str | None, verdict: str) -> None:
    from oe_router.dns.access import client_address

    addr = client_address(client)
    assert addr is not None
    ours = ipaddress.ip_address(local) if local else None
    assert _access().verdict(addr, ours, ifname).value == verdict


def test_lan_access_listen_addresses() -> None:
    access = _access()
    problem = access.listen_problem(Endpoint("203.0.113.2", 53))
    assert problem is not None and problem.startswith("203.0.113.2:53 is an address of the WAN")
    assert "(wan; oe.global.wan_interface)" in problem
    assert access.listen_problem(Endpoint("192.168.1.1", 53)) is None
    assert access.listen_problem(Endpoint("0.0.0.0", 53)) is None
    assert access.open_listener("127.0.0.1") and access.open_listener("::1")
    assert not access.open_listener("0.0.0.0") and not access.open_listener("192.168.1.1")


def test_service_refuses_to_listen_on_a_wan_address(tmp_path: Path) -> None:
    from oe_router.daemon import ServiceError
    from oe_router.dns.access import LanAccess
    from oe_router.dns.service import DnsService

    anchor = tmp_path / "root.key"
    anchor.write_text(". 3600 IN DS 20326 8 2 " + "E0" * 32 + "\n")
    wan = ipaddress.ip_address("127.0.0.1")  # stands in for the WAN address: bindable here
    service = DnsService(access=LanAccess(wan_addresses=(wan,), wan_devices=("wan",)))
    config = OeConfig(dns=DnsConfig(listen=(Endpoint("127.0.0.1", 0),), trust_anchor=str(anchor)))
    with pytest.raises(ServiceError, match=r"^oe\.dns\.listen: 127\.0\.0\.1:0 is an address of"):
        asyncio.run(service.start(config))
    assert service.bound == ()
