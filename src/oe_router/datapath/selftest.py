"""End-to-end ESP self-test of the kernel datapath: real datagrams through a real SA pair.

Why: a known-answer test through AF_ALG proves a driver on test vectors, not that XFRM and
that driver carry real ESP. SafeXcel on OpenWrt 25.12 passed its KATs and silently dropped
AES-GCM ESP (openwrt/openwrt#21310). So before the kernel datapath proposes a transform,
the router installs a Child SA pair with it (our own XfrmDatapath) between two throw-away
network namespaces joined by a veth pair, sends UDP datagrams of several sizes each way,
and checks that every one arrives byte for byte, that both SAs counted them and that only
ESP crossed the wire.

The namespaces are anonymous: this process holds them by file descriptor and never names
them in /run/netns, so when the descriptors close (at the end, on an error, on
cancellation, or when the process is killed) the kernel destroys them with their veth pair,
SAs and policies. Nothing in the caller's namespace (its XFRM state, policies, routes,
links) is read or written.

The pure parts (transform mapping, plans, frame classification, the verdict) are separate
from the blocking part (``_Bench``), which runs in a worker thread with a deadline; each
transform's result is handed over as soon as it is known (``on_result``), so the first
transform can be offered while the others still run.

``SelfTestGate`` is the sans-IO bookkeeping the daemon's ESP offer keeps on top: which
transforms passed on the driver the kernel picks now, which are due again (the pick moved,
a priority was lowered), in which order to test them (docs/offload.md, "The kernel
datapath").
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import functools
import ipaddress
import os
import re
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import field, replace
from typing import Final

from pyroute2.netlink.exceptions import NetlinkError

from oe_router.datapath.base import (
    ChildSaCounters,
    ChildSaSpec,
    DatapathError,
    EncrAlgorithm,
    IntegAlgorithm,
    IPAddress,
    Mode,
    NatTEncap,
    SaKeys,
    encr_algorithm,
    integ_algorithm,
)
from oe_router.netns import in_netns
from oe_router.offload.engine import TRANSFORMS, Transform
from oe_router.records import record

__all__ = [
    "DEFAULT_VARIANTS",
    "SIZES",
    "GateRow",
    "SelfTestGate",
    "SelfTestPlan",
    "SelfTestResult",
    "Variant",
    "demotion_targets",
    "esp_selftest",
    "esp_selftest_all",
    "kernel_picks",
    "plan_selftest",
    "run_selftest",
    "summary",
    "xfrm_algorithms",
]

#: Inner UDP payload sizes: an ACK-sized, a middle and a near-MTU datagram.
SIZES: Final = (64, 512, 1400)
PORT: Final = 5201  # inside the private namespaces only
NATT_PORT: Final = 4500
ADDR_A: Final = ipaddress.IPv4Address("192.0.2.1")  # TEST-NET-1, private namespaces only
ADDR_B: Final = ipaddress.IPv4Address("192.0.2.2")
# Room for the largest datagram plus tunnel-mode ESP-in-UDP overhead (about 110 bytes):
# the test is about the crypto, not path-MTU handling.
VETH_MTU: Final = 1600
ETH_P_ALL: Final = 0x0003
PACKET_OUTGOING: Final = 4
SOL_PACKET: Final = 263
PACKET_STATISTICS: Final = 6
SO_RCVBUFFORCE: Final = 33
CLONE_NEWNET: Final = 0x40000000
_HDR: Final = struct.Struct(">BI")  # direction (0 A->B, 1 B->A), index
_POLL: Final = 0.05  # how often a waiting worker looks at its stop flag
QUIET: Final = 1.0  # a flow is over when nothing arrived for this long (seconds)
GRACE = 2.0  # beyond the plans' own deadlines: set-up, and a worker stuck in the kernel


@record(frozen=True)
class Variant:
    """How the SA pair carries ESP: the mode, and UDP encapsulation (RFC 3948) or not."""

    mode: Mode
    encap: bool

    @property
    def name(self) -> str:
        return self.mode.value + ("+udp" if self.encap else "")


#: Tunnel mode with plain ESP, transport mode with ESP in UDP: both outer layouts OE uses,
#: and two different offsets of the ESP header in the packet a driver gets.
DEFAULT_VARIANTS: Final = (Variant(Mode.TUNNEL, False), Variant(Mode.TRANSPORT, True))


@record(frozen=True)
class SelfTestResult:
    """The verdict on one transform. ``sent``/``received`` count datagrams over both
    directions and all variants; ``driver`` is the kernel's pick for the transform's AEAD
    name while the SAs existed (None if it could not be read). ``seconds`` is the time the
    transform took; the first of a run also carries setting up the namespaces."""

    transform: str
    passed: bool
    sent: int
    received: int
    corrupted: int
    detail: str
    driver: str | None = None
    seconds: float = 0.0
    #: the self-test could not run at all (no namespaces or veth, stopped before the bench
    #: existed): it says nothing about the driver either way
    inconclusive: bool = False


@record(frozen=True)
class SelfTestPlan:
    """One SA pair to test: the specs as each namespace sees them and the datagrams.

    ``spec_a`` is installed in namespace A (local = A), ``spec_b`` in B; normally each is
    the other's mirror. Key material stays out of the repr.
    """

    transform: str
    variant: Variant
    spec_a: ChildSaSpec = field(repr=False)
    spec_b: ChildSaSpec = field(repr=False)
    a_to_b: tuple[bytes, ...] = field(repr=False)
    b_to_a: tuple[bytes, ...] = field(repr=False)
    port: int = PORT


@record(frozen=True)
class Flow:
    """One direction's datagrams: handed to the kernel, refused by it (sendto failed in
    the ESP output path), arrived at the other namespace, and arrived altered."""

    sent: int = 0
    refused: int = 0
    arrived: int = 0
    altered: int = 0
    error: str = ""  # the first refusal's errno

    @property
    def transmitted(self) -> int:
        return self.sent - self.refused


@record(frozen=True)
class Observation:
    """What the worker saw for one plan (the input of ``judge``)."""

    variant: str
    ab: Flow = Flow()
    ba: Flow = Flow()
    counters_a: ChildSaCounters | None = None
    counters_b: ChildSaCounters | None = None
    wire_esp: int = 0
    wire_clear: int = 0
    wire_lost: int = 0  # frames the capture itself dropped (not the datapath)
    error: str | None = None


# --- pure parts ---------------------------------------------------------------------------
def xfrm_algorithms(t: Transform) -> tuple[EncrAlgorithm, IntegAlgorithm | None]:
    """The kernel datapath's algorithms for an offload transform (strongSwan keyword).

    DatapathError when the two tables disagree about key, salt or ICV sizes: proposing a
    transform the self-test ran with other sizes would prove nothing.
    """
    encr = encr_algorithm(t.ike_encr)
    integ = integ_algorithm(t.ike_integ) if t.ike_integ is not None else None
    problems = []
    if t.cipher_key_len * 8 not in encr.key_bits:
        problems.append(f"{t.cipher_key_len * 8}-bit key not in {encr.ike_name}'s sizes")
    if t.salt_len * 8 != encr.salt_bits:
        problems.append(f"salt {t.salt_len * 8} bits, {encr.ike_name} has {encr.salt_bits}")
    if t.is_aead != encr.aead:
        problems.append(f"AEAD mismatch with {encr.ike_name}")
    if t.is_aead and t.icv_len * 8 != encr.icv_bits:
        problems.append(f"ICV {t.icv_len * 8} bits, {encr.ike_name} has {encr.icv_bits}")
    if integ is not None and (
        t.auth_key_len * 8 != integ.key_bits or t.icv_len * 8 != integ.trunc_bits
    ):
        problems.append(f"integrity key/ICV sizes differ from {integ.ike_name}")
    if problems:
        raise DatapathError(f"ESP transform {t.name}: " + "; ".join(problems))
    return encr, integ


def transform_named(name: str) -> Transform:
    try:
        return TRANSFORMS[name]
    except KeyError:
        known = ", ".join(TRANSFORMS)
        raise DatapathError(f"ESP self-test: unknown transform {name!r} (known: {known})") from None


def _mirror(spec: ChildSaSpec) -> ChildSaSpec:
    """The same Child SA as the peer installs it."""
    return replace(
        spec,
        local=spec.remote,
        remote=spec.local,
        inbound=spec.outbound,
        outbound=spec.inbound,
        local_ts=spec.remote_ts,
        remote_ts=spec.local_ts,
        encap=None
        if spec.encap is None
        else NatTEncap(spec.encap.remote_port, spec.encap.local_port),
    )


def _payloads(
    direction: int, count: int, sizes: Sequence[int], rng: Callable[[int], bytes]
) -> tuple[bytes, ...]:
    out = []
    for i in range(count):
        size = sizes[i % len(sizes)]
        head = _HDR.pack(direction, i)
        out.append(head + rng(max(0, size - len(head))))
    return tuple(out)


def plan_selftest(
    transform: str,
    *,
    variant: Variant = DEFAULT_VARIANTS[0],
    packets: int = 12,
    sizes: Sequence[int] = SIZES,
    rng: Callable[[int], bytes] = os.urandom,
) -> SelfTestPlan:
    """A plan with fresh random keys, SPIs and payloads: ``packets`` datagrams each way,
    sizes taken in turn from ``sizes``."""
    if packets < 1:
        raise DatapathError(f"ESP self-test of {transform}: needs at least one datagram")
    t = transform_named(transform)
    encr, integ = xfrm_algorithms(t)

    def keys() -> SaKeys:
        spi = 0x100 + int.from_bytes(rng(4), "big") % 0xFFFFFE00
        return SaKeys(spi, rng(t.encr_key_len), rng(t.auth_key_len) if integ else b"")

    inbound = keys()
    outbound = keys()
    while outbound.spi == inbound.spi:
        outbound = keys()
    spec_a = ChildSaSpec(
        local=ADDR_A,
        remote=ADDR_B,
        inbound=inbound,
        outbound=outbound,
        encr=encr,
        integ=integ,
        mode=variant.mode,
        encap=NatTEncap(NATT_PORT, NATT_PORT) if variant.encap else None,
    )
    return SelfTestPlan(
        transform=t.name,
        variant=variant,
        spec_a=spec_a,
        spec_b=_mirror(spec_a),
        a_to_b=_payloads(0, packets, sizes, rng),
        b_to_a=_payloads(1, packets, sizes, rng),
    )


def classify_frame(frame: bytes, port: int = PORT) -> str:
    """An Ethernet frame seen on the veth -> "esp", "clear" (a test datagram in the clear)
    or "other" (ARP, IPv6 neighbour traffic, anything else)."""
    if len(frame) < 34 or frame[12:14] != b"\x08\x00":
        return "other"
    ip = frame[14:]
    ihl = (ip[0] & 0x0F) * 4
    proto = ip[9]
    if proto == 50:
        return "esp"
    if proto != 17 or len(ip) < ihl + 8:
        return "other"
    sport, dport = struct.unpack_from(">HH", ip, ihl)
    if NATT_PORT in (sport, dport):
        marker = ip[ihl + 8 : ihl + 12]  # RFC 3948: a zero non-ESP marker is IKE, not ESP
        return "esp" if len(marker) == 4 and marker != b"\0\0\0\0" else "other"
    return "clear" if port in (sport, dport) else "other"


def _sa_lines(counters: ChildSaCounters | None, who: str, out: Flow, into: Flow) -> list[str]:
    """Problems the kernel's own SA counters show (``out`` leaves this side, ``into`` is
    the other side's flow towards it)."""
    if counters is None:
        return []
    lines = []
    if counters.outbound.packets < out.transmitted:
        lines.append(
            f"{who}'s outbound SA counted {counters.outbound.packets} packets for "
            f"{out.transmitted} sent: datagrams did not go through ESP"
        )
    fails = counters.inbound.integrity_failures
    if fails:
        lines.append(
            f"{who}'s inbound SA counted {fails} integrity failures (the ICV did not verify: "
            "the driver's output or the keys are wrong)"
        )
    elif counters.inbound.packets < into.transmitted:
        lines.append(
            f"{who}'s inbound SA accepted {counters.inbound.packets} of {into.transmitted} packets"
        )
    return lines


