"""Responder DoS defence before any IKE SA state exists: COOKIEs (RFC 7296 §2.6), made
and checked on the cheapest path, and the responder's limits.

Why stateless and separate: a cookie must be checked before a responder IkeSa is even
created, and the cookie secret is derived from a master key and the time passed in, so
it rotates without any stored state and a cookie made just before a rotation still
verifies (the previous secret is accepted).

Why cheap: a flood of IKE_SA_INIT requests from spoofed addresses is answered with
COOKIE demands, and each answer must cost far less than the packet that asked for it
(RFC 8019). ``CookieGate`` reads the fixed header and then only payload *headers*,
to find Ni and a leading COOKIE notify (the cookie is a keyed hash of Ni | IPi | SPIi);
it never decodes a payload body, allocates no message objects, compares plain ints (an
IntFlag operation costs more than the whole hash) and writes its answer into one
preallocated buffer. Who may then hold a half-open IKE SA is ``halfopen``'s job.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import socket
from enum import IntEnum
from typing import Final, Literal

from oe_router.records import record

from .constants import (
    IKE_HEADER_LEN,
    IKE_VERSION,
    ExchangeType,
    HeaderFlag,
    NotifyType,
    PayloadType,
)
from .payloads import GenericHeader, IkeHeader, Notify
from .wire import packer

#: the fixed IKE header, a generic payload header, and a Notify's fixed part
#: (protocol ID, SPI size, notify type), from the payload tables
IKE_HEADER: Final = packer(IkeHeader.FIELDS)
GENERIC_HEADER: Final = packer(GenericHeader.FIELDS)
NOTIFY_HEADER: Final = packer(Notify.FIELDS[:3])

_VERSION_BYTES: Final = 2
COOKIE_LEN: Final = _VERSION_BYTES + 32  #: <secret version> | BLAKE2s-256
_ZERO_SPI: Final = bytes(8)
_IKE_SA_INIT: Final = int(ExchangeType.IKE_SA_INIT)
_INITIATOR: Final = int(HeaderFlag.INITIATOR)
_DIRECTION: Final = int(HeaderFlag.INITIATOR | HeaderFlag.RESPONSE)
_NONE: Final = int(PayloadType.NONE)
_NONCE: Final = int(PayloadType.NONCE)
_NOTIFY: Final = int(PayloadType.NOTIFY)
_COOKIE: Final = int(NotifyType.COOKIE)
_GENERIC_LEN: Final = GENERIC_HEADER.size
#: an initiator puts Ni third or fourth (after a COOKIE, SA, KE); more than this many
#: payloads before it is not an initiator we know, and walking them costs CPU
_MAX_PAYLOADS_BEFORE_NONCE: Final = 16
_NOTIFY_OFFSET: Final = IKE_HEADER_LEN + GENERIC_HEADER.size
_COOKIE_OFFSET: Final = _NOTIFY_OFFSET + NOTIFY_HEADER.size
#: HDR, N(COOKIE): the whole COOKIE demand
REPLY_LEN: Final = _COOKIE_OFFSET + COOKIE_LEN


def packed_ip(ip: str) -> bytes:
    """The address's network bytes (``inet_pton``; ``ipaddress`` only for scoped IPv6)."""
    try:
        return socket.inet_pton(socket.AF_INET6 if ":" in ip else socket.AF_INET, ip)
    except OSError:
        return ipaddress.ip_address(ip).packed


