"""The AF_ALG engine: ESP transforms on the kernel's crypto API through ``socket.AF_ALG``.

Why AF_ALG: it reaches every implementation the kernel has (CPU instructions and
accelerators alike) with no extra module, and it can pin one driver, which is how a
router's crypto engine is proven and measured on its own. ``AfAlgEngine()`` binds by
algorithm name (whatever the kernel picks, as XFRM would); ``AfAlgEngine(driver)`` binds
that driver: an AEAD driver as is, a bare cipher or hash driver inside the kernel's
``authenc``/``authencesn`` template.

The layout is the kernel's own ESP (net/ipv4/esp4.c), so the request shapes below are
the ones its drivers are tested with:

* AEADs (``rfc4106(gcm(aes))``, ``rfc7539esp(chacha20,poly1305)``): key = cipher key ||
  salt; the associated data handed to AF_ALG is SPI || [seq_hi ||] seq_lo || IV, the IV
  also set with ALG_SET_IV. The rfc4106/rfc7539esp templates authenticate all of it but
  the IV (crypto/gcm.c ``crypto_rfc4106_crypt``, crypto/chacha20poly1305.c).
* ``authenc(hmac(sha256),cbc(aes))``: key = rtattr(CRYPTO_AUTHENC_KEYA_PARAM) || be32
  enckeylen || authkey || enckey; associated data SPI || seq_lo || IV so the HMAC covers
  the IV (RFC 4303 §3.3.2). With ESN, ``authencesn`` with SPI || seq_hi || seq_lo || IV:
  it moves seq_hi behind the ciphertext and MACs SPI || seq_lo || IV || C || seq_hi
  (crypto/authencesn.c, RFC 4303 §3.3.2.1).
"""

from __future__ import annotations

import errno
import re
import socket
import struct
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

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
from .procfs import CryptoAlg, classify, drivers_for, read_proc_crypto
from .software import check_keys

__all__ = ["AfAlgEngine", "authenc_key", "esp_assoc"]

_T = TypeVar("_T")
#: Op sockets a hardware driver's batches are spread over (see _Cipher).
HARDWARE_LANES = 4

# include/uapi/linux/if_alg.h (Python exposes them on Linux; spelled out for the host,
# which may lack AF_ALG, and for mypy).
SOL_ALG = 279
ALG_SET_KEY = 1
ALG_SET_IV = 2
ALG_SET_AEAD_AUTHSIZE = 5
ALG_OP_DECRYPT = 0
ALG_OP_ENCRYPT = 1
AF_ALG = 38

# crypto/authenc.c's key blob head: struct rtattr {u16 rta_len; u16 rta_type} in host
# order, then struct crypto_authenc_key_param {__be32 enckeylen}.
_RTATTR = struct.Struct("=HH")
_ENCKEYLEN = struct.Struct(">I")
CRYPTO_AUTHENC_KEYA_PARAM = 1


def authenc_key(encr_key: bytes, integ_key: bytes) -> bytes:
    """The key blob ``authenc``/``authencesn`` take: rtattr{8, KEYA_PARAM}, be32 enckeylen,
    the HMAC key, the cipher key (crypto/authenc.c ``crypto_authenc_extractkeys``)."""
    return (
        _RTATTR.pack(_RTATTR.size + _ENCKEYLEN.size, CRYPTO_AUTHENC_KEYA_PARAM)
        + _ENCKEYLEN.pack(len(encr_key))
        + integ_key
        + encr_key
    )


def esp_assoc(hdr: bytes, seq_hi: int | None, iv: bytes) -> bytes:
    """AF_ALG's associated data for ESP, as esp4.c builds it: SPI || seq_lo || IV, or
    SPI || seq_hi || seq_lo || IV with ESN (the templates strip or move what is not AAD)."""
    if seq_hi is None:
        return hdr[:8] + iv
    return hdr[:4] + seq_hi.to_bytes(4, "big") + hdr[4:8] + iv


def _esn_name(aead: str) -> str:
    """The algorithm that runs ``aead`` with 64-bit sequence numbers."""
    return "authencesn" + aead[len("authenc") :] if aead.startswith("authenc(") else aead


