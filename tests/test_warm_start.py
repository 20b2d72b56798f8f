"""Warm-started chains (``estimate_llcs(warm_start=ChainOffsets(...))``, ``LLCMonitor(warm_start=...)``)."""

from __future__ import annotations

import statistics

import lightning.pytorch as pl
import pytest
import torch
from noisy_cases import dln_case, make_loader
from test_estimator import mse, regression_data
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from devinterp_lightning import estimate_llcs
from devinterp_lightning.sampling.estimator import WARM_START_KEEPS
from devinterp_lightning.sampling.warm_start import ChainOffsets

FAST = dict(lr=1e-4, localization=10.0, nbeta=50.0, num_chains=3, num_draws=20, num_burnin_steps=30)


def regression_loader() -> DataLoader:
    x, y, _ = regression_data(n=256)
    return DataLoader(TensorDataset(x, y), batch_size=64)


def linear_model() -> tuple[nn.Module, DataLoader]:
    """A linear model at its noise-free teacher (a minimum, so the estimates are healthy)."""
    model = nn.Linear(4, 3, bias=False)
    with torch.no_grad():
        model.weight.copy_(regression_data(n=256)[2])
    return model, regression_loader()


def test_a_warm_run_starts_at_w_star_plus_the_stored_offsets() -> None:
    model, loader = linear_model()
    offsets = torch.randn(3, 12, generator=torch.Generator().manual_seed(1)) * 0.05
    warm = ChainOffsets(burnin_steps=0, offsets={("llc",): offsets.clone()})
    # a step size so small that no chain moves: every draw is the loss at w* + offset
    res = estimate_llcs(model, mse, {"llc": (loader, None)}, lr=1e-20, localization=0.0, nbeta=1.0, num_chains=3,
                        num_draws=1, num_burnin_steps=5, seed=0, warm_start=warm)["llc"]
    batch = next(iter(loader))
    expected = []
    with torch.no_grad():
        for lane in range(3):
            shifted = nn.Linear(4, 3, bias=False)
            shifted.weight.copy_(model.weight + offsets[lane].view(3, 4))
            expected.append(float(mse(shifted, batch) - mse(model, batch)))
    assert res.mean == pytest.approx(statistics.mean(expected), rel=1e-4)
    assert warm.warm_runs == 1 and warm.cold_runs == 0


def test_offsets_are_stored_and_a_changed_layout_starts_cold() -> None:
    model, loader = linear_model()
    warm = ChainOffsets(burnin_steps=4)
    steps: list[int] = []
    estimate_llcs(model, mse, {"llc": (loader, None)}, seed=0, warm_start=warm, **FAST,
                  progress=lambda done, total: steps.append(done))
    assert warm.cold_runs == 1 and warm.offsets[("llc",)].shape == (3, 12)
    assert float(warm.offsets[("llc",)].abs().max()) > 0
    cold_steps = len(steps)
    steps.clear()
    estimate_llcs(model, mse, {"llc": (loader, None)}, seed=1, warm_start=warm, **FAST,
                  progress=lambda done, total: steps.append(done))
    assert warm.warm_runs == 1
    assert cold_steps - len(steps) == FAST["num_burnin_steps"] - 4  # the warm run's shorter burn-in
    # another chain count: the stored offsets do not fit, so the run starts at w*
    estimate_llcs(model, mse, {"llc": (loader, None)}, seed=2, warm_start=warm, **{**FAST, "num_chains": 2})
    assert warm.cold_runs == 2 and warm.offsets[("llc",)].shape == (2, 12)
    warm.reset()
    assert not warm.offsets


def test_restricted_lanes_keep_zero_offsets_outside_their_restriction() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5, bias=False), nn.Linear(5, 3, bias=False))
    loader = regression_loader()
    with torch.no_grad():  # a factorization of the teacher: a minimum
        model[0].weight.copy_(torch.linalg.pinv(model[1].weight) @ regression_data(n=256)[2])
    warm = ChainOffsets()
    estimate_llcs(model, mse, {"first": (loader, "0.*"), "second": (loader, "1.*")}, seed=0, warm_start=warm,
                  **FAST)
    stored = warm.offsets[("first", "second")]  # one group: the two jobs share the loader
    assert stored.shape == (6, 20 + 15)
    assert torch.all(stored[:3, 20:] == 0) and torch.all(stored[3:, :20] == 0)
    assert torch.all(stored[:3, :20] != 0) and torch.all(stored[3:, 20:] != 0)


