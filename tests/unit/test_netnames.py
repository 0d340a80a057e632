"""OpenWrt network names to Linux devices (``netnames.resolve``) and the platform's use of
them (``platform.probe_network``), fed with what netifd, /etc/config/network and the
kernel say on a few real router layouts."""

from __future__ import annotations

import ipaddress
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from oe_router.config.schema import OeConfig
from oe_router.config.uci import parse
from oe_router.netnames import resolve, which
from oe_router.platform import NetworkSources, Platform, network_change, probe_network

#: OpenWrt 23.05's default x86 layout, plus the kinds of WAN a home router has
NETWORK = parse(
    """
config interface 'loopback'
	option device 'lo'
	option proto 'static'

config device
	option name 'br-lan'
	option type 'bridge'
	list ports 'eth0'

config interface 'lan'
	option device 'br-lan'
	option proto 'static'
	option ipaddr '192.168.1.1'

config interface 'wan'
	option device 'eth1'
	option proto 'dhcp'

config interface 'wan6'
	option device '@wan'
	option proto 'dhcpv6'

config interface 'dsl'
	option device 'eth0.2'
	option proto 'pppoe'

config interface 'old'
	option type 'bridge'
	option ifname 'eth2 eth3'

config interface 'sw'
	option ifname 'eth0.2'
	option proto 'static'

config interface 'hurricane'
	option proto '6in4'

config interface 'nodev'
	option proto 'static'
""",
    "/etc/config/network",
)
LINKS = ["lo", "eth0", "eth1", "br-lan", "wan0"]


def _one(name: str, dump: dict[str, Any] | None = None, network: Any = NETWORK) -> Any:
    (r,) = resolve((name,), "oe.global.wan_interface", dump, network, LINKS)
    return r


@pytest.mark.parametrize(
    ("name", "device"),
    [
        ("lan", "br-lan"),  # a bridge device section
        ("wan", "eth1"),
        ("wan6", "eth1"),  # @wan: the alias follows wan
        ("dsl", "pppoe-dsl"),  # PPPoE names its device after the network
        ("old", "br-old"),  # before 21.02: type bridge
        ("sw", "eth0.2"),  # before 21.02: ifname
        ("hurricane", "6in4-hurricane"),
    ],
)
def test_config_network_gives_the_device(name: str, device: str) -> None:
    r = _one(name)
    assert (r.device, r.via, r.problem) == (device, "/etc/config/network", "")


def test_netifd_wins_over_the_file_and_a_down_network_says_so() -> None:
    dump = {
        "wan": {"interface": "wan", "up": True, "l3_device": "pppoe-wan", "device": "eth1"},
        "wan6": {"interface": "wan6", "up": False},
    }
    assert (_one("wan", dump).device, _one("wan", dump).via) == ("pppoe-wan", "netifd")
    down = _one("wan6", dump)
    assert down.device == "" and down.problem == (
        "oe.global.wan_interface: network 'wan6' is down with no device yet (netifd)"
    )
    # a network netifd does not know falls back to the file
    assert _one("lan", dump).via == "/etc/config/network"


def test_a_device_name_is_the_last_fallback_and_an_unknown_name_is_named() -> None:
    assert (_one("wan0").device, _one("wan0").via) == ("wan0", "device")
    assert _one("wan0", network=None).describe() == "wan0 (device)"
    r = _one("wan7")
    assert r.device == "" and r.problem.startswith(
        "oe.global.wan_interface: no network or device named 'wan7' (networks: dsl, hurricane,"
    )
    assert _one("nodev").problem == (
        "oe.global.wan_interface: network 'nodev' in /etc/config/network names no device"
    )
    assert "no networks known here" in _one("wan7", network=None).problem


def _sources(addresses: dict[str, list[str]], dump: dict[str, Any] | None = None) -> NetworkSources:
    def addrs(dev: str) -> tuple[list[Any], list[Any], str]:
        if dev not in addresses:
            return [], [], f"no interface named {dev!r}"
        ifaces = [ipaddress.ip_interface(a) for a in addresses[dev]]
        if not ifaces:
            return [], [], f"interface {dev!r} has no global address"
        return [i.ip for i in ifaces], [i.network for i in ifaces], ""

    return NetworkSources(
        dump=lambda: dump, network=lambda: NETWORK, links=lambda: LINKS, addresses=addrs
    )


