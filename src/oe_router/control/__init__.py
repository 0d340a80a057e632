"""Status model, unix-socket JSON control API and ubus shim."""

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
