"""The cryptodev engine: ESP transforms through /dev/crypto (cryptodev-linux, ``kmod-cryptodev``).

Why a second kernel road beside AF_ALG: OpenWrt ships cryptodev for its engines, and a
session reports whether its driver is kernel-only hardware (CIOCGSESSINFO), which AF_ALG
does not. The binding is ``oe_router.ocf_cryptodev``.

How each transform maps onto cryptodev-linux's algorithms (ioctl.c, authenc.c at 08644db):

* AES-GCM (RFC 4106): ``CRYPTO_AES_GCM`` is the kernel's ``gcm(aes)`` with a 12-byte IV, run
  with CIOCAUTHCRYPT in plain AEAD mode: IV = salt || ESP IV, auth_src = the ESP AAD
  (SPI || seq_lo, or SPI || seq_hi || seq_lo with ESN), C || tag in the output. A bad tag is
  EBADMSG, which becomes ``AuthenticationFailed``.
* AES-CBC + HMAC-SHA2-256/384/512 (RFC 4303/4868): two sessions, ``CRYPTO_AES_CBC`` and
  ``CRYPTO_SHA2_{256,384,512}_HMAC``, both through CIOCCRYPT on one buffer laid out as
  SPI || seq_lo || IV || C [|| seq_hi]: CBC runs in place on C, the HMAC over the whole of
  it. cryptodev's composite modes do not fit ESP: CIOCCRYPT with a cipher and a MAC in one
  session hashes the plaintext, COP_FLAG_AEAD_TLS_TYPE is MAC-then-encrypt with TLS padding,
  COP_FLAG_AEAD_SRTP_TYPE refuses block ciphers, and the ``tls12(...)`` id names a template
  mainline kernels do not have.
* ChaCha20-Poly1305: cryptodev-linux has no algorithm id for it, so the engine does not list it.

Which driver: cryptodev-linux allocates by algorithm name, so the kernel's highest-priority
driver takes every session. ``CryptodevEngine(driver)`` keeps only the transforms whose
sessions land on that driver, and ``unavailable()`` says where the others landed.

Hardware or CPU: a session is hardware when CIOCGSESSINFO sets SIOP_FLAG_KERNEL_DRIVER_ONLY
or /proc/crypto shows its driver as an accelerator's (``procfs.classify``). The flag alone
is not enough: drivers set it by hand, and virtio_crypto (the lab's engine) does not.
"""

from __future__ import annotations

import ctypes
import errno
import hmac
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType

from oe_router.ocf_cryptodev import (
    COP_DECRYPT,
    COP_ENCRYPT,
    Alg,
    Cryptodev,
    CryptodevError,
    SessionInfo,
)
from oe_router.records import record

from .engine import (
    TRANSFORMS,
    AuthenticationFailed,
    EngineError,
    EngineKind,
    OpenRequest,
    SealRequest,
    Transform,
    open_each,
    seal_each,
)
from .procfs import CryptoAlg, classify, read_proc_crypto
from .software import check_keys

__all__ = ["CryptodevEngine", "Probe", "aead_aad", "cbc_mac_input"]

#: The kernel cipher name of a transform -> cryptodev's algorithm id.
_CIPHERS: Mapping[str, Alg] = MappingProxyType({"gcm(aes)": Alg.AES_GCM, "cbc(aes)": Alg.AES_CBC})
_HMACS: Mapping[str, Alg] = MappingProxyType(
    {"sha256": Alg.SHA2_256_HMAC, "sha384": Alg.SHA2_384_HMAC, "sha512": Alg.SHA2_512_HMAC}
)
_NOT_IN_CRYPTODEV = "cryptodev-linux has no algorithm id for {cipher}"


def aead_aad(hdr: bytes, seq_hi: int | None) -> bytes:
    """RFC 4106 §5 / RFC 7634 §2.1 AAD: SPI || seq_lo, or SPI || seq_hi || seq_lo with ESN."""
    if seq_hi is None:
        return hdr
    return hdr[:4] + seq_hi.to_bytes(4, "big") + hdr[4:8]


