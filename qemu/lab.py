"""Boot and drive the QEMU lab: the router under test and the world (the lab's Internet).

Why this shape: tests need "run this in the LAN client, capture on WAN" in a line, and CI needs
the guarantee that no QEMU outlives a test run. So a `Lab` is a context manager that powers
everything off on exit (and atexit, and kills on timeout), every guest command goes through a
small agent on a virtio-serial port with a timeout, and everything a person needs to debug a
failure (consoles, pcaps, daemon logs) is written to one per-run directory shared by 9p.

Topology (see /tmp/labplan.md, kept in `PLAN`):

    router [wan 203.0.113.2] ==dgram== [inet0] world: br-inet -- veth -- netns per host
    router [lan 192.168.1.1] ==dgram== [lan0 -> netns client 192.168.1.100]
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Collection, Iterator
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

QEMU_DIR = Path(__file__).resolve().parent
REPO = QEMU_DIR.parent
if str(QEMU_DIR) not in sys.path:
    sys.path.insert(0, str(QEMU_DIR))

import build  # noqa: E402  (qemu/ is a directory of scripts, not a package)

Log = Callable[[str], None]


class LabError(Exception):
    """The lab could not do what was asked; the message names the VM, command or step."""


@dataclass(frozen=True)
class Host:
    """One host of the lab's Internet: a netns inside the world VM."""

    netns: str
    ipv4: str
    ipv6: str | None = None
    name: str | None = None
    role: str = ""
    expected: str = ""


@dataclass(frozen=True)
class Plan:
    """The lab's fixed address plan (labplan.md)."""

    router_wan4: str = "203.0.113.2"
    router_wan6: str = "2001:db8:1::2"
    router_lan4: str = "192.168.1.1"
    router_lan6: str = "fd00:1::1"
    inet_gw4: str = "203.0.113.1"
    inet_gw6: str = "2001:db8:1::1"
    client4: str = "192.168.1.100"
    client6: str = "fd00:1::100"
    resolver: str = "203.0.113.54"
    mac_router_wan: str = "52:54:00:0e:00:02"
    mac_router_lan: str = "52:54:00:0e:01:01"
    mac_world_inet: str = "52:54:00:0e:00:fe"
    mac_world_lan: str = "52:54:00:0e:01:64"
    #: the router's management port: QEMU user networking (slirp) with one host port
    #: forwarded to uhttpd, so a browser on the host reaches LuCI (VMSpec.mgmt_port)
    mac_router_mgmt: str = "52:54:00:0e:02:0f"
    router_mgmt4: str = "10.0.2.15"
    hosts: tuple[Host, ...] = (
        Host("ns", "203.0.113.53", "2001:db8:1::53", "ns.test", "dns-authoritative"),
        Host("resolver", "203.0.113.54", "2001:db8:1::54", None, "dns-resolver"),
        Host("oe-null", "203.0.113.10", "2001:db8:1::10", "null.example.test", "libreswan-null"),
        Host("oe-rsa", "203.0.113.11", "2001:db8:1::11", "rsa.example.test", "libreswan-rsa"),
        Host("oe-sw", "203.0.113.12", "2001:db8:1::12", "sw.example.test", "strongswan"),
        Host("plain", "203.0.113.20", "2001:db8:1::20", "plain.example.test", "plain"),
        Host("insecure", "203.0.113.21", "2001:db8:1::21", "www.insecure.test", "insecure"),
        Host("bogus", "203.0.113.22", "2001:db8:1::22", "www.bogus.test", "bogus"),
        Host("ls-a", "203.0.113.30", "2001:db8:1::30", "a.example.test", "selfcheck"),
        Host("ls-b", "203.0.113.31", "2001:db8:1::31", "b.example.test", "selfcheck"),
    )

    def host(self, netns: str) -> Host:
        for h in self.hosts:
            if h.netns == netns:
                return h
        raise LabError(f"no host {netns!r} in the lab plan")


PLAN = Plan()
# Where world hosts keep state (labkit's LAB_STATE). Not under /run: oe-sw's start.sh mounts a
# private tmpfs on its chroot's /run, which would hide a state dir below /run.
LAB_STATE = "/var/lab"


@dataclass(frozen=True)
class Result:
    """What a guest command did."""

    rc: int
    stdout: str
    stderr: str
    cmd: str = ""
    where: str = ""

    @property
    def ok(self) -> bool:
        return self.rc == 0

    def check(self) -> Result:
        """Return self, or raise one error naming the command, where it ran and its stderr."""
        if self.rc != 0:
            raise LabError(
                f"{self.where}: `{self.cmd}` failed with rc {self.rc}:\n"
                f"{self.stderr.strip()[-2000:]}\n{self.stdout.strip()[-1000:]}"
            )
        return self


# ------------------------------------------------------------------------------------ agent


