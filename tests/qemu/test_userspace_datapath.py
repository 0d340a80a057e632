"""The userspace ESP datapath in the router VM, against libreswan's kernel ESP, with the
virtio-crypto engine carrying the CBC transforms, a fault injected into it, and the OE policy
matrix.

Why in QEMU: the host has neither ESP nor AF_ALG; the router VM has both, a virtio-crypto
device, and libreswan OE peers around it. ``oe.global.datapath userspace`` forces the
userspace datapath although this kernel has ESP.

One daemon for the module (started once): datapath userspace, ``offload
virtio_crypto_aes_cbc``, ESP proposal ``aes256-sha256`` only (libreswan's default ESP
proposals accept AES_CBC_256 with HMAC_SHA2_256_128), canary every second, the policy
matrix rows of our groups private-or-clear, private and clear, and
``OE_ROUTER_FAULT=afalg:virtio_crypto_aes_cbc:corrupt_when=/tmp/oe-fault`` in its
environment (the engine corrupts what it seals while the file exists, in the daemon and in
both workers).

Evidence comes from the wire (captures on the router's WAN cable and the client's LAN cable,
on the world side), the peers' kernels (libreswan's SAs and ICV failure counters), the
client's bytes (SHA-256 of what it fetched) and the virtio device's interrupt count; the
daemon's own status is checked against them.

The lab's firewall has the datapath's TUN device (oe-esp0) in its wan zone, as the package's
uci-defaults put it on OpenWrt: fw4 forwards only between zones.
"""

from __future__ import annotations

import itertools
import re
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import oelab
from lab import Lab, Result

pytestmark = pytest.mark.qemu

RESULTS = Path(__file__).resolve().parents[2] / "test-results" / "qemu-userspace-datapath.json"
DRIVER = "virtio_crypto_aes_cbc"
VIRTIO = f"afalg:{DRIVER}"
TRANSFORM = "aes256-sha256"
FAULT_FILE = "/tmp/oe-fault"
OURS = ("private-or-clear", "private", "clear")
CELLS = [(o, t) for o in OURS for t in oelab.MATRIX_GROUPS]
BLOB = "oe-userspace-blob.bin"
BLOB_BYTES = 1_000_000
OPTIONS: dict[str, str | list[str]] = {
    "global.datapath": "userspace",
    "global.offload": DRIVER,
    "global.offload_canary": "1s",
    "global.keep_private_on_stop": "0",
    "ike.esp_proposal": [TRANSFORM],
    # ten OE negotiations at once with one emulated pluto (the matrix): see test_oe_matrix
    "ike.retransmit_timeout": "1s",
}
ESP_IN_UDP = "udp port 4500 and udp[8:4] != 0"


@pytest.fixture(scope="module")
def userspace(lab: Lab) -> Iterator[Lab]:
    """The module's daemon, once the virtio engine runs the CBC transforms (it is proven and
    the background measurements are done: traffic tests do not race start-up work)."""
    lab.router(f"rm -f {FAULT_FILE}").check()
    oelab.start_daemon(
        lab,
        options=OPTIONS,
        extra_config=oelab.matrix_policies(OURS),
        env={"OE_ROUTER_FAULT": f"{VIRTIO}:corrupt_when={FAULT_FILE}"},
        timeout=60,
    )
    try:

        def ready() -> bool:
            doc = oelab.offload_report(lab)
            bands = doc["table"]["transforms"][TRANSFORM]["bands"]
            return doc["phase"] == "ready" and bands == [{"engine": VIRTIO, "max_size": None}]

        oelab.wait_until("the virtio engine in the table, start-up work done", ready, 240, 2)
        yield lab
    finally:
        oelab.stop_daemon(lab)
        lab.router(f"rm -f {FAULT_FILE}")


