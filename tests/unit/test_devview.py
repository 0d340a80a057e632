"""The per-LAN-device view and ``explain``: conntrack flows, leases and the real OE
manager's tunnels and shunts in, each destination's verdict and reason out; the
``devices``/``explain`` commands through the control socket, the CLI and ubus."""

from __future__ import annotations

import asyncio
import ipaddress
import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import TypeVar

import dns.name
import pytest

from oe_router.cli import main
from oe_router.config.schema import PolicyConfig, parse_policy_entry
from oe_router.control import CommandTable
from oe_router.control.blobmsg import decode, encode
from oe_router.control.protocol import Request
from oe_router.control.status import ChildSaStatus, TunnelStatus
from oe_router.control.ubus_abi import Status as UbusStatus
from oe_router.control.ubus_api import answer, signature
from oe_router.datapath.base import (
    Acquire,
    ChildSaSpec,
    IPAddress,
    SaKeys,
    TrafficSelector,
    encr_algorithm,
)
from oe_router.devcommands import DeviceCommands, read_leases
from oe_router.devview import (
    DevicesView,
    Explanation,
    Flow,
    Lease,
    OeSnapshot,
    build_view,
    explain,
    parse_leases,
    snapshot,
)
from oe_router.dns.ipseckey import KeyKind, PeerKey
from oe_router.oe.actions import Action, InstallChild, Negotiate, NegotiationResult
from oe_router.oe.manager import OeManager
from oe_router.oe.policy import PolicyTable
from tests.control_thread import ThreadedControlServer

ip = ipaddress.ip_address
WAN = ip("198.51.100.1")
WAN6 = ip("2001:db8:ffff::1")
LAN4 = ipaddress.ip_network("192.168.1.0/24")
LAN6 = ipaddress.ip_network("fd00:1::/64")
LAPTOP = ip("192.168.1.10")
PHONE6 = ip("fd00:1::5")
IDLE = ip("192.168.1.20")
TUNNELED = ip("192.0.2.7")  # DNS-triggered tunnel (www.example.org)
FAILED = ip("192.0.2.8")  # IKE failed: pass shunt
KEYLESS = ip("192.0.2.30")  # the DNS front proved it keyless: pass shunt
PRIV = ip("203.0.113.5")  # private, IKE failed: drop shunt
CLEARED = ip("192.0.2.9")  # group clear
RESPONDER = ip("192.0.2.70")  # clear-or-private
BLOCKED = ip("198.18.0.1")  # group block
V6DST = ip("2001:db8:5::1")  # private-or-clear, nothing yet
TRAP_REQID = 0x4F45FFFF
A = TypeVar("A", bound=Action)
NAME = dns.name.from_text("www.example.org")
KEY = PeerKey(KeyKind.NONE, None, 10, NAME, 0)
LEASES = (
    "1733520000 aa:bb:cc:dd:ee:01 192.168.1.10 laptop 01:aa:bb:cc:dd:ee:01\n"
    "1733520000 AA:BB:CC:DD:EE:02 192.168.1.20 * *\n"
    "duid 00:01:00:01:2c:00:00:00:aa:bb:cc:dd:ee:03\n"
    "1733520000 12345678 fd00:1::5 phone 00:01:00:01\n"
)


def _cfg() -> PolicyConfig:
    def es(*t: str) -> tuple[object, ...]:
        return tuple(parse_policy_entry(x) for x in t)

    return PolicyConfig(
        private=es("203.0.113.0/24"),  # type: ignore[arg-type]
        private_or_clear=es("0.0.0.0/0", "::/0"),  # type: ignore[arg-type]
        clear_or_private=es("192.0.2.64/26"),  # type: ignore[arg-type]
        clear=es("192.0.2.9/32"),  # type: ignore[arg-type]
        block=es("198.18.0.0/15"),  # type: ignore[arg-type]
    )


