"""luci-app-oe (package/luci-app-oe): its pages agree with the daemon they show and edit.

What the browser does with the pages is the QEMU tier's (real LuCI, real uhttpd and rpcd).
Here, without a browser: the generated schema is what the generator makes now (drift); the
JavaScript validators accept and refuse what the Python parsers do, with the same
canonical values, on a table of good and bad values and on a few thousand mutations of
them (node runs oe/validate.js); the settings view, run under node over stand-ins for
LuCI's form classes, holds every option of ``validate.OPTIONS`` and its own validate()
refuses an invalid CIDR; the status view builds the hooks the browser tests use, and a
session without the write grant gets no usable button; the menu and ACL files match the
ubus object's methods (``ubus_api.luci_acl``); and ``ipk.build_luci`` makes the .ipk the
recipe describes. Every .js file passes ``node --check``.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from oe_router.config.export_schema import LUCI_SCHEMA, luci_module, schema_doc
from oe_router.config.schema import BadValue
from oe_router.config.validate import OPTIONS, SINGLETONS, Choice, defaults_as_dict
from oe_router.control.protocol import COMMAND_ARGS
from oe_router.control.ubus_api import LUCI_GROUP, METHODS, acl, luci_acl

REPO = Path(__file__).resolve().parents[2]
APP = REPO / "package" / "luci-app-oe"
RESOURCES = APP / "htdocs" / "luci-static" / "resources"
JS = Path(__file__).resolve().parent / "js"
NODE = shutil.which("node") or "/usr/bin/node"
sys.path.insert(0, str(REPO / "package"))

import ipk  # noqa: E402

EPOCH = 1_700_000_000


def _node(script: str, doc: dict[str, Any]) -> Any:
    """Run tests/unit/js/<script> with ``doc`` (JSON) on stdin; its JSON stdout."""
    proc = subprocess.run(
        [NODE, str(JS / script)],
        input=json.dumps({"resources": str(RESOURCES), **doc}),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


# -- the schema --------------------------------------------------------------------------


def test_the_generated_schema_is_what_the_generator_makes_now() -> None:
    """oe/schema.js is regenerated from validate.OPTIONS, never edited: run
    `python -m oe_router.config.export_schema --out package/luci-app-oe/.../schema.js`."""
    assert (REPO / LUCI_SCHEMA).read_text() == luci_module(schema_doc())


def test_every_option_is_in_the_schema_with_its_parsers_limits() -> None:
    doc = schema_doc()
    rows = {(s["type"], o["name"]): o for s in doc["sections"] for o in s["options"]}
    assert set(rows) == {(t, n) for t, opts in OPTIONS.items() for n in opts}
    defaults = defaults_as_dict()
    for (stype, name), row in rows.items():
        opt = OPTIONS[stype][name]
        assert row["kind"] == opt.parse.kind and row["list"] == opt.is_list, (stype, name)
        assert row["required"] == opt.required
        # the default, spelled as UCI spells it, parses back to the daemon's default
        if row["default"] is not None:
            texts = row["default"] if opt.is_list else [row["default"]]
            parsed = tuple(opt.parse(t) for t in texts)
            want = defaults[stype][name]
            assert (parsed if opt.is_list else parsed[0]) == want, (stype, name)
    hold = rows[("dns", "hold_limit")]
    assert (hold["kind"], hold["min"], hold["max"], hold["max_text"]) == ("duration", 0, 10, "10s")
    frag = rows[("ike", "fragment_size")]
    assert (frag["min"], frag["max"], frag["gap"]) == (0, 65535, [576, 9000])
    assert rows[("oe", "control_socket")]["max_len"] == 107
    assert rows[("policy", "group")]["choices"] == doc["policy_groups"]
    assert [s["name"] for s in doc["sections"] if s["single"]] == list(SINGLETONS.values())


def test_oe_config_schema_prints_the_document(capsys: pytest.CaptureFixture[str]) -> None:
    from oe_router import cli

    assert cli.main(["config", "schema"]) == 0
    assert json.loads(capsys.readouterr().out) == schema_doc()


# -- the validators ------------------------------------------------------------------------

#: (type, option) -> values, good and bad, for every kind of the schema
VALUES: dict[tuple[str, str], list[str]] = {
    ("oe", "enabled"): ["1", "0", "yes", "On", " true ", "disabled", "2", "", "ja"],
    ("oe", "log_level"): ["debug", "info", "Info", " info", "verbose", ""],
    ("oe", "control_socket"): [
        "/var/run/oe/control.sock",
        "var/run/x",
        "/" + "a" * 106,
        "/" + "a" * 107,
        "/tmp/with space",
        "/tmp/tab\there",
        "/tmp/é" + "a" * 104,
        "",
    ],
    ("oe", "offload"): ["auto", "off", "afalg", "cryptodev:virtio", "a b", "x" * 97, ""],
    ("oe", "shunt_lifetime"): ["15m", "900", "1s", "0.5s", "24h", "25h", "1h30m", "-0", "+5m"],
    ("oe", "wan_interface"): ["wan", "eth0.2", "br-lan", ".", "..", "a" * 16, "w an", "wan@x"],
    ("oe", "policy_limit"): ["1024", "0", "1", "1_000", "+7", "007", "1e3", " 12 ", "1000001"],
    ("dns", "mode"): ["dnsmasq", "manual", "auto"],
    ("dns", "listen"): [
        "127.0.0.1:5335",
        "127.0.0.1",
        "[::1]:5335",
        "::1",
        "[::1]",
        "[127.0.0.1]:53",
        "1.2.3.4:0",
        "1.2.3.4:65536",
        "1.2.3.4:",
        "01.2.3.4",
        "[::1",
        "[::1]x",
        "fe80::1%eth0",
        "[fe80::1%eth0]:53",
        "2001:DB8::1",
        "host:53",
        " 10.0.0.1:53 ",
    ],
    ("dns", "hold_limit"): [
        "3s",
        "3",
        "3 s",
        "500ms",
        "0",
        "10s",
        "10.001s",
        "11s",
        "-1s",
        "-0s",
        ".5",
        "5.",
        "1e1",
        "3 parsecs",
        "3S",
        "",
    ],
    ("dns", "ttl_cap"): ["5m", "24h", "1441m", "86400", "86400.5"],
    ("dns", "bogus_action"): ["servfail", "insecure", "drop"],
    ("ike", "rekey_jitter"): ["100%", "100", "0", " 50 % ", "101%", "%", "50%%", "-1"],
    ("ike", "retransmit_timeout"): ["400ms", "0.1s", "99ms", "30s", "30001ms"],
    ("ike", "retransmit_tries"): ["3", "0", "20", "21", "3.0"],
    ("ike", "fragment_size"): ["0", "576", "575", "9000", "9001", "1280", "65536", "-0"],
    ("ike", "esp_proposal"): ["aes256gcm16", "aes128-sha256", "3des", "AES256GCM16"],
    ("identity", "local_id"): [
        "%null",
        "%NULL",
        "@router.example.org",
        "@router.example.org.",
        "@-bad.example",
        "@" + "a" * 64 + ".org",
        "@",
        "192.0.2.1",
        "2001:0db8:0:0::1",
        "router.example.org",
    ],
    ("identity", "private_key"): ["/etc/oe/private.pem", "etc/oe/private.pem"],
    ("policy", "group"): ["private", "private-or-clear", "clear", "block", "public"],
    ("policy", "dest"): [
        "192.0.2.0/24",
        "192.0.2.1/24",
        "192.0.2.1",
        "10.0.0.0/8 tcp 443",
        "10.0.0.0/8 TCP 443",
        "10.0.0.0/8 udp",
        "10.0.0.0/8 icmp 5",
        "10.0.0.0/8 6 80",
        "10.0.0.0/8 256",
        "10.0.0.0/8 tcp 0",
        "10.0.0.0/8 tcp 65536",
        "10.0.0.0/8 tcp 443 extra",
        "10.0.0.0/8 bogus",
        "10.0.0.0/33",
        "10.0.0.0/255.0.0.0",
        "10.0.0.0/0.255.255.255",
        "10.0.0.0/255.0.255.0",
        "10.0.0.0/08",
        "0.0.0.0/0",
        "::/0",
        "2001:db8::/32",
        "2001:DB8:0::/32",
        "2001:db8::1/32",
        "2001:db8::/129",
        "2001:db8::/32 icmp",
        "2001:db8::/32 icmpv6",
        "2001:db8::/32 ipv6-icmp",
        "10.0.0.0/8 icmpv6",
        "::ffff:10.0.0.0/104",
        "1:2:3:4:5:6:7:8/128",
        "1:2:3:4:5:6::7:8",
        "1::2::3",
        ":1::",
        "1::/16",
        "0:0:0:0:0:0:0:0/0",
        "1:0:0:1:0:0:0:1",
        "fe80::%eth0/64",
        "10.0.0.0/ 8",
        "  10.0.0.0/8   tcp  ",
        "10.0.0.256/32",
        "10.0.0/24",
        "",
        "/8",
    ],
}


def _python(stype: str, name: str, value: str) -> list[Any]:
    """[ok, canonical value or the reason], as oe/validate.js reports it."""
    opt = OPTIONS[stype][name]
    try:
        parsed = opt.parse(value)
    except BadValue as exc:
        return [False, str(exc)]
    if isinstance(parsed, bool | int | float):
        return [True, parsed]
    return [True, str(parsed)]


def _agree(cases: list[tuple[str, str, str]]) -> None:
    got = _node("check_values.js", {"cases": cases})
    assert len(got) == len(cases)
    wrong = []
    for (stype, name, value), js in zip(cases, got, strict=True):
        py = _python(stype, name, value)
        if py[0] != js[0] or (py[0] and py[1] != js[1]):
            wrong.append((f"{stype}.{name}", value, py, js))
    assert not wrong, "\n".join(map(repr, wrong[:20]))


def test_the_validators_agree_with_the_daemons_parsers() -> None:
    """Each value: accepted by both with the same canonical form (seconds, number,
    address, entry), or refused by both. Every kind of the schema is in the table."""
    cases = [(t, n, v) for (t, n), values in VALUES.items() for v in values]
    kinds = {OPTIONS[t][n].parse.kind for t, n, _ in cases}
    assert kinds == {o.parse.kind for opts in OPTIONS.values() for o in opts.values()}
    _agree(cases)


#: what mutations insert: ASCII only (the JavaScript side takes ASCII digits and white
#: space, the Python one any Unicode digit: a documented difference, see oe/validate.js)
ALPHABET = "0123456789abcdefABCDEF:./%@[]-_ +\tsmhx"


def test_the_validators_agree_on_mutated_values() -> None:
    """A few thousand neighbours of the table's values (a character dropped, doubled,
    replaced or inserted; seeded, so a failure repeats), for the grammars with most room
    to differ: durations, numbers, endpoints, policy entries, identities."""
    rng = random.Random(17)
    seeds = [
        (t, n, v)
        for (t, n), values in VALUES.items()
        if OPTIONS[t][n].parse.kind in ("duration", "int", "endpoint", "policy_dest", "local_id")
        for v in values
        if v
    ]
    cases = []
    for _ in range(4000):
        stype, name, value = rng.choice(seeds)
        chars = list(value)
        for _ in range(rng.randint(1, 3)):
            at = rng.randrange(len(chars) + 1)
            op = rng.randrange(4)
            if op == 0 and at < len(chars):
                del chars[at]
            elif op == 1 and at < len(chars):
                chars.insert(at, chars[at])
            elif op == 2 and at < len(chars):
                chars[at] = rng.choice(ALPHABET)
            else:
                chars.insert(at, rng.choice(ALPHABET))
        cases.append((stype, name, "".join(chars)))
    _agree(cases)


# -- the settings form ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def settings() -> Any:
    return _node(
        "settings_form.js",
        {
            "cases": [
                ["policy", "dest", "10.0.0.1/8"],
                ["policy", "dest", "192.0.2.0/24"],
                ["policy", "dest", ["192.0.2.0/24", "2001:db8::1/32"]],
                ["policy", "dest", "not-a-cidr"],
                ["policy", "dest", ""],
                ["dns", "hold_limit", "11s"],
                ["dns", "hold_limit", "5s"],
                ["dns", "hold_limit", ""],
                ["oe", "datapath", "kernel"],
            ]
        },
    )


def test_every_option_is_in_the_settings_form(settings: Any) -> None:
    """The form, built by settings.js from the generated schema, holds every option of
    validate.OPTIONS once, each with a validate(); its widget fits the option's kind."""
    seen = [(s["type"], o["name"]) for s in settings["sections"] for o in s["options"]]
    assert sorted(seen) == sorted((t, n) for t, opts in OPTIONS.items() for n in opts)
    assert settings["config"] == "oe"
    widget = {"bool": "Flag", "choice": "ListValue"}
    for s in settings["sections"]:
        for o in s["options"]:
            opt = OPTIONS[s["type"]][o["name"]]
            want = "DynamicList" if opt.is_list else widget.get(opt.parse.kind, "Value")
            assert o["cls"] == want and o["validates"], (s["type"], o)
            if isinstance(opt.parse, Choice):
                assert o["values"] == list(opt.parse.choices), o
    assert [s["hook"] for s in settings["sections"]] == [s["type"] for s in settings["sections"]]
    kinds = {s["type"]: (s["cls"], s["name"]) for s in settings["sections"]}
    for stype, name in SINGLETONS.items():
        assert kinds[stype] == ("NamedSection", name)
    assert kinds["policy"] == ("TypedSection", None)
    general = next(s for s in settings["sections"] if s["type"] == "oe")
    assert general["tabs"] == ["general", "datapath"]
    tabs = {o["name"]: o["tab"] for o in general["options"]}
    assert tabs["datapath"] == tabs["offload"] == tabs["packet_hold"] == "datapath"
    assert tabs["enabled"] == tabs["wan_interface"] == "general"