def cbc_mac_input(hdr: bytes, iv: bytes, ct: bytes, seq_hi: int | None) -> bytes:
    """RFC 4303 §3.3.2 / §2.2.1: the ICV covers SPI || seq_lo || IV || C, then seq_hi (ESN)."""
    return hdr + iv + ct + (b"" if seq_hi is None else seq_hi.to_bytes(4, "big"))


DeviceFactory = Callable[[], Cryptodev]
ProcCrypto = Callable[[], Sequence[CryptoAlg]]


@record(frozen=True)
class Probe:
    """What trying a transform's sessions once found: usable here or why not."""

    ok: bool
    driver: str = ""  # "cbc-aes-aesni" or "cbc-aes-aesni+hmac(sha256-generic)"
    hardware: bool = False  # the flag, or /proc/crypto's classification of a driver
    flagged: bool = False  # SIOP_FLAG_KERNEL_DRIVER_ONLY on a session
    reason: str = ""


def _driver_label(infos: Sequence[SessionInfo]) -> str:
    return "+".join(d for i in infos for d in i.drivers)


class _GcmCipher:
    """RFC 4106 AES-GCM on one CRYPTO_AES_GCM session (CIOCAUTHCRYPT)."""

    def __init__(self, engine: str, t: Transform, dev: Cryptodev, encr_key: bytes) -> None:
        self._engine, self._t, self._dev = engine, t, dev
        self._salt = encr_key[t.cipher_key_len :]
        self._ses = dev.open_session(Alg.AES_GCM, encr_key[: t.cipher_key_len])
        self.info = (self._ses.info(),)

    @property
    def transform(self) -> Transform:
        return self._t

    @property
    def driver(self) -> str:
        return _driver_label(self.info)

    def seal(self, hdr: bytes, seq_hi: int | None, iv: bytes, plaintext: bytes) -> bytes:
        try:
            return self._ses.aead(
                COP_ENCRYPT, plaintext, aead_aad(hdr, seq_hi), self._salt + iv, self._t.icv_len
            )
        except CryptodevError as exc:
            raise EngineError(f"{self._engine}: {self._t.name} seal: {exc}") from None

    def open(self, hdr: bytes, seq_hi: int | None, iv: bytes, sealed: bytes) -> bytes:
        if len(sealed) < self._t.icv_len:
            raise AuthenticationFailed(f"{self._t.name}: {len(sealed)} bytes is no ESP payload")
        try:
            return self._ses.aead(
                COP_DECRYPT, sealed, aead_aad(hdr, seq_hi), self._salt + iv, self._t.icv_len
            )
        except CryptodevError as exc:
            if exc.errno == errno.EBADMSG:
                raise AuthenticationFailed(f"{self._t.name}: ICV mismatch") from None
            raise EngineError(f"{self._engine}: {self._t.name} open: {exc}") from None

    def seal_many(self, batch: Sequence[SealRequest]) -> list[bytes]:
        return seal_each(self, batch)

    def open_many(self, batch: Sequence[OpenRequest]) -> list[bytes | None]:
        return open_each(self, batch)

    def close(self) -> None:
        self._ses.close()
        self._dev.close()


