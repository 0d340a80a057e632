"""IKE SAs per second with both sides installing what they negotiate: ours vs charon, same run.

``ike_sa_per_s_one_core`` (bench_ike.py) compares our handshakes, which hand their
Child SAs to nobody, with charon's, which install each one into kernel-libipsec: an
unfair 2.2x. Here both sides install. Each Child SA of ours goes through the real
datapath's ``install_child_sa`` on both ends (initiator and responder), the way the
daemon does it (``oe/sa_spec.child_sa_spec`` -> ``Datapath.install_child_sa``), and a
handshake counts once the initiator's install is through, as charon's vici ``initiate``
returns once its CHILD_SA is installed. The run's wall time also waits for the
responder's last installs.

Which datapath, and why the userspace one: kernel XFRM in a netns would be the closest
match, but this host's kernel has no ESP (``ip xfrm state add ... proto esp`` fails with
"Requested type not found"/"AEAD algorithm not found"; only policies are accepted), so
nothing real could be installed there, and the QEMU router is not ours to use in a
bench run. The userspace datapath (``datapath/userspace.py``) is the exact counterpart
of charon's kernel-libipsec: both keep the ESP SAs in userspace (ours in two worker
processes, which acknowledge each install), route the peer into a TUN device and keep
their own SPD; ours also projects the SPD into nftables as the daemon does.

Same shape as charon's side of bench_ike: two network namespaces joined by a veth,
IKE from one namespace to the other, ESP in UDP (``force_udp_encap``, as
kernel-libipsec needs), identical host-to-host selectors for every Child SA (so both
stacks find the policies in place after the first one and refresh them), nothing
deleted during the run (charon deletes nothing either). Pinning: this process, its
datapath workers and any nft it runs on one CPU, as charon's two daemons share one
CPU; charon's vici driver runs on the other one (it is not part of charon's work).

The same run also measures today's unfair pair (bench_ike's ``_ours`` loop on
loopback, installing nothing, against the same charon figure), so the report shows the
fair ratio next to the unfair one; and a cProfile of a short installing phase says
where our install time goes (``install_profile_top``).
"""

from __future__ import annotations

import asyncio
import contextlib
import cProfile
import ipaddress
import os
import pstats
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from bench.bench_ike import ESP_SPEC, IKE_SPEC, SECONDS, WARMUP, WINDOW, _charon, _cpu_of, _cpus
from bench.bench_ike import _ours as _ours_plain
from bench.run import Result, Unavailable
from oe_router.ike.constants import IdType
from oe_router.ike.endpoint import IkeEndpoint, SaHandle
from oe_router.ike.events import ChildSaEstablished, Event, IkeSaFailed
from oe_router.ike.payloads import TrafficSelector
from oe_router.ike.sa import IkeSaConfig

A, B = "10.0.19.1", "10.0.19.2"
PROFILE_SECONDS = 2.0
BASELINE_NAME = "charon<->charon 5.9.8 (kernel-libipsec, installing each Child SA), one CPU"


# --------------------------------------------------------------------------- bookkeeping


@dataclass
class Tally:
    """What one phase of the installing run counted (sans-IO, so it can be unit-tested).

    ``done``: handshakes whose initiator-side install went through (one IKE SA each);
    the responder's installs are counted apart and must keep up: the phase ends only
    when none is pending, so a lagging responder costs wall time, as it costs charon.
    """

    stop_at: float
    done: int = 0
    failed: int = 0
    responder_installed: int = 0
    responder_failed: int = 0
    pending_initiator: int = 0
    pending_responder: int = 0
    install_ms: dict[str, list[float]] = field(default_factory=lambda: {"ini": [], "res": []})

    def child_up(self, side: str) -> None:
        if side == "ini":
            self.pending_initiator += 1
        else:
            self.pending_responder += 1

    def installed(self, side: str, ok: bool, ms: float) -> None:
        if side == "ini":
            self.pending_initiator -= 1
            if ok:
                self.done += 1
            else:
                self.failed += 1
        else:
            self.pending_responder -= 1
            if ok:
                self.responder_installed += 1
            else:
                self.responder_failed += 1
        if ok:
            self.install_ms[side].append(ms)

    def handshake_failed(self) -> None:
        self.failed += 1

    def start_another(self, now: float) -> bool:
        """A slot of the window came free: start a new handshake only before the end."""
        return now < self.stop_at

    def finished(self, in_flight: int) -> bool:
        """Over once nothing is negotiating or installing on either side."""
        return in_flight == 0 and self.pending_initiator == 0 and self.pending_responder == 0

    def medians(self) -> dict[str, float]:
        return {
            f"{side}_install_ms_median": round(statistics.median(v), 3) if v else float("nan")
            for side, v in self.install_ms.items()
        }