def _flow_lines(flow: Flow, who: str) -> list[str]:
    lines = []
    if flow.refused:
        lines.append(
            f"{who}: the kernel refused {flow.refused} of {flow.sent} datagrams ({flow.error}) "
            "in the ESP output path: the driver failed to encrypt"
        )
    if flow.arrived < flow.transmitted:
        lines.append(f"{who}: {flow.arrived} of {flow.transmitted} datagrams arrived")
    if flow.altered:
        lines.append(f"{who}: {flow.altered} arrived altered")
    return lines


def judge_one(obs: Observation) -> tuple[bool, str]:
    """One variant's verdict and the sentence that explains it."""
    if obs.error is not None:
        return False, f"{obs.variant}: {obs.error}"
    problems = _flow_lines(obs.ab, "A->B") + _flow_lines(obs.ba, "B->A")
    problems += _sa_lines(obs.counters_a, "A", obs.ab, obs.ba)
    problems += _sa_lines(obs.counters_b, "B", obs.ba, obs.ab)
    if obs.wire_clear:
        problems.append(f"{obs.wire_clear} test datagrams crossed the wire in the clear")
    expected = obs.ab.transmitted + obs.ba.transmitted
    if obs.wire_esp + obs.wire_lost < expected:
        problems.append(f"{obs.wire_esp} ESP frames on the wire for {expected} datagrams sent")
    if problems:
        return False, f"{obs.variant}: " + "; ".join(problems)
    return True, (
        f"{obs.variant}: {obs.ab.sent}+{obs.ba.sent} datagrams intact, "
        f"{obs.wire_esp} ESP frames and no cleartext on the wire"
    )