class _CbcHmacCipher:
    """RFC 4303/4868 AES-CBC + HMAC-SHA2 (the ICV half the hash) on two sessions (CIOCCRYPT).

    One buffer holds SPI || seq_lo || IV || C [|| seq_hi]: CBC runs in place on C and the
    HMAC reads the whole buffer, so the ICV input is never assembled in Python.
    """

    _HDR_IV = 24  # SPI (4) + seq_lo (4) + IV (16)

    def __init__(
        self, engine: str, t: Transform, dev: Cryptodev, encr_key: bytes, integ_key: bytes
    ) -> None:
        self._engine, self._t, self._dev = engine, t, dev
        self._cbc = dev.open_session(Alg.AES_CBC, encr_key)
        self._mac = dev.open_session(mac=_HMACS[t.hmac_hash or "sha256"], mackey=integ_key)
        self.info = (self._cbc.info(), self._mac.info())

    @property
    def transform(self) -> Transform:
        return self._t

    @property
    def driver(self) -> str:
        return _driver_label(self.info)

    def _load(self, hdr: bytes, seq_hi: int | None, iv: bytes, body: bytes) -> tuple[int, int]:
        """Copy SPI || seq_lo || IV || body [|| seq_hi] into the CBC session's buffer."""
        n = len(body)
        total = self._HDR_IV + n + (0 if seq_hi is None else 4)
        addr = self._cbc.buffer(total)
        ctypes.memmove(addr, hdr + iv, self._HDR_IV)
        ctypes.memmove(addr + self._HDR_IV, body, n)
        if seq_hi is not None:
            ctypes.memmove(addr + self._HDR_IV + n, seq_hi.to_bytes(4, "big"), 4)
        return addr, total

    def seal(self, hdr: bytes, seq_hi: int | None, iv: bytes, plaintext: bytes) -> bytes:
        n = len(plaintext)
        if not n or n % 16 or len(iv) != 16:
            raise EngineError(f"{self._t.name}: plaintext is not whole 16-byte blocks")
        addr, total = self._load(hdr, seq_hi, iv, plaintext)
        try:
            self._cbc.crypt_at(COP_ENCRYPT, addr + self._HDR_IV, n, iv)
            icv = self._mac.mac_at(addr, total)[: self._t.icv_len]
        except CryptodevError as exc:
            raise EngineError(f"{self._engine}: {self._t.name} seal: {exc}") from None
        return ctypes.string_at(addr + self._HDR_IV, n) + icv

    def open(self, hdr: bytes, seq_hi: int | None, iv: bytes, sealed: bytes) -> bytes:
        k = self._t.icv_len
        n = len(sealed) - k
        if n < 16 or n % 16 or len(iv) != 16:
            raise AuthenticationFailed(f"{self._t.name}: {len(sealed)} bytes is no ESP payload")
        addr, total = self._load(hdr, seq_hi, iv, sealed[:n])
        try:
            icv = self._mac.mac_at(addr, total)[:k]
            if not hmac.compare_digest(icv, sealed[n:]):
                raise AuthenticationFailed(f"{self._t.name}: ICV mismatch")
            self._cbc.crypt_at(COP_DECRYPT, addr + self._HDR_IV, n, iv)
        except CryptodevError as exc:
            raise EngineError(f"{self._engine}: {self._t.name} open: {exc}") from None
        return ctypes.string_at(addr + self._HDR_IV, n)

    def seal_many(self, batch: Sequence[SealRequest]) -> list[bytes]:
        return seal_each(self, batch)

    def open_many(self, batch: Sequence[OpenRequest]) -> list[bytes | None]:
        return open_each(self, batch)

    def close(self) -> None:
        self._cbc.close()
        self._mac.close()
        self._dev.close()


_Cipher = _GcmCipher | _CbcHmacCipher


