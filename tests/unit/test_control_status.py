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


def test_empty_status_has_the_five_top_level_keys_with_list_and_object_types() -> None:
    doc = Status.merge(_daemon(last_reload=None), []).to_json()
    assert set(doc) == {"daemon", "tunnels", "shunts", "engines", "dns"}
    assert doc["tunnels"] == [] and doc["shunts"] == [] and doc["engines"] == []
    assert doc["dns"] == {}
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
