"""Real ESP through the userspace datapath: our daemon <-> strongSwan charon (kernel-libipsec).

This host's kernel has no ESP, so both ends do ESP in userspace: charon in its
libipsec (always ESP in UDP 4500), ours in the daemon's worker processes. Three
namespaces on veth links:

    client (192.168.77.100) -- lan -- router: oe-routerd, datapath userspace
                                      (wan 198.51.100.1) -- wan -- peer: charon (.2)

The LAN client's packets are source-NATed to the router's WAN address by the
daemon's own nftables (oe/lan.py) and travel in a host-to-host Child SA between the
two WAN addresses that ``oe up`` brings up with public-key authentication (charon has no NULL
auth). Every check is on real bytes: replies, a transfer's hash at the far end, the
ESP counters both ends report.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import struct
import subprocess
import time
from collections.abc import Iterator

import pytest

from .charon_lab import CharonLab as Lab
from .charon_lab import charon_lab
from .oe_daemon import device_with, netns_run

pytestmark = [pytest.mark.host, pytest.mark.usefixtures("need_charon")]

WAN_R, WAN_P = "198.51.100.1", "198.51.100.2"  # TEST-NET-2: not in the default clear group
LAN_R, CLIENT = "192.168.77.1", "192.168.77.100"
IKE = "aes256gcm16-prfsha256-ecp256-x25519, aes256-sha256-prfsha256-ecp256"
#: the 100 MB transfers' ESP transforms, as charon names them (AES-CBC with HMAC-SHA2-384/512:
#: test_esp_proposal_charon)
TRANSFORMS = ("aes256gcm16", "aes128gcm16", "chacha20poly1305", "aes256-sha256", "aes128-sha256")
PYTHON = "python3"


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    work = tmp_path_factory.mktemp("usesp")
    with charon_lab(work, "u", (WAN_R, WAN_P), (LAN_R, CLIENT), IKE, TRANSFORMS[0]) as lab:
        lab.up()
        yield lab


def _diag(lab: Lab) -> str:
    """What the router's kernel and daemon hold, for a failure message."""
    out = []
    lan = device_with(lab.router, LAN_R)
    for cmd in (
        ["ip", "route", "get", WAN_P, "from", CLIENT, "iif", lan],
        [
            "sysctl",
            "net.ipv4.ip_forward",
            "net.ipv4.conf.all.rp_filter",
            "net.ipv4.conf.oe-esp0.rp_filter",
        ],
        ["ip", "rule"],
        ["ip", "route", "show", "table", "all"],
        ["ip", "-s", "link", "show", "oe-esp0"],
        ["nft", "list", "ruleset"],
    ):
        out.append(f"$ {' '.join(cmd)}\n" + netns_run(lab.router, cmd, check=False))
    out.append(json.dumps(lab.daemon.tunnels(), indent=1))
    out.append(lab.charon.list_sas())
    out.append(lab.daemon.log()[-2000:])
    return "\n".join(out)


def _ping(lab: Lab, count: int = 5) -> int:
    out = netns_run(
        lab.client, ["ping", "-c", str(count), "-i", "0.2", "-W", "2", WAN_P], check=False
    )
    m = re.search(r"(\d+) received", out)
    return int(m.group(1)) if m else 0


def _charon_child(lab: Lab) -> dict[str, str]:
    """charon's view of its newest Child SA: the ESP algorithms and the byte counters."""
    raw = lab.charon.list_sas(raw=True)
    raw = raw[raw.rfind("child-sas") :]  # the IKE SA's own algorithms come first
    enc = re.search(r"encr-alg=(\S+)", raw)
    keys = re.search(r"encr-keysize=(\d+)", raw)
    bytes_in = re.search(r"bytes-in=(\d+)", raw)
    bytes_out = re.search(r"bytes-out=(\d+)", raw)
    return {
        "encr": enc.group(1) if enc else "",
        "keysize": keys.group(1) if keys else "",
        "bytes_in": bytes_in.group(1) if bytes_in else "0",
        "bytes_out": bytes_out.group(1) if bytes_out else "0",
    }


_SINK = r"""
import hashlib, socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(1)
print("listening", flush=True)
c, _ = s.accept(); h = hashlib.sha256(); n = 0
while True:
    b = c.recv(1 << 16)
    if not b: break
    h.update(b); n += len(b)
print(n, h.hexdigest(), flush=True)
"""

