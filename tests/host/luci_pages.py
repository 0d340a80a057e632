"""luci-app-oe's pages in a real browser against LuCI's real JavaScript, with a recording
stand-in for what answers behind uhttpd (rpcd's session, uci and luci objects, the
daemon's ubus object ``oe``, LuCI's uci apply endpoints).

Why: the unit tier runs the views over stand-ins for LuCI's classes; this runs them in
Chromium on luci-base as the userland build installed it (form.js, ui.js, rpc.js, uci.js,
validation.js, the bootstrap theme), so what a browser does with them (validation
events, Save, uci apply, the buttons) is exercised without the QEMU lab. The backend here
is a stand-in that records every call: what the real rpcd, uhttpd and daemon do with
them is the QEMU tier's (tests/qemu). The page is LuCI's own view.ut/header.ut rendering,
written out: the same env object, luci.js and ``ui.instantiateView``.
"""

from __future__ import annotations

import copy
import json
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from oe_router.config.uci import parse

SESSION = "a" * 32
TOKEN = "t" * 32
#: ubus statuses (libubus) the stand-in answers with
UBUS_OK, UBUS_NOT_FOUND, UBUS_UNKNOWN_ERROR = 0, 4, 9


@dataclass
class Backend:
    """What the stand-in answers, and what it was asked (``calls``: [object, method, args]
    for ubus, ["http", path] for LuCI's uci apply endpoints)."""

    uci_text: str
    status: dict[str, Any]
    devices: dict[str, Any]
    #: rpcd's answers to `session access` (ubus oe <method>, and uci oe write)
    grants: dict[str, bool] = field(default_factory=dict)
    #: the daemon's answer to reload: accepted, or the problems it refuses with
    reload_problems: list[str] = field(default_factory=list)
    #: answer a refused reload as LuCI's admin/ubus fallback does: the status code only
    reload_body_dropped: bool = False
    calls: list[list[Any]] = field(default_factory=list)
    #: uci changes staged by set/add/delete, applied on the next `uci get` (as rpcd does
    #: for a session's delta)
    staged: dict[str, dict[str, Any]] = field(default_factory=dict)
    added: int = 0

    def uci_values(self) -> dict[str, dict[str, Any]]:
        pkg = parse(self.uci_text, "/etc/config/oe")
        out: dict[str, dict[str, Any]] = {}
        for i, sec in enumerate(pkg.sections):
            name = sec.name or f"cfg{i:02x}{abs(hash(sec.type)) % 0xFFFF:04x}"
            row: dict[str, Any] = {
                ".anonymous": sec.name is None,
                ".type": sec.type,
                ".name": name,
                ".index": i,
            }
            row.update(sec.options)
            row.update({k: list(v) for k, v in sec.lists.items()})
            out[name] = row
        for name, row in self.staged.items():
            if row.get(".deleted"):
                out.pop(name, None)
            else:
                out.setdefault(name, {".anonymous": True, ".index": len(out), ".name": name})
                out[name].update(row)
        return out

    def call(self, obj: str, method: str, args: dict[str, Any]) -> list[Any]:
        if obj == "session" and method == "access":
            key = "uci" if args.get("scope") == "uci" else str(args.get("function"))
            return [UBUS_OK, {"access": self.grants.get(key, False)}]
        if obj == "luci" and method == "getFeatures":
            return [UBUS_OK, {}]
        if obj == "uci":
            return self.uci(method, args)
        if obj == "oe":
            return self.oe(method, args)
        return [UBUS_NOT_FOUND]

    def uci(self, method: str, args: dict[str, Any]) -> list[Any]:
        if method == "get":
            return [UBUS_OK, {"values": self.uci_values()}]
        if method == "changes":
            return [UBUS_OK, {"changes": {}}]
        if method == "add":
            self.added += 1
            name = f"new{self.added:06x}"
            self.staged[name] = {".type": args["type"], **args.get("values", {})}
            return [UBUS_OK, {"section": name}]
        if method == "set":
            self.staged.setdefault(args["section"], {}).update(args.get("values", {}))
            return [UBUS_OK]
        if method == "delete":
            self.staged.setdefault(args["section"], {})[".deleted"] = True
            return [UBUS_OK]
        return [UBUS_OK]

    def oe(self, method: str, args: dict[str, Any]) -> list[Any]:
        if method == "status":
            return [UBUS_OK, self.status]
        if method == "devices":
            return [UBUS_OK, self.devices]
        if method == "flush":
            return [UBUS_OK, {"flushed": len(self.status.get("shunts", []))}]
        if method == "down":
            peer = args.get("peer")
            before = len(self.status["tunnels"])
            self.status["tunnels"] = [t for t in self.status["tunnels"] if t["peer"] != peer]
            return [UBUS_OK, {"deleted": int(before != len(self.status["tunnels"]))}]
        if method == "reload":
            daemon = self.status["daemon"]
            accepted = not self.reload_problems
            if accepted:
                daemon["config_generation"] += 1
            result = {
                "accepted": accepted,
                "generation": daemon["config_generation"],
                "problems": list(self.reload_problems),
                "at_uptime_s": 1.0,
            }
            daemon["last_reload"] = result
            if accepted:
                return [UBUS_OK, {"reload": result}]
            if self.reload_body_dropped:
                return [UBUS_UNKNOWN_ERROR]
            return [UBUS_UNKNOWN_ERROR, {"reload": result, "error": "reload refused: ..."}]
        return [UBUS_NOT_FOUND]


