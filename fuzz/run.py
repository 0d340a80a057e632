"""Run fuzz targets under libFuzzer and record what each did: executions, edges, crashes.

Usage::

    python -m fuzz.run [--time S | --runs N | --seeds-only] [--targets a,b] [--results DIR]

Each target runs as its own process (``python -m fuzz.targets.<name>``) over two corpus
directories: a working one first (libFuzzer writes the inputs it finds there; it persists
under ``fuzz/work/`` between runs) and the committed seeds second (read only). libFuzzer's
closing status line ``#N DONE cov: X ft: Y corp: C/S`` and ``-print_final_stats`` give
executions, edges (cov) and features (ft); they land in ``<results>/<target>.json`` next to
the full log. A crash, hang (``-timeout``) or memory blow-up (``-rss_limit_mb``) leaves a
reproducer in ``<results>/crashes/<target>/`` and fails the run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "fuzz" / "corpus"
WORK = ROOT / "fuzz" / "work"
RESULTS = ROOT / "fuzz" / "results"


@dataclass(frozen=True)
class Target:
    name: str
    max_len: int  #: libFuzzer's -max_len: large enough for the biggest meaningful input
    what: str


#: every target, in the order ``make fuzz`` runs them
TARGETS: tuple[Target, ...] = (
    Target("ike_decode", 4096, "IKE datagram decode, payload chains, re-encode round trip"),
    Target("ike_precheck", 2048, "responder precheck (COOKIE, half-open limits) of datagrams"),
    Target("ike_sa", 8192, "a responder IKE SA behind the endpoint, driven through exchanges"),
    Target("dns_wire", 4096, "the front's DNS query/reply readers and TTL rewriting"),
    Target("dns_validate", 16384, "the DNSSEC validator fed crafted upstream replies"),
    Target("uci", 8192, "the UCI parser, writer round trip and config validation"),
    Target("control", 8192, "control protocol request decoding and dispatch"),
)
BY_NAME = {t.name: t for t in TARGETS}

# "#1234\tDONE   cov: 567 ft: 890 corp: 12/3456b lim: 4096 exec/s: 100 rss: 80Mb"
_STATUS = re.compile(
    r"^#(?P<n>\d+)\s+(?P<kind>[A-Z]+)\s+cov: (?P<cov>\d+) ft: (?P<ft>\d+)"
    r"(?: corp: (?P<corp>\d+)/\S+)?(?:.*?exec/s: (?P<eps>\d+))?(?:.*?rss: (?P<rss>\d+)Mb)?"
)
_STAT = re.compile(r"^stat::(?P<key>\w+):\s+(?P<value>\d+)")
_ARTIFACT_PREFIXES = ("crash-", "timeout-", "oom-", "leak-", "slow-unit-")


@dataclass
class Outcome:
    """One target run, as written to ``<results>/<target>.json``."""

    target: str
    ok: bool
    exit_code: int
    seconds: float
    executions: int = 0  #: inputs run (seeds included)
    cov: int = 0  #: edges covered in oe_router code (libFuzzer "cov")
    ft: int = 0  #: features (edges with hit-count buckets, "ft")
    corpus: int = 0  #: inputs in the corpus libFuzzer kept
    seeds: int = 0  #: committed seed inputs
    inited_cov: int = 0  #: edges covered by the seeds alone (the INITED line)
    exec_per_s: int = 0
    peak_rss_mb: int = 0
    artifacts: list[str] = field(default_factory=list)
    flags: list[str] = field(default_factory=list)
    log: str = ""
    source: str = ""  #: the commit fuzzed, "+uncommitted" when src/ had local changes
    python: str = platform.python_version()
    machine: str = f"{platform.machine()} {os.cpu_count()} cpus"


def source_version() -> str:
    """``git`` commit of this checkout, marked when src/ differs from it."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "src"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        return ""
    return head + ("+uncommitted" if dirty else "")


def parse_log(text: str, out: Outcome) -> None:
    """Fill executions, cov, ft and corpus from libFuzzer's status and final-stats lines."""
    for line in text.splitlines():
        m = _STATUS.match(line.strip())
        if m:
            out.executions = max(out.executions, int(m["n"]))
            out.cov, out.ft = int(m["cov"]), int(m["ft"])
            if m["corp"]:
                out.corpus = int(m["corp"])
            if m["eps"]:
                out.exec_per_s = int(m["eps"])
            if m["rss"]:
                out.peak_rss_mb = max(out.peak_rss_mb, int(m["rss"]))
            if m["kind"] == "INITED":
                out.inited_cov = int(m["cov"])
            continue
        s = _STAT.match(line.strip())
        if s and s["key"] == "number_of_executed_units":
            out.executions = max(out.executions, int(s["value"]))
        elif s and s["key"] == "peak_rss_mb":
            out.peak_rss_mb = max(out.peak_rss_mb, int(s["value"]))


