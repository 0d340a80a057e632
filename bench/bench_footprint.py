"""Footprint: oe-routerd's idle memory, memory per peer, start time and installed size.

Every figure is measured as the installed package runs (oe_router byte-compiled first, as
the .ipk ships it) and as OpenWrt's python3-light would run the daemon: ``ssl``,
``_ssl`` and ``_hashlib`` are refused by a ``sys.meta_path`` finder (a ``sitecustomize``
on the daemon's PYTHONPATH), so asyncio runs without ssl and nothing loads libssl for it.

- import only: a fresh interpreter that imports ``oe_router.daemon`` (smaps_rollup).
- idle: the real daemon (``python -m oe_router.daemon``) in a network namespace with a
  WAN address, IKE, the OE service on the kernel datapath and the DNS front (shipped
  IANA root anchors, loopback listener, manual mode), 3 s after it said it runs.
  Baseline: charon 5.9.8 (kernel-libipsec, the plugins tests/host/charon.py loads) idle
  in its own namespace, in the same run.
- ready: from spawning ``ip netns exec NS python -m oe_router.daemon`` to the control
  socket answering ``status`` with every service started, polled every 5 ms.
- per peer: one process holds both ends (``IkeEndpoint`` initiator and responder over
  loopback, ECDSA P-256, DH 19, AES-GCM); RSS growth from 100 to 1,000 established IKE
  SAs (each with its Child SA), per SA and per end (a router holds one end of each).
  Each responder SA is configured with the initiator's key as a new object, as the
  daemon holds a keyed peer's key: parsed from its IPSECKEY record (``dns.ipseckey``).
- installed: ``package/ipk.py`` (what ``make package`` runs): the .ipk's Installed-Size;
  the dependencies outside python3-light as installed by pip here (stand-in for their
  OpenWrt packages); strongSwan's Debian packages (dpkg Installed-Size) for comparison;
  Debian 12's libreswan and its python3-cryptography/-dnspython/-pyroute2 (which link the
  system libssl, as OpenWrt's do) by ``apt-get download`` into a cache, Installed-Size
  read with ``dpkg-deb -f`` (Debian's sizes stand in for OpenWrt's packages).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.run import Result, Unavailable

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
ANCHORS = SRC / "oe_router" / "dns" / "iana-root-anchors"
IDLE_S = 3.0
PEERS_FROM, PEERS_TO = 100, 1000
#: Debian packages whose Installed-Size stands in for OpenWrt's: libreswan (never installed
#: here: it conflicts with strongswan) and the Python dependencies as Debian builds them;
#: then the big shared libraries they link, which their own sizes leave out: libssl3
#: (python3-cryptography; strongSwan's openssl plugin), libnss3 and libunbound8 (libreswan)
DEBS = ("libreswan", "python3-cryptography", "python3-dnspython", "python3-pyroute2",
        "libssl3", "libnss3", "libunbound8")  # fmt: skip
DEB_CACHE = Path.home() / ".cache" / "oe-router" / "debs"

NO_SSL = """import sys


class _NoSsl:
    \"\"\"python3-light has no ssl: refuse it as a missing module is refused.\"\"\"

    def find_spec(self, name, path=None, target=None):
        if name in ("ssl", "_ssl", "_hashlib"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, _NoSsl())