class AgentClient:
    """Host end of the guest agent's JSON-lines protocol (see guest/agent.py)."""

    def __init__(self, name: str, sock_path: Path) -> None:
        self.name = name
        self._path = sock_path
        self._sock: socket.socket | None = None
        self._ids = iter(range(1, 1 << 62))
        self._pending: dict[int, Future[dict[str, Any]]] = {}
        self._lock = threading.Lock()
        self.ready = threading.Event()
        self.closed = threading.Event()

    def connect(self, deadline: float) -> None:
        while True:
            try:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(str(self._path))
                self._sock = s
                break
            except OSError:
                s.close()
                if time.monotonic() > deadline:
                    raise LabError(f"{self.name}: QEMU's agent socket never appeared") from None
                time.sleep(0.05)
        threading.Thread(target=self._reader, name=f"agent-{self.name}", daemon=True).start()

    def _reader(self) -> None:
        assert self._sock is not None
        buf = b""
        while True:
            try:
                data = self._sock.recv(65536)
            except OSError:
                data = b""
            if not data:
                break
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                try:
                    msg = json.loads(line)
                except ValueError:
                    continue
                if msg.get("event") == "ready":
                    self.ready.set()
                    continue
                with self._lock:
                    fut = self._pending.pop(msg.get("id"), None)
                if fut is not None:
                    fut.set_result(msg)
        self.closed.set()
        with self._lock:
            pending, self._pending = self._pending, {}
        for fut in pending.values():
            fut.set_exception(LabError(f"{self.name}: the VM went away"))

    def request(self, req: dict[str, Any], timeout: float) -> dict[str, Any]:
        if self._sock is None or self.closed.is_set():
            raise LabError(f"{self.name}: agent not connected")
        fut: Future[dict[str, Any]] = Future()
        with self._lock:
            rid = next(self._ids)
            self._pending[rid] = fut
        self._sock.sendall((json.dumps({**req, "id": rid}) + "\n").encode())
        try:
            return fut.result(timeout=timeout + 15)
        except FutureTimeout:
            with self._lock:
                self._pending.pop(rid, None)
            raise LabError(
                f"{self.name}: agent gave no answer to {req.get('cmd', req)!r}"
            ) from None

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()


# ------------------------------------------------------------------------------------ VMs


@dataclass(frozen=True)
class NetLink:
    """One virtual cable between two VMs: a pair of bound unix datagram sockets."""

    name: str
    a: Path
    b: Path


@dataclass
class VMSpec:
    name: str
    image: Path
    memory_mb: int
    smp: int
    cpu: str
    nics: list[tuple[str, str, Path, Path]]  # (netdev id, mac, local socket, remote socket)
    crypto: bool = False
    cmdline: str = ""  # added to the kernel command line
    #: a NIC on QEMU's user network with host 127.0.0.1:<port> forwarded to ``mgmt``'s
    #: port 80 (address, MAC, host port); restrict=on: no way out to the host's networks
    mgmt: tuple[str, str, int] | None = None


