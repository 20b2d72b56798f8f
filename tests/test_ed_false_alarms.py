"""False alarms of EssentialDynamics' turning points on trajectories with no development, and the
decision that follows from them: the StageDetector does not act on them unless asked.

The series come from benchmarks/bench_ed_turning_points.py (the same generators and the same
feeding as the callback); its full run over 100 seeds is tabulated in docs/essential_dynamics.md.
"""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import pytest
import torch

_spec = importlib.util.spec_from_file_location(
    "bench_ed_turning_points", Path(__file__).resolve().parents[1] / "benchmarks" / "bench_ed_turning_points.py"
)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)  # type: ignore[union-attr]


def alarms(phi: float, parameterization: str, seeds: range, n: int = 100, alpha: float | None = 0.01) -> int:
    """Series (of ``seeds``) on which anything was published."""
    return sum(bool(bench.published(bench.ar1_noise(s, n, phi), parameterization, alpha=alpha)) for s in seeds)


def test_noise_tests_remove_false_alarms_on_stationary_noise() -> None:
    """Seeds 0-3, 100 snapshots. Measured on seeds 0-7: without the tests (``alpha=None``) every
    series has turning points (2-5 each in arc length on i.i.d. noise, 4-5 in time on AR(1) noise
    with phi 0.8); with them 3/8 arc-length series keep one, and no time series."""
    assert alarms(0.0, "arclength", range(4), alpha=None) == 4
    assert alarms(0.0, "arclength", range(4)) == 0
    assert alarms(0.8, "time", range(4), alpha=None) == 4
    assert alarms(0.8, "time", range(4)) == 0


def test_random_walks_still_raise_false_alarms() -> None:
    """A random walk's top principal components are smooth curves that really turn (2-5 turning
    points per 100-snapshot walk on seeds 0-7, with or without the tests). This is why turning
    points stay off the rules by default; if this test fails because the detector got better,
    update docs/essential_dynamics.md and reconsider that default."""
    assert alarms(1.0, "time", range(3)) == 3
    assert alarms(1.0, "arclength", range(3)) == 3


# series of 100 with a turning point on the final basis (100 snapshots, alpha=0.01), measured by
# benchmarks/bench_ed_turning_points.py: {(parameterization, phi): count}
FINAL_FEED_ALARMS = {
    ("arclength", 0.0): 7, ("arclength", 0.5): 9, ("arclength", 0.8): 49, ("arclength", 1.0): 93,
    ("time", 0.0): 0, ("time", 0.5): 0, ("time", 0.8): 3, ("time", 1.0): 52,
}


@pytest.mark.slow
@pytest.mark.parametrize(("parameterization", "phi"), list(FINAL_FEED_ALARMS))
def test_false_alarm_rates_on_100_noise_series(parameterization: str, phi: float) -> None:
    """The docs' table, row by row (final basis, 100 seeds). The series are fixed by their seeds;
    +-3 series allows for a borderline case that another BLAS rounds the other way."""
    rows = bench.noise_row(phi, 100, parameterization, 100, "final", alpha=0.01)
    assert abs(rows["series_with_alarm"] - FINAL_FEED_ALARMS[parameterization, phi]) <= 3, rows


# --------------------------------------------------------------------------------------------------
# The consequence: off the rules unless a rule or the detector's monitor names "ed/trajectory"
# --------------------------------------------------------------------------------------------------
pl = pytest.importorskip("lightning.pytorch")

from devinterp_lightning import tags  # noqa: E402
from devinterp_lightning.callbacks.essential_dynamics import EssentialDynamics  # noqa: E402
from devinterp_lightning.callbacks.stage_detector import StageDetector  # noqa: E402
from devinterp_lightning.rules import AlertRule  # noqa: E402


class _Walker(pl.LightningModule):
    """Output = a parameter pulled along a two-segment path: one real turn, at step 60."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.register_buffer("way", torch.randn(3, 16, generator=g) * 3)
        self.w = torch.nn.Parameter(self.way[0].clone())

    def forward(self, x):
        return x * self.w

    def training_step(self, batch, batch_idx):
        seg = min(self.global_step // 60, 1)
        frac = min((self.global_step - 60 * seg) / 60, 1.0)
        loss = ((self.w - (self.way[seg] + frac * (self.way[seg + 1] - self.way[seg]))) ** 2).sum()
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.4)


def _fit(callbacks) -> None:
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(200, 1)), batch_size=1)
    trainer = pl.Trainer(max_steps=150, callbacks=callbacks, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, accelerator="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(_Walker(), loader)


def test_a_default_stage_detector_does_not_act_on_turning_points() -> None:
    ed = EssentialDynamics(torch.ones(1, 16), every_n_steps=3, image_every_n_snapshots=0, parameterization="time")
    det = StageDetector(monitor="train_loss", every_n_steps=5)
    _fit([ed, det])
    assert ed.published_transitions(tags.ED_TRAJECTORY)  # the turn was found and published ...
    # ... but the detector, watching only its monitor, adopted none of it
    assert tags.ED_TRAJECTORY not in det.keys
    assert all(t.monitor != tags.ED_TRAJECTORY for t in det.all_transitions)


def test_a_halt_rule_on_turning_points_draws_a_warning() -> None:
    rule = AlertRule(name="stop_on_turn", monitor=tags.ED_TRAJECTORY, kind="turning_point", actions=["halt"])
    ed = EssentialDynamics(torch.ones(1, 16), every_n_steps=3, image_every_n_snapshots=0)
    trainer = pl.Trainer(max_steps=1, callbacks=[ed, StageDetector(monitor=tags.ED_TRAJECTORY, rules=[rule])],
                         logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, accelerator="cpu")
    with pytest.warns(UserWarning, match=r"stop_on_turn.*pure-noise"):
        ed.setup(trainer, _Walker(), "fit")
    quiet = AlertRule(name="log_turn", monitor=tags.ED_TRAJECTORY, kind="turning_point", actions=["log"])
    trainer = pl.Trainer(max_steps=1, callbacks=[ed, StageDetector(monitor=tags.ED_TRAJECTORY, rules=[quiet])],
                         logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, accelerator="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ed.setup(trainer, _Walker(), "fit")
