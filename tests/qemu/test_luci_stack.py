"""LuCI served by the router image: uhttpd and rpcd under procd, luci-base with the
bootstrap theme, logged in with root's lab password, over plain HTTP from the LAN client.

Why: luci-app-oe (issue 17) is tested in a browser against the real LuCI of the QEMU
router; this is the stack it stands on, built from ../shared/vendor (qemu/userland.py:
ucode with html, lucihttp, cgi-io, rpcd-mod-luci, luci-base, luci-theme-bootstrap). The
requests go from the LAN client (a netns of the world VM, 192.168.1.100) to the router's
LAN address with curl, as a browser on the LAN would: the lab has no host port forward.

luci-base alone registers no page (the admin modules are not vendored); the image's
luci-app-oe brings the first ones. The module also registers a probe page under Services
(a menu.d entry, as an app's package installs one, removed at the end) and logs in to it.

Shares the session lab (no boot of its own); leaves it as it found it: the probe page and
the sessions it opened are removed at the end.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

import build
from lab import Lab

pytestmark = pytest.mark.qemu

#: the bootstrap theme's login form (themes/bootstrap/sysauth.ut): LuCI's dispatcher
#: answers a request for an admin page without a session with it, status 403
LOGIN_MARKUP = (
    'name="luci_username"',
    'name="luci_password"',
    "ui.instantiateView('bootstrap.sysauth')",
    "/luci-static/bootstrap/cascade.css",
)
#: a page under Services, registered as an app's menu.d file does (the view's JavaScript
#: need not exist for the server's part: the page that loads it)
PROBE_MENU = "/usr/share/luci/menu.d/oe-lab-probe.json"
PROBE = {
    "admin/services/oe-lab-probe": {
        "title": "OE lab probe",
        "order": 1,
        "action": {"type": "view", "path": "oe-lab/probe"},
    }
}
#: ubus JSON-RPC's null session (uhttpd's ubus handler; rpcd's "unauthenticated" ACL
#: group, from luci-base's acl.d, allows session login with it)
NULL_SID = "0" * 32


@dataclass(frozen=True)
class Reply:
    """One HTTP response as curl -i printed it."""

    status: int
    headers: dict[str, list[str]]
    body: str

    def header(self, name: str) -> list[str]:
        return self.headers.get(name.lower(), [])


def http(lab: Lab, path: str, *curl_args: str) -> Reply:
    """curl from the LAN client to the router's uhttpd (no redirects followed)."""
    url = f"http://{lab.plan.router_lan4}{path}"
    args = " ".join(shlex.quote(a) for a in curl_args)
    res = lab.client(f"curl -sS -i -m 30 {args} {shlex.quote(url)}", timeout=60).check()
    head, _, body = res.stdout.replace("\r\n", "\n").partition("\n\n")
    status_line, *lines = head.splitlines()
    headers: dict[str, list[str]] = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers.setdefault(name.strip().lower(), []).append(value.strip())
    return Reply(int(status_line.split()[1]), headers, body)


def rpc(lab: Lab, sid: str, obj: str, method: str, args: dict[str, Any]) -> Any:
    """One ubus JSON-RPC call through uhttpd's /ubus: its result (a [code, data] list)."""
    req = {"jsonrpc": "2.0", "id": 1, "method": "call", "params": [sid, obj, method, args]}
    reply = http(
        lab, "/ubus", "-H", "Content-Type: application/json", "--data-binary", json.dumps(req)
    )
    assert reply.status == 200, reply
    doc = json.loads(reply.body)
    assert "result" in doc, doc
    return doc["result"]


@pytest.fixture(scope="module")
def sessions(lab: Lab) -> Iterator[list[str]]:
    """The rpcd sessions a test opened, destroyed at the module's end."""
    opened: list[str] = []
    yield opened
    for sid in opened:
        lab.router(
            "ubus call session destroy " + shlex.quote(json.dumps({"ubus_rpc_session": sid}))
        )


