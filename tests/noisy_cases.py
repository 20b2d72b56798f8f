"""Builders of the noisy-data validation suite: linear maps, reduced-rank regression and deep
linear networks fitted to data with Gaussian label noise, each at its exact empirical minimiser.

Data: ``x ~ N(0, I)``, ``y = W0 x + sigma * N(0, I)`` with a teacher ``W0`` of the stated rank.
Loss: the per-sample Gaussian negative log-likelihood, batch mean, constants omitted:

    L_b(w) = mean_{i in b} 0.5 * ||y_i - f_w(x_i)||^2 / sigma^2

With ``X`` (n x d_in) and ``Y`` (n x d_out) the data, ``S = X^T X / n`` the (uncentred) sample
covariance and ``W_ls = Y^T X (X^T X)^{-1}`` the least-squares solution, the training loss of an
end-to-end matrix ``W`` is

    L(W) = L(W_ls) + 0.5 / sigma^2 * tr((W - W_ls) S (W - W_ls)^T),

so its minimiser over matrices of rank <= r is (Eckart-Young in the metric ``S``)

    W_r = U_r U_r^T W_ls,    U_r = the top-r left singular vectors of W_ls S^{1/2}

(equivalently ``[W_ls S^{1/2}]_r S^{-1/2}``, the rank-r truncation taken in the metric of S).
A product of layers is set to ``W_r`` by a balanced SVD: with ``W_r = U D V^T`` (r nonzero singular
values), layer ``l`` of ``L`` is ``Q_{l+1} D^{1/L} Q_l^T`` with ``Q_1 = V``, ``Q_{L+1} = U`` and the
first r coordinate vectors for every hidden layer; hidden units beyond r are zero.

Where every hidden width equals r (or there is one layer), ``w*`` is the global minimiser of the
training loss over the model. Where a hidden width exceeds r, ``w*`` is a critical point (the
gradient vanishes: the residual ``W_ls - W_r`` is orthogonal, in the metric S, to the row and
column spaces of every layer) and the minimiser over rank-r points, but the spare hidden units
could fit the residual, whose singular values are ~ sigma * sqrt(d / n): a sampler at inverse
temperature ``nbeta`` resolves that residual once ``nbeta`` approaches ``n / d``. The suite keeps
``nbeta << n``.

The learning coefficients come from :mod:`devinterp_lightning.theory`: d/2 for the linear map,
Aoyagi & Watanabe (2005) for reduced-rank regression, Aoyagi (2024) for deep linear networks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

from devinterp_lightning import theory

__all__ = [
    "NoisyCase", "dln_case", "full_loss", "gaussian_nll", "linear_case", "make_loader", "reduced_rank_minimiser",
    "rrr_case", "top_hessian_eigenvalue",
]


@dataclass
class NoisyCase:
    """One noisy regression problem at the exact empirical minimiser.

    Attributes:
        name: a short label for tables and test ids.
        model: ``nn.Sequential`` of bias-free ``nn.Linear`` layers, its parameters set to ``w*``.
        loss_fn: ``loss_fn(model, (x, y))``: the per-sample Gaussian NLL ``0.5 ||y - f(x)||^2 / sigma^2``
            averaged over the batch (constants omitted).
        dataset: ``TensorDataset(x, y)`` with ``y = teacher(x) + sigma * N(0, I)``.
        llc: the theoretical learning coefficient of the model at the teacher's rank.
        sigma: the label-noise standard deviation (the loss is scaled by ``1 / sigma^2``).
        rank: the rank of ``w*``'s end-to-end matrix (= the teacher's rank).
        widths: ``[d_in, hidden..., d_out]``.
    """

    name: str
    model: nn.Module
    loss_fn: Callable[[nn.Module, Any], Tensor]
    dataset: TensorDataset
    llc: float
    sigma: float = 1.0
    rank: int = 0
    widths: tuple[int, ...] = ()

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def gaussian_nll(sigma: float) -> Callable[[nn.Module, Any], Tensor]:
    """``loss_fn(model, (x, y)) = mean_i 0.5 * ||y_i - model(x_i)||^2 / sigma^2``."""
    scale = 0.5 / sigma**2

    def loss_fn(model: nn.Module, batch: Any) -> Tensor:
        x, y = batch
        return scale * ((model(x) - y) ** 2).sum(dim=1).mean()

    return loss_fn


def full_loss(case: NoisyCase, model: nn.Module | None = None) -> Tensor:
    """The training loss of ``model`` (default: the case's model) on the whole dataset."""
    x, y = case.dataset.tensors
    return case.loss_fn(case.model if model is None else model, (x, y))


def top_hessian_eigenvalue(case: NoisyCase, iterations: int = 50, seed: int = 0) -> float:
    """The largest eigenvalue ``h`` of the training loss's Hessian at ``w*`` (power iteration on
    Hessian-vector products); the ``h`` of the step-size rules of thumb."""
    params = dict(case.model.named_parameters())
    x, y = case.dataset.tensors

    def loss(p: dict[str, Tensor]) -> Tensor:
        return case.loss_fn(lambda inputs: torch.func.functional_call(case.model, p, (inputs,)), (x, y))

    g = torch.Generator().manual_seed(seed)
    v = {n: torch.randn(t.shape, generator=g) for n, t in params.items()}
    detached = {n: t.detach() for n, t in params.items()}
    value = 0.0
    for _ in range(iterations):
        norm = torch.sqrt(sum((t**2).sum() for t in v.values()))
        v = {n: t / norm for n, t in v.items()}
        _, hv = torch.func.jvp(torch.func.grad(loss), (detached,), (v,))
        value = float(sum((hv[n] * v[n]).sum() for n in v))
        v = hv
    return value


def reduced_rank_minimiser(x: Tensor, y: Tensor, rank: int) -> Tensor:
    """``W_r = U_r U_r^T W_ls``: the minimiser of ``sum_i ||y_i - W x_i||^2`` over ``rank(W) <= rank``.

    ``U_r`` holds the top-``rank`` left singular vectors of ``W_ls S^{1/2}``, ``S = X^T X / n``
    (see the module docstring). Computed in float64.
    """
    x, y = x.double(), y.double()
    gram = x.T @ x
    w_ls = torch.linalg.solve(gram, x.T @ y).T  # d_out x d_in
    evals, evecs = torch.linalg.eigh(gram / x.shape[0])
    sqrt_s = evecs @ torch.diag(evals.sqrt()) @ evecs.T
    u, _, _ = torch.linalg.svd(w_ls @ sqrt_s)
    u_r = u[:, :rank]
    return u_r @ u_r.T @ w_ls


def _balanced_layers(w: Tensor, widths: Sequence[int], rank: int) -> list[Tensor]:
    """Layers ``W_L ... W_1 = w`` (``w`` of rank ``rank``) by the balanced SVD of the module docstring."""
    num_layers = len(widths) - 1
    u, s, vh = torch.linalg.svd(w)
    u, s, v = u[:, :rank], s[:rank], vh[:rank].T
    root = torch.diag(s ** (1.0 / num_layers))
    bases = [v] + [torch.eye(h, dtype=w.dtype)[:, :rank] for h in widths[1:-1]] + [u]
    return [bases[i + 1] @ root @ bases[i].T for i in range(num_layers)]


def _teacher(d_in: int, d_out: int, rank: int, g: torch.Generator) -> Tensor:
    """A rank-``rank`` teacher: full rank Gaussian / sqrt(d_in) when ``rank = min(d_in, d_out)``,
    else ``P Q^T`` with random orthonormal ``P``, ``Q`` (unit singular values, far above the noise)."""
    if rank == min(d_in, d_out):
        return torch.randn(d_out, d_in, generator=g, dtype=torch.float64) / d_in**0.5
    p = torch.linalg.qr(torch.randn(d_out, d_out, generator=g, dtype=torch.float64))[0][:, :rank]
    q = torch.linalg.qr(torch.randn(d_in, d_in, generator=g, dtype=torch.float64))[0][:, :rank]
    return p @ q.T


def _build(name: str, widths: Sequence[int], rank: int, n: int, sigma: float, seed: int, llc: float) -> NoisyCase:
    widths = [int(w) for w in widths]
    if rank > min(widths):
        raise ValueError(f"rank {rank} is not realisable by widths {widths}")
    if n < 2 * widths[0]:
        raise ValueError(f"n={n} samples cannot determine a least-squares fit with {widths[0]} inputs")
    g = torch.Generator().manual_seed(seed)
    teacher = _teacher(widths[0], widths[-1], rank, g)
    x = torch.randn(n, widths[0], generator=g, dtype=torch.float64)
    y = x @ teacher.T + sigma * torch.randn(n, widths[-1], generator=g, dtype=torch.float64)
    w_star = reduced_rank_minimiser(x, y, rank)
    layers = [nn.Linear(a, b, bias=False) for a, b in zip(widths[:-1], widths[1:], strict=True)]
    with torch.no_grad():
        for layer, weight in zip(layers, _balanced_layers(w_star, widths, rank), strict=True):
            layer.weight.copy_(weight.float())
    return NoisyCase(
        name=name, model=nn.Sequential(*layers), loss_fn=gaussian_nll(sigma),
        dataset=TensorDataset(x.float(), y.float()), llc=llc, sigma=sigma, rank=rank, widths=tuple(widths),
    )


def linear_case(d_in: int, d_out: int, n: int, sigma: float = 1.0, seed: int = 0) -> NoisyCase:
    """One bias-free ``nn.Linear(d_in, d_out)`` at the least-squares solution: lambda = d_in d_out / 2."""
    rank = min(d_in, d_out)
    return _build(f"linear {d_in}->{d_out}", [d_in, d_out], rank, n, sigma, seed, theory.regular(d_in * d_out))


def rrr_case(
    d_in: int, d_mid: int, d_out: int, true_rank: int, n: int, sigma: float = 1.0, seed: int = 0
) -> NoisyCase:
    """Reduced-rank regression ``y = B A x`` (``A``: d_mid x d_in, ``B``: d_out x d_mid) at the rank-
    ``true_rank`` minimiser ``W_r`` factorised by a balanced SVD; lambda from Aoyagi & Watanabe (2005)."""
    llc = theory.reduced_rank_regression(d_in, d_out, d_mid, true_rank)
    return _build(f"RRR {d_in}-{d_mid}-{d_out} r{true_rank}", [d_in, d_mid, d_out], true_rank, n, sigma, seed, llc)


def dln_case(widths: Sequence[int], true_rank: int, n: int, sigma: float = 1.0, seed: int = 0) -> NoisyCase:
    """Deep linear network ``y = W_L ... W_1 x`` at the rank-``true_rank`` minimiser, balanced-SVD
    factorised; lambda from Aoyagi (2024) (:func:`devinterp_lightning.theory.deep_linear_network`)."""
    llc = theory.deep_linear_network(list(widths), true_rank)
    name = "DLN " + "-".join(str(w) for w in widths) + f" r{true_rank}"
    return _build(name, widths, true_rank, n, sigma, seed, llc)


def make_loader(
    case: NoisyCase, batch_size: int, mode: Literal["epoch", "replacement"], seed: int = 0
) -> DataLoader:
    """A loader over the case's data: ``"epoch"`` reshuffles and visits every sample once per pass,
    ``"replacement"`` draws each batch's samples uniformly with replacement (``len(dataset)`` per pass)."""
    g = torch.Generator().manual_seed(seed)
    if mode == "epoch":
        return DataLoader(case.dataset, batch_size=batch_size, shuffle=True, generator=g)
    if mode == "replacement":
        sampler = RandomSampler(case.dataset, replacement=True, num_samples=len(case.dataset), generator=g)
        return DataLoader(case.dataset, batch_size=batch_size, sampler=sampler)
    raise ValueError(f"mode must be 'epoch' or 'replacement'; got {mode!r}")