def test_the_platform_uses_the_resolved_devices_and_their_addresses() -> None:
    src = _sources({"eth1": ["203.0.113.2/24", "2001:db8:1::2/64"],
                    "br-lan": ["192.168.1.1/24", "fd00:1::1/64"]})  # fmt: skip
    plat = probe_network(OeConfig(), Platform(), src)
    assert plat.wan_devices == ("eth1",) and plat.lan_device == "br-lan"
    assert [str(a) for a in plat.wan_addresses] == ["203.0.113.2", "2001:db8:1::2"]
    assert [str(n) for n in plat.lan] == ["192.168.1.0/24", "fd00:1::/64"]
    assert plat.wan_reason == ""
    net = plat.network_status()
    assert net["wan"] == {
        "networks": ["wan (eth1, /etc/config/network)", "wan6 (eth1, /etc/config/network)"],
        "devices": ["eth1"],
        "addresses": ["203.0.113.2", "2001:db8:1::2"],
        "problem": "",
    }


def test_wan6_on_a_device_of_its_own_and_the_ipv4_device_first() -> None:
    dump = {
        "wan": {"interface": "wan", "up": True, "l3_device": "pppoe-wan"},
        "wan6": {"interface": "wan6", "up": True, "l3_device": "6in4-wan6"},
    }
    src = _sources({"pppoe-wan": ["198.51.100.7/32"], "6in4-wan6": ["2001:db8:9::2/64"],
                    "br-lan": ["192.168.1.1/24"]}, dump)  # fmt: skip
    cfg = OeConfig(wan_interface=("wan6", "wan"))
    plat = probe_network(cfg, Platform(), src)
    assert plat.wan_devices == ("pppoe-wan", "6in4-wan6")  # the IPv4 one is NATed out of
    assert {a.version: str(a) for a in plat.wan.values()} == {
        6: "2001:db8:9::2",
        4: "198.51.100.7",
    }


def test_no_wan_says_why_and_logs_each_problem_once(caplog: pytest.LogCaptureFixture) -> None:
    cfg = OeConfig(wan_interface=("wan7",))
    src = _sources({"br-lan": ["192.168.1.1/24"]})
    with caplog.at_level(logging.WARNING):
        first = probe_network(cfg, Platform(), src)
        again = probe_network(cfg, first, src)
    assert first.wan == {} and first.wan_reason.startswith(
        "oe.global.wan_interface: no network or device named 'wan7'"
    )
    assert again.wan_reason == first.wan_reason
    assert sum("'wan7'" in r.getMessage() for r in caplog.records) == 1


def test_a_new_device_for_the_same_address_is_a_change() -> None:
    a = probe_network(OeConfig(), Platform(), _sources({"eth1": ["203.0.113.2/24"]}))
    dump = {"wan": {"interface": "wan", "up": True, "l3_device": "pppoe-wan"}}
    b = probe_network(OeConfig(), a, _sources({"pppoe-wan": ["203.0.113.2/32"]}, dump))
    assert "WAN devices eth1 -> pppoe-wan" in network_change(a, b)


def test_which_finds_what_shutil_finds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The daemon's PATH lookup (ubus, uci, nft) answers as ``shutil.which`` does: the
    first executable file on PATH; not a directory, not a file without the x bit."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "tool").write_text("")  # not executable: skipped
    (tmp_path / "a" / "dir").mkdir()  # a directory: skipped
    for name in ("tool", "dir"):
        (tmp_path / "b" / name).write_text("#!/bin/sh\n")
        os.chmod(tmp_path / "b" / name, 0o755)
    monkeypatch.setenv("PATH", f"{tmp_path / 'a'}{os.pathsep}{tmp_path / 'b'}")
    for name in ("tool", "dir", "missing"):
        assert which(name) == shutil.which(name)
    assert which("tool") == str(tmp_path / "b" / "tool")
    assert which("missing") is None