def judge(
    transform: str, observations: Sequence[Observation], *, driver: str | None, seconds: float
) -> SelfTestResult:
    """The verdict over all variants: passed only if every variant passed."""
    verdicts = [judge_one(o) for o in observations]
    passed = bool(verdicts) and all(ok for ok, _ in verdicts)
    detail = "; ".join(text for _, text in verdicts) or "nothing was tested"
    if not passed:
        detail = "; ".join(text for ok, text in verdicts if not ok) or detail
    return SelfTestResult(
        transform=transform,
        passed=passed,
        sent=sum(o.ab.sent + o.ba.sent for o in observations),
        received=sum(o.ab.arrived + o.ba.arrived for o in observations),
        corrupted=sum(o.ab.altered + o.ba.altered for o in observations),
        detail=detail,
        driver=driver,
        seconds=seconds,
    )


# --- the blocking part (worker thread) ----------------------------------------------------
class _Stopped(Exception):
    """The deadline passed or the caller went away."""


def _new_netns() -> int:
    """A new anonymous network namespace, as an open descriptor; the calling thread stays
    where it was (in_netns restores the namespace it had on entry, whatever the body did)."""
    libc = ctypes.CDLL(None, use_errno=True)
    with in_netns("/proc/thread-self/ns/net"):
        if libc.unshare(CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(
                err,
                f"unshare(CLONE_NEWNET): {os.strerror(err)}; the self-test needs network "
                "namespaces (CONFIG_NET_NS) and CAP_SYS_ADMIN",
            )
        return os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)