@pytest.fixture(scope="module")
def blob(lab: Lab) -> Iterator[str]:
    """A random file on oe-null's web server; its SHA-256."""
    path = f"{lab.state_dir('oe-null')}/www/{BLOB}"
    res = lab.world(f"head -c {BLOB_BYTES} /dev/urandom > {path} && sha256sum {path}").check()
    try:
        yield res.stdout.split()[0]
    finally:
        lab.world(f"rm -f {path}")


def tunnel(lab: Lab, peer: str) -> dict[str, Any]:
    """The OE tunnel row of ``peer`` in `oe status` (Child SA counters, engine)."""
    doc = oelab.status(lab)
    rows = [t for t in doc["tunnels"] if t.get("source") != "ike" and t["peer"] == peer]
    assert rows, f"no tunnel with {peer} in oe status: {doc['tunnels']}"
    return dict(rows[0])


def ike_child(lab: Lab, peer: str) -> dict[str, Any]:
    doc = oelab.status(lab)
    rows = [
        t
        for t in doc["tunnels"]
        if t.get("source") == "ike" and t["peer"] == peer and t.get("children")
    ]
    assert rows, f"no IKE SA with a Child SA with {peer}: {doc['tunnels']}"
    return dict(rows[0]["children"][0])


def whack(lab: Lab, netns: str, what: str) -> str:
    ctl = f"{lab.state_dir(netns)}/run/pluto.ctl"
    return lab.host(netns, f"ipsec whack --ctlsocket {ctl} {what}", timeout=30).check().stdout


def peer_bytes(lab: Lab, netns: str, us: str) -> tuple[int, int]:
    """(inBytes, outBytes) of libreswan's SA with ``us`` (--trafficstatus)."""
    for line in whack(lab, netns, "--trafficstatus").splitlines():
        m = re.search(r"inBytes=(\d+), outBytes=(\d+)", line)
        if us in line and m:
            return int(m.group(1)), int(m.group(2))
    raise AssertionError(f"libreswan in {netns} lists no SA with {us}")


def peer_icv_failures(lab: Lab, netns: str) -> int:
    """ESP packets the peer's kernel refused (XfrmInStateProtoError: ICV failed)."""
    text = lab.host(netns, "cat /proc/net/xfrm_stat").check().stdout
    m = re.search(r"XfrmInStateProtoError\s+(\d+)", text)
    assert m, text
    return int(m.group(1))


def peer_sa_integrity_failed(lab: Lab, netns: str, us: str) -> int:
    """ICV failures the peer's SAs from ``us`` counted (`ip -s xfrm state`: stats failed)."""
    text = lab.host(netns, "ip -s xfrm state").check().stdout
    blocks = [b for b in re.split(r"\n(?=src )", text) if b.startswith(f"src {us} ")]
    return sum(int(m) for b in blocks for m in re.findall(r"replay \d+ failed (\d+)", b))


def peer_sa_algorithms(lab: Lab, netns: str, us: str) -> list[str]:
    """The peer's SA from ``us``: algorithm, key bits, ICV bits, encapsulation (never keys)."""
    text = lab.host(netns, "ip -s xfrm state").check().stdout
    out: list[str] = []
    for block in re.split(r"\n(?=src )", text):
        if block.startswith(f"src {us} "):
            for kind, name, bits, icv in re.findall(
                r"^\s*(auth-trunc|enc|aead) (\S+) \S+ \((\d+) bits\)(?: (\d+))?", block, re.M
            ):
                out.append(f"{kind} {name} {bits}" + (f" icv {icv}" if icv else ""))
            out += [f"encap {e}" for e in re.findall(r"encap type (\S+)", block)]
    return out


