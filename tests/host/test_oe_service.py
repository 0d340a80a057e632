"""The OE service against the real host kernel, in fresh network namespaces.

Topology: netns R (the router, WAN 198.51.100.1 on veth r0) and netns W (the world,
198.51.100.2, with the destinations 203.0.113.7 and 192.0.2.7 on its loopback).
Groups: 192.0.2.0/24 private, 198.18.0.0/15 block, the rest private-or-clear.

The IKE engine is not plugged in here; ``ProbeNegotiator`` (tests/host/probe.py) stands
at that seam. It does what an initiator does first, over the network: it sends a datagram
to the peer's UDP 500 from a socket bypassed from XFRM; W runs no IKE responder, so W's
kernel answers ICMP port unreachable and the negotiation fails for real ("no peer").
Everything else (ACQUIRE, shunts, drops, packets arriving) is the real kernel.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import dns.name
import pytest

from oe_router.datapath.base import (
    ChildSaSpec,
    IPAddress,
    PolicyAction,
    PolicySpec,
    SaKeys,
    encr_algorithm,
)
from oe_router.datapath.kernel import Ownership, XfrmDatapath
from oe_router.datapath.netns import in_netns
from oe_router.dns.ipseckey import KeyKind, PeerKey
from oe_router.oe.actions import ChildRequest, NegotiationResult
from oe_router.oe.service import OeService, kernel_datapath
from tests.aio import run, running
from tests.host.netlab import MakeNetns
from tests.host.netlab import ip as _ip
from tests.host.probe import POC, PORT, PRIV, WAN, ProbeNegotiator, probe_config, probe_service

pytestmark = pytest.mark.host

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def nets(make_netns: MakeNetns) -> tuple[str, str]:
    r, w = make_netns("oe-r"), make_netns("oe-w")
    _ip("-n", r, "link", "add", "r0", "type", "veth", "peer", "name", "w0", "netns", w)
    for ns, dev, addr in ((r, "r0", "198.51.100.1/24"), (w, "w0", "198.51.100.2/24")):
        _ip("-n", ns, "link", "set", dev, "up")
        _ip("-n", ns, "addr", "add", addr, "dev", dev)
    for dst in ("203.0.113.0/24", "192.0.2.0/24", "198.18.0.0/15"):
        _ip("-n", r, "route", "add", dst, "via", "198.51.100.2")
    for addr in (f"{POC}/32", f"{PRIV}/32"):
        _ip("-n", w, "addr", "add", addr, "dev", "lo")
    return r, w


class Receiver:
    """UDP sockets in W on the destinations; collects what arrives."""

    def __init__(self, netns: str, addrs: tuple[str, ...]) -> None:
        self.got: dict[str, list[bytes]] = {a: [] for a in addrs}
        self._socks = []
        for a in addrs:
            with in_netns(netns):
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind((a, PORT))
            s.settimeout(0.05)
            self._socks.append((a, s))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for a, s in self._socks:
                with contextlib.suppress(TimeoutError):
                    self.got[a].append(s.recv(2048))

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        for _, s in self._socks:
            s.close()


def _sender(netns: str) -> socket.socket:
    with in_netns(netns):
        return socket.socket(socket.AF_INET, socket.SOCK_DGRAM)


def _send(s: socket.socket, dst: str, payload: bytes) -> str:
    """Send; returns "sent" or the errno name (a DROP policy makes sendto fail with EPERM)."""
    try:
        s.sendto(payload, (dst, PORT))
    except OSError as exc:
        return os.strerror(exc.errno or 0)
    return "sent"


def _policy(netns: str, dst: str) -> str:
    try:
        return _ip("-n", netns, "-s", "xfrm", "policy", "get", "src", f"{WAN}/32", "dst",
                   f"{dst}/32", "dir", "out")  # fmt: skip
    except subprocess.CalledProcessError:
        return ""


async def _until(pred: object, timeout: float = 5.0) -> float:
    """Wait (letting the service run) until pred() is true; returns the seconds it took."""
    start = time.monotonic()
    while not pred():  # type: ignore[operator]
        if time.monotonic() - start > timeout:
            raise AssertionError("timed out")
        await asyncio.sleep(0.02)
    return time.monotonic() - start


def _xfrm_stat(netns: str) -> dict[str, int]:
    text = subprocess.run(
        ["ip", "netns", "exec", netns, "cat", "/proc/net/xfrm_stat"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return {k: int(v) for k, v in (line.split() for line in text.splitlines() if line.strip())}


def _normal(p: PolicySpec) -> PolicySpec:
    return replace(p, action=PolicyAction.IPSEC) if p.action is PolicyAction.TRAP else p


def test_group_policies_install_and_read_back(nets: tuple[str, str]) -> None:
    r, _ = nets

    async def body() -> None:
        svc, _ = probe_service(r)
        async with running(svc, probe_config()):
            own = Ownership()
            text = _ip("-n", r, "xfrm", "policy")
            mgr = svc.manager
            poc = mgr.table.lookup(ipaddress.ip_address(POC))
            priv = mgr.table.lookup(ipaddress.ip_address(PRIV))
            assert poc is not None and priv is not None
            assert (
                f"src 198.51.100.1/32 dst 0.0.0.0/0 \n\tdir out priority "
                f"{own.kernel_priority(poc.rank, False)}" in text
            )
            assert (
                f"src 198.51.100.1/32 dst 192.0.2.0/24 \n\tdir out priority "
                f"{own.kernel_priority(priv.rank, True)}" in text
            )
            assert "tmpl src 198.51.100.1 dst 0.0.0.0\n\t\tproto esp reqid " in text
            assert "mode transport" in text
            assert "src 0.0.0.0/0 dst 198.18.0.0/15 \n\tdir out action block" in text
            assert "src 198.18.0.0/15 dst 0.0.0.0/0 \n\tdir fwd action block" in text
            assert "dst 9.9.9.9/32 proto udp dport 53 \n\tdir out priority" in text
            assert "dst 192.168.1.0/24 \n\tdir out priority" in text
            dp = XfrmDatapath(netns=r)
            try:
                dumped = {p for _, p in dp.dump_policies() if p is not None}
            finally:
                dp._sock.close()
                dp._events_sock.close()
            assert dumped == {_normal(p) for p in mgr.group_policies()}
            assert svc.status().datapath is not None
            assert svc.status().datapath.startswith("kernel-xfrm")  # type: ignore[union-attr]
        after = _ip("-n", r, "xfrm", "policy")
        assert "dst 192.0.2.0/24" in after  # private: kept at a clean stop
        assert "dst 0.0.0.0/0 \n\tdir out priority" not in after
        assert "198.18.0.0/15" not in after

    asyncio.run(body())


def test_private_or_clear_failure_passes_and_private_failure_drops(nets: tuple[str, str]) -> None:
    r, w = nets
    rx = Receiver(w, (POC, PRIV))
    tx = _sender(r)

    async def body() -> None:
        svc, neg = probe_service(r)
        async with running(svc, probe_config()):
            # private-or-clear: the first packet is trapped (ACQUIRE), the probe finds no
            # IKE responder, a PASS shunt with the configured lifetime appears
            before = _xfrm_stat(r)
            assert _send(tx, POC, b"first") == "sent"
            await _until(lambda: "action allow" in _policy(r, POC))
            # the trapped packet was dropped while the ACQUIRE was pending (larval drop)
            assert _xfrm_stat(r)["XfrmOutNoStates"] - before["XfrmOutNoStates"] == 1
            text = _policy(r, POC)
            assert "expire add: soft 0(sec), hard 900(sec)" in text
            assert [str(q.peer) for q in neg.requests] == [POC]
            assert neg.requests[0].auth.null
            assert _send(tx, POC, b"second") == "sent"
            await _until(lambda: rx.got[POC] == [b"second"])
            (shunt,) = svc.status().shunts
            assert (shunt.destination, shunt.kind) == (f"{POC}/32", "pass")
            assert f"no IKE responder at {POC}:500" in shunt.reason

            # private: a DROP shunt, the packets never arrive
            assert _send(tx, PRIV, b"p1") == "sent"
            await _until(lambda: "action block" in _policy(r, PRIV))
            blocked = _xfrm_stat(r)["XfrmOutPolBlock"]
            assert _send(tx, PRIV, b"p2") == "Operation not permitted"
            assert _xfrm_stat(r)["XfrmOutPolBlock"] == blocked + 1
            # block: never negotiated, dropped by the group policy
            assert _send(tx, "198.18.0.1", b"b") == "Operation not permitted"
            await asyncio.sleep(0.3)
            assert [str(q.peer) for q in neg.requests] == [POC, PRIV]
            assert rx.got[PRIV] == []
            assert {s.kind for s in svc.status().shunts} == {"pass", "drop"}
        # the private drop shunt stays after a clean stop; the pass shunt is gone
        assert "action block" in _policy(r, PRIV)
        assert _policy(r, POC) == ""

    run(body(), tx, rx)
    # the larval drop: the packet that raised the ACQUIRE was lost (xfrm_larval_drop=1)
    assert rx.got[POC] == [b"second"]


def test_shunt_expiry_lets_the_next_packet_negotiate_again(nets: tuple[str, str]) -> None:
    r, _ = nets
    # an ACQUIRE's larval state blocks new ACQUIREs for xfrm_acq_expires (30 s default)
    _ip("netns", "exec", r, "sysctl", "-qw", "net.core.xfrm_acq_expires=1")
    tx = _sender(r)

    async def body() -> None:
        svc, neg = probe_service(r)
        async with running(svc, probe_config(shunt_lifetime=2)):
            _send(tx, POC, b"1")
            await _until(lambda: "action allow" in _policy(r, POC))
            assert "hard 2(sec)" in _policy(r, POC)
            await _until(lambda: _policy(r, POC) == "" and not svc.status().shunts, 6)
            _send(tx, POC, b"2")
            await _until(lambda: len(neg.requests) == 2)
            await _until(lambda: "action allow" in _policy(r, POC))

    run(body(), tx)


SERVICE_RUN = """
import asyncio, sys
from tests.host.probe import probe_config, probe_service
async def main():
    svc, _ = probe_service(sys.argv[1])
    await svc.start(probe_config())
    print("ready", flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""


def test_kill_9_and_restart_private_never_leaks(nets: tuple[str, str]) -> None:
    """SIGKILL the service mid-traffic: private stays blocked; private-or-clear resumes < 5 s."""
    r, w = nets
    rx = Receiver(w, (POC, PRIV))
    tx = _sender(r)
    stop = threading.Event()
    results: list[str] = []

    def blast() -> None:  # a private destination, every 5 ms, across crash and restart
        while not stop.is_set():
            results.append(_send(tx, PRIV, b"secret"))
            time.sleep(0.005)

    def start() -> subprocess.Popen[str]:
        p = subprocess.Popen(
            [sys.executable, "-c", SERVICE_RUN, r], cwd=ROOT, stdout=subprocess.PIPE, text=True
        )
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        return p

    first = start()
    blaster = threading.Thread(target=blast, daemon=True)
    blaster.start()
    try:
        deadline = time.monotonic() + 5
        while "action block" not in _policy(r, PRIV):
            assert time.monotonic() < deadline, "no drop shunt for the private destination"
            time.sleep(0.02)
        _send(tx, POC, b"x")  # gives the first run a pass shunt too
        first.send_signal(signal.SIGKILL)
        assert first.wait() == -signal.SIGKILL
        time.sleep(0.5)  # the daemon is dead for a while
        assert "dst 192.0.2.0/24" in _ip("-n", r, "xfrm", "policy")
        second = start()
        restarted = time.monotonic()
        try:
            # private-or-clear resumes: a packet gets through within 5 s of the restart
            n = 0
            while not any(m.startswith(b"after") for m in rx.got[POC]):
                assert time.monotonic() - restarted < 5, "private-or-clear did not resume"
                _send(tx, POC, b"after%d" % n)
                n += 1
                time.sleep(0.05)
            time.sleep(0.3)
        finally:
            second.send_signal(signal.SIGTERM)
            second.wait(10)
        stop.set()
        blaster.join()
        assert len(results) > 100
        assert rx.got[PRIV] == []  # not one cleartext packet to the private destination
        pol = _ip("-n", r, "xfrm", "policy")
        assert "dst 192.0.2.0/24" in pol  # and the trap outlives the clean stop as well
    finally:
        stop.set()
        if first.poll() is None:
            first.kill()
        tx.close()
        rx.close()


class HandsOutSpecNegotiator(ProbeNegotiator):
    """IKE seam stand-in that "succeeds": returns a Child SA spec with zero keys.

    The IKE engine is not plugged in yet; this exercises the manager's install path
    on the real kernel, which here has no ESP, so the install must fail cleanly.
    """

    def __init__(self, netns: str) -> None:
        super().__init__(netns)
        self.deleted: list[tuple[IPAddress, ChildSaSpec | None]] = []

    async def negotiate(self, request: ChildRequest, now: float) -> NegotiationResult:
        self.requests.append(request)
        spec = ChildSaSpec(
            request.local,
            request.peer,
            SaKeys(0xC0000001, bytes(36)),
            SaKeys(0xC0000002, bytes(36)),
            encr_algorithm(20),
            local_ts=(request.local_ts,),
            remote_ts=(request.remote_ts,),
        )
        return NegotiationResult(spec)

    async def delete(self, peer: IPAddress, child: ChildSaSpec | None) -> None:
        self.deleted.append((peer, child))


def _esp_in_kernel() -> bool:
    return any(os.path.exists(f"/sys/module/{m}") for m in ("esp4", "esp6"))


@pytest.mark.skipif(_esp_in_kernel(), reason="this kernel has ESP; see tests/qemu")
def test_ensure_tunnel_install_fails_on_kernel_without_esp_and_falls_back(
    nets: tuple[str, str],
) -> None:
    r, w = nets
    rx = Receiver(w, (POC,))
    tx = _sender(r)

    async def body() -> None:
        neg = HandsOutSpecNegotiator(r)
        svc = OeService(datapath_factory=kernel_datapath(r), negotiator=neg, wan={4: WAN})
        async with running(svc, probe_config()):
            key = PeerKey(KeyKind.NONE, None, 10, dns.name.from_text("www.example"), 0)
            ok = await asyncio.wait_for(
                svc.ensure_tunnel(
                    dns.name.from_text("www.example"), (ipaddress.ip_address(POC),), key
                ),
                5,
            )
            assert ok is False
            (req,) = neg.requests
            assert req.auth.key == key.public_key
            assert [(str(p), c is not None) for p, c in neg.deleted] == [(POC, True)]
            (shunt,) = svc.status().shunts
            assert shunt.kind == "pass"
            assert "installing the Child SA failed: kernel lacks" in shunt.reason
            assert "action allow" in _policy(r, POC)
            assert _ip("-n", r, "xfrm", "state").strip() == ""  # nothing half-installed
            assert _send(tx, POC, b"clear") == "sent"
            await _until(lambda: rx.got[POC] == [b"clear"])

    run(body(), tx, rx)
