"""Every malformed or invalid fixture gives exactly one, exactly worded, one-line problem.

Each tests/unit/configs/bad/*.conf starts with ``# expect: SUFFIX``: the full text of the
single problem is the file's path followed by SUFFIX.  That pins the option path, the bad
value and the advice, and proves no exception escapes (a traceback would fail the test).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from oe_router.config import ConfigInvalid, check_config, load_config

BAD = sorted((Path(__file__).parent / "configs" / "bad").glob("*.conf"))


def _expected(path: Path) -> str:
    first = path.read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith("# expect: "), f"{path.name} lacks its '# expect:' line"
    return str(path) + first.removeprefix("# expect: ")


def test_there_are_at_least_twenty_bad_fixtures() -> None:
    assert len(BAD) >= 20


@pytest.mark.parametrize("path", BAD, ids=lambda p: p.stem)
def test_bad_config_gives_one_exact_problem(path: Path) -> None:
    problems = check_config(path)
    assert [str(p) for p in problems] == [_expected(path)]
    (problem,) = problems
    assert "\n" not in str(problem)
    assert "Traceback" not in str(problem)
    if problem.option is not None:
        assert problem.option in str(problem)
    if problem.value is not None:
        assert repr(problem.value) in str(problem) or problem.value in str(problem)


@pytest.mark.parametrize("path", BAD, ids=lambda p: p.stem)
def test_load_refuses_bad_config_with_config_invalid(path: Path) -> None:
    with pytest.raises(ConfigInvalid) as info:
        load_config(path)
    assert str(info.value) == _expected(path)
    assert [str(p) for p in info.value.problems] == [_expected(path)]