def _host(a: IPAddress) -> TrafficSelector:
    return TrafficSelector(ipaddress.ip_network(a))


def _spec(peer: IPAddress, spi: int) -> ChildSaSpec:
    return ChildSaSpec(
        WAN, peer, SaKeys(spi, bytes(36)), SaKeys(spi + 1, bytes(36)), encr_algorithm(20),
        local_ts=(_host(WAN),), remote_ts=(_host(peer),),
    )  # fmt: skip


def _acq(dst: IPAddress) -> Acquire:
    sel = TrafficSelector(ipaddress.ip_network(dst), 6, 443)
    return Acquire(WAN, dst, _host(WAN), sel, TRAP_REQID, 1, 0, 0)


def _one(actions: list[Action], kind: type[A]) -> A:
    (found,) = [a for a in actions if isinstance(a, kind)]
    return found


@pytest.fixture
def mgr() -> OeManager:
    """A real manager with a DNS-triggered tunnel, an IKE-failure pass shunt, a keyless
    pass shunt and a private drop shunt."""
    table = PolicyTable.from_config(_cfg(), lan=(LAN4, LAN6), link_exclusions=())
    m = OeManager(table, {4: WAN, 6: WAN6}, trap_reqid=TRAP_REQID, shunt_lifetime=900)
    neg = _one(m.ensure_tunnel(1, NAME, (TUNNELED,), KEY, 0.0), Negotiate)
    inst = _one(
        m.negotiated(neg.ticket, NegotiationResult(_spec(TUNNELED, 0x1000)), 0.5), InstallChild
    )
    m.installed(inst.ticket, replace(inst.spec, reqid=7), None, 1.0)
    neg = _one(m.acquire(_acq(FAILED), 1.0), Negotiate)
    m.negotiated(neg.ticket, NegotiationResult(None, "no response from 192.0.2.8"), 2.0)
    m.pass_keyless(
        dns.name.from_text("silent.example"), (KEYLESS,), 120, "no key (secure denial)", 2.0
    )
    neg = _one(m.acquire(_acq(PRIV), 2.0), Negotiate)
    m.negotiated(neg.ticket, NegotiationResult(None, "AUTHENTICATION_FAILED"), 3.0)
    return m


#: The IKE engine's row for the tunnelled peer (another service: its auth and SPIs)
IKE_ROW = TunnelStatus(
    peer=str(TUNNELED), local="198.51.100.1[4500]", remote="192.0.2.7[4500]",
    state="established", source="ike", local_auth="NULL", remote_auth="NULL",
    remote_id="(null)", ike_spis="aa_i bb_r",
    children=(ChildSaStatus("c0ffee01", "c0ffee02", "transport", "AES_GCM_16/256",
                            "198.51.100.1/32", "192.0.2.7/32"),),
)  # fmt: skip


def _snap(m: OeManager, now: float = 4.0) -> OeSnapshot:
    return snapshot(m, (LAN4, LAN6), (*m.tunnels(now), IKE_ROW), now)


FLOWS = [
    Flow(LAPTOP, TUNNELED, 6, 443),
    Flow(LAPTOP, TUNNELED, 6, 443),
    Flow(LAPTOP, FAILED, 17, 53),
    Flow(LAPTOP, KEYLESS, 6, 80),
    Flow(LAPTOP, PRIV, 6, 22),
    Flow(LAPTOP, CLEARED, 6, 80),
    Flow(LAPTOP, BLOCKED, 1),
    Flow(LAPTOP, ip("192.168.1.1"), 17, 53),  # the router: inside the LAN, not listed
    Flow(WAN, TUNNELED, 17, 500),  # the router's own IKE: not a LAN device
    Flow(PHONE6, V6DST, 6, 443),
]


def _dest(view: DevicesView, device: str, address: str):  # type: ignore[no-untyped-def]
    (d,) = [d for d in view.devices if d.address == device]
    (x,) = [x for x in d.destinations if x.address == address]
    return x


