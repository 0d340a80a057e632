"""Real strongSwan charon (5.9.8, kernel-libipsec) per network namespace, for host tests.

Reusable by any host test: ``Netns`` makes throw-away namespaces and links,
``Charon`` starts one charon in a namespace with its own strongswan.conf, vici
socket and private /run, loads a swanctl.conf, drives it with swanctl, and
parses its level-4 key log (``key_log``) so tests can check our key schedule.

Facts this encodes (LAB-NOTES): kernel-libipsec before kernel-netlink and the
``kdf`` plugin in the load list; ``allow_peer_ts`` for host-to-host selectors;
fwmarks so table 220 does not swallow charon's own packets; a private tmpfs on
/run because the pid file path is compiled in.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

CHARON = "/usr/lib/ipsec/charon"
PLUGINS = (
    "random nonce kdf openssl pem pkcs1 pkcs8 pubkey x509 hmac sha2 sha1 aes gcm "
    "kernel-libipsec kernel-netlink socket-default vici"
)


def available() -> str | None:
    """None when charon, swanctl, ip and root are all here; else why not."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    for tool in ("ip", "swanctl", "unshare"):
        if shutil.which(tool) is None:
            return f"{tool} not installed"
    if not Path(CHARON).exists():
        return f"{CHARON} not installed (strongswan-charon)"
    return None


def pubkey_conn(local: str, remote: str, ike: str, esp: str) -> str:
    """A swanctl connection ``ours`` for a host-to-host test: charon at ``local`` signs with
    ``charon.pem``, the peer at ``remote`` with ``ours.pem`` (raw public keys, IP
    identities); one tunnel-mode child ``ours-c`` with the ESP proposals ``esp``; no
    rekeying on charon's side."""
    return f"""
  ours {{
    version = 2
    local_addrs = {local}
    remote_addrs = {remote}
    proposals = {ike}
    unique = never
    rekey_time = 0
    local {{ auth = pubkey
      pubkeys = charon.pem
      id = {local} }}
    remote {{ auth = pubkey
      pubkeys = ours.pem
      id = {remote} }}
    children {{ ours-c {{ local_ts = dynamic
      remote_ts = dynamic
      esp_proposals = {esp}
      rekey_time = 0
      mode = tunnel }} }}
  }}"""


def ec_pem(key: ec.EllipticCurvePrivateKey, private: bool) -> bytes:
    """PEM of ``key`` (PKCS#8, unencrypted) or of its public half (SubjectPublicKeyInfo)."""
    if private:
        return key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def run(cmd: Sequence[str], timeout: float = 20, check: bool = True) -> str:
    p = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, check=False)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}): {p.stderr or p.stdout}")
    return p.stdout


