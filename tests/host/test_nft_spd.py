"""The compiled SPD table on the real kernel: pass, drop and queue, after SNAT, and inbound.

Three namespaces: L (a LAN device, 192.168.1.2), R (the router: lan0 192.168.1.1, wan
198.51.100.1, the datapath's TUN device ``oetun``) and W (the world: 198.51.100.2 with
peers on its loopback). R's policies are the real table of oe/policy.py (private-or-clear
0.0.0.0/0 traps, the clear group's exclusions) plus a PASS shunt (.8), a DROP shunt (.9)
and a Child SA's OUT/IN/FWD IPSEC policies for .10. LAN flows are source-NATed like
oe/lan.py does (srcnat - 5). Verdicts are observed where they happen: the NFQUEUE reader
in R (queued), a UDP socket in W (passed), nothing anywhere (dropped).
"""

from __future__ import annotations

import fcntl
import ipaddress
import os
import socket
import struct
import subprocess
import time
from dataclasses import dataclass

import pytest

from oe_router.config.schema import PolicyConfig
from oe_router.datapath.base import (
    Direction,
    Mode,
    PolicyAction,
    PolicySpec,
    Template,
    TrafficSelector,
)
from oe_router.datapath.netns import in_netns
from oe_router.datapath.nfqueue import NfQueue, QueuedPacket
from oe_router.datapath.nft_spd import (
    SpdTable,
    apply_script,
    compile_spd,
    install,
    render,
    update,
)
from oe_router.oe.lan import LanGateway, nft_script
from oe_router.oe.policy import PolicyTable, selector_rank
from tests.host.netlab import LanRouterWorld, ip

pytestmark = pytest.mark.host

QNUM = 21
PORT = 9000
WAN = ipaddress.IPv4Address("198.51.100.1")
TRAPPED, PASSED, DROPPED, SA_PEER = "203.0.113.7", "203.0.113.8", "203.0.113.9", "203.0.113.10"
BYPASS_MARK = 0x4000
SO_MARK = 36


@dataclass
class Lab:
    lan: str
    r: str
    w: str
    backend: str = ""

    def udp(self, ns: str, bind: tuple[str, int] = ("0.0.0.0", 0)) -> socket.socket:
        with in_netns(ns):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(bind)
        return sock


@pytest.fixture
def lab(lan_router_world: LanRouterWorld) -> Lab:
    lan, r, w = lan_router_world(
        "oe-s",
        peers=(TRAPPED, PASSED, DROPPED, SA_PEER),
        sysctls=("net.ipv4.conf.all.rp_filter=0",),
    )
    ip("-n", r, "tuntap", "add", "oetun", "mode", "tun")
    ip("-n", r, "addr", "add", "10.255.0.1/32", "dev", "oetun")
    ip("-n", r, "link", "set", "oetun", "up")
    return Lab(lan, r, w)


def _host(addr: str | ipaddress.IPv4Address) -> TrafficSelector:
    return TrafficSelector(ipaddress.ip_network(f"{addr}/32"))


def policies(extra_shunts: int = 0) -> list[PolicySpec]:
    """The real OE table for this router, plus shunts and one Child SA."""
    table = PolicyTable.from_config(PolicyConfig(), lan=[ipaddress.ip_network("192.168.1.0/24")])
    out = list(table.kernel_policies({4: WAN}, trap_reqid=1))
    wan = _host(WAN)
    rank = selector_rank(ipaddress.ip_network("0.0.0.0/32"), 0, None)
    out.append(PolicySpec(wan, _host(PASSED), Direction.OUT, PolicyAction.PASS, rank))
    out.append(PolicySpec(wan, _host(DROPPED), Direction.OUT, PolicyAction.DROP, rank))
    sa = ipaddress.IPv4Address(SA_PEER)
    tmpl_out = (Template(WAN, sa, 7, Mode.TUNNEL),)
    tmpl_in = (Template(sa, WAN, 7, Mode.TUNNEL),)
    out.append(PolicySpec(wan, _host(sa), Direction.OUT, PolicyAction.IPSEC, rank, tmpl_out))
    out.append(PolicySpec(_host(sa), wan, Direction.IN, PolicyAction.IPSEC, rank, tmpl_in))
    out.append(PolicySpec(_host(sa), wan, Direction.FWD, PolicyAction.IPSEC, rank, tmpl_in))
    for i in range(extra_shunts):
        peer = ipaddress.IPv4Address(0x32000000 + i)
        action = PolicyAction.PASS if i % 2 else PolicyAction.DROP
        out.append(PolicySpec(wan, _host(peer), Direction.OUT, action, rank))
    return out


