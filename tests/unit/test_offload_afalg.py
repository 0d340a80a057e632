"""AF_ALG engine on the host, which has no AF_ALG: the pure parts, and the socket protocol
against a stand-in kernel.

The real engine is proven in the router VM (tests/qemu/test_offload_afalg.py). Here: the
authenc key blob and the ESP associated data byte for byte, what gets bound for a
driver (read from the lab router's recorded /proc/crypto, including the kernel's ENOENT
for a template around a driver name), and how kernel errors map to AuthenticationFailed
and EngineError.
"""

from __future__ import annotations

import errno
import socket
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from oe_router.offload import afalg
from oe_router.offload.afalg import AfAlgEngine, authenc_key, esp_assoc
from oe_router.offload.engine import (
    TRANSFORMS,
    AuthenticationFailed,
    EngineError,
    EngineKind,
    OpenRequest,
    SealRequest,
)

LAB = str(Path(__file__).parent / "data" / "proc_crypto_lab_router.txt")
GCM, CHACHA, CBC = (
    TRANSFORMS["aes128gcm16"],
    TRANSFORMS["chacha20poly1305"],
    TRANSFORMS["aes256-sha256"],
)
VIRTIO_AUTHENC = "authenc(hmac(sha256-generic),virtio_crypto_aes_cbc)"


def test_authenc_key_blob() -> None:
    enc, auth = bytes(range(32)), bytes(range(100, 132))
    blob = authenc_key(enc, auth)
    # struct rtattr {u16 len = 8; u16 type = CRYPTO_AUTHENC_KEYA_PARAM} in host order,
    # __be32 enckeylen, then the HMAC key and the cipher key (crypto/authenc.c).
    assert blob[:4] == struct.pack("=HH", 8, 1)
    assert blob[4:8] == b"\x00\x00\x00\x20"
    assert blob[8:] == auth + enc
    assert len(authenc_key(bytes(16), auth)) == 8 + 32 + 16


def test_esp_assoc() -> None:
    hdr, iv = bytes.fromhex("01020304a0b0c0d0"), bytes(range(8))
    assert esp_assoc(hdr, None, iv) == hdr + iv
    assert esp_assoc(hdr, 0x11223344, iv) == bytes.fromhex("0102030411223344a0b0c0d0") + iv


def test_no_af_alg_on_this_host_is_a_reason_not_a_crash() -> None:
    with pytest.raises(OSError):
        socket.socket(38, socket.SOCK_SEQPACKET, 0).close()  # the premise: no AF_ALG here
    e = AfAlgEngine()
    assert e.name == "afalg" and e.transforms() == () and e.kind is EngineKind.CPU
    assert "no AF_ALG sockets here" in e.why_not(GCM)
    with pytest.raises(EngineError, match=r"^afalg: cannot run aes128gcm16: .*AF_ALG"):
        e.cipher(GCM, bytes(20))
    with pytest.raises(EngineError, match=r"^afalg:x: aes128gcm16 needs 20 bytes"):
        AfAlgEngine("x").cipher(GCM, bytes(16))


class _Kernel:
    """A stand-in for the kernel's AF_ALG: which names bind, what each op socket got."""

    def __init__(self, bindable: set[str]) -> None:
        self.bindable = bindable
        self.bound: list[str] = []
        self.keys: dict[str, bytes] = {}
        self.sent: list[dict[str, Any]] = []
        self.reply: bytes | OSError | Callable[[dict[str, Any]], bytes | OSError] = b""
        self.tried: list[str] = []
        self.registers: dict[str, Callable[[], None]] = {}

    def socket(self) -> _Sock:
        return _Sock(self)