@record(frozen=True)
class _Binding:
    """What to bind for one transform: AF_ALG names for 32-bit and ESN sequence numbers."""

    name: str
    esn_name: str
    driver: str = ""  # the kernel's driver name of what got bound (filled after a bind)
    hardware: bool = False  # that driver runs on an accelerator (procfs.classify)


def _alg_socket() -> socket.socket:
    try:
        return socket.socket(AF_ALG, socket.SOCK_SEQPACKET, 0)
    except OSError as exc:
        raise EngineError(
            f"afalg: no AF_ALG sockets here ({exc.strerror}): the kernel lacks "
            "CONFIG_CRYPTO_USER_API_AEAD or af_alg/algif_aead are not loaded"
        ) from None


def _bind(name: str, key: bytes, icv_len: int) -> socket.socket:
    """A transform socket bound to ``name`` with ``key`` set; OSError as the kernel says."""
    s = _alg_socket()
    try:
        s.bind(("aead", name))
        s.setsockopt(SOL_ALG, ALG_SET_KEY, key)
        s.setsockopt(SOL_ALG, ALG_SET_AEAD_AUTHSIZE, None, icv_len)
    except OSError:
        s.close()
        raise
    return s


def _dummy_key(t: Transform) -> bytes:
    if t.is_aead:
        return bytes(t.encr_key_len)
    return authenc_key(bytes(t.encr_key_len), bytes(t.auth_key_len))


