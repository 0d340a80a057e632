"""Import discipline: what ``oe_router.daemon`` imports is what a router pays in RAM.

Each check runs a fresh interpreter (``sys.modules`` of this pytest process is full of
everything), the way OpenWrt's python3-light runs the daemon: ``ssl``, ``_ssl`` and
``_hashlib`` are not there (a ``sys.meta_path`` finder refuses them). docs/footprint.md
has the numbers these modules cost.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"
SHIPPED_CONFIG = SRC.parent / "files" / "etc" / "config" / "oe"

#: python3-light has no ssl: refuse it the way a missing module is refused
NO_SSL = """
import sys
class _NoSsl:
    def find_spec(self, name, path=None, target=None):
        if name in ("ssl", "_ssl", "_hashlib"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, _NoSsl())
"""

#: modules the daemon never runs with the default config (kernel datapath, offload off)
#: or never at all: pyroute2's NDB/IPDB/CLI (sqlite3, http.server), importlib.metadata's
#: readers, the userspace datapath, the offload engines, the CLI (pyroute2.iproute and
#: unittest, through pyroute2.lab, come with pyroute2's IPRoute, which the start uses)
NEVER = (
    "pyroute2.ndb",
    "pyroute2.ipdb",
    "pyroute2.cli",
    "sqlite3",
    "http.server",
    "zipfile",
    "email",
    "importlib.metadata._adapters",
    "oe_router.cli",
    "oe_router.datapath.userspace",
    "oe_router.datapath.worker",
    "oe_router.datapath.tun",
    "oe_router.datapath.nfqueue",
    "oe_router.offload.afalg",
    "oe_router.offload.cryptodev",
    "oe_router.offload.software",
    "oe_router.offload.crypto_user",
    "oe_router.ocf_cryptodev",
    "pyudev",
)


#: what the start does besides importing (its arguments, the shipped config, the shipped
#: root anchors, the offload known-answer vectors, an atomic write of anchor state or the
#: host key, PATH lookups for ubus/uci/nft) loads none of these: importlib.resources,
#: tempfile and shutil bring bz2, lzma, zlib ... (~1 MB of RSS for the daemon's life);
#: difflib is for a bad config's "did you mean", devview for ``oe devices``/``oe explain``
AT_START_NEVER = (
    "importlib.resources",
    "tempfile",
    "shutil",
    "bz2",
    "lzma",
    "difflib",
    "oe_router.devview",
    "dns.dnssec",
    "dns.dnssecalgs",
    "dns.zone",
    "idna.core",
    "datetime",
)


def run_python(code: str) -> dict[str, object]:
    """Run ``code`` (which prints one JSON document last) in a fresh ssl-less interpreter."""
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run(
        [sys.executable, "-c", NO_SSL + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc: dict[str, object] = json.loads(proc.stdout.splitlines()[-1])
    return doc


def test_the_daemon_imports_without_ssl_and_without_what_it_does_not_run() -> None:
    """Importing the daemon and reading an interface's addresses loads none of NEVER."""
    doc = run_python(
        f"""
        import json
        import oe_router.daemon
        from oe_router.platform import read_interface
        read_interface("lo")  # what the start does: an rtnetlink dump (pyroute2's IPRoute)
        print(json.dumps({{"loaded": sorted(m for m in {NEVER!r} if m in sys.modules),
                          "ssl": "ssl" in sys.modules}}))
        """
    )
    assert doc == {"loaded": [], "ssl": False}


def test_deferred_packages_still_give_every_name() -> None:
    """pyroute2, importlib.metadata and idna are registered without running their code; a
    name of theirs is still there when asked for (then the code runs: idna's for an IDNA
    2008 name), and dnspython's DNSSEC validation is on without the metadata probe."""
    doc = run_python(
        """
        import json
        import oe_router
        import pyroute2.netlink.nlsocket
        ndb_before = "pyroute2.ndb" in sys.modules
        from pyroute2 import IPRoute
        from pyroute2.iproute.linux import IPRoute as LinuxIPRoute
        import dns.name
        idna_before = "idna.core" in sys.modules
        name = dns.name.from_unicode("straße.example", idna_codec=dns.name.IDNA_2008)
        unicode_name = name.to_text()
        import dns.dnssec
        import importlib.metadata
        print(json.dumps({
            "idna_before": idna_before,
            "unicode_name": unicode_name,
            "ndb_before": ndb_before,
            "iproute": IPRoute is LinuxIPRoute,
            "version": importlib.metadata.version("dnspython"),
            "validate": dns.dnssec.validate is dns.dnssec._validate,
        }))
        """
    )
    assert doc["ndb_before"] is False
    assert doc["iproute"] is True
    assert isinstance(doc["version"], str) and doc["version"][0].isdigit()
    assert doc["validate"] is True
    assert doc["idna_before"] is False
    assert doc["unicode_name"] == "xn--strae-oqa.example."  # IDNA 2008 (2003: strasse)