def test_status_names_the_userspace_datapath_and_why(
    userspace: Lab, figures: dict[str, Any]
) -> None:
    """`oe status` says userspace-esp and why, on a kernel that has ESP; the datapath's kernel
    objects exist: TUN device, NFQUEUE 4500 bound, the nftables projection, two workers."""
    lab = userspace
    figures["engine table (offload virtio_crypto_aes_cbc)"] = oelab.offload_rows(
        oelab.offload_report(lab)
    )
    doc = oelab.status(lab)
    dp = doc["daemon"]["datapath"]
    assert dp.startswith("userspace-esp ("), dp
    assert "oe.global.datapath is userspace" in dp, dp
    assert lab.router("grep -qw esp4 /proc/modules").rc == 0, "the router kernel lacks esp4"
    lab.router("ip link show oe-esp0").check()
    queues = lab.router("cat /proc/net/netfilter/nfnetlink_queue").check().stdout
    assert any(line.split()[0] == "4500" for line in queues.splitlines()), queues
    lab.router("nft list table inet oe_spd").check()
    workers = lab.router("pgrep -f 'oe_router.datapath.worker (tx|rx)'").check().stdout.split()
    assert len(workers) == 2, workers


def test_first_packets_are_held_and_leave_as_esp_in_udp(
    userspace: Lab, figures: dict[str, Any]
) -> None:
    """Packet trigger on the userspace datapath, no SA yet: a ping to oe-null and an HTTP
    fetch from ls-b (both libreswan NULL-OE responders). The first echo and the first SYN
    are held while IKE runs and sent into the new SA: every echo is answered, every SYN the
    client sent reached ls-b through the tunnel (one SYN when IKE beat TCP's 1 s
    retransmit), and the WAN shows ESP in UDP 4500 only (no raw ESP, 0 cleartext)."""
    lab = userspace
    null, lsb = lab.plan.host("oe-null").ipv4, lab.plan.host("ls-b").ipv4
    assert not {"oe-null", "ls-b"} & set(lab.failed_hosts), lab.failed_hosts
    before = oelab.status(lab)["daemon"]["datapath_stats"]
    syn = "tcp dst port 80 and tcp[tcpflags] & tcp-syn != 0"
    with (
        lab.capture("eth0", netns="client", label="us-lan") as lan,
        lab.capture_wan(bpf=f"host {null} or host {lsb}", label="us-wan") as wan,
        # inside ls-b: what its kernel decrypted and delivered (LAB-NOTES: an endpoint's
        # incoming capture shows the decrypted packets re-injected)
        lab.capture("eth0", netns="ls-b", bpf=syn, label="us-ls-b-in", direction="in") as srv,
    ):
        ping = lab.client(f"ping -n -c 5 -i 0.2 -W 5 {null}", timeout=60)
        curl = lab.client(
            f"curl -4 -s -m 20 -w '\\n%{{http_code}} %{{time_connect}}' http://{lsb}/", timeout=40
        )
    seqs = sorted(int(s) for s in re.findall(r"icmp_seq=(\d+)", ping.stdout))
    assert seqs == [1, 2, 3, 4, 5], ping.stdout
    body, _, tail = curl.stdout.rpartition("\n")
    code, connect = tail.split()
    assert code == "200" and "lab host ls-b" in body, curl.stdout + curl.stderr
    syns = lan.count(f"dst {lsb} and {syn}")
    arrived = srv.count(f"src {lab.plan.router_wan4}")
    assert syns >= 1 and arrived == syns, f"the client sent {syns} SYNs, ls-b got {arrived}"
    if float(connect) < 1.0:  # answered before TCP's 1 s retransmit: one SYN, the first
        assert syns == 1, f"{syns} SYNs, connected after {connect} s"
    for peer in (null, lsb):
        assert wan.count(f"host {peer} and esp") == 0, "raw ESP: not the userspace datapath"
        assert wan.count(f"host {peer} and (icmp or tcp)") == 0, wan.text(f"host {peer}")
        assert wan.count(f"src {peer} and {ESP_IN_UDP}") >= 4
        assert wan.count(f"dst {peer} and {ESP_IN_UDP}") >= 4
        assert ike_child(lab, peer)["udp_encap"] is True
    assert lab.plan.router_wan4 in whack(lab, "oe-null", "--trafficstatus")
    after = oelab.status(lab)["daemon"]["datapath_stats"]
    held = after["held"] - before["held"]
    released = after["released_into_sa"] - before["released_into_sa"]
    assert held >= 2 and released >= 2, after  # at least the first echo and the first SYN
    assert after["hold_expired"] == before["hold_expired"], after
    assert after["hold_overflow"] == before["hold_overflow"], after
    figures["first packets"] = {
        "ping_rtt_ms": re.findall(r"time=([\d.]+) ms", ping.stdout),
        "curl_connect_s": float(connect),
        "client_syns": syns,
        "syns_at_ls_b": arrived,
        "held": held,
        "released_into_sa": released,
        "esp_in_udp_packets": wan.count(ESP_IN_UDP),
    }