class _Cipher:
    """One SA direction on AF_ALG: a transform socket with the key, and op sockets on it.

    ``lanes`` > 1 (hardware drivers): a batch is split over that many op sockets, each
    driven by a thread of its own, so requests wait on the device together (the kernel
    call releases the GIL). Measured in the lab's router VM on virtio-crypto: 4 lanes
    seal about twice as many 1400-byte packets per second as one; on AES-NI they gain
    nothing, so CPU drivers keep one lane.
    """

    def __init__(
        self, engine: AfAlgEngine, t: Transform, binding: _Binding, key: bytes, lanes: int = 1
    ) -> None:
        self._engine = engine
        self._t = t
        self._binding = binding
        self._key = key
        self._lanes = max(1, lanes)
        self._icv = t.icv_len
        self._cbc = not t.is_aead
        # esn? -> (transform socket, op sockets); the ESN one is opened when first needed
        self._socks: dict[bool, tuple[socket.socket, list[socket.socket]]] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._closed = False
        self._ops(False)

    def __repr__(self) -> str:  # no key material, ever
        return f"<afalg cipher {self._t.name} on {self._binding.name}>"

    def _ops(self, esn: bool, lanes: int = 1) -> list[socket.socket]:
        """At least ``lanes`` op sockets for 32-bit or ESN sequence numbers."""
        if self._closed:
            raise EngineError(f"{self._engine.name}: {self._t.name} cipher used after close()")
        if esn and self._binding.esn_name == self._binding.name:
            esn = False  # an AEAD takes both forms on one transform
        if esn not in self._socks:
            name = self._binding.esn_name if esn else self._binding.name
            try:
                tfm = _bind(name, self._key, self._t.icv_len)
            except OSError as exc:
                raise self._engine.error(self._t, f"binding {name}", exc) from None
            self._socks[esn] = (tfm, [])
        tfm, ops = self._socks[esn]
        while len(ops) < lanes:
            try:
                ops.append(tfm.accept()[0])
            except OSError as exc:
                raise self._engine.error(self._t, "accept", exc) from None
        return ops

    @property
    def transform(self) -> Transform:
        return self._t

    def _seal(
        self, op: socket.socket, hdr: bytes, seq_hi: int | None, iv: bytes, pt: bytes
    ) -> bytes:
        assoc = esp_assoc(hdr, seq_hi, iv)
        n = len(assoc)
        try:
            op.sendmsg_afalg([assoc, pt], op=ALG_OP_ENCRYPT, iv=iv, assoclen=n)
            out = op.recv(n + len(pt) + self._icv)
        except OSError as exc:
            raise self._engine.error(self._t, "seal", exc) from None
        return out[n:]

    def _open(
        self, op: socket.socket, hdr: bytes, seq_hi: int | None, iv: bytes, sealed: bytes
    ) -> bytes:
        clen = len(sealed) - self._icv
        if clen < 0 or (self._cbc and clen % 16):
            raise AuthenticationFailed(f"{self._t.name}: {len(sealed)} bytes is no ESP payload")
        assoc = esp_assoc(hdr, seq_hi, iv)
        n = len(assoc)
        try:
            op.sendmsg_afalg([assoc, sealed], op=ALG_OP_DECRYPT, iv=iv, assoclen=n)
            out = op.recv(n + clen)
        except OSError as exc:
            if exc.errno == errno.EBADMSG:
                raise AuthenticationFailed(f"{self._t.name}: ICV mismatch") from None
            raise self._engine.error(self._t, "open", exc) from None
        return out[n:]

    def _open_or_none(
        self, op: socket.socket, hdr: bytes, seq_hi: int | None, iv: bytes, sealed: bytes
    ) -> bytes | None:
        try:
            return self._open(op, hdr, seq_hi, iv, sealed)
        except AuthenticationFailed:
            return None

    def seal(self, hdr: bytes, seq_hi: int | None, iv: bytes, plaintext: bytes) -> bytes:
        return self._seal(self._ops(seq_hi is not None)[0], hdr, seq_hi, iv, plaintext)

    def open(self, hdr: bytes, seq_hi: int | None, iv: bytes, sealed: bytes) -> bytes:
        return self._open(self._ops(seq_hi is not None)[0], hdr, seq_hi, iv, sealed)

    def _lanes_for(self, batch: Sequence[SealRequest] | Sequence[OpenRequest]) -> int:
        """How many op sockets to spread ``batch`` over (1: a plain loop)."""
        if self._lanes == 1 or len(batch) < 2:
            return 1
        if len({r.seq_hi is None for r in batch}) != 1:
            return 1  # mixed sequence-number forms: rare, not worth two pools
        return min(self._lanes, len(batch))

    def _spread(self, lanes: int, n: int) -> list[range]:
        step = -(-n // lanes)
        return [range(i, min(i + step, n)) for i in range(0, n, step)]

    def seal_many(self, batch: Sequence[SealRequest]) -> list[bytes]:
        lanes = self._lanes_for(batch)
        if lanes == 1:
            return seal_each(self, batch)
        ops = self._ops(batch[0].seq_hi is not None, lanes)

        def run(op: socket.socket, idx: range) -> list[bytes]:
            return [self._seal(op, batch[i].hdr, batch[i].seq_hi, batch[i].iv,
                               batch[i].plaintext) for i in idx]  # fmt: skip

        return self._in_lanes(run, ops, len(batch), lanes)

    def open_many(self, batch: Sequence[OpenRequest]) -> list[bytes | None]:
        lanes = self._lanes_for(batch)
        if lanes == 1:
            return open_each(self, batch)
        ops = self._ops(batch[0].seq_hi is not None, lanes)

        def run(op: socket.socket, idx: range) -> list[bytes | None]:
            return [self._open_or_none(op, batch[i].hdr, batch[i].seq_hi, batch[i].iv,
                                       batch[i].sealed) for i in idx]  # fmt: skip

        return self._in_lanes(run, ops, len(batch), lanes)

    def _in_lanes(
        self, run: Callable[[socket.socket, range], list[_T]], ops: list[socket.socket], n: int,
        lanes: int,
    ) -> list[_T]:  # fmt: skip
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self._lanes, thread_name_prefix="afalg")
        parts = self._spread(lanes, n)
        futures = [self._pool.submit(run, op, idx) for op, idx in zip(ops, parts, strict=False)]
        out: list[_T] = []
        for f in futures:
            out.extend(f.result())  # an EngineError in a lane is raised here
        return out

    def close(self) -> None:
        self._closed = True
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        for tfm, ops in self._socks.values():
            for op in ops:
                op.close()
            tfm.close()
        self._socks.clear()