def _kernel_pick(name: str) -> str | None:
    from oe_router.offload.procfs import drivers_for, read_proc_crypto

    picks = drivers_for(read_proc_crypto(), name)
    return picks[0].driver if picks else None


class _Bench:
    """Two namespaces and a veth pair; SA pairs come and go on it, one plan at a time."""

    def __init__(self, stop: threading.Event) -> None:
        self._stop = stop
        self._fds: list[int] = []
        self._loop = asyncio.new_event_loop()

    def close(self) -> None:
        """Drop the namespaces (the kernel takes the veth pair and what is left with them)."""
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()
        self._loop.close()

    def ns(self, side: int) -> str:
        return f"/proc/self/fd/{self._fds[side]}"

    def check(self, deadline: float) -> None:
        if self._stop.is_set():
            raise _Stopped("cancelled")
        if time.monotonic() >= deadline:
            raise _Stopped("timed out")

    def setup(self) -> None:
        """Namespaces A and B, veth st0 (A, 192.0.2.1) <-> st1 (B, 192.0.2.2), both up."""
        from pyroute2.iproute.linux import IPRoute

        for _ in (0, 1):
            self._fds.append(_new_netns())
        iprs: list[IPRoute] = []
        try:
            for side in (0, 1):
                with in_netns(self.ns(side)):
                    iprs.append(IPRoute())
            ipr_a, ipr_b = iprs
            try:
                ipr_a.link(
                    "add",
                    ifname="st0",
                    kind="veth",
                    peer={"ifname": "st1", "net_ns_fd": self._fds[1]},
                )
            except NetlinkError as exc:
                raise OSError(
                    exc.code,
                    f"creating the veth pair failed ({os.strerror(exc.code)}): the self-test "
                    "needs veth (kmod-veth on OpenWrt)",
                ) from None
            for ipr, ifname, addr in ((ipr_a, "st0", ADDR_A), (ipr_b, "st1", ADDR_B)):
                idx = ipr.link_lookup(ifname=ifname)[0]
                ipr.link("set", index=idx, mtu=VETH_MTU)
                ipr.addr("add", index=idx, address=str(addr), prefixlen=24)
                ipr.link("set", index=idx, state="up")
        finally:
            for ipr in iprs:
                ipr.close()

    # -- one plan --
    def run(self, plan: SelfTestPlan, deadline: float) -> tuple[Observation, str | None]:
        from oe_router.datapath.kernel import XfrmDatapath

        name = plan.variant.name
        self.check(deadline)
        dps: list[XfrmDatapath] = []
        installed: list[tuple[XfrmDatapath, ChildSaSpec]] = []
        socks: list[socket.socket] = []
        try:
            for side in (0, 1):
                dps.append(XfrmDatapath(netns=self.ns(side), reason="ESP self-test"))
            for dp, spec in zip(dps, (plan.spec_a, plan.spec_b), strict=True):
                try:
                    installed.append((dp, self._loop.run_until_complete(dp.install_child_sa(spec))))
                except DatapathError as exc:
                    return Observation(name, error=f"installing the SA pair failed: {exc}"), None
            self.check(deadline)
            driver = _kernel_pick(TRANSFORMS[plan.transform].aead)
            udp = [self._sockets(side, plan, socks) for side in (0, 1)]
            wire = _Wire([self._tap(side, socks) for side in (0, 1)], plan.port)
            ab = self._flow(udp[0], udp[1], ADDR_B, plan.port, plan.a_to_b, deadline, wire)
            ba = self._flow(udp[1], udp[0], ADDR_A, plan.port, plan.b_to_a, deadline, wire)
            wire.drain()
            (dp_a, spec_a), (dp_b, spec_b) = installed
            obs = Observation(
                name,
                ab=ab,
                ba=ba,
                counters_a=dp_a.read_counters(spec_a),
                counters_b=dp_b.read_counters(spec_b),
                wire_esp=wire.esp,
                wire_clear=wire.clear,
                wire_lost=wire.lost(),
            )
            return obs, driver
        finally:
            for s in socks:
                s.close()
            # remove by SPI before close(): close() would otherwise dump every SA to find them
            for dp, spec in installed:
                with contextlib.suppress(Exception):
                    self._loop.run_until_complete(dp.remove_child_sa(spec))
            for dp in dps:
                with contextlib.suppress(Exception):
                    self._loop.run_until_complete(dp.close())

    def _sockets(self, side: int, plan: SelfTestPlan, socks: list[socket.socket]) -> socket.socket:
        """The side's test socket, plus its ESP-in-UDP socket when the variant wants one."""
        from oe_router.datapath.kernel import bypass_socket, enable_esp_in_udp

        addr = str((ADDR_A, ADDR_B)[side])
        with in_netns(self.ns(side)):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            socks.append(s)
            if plan.variant.encap:
                n = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                socks.append(n)
        s.bind((addr, plan.port))
        s.setblocking(False)
        if plan.variant.encap:
            n.bind((addr, NATT_PORT))
            # as the IKE endpoint does: the in-policy is checked on the outer UDP packet
            # before decapsulation, and the SA's selector covers it
            bypass_socket(n)
            enable_esp_in_udp(n)
        return s

    def _tap(self, side: int, socks: list[socket.socket]) -> socket.socket:
        """A packet socket on the side's veth: what it puts on the wire."""
        with in_netns(self.ns(side)):
            tap = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
            socks.append(tap)
        with contextlib.suppress(OSError):
            tap.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 1 << 20)
        tap.bind((f"st{side}", 0))
        tap.setblocking(False)
        return tap

    def _flow(
        self,
        tx: socket.socket,
        rx: socket.socket,
        dst: IPAddress,
        port: int,
        payloads: tuple[bytes, ...],
        deadline: float,
        wire: _Wire,
    ) -> Flow:
        """Send every payload, then collect until all arrived or a quiet second passed.
        A datagram counts as arrived once, by its index; anything else that arrives is
        counted as altered."""
        expected = {_HDR.unpack_from(p)[1]: p for p in payloads}
        seen: set[int] = set()
        refused = altered = 0
        error = ""
        for p in payloads:
            self.check(deadline)
            try:
                self._sendto(tx, p, (str(dst), port), deadline)
            except OSError as exc:  # the ESP output path refused it (driver error, no SA)
                refused += 1
                error = error or _errno_text(exc)
            wire.drain()
        quiet_until = min(deadline, time.monotonic() + QUIET)
        while len(seen) + altered < len(payloads) - refused:
            self.check(deadline)
            now = time.monotonic()
            if now >= quiet_until:
                break
            ready, _, _ = select.select([rx], [], [], min(_POLL, quiet_until - now))
            wire.drain()
            if not ready:
                continue
            while True:
                try:
                    data = rx.recv(65535)
                except BlockingIOError:
                    break
                quiet_until = min(deadline, time.monotonic() + QUIET)
                idx = _HDR.unpack_from(data)[1] if len(data) >= _HDR.size else -1
                if expected.get(idx) == data and idx not in seen:
                    seen.add(idx)
                else:
                    altered += 1
        return Flow(len(payloads), refused, len(seen) + altered, altered, error)

    def _sendto(
        self, tx: socket.socket, data: bytes, dst: tuple[str, int], deadline: float
    ) -> None:
        while True:
            try:
                tx.sendto(data, dst)
                return
            except BlockingIOError:
                self.check(deadline)
                select.select([], [tx], [], _POLL)


