"""Thin ubus shim: loads libubus through ctypes when the router has it.

On OpenWrt, LuCI and scripts talk to daemons over ubus. libubus and ubusd do
not exist on the development host (no OpenWrt userland installs here), so
this shim only finds the library and checks that ubusd answers a connect. It
does not register a ubus object yet: that needs the blobmsg policy structs,
which are only worth writing once they can be tested against a real ubusd
in the router image. Until then the unix control socket is the API.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class UbusProbe:
    """Whether ubus can be used here, and why not if it cannot."""

    available: bool
    detail: str


def _default_find() -> str | None:
    return ctypes.util.find_library("ubus")


class UbusShim:
    """Finds libubus and tries `ubus_connect`; reports honestly what it found."""

    def __init__(
        self,
        socket_path: str | None = None,
        find_library: Callable[[], str | None] = _default_find,
        load_library: Callable[[str], ctypes.CDLL] = ctypes.CDLL,
    ) -> None:
        self._socket_path = socket_path
        self._find = find_library
        self._load = load_library

    def probe(self) -> UbusProbe:
        name = self._find()
        if name is None:
            return UbusProbe(False, "ubus unavailable: libubus not found")
        try:
            lib = self._load(name)
        except OSError as exc:
            return UbusProbe(False, f"ubus unavailable: cannot load {name}: {exc}")
        try:
            connect = lib.ubus_connect
            free = lib.ubus_free
        except AttributeError:
            return UbusProbe(False, f"ubus unavailable: {name} lacks ubus_connect/ubus_free")
        connect.restype = ctypes.c_void_p
        connect.argtypes = [ctypes.c_char_p]
        free.restype = None
        free.argtypes = [ctypes.c_void_p]
        path = None if self._socket_path is None else self._socket_path.encode()
        ctx = connect(path)
        if not ctx:
            return UbusProbe(False, "ubus unavailable: ubusd did not accept a connection")
        free(ctx)
        return UbusProbe(True, f"ubusd reachable through {name} (object not registered yet)")
