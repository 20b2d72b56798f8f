"""Tests for the closed-form learning coefficients in devinterp_lightning.theory.

The reduced-rank-regression formula (Aoyagi & Watanabe 2005) is coded case by case, independently of
the deep-linear-network formula (Aoyagi 2024); their agreement for two-matrix networks, including the
multiplicities, is the main cross-check. Exact hand computations are shown next to the values.
"""

from __future__ import annotations

import itertools
from fractions import Fraction

import pytest
import torch

from devinterp_lightning import theory
from devinterp_lightning.theory import (
    _dln_exact,
    _rrr_exact,
    count_parameters,
    deep_linear_network,
    deep_linear_network_multiplicity,
    normal_crossing,
    normal_crossing_multiplicity,
    reduced_rank_regression,
    reduced_rank_regression_multiplicity,
    regular,
)

# every (widths, rank) with L in 1..3 matrices and widths in 1..5, or L = 4 and widths in 1..4
GRID = [
    (ws, r)
    for L, top in ((1, 5), (2, 5), (3, 5), (4, 4))
    for ws in itertools.product(range(1, top + 1), repeat=L + 1)
    for r in range(min(ws) + 1)
]


def test_lazy_top_level_access() -> None:
    import devinterp_lightning

    assert devinterp_lightning.theory.deep_linear_network is deep_linear_network


# ------------------------------------------------------------------------------------------ regular


@pytest.mark.parametrize("d", [0, 1, 2, 7, 1000])
def test_regular_is_half_the_dimension(d: int) -> None:
    assert regular(d) == d / 2


# ---------------------------------------------------------------------------------- normal crossing


@pytest.mark.parametrize(
    ("k", "h", "lam", "mult"),
    [
        ([1], None, 0.5, 1),  # K = w^2: (0+1)/(2*1)
        ([1, 2], None, 0.25, 1),  # min(1/2, 1/4)
        ([2, 1], [1, 0], 0.5, 2),  # (1+1)/(2*2) = 1/2 and (0+1)/(2*1) = 1/2: a tie
        ([1, 1, 3], [0, 2, 5], 0.5, 1),  # 1/2, 3/2, 6/6 = 1
        ([0, 2], None, 0.25, 1),  # k_0 = 0 does not enter K
        ([1, 1, 1], None, 0.5, 3),  # K = (w1 w2 w3)^2
        ([3, 3], [2, 2], 0.5, 2),  # 3/6 twice
    ],
)
def test_normal_crossing_examples(k: list[int], h: list[int] | None, lam: float, mult: int) -> None:
    assert normal_crossing(k, h) == lam
    assert normal_crossing_multiplicity(k, h) == mult


def test_normal_crossing_validation() -> None:
    with pytest.raises(ValueError, match="same length"):
        normal_crossing([1, 1], [0])
    with pytest.raises(ValueError, match="at least one k_i > 0"):
        normal_crossing([0, 0])
    with pytest.raises(ValueError, match=">= 0"):
        normal_crossing([1, -1])
    with pytest.raises(ValueError, match="integer"):
        normal_crossing([1.5])
    with pytest.raises(ValueError, match="sequence"):
        normal_crossing(3)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- reduced rank regression


@pytest.mark.parametrize(
    ("M", "N", "H", "r", "lam", "mult"),
    [
        # K = (b a)^2, case 1 (1 <= 2, 1 <= 2, 1 <= 2), M+N+H+r = 3 odd: [2*1*2 - 0 - 1 + 1]/8 = 1/2;
        # agrees with normal_crossing([1, 1]) = 1/2 with multiplicity 2.
        (1, 1, 1, 0, Fraction(1, 2), 2),
        # K = |b|^2 |a|^2, a in R^3, b in R^2: in polar coordinates min(2/2, 3/2) = 1, m = 1.
        # Case 1 (2 <= 4, 3 <= 3, 1 <= 5), sum 6 even: [2*1*5 - 1 - 1]/8 = 1.
        (3, 2, 1, 0, Fraction(1), 1),
        # Case 1, sum 6 even: [2*2*4 - 0 - 4]/8 = 12/8.
        (2, 2, 2, 0, Fraction(3, 2), 1),
        # Case 1, sum 13 odd: [2*3*10 - 0 - 9 + 1]/8 = 52/8.
        (5, 5, 3, 0, Fraction(13, 2), 2),
        # Case 2, M+H = 3 < N+r = 6: (HM - Hr + Nr)/2 = (2 - 1 + 5)/2 = 3.
        (2, 5, 1, 1, Fraction(3), 1),
        # Case 3, N+H = 4 < M+r = 7: (HN - Hr + Mr)/2 = (4 - 2 + 6)/2 = 4.
        (6, 2, 2, 1, Fraction(4), 1),
        # Case 4, M+N = 4 < H+r = 5: MN/2 = 2.
        (2, 2, 4, 1, Fraction(2), 1),
    ],
)
def test_reduced_rank_regression_hand_values(
    M: int, N: int, H: int, r: int, lam: Fraction, mult: int
) -> None:
    assert _rrr_exact(M, N, H, r) == (lam, mult)
    assert reduced_rank_regression(M, N, H, r) == pytest.approx(float(lam), abs=1e-12)
    assert reduced_rank_regression_multiplicity(M, N, H, r) == mult


