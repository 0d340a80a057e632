"""ctypes binding of /dev/crypto (cryptodev-linux, the OCF ioctls).

Why OCF: OpenWrt ships cryptodev-linux as ``kmod-cryptodev``. Its /dev/crypto speaks the
OpenBSD Cryptographic Framework's API (``CIOCGSESSION``, ``CIOCCRYPT``, ...), the same one
OpenSSL's devcrypto engine uses, and puts any kernel crypto driver behind it, the router's
engine (EIP93, SafeXcel, CAAM, talitos ...) included. It is a second road to those engines
beside AF_ALG, with zero-copy page pinning and the driver's "hardware" flag in
``CIOCGSESSINFO``.

Why layouts are built per ABI: the structures hold user pointers, so their sizes and the
ioctl numbers computed from those sizes change between 32-bit (MIPS, ARM, i386) and 64-bit
userlands. MIPS, PowerPC, SPARC and Alpha also encode ``_IOC`` differently (three direction
bits, 13 size bits) from asm-generic (x86, ARM, AArch64, RISC-V). ``layout(abi)`` lays out each
table the way the C compiler does for that ABI (natural alignment, a __u64's alignment taken
from the ABI: 4 on i386, 8 on ARM EABI and MIPS o32), with explicit padding and ``_pack_ = 1``,
so the result never depends on the host's own ctypes (``oe_router.cabi``). None of these
structures holds a __u64 today, so in practice only the pointer size and the ioctl encoding
differ between ABIs.

Supported ABIs: ``ABIS`` (x86_64, i386, aarch64, arm EABI, mips/mipsel o32 and n32, mips64 n64,
powerpc, powerpc64, riscv64). tests/unit/test_ocf_cryptodev.py compares each layout's offsets,
sizes and ioctl numbers with the vendored header compiled by gcc -m64/-m32 and by clang for
MIPS o32 and ARM EABI. A 32-bit process on a 64-bit kernel goes through cryptodev's compat
ioctl, which has no CIOCAUTHCRYPT (AEAD then fails with EINVAL); OpenWrt runs userland and
kernel of one width, so this does not arise there.

The kernel picks the driver of a session by algorithm name (highest priority); cryptodev-linux
has no way to ask for a driver (no CIOCGSESSION2/crid as in FreeBSD). ``Session.info()``
says where a session landed.
"""

from __future__ import annotations

import contextlib
import ctypes
import enum
import errno as errno_mod
import fcntl
import os
import weakref
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

from oe_router.cabi import (
    ABIS,
    PTR,
    U16,
    U32,
    U64,
    Abi,
    Char,
    IocEncoding,
    StructTable,
    field_offsets,
    host_abi,
)
from oe_router.cabi import struct_type as _struct
from oe_router.records import record

__all__ = [
    "ABIS",
    "COP_DECRYPT",
    "COP_ENCRYPT",
    "DEVICE",
    "HOST_ABI",
    "HOST_LAYOUT",
    "PTR",
    "SIOP_FLAG_KERNEL_DRIVER_ONLY",
    "TABLES",
    "U16",
    "U32",
    "U64",
    "Abi",
    "Alg",
    "Char",
    "Cryptodev",
    "CryptodevError",
    "IocEncoding",
    "Layout",
    "Session",
    "SessionInfo",
    "StructTable",
    "host_abi",
    "layout",
]

DEVICE = "/dev/crypto"

# ------------------------------------------------------------------ constants (crypto/cryptodev.h)


class Alg(enum.IntEnum):
    """The cryptodev_crypto_op_t values this project may ask for (the kernel's names after)."""

    AES_CBC = 11  # cbc(aes)
    SHA2_256_HMAC = 18  # hmac(sha256)
    SHA2_384_HMAC = 19  # hmac(sha384)
    SHA2_512_HMAC = 20  # hmac(sha512)
    AES_CTR = 21  # ctr(aes)
    AES_GCM = 50  # gcm(aes), an AEAD: CIOCAUTHCRYPT, 12-byte IV
    AES_CCM = 51  # ccm(aes)
    SHA2_256 = 104  # sha256


