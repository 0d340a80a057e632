"""OpenWrt's userland built from source (qemu/userland.py): the tools run, the build is
recorded and cached, and missing sources fail with one clear error.

The session fixture ``openwrt_userland`` (tests/conftest.py) builds it once (about 30 s,
then cached in ~/.cache/oe-router/userland).
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import io
import json
import shutil
import socket
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

QEMU_DIR = Path(__file__).resolve().parents[2] / "qemu"
if str(QEMU_DIR) not in sys.path:
    sys.path.insert(0, str(QEMU_DIR))

import userland  # noqa: E402
from build import BuildError  # noqa: E402


def run(ul: Any, *cmd: str, stdin: str | None = None) -> str:
    res = subprocess.run(
        cmd, input=stdin, capture_output=True, text=True, env=ul.env(), timeout=30, check=False
    )
    assert res.returncode == 0, f"{cmd} rc {res.returncode}: {res.stderr}"
    return res.stdout


def test_uci_shows_a_config(openwrt_userland: Any, tmp_path: Path) -> None:
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "demo").write_text(
        "config t 'n'\n\toption a 'it''s'\n\tlist l 'x'\n\tlist l 'y z'\nconfig u\n"
    )
    out = run(
        openwrt_userland,
        str(openwrt_userland.tool("uci")),
        *("-c", str(tmp_path / "conf"), "-P", str(tmp_path / "save"), "show", "demo"),
    )
    assert out.splitlines() == [
        "demo.n=t",
        "demo.n.a='its'",
        "demo.n.l='x' 'y z'",
        "demo.@u[0]=u",
    ]


def test_ubusd_answers_ubus_list_with_rpcd_objects(
    openwrt_userland: Any, tmp_path: Path, poll: Callable[..., bool]
) -> None:
    """ubusd on a private socket, rpcd registering its objects there, ``ubus list``."""
    sock = tmp_path / "ubus.sock"
    ul = openwrt_userland
    env = ul.env()
    procs = [subprocess.Popen([str(ul.tool("ubusd")), "-s", str(sock)], env=env)]
    try:
        assert poll(sock.exists, timeout=20), "ubusd made no socket"
        procs.append(subprocess.Popen([str(ul.tool("rpcd")), "-s", str(sock)], env=env))
        listing: list[str] = []

        def listed() -> bool:
            res = subprocess.run(
                [str(ul.tool("ubus")), "-s", str(sock), "list"],
                capture_output=True,
                text=True,
                env=env,
                timeout=10,
                check=False,
            )
            listing[:] = res.stdout.split()
            return res.returncode == 0 and {"session", "uci"} <= set(listing)

        # rpcd adds its objects one by one
        assert poll(listed, timeout=20), f"ubus list: {listing}"
        session = json.loads(
            run(ul, str(ul.tool("ubus")), "-s", str(sock), "call", "session", "list")
        )
        assert "ubus_rpc_session" in session
    finally:
        for p in reversed(procs):
            p.terminate()
            p.wait(timeout=10)


def test_opkg_jsonfilter_and_ucode_run(openwrt_userland: Any, tmp_path: Path) -> None:
    ul = openwrt_userland
    stamp = ul.stamp()
    assert run(ul, str(ul.tool("opkg")), "--version").strip() == (
        f"opkg version {stamp['components']['opkg-lede']['commit'][:7]}"
    )
    # stdin, no -i/-s: what the jsonpath patch restores (procd.sh pipes into it)
    got = run(ul, str(ul.tool("jsonfilter")), "-e", "@.a.b[1]", stdin='{"a": {"b": [1, 2]}}')
    assert got == "2\n"
    assert run(ul, str(ul.tool("ucode")), "-e", "print(6 * 7)") == "42"
    # ucode's uci module, built against the libuci beside it
    (tmp_path / "demo").write_text("config t 'n'\n\toption a 'from libuci'\n")
    modules = str(ul.root / "usr" / "lib" / "ucode" / "*.so")
    script = f'print(require("uci").cursor("{tmp_path}", "{tmp_path}").get("demo", "n", "a"))'
    assert run(ul, str(ul.tool("ucode")), "-L", modules, "-e", script) == "from libuci"


def test_the_root_has_openwrts_layout(openwrt_userland: Any) -> None:
    root = openwrt_userland.root
    for path in (
        "sbin/procd",
        "sbin/ubusd",
        "sbin/uci",
        "sbin/rpcd",
        "sbin/logd",
        "sbin/validate_data",
        "sbin/fw4",
        "bin/opkg",
        "bin/ubus",
        "usr/bin/jsonfilter",
        "usr/sbin/uhttpd",
        "sbin/netifd",
        "lib/netifd/netifd-proto.sh",  # netifd's scripts/, where its package puts them
        "lib/netifd/utils.sh",
        "usr/lib/libnl-tiny.so",
        "usr/lib/libubus.so",
        "usr/include/libubus.h",
        "usr/share/libubox/jshn.sh",
        "usr/share/firewall4/main.uc",
        "lib/functions/procd.sh",
        "etc/rc.common",
        # LuCI's stack, where their packages put it
        "usr/lib/ucode/html.so",
        "usr/lib/ucode/lucihttp.so",
        "usr/lib/ucode/luci/core.so",
        "usr/lib/rpcd/luci.so",
        "usr/lib/libiwinfo.so",
        "usr/libexec/cgi-io",
        "www/cgi-bin/cgi-upload",
        "www/cgi-bin/luci",
        "www/luci-static/resources/luci.js",
        "www/luci-static/bootstrap/cascade.css",
        "usr/share/ucode/luci/dispatcher.uc",
        "usr/share/ucode/luci/template/themes/bootstrap/sysauth.ut",
        "usr/share/rpcd/acl.d/luci-base.json",
        "usr/share/luci/menu.d/luci-base.json",
        "etc/config/luci",
    ):
        assert (root / path).exists(), path
    assert openwrt_userland.tool("uci") == root / "sbin" / "uci"
    # iwinfo is built for its library (rpcd-mod-luci dlopens it), not its CLI
    with pytest.raises(FileNotFoundError, match="iwinfo: not in"):
        openwrt_userland.tool("iwinfo")


def test_stamp_says_what_was_built_and_from_where(openwrt_userland: Any) -> None:
    stamp = openwrt_userland.stamp()
    assert list(stamp["components"]) == list(userland.DEFAULT)
    for name, info in stamp["components"].items():
        if name == "base-files":
            assert info["tree_sha256"] == userland.BASE_FILES_SHA256
            continue
        comp = userland.COMPONENTS[name]
        snap = userland.SNAPSHOTS[comp.source]  # the luci archive holds four components
        assert info["commit"] == snap.commit and info["tree_sha256"] == snap.tree_sha256
        assert info["source"].startswith(("vendored ", "fetched "))
        if comp.files is None and comp.kind != "luci":  # those two only copy files
            assert info["seconds"] > 0, name
    assert stamp["components"]["jsonpath"]["patches"] == ["jsonpath-stdin.patch"]
    # netifd: the uapi compat headers first, then libnl-tiny's (the stage's, named by the
    # router's path as libnl-tiny.pc gives it)
    assert stamp["components"]["netifd"]["cflags"][:2] == [
        "-Iuserland-files/uapi-compat",
        "-I/usr/include/libnl-tiny",
    ]
    assert stamp["total_seconds"] >= max(i["seconds"] for i in stamp["components"].values())
    assert stamp["host"]["gcc"] and stamp["key"] == openwrt_userland.root.parent.name


def test_luci_modules_load_in_ucode(openwrt_userland: Any) -> None:
    """What LuCI's dispatcher imports beside ucode's own modules: ucode-mod-html,
    lucihttp's binding and luci-base's core.so load and work (on the host: ``-L`` points
    ucode at the root's module folders, compiled in as the router's /usr/lib/ucode)."""
    root = openwrt_userland.root
    script = (
        'let h = require("html"), lh = require("lucihttp"), c = require("luci.core");'
        'print(h.striptags("<b>bold</b> text"), "|", lh.urlencode("a b"), "|",'
        'c.crypt("pw", "$6$salt$"), "|", type(c.getspnam), "\n");'
    )
    out = run(
        openwrt_userland,
        str(root / "usr" / "bin" / "ucode"),
        "-L",
        f"{root}/usr/lib/ucode/*.so",
        "-e",
        script,
    )
    crypted = subprocess.run(
        ["openssl", "passwd", "-6", "-salt", "salt", "pw"], capture_output=True, text=True
    ).stdout.strip()
    assert out.strip() == f"bold text|a%20b|{crypted}|function", out


def test_second_build_is_a_cache_hit(openwrt_userland: Any) -> None:
    before = openwrt_userland.stamp_path.read_bytes()
    t0 = time.monotonic()
    again = userland.build()
    subset = userland.build(["uci"])  # the full build serves any subset
    assert time.monotonic() - t0 < 5.0
    assert again == openwrt_userland and subset == openwrt_userland
    assert openwrt_userland.stamp_path.read_bytes() == before


def test_missing_sources_fail_with_one_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No VENDOR_DIR folder and no network: the error names the folder and what is missing."""
    monkeypatch.setenv("OE_ROUTER_CACHE", str(tmp_path / "cache"))  # no cached root to reuse
    monkeypatch.setenv("OE_USERLAND_FETCH_BASE", f"http://127.0.0.1:{_closed_port()}")
    (tmp_path / "vendor").mkdir()
    with pytest.raises(BuildError) as info:
        userland.build(["uci"], vendor_dir=tmp_path / "vendor")
    msg = str(info.value)
    assert "\n" not in msg
    assert str(tmp_path / "vendor" / "openwrt") in msg and "VENDOR_DIR" in msg
    assert "libubox 1aa36ee774c8 (libubox-1aa36ee.tar.gz; fetch:" in msg
    assert "uci 66127cd76c5d" in msg and "Connection refused" in msg
    assert not (tmp_path / "cache" / "userland" / "src").exists() or not any(
        (tmp_path / "cache" / "userland" / "src").iterdir()
    )


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _github_style(snap: Any, vendor: Path, tamper: bool = False) -> bytes:
    """The vendored snapshot repacked as GitHub's archive is: top folder NAME-COMMIT."""
    out = io.BytesIO()
    with (
        tarfile.open(vendor / "openwrt" / snap.archive) as src,
        tarfile.open(fileobj=out, mode="w:gz") as dst,
    ):
        for m in src:
            data = src.extractfile(m).read() if m.isfile() else None  # type: ignore[union-attr]
            _, _, rest = m.name.partition("/")
            m.name = f"{snap.name}-{snap.commit}" + (f"/{rest}" if rest else "")
            if tamper and data is not None and m.name.endswith("CMakeLists.txt"):
                data += b"# changed\n"
                m.size = len(data)
            dst.addfile(m, io.BytesIO(data) if data is not None else None)
    return out.getvalue()