def run_target(
    name: str,
    *,
    seconds: int | None = None,
    runs: int | None = None,
    results: Path = RESULTS,
    work: Path = WORK,
    rss_limit_mb: int = 1024,
    timeout: int = 10,
    extra: tuple[str, ...] = (),
) -> Outcome:
    """Run one target; ``seconds`` and ``runs`` both None runs the seed corpus only."""
    target = BY_NAME[name]
    seeds = CORPUS / name
    workdir = work / name
    artifacts = results / "crashes" / name
    for d in (workdir, artifacts):
        d.mkdir(parents=True, exist_ok=True)
    flags = [
        f"-max_len={target.max_len}",
        f"-rss_limit_mb={rss_limit_mb}",
        f"-timeout={timeout}",
        f"-artifact_prefix={artifacts}/",
        "-print_final_stats=1",
    ]
    if seconds is not None:
        flags.append(f"-max_total_time={seconds}")
    if runs is not None or seconds is None:
        flags.append(f"-runs={runs or 0}")
    flags += extra
    before = set(artifacts.iterdir())
    log_path = results / f"{name}.log"
    # this checkout's sources first (not another tree's editable install)
    path = [str(ROOT / "src"), str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path), PYTHONHASHSEED="0")
    start = time.monotonic()
    with log_path.open("w") as log:
        proc = subprocess.run(
            [sys.executable, "-m", f"fuzz.targets.{name}", str(workdir), str(seeds), *flags],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            check=False,
        )
    out = Outcome(name, False, proc.returncode, round(time.monotonic() - start, 1))
    out.flags = flags
    out.source = source_version()
    out.seeds = sum(1 for p in seeds.iterdir() if p.is_file()) if seeds.is_dir() else 0
    out.log = str(log_path.relative_to(ROOT) if log_path.is_relative_to(ROOT) else log_path)
    parse_log(log_path.read_text(errors="replace"), out)
    found = sorted(
        p
        for p in set(artifacts.iterdir()) - before
        if p.name.startswith(_ARTIFACT_PREFIXES) and p.is_file()
    )
    out.artifacts = [str(p) for p in found]
    out.ok = proc.returncode == 0 and not found and out.executions >= out.seeds
    (results / f"{name}.json").write_text(json.dumps(asdict(out), indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fuzz.run", description=__doc__.split("\n")[0])
    how = ap.add_mutually_exclusive_group()
    how.add_argument("--time", type=int, help="seconds of fuzzing per target (after the seeds)")
    how.add_argument("--runs", type=int, help="inputs per target (after the seeds)")
    how.add_argument("--seeds-only", action="store_true", help="run the seed corpus only")
    ap.add_argument("--targets", default="", help="comma-separated names (default: all)")
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--work", type=Path, default=WORK, help="working corpus directories")
    ap.add_argument("--rss-limit-mb", type=int, default=1024)
    ap.add_argument("--timeout", type=int, default=10, help="seconds one input may take")
    ap.add_argument("--list", action="store_true", help="list the targets and exit")
    args = ap.parse_args(argv)
    if args.list:
        for t in TARGETS:
            print(f"{t.name:14} {t.what}")
        return 0
    names = [n for n in args.targets.replace(" ", ",").split(",") if n] or list(BY_NAME)
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        ap.error(f"unknown target {', '.join(unknown)} (known: {', '.join(BY_NAME)})")
    args.results.mkdir(parents=True, exist_ok=True)
    failed = []
    for name in names:
        out = run_target(
            name,
            seconds=None if args.seeds_only else args.time,
            runs=None if args.seeds_only else args.runs,
            results=args.results,
            work=args.work,
            rss_limit_mb=args.rss_limit_mb,
            timeout=args.timeout,
        )
        verdict = "ok" if out.ok else f"FAILED (exit {out.exit_code})"
        print(
            f"fuzz {name}: {out.executions} executions, cov {out.cov} ft {out.ft}, "
            f"corpus {out.corpus}, {out.seconds:.0f} s, {out.exec_per_s} exec/s: {verdict}",
            flush=True,
        )
        for a in out.artifacts:
            print(f"  reproducer: {a}  (log: {out.log})", flush=True)
        if not out.ok:
            failed.append(name)
    if failed:
        print(f"fuzz: {len(failed)} target(s) failed: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