def test_the_form_refuses_an_invalid_cidr_before_saving(settings: Any) -> None:
    """The options' own validate() (what LuCI runs on input and before Save): an error
    text for a bad value, true for a good one; empty is the default unless required."""
    bad_host, good, bad_list, garbage, empty_dest, over, fine, empty, choice = settings["cases"]
    assert isinstance(bad_host, str) and "host bits set" in bad_host and "10.0.0.0/8" in bad_host
    assert good is True
    assert isinstance(bad_list, str) and "2001:db8::1/32" in bad_list
    assert isinstance(garbage, str) and "no valid CIDR" in garbage
    # empty passes validate() (LuCI also calls it with "" for a list's container); a
    # required option is kept by rmempty = false instead, which LuCI enforces on Save
    assert empty_dest is True
    policy = next(s for s in settings["sections"] if s["type"] == "policy")
    assert {o["name"]: o["rmempty"] for o in policy["options"]} == {"group": False, "dest": False}
    assert isinstance(over, str) and "out of range" in over
    assert fine is True and empty is True and choice is True


def test_the_settings_page_reloads_the_daemon_through_ubus(settings: Any) -> None:
    declared = {(d["object"], d["method"]) for d in settings["declared"]}
    assert declared == {("oe", "reload"), ("oe", "status")}
    assert METHODS["reload"].access == "write" and METHODS["status"].access == "read"
    # no status reply: the box that shows the last reload says it does not know
    assert settings["page"]["reload"] == {"id": "oe-reload", "data-state": "unknown"}