def test_virtio_engine_carries_real_esp(userspace: Lab, blob: str, figures: dict[str, Any]) -> None:
    """AF_ALG bound to virtio_crypto_aes_cbc runs authenc(hmac(sha256),cbc(aes)) for the SA
    with oe-null: `oe status` names the engine, the virtio device's interrupts grow with the
    packets (beyond its idle rate: the canaries' own work), libreswan's kernel decrypts what
    we sealed (its inBytes grow, no ICV failure) and the client's 1 MB is byte-exact."""
    lab = userspace
    null = lab.plan.host("oe-null").ipv4
    wan4 = lab.plan.router_wan4
    child = ike_child(lab, null)
    assert child["transform"].startswith("AES_CBC_256/HMAC_SHA2_256_128"), child
    assert tunnel(lab, null)["engine"] == VIRTIO
    algs = peer_sa_algorithms(lab, "oe-null", wan4)
    assert sorted(algs) == [
        "auth-trunc hmac(sha256) 256 icv 128",
        "enc cbc(aes) 256",
        "encap espinudp",
    ], algs
    dev, _ = oelab.virtio_crypto_device(lab)

    i0, t0 = oelab.virtio_crypto_interrupts(lab, dev), time.monotonic()
    time.sleep(3)
    i1, t1 = oelab.virtio_crypto_interrupts(lab, dev), time.monotonic()
    idle_rate = (i1 - i0) / (t1 - t0)
    row0, peer0, icv0 = (
        tunnel(lab, null),
        peer_bytes(lab, "oe-null", wan4),
        peer_icv_failures(lab, "oe-null"),
    )
    t2 = time.monotonic()
    got = lab.client(
        f"curl -sS -m 120 -o /tmp/{BLOB} -w '%{{speed_download}}\\n' http://{null}/{BLOB} "
        f"&& sha256sum /tmp/{BLOB} && rm -f /tmp/{BLOB}",
        timeout=150,
    ).check()
    t3 = time.monotonic()
    i3 = oelab.virtio_crypto_interrupts(lab, dev)
    row1, peer1, icv1 = (
        tunnel(lab, null),
        peer_bytes(lab, "oe-null", wan4),
        peer_icv_failures(lab, "oe-null"),
    )
    assert blob in got.stdout, f"the client's copy differs: {got.stdout}"
    pkts = (row1["packets_in"] - row0["packets_in"]) + (row1["packets_out"] - row0["packets_out"])
    sealed = row1["bytes_out"] - row0["bytes_out"]
    assert row1["bytes_in"] - row0["bytes_in"] >= BLOB_BYTES, (row0, row1)
    assert pkts >= BLOB_BYTES // 1400, (row0, row1)
    work = (i3 - i1) - idle_rate * (t3 - t1)
    assert work >= 0.5 * pkts, (
        f"virtio raised {i3 - i1} interrupts over {t3 - t1:.1f} s (idle {idle_rate:.1f}/s) "
        f"for {pkts} ESP packets: the engine did not run them"
    )
    assert peer1[0] - peer0[0] >= sealed, f"libreswan decrypted {peer1[0] - peer0[0]} of {sealed}"
    assert icv1 == icv0, f"libreswan refused {icv1 - icv0} of our packets"
    assert row1["integrity_failures"] == 0 and row1["replay_errors"] == 0, row1
    figures["virtio esp"] = {
        "transform": child["transform"],
        "engine": row1["engine"],
        "peer_algorithms": algs,
        "download_bytes_per_s": float(got.stdout.split()[0]),
        "download_s": round(t3 - t2, 2),
        "esp_packets": pkts,
        "virtio_interrupts": i3 - i1,
        "virtio_idle_interrupts_per_s": round(idle_rate, 1),
        "peer_in_bytes": peer1[0] - peer0[0],
        "our_out_bytes": sealed,
    }