class CookieJar:
    """Makes and checks COOKIE values: <secret version> | MAC(secret_v, Ni | IPi | SPIi).

    RFC 7296 §2.6 leaves the function to the responder (only we check our cookies);
    the MAC is keyed BLAKE2s-256, a PRF that costs a third of HMAC-SHA-256 here.
    ``master_key`` is the endpoint's random secret (rotate it by making a new jar);
    secret ``v`` = MAC(master_key, v) with v = floor(now / period), cached.
    """

    __slots__ = ("_secrets", "master_key", "period")

    def __init__(self, master_key: bytes, period: float = 120.0) -> None:
        self.master_key = master_key
        self.period = period
        self._secrets: dict[int, bytes] = {}

    def _secret(self, version: int) -> bytes:
        secret = self._secrets.get(version)
        if secret is None:
            if len(self._secrets) >= 4:  # only the current and the previous are asked for
                self._secrets.clear()
            secret = hashlib.blake2s(
                version.to_bytes(_VERSION_BYTES, "big"), key=self.master_key
            ).digest()
            self._secrets[version] = secret
        return secret

    def version(self, now: float) -> int:
        return int(now // self.period) % (1 << (8 * _VERSION_BYTES))

    def mac(self, version: int, nonce: bytes, ip: bytes, spi_i: bytes) -> bytes:
        """MAC(secret_version, Ni | IPi | SPIi); ``ip`` packed."""
        return hashlib.blake2s(nonce + ip + spi_i, key=self._secret(version)).digest()

    def make(self, nonce: bytes, ip: str, spi_i: bytes, now: float) -> bytes:
        v = self.version(now)
        return v.to_bytes(_VERSION_BYTES, "big") + self.mac(v, nonce, packed_ip(ip), spi_i)

    def verify(self, cookie: bytes, nonce: bytes, ip: str, spi_i: bytes, now: float) -> bool:
        """True for a cookie made with the current or the previous secret."""
        return self.verify_packed(cookie, nonce, packed_ip(ip), spi_i, now)

    def verify_packed(
        self, cookie: bytes, nonce: bytes, ip: bytes, spi_i: bytes, now: float
    ) -> bool:
        if len(cookie) != COOKIE_LEN:
            return False
        v = int.from_bytes(cookie[:_VERSION_BYTES], "big")
        now_v = self.version(now)
        if v != now_v and v != (now_v - 1) % (1 << (8 * _VERSION_BYTES)):
            return False
        return hmac.compare_digest(cookie[_VERSION_BYTES:], self.mac(v, nonce, ip, spi_i))


def is_new_init_request(data: bytes) -> bool:
    """An IKE_SA_INIT request for a new IKE SA (Initiator set, Response clear, SPIr and
    Message ID zero, IKE version 2), judged from the fixed header alone."""
    if len(data) < IKE_HEADER_LEN:
        return False
    _, spi_r, _, version, exchange, flags, message_id, _ = IKE_HEADER.unpack_from(data)
    return bool(
        exchange == _IKE_SA_INIT
        and flags & _DIRECTION == _INITIATOR
        and version >> 4 == 2
        and message_id == 0
        and spi_r == _ZERO_SPI
    )


def scan_init_request(data: bytes) -> tuple[int, int, int, int] | None:
    """(Ni start, Ni end, COOKIE start, COOKIE end) offsets in an IKE_SA_INIT request,
    read from the payload headers alone; the cookie span is empty unless the first
    payload is a COOKIE notify. None when the header's length is not the datagram's,
    a payload overruns it, or no Nonce comes early enough."""
    end = len(data)
    if end < IKE_HEADER_LEN:
        return None
    _, _, ptype, _, _, _, _, length = IKE_HEADER.unpack_from(data)
    if length != end:
        return None
    pos, c0, c1 = IKE_HEADER_LEN, 0, 0
    index, budget = 0, _MAX_PAYLOADS_BEFORE_NONCE  # a leading COOKIE does not count
    while index < budget:
        if ptype == _NONE or pos + _GENERIC_LEN > end:
            return None
        nxt, _, plen = GENERIC_HEADER.unpack_from(data, pos)
        if plen < _GENERIC_LEN or pos + plen > end:
            return None
        if ptype == _NONCE:
            return pos + _GENERIC_LEN, pos + plen, c0, c1
        if index == 0 and ptype == _NOTIFY and plen >= 8:
            _, spi_size, notify = NOTIFY_HEADER.unpack_from(data, pos + _GENERIC_LEN)
            if notify == _COOKIE and 8 + spi_size <= plen:
                c0, c1, budget = pos + 8 + spi_size, pos + plen, budget + 1
        pos += plen
        ptype = nxt
        index += 1
    return None


class Verdict(IntEnum):
    """What ``CookieGate.check`` found."""

    DROP = 0  #: no Nonce, or a chain that overruns the datagram: nothing to answer
    DEMAND = 1  #: answer with ``CookieGate.reply`` (HDR, N(COOKIE))
    VALID = 2  #: carries a cookie we made for this Ni, address and SPIi


#: the members as module constants: compared with ``is`` on the hot path
DROP, DEMAND, VALID = Verdict.DROP, Verdict.DEMAND, Verdict.VALID


class CookieGate:
    """Checks the COOKIE of a new IKE_SA_INIT request and writes the demand for one.

    ``reply`` is one buffer, rewritten by every ``check`` that returns DEMAND: send it
    before the next check (``socket.sendto`` copies it).
    """

    __slots__ = ("jar", "reply")

    def __init__(self, jar: CookieJar) -> None:
        self.jar = jar
        self.reply = bytearray(REPLY_LEN)
        IKE_HEADER.pack_into(
            self.reply, 0, _ZERO_SPI, _ZERO_SPI, PayloadType.NOTIFY, IKE_VERSION,
            ExchangeType.IKE_SA_INIT, HeaderFlag.RESPONSE, 0, REPLY_LEN,
        )  # fmt: skip
        GENERIC_HEADER.pack_into(
            self.reply, IKE_HEADER_LEN, PayloadType.NONE, 0, REPLY_LEN - IKE_HEADER_LEN
        )
        NOTIFY_HEADER.pack_into(self.reply, _NOTIFY_OFFSET, 0, 0, NotifyType.COOKIE)

    def check(self, data: bytes, ip: str, now: float) -> Verdict:
        """``data``: a new IKE_SA_INIT request (``is_new_init_request``) from ``ip``."""
        found = scan_init_request(data)
        if found is None:
            return DROP
        n0, n1, c0, c1 = found
        spi_i, nonce, address, jar = data[:8], data[n0:n1], packed_ip(ip), self.jar
        if c1 - c0 == COOKIE_LEN and jar.verify_packed(data[c0:c1], nonce, address, spi_i, now):
            return VALID
        v = jar.version(now)
        reply = self.reply
        reply[:8] = spi_i
        reply[_COOKIE_OFFSET : _COOKIE_OFFSET + _VERSION_BYTES] = v.to_bytes(_VERSION_BYTES, "big")
        reply[_COOKIE_OFFSET + _VERSION_BYTES :] = jar.mac(v, nonce, address, spi_i)
        return DEMAND


@record(frozen=True)
class ResponderLimits:
    """How many half-open IKE SAs the responder keeps, and from whom (RFC 8019).

    Above ``cookie_threshold`` half-open SAs every new IKE_SA_INIT request needs a
    COOKIE; ``half_open_limit`` caps them all, and its last ``reserve`` slots are only
    for peers that hold an established IKE SA with us. Requests that proved their
    address with a cookie are also capped per address (``per_source``) and per /24
    or /64 (``per_prefix``); None: no cap but the global one. A half-open SA younger
    than ``guard`` seconds is never displaced for a peer without an IKE SA.
    """

    cookie_threshold: int = 10
    half_open_limit: int = 200
    per_source: int | None = None
    per_prefix: int | None = None
    guard: float = 1.0

    @property
    def reserve(self) -> int:
        return self.half_open_limit // 8


@record(frozen=True)
class Precheck:
    """What to do with one datagram that matches no IKE SA (``responder_precheck``).

    - ``new``: create ``IkeSa.responder`` and feed it the datagram;
    - ``reply``: send ``reply`` (a COOKIE demand) and keep no state;
    - ``drop``: ignore it; ``reason`` says why.
    """

    action: Literal["new", "reply", "drop"]
    reason: str
    reply: bytes | None = None


def responder_precheck(
    datagram: bytes,
    remote_ip: str,
    half_open: int,
    now: float,
    jar: CookieJar,
    limits: ResponderLimits = ResponderLimits(),  # noqa: B008 - frozen, immutable default
) -> Precheck:
    """The stateless part of the decision on one datagram, given only how many IKE SAs
    are half-open (no per-source accounting: ``halfopen.HalfOpenBook`` adds that)."""
    if not is_new_init_request(datagram):
        return Precheck("drop", "not an IKE_SA_INIT request for a new IKE SA")
    if half_open >= limits.half_open_limit:
        return Precheck("drop", f"{half_open} half-open IKE SAs: limit reached")
    if half_open < limits.cookie_threshold:
        return Precheck("new", "below the cookie threshold")
    gate = CookieGate(jar)
    verdict = gate.check(datagram, remote_ip, now)
    if verdict is DROP:
        return Precheck("drop", "IKE_SA_INIT request without a nonce, or malformed")
    if verdict is VALID:
        return Precheck("new", "valid cookie")
    reason = f"{half_open} half-open IKE SAs: cookie demanded"
    return Precheck("reply", reason, bytes(gate.reply))


__all__ = [
    "COOKIE_LEN",
    "DEMAND",
    "DROP",
    "VALID",
    "CookieGate",
    "CookieJar",
    "Precheck",
    "ResponderLimits",
    "Verdict",
    "is_new_init_request",
    "packed_ip",
    "responder_precheck",
    "scan_init_request",
]