def _die_with_parent() -> None:
    """preexec_fn: QEMU gets SIGKILL if the Python process dies, so nothing is ever orphaned."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class VM:
    """One QEMU process, its console log and its agent."""

    def __init__(self, spec: VMSpec, kernel: build.Kernel, run_dir: Path) -> None:
        self.spec = spec
        self.name = spec.name
        self.console = run_dir / f"console-{spec.name}.log"
        self._sock = run_dir / "sock" / f"agent-{spec.name}"
        self._kernel = kernel
        self._run_dir = run_dir
        self.proc: subprocess.Popen[bytes] | None = None
        self.agent = AgentClient(spec.name, self._sock)

    def command(self) -> list[str]:
        s = self.spec
        cmd = [
            "qemu-system-x86_64", "-name", s.name,
            "-machine", "pc", "-accel", "tcg,thread=multi", "-cpu", s.cpu,
            "-smp", str(s.smp), "-m", str(s.memory_mb),
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-kernel", str(self._kernel.vmlinux), "-initrd", str(self._kernel.initramfs),
            "-append", f"console=ttyS0 quiet panic=-1 oe.hostname={s.name} {s.cmdline}".strip(),
            "-chardev", f"file,id=con0,path={self.console}", "-serial", "chardev:con0",
            "-drive", f"file={s.image},format=raw,if=virtio,cache=unsafe,snapshot=on",
            "-virtfs", f"local,path={self._run_dir},mount_tag=lab,security_model=none,id=lab",
            "-device", "virtio-rng-pci",
            "-device", "virtio-serial-pci",
            "-chardev", f"socket,id=agent,path={self._sock},server=on,wait=off",
            "-device", "virtserialport,chardev=agent,name=oe.agent",
        ]  # fmt: skip
        for netdev, mac, local, remote in s.nics:
            cmd += [
                "-netdev",
                f"dgram,id={netdev},local.type=unix,local.path={local},"
                f"remote.type=unix,remote.path={remote}",
                "-device", f"virtio-net-pci,netdev={netdev},mac={mac}",
            ]  # fmt: skip
        if s.mgmt is not None:
            addr, mac, port = s.mgmt
            cmd += [
                "-netdev",
                "user,id=mgmt,restrict=on,ipv6=off,net=10.0.2.0/24,"
                f"hostfwd=tcp:127.0.0.1:{port}-{addr}:80",
                "-device", f"virtio-net-pci,netdev=mgmt,mac={mac}",
            ]  # fmt: skip
        if s.crypto:
            cmd += [
                "-object", "cryptodev-backend-builtin,id=cd0",
                "-device", "virtio-crypto-pci,id=crypto0,cryptodev=cd0",
            ]  # fmt: skip
        return cmd

    def start(self) -> None:
        self._sock.parent.mkdir(parents=True, exist_ok=True)
        qlog = open(self._run_dir / f"qemu-{self.name}.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            self.command(),
            stdin=subprocess.DEVNULL,
            stdout=qlog,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,
        )
        qlog.close()
        try:
            self.agent.connect(time.monotonic() + 30)
        except LabError:
            rc = self.proc.poll()
            log = (self._run_dir / f"qemu-{self.name}.log").read_text(errors="replace")
            raise LabError(
                f"{self.name}: QEMU's agent socket never appeared (QEMU rc {rc}): {log[-1500:]}"
            ) from None

    def wait_ready(self, deadline: float) -> None:
        while not self.agent.ready.wait(0.2):
            if self.proc is not None and self.proc.poll() is not None:
                raise LabError(f"{self.name}: QEMU exited with rc {self.proc.returncode}; "
                               f"see {self.console}")  # fmt: skip
            if time.monotonic() > deadline:
                raise LabError(f"{self.name}: agent not ready in time; see {self.console}")

    def run(self, cmd: str, timeout: float = 60, stdin: str | None = None) -> Result:
        req: dict[str, Any] = {"op": "run", "cmd": cmd, "timeout": timeout}
        if stdin is not None:
            req["stdin"] = stdin
        msg = self.agent.request(req, timeout)
        return Result(int(msg["rc"]), msg["stdout"], msg["stderr"], cmd, self.name)

    def stop(self, timeout: float = 10) -> None:
        """Ask the guest to power off; kill QEMU if it does not within `timeout`."""
        if self.proc is None:
            return
        if (
            self.proc.poll() is None
            and self.agent.ready.is_set()
            and not self.agent.closed.is_set()
        ):
            with contextlib.suppress(LabError, OSError):
                self.agent.request({"op": "poweroff"}, 2)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self.agent.close()


# ------------------------------------------------------------------------------------ captures


class Capture:
    """A tcpdump running in the world VM, written to the run directory; counted on the host.

    --immediate-mode matters: with TPACKET_V3, libpcap hands packets over in blocks, and the
    last block is lost when tcpdump is stopped, so a short flow would vanish from the pcap.
    """

    def __init__(
        self,
        lab: Lab,
        iface: str,
        netns: str | None,
        bpf: str,
        label: str,
        direction: str | None = None,
    ) -> None:
        self._lab = lab
        self._direction = direction
        self.path = lab.run_dir / "pcap" / f"{label}.pcap"
        self._log = lab.run_dir / "pcap" / f"{label}.log"
        self._iface = iface
        self._netns = netns
        self._bpf = bpf
        self._pid: int | None = None

    def start(self) -> None:
        self.path.parent.mkdir(exist_ok=True)
        prefix = f"ip netns exec {self._netns} " if self._netns else ""
        guest_path = "/lab/" + str(self.path.relative_to(self._lab.run_dir))
        guest_log = "/lab/" + str(self._log.relative_to(self._lab.run_dir))
        cmd = (
            f"{prefix}tcpdump -n -U --immediate-mode -s 256 -i {shlex.quote(self._iface)} "
            f"{'-Q ' + self._direction + ' ' if self._direction else ''}"
            f"-w {guest_path} "
            f"{shlex.quote(self._bpf)} >{guest_log} 2>&1 </dev/null & echo $!"
        )
        self._pid = int(self._lab.world(cmd).check().stdout.split()[-1])
        deadline = time.monotonic() + 20
        while "listening on" not in self._log.read_text(errors="replace"):
            if time.monotonic() > deadline:
                raise LabError(f"tcpdump on {self._iface} did not start: {self._log.read_text()}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self._pid is None:
            return
        pid, self._pid = self._pid, None
        self._lab.world(
            f"kill -INT {pid}; for i in $(seq 50); do kill -0 {pid} 2>/dev/null || exit 0; "
            "sleep 0.1; done; kill -9 " + str(pid),
            timeout=15,
        )

    def count(self, bpf: str = "") -> int:
        """Packets in the capture matching the tcpdump filter `bpf` ("esp", "tcp port 80")."""
        args = ["tcpdump", "-n", "-r", str(self.path)]
        if bpf:
            args.append(bpf)
        res = subprocess.run(args, capture_output=True, text=True, check=False)
        if res.returncode != 0:
            raise LabError(f"reading {self.path} with filter {bpf!r}: {res.stderr.strip()}")
        return len([ln for ln in res.stdout.splitlines() if ln.strip()])

    def packets(self, bpf: str) -> list[tuple[float, str]]:
        """(epoch seconds, tcpdump line) of every packet matching ``bpf``: captures in the
        world VM share its clock, so their timestamps order events across cables."""
        res = subprocess.run(
            ["tcpdump", "-tt", "-n", "-r", str(self.path), bpf],
            capture_output=True,
            text=True,
            check=False,
        )
        if res.returncode != 0:
            raise LabError(f"reading {self.path} with filter {bpf!r}: {res.stderr.strip()}")
        return [(float(ln.split()[0]), ln) for ln in res.stdout.splitlines() if ln.strip()]

    def esp(self) -> int:
        """ESP packets, raw (IP proto 50) or UDP-encapsulated on port 4500 (non-IKE marker)."""
        return self.count("esp or (udp port 4500 and udp[8:4] != 0)")

    def text(self, bpf: str = "") -> str:
        args = ["tcpdump", "-n", "-r", str(self.path), *([bpf] if bpf else [])]
        return subprocess.run(args, capture_output=True, text=True, check=False).stdout


# ------------------------------------------------------------------------------------ lab


@dataclass
class LabTimings:
    boot_to_agents: float = 0.0
    network_ready: float = 0.0
    all_ready: float = 0.0
    steps: dict[str, float] = field(default_factory=dict)


def _shell_lines(*lines: str) -> str:
    return "\n".join(lines) + "\n"


def _rename_by_mac(mac: str, name: str) -> str:
    return (
        f'for d in /sys/class/net/*; do if [ "$(cat $d/address)" = {mac} ]; then '
        f'ip link set "${{d##*/}}" name {name}; fi; done'
    )


#: the lab's own dnsmasq switches (pid file for oelab's restarts, the run's query log)
LAB_DNSMASQ = (
    "--pid-file=/run/dnsmasq.pid --user=root --log-queries "
    "--log-facility=/lab/logs/router-dnsmasq.log"
)
#: the first-boot router's firmware customisation (laid over its root before procd starts)
FIRST_BOOT_FILES = build.GUEST / "first-boot-files"
#: where the first-boot router finds the lab root's DS (its uci-defaults points oe at it)
FIRST_BOOT_ANCHOR = "etc/oe/lab-root.ds"
#: the daemon's control socket (files/etc/config/oe's default): the first-boot router's
#: WAN comes up once it exists
OE_CONTROL = "/var/run/oe/control.sock"
#: the router's devices, as OpenWrt's x86 layout names them (qemu/guest/router/etc/config/
#: network): netifd's networks wan and wan6 on eth1, lan on the bridge br-lan over eth0
ROUTER_WAN_DEV = "eth1"
ROUTER_LAN_DEV = "br-lan"
ROUTER_DEVICES = {"wan": ROUTER_WAN_DEV, "wan6": ROUTER_WAN_DEV, "lan": ROUTER_LAN_DEV}
#: the management port (Plan.router_mgmt4; network mgmt, fw4 zone mgmt): uhttpd for the
#: host's browser, nothing routed
ROUTER_MGMT_DEV = "eth2"


def free_tcp_port() -> int:
    """A TCP port on the host's loopback that nothing listens on now (for a hostfwd)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def router_kernel_args(plan: Plan) -> str:
    """The router's kernel command line for its devices' names: /sbin/oe-lab-init names
    them before procd starts, so netifd (S20) finds the devices /etc/config/network names."""
    return (
        f"oe.ifname=eth1,{plan.mac_router_wan} oe.ifname=eth0,{plan.mac_router_lan} "
        f"oe.ifname=eth2,{plan.mac_router_mgmt}"
    )


