"""The daemon follows the kernel's address events by itself (``netwatch``): no reload, no
procd trigger. A real oe-routerd in a namespace whose WAN device (``eth1``: no netifd and
no /etc/config/network here, so the configured name is taken as a device) loses its
address and gets another; IKE rebinds to the new one,
the conntrack entries of the old address are forgotten, and ``oe status`` shows the device
and addresses in use."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from oe_router.datapath.netns import in_netns
from tests.host.netlab import MakeNetns
from tests.host.netlab import ip as _ip
from tests.host.oe_daemon import OeDaemon, bare_config, netns_run

pytestmark = pytest.mark.host

OLD, NEW = "198.51.100.1", "198.51.100.9"


def _flows_to(ns: str, address: str) -> int:
    """Conntrack entries in ``ns`` whose reply goes to ``address``."""
    from pyroute2 import Conntrack
    from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple

    with in_netns(ns), Conntrack() as ct:
        return len(list(ct.dump_entries(tuple_reply=NFCTAttrTuple(daddr=address))))


@pytest.fixture
def router(tmp_path: Path, make_netns: MakeNetns) -> Iterator[OeDaemon]:
    ns = make_netns("oe-ae")
    daemon = None
    try:
        _ip("-n", ns, "link", "add", "eth1", "type", "veth", "peer", "name", "w0")
        _ip("-n", ns, "link", "set", "eth1", "up")
        _ip("-n", ns, "link", "set", "w0", "up")
        _ip("-n", ns, "addr", "add", f"{OLD}/24", "dev", "eth1")
        daemon = OeDaemon(ns, tmp_path / "d", bare_config("eth1", tmp_path / "no-anchor"))
        daemon.start()
        yield daemon
    finally:
        if daemon is not None:
            daemon.stop()


def test_a_new_wan_address_is_followed_without_a_reload(router: OeDaemon) -> None:
    before = router.status()
    assert before["ike"]["addresses"] == [OLD], before["ike"]
    assert before["daemon"]["network"]["wan"]["networks"] == ["eth1 (device)"]
    generation = before["daemon"]["config_generation"]
    # a flow of the old address in conntrack (what a LAN flow NATed to it leaves there)
    netns_run(router.ns, ["nft", "add table ip t; add chain ip t c { type filter hook output "
                          "priority 0; }; add rule ip t c ct state new counter"])  # fmt: skip
    netns_run(router.ns, ["ip", "addr", "add", "198.51.100.2/24", "dev", "w0"])
    with in_netns(router.ns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((OLD, 0))
    sock.sendto(b"x", ("198.51.100.2", 9))
    sock.close()
    assert _flows_to(router.ns, OLD) >= 1

    # as a new DHCP lease does it: the old address goes, the new one comes (deleting a
    # primary address takes the secondaries of its prefix along, so not the other way)
    netns_run(router.ns, ["ip", "addr", "del", f"{OLD}/24", "dev", "eth1"])
    netns_run(router.ns, ["ip", "addr", "add", f"{NEW}/24", "dev", "eth1"])
    t0 = time.monotonic()
    deadline = t0 + 20
    while True:
        status = router.status()
        if status["ike"].get("addresses") == [NEW]:
            break
        assert time.monotonic() < deadline, (status["ike"], router.log()[-2000:])
        time.sleep(0.1)
    took = time.monotonic() - t0
    assert status["daemon"]["config_generation"] == generation  # no reload happened
    assert status["daemon"]["network"]["wan"]["addresses"] == [NEW]
    assert "network changed (WAN " in router.log(), router.log()[-2000:]
    assert _flows_to(router.ns, OLD) == 0  # forgotten: the next packet is a new flow
    assert f"flow(s) of the old WAN address {OLD} forgotten" in router.log()
    print(f"IKE on the new address {took:.2f} s after the change")