@contextlib.contextmanager
def _serve(files: dict[str, bytes]) -> Iterator[str]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = files.get(self.path)
            self.send_response(200 if body is not None else 404)
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_fetch_by_commit_checks_the_files_hash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without VENDOR_DIR the snapshot comes from GitHub's archive URL of the pinned commit
    (served here by a local stand-in): taken when its files hash right, refused otherwise."""
    vendor = userland.vendor_dir()
    snap = userland.SNAPSHOTS["ubus"]
    good = _github_style(snap, vendor)
    assert hashlib.sha256(good).hexdigest() != snap.archive_sha256  # other bytes, same files
    path = f"/{snap.repo}/tar.gz/{snap.commit}"
    log: list[str] = []
    monkeypatch.setenv("OE_ROUTER_CACHE", str(tmp_path / "cache"))
    with _serve({path: good}) as base:
        monkeypatch.setenv("OE_USERLAND_FETCH_BASE", base)
        found = userland.sources(["ubus"], tmp_path / "empty", tmp_path / "cache", log.append)
    archive, origin = found["ubus"]
    assert origin == f"fetched {base}{path}" and archive.read_bytes() == good
    assert log == [f"userland: fetching ubus {snap.commit[:12]} from {base}{path}"]

    shutil.rmtree(tmp_path / "cache")
    with _serve({path: _github_style(snap, vendor, tamper=True)}) as base:
        monkeypatch.setenv("OE_USERLAND_FETCH_BASE", base)
        with pytest.raises(BuildError, match=r"ubus: .* has files hashing to [0-9a-f]{64}, not"):
            userland.sources(["ubus"], tmp_path / "empty", tmp_path / "cache", log.append)
    assert not any((tmp_path / "cache" / "userland" / "src").iterdir())
