"""Open sockets inside another network namespace (lab, tests, multi-netns routers).

A socket keeps the namespace it was created in, so switching the calling
thread into the target namespace just for socket() is enough.  Python 3.11
has no os.setns, hence ctypes.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator
from contextlib import contextmanager

CLONE_NEWNET = 0x40000000


def netns_path(name_or_path: str) -> str:
    """An `ip netns` name or a path to a namespace file -> a path."""
    return name_or_path if "/" in name_or_path else f"/run/netns/{name_or_path}"


def _setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@contextmanager
def in_netns(name_or_path: str | None) -> Iterator[None]:
    """Run the body with the calling thread in the given network namespace."""
    if name_or_path is None:
        yield
        return
    path = netns_path(name_or_path)
    try:
        target = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise OSError(exc.errno, f"network namespace {name_or_path!r}: {exc.strerror}") from None
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns(target)
        try:
            yield
        finally:
            _setns(own)
    finally:
        os.close(target)
        os.close(own)
