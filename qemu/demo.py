"""`make demo`: boot the lab, turn oe-routerd on, visit every destination from the LAN client,
and print what the WAN wire showed for each one.

Why evidence and not claims: "protected" is printed only when ESP to that address was captured
on the WAN and no cleartext HTTP was; algorithms come from the router's kernel SAs and from
`oe status`. Whatever part of the product is missing or failed is listed as such.
"""

from __future__ import annotations

import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import build
import oelab
from lab import Host, Lab, LabError


@dataclass
class Visit:
    host: Host
    resolved: str
    fetched: bool
    esp: int
    clear: int
    ike: int

    @property
    def verdict(self) -> str:
        if self.esp and not self.clear:
            return "PROTECTED"
        if self.clear and not self.esp:
            return "clear"
        if self.esp and self.clear:
            return "MIXED (cleartext leaked)"
        return "no traffic"


def kernel_sas(lab: Lab) -> dict[str, set[str]]:
    """Peer address -> ESP algorithms, from the router's `ip xfrm state`."""
    out = lab.router("ip xfrm state").stdout
    sas: dict[str, set[str]] = {}
    for block in re.split(r"\n(?=src )", out):
        m = re.match(r"src (\S+) dst (\S+)", block)
        if not m or "proto esp" not in block:
            continue
        algs = re.findall(r"^\s*(aead|enc|auth-trunc|auth)\s+(\S+)", block, re.M)
        desc = " + ".join(f"{a}" for _, a in algs) or "?"
        for addr in m.groups():
            sas.setdefault(addr, set()).add(desc)
    return sas


def start_daemon(lab: Lab, missing: list[str]) -> dict[str, Any] | None:
    """oe-routerd with identity @router.example.test (key from the world bundle), DNS front
    behind dnsmasq (oelab.start_daemon); None, and the reason in ``missing``, if it fails."""
    try:
        return oelab.start_daemon(lab, local_id="@router.example.test")
    except LabError as exc:
        missing.append(str(exc))
        return None


def visit(lab: Lab, h: Host) -> Visit:
    with lab.capture_wan(label=f"demo-{h.netns}") as cap:
        dig = lab.client(f"dig +short +time=5 +tries=1 {h.name} A | tail -1", timeout=30)
        # IPv4: the evidence below is counted by the host's IPv4 address (the lab's
        # libreswan peers do OE over IPv4 only), so the fetch must not wander off to IPv6.
        page = lab.client(f"curl -4 -s -m 15 http://{h.name}/", timeout=30)
    a = h.ipv4
    return Visit(
        host=h,
        resolved=dig.stdout.strip() or "(no answer)",
        fetched=f"lab host {h.netns}" in page.stdout,
        esp=cap.count(f"host {a} and (esp or (udp port 4500 and udp[8:4] != 0))"),
        clear=cap.count(f"host {a} and tcp port 80"),
        ike=cap.count(f"host {a} and (udp port 500 or (udp port 4500 and udp[8:4] = 0))"),
    )


def gaps(status: dict[str, Any] | None, visits: list[Visit]) -> list[str]:
    """What the status document and the wire say is not there yet."""
    out: list[str] = []
    if status is not None:
        daemon = status.get("daemon", {})
        services = daemon.get("services", [])
        out += [f"oe-routerd runs no {s!r} service" for s in ("ike", "oe") if s not in services]
        if daemon.get("datapath") in (None, "", "none"):
            out.append("datapath: none active in oe-routerd, so no SA can be installed")
        if status.get("dns", {}).get("oe_manager") == "none":
            out.append("DNS front has no OE manager: IPSECKEY answers trigger no tunnel")
    for v in visits:
        if v.host.expected.startswith("protected") and v.verdict != "PROTECTED":
            out.append(f"{v.host.name}: expected {v.host.expected}, the wire shows {v.verdict}")
    return out


def report(lab: Lab, visits: list[Visit], status: dict[str, Any] | None, missing: list[str]) -> str:
    sas = kernel_sas(lab)
    res = lab.router("oe status --json", timeout=20)
    if res.ok:
        status = json.loads(res.stdout)
    tunnels = {
        t["peer"]: t
        for t in (status or {}).get("tunnels", [])
        if t.get("source") == "ike" and t.get("state") == "established"
    }
    lines = ["", "oe-router lab demo: what the LAN client's traffic looked like on the WAN", ""]
    hdr = f"{'destination':<20} {'address':<14} {'result':<10} {'verdict':<12} ESP  clear  IKE"
    lines += [hdr, "-" * len(hdr)]
    for v in visits:
        got = "fetched" if v.fetched else "FAILED"
        lines.append(
            f"{v.host.name or v.host.netns:<20} {v.resolved:<14} {got:<10} {v.verdict:<12} "
            f"{v.esp:>3}  {v.clear:>5}  {v.ike:>3}"
        )
        t = tunnels.get(v.host.ipv4)
        if t:
            esp = ", ".join(c.get("transform", "?") for c in t.get("children", [])) or "-"
            lines.append(
                f"{'':<20} IKE {t.get('transform') or '?'}, auth {t.get('local_auth')}/"
                f"{t.get('remote_auth')} (peer id {t.get('remote_id')}); ESP {esp}"
            )
        if v.host.ipv4 in sas:
            lines.append(f"{'':<20} ESP (router kernel SA): {', '.join(sorted(sas[v.host.ipv4]))}")
        if v.host.expected:
            lines.append(f"{'':<20} world expects: {v.host.expected}")
    lines += ["", "Evidence: packets to/from the address on the router's WAN link "
              "(world side of the cable), ESP = IP proto 50 or UDP-encapsulated ESP."]  # fmt: skip
    lines += ["", "oe status (from the router):"]
    res = lab.router("oe status", timeout=20)
    lines += ["  " + ln for ln in (res.stdout + res.stderr).strip().splitlines()]
    lines += ["", "Missing or not working (said plainly):"]
    lines += [f"  - {m}" for m in missing] or ["  (nothing)"]
    return "\n".join(lines)


def main() -> int:
    t0 = time.monotonic()
    images = build.build_all(log=lambda m: print(f"[build] {m}", flush=True))
    missing: list[str] = []
    try:
        with Lab(images, log=lambda m: print(f"[lab] {m}", flush=True), keep_run_dir=True) as lab:
            missing += lab.missing
            missing += [
                f"world host {ns} failed to start: {t}" for ns, t in lab.failed_hosts.items()
            ]
            status = start_daemon(lab, missing)
            dests = [h for h in lab.hosts if h.name and h.expected != "infra"]
            visits = [visit(lab, h) for h in dests]
            missing += gaps(status, visits)
            print(report(lab, visits, status, missing))
            if any(v.verdict.startswith("MIXED") for v in visits):
                lab.collect_artifacts(build.REPO / "test-results" / "artifacts" / "demo")
    except LabError as exc:
        print(f"demo: the lab failed: {exc}", file=sys.stderr)
        return 1
    print(f"\n(demo took {time.monotonic() - t0:.0f}s; pcaps and logs were in {lab.run_dir})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
