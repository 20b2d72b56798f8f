"""Chain diagnostics (rank-normalised split R-hat, multi-chain ESS) against an independent reference.

The reference below is written from the formulas of Vehtari, Gelman, Simpson, Carpenter & Buerkner
(2021), "Rank-normalization, folding, and localization: An improved R-hat for assessing convergence
of MCMC", Bayesian Analysis 16(2), in plain NumPy with direct (non-FFT) autocovariances, as ArviZ
publishes them. ``ARVIZ`` holds values that ArviZ 0.23.4 (``az.rhat(method="rank")``,
``az.ess(method="bulk" | "mean")``) returned for the same arrays, as a second, external check.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np
import pytest
import torch

from devinterp_lightning.sampling.result import (
    RHAT_LIMIT,
    effective_sample_size,
    mean_stderr,
    rank_normalize,
    split_chains,
    split_rhat,
)

# ----------------------------------------------------------------------------- NumPy reference


def ref_split(x: np.ndarray) -> np.ndarray:
    half = x.shape[1] // 2
    return np.concatenate([x[:, :half], x[:, x.shape[1] - half:]], axis=0)


def ref_ranks(flat: np.ndarray) -> np.ndarray:
    """1-based ranks, ties given their average rank."""
    ranks = np.empty(flat.size)
    order = np.argsort(flat, kind="mergesort")
    i = 0
    while i < flat.size:
        j = i
        while j + 1 < flat.size and flat[order[j + 1]] == flat[order[i]]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def ref_z(x: np.ndarray) -> np.ndarray:
    """Paper eq. 14: z = Phi^-1((r - 3/8) / (S - 2 * 3/8 + 1))."""
    r = ref_ranks(x.ravel())
    inv = NormalDist().inv_cdf
    return np.array([inv(v) for v in (r - 0.375) / (x.size + 0.25)]).reshape(x.shape)


def ref_rhat_plain(x: np.ndarray) -> float:
    n = x.shape[1]
    w = x.var(axis=1, ddof=1).mean()
    b = n * x.mean(axis=1).var(ddof=1)
    return math.sqrt(((n - 1) / n * w + b / n) / w)


def ref_rhat(x: np.ndarray) -> float:
    s = ref_split(x)
    folded = np.abs(s - np.median(s))
    return max(ref_rhat_plain(ref_z(s)), ref_rhat_plain(ref_z(folded)))


def ref_ess_core(x: np.ndarray) -> float:
    """Paper section 3.2: rho_t = 1 - (W - mean_m acov_{m,t}) / var_plus; Geyer's initial positive
    and monotone sequences; tau = -1 + 2 sum rho (+ the positive even lag at the cut)."""
    m, n = x.shape
    c = x - x.mean(axis=1, keepdims=True)
    acov = np.array([[np.dot(c[k, : n - t], c[k, t:]) / n for t in range(n)] for k in range(m)]).mean(0)
    w = acov[0] * n / (n - 1)
    var_plus = w * (n - 1) / n + (x.mean(axis=1).var(ddof=1) if m > 1 else 0.0)
    rho_hat = 1 - (w - acov) / var_plus
    rho = np.zeros(n)
    rho[0], rho[1] = 1.0, rho_hat[1]
    t, even, odd = 1, 1.0, rho_hat[1]
    while t < n - 3 and even + odd > 0:
        even, odd = rho_hat[t + 1], rho_hat[t + 2]
        if even + odd >= 0:
            rho[t + 1], rho[t + 2] = even, odd
        t += 2
    max_t = t - 2
    if even > 0:
        rho[max_t + 1] = even
    for t in range(1, max_t - 1, 2):
        if rho[t + 1] + rho[t + 2] > rho[t - 1] + rho[t]:
            rho[t + 1] = rho[t + 2] = (rho[t - 1] + rho[t]) / 2
    tau = -1 + 2 * rho[: max_t + 1].sum() + rho[max_t + 1 : max_t + 2].sum()
    return m * n / max(tau, 1 / math.log10(m * n))


def ref_ess(x: np.ndarray, method: str) -> float:
    s = ref_split(x)
    return ref_ess_core(ref_z(s) if method == "bulk" else s)


def ar1(chains: int, draws: int, phi: float, seed: int) -> np.ndarray:
    """Stationary AR(1) chains with unit marginal variance."""
    rng = np.random.default_rng(seed)
    e = rng.standard_normal((chains, draws))
    x = np.zeros((chains, draws))
    x[:, 0] = e[:, 0]
    for t in range(1, draws):
        x[:, t] = phi * x[:, t - 1] + math.sqrt(1 - phi**2) * e[:, t]
    return x


def shifted(seed: int = 4) -> np.ndarray:
    """The issue's example: two iid chains of 800 draws, one shifted by one standard deviation."""
    x = np.random.default_rng(seed).standard_normal((2, 800))
    x[0] += 1.0
    return x


def arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    return {
        "ar0.9": ar1(4, 200, 0.9, 1),
        "ar0.5_odd": ar1(3, 101, 0.5, 2),
        "anti": ar1(4, 200, -0.6, 3),
        "shift": shifted(),
        "iid": rng.standard_normal((4, 200)),
        "cauchy": rng.standard_cauchy((4, 100)),
        "ties": rng.integers(0, 5, (4, 50)).astype(float),
        "trend": rng.standard_normal((2, 40)) + np.linspace(0, 3, 40),
        "one_chain": ar1(1, 64, 0.3, 5),
    }


#: (rank R-hat, bulk ESS, mean ESS) from ArviZ 0.23.4 on the arrays of the same names
ARVIZ = {
    "ar0.9": (1.1069447132021542, 35.91430335645828, 36.83419468882853),
    "ar0.5_odd": (1.0263392632470587, 137.36519094985755, 133.87704907342783),
    "anti": (0.998992511570686, 2322.471989593555, 2322.471989593555),
    "shift": (1.1450706707165978, 9.569493987290805, 9.639921705548216),
}

# ---------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("name", list(arrays()))
def test_rhat_and_ess_match_the_reference(name: str) -> None:
    x = arrays()[name]
    t = torch.tensor(x)
    if x.shape[0] > 1:
        assert split_rhat(t) == pytest.approx(ref_rhat(x), rel=1e-9)
    assert effective_sample_size(t) == pytest.approx(ref_ess(x, "bulk"), rel=1e-9)
    assert effective_sample_size(t, "mean") == pytest.approx(ref_ess(x, "mean"), rel=1e-9)


@pytest.mark.parametrize("name", list(ARVIZ))
def test_rhat_and_ess_match_arviz(name: str) -> None:
    rhat, bulk, mean = ARVIZ[name]
    t = torch.tensor(arrays()[name])
    assert split_rhat(t) == pytest.approx(rhat, rel=1e-9)
    assert effective_sample_size(t) == pytest.approx(bulk, rel=1e-9)
    assert effective_sample_size(t, "mean") == pytest.approx(mean, rel=1e-9)


def test_one_shifted_chain_gives_a_small_multichain_ess() -> None:
    x = shifted()
    # the old diagnostic summed per-chain ESS values: each chain alone is iid, ~800 apiece
    per_chain_sum = sum(ref_ess_core(x[c:c + 1]) for c in range(2))
    assert per_chain_sum > 1400
    assert effective_sample_size(torch.tensor(x)) < 12
    assert split_rhat(torch.tensor(x)) > 1.1


def test_rank_normalisation_makes_diagnostics_invariant_to_monotone_maps() -> None:
    x = torch.tensor(ar1(4, 200, 0.7, 9))
    assert split_rhat(torch.exp(3 * x)) == pytest.approx(split_rhat(x), rel=1e-12)
    assert effective_sample_size(torch.exp(3 * x)) == pytest.approx(effective_sample_size(x), rel=1e-12)


def test_rank_normalize_and_split_shapes() -> None:
    x = torch.tensor([[3.0, 1.0, 2.0], [2.0, 5.0, 4.0]])
    z = rank_normalize(x)
    # ranks 4, 1, 2.5 / 2.5, 6, 5 of S = 6 draws
    ranks = torch.tensor([[4.0, 1.0, 2.5], [2.5, 6.0, 5.0]], dtype=torch.float64)
    assert torch.allclose(z, torch.special.ndtri((ranks - 0.375) / 6.25))
    assert split_chains(torch.arange(10.0).reshape(2, 5)).tolist() == [[0, 1], [5, 6], [3, 4], [8, 9]]