def spd_table(extra_shunts: int = 0) -> SpdTable:
    return compile_spd(
        policies(extra_shunts),
        wan="wan",
        tun="oetun",
        queue_num=QNUM,
        bypass_mark=BYPASS_MARK,
        ike_ports=(500, 4500),
    )


def _recv(sock: socket.socket, timeout: float) -> list[tuple[bytes, str]]:
    sock.settimeout(timeout)
    out = []
    try:
        while True:
            data, (addr, _port) = sock.recvfrom(65535)
            out.append((data, addr))
            sock.settimeout(0.05)
    except TimeoutError:
        pass
    return out


def _read(q: NfQueue, timeout: float = 1.0) -> list[QueuedPacket]:
    deadline = time.monotonic() + timeout
    got: list[QueuedPacket] = []
    while time.monotonic() < deadline:
        got += q.read_packets()
        time.sleep(0.01)
    return got


def test_outbound_pass_drop_queue_and_bypass(lab: Lab) -> None:
    lab.backend = install(spd_table(), netns=lab.r)
    rx = lab.udp(lab.w, ("0.0.0.0", PORT))
    tx = lab.udp(lab.r, (str(WAN), 0))
    with NfQueue(QNUM, netns=lab.r) as q:
        tx.sendto(b"to pass shunt", (PASSED, PORT))
        with pytest.raises(PermissionError):  # a local sender learns of the drop: EPERM
            tx.sendto(b"to drop shunt", (DROPPED, PORT))
        tx.sendto(b"to trap", (TRAPPED, PORT))
        tx.sendto(b"to SA peer", (SA_PEER, PORT))
        assert _recv(rx, 0.5) == [(b"to pass shunt", str(WAN))]  # in the clear, no queue hop
        queued = _read(q, 0.3)
        assert sorted(p.payload[28:] for p in queued) == [b"to SA peer", b"to trap"]
        for p in queued:
            assert p.hook == 4  # NF_INET_POST_ROUTING: the out chain queued it
        q.verdicts((p.id, True) for p in queued)  # the daemon's decision, here: release
        assert sorted(d for d, _ in _recv(rx, 0.5)) == [b"to SA peer", b"to trap"]
        # the daemon's own IKE/NAT-T socket carries the bypass mark: never trapped
        tx.setsockopt(socket.SOL_SOCKET, SO_MARK, BYPASS_MARK)
        tx.sendto(b"ike", (TRAPPED, PORT))
        assert _recv(rx, 0.5) == [(b"ike", str(WAN))]
        assert _read(q, 0.1) == []
    print(f"queue backend: {lab.backend}")