def _datagrams(pcap: Path, src: str, dst: str) -> list[bytes]:
    """IPv4 packets ``src`` -> ``dst`` carrying ESP in UDP 4500, from an Ethernet pcap."""
    data = pcap.read_bytes()
    if data[:4] not in (b"\xd4\xc3\xb2\xa1", b"\xa1\xb2\xc3\xd4"):
        raise AssertionError(f"{pcap}: not a pcap file")
    order = "<" if data[:4] == b"\xd4\xc3\xb2\xa1" else ">"
    record = struct.Struct(order + "IIII")
    out, pos = [], 24
    s, d = socket.inet_aton(src), socket.inet_aton(dst)
    while pos + record.size <= len(data):
        _, _, incl, _ = record.unpack_from(data, pos)
        frame = data[pos + record.size : pos + record.size + incl]
        pos += record.size + incl
        ip = frame[14:]
        if frame[12:14] != b"\x08\x00" or len(ip) < 36 or ip[9] != 17:
            continue
        hl = (ip[0] & 0xF) * 4
        udp = ip[hl : hl + 8]
        esp = ip[hl + 8 :]
        if ip[12:16] == s and ip[16:20] == d and udp[2:4] == b"\x11\x94" and esp[:4] != bytes(4):
            out.append(bytes(ip[: int.from_bytes(ip[2:4], "big")]))
    return out


# Runs in the world VM: send the IPv4 packets given in hex as they are (IP_HDRINCL).
_SEND_RAW = (
    "import socket, sys\n"
    "s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)\n"
    "for h in sys.argv[1:]:\n"
    "    p = bytes.fromhex(h)\n"
    "    s.sendto(p, (socket.inet_ntoa(p[16:20]), 0))\n"
)


def _ping_record(text: str) -> tuple[list[tuple[float, int]], int]:
    """[(epoch, seq)] of the replies in `ping -D` output, and the packets transmitted."""
    replies = [
        (float(t), int(s))
        for t, s in re.findall(r"\[(\d+\.\d+)\] \d+ bytes from .*icmp_seq=(\d+)", text)
    ]
    sent = re.search(r"(\d+) packets transmitted", text)
    return replies, int(sent.group(1)) if sent else 0


def test_forged_and_replayed_esp_to_us_are_dropped_and_counted(
    userspace: Lab, figures: dict[str, Any]
) -> None:
    """Our receive side checks what the engine opens: a real ESP datagram from oe-null,
    captured on its cable and sent again (with its source address), is refused as a replay;
    the same with a sequence number not seen yet and one ciphertext byte flipped fails its
    ICV (on the virtio engine's open). Both are counted in `oe status` and reach no one."""
    lab = userspace
    null, wan4 = lab.plan.host("oe-null").ipv4, lab.plan.router_wan4
    assert tunnel(lab, null)["engine"] == VIRTIO
    with lab.capture_host("oe-null", label="us-forge") as cap:
        lab.client(f"ping -n -c 3 -i 0.2 -W 2 {null}", timeout=30).check()
    sent = _datagrams(cap.path, null, wan4)
    assert sent, f"no ESP in UDP from {null} to {wan4} in the capture"
    ip = sent[-1]
    hl = (ip[0] & 0xF) * 4
    esp = hl + 8  # after the UDP header: SPI, sequence number, IV, ciphertext, ICV
    seq = int.from_bytes(ip[esp + 4 : esp + 8], "big")
    forged = bytearray(ip)
    forged[esp + 4 : esp + 8] = (seq + 100).to_bytes(4, "big")  # new to the replay window
    forged[esp + 8 + 16 + 4] ^= 0x40  # a ciphertext byte
    before = tunnel(lab, null)
    with lab.capture("eth0", netns="client", label="us-forge-lan", bpf=f"host {null}") as lan:
        (lab.run_dir / "send_raw.py").write_text(_SEND_RAW)
        # from the world's own netns, on oe-null's cable: oe-null's kernel would put them
        # into its tunnel to us (its OE policy covers all its traffic to the router)
        lab.world(f"python3 /lab/send_raw.py {ip.hex()} {bytes(forged).hex()}").check()
        time.sleep(1.0)  # the workers publish their counters ten times a second
    after = tunnel(lab, null)
    assert after["replay_errors"] - before["replay_errors"] == 1, (before, after)
    assert after["integrity_failures"] - before["integrity_failures"] == 1, (before, after)
    assert after["packets_in"] == before["packets_in"], (before, after)
    assert lan.count() == 0, lan.text()
    figures["forged and replayed"] = {
        "replay_errors": after["replay_errors"],
        "integrity_failures": after["integrity_failures"],
        "reached_the_lan": lan.count(),
    }


