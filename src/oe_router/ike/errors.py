"""IKE error types: one for the wire codec, one for protocol refusals.

Why two: a codec error means "these bytes are not an IKE message" (drop, maybe log),
while a protocol error carries the Notify type the peer should be told about.
"""

from __future__ import annotations


class IkeError(Exception):
    """Base of every error raised by oe_router.ike."""


class IkeDecodeError(IkeError):
    """Bytes that do not parse as the IKEv2 structure they claim to be.

    The only exception the codec raises for any input, however malformed.
    """


class IkeCryptoError(IkeError):
    """Integrity check or decryption failed (wrong keys, tampering, truncation)."""


class IkeProtocolError(IkeError):
    """The peer broke a protocol rule; ``notify`` names the error Notify to send.

    ``notify`` is an IANA IKEv2 Notify Message Error Type (see constants.NotifyType);
    ``data`` is that notify's Notification Data (e.g. the accepted group for
    INVALID_KE_PAYLOAD).
    """

    def __init__(self, notify: int, message: str, data: bytes = b"") -> None:
        super().__init__(message)
        self.notify = notify
        self.data = data
