"""The XFRM datapath's hooks on the IKE sockets, where the kernel refuses them.

Without XFRM (a container, a test box) IKE must still run: the hooks say why in
``note``, log it once, and leave the remaining sockets of that start alone; the
next start tries again. An AF_UNIX socket makes the bypass fail the same way on
every kernel, with or without root.
"""

from __future__ import annotations

import logging
import socket

import pytest

from oe_router.datapath.kernel import XfrmSocketHooks


def test_refused_hooks_log_once_and_say_why(caplog: pytest.LogCaptureFixture) -> None:
    hooks = XfrmSocketHooks()
    assert hooks.note == "not started"
    with (
        caplog.at_level(logging.WARNING, "oe_router.ike"),
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as ike,
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as natt,
    ):
        hooks.after_bind(ike, False, "192.0.2.1")
        hooks.after_bind(natt, True, "192.0.2.1")
        hooks.closing("192.0.2.1")  # the endpoint stopped: the next start tries again
        hooks.after_bind(ike, False, "192.0.2.1")
    assert hooks.note.startswith("XFRM unavailable: bypass policy: socket family"), hooks.note
    lines = [r.getMessage() for r in caplog.records if "without kernel IPsec" in r.getMessage()]
    assert len(lines) == 1, lines
    assert "socket family" in lines[0]