class CryptodevEngine:
    """ESP through /dev/crypto: the kernel's pick (``cryptodev``) or one driver
    (``cryptodev:<driver>``: only transforms whose sessions land on it).

    ``transforms()`` opens each transform's sessions once (and runs one operation: a
    session that opens but cannot run, e.g. CIOCAUTHCRYPT through a 32-bit compat
    ioctl, is not usable) and caches what it found; ``unavailable()`` says why the others
    are missing. ``kind`` is HARDWARE when a usable transform runs on hardware (see the
    module docstring).
    """

    def __init__(
        self,
        driver: str | None = None,
        *,
        device: DeviceFactory = Cryptodev,
        proc_crypto: ProcCrypto = read_proc_crypto,
    ) -> None:
        self._want = driver
        self._device = device
        self._proc_crypto = proc_crypto
        self._probes: dict[str, Probe] = {}

    @property
    def name(self) -> str:
        return "cryptodev" if self._want is None else f"cryptodev:{self._want}"

    @property
    def kind(self) -> EngineKind:
        usable = [self.probe(t) for t in self.transforms()]
        return EngineKind.HARDWARE if any(p.hardware for p in usable) else EngineKind.CPU

    def probe(self, t: Transform) -> Probe:
        """Try ``t``'s sessions once (cached): where they land, hardware or not, usable or why."""
        if t.name not in self._probes:
            self._probes[t.name] = self._try(t)
        return self._probes[t.name]

    def _try(self, t: Transform) -> Probe:
        if t.cipher not in _CIPHERS or (t.hmac_hash is not None and t.hmac_hash not in _HMACS):
            return Probe(False, reason=_NOT_IN_CRYPTODEV.format(cipher=t.cipher))
        try:
            c = self._open(t, bytes(t.encr_key_len), bytes(t.auth_key_len))
        except EngineError as exc:
            return Probe(False, reason=str(exc))
        try:
            label = c.driver
            flagged = any(i.hardware for i in c.info)
            hw = flagged or self._accelerator(label.split("+"))
            if self._want is not None and self._want not in label.split("+"):
                return Probe(
                    False,
                    label,
                    hw,
                    flagged,
                    f"{t.cipher} sessions land on {label}, not {self._want} (cryptodev "
                    f"takes the kernel's highest-priority driver; raise {self._want}'s "
                    "priority or unload the others to reach it)",
                )
            try:
                c.seal(bytes(8), None, bytes(t.iv_len), bytes(16))
            except EngineError as exc:
                return Probe(False, label, hw, flagged, f"a trial seal failed: {exc}")
            return Probe(True, label, hw, flagged)
        finally:
            c.close()

    def _accelerator(self, drivers: Sequence[str]) -> bool:
        """Whether /proc/crypto shows one of ``drivers`` as a crypto engine's."""
        algs = {a.driver: a for a in self._proc_crypto()}
        return any(d in algs and classify(algs[d]) is EngineKind.HARDWARE for d in drivers)

    def transforms(self) -> tuple[Transform, ...]:
        return tuple(t for t in TRANSFORMS.values() if self.probe(t).ok)

    def unavailable(self) -> Mapping[str, str]:
        """Transform name -> why this engine cannot run it here."""
        return {t.name: p.reason for t in TRANSFORMS.values() if not (p := self.probe(t)).ok}

    def driver(self, transform: Transform) -> str:
        p = self.probe(transform)
        if not p.ok:
            raise EngineError(f"{self.name}: {transform.name}: {p.reason}")
        return p.driver

    def hardware(self, transform: Transform) -> bool:
        """Whether ``transform`` runs on a kernel-only (engine) driver here."""
        return self.probe(transform).hardware

    def _open(self, t: Transform, encr_key: bytes, integ_key: bytes) -> _Cipher:
        try:
            dev = self._device()
        except CryptodevError as exc:
            raise EngineError(f"{self.name}: {t.name}: {exc}") from None
        try:
            if _CIPHERS[t.cipher] is Alg.AES_GCM:
                return _GcmCipher(self.name, t, dev, encr_key)
            return _CbcHmacCipher(self.name, t, dev, encr_key, integ_key)
        except CryptodevError as exc:
            dev.close()
            raise EngineError(f"{self.name}: {t.name}: {exc}") from None

    def cipher(self, transform: Transform, encr_key: bytes, integ_key: bytes = b"") -> _Cipher:
        check_keys(self.name, transform, encr_key, integ_key)
        p = self.probe(transform)
        if not p.ok:
            raise EngineError(f"{self.name}: {transform.name}: {p.reason}")
        c = self._open(transform, encr_key, integ_key)
        if self._want is not None and self._want not in c.driver.split("+"):
            c.close()
            raise EngineError(
                f"{self.name}: {transform.name}: the session landed on {c.driver}, "
                f"not {self._want} (the kernel's pick changed since the probe)"
            )
        return c