"""


def smaps(pid: int | str = "self") -> dict[str, int]:
    """RSS, PSS and private (clean + dirty) in KiB from /proc/PID/smaps_rollup."""
    got: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        parts = line.split()
        if parts and parts[0] in ("Rss:", "Pss:", "Private_Clean:", "Private_Dirty:"):
            got[parts[0][:-1]] = int(parts[1])
    return {
        "rss_kb": got["Rss"],
        "pss_kb": got["Pss"],
        "private_kb": got["Private_Clean"] + got["Private_Dirty"],
    }


def compile_sources() -> None:
    """Byte-compile oe_router as the package installs it (the .ipk carries .pyc): with
    PYTHONDONTWRITEBYTECODE in the environment every start would compile each module from
    source again (~0.18 s and the compiler's memory)."""
    import compileall

    if not compileall.compile_dir(str(SRC / "oe_router"), quiet=1):
        raise Unavailable("compileall of src/oe_router failed")


def _nossl_env(work: Path) -> dict[str, str]:
    site = work / "nossl"
    site.mkdir(parents=True, exist_ok=True)
    (site / "sitecustomize.py").write_text(NO_SSL)
    return {"PYTHONPATH": f"{site}{os.pathsep}{SRC}"}


def _import_only(work: Path) -> dict[str, Any]:
    code = (
        "import json, sys, oe_router.daemon\n"
        "from bench.bench_footprint import smaps\n"
        "print(json.dumps({**smaps(), 'modules': len(sys.modules), 'ssl': 'ssl' in sys.modules}))"
    )
    env = {**os.environ, **_nossl_env(work)}
    env["PYTHONPATH"] += f"{os.pathsep}{REPO}"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       timeout=120, check=False)  # fmt: skip
    if p.returncode != 0:
        raise Unavailable(f"import of oe_router.daemon failed without ssl: {p.stderr[-2000:]}")
    doc: dict[str, Any] = json.loads(p.stdout.splitlines()[-1])
    return doc


def _daemon_idle(work: Path) -> dict[str, Any]:
    from tests.host.charon import Netns
    from tests.host.oe_daemon import OeDaemon, bare_config, device_with

    net = Netns("fp")
    daemon: OeDaemon | None = None
    try:
        r, p = net.add("r"), net.add("p")
        net.link(r, "198.18.7.1/24", p, "198.18.7.2/24")
        dns = (
            "\toption mode 'manual'\n\tlist listen '127.0.0.1:5335'\n\tlist upstream '198.18.7.2'\n"
        )
        config = bare_config(device_with(r, "198.18.7.1"), ANCHORS, dns=dns)
        daemon = OeDaemon(r, work / "daemon", config, env=_nossl_env(work))
        cfg = daemon._write_config()
        daemon.socket.unlink(missing_ok=True)
        log = daemon.logfile.open("ab")
        t0 = time.monotonic()
        env = {**os.environ, **(daemon.env or {})}
        daemon.proc = subprocess.Popen(
            ["ip", "netns", "exec", r, sys.executable, "-m", "oe_router.daemon", "--config",
             str(cfg), "--no-ubus"],
            stdout=log, stderr=log, start_new_session=True, env=env,
        )  # fmt: skip
        ready = _wait_ready(daemon, t0)
        time.sleep(IDLE_S)
        status = daemon.status()
        services = status["daemon"]["services"]
        for want in ("ike", "oe", "dns"):
            if want not in services:
                raise Unavailable(f"the daemon runs without {want}: {services}")
        pid = daemon.proc.pid
        modules = _modules_of(pid)
        datapath = status["daemon"].get("datapath", "")
        return {**smaps(pid), "ready_s": ready, "services": services, "datapath": datapath,
                **modules}  # fmt: skip
    finally:
        if daemon is not None:
            daemon.stop()
        net.close()


def _wait_ready(daemon: Any, t0: float, timeout: float = 30.0) -> float:
    """Seconds from spawn to ``status`` answering with the services running."""
    from oe_router.control.client import ControlClient

    while True:
        if daemon.proc.poll() is not None:
            raise Unavailable(f"oe-routerd exited: {daemon.log()[-2000:]}")
        if daemon.socket.exists():
            try:
                doc = ControlClient(daemon.socket).request("status")["status"]
            except Exception:  # not answering yet
                doc = None
            if doc and " running (pid " in daemon.log():
                return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            raise Unavailable(f"oe-routerd not ready in {timeout} s: {daemon.log()[-2000:]}")
        time.sleep(0.005)


