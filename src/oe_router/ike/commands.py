"""The IKE service's control commands: ``up`` and ``down`` (``oe up``, ``oe down``).

Why apart from the service: checking a command's arguments and turning its outcome
into an answer or one clear ``CommandError`` is the control protocol's side; the
service only offers ``up``, ``down`` and its status rows.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING

from oe_router.control.protocol import CommandError, CommandTable, Request

from .errors import IkeError
from .identity import load_public_key
from .peers import IkeUpError

if TYPE_CHECKING:
    from .service import IkeService

__all__ = ["IkeCommands"]


class IkeCommands:
    """``up`` and ``down`` for one IKE service."""

    def __init__(self, service: IkeService) -> None:
        self._service = service

    def register(self, commands: CommandTable) -> None:
        """Add ``up`` and ``down`` to the daemon's control commands."""
        commands.register(
            "up", self._cmd_up, "bring up an IKE SA + Child SA: peer, auth, peer_key (PEM)"
        )
        commands.register("down", self._cmd_down, "delete the IKE SAs with a peer: peer")

    async def _cmd_up(self, request: Request) -> dict[str, object]:
        args = request.args
        peer = args.get("peer")
        if not isinstance(peer, str) or not peer:
            raise CommandError('up needs "peer" (an address or a name)')
        auth = args.get("auth", "null")
        if auth not in ("null", "pubkey"):
            raise CommandError(f"auth {auth!r}: use null or pubkey")
        pem = args.get("peer_key")
        key = None
        if pem is not None:
            if not isinstance(pem, str):
                raise CommandError("peer_key must be a PEM string")
            try:
                key = load_public_key(pem.encode(), "peer_key")
            except ValueError as exc:
                raise CommandError(str(exc)) from None
        mode = args.get("mode", "tunnel")
        if mode not in ("tunnel", "transport"):
            raise CommandError(f"mode {mode!r}: use tunnel or transport")
        try:
            p = await self._service.up(peer, auth, key, transport=mode == "transport")
        except (IkeUpError, IkeError) as exc:
            raise CommandError(str(exc)) from None
        row = next(
            (r for r in self._service.rows() if r.ike_spis.startswith(p.handle.sa.spi_i.hex())),
            None,
        )
        return {"ike": asdict(row) if row is not None else None}

    async def _cmd_down(self, request: Request) -> dict[str, object]:
        peer = request.args.get("peer")
        if not isinstance(peer, str) or not peer:
            raise CommandError('down needs "peer"')
        try:
            n = await self._service.down(peer)
        except (IkeUpError, IkeError) as exc:
            raise CommandError(str(exc)) from None
        if n == 0:
            raise CommandError(f"no IKE SA with {peer}")
        return {"deleted": n}