#: The kernel algorithm cryptodev-linux allocates for each id (ioctl.c, crypto_create_session).
ALG_NAMES: Mapping[Alg, str] = MappingProxyType(
    {
        Alg.AES_CBC: "cbc(aes)",
        Alg.SHA2_256_HMAC: "hmac(sha256)",
        Alg.SHA2_384_HMAC: "hmac(sha384)",
        Alg.SHA2_512_HMAC: "hmac(sha512)",
        Alg.AES_CTR: "ctr(aes)",
        Alg.AES_GCM: "gcm(aes)",
        Alg.AES_CCM: "ccm(aes)",
        Alg.SHA2_256: "sha256",
    }
)

COP_ENCRYPT = 0
COP_DECRYPT = 1
# crypt_op / crypt_auth_op flags. The AEAD "types" are not ESP: TLS is MAC-then-encrypt with
# TLS padding, SRTP is encrypt-then-MAC for stream ciphers only (CBC is refused), so ESP's
# AES-CBC + HMAC runs as two sessions instead (offload/cryptodev.py).
COP_FLAG_NONE = 0
COP_FLAG_UPDATE = 1 << 0
COP_FLAG_FINAL = 1 << 1
COP_FLAG_WRITE_IV = 1 << 2
COP_FLAG_NO_ZC = 1 << 3
COP_FLAG_AEAD_TLS_TYPE = 1 << 4
COP_FLAG_AEAD_SRTP_TYPE = 1 << 5
COP_FLAG_RESET = 1 << 6
#: CIOCGSESSINFO flags: set when a driver of the session is only reachable through the
#: kernel (an engine), not for software drivers or CPU instructions (CRYPTO_ALG_KERN_DRIVER_ONLY).
SIOP_FLAG_KERNEL_DRIVER_ONLY = 1
CRYPTODEV_MAX_ALG_NAME = 64
AALG_MAX_RESULT_LEN = 64

# ----------------------------------------------------------------------------- the structures
# (the ABIs and the layout machinery: oe_router.cabi)


ALG_INFO = StructTable("alg_info", (("cra_name", Char(CRYPTODEV_MAX_ALG_NAME)),
                                    ("cra_driver_name", Char(CRYPTODEV_MAX_ALG_NAME))))  # fmt: skip
SESSION_OP = StructTable(  # input of CIOCGSESSION; ses comes back
    "session_op",
    (("cipher", U32), ("mac", U32), ("keylen", U32), ("key", PTR), ("mackeylen", U32),
     ("mackey", PTR), ("ses", U32)),
)  # fmt: skip
SESSION_INFO_OP = StructTable(  # CIOCGSESSINFO: where the session landed
    "session_info_op",
    (("ses", U32), ("cipher_info", ALG_INFO), ("hash_info", ALG_INFO), ("alignmask", U16),
     ("flags", U32)),
)  # fmt: skip
CRYPT_OP = StructTable(  # CIOCCRYPT: cipher and/or hash
    "crypt_op",
    (("ses", U32), ("op", U16), ("flags", U16), ("len", U32), ("src", PTR), ("dst", PTR),
     ("mac", PTR), ("iv", PTR)),
)  # fmt: skip
CRYPT_AUTH_OP = StructTable(  # CIOCAUTHCRYPT: AEAD (auth_src is the AAD)
    "crypt_auth_op",
    (("ses", U32), ("op", U16), ("flags", U16), ("len", U32), ("auth_len", U32),
     ("auth_src", PTR), ("src", PTR), ("dst", PTR), ("tag", PTR), ("tag_len", U32),
     ("iv", PTR), ("iv_len", U32)),
)  # fmt: skip
TABLES: tuple[StructTable, ...] = (SESSION_OP, SESSION_INFO_OP, CRYPT_OP, CRYPT_AUTH_OP)