def test_a_device_with_tunnel_shunt_and_clear_flows(mgr: OeManager) -> None:
    leases, bad = parse_leases(LEASES)
    view = build_view(_snap(mgr), FLOWS, leases, flows_read=len(FLOWS))
    assert bad == 0
    assert [d.address for d in view.devices] == [str(LAPTOP), str(PHONE6)]
    laptop = view.devices[0]
    assert (laptop.mac, laptop.hostname) == ("aa:bb:cc:dd:ee:01", "laptop")
    assert (laptop.flows_protected, laptop.flows_clear, laptop.flows_blocked) == (2, 3, 2)
    assert {x.address for x in laptop.destinations} == {
        str(a) for a in (TUNNELED, FAILED, KEYLESS, PRIV, CLEARED, BLOCKED)
    }
    t = _dest(view, str(LAPTOP), str(TUNNELED))
    assert (t.state, t.flows, t.services) == ("protected", 2, ("tcp 443",))
    assert t.dns_name == "www.example.org"
    assert t.tunnel is not None and t.tunnel.peer == str(TUNNELED)
    assert (t.tunnel.spi_in, t.tunnel.spi_out) == ("c0ffee01", "c0ffee02")
    assert t.tunnel.remote_auth == "NULL"
    assert t.group == "private-or-clear" and t.entry == "private-or-clear 0.0.0.0/0"
    f = _dest(view, str(LAPTOP), str(FAILED))
    assert f.state == "clear" and f.shunt == "pass"
    assert f.reason == "pass shunt (IKE failed): no response from 192.0.2.8"
    k = _dest(view, str(LAPTOP), str(KEYLESS))
    assert (k.state, k.reason) == ("clear", "pass shunt (no key): no key (secure denial)")
    p = _dest(view, str(LAPTOP), str(PRIV))
    assert p.state == "blocked" and p.reason == "drop shunt (IKE failed): AUTHENTICATION_FAILED"
    assert p.group == "private"
    c = _dest(view, str(LAPTOP), str(CLEARED))
    assert (c.state, c.reason, c.entry) == ("clear", "policy group clear", "clear 192.0.2.9/32")
    b = _dest(view, str(LAPTOP), str(BLOCKED))
    assert (b.state, b.reason, b.services) == ("blocked", "policy group block", ("icmp",))
    # the JSON shape reads back to the same view
    assert DevicesView.from_json(json.loads(json.dumps(view.to_json()))) == view


def test_an_ipv6_device_without_a_mac_in_its_lease(mgr: OeManager) -> None:
    leases, _ = parse_leases(LEASES)
    view = build_view(_snap(mgr), FLOWS, leases, device=PHONE6)
    (phone,) = view.devices
    assert (phone.address, phone.mac, phone.hostname) == (str(PHONE6), "", "phone")
    (x,) = phone.destinations
    assert (x.address, x.state, x.group) == (str(V6DST), "pending", "private-or-clear")
    assert "next packet triggers IKE" in x.reason
    assert phone.flows_pending == 1 and phone.flows_protected == phone.flows_clear == 0


def test_a_device_with_no_flows_is_listed_empty(mgr: OeManager) -> None:
    leases, _ = parse_leases(LEASES)
    view = build_view(_snap(mgr), FLOWS, leases, device=IDLE)
    (idle,) = view.devices
    assert (idle.address, idle.mac, idle.hostname, idle.destinations) == (
        str(IDLE), "aa:bb:cc:dd:ee:02", "", ()
    )  # fmt: skip


def test_malformed_lease_lines_are_counted_and_skipped() -> None:
    text = LEASES + "garbage\n1733520000 aa:bb 999.1.1.1 x *\n\n1733520000 zz 10.0.0.9 nas *\n"
    leases, bad = parse_leases(text)
    assert bad == 2
    assert leases[ip("10.0.0.9")] == Lease(ip("10.0.0.9"), "", "nas")  # not a MAC: none
    assert leases[LAPTOP].hostname == "laptop"


