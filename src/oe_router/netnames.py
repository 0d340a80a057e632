"""OpenWrt network names (``wan``, ``wan6``, ``lan``) resolved to the Linux devices behind them.

Why: on OpenWrt an admin names networks, not devices. The LAN network's device is the
bridge ``br-lan``, a PPPoE WAN's is ``pppoe-wan``, an old switch's ``eth0.2``, and the
device changes when the WAN's protocol does. ``oe.global.wan_interface`` (a list, so that
``wan6`` fits) and ``lan_interface`` therefore name networks, resolved in this order:

1. netifd, when it runs (``ubus call network.interface dump``): the interface's
   ``l3_device``, the device that carries its addresses (``pppoe-wan`` once PPP is up);
2. ``/etc/config/network`` (read with the real ``uci`` where there is one): a PPP or
   tunnel protocol names its device after the network (``pppoe-wan``, ``6in4-wan6``),
   a legacy ``type bridge`` gives ``br-<name>``, else ``device`` (or legacy ``ifname``),
   with ``@other`` following the alias;
3. a Linux device of that name (hosts without netifd, and configs that name devices).

``resolve`` is pure: it takes what the three sources said (the IO is in ``netifd_dump``,
``uci_network`` and ``link_names``), so tests feed it any router's view.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from oe_router.config.uci import UciPackage, UciSyntaxError, parse
from oe_router.records import record

__all__ = [
    "NETWORK_CONFIG",
    "Resolved",
    "link_names",
    "netifd_dump",
    "resolve",
    "uci_network",
]

NETWORK_CONFIG = Path("/etc/config/network")

#: protocols whose netifd handler names the device after the network: ``<prefix>-<name>``
#: (netifd's ppp.sh, 6in4.sh, 6to4.sh, 6rd.sh, dslite.sh, gre.sh)
PROTO_DEVICE_PREFIX: Mapping[str, str] = {
    "ppp": "ppp",
    "pppoe": "pppoe",
    "pppoa": "pppoa",
    "pptp": "pptp",
    "l2tp": "l2tp",
    "3g": "3g",
    "6in4": "6in4",
    "6to4": "6to4",
    "6rd": "6rd",
    "dslite": "ds",
    "gre": "gre4",
    "gretap": "gre4t",
}


@record(frozen=True)
class Resolved:
    """One configured name and the device it stands for (``device`` "" when none)."""

    name: str
    device: str = ""
    #: where the answer came from: "netifd", "/etc/config/network" or "device"
    via: str = ""
    #: why there is no device (empty when there is one)
    problem: str = ""

    def describe(self) -> str:
        """``wan (eth1, netifd)`` for status and log lines."""
        if not self.device:
            return f"{self.name} (none: {self.problem})"
        if self.device == self.name and self.via == "device":
            return f"{self.name} (device)"
        return f"{self.name} ({self.device}, {self.via})"


def which(command: str) -> str | None:
    """The executable ``command`` on PATH, as ``shutil.which`` finds it: shutil is not
    imported for this, as with the bz2 and lzma it imports it costs the daemon ~0.7 MB
    of RSS for its whole life (docs/footprint.md)."""
    for folder in os.get_exec_path():
        path = os.path.join(folder, command)
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


def _config_device(pkg: UciPackage, name: str, seen: frozenset[str] = frozenset()) -> str:
    """The device /etc/config/network gives network ``name``; "" when it gives none."""
    section = next((s for s in pkg.sections if s.type == "interface" and s.name == name), None)
    if section is None or name in seen:
        return ""
    proto = section.options.get("proto", "")
    if proto in PROTO_DEVICE_PREFIX:
        return f"{PROTO_DEVICE_PREFIX[proto]}-{name}"
    if proto == "wireguard":
        return name
    if section.options.get("type") == "bridge":  # before OpenWrt 21.02
        return f"br-{name}"
    device = section.options.get("device") or " ".join(
        section.lists.get("device", []) or [section.options.get("ifname", "")]
    )
    device = (device.split() or [""])[0]
    if device.startswith("@"):
        return _config_device(pkg, device[1:], seen | {name})
    return device


def resolve(
    names: Iterable[str],
    option: str,
    dump: Mapping[str, Mapping[str, Any]] | None,
    network: UciPackage | None,
    links: Iterable[str],
) -> tuple[Resolved, ...]:
    """Each of ``names`` resolved through netifd's ``dump`` (None: netifd does not run),
    the parsed /etc/config/network (None: none) and the kernel's ``links``.

    ``option`` (``oe.global.wan_interface``) names the culprit in a problem."""
    links = set(links)
    configured = (
        [s.name for s in network.sections if s.type == "interface" and s.name]
        if (network is not None)
        else []
    )
    out: list[Resolved] = []
    for name in names:
        if dump is not None and name in dump:
            status = dump[name]
            device = str(status.get("l3_device") or "")
            if device:
                out.append(Resolved(name, device, "netifd"))
            else:
                state = "up" if status.get("up") else "down"
                out.append(Resolved(name, problem=f"{option}: network {name!r} is {state}"
                                    " with no device yet (netifd)"))  # fmt: skip
            continue
        if network is not None and name in configured:
            device = _config_device(network, name)
            if device:
                out.append(Resolved(name, device, str(NETWORK_CONFIG)))
            else:
                out.append(Resolved(name, problem=f"{option}: network {name!r} in "
                                    f"{NETWORK_CONFIG} names no device"))  # fmt: skip
            continue
        if name in links:
            out.append(Resolved(name, name, "device"))
            continue
        known = sorted(set(dump or ()) | set(configured))
        where = f"networks: {', '.join(known)}" if known else "no networks known here"
        out.append(
            Resolved(name, problem=f"{option}: no network or device named {name!r} ({where})")
        )
    return tuple(out)


def netifd_dump(timeout: float = 3.0) -> dict[str, dict[str, Any]] | None:
    """netifd's interfaces by name (``ubus call network.interface dump``); None without
    ubus or netifd (a host, or a router before S20network)."""
    ubus = which("ubus")
    if ubus is None:
        return None
    try:
        res = subprocess.run(
            [ubus, "-t", str(max(1, int(timeout))), "call", "network.interface", "dump"],
            capture_output=True,
            text=True,
            timeout=timeout + 1,
            check=False,
        )
        if res.returncode != 0:
            return None
        doc = json.loads(res.stdout)
    except (OSError, subprocess.TimeoutExpired, ValueError):
        return None
    items = doc.get("interface") if isinstance(doc, dict) else None
    if not isinstance(items, list):
        return None
    return {str(i["interface"]): i for i in items if isinstance(i, dict) and "interface" in i}


def uci_network(path: Path = NETWORK_CONFIG) -> UciPackage | None:
    """/etc/config/network, as ``uci export`` gives it where uci is (it merges what other
    tools staged), else read from the file; None when there is none or it does not parse."""
    text = None
    uci = which("uci")
    if uci is not None and path == NETWORK_CONFIG:
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            res = subprocess.run(
                [uci, "-q", "export", "network"],
                capture_output=True,
                text=True,
                timeout=5,
                check=False,
            )
            if res.returncode == 0:
                text = res.stdout
    if text is None:
        try:
            text = path.read_text()
        except OSError:
            return None
    try:
        return parse(text, str(path))
    except UciSyntaxError:
        return None


def link_names(sysfs: Path = Path("/sys/class/net")) -> list[str]:
    """The kernel's network devices (this network namespace's)."""
    try:
        return os.listdir(sysfs)
    except OSError:
        return []
