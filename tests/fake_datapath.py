"""A datapath and a negotiator that only record what the OE service asks of them: for
unit tests of ``OeService`` without a kernel, a TUN device or a peer."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from oe_router.datapath.base import (
    ChildSaCounters,
    ChildSaSpec,
    DatapathError,
    PolicySpec,
    ReconcileReport,
    SaCounters,
)
from oe_router.oe.actions import ChildRequest, NegotiationResult


class FakeDatapath:
    name, reason, tunnel_device = "fake", "unit test", None

    def __init__(self) -> None:
        self.installed: list[ChildSaSpec] = []
        self.removed: list[ChildSaSpec] = []
        self.policy_calls: list[tuple[PolicySpec, ...]] = []  # one per datapath call
        self.policies: list[PolicySpec] = []  # those that went in, in order
        self.refuse: Callable[[PolicySpec], bool] = lambda policy: False

    async def start(self) -> None: ...

    async def reconcile(self, adopt_policy: object = None) -> ReconcileReport:
        return ReconcileReport(0, 0, 0, 0)

    async def release_adopted(self, keep: object) -> int:
        return 0

    async def install_policy(self, policy: PolicySpec) -> None:
        await self.install_policies((policy,))

    async def install_policies(self, policies: Sequence[PolicySpec]) -> None:
        """Recorded as one call; the ``refuse`` ones stay out and are named."""
        self.policy_calls.append(tuple(policies))
        refused = [p for p in policies if self.refuse(p)]
        self.policies += [p for p in policies if not self.refuse(p)]
        if refused:
            raise DatapathError(f"refused: {', '.join(map(str, refused))}")

    async def remove_policy(self, policy: PolicySpec) -> None: ...

    async def install_child_sa(self, spec: ChildSaSpec) -> ChildSaSpec:
        self.installed.append(spec)
        return replace(spec, reqid=0x4F450000 + len(self.installed))

    async def remove_child_sa(self, spec: ChildSaSpec, *, remove_policies: bool = True) -> None:
        self.removed.append(spec)

    async def counters(self, spec: ChildSaSpec) -> ChildSaCounters:
        return ChildSaCounters(SaCounters(0, 0, 0, 0), SaCounters(0, 0, 0, 0))

    def read_counters(self, spec: ChildSaSpec) -> ChildSaCounters:
        return ChildSaCounters(SaCounters(0, 0, 0, 0), SaCounters(0, 0, 0, 0))

    async def events(self) -> Any:
        await asyncio.Event().wait()
        yield  # pragma: no cover

    def stats(self) -> dict[str, int]:
        return {}

    def orphaned_acquires(self, trap_reqid: int) -> list[Any]:
        return []

    async def close(self) -> None: ...


class FakeNegotiator:
    def __init__(self, spec: ChildSaSpec) -> None:
        self.spec = spec
        self.requests: list[ChildRequest] = []

    async def negotiate(self, request: ChildRequest, now: float) -> NegotiationResult:
        self.requests.append(request)
        return NegotiationResult(self.spec)

    async def rekey(self, peer: object, child: ChildSaSpec, now: float) -> NegotiationResult:
        return NegotiationResult(None, "not here")

    async def delete(self, peer: object, child: ChildSaSpec | None) -> None: ...
