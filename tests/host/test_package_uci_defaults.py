"""The package's first-install changes to other packages' config, and their undo, on the
real uci (and fw4) built from source by qemu/userland.py (issue 12, "uci-defaults").

The shipped scripts run unmodified, taken from `make package`'s .ipk: its
/etc/uci-defaults/90_oe-firewall and 91_oe-dns, run as OpenWrt's uci_apply_defaults runs
them, and its prerm (what default_prerm sources at `opkg remove`). They run with a
temporary folder as /etc (tests/host/router_etc.py: a private mount namespace), holding
firewall4's default /etc/config/firewall (lan/wan zones), OpenWrt's default
/etc/config/dhcp (a dnsmasq section) and the shipped /etc/config/oe.

What must hold: the wan zone's input accepts IKE (UDP 500, 4500) and ESP because of the
package's two rules, and nothing more; dnsmasq's config is left as it was (the daemon
redirects dnsmasq's queries itself while its front runs); a router set up by an older
package (dnsmasq pointed at the front, its changes recorded in /etc/oe/dnsmasq.undo) gets
them undone at the upgrade, or by the prerm at removal, leaving what was there before
that package and what the user changed since; a second run changes nothing; the prerm
gives both files back exactly as they were (`uci export`).
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


def test_first_boot_opens_ike_and_esp_on_wan_and_leaves_dnsmasq_alone(
    router: RouterEtc,
) -> None:
    firewall, dhcp = show(router, "firewall"), router.export("dhcp")
    router.apply_defaults()
    assert router.pending_defaults() == []  # both succeeded, so both were deleted
    assert show(router, "firewall") - firewall == FIREWALL_ADDED
    assert firewall <= show(router, "firewall")
    assert router.uci("get", "firewall.@zone[1].name") == "wan\n"
    # dnsmasq keeps its own upstreams: the daemon redirects its queries while the front runs
    assert router.export("dhcp") == dhcp
    assert record(router) is None


def test_running_the_scripts_again_changes_nothing(router: RouterEtc, shipped: Shipped) -> None:
    router.apply_defaults()
    files = [router.etc / "config" / name for name in ("firewall", "dhcp", "oe")]
    first = [(f.read_bytes(), f.stat().st_mtime_ns) for f in files]
    install_scripts(router, shipped)  # an upgrade's postinst runs them again
    router.apply_defaults()
    assert router.pending_defaults() == []
    # not rewritten at all: same bytes, same modification time
    assert [(f.read_bytes(), f.stat().st_mtime_ns) for f in files] == first


# An older python3-oe pointed dnsmasq at the front and recorded what it changed. Each case:
# `uci batch` commands that make the router's dhcp config before that package, what that
# package then changed, and its record. In a batch '#' starts a comment: quote it.
DNSMASQ = "dhcp.@dnsmasq[0]"
OTHER = "/example.org/192.0.2.53"
OLD_PACKAGE = {
    "openwrt-default": (
        [],
        [f"add_list {DNSMASQ}.server='{FRONT}'", f"set {DNSMASQ}.noresolv=1"],
        f"server={FRONT}\nnoresolv_was=\n",
    ),
    "noresolv-off-and-another-server": (
        [f"add_list {DNSMASQ}.server='{OTHER}'", f"set {DNSMASQ}.noresolv=0"],
        [f"add_list {DNSMASQ}.server='{FRONT}'", f"set {DNSMASQ}.noresolv=1"],
        f"server={FRONT}\nnoresolv_was=0\n",
    ),
    "front-and-noresolv-already-there": (
        [f"add_list {DNSMASQ}.server='{FRONT}'", f"set {DNSMASQ}.noresolv=1"],
        [],
        None,
    ),
}


def old_package(router: RouterEtc, case: str) -> str:
    """The router as the older package left it; returns `uci export dhcp` from before it."""
    before, changes, recorded = OLD_PACKAGE[case]
    if before:
        router.sh('printf "%s\\n" "$@" commit | uci batch', *before)
    dhcp = router.export("dhcp")
    if changes:
        router.sh('printf "%s\\n" "$@" commit | uci batch', *changes)
    if recorded is not None:
        (router.etc / "oe").mkdir(exist_ok=True)
        (router.etc / RECORD).write_text(recorded)
    return dhcp


@pytest.mark.parametrize("case", OLD_PACKAGE)
def test_an_upgrade_undoes_what_the_old_package_did_to_dnsmasq(
    router: RouterEtc, shipped: Shipped, case: str
) -> None:
    dhcp = old_package(router, case)
    done = router.apply_defaults()
    assert router.pending_defaults() == []
    assert router.export("dhcp") == dhcp  # as before the old package
    assert record(router) is None
    migrated = OLD_PACKAGE[case][2] is not None
    assert ("dnsmasq asks its own upstreams again" in done.stderr) == migrated, done.stderr
    prerm(router, shipped)  # nothing left to undo
    assert router.export("dhcp") == dhcp


@pytest.mark.parametrize("case", OLD_PACKAGE)
def test_removal_undoes_an_old_record_the_upgrade_never_saw(
    router: RouterEtc, shipped: Shipped, case: str
) -> None:
    dhcp = old_package(router, case)
    before = router.export("firewall")
    prerm(router, shipped)
    assert router.export("dhcp") == dhcp
    assert router.export("firewall") == before
    assert not (router.etc / "oe").exists()  # the record went, and its empty folder


def test_the_migration_leaves_what_the_user_changed_since(router: RouterEtc) -> None:
    old_package(router, "openwrt-default")
    router.sh("uci set dhcp.@dnsmasq[0].noresolv=0 && uci commit dhcp")
    router.apply_defaults()
    assert router.uci("get", "dhcp.@dnsmasq[0].noresolv") == "0\n"  # the user's, kept
    assert FRONT not in router.uci("show", "dhcp")  # the old package's server, gone


def test_a_running_dnsmasq_is_restarted_only_after_a_migration(
    router: RouterEtc, shipped: Shipped
) -> None:
    """Installed on a live router, dnsmasq must read the change: the migration restarts it
    when its init script says it runs; a fresh install and a re-run leave it alone.
    /etc/init.d/dnsmasq here is a stand-in that says it runs and records each command it
    is given (dnsmasq is not among the built userland)."""
    init = router.etc / "init.d" / "dnsmasq"
    init.parent.mkdir()
    init.write_text('#!/bin/sh\necho "$1" >>/etc/dnsmasq-calls\n')
    init.chmod(0o755)
    calls = router.etc / "dnsmasq-calls"
    router.apply_defaults()  # a fresh install: nothing of dnsmasq's changes
    assert not calls.exists()
    old_package(router, "openwrt-default")
    install_scripts(router, shipped)
    router.apply_defaults()
    assert calls.read_text().split() == ["running", "restart"]
    install_scripts(router, shipped)
    router.apply_defaults()
    prerm(router, shipped)
    assert calls.read_text().split() == ["running", "restart"]


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
