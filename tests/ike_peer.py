"""A hand-driven IKE peer for tests that must send what no well-behaved peer would.

Our own sans-IO ``IkeSa`` runs the handshake (so the keys are real), then
``sealed_fragment`` seals RFC 7383 fragments with that SA's keys by hand: authentic,
in any number, with any Total Fragments, never completing unless the test wants
it. Shared by the unit tier (sans-IO and loopback) and the host tier (a hostile peer
against a real oe-routerd in a network namespace).
"""

from __future__ import annotations

import os

from oe_router.ike.constants import ExchangeType, HeaderFlag, PayloadType
from oe_router.ike.crypto import sk_cipher
from oe_router.ike.message import Message
from oe_router.ike.sa import IkeSa


def sealed_fragment(
    sa: IkeSa,
    message_id: int,
    number: int,
    total: int,
    chunk: bytes,
    exchange: int = ExchangeType.INFORMATIONAL,
    response: bool = False,
) -> bytes:
    """Fragment ``number`` of ``total`` of a message ``sa`` sends (its keys, its role's
    flags) carrying ``chunk`` of the inner payload chain; fragment 1 names a Notify first."""
    k = sa.negotiated_keys()
    if k is None:
        raise ValueError("the IKE SA has no keys yet (IKE_SA_INIT not done)")
    cipher = sk_cipher(k.encr, k.encr_key_bits, k.integ)
    ours = sa.is_initiator
    ke, ka = (k.keys.sk_ei, k.keys.sk_ai) if ours else (k.keys.sk_er, k.keys.sk_ar)
    flags = (HeaderFlag.INITIATOR if ours else 0) | (HeaderFlag.RESPONSE if response else 0)
    msg = Message(k.spi_i, k.spi_r, exchange, flags, message_id)
    iv = os.urandom(cipher.iv_len)
    return msg.encrypt_fragment(cipher, ke, ka, iv, chunk, number, total, PayloadType.NOTIFY)