class _Sock:
    def __init__(self, k: _Kernel) -> None:
        self.k, self.name = k, ""

    def bind(self, addr: tuple[str, str]) -> None:
        assert addr[0] == "aead"
        self.k.tried.append(addr[1])
        if addr[1] in self.k.registers:  # instantiated, yet the lookup fails
            self.k.registers.pop(addr[1])()
        if addr[1] not in self.k.bindable:
            raise OSError(errno.ENOENT, "No such file or directory")
        self.name = addr[1]
        self.k.bound.append(addr[1])

    def setsockopt(self, level: int, opt: int, value: Any, optlen: int = 0) -> None:
        assert level == afalg.SOL_ALG
        if opt == afalg.ALG_SET_KEY:
            self.k.keys[self.name] = value
        else:
            # the ICV length: RFC 4868's half of the hash for HMAC-SHA2, 16 otherwise
            icv = 24 if "sha384" in self.name else 32 if "sha512" in self.name else 16
            assert (opt, value, optlen) == (afalg.ALG_SET_AEAD_AUTHSIZE, None, icv)

    def accept(self) -> tuple[_Sock, None]:
        op = _Sock(self.k)
        op.name = self.name
        return op, None

    def sendmsg_afalg(self, msg: list[bytes], *, op: int, iv: bytes, assoclen: int) -> None:
        self.last: dict[str, Any] = {
            "name": self.name, "data": b"".join(msg), "op": op, "iv": iv, "assoclen": assoclen,
            "sock": id(self),
        }  # fmt: skip
        self.k.sent.append(self.last)

    def recv(self, n: int) -> bytes:
        self.last["recv"] = n
        reply = self.k.reply
        if callable(reply):
            reply = reply(self.last)
        if isinstance(reply, OSError):
            raise reply
        return reply

    def close(self) -> None:
        pass


@pytest.fixture
def kernel(monkeypatch: pytest.MonkeyPatch) -> _Kernel:
    # What the lab router binds: generic names, its drivers, and the template instances
    # by their driver names. The template around a driver name itself gives ENOENT.
    k = _Kernel(
        {
            "rfc4106(gcm(aes))", "rfc7539esp(chacha20,poly1305)",
            "authenc(hmac(sha256),cbc(aes))", "authencesn(hmac(sha256),cbc(aes))",
            "authenc(hmac(sha384),cbc(aes))", "authencesn(hmac(sha384),cbc(aes))",
            "authenc(hmac(sha512),cbc(aes))", "authencesn(hmac(sha512),cbc(aes))",
            "rfc4106-gcm-aesni", VIRTIO_AUTHENC,
            "authencesn(hmac(sha256-generic),virtio_crypto_aes_cbc)",
        }
    )  # fmt: skip
    monkeypatch.setattr(afalg, "_alg_socket", k.socket)
    return k


def test_kernel_pick(kernel: _Kernel) -> None:
    e = AfAlgEngine(proc_crypto=LAB)
    assert [t.name for t in e.transforms()] == list(TRANSFORMS)
    assert e.driver(GCM) == "rfc4106-gcm-aesni"
    assert e.driver(CHACHA) == "rfc7539esp(chacha20-simd,poly1305-simd)"
    assert e.driver(CBC) == "authenc(hmac(sha256-generic),cbc-aes-aesni)"
    assert e.kind is EngineKind.CPU


def test_virtio_driver_binds_the_template_instance(kernel: _Kernel) -> None:
    e = AfAlgEngine("virtio_crypto_aes_cbc", proc_crypto=LAB)
    assert e.name == "afalg:virtio_crypto_aes_cbc"
    assert [t.name for t in e.transforms()] == ["aes128-sha256", "aes256-sha256"]
    assert e.driver(CBC) == VIRTIO_AUTHENC
    assert e.kind is EngineKind.HARDWARE
    # no HMAC-SHA384 instance around the driver: the HMAC-SHA256 one is not taken for it
    # (it would bind: authsize 24 fits a 32-byte digest, and compute the wrong ICV)
    why = e.why_not(TRANSFORMS["aes256-sha384"])
    assert why.startswith("authenc(hmac(sha384),virtio_crypto_aes_cbc): No such file"), why
    assert "skcipher cbc(aes)) is no AEAD driver for rfc4106" in e.why_not(GCM)
    assert e.why_not(CBC) == ""
    with pytest.raises(EngineError, match="afalg:virtio_crypto_aes_cbc: cannot run aes128gcm16"):
        e.driver(GCM)


