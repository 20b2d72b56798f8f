"""The builders of the noisy suite put the model at the exact empirical minimiser they claim."""

from __future__ import annotations

import copy

import pytest
import torch
from noisy_cases import dln_case, full_loss, linear_case, make_loader, reduced_rank_minimiser, rrr_case

from devinterp_lightning import theory

CASES = [
    lambda seed: linear_case(4, 3, n=2048, seed=seed),
    lambda seed: rrr_case(4, 2, 4, 2, n=2048, seed=seed),
    lambda seed: rrr_case(4, 4, 4, 2, n=2048, seed=seed),
    lambda seed: dln_case([3, 4, 4, 3], 2, n=2048, seed=seed),
]


def _end_to_end(model: torch.nn.Module) -> torch.Tensor:
    w = None
    for layer in model:
        w = layer.weight.double() if w is None else layer.weight.double() @ w
    return w


@pytest.mark.parametrize("build", CASES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gradient_vanishes_at_w_star(build, seed: int) -> None:
    case = build(seed)
    loss = full_loss(case)
    grads = torch.autograd.grad(loss, list(case.model.parameters()))
    # float32 weights from a float64 solution: the gradient is rounding-level (~1e-6), against
    # O(1) gradients at a random point
    assert max(float(g.abs().max()) for g in grads) < 1e-4


@pytest.mark.parametrize("build", CASES)
def test_no_lower_loss_at_nearby_rank_r_points(build) -> None:
    case = build(0)
    x, y = case.dataset.tensors
    w_star = _end_to_end(case.model).detach()
    base = float(0.5 * ((x.double() @ w_star.T - y.double()) ** 2).sum(dim=1).mean())
    u, s, vh = torch.linalg.svd(w_star)
    r = case.rank
    b, a = u[:, :r] * s[:r], vh[:r]
    g = torch.Generator().manual_seed(1)
    for eps in (1e-3, 1e-2, 1e-1):
        for _ in range(20):
            w = (b + eps * torch.randn(b.shape, generator=g, dtype=b.dtype)) @ (
                a + eps * torch.randn(a.shape, generator=g, dtype=a.dtype))
            loss = float(0.5 * ((x.double() @ w.T - y.double()) ** 2).sum(dim=1).mean())
            assert loss >= base - 1e-9, (eps, loss, base)


def test_reduced_rank_minimiser_matches_least_squares_at_full_rank() -> None:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(500, 4, generator=g), torch.randn(500, 3, generator=g)
    w = reduced_rank_minimiser(x, y, 3)
    ls = torch.linalg.lstsq(x.double(), y.double()).solution.T
    assert torch.allclose(w, ls, atol=1e-10)


def test_layers_multiply_to_the_minimiser_and_are_balanced() -> None:
    case = dln_case([3, 4, 4, 3], 2, n=2048, seed=0)
    x, y = case.dataset.tensors
    assert torch.allclose(_end_to_end(case.model), reduced_rank_minimiser(x, y, 2), atol=1e-5)
    w1, w2, w3 = (layer.weight.double() for layer in case.model)
    assert torch.allclose(w2.T @ w2, w1 @ w1.T, atol=1e-5)
    assert torch.allclose(w3.T @ w3, w2 @ w2.T, atol=1e-5)


def test_theory_values() -> None:
    assert linear_case(4, 3, n=64).llc == 6.0
    assert rrr_case(4, 2, 4, 2, n=64).llc == theory.reduced_rank_regression(4, 4, 2, 2)
    assert dln_case([3, 4, 4, 3], 2, n=64).llc == theory.deep_linear_network([3, 4, 4, 3], 2) == 4.5


def test_noise_and_loss_scale() -> None:
    case = linear_case(4, 3, n=20000, sigma=2.0, seed=0)
    # at the least-squares fit the residual is the noise: loss ~ 0.5 * d_out * (1 - d_in/n)
    assert abs(float(full_loss(case).detach()) - 1.5) < 0.05
    assert case.num_params == 12


@pytest.mark.parametrize("mode", ["epoch", "replacement"])
def test_loaders_are_deterministic_per_seed(mode: str) -> None:
    case = linear_case(2, 1, n=256)
    first = [b[0] for b in make_loader(case, 32, mode, seed=3)]
    again = [b[0] for b in make_loader(case, 32, mode, seed=3)]
    other = [b[0] for b in make_loader(case, 32, mode, seed=4)]
    assert len(first) == 8 and all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(torch.cat(first), torch.cat(other))
    seen = torch.cat(first)
    if mode == "epoch":  # every sample once
        assert torch.equal(seen.sort(dim=0).values, case.dataset.tensors[0].sort(dim=0).values)
    copy.deepcopy(case)  # the case is a plain picklable bundle
