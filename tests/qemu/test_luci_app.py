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
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webelement import WebElement

import oelab
from lab import Lab
from luciweb import Browser

pytestmark = pytest.mark.qemu

REPO = Path(__file__).resolve().parents[2]
SHOTS = REPO / "test-results" / "artifacts" / "luci"
ROOT_PASSWORD = "oe-lab-root"  # qemu/build.py ROOT_PASSWORD
#: a read-only login (rpcd's config login): luci-base's and the app's ACLs, read only
VIEWER, VIEWER_PASSWORD = "viewer", "oe-lab-viewer"
STATUS_PAGE = "/cgi-bin/luci/admin/services/oe/status"
SETTINGS_PAGE = "/cgi-bin/luci/admin/services/oe/settings"
#: the router's IKE identity: its IPSECKEY is in the lab's DNSSEC, so the strongSwan host
#: (which authenticates every peer) accepts it, and libreswan's NULL-auth host too
ROUTER_ID = "@router.example.test"
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
    oelab.start_daemon(lab, local_id=ROUTER_ID)
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
            # one ping a second to each keeps their conntrack entries (the device view's
            # source) and the tunnels alive for the module's length
            for addr in where.values():
                lab.client(f"nohup ping -q -i 1 {addr} >/dev/null 2>&1 &").check()
        yield where
    finally:
        lab.client("pkill -f 'ping -q -i 1 '")
        lab.router("uci -q delete rpcd.oe_viewer; uci commit rpcd; rm -f /tmp/luci-indexcache*")
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


# ------------------------------------------------------------------ the browser


@pytest.fixture(scope="module")
def browser(lab: Lab, scene: dict[str, str]) -> Iterator[Browser]:
    """Headless chromium on the host, pointed at the router's uhttpd (management port);
    this run's screenshots only in SHOTS."""
    shutil.rmtree(SHOTS, ignore_errors=True)
    b = Browser(lab.router_http, SHOTS)
    try:
        yield b
    finally:
        b.close()


def _rows(b: Browser, css: str) -> dict[str, dict[str, str]]:
    """Rows of a table on the page by their address (data-destination, else data-peer)."""
    out: dict[str, dict[str, str]] = {}
    for attrs in b.rows(css):
        key = attrs.get("data-destination") or attrs.get("data-peer") or ""
        out[key.split("/")[0]] = attrs
    return out


def _status_rows(b: Browser, want: list[str]) -> dict[str, dict[str, str]]:
    """The device table's rows once it has a row for every address in ``want`` (the page
    polls every 5 s; conntrack and the tunnels are read by the daemon per poll)."""

    def complete() -> dict[str, dict[str, str]] | None:
        rows = _rows(b, "#oe-devices tr.oe-destination")
        return rows if all(a in rows for a in want) else None

    return b.wait(
        f"device rows for {want}",
        complete,
        timeout=120,
    )


def test_login_and_the_status_page_shows_who_is_protected(
    lab: Lab, scene: dict[str, str], browser: Browser
) -> None:
    """Log in as root, open Services -> Opportunistic IPsec -> Status: the LAN client's
    tunnels to the libreswan and strongSwan hosts are protected rows with their peer and
    auth; the plain and silent hosts are clear rows, with their pass shunts listed."""
    b = browser
    b.login("root", ROOT_PASSWORD)
    b.open(STATUS_PAGE)
    b.wait("the status page", lambda: b.find("#oe-status"), timeout=120)
    rows = _status_rows(b, list(scene.values()))
    b.screenshot("status")
    for role in ("libreswan", "strongswan"):
        r = rows[scene[role]]
        assert r["data-state"] == "protected" and r["data-peer"] == scene[role], (role, r)
        assert r["data-device"] == lab.plan.client4, r
        assert r["data-auth"], (role, r)  # the peer's auth method, as IKE proved it
        assert r["data-auth"] in r["text"], r
    for role in ("plain", "silent"):
        assert rows[scene[role]]["data-state"] == "clear", (role, rows[scene[role]])
    tunnels = _rows(b, "#oe-tunnels tr.oe-tunnel")
    for role in ("libreswan", "strongswan"):
        assert scene[role] in tunnels, (role, sorted(tunnels))
    shunts = _rows(b, "#oe-shunts tr.oe-shunt")
    for role in ("plain", "silent"):
        assert shunts.get(scene[role], {}).get("data-kind") == "pass", (role, shunts)
    assert b.find("#oe-status")[0].get_attribute("data-writable") == "1"
    assert b.find("#oe-dns tr[data-key]"), "no DNS front counters on the page"
    assert not [m for m in b.console() if "SEVERE" in m and "/oe/" in m], b.console()


