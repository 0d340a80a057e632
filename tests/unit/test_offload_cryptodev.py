"""CryptodevEngine on the host, against a stand-in for cryptodev-linux's ioctls.

Why a stand-in: the host has no /dev/crypto (the QEMU tier has the real module). The
stand-in reads and writes the very structures and buffers our binding hands the kernel (by
address, as the kernel does) and computes with ``cryptography`` the way cryptodev-linux
drives the kernel (ioctl.c, authenc.c): gcm(aes) under CIOCAUTHCRYPT with a 12-byte IV, the
AAD in auth_src and C || tag in dst, EBADMSG on a bad tag; cbc(aes) and hmac(sha256) under
CIOCCRYPT. So these tests check the ESP mapping (nonce, AAD, ICV input, ESN, truncation),
driver matching, hardware classification, caching, and error naming: byte-equal to the
software engine. The structures' layout is checked against the header in test_ocf_cryptodev.
"""

from __future__ import annotations

import ctypes
import errno
import hmac
import itertools
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given
from hypothesis import strategies as st

from oe_router import ocf_cryptodev as oc
from oe_router.offload import TRANSFORMS, AuthenticationFailed, EngineError, EngineKind
from oe_router.offload.cryptodev import CryptodevEngine, aead_aad, cbc_mac_input
from oe_router.offload.engine import OpenRequest, SealRequest
from oe_router.offload.kat import run_kat
from oe_router.offload.procfs import parse_proc_crypto
from oe_router.offload.software import SoftwareEngine

IOCTL = {v: k for k, v in oc.HOST_LAYOUT.ioctls.items()}
GCM, CBC = TRANSFORMS["aes128gcm16"], TRANSFORMS["aes256-sha256"]
#: AES-CBC with HMAC-SHA2-256/384/512 (RFC 4868): two sessions each
CBC_NAMES = [n for n, t in TRANSFORMS.items() if t.hmac_hash is not None]
PROC_CRYPTO = """\
name         : cbc(aes)
driver       : virtio_crypto_aes_cbc
module       : virtio_crypto
priority     : 150
type         : skcipher

name         : cbc(aes)
driver       : cbc-aes-aesni
module       : aesni_intel
priority     : 400
type         : skcipher
"""


#: the HMAC algorithm ids the fake kernel serves -> hashlib names
_HASHES = {
    oc.Alg.SHA2_256_HMAC: "sha256",
    oc.Alg.SHA2_384_HMAC: "sha384",
    oc.Alg.SHA2_512_HMAC: "sha512",
}


@dataclass
class _Ses:
    cipher: int
    key: bytes = field(repr=False)
    mac: int
    mackey: bytes = field(repr=False)


