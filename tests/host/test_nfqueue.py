"""NfQueue on the real kernel: packets are held, released, dropped, and fail closed.

Two namespaces joined by a veth: S (10.77.0.1) sends UDP to P (10.77.0.2). S's output
hook queues UDP to port 9000 into NFQUEUE 11; the test reads the queue with NfQueue and
decides. Delivery is checked with a UDP socket in P. The queueing rule uses nft's
``queue`` where the kernel has it and the xt NFQUEUE target through nft_compat where it
does not (this CI host: CONFIG_NFT_QUEUE unset), the same choice datapath.nft_spd makes.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
from dataclasses import dataclass

import pytest

from oe_router.datapath.netns import in_netns
from oe_router.datapath.nfqueue import NfQueue, NfQueueError
from oe_router.datapath.nft_spd import apply_script, insert_xt_queue, queue_backend
from tests.host.netlab import MakeNetns
from tests.host.netlab import ip as _ip

pytestmark = pytest.mark.host

QNUM = 11
PORT = 9000
S_ADDR, P_ADDR = "10.77.0.1", "10.77.0.2"


@dataclass
class Pair:
    s: str
    p: str
    backend: str

    def queue_rule(self, *, bypass: bool = False) -> None:
        """(Re)write S's table: UDP to P:PORT goes to NFQUEUE QNUM."""
        xt = self.backend == "xt"
        verdict = "drop" if xt else f"queue {'flags bypass ' if bypass else ''}num {QNUM}"
        apply_script(
            "table inet nfq_test\ndelete table inet nfq_test\n"
            "table inet nfq_test {\n"
            "\tchain out {\n\t\ttype filter hook output priority 0; policy accept;\n"
            f"\t\tip daddr {P_ADDR} udp dport {PORT} goto q\n\t}}\n"
            f"\tchain q {{\n\t\t{verdict}\n\t}}\n}}\n",
            netns=self.s,
        )
        if xt:
            insert_xt_queue(QNUM, table="nfq_test", chain="q", bypass=bypass, netns=self.s)

    def sender(self) -> socket.socket:
        with in_netns(self.s):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.connect((P_ADDR, PORT))
        return sock

    def receiver(self) -> socket.socket:
        with in_netns(self.p):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        sock.bind((P_ADDR, PORT))
        return sock


@pytest.fixture
def pair(make_netns: MakeNetns) -> Pair:
    s, p = make_netns("oe-nqs"), make_netns("oe-nqp")
    _ip("-n", s, "link", "add", "v0", "type", "veth", "peer", "name", "v0", "netns", p)
    for ns, addr in ((s, S_ADDR), (p, P_ADDR)):
        _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", "v0")
        _ip("-n", ns, "link", "set", "v0", "up")
    pr = Pair(s, p, queue_backend(netns=s))
    pr.queue_rule()
    return pr


def _read(q: NfQueue, n: int, timeout: float = 2.0) -> list:  # type: ignore[type-arg]
    got: list = []  # type: ignore[type-arg]
    deadline = time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        batch = q.read_packets()
        if not batch:
            time.sleep(0.002)
        got += batch
    return got


def _received(sock: socket.socket, timeout: float) -> list[bytes]:
    sock.settimeout(timeout)
    out = []
    try:
        while True:
            out.append(sock.recv(65535))
            sock.settimeout(0.05)
    except TimeoutError:
        pass
    return out


