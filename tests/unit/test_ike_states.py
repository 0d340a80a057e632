"""The IKE SA's state machine as tables, without sockets: which (exchange, request
or response, state) a message is handled in, the state predicates, the task
lifecycle, the logged state changes, and the sticky failure after an internal error.
"""

from __future__ import annotations

import itertools
import logging

import pytest

from oe_router.ike.constants import ExchangeType
from oe_router.ike.errors import IkeError
from oe_router.ike.events import IkeSaFailed
from oe_router.ike.sa import DISPATCH, IkeSa
from oe_router.ike.states import ChildState, IkeState, TaskState
from oe_router.ike.tasks.informational import InformationalResponder, LivenessTask
from tests.ike_pair import I_ADDR, configs, establish, events, shuttle

X, S = ExchangeType, IkeState
UP = (S.ESTABLISHED, S.DELETING)

# Every (exchange, is a response, state) a message is processed in; all else is dropped.
HANDLED = {
    (X.IKE_SA_INIT, False, S.IDLE),  # the peer opens an IKE SA with us
    (X.IKE_SA_INIT, True, S.INIT_SENT),
    (X.IKE_AUTH, False, S.INIT_DONE),
    (X.IKE_AUTH, False, S.AUTH_PENDING),  # a retransmission while the key is looked up
    (X.IKE_AUTH, True, S.AUTH_SENT),
    *((x, r, s) for x in (X.CREATE_CHILD_SA, X.INFORMATIONAL) for r in (False, True) for s in UP),
}


@pytest.mark.parametrize(
    ("exchange", "response", "state"),
    list(
        itertools.product(
            (X.IKE_SA_INIT, X.IKE_AUTH, X.CREATE_CHILD_SA, X.INFORMATIONAL),
            (False, True),
            list(IkeState),
        )
    ),
)
def test_dispatch_table(exchange: X, response: bool, state: IkeState) -> None:
    assert ((exchange, response, state) in DISPATCH) == ((exchange, response, state) in HANDLED)


@pytest.mark.parametrize(
    ("state", "half_open", "over"),
    [
        (S.IDLE, True, False),
        (S.INIT_SENT, True, False),
        (S.INIT_DONE, True, False),
        (S.AUTH_SENT, True, False),
        (S.AUTH_PENDING, True, False),
        (S.ESTABLISHED, False, False),
        (S.DELETING, False, False),
        (S.FAILED, False, True),
        (S.CLOSED, False, True),
    ],
)
def test_ike_state_predicates(state: IkeState, half_open: bool, over: bool) -> None:
    assert (state.half_open, state.over) == (half_open, over)


def test_states_compare_and_print_as_the_old_words() -> None:
    """``oe status`` and the service still see 'established', 'rekeying', ..."""
    assert S.ESTABLISHED == "established" and f"{S.INIT_SENT}" == "init-sent"
    assert ChildState.REKEYING == "rekeying" and str(ChildState.INSTALLED) == "installed"


def test_handshake_walks_the_states_and_logs_each_change(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="oe_router.ike.states")
    ini, res, _, _ = establish(*configs())
    assert (ini.state, res.state) == (S.ESTABLISHED, S.ESTABLISHED)
    changes = [
        r.getMessage().split(": ", 1)[1] for r in caplog.records if "IKE SA" in r.getMessage()
    ]
    assert "init-sent -> auth-sent" in changes and "auth-sent -> established" in changes
    assert "idle -> init-done" in changes and "init-done -> established" in changes


def test_task_lifecycle_queued_active_done() -> None:
    ini, res, _, _ = establish(*configs())
    ini.send_liveness_check(1.0)
    task = ini.active
    assert isinstance(task, LivenessTask) and task.state == TaskState.ACTIVE
    shuttle(ini, res, 1.0)
    assert task.state == TaskState.DONE and ini.active is None


def test_internal_error_fails_the_sa_for_good(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug while handling a message: IkeSaFailed once, then the SA stays failed
    (later datagrams are ignored, commands refused) instead of running half-updated."""
    ini, res, _, _ = establish(*configs())

    def boom(self: InformationalResponder, msg: object, now: float) -> None:
        raise RuntimeError("bug")

    monkeypatch.setattr(InformationalResponder, "process", boom)
    ini.send_liveness_check(1.0)
    (request,) = ini.datagrams_to_send()
    res.receive_datagram(request, 1.0, I_ADDR)
    got = events(res)
    assert [type(e) for e in got] == [IkeSaFailed], got
    assert res.state == S.FAILED and res.get_timer() is None
    res.receive_datagram(request, 2.0, I_ADDR)  # the retransmission
    assert res.datagrams_to_send() == [] and events(res) == []
    with pytest.raises(IkeError):
        res.create_child((), (), now=3.0)
    assert isinstance(res, IkeSa)
