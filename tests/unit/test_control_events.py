"""The daemon's events: the hub, and the IKE sink that turns Child SAs into
``oe.tunnel.up``/``oe.tunnel.down`` (no key material in a body)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import pytest

from oe_router.control.events import EVENTS, Events
from oe_router.ike.events import ChildSaDeleted, ChildSaEstablished, ChildSaRekeyed
from oe_router.ike.service import RecordingSink, host_selector
from oe_router.ike.tunnel_events import TunnelEvents


def test_the_hub_counts_delivers_and_survives_a_failing_listener(
    caplog: pytest.LogCaptureFixture,
) -> None:
    hub = Events()
    got: list[tuple[str, dict[str, Any]]] = []

    def broken(name: str, body: dict[str, Any]) -> None:
        raise RuntimeError("listener bug")

    hub.subscribe(broken)
    hub.subscribe(lambda n, b: got.append((n, b)))
    with caplog.at_level(logging.ERROR, logger="oe_router.control"):
        hub.publish("oe.shunt", {"destination": "192.0.2.7/32"})
        hub.publish("oe.shunt", {"destination": "192.0.2.8/32"})
    assert [b["destination"] for _, b in got] == ["192.0.2.7/32", "192.0.2.8/32"]
    assert hub.published["oe.shunt"] == 2
    assert len(caplog.records) == 1  # rate-limited: one line for two failures
    hub.unsubscribe(broken)
    with pytest.raises(ValueError, match="unknown event"):
        hub.publish("oe.tunnel.sideways", {})
    assert set(EVENTS) == {"oe.tunnel.up", "oe.tunnel.down", "oe.shunt"}


@dataclass
class _Handle:
    local: tuple[str, int] = ("198.51.100.1", 500)


@dataclass
class _Peer:
    peer: str = "198.51.100.2"
    handle: _Handle = field(default_factory=_Handle)


KEY = bytes(range(32))


def _child(cls: type[ChildSaEstablished] = ChildSaEstablished, **kw: Any) -> ChildSaEstablished:
    return cls(
        ike_spi_i=b"\1" * 8, ike_spi_r=b"\2" * 8, spi_in=b"\xc0\x00\x00\x01",
        spi_out=b"\xc0\x00\x00\x02", mode="tunnel", encr=20, encr_key_bits=256, integ=None,
        esn=False, encr_key_in=KEY, integ_key_in=b"", encr_key_out=KEY[::-1], integ_key_out=b"",
        ts_local=(host_selector("198.51.100.1"),), ts_remote=(host_selector("198.51.100.2"),),
        udp_encap=False,
        **kw,
    )  # fmt: skip


def test_child_sas_become_tunnel_events_and_reach_the_real_sink() -> None:
    hub, inner = Events(), RecordingSink()
    got: list[tuple[str, dict[str, Any]]] = []
    hub.subscribe(lambda n, b: got.append((n, b)))
    sink = TunnelEvents(inner, hub)
    peer: Any = _Peer()
    up = _child()
    sink.child_sa_established(peer, up)
    sink.child_sa_established(peer, _child(ChildSaRekeyed, old_spi_in=b"\xc0\x00\x00\x01"))
    gone = ChildSaDeleted(b"\xc0\x00\x00\x01", b"\xc0\x00\x00\x02", "rekeyed")
    sink.child_sa_deleted(peer, gone)
    sink.peer_dead(peer, (gone,))
    assert [n for n, _ in got] == ["oe.tunnel.up"] * 2 + ["oe.tunnel.down"] * 2
    assert got[0][1] == {
        "peer": "198.51.100.2", "local": "198.51.100.1", "spi_in": "c0000001",
        "spi_out": "c0000002", "mode": "tunnel", "ts_local": "198.51.100.1/32",
        "ts_remote": "198.51.100.2/32", "udp_encap": False, "rekey_of": "",
    }  # fmt: skip
    assert got[1][1]["rekey_of"] == "c0000001"
    assert got[2][1]["reason"] == "rekeyed" and got[2][1]["dead"] is False
    assert got[3][1]["dead"] is True
    assert inner.established[0] == ("198.51.100.2", up) and len(inner.established) == 2
    assert inner.deleted == [("198.51.100.2", gone)] and inner.dead == [("198.51.100.2", (gone,))]
    text = repr(got)
    assert KEY.hex() not in text and KEY[::-1].hex() not in text