def page_html(view: str, readonly: bool) -> str:
    """What LuCI's dispatcher renders for a view (header.ut's env, view.ut's call)."""
    path = ["admin", "services", *view.split("/")]
    env = {
        "media": "/luci-static/bootstrap",
        "resource": "/luci-static/resources",
        "scriptname": "/cgi-bin/luci",
        "pathinfo": "/" + "/".join(path),
        "requestpath": path,
        "dispatchpath": path,
        "pollinterval": 5,
        "ubuspath": "/ubus/",
        "sessionid": SESSION,
        "token": TOKEN,
        "nodespec": {
            "satisfied": True,
            "readonly": readonly,
            "action": {"type": "view", "path": view},
        },
        "apply_rollback": 90,
        "apply_holdoff": 1,
        "apply_timeout": 5,
        "apply_display": 1.5,
    }
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>luci-app-oe</title>
<link rel="stylesheet" href="/luci-static/bootstrap/cascade.css">
<script src="/cgi-bin/luci/admin/translations/en"></script>
<script src="/luci-static/resources/cbi.js"></script></head>
<body><header><ul class="nav" id="topmenu"></ul><div id="indicators"></div></header>
<div id="maincontent" class="container"><div id="view"><div class="spinning">Loading</div>
<script src="/luci-static/resources/promis.min.js"></script>
<script src="/luci-static/resources/luci.js"></script>
<script>L = new LuCI({json.dumps(env)});
L.require('ui').then(function(ui) {{ ui.instantiateView('{view}'); }});</script>
</div></div></body></html>"""


CONTENT_TYPES = {".js": "application/javascript", ".css": "text/css", ".json": "application/json"}


@contextmanager
def serve(www: list[Path], backend: Backend) -> Iterator[str]:
    """An HTTP server on 127.0.0.1 serving ``www`` folders (first hit wins), the pages
    (``/page/oe/status``, ``/page/oe/settings``, ``/ro`` appended: a read-only menu
    node), /ubus/ and LuCI's uci apply endpoints; yields its base URL."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def reply(self, code: int, body: bytes | str, ctype: str = "application/json") -> None:
            data = body.encode() if isinstance(body, str) else body
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            path = self.path.split("?")[0]
            match = re.fullmatch(r"/page/(oe/\w+)(/ro)?", path)
            if match:
                self.reply(200, page_html(match.group(1), bool(match.group(2))), "text/html")
                return
            if path.startswith("/cgi-bin/luci/admin/translations/"):
                self.reply(200, "window.TR={};", "application/javascript")
                return
            for root in www:
                file = root / path.lstrip("/")
                if path.startswith("/luci-static/") and file.is_file():
                    ctype = CONTENT_TYPES.get(file.suffix, "application/octet-stream")
                    self.reply(200, file.read_bytes(), ctype)
                    return
            self.reply(404, "not found", "text/plain")

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            path = self.path.split("?")[0]
            if path.startswith("/cgi-bin/luci/admin/uci/"):
                action = path.rsplit("/", 1)[1]
                backend.calls.append(["http", action])
                if action == "apply_rollback":
                    self.reply(200, json.dumps({"token": "r" * 32}))
                elif action == "apply_unchecked":
                    self.send_response(204)
                    self.end_headers()
                else:
                    self.reply(200, "{}")
                return
            if path.startswith("/ubus"):
                request = json.loads(body)
                many = isinstance(request, list)
                replies = [self.rpc(r) for r in (request if many else [request])]
                self.reply(200, json.dumps(replies if many else replies[0]))
                return
            self.reply(404, "", "text/plain")

        def rpc(self, request: dict[str, Any]) -> dict[str, Any]:
            if request["method"] == "list":
                return {"jsonrpc": "2.0", "id": request["id"], "result": ["oe", "uci"]}
            _sid, obj, method, args = request["params"]
            backend.calls.append([obj, method, copy.deepcopy(args)])
            result = backend.call(obj, method, args)
            return {"jsonrpc": "2.0", "id": request["id"], "result": result}

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