_SOURCE = r"""
import hashlib, socket, sys
size, host, port = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
block = hashlib.sha256(b"oe").digest() * 2048  # 64 KiB, deterministic
h = hashlib.sha256(); sent = 0
s = socket.create_connection((host, port), timeout=30)
while sent < size:
    b = block[: min(len(block), size - sent)]
    s.sendall(b); h.update(b); sent += len(b)
s.shutdown(socket.SHUT_WR); s.recv(1); s.close()
print(sent, h.hexdigest(), flush=True)
"""


def _transfer(lab: Lab, size: int, port: int = 5201) -> tuple[str, str, float]:
    """Send ``size`` bytes client -> peer over TCP; (sender's line, receiver's line, s)."""
    sink = subprocess.Popen(
        ["ip", "netns", "exec", lab.peer, PYTHON, "-c", _SINK, str(port)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert sink.stdout is not None
        assert sink.stdout.readline().strip() == "listening"
        t0 = time.monotonic()
        sent = lab.client_run([PYTHON, "-c", _SOURCE, str(size), WAN_P, str(port)], timeout=300)
        got = sink.stdout.readline().strip()
        return sent.strip(), got, time.monotonic() - t0
    finally:
        sink.kill()
        sink.wait()


def test_tunnel_is_userspace_esp_in_udp(lab: Lab) -> None:
    """oe status names the userspace datapath and why; the Child SA uses UDP encapsulation
    (the only ESP the workers receive), on the transform charon was given."""
    st = lab.daemon.status()
    assert st["daemon"]["datapath"].startswith("userspace-esp"), st["daemon"]["datapath"]
    assert "userspace" in st["daemon"]["datapath"]
    ike = [t for t in st["tunnels"] if t.get("source") == "ike"]
    assert ike and ike[0]["children"][0]["udp_encap"] is True, ike
    # offload 'off': the software engine runs every packet size
    assert [t["engine"] for t in lab.daemon.tunnels()] == ["software"]
    assert "encap=yes" in lab.charon.list_sas(raw=True)  # charon sees it the same way


def test_ping_through_the_tunnel(lab: Lab) -> None:
    """Echo from the LAN client to the peer: every reply came back through ESP both ways
    (our counters and charon's moved; nothing else routes the peer from the LAN)."""
    before = lab.daemon.tunnels()[0]
    assert _ping(lab, 5) == 5, _diag(lab)
    lab.daemon.wait_counted(before, 5)
    assert int(_charon_child(lab)["bytes_in"]) > 0


@pytest.mark.parametrize("esp", TRANSFORMS)
def test_transfer_100mb_byte_exact_per_transform(lab: Lab, esp: str) -> None:
    """100 MB from the LAN client to the peer, once per ESP transform: the receiver's byte
    count and SHA-256 equal the sender's, and charon reports the transform we expect."""
    lab.reconnect(esp)
    sent, got, secs = _transfer(lab, 100 * 1000 * 1000)
    assert sent == got, f"{esp}: sent {sent}, received {got}"
    child = _charon_child(lab)
    want = {"gcm": "AES_GCM_16", "chacha": "CHACHA20_POLY1305", "sha": "AES_CBC"}
    assert next(v for k, v in want.items() if k in esp) == child["encr"], child
    if "chacha" not in esp:  # charon prints no key size for ChaCha20 (always 256)
        assert child["keysize"] == ("128" if "128" in esp else "256"), child
    assert int(child["bytes_in"]) >= 100 * 1000 * 1000
    t = lab.daemon.tunnels()[0]
    assert t["bytes_out"] >= 100 * 1000 * 1000
    print(f"{esp}: 100 MB in {secs:.1f} s = {800 / secs:.0f} Mbit/s")
    (lab.workdir / f"transfer-{esp}.json").write_text(json.dumps({"seconds": secs}))


def test_hash_of_transfer_is_the_senders(lab: Lab) -> None:
    """The deterministic source's hash is known: a corrupting path could not match it."""
    lab.reconnect(TRANSFORMS[0])
    sent, got, _ = _transfer(lab, 3 * 65536)
    expect = hashlib.sha256(hashlib.sha256(b"oe").digest() * 2048 * 3).hexdigest()
    assert sent == got == f"{3 * 65536} {expect}"


def _capture_inbound_esp(lab: Lab, timeout: float = 5.0) -> bytes:
    """One ESP-in-UDP datagram the peer sent us, as it crossed the router's WAN link."""
    from oe_router.datapath.netns import in_netns

    wan = device_with(lab.router, WAN_R)
    with in_netns(lab.router):
        sniff = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0800))
    try:
        sniff.bind((wan, 0))
        sniff.settimeout(0.5)
        pinger = subprocess.Popen(
            ["ip", "netns", "exec", lab.client, "ping", "-c", "20", "-i", "0.2", WAN_P],
            stdout=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                try:
                    frame = sniff.recv(65535)
                except TimeoutError:
                    continue
                ip = frame[14:]
                ihl = (ip[0] & 0x0F) * 4
                if ip[9] != 17 or socket.inet_ntoa(ip[12:16]) != WAN_P:
                    continue
                udp = ip[ihl:]
                sport, dport = struct.unpack("!HH", udp[:4])
                payload = udp[8:]
                if sport == dport == 4500 and len(payload) > 8 and payload[:4] != bytes(4):
                    return payload
        finally:
            pinger.kill()
            pinger.wait()
    finally:
        sniff.close()
    raise AssertionError("no inbound ESP seen on the WAN link")


def test_replayed_packet_is_dropped_and_counted(lab: Lab) -> None:
    """An ESP packet the peer really sent, sent again: the receiving worker refuses it
    (anti-replay, RFC 4303 3.4.3) and counts it. The same packet with a sequence number
    never seen passes the replay check and fails the ICV (the number is in the AAD): a
    forgery, counted apart. None of them reaches the LAN."""
    lab.reconnect(TRANSFORMS[0])
    esp = _capture_inbound_esp(lab)
    time.sleep(0.5)  # the capture's pings are over
    before = lab.daemon.tunnels()[0]
    seq = int.from_bytes(esp[4:8], "big")
    forged = esp[:4] + (seq + 1000).to_bytes(4, "big") + esp[8:]
    # SO_MARK 0x42: charon's own mark, so the datagrams skip charon's routes into its
    # libipsec (which would wrap them in a fresh ESP packet of its own)
    script = (
        "import socket,sys; s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);"
        "s.setsockopt(socket.SOL_SOCKET,36,0x42);"
        f"s.sendto(bytes.fromhex(sys.argv[1]),('{WAN_R}',4500));"
        f"s.sendto(bytes.fromhex(sys.argv[1]),('{WAN_R}',4500));"
        f"s.sendto(bytes.fromhex(sys.argv[2]),('{WAN_R}',4500))"
    )
    netns_run(lab.peer, [PYTHON, "-c", script, esp.hex(), forged.hex()])

    def counted() -> dict[str, int] | None:
        t = lab.daemon.tunnels()[0]
        ok = t["replay_errors"] >= before["replay_errors"] + 2
        return t if ok and t["integrity_failures"] >= before["integrity_failures"] + 1 else None

    after = lab.daemon.wait_for("replay and forgery counted", counted, 5)
    assert after["packets_in"] == before["packets_in"], "a replayed or forged packet got in"


def test_rekey_under_traffic_keeps_the_transfer_byte_exact(lab: Lab) -> None:
    """charon rekeys the Child SA in the middle of a 60 MB transfer: new SPIs on both
    sides, the old SA gone, and the receiver's hash still equals the sender's."""
    lab.reconnect(TRANSFORMS[0])
    old = {c["spi_in"] for t in lab.daemon.status()["tunnels"] for c in t.get("children", ())}

    def rekey_soon() -> None:
        time.sleep(0.6)
        lab.charon.swanctl("--rekey", "--child", "ours-c")

    import threading

    th = threading.Thread(target=rekey_soon)
    th.start()
    sent, got, _ = _transfer(lab, 60 * 1000 * 1000, port=5202)
    th.join()
    assert sent == got, f"sent {sent}, received {got}"

    def rekeyed() -> set[str] | None:
        now = {c["spi_in"] for t in lab.daemon.status()["tunnels"] for c in t.get("children", ())}
        return now if now and not now & old else None

    lab.daemon.wait_for("new Child SA SPIs after the rekey", rekeyed, 15)
    assert _ping(lab, 3) == 3
