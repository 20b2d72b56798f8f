"""The worker's in-process half: snapshot requests and the model-copy sampler (no process started)."""

from __future__ import annotations

import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from devinterp_lightning.sampling.estimator import estimate_llcs
from devinterp_lightning.sampling.settings import SGLDSettings
from devinterp_lightning.sampling.worker import (
    SnapshotSampler,
    death_notice,
    derive_seed,
    pack_payload,
    snapshot_request,
)


def mse(model: nn.Module, batch) -> torch.Tensor:
    return F.mse_loss(model(batch[0]), batch[1])


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 2))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_snapshot_sampled_on_a_copy_is_bitwise_the_estimate_on_the_live_model(seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 5, generator=g)
    loader = DataLoader(TensorDataset(x, x[:, :2] ** 2), batch_size=16, shuffle=True)
    jobs = {"llc": (loader, None), "llc/out": (loader, "3.*")}
    settings = SGLDSettings(lr=1e-3, localization=100.0, num_chains=2, num_draws=6, num_burnin_steps=2)
    live = _model(seed)
    live.train()(x)  # move the BatchNorm statistics away from their initial values
    request = snapshot_request(live, 7, settings, derive_seed(3, 7, 0))
    # the worker's copy starts from other weights (those pickled at start-up) and is overwritten
    copy = SnapshotSampler.from_payload(pack_payload(_model(seed + 100), mse, jobs))
    got = copy.estimate(request)
    expected = estimate_llcs(live, mse, jobs, settings=settings, seed=derive_seed(3, 7, 0))
    for name in jobs:
        assert torch.equal(got[name].loss_trace, expected[name].loss_trace), name
        assert got[name].mean == expected[name].mean
    assert request.nbytes == sum(t.numel() * 4 for t in live.state_dict().values() if t.is_floating_point()) + 8


def test_derive_seed_is_distinct_per_step_and_rank_and_stable():
    seeds = {derive_seed(0, step, rank) for step in range(50) for rank in range(4)}
    assert len(seeds) == 200 and all(0 <= s < 2**63 for s in seeds)
    assert derive_seed(5, 10, 1) == derive_seed(5, 10, 1)


def test_unpicklable_parts_are_named_with_the_fix():
    with pytest.raises(TypeError, match="sends loss_fn .*not a lambda"):
        pack_payload(_model(0), lambda m, b: mse(m, b), {})
    gen = (b for b in [1])
    with pytest.raises(TypeError, match="sends the probe data .*a generator .*cannot be sent"):
        pack_payload(_model(0), mse, {"llc": (gen, None)})
    pickle.dumps(pack_payload(_model(0), mse, {}))  # a payload is plain bytes


def test_a_dead_worker_notice_says_how_it_ended_and_gives_the_spawn_hint_only_for_an_error_exit():
    # a spawned worker that exits with an error before it is ready: most often an unguarded main script
    error = death_notice(12, 1, 3, started=False, start_method="spawn")
    assert "died with exit code 1 while 3 estimate(s) were in flight before it had started" in error
    assert "if __name__ ==" in error
    # killed from outside (a timeout's SIGTERM, the OOM killer's SIGKILL): no guess at a cause
    killed = death_notice(12, -15, 8, started=False, start_method="spawn")
    assert "was killed by signal SIGTERM (exit code -15) while 8 estimate(s)" in killed
    assert "if __name__" not in killed
    running = death_notice(12, -9, 1, started=True, start_method="fork")
    assert running.endswith("was killed by signal SIGKILL (exit code -9) while 1 estimate(s) were in flight")