def test_a_missing_lease_file_is_a_note_not_a_failure(tmp_path: Path) -> None:
    leases, note = read_leases(tmp_path / "dhcp.leases")
    assert leases == {} and note is not None and "no DHCP leases" in note
    (tmp_path / "bad").write_bytes(b"\xff\xfe junk\n" + LEASES.encode())
    leases, note = read_leases(tmp_path / "bad")
    assert LAPTOP in leases and note == f"{tmp_path / 'bad'}: 1 malformed line(s) ignored"


def test_explain_each_group_kind(mgr: OeManager) -> None:
    snap = _snap(mgr)

    def ex(addr: str) -> Explanation:
        return explain(snap, ip(addr))

    e = ex("203.0.113.99")  # private, nothing now
    assert (e.group, e.entry, e.now) == ("private", "private 203.0.113.0/24", "no SA, no shunt")
    assert e.new_flow == (
        "is held and triggers IKE with NULL auth; on failure: dropped "
        "(a drop shunt, 5s at first, doubling)"
    )
    e = ex("192.0.2.200")  # private-or-clear, nothing now
    assert (e.group, e.entry) == ("private-or-clear", "private-or-clear 0.0.0.0/0")
    assert e.new_flow == "is held and triggers IKE with NULL auth; on failure: clear for 15m"
    e = ex(str(TUNNELED))
    assert e.state == "protected" and e.dns_name == "www.example.org"
    assert e.now.startswith("tunnel to 192.0.2.7") and "SPIs c0ffee01/c0ffee02" in e.now
    assert e.new_flow == "rides the tunnel (auth NULL)"
    e = ex(str(FAILED))
    assert e.now == "pass shunt (IKE failed): no response from 192.0.2.8 (14m58s left)"
    assert e.new_flow == "goes in the clear for 14m58s, then meets its group's policy again"
    e = ex(str(PRIV))
    assert e.state == "blocked" and e.new_flow.startswith("is dropped for 4s")
    assert ex(str(CLEARED)).new_flow == "goes in the clear"
    assert ex(str(RESPONDER)).new_flow == "goes in the clear (a tunnel only if the peer starts IKE)"
    e = ex(str(BLOCKED))
    assert (e.group, e.state, e.new_flow) == ("block", "blocked", "is dropped")
    e = ex(str(LAPTOP))  # an address in the LAN
    assert (e.group, e.entry, e.state) == ("", "192.168.1.0/24", "clear")
    assert e.new_flow == "stays on the LAN: never trapped, never OE"
    e = ex("2001:db8:5::1")
    assert e.group == "private-or-clear" and e.entry == "private-or-clear ::/0"
    assert Explanation.from_json(json.loads(json.dumps(e.to_json()))) == e


def test_explain_without_a_wan_address_of_the_family() -> None:
    table = PolicyTable.from_config(_cfg(), link_exclusions=())
    m = OeManager(table, {4: WAN}, trap_reqid=TRAP_REQID)
    snap = snapshot(m, (), (), 0.0)
    assert explain(snap, ip("2001:db8::1")).new_flow == (
        "goes in the clear (no IPv6 WAN address to negotiate from)"
    )
    table = PolicyTable.from_config(PolicyConfig(private_or_clear=(), clear=()), link_exclusions=())
    snap = snapshot(OeManager(table, {4: WAN}, trap_reqid=TRAP_REQID), (), (), 0.0)
    e = explain(snap, ip("192.0.2.1"))
    assert (e.group, e.entry) == ("", "")
    assert e.new_flow == "goes in the clear (no policy group covers it)"


# ------------------------------------------------------------------ the commands


