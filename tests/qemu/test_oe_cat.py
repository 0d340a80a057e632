"""CAT in the QEMU lab: a libreswan OE server with an address pool gives the router an inner
address, and the router translates LAN flows to that peer (only to that peer) to it.

Peers: oe-cat (203.0.113.13, libreswan clear-or-private for everyone with
``rightaddresspool=100.64.13.1-100.64.13.200``, labkit's CAT_POOL), oe-null (203.0.113.10,
the same without a pool), oe-rsa (libreswan, RSA) and oe-sw (strongSwan, no pools: it answers
a CP request with INTERNAL_ADDRESS_FAILURE and no Child SA, so the router makes a host-to-host
one on the same IKE SA).

Why these assertions: the inner address is read where the peer sees it (pluto's lease, its
HTTP server's log of the client address), ESP and cleartext are counted on the WAN cable, and
the translation table is read from the router's kernel (nft), not from the daemon's claims.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import oelab
from lab import Lab

pytestmark = pytest.mark.qemu

ROUTER_ID = "@router.example.test"  # oe-sw (strongSwan) authenticates us by our key
RESULTS = Path(__file__).resolve().parents[2] / "test-results" / "qemu-cat.json"
WAN4 = "203.0.113.2"
POOL = (ipaddress.IPv4Address("100.64.13.1"), ipaddress.IPv4Address("100.64.13.200"))
_SHIPPED_CONFIG = oelab.router_config
CAT6 = "2001:db8:1::13"
POOL6 = "fd00:cafe::1-fd00:cafe::ff"


def host(lab: Lab, netns: str) -> Any:
    """A world host as world.json lists it (the lab's fixed plan predates oe-cat)."""
    return next(h for h in lab.hosts if h.netns == netns)


def in_pool(text: str) -> bool:
    a = ipaddress.IPv4Address(text)
    return POOL[0] <= a <= POOL[1]


def trafficstatus(lab: Lab, netns: str) -> str:
    ctl = f"{lab.state_dir(netns)}/run/pluto.ctl"
    return lab.host(netns, f"ipsec whack --ctlsocket {ctl} --trafficstatus").check().stdout


def http_clients(lab: Lab, netns: str, path: str) -> list[str]:
    """Client addresses in the peer's HTTP server log that fetched ``path``."""
    log = lab.host(netns, f"cat {lab.state_dir(netns)}/http.log").check().stdout
    return [ln.split()[0] for ln in log.splitlines() if f"GET {path} " in ln]


def cat_map(lab: Lab) -> dict[str, str]:
    """The router kernel's CAT map (peer -> inner address), read with nft."""
    res = lab.router("nft list map inet oe_cat oe_cat4")
    if res.rc != 0:
        return {}
    return dict(re.findall(r"(\d+\.\d+\.\d+\.\d+) : (\d+\.\d+\.\d+\.\d+)", res.stdout))


def cat_config(local_id: str) -> str:
    """The shipped config with Child SAs rekeyed every ~30 s, so a rekey falls in a test."""
    text = _SHIPPED_CONFIG(local_id)
    for option, value in (
        ("child_lifetime", "1m"),
        ("rekey_margin", "30s"),
        ("rekey_jitter", "0%"),
    ):
        text, n = re.subn(rf"option {option} '[^']*'", f"option {option} '{value}'", text)
        assert n == 1, f"the shipped config has no option {option}"
    return text


@pytest.fixture(scope="module")
def cat_lab(lab: Lab) -> Iterator[Lab]:
    for h in ("oe-cat", "oe-null", "oe-rsa", "oe-sw"):
        assert h not in lab.failed_hosts, lab.failed_hosts[h]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(oelab, "router_config", cat_config)
        oelab.start_daemon(lab, local_id=ROUTER_ID)
    try:
        yield lab
    finally:
        oelab.stop_daemon(lab)


def test_lan_flow_to_a_pool_peer_leaves_from_its_inner_address(
    cat_lab: Lab, figures: dict[str, Any]
) -> None:
    """A LAN client's curl and ping to oe-cat (by address: packet-triggered): ESP only on the
    WAN, pluto leased a pool address to the router, the Child SA is inner <-> peer on both
    ends, and the peer's web server saw the inner address as the client."""
    lab = cat_lab
    peer = host(lab, "oe-cat").ipv4
    with lab.capture_wan(label="wan-oe-cat") as wan:
        ping = lab.client(f"ping -n -c 10 -i 0.3 -W 1 {peer}", timeout=40)
        res = lab.client(f"curl -4 -s -m 20 http://{peer}/host.txt", timeout=40)
    assert res.ok and res.stdout.strip() == "oe-cat", (res.stdout, res.stderr)
    seqs = [int(n) for n in re.findall(r"bytes from .*icmp_seq=(\d+)", ping.stdout)]
    got = len(seqs)
    # the first echoes are lost while IKE runs (larval drop; more under load), then none
    assert seqs and seqs[0] <= 6 and seqs == list(range(seqs[0], 11)), ping.stdout
    assert wan.count(f"host {peer} and (tcp or icmp)") == 0, wan.text(f"host {peer}")
    esp = wan.count(f"esp and host {peer}")
    assert esp >= 2 * (got + 4), esp  # every echo and the TCP exchange, both ways

    status = trafficstatus(lab, "oe-cat")
    lease = re.search(r"lease=(\d+\.\d+\.\d+\.\d+)/32", status)
    assert lease is not None, status
    inner = lease.group(1)
    assert in_pool(inner) and inner != WAN4, status
    assert f"{WAN4}==={inner}/32" in status, status  # pluto's view: the SA is inner <-> peer

    assert http_clients(lab, "oe-cat", "/host.txt")[-1] == inner  # the flow came from A
    assert cat_map(lab) == {peer: inner}
    row = next(
        t
        for t in oelab.status(lab)["tunnels"]
        if t.get("source") == "ike" and t["peer"] == peer and t.get("children")
    )
    assert row["children"][0]["ts_local"] == f"{inner}/32", row
    assert row["children"][0]["ts_remote"] == f"{peer}/32", row
    pol = lab.router("ip xfrm policy list dir out").check().stdout
    assert f"src {inner}/32 dst {peer}/32" in pol, pol
    figures["oe-cat"] = {"inner": inner, "esp": esp, "pings": got}


def cat_child(lab: Lab, peer: str) -> dict[str, Any]:
    row = next(
        t
        for t in oelab.status(lab)["tunnels"]
        if t.get("source") == "ike" and t["peer"] == peer and t.get("children")
    )
    return dict(row["children"][-1])  # the newest (two only in the instant of a rekey)


def test_translation_survives_child_sa_rekeys(cat_lab: Lab, figures: dict[str, Any]) -> None:
    """Pings every 0.5 s for 40 s while the Child SA (lifetime 1 min, rekeyed ~30 s before)
    is rekeyed by the IKE core: the new SA is inner <-> peer too (containment accepts it for
    this peer), the translation stays, nothing is lost."""
    lab = cat_lab
    peer = host(lab, "oe-cat").ipv4
    inner = cat_map(lab)[peer]
    before = cat_child(lab, peer)
    ping = lab.client(f"ping -n -c 80 -i 0.5 -W 1 {peer}", timeout=90)
    after = cat_child(lab, peer)
    got = len(re.findall(r"bytes from", ping.stdout))
    assert after["spi_in"] != before["spi_in"], (before, after)  # rekeyed in between
    assert after["ts_local"] == f"{inner}/32", after
    assert got >= 79, ping.stdout[-300:]
    assert cat_map(lab) == {peer: inner}
    figures["rekey"] = {"pings": 80, "replies": got}


def test_other_peers_still_see_the_wan_address(cat_lab: Lab, figures: dict[str, Any]) -> None:
    """Containment: the inner address is used towards oe-cat only. oe-null (libreswan, no
    pool) gets a host-to-host SA from the WAN address and sees the client as 203.0.113.2,
    while oe-cat's translation stays in place."""
    lab = cat_lab
    peer = host(lab, "oe-null").ipv4
    with lab.capture_wan(label="wan-oe-null") as wan:
        lab.client(f"ping -n -c 3 -i 0.3 -W 1 {peer}", timeout=30)
        res = lab.client(f"curl -4 -s -m 20 http://{peer}/host.txt", timeout=40)
    assert res.stdout.strip() == "oe-null", (res.stdout, res.stderr)
    assert wan.count(f"host {peer} and (tcp or icmp)") == 0, wan.text(f"host {peer}")
    assert http_clients(lab, "oe-null", "/host.txt")[-1] == WAN4
    status = trafficstatus(lab, "oe-null")
    assert WAN4 in status and "lease=" not in status, status
    m = cat_map(lab)
    assert peer not in m and host(lab, "oe-cat").ipv4 in m, m
    figures["oe-null"] = {"client_seen": WAN4, "esp": wan.count(f"esp and host {peer}")}


@pytest.mark.parametrize("netns", ["oe-rsa", "oe-sw"])
def test_peers_without_a_pool_take_the_cp_request_harmlessly(
    cat_lab: Lab, figures: dict[str, Any], netns: str
) -> None:
    """DNS-triggered curl to the keyed names of peers without an address pool, with the CP
    request going out: libreswan (RSA) ignores it, strongSwan refuses the first Child SA
    (INTERNAL_ADDRESS_FAILURE) and gets a host-to-host one on the same IKE SA. Both: 200,
    ESP only, the peer sees the WAN address."""
    lab = cat_lab
    peer = host(lab, netns)
    with lab.capture_wan(label=f"wan-cat-{netns}") as wan:
        res = lab.client(
            f"curl -4 -s -m 25 -o /dev/null -w '%{{http_code}}' http://{peer.name}/host.txt",
            timeout=50,
        )
    assert res.stdout.strip() == "200", (res.stdout, res.stderr, oelab.daemon_log(lab)[-3000:])
    assert wan.count(f"host {peer.ipv4} and tcp") == 0, wan.text(f"host {peer.ipv4}")
    assert wan.count(f"esp and host {peer.ipv4}") >= 8
    assert http_clients(lab, netns, "/host.txt")[-1] == WAN4
    assert peer.ipv4 not in cat_map(lab)
    if netns == "oe-sw":
        log = oelab.daemon_log(lab)
        assert f"peer {peer.ipv4}: " in log and "host-to-host Child SA instead, no CAT" in log
    figures[netns] = {"client_seen": WAN4}


def test_routers_own_flows_to_the_pool_peer_use_the_inner_address(cat_lab: Lab) -> None:
    """The router's own HTTP fetches to oe-cat (the image has no ping): passed by the
    routing-time lookup, NATed to the inner address, into the same Child SA (ESP only); the
    peer's web server sees the inner address, and no second negotiation starts."""
    lab = cat_lab
    peer = host(lab, "oe-cat").ipv4
    inner = cat_map(lab)[peer]
    with lab.capture_wan(label="wan-cat-router") as wan:
        for n in range(3):
            fetch = (
                "import urllib.request as u; "
                f"print(u.urlopen('http://{peer}/host.txt?router={n}', timeout=10).read().decode())"
            )
            got = lab.router(f'python3 -c "{fetch}"', timeout=30)
            assert got.ok and got.stdout.strip() == "oe-cat", (got.stdout, got.stderr)
    assert wan.count(f"host {peer} and tcp") == 0, wan.text(f"host {peer}")
    assert wan.count(f"esp and host {peer}") >= 3 * 8
    for n in range(3):
        assert http_clients(lab, "oe-cat", f"/host.txt?router={n}") == [inner]
    row = next(
        t
        for t in oelab.status(lab)["tunnels"]
        if t.get("source") == "ike" and t["peer"] == peer and t.get("children")
    )
    assert len(row["children"]) == 1, row


def test_translation_goes_with_the_sa(cat_lab: Lab) -> None:
    """`oe down` the CAT peer: its Child SA and its map entry go; pluto lets the lease go."""
    lab = cat_lab
    peer = host(lab, "oe-cat").ipv4
    assert peer in cat_map(lab)
    oelab.oe(lab, f"down {peer}").check()
    for _ in range(30):
        if peer not in cat_map(lab):
            break
        lab.router("sleep 0.2")
    assert peer not in cat_map(lab)
    pol = lab.router("ip xfrm policy list dir out").check().stdout
    assert f"dst {peer}/32" not in pol, pol


def test_ipv6_cat_for_the_router_and_the_lan(cat_lab: Lab, figures: dict[str, Any]) -> None:
    """IPv6: oe-cat's pluto gets an IPv6 twin conn with an IPv6 pool. The router's own HTTP
    fetch to 2001:db8:1::13 is trapped (packet trigger), the CP request asks for an
    INTERNAL_IP6_ADDRESS, the lease becomes the IPv6 map entry, and then the LAN client's
    curl -6 to the same address leaves as ESP from that inner address (LAN IPv6 flows are
    NATed into a tunnel only once it exists, as with oe_peers6)."""
    lab = cat_lab
    oelab.libreswan_ipv6_twin(lab, "oe-cat", CAT6, on=True, address_pool=POOL6)
    try:
        fetch = (
            "import urllib.request as u; "
            f"print(u.urlopen('http://[{CAT6}]/host.txt?router6=1', timeout=15).read().decode())"
        )
        got = lab.router(f'python3 -c "{fetch}"', timeout=40)
        assert got.ok and got.stdout.strip() == "oe-cat", (got.stdout, got.stderr)
        status = trafficstatus(lab, "oe-cat")
        lease = re.search(r"lease=([0-9a-f:]+)/128", status)
        assert lease is not None, status
        inner = str(ipaddress.IPv6Address(lease.group(1)))
        m6 = lab.router("nft list map inet oe_cat oe_cat6").check().stdout
        assert f"{CAT6} : {inner}" in m6, m6
        with lab.capture_wan(label="wan-cat6") as wan:
            res = lab.client(f"curl -6 -s -m 20 'http://[{CAT6}]/host.txt?lan6=1'", timeout=40)
        assert res.ok and res.stdout.strip() == "oe-cat", (res.stdout, res.stderr)
        assert wan.count(f"host {CAT6} and tcp") == 0, wan.text(f"host {CAT6}")
        assert wan.count(f"esp and host {CAT6}") >= 8
        log6 = lab.host("oe-cat", f"cat {lab.state_dir('oe-cat')}/http6.log").check().stdout
        seen = {
            ln.split()[0] for ln in log6.splitlines() if "?lan6=1 " in ln or "?router6=1 " in ln
        }
        assert seen == {inner}, log6
        figures["ipv6"] = {"inner": inner, "esp": wan.count(f"esp and host {CAT6}")}
    finally:
        oelab.oe(lab, f"down {CAT6}")
        oelab.libreswan_ipv6_twin(lab, "oe-cat", CAT6, on=False)
