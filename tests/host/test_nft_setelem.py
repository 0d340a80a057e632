"""nftables set elements written over nfnetlink, read back with ``nft -j`` (real kernel).

A namespace holds the packet hold's table (``kernel_hold.render_table``: ``known4`` with
timeouts) or the userspace datapath's SPD table (``nft_spd``: interval verdict maps),
written by nft; the elements then come and go through ``SetElemWriter`` (and the two
callers), with ``run_nft`` made to fail wherever the test claims no nft process runs.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import json
import subprocess
import time
from typing import Any

import pytest

from oe_router.datapath import kernel_hold, nft_spd
from oe_router.datapath.base import (
    DatapathError,
    Direction,
    Mode,
    PolicyAction,
    PolicySpec,
    Template,
    TrafficSelector,
)
from oe_router.datapath.kernel_hold import (
    HeldXfrmDatapath,
    HoldSettings,
    KnownOp,
    known_changes,
    render_table,
)
from oe_router.datapath.nft import run_nft
from oe_router.datapath.nft_setelem import ElemChange, NftSetError, SetElem, SetElemWriter
from tests.host.netlab import MakeNetns

pytestmark = pytest.mark.host

S = HoldSettings(table="oe_nse")
WAN = ipaddress.IPv4Address("198.51.100.1")


def _nft_json(ns: str, *what: str) -> dict[str, Any]:
    out = subprocess.run(
        ["ip", "netns", "exec", ns, "nft", "-j", "list", *what],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    items = json.loads(out)["nftables"]
    return next(i for i in items if "set" in i or "map" in i)


def _known(ns: str) -> dict[str, dict[str, Any]]:
    """known4's elements: address -> {"timeout": s, "expires": s}."""
    elems = _nft_json(ns, "set", "inet", S.table, "known4")["set"].get("elem", [])
    out: dict[str, dict[str, Any]] = {}
    for e in elems:  # an element without a timeout is listed as a bare string
        out.update({e: {}} if isinstance(e, str) else {e["elem"]["val"]: e["elem"]})
    return out


def _no_nft(*args: Any, **kw: Any) -> None:
    raise AssertionError("an nft process was started for a set-element change")


@pytest.fixture
def hold_ns(make_netns: MakeNetns) -> str:
    ns = make_netns("nse")
    run_nft(render_table(S, ["wan"], [ipaddress.IPv4Network("203.0.113.0/24")]), netns=ns)
    return ns


def test_known_elements_with_timeouts_are_added_deleted_and_flushed(hold_ns: str) -> None:
    w = SetElemWriter(netns=hold_ns)
    a, b = ipaddress.IPv4Address("203.0.113.7"), ipaddress.IPv4Address("203.0.113.8")
    try:
        w.apply(known_changes(S, KnownOp(add=((a, 600), (b, 30)))))
        got = _known(hold_ns)
        assert set(got) == {str(a), str(b)}
        assert got[str(a)]["timeout"] == 600 and 590 <= got[str(a)]["expires"] <= 600
        assert got[str(b)]["timeout"] == 30 and 20 <= got[str(b)]["expires"] <= 30
        w.apply(known_changes(S, KnownOp(remove=a)))
        assert set(_known(hold_ns)) == {str(b)}
        w.apply(known_changes(S, KnownOp(flush=True)))
        assert _known(hold_ns) == {}
        assert w.batches == 3
    finally:
        w.close()


def test_a_missing_set_is_named_and_a_refused_batch_applies_nothing(hold_ns: str) -> None:
    w = SetElemWriter(netns=hold_ns)
    dst = SetElem(ipaddress.IPv4Address("198.51.100.7"), timeout=60)
    good = ElemChange(S.table, "known4", True, (SetElem(ipaddress.IPv4Address("203.0.113.9")),))
    try:
        with pytest.raises(NftSetError) as exc:
            w.apply([good, ElemChange(S.table, "nosuch", True, (dst,), what="packet hold")])
        assert str(exc.value) == (
            "packet hold: set inet oe_nse nosuch: element 198.51.100.7: no such set (ENOENT)"
        )
        assert exc.value.errno == errno.ENOENT
        assert _known(hold_ns) == {}, "the batch was not atomic"
        with pytest.raises(NftSetError, match=r"set inet oe_gone known4: .*no such table"):
            w.apply([ElemChange("oe_gone", "known4", True, (dst,), what="packet hold")])
        with pytest.raises(NftSetError, match=r"element 203\.0\.113\.1: no such element"):
            w.apply(known_changes(S, KnownOp(remove=ipaddress.IPv4Address("203.0.113.1"))))
        w.apply([good])  # the socket still serves after refusals
        assert set(_known(hold_ns)) == {"203.0.113.9"}
    finally:
        w.close()


