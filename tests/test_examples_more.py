"""The grokking and superposition examples run, and their full runs show the documented transitions.

Fast tests run each example for a few steps with few SGLD draws; the full default runs are slow.
The margins of the slow tests come from seeds 0, 1, 2 (docs/examples.md has the tables).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LAYERS = ("embed", "hidden", "unembed")
HALVES = ("nowrap", "wrap")


def test_modular_addition_data_is_a_split_of_all_pairs() -> None:
    from examples.grokking import modular_addition

    d = modular_addition(p=7, train_fraction=0.5, seed=3)
    x = __import__("torch").cat([d["train_x"], d["test_x"]])
    assert len(d["train_y"]) == 24 and len(d["test_y"]) == 25
    assert len({tuple(r) for r in x.tolist()}) == 49  # every pair exactly once
    assert (d["train_y"] == d["train_x"].sum(1) % 7).all()


def test_grokking_short_run(tmp_path: Path) -> None:
    from examples import grokking

    out = grokking.main(["--logdir", str(tmp_path), "--max-steps", "60", "--num-draws", "10", "--quiet"])
    llc = out["llc"]
    assert llc["steps"] == [0, 20, 40, 60]
    for name in ("all", *LAYERS, *HALVES):
        assert len(llc[name]) == 4 and all(math.isfinite(v) for v in llc[name])
    assert out["curve"]["steps"] == [0, 20, 40]  # evaluated in training_step, before steps 0..59
    assert set(out["milestones"]) == {"start", "peak", "end"}
    assert set(out["milestones"]["end"]) == {"step", "all", *LAYERS, *HALVES}
    assert list(tmp_path.rglob("events.out.tfevents.*"))
    # memorization is under way: train accuracy rises from chance (~1/31) to above 0.5 by step 60
    assert out["curve"]["train_acc"][0] < 0.1 < 0.5 < out["curve"]["train_acc"][-1]
    # the embedding's LLC is ~0 at initialization (N(0,1) embeddings: the loss is flat in them)
    assert abs(llc["embed"][0]) < 0.5 < llc["embed"][-1]


def test_superposition_short_run(tmp_path: Path) -> None:
    from examples import superposition

    out = superposition.main(["--logdir", str(tmp_path), "--max-steps", "100", "--llc-every", "50",
                              "--num-draws", "20", "--quiet"])
    assert out["llc"]["steps"] == [0, 50, 100]
    assert all(math.isfinite(v) for v in out["llc"]["values"])
    assert out["feature_counts"]["steps"][:3] == [0, 10, 20]
    # from the small initialization nothing is represented yet: the origin is a saddle and its
    # LLC estimate is flagged (negative / below_init)
    assert out["final_features"] == 0 and out["count_changes"] == []
    assert "negative" in out["llc"]["flags"][0]
    assert len(out["feature_norms"]) == 6
    assert list(tmp_path.rglob("events.out.tfevents.*"))


@pytest.mark.slow
def test_grokking_full_run_llc_peaks_at_memorization_and_falls(tmp_path: Path) -> None:
    """Measured on seeds 0 / 1 / 2 (default settings):

    memorized (train acc 1.0) at step 80 / 80 / 80; test acc 0.8 at 1880 / 1160 / 1060;
    LLC peak at step 60 (77 / 76 / 79), end 24 / 22 / 21 (end/peak 0.31 / 0.30 / 0.26);
    changepoints (the binseg detector of 0.1): increase with onset 60 (all seeds), decrease with onset
    340 / 400 / 400 (seed 2 also a second decrease at 1000). The plateau detector (the default since)
    on seed 0: one decrease with onset 60, the peak, and no increase: the LLC rises from the very
    first estimate (21 at step 0 to 77 at step 60), so there is no plateau before the rise, and a
    rise without a plateau before it is not a transition (docs/stages.md). End/peak per layer: embed 0.36 / 0.29 / 0.28,
    hidden 0.14 / 0.12 / 0.12, unembed 0.28 / 0.29 / 0.22; nowrap vs wrap at the end
    21.5 vs 21.7 / 19.7 vs 20.1 / 19.2 vs 18.7; no estimate flagged.
    """
    from examples import grokking

    out = grokking.main(["--logdir", str(tmp_path), "--quiet"])
    mem, half, final = out["memorized_step"], out["test_acc_0.5_step"], out["final_test_acc"]
    assert mem is not None and mem <= 120
    assert half is not None and half > 4 * mem  # grokking: generalization long after memorization
    assert final > 0.8
    assert not any(out["llc"]["flags"])
    peak = out["milestones"]["peak"]
    assert abs(peak["step"] - mem) <= 40
    rises = [t for t in out["transitions"] if t["direction"] == "increase"]
    falls = [t for t in out["transitions"] if t["direction"] == "decrease"]
    # the rise from initialization starts at the first estimate: no plateau before it, no transition
    assert rises == []
    # one smooth decline, one transition: its onset at the peak, within two LLC intervals of
    # memorization and long before the test accuracy reaches 0.5
    assert len(falls) == 1 and abs(falls[0]["changepoint_step"] - peak["step"]) <= 40
    assert abs(falls[0]["changepoint_step"] - mem) <= 40 and falls[0]["changepoint_step"] < half / 4
    end = out["milestones"]["end"]
    assert end["all"] < 0.4 * peak["all"]
    ratios = {n: end[n] / peak[n] for n in LAYERS}
    assert ratios["hidden"] < 0.2 and ratios["hidden"] < min(ratios["embed"], ratios["unembed"])
    # the change is not specific to wrap-around pairs: both halves end within 10 % of each other
    assert abs(end["nowrap"] - end["wrap"]) < 0.1 * (end["nowrap"] + end["wrap"]) / 2


@pytest.mark.slow
def test_superposition_full_run_llc_rises_when_features_form(tmp_path: Path) -> None:
    """Measured on seeds 0 / 1 / 2 (default settings):

    feature-count changes 630 (0->2), 750 (->3), 1180 (->4) / 630 (0->1), 880, 950, 1950 (->4) /
    790 (0->1), 840 (->3), 990 (->4); LLC rises (onset) 900 / 1100 / 950, i.e. +150 / +150 / -40
    (+110 after the 3-feature step) from the nearest count change; first rise 270 / 470 / 160 steps
    after the first feature (re-measured with warm-started chains; before them: 850 / 1100 and 2200 /
    950); unflagged LLC before the first feature ~0.9,
    from 400 steps after it ~1.75 (rise 0.8 / 0.75 / 0.95); only the origin's estimates flagged.
    """
    from examples import superposition

    out = superposition.main(["--logdir", str(tmp_path), "--quiet"])
    changes = out["count_changes"]
    assert changes and changes[0]["before"] == 0 and out["final_features"] >= 3
    first = changes[0]["step"]
    change_steps = [c["step"] for c in changes]
    rises = [t for t in out["transitions"] if t["direction"] == "increase"]
    assert rises and not [t for t in out["transitions"] if t["direction"] == "decrease"]
    assert 0 <= rises[0]["changepoint_step"] - first <= 500
    # every rise starts shortly after (or one LLC interval before) a change of the feature count
    for t in rises:
        assert any(-100 <= t["changepoint_step"] - c <= 300 for c in change_steps), (t, change_steps)
    steps, values, flags = out["llc"]["steps"], out["llc"]["values"], out["llc"]["flags"]
    before = [v for s, v, f in zip(steps, values, flags, strict=True) if s < first and not f]
    after = [v for s, v, f in zip(steps, values, flags, strict=True) if s > first + 400 and not f]
    assert sum(after) / len(after) > sum(before) / len(before) + 0.4
