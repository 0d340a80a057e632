#!/usr/bin/env python3
"""Record whole-ESP known answers from an independent implementation: the Linux kernel's ESP.

Why: Wycheproof and the RFC examples pin the ciphers, but only a second ESP
implementation pins the layout around them (where the AAD, IV and ESN high bits go), for
every transform including authenc and ESN. The kernel (esp4.c) is that implementation.

Run on the host (boots the QEMU lab's router, ~1 min under TCG):

    .venv/bin/python scripts/record_esp_vectors.py

In the router VM (``--guest``), between two network namespaces on a veth pair, for each
transform with and without ESN: an ``ip xfrm state`` with fixed keys (ESN ones start at
a 64-bit sequence number with non-zero high bits), a UDP datagram sent on a raw socket
(so the UDP header, checksum 0, is ours byte for byte), the ESP packet captured on the
receiving veth with an AF_PACKET socket, and the datagram read back on the receiver (the
kernel opened its own packet). The plaintext is rebuilt from what was sent: the UDP
datagram, RFC 4303 padding 1, 2, 3, ... to the kernel's block (4 for the AEADs, 16 for
AES-CBC), pad length, next header 17.

Writes tests/qemu/data/kernel_esp_recorded.json (the vectors, the kernel version) and
tests/unit/data/proc_crypto_lab_router.txt (the router's /proc/crypto after the run and
after AF_ALG instantiated authenc/authencesn around virtio_crypto_aes_cbc, as the
afalg engine does). scripts/make_kat_vectors.py turns the first into packaged
KAT vectors.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import shutil
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
OUT_VECTORS = REPO / "tests" / "qemu" / "data" / "kernel_esp_recorded.json"
OUT_PROC = REPO / "tests" / "unit" / "data" / "proc_crypto_lab_router.txt"

A_NS, B_NS = "kat-a", "kat-b"
A_IP, B_IP = "10.99.0.1", "10.99.0.2"
ESN_HI, ESN_LO = 0x0102A0B0, 0xFFFFFFFE  # the 2nd packet crosses into seq_hi + 1
PAYLOADS = (b"oe-router KAT 1", bytes(range(97)))

# (transform name, ip xfrm algorithm words, key lengths, ESP block size, IV length)
TRANSFORMS: tuple[tuple[str, str, int, int, int, int], ...] = (
    ("aes128gcm16", "aead 'rfc4106(gcm(aes))' {ek} 128", 20, 0, 4, 8),
    ("aes256gcm16", "aead 'rfc4106(gcm(aes))' {ek} 128", 36, 0, 4, 8),
    ("chacha20poly1305", "aead 'rfc7539esp(chacha20,poly1305)' {ek} 128", 36, 0, 4, 8),
    ("aes128-sha256", "enc 'cbc(aes)' {ek} auth-trunc 'hmac(sha256)' {ik} 128", 16, 32, 16, 16),
    ("aes256-sha256", "enc 'cbc(aes)' {ek} auth-trunc 'hmac(sha256)' {ik} 128", 32, 32, 16, 16),
)


def _key(tag: str, n: int) -> bytes:
    """A fixed, distinct key per transform and role (recorded in the output anyway)."""
    seed = tag.encode()
    return bytes((seed[i % len(seed)] * 7 + i * 13) & 0xFF for i in range(n))


# -- guest side (stdlib only: runs on the router image's python3)


def _sh(cmd: str) -> str:
    res = subprocess.run(cmd, shell=True, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise SystemExit(f"guest: {cmd!r} failed: {res.stderr.strip()}")
    return res.stdout


def _setns(path: str) -> None:
    """Move this thread to the network namespace at ``path`` (sockets made before stay)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        if ctypes.CDLL(None, use_errno=True).setns(fd, 0x40000000) != 0:  # CLONE_NEWNET
            raise OSError(ctypes.get_errno(), f"setns {path}")
    finally:
        os.close(fd)


def _udp(payload: bytes, sport: int, dport: int) -> bytes:
    return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


def _trailer(inner: bytes, block: int, next_header: int) -> bytes:
    """RFC 4303 §2.4: padding 1, 2, 3, ... so inner || pad || 2 fills whole blocks."""
    padlen = -(len(inner) + 2) % block
    return inner + bytes(range(1, padlen + 1)) + bytes((padlen, next_header))


