"""netifd built from source (qemu/userland.py, with libnl-tiny and the uapi compat header)
runs: in a network namespace, on a private ubusd, from a /etc/config/network of its own.

Asserted on what netifd does, not what it says: the static addresses on the veth (``ip
addr``), ``ubus call network.interface.lan status``, the ``network.interface`` ubus events
(``ubus listen``) and the notifications procd's interface triggers subscribe to (``ubus
subscribe network.interface``: ``interface.update`` / ``interface.down``), the hotplug
calls, for the start, ``down``/``up`` and a config reload that moves the address (what the
oe init script's WAN trigger reacts to).
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from .charon import namespaces
from .oe_daemon import netns_run

if TYPE_CHECKING:
    from userland import UserlandBuild

pytestmark = pytest.mark.host

NETWORK = """
config interface 'loopback'
\toption device 'lo'
\toption proto 'static'
\toption ipaddr '127.0.0.1'
\toption netmask '255.0.0.0'

config interface 'lan'
\toption device 'lan0'
\toption proto 'static'
\toption ipaddr '{ipv4}'
\toption netmask '255.255.255.0'
\toption ip6addr '2001:db8:50::1/64'
"""

HOTPLUG = '#!/bin/sh\necho "$1 $ACTION $INTERFACE $DEVICE" >> "$(dirname "$0")/hotplug.log"\n'


@dataclass
class Netifd:
    ul: UserlandBuild
    ns: str
    work: Path
    sock: Path
    procs: list[subprocess.Popen[bytes]]

    def ubus(self, *args: str) -> str:
        res = subprocess.run(
            [str(self.ul.tool("ubus")), "-s", str(self.sock), *args],
            capture_output=True,
            text=True,
            env=self.ul.env(),
            timeout=15,
            check=False,
        )
        assert res.returncode == 0, f"ubus {' '.join(args)}: rc {res.returncode} {res.stderr}"
        return res.stdout

    def status(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.ubus("call", "network.interface.lan", "status"))
        return data

    def follow(self, name: str, *args: str) -> Path:
        """A ubus client (``listen`` or ``subscribe``) writing its lines to ``name``."""
        out = self.work / name
        with out.open("wb") as f:
            cmd = [str(self.ul.tool("ubus")), "-s", str(self.sock), *args]
            self.procs.append(subprocess.Popen(cmd, stdout=f, env=self.ul.env()))
        return out

    def subscribe(self, poll: Callable[..., bool]) -> Path:
        """``ubus subscribe network.interface``, once it receives: netifd's ``set_data``
        makes an interface.update carrying the data, repeated until one arrives."""
        out = self.follow("subscribe.log", "subscribe", "network.interface")
        for n in range(100):
            self.ubus("call", "network.interface.lan", "set_data", json.dumps({"probe": n}))
            if poll(
                lambda n=n: any(
                    u.get("data") == {"probe": n} for u in messages(out, "interface.update")
                ),
                timeout=0.5,
            ):
                return out
        raise AssertionError(f"ubus subscribe got no interface.update: {out.read_text()}")

    def addresses(self) -> str:
        return netns_run(self.ns, ["ip", "-o", "addr", "show", "dev", "lan0"])

    def log(self) -> str:
        return (self.work / "netifd.log").read_text(errors="replace")


def messages(path: Path, kind: str) -> list[dict[str, Any]]:
    """The ``kind`` messages of a ``ubus listen``/``subscribe`` output file."""
    out = []
    for line in path.read_text().splitlines():
        msg = json.loads(line)
        if kind in msg:
            out.append(msg[kind])
    return out


@pytest.fixture
def netifd(
    openwrt_userland: UserlandBuild, tmp_path: Path, poll: Callable[..., bool]
) -> Iterator[Netifd]:
    ul = openwrt_userland
    conf = tmp_path / "config"
    conf.mkdir()
    (conf / "network").write_text(NETWORK.format(ipv4="192.0.2.1"))
    (tmp_path / "addons").mkdir()  # no proto scripts: static is netifd's own
    (tmp_path / "hotplug").write_text(HOTPLUG)
    (tmp_path / "hotplug").chmod(0o755)
    sock = tmp_path / "ubus.sock"
    with namespaces("nifd") as net:
        ns = net.add("r")
        netns_run(ns, ["ip", "link", "add", "lan0", "type", "veth", "peer", "name", "peer0"])
        netns_run(ns, ["ip", "link", "set", "peer0", "up"])  # carrier for lan0
        lab = Netifd(ul, ns, tmp_path, sock, [])
        try:
            ubusd = [str(ul.tool("ubusd")), "-s", str(sock)]
            lab.procs.append(subprocess.Popen(ubusd, env=ul.env()))
            assert poll(sock.exists, timeout=20), "ubusd made no socket"
            listen = lab.follow("listen.log", "listen", "network.interface", "oe.probe")

            def listening() -> bool:
                lab.ubus("send", "oe.probe", "{}")
                return poll(lambda: "oe.probe" in listen.read_text(), timeout=0.5)

            assert poll(listening, timeout=20), "ubus listen received nothing"
            with (tmp_path / "netifd.log").open("wb") as log:
                cmd = [
                    *("ip", "netns", "exec", ns, str(ul.tool("netifd")), "-S"),
                    *("-s", str(sock), "-c", str(conf), "-p", str(tmp_path / "addons")),
                    *("-h", str(tmp_path / "hotplug"), "-r", str(tmp_path / "resolv.auto")),
                ]
                lab.procs.append(
                    subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=ul.env())
                )
            assert poll(lambda: "192.0.2.1/24" in lab.addresses(), timeout=30), lab.log()
            yield lab
        finally:
            for p in reversed(lab.procs):
                p.terminate()
                p.wait(timeout=10)


def test_static_interface_comes_up_with_its_status(
    netifd: Netifd, poll: Callable[..., bool]
) -> None:
    assert poll(lambda: "2001:db8:50::1/64" in netifd.addresses(), timeout=20), netifd.log()
    objects = netifd.ubus("list").split()
    assert {"network", "network.interface.lan", "network.interface.loopback"} <= set(objects)
    st = netifd.status()
    assert st["up"] is True and st["proto"] == "static" and st["l3_device"] == "lan0"
    assert st["ipv4-address"] == [{"address": "192.0.2.1", "mask": 24}]
    assert st["ipv6-address"] == [{"address": "2001:db8:50::1", "mask": 64}]
    listen = netifd.work / "listen.log"
    assert poll(
        lambda: {"action": "ifup", "interface": "lan"} in messages(listen, "network.interface")
    ), listen.read_text()
    hotplug = netifd.work / "hotplug.log"
    assert poll(hotplug.exists) and poll(lambda: "iface ifup lan lan0" in hotplug.read_text())


def test_down_and_up_send_events_and_notifications(
    netifd: Netifd, poll: Callable[..., bool]
) -> None:
    listen = netifd.work / "listen.log"
    sub = netifd.subscribe(poll)

    def lan_events(action: str) -> int:
        ev = {"action": action, "interface": "lan"}
        return messages(listen, "network.interface").count(ev)

    def notified(kind: str, **want: Any) -> bool:
        return any(
            n.get("interface") == "lan" and all(n.get(k) == v for k, v in want.items())
            for n in messages(sub, kind)
        )

    assert poll(lambda: lan_events("ifup") == 1), listen.read_text()
    netifd.ubus("call", "network.interface.lan", "down")
    assert poll(lambda: "192.0.2.1/" not in netifd.addresses(), timeout=20), netifd.log()
    assert poll(lambda: lan_events("ifdown") >= 1), listen.read_text()
    assert poll(lambda: notified("interface.down", up=False)), sub.read_text()
    assert netifd.status()["up"] is False

    netifd.ubus("call", "network.interface.lan", "up")
    assert poll(lambda: "192.0.2.1/24" in netifd.addresses(), timeout=20), netifd.log()
    assert poll(lambda: lan_events("ifup") == 2), listen.read_text()
    address = [{"address": "192.0.2.1", "mask": 24}]
    assert poll(lambda: notified("interface.update", up=True, **{"ipv4-address": address}))

    def hotplug() -> list[list[str]]:
        lines = (netifd.work / "hotplug.log").read_text().splitlines()
        calls = [ln.split()[:3] for ln in lines]
        return [c for c in calls if c[1:] in (["ifup", "lan"], ["ifdown", "lan"])]

    want = [["iface", "ifup", "lan"], ["iface", "ifdown", "lan"], ["iface", "ifup", "lan"]]
    assert poll(lambda: hotplug() == want), hotplug()


def test_reload_moves_the_address(netifd: Netifd, poll: Callable[..., bool]) -> None:
    """A changed /etc/config/network and ``ubus call network reload``: the new address on
    the device, the old one gone, and interface.update carrying it (a WAN address change
    as the oe init script's interface trigger sees it)."""
    sub = netifd.subscribe(poll)
    (netifd.work / "config" / "network").write_text(NETWORK.format(ipv4="192.0.2.7"))
    netifd.ubus("call", "network", "reload")
    assert poll(lambda: "192.0.2.7/24" in netifd.addresses(), timeout=20), netifd.log()
    assert "192.0.2.1/" not in netifd.addresses()
    new = [{"address": "192.0.2.7", "mask": 24}]
    assert poll(
        lambda: any(
            n.get("interface") == "lan" and n.get("ipv4-address") == new
            for n in messages(sub, "interface.update")
        )
    ), sub.read_text()
    assert netifd.status()["ipv4-address"] == new
