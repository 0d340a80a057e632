"""The group table's kernel policies (traps, pass and drop per group), by identity.

Why its own state: a shunt, a pass or a Child SA's policy takes a group policy's place
in the kernel (same identity, one policy per identity); when it goes, the group's must
come back, whoever removed it. A reload swaps the table here, in place, so every
collaborator restores from the current one.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping

from oe_router.datapath.base import IPAddress, PolicySpec
from oe_router.oe.actions import Action, InstallPolicy
from oe_router.oe.policy import PolicyTable
from oe_router.oe.selectors import PolicyKey, key_of

__all__ = ["GroupPolicies"]


class GroupPolicies:
    """The current group table, its ``kernel_policies``, and their restoring."""

    def __init__(
        self,
        table: PolicyTable,
        wan: Mapping[int, IPAddress],
        trap_reqid: int,
        lan6: tuple[ipaddress.IPv6Network, ...],
    ) -> None:
        self._wan, self._trap_reqid, self._lan6 = dict(wan), trap_reqid, lan6
        self.table = table
        self.policies: tuple[PolicySpec, ...] = ()
        self.by_key: dict[PolicyKey, PolicySpec] = {}
        self.load(table)

    def load(self, table: PolicyTable) -> dict[PolicyKey, PolicySpec]:
        """Take ``table``'s policies; returns the previous ones by identity."""
        old = self.by_key
        self.table = table
        self.policies = table.kernel_policies(
            self._wan, trap_reqid=self._trap_reqid, lan6=self._lan6
        )
        self.by_key = {key_of(p): p for p in self.policies}
        return old

    def restore(self, keys: Iterable[PolicyKey]) -> list[Action]:
        """A runtime policy with a group policy's identity was removed: put the group's back."""
        return [InstallPolicy(self.by_key[k]) for k in keys if k in self.by_key]