def _modules_of(pid: int) -> dict[str, Any]:
    """Shared objects the daemon mapped: ssl's libssl must not be among them."""
    maps = Path(f"/proc/{pid}/maps").read_text()
    libs = sorted({Path(m).name for m in re.findall(r"(/\S+\.so[.\d]*)$", maps, re.M)})
    return {"libssl_mapped": any(n.startswith("libssl") or n.startswith("_ssl") for n in libs)}


def _charon_idle(work: Path) -> dict[str, Any]:
    from tests.host.charon import Charon, Netns, available

    why = available()
    if why:
        raise Unavailable(f"charon: {why}")
    net = Netns("fpc")
    charon: Charon | None = None
    try:
        c, p = net.add("c"), net.add("p")
        net.link(c, "198.18.8.1/24", p, "198.18.8.2/24")
        charon = Charon(c, work / "charon", conns="", log_levels="default = -1")
        charon.start()
        time.sleep(IDLE_S)
        assert charon.proc is not None
        pid = charon.proc.pid
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
        if comm != "charon":
            raise Unavailable(f"pid {pid} is {comm}, not charon")
        return smaps(pid)
    finally:
        if charon is not None:
            charon.stop()
        net.close()


# --------------------------------------------------------------------------- per peer


async def _peers_run(counts: tuple[int, ...]) -> dict[str, Any]:
    """Establish IKE SAs (with their first Child SA) up to each of ``counts``; the process's
    RSS at each count, with both ends in this process."""
    import base64
    import gc

    import dns.name
    import dns.rdata
    import dns.rdataclass
    import dns.rdatatype
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    from bench.bench_ike import ESP_SPEC, IKE_SPEC, _ts
    from oe_router.dns.ipseckey import PeerKey, PublicKey, interpret
    from oe_router.ike.constants import IdType
    from oe_router.ike.endpoint import IkeEndpoint, SaHandle
    from oe_router.ike.events import ChildSaEstablished, Event, IkeSaFailed
    from oe_router.ike.sa import IkeSaConfig

    ka, kb = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    done = {"ini": 0, "res": 0, "failed": 0}

    def on_ini(h: SaHandle, ev: Event) -> None:
        if isinstance(ev, ChildSaEstablished):
            done["ini"] += 1
        elif isinstance(ev, IkeSaFailed):
            done["failed"] += 1

    def on_res(h: SaHandle, ev: Event) -> None:
        if isinstance(ev, ChildSaEstablished):
            done["res"] += 1

    point = ka.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
    record = dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.IPSECKEY,
                                 f"10 0 3 . {base64.b64encode(point[1:]).decode()}")  # fmt: skip
    owner = dns.name.from_text("a.example.")

    def peer_key() -> PublicKey:
        """The initiator's key as the daemon holds a keyed peer's: parsed from its
        IPSECKEY record by the DNS front's parser, one object per peer."""
        got = interpret(owner, record)
        assert isinstance(got, PeerKey) and got.public_key is not None
        return got.public_key

    def policy(local: tuple[str, int], remote: tuple[str, int]) -> IkeSaConfig:
        return IkeSaConfig(local, remote, _ts(), _ts(), ike_proposals=(IKE_SPEC,),
                           esp_proposals=(ESP_SPEC,), local_id=(IdType.ID_FQDN, b"b.example"),
                           private_key=kb, peer_public_key=peer_key())  # fmt: skip

    top = max(counts)
    ini = IkeEndpoint(["127.0.0.1"], on_event=on_ini, clock=time.monotonic, ike_port=0,
                      natt_port=0)  # fmt: skip
    res = IkeEndpoint(["127.0.0.1"], on_event=on_res, responder_policy=policy,
                      clock=time.monotonic, ike_port=0, natt_port=0,
                      half_open_limit=10 * top, cookie_threshold=10 * top)  # fmt: skip
    await ini.start()
    await res.start()
    cfg = IkeSaConfig(("127.0.0.1", ini.ike_port), ("127.0.0.1", res.ike_port), _ts(), _ts(),
                      ike_proposals=(IKE_SPEC,), esp_proposals=(ESP_SPEC,),
                      local_id=(IdType.ID_FQDN, b"a.example"), private_key=ka,
                      peer_public_key=kb.public_key())  # fmt: skip
    rss: dict[int, int] = {}
    started = 0
    try:
        for count in sorted(counts):
            async with asyncio.timeout(300):
                while done["ini"] + done["failed"] < count or done["res"] < done["ini"]:
                    # a window of 20 handshakes in flight, as in bench_ike
                    while started < count and started - done["ini"] - done["failed"] < 20:
                        ini.initiate(cfg, remote_natt_port=res.natt_port)
                        started += 1
                    await asyncio.sleep(0.005)
            await asyncio.sleep(0.2)
            gc.collect()
            rss[count] = smaps()["rss_kb"]
        return {"rss_kb": rss, "ini": done["ini"], "res": done["res"], "failed": done["failed"],
                "handles": len(ini.handles())}  # fmt: skip
    finally:
        await ini.stop()
        await res.stop()