def fair_result(
    installing: dict[str, Any], plain: dict[str, float], charon: dict[str, float]
) -> Result:
    """The JSON of the fair comparison, with today's unfair ratio of the same run beside it."""
    ours_rate = installing["done"] / installing["wall"]
    plain_rate = plain["done"] / plain["wall"]
    charon_rate = charon["done"] / charon["wall"]
    extra: dict[str, Any] = {
        "unfair_ratio_same_run": round(plain_rate / charon_rate, 4),
        "unfair_ours_not_installing": round(plain_rate, 1),
        "datapath": "userspace-esp (SaTable + 2 worker processes, TUN routes, SPD + nft "
        "projection); kernel XFRM has no ESP on this host",
        "auth": "ECDSA P-256 both ways, DH group 19, AES_GCM_16_256/PRF_HMAC_SHA2_256",
        "in_flight": WINDOW,
        "seconds": SECONDS,
        "ours_handshakes": installing["done"],
        "ours_failed": installing["failed"],
        "ours_responder_installs": installing["responder_installed"],
        "ours_responder_install_failures": installing["responder_failed"],
        "charon_handshakes": charon["done"],
        "charon_failed": charon["failed"],
        "ours_cpu_ms_per_handshake": round(1000 * installing["cpu"] / installing["done"], 3),
        "ours_cpu_split_ms": {
            k: round(1000 * v / installing["done"], 3) for k, v in installing["cpu_split"].items()
        },
        "charon_cpu_ms_per_handshake": round(1000 * charon["cpu"] / charon["done"], 3),
        **installing["medians"],
        "install_profile_top": installing.get("profile", []),
        "note": "both sides install every Child SA they negotiate (SAs + policies + route); "
        "nothing is deleted during the run",
    }
    return Result(
        name="ike_sa_per_s_installing",
        unit="IKE SAs/s",
        ours=round(ours_rate, 1),
        baseline=round(charon_rate, 1),
        baseline_name=BASELINE_NAME,
        goal=">= 1.0",
        extra=extra,
    )


# --------------------------------------------------------------------------- ours, installing


