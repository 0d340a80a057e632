"""Per engine, per ESP transform: AF_ALG by driver vs cryptodev vs software vs the kernel's pick.

BOOTS THE QEMU LAB (router + an idle world VM, no world hosts; about 2-3 min under TCG).

The router VM (-cpu max: AES-NI; a virtio-crypto device: ``virtio_crypto_aes_cbc`` at
priority 150 under AES-NI's 400 for ``cbc(aes)``) loads ``cryptodev`` (the image's
cryptodev-linux build: /dev/crypto) and ``crypto_user``, then runs the project's own
offload code as the daemon does: ``probe.discover`` finds the engines (software, afalg =
the kernel's default pick, afalg:virtio_crypto_aes_cbc, cryptodev), ``kat.run_kat``
proves each engine x transform with the full vectors and forgeries, and
``measure.measure_engine`` times sealing at 64, 512 and 1400 bytes (inner packet size),
engines interleaved transform by transform so they share the VM's drift, in two passes
whose faster figure counts (a TCG guest on a shared host has slow moments). Last, with
virtio's priority raised over AES-NI's through ``offload.crypto_user`` (restored after),
``cryptodev:virtio_crypto_aes_cbc`` is proven and measured too: /dev/crypto cannot ask
for a driver, so this is the only way virtio is reached through it. That engine is
reported, but not offered to the chooser: discovery never lists it (the daemon does not
move priorities to reach an engine).

One Result per transform: ours = Mbit/s at 1400 bytes of the engine
``chooser.choose("auto", ...)`` picks for 1400-byte packets from these KAT verdicts and
measurements; baseline = the kernel's default pick (engine ``afalg``) in the same run.
Every engine x size figure, the KAT verdicts, the drivers and the chooser's bands are in
the JSON.

THESE ARE NOT HARDWARE NUMBERS. Under QEMU's TCG every instruction is emulated, AES-NI
included, and the virtio-crypto device is QEMU's own software backend behind an emulated
virtqueue: it is slower than the CPU here at every size, where a real engine (EIP93,
SafeXcel, CAAM) can win on big packets. What this measures is the same-run comparison
between the engines, and whether the chooser notices which one is fastest and never
picks one slower than the kernel's own choice.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bench.run import Result, Unavailable
from oe_router.offload.chooser import MAX_SIZE, Verdict, choose
from oe_router.offload.engine import TRANSFORMS
from oe_router.offload.measure import SIZES, Measurement

REPO = Path(__file__).resolve().parents[1]
VIRTIO = "virtio_crypto_aes_cbc"
DURATION = 0.5  # seconds per engine x transform x size and pass (fastest of 3 rounds)
PASSES = 2  # interleaved passes over all engines; the fastest pass per case counts
KERNEL_PICK = "afalg"
BULK = 1400

# Runs inside the router VM with the image's oe_router; the last stdout line is JSON.
# Nothing here holds key material beyond the KAT vectors' and measure's random keys,
# and none of it is printed.
GUEST = r'''
import json, os, sys, time
from oe_router.offload import make_engine
from oe_router.offload import crypto_user
from oe_router.offload.engine import TRANSFORMS
from oe_router.offload.kat import run_kat
from oe_router.offload.measure import SIZES, measure_engine
from oe_router.offload.probe import discover, probe_host

VIRTIO = "virtio_crypto_aes_cbc"
duration, passes = float(sys.argv[1]), int(sys.argv[2])


def describe(engine):
    """Transforms the engine runs here, their drivers, and why it runs no others."""
    ts = engine.transforms()
    why = {}
    for t in TRANSFORMS.values():
        if t in ts:
            continue
        if hasattr(engine, "why_not"):
            why[t.name] = engine.why_not(t)
        elif hasattr(engine, "unavailable"):
            why[t.name] = engine.unavailable().get(t.name, "")
    return ts, {
        "kind": engine.kind.value,
        "drivers": {t.name: engine.driver(t) for t in ts},
        "unavailable": why,
    }


def prove(engine, ts):
    out = {}
    for t in ts:
        r = run_kat(engine, t)
        out[t.name] = {"passed": r.passed, "cases": r.cases, "driver": r.driver,
                       "failures": list(r.failures[:3]), "failure_count": len(r.failures)}
    return out


def measure(engine, t):
    rep = measure_engine(engine, [t], sizes=SIZES, duration=duration)
    return [m.to_json() for m in rep.measurements], [list(e) for e in rep.errors]


t0 = time.monotonic()
snap = probe_host()
names = [s.name for s in discover(snap)]
engines, info, kat, ms, errors = {}, {}, {}, [], []
for name in names:
    e = make_engine(name)
    ts, info[name] = describe(e)
    kat[name] = prove(e, ts)
    engines[name] = (e, [t for t in ts if kat[name][t.name]["passed"]])
kat_s = time.monotonic() - t0
best = {}
for _ in range(passes):  # interleaved: every engine on one transform, then the next
    for t in TRANSFORMS.values():
        for name, (e, proven) in engines.items():
            if t in proven:
                got, errs = measure(e, t)
                errors += errs
                for m in got:  # the fastest pass counts, as measure's fastest round does
                    key = (m["engine"], m["transform"], m["size"], m["op"])
                    if key not in best or m["ns_per_packet"] < best[key]["ns_per_packet"]:
                        best[key] = m
ms = list(best.values())

# cryptodev reaches virtio only while virtio outranks AES-NI (NETLINK_CRYPTO), restored after
extra = f"cryptodev:{VIRTIO}"
raised = {"engine": extra}
if snap.dev_crypto:
    before = crypto_user.get_alg(VIRTIO).priority
    raised["priority_before"] = before
    crypto_user.set_priority(VIRTIO, 1000)
    try:
        e = make_engine(extra)
        ts, info[extra] = describe(e)
        kat[extra] = prove(e, ts)
        for t in ts:
            if kat[extra][t.name]["passed"]:
                got, errs = measure(e, t)
                ms += got
                errors += errs
    finally:
        crypto_user.set_priority(VIRTIO, before)
    raised["priority_after"] = crypto_user.get_alg(VIRTIO).priority
print(json.dumps({
    "discovered": names, "engines": info, "kat": kat, "measurements": ms,
    "errors": errors, "raised": raised, "dev_crypto": snap.dev_crypto, "afalg": snap.afalg,
    "kat_seconds": round(kat_s, 1), "seconds": round(time.monotonic() - t0, 1),
}))
'''


def guest_run(lab: Any, duration: float = DURATION, passes: int = PASSES) -> dict[str, Any]:
    """cryptodev and crypto_user loaded, then the guest script; its JSON answer."""
    lab.router("modprobe cryptodev && modprobe crypto_user && test -c /dev/crypto").check()
    (lab.run_dir / "offload_bench_guest.py").write_text(GUEST)
    cmd = f"python3 /lab/offload_bench_guest.py {duration} {passes}"
    res = lab.router(cmd, timeout=600).check()
    doc: dict[str, Any] = json.loads(res.stdout.strip().splitlines()[-1])
    return doc


def analyse(doc: Mapping[str, Any]) -> list[Result]:
    """Results from the guest's document: the chooser runs here, on its verdicts and figures.

    A pure function of the document, so the table can be rebuilt from a saved run.
    """
    discovered: Sequence[str] = doc["discovered"]
    if KERNEL_PICK not in discovered:
        raise Unavailable(f"no AF_ALG in the router VM (engines found: {discovered})")
    if "cryptodev" not in discovered:
        raise Unavailable("no /dev/crypto in the router VM after modprobe cryptodev")
    kat: Mapping[str, Mapping[str, Any]] = doc["kat"]
    verdicts = [
        Verdict(e, t, bool(v["passed"]), "; ".join(v["failures"]))
        for e, per in kat.items()
        for t, v in per.items()
    ]
    ms = [Measurement.from_json(m) for m in doc["measurements"]]
    table = choose("auto", list(discovered), verdicts, ms)
    mbit: dict[tuple[str, str, int], float] = {
        (m.engine, m.transform, m.size): m.mbit_s for m in ms if m.op == "seal"
    }
    engines = [*discovered, *(e for e in kat if e not in discovered)]
    out: list[Result] = []
    for t in TRANSFORMS:
        choice = table.choice(t)
        if choice is None or not choice.bands:
            raise Unavailable(f"{t}: no engine passed its known-answer test in the router VM")
        picks = {s: choice.engine_for(s) for s in SIZES}
        ours_engine = picks[BULK]
        rows = {
            e: {str(s): round(mbit[(e, t, s)], 1) for s in SIZES if (e, t, s) in mbit}
            for e in engines
        }
        extra = {
            "transform": t,
            "ours_engine": ours_engine,
            "baseline_engine": KERNEL_PICK,
            "kernel_pick_driver": doc["engines"][KERNEL_PICK]["drivers"].get(t, ""),
            "chooser_picks": {str(s): e for s, e in picks.items()},
            "chooser_bands": [
                {"engine": e, "from": lo, "to": MAX_SIZE if hi is None else hi}
                for e, lo, hi in choice.ranges()
            ],
            "chooser_engines": list(discovered),
            "mbit_s": {e: r for e, r in rows.items() if r},
            "ns_per_packet": {
                e: {
                    str(m.size): round(m.ns_per_packet)
                    for m in ms
                    if m.engine == e and m.transform == t and m.op == "seal"
                }
                for e in engines
                if any(m.engine == e and m.transform == t for m in ms)
            },
            "drivers": {
                e: doc["engines"][e]["drivers"][t]
                for e in engines
                if t in doc["engines"].get(e, {}).get("drivers", {})
            },
            "not_run": {
                e: doc["engines"][e]["unavailable"][t]
                for e in engines
                if t in doc["engines"].get(e, {}).get("unavailable", {})
            },
            "kat": {e: dict(kat[e][t]) for e in engines if t in kat.get(e, {})},
            "measure_errors": [err for err in doc["errors"] if err[0] == t],
            "raised_virtio": doc["raised"],
            "note": (
                "QEMU TCG: emulated CPU and emulated virtio-crypto, not hardware numbers; "
                "the comparison is within this run. cryptodev:virtio_crypto_aes_cbc was "
                "measured with virtio's priority raised and is not offered to the chooser."
            ),
        }
        ours = mbit.get((ours_engine, t, BULK), 0.0)
        base = mbit.get((KERNEL_PICK, t, BULK), 0.0)
        out.append(
            Result(
                f"offload_engines_{t}",
                f"Mbit/s sealed at {BULK} bytes, router VM (QEMU TCG), engine chosen by "
                "offload.chooser",
                round(ours, 1),
                round(base, 1),
                "the kernel's default pick (AF_ALG by algorithm name), same run",
                ">= 1.0 (the chooser never picks slower than the kernel's own choice)",
                extra,
            )
        )
    return out


def table(results: Sequence[Result]) -> str:
    """Every engine x size per transform, the chooser's pick marked with '*'."""
    lines = []
    for r in results:
        x = r.extra
        lines.append(
            f"{x['transform']}  (kernel pick: {x['kernel_pick_driver']}; chooser: "
            + ", ".join(f"{b['engine']} {b['from']}-{b['to']}" for b in x["chooser_bands"])
            + ")"
        )
        for e, row in x["mbit_s"].items():
            kat = x["kat"].get(e, {})
            verdict = f"KAT {'pass' if kat.get('passed') else 'FAIL'} ({kat.get('cases', 0)})"
            cells = []
            for s in ("64", "512", "1400"):
                mark = "*" if x["chooser_picks"].get(s) == e else " "
                cells.append(f"{row.get(s, float('nan')):8.1f}{mark}")
            lines.append(f"  {e:34} {' '.join(cells)}  {verdict}")
        for e, why in x["not_run"].items():
            lines.append(f"  {e:34} not run: {why[:90]}")
    return "\n".join(lines)


