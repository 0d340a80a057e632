"""CI's fuzz smoke: every target over its committed seed corpus, then a short fuzz.

Each target runs as the subprocess ``make fuzz`` uses (``fuzz.run.run_target``), with
its working corpus in a temporary directory so CI never grows the committed seeds.
A seed that crashes (every fixed crash stays in the corpus as ``regress-*``), a crash
found in the short run, a hang past ``-timeout`` or memory past ``-rss_limit_mb``
fails the test with libFuzzer's log. FUZZ_SMOKE_TIME (seconds per target, default 12)
keeps all targets together well under 5 minutes on CI's 2 cores.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from fuzz.run import CORPUS, ROOT, TARGETS, run_target

SMOKE_SECONDS = int(os.environ.get("FUZZ_SMOKE_TIME", "12"))
RESULTS = ROOT / "test-results" / "fuzz"


@pytest.mark.parametrize("name", [t.name for t in TARGETS])
def test_target_survives_seeds_and_a_short_run(name: str, tmp_path: Path) -> None:
    seeds = [p for p in (CORPUS / name).iterdir() if p.is_file()]
    assert seeds, f"fuzz/corpus/{name} holds no seeds"
    out = run_target(name, seconds=SMOKE_SECONDS, results=RESULTS, work=tmp_path)
    log = Path(out.log if Path(out.log).is_absolute() else ROOT / out.log)
    tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
    assert out.exit_code == 0 and not out.artifacts, f"{name}: {out.artifacts}\n{tail}"
    assert out.executions > len(seeds), f"{name}: only {out.executions} executions\n{tail}"
    assert out.inited_cov > 0 and out.cov >= out.inited_cov, f"{name}: no coverage\n{tail}"
    print(
        f"{name}: {out.executions} executions, {out.seeds} seeds, "
        f"cov {out.inited_cov} after seeds -> {out.cov}, ft {out.ft}"
    )