def _children_cpu() -> dict[int, float]:
    """CPU seconds of this process's live children (the datapath workers) by pid."""
    me, out = os.getpid(), {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == me:
                out[int(d.name)] = _cpu_of(int(d.name))
    return out


def _cpu_now() -> dict[str, float]:
    t = os.times()
    return {
        "process": time.process_time(),
        "reaped_children": t.children_user + t.children_system,  # nft, ip netns exec
        "workers": sum(_children_cpu().values()),
    }


def _ts(addr: str) -> tuple[TrafficSelector, ...]:
    a = ipaddress.ip_address(addr)
    return (TrafficSelector.from_range(a, a),)


async def _installing_phases(ns_a: str, ns_b: str, wan_a: str, wan_b: str) -> dict[str, Any]:
    from oe_router.datapath.base import DatapathError
    from oe_router.datapath.userspace import UserspaceDatapath
    from oe_router.oe.sa_spec import child_sa_spec

    ka, kb = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    dps = {
        "ini": UserspaceDatapath(wan_ifname=wan_a, netns=ns_a, keep_persistent_on_stop=False),
        "res": UserspaceDatapath(wan_ifname=wan_b, netns=ns_b, keep_persistent_on_stop=False),
    }
    tally = Tally(stop_at=0.0)
    finished = asyncio.Event()
    tasks: set[asyncio.Task[None]] = set()
    eps: dict[str, IkeEndpoint] = {}
    cfg: IkeSaConfig | None = None
    installed: dict[str, list[Any]] = {"ini": [], "res": []}

    def check_end() -> None:
        if tally.finished(len(eps["ini"].handles())):
            finished.set()

    async def install(side: str, spec: Any) -> None:
        t0 = time.perf_counter()
        ok = True
        try:
            installed[side].append(await dps[side].install_child_sa(spec))
        except DatapathError:
            ok = False
        tally.installed(side, ok, 1000 * (time.perf_counter() - t0))
        if side == "ini" and tally.start_another(time.monotonic()):
            assert cfg is not None
            eps["ini"].initiate(cfg)
        check_end()

    def on_child(side: str, local: str, remote: str) -> Callable[[SaHandle, Event], None]:
        def handler(h: SaHandle, ev: Event) -> None:
            if isinstance(ev, ChildSaEstablished):
                ep = eps[side]
                spec = child_sa_spec(ev, local, remote, local_natt_port=ep.natt_port)
                tally.child_up(side)
                ep.forget(h)
                task = asyncio.get_running_loop().create_task(install(side, spec))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            elif isinstance(ev, IkeSaFailed):
                eps[side].forget(h)
                if side == "ini":
                    tally.handshake_failed()
                    if tally.start_another(time.monotonic()):
                        assert cfg is not None
                        eps["ini"].initiate(cfg)
                    check_end()

        return handler

    def policy(local: tuple[str, int], remote: tuple[str, int]) -> IkeSaConfig:
        return IkeSaConfig(local, remote, _ts(B), _ts(A), ike_proposals=(IKE_SPEC,),
                           esp_proposals=(ESP_SPEC,), local_id=(IdType.ID_FQDN, b"b.example"),
                           private_key=kb, peer_public_key=ka.public_key(),
                           force_udp_encap=True)  # fmt: skip

    started: list[Any] = []
    try:
        for dp in dps.values():
            await dp.start()
            started.append(dp)
            await dp.release_adopted(lambda _p: True)  # the projection goes live, as at start
        eps["ini"] = IkeEndpoint([A], on_event=on_child("ini", A, B), clock=time.monotonic,
                                 netns=ns_a, socket_hooks=(dps["ini"],))  # fmt: skip
        eps["res"] = IkeEndpoint([B], on_event=on_child("res", B, A), responder_policy=policy,
                                 clock=time.monotonic, netns=ns_b, socket_hooks=(dps["res"],),
                                 half_open_limit=10 * WINDOW,
                                 cookie_threshold=10 * WINDOW)  # fmt: skip
        for ep in eps.values():
            await ep.start()
        cfg = IkeSaConfig((A, 500), (B, 500), _ts(A), _ts(B), ike_proposals=(IKE_SPEC,),
                          esp_proposals=(ESP_SPEC,), local_id=(IdType.ID_FQDN, b"a.example"),
                          private_key=ka, peer_public_key=kb.public_key(),
                          force_udp_encap=True)  # fmt: skip
        out: dict[str, Any] = {}
        for phase, length in (("warmup", WARMUP), ("run", SECONDS), ("profile", PROFILE_SECONDS)):
            tally = Tally(stop_at=time.monotonic() + length)
            finished.clear()
            prof = cProfile.Profile() if phase == "profile" else None
            c0, t0 = _cpu_now(), time.monotonic()
            if prof is not None:
                prof.enable()
            for _ in range(WINDOW):
                eps["ini"].initiate(cfg)
            async with asyncio.timeout(length + 60):
                await finished.wait()
            if prof is not None:
                prof.disable()
                out["profile"] = _profile_top(prof)
            wall, c1 = time.monotonic() - t0, _cpu_now()
            await _clear(dps, installed)  # untimed: the datapath's 1,023-SA table stays free
            if phase == "run":
                split = {k: c1[k] - c0[k] for k in c0}
                out.update(done=tally.done, failed=tally.failed, wall=wall,
                           responder_installed=tally.responder_installed,
                           responder_failed=tally.responder_failed, cpu=sum(split.values()),
                           cpu_split=split, medians=tally.medians())  # fmt: skip
        return out
    finally:
        for ep in eps.values():
            await ep.stop()
        for dp in started:
            await dp.close()


async def _clear(dps: dict[str, Any], installed: dict[str, list[Any]]) -> None:
    """Between phases: every Child SA out again (so a long run never fills the table)."""
    for side, specs in installed.items():
        for spec in specs:
            await dps[side].remove_child_sa(spec)
        specs.clear()


def _profile_top(prof: cProfile.Profile, n: int = 12) -> list[str]:
    """Own time of the busiest functions, and the cumulative time of the install path."""
    stats: dict[Any, Any] = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    total = sum(v[2] for v in stats.values()) or 1.0
    top = sorted(stats.items(), key=lambda kv: -kv[1][2])[:n]
    lines = [f"own {Path(k[0]).name}:{k[2]} {100 * v[2] / total:.1f}%" for k, v in top]
    for k, v in stats.items():
        if k[2] in {"install_child_sa", "install", "project", "run_nft", "route_ref"} and (
            "datapath" in k[0]
        ):
            lines.append(f"cum {Path(k[0]).name}:{k[2]} {v[1]} calls {1000 * v[3]:.1f} ms")
    return lines


def _ours_installing(cpu: int) -> dict[str, Any]:
    try:
        from tests.host.charon import Netns
        from tests.host.oe_daemon import device_with
    except ImportError as exc:
        raise Unavailable(f"tests.host helpers not importable: {exc}") from None
    if os.geteuid() != 0:
        raise Unavailable("needs root (network namespaces, TUN, nftables)")
    old = os.sched_getaffinity(0)
    net = Netns("f")
    try:
        na, nb = net.add("a"), net.add("b")
        net.link(na, f"{A}/24", nb, f"{B}/24")
        os.sched_setaffinity(0, {cpu})  # before the workers start: they inherit it
        return asyncio.run(
            _installing_phases(na, nb, device_with(na, A), device_with(nb, B)),
        )
    finally:
        os.sched_setaffinity(0, old)
        net.close()


# --------------------------------------------------------------------------- entry


def run() -> list[Result]:
    peer_cpu, driver_cpu = _cpus()
    plain = _ours_plain(peer_cpu)
    installing = _ours_installing(peer_cpu)
    theirs = _charon(peer_cpu, driver_cpu)
    if installing["failed"] or not installing["done"] or installing["responder_failed"]:
        raise Unavailable(f"our installing handshakes failed: {installing}")
    if plain["failed"] or not plain["done"]:
        raise Unavailable(f"our handshakes failed: {plain}")
    if not theirs["done"]:
        raise Unavailable(f"charon handshakes all failed: {theirs}")
    return [fair_result(installing, plain, theirs)]


if __name__ == "__main__":
    for r in run():
        print(r.to_json())