_IOC_READ, _IOC_WRITE = "r", "w"
#: The ioctls this binding uses: name -> (direction, number, argument), all of type 'c'.
IOCTLS: Mapping[str, tuple[str, int, StructTable | type[ctypes.c_uint32]]] = MappingProxyType(
    {
        "CIOCGSESSION": ("rw", 102, SESSION_OP),
        "CIOCFSESSION": ("w", 103, U32),
        "CIOCCRYPT": ("rw", 104, CRYPT_OP),
        "CIOCGSESSINFO": ("rw", 107, SESSION_INFO_OP),
        "CIOCAUTHCRYPT": ("rw", 109, CRYPT_AUTH_OP),
    }
)


def ioc(abi: Abi, direction: str, type_: int, nr: int, size: int) -> int:
    """_IOC(dir, type, nr, size) for ``abi`` (``direction``: "", "r", "w" or "rw")."""
    if abi.ioc is IocEncoding.GENERIC:
        bits = {"": 0, "w": 1, "r": 2, "rw": 3}[direction]
        shift, size_bits = 30, 14
    else:
        bits = {"": 1, "r": 2, "w": 4, "rw": 6}[direction]
        shift, size_bits = 29, 13
    if size >= 1 << size_bits:
        raise ValueError(f"ioctl argument of {size} bytes does not fit {abi.name}'s _IOC")
    return (bits << shift) | (size << 16) | (type_ << 8) | nr


@record(frozen=True)
class Layout:
    """The structures and ioctl numbers of one ABI."""

    abi: Abi
    structs: Mapping[str, type[Any]]  # C struct name -> ctypes class
    ioctls: Mapping[str, int]

    def offsets(self, table: StructTable) -> dict[str, int]:
        """Every field's offset, nested ones as ``outer.inner`` (what offsetof reports)."""
        return field_offsets(self.structs[table.name])


def layout(abi: Abi) -> Layout:
    """Structures and ioctl numbers for ``abi``."""
    done: dict[str, type[Any]] = {}
    structs = {t.name: _struct(t, abi, done) for t in TABLES}
    ioctls = {}
    for name, (direction, nr, arg) in IOCTLS.items():
        size = ctypes.sizeof(structs[arg.name]) if isinstance(arg, StructTable) else 4
        ioctls[name] = ioc(abi, direction, ord("c"), nr, size)
    return Layout(abi, MappingProxyType(structs), MappingProxyType(ioctls))


HOST_ABI = host_abi()
#: This process's structures and ioctl numbers (what the device calls use).
HOST_LAYOUT = layout(HOST_ABI)

# ----------------------------------------------------------------------------------- the device


class CryptodevError(Exception):
    """An ioctl on /dev/crypto failed; names the ioctl, the algorithm and the errno."""

    def __init__(self, ioctl: str, algorithm: str, err: int, hint: str = "") -> None:
        self.ioctl = ioctl
        self.algorithm = algorithm
        self.errno = err
        code = errno_mod.errorcode.get(err, str(err))
        msg = f"{ioctl} for {algorithm}: {os.strerror(err)} ({code})"
        super().__init__(msg + (f"; {hint}" if hint else ""))


@record(frozen=True)
class SessionInfo:
    """CIOCGSESSINFO: the kernel algorithms and drivers behind a session."""

    cipher_name: str
    cipher_driver: str
    hash_name: str
    hash_driver: str
    alignmask: int
    flags: int

    @property
    def hardware(self) -> bool:
        """A driver only the kernel can reach (an engine): SIOP_FLAG_KERNEL_DRIVER_ONLY."""
        return bool(self.flags & SIOP_FLAG_KERNEL_DRIVER_ONLY)

    @property
    def drivers(self) -> tuple[str, ...]:
        return tuple(d for d in (self.cipher_driver, self.hash_driver) if d)


IoctlFn = Callable[[int, int, Any, bool], int]