def test_asyncio_serves_udp_and_unix_sockets_without_ssl() -> None:
    """What the daemon's loop does (UDP for IKE and DNS, a unix control socket) works on
    an interpreter without ssl."""
    doc = run_python(
        """
        import asyncio, json, tempfile, os

        async def main():
            loop = asyncio.get_running_loop()
            got = loop.create_future()

            class Echo(asyncio.DatagramProtocol):
                def connection_made(self, transport):
                    self.t = transport
                def datagram_received(self, data, addr):
                    self.t.sendto(data.upper(), addr)

            class Client(asyncio.DatagramProtocol):
                def datagram_received(self, data, addr):
                    got.set_result(data)

            server, _ = await loop.create_datagram_endpoint(Echo, local_addr=("127.0.0.1", 0))
            port = server.get_extra_info("sockname")[1]
            client, _ = await loop.create_datagram_endpoint(
                Client, remote_addr=("127.0.0.1", port))
            client.sendto(b"ike")
            udp = await asyncio.wait_for(got, 10)
            path = os.path.join(tempfile.mkdtemp(), "s")

            async def handle(reader, writer):
                writer.write((await reader.readline()).upper())
                await writer.drain()
                writer.close()

            unix = await asyncio.start_unix_server(handle, path)
            reader, writer = await asyncio.open_unix_connection(path)
            writer.write(b"status\\n")
            line = await asyncio.wait_for(reader.readline(), 10)
            writer.close()
            unix.close()
            client.close()
            server.close()
            return udp.decode(), line.decode().strip()

        udp, unix = asyncio.run(main())
        print(json.dumps({"udp": udp, "unix": unix, "ssl": "ssl" in sys.modules}))
        """
    )
    assert doc == {"udp": "IKE", "unix": "STATUS", "ssl": False}


def test_defer_runs_a_package_init_only_when_one_of_its_names_is_asked(tmp_path: Path) -> None:
    pkg = tmp_path / "fatpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("import sys\nsys.fat_init_ran = True\nBIG = 'big'\n")
    (pkg / "small.py").write_text("VALUE = 7\n")
    doc = run_python(
        f"""
        import json
        sys.path.insert(0, {str(tmp_path)!r})
        from oe_router.lazypkg import defer
        defer("fatpkg")
        import fatpkg.small
        from fatpkg import small
        after_submodule = getattr(sys, "fat_init_ran", False)
        from fatpkg import BIG
        try:
            fatpkg.MISSING
            missing = "no error"
        except AttributeError:
            missing = "AttributeError"
        print(json.dumps({{"after_submodule": after_submodule, "value": small.VALUE,
                          "big": BIG, "ran": sys.fat_init_ran, "missing": missing}}))
        """
    )
    assert doc == {
        "after_submodule": False,
        "value": 7,
        "big": "big",
        "ran": True,
        "missing": "AttributeError",
    }


def test_what_the_start_reads_and_writes_loads_no_archive_modules(tmp_path: Path) -> None:
    doc = run_python(
        f"""
        import json
        import oe_router.daemon
        from oe_router.atomic import write_atomic
        from oe_router.dns.autotrust import seed_exists, seed_text
        from oe_router.netnames import which
        from oe_router.offload.engine import TRANSFORMS
        from oe_router.offload.kat import run_kat
        from oe_router.offload.software import SoftwareEngine
        oe_router.daemon.parse_args(["--no-ubus"])  # argparse's help formatter
        oe_router.daemon.load_config({str(SHIPPED_CONFIG)!r})
        kat = run_kat(SoftwareEngine(), next(iter(TRANSFORMS.values())), quick=True)
        write_atomic({str(tmp_path / "state")!r}, b"x", 0o600)
        print(json.dumps({{"loaded": sorted(m for m in {AT_START_NEVER!r} if m in sys.modules),
                          "seed": seed_exists() and "DS" in seed_text(), "kat": kat.passed,
                          "sh": which("sh") is not None}}))
        """
    )
    assert doc == {"loaded": [], "seed": True, "kat": True, "sh": True}
    assert (tmp_path / "state").read_bytes() == b"x"
    assert (tmp_path / "state").stat().st_mode & 0o777 == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["state"]  # no temporary file left


