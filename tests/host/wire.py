"""What crossed a network device, for host tests: a packet socket in a namespace.

Reusable by any host test (the idea of ``Wire`` in test_userspace_oe.py, shared here
rather than imported from a test module). A thread reads an ``ETH_P_ALL`` packet socket
bound to one device, so it sees both directions; each frame keeps the kernel's receive
timestamp (``SO_TIMESTAMPNS``, CLOCK_REALTIME), so frames from two ``Wire``s (the
router's LAN and WAN devices) can be put in one order without thread-scheduling noise.

The classifiers answer the questions the OE tests ask: ESP in UDP 4500 (RFC 3948: a
non-zero SPI where the non-ESP marker would be), IKE messages (on 500, or on 4500 after
the zero marker) with their exchange type and response flag, and cleartext by protocol.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from dataclasses import dataclass, field

from oe_router.datapath.netns import in_netns

ETH_P_ALL = 0x0003
ETH_P_IP = 0x0800
#: asm-generic/socket.h: nanosecond receive timestamps as a timespec in a control message
SO_TIMESTAMPNS = 35
_TIMESPEC = struct.Struct("@qq")
IKE_HEADER = struct.Struct("!8s8sBBBBII")  # SPIi, SPIr, next, version, exchange, flags, id, len
IKE_RESPONSE = 0x20
IKE_EXCHANGES = {34: "IKE_SA_INIT", 35: "IKE_AUTH", 36: "CREATE_CHILD_SA", 37: "INFORMATIONAL"}
PROTO_TCP, PROTO_UDP = 6, 17
TCP_SYN, TCP_ACK = 0x02, 0x10


@dataclass(frozen=True)
class Packet:
    """One IPv4 frame: kernel timestamp (wall clock, s), direction, addresses, L4 bytes."""

    at: float
    outgoing: bool
    src: str
    dst: str
    proto: int
    l4: bytes

    def ports(self) -> tuple[int, int] | None:
        if self.proto not in (PROTO_TCP, PROTO_UDP) or len(self.l4) < 4:
            return None
        sport, dport = struct.unpack_from("!HH", self.l4)
        return sport, dport

    def is_esp_in_udp(self) -> bool:
        """RFC 3948 ESP: UDP on 4500 whose first four payload bytes (the SPI) are not zero."""
        ports = self.ports()
        return (
            self.proto == PROTO_UDP
            and ports is not None
            and 4500 in ports
            and len(self.l4) > 16
            and self.l4[8:12] != bytes(4)
        )

    def ike(self) -> tuple[str, bool] | None:
        """(exchange name, is a response) of an IKE message on 500 or 4500, else None."""
        ports = self.ports()
        if self.proto != PROTO_UDP or ports is None:
            return None
        body = self.l4[8:]
        if 4500 in ports:
            if body[:4] != bytes(4):
                return None  # ESP, or a NAT-T keepalive
            body = body[4:]
        elif 500 not in ports:
            return None
        if len(body) < IKE_HEADER.size:
            return None
        _, _, _, _, exchange, flags, _, _ = IKE_HEADER.unpack_from(body)
        return IKE_EXCHANGES.get(exchange, str(exchange)), bool(flags & IKE_RESPONSE)

    def tcp_flags(self) -> int | None:
        return self.l4[13] if self.proto == PROTO_TCP and len(self.l4) >= 20 else None


@dataclass
class Wire:
    """Frames crossing ``dev`` in namespace ``ns``, read by a packet socket in a thread."""

    ns: str
    dev: str
    frames: list[tuple[float, bool, bytes]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> Wire:
        with in_netns(self.ns):
            # ETH_P_ALL: a socket bound to one protocol sees only incoming frames
            self._sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        self._sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        self._sock.bind((self.dev, 0))
        self._sock.settimeout(0.2)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        space = socket.CMSG_SPACE(_TIMESPEC.size)
        while not self._stop.is_set():
            try:
                data, anc, _, addr = self._sock.recvmsg(65535, space)
            except TimeoutError:
                continue
            except OSError:
                return
            at = time.time()
            for level, kind, value in anc:
                if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                    sec, nsec = _TIMESPEC.unpack_from(value)
                    at = sec + nsec / 1e9
            self.frames.append((at, addr[2] == socket.PACKET_OUTGOING, data))

    def __exit__(self, *exc: object) -> None:
        time.sleep(0.3)  # what is in flight now still counts
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sock.close()

    def packets(self) -> list[Packet]:
        """The IPv4 frames, in the order the kernel stamped them."""
        out = []
        for at, outgoing, f in self.frames:
            if len(f) < 34 or struct.unpack_from("!H", f, 12)[0] != ETH_P_IP:
                continue
            ip = f[14:]
            if ip[0] >> 4 != 4:
                continue
            ihl = (ip[0] & 0x0F) * 4
            total = struct.unpack_from("!H", ip, 2)[0]
            total = total if total >= ihl else len(ip)  # 0 in a GSO super-packet
            out.append(
                Packet(
                    at,
                    outgoing,
                    socket.inet_ntoa(ip[12:16]),
                    socket.inet_ntoa(ip[16:20]),
                    ip[9],
                    ip[ihl:total],
                )
            )
        out.sort(key=lambda p: p.at)
        return out

    def with_peer(self, peer: str) -> list[Packet]:
        return [p for p in self.packets() if peer in (p.src, p.dst)]

    def esp(self, peer: str) -> list[Packet]:
        """ESP-in-UDP datagrams between us and ``peer`` (either way)."""
        return [p for p in self.with_peer(peer) if p.is_esp_in_udp()]

    def ike(self, peer: str) -> list[Packet]:
        """IKE messages between us and ``peer`` (either way, on 500 or 4500)."""
        return [p for p in self.with_peer(peer) if p.ike() is not None]

    def clear(self, peer: str, proto: int) -> list[Packet]:
        """Cleartext packets of IP protocol ``proto`` to or from ``peer``."""
        return [p for p in self.with_peer(peer) if p.proto == proto]
