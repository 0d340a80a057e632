"""What this machine offers the daemon: WAN/LAN addresses and a datapath, with reasons.

Why a probe of its own: ``build_services`` must choose the implementations at start
from what the machine has (kernel ESP or not, a WAN address or not) and ``oe status``
must say which and why. The probe is the only place that looks at the machine; tests
pass a ``Platform`` they made themselves.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import logging
import os
import socket
import subprocess
from collections.abc import Callable
from dataclasses import field
from pathlib import Path
from typing import Any

from oe_router.config.schema import OeConfig
from oe_router.config.uci import UciPackage
from oe_router.datapath.base import IPAddress, IPNetwork
from oe_router.netnames import Resolved, link_names, netifd_dump, resolve, uci_network, which
from oe_router.records import record

__all__ = [
    "NetworkSources",
    "Platform",
    "choose_datapath",
    "kernel_esp",
    "network_change",
    "probe_network",
    "probe_platform",
    "read_interface",
    "upstream_addresses",
    "userspace_esp",
    "warm_kernel_crypto",
]

log = logging.getLogger("oe_router.daemon")


@record(frozen=True)
class Platform:
    """The probe's findings. ``wan``: one address per IP version (4/6)."""

    wan: dict[int, IPAddress] = field(default_factory=dict)
    wan_reason: str = ""
    lan: tuple[IPNetwork, ...] = ()
    esp: bool = False
    datapath_reason: str = ""
    dns_upstream: tuple[IPAddress, ...] = ()
    #: "kernel" (XFRM), "userspace" (ESP workers over TUN) or "none" (OE off)
    datapath: str = "none"
    #: every global address of the WAN networks (``wan`` keeps one per version)
    wan_addresses: tuple[IPAddress, ...] = ()
    #: the Linux devices behind ``oe.global.wan_interface`` (the first: the IPv4 one)
    wan_devices: tuple[str, ...] = ()
    #: the Linux device behind ``oe.global.lan_interface`` ("" when none)
    lan_device: str = ""
    #: how each configured name resolved (``netnames.Resolved``), for ``oe status``
    wan_names: tuple[Resolved, ...] = ()
    lan_names: tuple[Resolved, ...] = ()
    #: what the last look found wrong with the configured networks (each logged once)
    network_problems: tuple[str, ...] = ()

    def network_status(self) -> dict[str, object]:
        """Which networks, devices and addresses are in use, and why none, for ``oe status``."""
        return {
            "wan": {
                "networks": [r.describe() for r in self.wan_names],
                "devices": list(self.wan_devices),
                "addresses": [str(a) for a in self.wan_addresses],
                "problem": self.wan_reason,
            },
            "lan": {
                "networks": [r.describe() for r in self.lan_names],
                "devices": [self.lan_device] if self.lan_device else [],
                "prefixes": [str(n) for n in self.lan],
            },
        }


def read_interface(ifname: str) -> tuple[list[IPAddress], list[IPNetwork], str]:
    """Global addresses and their prefixes on ``ifname`` (an rtnetlink address dump);
    ``reason`` if none.

    Why not pyroute2's ``IPRoute``: it imports every rtnetlink message pyroute2 knows (tc,
    bonding, the request builders, unittest through ``pyroute2.lab``: ~5 MB RSS on a
    router); a dump of ``ifaddrmsg`` needs the socket and that one message class.
    """
    try:
        from pyroute2.netlink import NETLINK_ROUTE, NLM_F_DUMP, NLM_F_REQUEST
        from pyroute2.netlink.nlsocket import NetlinkSocket
        from pyroute2.netlink.rtnl import RTM_GETADDR, RTM_NEWADDR
        from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg
    except ImportError:  # pragma: no cover - a runtime dependency
        return [], [], "pyroute2 is not installed"
    try:
        index = socket.if_nametoindex(ifname)
    except OSError:
        return [], [], f"no interface named {ifname!r}"
    addrs: list[IPAddress] = []
    nets: list[IPNetwork] = []
    sock = NetlinkSocket(family=NETLINK_ROUTE)
    try:
        sock.marshal.msg_map[RTM_NEWADDR] = ifaddrmsg
        request = ifaddrmsg()
        request["family"] = socket.AF_UNSPEC
        for msg in sock.nlm_request(request, RTM_GETADDR, NLM_F_REQUEST | NLM_F_DUMP):
            if msg["index"] != index:
                continue
            text = msg.get_attr("IFA_ADDRESS")
            if text is None or msg["scope"] != 0:  # global scope only (no link-local)
                continue
            iface = ipaddress.ip_interface(f"{text}/{msg['prefixlen']}")
            addrs.append(iface.ip)
            nets.append(iface.network)
    finally:
        sock.close()
    if not addrs:
        return [], [], f"interface {ifname!r} has no global address"
    return addrs, nets, ""


