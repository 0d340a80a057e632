"""NETLINK_CRYPTO (crypto_user): read one kernel crypto implementation, set its priority.

Why: every user of an algorithm name (XFRM, AF_ALG) gets the kernel's highest-priority
implementation of it. When that one is a driver that failed its KAT or the ESP self-test,
lowering its priority is the only way to move the kernel's pick without unloading the
module (which would take every other algorithm of the engine with it). The change is
the kernel's, not ours: it holds until reboot, module reload or the next change.

Needs the crypto_user module (CONFIG_CRYPTO_USER, often absent on OpenWrt: /proc/crypto
stays the discovery path, ``procfs.py``) and CAP_NET_ADMIN to change anything.
Wire format from include/uapi/linux/cryptouser.h, declared once below as pyroute2
message and attribute classes; flags from include/linux/crypto.h.
"""

from __future__ import annotations

import errno
from collections.abc import Mapping
from types import TracebackType
from typing import Any, Final

from pyroute2.netlink import NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, nla, nlmsg
from pyroute2.netlink.exceptions import NetlinkError

from oe_router.records import record

__all__ = [
    "CRYPTO_MSG_GETALG",
    "CRYPTO_MSG_UPDATEALG",
    "NETLINK_CRYPTO",
    "CryptoUser",
    "CryptoUserAlg",
    "CryptoUserError",
    "decode",
    "encode",
    "get_alg",
    "lower_priority",
    "set_priority",
]

NETLINK_CRYPTO: Final = 21

# --- message types (enum in cryptouser.h, CRYPTO_MSG_BASE = 0x10) -------------------
CRYPTO_MSG_NEWALG: Final = 0x10
CRYPTO_MSG_DELALG: Final = 0x11
CRYPTO_MSG_UPDATEALG: Final = 0x12
CRYPTO_MSG_GETALG: Final = 0x13

# --- attribute types (enum crypto_attr_type_t) ---------------------------------------
CRYPTOCFGA_UNSPEC: Final = 0
CRYPTOCFGA_PRIORITY_VAL: Final = 1
CRYPTOCFGA_REPORT_LARVAL: Final = 2
CRYPTOCFGA_REPORT_HASH: Final = 3
CRYPTOCFGA_REPORT_BLKCIPHER: Final = 4
CRYPTOCFGA_REPORT_AEAD: Final = 5
CRYPTOCFGA_REPORT_COMPRESS: Final = 6
CRYPTOCFGA_REPORT_RNG: Final = 7
CRYPTOCFGA_REPORT_CIPHER: Final = 8
CRYPTOCFGA_REPORT_AKCIPHER: Final = 9
CRYPTOCFGA_REPORT_KPP: Final = 10
CRYPTOCFGA_REPORT_ACOMP: Final = 11

CRYPTO_MAX_NAME: Final = 64

# --- cra_flags (include/linux/crypto.h) ----------------------------------------------
CRYPTO_ALG_TYPE_MASK: Final = 0x0000000F
CRYPTO_ALG_LARVAL: Final = 0x00000010
CRYPTO_ALG_DEAD: Final = 0x00000020
CRYPTO_ALG_DYING: Final = 0x00000040
CRYPTO_ALG_ASYNC: Final = 0x00000080
CRYPTO_ALG_NEED_FALLBACK: Final = 0x00000100
CRYPTO_ALG_TESTED: Final = 0x00000400
CRYPTO_ALG_INSTANCE: Final = 0x00000800
CRYPTO_ALG_KERN_DRIVER_ONLY: Final = 0x00001000
CRYPTO_ALG_INTERNAL: Final = 0x00002000

#: cra_priority is an int in the kernel; UPDATEALG carries it as a __u32.
MAX_PRIORITY: Final = 0x7FFFFFFF

# --- the wire format, one table each --------------------------------------------------
_NAME = f"{CRYPTO_MAX_NAME}s"