class Netns:
    """Named network namespaces created on demand and all deleted at ``close``."""

    def __init__(self, tag: str) -> None:
        self.prefix = f"t{tag}{os.getpid() % 100000}"
        self.names: list[str] = []

    def add(self, name: str) -> str:
        full = f"{self.prefix}{name}"
        run(["ip", "netns", "del", full], check=False)
        run(["ip", "netns", "add", full])
        self.names.append(full)
        run(["ip", "-n", full, "link", "set", "lo", "up"])
        return full

    def link(self, a: str, addr_a: str, b: str, addr_b: str) -> None:
        """A veth pair between ``a`` and ``b`` with CIDR addresses (``10.0.0.1/24``)."""
        ia, ib = f"v{len(self.names)}{b[-2:]}", f"v{len(self.names)}{a[-2:]}"
        run(["ip", "link", "add", ia, "netns", a, "type", "veth", "peer", ib, "netns", b])
        for ns, dev, addr in ((a, ia, addr_a), (b, ib, addr_b)):
            run(["ip", "-n", ns, "addr", "add", addr, "dev", dev])
            run(["ip", "-n", ns, "link", "set", dev, "up"])

    def switch(
        self, name: str, members: Sequence[tuple[str, str]], mtu: int = 1500
    ) -> dict[str, str]:
        """One L2 segment (a bridge in namespace ``name``) joining ``members``, each a
        (namespace, CIDR address); returns the device each member has on it."""
        sw = self.add(name)
        run(["ip", "-n", sw, "link", "add", "br0", "mtu", str(mtu), "type", "bridge"])
        run(["ip", "-n", sw, "link", "set", "br0", "up"])
        devs: dict[str, str] = {}
        for i, (ns, addr) in enumerate(members):
            dev, port = f"{self.prefix}w{i}", f"{self.prefix}p{i}"  # unique while created
            run(["ip", "link", "add", dev, "mtu", str(mtu), "netns", ns, "type", "veth",
                 "peer", port, "mtu", str(mtu), "netns", sw])  # fmt: skip
            run(["ip", "-n", ns, "addr", "add", addr, "dev", dev])
            run(["ip", "-n", ns, "link", "set", dev, "up"])
            run(["ip", "-n", sw, "link", "set", port, "master", "br0", "up"])
            devs[ns] = dev
        return devs

    def route(self, ns: str, via: str) -> None:
        run(["ip", "-n", ns, "route", "add", "default", "via", via])

    def masquerade(self, ns: str, out_cidr: str) -> None:
        """nftables source NAT: everything leaving towards ``out_cidr`` gets ``ns``'s address."""
        run(["ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv4.ip_forward=1"])
        rules = (
            "table ip nat {\n chain post {\n  type nat hook postrouting priority 100;\n"
            f"  ip daddr {out_cidr} masquerade\n }}\n}}\n"
        )
        p = subprocess.run(
            ["ip", "netns", "exec", ns, "nft", "-f", "-"],
            input=rules,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        if p.returncode != 0:
            raise RuntimeError(f"nft masquerade in {ns}: {p.stderr}")

    def exec(self, ns: str, cmd: Sequence[str], timeout: float = 20) -> str:
        return run(["ip", "netns", "exec", ns, *cmd], timeout=timeout)

    def close(self) -> None:
        for name in reversed(self.names):
            run(["ip", "netns", "del", name], check=False)
        self.names.clear()


@contextmanager
def namespaces(tag: str) -> Iterator[Netns]:
    n = Netns(tag)
    try:
        yield n
    finally:
        n.close()


@dataclass
class Charon:
    """One charon in namespace ``ns``; files under ``workdir``.

    ``conns`` is the body of swanctl.conf's ``connections { }``; ``pubkeys`` and
    ``privkeys`` map file names to PEM bytes (swanctl/pubkey, swanctl/pkcs8).
    """

    ns: str
    workdir: Path
    conns: str
    pubkeys: dict[str, bytes] = field(default_factory=dict)
    privkeys: dict[str, bytes] = field(default_factory=dict)
    extra_charon: str = ""
    #: routes into libipsec's TUN for the remote selectors: needed for ESP to flow
    install_routes: bool = False
    #: filelog levels; the default logs keys (ike/chd 4), a benchmark wants ``default = -1``
    log_levels: str = (
        "default = 1\n      ike = 4\n      chd = 4\n      cfg = 2\n      enc = 1\n      net = 1"
    )
    proc: subprocess.Popen[bytes] | None = None

    @property
    def vici(self) -> str:
        return f"unix://{self.workdir}/charon.vici"

    @property
    def logfile(self) -> Path:
        return self.workdir / "charon.log"

    def _write(self) -> None:
        w = self.workdir
        for sub in ("swanctl/pubkey", "swanctl/pkcs8"):
            (w / sub).mkdir(parents=True, exist_ok=True)
        for name, pem in self.pubkeys.items():
            (w / "swanctl/pubkey" / name).write_bytes(pem)
        for name, pem in self.privkeys.items():
            (w / "swanctl/pkcs8" / name).write_bytes(pem)
        (w / "swanctl/swanctl.conf").write_text(f"connections {{\n{self.conns}\n}}\n")
        (w / "strongswan.conf").write_text(
            f"""charon {{
  load = {PLUGINS}
  install_routes = {"yes" if self.install_routes else "no"}
  retransmit_timeout = 1.0
  retransmit_tries = 3
  {self.extra_charon}
  plugins {{
    vici {{ socket = {self.vici} }}
    kernel-libipsec {{ allow_peer_ts = yes }}
    kernel-netlink {{ fwmark = !0x42 }}
    socket-default {{ fwmark = 0x42 }}
  }}
  filelog {{
    log {{
      path = {self.logfile}
      {self.log_levels}
      flush_line = yes
    }}
  }}
}}
swanctl {{
  load = pem pkcs1 pkcs8 pubkey openssl
}}
"""
        )

    def start(self, timeout: float = 10.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._write()
        sock = self.workdir / "charon.vici"
        sock.unlink(missing_ok=True)
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", self.ns, "unshare", "--mount", "--propagation", "private",
             "sh", "-c", f"mount -t tmpfs tmpfs /run && exec {CHARON}"],
            env={"STRONGSWAN_CONF": str(self.workdir / "strongswan.conf"),
                 "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        while not sock.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"charon in {self.ns} did not start: {self.log()[-2000:]}")
            time.sleep(0.02)
        self.swanctl("--load-all", "--file", str(self.workdir / "swanctl/swanctl.conf"))

    def swanctl(self, *args: str, timeout: float = 30) -> str:
        p = subprocess.run(
            ["ip", "netns", "exec", self.ns, "swanctl", *args, "--uri", self.vici],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env={**os.environ, "STRONGSWAN_CONF": str(self.workdir / "strongswan.conf")},
        )
        if p.returncode != 0:
            raise RuntimeError(
                f"swanctl {' '.join(args)} failed: {p.stdout}{p.stderr}\n--- charon log tail:\n"
                + self.log()[-3000:]
            )
        return p.stdout

    def initiate(self, child: str, timeout: int = 15) -> str:
        return self.swanctl("--initiate", "--child", child, "--timeout", str(timeout))

    def list_sas(self, raw: bool = False) -> str:
        return self.swanctl("--list-sas", *(["--raw"] if raw else []))

    def log(self) -> str:
        try:
            return self.logfile.read_text(errors="replace")
        except OSError:
            return ""

    def esp_proposals_received(self) -> list[list[str]]:
        """The ESP proposals of each SA payload charon received, in the peer's order, as
        charon logs them at cfg level 2 ("received proposals: ESP:AES_CBC_256/
        HMAC_SHA2_512_256/NO_EXT_SEQ, ESP:..."): one list per SA payload, oldest first."""
        out = []
        for line in self.log().splitlines():
            m = re.search(r"received proposals: (ESP:.*)$", line)
            if m:
                out.append([p.strip() for p in m.group(1).split(", ")])
        return out

    def key_log(self) -> list[dict[str, bytes]]:
        """Every key charon logged at level 4, grouped per IKE SA / Child SA derivation.

        Names as charon prints them: ``Sk_d`` .. ``Sk_pr``, ``encryption initiator key``,
        ``integrity responder key`` ...; a new group starts at each ``Sk_d`` and at each
        ``encryption initiator key``.
        """
        groups: list[dict[str, bytes]] = []
        name: str | None = None
        want = 0
        buf = bytearray()
        head = re.compile(r"^\d+\[(?:IKE|CHD)\] (.+?)(?: secret)? => (\d+) bytes @ ")
        dump = re.compile(r"^\d+\[(?:IKE|CHD)\]\s+\d+: ((?:[0-9A-F]{2} )+)")
        keep = re.compile(r"^(Sk_\w+|(?:encryption|integrity) (?:initiator|responder) key)$")
        for line in self.log().splitlines():
            if name is not None:
                m = dump.match(line)
                if m:
                    buf += bytes.fromhex(m.group(1).replace(" ", ""))
                    if len(buf) >= want:
                        if name in ("Sk_d", "encryption initiator key") or not groups:
                            groups.append({})
                        groups[-1][name] = bytes(buf[:want])
                        name = None
                    continue
                name = None
            m = head.match(line)
            if m and keep.match(m.group(1)):
                name, want, buf = m.group(1), int(m.group(2)), bytearray()
        return groups

    def stop(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=5)
        self.proc = None
