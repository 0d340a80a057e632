"""A peer we will not talk to gets an unauthenticated NO_PROPOSAL_CHOSEN (RFC 7296 §2.21.1)."""

from __future__ import annotations

from oe_router.ike.constants import ExchangeType, NotifyType
from oe_router.ike.cookies import init_refusal
from oe_router.ike.message import Message
from oe_router.ike.payloads import Notify
from oe_router.ike.sa import IkeSa, IkeSaConfig
from oe_router.ike.selectors import host_selector


def _first_request() -> bytes:
    cfg = IkeSaConfig(
        ("192.0.2.1", 500),
        ("198.51.100.7", 500),
        (host_selector("192.0.2.1"),),
        (host_selector("198.51.100.7"),),
    )
    return IkeSa.initiator(cfg, now=0.0).datagrams_to_send()[0]


def test_refusal_answers_the_request_with_no_proposal_chosen() -> None:
    request = _first_request()
    reply = init_refusal(request)
    assert reply is not None
    msg = Message.decode(reply)
    assert msg.is_response and msg.exchange_type == ExchangeType.IKE_SA_INIT
    assert msg.spi_i == Message.decode(request).spi_i and msg.spi_r == bytes(8)
    (notify,) = msg.payloads
    assert isinstance(notify, Notify) and notify.notify_type == NotifyType.NO_PROPOSAL_CHOSEN


def test_initiator_fails_at_once_on_the_refusal() -> None:
    cfg = IkeSaConfig(
        ("192.0.2.1", 500),
        ("198.51.100.7", 500),
        (host_selector("192.0.2.1"),),
        (host_selector("198.51.100.7"),),
    )
    ini = IkeSa.initiator(cfg, now=0.0)
    reply = init_refusal(ini.datagrams_to_send()[0])
    assert reply is not None
    ini.receive_datagram(reply, 0.1, ("198.51.100.7", 500))
    event = ini.next_event()
    assert type(event).__name__ == "IkeSaFailed"
    assert ini.get_timer() is None


def test_nothing_but_a_new_ike_sa_init_request_is_answered() -> None:
    request = Message.decode(_first_request())
    assert init_refusal(b"\x00" * 10) is None
    response = Message(request.spi_i, bytes(8), ExchangeType.IKE_SA_INIT, 0x20, 0, request.payloads)
    assert init_refusal(response.encode()) is None
    later = Message(request.spi_i, b"\x01" * 8, ExchangeType.IKE_AUTH, 0x08, 1, [])
    assert init_refusal(later.encode()) is None