def test_fault_injection_canary_moves_the_sa_to_software(
    userspace: Lab, blob: str, figures: dict[str, Any]
) -> None:
    """The virtio engine starts corrupting what it seals (the fault file appears) while it
    carries the oe-null SA under a ping every 20 ms and a rate-limited 1 MB download. The
    canary (every 1 s) catches it within its interval, the table and both workers move the
    CBC transforms to software, and traffic recovers. The peer's kernel dropped the
    corrupt packets (counted: its ICV failures); nothing corrupt reached the client: the
    download that spanned the fault and one after it are byte-exact, and our receive side
    saw no ICV failure."""
    lab = userspace
    null = lab.plan.host("oe-null").ipv4
    wan4 = lab.plan.router_wan4
    row0 = tunnel(lab, null)
    assert row0["engine"] == VIRTIO
    icv0 = peer_icv_failures(lab, "oe-null")
    sa_failed0 = peer_sa_integrity_failed(lab, "oe-null", wan4)
    pings = 400  # every 20 ms: a packet to corrupt whenever the canary happens to run
    traffic: dict[str, Result] = {}

    def client() -> None:
        traffic["run"] = lab.client(
            f"rm -f /tmp/f.*; ( ping -D -n -i 0.02 -c {pings} -W 1 {null} > /tmp/f.ping 2>&1 & "
            f"curl -sS -m 100 --limit-rate 150k -o /tmp/f.slow http://{null}/{BLOB} "
            "> /tmp/f.curl 2>&1; echo curl=$?; wait ); sha256sum /tmp/f.slow; cat /tmp/f.ping",
            timeout=180,
        )

    runner = threading.Thread(target=client)
    runner.start()
    try:
        time.sleep(3)  # traffic flowing on virtio first
        watch = oelab.act_and_watch(
            lab,
            f"touch {FAULT_FILE}",
            {
                "detected": f"engine {VIRTIO} taken off {TRANSFORM}",
                "moved": f"{TRANSFORM}: software",
            },
            limit=15,
        )
    finally:
        runner.join(200)
        lab.router(f"rm -f {FAULT_FILE}")
    res = traffic["run"].check()
    assert "curl=0" in res.stdout and blob in res.stdout, res.stdout + res.stderr
    replies, sent = _ping_record(res.stdout)
    seqs = [s for _, s in replies]
    lost = sorted(set(range(1, sent + 1)) - set(seqs))
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(replies)]
    assert sent == pings, res.stdout[-500:]
    assert "wrong data" not in res.stdout, "a corrupt echo reply reached the client"
    assert set(range(sent - 20, sent + 1)) <= set(seqs), f"traffic did not recover: lost {lost}"

    assert "detected" in watch["seen"], f"the canary did not catch the fault: {watch}"
    assert "moved" in watch["seen"], f"the table did not move {TRANSFORM}: {watch}"
    detected, moved = watch["seen"]["detected"][0], watch["seen"]["moved"][0]
    assert detected <= 1.0 + 1.0, f"detected after {detected} s (canary every 1 s): {watch}"
    assert moved <= detected + 1.0, watch

    after = lab.client(
        f"curl -sS -m 120 -o /tmp/{BLOB} http://{null}/{BLOB} && sha256sum /tmp/{BLOB} "
        f"&& rm -f /tmp/{BLOB}",
        timeout=150,
    ).check()
    assert blob in after.stdout, f"the download after recovery differs: {after.stdout}"
    dropped = peer_icv_failures(lab, "oe-null") - icv0
    sa_failed = peer_sa_integrity_failed(lab, "oe-null", wan4) - sa_failed0
    assert dropped > 0, "the peer refused nothing: the fault never reached the wire"
    assert sa_failed == dropped, f"the peer's SA counted {sa_failed}, its kernel {dropped}"
    row = tunnel(lab, null)
    assert row["engine"] == "software", row
    for counter in ("integrity_failures", "replay_errors"):
        assert row[counter] == row0[counter], (row0, row)  # nothing corrupt came to us
    assert wan4 in whack(lab, "oe-null", "--trafficstatus")  # the same SA lives on

    doc = oelab.offload_report(lab)
    v = next(e for e in doc["engines"] if e["name"] == VIRTIO)
    vrow = next(t for t in v["transforms"] if t["transform"] == TRANSFORM)
    assert vrow["kat"] == "failed", vrow
    assert "canary" in vrow["reason"] or "reported by the datapath" in vrow["reason"], vrow
    assert doc["table"]["transforms"][TRANSFORM]["bands"] == [
        {"engine": "software", "max_size": None}
    ], doc["table"]
    figures["fault injection"] = {
        "canary_interval_s": 1.0,
        "detected_after_s": detected,  # since `touch` started (it took touch_s)
        "touch_s": watch["action_s"],
        "detected_by": watch["seen"]["detected"][1],
        "sa_moved_after_s": moved,
        "peer_icv_failures": dropped,
        "peer_sa_integrity_failed": sa_failed,
        "pings_sent": sent,
        "pings_lost": len(lost),
        "lost_seqs": lost,
        "longest_reply_gap_s": round(max(gaps), 3) if gaps else None,
        "download_during_fault": "byte-exact",
        "download_after": "byte-exact",
        "our_integrity_failures": row["integrity_failures"] - row0["integrity_failures"],
    }