@pytest.fixture(scope="module")
def probe_page(lab: Lab) -> Iterator[str]:
    """The probe page's menu entry on the router (LuCI's page index cache dropped, so the
    dispatcher reads menu.d again), removed at the module's end."""
    content = json.dumps(PROBE)
    lab.router(
        f"printf '%s' {shlex.quote(content)} > {PROBE_MENU} && rm -f /tmp/luci-indexcache*"
    ).check()
    try:
        yield "oe-lab/probe"
    finally:
        lab.router(f"rm -f {PROBE_MENU} /tmp/luci-indexcache*").check()


def test_uhttpd_and_rpcd_run_under_procd(lab: Lab) -> None:
    """procd runs uhttpd (S50uhttpd, from /etc/config/uhttpd) with the ubus handler on /ubus
    and LuCI's ucode handler on /cgi-bin/luci, and rpcd (S12rpcd) with LuCI's plugins."""
    services = json.loads(lab.router("ubus call service list").check().stdout)
    (httpd,) = services["uhttpd"]["instances"].values()
    assert httpd["running"], httpd
    cmd = httpd["command"]
    assert cmd[0] == "/usr/sbin/uhttpd" and "-f" in cmd, cmd
    assert cmd[cmd.index("-u") + 1] == "/ubus", cmd
    handler = cmd.index("-o")
    assert cmd[handler : handler + 4] == [
        "-o",
        "/cgi-bin/luci",
        "-O",
        "/usr/share/ucode/luci/uhttpd.uc",
    ], cmd
    assert "0.0.0.0:80" in cmd, cmd
    (rpcd,) = services["rpcd"]["instances"].values()
    assert rpcd["running"] and rpcd["command"][0] == "/sbin/rpcd", rpcd
    # rpcd-mod-luci (luci-rpc), rpcd-mod-file (file) and luci-base's ucode plugin (luci)
    objects = set(lab.router("ubus list").check().stdout.split())
    assert {"luci", "luci-rpc", "file"} <= objects, sorted(objects)


def test_luci_app_oe_registers_its_pages(lab: Lab) -> None:
    """The image's luci-app-oe (its .ipk, installed by opkg as python3-oe's is) registers
    Services -> Opportunistic IPsec: its menu.d and acl.d files and views are in place, and
    its page, asked for without a session, is LuCI's login (403), not a 404."""
    listing = lab.router(
        "opkg list-installed luci-app-oe; ls /usr/share/luci/menu.d/luci-app-oe.json "
        "/usr/share/rpcd/acl.d/luci-app-oe.json /www/luci-static/resources/view/oe/status.js "
        "/www/luci-static/resources/view/oe/settings.js"
    ).check()
    assert listing.stdout.startswith("luci-app-oe - "), listing.stdout
    reply = http(lab, "/cgi-bin/luci/admin/services/oe/status")
    assert reply.status == 403, reply
    assert reply.header("X-LuCI-Login-Required") == ["yes"], reply.headers


def test_luci_answers_with_the_bootstrap_login_form(lab: Lab, probe_page: str) -> None:
    """GET /cgi-bin/luci without a session, once a page exists: LuCI's login page in the
    bootstrap theme (the dispatcher sends it as 403 with X-LuCI-Login-Required: yes, as
    upstream LuCI does), and the stylesheet it links is served from /www."""
    reply = http(lab, "/cgi-bin/luci")
    assert reply.status == 403, reply
    assert reply.header("X-LuCI-Login-Required") == ["yes"], reply.headers
    missing = [m for m in LOGIN_MARKUP if m not in reply.body]
    assert not missing, (missing, reply.body[:3000])
    css = http(lab, "/luci-static/bootstrap/cascade.css")
    assert css.status == 200 and ".cbi-section" in css.body, css.status