def _netifd_up(plan: Plan, *interfaces: str) -> tuple[str, ...]:
    """Wait until netifd has ``interfaces`` (wan, lan) up with the plan's addresses (and,
    for wan, its default routes), none of them tentative; fail naming what differs (the
    image's /etc/config/network and the plan are two copies of the same addresses)."""
    addresses = {
        "wan": (f"{plan.router_wan4}/24",),
        "wan6": (f"{plan.router_wan6}/64",),
        "lan": (f"{plan.router_lan4}/24", f"{plan.router_lan6}/64"),
    }
    routes = {
        "wan": (f"-4 route show default via {plan.inet_gw4} dev {ROUTER_WAN_DEV}",),
        "wan6": (f"-6 route show default via {plan.inet_gw6} dev {ROUTER_WAN_DEV}",),
        "lan": (),
    }
    checks = []
    for i in interfaces:
        checks.append(
            f'[ "$(ubus call network.interface.{i} status | jsonfilter -e @.up)" = true ]'
        )
        dev = ROUTER_DEVICES[i]
        checks += [f"ip -o addr show dev {dev} | grep -q ' {a} '" for a in addresses[i]]
        checks += [f'[ -n "$(ip {r})" ]' for r in routes[i]]
    checks.append('[ -z "$(ip -o addr show tentative)" ]')
    names = " and ".join(interfaces)
    return (
        f"ubus -t 30 wait_for {' '.join(f'network.interface.{i}' for i in interfaces)} || "
        f"{{ echo 'router: netifd has no ubus object for {names} after 30 s' >&2; exit 1; }}",
        "i=0",
        f"until {' && '.join(checks)}; do",
        "  i=$((i + 1))",
        "  if [ $i -gt 300 ]; then",
        f"    echo 'router: netifd did not set up {names} as the lab plan says "
        "(/etc/config/network):' >&2",
        "    ip -o addr >&2; ip route >&2; ip -6 route >&2; exit 1",
        "  fi",
        "  sleep 0.1",
        "done",
    )


def router_setup_script(plan: Plan, first_boot: bool = False, wan_delay: float = 0) -> str:
    """What the lab adds to the router's own boot: netifd (S20network) sets up wan and lan
    from /etc/config/network and fw4 (S19firewall) rendered /etc/config/firewall; this
    waits for netifd, checks the addresses against the plan, turns on forwarding and
    starts dnsmasq.

    The session lab starts dnsmasq with switches of its own (oelab points it at the DNS
    front when it starts the daemon). ``first_boot`` follows a real router's order with a
    WAN that comes late, as a DHCP lease does: netifd brings up the LAN at boot, but not
    the WAN (``auto 0``, set by the first-boot files' uci-defaults 96_oe-lab-late-wan);
    dnsmasq starts from /etc/config/dhcp (the lab's stand-in for its init script); once
    oe-routerd (started by procd at S90) has opened its control socket, the lab brings the
    WAN up through netifd (``ifup``), which sets its addresses, writes its resolver into
    /tmp/resolv.conf.d/resolv.conf.auto and sends interface.update, on which procd's
    interface trigger reloads the daemon. ``wan_delay``: seconds the WAN stays down after
    that (a slow link); just before it comes up the lab keeps the daemon's `oe status`
    (text and JSON) in /lab/logs/oe-status-wan-down.{txt,json} and the router's clock in
    /lab/logs/wan-up-at.
    """
    if first_boot:
        first = _netifd_up(plan, "lan")
        dns: tuple[str, ...] = (
            f"/usr/lib/oe-lab/dnsmasq-uci {LAB_DNSMASQ}",
            f"i=0; until [ -S {OE_CONTROL} ]; do i=$((i + 1)); [ $i -le 900 ] || "
            "{ echo 'router: oe-routerd did not open its control socket in 90 s' >&2; "
            "exit 1; }; sleep 0.1; done",
            *(
                (
                    f"sleep {wan_delay}",
                    "oe status >/lab/logs/oe-status-wan-down.txt 2>&1 || true",
                    "oe status --json >/lab/logs/oe-status-wan-down.json 2>&1 || true",
                    "date +%s.%N >/lab/logs/wan-up-at",
                )
                if wan_delay
                else ()
            ),
            "ubus call network.interface.wan up",
            "ubus call network.interface.wan6 up",
            *_netifd_up(plan, "wan", "wan6"),
        )
    else:
        first = _netifd_up(plan, "wan", "wan6", "lan")
        dns = (
            f"dnsmasq --conf-file=/dev/null --interface={ROUTER_LAN_DEV} --bind-dynamic "
            f"--no-resolv --server={plan.resolver} --domain-needed --proxy-dnssec --cache-size=150 "
            f"{LAB_DNSMASQ}",
        )
    return _shell_lines(
        "set -e",
        "sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1",
        "sysctl -qw net.ipv6.conf.all.accept_dad=0 net.ipv6.conf.default.accept_dad=0",
        *first,
        # fw4 rendered table inet fw4 from /etc/config/firewall at boot (S19firewall); the
        # zones name the devices oe-lab-init named
        "nft list table inet fw4 >/dev/null || "
        "{ echo 'router: no table inet fw4: fw4 did not load at boot' >&2; exit 1; }",
        "echo 'nameserver 127.0.0.1' > /etc/resolv.conf",
        "mkdir -p /lab/logs",
        # procd sends the daemon's output to logd: the lab keeps its lines in the run's logs
        # the follower's own command lines must not match `pgrep -f oe-routerd`: "[o]e-routerd"
        # in grep's, the log file's name in the environment, not in sh's
        "OE_LAB_LOG=/lab/logs/oe-routerd.log setsid sh -c "
        '\'logread -f | grep --line-buffered "[o]e-routerd\\[" >>"$OE_LAB_LOG"\' '
        "</dev/null >/dev/null 2>&1 &",
        *dns,
    )