def sample_status() -> dict[str, Any]:
    """A status document as `oe status --json` gives it: one OE Child SA with its IKE SA
    (NULL auth ours, pubkey the peer's), an IKE SA of `oe up`, a pass shunt, the front."""
    return {
        "daemon": {
            "version": "0.1.0",
            "pid": 1,
            "uptime_s": 100.0,
            "config_path": "/etc/config/oe",
            "config_generation": 3,
            "enabled": True,
            "datapath": "kernel",
            "last_reload": {"accepted": True, "generation": 3, "problems": []},
            "services": ["dns", "ike", "oe"],
        },
        "tunnels": [
            {
                "peer": "192.0.2.7",
                "local": "198.51.100.1",
                "remote": "192.0.2.7/32",
                "state": "established",
                "policy": "private-or-clear",
                "transform": "aes256gcm16",
                "established_s": 12.5,
                "bytes_in": 1000,
                "bytes_out": 2048,
                "source": "",
                "engine": "",
            },
            {
                "peer": "192.0.2.7",
                "local": "198.51.100.1",
                "remote": "",
                "state": "established",
                "source": "ike",
                "local_id": "%null",
                "remote_id": "192.0.2.7",
                "local_auth": "null",
                "remote_auth": "pubkey",
            },
            {
                "peer": "203.0.113.5",
                "local": "198.51.100.1",
                "remote": "",
                "state": "established",
                "source": "ike",
                "local_auth": "null",
                "remote_auth": "null",
            },
        ],
        "shunts": [
            {"destination": "192.0.2.9/32", "kind": "pass", "reason": "no key", "expires_s": 60}
        ],
        "dns": {"queries": 5, "listen": ["127.0.0.1:5335"]},
    }


def sample_devices() -> dict[str, Any]:
    """`oe devices`: one LAN device, a protected destination and a clear one."""
    return {
        "devices": [
            {
                "address": "192.168.1.100",
                "mac": "02:00:00:00:00:01",
                "hostname": "laptop",
                "flows_protected": 1,
                "flows_clear": 1,
                "flows_blocked": 0,
                "flows_pending": 0,
                "destinations": [
                    {
                        "address": "192.0.2.7",
                        "state": "protected",
                        "reason": "tunnel to 192.0.2.7 (auth pubkey)",
                        "flows": 1,
                        "services": ["tcp 443"],
                        "group": "private-or-clear",
                        "entry": "private-or-clear 0.0.0.0/0",
                        "dns_name": "www.example.org",
                        "tunnel": {
                            "peer": "192.0.2.7",
                            "selector": "192.0.2.7/32",
                            "state": "established",
                            "transform": "aes256gcm16",
                            "local_auth": "null",
                            "remote_auth": "pubkey",
                            "remote_id": "192.0.2.7",
                            "ike_spis": "",
                            "spi_in": "",
                            "spi_out": "",
                            "engine": "",
                        },
                        "shunt": "",
                        "expires_s": None,
                    },
                    {
                        "address": "192.0.2.9",
                        "state": "clear",
                        "reason": "pass shunt (no key): no key (secure denial)",
                        "flows": 1,
                        "services": ["tcp 80"],
                        "group": "private-or-clear",
                        "entry": "private-or-clear 0.0.0.0/0",
                        "dns_name": "",
                        "tunnel": None,
                        "shunt": "pass",
                        "expires_s": 60.0,
                    },
                ],
            }
        ],
        "flows_read": 2,
        "truncated": False,
        "notes": [],
    }
