"""luci-app-oe in a real browser against the router's real LuCI (issue 17).

Why: OpenWrt users meet the package in LuCI. Debian's chromium, headless on the host
(qemu/luciweb.py), reaches the router's uhttpd through the lab's management port (a host
port forwarded to eth2, qemu/lab.py VMSpec.mgmt) and uses luci-app-oe's pages as a user
does: log in, read the status page, change settings, press buttons.

The scene (module fixture): oe-routerd with the shipped configuration; the LAN client has
fetched a page from the libreswan host (null.example.test) and the strongSwan host
(sw.example.test) by name (tunnels), from the plain host by name (a keyless pass shunt:
its zone denies an IPSECKEY) and from a silent host by address (it drops IKE: a pass
shunt after the IKE failure). Observable: the daemon's per-device view from the router's
shell, the rows the status page shows, `uci show oe` and the daemon's generation after
Save & Apply, the kernel's SAs after "Down", and what a read-only login may do.

Screenshots are kept in test-results/artifacts/luci/ (status.png, settings-invalid.png,
settings-applied.png, status-readonly.png, ...), pass or fail.
"""

from __future__ import annotations

import json
import shlex
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import oelab
from lab import Lab

pytestmark = pytest.mark.qemu

REPO = Path(__file__).resolve().parents[2]
SHOTS = REPO / "test-results" / "artifacts" / "luci"
ROOT_PASSWORD = "oe-lab-root"  # qemu/build.py ROOT_PASSWORD
#: a read-only login (rpcd's config login): luci-base's and the app's ACLs, read only
VIEWER, VIEWER_PASSWORD = "viewer", "oe-lab-viewer"
STATUS_PAGE = "/cgi-bin/luci/admin/services/oe/status"
SETTINGS_PAGE = "/cgi-bin/luci/admin/services/oe/settings"
CURL = "curl -4 -s -o /dev/null --max-time 20 -w '%{http_code}' "


def _host(lab: Lab, netns: str) -> tuple[str, str]:
    h = lab.plan.host(netns)
    assert h.name is not None
    return h.name, h.ipv4


@pytest.fixture(scope="module")
def scene(lab: Lab) -> Iterator[dict[str, str]]:
    """The daemon running, and the LAN client's four destinations made (address by role)."""
    for h in ("oe-null", "oe-sw", "plain", "insecure"):
        assert h not in lab.failed_hosts, lab.failed_hosts[h]
    oelab.start_daemon(lab)
    try:
        where = {
            "libreswan": _host(lab, "oe-null")[1],
            "strongswan": _host(lab, "oe-sw")[1],
            "plain": _host(lab, "plain")[1],
            "silent": _host(lab, "insecure")[1],
        }
        for role in ("libreswan", "strongswan", "plain"):
            name = _host(lab, {"libreswan": "oe-null", "strongswan": "oe-sw"}.get(role, role))[0]
            res = lab.client(CURL + f"http://{name}/", timeout=40)
            assert res.stdout == "200", f"{role}: curl http://{name}/ gave {res.stdout!r}"
        with oelab.silent_host(lab, "insecure"):
            res = lab.client(CURL + f"http://{where['silent']}/", timeout=40)
        assert res.stdout == "200", f"silent host by address: {res.stdout!r}"
        yield where
    finally:
        lab.router(
            "uci -q delete rpcd.oe_viewer; uci commit rpcd; rm -f /tmp/luci-indexcache*"
        )
        oelab.stop_daemon(lab)


def _device(lab: Lab) -> dict[str, Any]:
    doc = json.loads(oelab.oe(lab, f"status --device {lab.plan.client4} --json").check().stdout)
    devices = [d for d in doc["devices"] if d["address"] == lab.plan.client4]
    assert len(devices) == 1, doc
    return dict(devices[0])


def test_device_view_and_explain_from_the_router_shell(lab: Lab, scene: dict[str, str]) -> None:
    """`oe status --device` lists the LAN client's destinations, each protected or clear
    with its reason; `oe explain` says the same per address, and what a new flow meets."""
    dests = {d["address"]: d for d in _device(lab)["destinations"]}
    for role in ("libreswan", "strongswan"):
        d = dests.get(scene[role])
        assert d is not None, (role, sorted(dests))
        assert d["state"] == "protected" and d["tunnel"]["peer"] == scene[role], d
        assert d["dns_name"], d  # the name whose answer triggered the tunnel
    assert dests[scene["plain"]]["state"] == "clear", dests[scene["plain"]]
    assert "no key" in dests[scene["plain"]]["reason"], dests[scene["plain"]]
    silent = dests[scene["silent"]]
    assert silent["state"] == "clear" and silent["shunt"] == "pass", silent
    assert "IKE" in silent["reason"] or "no answer" in silent["reason"], silent
    for role, state in (
        ("libreswan", "protected"),
        ("strongswan", "protected"),
        ("plain", "clear"),
        ("silent", "clear"),
    ):
        doc = json.loads(oelab.oe(lab, f"explain {scene[role]} --json").check().stdout)
        assert doc["state"] == state and doc["group"] == "private-or-clear", (role, doc)
        assert doc["new_flow"], doc
    text = oelab.oe(lab, f"status --device {lab.plan.client4}").check().stdout
    for role in ("libreswan", "strongswan", "plain", "silent"):
        assert scene[role] in text, (role, text)
