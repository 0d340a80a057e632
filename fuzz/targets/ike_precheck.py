"""Fuzz target: the responder's stateless precheck of an IKE_SA_INIT (cookies, limits).

Input: 3 parameter bytes (half-open count, time step, peer address family) then the
datagram. Oracle: no exception; a COOKIE demand decodes, and a request that decodes,
sent back with that cookie in front (as RFC 7296 §2.6 says an initiator does), is
accepted.
"""

from __future__ import annotations

from fuzz.common import fuzz_main, instrumented

with instrumented():
    from oe_router.ike.constants import NotifyType
    from oe_router.ike.cookies import CookieJar, ResponderLimits, responder_precheck
    from oe_router.ike.errors import IkeDecodeError
    from oe_router.ike.message import Message
    from oe_router.ike.payloads import Notify

JAR = CookieJar(bytes(range(32)))
LIMITS = ResponderLimits(cookie_threshold=2, half_open_limit=8)
PEERS = ("192.0.2.1", "2001:db8::1")
NOW = 1_800_000_000.0


def test_one_input(data: bytes) -> None:
    if len(data) < 3:
        return
    half_open = data[0] % (LIMITS.half_open_limit + 2)
    now = NOW + data[1] * 7.5  # crosses secret rotations (period 120 s)
    peer = PEERS[data[2] & 1]
    datagram = data[3:]
    check = responder_precheck(datagram, peer, half_open, now, JAR, LIMITS)
    assert check.action in ("new", "reply", "drop"), check
    if check.action != "reply":
        return
    assert check.reply is not None
    reply = Message.decode(check.reply)
    cookie = reply.payloads[0]
    assert isinstance(cookie, Notify) and cookie.notify_type == NotifyType.COOKIE, reply
    try:
        request = Message.decode(datagram)
    except IkeDecodeError:
        return  # the precheck reads only what a cookie needs; the IKE SA refuses the rest
    request.payloads.insert(0, Notify.status(NotifyType.COOKIE, cookie.data))
    again = responder_precheck(request.encode(), peer, half_open, now + 1, JAR, LIMITS)
    assert again.action == "new", f"our own cookie was refused: {again.reason}"


if __name__ == "__main__":
    fuzz_main(test_one_input)
