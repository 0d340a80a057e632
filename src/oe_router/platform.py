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
import shutil
import socket
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from oe_router.config.schema import OeConfig
from oe_router.datapath.base import IPAddress, IPNetwork

__all__ = [
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


@dataclass(frozen=True)
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
    #: every global address of the WAN interface (``wan`` keeps one per version)
    wan_addresses: tuple[IPAddress, ...] = ()


def read_interface(ifname: str) -> tuple[list[IPAddress], list[IPNetwork], str]:
    """Global addresses and their prefixes on ``ifname`` (pyroute2); ``reason`` if none."""
    try:
        from pyroute2 import IPRoute
    except ImportError:  # pragma: no cover - a runtime dependency
        return [], [], "pyroute2 is not installed"
    addrs: list[IPAddress] = []
    nets: list[IPNetwork] = []
    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=ifname)
        if not idx:
            return [], [], f"no interface named {ifname!r}"
        for msg in ipr.get_addr(index=idx[0]):
            text = msg.get_attr("IFA_ADDRESS")
            if text is None or msg["scope"] != 0:  # global scope only (no link-local)
                continue
            iface = ipaddress.ip_interface(f"{text}/{msg['prefixlen']}")
            addrs.append(iface.ip)
            nets.append(iface.network)
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
    if shutil.which("nft") is None:
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


def probe_network(config: OeConfig, platform: Platform) -> Platform:
    """``platform`` with the addresses as they are now: WAN, LAN prefixes, DNS upstreams.

    Why apart from the datapath probe: addresses change under a running daemon (a new
    DHCP lease, a PPPoE reconnect, netifd bringing WAN up after the daemon started), the
    kernel's ESP does not. A reload looks again at these and only these.
    """
    wan_addrs, _, wan_reason = read_interface(config.wan_interface)
    wan: dict[int, IPAddress] = {}
    for a in wan_addrs:
        wan.setdefault(a.version, a)
    if wan_reason:
        wan_reason = f"oe.global.wan_interface: {wan_reason}"
    _, lan_nets, lan_reason = read_interface(config.lan_interface)
    if lan_reason:
        log.warning("oe.global.lan_interface: %s (no LAN exclusion)", lan_reason)
    return dataclasses.replace(
        platform,
        wan=wan,
        wan_reason=wan_reason,
        lan=tuple(lan_nets),
        dns_upstream=upstream_addresses(config),
        wan_addresses=tuple(wan_addrs),
    )


def network_change(old: Platform, new: Platform) -> str:
    """What differs between two probes' addresses, for the log line; "" if nothing."""
    parts = []
    for label, a, b in (
        ("WAN", old.wan_addresses, new.wan_addresses),
        ("LAN", old.lan, new.lan),
        ("DNS upstream", old.dns_upstream, new.dns_upstream),
    ):
        if set(a) != set(b):
            before = ", ".join(map(str, a)) or "none"
            after = ", ".join(map(str, b)) or "none"
            parts.append(f"{label} {before} -> {after}")
    return "; ".join(parts)
