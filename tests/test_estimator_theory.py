"""The SGLD estimator against closed-form learning coefficients (devinterp_lightning.theory).

Setting for the networks: noise-free teacher, the estimate is taken *at* the teacher, loss =
sum over outputs of the squared error, mean over the batch; inputs x ~ N(0, I), so the
population loss is ||(product of layers) - (teacher product)||_F^2.

The teacher is the "aligned" rank-r point: every layer is ``Q_{l+1}[:, :r] Q_l[:, :r]^T`` with
random orthonormal bases ``Q_l``, so every layer has rank r and the product has r unit singular
values. Aoyagi's formulas give the learning coefficient of the whole true parameter set, which
is attained at such most-degenerate points; at a generic teacher (layers of higher rank, small
singular values) the finite-nbeta estimate wanders 10-25% either way (measured, see
docs/estimator.md).

Settings (nbeta=1000, localization=10, lr=5e-5, 8 chains) were chosen from a sweep: nbeta >>
localization puts the sampler in the asymptotic regime, lr * nbeta * (top Hessian eigenvalue
~2-4) ~ 0.1-0.2 keeps the discretization bias below a few percent. Tolerances come from the
measured spread over seeds (noted next to each); each seed changes teacher bases, data and noise.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from devinterp_lightning import estimate_llc, estimate_llcs, theory

NET = dict(lr=5e-5, nbeta=1000.0, localization=10.0, num_chains=8)


def teacher_network(widths: list[int], rank: int, seed: int) -> nn.Sequential:
    g = torch.Generator().manual_seed(seed)
    bases = [torch.linalg.qr(torch.randn(w, w, generator=g))[0][:, :rank] for w in widths]
    layers = [nn.Linear(a, b, bias=False) for a, b in zip(widths[:-1], widths[1:], strict=True)]
    with torch.no_grad():
        for i, layer in enumerate(layers):
            layer.weight.copy_(bases[i + 1] @ bases[i].T)
    return nn.Sequential(*layers)


def teacher_loader(model: nn.Module, input_dim: int, seed: int, *, subspace: int | None = None,
                   n: int = 4096, batch_size: int = 256) -> DataLoader:
    g = torch.Generator().manual_seed(seed + 1000)
    x = torch.randn(n, input_dim, generator=g)
    if subspace is not None:
        x[:, subspace:] = 0  # inputs confined to the first `subspace` coordinates
    with torch.no_grad():
        y = model(x)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True)


def sq_error(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return ((model(x) - y) ** 2).sum(dim=1).mean()


def relative_error(estimate: float, truth: float) -> float:
    return abs(estimate - truth) / truth


# ---------------------------------------------------------------- fast (default run)


def test_regular_model_gives_half_the_dimension() -> None:
    # linear regression y = W x, W in R^{3x4}: regular, lambda = 12/2 = 6.
    # Seeds 0-4 (8 chains x 400 draws): relative errors -1.8% .. +1.8%.
    torch.manual_seed(0)
    model = nn.Linear(4, 3, bias=False)
    loader = teacher_loader(model, 4, seed=0)
    res = estimate_llc(model, sq_error, loader, **NET, num_draws=400, num_burnin_steps=100, seed=0)
    assert relative_error(res.mean, theory.regular(12)) < 0.06, res.mean


def test_quadratic_potential_gives_one_half() -> None:
    # loss = w^2 (a normal crossing with k=1): lambda = normal_crossing([1]) = 1/2.
    # The exact localized value is nbeta/(2 nbeta + gamma) = 0.49998; lr * nbeta * 2 = 0.1 adds a
    # discretization bias of ~+2.6%. Seeds 0-4 (64 chains x 400 draws): -4.9% .. +8.5% (stderr ~4%).
    model = Potential(1)
    res = estimate_llc(model, potential_loss([1]), dummy_loader(), lr=5e-6, nbeta=1e4, localization=1.0,
                       num_chains=64, num_draws=400, num_burnin_steps=100, seed=0)
    assert relative_error(res.mean, theory.normal_crossing([1])) < 0.12, res.mean


def test_last_layer_restriction_counts_identifiable_weights() -> None:
    # DLN 3-4-4-3 at a rank-2 teacher, only the last layer moves: a linear regression in W3 on
    # features P x with rank(P) = 2, so lambda = (output_dim * rank P) / 2 = 3 (not the DLN's 4.5).
    # Seeds 0-4 (8 chains x 400 draws): -8.1% .. +3.6%.
    widths, rank = [3, 4, 4, 3], 2
    model = teacher_network(widths, rank, seed=0)
    loader = teacher_loader(model, widths[0], seed=0)
    features_rank = int(torch.linalg.matrix_rank(model[1].weight @ model[0].weight))
    expected = widths[-1] * features_rank / 2
    assert expected == 3.0
    res = estimate_llc(model, sq_error, loader, **NET, num_draws=400, num_burnin_steps=100,
                       restrict="2.*", seed=0)
    assert relative_error(res.mean, expected) < 0.12, res.mean


# ---------------------------------------------------------------- potentials


class Potential(nn.Module):
    """Parameters w only; the loss is a polynomial in w and ignores the data."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(dim))