class FakeKernel:
    """cryptodev-linux's ioctls, in Python, over the process's own memory (methods are
    named after the ioctls)."""

    def __init__(self, drivers: dict[str, tuple[str, int]] | None = None) -> None:
        # kernel algorithm -> (driver it lands on, CIOCGSESSINFO flags)
        self.drivers = drivers or {
            "gcm(aes)": ("generic-gcm-aesni", 0),
            "cbc(aes)": ("cbc-aes-aesni", 0),
            "hmac(sha256)": ("hmac(sha256-generic)", 0),
            "hmac(sha384)": ("hmac(sha384-generic)", 0),
            "hmac(sha512)": ("hmac(sha512-generic)", 0),
        }
        self.sessions: dict[int, _Ses] = {}
        self.calls: list[str] = []
        self.fail: dict[str, int] = {}  # ioctl name -> errno to fail with
        self._ids = itertools.count(0x100)

    def __call__(self, fd: int, request: int, arg: Any, mutate: bool) -> int:
        name = IOCTL[request]
        self.calls.append(name)
        if name in self.fail:
            raise OSError(self.fail[name], os.strerror(self.fail[name]))
        getattr(self, name)(arg)
        return 0

    @staticmethod
    def _read(addr: int, n: int) -> bytes:
        return ctypes.string_at(addr, n) if n else b""

    def CIOCGSESSION(self, sop: Any) -> None:
        if sop.cipher not in (0, oc.Alg.AES_GCM, oc.Alg.AES_CBC) or sop.mac not in (
            0,
            *_HASHES,
        ):
            raise OSError(errno.EINVAL, "bad algorithm")
        if sop.cipher and sop.keylen not in (16, 24, 32):
            raise OSError(errno.EINVAL, "bad key length")
        ses = next(self._ids)
        self.sessions[ses] = _Ses(
            sop.cipher,
            self._read(sop.key, sop.keylen),
            sop.mac,
            self._read(sop.mackey, sop.mackeylen),
        )
        sop.ses = ses

    def _names(self, s: _Ses) -> tuple[str, str]:
        names = {oc.Alg.AES_GCM: "gcm(aes)", oc.Alg.AES_CBC: "cbc(aes)"}
        return names.get(s.cipher, ""), f"hmac({_HASHES[s.mac]})" if s.mac else ""

    def CIOCGSESSINFO(self, siop: Any) -> None:
        s = self.sessions[siop.ses]
        cname, hname = self._names(s)
        siop.flags = 0
        for info, name in ((siop.cipher_info, cname), (siop.hash_info, hname)):
            if name:
                drv, flags = self.drivers[name]
                info.cra_name, info.cra_driver_name = name.encode(), drv.encode()
                siop.flags |= flags
        siop.alignmask = 15

    def CIOCCRYPT(self, cop: Any) -> None:
        s = self.sessions[cop.ses]
        data = self._read(cop.src, cop.len)
        if s.mac:  # hash-only session: the digest at cop.mac
            digest = hmac.new(s.mackey, data, _HASHES[s.mac]).digest()
            ctypes.memmove(cop.mac, digest, len(digest))
            return
        if cop.len % 16:
            raise OSError(errno.EINVAL, "not a multiple of the block size")
        c = Cipher(algorithms.AES(s.key), modes.CBC(self._read(cop.iv, 16)))
        ctx = c.encryptor() if cop.op == oc.COP_ENCRYPT else c.decryptor()
        out = ctx.update(data) + ctx.finalize()
        ctypes.memmove(cop.dst, out, len(out))

    def CIOCAUTHCRYPT(self, caop: Any) -> None:
        s = self.sessions[caop.ses]
        if s.cipher != oc.Alg.AES_GCM or caop.flags:
            raise OSError(errno.EINVAL, "not a plain AEAD session")
        iv = self._read(caop.iv, 12)  # the kernel copies cdata.ivsize bytes, not iv_len
        aad = self._read(caop.auth_src, caop.auth_len)
        data = self._read(caop.src, caop.len)
        tag_len = caop.tag_len or 16
        if caop.op == oc.COP_ENCRYPT:
            out = AESGCM(s.key).encrypt(iv, data, aad)[: caop.len + tag_len]
        else:
            try:
                out = AESGCM(s.key).decrypt(iv, data, aad)
            except InvalidTag:
                raise OSError(errno.EBADMSG, "bad tag") from None
        ctypes.memmove(caop.dst, out, len(out))

    def CIOCFSESSION(self, ses: Any) -> None:
        if self.sessions.pop(ses.value, None) is None:
            raise OSError(errno.ENOENT, "no session")


def engine(
    kernel: FakeKernel, driver: str | None = None, proc: str = PROC_CRYPTO
) -> CryptodevEngine:
    return CryptodevEngine(
        driver,
        device=lambda: oc.Cryptodev("/dev/null", ioctl=kernel),
        proc_crypto=lambda: parse_proc_crypto(proc),
    )


def test_transforms_drivers_and_kind() -> None:
    k = FakeKernel()
    e = engine(k)
    assert e.name == "cryptodev"
    assert [t.name for t in e.transforms()] == [
        "aes128gcm16", "aes256gcm16", *CBC_NAMES,
    ]  # fmt: skip
    assert "no algorithm id" in e.unavailable()["chacha20poly1305"]
    assert e.driver(GCM) == "generic-gcm-aesni"
    assert e.driver(CBC) == "cbc-aes-aesni+hmac(sha256-generic)"
    assert e.kind is EngineKind.CPU and not e.hardware(CBC)
    with pytest.raises(EngineError, match="cryptodev: chacha20poly1305: cryptodev-linux"):
        e.driver(TRANSFORMS["chacha20poly1305"])
    assert k.sessions == {}  # the probes freed their sessions


def test_probe_runs_once_per_transform() -> None:
    k = FakeKernel()
    e = engine(k)
    e.transforms()
    n = k.calls.count("CIOCGSESSION")
    assert n == 2 + 2 * len(CBC_NAMES)  # GCM: one session each; CBC+HMAC: two each
    e.transforms()
    e.driver(GCM)
    _ = e.kind
    assert k.calls.count("CIOCGSESSION") == n