def test_a_read_only_login_sees_status_but_cannot_act(
    lab: Lab, scene: dict[str, str], browser: Browser
) -> None:
    """A login with luci-app-oe's read ACL only: the status rows are there, Flush and Down
    are disabled, the settings form is read-only, and rpcd refuses the write methods to
    its session (the buttons are not the only guard)."""
    hashed = subprocess.run(
        ["openssl", "passwd", "-1", VIEWER_PASSWORD], capture_output=True, text=True, check=True
    ).stdout.strip()
    lab.router(
        "uci -q delete rpcd.oe_viewer; uci set rpcd.oe_viewer=login && "
        f"uci set rpcd.oe_viewer.username={VIEWER} && "
        f"uci set rpcd.oe_viewer.password={shlex.quote(hashed)} && "
        "for g in unauthenticated luci-base luci-app-oe; do "
        "uci add_list rpcd.oe_viewer.read=$g; done && uci commit rpcd"
    ).check()
    b = browser
    b.login(VIEWER, VIEWER_PASSWORD)
    b.open(STATUS_PAGE)
    page = b.wait("the status page", lambda: b.find("#oe-status"), timeout=120)[0]
    rows = _status_rows(b, [scene["libreswan"], scene["strongswan"]])
    assert rows[scene["libreswan"]]["data-state"] == "protected", rows
    b.screenshot("status-readonly")
    assert page.get_attribute("data-writable") == "0"
    buttons = b.rows("#oe-flush, button.oe-down")
    assert len(buttons) >= 3, "no Flush or Down buttons on the page"
    assert all(btn["disabled"] for btn in buttons), f"a write button is enabled: {buttons}"
    b.open(SETTINGS_PAGE)
    form = b.wait("the settings page", lambda: b.find("#oe-settings"), timeout=120)[0]
    assert form.get_attribute("data-writable") == "0"
    assert not [x for x in b.rows(".cbi-page-actions .cbi-button-apply") if not x["disabled"]]
    b.screenshot("settings-readonly")
    sid = _sid(b)
    code = _ubus(lab, sid, "oe", "flush", {})
    assert code == -32002, f"rpcd let the read-only session call oe flush ({code})"
    assert _ubus(lab, sid, "oe", "status", {}) == 0


def _ubus(lab: Lab, sid: str, obj: str, method: str, args: dict[str, Any]) -> int:
    """uhttpd's JSON-RPC /ubus with a session, from the host: 0, a ubus status, or the
    JSON-RPC error code (-32002: access denied)."""
    return _ubus_call(lab, sid, obj, method, args)[0]


