"""The package's first-install changes to other packages' config, and their undo, on the
real uci (and fw4) built from source by qemu/userland.py (issue 12, "uci-defaults").

The shipped scripts run unmodified, taken from `make package`'s .ipk: its
/etc/uci-defaults/90_oe-firewall and 91_oe-dns, run as OpenWrt's uci_apply_defaults runs
them, and its prerm (what default_prerm sources at `opkg remove`). They run with a
temporary folder as /etc (tests/host/router_etc.py: a private mount namespace), holding
firewall4's default /etc/config/firewall (lan/wan zones), OpenWrt's default
/etc/config/dhcp (a dnsmasq section) and the shipped /etc/config/oe.

What must hold: the wan zone's input accepts IKE (UDP 500, 4500) and ESP because of the
package's two rules, and nothing more; dnsmasq forwards to the DNS front
(127.0.0.1#5335) and leaves the WAN's resolvers to it (noresolv); a second run changes
nothing; the prerm gives both files back exactly as they were (`uci export`), leaving
what was there before the package, and what the user changed since.
"""

from __future__ import annotations

import io
import re
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ipk
import pytest

from tests import wan_input

from .router_etc import OPENWRT_DHCP, RouterEtc

pytestmark = pytest.mark.host

REPO = Path(__file__).resolve().parents[2]
LAB_FIREWALL = REPO / "qemu" / "guest" / "router" / "etc" / "config" / "firewall"
SCRIPTS = ("90_oe-firewall", "91_oe-dns")
RECORD = Path("oe", "dnsmasq.undo")  # under /etc
FRONT = "127.0.0.1#5335"  # the shipped oe.dns.listen's first entry, as dnsmasq writes it

#: What 90_oe-firewall adds to firewall4's default config (`uci show firewall` lines).
FIREWALL_ADDED = {
    "firewall.@zone[1].device='oe-esp0'",
    "firewall.oe_ike=rule",
    "firewall.oe_ike.name='Allow-OE-IKE'",
    "firewall.oe_ike.src='wan'",
    "firewall.oe_ike.proto='udp'",
    "firewall.oe_ike.dest_port='500' '4500'",
    "firewall.oe_ike.family='any'",
    "firewall.oe_ike.target='ACCEPT'",
    "firewall.oe_esp=rule",
    "firewall.oe_esp.name='Allow-OE-ESP'",
    "firewall.oe_esp.src='wan'",
    "firewall.oe_esp.proto='esp'",
    "firewall.oe_esp.family='any'",
    "firewall.oe_esp.target='ACCEPT'",
}


@dataclass(frozen=True)
class Shipped:
    """What the .ipk carries for this: the scripts, the config, the prerm."""

    scripts: dict[str, bytes]
    oe_config: bytes
    prerm: str


@pytest.fixture(scope="module")
def shipped(oe_ipk: ipk.Ipk) -> Shipped:
    members = ipk.read_ipk(oe_ipk.path)
    files: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(members["data.tar.gz"]), mode="r:gz") as tar:
        for m in tar.getmembers():
            handle = tar.extractfile(m)
            if m.isfile() and handle is not None:
                files[m.name.removeprefix(".")] = handle.read()
    scripts = {name: files[f"/etc/uci-defaults/{name}"] for name in SCRIPTS}
    assert sorted(p for p in files if p.startswith("/etc/uci-defaults/")) == [
        f"/etc/uci-defaults/{name}" for name in SCRIPTS
    ]
    return Shipped(scripts, files["/etc/config/oe"], members["control/prerm-pkg"].decode())


def install_scripts(router: RouterEtc, shipped: Shipped) -> None:
    """What opkg unpacks into /etc/uci-defaults."""
    folder = router.etc / "uci-defaults"
    folder.mkdir(exist_ok=True)
    for name, data in shipped.scripts.items():
        (folder / name).write_bytes(data)
        (folder / name).chmod(0o755)


@pytest.fixture
def router(openwrt_userland: Any, tmp_path: Path, shipped: Shipped) -> RouterEtc:
    etc = tmp_path / "etc"
    (etc / "config").mkdir(parents=True)
    shutil.copy(openwrt_userland.root / "etc" / "config" / "firewall", etc / "config")
    (etc / "config" / "dhcp").write_text(OPENWRT_DHCP)
    (etc / "config" / "oe").write_bytes(shipped.oe_config)
    router = RouterEtc(etc, openwrt_userland)
    install_scripts(router, shipped)
    return router


def prerm(router: RouterEtc, shipped: Shipped) -> None:
    """`opkg remove` on the router: default_prerm sources the package's prerm."""
    router.sh(shipped.prerm)


def show(router: RouterEtc, package: str) -> set[str]:
    return set(router.uci("show", package).splitlines())


def record(router: RouterEtc) -> str | None:
    path = router.etc / RECORD
    return path.read_text() if path.exists() else None