def test_root_logs_in_and_gets_the_services_menu(
    lab: Lab, probe_page: str, sessions: list[str]
) -> None:
    """POST luci_username=root and the lab's root password: a sysauth_http cookie (an rpcd
    session) and a redirect to the page, which the cookie then opens: the theme's page with
    its menu, where the probe sits under Services. A wrong password gets the form again."""
    wrong = http(
        lab,
        "/cgi-bin/luci",
        "--data-urlencode",
        "luci_username=root",
        "--data-urlencode",
        "luci_password=not-the-password",
    )
    assert wrong.status == 403 and "Invalid username and/or password" in wrong.body, wrong
    assert not wrong.header("Set-Cookie"), wrong.headers
    login = http(
        lab,
        "/cgi-bin/luci",
        "--data-urlencode",
        "luci_username=root",
        "--data-urlencode",
        f"luci_password={build.ROOT_PASSWORD}",
    )
    assert login.status == 302 and login.header("Location") == ["/cgi-bin/luci/"], login
    cookies = [c for c in login.header("Set-Cookie") if c.startswith("sysauth_http=")]
    assert len(cookies) == 1 and "path=/cgi-bin/luci/" in cookies[0], login.headers
    sid = cookies[0].split(";", 1)[0].split("=", 1)[1]
    sessions.append(sid)
    cookie = f"sysauth_http={sid}"
    page = http(lab, "/cgi-bin/luci/", "-b", cookie)
    assert page.status == 200, page
    assert f"ui.instantiateView('{probe_page}')" in page.body, page.body[:3000]
    for marker in ('id="topmenu"', "L.require('menu-bootstrap')", "/luci-static/bootstrap/"):
        assert marker in page.body, (marker, page.body[:3000])
    assert 'name="luci_password"' not in page.body
    menu = http(lab, "/cgi-bin/luci/admin/menu", "-b", cookie)
    assert menu.status == 200, menu
    services = json.loads(menu.body)["children"]["admin"]["children"]["services"]
    assert services["title"] == "Services", services
    assert services["children"]["oe-lab-probe"]["title"] == "OE lab probe", services
    # the cookie is an rpcd session with root's ACL groups: /ubus takes it for what
    # luci-base grants (uci get), as the page's JavaScript will use it
    code, values = rpc(lab, sid, "uci", "get", {"config": "luci", "section": "main"})
    assert code == 0 and values["values"]["mediaurlbase"] == "/luci-static/bootstrap", values


def test_ubus_json_rpc_session_login(lab: Lab, sessions: list[str]) -> None:
    """/ubus: session login from the null session (rpcd's unauthenticated ACL group) with
    root's lab password gives a session holding luci-base's groups, which reaches LuCI's
    rpcd plugins: luci-base's ucode one (luci getFeatures), rpcd-mod-file (file list),
    rpcd-mod-luci (luci-rpc). The wrong password is denied."""
    denied = rpc(lab, NULL_SID, "session", "login", {"username": "root", "password": "not-it"})
    assert denied[0] == 6, denied  # UBUS_STATUS_PERMISSION_DENIED
    code, data = rpc(
        lab,
        NULL_SID,
        "session",
        "login",
        {"username": "root", "password": build.ROOT_PASSWORD},
    )
    assert code == 0, data
    sid = data["ubus_rpc_session"]
    sessions.append(sid)
    assert data["data"]["username"] == "root", data
    groups = data["acls"]["access-group"]
    assert groups["luci-base"] == ["read", "write"], groups
    code, features = rpc(lab, sid, "luci", "getFeatures", {})
    assert code == 0 and features["firewall4"] is True, features  # fw4 is in the image
    code, listing = rpc(lab, sid, "file", "list", {"path": "/www/luci-static"})
    assert code == 0, listing
    assert {"bootstrap", "resources"} <= {e["name"] for e in listing["entries"]}, listing
    (code, *_) = rpc(lab, sid, "luci-rpc", "getNetworkDevices", {})
    assert code == 0