def world_setup_script(plan: Plan, hosts: tuple[Host, ...]) -> str:
    """The lab's Internet: br-inet with one netns per host, plus the LAN client netns."""
    lines = [
        "set -e",
        _rename_by_mac(plan.mac_world_inet, "inet0"),
        _rename_by_mac(plan.mac_world_lan, "lan0"),
        "sysctl -qw net.ipv6.conf.all.accept_dad=0 net.ipv6.conf.default.accept_dad=0",
        "ip link add br-inet type bridge forward_delay 0 stp_state 0",
        "ip link set br-inet up",
        f"ip addr add {plan.inet_gw4}/24 dev br-inet",
        f"ip -6 addr add {plan.inet_gw6}/64 dev br-inet nodad",
        "ip link set inet0 master br-inet up",
        "mkdir -p /lab/logs",
    ]
    # `ip -batch` per namespace: every process spawn costs 0.1-0.3 s under TCG.
    root_batch = [f"netns add {h.netns}" for h in hosts]
    for h in hosts:
        root_batch += [
            f"link add v-{h.netns} type veth peer name eth0 netns {h.netns}",
            f"link set v-{h.netns} master br-inet up",
        ]
    lines += ["ip -b - <<'EOF'", *root_batch, "EOF"]
    for h in hosts:
        batch = [
            "link set lo up",
            "link set eth0 up",
            f"addr add {h.ipv4}/24 dev eth0",
            f"route add default via {plan.router_wan4}",
        ]
        if h.ipv6:
            batch += [
                f"addr add {h.ipv6}/64 dev eth0 nodad",
                f"route add default via {plan.router_wan6}",
            ]
        lines += [f"ip -n {h.netns} -b - <<'EOF'", *batch, "EOF"]
        lines += [
            f"mkdir -p /etc/netns/{h.netns}",
            f"echo 'nameserver {plan.resolver}' > /etc/netns/{h.netns}/resolv.conf",
        ]
    lines += [
        "ip netns add client",
        "ip link set lan0 netns client",
        "ip -n client link set lan0 name eth0",
        "ip -n client link set lo up",
        "ip -n client link set eth0 up",
        f"ip -n client addr add {plan.client4}/24 dev eth0",
        f"ip -n client -6 addr add {plan.client6}/64 dev eth0 nodad",
        f"ip -n client route add default via {plan.router_lan4}",
        f"ip -n client -6 route add default via {plan.router_lan6}",
        "mkdir -p /etc/netns/client",
        f"echo 'nameserver {plan.router_lan4}' > /etc/netns/client/resolv.conf",
    ]
    return _shell_lines(*lines)


def hosts_from_world_json(data: dict[str, Any], plan: Plan) -> tuple[Host, ...]:
    """Hosts as labkit's world.json lists them; the fixed plan fills what it leaves out."""
    out: list[Host] = []
    for h in data.get("hosts", []):
        ns = h.get("netns")
        if not ns:
            continue
        base = next((p for p in plan.hosts if p.netns == ns), None)
        out.append(
            Host(
                netns=ns,
                ipv4=h.get("v4") or (base.ipv4 if base else ""),
                ipv6=h.get("v6") or (base.ipv6 if base else None),
                name=h.get("dns_name") or (base.name if base else None),
                role=h.get("role") or (base.role if base else ""),
                expected=h.get("expected", ""),
            )
        )
    return tuple(out) if out else plan.hosts


