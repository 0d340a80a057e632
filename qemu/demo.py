"""`make demo`: boot the lab, turn oe-routerd on, visit every destination from the LAN client,
and print what the WAN wire showed for each one.

This file is the I/O: it boots the lab, waits until the daemon's services have reported,
runs the scenario, and records the evidence (captures' ESP/clear/IKE counts per address,
the DNS answers, the final `oe status --json` taken AFTER the scenario, `oe offload --json`,
the kernel SAs' algorithm names). demo_report.report() turns that record into the text;
every verdict comes from it, none from a document taken before the services reported.
The record is saved as demo-inputs.json in the run directory (``--record PATH`` copies it).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import build
import demo_report
import oelab
from demo_report import DemoInputs, Visit
from lab import Host, Lab, LabError
from labkit import world
from oe_router.control import Status

#: s for the lab to boot and its world hosts to start: Lab's default (120 s) is short when
#: other QEMU labs share the machine's two cores (world start.sh ran to 117 s of uptime).
START_TIMEOUT = 300.0
READY_TIMEOUT = 60.0  # s for the services to report after the control socket answers
#: The parts of `oe offload --json` the report reads (its engines are the status's own).
OFFLOAD_KEYS = ("offload", "phase", "proposal", "kernel_proposal", "kernel_usable",
                "kernel_checked")  # fmt: skip


def wait_ready(lab: Lab, first: dict[str, Any], problems: list[str], source: bool) -> None:
    """Poll `oe status` until the services have reported (demo_report.not_ready), so the
    scenario starts on a working daemon; a daemon that never gets there is a problem."""
    doc, deadline = first, time.monotonic() + READY_TIMEOUT
    while True:
        try:
            waiting = demo_report.not_ready(Status.from_json(doc))
        except (KeyError, TypeError, ValueError) as exc:
            waiting = f"unreadable status ({exc})"
        if not waiting:
            return
        if time.monotonic() > deadline:
            problems.append(f"oe-routerd not ready {READY_TIMEOUT:.0f}s after start: {waiting}")
            return
        time.sleep(0.5)
        res = oelab.oe(lab, "status --json", source, timeout=20)
        if res.ok:
            doc = json.loads(res.stdout)


#: The demo visits each destination by name, so the outcome to expect is the name's in the
#: lab's DNS plan (a name proven to have no IPSECKEY goes clear at once: `oe.dns.keyless
#: pass`, the default), else the host's own (which is the outcome by address).
BY_NAME = {n.name: n.expected for n in world.dns_names()}


def visit(lab: Lab, h: Host) -> Visit:
    with lab.capture_wan(label=f"demo-{h.netns}") as cap:
        dig = lab.client(f"dig +time=5 +tries=1 {h.name} A", timeout=30)
        # IPv4: the evidence below is counted by the host's IPv4 address (the lab's
        # libreswan peers do OE over IPv4 only), so the fetch must not wander off to IPv6.
        page = lab.client(f"curl -4 -s -m 15 http://{h.name}/", timeout=30)
    a = h.ipv4
    rcode, answer = demo_report.parse_dig(dig.stdout)
    return Visit(
        name=h.name or h.netns,
        netns=h.netns,
        address=a,
        expected=BY_NAME.get(h.name or "", h.expected),
        dns_status=rcode,
        dns_answer=answer,
        fetched=f"lab host {h.netns}" in page.stdout,
        esp=cap.count(f"host {a} and (esp or (udp port 4500 and udp[8:4] != 0))"),
        clear=cap.count(f"host {a} and tcp port 80"),
        ike=cap.count(f"host {a} and (udp port 500 or (udp port 4500 and udp[8:4] = 0))"),
    )


def collect(lab: Lab, visits: list[Visit], problems: list[str], source: bool) -> DemoInputs:
    """The final status (after the scenario), offload, kernel SAs: the report's inputs."""
    status: dict[str, Any] | None = None
    error = ""
    res = oelab.oe(lab, "status --json", source, timeout=20)
    if res.ok:
        status = json.loads(res.stdout)
    else:
        error = f"`oe status --json` exited {res.rc}: {(res.stderr or res.stdout).strip()}"
    off = oelab.oe(lab, "offload --json", source, timeout=20)  # older daemons lack it
    offload = (
        {k: v for k, v in json.loads(off.stdout).items() if k in OFFLOAD_KEYS} if off.ok else None
    )
    sas = demo_report.kernel_sa_algorithms(lab.router("ip xfrm state").stdout)
    return DemoInputs(
        visits=tuple(visits),
        status=status,
        offload=offload,
        kernel_sas=sas,
        lab_problems=tuple(problems),
        status_error=error,
    )


def scenario(lab: Lab, args: argparse.Namespace) -> None:
    """Daemon on, wait until ready, visit every named destination, record, report."""
    problems = list(lab.missing)
    problems += [f"world host {ns} failed to start: {t}" for ns, t in lab.failed_hosts.items()]
    try:
        first = oelab.start_daemon(lab, local_id="@router.example.test", source=args.source)
    except LabError as exc:
        problems.append(str(exc))
    else:
        wait_ready(lab, first, problems, args.source)
    dests = [h for h in lab.hosts if h.name and h.expected != "infra"]
    visits = [visit(lab, h) for h in dests]
    inputs = collect(lab, visits, problems, args.source)
    text = json.dumps(inputs.to_json(), indent=1, sort_keys=True) + "\n"
    (lab.run_dir / "demo-inputs.json").write_text(text)
    if args.record:
        args.record.write_text(text)
    print(demo_report.report(inputs))
    if any(v.esp and v.clear for v in visits):
        lab.collect_artifacts(build.REPO / "test-results" / "artifacts" / "demo")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--record", type=Path, help="also write the report's inputs (JSON) here")
    ap.add_argument(
        "--source",
        action="store_true",
        help="run oe-routerd from this checkout's src/ (9p) instead of the image's package",
    )
    args = ap.parse_args(argv)
    t0 = time.monotonic()
    images = build.build_all(log=lambda m: print(f"[build] {m}", flush=True))
    lab = Lab(images, log=lambda m: print(f"[lab] {m}", flush=True), keep_run_dir=True)
    try:
        lab.start(timeout=START_TIMEOUT)
        scenario(lab, args)
    except LabError as exc:
        print(f"demo: the lab failed: {exc}", file=sys.stderr)
        return 1
    finally:
        lab.close()
    print(f"\n(demo took {time.monotonic() - t0:.0f}s; pcaps, logs and demo-inputs.json "
          f"are in {lab.run_dir})")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