class _Wire:
    """Counts what the namespaces put on their veths: ESP frames, cleartext test datagrams.

    Only outgoing frames: on the receiving side a tunnel-mode SA re-injects the decrypted
    inner packet on the same device, which a packet socket also sees as incoming.
    """

    def __init__(self, taps: list[socket.socket], port: int) -> None:
        self._taps = taps
        self._port = port
        self.esp = 0
        self.clear = 0

    def drain(self) -> None:
        for tap in self._taps:
            while True:
                try:
                    frame, addr = tap.recvfrom(65535)
                except BlockingIOError:
                    break
                if addr[2] != PACKET_OUTGOING:
                    continue
                kind = classify_frame(frame, self._port)
                self.esp += kind == "esp"
                self.clear += kind == "clear"

    def lost(self) -> int:
        """Frames the kernel dropped for the packet sockets (receive buffer full)."""
        lost = 0
        for tap in self._taps:
            with contextlib.suppress(OSError):
                _packets, drops = struct.unpack(
                    "=II", tap.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8)
                )
                lost += drops
        return lost


def _errno_text(exc: OSError) -> str:
    code = errno.errorcode.get(exc.errno or 0, str(exc.errno))
    return f"{code}: {exc.strerror}" if exc.strerror else code


def _run_blocking(
    plans: Sequence[SelfTestPlan],
    timeout: float,
    stop: threading.Event,
    emit: Callable[[SelfTestResult], None] | None = None,
) -> list[SelfTestResult]:
    """Every plan on one bench; plans of the same transform make one result, handed to
    ``emit`` (from this thread) as soon as the transform's last plan is done."""
    order: list[str] = []
    obs: dict[str, list[Observation]] = {}
    drivers: dict[str, str | None] = {}
    spent: dict[str, float] = {}
    last = {p.transform: i for i, p in enumerate(plans)}
    results: list[SelfTestResult] = []
    start = time.monotonic()
    bench = _Bench(stop)
    try:
        try:
            bench.check(start + timeout)
            bench.setup()
        except _Stopped as exc:
            why = f"{exc} before the test namespaces existed"
            return [_failed(t, why, inconclusive=True) for t in dict.fromkeys(last)]
        except (OSError, NetlinkError) as exc:
            why = f"could not build the test namespaces and veth pair: {exc}"
            return [_failed(t, why, inconclusive=True) for t in dict.fromkeys(last)]
        setup_time = time.monotonic() - start
        for i, plan in enumerate(plans):
            if plan.transform not in obs:
                order.append(plan.transform)
                obs[plan.transform] = []
                spent[plan.transform] = setup_time if not spent else 0.0
            t0 = time.monotonic()
            deadline = t0 + timeout
            try:
                o, driver = bench.run(plan, deadline)
            except _Stopped as exc:
                if stop.is_set():
                    break  # the caller is gone: nobody reads the rest
                o, driver = Observation(plan.variant.name, error=f"{exc} after {timeout:g}s"), None
            except (OSError, DatapathError) as exc:
                o, driver = Observation(plan.variant.name, error=str(exc)), None
            obs[plan.transform].append(o)
            drivers.setdefault(plan.transform, driver)
            if driver is not None:
                drivers[plan.transform] = driver
            spent[plan.transform] += time.monotonic() - t0
            if last[plan.transform] == i:
                t = plan.transform
                result = judge(t, obs[t], driver=drivers.get(t), seconds=round(spent[t], 3))
                results.append(result)
                if emit is not None:
                    emit(result)
    finally:
        bench.close()
    return results