def test_burnin_steps_must_be_a_non_negative_int() -> None:
    with pytest.raises(ValueError, match="burnin_steps must be an int >= 0"):
        ChainOffsets(burnin_steps=-1)


# At the monitor's default step size and localization (lr 1e-4, localization 100: the flat
# directions relax over ~1 / (lr * localization / 2) = 200 steps), on the noisy DLN 3-4-4-3 r2 at
# its empirical minimiser (B 256, epoch order, default nbeta). Over 8 groups of 3 sampler seeds
# (seeds 0-23, 4 chains x 100 draws per estimate), the mean of the fifth warm-started estimate (10
# burn-in steps each) divided by the mean of cold estimates with 1000 burn-in steps (equilibrium)
# was 0.876 .. 1.084 (1.023 for seeds 0-2; an estimate flagged off the posterior drops its offsets,
# so a sequence may restart cold once); cold estimates with the default 50 burn-in steps gave
# 0.63 .. 1.00 of it (0.82 on average: short of equilibrium, but too noisy per group for a test to
# pin). Tolerance 15% against a measured largest deviation of 12.4%. (All are far below lambda = 4.5 at these
# settings, where the localization dominates this small model: the test is about equilibrium.)
@pytest.mark.slow
def test_warm_started_estimates_reach_the_equilibrium_of_a_long_cold_burnin() -> None:
    case = dln_case([3, 4, 4, 3], 2, n=2048, seed=0)
    loader = make_loader(case, 256, "epoch", seed=0)
    settings = dict(lr=1e-4, localization=100.0, num_chains=4, num_draws=100)

    def estimate(seed: int, burnin: int, warm: ChainOffsets | None = None) -> float:
        return estimate_llcs(case.model, case.loss_fn, {"llc": (loader, None)}, num_burnin_steps=burnin, seed=seed,
                             warm_start=warm, **settings)["llc"].mean

    equilibrium, warmed = [], []
    for seed in range(3):
        equilibrium.append(estimate(seed, 1000))
        warm = ChainOffsets(burnin_steps=10)
        warmed.append([estimate(100 * seed + k, 50, warm) for k in range(5)][-1])
        assert warm.warm_runs >= 3 and warm.warm_runs + warm.cold_runs == 5
    assert statistics.mean(warmed) == pytest.approx(statistics.mean(equilibrium), rel=0.15), (equilibrium, warmed)


class AtTeacher(pl.LightningModule):
    """A linear model started at its noise-free teacher and trained with a tiny step: it stays at
    a minimum, so every estimate is healthy and its chains' offsets are kept."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 3, bias=False)
        with torch.no_grad():
            self.layer.weight.copy_(regression_data(n=256)[2])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)

    def training_step(self, batch, batch_idx):
        return mse(self, batch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-6)

    def train_dataloader(self) -> DataLoader:
        return regression_loader()


def test_the_monitor_warm_starts_every_estimate_after_the_first_by_default() -> None:
    from devinterp_lightning import LLCMonitor

    runs = {}
    for warm in (True, False, 3):
        monitor = LLCMonitor(mse, data=regression_loader(), every_n_steps=3, progress=False,
                             **{**FAST, "warm_start": warm})
        pl.Trainer(max_steps=10, callbacks=[monitor], logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False).fit(AtTeacher())
        points = monitor.history["llc/mean"]
        assert not any(set(p.flags) - WARM_START_KEEPS for p in points)  # no estimate drops its offsets
        runs[warm] = [p.value for p in points]
        if warm is False:
            assert monitor.chain_offsets is None
        else:
            assert (monitor.chain_offsets.warm_runs, monitor.chain_offsets.cold_runs) == (3, 1)
            assert monitor.chain_offsets.burnin_steps == (10 if warm is True else 3)
    assert runs[True][0] == runs[False][0]  # the first estimate of a fit starts cold
    assert runs[True][1:] != runs[False][1:]
    with pytest.raises(ValueError, match="warm_start must be True, False or a burn-in step count"):
        LLCMonitor(mse, warm_start=-2)


def test_offsets_of_chains_that_slid_off_a_maximum_are_dropped() -> None:
    class Peak(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.zeros(3))

    def downhill(model: nn.Module, batch) -> torch.Tensor:  # w* = 0 is a maximum: the LLC is negative
        return -(model.w**2).sum()

    loader = [torch.zeros(1)]
    warm = ChainOffsets()
    res = estimate_llcs(Peak(), downhill, {"llc": (loader, None)}, seed=0, warm_start=warm, **FAST)["llc"]
    assert "negative" in res.flags
    assert not warm.offsets and warm.discarded == 1