#: struct crypto_user_alg (208 bytes, no padding on any ABI: names, then four __u32)
CRYPTO_USER_ALG: Final = (
    ("cru_name", _NAME),
    ("cru_driver_name", _NAME),
    ("cru_module_name", _NAME),
    ("cru_type", "I"),
    ("cru_mask", "I"),
    ("cru_refcnt", "I"),
    ("cru_flags", "I"),
)

#: The report structs: every one starts with char type[64] ("aead", "skcipher", ...).
_REPORTS: Final[Mapping[str, tuple[tuple[str, str], ...]]] = {
    "crypto_report_larval": (("type", _NAME),),
    "crypto_report_hash": (("type", _NAME), ("blocksize", "I"), ("digestsize", "I")),
    "crypto_report_blkcipher": (
        ("type", _NAME),
        ("geniv", _NAME),
        ("blocksize", "I"),
        ("min_keysize", "I"),
        ("max_keysize", "I"),
        ("ivsize", "I"),
    ),
    "crypto_report_aead": (
        ("type", _NAME),
        ("geniv", _NAME),
        ("blocksize", "I"),
        ("maxauthsize", "I"),
        ("ivsize", "I"),
    ),
    "crypto_report_comp": (("type", _NAME),),
    "crypto_report_rng": (("type", _NAME), ("seedsize", "I")),
    "crypto_report_cipher": (
        ("type", _NAME),
        ("blocksize", "I"),
        ("min_keysize", "I"),
        ("max_keysize", "I"),
    ),
    "crypto_report_akcipher": (("type", _NAME),),
    "crypto_report_kpp": (("type", _NAME),),
    "crypto_report_acomp": (("type", _NAME),),
}

CRYPTOCFGA_MAP: Final = (
    (CRYPTOCFGA_UNSPEC, "CRYPTOCFGA_UNSPEC", "none"),
    (CRYPTOCFGA_PRIORITY_VAL, "CRYPTOCFGA_PRIORITY_VAL", "uint32"),
    (CRYPTOCFGA_REPORT_LARVAL, "CRYPTOCFGA_REPORT_LARVAL", "crypto_report_larval"),
    (CRYPTOCFGA_REPORT_HASH, "CRYPTOCFGA_REPORT_HASH", "crypto_report_hash"),
    (CRYPTOCFGA_REPORT_BLKCIPHER, "CRYPTOCFGA_REPORT_BLKCIPHER", "crypto_report_blkcipher"),
    (CRYPTOCFGA_REPORT_AEAD, "CRYPTOCFGA_REPORT_AEAD", "crypto_report_aead"),
    (CRYPTOCFGA_REPORT_COMPRESS, "CRYPTOCFGA_REPORT_COMPRESS", "crypto_report_comp"),
    (CRYPTOCFGA_REPORT_RNG, "CRYPTOCFGA_REPORT_RNG", "crypto_report_rng"),
    (CRYPTOCFGA_REPORT_CIPHER, "CRYPTOCFGA_REPORT_CIPHER", "crypto_report_cipher"),
    (CRYPTOCFGA_REPORT_AKCIPHER, "CRYPTOCFGA_REPORT_AKCIPHER", "crypto_report_akcipher"),
    (CRYPTOCFGA_REPORT_KPP, "CRYPTOCFGA_REPORT_KPP", "crypto_report_kpp"),
    (CRYPTOCFGA_REPORT_ACOMP, "CRYPTOCFGA_REPORT_ACOMP", "crypto_report_acomp"),
)
_REPORT_ATTRS: Final = tuple(name for _, name, _cls in CRYPTOCFGA_MAP[2:])


class crypto_user_msg(nlmsg):  # type: ignore[misc]
    """Every crypto_user message: struct crypto_user_alg, then CRYPTOCFGA_* attributes."""

    __slots__ = ()
    fields = CRYPTO_USER_ALG
    nla_map = CRYPTOCFGA_MAP