@pytest.fixture(scope="module")
def matrix(userspace: Lab) -> dict[tuple[str, str], oelab.MatrixCell]:
    """The policy matrix rows of our groups private-or-clear, private and clear, all cells'
    traffic at once (one traffic window), on the userspace datapath."""
    assert "ls-m" not in userspace.failed_hosts, userspace.failed_hosts.get("ls-m")
    return oelab.matrix_traffic(userspace, CELLS, label="us-matrix")


@pytest.mark.parametrize(("ours", "theirs"), CELLS, ids=[f"{o}-x-{t}" for o, t in CELLS])
def test_policy_matrix_cell(
    matrix: dict[tuple[str, str], oelab.MatrixCell],
    ours: str,
    theirs: str,
    figures: dict[str, Any],
) -> None:
    """Each cell as libreswan's own newoe tests expect it (oelab.MATRIX_EXPECTED): ESP, clear,
    or dropped with 0 cleartext for private."""
    c = matrix[(ours, theirs)]
    figures.setdefault("policy matrix", {})[f"{ours} x {theirs}"] = vars(c)
    problems = oelab.matrix_problems(ours, theirs, c)
    where = f"ours={ours} libreswan={theirs} ({oelab.matrix_address(ours, theirs)}): {vars(c)}"
    assert not problems, f"{where}: {'; '.join(problems)}"
