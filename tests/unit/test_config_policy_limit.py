"""oe.global.policy_limit bounds the policy destinations of a file: one more than the limit
is one problem naming the first entry too many, the count and the limit, at `oe config
check` and wherever the file is loaded (start, reload); `oe status` shows how many
policies the datapath holds."""

from __future__ import annotations

from pathlib import Path

import pytest

from oe_router.cli import main, render_status
from oe_router.config import ConfigInvalid, parse_config
from oe_router.config.schema import POLICY_LIMIT, OeConfig
from oe_router.control import DaemonStatus, Status


def policy_file(*groups: tuple[str, int], limit: int | None = None, base: int = 0) -> str:
    """``config policy`` sections of /32s in 10.x.y.z, numbered across sections."""
    out = ["config oe 'global'"]
    if limit is not None:
        out.append(f"\toption policy_limit '{limit}'")
    n = base
    for group, count in groups:
        out += ["", "config policy", f"\toption group '{group}'"]
        for _ in range(count):
            out.append(f"\tlist dest '10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}'")
            n += 1
    return "\n".join(out) + "\n"


def test_the_default_limit_is_1024_and_holds_exactly() -> None:
    assert OeConfig().policy_limit == POLICY_LIMIT == 1024
    parse_config(policy_file(("clear", 1024)))
    with pytest.raises(ConfigInvalid) as err:
        parse_config(policy_file(("clear", 1025)), "oe")
    (problem,) = err.value.problems
    assert problem.option == "oe.@policy[0].dest"
    assert problem.line == 4 + 1025  # the 1025th entry, after 4 lines of headers
    assert str(problem) == (
        "oe:1029: oe.@policy[0].dest: '10.0.4.0/32' is policy destination 1025 of 1025, over"
        " the limit of 1024 (oe.global.policy_limit): each becomes up to 3 kernel policies"
        " (about 1 KiB each) and takes about 2.4 KB in the daemon; use broader prefixes, or"
        " raise policy_limit if the router has the memory"
    )


def test_a_custom_limit_counts_every_group_and_names_the_section_past_it() -> None:
    text = policy_file(("private-or-clear", 3), ("clear", 4), ("block", 2), limit=5)
    with pytest.raises(ConfigInvalid) as err:
        parse_config(text, "oe")
    (problem,) = err.value.problems
    assert problem.option == "oe.@policy[1].dest"
    assert "'10.0.0.5/32' is policy destination 6 of 9, over the limit of 5" in str(problem)
    assert parse_config(text.replace("'5'", "'9'")).policy_limit == 9


def test_a_limit_below_the_built_in_defaults_names_the_option() -> None:
    with pytest.raises(ConfigInvalid) as err:
        parse_config("config oe 'global'\n\toption policy_limit '10'\n", "oe")
    assert [str(p) for p in err.value.problems] == [
        "oe:2: oe.global.policy_limit: '10' is less than the 13 built-in policy destinations"
        " (the file has no 'config policy' section)"
    ]


@pytest.mark.parametrize("value", ["0", "1000001", "many"])
def test_the_limit_is_a_number_from_1_to_a_million(value: str) -> None:
    with pytest.raises(ConfigInvalid) as err:
        parse_config(f"config oe 'global'\n\toption policy_limit '{value}'\n", "oe")
    assert err.value.problems[0].option == "oe.global.policy_limit"


def test_oe_config_check_reports_the_count_and_the_limit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    conf = tmp_path / "oe"
    conf.write_text(policy_file(("clear", 1100)))
    assert main(["config", "check", str(conf)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and out[1] == f"{conf}: 1 problem(s)"
    assert "is policy destination 1025 of 1100, over the limit of 1024" in out[0]


def test_status_shows_the_datapaths_policy_count() -> None:
    def line(stats: dict[str, object]) -> str:
        daemon = DaemonStatus(
            "0.1.0", 1, 3.0, "/etc/config/oe", 1, True, "kernel-xfrm (ESP)", None, (), stats
        )
        return render_status(Status.merge(daemon, [])).splitlines()[2]

    assert line({"policies": 40}) == "datapath  kernel-xfrm (ESP); 40 policies"
    assert line({}) == "datapath  kernel-xfrm (ESP)"  # an older daemon sends none
