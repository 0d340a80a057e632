"""The userspace datapath's tx worker seals from two threads: its tx loop and its control
thread (``send``: held first packets released into their SA), while the control thread
may swap an SA's ciphers (a canary failure, a new engine table). One cipher and one
sequence counter are not for two threads at once: in the QEMU run the tx worker died with
``RuntimeError: Already borrowed`` from ``cryptography`` and every tunnel after it was
silent. Here both paths hammer one SA with the real software engine."""

from __future__ import annotations

import os
import socket
import struct
import sys
import threading

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from oe_router.datapath.worker import Worker
from oe_router.datapath.workerctl import SharedCounters
from oe_router.offload import make_engine

PACKETS = 8000


def test_two_senders_and_cipher_swaps_share_one_sa_safely() -> None:
    ctl, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    rx.settimeout(2)
    r, w = os.pipe()
    interval = sys.getswitchinterval()
    counters = SharedCounters()
    worker = Worker("tx", ctl, r, counters, make_engine)
    try:
        worker.socks["192.0.2.1"] = tx
        add = {
            "op": "add_out", "slot": 2, "transform": "aes256-sha256", "spi": 0x1234,
            "encr_key": "11" * 32, "integ_key": "22" * 32, "esn": False,
            "dst": "198.51.100.2", "port": 4500, "src": "192.0.2.1",
            "local_ts": ["192.0.2.1/32"], "remote_ts": ["198.51.100.2/32"],
        }  # fmt: skip
        worker.handle(add, [])
        st = worker.out_by_slot[2]
        st.dest = rx.getsockname()  # every sealed packet lands in rx
        pkt = bytes([0x45]) + bytes(19) + os.urandom(1380)
        errors: list[BaseException] = []
        seqs: list[int] = []
        garbled: list[int] = []
        key = bytes.fromhex("11" * 32)

        def receive() -> None:
            while True:
                try:
                    data = rx.recv(4096)
                except OSError:  # the timeout: the senders are done
                    return
                seqs.append(struct.unpack_from("!I", data, 4)[0])
                # SPI, seq, IV, ciphertext, ICV: plain AES-CBC with the packet's own IV must
                # give the packet back (two seals at once broke the CBC chaining)
                iv, ct = data[8:24], data[24:-16]
                dec = Cipher(algorithms.AES(key), modes.CBC(iv)).decryptor()
                if not (dec.update(ct) + dec.finalize()).startswith(pkt):
                    garbled.append(seqs[-1])

        def send(n: int) -> None:
            try:
                for _ in range(n):
                    worker.send_one(st, pkt)
            except BaseException as exc:  # the bug killed the thread with an exception
                errors.append(exc)

        def swap() -> None:
            try:
                for _ in range(50):
                    worker._rebuild_ciphers()
            except BaseException as exc:
                errors.append(exc)

        reader = threading.Thread(target=receive)
        reader.start()
        sys.setswitchinterval(1e-6)  # threads switch often: the interleavings come at once
        threads = [threading.Thread(target=send, args=(PACKETS,)) for _ in range(2)]
        threads.append(threading.Thread(target=swap))
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        reader.join(30)
        sys.setswitchinterval(interval)
        assert errors == []
        assert garbled == []
        assert st.dropped == 0 and worker.stats[2] == 0
        # each packet sealed once, with a sequence number of its own: the SA counted every
        # seal, and no number went out twice (loopback may drop some of them under load)
        assert st.sa.seq == 2 * PACKETS
        assert seqs and len(set(seqs)) == len(seqs) and max(seqs) <= 2 * PACKETS
    finally:
        sys.setswitchinterval(interval)
        for s in (ctl, peer, tx, rx):
            s.close()
        os.close(r)
        os.close(w)