def kernel_esp(modprobe: Callable[[str], None] | None = None) -> tuple[bool, str]:
    """Whether the kernel does ESP through XFRM, and the reason either way."""
    if not Path("/proc/net/xfrm_stat").exists():
        return False, "the kernel has no XFRM (no /proc/net/xfrm_stat)"

    def have() -> bool:
        if Path("/sys/module/esp4").exists():
            return True
        try:
            builtin = Path(f"/lib/modules/{os.uname().release}/modules.builtin").read_text()
        except OSError:
            return False
        return "/esp4.ko" in builtin

    if not have():
        with contextlib.suppress(OSError):
            (modprobe or _modprobe)("esp4")
    if have():
        return True, "kernel has ESP (esp4) and XFRM netlink"
    return False, "the kernel has XFRM but no ESP (module esp4 missing)"


#: The ESP transforms the kernel builds for our default proposals (see datapath.base).
WARM_AEADS = ("seqiv(rfc4106(gcm(aes)))", "rfc4106(gcm(aes))", "rfc7539esp(chacha20,poly1305)")


def warm_kernel_crypto(names: tuple[str, ...] = WARM_AEADS) -> list[str]:
    """Instantiate the kernel's ESP AEAD templates once (AF_ALG bind), returning those done.

    Why: the kernel builds a crypto template on its first use. Under QEMU TCG that took
    about 1 s inside the first Child SA install, i.e. inside the first held DNS answer;
    doing it at start moves the cost out of the hold (LAB-NOTES: libreswan 2.2 s -> 0.3 s).
    A kernel without AF_ALG just skips it.
    """
    done: list[str] = []
    family = getattr(socket, "AF_ALG", None)
    if family is None:
        return done
    for name in names:
        try:
            with socket.socket(family, socket.SOCK_SEQPACKET) as sock:
                sock.bind(("aead", name))
        except OSError:
            continue
        done.append(name)
    return done


def userspace_esp() -> tuple[bool, str]:
    """Whether the userspace datapath can run here (a TUN device and nftables)."""
    if not Path("/dev/net/tun").exists():
        return False, "no /dev/net/tun (load the tun module)"
    if which("nft") is None:
        return False, "nft not found (the userspace datapath needs nftables)"
    return True, "TUN and nftables present"


def choose_datapath(
    wanted: str, esp: tuple[bool, str], userspace: tuple[bool, str]
) -> tuple[str, str]:
    """(datapath, reason) for ``oe.global.datapath`` = ``wanted`` and what the machine has."""
    (has_esp, esp_why), (has_tun, tun_why) = esp, userspace
    if wanted == "kernel":
        if has_esp:
            return "kernel", f"oe.global.datapath is kernel; {esp_why}"
        return "none", f"oe.global.datapath is kernel, but {esp_why}"
    if wanted == "userspace":
        if has_tun:
            return "userspace", "oe.global.datapath is userspace: ESP in userspace workers"
        return "none", f"oe.global.datapath is userspace, but {tun_why}"
    if has_esp:
        return "kernel", esp_why
    if has_tun:
        return "userspace", f"{esp_why}: ESP in userspace workers (TUN + UDP 4500)"
    return "none", f"{esp_why}, and no userspace datapath either: {tun_why}"


def _modprobe(module: str) -> None:
    subprocess.run(["modprobe", "-q", module], check=False, timeout=10, capture_output=True)


def upstream_addresses(config: OeConfig) -> tuple[IPAddress, ...]:
    """The DNS front's upstreams (kept out of OE: the resolver must stay reachable)."""
    if config.dns.upstream:
        return tuple(ipaddress.ip_address(e.host) for e in config.dns.upstream)
    out: list[IPAddress] = []
    try:
        lines = Path(config.dns.resolv_file).read_text().splitlines()
    except OSError:
        return ()
    for line in lines:
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "nameserver":
            try:
                out.append(ipaddress.ip_address(parts[1].split("%")[0]))
            except ValueError:
                continue
    return tuple(out)