def _failed(transform: str, detail: str, *, inconclusive: bool = False) -> SelfTestResult:
    return SelfTestResult(transform, False, 0, 0, 0, detail, inconclusive=inconclusive)


# --- the asyncio API -------------------------------------------------------------------------
async def run_selftest(
    plans: Sequence[SelfTestPlan],
    *,
    timeout: float = 10.0,
    on_result: Callable[[SelfTestResult], None] | None = None,
) -> list[SelfTestResult]:
    """Run plans in a worker thread, on one pair of namespaces; one result per transform.

    ``timeout`` bounds each plan; the whole call returns within about
    ``timeout * len(plans)`` plus set-up even if the kernel stalls (results then say so).
    Cancelling the call stops the worker at its next check (every 50 ms), and it removes
    what it built. ``on_result`` is called on the event loop with each transform's
    result as soon as it is known (the first transform need not wait for the last), and
    once more for every transform the worker never finished.
    """
    if not plans:
        return []
    stop = threading.Event()
    loop = asyncio.get_running_loop()
    seen: dict[str, SelfTestResult] = {}

    def deliver(result: SelfTestResult) -> None:
        if result.transform in seen:
            return
        seen[result.transform] = result
        if on_result is not None:
            on_result(result)

    def from_worker(result: SelfTestResult) -> None:
        if not stop.is_set():  # after a timeout or cancellation nobody waits for it
            deliver(result)

    if on_result is None:
        work = loop.run_in_executor(None, _run_blocking, list(plans), timeout, stop)
    else:

        def emit(result: SelfTestResult) -> None:  # on the worker thread
            loop.call_soon_threadsafe(from_worker, result)

        worker = functools.partial(_run_blocking, emit=emit)
        work = loop.run_in_executor(None, worker, list(plans), timeout, stop)
    limit = timeout * (len(plans) + 1) + GRACE
    transforms = list(dict.fromkeys(p.transform for p in plans))
    try:
        results = await asyncio.wait_for(asyncio.shield(work), limit)
    except TimeoutError:
        results = [
            seen.get(t) or _failed(t, f"the self-test did not finish within {limit:g}s")
            for t in transforms
        ]
        stop.set()
    except asyncio.CancelledError:
        stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait({work}, timeout=1.0)  # let the worker remove what it built
        raise
    await asyncio.sleep(0)  # deliveries the worker scheduled before it returned
    for r in results:
        deliver(r)
    return results