class AfAlgEngine:
    """ESP on the kernel's crypto API: its pick per algorithm, or one ``driver``.

    ``proc_crypto`` is where driver names are read (tests point it at a recording).
    """

    def __init__(self, driver: str | None = None, *, proc_crypto: str = "/proc/crypto") -> None:
        self.driver_name = driver
        self.proc_crypto = proc_crypto
        self._bindings: dict[str, _Binding | None] = {}  # transform name -> what binds it
        self._why: dict[str, str] = {}  # transform name -> why this engine cannot run it

    def __repr__(self) -> str:
        return f"AfAlgEngine({self.driver_name!r})"

    @property
    def name(self) -> str:
        return "afalg" if self.driver_name is None else f"afalg:{self.driver_name}"

    @property
    def kind(self) -> EngineKind:
        """HARDWARE when a transform runs on an accelerator's driver (after a probe)."""
        for t in self.transforms():
            b = self._bindings.get(t.name)
            if b is not None and b.hardware:
                return EngineKind.HARDWARE
        return EngineKind.CPU

    def error(self, t: Transform, what: str, exc: OSError) -> EngineError:
        """An EngineError naming this engine, the driver and the transform."""
        b = self._bindings.get(t.name)
        drv = b.driver or b.name if b is not None else self.driver_name or t.aead
        return EngineError(
            f"{self.name}: {what} failed for {t.name} on {drv}: "
            f"{exc.strerror or exc} (errno {exc.errno})"
        )

    # -- what to bind

    def _candidates(self, t: Transform, algs: tuple[CryptoAlg, ...]) -> _Binding | str:
        """The names that run ``t`` on this engine, or why there are none."""
        if self.driver_name is None:
            return _Binding(t.aead, _esn_name(t.aead))
        drv = self.driver_name
        mine = [a for a in algs if a.driver == drv]
        if not mine:
            return f"no driver {drv!r} in {self.proc_crypto}"
        a = mine[0]
        if a.type == "aead":
            if a.name == t.aead:
                # An authenc AEAD driver serves 32-bit sequence numbers only, unless its
                # engine also registers the authencesn twin (same module).
                esn = a.driver
                if a.name != _esn_name(a.name):
                    twins = [
                        b.driver
                        for b in drivers_for(algs, _esn_name(a.name))
                        if b.module == a.module
                    ]
                    esn = twins[0] if twins else _esn_name(t.aead)
                return _Binding(a.driver, esn)
            return f"{drv} implements {a.name}, not {t.aead}"
        if t.is_aead:
            return f"{drv} ({a.type} {a.name}) is no AEAD driver for {t.aead}"
        hmac = f"hmac({t.hmac_hash})"
        if a.type == "skcipher" and a.name == t.cipher:
            return _Binding(f"authenc({hmac},{drv})", f"authencesn({hmac},{drv})")
        if a.type in ("ahash", "shash") and a.name == hmac:
            return _Binding(f"authenc({drv},{t.cipher})", f"authencesn({drv},{t.cipher})")
        if a.type in ("ahash", "shash") and a.name == t.hmac_hash:
            return _Binding(
                f"authenc(hmac({drv}),{t.cipher})", f"authencesn(hmac({drv}),{t.cipher})"
            )
        return f"{drv} ({a.type} {a.name}) has no part in {t.aead}"

    def _probe(self, t: Transform) -> _Binding | None:
        """Bind ``t`` once with a dummy key; the binding with the driver's real names."""
        algs = read_proc_crypto(self.proc_crypto)
        cand = self._candidates(t, algs)
        if isinstance(cand, str):
            self._why[t.name] = cand
            return None
        key = _dummy_key(t)
        names = []
        for name, generic in ((cand.name, t.aead), (cand.esn_name, _esn_name(t.aead))):
            try:
                bound = _resolve(name, generic, key, t.icv_len, self.proc_crypto, self.driver_name)
            except EngineError as exc:  # no AF_ALG at all
                self._why[t.name] = str(exc)
                return None
            if isinstance(bound, OSError):
                if name == cand.name:
                    self._why[t.name] = f"{name}: {bound.strerror or bound}"
                    return None
                bound = name  # ESN unavailable: a cipher says so when asked for it
            names.append(bound)
        algs = read_proc_crypto(self.proc_crypto)
        drv = _driver_of(algs, names[0], t.aead)
        hw = classify(_alg_for(algs, drv, t.aead)) is EngineKind.HARDWARE
        return _Binding(names[0], names[1], drv, hw)

    def transforms(self) -> tuple[Transform, ...]:
        for t in TRANSFORMS.values():
            if t.name not in self._bindings:
                self._bindings[t.name] = self._probe(t)
        return tuple(t for t in TRANSFORMS.values() if self._bindings[t.name] is not None)

    def why_not(self, transform: Transform) -> str:
        """Why this engine cannot run ``transform`` ("" when it can)."""
        self.transforms()
        return self._why.get(transform.name, "")

    def driver(self, transform: Transform) -> str:
        """The kernel's driver name of what runs ``transform`` (read after binding)."""
        self.transforms()
        b = self._bindings.get(transform.name)
        if b is None:
            raise EngineError(
                f"{self.name}: cannot run {transform.name}: {self._why.get(transform.name)}"
            )
        return b.driver

    def cipher(self, transform: Transform, encr_key: bytes, integ_key: bytes = b"") -> _Cipher:
        check_keys(self.name, transform, encr_key, integ_key)
        self.transforms()
        b = self._bindings.get(transform.name)
        if b is None:
            raise EngineError(
                f"{self.name}: cannot run {transform.name}: {self._why.get(transform.name)}"
            )
        key = encr_key if transform.is_aead else authenc_key(encr_key, integ_key)
        return _Cipher(self, transform, b, key, HARDWARE_LANES if b.hardware else 1)


