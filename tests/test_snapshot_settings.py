"""The public sampling contracts: SGLDSettings validation and the snapshot helpers."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from devinterp_lightning.sampling.settings import SGLDSettings
from devinterp_lightning.sampling.snapshot import (
    cuda_devices,
    forked_rng,
    preserved_modes,
    resolve_restriction,
    take_snapshot,
)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [("lr", 0.0, "lr must be"), ("localization", -1.0, "localization must be"), ("nbeta", float("inf"), "nbeta"),
     ("num_chains", 0, "num_chains"), ("num_draws", 2.5, "num_draws"), ("num_burnin_steps", -1, "num_burnin_steps"),
     ("num_steps_bw_draws", True, "num_steps_bw_draws")],
)
def test_settings_reject_bad_values_with_the_field_name(field: str, value: object, message: str) -> None:
    kwargs = {"lr": 1e-3, "localization": 1.0, field: value}
    with pytest.raises(ValueError, match=message):
        SGLDSettings(**kwargs)


def test_keywords_override_settings_and_lr_is_required() -> None:
    base = SGLDSettings(lr=1e-3, localization=10.0, num_draws=50)
    merged = SGLDSettings.from_kwargs(base, lr=2e-3, num_draws=None)
    assert (merged.lr, merged.num_draws, merged.localization) == (2e-3, 50, 10.0)
    assert SGLDSettings(lr=1e-3, localization=1.0, num_burnin_steps=5, num_draws=3, num_steps_bw_draws=2).total_steps == 10
    with pytest.raises(TypeError, match="lr"):
        SGLDSettings.from_kwargs(None, localization=1.0)
    with pytest.raises(TypeError, match="unknown SGLD settings"):
        SGLDSettings.from_kwargs(base, step_size=1.0)


def test_estimate_llc_accepts_a_settings_object_and_matches_keywords() -> None:
    from devinterp_lightning import estimate_llc

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    x = torch.randn(64, 3)
    batches = [(x[i : i + 16], x[i : i + 16].sum(1, keepdim=True)) for i in range(0, 64, 16)]

    def loss(m, b):
        return torch.nn.functional.mse_loss(m(b[0]), b[1])

    settings = SGLDSettings(lr=1e-3, localization=10.0, nbeta=10.0, num_chains=2, num_draws=20)
    a = estimate_llc(model, loss, batches, settings=settings, seed=3)
    b = estimate_llc(model, loss, batches, lr=1e-3, localization=10.0, nbeta=10.0, num_chains=2, num_draws=20, seed=3)
    assert a.mean == b.mean


def test_forked_rng_restores_torch_python_and_numpy_streams() -> None:
    torch.manual_seed(1)
    random.seed(1)
    np.random.seed(1)
    expected = (torch.rand(1).item(), random.random(), np.random.rand())
    torch.manual_seed(1)
    random.seed(1)
    np.random.seed(1)
    with forked_rng(host=True, seed=123):
        torch.rand(5), random.random(), np.random.rand(3)
    assert (torch.rand(1).item(), random.random(), np.random.rand()) == expected


def test_snapshot_modes_restrictions_and_devices() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5), torch.nn.BatchNorm1d(2))
    model.train()
    model[1].eval()
    with preserved_modes(model, eval_mode=True):
        assert not any(m.training for m in model.modules())
    assert [m.training for m in model.modules()] == [True, True, False, True]
    snap = take_snapshot(model, torch.device("cpu"), torch.float64)
    assert snap.params["0.weight"].dtype == torch.float64 and snap.params["0.weight"] is not model[0].weight
    assert snap.buffers["2.num_batches_tracked"].dtype == torch.long
    masks = resolve_restriction("0.*", dict(model.named_parameters()), "layer0")
    assert sorted(masks) == ["0.bias", "0.weight"]
    with pytest.raises(ValueError, match="matches no parameter.*0.weight"):
        resolve_restriction("nope.*", dict(model.named_parameters()), "bad")
    assert cuda_devices("cpu") == [] and cuda_devices(None) == []