async def esp_selftest(
    transform: str,
    *,
    packets: int = 12,
    timeout: float = 10.0,
    variants: Sequence[Variant] = DEFAULT_VARIANTS,
) -> SelfTestResult:
    """Push ``packets`` datagrams each way through a fresh SA pair of ``transform``
    (a TRANSFORMS keyword) per variant; passed only if all arrive intact over ESP."""
    plans = [plan_selftest(transform, variant=v, packets=packets) for v in variants]
    return (await run_selftest(plans, timeout=timeout))[0]


async def esp_selftest_all(
    transforms: Sequence[str] | None = None,
    *,
    packets: int = 12,
    timeout: float = 10.0,
    variants: Sequence[Variant] = DEFAULT_VARIANTS,
    on_result: Callable[[SelfTestResult], None] | None = None,
) -> dict[str, SelfTestResult]:
    """The self-test of each transform (default: every TRANSFORMS entry), on one bench,
    in the order given; ``on_result`` hears of each as soon as it is done."""
    names = list(transforms) if transforms is not None else list(TRANSFORMS)
    plans = [plan_selftest(t, variant=v, packets=packets) for t in names for v in variants]
    results = await run_selftest(plans, timeout=timeout, on_result=on_result)
    return {r.transform: r for r in results}


# --- the gate: which transforms the kernel datapath may offer (sans-IO) -----------------
def kernel_picks(
    transforms: Iterable[str] = TRANSFORMS, *, proc_crypto: str = "/proc/crypto"
) -> dict[str, str | None]:
    """The kernel's pick for each transform's AEAD now (what a new XFRM SA would get),
    None where /proc/crypto lists none yet (a template the kernel builds on first use).
    Blocking (reads /proc/crypto once): call it in a thread."""
    from oe_router.offload.procfs import drivers_for, read_proc_crypto

    algs = read_proc_crypto(proc_crypto)
    out: dict[str, str | None] = {}
    for name in transforms:
        t = TRANSFORMS.get(name)
        if t is not None:
            found = drivers_for(algs, t.aead)
            out[name] = found[0].driver if found else None
    return out


def demotion_targets(driver: str) -> tuple[str, ...]:
    """The registered drivers whose priority to lower so the kernel stops picking
    ``driver``: the driver itself, or for a template instance the drivers it is built on,
    last named first ("authenc(hmac(sha256-generic),virtio_crypto_aes_cbc)" ->
    virtio_crypto_aes_cbc, then sha256-generic). Lowering a driver makes the kernel
    rebuild the instances on it (crypto_user.set_priority); lowering the instance itself
    would not keep its template from building it again."""
    if "(" not in driver:
        return (driver,) if driver else ()
    leaves = [m.group(1) for m in re.finditer(r"([^(),]+)(?=[),]|$)", driver)]
    return tuple(dict.fromkeys(reversed([x.strip() for x in leaves if x.strip()])))


@record(frozen=True)
class GateRow:
    """One transform as the gate sees it (``oe offload``, ``oe status``).

    ``state``: ``pending`` (not tested yet), ``running``, ``passed``, ``failed``,
    ``inconclusive`` (the bench could not be built: says nothing about the driver),
    ``untestable`` (no self-test for this transform: it keeps its KAT verdict alone).
    ``stale``: the kernel's pick moved since ``result``; ``note`` says why it runs again.
    """

    transform: str
    state: str
    result: SelfTestResult | None = None
    stale: bool = False
    note: str = ""
    at: float | None = None