def _resolve(
    name: str, generic: str, key: bytes, icv_len: int, proc: str, driver: str | None
) -> str | OSError:
    """The name that binds ``name``'s implementation (the algorithm ``generic``), or the
    kernel's error.

    A template around a driver name ("authenc(hmac(sha256),virtio_crypto_aes_cbc)") is
    instantiated by a bind, but that bind still fails (ENOENT): the kernel matches the
    request against the new instance's generic and driver names, and it is neither
    ("authenc(hmac(sha256-generic),virtio_crypto_aes_cbc)"). So an instance holding the
    driver is looked up in /proc/crypto first and bound by its driver name; only when
    there is none is the template bound, which registers one (and self-tests it: every
    needless bind of the template would add another instance). The instance must be of
    ``generic`` too: an ``authenc(hmac(sha256-generic),<driver>)`` is no HMAC-SHA384 one.
    """
    if driver is not None and "(" in name:
        found = _instance(name, generic, key, icv_len, proc, driver)
        if found:
            return found
    try:
        _bind(name, key, icv_len).close()
        return name
    except OSError as exc:
        if exc.errno != errno.ENOENT or driver is None or "(" not in name:
            return exc
        return _instance(name, generic, key, icv_len, proc, driver) or exc


def _instance(name: str, generic: str, key: bytes, icv_len: int, proc: str, driver: str) -> str:
    """The driver name of a bindable instance of ``name``'s template around ``driver``
    that implements ``generic``."""
    outer = name.split("(", 1)[0] + "("
    found = [
        a
        for a in read_proc_crypto(proc)
        if a.type == "aead"
        and a.name == generic
        and a.driver.startswith(outer)
        and driver in re.split(r"[(),]", a.driver[len(outer) :])
    ]
    for a in sorted(found, key=lambda a: -a.priority):
        try:
            _bind(a.driver, key, icv_len).close()
            return a.driver
        except OSError:
            continue
    return ""


def _driver_of(algs: tuple[CryptoAlg, ...], bound: str, aead: str) -> str:
    """The driver name of the implementation a bind of ``bound`` got."""
    exact = [a for a in algs if a.driver == bound]
    if exact:
        return exact[0].driver
    picks = drivers_for(algs, bound) or drivers_for(algs, aead)
    return picks[0].driver if picks else bound


def _alg_for(algs: tuple[CryptoAlg, ...], driver: str, aead: str) -> CryptoAlg:
    for a in algs:
        if a.driver == driver:
            return a
    return CryptoAlg(name=aead, driver=driver, module="kernel", priority=0, type="aead")