for _name, _fields in _REPORTS.items():
    setattr(crypto_user_msg, _name, type(_name, (nla,), {"__slots__": (), "fields": _fields}))


# --- errors and values ------------------------------------------------------------------
class CryptoUserError(Exception):
    """A crypto_user request failed; the message names the driver and what to do."""

    def __init__(self, message: str, *, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


def _text(raw: Any) -> str:
    if isinstance(raw, bytes):
        return raw.split(b"\0", 1)[0].decode("ascii", "replace")
    return str(raw or "")


@record(frozen=True)
class CryptoUserAlg:
    """One implementation as crypto_user reports it (the kernel's live values).

    ``type`` is the report's word ("aead", "skcipher", "cipher", "shash", "larval", ...),
    empty if the kernel sent no report for it. ``refcnt`` counts the kernel's references:
    a transform (XFRM SA, AF_ALG socket) bound to the driver raises it.
    """

    name: str
    driver: str
    module: str
    priority: int
    flags: int
    refcnt: int
    type: str = ""

    @property
    def tested(self) -> bool:
        """Passed (or needs no) self-test: the kernel never hands out an untested one."""
        return bool(self.flags & CRYPTO_ALG_TESTED)

    @property
    def internal(self) -> bool:
        return bool(self.flags & CRYPTO_ALG_INTERNAL)

    @property
    def async_(self) -> bool:
        return bool(self.flags & CRYPTO_ALG_ASYNC)

    @property
    def usable(self) -> bool:
        """Could be the kernel's pick for its name: tested, not internal, alive."""
        gone = CRYPTO_ALG_LARVAL | CRYPTO_ALG_DEAD | CRYPTO_ALG_DYING
        return self.tested and not self.internal and not self.flags & gone


# --- encoding (pure) --------------------------------------------------------------------
def _name_field(value: str, what: str) -> bytes:
    raw = value.encode("ascii", "replace")
    if not raw or len(raw) >= CRYPTO_MAX_NAME or b"\0" in raw or not value.isascii():
        raise CryptoUserError(
            f"crypto {what} {value!r}: must be 1 to {CRYPTO_MAX_NAME - 1} ASCII characters"
        )
    return raw


def build(msg_type: int, *, driver: str = "", name: str = "", priority: int | None = None) -> Any:
    """A crypto_user message object: struct crypto_user_alg naming one implementation,
    plus CRYPTOCFGA_PRIORITY_VAL when ``priority`` is given."""
    msg = crypto_user_msg()
    msg["cru_name"] = _name_field(name, "algorithm") if name else b""
    msg["cru_driver_name"] = _name_field(driver, "driver") if driver else b""
    msg["cru_module_name"] = b""
    for fname in ("cru_type", "cru_mask", "cru_refcnt", "cru_flags"):
        msg[fname] = 0
    attrs: list[list[Any]] = []
    if priority is not None:
        if not 0 <= priority <= MAX_PRIORITY:
            raise CryptoUserError(
                f"crypto driver {driver!r}: priority {priority} outside 0..{MAX_PRIORITY}"
            )
        attrs.append(["CRYPTOCFGA_PRIORITY_VAL", priority])
    msg["attrs"] = attrs
    msg["header"]["type"] = msg_type
    return msg


def encode(
    msg_type: int,
    *,
    driver: str = "",
    name: str = "",
    priority: int | None = None,
    flags: int = NLM_F_REQUEST,
    seq: int = 0,
    pid: int = 0,
) -> bytes:
    """The wire bytes of one request (nlmsghdr included)."""
    msg = build(msg_type, driver=driver, name=name, priority=priority)
    msg["header"]["flags"] = flags
    msg["header"]["sequence_number"] = seq
    msg["header"]["pid"] = pid
    msg.encode()
    return bytes(msg.data)


def decode(data: bytes, offset: int = 0) -> CryptoUserAlg:
    """One GETALG reply (nlmsghdr included) -> its values."""
    msg = crypto_user_msg(bytearray(data), offset=offset)
    msg.decode()
    return _alg(msg)


def _alg(msg: Any) -> CryptoUserAlg:
    kind = ""
    for attr in _REPORT_ATTRS:
        report = msg.get_attr(attr)
        if report is not None:
            kind = _text(report["type"])
            break
    priority = msg.get_attr("CRYPTOCFGA_PRIORITY_VAL")
    return CryptoUserAlg(
        name=_text(msg["cru_name"]),
        driver=_text(msg["cru_driver_name"]),
        module=_text(msg["cru_module_name"]),
        priority=int(priority or 0),
        flags=int(msg["cru_flags"]),
        refcnt=int(msg["cru_refcnt"]),
        type=kind,
    )


# --- the socket ---------------------------------------------------------------------------
def _socket() -> Any:
    from pyroute2.netlink.nlsocket import NetlinkSocket

    try:
        sock = NetlinkSocket(family=NETLINK_CRYPTO, ext_ack=True)
        sock.bind()
    except OSError as exc:
        if exc.errno in (errno.EPROTONOSUPPORT, errno.ENOENT, errno.EAFNOSUPPORT):
            raise CryptoUserError(
                "kernel has no NETLINK_CRYPTO: load crypto_user (CONFIG_CRYPTO_USER) to read "
                "or change crypto driver priorities",
                errno=exc.errno,
            ) from None
        raise CryptoUserError(
            f"opening the NETLINK_CRYPTO socket failed: {exc.strerror}", errno=exc.errno
        ) from None
    for mtype in (CRYPTO_MSG_NEWALG, CRYPTO_MSG_DELALG, CRYPTO_MSG_UPDATEALG, CRYPTO_MSG_GETALG):
        sock.marshal.msg_map[mtype] = crypto_user_msg
    return sock


def _explain(err: NetlinkError, driver: str, doing: str) -> CryptoUserError:
    code = err.code
    if code == errno.ENOENT:
        msg = (
            f"no crypto driver named {driver!r} in the kernel (the 'driver' lines of "
            "/proc/crypto name them; its module may be unloaded)"
        )
    elif code == errno.EPERM:
        msg = f"{doing} crypto driver {driver!r}: permission denied, needs CAP_NET_ADMIN (root)"
    elif code == errno.EINVAL:
        msg = f"{doing} crypto driver {driver!r}: the kernel refused the request (EINVAL)"
    else:
        msg = f"{doing} crypto driver {driver!r}: kernel refused: {errno.errorcode.get(code, code)}"
    return CryptoUserError(msg, errno=code)


class CryptoUser:
    """One NETLINK_CRYPTO socket. ``with CryptoUser() as cu: cu.get_alg(driver)``."""

    def __init__(self) -> None:
        self._sock = _socket()

    def __enter__(self) -> CryptoUser:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._sock.close()

    def _request(self, msg: Any, flags: int, driver: str, doing: str) -> list[Any]:
        mtype = msg["header"]["type"]
        try:
            replies = self._sock.nlm_request(msg, mtype, flags)
        except NetlinkError as err:
            raise _explain(err, driver, doing) from None
        return [r for r in replies if r["header"]["type"] == CRYPTO_MSG_GETALG]

    def get_alg(self, driver: str) -> CryptoUserAlg:
        """The implementation with this driver name (cra_driver_name), as it is now."""
        msg = build(CRYPTO_MSG_GETALG, driver=driver)
        replies = self._request(msg, NLM_F_REQUEST, driver, "reading")
        if not replies:
            raise CryptoUserError(f"crypto driver {driver!r}: the kernel sent no report")
        return _alg(replies[0])

    def algorithms(self) -> tuple[CryptoUserAlg, ...]:
        """Every registered implementation, in the kernel's list order."""
        msg = build(CRYPTO_MSG_GETALG)
        return tuple(_alg(r) for r in self._request(msg, NLM_F_REQUEST | NLM_F_DUMP, "*", "dump"))

    def implementations(self, name: str) -> list[CryptoUserAlg]:
        """Usable implementations of algorithm ``name``, the kernel's pick first (highest
        priority; ties in list order, as the kernel takes the first it finds)."""
        usable = [a for a in self.algorithms() if a.name == name and a.usable]
        return sorted(usable, key=lambda a: -a.priority)

    def set_priority(self, driver: str, priority: int, *, repick: bool = True) -> CryptoUserAlg:
        """Give ``driver`` a new priority; returns it as the kernel now reports it.

        UPDATEALG tears down the template instances built on the driver it changes
        ("authenc(...,<driver>)", "seqiv(<driver>)"), so composed names pick again when
        next asked; transforms already bound (live SAs, open AF_ALG sockets) keep theirs.
        It does not touch instances built on the drivers this one now outranks, which
        would keep serving composed names: with ``repick`` each of those gets an
        UPDATEALG to its own priority, as the kernel itself does when a better driver
        registers (crypto_alg_finish_registration).
        """
        self._update(driver, priority)
        now = self.get_alg(driver)
        if repick:
            for other in self.implementations(now.name):
                if other.driver != driver and other.priority <= now.priority:
                    try:
                        self._update(other.driver, other.priority)
                    except CryptoUserError as exc:
                        if exc.errno != errno.ENOENT:  # gone meanwhile: nothing to re-pick
                            raise
        return now

    def _update(self, driver: str, priority: int) -> None:
        msg = build(CRYPTO_MSG_UPDATEALG, driver=driver, priority=priority)
        self._request(msg, NLM_F_REQUEST | NLM_F_ACK, driver, "setting the priority of")

    def lower_priority(self, driver: str, below: str | None = None) -> CryptoUserAlg:
        """Move the kernel's pick off ``driver``: one below ``below`` (a driver of the same
        algorithm), or by default below the best other usable implementation of its name.
        Returns the driver as now reported; unchanged if it already ranks below."""
        target = self.get_alg(driver)
        if below is not None:
            ref = self.get_alg(below)
            if ref.name != target.name:
                raise CryptoUserError(
                    f"crypto driver {driver!r} implements {target.name!r} but {below!r} "
                    f"implements {ref.name!r}: ranking one below the other moves no pick"
                )
        else:
            others = [a for a in self.implementations(target.name) if a.driver != driver]
            if not others:
                raise CryptoUserError(
                    f"crypto driver {driver!r} is the only usable implementation of "
                    f"{target.name!r}: lowering it would not move the kernel's pick; stop "
                    "offering the transforms that need it or unload its module"
                )
            ref = others[0]
        if target.priority < ref.priority:
            return target
        if ref.priority == 0:
            raise CryptoUserError(
                f"crypto driver {driver!r}: {ref.driver!r} has priority 0, nothing ranks below"
            )
        return self.set_priority(driver, ref.priority - 1, repick=False)


# --- one-shot helpers (a socket per call) -------------------------------------------------
def get_alg(driver: str) -> CryptoUserAlg:
    """The kernel's live values for one driver (NETLINK_CRYPTO GETALG)."""
    with CryptoUser() as cu:
        return cu.get_alg(driver)


def set_priority(driver: str, priority: int, *, repick: bool = True) -> CryptoUserAlg:
    """Set one driver's priority (UPDATEALG with CRYPTOCFGA_PRIORITY_VAL; see CryptoUser)."""
    with CryptoUser() as cu:
        return cu.set_priority(driver, priority, repick=repick)


def lower_priority(driver: str, below: str | None = None) -> CryptoUserAlg:
    """Rank ``driver`` below the next implementation of its algorithm (see CryptoUser)."""
    with CryptoUser() as cu:
        return cu.lower_priority(driver, below)
