"""`opkg remove` and `opkg install` of python3-oe on the running router.

Why: the image installs the package offline (as an image builder does), where the
package's uci-defaults wait for the first boot and nothing is running. An admin removes
and installs it on a live router: then base-files' default_prerm/default_postinst run the
package's own scripts at once, and what they change (fw4's live rules) must take effect
and be undone then, not at the next reboot. The host tier checks the same scripts against
an offline root; this is the live half. The removal is also the fourth way the daemon goes
away for "LAN DNS keeps answering" (issue 13; the others are tests/qemu/
test_dns_resilience.py): with the daemon running and its DNS capture on, `opkg remove`
leaves the LAN client's next query answered by dnsmasq's own upstream; and the upgrade from
an older package that had pointed dnsmasq at the front undoes that (91_oe-dns).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import ipk  # package/ipk.py (on sys.path since conftest imported qemu/build.py)
import pytest

import build
import oelab
from lab import Lab

pytestmark = pytest.mark.qemu

IPK = "/lab/ipk/" + "python3-oe_{version}-r1_all.ipk"
#: the image's luci-app-oe depends on python3-oe: opkg refuses to remove python3-oe under
#: it, so it goes first and comes back last
LUCI_IPK = "/lab/ipk/" + "luci-app-oe_{version}_all.ipk"
FRONT = oelab.DNS_FRONT
#: what an older python3-oe did to dnsmasq at install, and its record of it
OLD_PACKAGE = (
    f"uci add_list dhcp.@dnsmasq[0].server='{FRONT}'; uci set dhcp.@dnsmasq[0].noresolv=1; "
    f"uci commit dhcp; mkdir -p /etc/oe; printf 'server={FRONT}\\nnoresolv_was=\\n' "
    ">/etc/oe/dnsmasq.undo"
)


def _bogus(lab: Lab) -> tuple[str, list[str]]:
    """www.bogus.test from the LAN client, one try: (rcode, addresses). The front says
    SERVFAIL (bad signature); the lab resolver, asked without the front, its address."""
    answer = oelab.lan_query(lab, "www.bogus.test")
    return answer.status, answer.addresses


@dataclass(frozen=True)
class State:
    """What the package changes, as read from the router."""

    installed: str
    ike_rule: bool
    esp_rule: bool
    server: list[str]
    noresolv: str
    rcd: list[str]
    files: list[str]
    running: bool


def _state(lab: Lab) -> State:
    """What the package changes, read from the router."""
    out = lab.router(
        "opkg list-installed python3-oe; echo ==; "
        "nft list chain inet fw4 input_wan; echo ==; "
        "uci -q get dhcp.@dnsmasq[0].server; echo ==; uci -q get dhcp.@dnsmasq[0].noresolv; "
        "echo ==; ls /etc/rc.d; echo ==; "
        "ls /usr/bin/oe-routerd /usr/lib/python3.11/site-packages/oe_router/daemon.py "
        "/etc/oe/dnsmasq.undo /etc/config/oe 2>/dev/null; echo ==; pgrep -x oe-routerd"
    ).stdout
    installed, chain, server, noresolv, rcd, files, pids = out.split("==\n")
    return State(
        installed=installed.strip(),
        ike_rule="Allow-OE-IKE" in chain,
        esp_rule="Allow-OE-ESP" in chain,
        server=server.split(),
        noresolv=noresolv.strip(),
        rcd=[n for n in rcd.split() if n.endswith("oe")],
        files=files.split(),
        running=bool(pids.strip()),
    )


def test_remove_then_install_on_the_running_router(lab: Lab) -> None:
    version = build.project_version()
    built = ipk.build(lab.run_dir / "ipk")  # reproducible: the bytes the image installed
    assert built.path.name == IPK.format(version=version).rsplit("/", 1)[1]
    luci = ipk.build_luci(lab.run_dir / "ipk")
    assert luci.path.name == LUCI_IPK.format(version=version).rsplit("/", 1)[1]
    before = _state(lab)
    assert before.ike_rule and before.esp_rule, before
    # dnsmasq's config is not the package's to change
    assert FRONT not in before.server and before.noresolv == "", before
    bogus = lab.plan.host("bogus").ipv4

    try:
        oelab.start_daemon(lab)  # under procd, its DNS capture on
        assert _bogus(lab) == ("SERVFAIL", []), "the front did not answer the LAN's query"
        refused = lab.router("opkg remove python3-oe", timeout=120)
        assert not refused.ok and "luci-app-oe" in refused.stdout + refused.stderr, refused
        assert lab.router("opkg remove luci-app-oe", timeout=120).ok
        removed = lab.router("opkg remove python3-oe", timeout=120)
        assert removed.ok, removed.stdout + removed.stderr
        # at once: LAN DNS answers from dnsmasq's own upstream, first try
        assert _bogus(lab) == ("NOERROR", [bogus])
        assert lab.router(f"nft list table inet {oelab.CAPTURE_TABLE}").rc != 0
        # procd's stop (default_prerm) only signals: the daemon drops its capture first,
        # then its SAs and policies, and exits
        oelab.wait_until(
            "oe-routerd to exit after opkg remove",
            lambda: lab.router("pgrep -x oe-routerd").rc != 0 or None,
            timeout=30,
        )
        gone = _state(lab)
        assert gone.installed == "", gone
        # fw4 reloaded by the prerm: the live table no longer accepts IKE/ESP on wan
        assert not gone.ike_rule and not gone.esp_rule, gone
        assert FRONT not in gone.server and gone.noresolv == "", gone
        # the program and its modules are gone; what stays is the config the admin changed
        # (the lab wrote its own /etc/config/oe: a modified conffile opkg keeps)
        assert set(gone.files) <= {"/etc/config/oe"}, gone
        assert not gone.running, gone

        # as if the router had had the older package: dnsmasq pointed at the front
        lab.router(OLD_PACKAGE).check()
        installed = lab.router(f"opkg install {IPK.format(version=version)}", timeout=300)
        assert installed.ok, installed.stdout + installed.stderr
        back = _state(lab)
        assert back.installed == f"python3-oe - {version}-r1", back
        assert back.ike_rule and back.esp_rule, back  # fw4 reloaded by 90_oe-firewall
        # 91_oe-dns undid what the older package had done, and dropped its record
        assert FRONT not in back.server and back.noresolv == "", back
        assert "/etc/oe/dnsmasq.undo" not in back.files, back
        # default_postinst enabled and started the service, under procd
        assert back.rcd == ["K10oe", "S90oe"], back
        svc = json.loads(lab.router('ubus call service list \'{"name": "oe"}\'').check().stdout)
        assert svc["oe"]["instances"]["oe-routerd"]["running"], svc
        # and its capture takes dnsmasq's forwards to the front again
        oelab.wait_until(
            "the reinstalled daemon's DNS capture",
            lambda: lab.router(f"nft list table inet {oelab.CAPTURE_TABLE}").ok or None,
            timeout=90,
        )
        assert _bogus(lab) == ("SERVFAIL", [])
    finally:
        # the session lab starts the daemon itself: stopped, and no boot links, as built
        lab.router(
            f"opkg list-installed python3-oe | grep -q . || opkg install "
            f"{IPK.format(version=version)}; "
            f"opkg list-installed luci-app-oe | grep -q . || opkg install "
            f"{LUCI_IPK.format(version=version)}; /etc/init.d/oe stop; /etc/init.d/oe disable; "
            "ip xfrm state flush; ip xfrm policy flush; "
            "for t in oe_spd oe_router oe_cat; do nft delete table inet $t 2>/dev/null; done; "
            "rm -f /run/oe-routerd.pid",
            timeout=300,
        )
        oelab.restart_dnsmasq(lab)  # start_daemon's cache-less dnsmasq: the session's again