def peers_child() -> None:
    """Entry point of the per-peer subprocess (a fresh heap): prints one JSON line."""
    doc = asyncio.run(_peers_run((PEERS_FROM, PEERS_TO)))
    print(json.dumps(doc))


def _per_peer(work: Path) -> dict[str, Any]:
    env = {**os.environ, **_nossl_env(work)}
    env["PYTHONPATH"] += f"{os.pathsep}{REPO}"
    code = "from bench.bench_footprint import peers_child; peers_child()"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       timeout=900, check=False)  # fmt: skip
    if p.returncode != 0:
        raise Unavailable(f"per-peer run failed: {p.stderr[-2000:]}")
    doc: dict[str, Any] = json.loads(p.stdout.splitlines()[-1])
    rss = {int(k): v for k, v in doc["rss_kb"].items()}
    if doc["failed"] or doc["ini"] < PEERS_TO or doc["res"] < PEERS_TO:
        raise Unavailable(f"per-peer run: not every SA came up: {doc}")
    both_ends = (rss[PEERS_TO] - rss[PEERS_FROM]) * 1024 / (PEERS_TO - PEERS_FROM)
    return {"per_sa_both_ends_bytes": round(both_ends), "per_sa_bytes": round(both_ends / 2),
            "rss_kb_at": rss}  # fmt: skip


# --------------------------------------------------------------------------- installed


def _installed(work: Path) -> dict[str, Any]:
    out = work / "ipk"
    argv = [sys.executable, str(REPO / "package" / "ipk.py"), "--out", str(out)]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False, cwd=REPO)
    m = re.search(r"(\d+) bytes \(Installed-Size\)", p.stdout + p.stderr)
    if p.returncode != 0 or m is None:
        raise Unavailable(f"package/ipk.py failed: {(p.stdout + p.stderr)[-2000:]}")
    deps: dict[str, int] = {}
    import importlib.util

    for name in ("cryptography", "dns", "pyroute2"):
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            continue
        root = Path(next(iter(spec.submodule_search_locations)))
        deps[name] = sum(f.stat().st_size for f in root.rglob("*") if f.is_file()) // 1024
    swan: dict[str, int] = {}
    q = subprocess.run(["dpkg-query", "-W", "-f=${Package} ${Installed-Size}\\n",
                        "strongswan-charon", "strongswan-libcharon", "libstrongswan",
                        "strongswan-swanctl", "libstrongswan-standard-plugins"],
                       capture_output=True, text=True, check=False)  # fmt: skip
    for line in q.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            swan[parts[0]] = int(parts[1])
    debs, why = debian_sizes(DEBS, DEB_CACHE)
    return {"installed_kb": int(m.group(1)) // 1024, "deps_installed_kb_pip": deps,
            "strongswan_deb_installed_kb": swan, "debian_deb_installed_kb": debs,
            "debian_deb_missing": why}  # fmt: skip


