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
"""

from __future__ import annotations

import ctypes
import socket
from typing import Final

__all__ = ["SO_ATTACH_REUSEPORT_CBPF", "SockFilter", "attach_steering", "steering_program"]

SO_ATTACH_REUSEPORT_CBPF: Final = 51  # asm-generic/socket.h


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