def test_reduced_rank_regression_is_symmetric_in_input_and_output() -> None:
    # transposing y = B A x swaps M and N (cases 2 and 3 swap); the learning coefficient cannot change
    for M, N, H in itertools.product(range(1, 8), repeat=3):
        for r in range(min(M, N, H) + 1):
            assert _rrr_exact(M, N, H, r) == _rrr_exact(N, M, H, r)


def test_reduced_rank_regression_bottleneck_at_true_rank_is_manifold_dimension() -> None:
    # H = r: the model is the rank-r matrices near a rank-r truth, a manifold of dimension r(M+N-r)
    # (cases 1 with M = N, 2 and 3 all give r(M+N-r)/2).
    for M, N in itertools.product(range(1, 9), repeat=2):
        for r in range(1, min(M, N) + 1):
            assert _rrr_exact(M, N, r, r) == (Fraction(r * (M + N - r), 2), 1)


def test_reduced_rank_regression_wide_hidden_layer_is_regular_in_the_product() -> None:
    # case 4 (M + N < H + r): the product B A is locally a submersion, lambda = MN/2
    for M, N in itertools.product(range(1, 7), repeat=2):
        for H in range(M + N + 1, M + N + 4):
            for r in range(min(M, N) + 1):
                assert reduced_rank_regression(M, N, H, r) == M * N / 2


def test_reduced_rank_regression_validation() -> None:
    with pytest.raises(ValueError, match="exceeds min"):
        reduced_rank_regression(3, 3, 2, 3)
    with pytest.raises(ValueError, match="input_dim must be >= 1"):
        reduced_rank_regression(0, 3, 2, 0)
    with pytest.raises(ValueError, match="rank must be >= 0"):
        reduced_rank_regression(3, 3, 2, -1)
    with pytest.raises(ValueError, match="integer"):
        reduced_rank_regression(3, 3, 2.0, 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="integer"):
        reduced_rank_regression(True, 3, 2, 1)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ deep linear network


def test_two_layer_network_equals_reduced_rank_regression() -> None:
    # 1,808 configurations (widths 1..8): lambda and multiplicity agree exactly
    checked = 0
    for M, H, N in itertools.product(range(1, 9), repeat=3):
        for r in range(min(M, H, N) + 1):
            assert _dln_exact([M, H, N], r) == _rrr_exact(M, N, H, r), (M, H, N, r)
            checked += 1
    assert checked == 1808


@pytest.mark.parametrize(
    ("widths", "rank", "lam", "mult"),
    [
        # M_j = 3 - 0, all equal, Sigma = everything: ell = 4, S = 15, ceil(15/4) = 4, a = 15 - 3*4 = 3.
        # 3*1/16 - (4*3/4)(15/4)^2 + (1/2)*C(5,2)*9 = (3 - 675 + 720)/16 = 3; theta = 3*1 + 1 = 4.
        ([3, 3, 3, 3, 3], 0, Fraction(3), 4),
        # ell = 4, S = 10, ceil(10/4) = 3, a = 10 - 2*4 = 2:
        # 2*2/16 - 3*(10/4)^2 + (1/2)*10*4 = (1 - 75 + 80)/4 = 3/2; theta = 2*2 + 1 = 5.
        ([2, 2, 2, 2, 2], 0, Fraction(3, 2), 5),
        # M = [4, 2, 3, 5] -> sorted [2, 3, 4, 5]. Size 2: 5 < 1*4 fails. Size 3: 2*4 <= 9 < 2*5, ell = 2.
        # ceil(9/2) = 5, a = 9 - 4*2 = 1. (-1 + 1*(5+6))/2 + 1*1/8 - (2*1/4)(9/2)^2 + (6+8+12)/2
        # = 5 + 1/8 - 81/8 + 13 = 8; theta = 1*1 + 1 = 2.
        ([5, 3, 4, 6], 1, Fraction(8), 2),
        # K = |b|^2 c^2 |a|^2 with a, b in R^2, c scalar: min(2/2, 1/2, 2/2) = 1/2, m = 1.
        # Formula: sorted [1, 1, 2, 2], Sigma = all, ell = 3, S = 6, a = 6 - 1*3 = 3:
        # 0 - (3*2/4)*4 + (1 + 2 + 2 + 2 + 2 + 4)/2 = -6 + 13/2 = 1/2; theta = 1.
        ([2, 1, 1, 2], 0, Fraction(1, 2), 1),
    ],
)
def test_deep_linear_network_hand_values(widths: list[int], rank: int, lam: Fraction, mult: int) -> None:
    assert _dln_exact(widths, rank) == (lam, mult)
    assert deep_linear_network(widths, rank) == pytest.approx(float(lam), abs=1e-12)
    assert deep_linear_network_multiplicity(widths, rank) == mult