def guest() -> None:
    for ns in (A_NS, B_NS):
        subprocess.run(f"ip netns del {ns}", shell=True, capture_output=True, check=False)
    _sh(f"ip netns add {A_NS} && ip netns add {B_NS}")
    _sh(f"ip link add kata type veth peer name katb && ip link set kata netns {A_NS} "
        f"&& ip link set katb netns {B_NS}")  # fmt: skip
    _sh(f"ip -n {A_NS} addr add {A_IP}/24 dev kata && ip -n {A_NS} link set kata up "
        f"&& ip -n {B_NS} addr add {B_IP}/24 dev katb && ip -n {B_NS} link set katb up "
        f"&& ip -n {A_NS} link set lo up && ip -n {B_NS} link set lo up")  # fmt: skip
    root = f"/proc/{os.getpid()}/fd/{os.open('/proc/self/ns/net', os.O_RDONLY)}"
    _setns(f"/run/netns/{B_NS}")
    cap = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
    cap.bind(("katb", 0))
    cap.settimeout(5)
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind((B_IP, 4500 + 1))
    rx.settimeout(5)
    _setns(f"/run/netns/{A_NS}")
    tx = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_UDP)
    _setns(root)
    # A cleartext datagram first: neighbour resolution is done before any ESP is sent.
    tx.sendto(_udp(b"hello", 4500 + 2, 4500 + 1), (B_IP, 0))
    if rx.recv(65535) != b"hello":
        raise SystemExit("guest: the cleartext datagram did not arrive")

    vectors: list[dict[str, Any]] = []
    spi = 0x0A0B0000
    for name, algo, eklen, iklen, block, ivlen in TRANSFORMS:
        for esn in (False, True):
            spi += 1
            ek, ik = _key(f"{name}-enc", eklen), _key(f"{name}-auth", iklen)
            words = algo.format(ek="0x" + ek.hex(), ik="0x" + ik.hex())
            extra = ""
            if esn:
                extra = (f"flag esn replay-window 64 replay-oseq-hi {ESN_HI} "
                         f"replay-oseq {ESN_LO}")  # fmt: skip
            rx_extra = extra.replace("replay-oseq", "replay-seq")
            state = f"src {A_IP} dst {B_IP} proto esp spi {spi:#x} reqid 7 mode transport"
            for ns in (A_NS, B_NS):
                _sh(f"ip -n {ns} xfrm state flush && ip -n {ns} xfrm policy flush")
            _sh(f"ip -n {A_NS} xfrm state add {state} {words} {extra}")
            _sh(f"ip -n {B_NS} xfrm state add {state} {words} {rx_extra}")
            _sh(f"ip -n {A_NS} xfrm policy add src {A_IP}/32 dst {B_IP}/32 proto udp dir out "
                f"tmpl src {A_IP} dst {B_IP} proto esp reqid 7 mode transport")  # fmt: skip
            for payload in PAYLOADS:
                while True:  # drain what the capture holds
                    try:
                        cap.recv(65535, socket.MSG_DONTWAIT)
                    except (BlockingIOError, TimeoutError):
                        break
                dgram = _udp(payload, 4500 + 2, 4500 + 1)
                tx.sendto(dgram, (B_IP, 0))
                deadline = time.monotonic() + 5
                frame = b""
                while time.monotonic() < deadline:
                    frame = cap.recv(65535)
                    if frame[12:14] == b"\x08\x00" and frame[14 + 9] == 50:
                        break
                else:
                    raise SystemExit(f"guest: no ESP packet for {name} esn={esn}")
                ip = frame[14:]
                ihl = (ip[0] & 0x0F) * 4
                esp = ip[ihl : struct.unpack("!H", ip[2:4])[0]]
                got = rx.recv(65535)
                if got != payload:
                    raise SystemExit(f"guest: {name} esn={esn}: receiver got {got!r}")
                hdr, iv, sealed = esp[:8], esp[8 : 8 + ivlen], esp[8 + ivlen :]
                seq_lo = struct.unpack("!I", hdr[4:8])[0]
                seq_hi = (ESN_HI + (1 if seq_lo < ESN_LO else 0)) if esn else None
                vectors.append(
                    {
                        "transform": name,
                        "esn": esn,
                        "encr_key": ek.hex(),
                        "integ_key": ik.hex(),
                        "hdr": hdr.hex(),
                        "seq_hi": seq_hi,
                        "iv": iv.hex(),
                        "plaintext": _trailer(dgram, block, 17).hex(),
                        "sealed": sealed.hex(),
                    }
                )
    # The instances the AF_ALG engine builds around the virtio driver, so the snapshot
    # holds them as on a router whose daemon probed it (the bind itself fails: ENOENT).
    for template in ("authenc", "authencesn"):
        alg = socket.socket(socket.AF_ALG, socket.SOCK_SEQPACKET, 0)
        try:
            alg.bind(("aead", f"{template}(hmac(sha256),virtio_crypto_aes_cbc)"))
        except OSError:
            pass
        finally:
            alg.close()
    proc = Path("/proc/crypto").read_text()
    for ns in (A_NS, B_NS):
        subprocess.run(f"ip netns del {ns}", shell=True, capture_output=True, check=False)
    json.dump(
        {"kernel": platform.release(), "vectors": vectors, "proc_crypto": proc},
        sys.stdout,
    )


# -- host side


def host() -> int:
    sys.path.insert(0, str(REPO / "qemu"))
    import build  # type: ignore[import-not-found]
    from lab import Lab  # type: ignore[import-not-found]

    images = build.build_all(log=print)
    with Lab(images, crypto=True, cpu="max", bundle=False, log=print) as lab:
        shutil.copy2(__file__, lab.run_dir / "record_esp_vectors.py")
        res = lab.router("python3 /lab/record_esp_vectors.py --guest", timeout=300)
        if res.rc != 0:
            print(res.stderr, file=sys.stderr)
            return 1
    data = json.loads(res.stdout)
    OUT_PROC.parent.mkdir(parents=True, exist_ok=True)
    OUT_PROC.write_text(data.pop("proc_crypto"))
    data["source"] = (
        "Linux kernel ESP (net/ipv4/esp4.c) in the oe-router QEMU lab's router VM, "
        "recorded by scripts/record_esp_vectors.py"
    )
    OUT_VECTORS.parent.mkdir(parents=True, exist_ok=True)
    OUT_VECTORS.write_text(json.dumps(data, indent=1) + "\n")
    print(f"{len(data['vectors'])} vectors from kernel {data['kernel']} -> {OUT_VECTORS}")
    print(f"/proc/crypto -> {OUT_PROC}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--guest", action="store_true", help="run the in-VM part (internal)")
    args = ap.parse_args()
    if args.guest:
        guest()
        return 0
    return host()


if __name__ == "__main__":
    raise SystemExit(main())