def run() -> list[Result]:
    sys.path.insert(0, str(REPO / "qemu"))
    try:
        import build
        from lab import Lab, LabError
    except ImportError as exc:
        raise Unavailable(f"the QEMU lab is not importable: {exc}") from None
    t0 = time.monotonic()
    images = build.build_all(log=lambda m: None)
    t_images = time.monotonic() - t0
    try:
        # The session lab's router: virtio-crypto and -cpu max. No world hosts needed.
        with Lab(images, crypto=True, cpu="max", bundle=False, log=lambda m: None) as lab:
            t1 = time.monotonic()
            doc = guest_run(lab)
            t_guest = time.monotonic() - t1
    except LabError as exc:
        raise Unavailable(f"the lab did not run: {exc}") from None
    results = analyse(doc)
    timing = {
        "images_s": round(t_images, 1),
        "guest_s": round(t_guest, 1),
        "guest_kat_s": doc["kat_seconds"],
        "seconds_per_case": DURATION,
        "passes": PASSES,
        "total_s": round(time.monotonic() - t0, 1),
        "host_load_average_at_end": [round(x, 2) for x in os.getloadavg()],
    }
    for r in results:
        r.extra["timing"] = timing
    print(table(results))
    print(f"bench_offload: {json.dumps(timing)}")
    return results
