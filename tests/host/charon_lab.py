"""Our daemon (userspace datapath) between a LAN client and charon: the host-to-host lab
the userspace-ESP interop tests share (test_userspace_esp, test_esp_proposal_charon).

    client -- lan -- router: oe-routerd, datapath userspace -- wan -- peer: charon

Why a helper: the topology, the keys and both daemons' configs are the same for every
test that proves ESP against charon's kernel-libipsec; only the addresses and the ESP
proposals differ. The router's LAN client is source-NATed to its WAN address by the
daemon (oe/lan.py); ``reconnect`` gives charon an ESP proposal (and the daemon a new
config) and brings a host-to-host Child SA up with ``oe up`` and public keys.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec

from .charon import Charon, Netns, ec_pem, pubkey_conn
from .oe_daemon import OeDaemon, device_with, netns_run


@dataclass
class CharonLab:
    net: Netns
    router: str
    peer: str
    client: str
    daemon: OeDaemon
    charon: Charon
    workdir: Path
    #: (router, peer) WAN addresses and charon's IKE proposals
    wan: tuple[str, str]
    ike: str
    #: the router's (WAN, LAN) devices
    devs: tuple[str, str]

    def config(self, offload: str = "off", esp: Sequence[str] = ()) -> str:
        """The daemon's UCI: userspace datapath, ``offload``, ``list esp_proposal`` ``esp``."""
        wan_dev, lan_dev = self.devs
        lists = "".join(f"\tlist esp_proposal '{e}'\n" for e in esp)
        ike = f"\nconfig ike 'ike'\n{lists}" if esp else ""
        return f"""package oe

config oe 'global'
\toption datapath 'userspace'
\toption wan_interface '{wan_dev}'
\toption lan_interface '{lan_dev}'
\toption offload '{offload}'

config dns 'dns'
\toption trust_anchor '{self.workdir}/no-anchor'
{ike}
config identity 'identity'
\toption local_id '{self.wan[0]}'
\toption private_key '{self.workdir}/ours.pem'
"""

    def client_run(self, cmd: list[str], timeout: float = 60) -> str:
        return netns_run(self.client, cmd, timeout=timeout)

    def reconnect(self, esp: str, config: str | None = None) -> None:
        """Tear every SA down, give charon the ESP proposals ``esp`` (and the daemon
        ``config``, reloaded), bring the tunnel up again from our side."""
        d, peer = self.daemon, self.wan[1]
        d.oe("down", peer, check=False)
        d.wait_for("tunnel gone", lambda: not d.tunnels(), 15)
        self.charon.conns = pubkey_conn(peer, self.wan[0], self.ike, esp)
        self.charon._write()
        self.charon.swanctl(
            "--load-all", "--file", str(self.charon.workdir / "swanctl/swanctl.conf")
        )
        if config is not None:
            p = d.reconfigure(config)
            assert p.returncode == 0, p.stdout + p.stderr
        self.up()

    def up(self) -> None:
        d = self.daemon
        d.oe("up", self.wan[1], "--auth", "pubkey", "--peer-key", str(self.workdir / "charon.pem"))
        d.wait_for("tunnel up", d.tunnels, 15)

    def ping(self, count: int = 5) -> int:
        """Echo replies the LAN client got from the peer's WAN address."""
        out = netns_run(
            self.client, ["ping", "-c", str(count), "-i", "0.2", "-W", "2", self.wan[1]],
            check=False,
        )  # fmt: skip
        m = re.search(r"(\d+) received", out)
        return int(m.group(1)) if m else 0


@contextmanager
def charon_lab(
    work: Path, tag: str, wan: tuple[str, str], lan: tuple[str, str], ike: str, esp: str
) -> Iterator[CharonLab]:
    """The lab in fresh namespaces (``tag`` names them), charon offering ``esp``, our daemon
    started with ``offload off`` and no tunnel yet; all of it gone afterwards.
    ``wan``: (router, peer) addresses on a /24; ``lan``: (router, client)."""
    ours, theirs = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    (work / "ours.pem").write_bytes(ec_pem(ours, True))
    (work / "charon.pem").write_bytes(ec_pem(theirs, False))
    net = Netns(tag)
    charon: Charon | None = None
    daemon: OeDaemon | None = None
    try:
        r, p, c = net.add("r"), net.add("p"), net.add("c")
        net.link(r, f"{wan[0]}/24", p, f"{wan[1]}/24")
        net.link(c, f"{lan[1]}/24", r, f"{lan[0]}/24")
        net.route(c, lan[0])
        netns_run(r, ["sysctl", "-qw", "net.ipv4.ip_forward=1"])
        charon = Charon(
            p,
            work / "charon",
            pubkey_conn(wan[1], wan[0], ike, esp),
            pubkeys={"ours.pem": ec_pem(ours, False), "charon.pem": ec_pem(theirs, False)},
            privkeys={"charon.pem": ec_pem(theirs, True)},
            install_routes=True,
        )
        charon.start()
        devs = (device_with(r, wan[0]), device_with(r, lan[0]))
        lab = CharonLab(net, r, p, c, None, charon, work, wan, ike, devs)  # type: ignore[arg-type]
        daemon = lab.daemon = OeDaemon(r, work / "daemon", lab.config())
        daemon.start()
        yield lab
    finally:
        if daemon is not None:
            daemon.stop()
        if charon is not None:
            charon.stop()
        net.close()
