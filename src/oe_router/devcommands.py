"""The ``devices`` and ``explain`` control commands: the per-device view's edges.

Why apart from ``devview``: this is where the reads happen (conntrack once per request,
capped at ``MAX_FLOWS``, in a thread; dnsmasq's lease file), and where the daemon's
status and OE service meet; ``devview`` classifies what they return, without IO.
``devview`` is imported by the requests, not at start: the daemon pays for it (~0.2 MB)
only once ``oe devices`` or ``oe explain`` is asked (docs/footprint.md).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from oe_router.control.protocol import CommandError, CommandTable, Request
from oe_router.control.status import Status
from oe_router.datapath.base import IPAddress

if TYPE_CHECKING:
    from oe_router.devview import Flow, Lease, OeSnapshot

__all__ = ["DEFAULT_LEASES", "MAX_FLOWS", "DeviceCommands", "FlowReader", "read_leases"]

log = logging.getLogger("oe_router.daemon")

#: dnsmasq's lease file on OpenWrt (``dhcp.@dnsmasq[0].leasefile``)
DEFAULT_LEASES = "/tmp/dhcp.leases"
#: Most conntrack entries one request looks at (the rest is reported as truncated).
MAX_FLOWS = 20_000

#: ``conntrack.read_flows``: (flows, entries read, truncated) for a cap; raises OSError
FlowReader = Callable[[int], "tuple[list[Flow], int, bool]"]
#: The lease file is read up to this many bytes (a /24 of leases is ~20 KiB).
MAX_LEASES_BYTES = 1 << 20


def read_leases(path: Path) -> tuple[dict[IPAddress, Lease], str | None]:
    """The leases in ``path`` and a note when something was wrong (no file, malformed
    lines): the view still comes, without MACs and hostnames."""
    from oe_router.devview import parse_leases

    try:
        with path.open("rb") as f:
            data = f.read(MAX_LEASES_BYTES)
    except OSError as exc:
        return {}, f"no DHCP leases: {path}: {exc.strerror or exc}"
    leases, bad = parse_leases(data.decode("utf-8", "replace"))
    return leases, (f"{path}: {bad} malformed line(s) ignored" if bad else None)


def _address(value: str) -> IPAddress:
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        raise CommandError(f"{value[:40]!r} is not an IP address") from None


class DeviceCommands:
    """``devices [device]`` and ``explain address`` over the daemon's status and OE."""

    def __init__(
        self,
        status: Callable[[], Status],
        snapshot: Callable[[Status], OeSnapshot | None],
        read_flows: FlowReader | None,
        leases: Path = Path(DEFAULT_LEASES),
        max_flows: int = MAX_FLOWS,
    ) -> None:
        self._status = status
        self._snapshot = snapshot
        self._read_flows = read_flows
        self.leases = leases
        self.max_flows = max_flows

    def register(self, commands: CommandTable) -> None:
        commands.register(
            "devices",
            self._cmd_devices,
            "LAN devices and their destinations, protected or clear and why: [device]",
        )
        commands.register(
            "explain", self._cmd_explain, "which policy covers an address, what a flow meets"
        )

    def _snap(self) -> OeSnapshot:
        snap = self._snapshot(self._status())
        if snap is None:
            raise CommandError("the oe service is not running")
        return snap

    async def _cmd_devices(self, request: Request) -> dict[str, object]:
        from oe_router.devview import build_view

        device = request.args.get("device")
        addr = _address(device) if isinstance(device, str) and device else None
        snap = self._snap()
        notes: list[str] = []
        flows: list[Flow] = []
        read, truncated = 0, False
        if self._read_flows is None:
            notes.append("conntrack is not read by this daemon")
        else:
            try:
                flows, read, truncated = await asyncio.to_thread(self._read_flows, self.max_flows)
            except OSError as exc:
                notes.append(f"cannot read conntrack: {exc}")
        if truncated:
            notes.append(f"conntrack holds more than {self.max_flows} entries; the rest unread")
        leases, note = await asyncio.to_thread(read_leases, self.leases)
        if note is not None:
            notes.append(note)
        view = build_view(
            snap, flows, leases, device=addr, flows_read=read, truncated=truncated, notes=notes
        )
        return {"devices": view.to_json()}

    async def _cmd_explain(self, request: Request) -> dict[str, object]:
        from oe_router.devview import explain

        addr = _address(str(request.args["address"]))
        return {"explain": explain(self._snap(), addr).to_json()}