def probe_platform(config: OeConfig) -> Platform:
    """Look at the machine: WAN and LAN interfaces from the config, kernel ESP."""
    esp = kernel_esp() if config.datapath != "userspace" else (False, "")
    userspace = userspace_esp() if config.datapath != "kernel" and not esp[0] else (False, "")
    datapath, reason = choose_datapath(config.datapath, esp, userspace)
    if datapath == "kernel":
        warmed = warm_kernel_crypto()
        log.info("kernel AEADs instantiated: %s", ", ".join(warmed) or "none (no AF_ALG)")
    found = Platform(esp=datapath == "kernel", datapath_reason=reason, datapath=datapath)
    return probe_network(config, found)


@record(frozen=True)
class NetworkSources:
    """Where network names are looked up (``netnames``); tests pass their own."""

    dump: Callable[[], dict[str, dict[str, Any]] | None] = netifd_dump
    network: Callable[[], UciPackage | None] = uci_network
    links: Callable[[], list[str]] = link_names
    addresses: Callable[[str], tuple[list[IPAddress], list[IPNetwork], str]] = read_interface


def probe_network(
    config: OeConfig, platform: Platform, sources: NetworkSources | None = None
) -> Platform:
    """``platform`` with the addresses as they are now: WAN, LAN prefixes, DNS upstreams.

    Why apart from the datapath probe: addresses change under a running daemon (a new
    DHCP lease, a PPPoE reconnect, netifd bringing WAN up after the daemon started), the
    kernel's ESP does not. A reload looks again at these and only these. The configured
    names are OpenWrt networks, resolved to their devices each time (``netnames``): the
    WAN's device changes with its protocol.
    """
    src = sources or NetworkSources()
    dump, pkg, links = src.dump(), src.network(), src.links()
    wan_names = resolve(config.wan_interface, "oe.global.wan_interface", dump, pkg, links)
    (lan_name,) = resolve((config.lan_interface,), "oe.global.lan_interface", dump, pkg, links)
    wan_addrs: list[IPAddress] = []
    on_device: dict[str, list[IPAddress]] = {}
    problems = [r.problem for r in wan_names if r.problem]
    for r in wan_names:
        if not r.device or r.device in on_device:
            continue
        addrs, _, why = src.addresses(r.device)
        on_device[r.device] = addrs
        wan_addrs += [a for a in addrs if a not in wan_addrs]
        if why:
            problems.append(f"oe.global.wan_interface: {r.name}: {why}")
    wan: dict[int, IPAddress] = {}
    for a in wan_addrs:
        wan.setdefault(a.version, a)
    # the IPv4 address's device first: LAN flows are NATed out of it
    devices = sorted(on_device, key=lambda d: wan.get(4) not in on_device[d])
    lan_nets: list[IPNetwork] = []
    lan_problems = []
    if lan_name.problem:
        lan_problems.append(f"{lan_name.problem} (no LAN exclusion)")
    else:
        _, lan_nets, lan_reason = src.addresses(lan_name.device)
        if lan_reason:
            lan_problems.append(f"oe.global.lan_interface: {lan_reason} (no LAN exclusion)")
    for problem in (*problems, *lan_problems):  # once each, not at every look
        if problem not in platform.network_problems:
            log.warning("%s", problem)
    return dataclasses.replace(
        platform,
        wan=wan,
        wan_reason="" if wan else "; ".join(problems) or "no WAN address",
        lan=tuple(lan_nets),
        dns_upstream=upstream_addresses(config),
        wan_addresses=tuple(wan_addrs),
        wan_devices=tuple(devices),
        lan_device=lan_name.device,
        wan_names=wan_names,
        lan_names=(lan_name,),
        network_problems=(*problems, *lan_problems),
    )


def network_change(old: Platform, new: Platform) -> str:
    """What differs between two probes' addresses, for the log line; "" if nothing."""
    parts = []
    for label, a, b in (
        ("WAN", old.wan_addresses, new.wan_addresses),
        ("WAN devices", old.wan_devices, new.wan_devices),
        ("LAN device", (old.lan_device,), (new.lan_device,)),
        ("LAN", old.lan, new.lan),
        ("DNS upstream", old.dns_upstream, new.dns_upstream),
    ):
        if set(a) != set(b):
            before = ", ".join(map(str, a)) or "none"
            after = ", ".join(map(str, b)) or "none"
            parts.append(f"{label} {before} -> {after}")
    return "; ".join(parts)