@pytest.mark.parametrize("L", range(1, 9))
def test_scalar_chain_is_normal_crossing(L: int) -> None:
    # widths all 1, rank 0: K = (w_1 ... w_L)^2, a normal crossing with lambda = 1/2 and m = L
    assert deep_linear_network([1] * (L + 1), 0) == normal_crossing([1] * L) == 0.5
    assert deep_linear_network_multiplicity([1] * (L + 1), 0) == normal_crossing_multiplicity([1] * L) == L


def test_single_matrix_is_regular() -> None:
    for M, N in itertools.product(range(1, 7), repeat=2):
        for r in range(min(M, N) + 1):
            assert _dln_exact([M, N], r) == (Fraction(M * N, 2), 1)
            assert deep_linear_network([M, N], r) == regular(count_parameters([M, N]))


def test_bottleneck_at_true_rank_gives_manifold_dimension() -> None:
    # if the narrowest width equals the rank, lambda = r(H_1 + H_{L+1} - r)/2, half the dimension of
    # the manifold of rank-r matrices (the extra widths only add symmetry directions)
    for ws, r in GRID:
        if r == min(ws):
            assert _dln_exact(ws, r)[0] == Fraction(r * (ws[0] + ws[-1] - r), 2), ws


def test_wide_hidden_layers_are_regular_in_the_product() -> None:
    # every hidden width > H_1 + H_{L+1} - r: the first two sorted reduced widths are input and output,
    # Sigma = {1, L+1}, ell = 1 and lambda = MN/2 at any depth (generalises RRR case 4)
    for M, N, depth in itertools.product(range(1, 5), range(1, 5), range(1, 6)):
        for r in range(min(M, N) + 1):
            hidden = [M + N - r + 1 + j for j in range(depth)]
            assert deep_linear_network([M, *hidden, N], r) == M * N / 2


def test_bounds_on_the_grid() -> None:
    for ws, r in GRID:
        lam, mult = _dln_exact(ws, r)
        d = count_parameters(ws)
        assert 0 < lam <= Fraction(d, 2), (ws, r)  # Watanabe (2009): 0 < lambda <= d/2
        assert mult >= 1
        # never above the regular value of the end-to-end N x M matrix, never below the rank-r part
        assert Fraction(r * (ws[0] + ws[-1] - r), 2) <= lam <= Fraction(ws[0] * ws[-1], 2), (ws, r)
    assert len(GRID) == 4358


def test_monotone_in_widths_and_rank_on_the_grid() -> None:
    # widening any layer or raising the teacher's rank never lowers lambda (for RRR this is read off the
    # case formulas: d lambda / dH = (M + N - H - r)/4 >= 0 in case 1, (M - r)/2 >= 0 in case 2, ...)
    for ws, r in GRID:
        lam = _dln_exact(ws, r)[0]
        for i in range(len(ws)):
            wider = list(ws)
            wider[i] += 1
            assert _dln_exact(wider, r)[0] >= lam, (ws, r, i)
        if r < min(ws):
            assert _dln_exact(ws, r + 1)[0] >= lam, (ws, r)


def test_bounded_in_depth() -> None:
    # Aoyagi (2024): the learning coefficient stays bounded as the number of layers grows, far below d/2
    for M, N, H, r in [(3, 4, 1, 0), (3, 4, 2, 0), (3, 4, 3, 1), (5, 2, 4, 2), (4, 4, 4, 0)]:
        values = [deep_linear_network([M, *([H] * k), N], r) for k in range(1, 60)]
        assert max(values) <= M * N / 2
        assert values[-1] < regular(count_parameters([M, *([H] * 59), N])) / 10


