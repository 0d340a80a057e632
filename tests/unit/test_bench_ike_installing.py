"""The installing handshake bench's bookkeeping: when a phase ends, what it counts, and
the result it writes (the fair ratio with the same run's unfair one beside it)."""

from __future__ import annotations

import math

from bench.bench_ike_installing import Tally, control_extra, fair_result


def test_phase_ends_only_when_every_install_on_both_sides_is_through() -> None:
    t = Tally(stop_at=10.0)
    t.child_up("ini")
    t.child_up("res")
    assert not t.finished(in_flight=0)  # both installs pending
    t.installed("ini", True, 2.0, now=5.0)
    assert not t.start_another(now=10.5)  # past the end: no new handshake
    assert not t.finished(in_flight=0)  # the responder's install still pending
    t.installed("res", True, 3.0, now=11.0)
    assert not t.finished(in_flight=1)  # a handshake still negotiating
    assert t.finished(in_flight=0)
    assert (t.done, t.responder_installed, t.last_done) == (1, 1, 11.0)
    assert t.medians() == {"ini_install_ms_median": 2.0, "res_install_ms_median": 3.0}


def test_failed_installs_and_handshakes_are_counted_not_done() -> None:
    t = Tally(stop_at=10.0)
    t.child_up("ini")
    t.installed("ini", False, 1.0, now=1.0)
    t.handshake_failed()
    t.child_up("res")
    t.installed("res", False, 1.0, now=2.0)
    assert (t.done, t.failed, t.responder_installed, t.responder_failed) == (0, 2, 0, 1)
    assert math.isnan(t.medians()["ini_install_ms_median"])  # no install went through


def test_result_carries_fair_and_unfair_ratio_of_the_same_rounds() -> None:
    def installing(done: int, profile: list[str]) -> dict[str, object]:
        return {
            "done": done, "failed": 0, "wall": 6.0, "responder_installed": done,
            "responder_failed": 0, "cpu": done / 100,
            "cpu_split": {"event_loop_thread": done / 200, "other_threads": 0.0,
                          "reaped_children": done / 400, "workers": done / 400},
            "medians": {"ini_install_ms_median": done / 100, "res_install_ms_median": 5.0},
            "profile": profile, "profile_handshakes": 60 if profile else 0,
        }  # fmt: skip

    ours = [installing(300, ["ini own x.py:f 10.0%"]), installing(240, []), installing(360, [])]
    plain = [{"done": d, "failed": 0, "wall": 6.0, "cpu": 0.2 * d / 100} for d in (900, 60, 870)]
    charon = [{"done": d, "failed": 0, "wall": 6.0, "cpu": d / 50} for d in (420, 400, 450)]
    d = fair_result(ours, plain, charon, (6.0, 8.0)).to_json()
    assert d["name"] == "ike_sa_per_s_installing"
    # medians: 300/6 against 420/6, and the unfair 870/6 against the same 420/6
    assert (d["ours"], d["baseline"], d["ratio"]) == (50.0, 70.0, round(50 / 70, 4))
    assert d["goal"] == ">= 1.0"
    assert d["unfair_ratio_same_run"] == round(145 / 70, 4)
    assert d["ours_runs"] == [50.0, 40.0, 60.0] and d["rounds"] == 3
    assert d["ours_cpu_ms_per_handshake"] == 10.0
    assert d["charon_cpu_ms_per_handshake"] == 20.0
    assert d["unfair_ours_cpu_ms_per_handshake"] == 2.0
    assert d["cpu_ratio_same_run"] == 2.0
    assert d["ours_cpu_split_ms"] == {
        "event_loop_thread": 5.0, "other_threads": 0.0, "reaped_children": 2.5, "workers": 2.5
    }  # fmt: skip
    assert d["ini_install_ms_median"] == 3.0
    assert d["install_profile_top"] == ["ini own x.py:f 10.0%"]
    assert d["install_profile_handshakes"] == 60
    assert d["loadavg_1min_before_after"] == [6.0, 8.0]
    for key in ("unit", "baseline_name", "machine"):
        assert d[key]


def test_control_run_reports_its_cpu_apart() -> None:
    """The no-install control: same harness, its rate and CPU per handshake, split."""
    rounds = [
        {"done": 600, "wall": 6.0, "cpu": 1.8, "cpu_split": {"a": 1.2, "b": 0.6}},
        {"done": 300, "wall": 6.0, "cpu": 0.9, "cpu_split": {"a": 0.6, "b": 0.3}},
    ]
    assert control_extra(rounds) == {
        "control_no_install_runs": [100.0, 50.0],
        "control_no_install_cpu_ms_per_handshake": 3.0,
        "control_no_install_cpu_split_ms": {"a": 2.0, "b": 1.0},
    }


def test_a_phase_starts_no_more_handshakes_than_the_sa_table_holds() -> None:
    t = Tally(stop_at=10.0, limit=3)
    assert [t.start_another(now=1.0) for _ in range(5)] == [True, True, True, False, False]
    assert t.started == 3
    assert Tally(stop_at=10.0).start_another(now=1.0)  # no cap: only the clock ends it