def test_degenerate_inputs() -> None:
    assert math.isnan(split_rhat(torch.zeros(4, 3)))
    assert split_rhat(torch.ones(4, 10)) == 1.0
    assert effective_sample_size(torch.ones(4, 10)) == 40.0
    assert effective_sample_size(torch.zeros(2, 3)) == 6.0
    with pytest.raises(ValueError, match="'bulk' or 'mean'"):
        effective_sample_size(torch.zeros(2, 10), method="tail")


@pytest.mark.parametrize("name", [k for k, v in arrays().items() if v.shape[1] >= 4])
def test_mean_stderr_is_sd_over_root_mean_ess(name: str) -> None:
    x = arrays()[name]
    assert mean_stderr(torch.tensor(x)) == pytest.approx(x.std(ddof=1) / math.sqrt(ref_ess(x, "mean")), rel=1e-9)


def test_mean_stderr_covers_the_mean_of_autocorrelated_chains() -> None:
    """4 AR(0.9) chains x 200 draws (ESS ~ 40, the SGLD regime), true mean 0, 200 seeds: mean +- 2 stderr
    covered 0 in 95% of runs (0.9475 over 400 seeds; also 0.95 for AR(0) and AR(0.5)); the old
    ``std(chain means) / sqrt(4)`` covered it in 86% (a t with 3 degrees of freedom: 0.861)."""
    new, old = [], []
    for seed in range(200):
        x = ar1(4, 200, 0.9, seed)
        new.append(abs(x.mean()) <= 2 * mean_stderr(torch.tensor(x)))
        old.append(abs(x.mean()) <= 2 * x.mean(axis=1).std(ddof=1) / 2)
    assert 0.92 <= np.mean(new) <= 0.98
    assert np.mean(old) < 0.9


def test_mean_stderr_degenerate_layouts() -> None:
    assert mean_stderr(torch.tensor([[1.0, 2.0], [3.0, 5.0]])) == pytest.approx(float(torch.tensor([1.5, 4.0]).std()) / 2 ** 0.5)
    assert math.isnan(mean_stderr(torch.ones(1, 3)))
    assert mean_stderr(torch.ones(2, 10)) == 0.0


def test_rhat_limit_on_healthy_and_shifted_chains() -> None:
    """4 AR(0.78) chains x 200 draws: bulk ESS ~ 105, as measured for calibrated SGLD on the regular
    cases (docs/calibration.md). Over 100 seeds RHAT_LIMIT flags 1 healthy run (500 seeds: 99th
    percentile 1.10; the paper's 1.01 would flag nearly all, median 1.03); with one chain
    shifted by one marginal sd it flags 84 of 100."""
    healthy = [split_rhat(torch.tensor(ar1(4, 200, 0.78, s))) for s in range(100)]
    assert sum(r > RHAT_LIMIT for r in healthy) <= 3
    assert np.median(healthy) > 1.01
    bad = []
    for s in range(100):
        x = ar1(4, 200, 0.78, s)
        x[0] += 1.0
        bad.append(split_rhat(torch.tensor(x)))
    assert np.mean(np.array(bad) > RHAT_LIMIT) > 0.7


def test_extra_flags_survive_a_resummary_once_each() -> None:
    """A DDP merge re-summarizes gathered traces; flags the estimator attached must not be lost."""
    from devinterp_lightning.sampling.result import summarize_chains

    g = torch.Generator().manual_seed(0)
    init = torch.zeros(4, 50)
    loss = 0.01 + 0.001 * torch.randn(4, 50, generator=g)
    plain = summarize_chains(loss, init, 100.0, lr=1e-3, localization=1.0)
    merged = summarize_chains(loss, init, 100.0, lr=1e-3, localization=1.0,
                              extra_flags=("minibatch_noise", "minibatch_noise"))
    assert "minibatch_noise" not in plain.flags
    assert merged.flags == (*plain.flags, "minibatch_noise")
    assert not merged.healthy