def test_a_thousand_elements_go_in_one_send(hold_ns: str) -> None:
    w = SetElemWriter(netns=hold_ns)
    adds = tuple((ipaddress.IPv4Address(0xC6336400 + i), 300) for i in range(1000))
    try:
        t0 = time.perf_counter()
        w.apply(known_changes(S, KnownOp(add=adds)))
        took = time.perf_counter() - t0
        assert w.batches == 1
        got = _known(hold_ns)
        assert len(got) == 1000 and {v["timeout"] for v in got.values()} == {300}
        print(f"1,000 known4 elements in one batch: {took * 1000:.1f} ms")
    finally:
        w.close()


def test_the_hold_writes_known4_without_nft_and_falls_back_once(
    hold_ns: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The datapath's writer: over netlink (no nft process); after the kernel says it
    cannot (EOPNOTSUPP), with nft for good."""
    dp = HeldXfrmDatapath(netns=hold_ns, reason="test", wan_devices=["wan"], wan4=WAN, hold=S)
    a, b = ipaddress.IPv4Address("203.0.113.20"), ipaddress.IPv4Address("203.0.113.21")
    try:
        monkeypatch.setattr(kernel_hold, "run_nft", _no_nft)
        dp._apply_known(KnownOp(add=((a, 120),)))
        assert _known(hold_ns)[str(a)]["timeout"] == 120

        class Refusing:
            def apply(self, changes: list[ElemChange]) -> None:
                raise NftSetError(errno.EOPNOTSUPP, "not supported (test)")

            def close(self) -> None:
                pass

        monkeypatch.setattr(kernel_hold, "run_nft", run_nft)
        dp._elems = Refusing()  # type: ignore[assignment]
        dp._apply_known(KnownOp(add=((b, 90),)))
        assert dp._elems is None
        assert _known(hold_ns)[str(b)]["timeout"] == 90
        with pytest.raises(DatapathError, match="nft refused the packet hold"):
            dp._apply_known(KnownOp(remove=ipaddress.IPv4Address("203.0.113.99")))
    finally:
        asyncio.run(dp.close())


# --- the userspace datapath's SPD projection ----------------------------------------
def _ts(net: str) -> TrafficSelector:
    return TrafficSelector(ipaddress.ip_network(net))


def _shunt(dst: str, action: PolicyAction) -> PolicySpec:
    return PolicySpec(_ts(f"{WAN}/32"), _ts(dst), Direction.OUT, action, 1)


def _map_elems(ns: str, name: str) -> dict[str, Any]:
    m = _nft_json(ns, "map", "inet", nft_spd.DEFAULT_TABLE, name)["map"]
    out: dict[str, Any] = {}
    for key, verdict in m.get("elem", []):
        if isinstance(key, dict):
            key = f"{key['prefix']['addr']}/{key['prefix']['len']}"
        out[key] = verdict
    return out


def test_projection_map_elements_go_over_netlink(
    make_netns: MakeNetns, monkeypatch: pytest.MonkeyPatch
) -> None:
    ns = make_netns("nsespd")
    tmpl = Template(WAN, ipaddress.IPv4Address("0.0.0.0"), 1, Mode.TRANSPORT)
    trap = PolicySpec(
        _ts(f"{WAN}/32"), _ts("0.0.0.0/0"), Direction.OUT, PolicyAction.TRAP, 100, (tmpl,)
    )
    current = [trap, _shunt("50.0.1.1/32", PolicyAction.PASS)]

    async def run() -> None:
        proj = nft_spd.SpdProjection(
            wan="wan", tun="oetun", queue_num=4711, bypass_mark=0x100, ike_ports=(), netns=ns
        )
        await proj.probe()
        await proj.go_live(list(current))
        (name,) = nft_spd.map_names(proj._table)  # type: ignore[arg-type]
        monkeypatch.setattr(nft_spd, "run_nft", _no_nft)
        new = [
            _shunt("50.0.1.2/32", PolicyAction.DROP),
            _shunt("50.0.2.0/24", PolicyAction.PASS),
            _shunt("50.0.1.3/32", PolicyAction.HOLD),
        ]
        current.extend(new)
        await proj.project(lambda: list(current), add=new)
        assert _map_elems(ns, name) == {
            "50.0.1.1": {"accept": None},
            "50.0.1.2": {"drop": None},
            "50.0.2.0/24": {"accept": None},
            "50.0.1.3": {"goto": {"target": nft_spd.QUEUE_CHAIN}},
        }
        current.remove(new[0])
        await proj.project(lambda: list(current), remove=[new[0]])
        assert _map_elems(ns, name) == {  # its neighbours' adjacent intervals stay whole
            "50.0.1.1": {"accept": None},
            "50.0.2.0/24": {"accept": None},
            "50.0.1.3": {"goto": {"target": nft_spd.QUEUE_CHAIN}},
        }
        assert proj.runs == {"elements": 2, "whole": 1, "nft": 0}
        monkeypatch.setattr(nft_spd, "run_nft", run_nft)
        await proj.leave([])

    asyncio.run(run())
