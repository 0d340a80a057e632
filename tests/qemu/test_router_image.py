"""The router image: OpenWrt's userland (procd as PID 1) on Debian's kernel and libc, the
pinned runtime, virtio-crypto.

Why: the product ships as an OpenWrt package; these checks hold the image to the paths and
versions that package installs, to OpenWrt's boot (procd, ubusd, logd, rpcd), and say
plainly (banner) what the image is.
"""

from __future__ import annotations

import json
import shlex
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import build
from lab import ROUTER_LAN_DEV, ROUTER_WAN_DEV, Lab
from tests import wan_input

pytestmark = pytest.mark.qemu

REPO = Path(__file__).resolve().parents[2]


def test_image_has_openwrt_layout_and_says_what_it_is(lab: Lab) -> None:
    res = lab.router(
        "cat /etc/banner; test -f /etc/config/oe && test -x /etc/init.d/oe && echo layout-ok; "
        "python3 -c 'import oe_router, sys; print(oe_router.__file__)'"
    ).check()
    assert (
        "OpenWrt's userland built from source on Debian's kernel and libc (glibc, not musl)"
        in res.stdout
    )
    assert "layout-ok" in res.stdout
    assert "/usr/lib/python3.11/site-packages/oe_router/__init__.py" in res.stdout


def test_procd_is_pid_1_and_runs_openwrts_services(lab: Lab) -> None:
    """procd's /sbin/init handed over to procd, which started ubusd and ran /etc/rc.d/S*."""
    res = lab.router(
        "cat /proc/1/comm; readlink /proc/1/exe; readlink /bin/sh; "
        "for p in ubusd logd rpcd; do echo $p=$(pgrep -x $p); done; ubus list"
    ).check()
    lines = res.stdout.splitlines()
    assert lines[0] == "procd" and lines[1].endswith("/sbin/procd"), lines
    assert lines[2] == "busybox", lines  # ash, as on OpenWrt (build._openwrt_overlay)
    pids = dict(line.split("=", 1) for line in lines[3:6])
    assert all(p.strip().isdigit() for p in pids.values()), pids
    objects = set(lines[6:])
    assert {"service", "log", "session", "uci"} <= objects, objects
    # logd owns /dev/log: a line sent to syslog comes back from its ring buffer
    logged = lab.router("logger -t oe-lab-check marker-$$ && sleep 0.5 && logread").check()
    assert "oe-lab-check" in logged.stdout, logged.stdout[-2000:]


def test_netifd_runs_under_procd_and_set_up_wan_and_lan(lab: Lab) -> None:
    """netifd is procd's instance of the network service (S20network, respawned if it
    dies) and set up wan and lan from /etc/config/network: its ubus status has them up
    with the lab plan's addresses and gateways, the kernel's addresses are those, usable at
    once (dadtransmits 0: no DAD), and it wrote the WAN's resolver for dnsmasq and oe."""
    plan = lab.plan
    services = json.loads(
        lab.router('ubus call service list \'{"name":"network"}\'').check().stdout
    )
    (instance,) = services["network"]["instances"].values()
    assert instance["running"] and instance["command"] == ["/sbin/netifd"], instance
    assert "respawn" in instance, instance
    pid = lab.router("pgrep -x netifd").check().stdout.split()
    assert pid == [str(instance["pid"])], (pid, instance)
    ppid = lab.router(f"cut -d' ' -f4 /proc/{pid[0]}/stat").check().stdout.strip()
    assert ppid == "1", ppid  # procd's child

    def status(interface: str) -> dict[str, Any]:
        res = lab.router(f"ubus call network.interface.{interface} status").check()
        doc: dict[str, Any] = json.loads(res.stdout)
        return doc

    def addresses(doc: dict[str, Any], family: str) -> list[tuple[str, int]]:
        return [(a["address"], a["mask"]) for a in doc[f"ipv{family}-address"]]

    # OpenWrt's layout: wan (IPv4) and wan6 (IPv6) on eth1, lan on the bridge br-lan
    wan, wan6, lan = status("wan"), status("wan6"), status("lan")
    assert wan["up"] and wan["proto"] == "static" and wan["l3_device"] == ROUTER_WAN_DEV, wan
    assert wan6["up"] and wan6["l3_device"] == ROUTER_WAN_DEV, wan6
    assert addresses(wan, "4") == [(plan.router_wan4, 24)], wan
    assert addresses(wan6, "6") == [(plan.router_wan6, 64)], wan6
    gateways = {r["nexthop"] for r in wan["route"] + wan6["route"] if r["mask"] == 0}
    assert gateways == {plan.inet_gw4, plan.inet_gw6}, (wan["route"], wan6["route"])
    assert wan["dns-server"] == [plan.resolver], wan
    assert lan["up"] and lan["l3_device"] == ROUTER_LAN_DEV, lan
    assert addresses(lan, "4") == [(plan.router_lan4, 24)], lan
    assert addresses(lan, "6") == [(plan.router_lan6, 64)], lan

    kernel = lab.router(
        f"ip -o addr show dev {ROUTER_WAN_DEV}; ip -o addr show dev {ROUTER_LAN_DEV}; echo ==; "
        f"ip -o addr show tentative; echo ==; "
        f"cat /proc/sys/net/ipv6/conf/{ROUTER_WAN_DEV}/dad_transmits; "
        "cat /tmp/resolv.conf.d/resolv.conf.auto"
    ).check()
    addrs, tentative, rest = kernel.stdout.split("==\n")
    for addr in (f"{plan.router_wan4}/24", f"{plan.router_wan6}/64",
                 f"{plan.router_lan4}/24", f"{plan.router_lan6}/64"):  # fmt: skip
        assert f" {addr} " in addrs, (addr, addrs)
    assert tentative.strip() == "", tentative
    dad, *resolv = rest.splitlines()
    assert dad == "0" and f"nameserver {plan.resolver}" in resolv, rest


