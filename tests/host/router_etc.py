"""A router's /etc in a folder, for running OpenWrt's shell scripts unmodified on this host.

uci-defaults and maintainer scripts name absolute paths: uci works on /etc/config and
saves deltas in /tmp/.uci, the package keeps its state in /etc/oe, fw4 reads
/usr/share/firewall4. So each script runs in a private mount namespace (``unshare -m``)
where the folder is bind-mounted over /etc and a fresh tmpfs over /tmp (no uci delta of
this host's leaks in, none of the script's out), with the userland's tools (the real uci,
fw4, ucode, built by qemu/userland.py) first on PATH. With ``usr=True`` the userland's
/usr is laid over the host's (a read-only overlay), where fw4 finds its templates and
ucode its modules; with ``net=True`` the script also gets a network namespace of its own
(``nft -c`` checks a ruleset against a kernel that holds none of the host's tables).

The host's /etc and /tmp are never touched: everything a script writes lands in the
folder, or in the tmpfs that goes with the namespace.
"""

from __future__ import annotations

import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: Run inside the new namespace: mounts, then the script. $1: the userland root, $2: the
#: folder for /etc, $3 (0/1): lay the userland's /usr over the host's; the rest is
#: `sh -c SCRIPT NAME ARGS...`. The bind comes before the tmpfs, which hides the folder
#: if it lives under /tmp.
_NAMESPACE = """set -e
mount --make-rprivate /
[ "$3" = 0 ] || mount -t overlay overlay -o "lowerdir=$1/usr:/usr" /usr
mount --bind "$2" /etc
mount -t tmpfs tmpfs /tmp
shift 3
exec sh -c "$@"
"""

#: OpenWrt's uci_apply_defaults (base-files, run by /etc/init.d/boot at the first boot and
#: by default_postinst at an install): each script in /etc/uci-defaults sourced in a
#: subshell from that folder, in name order, deleted when it succeeded; then `uci commit`.
UCI_APPLY_DEFAULTS = """cd /etc/uci-defaults || exit 0
mkdir -p /tmp/.uci
for file in $(ls); do
	( . "./$file" ) && rm -f "$file"
done
uci commit
"""


@dataclass(frozen=True)
class RouterEtc:
    """The folder that is /etc for the scripts, and the userland whose tools they use."""

    etc: Path
    userland: Any  # qemu/userland.py's UserlandBuild

    def sh(
        self,
        script: str,
        *args: str,
        usr: bool = False,
        net: bool = False,
        env: Mapping[str, str] | None = None,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        """``sh -c script`` with the folder as /etc (see the module's docstring)."""
        unshare = ["unshare", "-m", *(["-n"] if net else [])]
        argv = [
            *unshare,
            "sh",
            "-c",
            _NAMESPACE,
            "router-etc",
            str(self.userland.root),
            str(self.etc),
            "1" if usr else "0",
            script,
            "sh",
            *args,
        ]
        res = subprocess.run(
            argv,
            env={**self.userland.env(), **(env or {})},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if check and res.returncode != 0:
            raise AssertionError(
                f"script failed (exit {res.returncode}):\n{script}\n--\n{res.stdout}{res.stderr}"
            )
        return res

    def uci(self, *args: str) -> str:
        """The real uci on this /etc/config (no -c: as the scripts call it)."""
        return self.sh('exec uci "$@"', *args).stdout

    def export(self, *packages: str) -> dict[str, str]:
        """``uci export`` of each package: the model, whatever the file's spelling."""
        return {p: self.uci("export", p) for p in packages}

    def apply_defaults(self) -> subprocess.CompletedProcess[str]:
        """The first boot's (or an install's) run of /etc/uci-defaults."""
        return self.sh(UCI_APPLY_DEFAULTS)

    def pending_defaults(self) -> list[str]:
        folder = self.etc / "uci-defaults"
        return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


#: /etc/config/dhcp as a fresh OpenWrt router has it: dnsmasq's default config
#: (openwrt/openwrt package/network/services/dnsmasq/files/dhcp.conf), in its own
#: spelling (tabs, unquoted values, a comment after a value), abridged to the options a
#: resolver set-up touches. No server list and no noresolv: dnsmasq asks the WAN's
#: resolvers from resolvfile.
OPENWRT_DHCP = """config dnsmasq
	option domainneeded	1
	option boguspriv	1
	option localise_queries	1
	option rebind_protection 1  # disable if upstream must serve RFC1918 addresses
	option local	'/lan/'
	option domain	'lan'
	option expandhosts	1
	option cachesize	1000
	option authoritative	1
	option readethers	1
	option leasefile	'/tmp/dhcp.leases'
	option resolvfile	'/tmp/resolv.conf.d/resolv.conf.auto'
	option localservice	1
	option ednspacket_max	1232

config dhcp lan
	option interface	lan
	option start 	100
	option limit	150
	option leasetime	12h

config dhcp wan
	option interface	wan
	option ignore	1
"""