def debian_sizes(names: tuple[str, ...], cache: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """Installed-Size (KiB) and version of Debian packages by name, from .debs fetched once
    into ``cache`` with ``apt-get download`` (never installed); what could not be had, and
    why, in the second dict rather than an exception."""
    cache.mkdir(parents=True, exist_ok=True)
    sizes: dict[str, Any] = {}
    missing: dict[str, str] = {}
    for name in names:
        found = sorted(cache.glob(f"{name}_*.deb"))
        if not found:
            try:
                p = subprocess.run(["apt-get", "download", name], cwd=cache, capture_output=True,
                                   text=True, timeout=300, check=False)  # fmt: skip
                why = (p.stderr.strip().splitlines() or [f"exit {p.returncode}"])[-1]
            except (OSError, subprocess.TimeoutExpired) as e:
                why = repr(e)
            found = sorted(cache.glob(f"{name}_*.deb"))
            if not found:
                missing[name] = f"apt-get download failed: {why}"
                continue
        fields = subprocess.run(["dpkg-deb", "-f", str(found[-1]), "Installed-Size", "Version"],
                                capture_output=True, text=True, check=False)  # fmt: skip
        got = dict(line.split(": ", 1) for line in fields.stdout.splitlines() if ": " in line)
        if not got.get("Installed-Size", "").isdigit():
            missing[name] = f"dpkg-deb -f {found[-1].name}: {fields.stderr.strip()[-200:]}"
            continue
        sizes[name] = {"installed_kb": int(got["Installed-Size"]), "version": got.get("Version")}
    return sizes, missing


def run() -> list[Result]:
    if os.geteuid() != 0:
        raise Unavailable("needs root (network namespaces)")
    compile_sources()
    with tempfile.TemporaryDirectory(prefix="oe-footprint-") as tmp:
        work = Path(tmp)
        imported = _import_only(work)
        idle = _daemon_idle(work)
        charon = _charon_idle(work)
        peers = _per_peer(work)
        installed = _installed(work)
    return [
        Result(
            name="footprint",
            unit="KiB RSS idle",
            ours=idle["rss_kb"],
            baseline=charon["rss_kb"],
            baseline_name="charon 5.9.8 idle (kernel-libipsec, no connections), same run",
            goal="<= 30720 KiB (stretch 25600) idle RSS without ssl; <= 4096 B per peer; "
            "ready <= 0.5 s on the host",
            extra={
                "rss_idle_kb": idle["rss_kb"],
                "pss_idle_kb": idle["pss_kb"],
                "private_idle_kb": idle["private_kb"],
                "charon_rss_idle_kb": charon["rss_kb"],
                "charon_pss_idle_kb": charon["pss_kb"],
                "charon_private_idle_kb": charon["private_kb"],
                "services": idle["services"],
                # on a host kernel without ESP the oe service only reports why (no datapath)
                "datapath": idle["datapath"],
                "libssl_mapped": idle["libssl_mapped"],
                "import_only_rss_kb": imported["rss_kb"],
                "import_only_pss_kb": imported["pss_kb"],
                "import_only_private_kb": imported["private_kb"],
                "import_only_modules": imported["modules"],
                "rss_per_sa_bytes": peers["per_sa_bytes"],
                "rss_per_sa_both_ends_bytes": peers["per_sa_both_ends_bytes"],
                "rss_per_sa_method": f"RSS growth {PEERS_FROM}->{PEERS_TO} IKE SAs (+Child SA), "
                "both ends in one process, halved",
                "rss_kb_at_peers": peers["rss_kb_at"],
                "ready_s_host": round(idle["ready_s"], 3),
                "ready_s_qemu": None,
                "ready_s_qemu_reason": "not measured here: this run had no QEMU (tests/qemu)",
                **installed,
            },
        )
    ]
