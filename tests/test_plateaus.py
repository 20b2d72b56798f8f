"""The plateau stage model (stages/plateaus.py) and the autocorrelation-aware noise level (stages/noise.py).

Statistical figures are measured by benchmarks/bench_stages.py (docs/stages.md has the table); the fast
tests here pin a few of them on fewer seeds, the slow test on 100 seeds.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest

from devinterp_lightning.stages.noise import (
    ar1_residual_moments,
    estimate_long_run_noise,
    segment_noise,
    segment_noise_levels,
    smoothing_half_width,
)
from devinterp_lightning.stages.plateaus import (
    Change,
    PlateauTracker,
    changes,
    despike,
    detect_transitions,
    fit_segments,
)

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
from bench_stages import ar1, main, noise_spread, run_cell, shapes, true_long_run_sd  # noqa: E402

SHAPES = {s.name: s for s in shapes()}

# bounds of the slow test, from the 100-seed benchmark (docs/stages.md, the default noise model "split"
# for these series without a stderr), two series of room each and never looser than the targets of
# issue #12 (false alarms <= 5%, one rise >= 90%, two stairs >= 85%). Measured: false alarms 0 / 1 / 3
# of 100 at phi = 0 / 0.5 / 0.8; exactly one transition on rise-10 in 100 / 99 of 100 at phi = 0 / 0.8;
# exactly two on stairs-2 in 98 / 96 / 95 of 100 at phi = 0 / 0.5 / 0.8; exactly one on the wide rise and
# fall (rise-30, fall-30) at phi = 0.8 in 94 / 91 of 100 (the fall's bound is the 90% target: one series
# of room)
SLOW_FLAT = {0.0: 0.02, 0.5: 0.03, 0.8: 0.05}
SLOW_RISE = {0.0: 0.98, 0.8: 0.97}
SLOW_STAIRS = {0.0: 0.96, 0.5: 0.94, 0.8: 0.93}
SLOW_WIDE = {"rise-30": 0.92, "fall-30": 0.90}  # at phi = 0.8


def test_smoothing_half_width_formula():
    assert [smoothing_half_width(s) for s in (0.0, -1.0, 0.3, 0.7, 1.0, 2.5)] == [2, 2, 2, 3, 3, 8]


def test_long_run_noise_recovers_ar1_on_a_long_series():
    # 20000 points: the estimate is close to the truth; margin=0 is the plain estimate
    for phi in (0.0, 0.5, 0.8):
        x = ar1(np.random.default_rng(1), 20_000, phi)
        est = estimate_long_run_noise(x, margin=0.0)
        assert est.phi == pytest.approx(phi, abs=0.03)
        assert est.sigma == pytest.approx(1.0, rel=0.05)
        assert est.long_run == pytest.approx(math.sqrt((1 + phi) / (1 - phi)), rel=0.1)
    # reported standard errors are a lower bound on sigma
    x = np.random.default_rng(2).normal(size=200)
    assert estimate_long_run_noise(x, [3.0] * 200).sigma == 3.0
    assert estimate_long_run_noise([1.0, 2.0]).long_run == 0.0


def test_breaks_keep_a_level_shift_out_of_the_noise():
    rng = np.random.default_rng(3)
    x = np.r_[np.zeros(100), np.full(100, 10.0)] + rng.normal(size=200)
    with_break = estimate_long_run_noise(x, breaks=[100], margin=0.0)
    assert with_break.sigma == pytest.approx(1.0, rel=0.15) and with_break.phi < 0.1


def test_ar1_residual_moments_match_the_traces_by_definition():
    # E[r'r] = tr(P R P), E[sum r_t r_(t+1)] = sum of the first sub-diagonal of P R P, P the residual
    # projector of a level or a line, R[i, j] = phi**|i - j|
    phis = np.array([0.0, 0.3, 0.8, 0.95])
    for m in (3, 5, 20, 100):
        for ramp in (False, True):
            den, num = ar1_residual_moments(m, ramp, phis)
            i = np.arange(m)
            cols = [np.ones(m)] + ([i - i.mean()] if ramp else [])
            q = np.linalg.qr(np.stack(cols, 1))[0]
            p = np.eye(m) - q @ q.T
            for k, phi in enumerate(phis):
                prp = p @ (phi ** np.abs(i[:, None] - i[None, :])) @ p
                assert den[k] == pytest.approx(np.trace(prp), abs=1e-9)
                assert num[k] == pytest.approx(np.trace(prp[1:, :-1]), abs=1e-9)


def test_segment_noise_recovers_ar1_with_levels_and_ramps_fitted():
    # 20000 points in 40 segments of 500, half of them lines: the residual estimate is unbiased
    for phi in (0.0, 0.5, 0.8):
        x = ar1(np.random.default_rng(1), 20_000, phi)
        segs = [(a, a + 500, bool(k % 2)) for k, a in enumerate(range(0, 20_000, 500))]
        x = x + np.concatenate([0.01 * np.arange(500) * (k % 2) + 5 * k for k in range(40)])
        est = segment_noise(x, segs, margin=0.0)
        assert est.phi == pytest.approx(phi, abs=0.02)
        assert est.sigma == pytest.approx(1.0, rel=0.05)
    assert segment_noise(np.zeros(10), [(0, 2, False)]).long_run == 0.0
    assert segment_noise(np.random.default_rng(2).normal(size=50), [(0, 50, False)], [4.0] * 50).sigma == 4.0


def test_segment_noise_levels_equal_one_call_per_margin():
    x = ar1(np.random.default_rng(7), 120, 0.6)
    spans = [(0, 40, False), (40, 90, True), (90, 120, False)]
    levels = segment_noise_levels(x, spans, margins=(0.0, 2.0, 4.0))
    assert levels == [segment_noise(x, spans, margin=m) for m in (0.0, 2.0, 4.0)]
    assert levels[0].long_run < levels[1].long_run < levels[2].long_run


def test_segment_noise_corrects_the_bias_of_short_segments():
    """100 points of AR(1) noise, phi = 0.5, cut into 10 levels of 10 points: fitting a level to each
    lowers the plain lag-1 autocorrelation by about (1 + 3 phi) / 10 = 0.25; the corrected estimate is
    unbiased (measured over 400 series: mean 0.480, sd 0.134; over the 200 here the mean's standard error
    is 0.01)."""
    segs = [(a, a + 10, False) for a in range(0, 100, 10)]
    est, plain = [], []
    for seed in range(200):
        x = ar1(np.random.default_rng([seed, 7]), 100, 0.5)
        est.append(segment_noise(x, segs, margin=0.0).phi)
        r = np.concatenate([x[a:b] - x[a:b].mean() for a, b, _ in segs])
        pairs = sum(float(r[a + 1:b] @ r[a:b - 1]) for a, b, _ in segs)
        plain.append(pairs / float(r @ r))
    assert abs(np.mean(est) - 0.5) < 0.04
    assert np.mean(plain) < 0.35


def test_despike_removes_a_lone_outlier_and_keeps_a_step():
    x = np.r_[np.zeros(10), np.ones(10) * 5.0]
    x[4] = 9.0
    y = despike(x, sigma=0.1)
    assert y[4] == 0.0 and (y[10:] == 5.0).all() and (y[:4] == 0.0).all()


def test_noiseless_shapes_are_segmented_exactly():
    t = np.arange(60, dtype=float)
    step = np.where(t < 30, 0.0, 5.0)
    (a, b) = fit_segments(step, 0.1)
    assert (a.start, a.end, a.kind, b.start, b.kind) == (0, 30, "flat", 30, "flat")
    assert (a.intercept, b.intercept) == pytest.approx((0.0, 5.0))
    ramp = np.clip(t - 20, 0, 20) * 0.5  # flat, ramp 20..40, flat
    segs = fit_segments(ramp, 0.1)
    # the corner points 20 and 40 lie on both pieces: the tie goes to the ramp
    assert [(s.kind, s.start) for s in segs] == [("flat", 0), ("ramp", 20), ("flat", 40)]
    (c,) = changes(segs, 0.1)
    assert c.direction == "increase" and c.onset == 20 and c.level_after == pytest.approx(10.0)


def test_one_transition_per_rise_and_fall_offline():
    t = np.arange(120, dtype=float)
    x = 8 / (1 + np.exp(-(t - 40) / 3)) - 6 / (1 + np.exp(-(t - 85) / 3)) + np.random.default_rng(4).normal(size=120)
    found = detect_transitions(list(range(0, 1200, 10)), x)
    assert [(t.direction, t.kind) for t in found] == [("increase", "changepoint"), ("decrease", "changepoint")]
    up, down = found
    assert abs(up.changepoint_step - 340) <= 60 and abs(down.changepoint_step - 790) <= 60
    # levels are those known at confirmation, part-way up the rise
    assert up.step >= up.changepoint_step and up.level_after - up.level_before > 3


def test_tracker_never_re_reports_and_round_trips_state():
    x = 8 / (1 + np.exp(-(np.arange(100.0) - 50) / 2)) + np.random.default_rng(5).normal(size=100)
    steps = list(range(100))
    tr = PlateauTracker("m")
    out = []
    for k in range(1, 101):
        out += tr.update(steps[:k], x[:k])
        if k == 60:
            state = tr.state_dict()
            tr = PlateauTracker("m")
            tr.load_state_dict(state)
    assert len(out) == 1 and tr.transitions == out and out[0].monitor == "m"


class _ScriptedTracker(PlateauTracker):
    """A tracker whose fits return scripted changes (``script[n]`` for a series of ``n`` points)."""

    def __init__(self, script: dict[int, list[Change]], **kw: object) -> None:
        super().__init__("m", min_points=10, **kw)
        self.script = script

    def fit(self, values, stderrs=None, *, known=(), previous=()):  # type: ignore[override]
        return [], self.script.get(len(values), []), 1.0


def _rise(onset: int, end: int, direction: str = "increase") -> Change:
    return Change(onset, end, direction, 0.0, 8.0 if direction == "increase" else -8.0, 5.0)  # type: ignore[arg-type]


def _replay_script(script: dict[int, list[Change]], n: int = 100) -> list[tuple[int, str]]:
    tr = _ScriptedTracker(script)
    for k in range(1, n + 1):
        tr.update(list(range(k)), [0.0] * k)
    return [(t.changepoint_step, t.direction) for t in tr.transitions]


def test_an_onset_that_moves_back_after_confirmation_is_the_same_transition():
    """A wide rise confirmed at onset 50 (its slow start fitted into the plateau), later fitted from
    43 (the slow start now in the rise, the rise ending in a line that counts as a plateau, so the
    change has no extent beyond its onset): one transition. It stays a new one when the later fit
    still sees the confirmed onset, when it starts ``settle`` points or more before it, or when it
    goes the other way."""
    first = {n: [_rise(50, 60)] for n in range(60, 63)}  # confirmed at n = 62
    moved = {n: [_rise(43, 43)] for n in range(70, 75)}
    assert _replay_script({**first, **moved}) == [(50, "increase")]
    # the later fit also finds the confirmed onset: the change before it is another transition
    both = {n: [_rise(43, 43), _rise(50, 60)] for n in range(70, 75)}
    assert _replay_script({**first, **both}) == [(50, "increase"), (43, "increase")]
    # settle = 15 points before the confirmed onset or more: another transition
    far = {n: [_rise(35, 35)] for n in range(70, 75)}
    assert _replay_script({**first, **far}) == [(50, "increase"), (35, "increase")]
    far_ok = {n: [_rise(36, 36)] for n in range(70, 75)}
    assert _replay_script({**first, **far_ok}) == [(50, "increase")]
    # the other direction: another transition
    down = {n: [_rise(43, 43, "decrease")] for n in range(70, 75)}
    assert _replay_script({**first, **down}) == [(50, "increase"), (43, "decrease")]


def test_wide_rise_under_ar1_noise_whose_onset_moves_back_is_reported_once():
    """rise-30 with AR(1) noise at phi = 0.8, seed 6 of the benchmark: the rise is confirmed with onset 50
    at point 67, then refitted from 43 (a plateau up to 43 and a line whose slope is not significant at
    the test level). Reported twice before the rule of the test above, once with it."""
    from bench_stages import series

    x = series(SHAPES["rise-30"], 8.0, 0.8, 6)
    found = detect_transitions(list(range(100)), x)
    assert [(t.changepoint_step, t.direction, t.step) for t in found] == [(50, "increase", 67)]


def test_tracker_validates_its_settings():
    with pytest.raises(ValueError, match="min_size"):
        PlateauTracker("m", min_size=1)
    with pytest.raises(ValueError, match="max_points"):
        PlateauTracker("m", max_points=4)
    with pytest.raises(ValueError, match="significance_margin"):
        PlateauTracker("m", significance_margin=-1.0)


def test_auto_noise_model_is_split_without_a_stderr_and_variogram_with_one():
    tracker = PlateauTracker("m")
    assert tracker.resolved_noise_model(None) == "split"
    assert tracker.resolved_noise_model([math.nan] * 5) == "split"  # a loss read from callback_metrics
    assert tracker.resolved_noise_model([math.nan, 0.2, math.nan]) == "variogram"  # an LLC series
    assert PlateauTracker("m", noise_model="residual").resolved_noise_model(None) == "residual"


def test_split_model_fits_with_the_central_level_and_tests_with_the_upper_one():
    """On a two-stair series with AR(1) noise the split model's upper level is above its central one; the
    segments it returns are those of a fit at the central level, and every reported change passes the
    z-test at the upper level."""
    x = SHAPES["stairs-2"].curve(np.arange(100.0), 8.0) + ar1(np.random.default_rng(3), 100, 0.8)
    tracker = PlateauTracker("m", noise_model="split")
    segs, found, test_scale = tracker.fit(x)
    assert test_scale == tracker.last_noise.long_run
    central = PlateauTracker("m", noise_model="split", significance_margin=0.0)
    central_segs, _, central_scale = central.fit(x)
    assert central_scale < test_scale
    assert [(g.start, g.end, g.kind) for g in segs] == [(g.start, g.end, g.kind) for g in central_segs]
    assert found and all(c.z >= tracker.z_change for c in found)
    assert [c.direction for c in found] == ["increase", "increase"]


def test_a_line_with_no_significant_slope_counts_as_a_plateau():
    """A ramp segment long enough and with |slope_z| < z_plateau (a line fitted at a lower noise level
    than the tests use, on the tail of a smooth jump) separates two rises, and its level is its mean;
    with a significant slope the two rises and the line are one change."""
    from devinterp_lightning.stages.plateaus import Segment

    def segs(slope_z: float) -> list[Segment]:
        return [Segment(0, 30, "flat", 0.0, 0.0), Segment(30, 34, "ramp", 1.0, 2.0, 9.0),
                Segment(34, 66, "ramp", 8.0, 0.01, slope_z), Segment(66, 70, "ramp", 9.0, 2.0, 9.0),
                Segment(70, 100, "flat", 16.0, 0.0)]

    two = changes(segs(1.5), 1.0)
    assert [(c.onset, c.direction) for c in two] == [(30, "increase"), (66, "increase")]
    assert two[0].level_after == two[1].level_before == pytest.approx(8.0 + 0.01 * 31 / 2)
    assert [(c.onset, c.end) for c in changes(segs(4.0), 1.0)] == [(30, 70)]


def test_suite_headline_few_seeds():
    """30 seeds of the benchmark's cells (benchmarks/bench_stages.py uses the same series).

    Measured with these seeds: rise-10 (A = 8, i.i.d.) exactly one transition in 30 of 30 series,
    median onset error 2 points; flat AR(1) noise at phi = 0.5: no false transition in 30 series, at
    phi = 0.8: 2 of 30; two stairs at phi = 0.8: exactly two in 29 of 30. The bounds allow one or two
    series more either way.
    """
    rise = run_cell(SHAPES["rise-10"], 8.0, 0.0, range(30), "plateau")
    flat = run_cell(SHAPES["flat"], 1.0, 0.5, range(30), "plateau")
    flat_ar = run_cell(SHAPES["flat"], 1.0, 0.8, range(30), "plateau")
    stairs_ar = run_cell(SHAPES["stairs-2"], 8.0, 0.8, range(30), "plateau")
    print(f"rise-10 exact {rise['exact'] * 30:.0f}/30, onset err {rise['onset_err']}; "
          f"flat any {flat['any'] * 30:.0f}/30 (phi 0.5), {flat_ar['any'] * 30:.0f}/30 (phi 0.8); "
          f"stairs-2 phi 0.8 exact {stairs_ar['exact'] * 30:.0f}/30")
    assert rise["exact"] >= 29 / 30 and rise["recall"] >= 0.85
    assert rise["onset_err"] <= 4
    assert flat["any"] <= 1 / 30 and flat_ar["any"] <= 3 / 30
    assert stairs_ar["exact"] >= 27 / 30


def test_residual_noise_model_keeps_the_second_stair_under_ar1_noise():
    """stairs-2 with AR(1) noise, phi = 0.5, seeds 0-29: exactly two transitions in 15 of 30 series with
    noise_model="variogram" and in 26 of 30 with noise_model="residual"; flat noise of the same kind gives
    0 and 1 false alarms. Bounds: two series of room."""
    variogram = run_cell(SHAPES["stairs-2"], 8.0, 0.5, range(30), "plateau", noise_model="variogram")
    residual = run_cell(SHAPES["stairs-2"], 8.0, 0.5, range(30), "plateau", noise_model="residual")
    flat = run_cell(SHAPES["flat"], 1.0, 0.5, range(30), "plateau", noise_model="residual")
    assert residual["exact"] >= 24 / 30 and variogram["exact"] <= 17 / 30
    assert flat["any"] <= 3 / 30
    with pytest.raises(ValueError, match="noise_model"):
        PlateauTracker("m", noise_model="ratio")  # type: ignore[arg-type]


def test_recorded_grokking_series_has_one_decrease_at_the_peak():
    """The grokking example's llc/mean (benchmarks/data/grokking_llc.json, 27 points, stderr 0.2-0.3): the
    default tracker finds one decrease with onset 60, the peak, confirmed at step 800. The residual noise
    model reads the smooth decline's curvature as autocorrelation (phi at its cap 0.9) and puts the onset
    at 600: on such curves it is not the default."""
    from bench_stages import real_check

    assert real_check("grokking_llc.json")["found"] == [(60, "decrease", 800)]
    assert real_check("grokking_llc.json", noise_model="residual")["found"] == [(600, "decrease", 1600)]
    dln = real_check("dln_llc.json", noise_model="residual")
    assert [(s, d) for s, d, _ in dln["found"]] == dln["truth"]


def test_recorded_superposition_series_has_one_late_increase():
    """The toy model of superposition's llc/mean (benchmarks/data/superposition_llc.json, seed 0, 61
    points every 50 steps, stderr 0.06-0.18): features form at steps 630 (2), 750 (3) and 1180 (4); the
    LLC dips to 0.62-0.76 at 600-650, then climbs 0.99 (700), 1.16 (800), 1.65 (900) from a plateau of
    ~0.9 to one of ~1.75. Both noise models find that one increase and nothing else, with its onset at
    900: 270 steps after the first feature, where most of the rise is done (the dip and 700-800 are fitted
    into the plateau before it). Confirmed at 1400 (default) and 1200 (residual)."""
    from bench_stages import real_check

    assert real_check("superposition_llc.json")["found"] == [(900, "increase", 1400)]
    assert real_check("superposition_llc.json", noise_model="residual")["found"] == [(900, "increase", 1200)]


@pytest.mark.slow
def test_suite_headline_many_seeds():
    """100 seeds per cell: the docs/stages.md table (see there for the measured values)."""
    cells = [("flat", phi) for phi in SLOW_FLAT] + [("rise-10", phi) for phi in SLOW_RISE]
    cells += [("stairs-2", phi) for phi in SLOW_STAIRS] + [(name, 0.8) for name in SLOW_WIDE]
    rows = {}
    for name, phi in cells:
        rows[name, phi] = run_cell(SHAPES[name], 1.0 if name == "flat" else 8.0, phi, range(100), "plateau")
        print(name, phi, rows[name, phi])
    for phi, bound in SLOW_FLAT.items():
        assert rows["flat", phi]["any"] <= bound, phi
    for phi, bound in SLOW_RISE.items():
        assert rows["rise-10", phi]["exact"] >= bound, phi
    for phi, bound in SLOW_STAIRS.items():
        assert rows["stairs-2", phi]["exact"] >= bound, phi
    for name, bound in SLOW_WIDE.items():
        assert rows[name, 0.8]["exact"] >= bound, name


@pytest.mark.slow
def test_what_estimating_the_noise_costs_on_the_4sd_rows():
    """docs/stages.md, "The 4 sd rows" (100 seeds). Told the true long-run level, the tracker finds one
    rise of 4 sd in 99 / 97 of 100 series at phi = 0.5 / 0.8 (79 / 79 with the level estimated), but
    two stairs of 2 sd each at phi = 0.8 in 9 of 100 only: that row is beyond the design, not the
    estimate. The residual phi of flat noise at phi = 0.8 falls to 0.43 at its 5% quantile over the
    refits, below its median at phi = 0.5 (0.49): the spread the significance margin must cover.
    Bounds: two series (rates) or 0.05 (phi) of room."""
    def known(name: str, phi: float) -> float:
        return run_cell(SHAPES[name], 4.0, phi, range(100), "plateau", noise=true_long_run_sd(phi))["exact"]

    assert known("rise-10", 0.5) >= 0.97
    assert known("rise-10", 0.8) >= 0.95
    assert known("stairs-2", 0.8) <= 0.11
    spread = {r["phi"]: r["phi_quantiles"] for r in noise_spread([0.5, 0.8], range(100), cells=(("flat", 1.0),))}
    assert spread[0.8][1] < spread[0.5][2]
    assert spread[0.8][1] <= 0.48 and spread[0.5][2] >= 0.44


def test_known_noise_is_an_option_of_the_plateau_detector(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--known-noise", "--detector", "binseg", "--seeds", "1"])
    assert "--known-noise is an option of the plateau detector" in capsys.readouterr().err


@pytest.mark.slow
def test_residual_noise_model_many_seeds():
    """100 seeds per cell, noise_model="residual" (docs/stages.md): measured exactly two on stairs-2 at
    phi = 0.5 in 84/100, exactly one on rise-10 at phi = 0.8 in 91/100, false alarms on flat noise at
    phi = 0.5 in 5/100 and at phi = 0.8 in 18/100 (the last is above the 5% target). Bounds: two series
    of room."""
    rows = {(name, phi): run_cell(SHAPES[name], 1.0 if name == "flat" else 8.0, phi, range(100), "plateau",
                                  noise_model="residual")
            for name, phi in (("stairs-2", 0.5), ("rise-10", 0.8), ("flat", 0.5), ("flat", 0.8))}
    assert rows["stairs-2", 0.5]["exact"] >= 0.82
    assert rows["rise-10", 0.8]["exact"] >= 0.89
    assert rows["flat", 0.5]["any"] <= 0.07
    assert rows["flat", 0.8]["any"] <= 0.20


# window around the ICL milestone (the step where the ICL score reaches half its final value) in which
# the onset of the LLC rise must lie: the rise starts before the behaviour has half changed. With a
# fixed noise level (PlateauTracker(noise=6.0)) the onsets of the three seeds are 115 and 60 steps before
# and 5 after the milestone (benchmarks/data/icl_llc.json); the window adds 35-45 steps of room
ICL_WINDOW = (-150, 50)


def test_icl_example_llc_series():
    """The in-context regression example's recorded llc/mean series (seeds 0-2, benchmarks/data/icl_llc.json).

    Measured with the default tracker: seeds 1 and 2 give one increase, onsets 40 steps before and 25
    steps after the ICL milestone (steps 360 vs 400, 400 vs 375); seed 0 gives none (its rise from 6 to
    55 over 8 points is fitted first as one ramp over the whole window, whose S-shaped residuals read
    as phi = 0.9 and put sigma_lr at 54, docs/stages.md). Nothing spurious on any seed.
    """
    from bench_stages import icl_check

    found = icl_check()
    assert [r["seed"] for r in found] == [0, 1, 2]
    hits = 0
    for r in found:
        assert all(d == "increase" for _, d, _ in r["found"]) and len(r["found"]) <= 1, r
        for onset, _, _ in r["found"]:
            assert ICL_WINDOW[0] <= onset - r["icl_half"] <= ICL_WINDOW[1], r
            hits += 1
    assert hits >= 2
