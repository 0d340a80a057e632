"""`make bench`: run every bench/bench_*.py, write bench/results/<name>.json, print a table.

Each benchmark module exposes ``run() -> list[Result]``. A benchmark that cannot run here
(missing peer, no QEMU image) raises ``Unavailable`` with the reason, which is printed and
makes the run fail: a benchmark never reports a number it did not measure.
"""

from __future__ import annotations

import importlib
import json
import platform
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"


class Unavailable(Exception):
    """The benchmark's baseline or subject cannot run on this machine."""


@dataclass
class Result:
    name: str
    unit: str
    ours: float
    baseline: float
    baseline_name: str
    goal: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return self.ours / self.baseline if self.baseline else float("nan")

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        extra = d.pop("extra")
        d["ratio"] = round(self.ratio, 4)
        d["machine"] = machine()
        d.update(extra)
        return d


def machine() -> str:
    cpu = "unknown cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os

    return f"{platform.node()} {cpu} x{os.cpu_count()} {platform.system()} {platform.release()}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    modules = sorted(p.stem for p in Path(__file__).parent.glob("bench_*.py"))
    if argv:
        modules = [m for m in modules if any(a in m for a in argv)]
    if not modules:
        print("bench: no benchmarks exist yet")
        return 0
    results: list[Result] = []
    failed: list[str] = []
    for mod in modules:
        print(f"bench: running {mod} ...", flush=True)
        try:
            results.extend(importlib.import_module(f"bench.{mod}").run())
        except Unavailable as exc:
            print(f"bench: {mod}: unavailable: {exc}")
            failed.append(mod)
    for r in results:
        (RESULTS_DIR / f"{r.name}.json").write_text(json.dumps(r.to_json(), indent=2) + "\n")
    print(f"\n{'name':32} {'ours':>12} {'baseline':>12} {'ratio':>7}  unit / baseline / goal")
    for r in results:
        print(
            f"{r.name:32} {r.ours:12.3f} {r.baseline:12.3f} {r.ratio:7.3f}  "
            f"{r.unit} / {r.baseline_name} / {r.goal}"
        )
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
