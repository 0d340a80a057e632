"""Status model, unix-socket JSON control API and ubus shim.

The names below come from their submodules on first use (``lazypkg.exports``): the
``oe`` CLI imports this package for a socket client and must not pay for the server's
asyncio or the status model it does not print (``--json``).
"""

from typing import TYPE_CHECKING

from oe_router.lazypkg import exports

if TYPE_CHECKING:
    from oe_router.control.client import (
        ControlClient,
        ControlError,
        DaemonNotRunning,
        DaemonUnreachable,
    )
    from oe_router.control.protocol import CommandError, CommandTable, Request
    from oe_router.control.server import ControlServer, SocketBindError
    from oe_router.control.status import (
        ChildSaStatus,
        DaemonStatus,
        EngineStatus,
        ProposalOffers,
        ReloadResult,
        ShuntStatus,
        Status,
        StatusContribution,
        TunnelStatus,
    )

DEFAULT_CONTROL_SOCKET = "/var/run/oe/control.sock"

__all__ = [
    "DEFAULT_CONTROL_SOCKET",
    "ChildSaStatus",
    "CommandError",
    "CommandTable",
    "ControlClient",
    "ControlError",
    "ControlServer",
    "DaemonNotRunning",
    "DaemonStatus",
    "DaemonUnreachable",
    "EngineStatus",
    "ProposalOffers",
    "ReloadResult",
    "Request",
    "ShuntStatus",
    "SocketBindError",
    "Status",
    "StatusContribution",
    "TunnelStatus",
]

__getattr__ = exports(
    __name__,
    {
        **dict.fromkeys(
            ("ControlClient", "ControlError", "DaemonNotRunning", "DaemonUnreachable"), "client"
        ),
        **dict.fromkeys(("CommandError", "CommandTable", "Request"), "protocol"),
        **dict.fromkeys(("ControlServer", "SocketBindError"), "server"),
        **dict.fromkeys(
            (
                "ChildSaStatus",
                "DaemonStatus",
                "EngineStatus",
                "ProposalOffers",
                "ReloadResult",
                "ShuntStatus",
                "Status",
                "StatusContribution",
                "TunnelStatus",
            ),
            "status",
        ),
    },
)