def test_aead_driver_and_unknown_driver(kernel: _Kernel) -> None:
    e = AfAlgEngine("rfc4106-gcm-aesni", proc_crypto=LAB)
    assert [t.name for t in e.transforms()] == ["aes128gcm16", "aes256gcm16"]
    assert e.driver(GCM) == "rfc4106-gcm-aesni"
    assert "implements rfc4106(gcm(aes)), not rfc7539esp" in e.why_not(CHACHA)
    none = AfAlgEngine("no_such_driver", proc_crypto=LAB)
    assert none.transforms() == ()
    assert none.why_not(GCM) == f"no driver 'no_such_driver' in {LAB}"


def test_cbc_requests_and_esn_socket(kernel: _Kernel) -> None:
    e = AfAlgEngine("virtio_crypto_aes_cbc", proc_crypto=LAB)
    ek, ik = bytes(range(32)), bytes(range(50, 82))
    c = e.cipher(CBC, ek, ik)
    assert kernel.keys[VIRTIO_AUTHENC] == authenc_key(ek, ik)
    assert "00010203" not in repr(c) and "virtio" in repr(c)  # no key material in a repr
    hdr, iv, pt = bytes.fromhex("0a0b0c0d00000007"), bytes(range(16)), bytes(32)
    kernel.reply = hdr + iv + b"C" * 32 + b"I" * 16
    assert c.seal(hdr, None, iv, pt) == b"C" * 32 + b"I" * 16
    sent = kernel.sent[-1]
    assert (sent["name"], sent["op"], sent["iv"], sent["assoclen"], sent["recv"]) == (
        VIRTIO_AUTHENC, afalg.ALG_OP_ENCRYPT, iv, 24, 24 + 32 + 16,
    )  # fmt: skip
    assert sent["data"] == hdr + iv + pt
    # ESN: the authencesn instance of the same driver, SPI || seq_hi || seq_lo || IV.
    kernel.reply = bytes(28) + pt
    assert c.open(hdr, 5, iv, b"C" * 32 + b"I" * 16) == pt
    sent = kernel.sent[-1]
    assert sent["name"] == "authencesn(hmac(sha256-generic),virtio_crypto_aes_cbc)"
    assert (sent["op"], sent["assoclen"], sent["recv"]) == (afalg.ALG_OP_DECRYPT, 28, 28 + 32)
    assert sent["data"] == hdr[:4] + b"\x00\x00\x00\x05" + hdr[4:] + iv + b"C" * 32 + b"I" * 16


def test_kernel_errors(kernel: _Kernel) -> None:
    e = AfAlgEngine("virtio_crypto_aes_cbc", proc_crypto=LAB)
    c = e.cipher(CBC, bytes(32), bytes(32))
    hdr, iv = bytes(8), bytes(16)
    kernel.reply = OSError(errno.EBADMSG, "Bad message")
    with pytest.raises(AuthenticationFailed, match="aes256-sha256: ICV mismatch"):
        c.open(hdr, None, iv, bytes(48))
    assert c.open_many([OpenRequest(hdr, None, iv, bytes(48))]) == [None]
    kernel.reply = OSError(errno.EIO, "Input/output error")
    with pytest.raises(EngineError) as err:
        c.seal(hdr, None, iv, bytes(16))
    assert str(err.value) == (
        f"afalg:virtio_crypto_aes_cbc: seal failed for aes256-sha256 on {VIRTIO_AUTHENC}: "
        "Input/output error (errno 5)"
    )
    with pytest.raises(EngineError, match="open failed for aes256-sha256"):
        c.open(hdr, None, iv, bytes(48))
    # Not an ESP payload: refused without asking the kernel.
    n = len(kernel.sent)
    for bad in (bytes(15), bytes(40)):
        with pytest.raises(AuthenticationFailed, match="is no ESP payload"):
            c.open(hdr, None, iv, bad)
    assert len(kernel.sent) == n
    c.close()
    with pytest.raises(EngineError, match="used after close"):
        c.seal(hdr, None, iv, bytes(16))


