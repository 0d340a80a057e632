"""Responder DoS defence before any IKE SA state exists: COOKIE (RFC 7296 §2.6)
and a cap on half-open IKE SAs.

Why stateless and separate: the half-open count belongs to whoever owns many
IkeSa objects (the endpoint), and a cookie must be checked before a responder
IkeSa is even created. The cookie secret is derived from a master key and the
time passed in, so it rotates without any stored state and a cookie made just
before a rotation still verifies (the previous secret is accepted).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from dataclasses import dataclass
from typing import Literal

from .constants import ExchangeType, HeaderFlag, NotifyType
from .errors import IkeDecodeError
from .message import Message
from .payloads import Nonce, Notify

_VERSION_BYTES = 2


@dataclass(frozen=True)
class CookieJar:
    """Makes and checks COOKIE values: <secret version> | HMAC(secret_v, Ni | IPi | SPIi).

    ``master_key`` is the endpoint's random secret (rotate it by making a new
    jar); secret ``v`` = HMAC(master_key, v) with v = floor(now / period).
    """

    master_key: bytes
    period: float = 120.0

    def _secret(self, version: int) -> bytes:
        return hmac.new(
            self.master_key, version.to_bytes(_VERSION_BYTES, "big"), hashlib.sha256
        ).digest()

    def _version(self, now: float) -> int:
        return int(now // self.period) % (1 << (8 * _VERSION_BYTES))

    @staticmethod
    def _input(nonce: bytes, ip: str, spi_i: bytes) -> bytes:
        return nonce + ipaddress.ip_address(ip).packed + spi_i

    def make(self, nonce: bytes, ip: str, spi_i: bytes, now: float) -> bytes:
        v = self._version(now)
        mac = hmac.new(self._secret(v), self._input(nonce, ip, spi_i), hashlib.sha256).digest()
        return v.to_bytes(_VERSION_BYTES, "big") + mac

    def verify(self, cookie: bytes, nonce: bytes, ip: str, spi_i: bytes, now: float) -> bool:
        """True for a cookie made with the current or the previous secret."""
        if len(cookie) != _VERSION_BYTES + 32:
            return False
        v = int.from_bytes(cookie[:_VERSION_BYTES], "big")
        now_v = self._version(now)
        if v not in (now_v, (now_v - 1) % (1 << (8 * _VERSION_BYTES))):
            return False
        mac = hmac.new(self._secret(v), self._input(nonce, ip, spi_i), hashlib.sha256).digest()
        return hmac.compare_digest(cookie[_VERSION_BYTES:], mac)


@dataclass(frozen=True)
class ResponderLimits:
    """Above ``cookie_threshold`` half-open SAs demand a cookie; at ``half_open_limit`` refuse."""

    cookie_threshold: int = 10
    half_open_limit: int = 200


@dataclass(frozen=True)
class Precheck:
    """What the endpoint does with a datagram that matches no IKE SA.

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
    """Decide, without state, whether a new IKE_SA_INIT request may create an IKE SA."""
    try:
        msg = Message.decode(datagram)
    except IkeDecodeError as e:
        return Precheck("drop", f"not an IKE message: {e}")
    if (
        msg.exchange_type != ExchangeType.IKE_SA_INIT
        or msg.is_response
        or not msg.flags & HeaderFlag.INITIATOR
        or msg.message_id != 0
        or msg.spi_r != bytes(8)
    ):
        return Precheck("drop", "not an IKE_SA_INIT request for a new IKE SA")
    if half_open >= limits.half_open_limit:
        return Precheck("drop", f"{half_open} half-open IKE SAs: limit reached")
    if half_open < limits.cookie_threshold:
        return Precheck("new", "below the cookie threshold")
    nonce = msg.first(Nonce)
    if not isinstance(nonce, Nonce):
        return Precheck("drop", "IKE_SA_INIT request without a nonce")
    first = msg.payloads[0]
    if (
        isinstance(first, Notify)
        and first.notify_type == NotifyType.COOKIE
        and jar.verify(first.data, nonce.data, remote_ip, msg.spi_i, now)
    ):
        return Precheck("new", "valid cookie")
    cookie = jar.make(nonce.data, remote_ip, msg.spi_i, now)
    reply = Message(
        msg.spi_i,
        bytes(8),
        ExchangeType.IKE_SA_INIT,
        HeaderFlag.RESPONSE,
        0,
        [Notify.status(NotifyType.COOKIE, cookie)],
    )
    return Precheck("reply", f"{half_open} half-open IKE SAs: cookie demanded", reply.encode())


__all__ = ["CookieJar", "Precheck", "ResponderLimits", "responder_precheck"]