def _ubus_call(lab: Lab, sid: str, obj: str, method: str, args: dict[str, Any]) -> tuple[int, Any]:
    """The call's code (as ``_ubus``) and its reply data (None without one)."""
    req = {"jsonrpc": "2.0", "id": 1, "method": "call", "params": [sid, obj, method, args]}
    http = urllib.request.Request(
        lab.router_http + "/ubus",
        data=json.dumps(req).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(http, timeout=60) as reply:
        doc = json.loads(reply.read())
    if "error" in doc:
        return int(doc["error"]["code"]), None
    result = doc["result"]
    return int(result[0]), (result[1] if len(result) > 1 else None)


def _sid(b: Browser) -> str:
    """The browser's LuCI session (its sysauth cookie): rpcd's session id."""
    return next(str(c["value"]) for c in b.driver.get_cookies() if c["name"].startswith("sysauth"))


def _settings(b: Browser) -> WebElement:
    b.open(SETTINGS_PAGE)
    return b.wait(
        "the settings form",
        lambda: b.find("#oe-settings")
        and b.find("[data-oe-section='policy'] .cbi-section-create button"),
        timeout=120,
    )[0]


def _new_private_dest(b: Browser, cidr: str) -> WebElement:
    """Add a policy section (its group starts as private) and type ``cidr`` into its
    destination list; the list's input element."""
    before = len(b.find("[data-oe-section='policy'] .cbi-section-node"))
    b.click("Add in the policy groups", "[data-oe-section='policy'] .cbi-section-create button")
    b.wait(
        "a new policy section",
        lambda: len(b.find("[data-oe-section='policy'] .cbi-section-node")) > before,
    )
    node = b.find("[data-oe-section='policy'] .cbi-section-node")[-1]
    group = node.find_element(By.CSS_SELECTOR, "select[id$='.group']")
    assert group.get_attribute("value") == "private", group.get_attribute("value")
    field = node.find_element(By.CSS_SELECTOR, "input[id$='.dest']")
    field.send_keys(cidr)
    field.send_keys(Keys.ENTER)
    return field


def test_an_invalid_cidr_is_refused_in_the_browser(lab: Lab, browser: Browser) -> None:
    """A destination with an impossible address: the field is marked invalid, Save &
    Apply shows LuCI's error instead of saving, and the router's config is unchanged."""
    b = browser
    b.login("root", ROOT_PASSWORD)
    before = lab.router("uci show oe").check().stdout
    _settings(b)
    field = _new_private_dest(b, "198.51.100.300/24")
    b.wait(
        "the field marked invalid",
        lambda: "cbi-input-invalid" in (field.get_attribute("class") or ""),
    )
    b.click("Save & Apply", ".cbi-page-actions .cbi-button-apply")
    modal = b.wait("LuCI's refusal", lambda: [m for m in b.find(".modal") if m.is_displayed()])
    assert "198.51.100.300" in modal[0].text or "invalid" in modal[0].text.lower(), modal[0].text
    b.screenshot("settings-invalid")
    time.sleep(2)  # an apply, had one started, would have reached rpcd by now
    assert lab.router("uci show oe").check().stdout == before
    # LuCI staged the new (empty) section in the session when Add was pressed, as it
    # does; the invalid destination never reached the staged changes. They belong to
    # this login's session: a new login starts clean.
    code, changes = _ubus_call(lab, _sid(b), "uci", "changes", {"config": "oe"})
    assert code == 0 and "198.51.100.300" not in json.dumps(changes), changes
    b.login("root", ROOT_PASSWORD)


def test_save_and_apply_reaches_uci_and_the_daemon(lab: Lab, browser: Browser) -> None:
    """A new hold limit and a new private destination, Save & Apply: `uci show oe` on the
    router has them, and the daemon runs a new generation that has them."""
    b = browser
    gen0 = int(oelab.status(lab)["daemon"]["config_generation"])
    _settings(b)
    hold = b.wait("the hold limit field", lambda: b.visible(By.ID, "widget.cbid.oe.dns.hold_limit"))
    hold.clear()
    hold.send_keys("2s")
    _new_private_dest(b, "198.51.100.0/24")
    b.click("Save & Apply", ".cbi-page-actions .cbi-button-apply")
    box = b.wait(
        "the daemon's accepted reload",
        lambda: [
            x
            for x in b.find("#oe-reload[data-state='accepted']")
            if int(x.get_attribute("data-generation") or 0) > gen0
        ],
        timeout=180,
    )[0]
    b.driver.execute_script("document.getElementById('oe-reload').scrollIntoView()")
    b.screenshot("settings-applied")
    shown = int(box.get_attribute("data-generation") or 0)
    assert lab.router("uci get oe.dns.hold_limit").check().stdout.strip() == "2s"
    show = lab.router("uci show oe").check().stdout
    private = [
        line.split(".")[1] for line in show.splitlines() if line.endswith(".group='private'")
    ]
    assert any(f"oe.{s}.dest='198.51.100.0/24'" in show for s in private), show
    status = oelab.status(lab)
    assert int(status["daemon"]["config_generation"]) >= shown > gen0, status["daemon"]
    doc = json.loads(oelab.oe(lab, "explain 198.51.100.7 --json").check().stdout)
    assert doc["group"] == "private", doc


def test_down_takes_a_tunnel_out_of_the_kernel_and_the_page(
    lab: Lab, scene: dict[str, str], browser: Browser
) -> None:
    """Press Down on the libreswan host's tunnel: its SAs leave the kernel and its row
    leaves the page (the LAN client's pings to it were stopped first, so nothing brings
    the tunnel straight back)."""
    b = browser
    peer = scene["libreswan"]
    lab.client(f"pkill -f 'ping -q -i 1 {peer}'")
    assert lab.router(f"ip xfrm state list dst {peer}").check().stdout.strip(), (
        "no SA to press Down on"
    )
    b.open(STATUS_PAGE)
    b.click("Down of the libreswan tunnel", f"button.oe-down[data-peer='{peer}']", timeout=120)
    b.wait(
        "the tunnel row gone",
        lambda: peer not in _rows(b, "#oe-tunnels tr.oe-tunnel") or None,
        timeout=60,
    )
    b.screenshot("status-after-down")
    out = lab.router(f"ip xfrm state list dst {peer}; ip xfrm state list src {peer}").check()
    assert out.stdout.strip() == "", out.stdout
    assert scene["strongswan"] in _rows(b, "#oe-tunnels tr.oe-tunnel"), "Down took the wrong tunnel"