def test_what_the_start_defers_is_there_when_asked() -> None:
    """difflib still suggests for a bad config value, and the devices view's names come
    with its first use (``devview`` keeps the constants it re-exports)."""
    doc = run_python(
        """
        import json
        import oe_router.daemon
        from oe_router.config.schema import suggest
        hint = suggest("privte", ("private", "clear"))
        from oe_router.devview import DEFAULT_LEASES, MAX_FLOWS, snapshot
        from oe_router.devcommands import DEFAULT_LEASES as LEASES, MAX_FLOWS as FLOWS
        print(json.dumps({"hint": hint, "same": (DEFAULT_LEASES, MAX_FLOWS) == (LEASES, FLOWS),
                          "snapshot": callable(snapshot)}))
        """
    )
    assert doc == {"hint": "did you mean 'private'?; ", "same": True, "snapshot": True}


#: what `oe status --json`, `oe down`, `oe flush` need none of: the server side (asyncio),
#: the status model (text output only), the typed schema and validator (a config that
#: sets no control_socket), pyroute2 and dnspython's message code. Each is ~0.2-1 s of
#: every `oe` call on a TCG router (asyncio alone ~1 s).
CLI_NEVER = (
    "asyncio",
    "oe_router.control.server",
    "oe_router.control.status",
    "oe_router.config.schema",
    "oe_router.config.validate",
    "pyroute2.netlink",
    "dns.message",
)


def test_the_cli_loads_only_what_a_script_command_needs(tmp_path: Path) -> None:
    """`oe status --json` and `oe down` against a socket that answers like the daemon:
    the reply is printed, and none of CLI_NEVER was imported for it. (Without --socket,
    `oe` reads the config for its control_socket; the shipped one sets it, and its check
    is validate's, which then loads.)"""
    sock = tmp_path / "control.sock"
    doc = run_python(
        f"""
        import io, json, socket, threading
        from contextlib import redirect_stdout
        path = {str(sock)!r}
        srv = socket.socket(socket.AF_UNIX)
        srv.bind(path)
        srv.listen()

        def serve():
            for _ in range(2):
                conn, _ = srv.accept()
                req = json.loads(conn.makefile().readline())
                reply = {{"ok": True, "status": {{"seen": req["cmd"]}}, "down": 1}}
                conn.sendall(json.dumps(reply).encode() + b"\\n")
                conn.close()

        threading.Thread(target=serve, daemon=True).start()
        from oe_router.cli import main
        out = io.StringIO()
        with redirect_stdout(out):
            rcs = [main(["--socket", path, "status", "--json"]),
                   main(["--socket", path, "down", "192.0.2.1"])]
        print(json.dumps({{"rcs": rcs, "out": out.getvalue(),
                          "loaded": sorted(m for m in {CLI_NEVER!r} if m in sys.modules)}}))
        """
    )
    assert doc["loaded"] == [], doc
    assert doc["rcs"] == [0, 0], doc
    assert '"seen": "status"' in str(doc["out"]), doc


def test_lazy_package_names_are_the_submodules_objects() -> None:
    """Names that oe_router.control and oe_router.config give on first use are their
    submodules' own objects, unknown names fail as usual, and ``from ... import`` of a
    submodule still works."""
    doc = run_python(
        """
        import json
        import oe_router.config as config
        import oe_router.control as control
        from oe_router.config import OeConfig, schema
        from oe_router.control import ControlServer, Status
        from oe_router.control.server import ControlServer as Server
        from oe_router.control.status import Status as Model
        try:
            control.NoSuchName
            missing = None
        except AttributeError as exc:
            missing = str(exc)
        print(json.dumps({"same": [ControlServer is Server, Status is Model,
                                   OeConfig is schema.OeConfig,
                                   vars(control)["Status"] is Model],
                          "missing": missing}))
        """
    )
    assert doc["same"] == [True, True, True, True]
    assert doc["missing"] == "module 'oe_router.control' has no attribute 'NoSuchName'"
