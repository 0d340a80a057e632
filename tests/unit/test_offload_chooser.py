"""offload.chooser: engines per transform and packet size from verdicts and measurements,
the IKE proposal order and the kernel's usable transforms; pure, from recorded numbers."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from oe_router.offload.chooser import (
    Band,
    ChoiceTable,
    Verdict,
    choose,
    kernel_usable,
    proposal_order,
)
from oe_router.offload.engine import TRANSFORMS
from oe_router.offload.measure import Measurement

CBC = "aes256-sha256"
GCM = "aes256gcm16"
HW = "afalg:virtio_crypto_aes_cbc"
ENGINES = ["software", "afalg", HW]


def _m(engine: str, transform: str, size: int, ns: float) -> Measurement:
    """A measurement of ``ns`` per packet (1000 packets)."""
    return Measurement(engine, transform, size, "seal", 1000, ns * 1000 / 1e9)


def _line(engine: str, transform: str, fixed: float, per_byte: float) -> list[Measurement]:
    return [_m(engine, transform, s, fixed + per_byte * s) for s in (64, 512, 1400)]


def _all_pass(engines: list[str], transforms: list[str] | None = None) -> list[Verdict]:
    return [Verdict(e, t, True) for e in engines for t in transforms or list(TRANSFORMS)]


def test_noise_is_not_extrapolated_past_the_measured_sizes() -> None:
    """A hardware engine 30x slower whose figures fall a little with size (noise) and a
    CPU whose figures rise: extended as lines they would cross near 37 KB."""
    ms = [
        *[_m("software", CBC, s, ns) for s, ns in ((64, 6484), (512, 7023), (1400, 8241))],
        *[_m(HW, CBC, s, ns) for s, ns in ((64, 225828), (512, 222208), (1400, 218739))],
    ]
    table = choose("auto", ENGINES, _all_pass(["software", HW], [CBC]), ms)
    assert table.choice(CBC).bands == (Band("software"),)  # type: ignore[union-attr]


def test_crossover_between_measured_sizes_is_solved_on_the_linear_segments() -> None:
    # software: 1000 ns + 1 ns/byte; hardware: 1771 ns + 0.234 ns/byte, +5 % margin
    ms = _line("software", CBC, 1000, 1.0) + _line(HW, CBC, 1771, 0.234)
    table = choose("auto", ENGINES, _all_pass(["software", HW], [CBC]), ms)
    sw = {64: 1064.0, 512: 1512.0, 1400: 2400.0}
    hw = {s: (1771 + 0.234 * s) * 1.05 for s in (64, 512, 1400)}
    # on [512, 1400] both are lines: they cross where sw - hw changes sign
    d512, d1400 = sw[512] - hw[512], sw[1400] - hw[1400]
    x = 512 + 888 * d512 / (d512 - d1400)
    assert 1100 < x < 1200
    assert table.engine_for(CBC, int(x)) == "software"
    assert table.engine_for(CBC, int(x) + 1) == HW
    assert table.choice(CBC) is not None
    assert table.choice(CBC).bands == (Band("software", int(x)), Band(HW, None))  # type: ignore[union-attr]
    assert table.in_use_for(HW) == (f"{CBC}@>={int(x) + 1}",)
    assert table.in_use_for("software")[0] == f"{CBC}@<={int(x)}"


def _brute(costs: dict[str, dict[int, float]], size: int, margin: float) -> str:
    """The cheapest engine at ``size`` by straight interpolation (flat beyond the measured
    sizes), software winning ties."""

    def at(points: dict[int, float], s: int) -> float:
        xs = sorted(points)
        if s <= xs[0]:
            return points[xs[0]]
        if s >= xs[-1]:
            return points[xs[-1]]
        a = max(x for x in xs if x < s)
        b = min(x for x in xs if x >= s)
        return points[a] + (points[b] - points[a]) * (s - a) / (b - a)

    def key(e: str) -> tuple[float, int]:
        scale = 1.0 if e == "software" else 1.0 + margin
        return (at(costs[e], size) * scale, 0 if e == "software" else 1 + sorted(costs).index(e))

    return min(costs, key=key)


_ns = st.floats(min_value=200.0, max_value=50_000.0, allow_nan=False)


@settings(max_examples=400)
@given(
    st.lists(
        st.tuples(_ns, _ns, _ns),
        min_size=2,
        max_size=3,
    )
)
def test_every_size_goes_to_the_cheapest_verified_engine(lines: list[tuple[float, ...]]) -> None:
    names = ["software", "afalg", HW][: len(lines)]
    costs = {
        n: dict(zip((64, 512, 1400), pts, strict=True)) for n, pts in zip(names, lines, strict=True)
    }
    ms = [_m(n, CBC, s, ns) for n, pts in costs.items() for s, ns in pts.items()]
    table = choose("auto", ["software", "afalg", HW], _all_pass(names, [CBC]), ms)
    # engines in the order ties are broken: software, then as listed
    choice = table.choice(CBC)
    assert choice is not None
    edges = {b.max_size + d for b in choice.bands[:-1] if b.max_size for d in (0, 1)}
    fixed = {1, 2, 10, 33, 63, 64, 65, 300, 511, 512, 513, 900, 1399, 1400, 1401, 3000, 9000}
    for size in sorted(fixed | edges):
        want = _brute(costs, size, 0.05)
        got = table.engine_for(CBC, size)
        if got != want:  # only a float tie may differ: the costs must then be equal
            scale = {n: 1.0 if n == "software" else 1.05 for n in costs}
            from oe_router.offload.chooser import _Cost

            c = {n: _Cost(p, scale[n])(size) for n, p in costs.items()}
            assert c[got] == pytest.approx(c[want], rel=1e-9), (size, got, want, c)
    # bands are ascending and end open
    assert choice.bands[-1].max_size is None
    bounds = [b.max_size for b in choice.bands[:-1]]
    assert bounds == sorted(bounds) and len(set(bounds)) == len(bounds)


def test_slower_hardware_is_never_chosen_and_ties_go_to_the_cpu() -> None:
    """Under TCG virtio-crypto is slower at every size: software keeps everything."""
    ms = _line("software", CBC, 1000, 1.0) + _line(HW, CBC, 4000, 3.0)
    table = choose("auto", ENGINES, _all_pass(["software", HW], [CBC]), ms)
    assert table.choice(CBC).bands == (Band("software"),)  # type: ignore[union-attr]
    assert table.in_use_for(HW) == ()
    # within the 5 % margin: still the CPU
    ms = _line("software", CBC, 1000, 1.0) + _line(HW, CBC, 980, 0.98)
    table = choose("auto", ENGINES, _all_pass(["software", HW], [CBC]), ms)
    assert table.engine_for(CBC, 1400) == "software"
    # well past it: the hardware, at every size
    ms = _line("software", CBC, 1000, 1.0) + _line(HW, CBC, 500, 0.5)
    table = choose("auto", ENGINES, _all_pass(["software", HW], [CBC]), ms)
    assert table.choice(CBC).bands == (Band(HW),)  # type: ignore[union-attr]


def test_an_engine_that_failed_its_kat_is_never_used_however_fast() -> None:
    ms = _line("software", CBC, 1000, 1.0) + _line(HW, CBC, 10, 0.01)
    verdicts = [
        Verdict("software", CBC, True),
        Verdict(HW, CBC, True),
        Verdict(HW, CBC, False, "canary: case 3 ciphertext differs"),  # the last one counts
    ]
    table = choose("auto", ENGINES, verdicts, ms, transforms=[CBC])
    assert table.choice(CBC).bands == (Band("software"),)  # type: ignore[union-attr]
    assert table.choice(CBC).verified == ("software",)  # type: ignore[union-attr]
    assert any(HW in n and "case 3 ciphertext differs" in n for n in table.notes)


def test_unmeasured_engines_wait_and_software_unmeasured_means_software() -> None:
    # hardware proven but not measured yet: not trusted with traffic
    table = choose(
        "auto", ENGINES, _all_pass(["software", HW], [CBC]), _line("software", CBC, 1, 1)
    )
    assert table.choice(CBC).bands == (Band("software"),)  # type: ignore[union-attr]
    assert table.choice(CBC).verified == ("software", HW)  # type: ignore[union-attr]
    # hardware measured (fast) but the baseline not: nothing can be compared yet
    table = choose("auto", ENGINES, _all_pass(["software", HW], [CBC]), _line(HW, CBC, 1, 0.1))
    assert table.choice(CBC).bands == (Band("software"),)  # type: ignore[union-attr]


def test_off_is_software_for_everything_even_when_hardware_wins() -> None:
    ms = _line("software", CBC, 1000, 1.0) + _line(HW, CBC, 10, 0.01)
    table = choose("off", ENGINES, _all_pass(ENGINES), ms)
    assert all(c.bands == (Band("software"),) for c in table.choices)
    assert {c.transform for c in table.choices} == set(TRANSFORMS)


def test_an_explicit_engine_runs_what_it_supports_and_proved_software_the_rest() -> None:
    ms = _line("software", CBC, 1000, 1.0) + _line(HW, CBC, 4000, 3.0)  # slower: still used
    verdicts = [
        *_all_pass(["software"]),
        Verdict(HW, CBC, True),
        Verdict(HW, "aes128-sha256", True),
    ]
    for name in (HW, "virtio_crypto_aes_cbc"):  # the engine name or the bare driver name
        table = choose(name, ENGINES, verdicts, ms)
        assert table.choice(CBC).bands == (Band(HW),)  # type: ignore[union-attr]
        assert table.engine_for("aes128-sha256", 64) == HW
        assert table.engine_for(GCM, 1400) == "software"
        assert table.notes == ()


def test_an_explicit_engine_that_failed_or_does_not_exist_says_why() -> None:
    verdicts = [*_all_pass(["software"]), Verdict(HW, CBC, False, "KAT case 7: tag differs")]
    table = choose(HW, ENGINES, verdicts, [])
    assert table.engine_for(CBC, 1400) == "software"
    assert any("KAT case 7: tag differs" in n and "software runs" in n for n in table.notes)
    # a faster engine that is not the one named does not step in
    fast = _line("software", CBC, 1000, 1.0) + _line(HW, CBC, 10, 0.01)
    table = choose("safexcel-gcm", ENGINES, _all_pass(["software", HW]), fast)
    assert all(c.bands == (Band("software"),) for c in table.choices)
    assert table.notes[0].startswith("offload safexcel-gcm: no such engine here (found: software")


def test_no_verified_engine_means_no_band_and_a_lookup_error() -> None:
    table = choose("auto", ["software"], [Verdict("software", GCM, True)], [])
    assert table.engine_for(GCM, 100) == "software"
    with pytest.raises(LookupError, match=CBC):
        table.engine_for(CBC, 100)
    with pytest.raises(LookupError, match="aes256-sha512"):
        table.engine_for("aes256-sha512", 100)
    assert any(n.startswith(f"{CBC}: no engine passed") for n in table.notes)


def test_table_json_round_trip_is_what_a_worker_process_reads() -> None:
    ms = _line("software", CBC, 1000, 1.0) + _line(HW, CBC, 1771, 0.234)
    table = choose("auto", ENGINES, _all_pass(["software", HW], [CBC, GCM]), ms)
    text = json.dumps(table.to_json())
    back = ChoiceTable.from_json(json.loads(text))
    assert back == table
    assert [back.engine_for(CBC, s) for s in (64, 1400)] == ["software", HW]
    doc = json.loads(text)
    assert doc["transforms"][CBC]["bands"][1] == {"engine": HW, "max_size": None}
    assert doc["offload"] == "auto"


def test_proposal_order_ranks_by_the_bulk_engine_and_drops_unusable_transforms() -> None:
    ms = [
        _m("software", GCM, 1400, 1000),  # 11.2 Gbit/s
        _m("software", "aes128gcm16", 1400, 800),
        _m("software", "chacha20poly1305", 1400, 2000),
        _m("software", CBC, 1400, 9000),
        _m(HW, CBC, 1400, 500),  # the hardware makes CBC the fastest at 1400 bytes
        *_line("software", CBC, 9000 - 1400, 1.0)[:2],
        *_line(HW, CBC, 500 - 1400 * 0.1, 0.1)[:2],
    ]
    verdicts = [*_all_pass(["software"]), Verdict(HW, CBC, True)]
    table = choose("auto", ENGINES, verdicts, ms)
    assert table.engine_for(CBC, 1400) == HW
    candidates = ("aes256gcm16", "chacha20poly1305", "aes128gcm16", CBC, "aes128-sha256",
                  "aes256-sha1", "aes256gcm16")  # fmt: skip
    order = proposal_order(table, ms, candidates)
    # measured fastest first; aes128-sha256 (not measured) after, in configured order;
    # aes256-sha1 has no engine at all; duplicates once
    assert order == (CBC, "aes128gcm16", "aes256gcm16", "chacha20poly1305", "aes128-sha256")
    # nothing measured yet: the configured order, minus what no engine runs
    start = choose("auto", ENGINES, _all_pass(["software"], [GCM, "chacha20poly1305"]), [])
    assert proposal_order(start, [], candidates) == ("aes256gcm16", "chacha20poly1305")


def test_kernel_usable_is_what_the_kernels_pick_passed_last() -> None:
    verdicts = [
        Verdict("afalg", GCM, True),
        Verdict("afalg", CBC, True),
        Verdict("afalg", CBC, False, "canary"),
        Verdict("software", "chacha20poly1305", True),
        Verdict(HW, "aes128-sha256", True),
        Verdict("afalg", "aes128gcm16", False),
    ]
    assert kernel_usable(verdicts) == {GCM}
    assert kernel_usable([]) == set()


def test_near_equal_transforms_keep_their_configured_order() -> None:
    """The lab router's figures under TCG (Mbit/s at 1400 bytes): GCM 84 and 90, CBC 89
    and 60, ChaCha 49. Within 10 % of the fastest left, the configured order decides."""
    mbit = {"aes256gcm16": 84, "aes128gcm16": 90, "chacha20poly1305": 49,
            "aes256-sha256": 60, "aes128-sha256": 89}  # fmt: skip
    ms = [_m("software", t, 1400, 1400 * 8e3 / r) for t, r in mbit.items()]
    table = choose("auto", ["software"], _all_pass(["software"]), ms)
    configured = ("aes256gcm16", "chacha20poly1305", "aes128gcm16", "aes256-sha256",
                  "aes128-sha256")  # fmt: skip
    assert proposal_order(table, ms, configured) == (
        "aes256gcm16", "aes128gcm16", "aes128-sha256", "aes256-sha256", "chacha20poly1305"
    )  # fmt: skip
    assert proposal_order(table, ms, configured, tolerance=0.0) == (
        "aes128gcm16", "aes128-sha256", "aes256gcm16", "aes256-sha256", "chacha20poly1305"
    )  # fmt: skip
