"""What the QEMU benchmarks share: booting the lab, and libreswan's pluto on the router as
the baseline doing the same job (lab tooling: the router image carries libreswan only for
these baselines; the product never starts it)."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from bench.run import Unavailable

REPO = Path(__file__).resolve().parents[1]
WAN = "203.0.113.2"  # the router's WAN address in the lab


@contextlib.contextmanager
def booted(hosts: Sequence[str] = (), **lab_args: Any) -> Iterator[Any]:
    """The lab booted from the cached images; ``Unavailable`` when it cannot run or one of
    ``hosts`` (world netns names) did not start."""
    sys.path.insert(0, str(REPO / "qemu"))
    try:
        import build
        from lab import Lab, LabError
    except ImportError as exc:
        raise Unavailable(f"the QEMU lab is not importable: {exc}") from None
    images = build.build_all(log=lambda m: None)
    try:
        with Lab(images, log=lambda m: None, **lab_args) as lab:
            for h in hosts:
                if h in lab.failed_hosts:
                    raise Unavailable(f"{h} did not start: {lab.failed_hosts[h]}")
            yield lab
    except LabError as exc:
        raise Unavailable(f"the lab did not run: {exc}") from None


def libreswan_on_router(lab: Any, policies: Mapping[str, Sequence[str]]) -> float:
    """pluto on the router with libreswan's OE conns for ``policies`` (group -> CIDRs);
    the seconds its start took on the router (NSS checked, pluto spawned, its control
    socket up and every group loaded)."""
    from labkit import peers

    groups = {g: list(cidrs) for g, cidrs in policies.items()}
    d = lab.run_dir / "lsw-router"
    (d / "ipsec.d" / "policies").mkdir(parents=True, exist_ok=True)
    (d / "ipsec.conf").write_text(peers.render_libreswan_conf(WAN, groups))
    (d / "ipsec.secrets").write_text("")
    for g, text in peers.render_policy_files(groups).items():
        (d / "ipsec.d" / "policies" / g).write_text(text)
    res = lab.router(
        "set -e; . /lab/bundle/lib/common.sh; LAB_STATE=/var/lab; "
        "lab_prepare lsw-router /lab/lsw-router; t0=$(date +%s.%N); "
        f"lab_pluto {' '.join(groups)}; echo started $t0 $(date +%s.%N)",
        timeout=90,
    ).check()
    return _seconds(res.stdout)


def _seconds(out: str) -> float:
    """``started T0 T1`` (``date +%s.%N`` on the router) -> T1 - T0."""
    for line in out.splitlines():
        if line.startswith("started "):
            t0, t1 = line.split()[1:3]
            return float(t1) - float(t0)
    raise Unavailable(f"no start time in {out[-300:]!r}")


def daemon_ready_on_router(lab: Any) -> float:
    """Seconds from ``/etc/init.d/oe start`` (procd) to the daemon's ubus object: the daemon
    publishes it once every service has started. The configuration is the one the last
    ``oelab.start_daemon`` installed; the daemon must be stopped."""
    res = lab.router(
        "t0=$(date +%s.%N); /etc/init.d/oe start && ubus -t 60 wait_for oe && "
        "echo started $t0 $(date +%s.%N); pgrep -x oe-routerd > /run/oe-routerd.pid",
        timeout=90,
    ).check()
    return _seconds(res.stdout)


def stop_libreswan_on_router(lab: Any) -> None:
    lab.router(
        "kill $(cat /var/lab/lsw-router/pluto.pid) 2>/dev/null; sleep 1; "
        "ip xfrm state flush; ip xfrm policy flush"
    )