def test_gcm_requests(kernel: _Kernel) -> None:
    e = AfAlgEngine(proc_crypto=LAB)
    key = bytes(range(20))  # AES-128 key || salt, as rfc4106 takes it
    c = e.cipher(GCM, key)
    assert kernel.keys["rfc4106(gcm(aes))"] == key
    hdr, iv = bytes.fromhex("0000432187654321"), bytes(range(8))
    kernel.reply = bytes(20) + b"x" * 20
    assert c.seal(hdr, 0x01, iv, b"p" * 4) == b"x" * 20
    sent = kernel.sent[-1]
    assert sent["name"] == "rfc4106(gcm(aes))" and sent["assoclen"] == 20  # same tfm with ESN
    assert sent["data"][:20] == hdr[:4] + b"\x00\x00\x00\x01" + hdr[4:] + iv


def test_first_bind_of_a_driver_template(kernel: _Kernel, tmp_path: Path) -> None:
    """No instance yet: the template bind registers one and fails with ENOENT (as the
    kernel does); the engine then binds the instance by its driver name. Once it exists,
    the template is not bound again (each bind would register and self-test another)."""
    entries = Path(LAB).read_text().split("\n\n")
    mine = [e for e in entries if "virtio_crypto_aes_cbc)" in e]
    assert len(mine) >= 2  # authenc and authencesn instances in the recording
    proc = tmp_path / "crypto"
    proc.write_text("\n\n".join(e for e in entries if e not in mine))

    def register() -> None:
        proc.write_text(proc.read_text() + "\n\n" + "\n\n".join(mine) + "\n")

    kernel.registers["authenc(hmac(sha256),virtio_crypto_aes_cbc)"] = register
    e = AfAlgEngine("virtio_crypto_aes_cbc", proc_crypto=str(proc))
    assert [t.name for t in e.transforms()] == ["aes128-sha256", "aes256-sha256"]
    assert e.driver(CBC) == VIRTIO_AUTHENC
    templates = [n for n in kernel.tried if n.startswith("authenc(hmac(sha256),")]
    assert templates == ["authenc(hmac(sha256),virtio_crypto_aes_cbc)"]  # once, for both


def _echo(sent: dict[str, Any]) -> bytes | OSError:
    """Encrypt: assoc || data || 16-byte tag; decrypt: refuse data holding b"bad"."""
    if sent["op"] == afalg.ALG_OP_ENCRYPT:
        return bytes(sent["data"]) + b"T" * 16
    if b"bad" in sent["data"]:
        return OSError(errno.EBADMSG, "Bad message")
    return bytes(sent["data"][:-16])


def test_hardware_batches_spread_over_lanes(kernel: _Kernel) -> None:
    kernel.reply = _echo
    c = AfAlgEngine("virtio_crypto_aes_cbc", proc_crypto=LAB).cipher(CBC, bytes(32), bytes(32))
    iv = bytes(16)
    for seq_hi in (None, 9):
        kernel.sent.clear()
        batch = [SealRequest(i.to_bytes(8, "big"), seq_hi, iv, bytes([i]) * 32) for i in range(10)]
        assert c.seal_many(batch) == [bytes([i]) * 32 + b"T" * 16 for i in range(10)]
        assert len({m["sock"] for m in kernel.sent}) == afalg.HARDWARE_LANES
        want = "authencesn(" if seq_hi else "authenc("
        assert all(m["name"].startswith(want) for m in kernel.sent)
        opens = [
            OpenRequest(i.to_bytes(8, "big"), seq_hi, iv, (b"bad" if i == 3 else bytes(3)) * 16)
            for i in range(10)
        ]
        got = c.open_many(opens)
        assert got[3] is None and got[:3] == [bytes(32)] * 3 and got[4:] == [bytes(32)] * 6
    kernel.reply = OSError(errno.EIO, "Input/output error")
    with pytest.raises(EngineError, match="seal failed for aes256-sha256"):
        c.seal_many([SealRequest(bytes(8), None, iv, bytes(16))] * 5)
    c.close()


def test_cpu_batches_stay_on_one_socket(kernel: _Kernel) -> None:
    kernel.reply = _echo
    c = AfAlgEngine(proc_crypto=LAB).cipher(CBC, bytes(32), bytes(32))
    batch = [SealRequest(bytes(8), None, bytes(16), bytes(16))] * 8
    assert c.seal_many(batch) == [bytes(16) + b"T" * 16] * 8
    assert len({m["sock"] for m in kernel.sent}) == 1
