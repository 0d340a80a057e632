"""UDP 4500 shared by IKE and the userspace ESP datapath: a reuseport group steered by cBPF.

Why: RFC 3948 puts IKE (behind a 4-byte zero non-ESP marker) and ESP (a non-zero SPI
first) on the same port. With kernel ESP the kernel takes the ESP (UDP_ENCAP_ESPINUDP);
without it, ESP must reach our worker processes without passing through the daemon's
event loop. So the IKE socket and the workers' sockets join one SO_REUSEPORT group and
a classic BPF program picks the socket per datagram: index 0 (the IKE socket, bound
first) for the marker, NAT keepalives and runts; ``1 + SPI mod n`` for ESP, so each
inbound SA (and its replay window) belongs to exactly one receiving worker.

For a reuseport group the kernel runs the program on the UDP payload (the UDP header is
pulled first), and a load past the end returns 0, which is the IKE socket.

``EspSockets`` is the userspace datapath's side of IKE's socket hooks: it marks IKE's
sockets, binds an ESP socket beside each NAT-T socket, steers, and hands the ESP
socket to the workers.
"""

from __future__ import annotations

import contextlib
import ctypes
import socket
from typing import Final

from oe_router.netns import in_netns

from .base import DatapathError
from .workerpool import WorkerPool

__all__ = [
    "SO_ATTACH_REUSEPORT_CBPF",
    "EspSockets",
    "SockFilter",
    "attach_steering",
    "steering_program",
]

SO_ATTACH_REUSEPORT_CBPF: Final = 51  # asm-generic/socket.h
_SO_MARK: Final = 36
_BUFFER: Final = 4 << 20  # ESP socket buffers: a burst of 1400-byte packets at line rate


class SockFilter(ctypes.Structure):
    """``struct sock_filter`` (linux/filter.h): one classic BPF instruction."""

    _fields_ = (
        ("code", ctypes.c_uint16),
        ("jt", ctypes.c_uint8),
        ("jf", ctypes.c_uint8),
        ("k", ctypes.c_uint32),
    )


class SockFprog(ctypes.Structure):
    """``struct sock_fprog``: the program's length and a pointer to its instructions."""

    _fields_ = (("len", ctypes.c_ushort), ("filter", ctypes.POINTER(SockFilter)))


# linux/bpf_common.h opcodes used here
_LD_W_ABS: Final = 0x00 | 0x00 | 0x20  # BPF_LD | BPF_W | BPF_ABS
_JEQ_K: Final = 0x05 | 0x10 | 0x00  # BPF_JMP | BPF_JEQ | BPF_K
_MOD_K: Final = 0x04 | 0x90 | 0x00  # BPF_ALU | BPF_MOD | BPF_K
_ADD_K: Final = 0x04 | 0x00 | 0x00  # BPF_ALU | BPF_ADD | BPF_K
_RET_K: Final = 0x06 | 0x00  # BPF_RET | BPF_K
_RET_A: Final = 0x06 | 0x10  # BPF_RET | BPF_A


def steering_program(esp_sockets: int) -> list[tuple[int, int, int, int]]:
    """The instructions (code, jt, jf, k): IKE -> socket 0, ESP -> 1 + SPI mod n."""
    if esp_sockets < 1:
        raise ValueError("the steering program needs at least one ESP socket")
    prog = [
        (_LD_W_ABS, 0, 0, 0),  # A = first 4 bytes (SPI or marker); too short -> return 0
        (_JEQ_K, 0, 1, 0),  # marker (0) -> next, else skip one
        (_RET_K, 0, 0, 0),  # IKE socket
    ]
    if esp_sockets == 1:
        prog.append((_RET_K, 0, 0, 1))
    else:
        prog += [(_MOD_K, 0, 0, esp_sockets), (_ADD_K, 0, 0, 1), (_RET_A, 0, 0, 0)]
    return prog


def attach_steering(sock: socket.socket, esp_sockets: int) -> None:
    """Attach the program to ``sock``'s reuseport group (any member may do it)."""
    prog = steering_program(esp_sockets)
    insns = (SockFilter * len(prog))(*(SockFilter(*i) for i in prog))
    fprog = SockFprog(len(prog), insns)
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, bytes(fprog))


class EspSockets:
    """The ESP sockets beside IKE's NAT-T sockets, one per local address, held by the
    workers of ``pool`` (IKE's socket hooks: ``before_bind``, ``after_bind``, ``closing``)."""

    def __init__(self, pool: WorkerPool, *, fwmark: int, netns: str | None = None) -> None:
        self._pool = pool
        self._fwmark = fwmark
        self._netns = netns
        self._socks: dict[str, socket.socket] = {}

    def before_bind(self, sock: socket.socket, natt: bool) -> None:
        """Mark IKE's packets (they must never enter the TUN routes); the NAT-T socket
        joins a reuseport group with our ESP sockets."""
        sock.setsockopt(socket.SOL_SOCKET, _SO_MARK, self._fwmark)
        if natt:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)

    def after_bind(self, sock: socket.socket, natt: bool, ip: str) -> None:
        """IKE's NAT-T socket is bound (index 0 of the group): bind the ESP socket beside
        it, steer ESP to it, hand it to the workers."""
        if not natt:
            return
        port = sock.getsockname()[1]
        family = socket.AF_INET6 if ":" in ip else socket.AF_INET
        with in_netns(self._netns):
            esp = socket.socket(family, socket.SOCK_DGRAM)
        try:
            esp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            esp.setsockopt(socket.SOL_SOCKET, _SO_MARK, self._fwmark)
            for opt, force in ((socket.SO_RCVBUF, 33), (socket.SO_SNDBUF, 32)):
                try:
                    esp.setsockopt(socket.SOL_SOCKET, force, _BUFFER)  # *BUFFORCE (root)
                except OSError:
                    esp.setsockopt(socket.SOL_SOCKET, opt, _BUFFER)
            esp.bind((ip, port))
            attach_steering(esp, 1)
        except OSError as exc:
            esp.close()
            raise DatapathError(f"ESP socket on {ip} port {port}: {exc.strerror or exc}") from None
        old = self._socks.pop(ip, None)
        if old is not None:
            old.close()
        self._socks[ip] = esp
        self._pool.broadcast({"op": "socket", "ip": ip}, (esp.fileno(),))

    def closing(self, ip: str) -> None:
        sock = self._socks.pop(ip, None)
        with contextlib.suppress(DatapathError):
            self._pool.broadcast({"op": "close_socket", "ip": ip})
        if sock is not None:
            sock.close()

    def close(self) -> None:
        for sock in self._socks.values():
            sock.close()
        self._socks.clear()