@given(
    name=st.sampled_from([n for n in TRANSFORMS if n != "chacha20poly1305"]),
    blocks=st.integers(1, 100),  # ESP's plaintext is never empty (pad length, next header)
    seq_hi=st.none() | st.integers(0, 2**32 - 1),
    data=st.data(),
)
def test_seal_open_equal_software(
    name: str, blocks: int, seq_hi: int | None, data: st.DataObject
) -> None:
    t = TRANSFORMS[name]
    ek = data.draw(st.binary(min_size=t.encr_key_len, max_size=t.encr_key_len))
    ik = data.draw(st.binary(min_size=t.auth_key_len, max_size=t.auth_key_len))
    hdr = data.draw(st.binary(min_size=8, max_size=8))
    iv = data.draw(st.binary(min_size=t.iv_len, max_size=t.iv_len))
    pt = data.draw(st.binary(min_size=16 * blocks, max_size=16 * blocks))
    k = FakeKernel()
    ours, ref = engine(k).cipher(t, ek, ik), SoftwareEngine().cipher(t, ek, ik)
    sealed = ours.seal(hdr, seq_hi, iv, pt)
    assert sealed == ref.seal(hdr, seq_hi, iv, pt)
    assert ours.open(hdr, seq_hi, iv, sealed) == pt
    assert ours.seal_many([SealRequest(hdr, seq_hi, iv, pt)] * 2) == [sealed] * 2
    bad = sealed[:-1] + bytes([sealed[-1] ^ 1])
    batch = [OpenRequest(hdr, seq_hi, iv, bad), OpenRequest(hdr, seq_hi, iv, sealed)]
    assert ours.open_many(batch) == [None, pt]
    ours.close()
    assert k.sessions == {}


@pytest.mark.parametrize("t", [GCM, CBC], ids=lambda t: t.name)
@pytest.mark.parametrize("what", ["icv", "ciphertext", "spi", "esn"])
def test_tampering_is_authentication_failed(t: Any, what: str) -> None:
    c = engine(FakeKernel()).cipher(t, os.urandom(t.encr_key_len), os.urandom(t.auth_key_len))
    hdr, iv, pt, seq_hi = os.urandom(8), os.urandom(t.iv_len), os.urandom(64), 5
    sealed = c.seal(hdr, seq_hi, iv, pt)
    if what == "icv":
        sealed = sealed[:-1] + bytes([sealed[-1] ^ 1])
    elif what == "ciphertext":
        sealed = bytes([sealed[0] ^ 1]) + sealed[1:]
    elif what == "spi":
        hdr = bytes([hdr[0] ^ 1]) + hdr[1:]
    else:
        seq_hi += 1
    with pytest.raises(AuthenticationFailed, match="ICV mismatch"):
        c.open(hdr, seq_hi, iv, sealed)
    with pytest.raises(AuthenticationFailed, match="no ESP payload"):
        c.open(hdr, seq_hi, iv, sealed[:3])


def test_esp_layouts() -> None:
    hdr = bytes.fromhex("0000abcd00000007")
    assert aead_aad(hdr, None) == hdr
    assert aead_aad(hdr, 1) == bytes.fromhex("0000abcd0000000100000007")
    assert cbc_mac_input(hdr, b"I" * 16, b"C" * 32, 2) == hdr + b"I" * 16 + b"C" * 32 + (
        b"\x00\x00\x00\x02"
    )


def test_driver_engine_when_sessions_land_elsewhere() -> None:
    e = engine(FakeKernel(), "virtio_crypto_aes_cbc")
    assert e.name == "cryptodev:virtio_crypto_aes_cbc" and e.transforms() == ()
    why = e.unavailable()["aes256-sha256"]
    assert "land on cbc-aes-aesni+hmac(sha256-generic), not virtio_crypto_aes_cbc" in why
    with pytest.raises(EngineError, match="cryptodev:virtio_crypto_aes_cbc: aes256-sha256"):
        e.cipher(CBC, bytes(32), bytes(32))