def test_first_boot_opens_ike_and_esp_on_wan_and_puts_the_front_behind_dnsmasq(
    router: RouterEtc,
) -> None:
    firewall, dhcp = show(router, "firewall"), show(router, "dhcp")
    router.apply_defaults()
    assert router.pending_defaults() == []  # both succeeded, so both were deleted
    assert show(router, "firewall") - firewall == FIREWALL_ADDED
    assert firewall <= show(router, "firewall")
    assert router.uci("get", "firewall.@zone[1].name") == "wan\n"
    # the contract the first-boot lab relies on, in its own words
    assert router.uci("get", "dhcp.@dnsmasq[0].server") == f"{FRONT}\n"
    assert router.uci("get", "dhcp.@dnsmasq[0].noresolv") == "1\n"
    assert show(router, "dhcp") - dhcp == {
        f"dhcp.@dnsmasq[0].server='{FRONT}'",
        "dhcp.@dnsmasq[0].noresolv='1'",
    }
    assert dhcp <= show(router, "dhcp")
    # what the undo will take back: the server it added, and that noresolv was not set
    assert record(router) == f"server={FRONT}\nnoresolv_was=\n"


def test_running_the_scripts_again_changes_nothing(router: RouterEtc, shipped: Shipped) -> None:
    router.apply_defaults()
    files = [router.etc / "config" / name for name in ("firewall", "dhcp", "oe")]
    files.append(router.etc / RECORD)
    first = [(f.read_bytes(), f.stat().st_mtime_ns) for f in files]
    install_scripts(router, shipped)  # an upgrade's postinst runs them again
    router.apply_defaults()
    assert router.pending_defaults() == []
    # not rewritten at all: same bytes, same modification time
    assert [(f.read_bytes(), f.stat().st_mtime_ns) for f in files] == first


# (`uci batch` commands that make the router's dhcp config before the package, what
# 91_oe-dns adds to it, and its record). In a batch '#' starts a comment: quote it.
DNSMASQ = "dhcp.@dnsmasq[0]"
OTHER = "/example.org/192.0.2.53"
BEFORE_THE_PACKAGE = {
    "openwrt-default": (
        [],
        {f"{DNSMASQ}.server='{FRONT}'", f"{DNSMASQ}.noresolv='1'"},
        f"server={FRONT}\nnoresolv_was=\n",
    ),
    "front-and-noresolv-already-there": (
        [f"add_list {DNSMASQ}.server='{FRONT}'", f"set {DNSMASQ}.noresolv=1"],
        set(),
        None,
    ),
    "noresolv-off-and-another-server": (
        [f"add_list {DNSMASQ}.server='{OTHER}'", f"set {DNSMASQ}.noresolv=0"],
        {f"{DNSMASQ}.server='{OTHER}' '{FRONT}'", f"{DNSMASQ}.noresolv='1'"},
        f"server={FRONT}\nnoresolv_was=0\n",
    ),
}


@pytest.mark.parametrize("case", BEFORE_THE_PACKAGE)
def test_removal_gives_both_files_back_as_they_were(
    router: RouterEtc, shipped: Shipped, case: str
) -> None:
    commands, added, recorded = BEFORE_THE_PACKAGE[case]
    if commands:
        router.sh('printf "%s\\n" "$@" commit | uci batch', *commands)
    before = router.export("firewall", "dhcp")
    dhcp = show(router, "dhcp")
    router.apply_defaults()
    after = show(router, "dhcp")
    assert {line for line in after - dhcp if "server" in line or "noresolv" in line} == added
    assert record(router) == recorded
    prerm(router, shipped)
    assert router.export("firewall", "dhcp") == before
    # what was there before the package stays: the front's server, noresolv
    assert show(router, "dhcp") == dhcp
    assert not (router.etc / "oe").exists()  # the record went, and its empty folder


def test_removal_leaves_what_the_user_changed_since(router: RouterEtc, shipped: Shipped) -> None:
    router.apply_defaults()
    router.sh("uci set dhcp.@dnsmasq[0].noresolv=0 && uci commit dhcp")
    prerm(router, shipped)
    assert router.uci("get", "dhcp.@dnsmasq[0].noresolv") == "0\n"  # the user's, kept
    assert FRONT not in router.uci("show", "dhcp")  # the package's server, gone


def test_a_running_dnsmasq_is_restarted_after_each_change(
    router: RouterEtc, shipped: Shipped
) -> None:
    """Installed on a live router (not at the first boot), dnsmasq must read the change, and
    again after removal: both restart it when its init script says it runs, and only after
    a change. /etc/init.d/dnsmasq here is a stand-in that says it runs and records each
    command it is given (dnsmasq is not among the built userland)."""
    init = router.etc / "init.d" / "dnsmasq"
    init.parent.mkdir()
    init.write_text('#!/bin/sh\necho "$1" >>/etc/dnsmasq-calls\n')
    init.chmod(0o755)
    calls = router.etc / "dnsmasq-calls"
    router.apply_defaults()
    assert calls.read_text().split() == ["running", "restart"]
    install_scripts(router, shipped)
    router.apply_defaults()  # nothing to change: dnsmasq is left alone
    assert calls.read_text().split() == ["running", "restart"]
    prerm(router, shipped)
    assert calls.read_text().split() == ["running", "restart", "running", "restart"]