def _ioctl(fd: int, request: int, arg: Any, mutate: bool) -> int:
    return int(fcntl.ioctl(fd, request, arg, mutate))


class Cryptodev:
    """An open /dev/crypto. Its sessions live until they are closed or the device is.

    ``ioctl`` is the seam the unit tests replace; everything else is the real binding.
    """

    def __init__(self, path: str = DEVICE, *, ioctl: IoctlFn = _ioctl) -> None:
        try:
            self._fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            hint = "load the cryptodev module (modprobe cryptodev)" if path == DEVICE else ""
            raise CryptodevError(f"open {path}", "any", exc.errno or errno_mod.EIO, hint) from None
        self._call = ioctl
        self._closer = weakref.finalize(self, os.close, self._fd)
        self.path = path

    def ioctl(self, name: str, algorithm: str, arg: Any) -> None:
        """One ioctl by name; CryptodevError names it, the algorithm and the errno."""
        try:
            self._call(self._fd, HOST_LAYOUT.ioctls[name], arg, True)
        except OSError as exc:
            raise CryptodevError(name, algorithm, exc.errno or errno_mod.EIO) from None

    def open_session(
        self, cipher: Alg | None = None, key: bytes = b"", mac: Alg | None = None,
        mackey: bytes = b"",
    ) -> Session:  # fmt: skip
        """CIOCGSESSION for a cipher, a MAC/hash, or (for CIOCCRYPT's hash-then-encrypt) both."""
        algorithm = "+".join(ALG_NAMES[a] for a in (cipher, mac) if a is not None) or "nothing"
        sop = HOST_LAYOUT.structs["session_op"]()
        kbuf = ctypes.create_string_buffer(key, len(key) or 1)
        mbuf = ctypes.create_string_buffer(mackey, len(mackey) or 1)
        try:
            sop.cipher = int(cipher or 0)
            sop.mac = int(mac or 0)
            sop.keylen, sop.key = len(key), ctypes.addressof(kbuf) if key else 0
            sop.mackeylen, sop.mackey = len(mackey), ctypes.addressof(mbuf) if mackey else 0
            self.ioctl("CIOCGSESSION", algorithm, sop)
        finally:  # the key copies never outlive the call
            ctypes.memset(kbuf, 0, ctypes.sizeof(kbuf))
            ctypes.memset(mbuf, 0, ctypes.sizeof(mbuf))
        return Session(self, int(sop.ses), algorithm)

    def close(self) -> None:
        """Close the device; the kernel frees every session still open on it."""
        self._closer()

    def __enter__(self) -> Cryptodev:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Session:
    """One cryptodev session, with its argument structures and a buffer kept for reuse.

    Data is copied into a buffer of the session's own and processed in place (the kernel
    pins the pages: zero copy), so bytes objects are never written to.
    """

    def __init__(self, dev: Cryptodev, ses: int, algorithm: str) -> None:
        self._dev = dev
        self.ses = ses
        self.algorithm = algorithm
        self._cop = HOST_LAYOUT.structs["crypt_op"]()
        self._cop.ses = ses
        self._caop = HOST_LAYOUT.structs["crypt_auth_op"]()
        self._caop.ses = ses
        self._small = ctypes.create_string_buffer(AALG_MAX_RESULT_LEN * 2)  # IV, AAD, MAC
        self._small_addr = ctypes.addressof(self._small)
        self._buf = ctypes.create_string_buffer(2048)
        self._addr = ctypes.addressof(self._buf)
        self._open = True

    def buffer(self, size: int) -> int:
        """The address of this session's data buffer, grown to at least ``size`` bytes."""
        if size > ctypes.sizeof(self._buf):
            self._buf = ctypes.create_string_buffer(max(size, 2 * ctypes.sizeof(self._buf)))
            self._addr = ctypes.addressof(self._buf)
        return self._addr

    def info(self) -> SessionInfo:
        """CIOCGSESSINFO: the algorithms and drivers the kernel chose, and the hardware flag."""
        siop = HOST_LAYOUT.structs["session_info_op"]()
        siop.ses = self.ses
        self._dev.ioctl("CIOCGSESSINFO", self.algorithm, siop)

        def s(b: bytes) -> str:
            return b.decode("ascii", "replace")

        return SessionInfo(
            s(siop.cipher_info.cra_name),
            s(siop.cipher_info.cra_driver_name),
            s(siop.hash_info.cra_name),
            s(siop.hash_info.cra_driver_name),
            int(siop.alignmask),
            int(siop.flags),
        )

    def crypt_at(self, op: int, addr: int, length: int, iv: bytes | None) -> None:
        """CIOCCRYPT in place on ``length`` bytes at ``addr`` (inside ``buffer()``)."""
        cop = self._cop
        cop.op, cop.flags, cop.len = op, 0, length
        cop.src = cop.dst = addr
        cop.mac = 0
        if iv is None:
            cop.iv = 0
        else:
            ctypes.memmove(self._small_addr, iv, len(iv))
            cop.iv = self._small_addr
        self._dev.ioctl("CIOCCRYPT", self.algorithm, cop)

    def crypt(self, op: int, data: bytes, iv: bytes | None) -> bytes:
        """CIOCCRYPT on a cipher session: ``data`` encrypted or decrypted with ``iv``."""
        addr = self.buffer(len(data))
        ctypes.memmove(addr, data, len(data))
        self.crypt_at(op, addr, len(data), iv)
        return ctypes.string_at(addr, len(data))

    def mac_at(self, addr: int, length: int) -> bytes:
        """CIOCCRYPT on a hash/HMAC session over ``length`` bytes at ``addr``: the digest."""
        cop = self._cop
        cop.op, cop.flags, cop.len = COP_ENCRYPT, 0, length
        cop.src, cop.dst, cop.iv = addr, 0, 0
        out = self._small_addr + AALG_MAX_RESULT_LEN
        ctypes.memset(out, 0, AALG_MAX_RESULT_LEN)
        cop.mac = out
        self._dev.ioctl("CIOCCRYPT", self.algorithm, cop)
        return ctypes.string_at(out, AALG_MAX_RESULT_LEN)

    def mac(self, data: bytes) -> bytes:
        """The (untruncated, zero-padded to 64 bytes) digest of ``data``."""
        addr = self.buffer(len(data))
        ctypes.memmove(addr, data, len(data))
        return self.mac_at(addr, len(data))

    def aead(self, op: int, data: bytes, aad: bytes, iv: bytes, tag_len: int) -> bytes:
        """CIOCAUTHCRYPT (plain AEAD mode): encrypt returns C || tag; decrypt takes C || tag
        and returns the plaintext, or raises CryptodevError with EBADMSG on a bad tag."""
        n = len(data)
        addr = self.buffer(n + tag_len)
        ctypes.memmove(addr, data, n)
        small = self._small_addr
        ctypes.memmove(small, iv, len(iv))
        ctypes.memmove(small + 32, aad, len(aad))
        caop = self._caop
        caop.op, caop.flags, caop.len = op, 0, n
        caop.auth_len, caop.auth_src = len(aad), small + 32
        caop.src = caop.dst = addr
        caop.tag, caop.tag_len = 0, tag_len
        caop.iv, caop.iv_len = small, len(iv)
        self._dev.ioctl("CIOCAUTHCRYPT", self.algorithm, caop)
        return ctypes.string_at(addr, n + tag_len if op == COP_ENCRYPT else n - tag_len)

    def close(self) -> None:
        """CIOCFSESSION; a session of a device already closed is gone already."""
        if self._open:
            self._open = False
            with contextlib.suppress(CryptodevError):
                if self._dev._closer.alive:
                    self._dev.ioctl("CIOCFSESSION", self.algorithm, ctypes.c_uint32(self.ses))