def test_count_parameters() -> None:
    assert count_parameters([3, 4, 2]) == 3 * 4 + 4 * 2
    assert count_parameters([5, 5]) == 25
    with pytest.raises(ValueError, match="at least the input and the output"):
        count_parameters([5])


def test_deep_linear_network_validation() -> None:
    with pytest.raises(ValueError, match="exceeds the narrowest width"):
        deep_linear_network([4, 2, 4], 3)
    with pytest.raises(ValueError, match=r"widths\[1\] must be >= 1"):
        deep_linear_network([4, 0, 4], 0)
    with pytest.raises(ValueError, match=r"widths\[0\] must be >= 1"):
        deep_linear_network([-2, 3], 0)
    with pytest.raises(ValueError, match="at least the input and the output"):
        deep_linear_network([4], 0)
    with pytest.raises(ValueError, match="rank must be >= 0"):
        deep_linear_network([4, 4], -1)
    with pytest.raises(ValueError, match="sequence"):
        deep_linear_network("345", 0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="exceeds the narrowest width"):
        deep_linear_network_multiplicity([2, 2], 3)


def test_accepts_integer_like_inputs() -> None:
    # numpy / torch integer scalars are common when widths come from model shapes
    widths = [torch.tensor(3).item(), 2, 3]
    assert deep_linear_network(tuple(widths), 1) == deep_linear_network([3, 2, 3], 1)
    np = pytest.importorskip("numpy")
    assert deep_linear_network(list(np.array([3, 2, 3])), np.int64(1)) == deep_linear_network([3, 2, 3], 1)


def test_public_names() -> None:
    for name in theory.__all__:
        assert callable(getattr(theory, name))
        assert getattr(theory, name).__doc__


# ------------------------------------------------------------------------- Monte Carlo cross-check


def _tempered_mean_beta_k(widths: list[int], rank: int, beta: float, n: int, seed: int) -> float:
    """beta * E_beta[K] under exp(-beta K) times the uniform prior on [-1, 1]^d.

    Self-normalised importance sampling from the prior. As beta -> inf this tends to lambda when the
    multiplicity is 1 (Z(beta) ~ c beta^-lambda, so -beta d log Z / d beta -> lambda), from below.
    """
    gen = torch.Generator().manual_seed(seed)
    d = count_parameters(widths)
    target = torch.zeros(widths[-1], widths[0], dtype=torch.float64)
    for i in range(rank):
        target[i, i] = 0.5
    chunk = 1_000_000
    losses = []
    for _ in range(n // chunk):
        w = torch.rand(chunk, d, generator=gen, dtype=torch.float64) * 2 - 1
        prod, offset = None, 0
        for fan_in, fan_out in itertools.pairwise(widths):
            layer = w[:, offset : offset + fan_in * fan_out].reshape(chunk, fan_out, fan_in)
            offset += fan_in * fan_out
            prod = layer if prod is None else layer @ prod
        losses.append(((prod - target) ** 2).sum((1, 2)))
    k = torch.cat(losses)
    weights = torch.softmax(-beta * k, dim=0)
    return float((weights * beta * k).sum())


@pytest.mark.slow
@pytest.mark.parametrize(("widths", "rank"), [([3, 1, 2], 0), ([2, 2, 2], 0)])
def test_monte_carlo_free_energy_slope_matches_formula(widths: list[int], rank: int) -> None:
    # ~2-4 s each. Measured at beta = 1000 with 8e6 prior draws over seeds 0-4:
    #   [3,1,2] r=0 (lambda = 1,   d/2 = 2.5): 0.986 .. 0.995
    #   [2,2,2] r=0 (lambda = 3/2, d/2 = 4):   1.449 .. 1.499 (finite-beta bias is negative)
    # The tolerance 0.1 is twice the worst deviation and still rejects lambda +- 1/8 (a dropped
    # parity term) in the upward direction and anything near d/2.
    torch.set_num_threads(1)
    lam = deep_linear_network(widths, rank)
    assert deep_linear_network_multiplicity(widths, rank) == 1
    estimate = _tempered_mean_beta_k(widths, rank, beta=1000.0, n=8_000_000, seed=0)
    assert estimate == pytest.approx(lam, abs=0.1)
    assert abs(estimate - regular(count_parameters(widths))) > 1.0
