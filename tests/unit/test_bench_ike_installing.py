"""The installing handshake bench's bookkeeping: when a phase ends, what it counts, and
the result it writes (the fair ratio with the same run's unfair one beside it)."""

from __future__ import annotations

import math

from bench.bench_ike_installing import Tally, fair_result


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


def test_result_carries_fair_and_unfair_ratio_of_the_same_run() -> None:
    installing = {
        "done": 300, "failed": 0, "wall": 6.0, "responder_installed": 300,
        "responder_failed": 0, "cpu": 3.0,
        "cpu_split": {"process": 2.0, "reaped_children": 0.6, "workers": 0.4},
        "medians": {"ini_install_ms_median": 4.0, "res_install_ms_median": 5.0},
        "profile": ["ini own x.py:f 10.0%"],
    }  # fmt: skip
    plain = {"done": 900, "failed": 0, "wall": 6.0, "cpu": 5.4}
    charon = {"done": 420, "failed": 0, "wall": 6.0, "cpu": 8.4}
    d = fair_result(installing, plain, charon).to_json()
    assert d["name"] == "ike_sa_per_s_installing"
    assert (d["ours"], d["baseline"], d["ratio"]) == (50.0, 70.0, round(50 / 70, 4))
    assert d["goal"] == ">= 1.0"
    assert d["unfair_ratio_same_run"] == round(150 / 70, 4)
    assert d["ours_cpu_ms_per_handshake"] == 10.0
    assert d["charon_cpu_ms_per_handshake"] == 20.0
    assert d["cpu_ratio_same_run"] == 2.0
    assert d["ours_cpu_split_ms"] == {"process": 6.667, "reaped_children": 2.0, "workers": 1.333}
    for key in ("unit", "baseline_name", "machine"):
        assert d[key]