def _commands(
    m: OeManager, flows: list[Flow], leases: Path, max_flows: int = 20_000, fail: bool = False
) -> CommandTable:
    def read(limit: int) -> tuple[list[Flow], int, bool]:
        if fail:
            raise OSError("Operation not permitted")
        return flows[:limit], min(limit, len(flows)), len(flows) > limit

    table = CommandTable()
    DeviceCommands(
        lambda: None,  # type: ignore[arg-type,return-value]
        lambda _status: _snap(m),
        read,
        leases,
        max_flows,
    ).register(table)
    return table


def test_devices_command_caps_conntrack_and_notes_what_it_could_not_read(
    mgr: OeManager, tmp_path: Path
) -> None:
    many = [Flow(LAPTOP, ip(f"192.0.2.{i % 250 + 1}"), 6, 1000 + i) for i in range(30)]
    table = _commands(mgr, many, tmp_path / "none", max_flows=10)
    body = asyncio.run(table.invoke(Request("devices", {})))
    view = DevicesView.from_json(body["devices"])
    assert view.truncated and view.flows_read == 10
    assert sum(x.flows for x in view.devices[0].destinations) == 10
    assert any("more than 10 entries" in n for n in view.notes)
    assert any("no DHCP leases" in n for n in view.notes)
    table = _commands(mgr, many, tmp_path / "none", fail=True)
    body = asyncio.run(table.invoke(Request("devices", {"device": str(LAPTOP)})))
    view = DevicesView.from_json(body["devices"])
    assert view.devices[0].destinations == ()
    assert "cannot read conntrack: Operation not permitted" in view.notes


def test_ubus_devices_and_explain_methods(mgr: OeManager, tmp_path: Path) -> None:
    (tmp_path / "leases").write_text(LEASES)
    table = _commands(mgr, FLOWS, tmp_path / "leases")
    got = asyncio.run(answer(table, "explain", encode({"address": str(PRIV)})))
    assert got.status is UbusStatus.OK
    assert decode(got.data)["group"] == "private"
    got = asyncio.run(answer(table, "devices", encode({"device": str(LAPTOP)})))
    assert got.status is UbusStatus.OK
    (dev,) = decode(got.data)["devices"]
    assert dev["hostname"] == "laptop" and dev["flows_protected"] == 2
    bad = asyncio.run(answer(table, "explain", encode({"address": "not-an-ip"})))
    assert bad.status is UbusStatus.INVALID_ARGUMENT
    assert "not an IP address" in decode(bad.data)["error"]
    assert signature()["explain"] == {"address": 3} and signature()["devices"] == {"device": 3}


@pytest.fixture
def served(mgr: OeManager, tmp_path: Path) -> Iterator[Path]:
    (tmp_path / "leases").write_text(LEASES)
    sock = tmp_path / "control.sock"
    with ThreadedControlServer(sock, _commands(mgr, FLOWS, tmp_path / "leases")):
        yield sock


def test_cli_status_device_and_explain(served: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--socket", str(served), "status", "--device", str(LAPTOP)]) == 0
    text = capsys.readouterr().out
    assert text.startswith("device 192.168.1.10 (laptop aa:bb:cc:dd:ee:01): 2 encrypted, 3 clear")
    (row,) = [line for line in text.splitlines() if line.strip().startswith(str(TUNNELED))]
    assert "www.example.org" in row and "protected" in row and "c0ffee01/c0ffee02" in row
    assert main(["--socket", str(served), "status", "--device", str(LAPTOP), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [d["address"] for d in doc["devices"]] == [str(LAPTOP)]
    assert main(["--socket", str(served), "explain", "192.0.2.200"]) == 0
    text = capsys.readouterr().out
    assert "policy group private-or-clear (entry private-or-clear 0.0.0.0/0)" in text
    assert "a new flow is held and triggers IKE with NULL auth; on failure: clear for 15m" in text
    assert main(["--socket", str(served), "explain", "example.org"]) == 1
    assert "not an IP address" in capsys.readouterr().err
    assert main(["--socket", str(served), "devices"]) == 0
    assert "device fd00:1::5 (phone)" in capsys.readouterr().out
