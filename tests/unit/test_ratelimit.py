"""The one rate limit for log lines anyone can cause (src/oe_router/ratelimit.py), and the
lines its users write: a flood gives a line per window, and the next line says how many
were left out."""

from __future__ import annotations

import logging

import pytest

from oe_router.dns.front import _may_log
from oe_router.ike.service import IkeService
from oe_router.ratelimit import RateLimit


def test_one_event_per_window_counts_the_rest() -> None:
    limit = RateLimit(window=10.0)
    assert limit.allow(100.0)  # a lone event always gets through
    assert [limit.allow(t) for t in (100.0, 105.0, 109.99)] == [False, False, False]
    assert limit.suppressed == 3
    assert limit.allow(110.0)  # the window ended: a new one opens with this event
    assert limit.take_suppressed() == 3 and limit.take_suppressed() == 0
    assert not limit.allow(119.0)


def test_burst_per_window_and_the_window_opens_with_the_next_event() -> None:
    limit = RateLimit(window=10.0, burst=3)
    assert [limit.allow(0.0) for _ in range(5)] == [True, True, True, False, False]
    assert limit.allow(25.0) and limit.allow(34.0) and limit.allow(34.5)  # window 25..35
    assert not limit.allow(34.9)
    assert limit.take_suppressed() == 3


def test_the_dns_front_says_how_many_lines_it_left_out(caplog: pytest.LogCaptureFixture) -> None:
    limit = RateLimit(burst=2)
    caplog.set_level(logging.WARNING, "oe_router.dns.front")
    allowed = [_may_log(limit, t, "bad-query") for t in (0.0, 1.0, 2.0, 3.0, 4.0)]
    assert allowed == [True, True, False, False, False] and caplog.text == ""
    assert _may_log(limit, 10.0, "bad-query")
    assert caplog.messages == ["3 more bad-query log lines were suppressed"]


def test_refused_ike_sa_init_floods_give_one_line_per_10_s(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [0.0]
    svc = IkeService(["127.0.0.1"], clock=lambda: now[0])
    svc.inbound_filter = lambda ip: "in the clear group"
    caplog.set_level(logging.INFO, "oe_router.ike")
    for now[0] in (0.0, 1.0, 5.0, 9.5, 10.0, 11.0):
        assert svc._responder_config(("127.0.0.1", 500), ("192.0.2.7", 500)) is None
    assert caplog.messages == [
        "IKE_SA_INIT from 192.0.2.7 refused: in the clear group",
        "IKE_SA_INIT from 192.0.2.7 refused: in the clear group "
        "(and 3 more like it in the last 10s)",
    ]