def potential_loss(k: list[int]):
    powers = 2 * torch.tensor(k, dtype=torch.float32)

    def loss(model: nn.Module, batch) -> torch.Tensor:
        return (model.w.abs() ** powers).prod()

    return loss


def dummy_loader() -> DataLoader:
    return DataLoader(TensorDataset(torch.zeros(4, 1)), batch_size=4)


@pytest.mark.slow
@pytest.mark.parametrize(
    "k, lr, tol",
    [
        # prod w_i^(2 k_i); seeds 0-2 (16 chains x 2000 draws): k=[2]: -6.9% .. +1.4%,
        # k=[3]: -7.1% .. +2.2%
        ([2], 1e-4, 0.12),
        ([3], 3e-4, 0.12),
        # k=[1,2]: lambda=1/4 with multiplicity 1, but the next exponent (1/2) is close, so the
        # finite-nbeta value sits below lambda: seeds 0-2: -12.9% .. +0.1%.
        ([1, 2], 1e-4, 0.20),
    ],
)
def test_normal_crossing_potentials(k: list[int], lr: float, tol: float) -> None:
    res = estimate_llc(Potential(len(k)), potential_loss(k), dummy_loader(), lr=lr, nbeta=1e4,
                       localization=1.0, num_chains=16, num_draws=2000, num_burnin_steps=500, seed=0)
    assert relative_error(res.mean, theory.normal_crossing(k)) < tol, res.mean


# ---------------------------------------------------------------- networks


@pytest.mark.slow
@pytest.mark.parametrize(
    "input_dim, output_dim, hidden_dim, rank, tol",
    [
        # seeds 0-2, relative errors:
        (3, 3, 3, 1, 0.13),  # lambda 4.0: -9.6% .. -3.1%
        (4, 4, 4, 2, 0.08),  # lambda 7.5: -2.8% .. 0.0%
        (6, 4, 4, 2, 0.08),  # lambda 10.0: -1.3% .. +2.2%
        (4, 3, 3, 1, 0.13),  # lambda 5.0, multiplicity 2 (log correction, biased low): -9.5% .. -6.5%
    ],
)
def test_reduced_rank_regression(input_dim: int, output_dim: int, hidden_dim: int, rank: int, tol: float) -> None:
    widths = [input_dim, hidden_dim, output_dim]
    model = teacher_network(widths, rank, seed=0)
    res = estimate_llc(model, sq_error, teacher_loader(model, input_dim, seed=0), **NET,
                       num_draws=2000, num_burnin_steps=500, seed=0)
    truth = theory.reduced_rank_regression(input_dim, output_dim, hidden_dim, rank)
    assert relative_error(res.mean, truth) < tol, (res.mean, truth)


@pytest.mark.slow
@pytest.mark.parametrize(
    "widths, rank, tol",
    [
        # seeds 0-2, relative errors:
        ([3, 4, 4, 3], 2, 0.08),  # lambda 4.5: -2.9% .. +2.5%
        ([4, 3, 3, 4], 2, 0.08),  # lambda 6.5: -3.5% .. +2.3%
        ([3, 4, 3, 2], 2, 0.14),  # lambda 3.0: +6.7% .. +10.3% (biased high at this nbeta)
    ],
)
def test_deep_linear_network(widths: list[int], rank: int, tol: float) -> None:
    model = teacher_network(widths, rank, seed=0)
    res = estimate_llc(model, sq_error, teacher_loader(model, widths[0], seed=0), **NET,
                       num_draws=2000, num_burnin_steps=500, seed=0)
    truth = theory.deep_linear_network(widths, rank)
    assert relative_error(res.mean, truth) < tol, (res.mean, truth)


@pytest.mark.slow
def test_data_restriction_equals_smaller_network() -> None:
    # RRR 6 -> 4 (hidden 4) at a rank-2 teacher: lambda 10. With inputs confined to 3 of the 6
    # coordinates, the weights on the other 3 inputs are unidentifiable and the model is an RRR
    # 3 -> 4 (hidden 4) at a rank-2 teacher: lambda 6. Both come from one estimate_llcs call.
    # Seeds 0-2: full -1.3% .. +2.2%, restricted -3.6% .. -1.0%.
    widths, rank = [6, 4, 4], 2
    model = teacher_network(widths, rank, seed=0)
    full = teacher_loader(model, 6, seed=0)
    sub = teacher_loader(model, 6, seed=0, subspace=3)
    with torch.no_grad():
        assert int(torch.linalg.matrix_rank(model(torch.eye(6)[:3]))) == rank  # the restricted map keeps rank 2
    res = estimate_llcs(model, sq_error, {"full": (full, None), "sub": (sub, None)}, **NET,
                        num_draws=2000, num_burnin_steps=500, seed=0)
    assert relative_error(res["full"].mean, theory.reduced_rank_regression(6, 4, 4, rank)) < 0.08
    assert relative_error(res["sub"].mean, theory.reduced_rank_regression(3, 4, 4, rank)) < 0.08
    assert math.isfinite(res["sub"].mean)