class Lab:
    """The booted lab. Use as a context manager; everything is powered off on exit.

    ``first_boot``: the router boots as a user flashes it: the package's rc.d links in
    place, so procd starts oe-routerd at boot, and the shipped configuration changed only
    by the run's firmware customisation (the trust anchor pointed at the lab's root); the
    lab's set-up then starts dnsmasq from /etc/config/dhcp and, once the daemon runs,
    brings the WAN up through netifd (a WAN that comes late, as a DHCP lease does).
    The default (the session lab) leaves the daemon to the tests (oelab.start_daemon).
    """

    def __init__(
        self,
        images: build.Images,
        *,
        run_dir: Path | None = None,
        crypto: bool = False,
        cpu: str | None = None,
        plan: Plan = PLAN,
        log: Log = print,
        bundle: bool = True,
        keep_run_dir: bool | None = None,
        first_boot: bool = False,
        wan_delay: float = 0,
        services: Collection[str] | None = None,
    ) -> None:
        self.images = images
        self.plan = plan
        self.log = log
        # A run dir we made ourselves is removed on close unless asked to keep it.
        self.keep_run_dir = run_dir is not None if keep_run_dir is None else keep_run_dir
        self.run_dir = run_dir or Path(tempfile.mkdtemp(prefix="oe-lab-"))
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.crypto = crypto
        # With -cpu max the guest has AES-NI, which outranks virtio-crypto for cbc(aes).
        self.cpu = cpu or ("qemu64" if crypto else "max")
        self.want_bundle = bundle
        self.first_boot = first_boot
        self.wan_delay = wan_delay  # first boot: the WAN's extra seconds down
        self.world_info: dict[str, Any] = {}
        self.hosts: tuple[Host, ...] = plan.hosts
        #: world hosts whose services (start.sh, ready.sh) run; None: all. The others keep
        #: their namespace and addresses with nothing listening (a lab that needs three
        #: hosts does not wait for eleven to start on one emulated CPU).
        self.services = None if services is None else frozenset(services)
        self.timings = LabTimings()
        self.missing: list[str] = []  # parts of the lab that could not be set up, said plainly
        self.failed_hosts: dict[str, str] = {}  # world netns whose start.sh failed -> log tail
        #: the host's port forwarded to the router's uhttpd (its management port, eth2)
        self.http_port = free_tcp_port()
        self._captures = 0
        self._vms: dict[str, VM] = {}
        self._closed = False
        atexit.register(self.close)

    # -- lifecycle

    def _links(self) -> tuple[NetLink, NetLink]:
        s = self.run_dir / "sock"
        s.mkdir(exist_ok=True)
        return (
            NetLink("wan", s / "wan-router", s / "wan-world"),
            NetLink("lan", s / "lan-router", s / "lan-world"),
        )

    def _prepare_bundle(self) -> None:
        if not self.want_bundle:
            self.missing.append("world bundle (disabled by caller)")
            return
        labkit = QEMU_DIR / "labkit"
        if not (labkit / "world.py").exists():
            self.missing.append("world bundle: qemu/labkit/world.py does not exist yet")
            return
        out = self.run_dir / "bundle"
        t0 = time.monotonic()
        res = subprocess.run(
            [sys.executable, "-m", "labkit.world", "build", str(out)],
            cwd=QEMU_DIR,
            env={**os.environ, "PYTHONPATH": str(QEMU_DIR)},
            capture_output=True,
            text=True,
            check=False,
            timeout=300,
        )
        (self.run_dir / "logs" / "labkit-build.log").write_text(res.stdout + res.stderr)
        if res.returncode != 0:
            tail = "\n".join(res.stderr.strip().splitlines()[-8:])
            raise LabError(f"labkit.world build failed (rc {res.returncode}):\n{tail}")
        self.timings.steps["bundle"] = time.monotonic() - t0
        wj = out / "world.json"
        if wj.exists():
            self.world_info = json.loads(wj.read_text())
            self.hosts = hosts_from_world_json(self.world_info, self.plan)

    def _first_boot_files(self) -> None:
        """The run's firmware customisation for the first-boot router (/lab/first-boot/files,
        laid over its root before procd starts): the uci-defaults of FIRST_BOOT_FILES and
        the lab root's DS from the bundle."""
        ta = self.world_info.get("router", {}).get("trust_anchor_ds")
        if not ta:
            raise LabError("first boot: the world bundle names no router trust anchor")
        out = self.run_dir / "first-boot" / "files"
        shutil.copytree(FIRST_BOOT_FILES, out, dirs_exist_ok=True)
        (out / FIRST_BOOT_ANCHOR).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.run_dir / "bundle" / ta, out / FIRST_BOOT_ANCHOR)

    def start(self, timeout: float = 300) -> Lab:
        t0 = time.monotonic()
        shutil.copytree(build.GUEST, self.run_dir / "guest", dirs_exist_ok=True)
        for d in ("logs", "pcap"):
            (self.run_dir / d).mkdir(exist_ok=True)
        if self.first_boot:
            # the router reads its customisation, made from the bundle, before procd starts:
            # the bundle first (well under a second), not beside the boot
            self._prepare_bundle()
            self._first_boot_files()
        wan, lan = self._links()
        img = self.images
        specs = [
            VMSpec("world", img.world, 1536, 2, self.cpu,
                   [("inet", self.plan.mac_world_inet, wan.b, wan.a),
                    ("lan", self.plan.mac_world_lan, lan.b, lan.a)]),
            VMSpec("router", img.router, 768, 2, self.cpu,
                   [("wan", self.plan.mac_router_wan, wan.a, wan.b),
                    ("lan", self.plan.mac_router_lan, lan.a, lan.b)], crypto=self.crypto,
                   mgmt=(self.plan.router_mgmt4, self.plan.mac_router_mgmt, self.http_port),
                   cmdline=router_kernel_args(self.plan)
                   + (" oe.firstboot=1" if self.first_boot else "")),
        ]  # fmt: skip
        deadline = time.monotonic() + timeout
        for spec in specs:
            vm = VM(spec, img.kernel, self.run_dir)
            self._vms[spec.name] = vm
            vm.start()
        # The bundle (fresh keys, signed zones) is made on the host while the guests boot.
        bundle_error: list[BaseException] = []

        def make_bundle() -> None:
            try:
                if not self.first_boot:
                    self._prepare_bundle()
            except BaseException as exc:
                bundle_error.append(exc)

        bundler = threading.Thread(target=make_bundle, name="bundle")
        bundler.start()
        for vm in self._vms.values():
            vm.wait_ready(deadline)
        self.timings.boot_to_agents = time.monotonic() - t0
        self.log(f"lab: both agents up after {self.timings.boot_to_agents:.1f}s")

        results: dict[str, Result] = {}
        errors: list[BaseException] = []
        done: dict[str, float] = {}

        def setup(name: str, script: str) -> bool:
            # first boot: the router's waits for the daemon's start before its WAN
            limit = 150 + self.wan_delay if self.first_boot else 60
            results[name] = self._vms[name].run(script, timeout=limit)
            done[name] = time.monotonic() - t0
            return results[name].ok

        def router() -> None:
            try:
                setup("router", router_setup_script(self.plan, self.first_boot, self.wan_delay))
            except BaseException as exc:
                errors.append(exc)

        def world() -> None:
            # The world's services need only the world's own network and the bundle, not
            # the router's: they start while the router's set-up runs (a first-boot router
            # spends most of it waiting for its late WAN).
            try:
                bundler.join()  # the hosts are world.json's (well before the agents are up)
                if bundle_error or not setup("world", world_setup_script(self.plan, self.hosts)):
                    return
                t1 = time.monotonic()
                self._start_world_services(deadline)
                self.timings.steps["world services"] = time.monotonic() - t1
            except BaseException as exc:
                errors.append(exc)

        threads = [
            threading.Thread(target=router, name="router-setup"),
            threading.Thread(target=world, name="world-setup"),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for r in results.values():
            r.check()
        if errors:
            raise errors[0]
        bundler.join()
        if bundle_error:
            raise bundle_error[0]
        self.timings.network_ready = max(done.values())
        self.timings.steps.update({f"{k} set-up done": v for k, v in done.items()})
        t1 = time.monotonic()
        self._wait_all_ready(deadline)
        self.timings.steps["ready checks"] = time.monotonic() - t1
        self.timings.all_ready = time.monotonic() - t0
        self.log(f"lab: all ready after {self.timings.all_ready:.1f}s")
        return self

    def _serving(self) -> tuple[Host, ...]:
        """The world hosts whose services this lab starts."""
        if self.services is None:
            return self.hosts
        unknown = self.services - {h.netns for h in self.hosts}
        if unknown:
            raise LabError(f"services asked for hosts the world has not: {sorted(unknown)}")
        return tuple(h for h in self.hosts if h.netns in self.services)

    def _start_world_services(self, deadline: float) -> None:
        hosts_dir = self.run_dir / "bundle" / "hosts"
        if not hosts_dir.is_dir():
            if "world bundle" not in " ".join(self.missing):
                self.missing.append("world bundle: no hosts/ directory in it")
            return
        starts = []
        for h in self._serving():
            if (hosts_dir / h.netns / "start.sh").exists():
                starts.append(
                    f"( LAB_STATE={LAB_STATE} ip netns exec {h.netns} "
                    f"sh /lab/bundle/hosts/{h.netns}/start.sh "
                    f">/lab/logs/{h.netns}-start.log 2>&1; "
                    f"echo {h.netns}=$?=$(cut -d' ' -f1 /proc/uptime) ) &"
                )
            else:
                self.missing.append(f"world host {h.netns}: no start.sh in the bundle")
        if not starts:
            return
        left = max(5.0, deadline - time.monotonic())
        res = self.world("\n".join([*starts, "wait"]), timeout=left).check()
        for item in res.stdout.split():
            ns, rc, up = [*item.split("="), "", ""][:3]
            self.timings.steps[f"start.sh {ns} done at guest uptime"] = float(up or 0)
            if rc != "0":
                log = self.run_dir / "logs" / f"{ns}-start.log"
                tail = "\n".join(log.read_text(errors="replace").strip().splitlines()[-6:])
                self.failed_hosts[ns] = tail
                self.log(f"lab: WORLD HOST {ns} FAILED TO START (rc {rc}); see {log}:\n{tail}")

    def _wait_all_ready(self, deadline: float) -> None:
        """Ready = each host's ready.sh (if any) passes and the client reaches the router."""
        hosts_dir = self.run_dir / "bundle" / "hosts"
        checks = [
            f"ip netns exec {h.netns} sh /lab/bundle/hosts/{h.netns}/ready.sh"
            for h in self._serving()
            if (hosts_dir / h.netns / "ready.sh").exists()
        ]
        checks.append(f"ip netns exec client ping -c1 -W1 {self.plan.router_lan4} >/dev/null")
        script = " && ".join(f"{{ {c}; }}" for c in checks)
        while True:
            res = self.world(script, timeout=30)
            if res.ok:
                return
            if time.monotonic() > deadline:
                raise LabError(f"lab not ready in time: {res.stderr.strip()[-500:]}")
            time.sleep(0.3)

    def close(self) -> None:
        """Power off every VM (kill what does not stop). Safe to call more than once."""
        if self._closed:
            return
        self._closed = True
        vms = list(self._vms.values())
        threads = [threading.Thread(target=vm.stop) for vm in vms]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if not self.keep_run_dir:
            shutil.rmtree(self.run_dir, ignore_errors=True)
        atexit.unregister(self.close)

    def __enter__(self) -> Lab:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- commands

    def vm(self, name: str) -> VM:
        try:
            return self._vms[name]
        except KeyError:
            raise LabError(f"no VM {name!r} (have {sorted(self._vms)})") from None

    def router(self, cmd: str, timeout: float = 60) -> Result:
        return self.vm("router").run(cmd, timeout)

    @property
    def router_http(self) -> str:
        """The router's uhttpd as the host reaches it: through the management port's
        forward (its LAN address answers the same pages to the LAN client)."""
        return f"http://127.0.0.1:{self.http_port}"

    def world(self, cmd: str, timeout: float = 60) -> Result:
        return self.vm("world").run(cmd, timeout)

    def host(self, netns: str, cmd: str, timeout: float = 60) -> Result:
        """Run `cmd` inside a world host's netns (or "client", the LAN client)."""
        res = self.world(f"ip netns exec {netns} sh -c {shlex.quote(cmd)}", timeout)
        return Result(res.rc, res.stdout, res.stderr, cmd, f"world/{netns}")

    def state_dir(self, netns: str) -> str:
        """A world host's state directory (configs, logs, pluto.ctl) inside the world VM."""
        return f"{LAB_STATE}/{netns}"

    def client(self, cmd: str, timeout: float = 60) -> Result:
        return self.host("client", cmd, timeout)

    # -- captures

    @contextlib.contextmanager
    def capture(
        self,
        iface: str,
        netns: str | None = None,
        bpf: str = "",
        label: str = "",
        direction: str | None = None,
    ) -> Iterator[Capture]:
        """tcpdump on `iface` (in `netns`, else the world's root netns); direction: in|out|inout.

        Inside an IPsec endpoint capture with direction="out": incoming captures there also
        show the decrypted packets the kernel re-injects (LAB-NOTES).
        """
        self._captures += 1
        label = f"{self._captures:02d}-{label or iface}"
        cap = Capture(self, iface, netns, bpf, label, direction)
        cap.start()
        try:
            yield cap
        finally:
            cap.stop()

    def capture_wan(
        self, bpf: str = "", label: str = "wan"
    ) -> contextlib.AbstractContextManager[Capture]:
        """Capture the router's WAN link on the world side (the bridge port; both directions).

        A bridge port sees frames exactly as on the wire: no decryption happens there, so the
        re-injected plaintext LAB-NOTES warns about (captures on an IPsec endpoint) cannot appear.
        """
        return self.capture("inet0", None, bpf, label)

    def capture_host(
        self, netns: str, bpf: str = "", label: str = ""
    ) -> contextlib.AbstractContextManager[Capture]:
        """Capture a world host's link on its bridge port (outside the host's IPsec stack)."""
        return self.capture(f"v-{netns}", None, bpf, label or f"v-{netns}")

    # -- artifacts

    def collect_artifacts(self, dest: Path) -> Path:
        """Copy consoles, pcaps, daemon logs and the bundle's logs into `dest`."""
        dest.mkdir(parents=True, exist_ok=True)
        for name, vm in self._vms.items():
            if vm.agent.ready.is_set() and not vm.agent.closed.is_set():
                with contextlib.suppress(LabError, OSError):
                    r = vm.run(
                        "ip -d addr; ip route; ip xfrm state; ip xfrm policy; nft list ruleset; "
                        "ps axww; dmesg | tail -200; logread 2>/dev/null | tail -300; "
                        "for n in $(ip netns list | cut -d' ' -f1); "
                        'do echo "== netns $n"; ip -n $n addr; ip netns exec $n ip xfrm state; '
                        "done",
                        timeout=30,
                    )
                    (dest / f"state-{name}.txt").write_text(r.stdout + r.stderr)
        for p in self.run_dir.iterdir():
            if p.name in ("sock", "guest"):
                continue
            target = dest / p.name
            if p.is_dir():
                shutil.copytree(
                    p, target, dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.sock")
                )
            elif p.is_file():
                shutil.copy2(p, target)
        return dest


def main(argv: list[str] | None = None) -> int:
    """`python qemu/lab.py`: build if needed, boot, print timings, run a few smoke commands."""
    import argparse

    ap = argparse.ArgumentParser(description="Boot the QEMU lab and print how long it took.")
    ap.add_argument("--crypto", action="store_true", help="give the router a virtio-crypto device")
    ap.add_argument("--shell", action="store_true", help="after boot, read commands: VM CMD")
    ap.add_argument(
        "--first-boot", action="store_true", help="the router as flashed: oe started by procd"
    )
    args = ap.parse_args(argv)
    images = build.build_all(log=lambda m: print(f"[build] {m}", flush=True))

    def log(msg: str) -> None:
        print(msg, flush=True)

    t0 = time.monotonic()
    with Lab(images, crypto=args.crypto, first_boot=args.first_boot, log=log) as lab:
        print(f"warm boot to all-ready: {time.monotonic() - t0:.1f}s (run dir {lab.run_dir})")
        print(f"timings: {lab.timings}")
        print(f"router's uhttpd (LuCI) from the host: {lab.router_http}")
        for m in lab.missing:
            print(f"missing: {m}")
        print(lab.router("cat /etc/banner; ip -br addr").stdout)
        print(lab.client(f"ping -c1 -W2 {lab.plan.router_lan4}").stdout)
        if args.shell:
            for line in sys.stdin:
                where, _, cmd = line.strip().partition(" ")
                r = lab.router(cmd) if where == "router" else lab.host(where, cmd)
                print(r.stdout, r.stderr, f"rc={r.rc}", sep="\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