def test_lan_flow_is_queued_with_its_post_snat_source(lab: Lab) -> None:
    gw = LanGateway(wan_ifname="wan", lan4=(ipaddress.IPv4Network("192.168.1.0/24"),), wan4=WAN)
    apply_script(nft_script(gw), netns=lab.r)  # SNAT at srcnat - 5, as the OE service does
    install(spd_table(), netns=lab.r)
    chains = subprocess.run(
        ["ip", "netns", "exec", lab.r, "nft", "list", "ruleset"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "type nat hook postrouting priority srcnat - 5" in chains
    assert "type filter hook postrouting priority srcnat + 10" in chains
    rx = lab.udp(lab.w, ("0.0.0.0", PORT))
    client = lab.udp(lab.lan)
    with NfQueue(QNUM, netns=lab.r) as q:
        client.sendto(b"lan first packet", (TRAPPED, PORT))
        client.sendto(b"lan second packet", (TRAPPED, PORT))
        queued = _read(q, 0.5)
        assert [p.payload[28:] for p in queued] == [b"lan first packet", b"lan second packet"]
        for p in queued:
            assert socket.inet_ntoa(p.payload[12:16]) == str(WAN)  # translated source
            assert socket.inet_ntoa(p.payload[16:20]) == TRAPPED
            assert p.indev is not None  # forwarded: it came in on lan0
        assert _recv(rx, 0.2) == []  # held
        q.verdict_batch(queued[-1].id, True)
        got = _recv(rx, 0.5)
        assert got == [(b"lan first packet", str(WAN)), (b"lan second packet", str(WAN))]
        client.sendto(b"lan to pass shunt", (PASSED, PORT))  # a shunt holds for LAN flows too
        assert _recv(rx, 0.5) == [(b"lan to pass shunt", str(WAN))]
        assert _read(q, 0.1) == []


def _udp4(src: str, dst: str, sport: int, dport: int, payload: bytes) -> bytes:
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload  # no checksum
    hdr = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        20 + len(udp),
        1,
        0,
        64,
        17,
        0,
        socket.inet_aton(src),
        socket.inet_aton(dst),
    )
    words = struct.unpack("!10H", hdr)
    csum = sum(words)
    csum = (csum & 0xFFFF) + (csum >> 16)
    csum = (csum & 0xFFFF) + (csum >> 16)
    return hdr[:10] + struct.pack("!H", ~csum & 0xFFFF) + hdr[12:] + udp


def _tun(ns: str, name: str) -> int:
    with in_netns(ns):
        fd = os.open("/dev/net/tun", os.O_RDWR)
        ifr = struct.pack("16sH", name.encode(), 0x0001 | 0x1000)  # IFF_TUN | IFF_NO_PI
        fcntl.ioctl(fd, 0x400454CA, ifr)  # TUNSETIFF
    return fd


def test_inbound_cleartext_from_sa_peer_is_dropped_unless_from_tun(lab: Lab) -> None:
    install(spd_table(), netns=lab.r)
    rx = lab.udp(lab.r, ("0.0.0.0", PORT))
    ike = lab.udp(lab.r, ("0.0.0.0", 4500))
    peer = lab.udp(lab.w, (SA_PEER, PORT))
    other = lab.udp(lab.w, (TRAPPED, PORT))
    peer.sendto(b"cleartext from SA peer", (str(WAN), PORT))
    other.sendto(b"cleartext from a trap-only peer", (str(WAN), PORT))
    assert _recv(rx, 0.5) == [(b"cleartext from a trap-only peer", TRAPPED)]
    peer.sendto(b"nat-t", (str(WAN), 4500))  # IKE and ESP-in-UDP must reach the daemon
    assert _recv(ike, 0.5) == [(b"nat-t", SA_PEER)]
    fd = _tun(lab.r, "oetun")  # the datapath decrypted it and writes it out of its TUN
    try:
        os.write(fd, _udp4(SA_PEER, str(WAN), PORT, PORT, b"decrypted from SA peer"))
        assert _recv(rx, 0.5) == [(b"decrypted from SA peer", SA_PEER)]
    finally:
        os.close(fd)


def test_two_thousand_shunts_load_fast_and_update_by_element(lab: Lab) -> None:
    t0 = time.perf_counter()
    spd = spd_table(extra_shunts=2000)
    script = render(spd, xt_queue=True)
    compiled = time.perf_counter() - t0
    t0 = time.perf_counter()
    apply_script(script, netns=lab.r)
    loaded = time.perf_counter() - t0
    lab.backend = install(spd, netns=lab.r)  # the real path, with the queue rule
    t0 = time.perf_counter()
    install(spd, netns=lab.r, backend=lab.backend)
    replaced = time.perf_counter() - t0
    print(
        f"2,000 shunts: compile+render {compiled * 1000:.0f} ms, nft -f {loaded * 1000:.0f} ms, "
        f"replace with queue rule {replaced * 1000:.0f} ms, script {len(script)} bytes"
    )
    assert loaded < 1.0
    rules = [x for x in script.splitlines() if x.startswith("\t\tmeta nfproto")]
    assert len(rules) < 40
    rx = lab.udp(lab.w, ("0.0.0.0", PORT))
    tx = lab.udp(lab.r, (str(WAN), 0))
    ip("-n", lab.w, "addr", "add", "50.0.7.207/32", "dev", "lo")
    ip("-n", lab.w, "addr", "add", "50.0.7.206/32", "dev", "lo")
    tx.sendto(b"shunt 1999 passes", ("50.0.7.207", PORT))  # 0x32000000 + 1999: odd, PASS
    with pytest.raises(PermissionError):
        tx.sendto(b"shunt 1998 drops", ("50.0.7.206", PORT))
    assert _recv(rx, 0.5) == [(b"shunt 1999 passes", str(WAN))]
    # a new shunt is one element: no table replacement, no rule change
    new = PolicySpec(
        _host(WAN),
        _host("50.0.7.206"),
        Direction.OUT,
        PolicyAction.PASS,
        selector_rank(ipaddress.ip_network("0.0.0.0/32"), 0, None),
    )
    old = next(p for p in policies(2000) if p.dst == _host("50.0.7.206"))
    result = update(spd, remove=[old], add=[new])
    assert result is not None
    spd, delta = result
    t0 = time.perf_counter()
    apply_script(delta, netns=lab.r)
    took = time.perf_counter() - t0
    print(f"element update: {took * 1000:.1f} ms: {delta.strip()!r}")
    tx.sendto(b"shunt 1998 now passes", ("50.0.7.206", PORT))
    assert _recv(rx, 0.5) == [(b"shunt 1998 now passes", str(WAN))]