def test_nfnetlink_queue_is_usable_here(pair: Pair) -> None:
    """What this kernel offers (reported): nfnetlink_queue bound, and which rule form."""
    with NfQueue(QNUM, netns=pair.s):
        status = subprocess.run(
            ["ip", "netns", "exec", pair.s, "cat", "/proc/net/netfilter/nfnetlink_queue"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
    assert status[0] == str(QNUM)  # queue number, then portid, queue total, copy mode...
    assert status[3] == "2"  # NFQNL_COPY_PACKET
    print(f"queue rule backend on this kernel: {pair.backend}")


def test_payload_read_and_accept_delivers(pair: Pair) -> None:
    rx, tx = pair.receiver(), pair.sender()
    with NfQueue(QNUM, netns=pair.s) as q:
        tx.send(b"first packet")
        (pkt,) = _read(q, 1)
        assert pkt.payload[20 + 8 :] == b"first packet"  # IPv4 (no options) + UDP header
        assert pkt.payload[12:16] == socket.inet_aton(S_ADDR)
        assert (pkt.hook, pkt.hw_protocol, pkt.family) == (3, 0x0800, 2)  # LOCAL_OUT, IPv4
        assert pkt.length == len(pkt.payload) and not pkt.truncated
        assert pkt.outdev is not None and pkt.indev is None
        assert _received(rx, 0.3) == []  # held, not observed: nothing reached P yet
        q.verdict(pkt.id, True)
        assert _received(rx, 1.0) == [b"first packet"]


def test_drop_verdict_is_not_delivered(pair: Pair) -> None:
    rx, tx = pair.receiver(), pair.sender()
    with NfQueue(QNUM, netns=pair.s) as q:
        tx.send(b"doomed")
        (pkt,) = _read(q, 1)
        q.verdict(pkt.id, False)
        tx.send(b"kept")
        (pkt2,) = _read(q, 1)
        q.verdict(pkt2.id, True)
        assert _received(rx, 1.0) == [b"kept"]


def test_held_one_second_then_accepted_arrives_late(pair: Pair) -> None:
    rx, tx = pair.receiver(), pair.sender()
    with NfQueue(QNUM, netns=pair.s) as q:
        t0 = time.monotonic()
        tx.send(b"held")
        (pkt,) = _read(q, 1)
        time.sleep(1.0)
        assert _received(rx, 0.01) == []
        q.verdict(pkt.id, True)
        assert _received(rx, 1.0) == [b"held"]
        assert time.monotonic() - t0 >= 1.0


def test_without_a_reader_packets_fail_closed_unless_bypass(pair: Pair) -> None:
    rx, tx = pair.receiver(), pair.sender()
    tx.send(b"nobody bound")
    assert _received(rx, 0.5) == []  # no process bound: the kernel drops
    pair.queue_rule(bypass=True)  # fail open, explicitly
    tx.send(b"bypassed")
    assert _received(rx, 1.0) == [b"bypassed"]


def test_full_queue_drops_unless_fail_open(pair: Pair) -> None:
    rx, tx = pair.receiver(), pair.sender()
    with NfQueue(QNUM, netns=pair.s, maxlen=2) as q:
        for i in range(5):
            tx.send(b"closed %d" % i)
        held = _read(q, 2, timeout=0.5)
        assert len(held) == 2  # the other 3 found the queue full and were dropped
        q.verdict_batch(held[-1].id, True)
        assert sorted(_received(rx, 1.0)) == [b"closed 0", b"closed 1"]
    with NfQueue(QNUM, netns=pair.s, maxlen=2, fail_open=True) as q:
        for i in range(5):
            tx.send(b"open %d" % i)
        assert sorted(_received(rx, 1.0)) == [b"open 2", b"open 3", b"open 4"]  # overflow passed
        held = _read(q, 2, timeout=0.5)
        q.verdict_batch(held[-1].id, True)
        assert sorted(_received(rx, 1.0)) == [b"open 0", b"open 1"]


def test_second_binder_is_refused_with_the_queue_named(pair: Pair) -> None:
    with NfQueue(QNUM, netns=pair.s), pytest.raises(NfQueueError) as err:
        NfQueue(QNUM, netns=pair.s).open()
    assert f"NFQUEUE {QNUM}" in str(err.value)
    assert "another process" in str(err.value)


@pytest.mark.parametrize("mode", ["batch", "single"])
def test_throughput_read_and_verdict_in_batches(pair: Pair, mode: str) -> None:
    """Packets/s through read_packets + verdicts (the sender shares this process).

    "batch": one NFQNL_MSG_VERDICT_BATCH per burst; "single": one NFQNL_MSG_VERDICT per
    packet, all of a burst in one send (what a daemon deciding per flow does).
    """
    tx = pair.sender()
    apply_script(  # count arrivals in P (a socket buffer would overflow first)
        "table inet cnt {\n\tcounter arrived {}\n\tchain in {\n"
        "\t\ttype filter hook input priority 0;\n"
        f"\t\tudp dport {PORT} counter name arrived drop\n\t}}\n}}\n",
        netns=pair.p,
    )
    total, burst = 20_000, 200
    busy = 0.0
    with NfQueue(QNUM, netns=pair.s, maxlen=4 * burst) as q:
        t0 = time.perf_counter()
        sent = 0
        while sent < total:
            for _ in range(burst):
                tx.send(b"x" * 64)
            sent += burst
            b0 = time.perf_counter()
            got = _read(q, burst)
            assert len(got) == burst
            if mode == "batch":
                q.verdict_batch(got[-1].id, True)
            else:
                q.verdicts((p.id, True) for p in got)
            busy += time.perf_counter() - b0
        elapsed = time.perf_counter() - t0
    time.sleep(0.2)
    listing = subprocess.run(
        ["ip", "netns", "exec", pair.p, "nft", "-j", "list", "counter", "inet", "cnt", "arrived"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    delivered = json.loads(listing)["nftables"][1]["counter"]["packets"]
    rate, qrate = total / elapsed, total / busy
    print(f"NFQUEUE ({mode}): {rate:,.0f} pkt/s send+read+verdict, {qrate:,.0f} pkt/s read+verdict")
    assert delivered == total
    assert qrate > 10_000  # far above first-packet rates; a regression guard, not a goal