# -- the status page ------------------------------------------------------------------------

STATUS = {
    "daemon": {
        "version": "0.1.0",
        "config_generation": 3,
        "enabled": True,
        "datapath": "kernel",
        "uptime_s": 100.0,
        "services": ["dns", "ike", "oe"],
        "last_reload": {"accepted": False, "generation": 3, "problems": ["oe.dns.x: bad"]},
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
DEVICES = {
    "devices": [
        {
            "address": "192.168.1.100",
            "mac": "02:00:00:00:00:01",
            "hostname": "laptop",
            "flows_protected": 1,
            "flows_clear": 1,
            "destinations": [
                {
                    "address": "192.0.2.7",
                    "state": "protected",
                    "reason": "tunnel to 192.0.2.7 (auth pubkey)",
                    "flows": 1,
                    "services": ["tcp 443"],
                    "group": "private-or-clear",
                    "dns_name": "www.example.org",
                    "tunnel": {
                        "peer": "192.0.2.7",
                        "selector": "192.0.2.7/32",
                        "state": "established",
                        "transform": "aes256gcm16",
                        "local_auth": "null",
                        "remote_auth": "pubkey",
                        "remote_id": "192.0.2.7",
                        "engine": "",
                    },
                    "shunt": "",
                    "expires_s": None,
                },
                {
                    "address": "192.0.2.9",
                    "state": "clear",
                    "reason": "pass shunt (no key): no key",
                    "flows": 1,
                    "tunnel": None,
                    "shunt": "pass",
                    "expires_s": 60,
                },
            ],
        }
    ],
    "flows_read": 2,
    "truncated": False,
    "notes": [],
}


def _status_page(**extra: Any) -> Any:
    return _node("status_view.js", {"status": STATUS, "devices": DEVICES, **extra})


def _by(page: Any, **attrs: str) -> list[Any]:
    return [e for e in page["elements"] if all(e["attrs"].get(k) == v for k, v in attrs.items())]


def test_the_status_page_builds_the_rows_the_browser_tests_read() -> None:
    page = _status_page(access={"flush": True, "down": True})
    for table in ("oe-daemon", "oe-devices", "oe-tunnels", "oe-shunts", "oe-dns"):
        assert len(_by(page, id=table)) == 1, table
    protected, clear = _by(page, **{"data-device": "192.168.1.100"})
    assert protected["attrs"]["data-peer"] == "192.0.2.7"
    assert protected["attrs"]["data-state"] == "protected"
    assert protected["attrs"]["data-auth"] == "pubkey"
    assert protected["attrs"]["data-dns-name"] == "www.example.org"
    assert "aes256gcm16" in protected["text"] and "2.0 KiB" in protected["text"]
    assert (clear["attrs"]["data-peer"], clear["attrs"]["data-state"]) == ("192.0.2.9", "clear")
    # one row per OE Child SA (with its IKE SA's auth), and the IKE SA without one
    tunnels = [e for e in page["elements"] if "oe-tunnel" in e["class"].split()]
    assert [(t["attrs"]["data-peer"], t["attrs"]["data-source"]) for t in tunnels] == [
        ("192.0.2.7", "oe"),
        ("203.0.113.5", "ike"),
    ]
    assert tunnels[0]["attrs"]["data-auth"] == "pubkey"
    (shunt,) = _by(page, **{"data-kind": "pass"})
    assert shunt["attrs"]["data-destination"] == "192.0.2.9/32"
    assert _by(page, id="oe-daemon")[0]["attrs"]["data-generation"] == "3"
    (dns,) = _by(page, id="oe-dns")
    keys = [e["attrs"]["data-key"] for e in page["elements"] if "data-key" in e["attrs"]]
    assert keys[-2:] == ["listen", "queries"] and "queries5" in dns["text"]
    assert page["polls"] == [5] and page["no_footer"]


def test_the_buttons_call_flush_and_down_with_the_peer() -> None:
    page = _status_page(access={"flush": True, "down": True}, click=["down:203.0.113.5", "flush"])
    buttons = [e for e in page["elements"] if e["tag"] == "button"]
    assert {b["text"] for b in buttons} == {"Flush", "Down"}
    assert all(b["handlers"] == ["click"] and "disabled" not in b["attrs"] for b in buttons)
    writes = [c for c in page["calls"] if METHODS.get(c["method"], None) and c["object"] == "oe"]
    assert [(c["method"], c["args"]) for c in writes if c["method"] in ("down", "flush")] == [
        ("down", ["203.0.113.5"]),
        ("flush", []),
    ]
    down = next(d for d in page["declared"] if d["method"] == "down")
    assert down["params"] == list(COMMAND_ARGS["down"]) == ["peer"]
    for d in page["declared"]:
        assert d["object"] == "session" or d["method"] in METHODS, d
    assert page["notifications"] == [
        "Took down 1 IKE SA(s) with 203.0.113.5.",
        "Flushed 2 shunt(s): the next flows to those destinations negotiate again.",
    ]


@pytest.mark.parametrize(
    ("access", "permission"),
    [({"flush": False, "down": False}, True), ({"flush": True, "down": True}, False)],
    ids=["no-write-grant", "read-only-menu-node"],
)
def test_without_the_write_grant_the_buttons_are_dead(
    access: dict[str, bool], permission: bool
) -> None:
    """rpcd's session says no to oe flush/down, or LuCI marks the page read-only (the
    menu node's ACL dependency is read only): the status shows, every button is disabled
    and has no handler, and clicking calls nothing."""
    page = _status_page(access=access, viewPermission=permission, click=["down:192.0.2.7", "flush"])
    assert _by(page, **{"data-state": "protected"})
    buttons = [e for e in page["elements"] if e["tag"] == "button"]
    assert len(buttons) == 3
    assert all("disabled" in b["attrs"] and not b["handlers"] for b in buttons)
    assert not [c for c in page["calls"] if c["method"] in ("flush", "down")]
    assert _by(page, id="oe-status")[0]["attrs"]["data-writable"] == "0"


# -- menu, ACL ------------------------------------------------------------------------------


def test_the_acl_file_is_the_ubus_objects() -> None:
    shipped = json.loads((APP / "root/usr/share/rpcd/acl.d/luci-app-oe.json").read_text())
    assert shipped == luci_acl()
    group = shipped[LUCI_GROUP]
    for access in ("read", "write"):
        assert group[access]["ubus"] == acl()["oe"][access]["ubus"]
        assert group[access]["uci"] == ["oe"]
    assert set(group["read"]["ubus"]["oe"]) | set(group["write"]["ubus"]["oe"]) == set(METHODS)


def test_the_menu_puts_both_pages_under_services_behind_the_acl() -> None:
    menu = json.loads((APP / "root/usr/share/luci/menu.d/luci-app-oe.json").read_text())
    top = menu["admin/services/oe"]
    assert top["depends"]["acl"] == [LUCI_GROUP]
    assert top["action"] == {"type": "alias", "path": "admin/services/oe/status"}
    views = {k: v["action"]["path"] for k, v in menu.items() if v["action"]["type"] == "view"}
    assert views == {
        "admin/services/oe/status": "oe/status",
        "admin/services/oe/settings": "oe/settings",
    }
    for path in views.values():
        assert (RESOURCES / "view" / f"{path}.js").is_file(), path


def test_every_javascript_file_parses() -> None:
    files = sorted(APP.rglob("*.js")) + sorted(JS.glob("*.js"))
    assert len(files) >= 8
    for path in files:
        proc = subprocess.run([NODE, "--check", str(path)], capture_output=True, text=True)
        assert proc.returncode == 0, (path, proc.stderr)


def test_the_views_require_only_what_luci_base_has() -> None:
    """LuCI loads a view's 'require' lines as classes from /www/luci-static/resources:
    luci-base's own, or the app's oe/*.js."""
    base = {"baseclass", "view", "form", "rpc", "uci", "ui", "dom", "poll"}
    for path in RESOURCES.rglob("*.js"):
        for name in re.findall(r"^'require ([\w.]+)", path.read_text(), re.M):
            assert name in base or (RESOURCES / (name.replace(".", "/") + ".js")).is_file(), name


# -- the package ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def luci_ipk(tmp_path_factory: pytest.TempPathFactory) -> ipk.Ipk:
    return ipk.build_luci(tmp_path_factory.mktemp("out"), epoch=EPOCH)


def _var(path: Path, name: str) -> str:
    match = re.search(rf"^{name}:=(.*)$", path.read_text(), re.M)
    assert match, name
    return match.group(1).strip()


def test_the_ipk_has_the_recipes_control_fields(luci_ipk: ipk.Ipk) -> None:
    fields = ipk.control_fields(luci_ipk.control)
    version = _var(APP / "Makefile", "PKG_VERSION")
    assert version == _var(REPO / "package/python-oe/Makefile", "PKG_VERSION")
    assert luci_ipk.path.name == f"luci-app-oe_{version}_all.ipk"
    assert fields["Package"] == "luci-app-oe"
    assert fields["Version"] == version
    assert fields["Depends"] == "luci-base, python3-oe"
    assert fields["Architecture"] == "all"
    assert fields["Section"] == "luci"
    assert fields["Source"] == "feeds/oe/luci-app-oe"
    assert fields["License"] == _var(APP / "Makefile", "PKG_LICENSE")
    assert fields["SourceDateEpoch"] == str(EPOCH)
    assert "form over /etc/config/oe" in fields["Description"]
    members = ipk.read_ipk(luci_ipk.path)
    assert "rpcd" in members["control/postinst-pkg"].decode()  # luci.mk's: HUP rpcd
    assert "default_postinst $0 $@" in members["control/postinst"].decode()


def test_the_ipk_installs_htdocs_to_www_and_root_to_root(luci_ipk: ipk.Ipk) -> None:
    want = {
        "/www/" + p.relative_to(APP / "htdocs").as_posix(): p
        for p in (APP / "htdocs").rglob("*")
        if p.is_file()
    }
    want |= {
        "/" + p.relative_to(APP / "root").as_posix(): p
        for p in (APP / "root").rglob("*")
        if p.is_file()
    }
    files = {n: m for n, m in luci_ipk.files.items() if not n.endswith("/")}
    assert set(files) == set(want)
    for name, (mode, size) in files.items():
        assert mode == want[name].stat().st_mode & 0o777 and size == want[name].stat().st_size
    assert "/www/luci-static/resources/oe/schema.js" in files


def test_the_ipk_is_reproducible(luci_ipk: ipk.Ipk, tmp_path: Path) -> None:
    again = ipk.build_luci(tmp_path, epoch=EPOCH)
    assert again.path.read_bytes() == luci_ipk.path.read_bytes()
