"""The IKE endpoint's sockets: a UDP 500 and 4500 pair per local address.

Why apart from the endpoint: opening (namespace, datapath hooks, IP_RECVERR), reading in
batches, sending with the non-ESP marker and draining ICMP reports are socket plumbing;
which IKE SA a datagram or a report belongs to is the endpoint's business, handed to it
through two callbacks.

* a datapath does what it needs to the sockets through the injected ``SocketHooks``:
  the XFRM datapath's (``datapath.kernel.XfrmSocketHooks``, strongSwan's kernel_ipsec
  ``bypass_socket`` and ``enable_udp_decap``) bypasses all policies on both sockets and
  decapsulates ESP-in-UDP on 4500; the userspace datapath shares UDP 4500. The IKE layer
  declares the protocol and never imports a datapath; the composition root injects;
* both sockets have IP_RECVERR/IPV6_RECVERR: the ICMP reports behind a failed
  ``recvfrom``/``sendto`` are read from the error queue and handed on parsed.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import field
from typing import Final, NamedTuple, Protocol

from oe_router.netns import in_netns
from oe_router.records import record

from .counters import EndpointCounters
from .errors import IkeError

__all__ = [
    "NON_ESP_MARKER",
    "READ_BATCH",
    "Address",
    "IkeSockets",
    "SockExtendedErr",
    "SocketHooks",
]

log = logging.getLogger("oe_router.ike")

Address = tuple[str, int]
NON_ESP_MARKER: Final = b"\x00\x00\x00\x00"
#: datagrams read from a socket per wake-up (``_Reader``)
READ_BATCH: Final = 64

# linux/in.h, linux/in6.h, linux/errqueue.h (socket exposes none of these)
_IP_RECVERR: Final = 11
_IPV6_RECVERR: Final = 25
_SO_EE_ORIGIN_ICMP: Final = 2
_SO_EE_ORIGIN_ICMP6: Final = 3
_ICMP_DEST_UNREACH: Final = 3  # ICMPv4 type; code 4 (fragmentation needed) is not "unreachable"
_ICMP_FRAG_NEEDED: Final = 4
_ICMPV6_DEST_UNREACH: Final = 1
#: Codes that say the peer will not take IKE: protocol and port unreachable, and the
#: "administratively prohibited" ones (ICMPv4 9, 10, 13; ICMPv6 1, 5, 6). Network and host
#: unreachable (ICMPv4 0, 1; ICMPv6 0, 3) are soft errors (RFC 1122 4.2.3.9): a router that
#: has not resolved the next hop yet says so, our own among them when ARP times out.
_ICMP_DEFINITE: Final = frozenset({2, 3, 9, 10, 13})
_ICMPV6_DEFINITE: Final = frozenset({1, 4, 5, 6})
# errors a pending ICMP report makes the next sendto() return instead of sending
_REPORTED_ERRNOS: Final = frozenset(
    {errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN, errno.EACCES}
)


_EE_WIRE: Final = struct.Struct("=IBBBBII")  # the fields of SockExtendedErr, in order


class SockExtendedErr(NamedTuple):
    """``struct sock_extended_err`` (linux/errqueue.h): the IP_RECVERR control message."""

    ee_errno: int
    ee_origin: int
    ee_type: int
    ee_code: int
    ee_pad: int
    ee_info: int
    ee_data: int

    @classmethod
    def parse(cls, raw: bytes) -> SockExtendedErr | None:
        if len(raw) < _EE_WIRE.size:
            return None
        return cls(*_EE_WIRE.unpack_from(raw))

    @property
    def unreachable(self) -> bool:
        """An ICMP/ICMPv6 destination unreachable (not "fragmentation needed")."""
        if self.ee_origin == _SO_EE_ORIGIN_ICMP:
            return self.ee_type == _ICMP_DEST_UNREACH and self.ee_code != _ICMP_FRAG_NEEDED
        return self.ee_origin == _SO_EE_ORIGIN_ICMP6 and self.ee_type == _ICMPV6_DEST_UNREACH

    @property
    def definite(self) -> bool:
        """An unreachable that fails a negotiation at once; the others (network or host
        unreachable) leave it to the retransmissions, which cost no more than the host is
        away: a flow in the clear would not reach it either."""
        if not self.unreachable:
            return False
        codes = _ICMPV6_DEFINITE if self.ee_origin == _SO_EE_ORIGIN_ICMP6 else _ICMP_DEFINITE
        return self.ee_code in codes

    def describe(self) -> str:
        fam = "ICMPv6" if self.ee_origin == _SO_EE_ORIGIN_ICMP6 else "ICMP"
        why = os.strerror(self.ee_errno)
        return f"{fam} unreachable (type {self.ee_type} code {self.ee_code}, {why})"


class SocketHooks(Protocol):
    """What a datapath does to the IKE sockets (strongSwan's kernel_ipsec ``bypass_socket``
    and ``enable_udp_decap``), injected so the IKE layer never imports a datapath.

    ``before_bind`` runs on every new socket before ``bind`` (options that must precede
    it: SO_REUSEPORT, SO_MARK), ``after_bind`` once it is bound, ``closing`` before the
    sockets of ``ip`` close. ``natt`` marks the UDP 4500 socket.
    """

    def before_bind(self, sock: socket.socket, natt: bool) -> None: ...

    def after_bind(self, sock: socket.socket, natt: bool, ip: str) -> None: ...

    def closing(self, ip: str) -> None: ...


#: a datagram read: (local address, from the NAT-T socket, payload, sender)
DatagramHandler = Callable[[str, bool, bytes, Address], None]
#: an ICMP report: (about the NAT-T socket, the quoted UDP payload, its destination, report)
IcmpHandler = Callable[[bool, bytes, Address, SockExtendedErr], None]


class _Reader:
    """Reads one IKE socket: up to ``READ_BATCH`` datagrams per wake-up, into one buffer.

    Why not asyncio's datagram transport: it runs an event-loop turn per datagram and
    allocates a 256 KiB buffer for each; that cost 15 µs a datagram here, several times
    what answering a COOKIE costs. Other work still runs between two batches.
    """

    def __init__(self, socks: IkeSockets, sock: socket.socket, local_ip: str, natt: bool) -> None:
        self.socks, self.sock, self.local_ip, self.natt = socks, sock, local_ip, natt
        self.buf = bytearray(65535)  # the largest UDP payload: nothing is truncated
        self.view = memoryview(self.buf)

    def __call__(self) -> None:
        sock, view, handle = self.sock, self.view, self.socks.on_datagram
        for _ in range(READ_BATCH):
            try:
                n, addr = sock.recvfrom_into(self.buf)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                # a reported error (IP_RECVERR) failed recvfrom(): read the reports behind it
                log.debug("IKE socket %s: %s", self.local_ip, exc)
                try:
                    self.socks.drain_errors(sock, self.local_ip, self.natt)
                except Exception:
                    log.exception("IKE: error handling an ICMP report on %s", self.local_ip)
                return
            try:
                handle(self.local_ip, self.natt, bytes(view[:n]), (addr[0], addr[1]))
            except Exception:  # one bad datagram must never kill the socket
                log.exception("IKE: error handling a datagram from %s", addr[0])


@record
class _Pair:
    ike: socket.socket
    natt: socket.socket
    readers: list[int] = field(default_factory=list)  # file descriptors the loop watches


class IkeSockets:
    """The (IKE, NAT-T) socket pair of every local address, read by the event loop."""

    def __init__(
        self,
        addresses: Iterable[str],
        *,
        ike_port: int,
        natt_port: int,
        netns: str | None,
        hooks: Sequence[SocketHooks],
        counters: EndpointCounters,
        on_datagram: DatagramHandler,
        on_icmp: IcmpHandler,
    ) -> None:
        self.addresses = tuple(addresses)
        self.ike_port = ike_port
        self.natt_port = natt_port
        self.on_datagram = on_datagram
        self._on_icmp = on_icmp
        self._netns = netns
        self._hooks = tuple(hooks)
        self._counters = counters
        self._pairs: dict[str, _Pair] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def __contains__(self, ip: object) -> bool:
        return ip in self._pairs

    def names(self) -> list[str]:
        return list(self._pairs)

    def _make_socket(self, ip: str, port: int, natt: bool) -> socket.socket:
        family = socket.AF_INET6 if ":" in ip else socket.AF_INET
        with in_netns(self._netns):
            sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            for hooks in self._hooks:
                hooks.before_bind(sock, natt)
            sock.bind((ip, port))
            sock.setblocking(False)
            for hooks in self._hooks:
                hooks.after_bind(sock, natt, ip)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, _IPV6_RECVERR, 1)
            else:
                sock.setsockopt(socket.IPPROTO_IP, _IP_RECVERR, 1)
        except OSError:
            sock.close()
            raise
        return sock

    def open(self, loop: asyncio.AbstractEventLoop) -> None:
        """Bind every address's 500/4500 pair; an address in use is a clear error."""
        self._loop = loop
        try:
            for ip in self.addresses:
                ike = self._make_socket(ip, self.ike_port, False)
                try:
                    natt = self._make_socket(ip, self.natt_port, True)
                except OSError:
                    ike.close()
                    raise
                pair = _Pair(ike, natt)
                self._pairs[ip] = pair
                for sock, is_natt in ((ike, False), (natt, True)):
                    loop.add_reader(sock.fileno(), _Reader(self, sock, ip, is_natt))
                    pair.readers.append(sock.fileno())
        except OSError as exc:
            self.close()
            raise IkeError(
                f"cannot open IKE sockets on {ip} ports {self.ike_port}/{self.natt_port}: "
                f"{exc.strerror or exc}"
            ) from None
        if self.ike_port == 0 or self.natt_port == 0:  # tests: learn the kernel's choice
            first = self._pairs[self.addresses[0]]
            self.ike_port = first.ike.getsockname()[1]
            self.natt_port = first.natt.getsockname()[1]

    def close(self) -> None:
        for ip, pair in self._pairs.items():
            for hooks in self._hooks:
                with contextlib.suppress(Exception):  # a failing hook must not keep sockets
                    hooks.closing(ip)
            for fd in pair.readers:
                if self._loop is not None:
                    self._loop.remove_reader(fd)
            for s in (pair.ike, pair.natt):
                s.close()
        self._pairs.clear()

    def pair(self, ip: str | None = None) -> tuple[socket.socket, socket.socket]:
        """The (IKE, NAT-T) sockets of ``ip`` (default: the first address)."""
        pair = self._pairs[ip or self.addresses[0]]
        return pair.ike, pair.natt

    def send(
        self,
        local_ip: str,
        natt: bool,
        data: bytes | bytearray,
        remote: Address,
        *,
        raw: bool = False,
    ) -> None:
        """Send from ``local_ip``'s IKE or NAT-T socket (IKE there behind the non-ESP
        marker unless ``raw``); a failure is logged at debug level, never raised."""
        pair = self._pairs.get(local_ip)
        if pair is None:
            return
        payload = NON_ESP_MARKER + data if natt and not raw else data
        sock = pair.natt if natt else pair.ike
        for attempt in (1, 2):
            try:
                sock.sendto(payload, remote)
                self._counters.sent += 1
                return
            except OSError as exc:
                if attempt == 1 and exc.errno in _REPORTED_ERRNOS:
                    # an ICMP report (perhaps about another peer) was pending on the
                    # socket and failed this send instead: handle it, send again
                    self.drain_errors(sock, local_ip, natt)
                    continue
                log.debug("IKE: send to %s failed: %s", remote[0], exc)
                return

    def drain_errors(self, sock: socket.socket, local_ip: str, natt: bool) -> None:
        """Read every report queued on ``sock`` (IP_RECVERR) and hand each on."""
        while True:
            try:
                data, anc, _flags, dest = sock.recvmsg(2048, 1024, socket.MSG_ERRQUEUE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.debug("IKE socket %s: reading the error queue: %s", local_ip, exc)
                return
            for level, kind, raw in anc:
                if (level, kind) in (
                    (socket.IPPROTO_IP, _IP_RECVERR),
                    (socket.IPPROTO_IPV6, _IPV6_RECVERR),
                ):
                    ee = SockExtendedErr.parse(raw)
                    if ee is not None and dest:
                        self._counters.icmp_errors += 1
                        self._on_icmp(natt, data, (str(dest[0]), int(dest[1])), ee)