# (uci commands on oe before the first boot, the server dnsmasq gets or None, the message)
LISTEN = ["delete oe.dns.listen", "add_list oe.dns.listen"]
DNS_SETTINGS = {
    "mode-unset": (["delete oe.dns.mode"], FRONT, ""),
    "listen-unset": (["delete oe.dns.listen"], FRONT, ""),
    "other-loopback-port": (
        [LISTEN[0], f"{LISTEN[1]}=[::1]:53", f"{LISTEN[1]}=127.0.0.53:5300"],
        "127.0.0.53#5300",
        "",
    ),
    "manual": (["set oe.dns.mode=manual"], None, ""),
    "bad-mode": (["set oe.dns.mode=unbound"], None, "oe.dns.mode 'unbound' is neither"),
    "no-ipv4-loopback": (
        [LISTEN[0], f"{LISTEN[1]}=[::1]:5335", f"{LISTEN[1]}=0.0.0.0:53"],
        None,
        "oe.dns.listen has no IPv4 loopback address",
    ),
    "no-dnsmasq": ([f"delete {DNSMASQ}"], None, "no dnsmasq section in /etc/config/dhcp"),
}


@pytest.mark.parametrize("case", DNS_SETTINGS)
def test_dns_mode_and_listen_decide_what_dnsmasq_gets(
    router: RouterEtc, shipped: Shipped, case: str
) -> None:
    commands, server, message = DNS_SETTINGS[case]
    router.sh('printf "%s\\n" "$@" commit | uci batch', *commands)
    dhcp = router.export("dhcp")
    done = router.apply_defaults()
    assert router.pending_defaults() == []  # a skip is no failure: not run again
    assert (message in done.stderr) if message else "python3-oe" not in done.stderr, done.stderr
    if server is None:
        assert router.export("dhcp") == dhcp
        assert record(router) is None
    else:
        assert router.uci("get", "dhcp.@dnsmasq[0].server") == f"{server}\n"
        assert router.uci("get", "dhcp.@dnsmasq[0].noresolv") == "1\n"
    prerm(router, shipped)
    assert router.export("dhcp") == dhcp


# -- fw4 ------------------------------------------------------------------------------


def chain(ruleset: str, name: str) -> list[str]:
    """The rule lines of one chain of `fw4 print`'s table inet fw4."""
    m = re.search(rf"^\tchain {name} {{\n(.*?)^\t}}$", ruleset, re.M | re.S)
    assert m, f"no chain {name} in the ruleset"
    return [line.strip() for line in m.group(1).splitlines() if line.strip()]


def fw4_print(router: RouterEtc) -> str:
    """fw4's rendering of /etc/config/firewall (no ubus here: no netifd interfaces, which
    zones by device do not need), checked by nft against the kernel in a netns of its own."""
    fw4 = router.userland.tool("fw4")
    # fw4 is a bash script on OpenWrt's ash (set -o pipefail): bash here, as in the lab
    res = router.sh(
        f"bash {fw4} print >/tmp/ruleset && nft -c -f /tmp/ruleset && cat /tmp/ruleset",
        usr=True,
        net=True,
    )
    assert "table inet fw4 {" in res.stdout, res.stdout + res.stderr
    return res.stdout


def test_fw4_accepts_ike_and_esp_on_wan_input_only_through_the_package(
    router: RouterEtc, shipped: Shipped
) -> None:
    """The lab router's firewall (OpenWrt's default, zones by device: the WAN is eth1)
    rendered by the real fw4 before the first boot, after it and after removal."""
    shutil.copy(LAB_FIREWALL, router.etc / "config" / "firewall")
    for name in ("protocols", "services"):  # nft's names for protocols and ports
        shutil.copy(Path("/etc", name), router.etc / name)
    plain = fw4_print(router)
    router.apply_defaults()
    opened = fw4_print(router)

    before, after = chain(plain, "input_wan"), chain(opened, "input_wan")
    ike = 'udp dport { 500, 4500 } counter accept comment "!fw4: Allow-OE-IKE"'
    esp = 'meta l4proto esp counter accept comment "!fw4: Allow-OE-ESP"'
    assert [line for line in after if line not in before] == [ike, esp]
    assert [line for line in after if line not in (ike, esp)] == before
    assert after[-1] == "jump reject_from_wan"  # the rest of wan's input is rejected
    accepted = {re.sub(r'.*"!fw4: (.*)"$', r"\1", line) for line in after if " accept " in line}
    assert accepted == wan_input.ACCEPTED
    assert not re.search(r"\b(500|4500|esp)\b", "\n".join(before))
    assert 'iifname { "eth1", "oe-esp0" } jump input_wan' in "\n".join(chain(opened, "input"))
    assert chain(opened, "reject_from_wan") == [
        'iifname { "eth1", "oe-esp0" } counter jump handle_reject '
        'comment "!fw4: reject wan IPv4/IPv6 traffic"'
    ]

    prerm(router, shipped)
    assert fw4_print(router) == plain