def test_driver_engine_on_an_engine_without_the_flag_is_hardware() -> None:
    """virtio_crypto does not set SIOP_FLAG_KERNEL_DRIVER_ONLY; /proc/crypto names its module."""
    k = FakeKernel()
    k.drivers["cbc(aes)"] = ("virtio_crypto_aes_cbc", 0)
    e = engine(k, "virtio_crypto_aes_cbc")
    assert [t.name for t in e.transforms()] == CBC_NAMES
    assert e.driver(CBC) == "virtio_crypto_aes_cbc+hmac(sha256-generic)"
    assert e.kind is EngineKind.HARDWARE and e.probe(CBC).hardware and not e.probe(CBC).flagged
    assert "land on generic-gcm-aesni" in e.unavailable()["aes128gcm16"]
    # without /proc/crypto's word, and without the flag, it is not called hardware
    assert engine(k, "virtio_crypto_aes_cbc", proc="").kind is EngineKind.CPU


def test_the_flag_alone_makes_hardware() -> None:
    k = FakeKernel()
    k.drivers["gcm(aes)"] = ("safexcel-gcm-aes", oc.SIOP_FLAG_KERNEL_DRIVER_ONLY)
    e = engine(k, proc="")
    assert e.hardware(GCM) and e.probe(GCM).flagged and not e.hardware(CBC)
    assert e.kind is EngineKind.HARDWARE


def test_kernel_pick_changed_after_probe() -> None:
    k = FakeKernel()
    k.drivers["cbc(aes)"] = ("virtio_crypto_aes_cbc", 0)
    e = engine(k, "virtio_crypto_aes_cbc")
    assert e.transforms()
    k.drivers["cbc(aes)"] = ("cbc-aes-aesni", 0)  # e.g. virtio's priority lowered
    with pytest.raises(EngineError, match="landed on cbc-aes-aesni"):
        e.cipher(CBC, bytes(32), bytes(32))
    assert k.sessions == {}


def test_ioctl_errors_name_ioctl_algorithm_errno_and_never_keys() -> None:
    k = FakeKernel()
    k.fail["CIOCAUTHCRYPT"] = errno.EINVAL  # as a 32-bit compat ioctl would
    e = engine(k)
    why = e.unavailable()["aes128gcm16"]
    assert "trial seal failed" in why
    assert "CIOCAUTHCRYPT for gcm(aes): Invalid argument (EINVAL)" in why
    assert [t.name for t in e.transforms()] == CBC_NAMES
    key = b"K3Y!" * 4 + b"SALT"
    k2 = FakeKernel()
    c = engine(k2).cipher(GCM, key)
    k2.fail["CIOCAUTHCRYPT"] = errno.EIO
    with pytest.raises(EngineError) as ei:
        c.seal(bytes(8), None, bytes(8), bytes(16))
    msg = str(ei.value)
    assert msg.startswith("cryptodev: aes128gcm16 seal: CIOCAUTHCRYPT for gcm(aes)")
    assert "EIO" in msg and "K3Y" not in msg and "SALT" not in msg
    k2.fail["CIOCGSESSION"] = errno.ENOMEM
    with pytest.raises(EngineError, match=r"CIOCGSESSION for cbc\(aes\).*ENOMEM"):
        engine(k2).cipher(CBC, bytes(32), bytes(32))


def test_wrong_key_sizes_name_the_engine() -> None:
    with pytest.raises(EngineError, match="cryptodev: aes128gcm16 needs 20 bytes"):
        engine(FakeKernel()).cipher(GCM, bytes(16))


def test_no_dev_crypto_means_no_transforms(tmp_path: Any) -> None:
    missing = str(tmp_path / "crypto")
    factory: Callable[[], oc.Cryptodev] = lambda: oc.Cryptodev(missing)  # noqa: E731
    e = CryptodevEngine(device=factory, proc_crypto=lambda: ())
    assert e.transforms() == () and e.kind is EngineKind.CPU
    assert f"open {missing}" in e.unavailable()["aes128gcm16"]
    assert "ENOENT" in e.unavailable()["aes128gcm16"]


def test_cbc_seal_rejects_unpadded_plaintext() -> None:
    c = engine(FakeKernel()).cipher(CBC, bytes(32), bytes(32))
    for bad in (bytes(15), b""):
        with pytest.raises(EngineError, match="whole 16-byte blocks"):
            c.seal(bytes(8), None, bytes(16), bad)


def test_kat_passes_through_the_stand_in() -> None:
    """offload.kat's ESP vectors and forgeries, through the binding and the engine."""
    e = engine(FakeKernel())
    for t in e.transforms():
        r = run_kat(e, t)
        assert r.passed and r.cases > 0 and r.failures == (), r
        assert r.engine == "cryptodev" and r.driver == e.driver(t)