class SelfTestGate:
    """Which ESP transforms the kernel datapath may offer, by their end-to-end self-test.

    Sans-IO: the caller tells it what it wants offered (``want``), what the kernel
    picks now (``picks``) and what changed (``invalidate``); it answers which
    transforms to test next (``next_batch``, the preferred first) and which may be
    offered (``allows``). A transform may be offered once a self-test passed on the
    driver the kernel picks now: untested, running for the first time, failed, or tested
    on another driver than today's pick (``stale``) all keep it out. Two exceptions,
    both still gated by the known-answer tests: a transform the self-test has no plan for
    (``untestable``), and an ``inconclusive`` result (the bench itself could not run).
    """

    def __init__(self) -> None:
        self._order: tuple[str, ...] = ()
        self._results: dict[str, SelfTestResult] = {}
        self._at: dict[str, float] = {}
        self._seen: dict[str, str | None] = {}  # the pick last observed (or tested on)
        self._due: dict[str, str] = {}  # transform -> why it (re)runs
        self._running: set[str] = set()
        self._stale: set[str] = set()

    def want(self, transforms: Iterable[str]) -> None:
        """The transforms to offer, preferred first: each is tested once before it is."""
        self._order = tuple(dict.fromkeys(transforms))
        for t in self._order:
            if t in TRANSFORMS and t not in self._results and t not in self._running:
                self._due.setdefault(t, "not tested yet")

    def picks(self, picks: Mapping[str, str | None]) -> tuple[str, ...]:
        """The kernel's pick per transform now. A transform whose pick moved since it was
        tested (or last looked at) is stale (not offered) and due again; returns those."""
        moved = []
        for t, driver in picks.items():
            if t not in self._results or t in self._running:
                continue
            before = self._seen.get(t)
            self._seen[t] = driver
            if driver == before:
                continue
            if t not in self._stale:
                moved.append(t)
            self._stale.add(t)
            self._due.setdefault(
                t,
                f"the kernel's pick moved from {before or 'an unknown driver'} "
                f"to {driver or 'a driver it builds on first use'}",
            )
        return tuple(moved)

    def invalidate(self, transforms: Iterable[str], why: str) -> None:
        """Test these again (a driver's priority changed): not offered until then."""
        for t in transforms:
            if t in TRANSFORMS:
                self._due[t] = why
                if t in self._results:
                    self._stale.add(t)

    def _rank(self) -> dict[str, int]:
        """The preferred order: what ``want`` was given, then every other transform."""
        return {t: i for i, t in enumerate(dict.fromkeys((*self._order, *TRANSFORMS)))}

    def next_batch(self) -> tuple[str, ...]:
        """The due transforms not running yet, preferred first; they are running now."""
        rank = self._rank()
        batch = sorted((t for t in self._due if t not in self._running), key=rank.__getitem__)
        for t in batch:
            del self._due[t]
            self._running.add(t)
        return tuple(batch)

    def finished(self, result: SelfTestResult, now: float) -> None:
        t = result.transform
        self._running.discard(t)
        self._results[t] = result
        self._at[t] = now
        # a pick seen before stays the reference: a move during the test is caught by the
        # next ``picks``, and a driver name read differently never retests in a loop
        self._seen.setdefault(t, result.driver)
        if t not in self._due:  # not invalidated again while it ran
            self._stale.discard(t)

    def interrupted(self, transforms: Iterable[str]) -> None:
        """A batch stopped before these had results: they are due again."""
        for t in transforms:
            if t in self._running:
                self._running.discard(t)
                self._due.setdefault(t, "interrupted")

    @property
    def busy(self) -> bool:
        """Tests are due or running: an empty offer may still fill."""
        return bool(self._due or self._running)

    def result(self, transform: str) -> SelfTestResult | None:
        return self._results.get(transform)

    def allows(self, transform: str) -> bool:
        if transform not in TRANSFORMS:
            return True
        r = self._results.get(transform)
        if r is None or transform in self._stale:
            return False
        return r.passed or r.inconclusive

    def failed(self) -> dict[str, SelfTestResult]:
        """Transforms whose latest self-test failed on the driver the kernel still picks."""
        return {
            t: r
            for t, r in self._results.items()
            if not r.passed and not r.inconclusive and t not in self._stale
        }

    def rows(self) -> tuple[GateRow, ...]:
        rank = self._rank()
        names = sorted(
            {*self._order, *self._results, *self._due, *self._running},
            key=lambda t: rank.get(t, len(rank)),
        )
        out = []
        for t in names:
            r = self._results.get(t)
            if t not in TRANSFORMS:
                state = "untestable"
            elif t in self._running:
                state = "running"
            elif r is None:
                state = "pending"
            elif r.inconclusive:
                state = "inconclusive"
            else:
                state = "passed" if r.passed else "failed"
            note = self._due.get(t, "")
            out.append(GateRow(t, state, r, t in self._stale, note, self._at.get(t)))
        return tuple(out)


def summary(result: SelfTestResult) -> str:
    """One line for the log and ``oe offload``."""
    verdict = "passed" if result.passed else "FAILED"
    on = f" on {result.driver}" if result.driver else ""
    return (
        f"ESP self-test {result.transform}{on}: {verdict} ({result.received}/{result.sent} "
        f"datagrams, {result.seconds:.2f}s): {result.detail}"
    )