def test_image_records_the_userland_it_was_built_from(lab: Lab) -> None:
    stamp = json.loads(lab.router("cat /etc/oe-lab/userland.json").check().stdout)
    assert {"procd", "ubus", "libubox", "uci", "firewall4", "opkg-lede"} <= set(stamp["components"])
    assert all(len(c["tree_sha256"]) == 64 for c in stamp["components"].values())


def test_image_carries_the_pinned_runtime_dependencies(lab: Lab) -> None:
    pins = dict(
        line.split("==")
        for line in (REPO / "requirements.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    )
    code = (
        "import json, importlib.metadata as m; "
        f"print(json.dumps({{n: m.version(n) for n in {sorted(pins)!r}}}))"
    )
    got = json.loads(lab.router(f'python3 -c "{code}"').check().stdout)
    assert got == pins


def test_the_package_came_from_opkg_with_debians_parts_declared(lab: Lab) -> None:
    """The project is opkg's python3-oe (from `make package`'s .ipk); what it depends on is
    Debian's python3 and kernel, declared provided in opkg's status file."""
    res = lab.router("opkg list-installed; echo ==; opkg files python3-oe; echo ==; uname -r")
    installed_text, files, kernel = res.check().stdout.split("==\n")
    installed = dict(ln.split(" - ", 1) for ln in installed_text.splitlines() if " - " in ln)
    assert installed["python3-oe"] == build.project_version() + "-r1", installed
    status = lab.router("cat /usr/lib/opkg/status").check().stdout
    oe = next(p for p in status.split("\n\n") if p.startswith("Package: python3-oe\n"))
    depends = oe.split("Depends: ", 1)[1].split("\n", 1)[0].split(", ")
    python = lab.router("python3 -c 'import platform; print(platform.python_version())'")
    for name in depends:  # each dependency is the Debian part's, at its version
        if name.startswith("kmod-"):
            assert installed[name] == kernel.strip(), name
        elif name in ("python3-light", "python3-asyncio", "python3-logging", "python3-ctypes"):
            assert installed[name] == python.check().stdout.strip(), name
        else:
            assert name in installed, name
    assert "/usr/bin/oe-routerd" in files and "/etc/init.d/oe" in files


def test_fw4_renders_the_firewall_from_uci(lab: Lab) -> None:
    """table inet fw4 is fw4's rendering of /etc/config/firewall: zones by device, LAN
    masqueraded to WAN, and the package's first-boot uci-defaults put oe-esp0 in wan."""
    res = lab.router(
        "ls /etc/uci-defaults; echo ==; uci get firewall.@zone[1].name; "
        "uci get firewall.@zone[1].device; echo ==; nft list table inet fw4"
    ).check()
    pending, zone, ruleset = res.stdout.split("==\n")
    assert pending.strip() == ""  # ran at the first boot and deleted
    assert zone.split() == ["wan", ROUTER_WAN_DEV, "oe-esp0"], zone
    assert "!fw4: Masquerade IPv4 wan traffic" in ruleset
    srcnat = next(ln for ln in ruleset.splitlines() if "jump srcnat_wan" in ln)
    assert '"oe-esp0"' in srcnat and f'"{ROUTER_WAN_DEV}"' in srcnat, srcnat
    assert f'iifname "{ROUTER_LAN_DEV}" jump forward_lan' in ruleset


#: On the router: one listener on every address for TCP 8080, UDP 4500 (IKE's NAT-T port)
#: and UDP 5001 (no rule opens it), each arrival a line in /tmp/fw-probe.log.
ROUTER_LISTENER = r"""
import select, socket, time
log = open("/tmp/fw-probe.log", "a", buffering=1)
tcp = socket.create_server(("::", 8080), family=socket.AF_INET6, dualstack_ipv6=True)
udp = []
for port in (4500, 5001):
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind(("::", port))
    udp.append(s)
log.write("ready\n")
end = time.monotonic() + 300
while time.monotonic() < end:
    for s in select.select([tcp, *udp], [], [], 1)[0]:
        if s is tcp:
            conn, peer = s.accept()
            log.write(f"tcp {peer[0]}\n")
            conn.close()
        else:
            data, peer = s.recvfrom(2048)
            log.write(f"udp {s.getsockname()[1]} {peer[0]} {data.decode()}\n")
"""

#: From a world host to the router's WAN addresses (argv), IPv4 then IPv6: a TCP connect to
#: 8080, a datagram to 5001, then one to 4500, then an ESP packet (SPI 42, no SA for it).
WORLD_PROBE = r"""
import socket, sys
for family, addr in ((socket.AF_INET, sys.argv[1]), (socket.AF_INET6, sys.argv[2])):
    try:
        socket.create_connection((addr, 8080), timeout=5).close()
        print("tcp", addr, "connected")
    except OSError as exc:
        print("tcp", addr, type(exc).__name__)
    with socket.socket(family, socket.SOCK_DGRAM) as u:
        u.sendto(b"closed-port", (addr, 5001))
        u.sendto(b"ike-port", (addr, 4500))
    with socket.socket(family, socket.SOCK_RAW, 50) as esp:
        esp.sendto(bytes([0, 0, 0, 42, 0, 0, 0, 1]) + bytes(32), (addr, 0))
"""


def _rule_packets(chain: str, comment: str) -> int:
    """The packet counter of the rule with this fw4 comment in `nft list chain` output."""
    line = next(ln for ln in chain.splitlines() if f'comment "!fw4: {comment}"' in ln)
    return int(line.split("counter packets ")[1].split()[0])


def test_wan_input_accepts_ike_and_esp_from_the_package_and_rejects_the_rest(lab: Lab) -> None:
    """The lab router's firewall is OpenWrt's default (guest/router/etc/config/firewall):
    WAN input rejected. The package's first-boot uci-defaults added the rules oe_ike and
    oe_esp, so fw4's wan input chain accepts UDP 500/4500 and ESP and nothing else beyond
    OpenWrt's default ICMP/DHCP rules. On the wire: a listener on all of the router's
    addresses is reached from the LAN; from a world host its TCP port is refused (fw4's
    TCP reset) and its UDP 5001 gets nothing, while UDP 4500 and ESP get in."""
    rules = lab.router("uci show firewall.oe_ike; uci show firewall.oe_esp").check().stdout
    assert "firewall.oe_ike.dest_port='500' '4500'" in rules, rules
    assert "firewall.oe_esp.proto='esp'" in rules, rules
    chain = lab.router("nft list chain inet fw4 input_wan").check().stdout
    lines = [ln.strip() for ln in chain.splitlines() if "comment" in ln or "jump" in ln]
    assert any(ln.startswith("udp dport { 500, 4500 } counter") for ln in lines), chain
    assert any(ln.startswith("meta l4proto esp counter") for ln in lines), chain
    assert lines[-1] == "jump reject_from_wan", chain
    accepted = {ln.split('"!fw4: ')[1].rstrip('"') for ln in lines if " accept " in ln}
    assert accepted == wan_input.ACCEPTED, chain
    esp_before = _rule_packets(chain, "Allow-OE-ESP")

    plan = lab.plan
    started = lab.router(
        "rm -f /tmp/fw-probe.log; "
        f"setsid python3 -c {shlex.quote(ROUTER_LISTENER)} >/tmp/fw-probe.err 2>&1 </dev/null "
        "& echo $!"
    ).check()
    pid = started.stdout.strip().splitlines()[-1]
    try:
        deadline = time.monotonic() + 30
        while "ready" not in lab.router("cat /tmp/fw-probe.log 2>/dev/null").stdout:
            err = lab.router("cat /tmp/fw-probe.err").stdout
            assert time.monotonic() < deadline and not err, f"listener did not start: {err}"
            time.sleep(0.2)
        # the listener answers on the LAN (the lan zone accepts input)
        lan = lab.client(
            "python3 -c 'import socket, sys; "
            "socket.create_connection((sys.argv[1], 8080), timeout=5).close()' "
            f"{plan.router_lan4}"
        )
        assert lan.ok, lan.stdout + lan.stderr
        world = plan.host("plain")
        probe = lab.host(
            world.netns,
            f"python3 -c {shlex.quote(WORLD_PROBE)} {plan.router_wan4} {plan.router_wan6}",
        ).check()
        assert probe.stdout.splitlines() == [
            f"tcp {plan.router_wan4} ConnectionRefusedError",
            f"tcp {plan.router_wan6} ConnectionRefusedError",
        ], probe.stdout
        # the 4500 datagrams were sent after the 5001 ones: once both arrived, so would have
        # those to 5001 had the firewall let them in
        deadline = time.monotonic() + 30
        while True:
            log = lab.router("cat /tmp/fw-probe.log").check().stdout
            if log.count(" ike-port") >= 2 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        arrived = log.splitlines()
        assert f"udp 4500 ::ffff:{world.ipv4} ike-port" in arrived, log
        assert f"udp 4500 {world.ipv6} ike-port" in arrived, log
        assert not [ln for ln in arrived if "closed-port" in ln], log
        assert not [ln for ln in arrived if ln.startswith("tcp") and "192.168.1." not in ln], log
        assert f"tcp ::ffff:{plan.client4}" in arrived, log
    finally:  # gone before anything else binds 4500 (the daemon does)
        lab.router(f"kill {pid}; while kill -0 {pid} 2>/dev/null; do sleep 0.1; done")
    chain = lab.router("nft list chain inet fw4 input_wan").check().stdout
    assert _rule_packets(chain, "Allow-OE-ESP") >= esp_before + 2, chain


def test_the_daemon_runs_under_procd(lab: Lab) -> None:
    """/etc/init.d/oe start: procd's instance, its output in logd."""
    import oelab

    oelab.start_daemon(lab)
    try:
        svc = json.loads(lab.router('ubus call service list \'{"name": "oe"}\'').check().stdout)
        inst = svc["oe"]["instances"]["oe-routerd"]
        pid = lab.router("cat /run/oe-routerd.pid").check().stdout.strip()
        assert inst["running"] and str(inst["pid"]) == pid, inst
        assert lab.router(f"cat /proc/{pid}/status | grep PPid").stdout.split()[1] == "1"
        assert f"oe-routerd[{pid}]" in lab.router("logread").check().stdout
    finally:
        oelab.stop_daemon(lab)


@pytest.fixture(scope="module")
def crypto_lab(lab_images: build.Images) -> Iterator[Lab]:
    """A second lab whose router has virtio-crypto and -cpu qemu64 (no AES-NI)."""
    with Lab(lab_images, crypto=True, bundle=False) as the_lab:
        yield the_lab


def test_virtio_crypto_engine_is_visible_to_the_router(crypto_lab: Lab) -> None:
    """With -cpu qemu64 there is no AES-NI, so the kernel's cbc(aes) is the virtio driver."""
    crypto = crypto_lab.router("cat /proc/crypto").check().stdout
    assert "virtio_crypto_aes_cbc" in crypto
    assert "aesni" not in crypto
    blocks = [b for b in crypto.split("\n\n") if "name         : cbc(aes)" in b]
    best = max(blocks, key=lambda b: int(b.split("priority     : ")[1].split()[0]))
    assert "virtio_crypto_aes_cbc" in best
