"""Status model: the JSON shape the CLI, LuCI and tests rely on."""

from __future__ import annotations

import json

from oe_router.control import (
    DaemonStatus,
    EngineStatus,
    ReloadResult,
    ShuntStatus,
    Status,
    StatusContribution,
    TunnelStatus,
)
from oe_router.control.status import EngineRate, EngineTransformStatus, TrustAnchorStatus


def _daemon(**kw: object) -> DaemonStatus:
    base: dict[str, object] = {
        "version": "0.1.0",
        "pid": 42,
        "uptime_s": 12.5,
        "config_path": "/etc/config/oe",
        "config_generation": 3,
        "enabled": True,
        "datapath": "kernel-xfrm",
        "last_reload": ReloadResult(False, 3, ("oe.main.log_level: bad",), 10.0),
        "services": ("dns", "ike"),
    }
    base.update(kw)
    return DaemonStatus(**base)  # type: ignore[arg-type]


def test_empty_status_has_the_seven_top_level_keys_with_list_and_object_types() -> None:
    doc = Status.merge(_daemon(last_reload=None), []).to_json()
    assert set(doc) == {"daemon", "tunnels", "shunts", "engines", "dns", "ike", "trust_anchors"}
    assert doc["tunnels"] == [] and doc["shunts"] == [] and doc["engines"] == []
    assert doc["trust_anchors"] == []
    assert doc["dns"] == {} and doc["ike"] == {}
    d = doc["daemon"]
    assert {
        "version",
        "pid",
        "uptime_s",
        "config_path",
        "config_generation",
        "last_reload",
        "datapath",
    } <= set(d)
    assert d["last_reload"] is None


def test_merge_concatenates_contributions_in_service_order_and_merges_dns() -> None:
    a = StatusContribution(
        tunnels=(TunnelStatus("peer.example", "192.0.2.1", "198.51.100.7", "established"),),
        dns={"listen": ["192.168.1.1:53"], "held": 0},
    )
    b = StatusContribution(
        tunnels=(TunnelStatus("other.example", "192.0.2.1", "203.0.113.9", "connecting"),),
        shunts=(ShuntStatus("203.0.113.50/32", "clear", "no IPSECKEY", 300.0),),
        engines=(EngineStatus("aes-cbc", "virtio_crypto_aes_cbc", "af_alg", True, True, 80.0),),
        dns={"held": 2},
    )
    status = Status.merge(_daemon(), [a, b])
    assert [t.peer for t in status.tunnels] == ["peer.example", "other.example"]
    assert status.dns == {"listen": ["192.168.1.1:53"], "held": 2}
    assert status.shunts[0].kind == "clear"
    assert status.engines[0].driver == "virtio_crypto_aes_cbc"


def test_json_round_trip_through_text_gives_the_same_model() -> None:
    status = Status.merge(
        _daemon(),
        [
            StatusContribution(
                tunnels=(
                    TunnelStatus(
                        "p",
                        "10.0.0.1",
                        "10.0.0.2",
                        "established",
                        "private",
                        "AES_GCM_16_256",
                        5.0,
                        bytes_in=7,
                        bytes_out=8,
                        packets_in=1,
                        packets_out=2,
                    ),
                ),
                shunts=(ShuntStatus("10.9.9.9/32", "hold"),),
                engines=(EngineStatus("sw", "cryptography", "software"),),
                dns={"upstreams": ["9.9.9.9"]},
            )
        ],
    )
    text = json.dumps(status.to_json())
    back = Status.from_json(json.loads(text))
    assert back == status
    assert back.daemon.last_reload == ReloadResult(False, 3, ("oe.main.log_level: bad",), 10.0)


def test_engine_detail_and_tunnel_engine_round_trip_through_json() -> None:
    engine = EngineStatus(
        "afalg:virtio_crypto_aes_cbc",
        "virtio_crypto_aes_cbc",
        "hardware",
        True,
        True,
        250.0,
        hardware=True,
        state="ready",
        transforms=(
            EngineTransformStatus(
                "aes256-sha256",
                "virtio_crypto_aes_cbc",
                "passed",
                rates=(EngineRate(64, 20.0, 25600.0), EngineRate(1400, 250.0, 44800.0)),
                in_use_for=">=512",
            ),
            EngineTransformStatus("aes128-sha256", kat="failed", reason="canary: case 2"),
        ),
        in_use_for=("aes256-sha256@>=512",),
    )
    tunnel = TunnelStatus("p", "10.0.0.1", "10.0.0.2", "established", engine=engine.name)
    status = Status.merge(_daemon(), [StatusContribution(tunnels=(tunnel,), engines=(engine,))])
    doc = json.loads(json.dumps(status.to_json()))
    assert doc["engines"][0]["transforms"][0]["rates"][1] == {
        "size": 1400,
        "mbit_s": 250.0,
        "ns_per_packet": 44800.0,
    }
    assert doc["tunnels"][0]["engine"] == "afalg:virtio_crypto_aes_cbc"
    assert Status.from_json(doc) == status


def test_documents_of_older_and_newer_daemons_both_read() -> None:
    """Older: no engine detail, no tunnel engine (defaults). Newer: fields this reader
    does not know yet (ignored)."""
    old = Status.merge(_daemon(), []).to_json()
    old["engines"] = [
        {"name": "sw", "driver": "cryptography", "kind": "software", "proven": True,
         "selected": False, "mbit_s": None}
    ]  # fmt: skip
    old["tunnels"] = [{"peer": "p", "local": "a", "remote": "b", "state": "up"}]
    back = Status.from_json(old)
    assert back.engines[0] == EngineStatus("sw", "cryptography", "software", True)
    assert back.engines[0].transforms == () and back.tunnels[0].engine == ""
    new = json.loads(json.dumps(old))
    new["engines"][0]["queue_depth"] = 4
    new["engines"][0]["transforms"] = [{"transform": "x", "kat": "passed", "future": 1,
                                        "rates": [{"size": 64, "mbit_s": 1.0,
                                                   "ns_per_packet": 2.0, "p99": 3}]}]  # fmt: skip
    new["tunnels"][0]["worker"] = 2
    new["shunts"] = [{"destination": "d", "kind": "clear", "origin": "dns"}]
    back = Status.from_json(new)
    assert back.engines[0].transforms[0].rates[0].mbit_s == 1.0
    assert back.tunnels[0].peer == "p" and back.shunts[0].kind == "clear"


def test_ike_counters_merge_round_trip_and_are_optional_in_older_documents() -> None:
    part = StatusContribution(ike={"fragments_dropped": 3, "fragment_bytes": 1200})
    status = Status.merge(_daemon(), [part, StatusContribution(ike={"fragment_bytes": 0})])
    assert status.ike == {"fragments_dropped": 3, "fragment_bytes": 0}
    doc = json.loads(json.dumps(status.to_json()))
    assert Status.from_json(doc) == status
    del doc["ike"]  # a daemon from before the IKE counters
    assert Status.from_json(doc).ike == {}


def test_trust_anchors_merge_round_trip_and_are_optional_in_older_documents() -> None:
    row = TrustAnchorStatus(
        ".", 38696, 8, "addpend", "2026-12-06T06:25:15Z", "2027-01-05T06:25:15Z"
    )
    status = Status.merge(_daemon(), [StatusContribution(trust_anchors=(row,))])
    doc = json.loads(json.dumps(status.to_json()))
    assert doc["trust_anchors"][0]["key_tag"] == 38696
    assert Status.from_json(doc) == status
    del doc["trust_anchors"]  # a daemon from before RFC 5011
    assert Status.from_json(doc).trust_anchors == ()
