"""Real ESP on the router VM's Debian kernel through XfrmDatapath, without IKE.

Why: the datapath must be proven on its own before any IKE or OE test blames it. The router
installs a Child SA pair with our netlink code (tests/qemu/xfrm_guest.py runs inside the VM);
the world host "insecure" (203.0.113.21, no IPsec daemon) gets the mirror image by hand with
iproute2's `ip xfrm`. A different implementation on the other end catches mistakes a
self-consistent pair of our own would hide (the 96-bit hmac(sha256) truncation of plain
XFRMA_ALG_AUTH, a wrong salt split, wrong ESN or encapsulation layout): a wrong key layout
means no ping answer. Traffic is the LAN client's ping and HTTP fetch through the router, so
it also crosses the router's SNAT and the post-NAT XFRM lookup; the WAN capture shows ESP and
no cleartext, and our counters read back the packets.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lab import PLAN, Lab

pytestmark = pytest.mark.qemu

HERE = Path(__file__).resolve().parent
PEER = "insecure"  # a world host with no IPsec daemon of its own
WORLD_REQID = 7

# name -> IKE transform ids, key sizes (bytes, AEAD salt included), ESN / window / NAT-T, and
# the same algorithm in iproute2 words for the hand-configured peer
CASES: dict[str, dict[str, Any]] = {
    "aes-gcm-256": {"encr": 20, "key": 36, "alg": "aead 'rfc4106(gcm(aes))' 0x{k} 128"},
    "aes-cbc-256-hmac-sha256-128": {
        "encr": 12,
        "integ": 12,
        "key": 32,
        "ikey": 32,
        "alg": "enc 'cbc(aes)' 0x{k} auth-trunc 'hmac(sha256)' 0x{ik} 128",
    },
    "chacha20-poly1305": {
        "encr": 28,
        "key": 36,
        "alg": "aead 'rfc7539esp(chacha20,poly1305)' 0x{k} 128",
    },
    "aes-gcm-esn": {
        "encr": 20,
        "key": 36,
        "esn": True,
        "alg": "aead 'rfc4106(gcm(aes))' 0x{k} 128",
    },
    "aes-gcm-no-esn-window-32": {
        "encr": 20,
        "key": 36,
        "window": 32,
        "alg": "aead 'rfc4106(gcm(aes))' 0x{k} 128",
    },
    "aes-gcm-natt": {
        "encr": 20,
        "key": 36,
        "encap": True,
        "alg": "aead 'rfc4106(gcm(aes))' 0x{k} 128",
    },
}


def guest(lab: Lab, op: str, *args: str, timeout: float = 60) -> dict[str, Any]:
    """Run xfrm_guest.py inside the router VM; its last stdout line is JSON."""
    dest = lab.run_dir / "xfrm_guest.py"
    if not dest.exists():
        shutil.copy2(HERE / "xfrm_guest.py", dest)
    cmd = " ".join(["python3 /lab/xfrm_guest.py", op, *map(shlex.quote, args)])
    res = lab.router(cmd, timeout=timeout).check()
    return dict(json.loads(res.stdout.strip().splitlines()[-1]))


def make_spec(case: dict[str, Any], spi_base: int) -> dict[str, Any]:
    key, ikey = case["key"], case.get("ikey", 0)
    spec: dict[str, Any] = {
        "local": PLAN.router_wan4,
        "remote": PLAN.host(PEER).ipv4,
        "in_spi": spi_base + 1,
        "out_spi": spi_base + 2,
        "in_key": os.urandom(key).hex(),
        "out_key": os.urandom(key).hex(),
        "in_ikey": os.urandom(ikey).hex(),
        "out_ikey": os.urandom(ikey).hex(),
        "encr": case["encr"],
        "integ": case.get("integ"),
        "esn": case.get("esn", False),
        "replay_window": case.get("window", 64),
    }
    if case.get("encap"):
        spec["encap"] = [4500, 4500]
    return spec


def peer_commands(case: dict[str, Any], spec: dict[str, Any]) -> str:
    """The mirror image of our Child SA for the peer, in iproute2 words."""
    r, p = spec["local"], spec["remote"]
    extra = f"replay-window {spec['replay_window']}"
    if spec["esn"]:
        extra += " flag esn"
    if spec.get("encap"):
        extra += " encap espinudp 4500 4500 0.0.0.0"

    def state(src: str, dst: str, spi: int, k: str, ik: str) -> str:
        alg = case["alg"].format(k=k, ik=ik)
        return (
            f"ip xfrm state add src {src} dst {dst} proto esp spi {spi} reqid {WORLD_REQID} "
            f"mode tunnel {alg} {extra}"
        )

    def policy(src: str, dst: str, d: str) -> str:
        return (
            f"ip xfrm policy add src {src}/32 dst {dst}/32 dir {d} priority 100 "
            f"tmpl src {src} dst {dst} proto esp reqid {WORLD_REQID} mode tunnel"
        )

    return "\n".join(
        [
            "set -e",
            # what the router receives is what the peer sends: our inbound = its outbound
            state(p, r, spec["in_spi"], spec["in_key"], spec["in_ikey"]),
            state(r, p, spec["out_spi"], spec["out_key"], spec["out_ikey"]),
            policy(p, r, "out"),
            policy(r, p, "in"),
        ]
    )


def natt_socket_world(ip: str, router: str) -> str:
    """An ESPINUDP socket on the peer's 4500 (the kernel decapsulates only on such a socket).

    The kernel checks the in-policy on the outer UDP packet before it decapsulates, and the
    host-to-host selector covers it: IKE daemons exempt their socket (IP_XFRM_POLICY); by
    hand, an allow policy for UDP 4500 that outranks the SA's (10 < 100) does the same.
    """
    code = (
        "import socket,time;s=socket.socket(2,2);"
        f"s.bind(('{ip}',4500));s.setsockopt(17,100,2);time.sleep(120)"
    )
    bypass = (
        f"ip xfrm policy add src {router}/32 dst {ip}/32 proto udp sport 4500 dport 4500 "
        "dir in priority 10"
    )
    return f"{bypass}; setsid python3 -c {shlex.quote(code)} >/dev/null 2>&1 </dev/null & echo $!"


@pytest.fixture
def clean(lab: Lab) -> Iterator[list[str]]:
    """Leave router and peer without any SA, policy or helper process (the lab is shared).

    Yields a list the test appends "vm:pid" of background helpers to; they are killed by pid.
    """
    pids: list[str] = []
    yield pids
    for item in pids:
        vm, pid = item.split(":")
        lab.vm(vm).run(f"kill {int(pid)}")
    lab.host(PEER, "ip xfrm state flush; ip xfrm policy flush")
    lab.router("ip xfrm state flush; ip xfrm policy flush")


@pytest.mark.parametrize("name", list(CASES))
def test_child_sa_carries_lan_traffic_as_esp(lab: Lab, clean: list[str], name: str) -> None:
    """Install with XfrmDatapath, mirror by hand, ping + HTTP from the LAN: ESP only, counted."""
    case = CASES[name]
    spec = make_spec(case, 0xC1000000 + 16 * list(CASES).index(name))
    blob = json.dumps(spec)
    installed = guest(lab, "install", blob)
    assert installed["reqid"] != 0
    lab.host(PEER, peer_commands(case, spec)).check()
    if case.get("encap"):
        pid = (
            lab.host(PEER, natt_socket_world(spec["remote"], spec["local"]))
            .check()
            .stdout.split()[-1]
        )
        clean.append(f"world:{pid}")
        pid = (
            lab.router(
                "setsid python3 /lab/xfrm_guest.py natt-socket 120 >/dev/null 2>&1 </dev/null & "
                "echo $!"
            )
            .check()
            .stdout.split()[-1]
        )
        clean.append(f"router:{pid}")
        lab.router("for i in $(seq 50); do ss -lun | grep -q ':4500 ' && break; sleep 0.1; done")
    with lab.capture_wan(label=f"xfrm-{name}") as cap:
        ping = lab.client(f"ping -c 5 -i 0.2 -W 3 {spec['remote']}", timeout=30)
        page = lab.client(f"curl -s -m 10 http://{spec['remote']}/", timeout=30)
    assert ping.ok, f"{name}: ping through the Child SA failed:\n{ping.stdout}{ping.stderr}"
    assert f"lab host {PEER}" in page.stdout, f"{name}: HTTP through the Child SA failed"
    state = lab.router("ip -s xfrm state").check().stdout
    counters = guest(lab, "counters", blob)
    assert counters["out"]["packets"] >= 5 + 3, counters  # 5 pings + the TCP handshake/request
    assert counters["in"]["packets"] >= 5 + 3, counters
    assert counters["in"]["integrity_failures"] == 0 and counters["in"]["replay_errors"] == 0
    assert counters["in_reqid"] == counters["out_reqid"] == installed["reqid"]
    peer = f"host {spec['remote']}"
    if case.get("encap"):
        esp = cap.count(f"{peer} and udp port 4500 and udp[8:4] != 0")
        assert cap.count(f"{peer} and esp") == 0, "NAT-T SA sent raw ESP"
        assert "encap type espinudp sport 4500 dport 4500" in state
    else:
        esp = cap.count(f"{peer} and esp")
    assert esp >= 2 * (5 + 3), f"{name}: {esp} ESP packets on WAN"
    leaks = cap.count(f"{peer} and (icmp or tcp)")
    assert leaks == 0, f"{name}: cleartext on WAN:\n{cap.text(peer)}"
    if case.get("integ"):
        assert "auth-trunc hmac(sha256)" in state and " 128\n" in state  # RFC 4868, not 96
    # ESN changes the ICV input (seq-hi), so a one-sided ESN would already have failed the ping
    assert ("flag esn" in state) == bool(case.get("esn")), state
    if case.get("window") == 32:  # a 32-packet window fits the legacy field: no ESN replay attr
        assert "replay-window 32" in state and "anti-replay esn" not in state, state
    removed = guest(lab, "remove", blob)
    assert removed["left"] == 0
    after = lab.router("ip xfrm policy").stdout
    assert spec["remote"] not in after, f"policies left after remove:\n{after}"


def test_allocspi_reserves_the_inbound_spi_that_then_carries_traffic(
    lab: Lab, clean: list[str]
) -> None:
    """ALLOCSPI returns an SPI in our range as a larval state; UPDSA fills it with keys."""
    case = CASES["aes-gcm-256"]
    spec = make_spec(case, 0xC2000000)
    res = guest(lab, "install", json.dumps(spec), "--alloc")
    spi = res["allocated_spi"]
    assert 0xC0000000 <= spi <= 0xCFFFFFFF, hex(spi)
    assert f"spi {spi:#010x}" in res["larval"], res["larval"]  # reserved before the keys exist
    assert "aead" not in res["larval"]
    assert res["in_spi"] == spi
    spec["in_spi"] = spi
    lab.host(PEER, peer_commands(case, spec)).check()
    with lab.capture_wan(label="xfrm-allocspi") as cap:
        lab.client(f"ping -c 3 -i 0.2 -W 3 {spec['remote']}", timeout=30).check()
    assert cap.count(f"esp and src {spec['remote']} and ip[20:4] = {spi}") >= 3
    counters = guest(lab, "counters", json.dumps(spec))
    assert counters["in"]["packets"] >= 3


def test_soft_and_hard_expire_events_arrive(lab: Lab, clean: list[str]) -> None:
    """Soft expiry (rekey now) then hard expiry (gone) for both SAs, from the kernel's timers."""
    spec = make_spec(CASES["aes-gcm-256"], 0xC3000000)
    spec["lifetime"] = {"soft_seconds": 2, "hard_seconds": 4}
    res = guest(lab, "expire", json.dumps(spec), "7", timeout=60)
    events = [e for e in res["events"] if e["type"] == "Expire"]
    for spi in (spec["in_spi"], spec["out_spi"]):
        mine = [e for e in events if e["spi"] == spi]
        soft = [e for e in mine if not e["hard"]]
        hard = [e for e in mine if e["hard"]]
        assert soft and hard, f"spi {spi:#x}: events {mine} (all: {res['events']})"
        assert 1.5 <= soft[0]["t"] < hard[0]["t"] <= 6.5, mine
    assert res["left"] == [], f"SAs still in the kernel after hard expiry: {res['left']}"
