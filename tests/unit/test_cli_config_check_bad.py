"""`oe config check` on every bad fixture: one problem line, a summary, exit 1, no traceback.

The fixtures and their expected wording are shared with test_config_bad.py; this file proves
the user-facing command (the CLI's own process) shows them as they are.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BAD = sorted((Path(__file__).parent / "configs" / "bad").glob("*.conf"))
SHIPPED = Path(__file__).resolve().parents[2] / "files" / "etc" / "config" / "oe"


def _expected(path: Path) -> str:
    first = path.read_text(encoding="utf-8").splitlines()[0]
    return str(path) + first.removeprefix("# expect: ")


def _check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "oe_router.cli", "config", "check", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_bad_fixtures_exist() -> None:
    assert len(BAD) >= 15


@pytest.mark.parametrize("path", BAD, ids=lambda p: p.stem)
def test_oe_config_check_names_the_one_problem(path: Path) -> None:
    proc = _check(path)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stdout + proc.stderr
    assert proc.stdout.splitlines() == [_expected(path), f"{path}: 1 problem(s)"]


def test_oe_config_check_accepts_the_shipped_config() -> None:
    proc = _check(SHIPPED)
    assert (proc.returncode, proc.stdout.strip()) == (0, f"{SHIPPED}: OK")
