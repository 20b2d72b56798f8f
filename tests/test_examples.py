"""The examples run, and the DLN demo finds the stages the theory predicts.

Fast tests run each example for a few steps; the full-length DLN run is marked slow.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from examples import _common  # noqa: E402


def test_find_loss_drops_on_a_staircase() -> None:
    # three smooth drops (sigmoids in log-loss) at known steps, with multiplicative noise
    import numpy as np

    rng = np.random.default_rng(0)
    steps = np.arange(1500)
    log_loss = 4.0 - sum(1.5 / (1 + np.exp(-(steps - c) / 15.0)) for c in (200, 500, 1000))
    losses = np.exp(log_loss + 0.01 * rng.standard_normal(steps.size))
    drops = _common.find_loss_drops(steps.tolist(), losses.tolist())
    assert [d.step for d in drops] == pytest.approx([200, 500, 1000], abs=10)
    assert all(d.factor == pytest.approx(math.exp(1.5), rel=0.1) for d in drops)
    # a flat noisy curve has no drops
    assert _common.find_loss_drops(steps.tolist(), np.exp(0.05 * rng.standard_normal(steps.size)).tolist()) == []


def test_format_table_aligns_columns() -> None:
    text = _common.format_table(["a", "bb"], [[1, 2.5], [None, 12345.0]])
    lines = text.splitlines()
    assert len({len(line) for line in lines}) == 1 and lines[1].startswith("-")


def test_deep_linear_network_short_run(tmp_path: Path) -> None:
    from examples import deep_linear_network as dln

    out = dln.main(["--logdir", str(tmp_path), "--max-steps", "120", "--llc-every", "40", "--num-draws", "20",
                    "--no-final-llc", "--quiet"])
    assert out["llc"]["steps"] == [0, 40, 80, 120]
    assert all(math.isfinite(v) for v in out["llc"]["values"])
    assert out["final"] is None
    # TensorBoard events were written
    assert list(tmp_path.rglob("events.out.tfevents.*"))
    # nothing has been learned yet in 120 steps (the first drop comes near step 190)
    assert out["loss_drops"] == [] and out["transitions"] == []


def test_lightning_cli_config_runs(tmp_path: Path) -> None:
    from examples.lightning_cli.main import main

    cli = main(["fit", "--config", str(ROOT / "examples/lightning_cli/config.yaml"), "--trainer.max_steps", "80",
                "--trainer.logger.init_args.save_dir", str(tmp_path),
                "--trainer.enable_progress_bar", "false"])
    monitor = next(cb for cb in cli.trainer.callbacks if type(cb).__name__ == "LLCMonitor")
    assert [p.step for p in monitor.history.get("llc/mean")] == [0, 40, 80]


@pytest.mark.slow
def test_deep_linear_network_full_run_finds_the_stages(tmp_path: Path) -> None:
    """The default run: stages line up with the loss drops and the LLC rises plateau by plateau.

    Measured (seed 0, docs/examples.md): loss drops at steps 193, 486, 1037; LLC changepoints
    (onset) at 520 and 1080, i.e. 34 and 43 steps after the drops (one LLC interval is 40 steps);
    plateau LLCs 6.45 +- 0.31, 10.7 +- 0.18, 13.1 +- 0.22 for 1, 2, 3 learned singular values.
    """
    from examples import deep_linear_network as dln

    out = dln.main(["--logdir", str(tmp_path), "--quiet"])
    drops = [d["step"] for d in out["loss_drops"]]
    # saddle-to-saddle: one drop per teacher singular value, at times ~ 1/s_k
    assert drops == pytest.approx([190, 490, 1040], abs=30)
    rises = [t for t in out["transitions"] if t["direction"] == "increase" and t["kind"] == "changepoint"]
    assert len(out["transitions"]) == len(rises) == 2  # no spurious changepoints
    # the LLC on the origin's plateau is not estimable (all flagged), so the first rise it can see
    # is the second loss drop; each onset lies within two LLC intervals after its loss drop
    for t, d in zip(rises, drops[1:], strict=True):
        assert 0 <= t["changepoint_step"] - d <= 80
    # each detected transition saved a checkpoint
    assert len(out["checkpoints"]) == 2
    plateaus = {p["learned_rank"]: p for p in out["plateaus"]}
    levels = [plateaus[k]["llc"] for k in (1, 2, 3)]
    spreads = [plateaus[k]["llc_spread"] for k in (1, 2, 3)]
    for lo, hi, s_lo, s_hi in zip(levels, levels[1:], spreads, spreads[1:], strict=False):
        assert hi - lo > 5 * max(s_lo, s_hi)  # rises by far more than the scatter on a plateau
    # and stays below the theory value of a teacher of that rank (localization, docs/examples.md)
    assert all(plateaus[k]["llc"] < plateaus[k]["theory"] for k in (1, 2, 3))
    # the final estimate with weak localization: 23.3 +- 1.0 measured, theory 28
    assert 20.0 < out["final"]["llc"] < out["final"]["theory"]


@pytest.mark.slow
def test_deep_linear_network_calibrated_without_hand_tuning_rises_plateau_by_plateau(tmp_path: Path) -> None:
    """No SGLD setting by hand: LLCMonitor(calibrate="once") retries while the network sits at the
    origin and keeps the first calibration that passes (on the first plateau); the series still
    rises plateau by plateau, and what the detector reports is a real rise.

    Measured (seed 0, warm-started chains, the default): plateaus 5.86 +- 0.40, 9.94 +- 0.23,
    12.07 +- 0.35; one transition, onset 520 (35 steps after the second loss drop), confirmed at
    1280. With cold chains the same seed also confirms the rise at 1080 (at step 1520 of 1600);
    seeds 1 and 2 (one run each, partly before the calibration's relaxation rule of #11) found one
    and none (warm), none and one (cold): the second rise is confirmed so
    close to the run's end that one flagged point decides it (docs/monitor.md, "Choosing the
    defaults"). Hand-set settings: 6.45, 10.7, 13.1.
    """
    from examples import deep_linear_network as dln

    out = dln.main(["--logdir", str(tmp_path), "--quiet", "--calibrate", "--no-final-llc"])
    drops = [d["step"] for d in out["loss_drops"]]
    assert out["transitions"], "the first rise (onset 520 in the measured run) was not found"
    for t in out["transitions"]:  # every reported transition is one of the rises, at its onset
        assert t["direction"] == "increase"
        assert min((t["changepoint_step"] - d for d in drops[1:] if t["changepoint_step"] >= d), default=10**9) <= 80
    plateaus = {p["learned_rank"]: p for p in out["plateaus"]}
    levels = [plateaus[k]["llc"] for k in (1, 2, 3)]
    spreads = [plateaus[k]["llc_spread"] for k in (1, 2, 3)]
    for lo, hi, s_lo, s_hi in zip(levels, levels[1:], spreads, spreads[1:], strict=False):
        assert hi - lo > 5 * max(s_lo, s_hi)
