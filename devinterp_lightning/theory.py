"""Closed-form learning coefficients (real log canonical thresholds).

These are the ground truth that the SGLD estimator is validated against, and a public API for users
who want to compare an estimate with theory. Every function returns the *learning coefficient*
lambda of singular learning theory in Watanabe's normalisation, in which a regular model with d
parameters has lambda = d/2 and the Bayes free energy is F_n = n L_n(w0) + lambda log n
- (m - 1) log log n + O_p(1), with m the *multiplicity* (order of the largest pole of the zeta
function).

Setting shared by the matrix models below: data (x, y) with y = W0 x + Gaussian noise, the input
covariance positive definite, a prior that is positive and bounded near the true parameters, and the
model y = W_L ... W_1 x realisable (rank(W0) <= every width). Then K(w) is equivalent to
||W_L ... W_1 - W0||_F^2, which is all the learning coefficient depends on.

The values are *global* learning coefficients: lambda = min over the true parameter set W0 of the
local learning coefficient. The local learning coefficient at one particular true parameter w* is
>= lambda, with equality at the most singular points (for rank 0 the origin is one of them, because
K is then homogeneous in w).

Values are computed in exact rational arithmetic (:class:`fractions.Fraction`) and returned as
floats; the ``*_multiplicity`` functions return ints.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from fractions import Fraction
from itertools import pairwise

__all__ = [
    "count_parameters",
    "deep_linear_network",
    "deep_linear_network_multiplicity",
    "normal_crossing",
    "normal_crossing_multiplicity",
    "reduced_rank_regression",
    "reduced_rank_regression_multiplicity",
    "regular",
]


# --------------------------------------------------------------------------------------- validation


def _as_int(name: str, value: object, *, minimum: int) -> int:
    # bool is an Integral subclass; True as a width is almost certainly a bug in the caller
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}; pass a Python int")
    value = int(value)
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _as_int_list(name: str, values: Sequence[int], *, minimum: int) -> list[int]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise ValueError(f"{name} must be a sequence of integers (e.g. a list), got {values!r}")
    return [_as_int(f"{name}[{i}]", v, minimum=minimum) for i, v in enumerate(values)]


# ------------------------------------------------------------------------------------------ regular


def regular(d: int) -> float:
    """Learning coefficient of a regular model with ``d`` parameters: lambda = d / 2.

    Source: Watanabe (2009), *Algebraic Geometry and Statistical Learning Theory*, Cambridge
    University Press (regular case of the main theorem: positive definite Fisher information at the
    unique true parameter). Multiplicity 1. ``d = 0`` gives 0.
    """
    d = _as_int("d", d, minimum=0)
    return d / 2


# ---------------------------------------------------------------------------------- normal crossing


def _normal_crossing_exact(k: Sequence[int], h: Sequence[int] | None) -> tuple[Fraction, int]:
    ks = _as_int_list("k", k, minimum=0)
    hs = [0] * len(ks) if h is None else _as_int_list("h", h, minimum=0)
    if len(hs) != len(ks):
        raise ValueError(f"k and h must have the same length, got {len(ks)} and {len(hs)}")
    ratios = [Fraction(hi + 1, 2 * ki) for ki, hi in zip(ks, hs, strict=True) if ki > 0]
    if not ratios:
        raise ValueError(
            "normal_crossing needs at least one k_i > 0: with all k_i = 0 the potential K is "
            "constant and never vanishes, so there is no learning coefficient"
        )
    lam = min(ratios)
    return lam, sum(1 for x in ratios if x == lam)


def normal_crossing(k: Sequence[int], h: Sequence[int] | None = None) -> float:
    """Learning coefficient of a potential in normal crossing form.

    K(w) = prod_i w_i^(2 k_i) near w = 0, prior density proportional to prod_i |w_i|^(h_i) near 0
    (``h`` defaults to all zeros, i.e. a prior positive at the origin). Then

        lambda = min over {i : k_i > 0} of (h_i + 1) / (2 k_i),

    and the multiplicity is the number of i attaining the minimum
    (:func:`normal_crossing_multiplicity`). Coordinates with k_i = 0 do not enter K.

    Source: Watanabe (2009), *Algebraic Geometry and Statistical Learning Theory*, CUP, Ch. 2-3
    (the zeta function int K^z phi dw = prod_i int |w_i|^(2 k_i z + h_i) dw_i has its largest pole
    at z = -min_i (h_i + 1)/(2 k_i)); also Watanabe (2018), *Mathematical Theory of Bayesian
    Statistics*, CRC Press. Conditions: integers k_i >= 0 (at least one > 0), h_i >= 0.
    """
    return float(_normal_crossing_exact(k, h)[0])


def normal_crossing_multiplicity(k: Sequence[int], h: Sequence[int] | None = None) -> int:
    """Multiplicity m of :func:`normal_crossing`: #{i : k_i > 0 and (h_i+1)/(2k_i) = lambda}."""
    return _normal_crossing_exact(k, h)[1]


# ---------------------------------------------------------------------------- reduced rank regression


def _check_rrr(input_dim: int, output_dim: int, hidden_dim: int, rank: int) -> tuple[int, int, int, int]:
    m = _as_int("input_dim", input_dim, minimum=1)
    n = _as_int("output_dim", output_dim, minimum=1)
    h = _as_int("hidden_dim", hidden_dim, minimum=1)
    r = _as_int("rank", rank, minimum=0)
    if r > min(m, n, h):
        raise ValueError(
            f"rank={r} exceeds min(input_dim, output_dim, hidden_dim)={min(m, n, h)}: a rank-{r} "
            f"teacher is not realisable by this model; lower the rank or widen the model"
        )
    return m, n, h, r


def _rrr_exact(input_dim: int, output_dim: int, hidden_dim: int, rank: int) -> tuple[Fraction, int]:
    # Aoyagi & Watanabe (2005), Main Theorem; M input, N output, H hidden, r true rank.
    M, N, H, r = _check_rrr(input_dim, output_dim, hidden_dim, rank)
    if M + H < N + r:  # case 2
        return Fraction(H * M - H * r + N * r, 2), 1
    if N + H < M + r:  # case 3
        return Fraction(H * N - H * r + M * r, 2), 1
    if M + N < H + r:  # case 4
        return Fraction(M * N, 2), 1
    # case 1: N + r <= M + H, M + r <= N + H, H + r <= M + N (the complement of cases 2-4)
    core = 2 * (H + r) * (M + N) - (M - N) ** 2 - (H + r) ** 2
    if (M + N + H + r) % 2 == 0:
        return Fraction(core, 8), 1
    return Fraction(core + 1, 8), 2


def reduced_rank_regression(input_dim: int, output_dim: int, hidden_dim: int, rank: int) -> float:
    """Learning coefficient of reduced rank regression y = B A x (A: H x M, B: N x H).

    With M = ``input_dim``, N = ``output_dim``, H = ``hidden_dim`` and r = ``rank`` (the rank of the
    true matrix B0 A0, 0 <= r <= min(M, N, H)):

    - Case 1, N + r <= M + H and M + r <= N + H and H + r <= M + N:
      lambda = [2(H + r)(M + N) - (M - N)^2 - (H + r)^2] / 8 if M + N + H + r is even (m = 1),
      lambda = [2(H + r)(M + N) - (M - N)^2 - (H + r)^2 + 1] / 8 if it is odd (m = 2);
    - Case 2, M + H < N + r: lambda = (H M - H r + N r) / 2 (m = 1);
    - Case 3, N + H < M + r: lambda = (H N - H r + M r) / 2 (m = 1);
    - Case 4, M + N < H + r: lambda = M N / 2 (m = 1).

    Cases 2-4 exclude each other when r <= min(M, N, H), and case 1 is their complement.

    Source: M. Aoyagi and S. Watanabe (2005), "Stochastic complexities of reduced rank regression in
    Bayesian estimation", Neural Networks 18(7):924-933, Main Theorem. (Cross-checked against the
    implementation in the sBIC R package of Drton & Plummer, 2017, JRSS-B.) Conditions: Gaussian
    noise, positive definite input covariance, prior positive and bounded near the true set.
    """
    return float(_rrr_exact(input_dim, output_dim, hidden_dim, rank)[0])


def reduced_rank_regression_multiplicity(input_dim: int, output_dim: int, hidden_dim: int, rank: int) -> int:
    """Multiplicity m of :func:`reduced_rank_regression`: 2 in case 1 with M + N + H + r odd, else 1."""
    return _rrr_exact(input_dim, output_dim, hidden_dim, rank)[1]


# ------------------------------------------------------------------------------ deep linear network


def _check_widths(widths: Sequence[int], rank: int) -> tuple[list[int], int]:
    ws = _as_int_list("widths", widths, minimum=1)
    if len(ws) < 2:
        raise ValueError(
            f"widths must list at least the input and the output width, got {ws}; "
            "e.g. widths=[input_dim, hidden_dim, output_dim]"
        )
    r = _as_int("rank", rank, minimum=0)
    if r > min(ws):
        raise ValueError(
            f"rank={r} exceeds the narrowest width min(widths)={min(ws)}: the network cannot realise "
            "a teacher of that rank; lower the rank or widen the bottleneck"
        )
    return ws, r


def _dln_exact(widths: Sequence[int], rank: int) -> tuple[Fraction, int]:
    ws, r = _check_widths(widths, rank)
    # Aoyagi (2024), Definition 3 / Theorem: reduced widths M_j = H_j - r >= 0. The selected set
    # Sigma (|Sigma| = ell + 1) must satisfy max_Sigma M < min_{not Sigma} M, sum_Sigma M >=
    # ell * max_Sigma M and sum_Sigma M < ell * min_{not Sigma} M. The first condition forces Sigma to
    # be a prefix of the sorted reduced widths; scanning prefixes by size finds the unique one: the
    # size-2 prefix always satisfies the middle condition, and whenever a prefix fails the last
    # condition the next prefix satisfies the middle one, so the scan ends at the first prefix that
    # satisfies the last condition (or at the full list, which has no complement).
    m = sorted(w - r for w in ws)
    n = len(m)
    size = 2
    while size < n:
        s = sum(m[:size])
        ell = size - 1
        if ell * m[size - 1] <= s < ell * m[size]:
            break
        size += 1
    sel = m[:size]
    ell = size - 1
    s = sum(sel)
    assert s >= ell * sel[-1], "Aoyagi selection invariant violated"  # proven above; guards edits
    ceil_avg = -(-s // ell)  # Aoyagi's integer M with M - 1 < s / ell <= M
    a = s - (ceil_avg - 1) * ell  # 1 <= a <= ell
    pair_sum = (s * s - sum(x * x for x in sel)) // 2  # sum_{i<j in Sigma} M_i M_j
    lam = (
        Fraction(-r * r + r * (ws[0] + ws[-1]), 2)
        + Fraction(a * (ell - a), 4 * ell)
        - Fraction(ell * (ell - 1), 4) * Fraction(s, ell) ** 2
        + Fraction(pair_sum, 2)
    )
    return lam, a * (ell - a) + 1


def deep_linear_network(widths: Sequence[int], rank: int) -> float:
    """Learning coefficient of a deep linear network y = W_L ... W_1 x (no biases).

    ``widths`` = [H_1 (input), H_2, ..., H_{L+1} (output)], so W_s is H_{s+1} x H_s, and ``rank`` =
    r is the rank of the true product matrix (0 <= r <= min widths). Let M_j = H_j - r. Choose the
    unique index set Sigma of size ell + 1 >= 2 with

        max_{j in Sigma} M_j < min_{k not in Sigma} M_k,
        sum_{j in Sigma} M_j >= ell * max_{j in Sigma} M_j,
        sum_{j in Sigma} M_j < ell * min_{k not in Sigma} M_k

    (the last two conditions on the complement are void when Sigma is everything). With
    S = sum_{j in Sigma} M_j, the integer M with M - 1 < S/ell <= M and a = S - (M - 1) ell
    (so 1 <= a <= ell):

        lambda = (-r^2 + r (H_1 + H_{L+1})) / 2 + a (ell - a) / (4 ell)
                 - ell (ell - 1) / 4 * (S / ell)^2 + 1/2 * sum_{i < j in Sigma} M_i M_j,

    with multiplicity theta = a (ell - a) + 1 (:func:`deep_linear_network_multiplicity`).

    Source: M. Aoyagi (2024), "Consideration on the learning efficiency of multiple-layered neural
    networks with linear units", Neural Networks 172:106132 (Definition 3 and the main theorem,
    Theorem 1 in the preprint, SSRN 4404877; restated in Lau, Furman, Wang, Murfet, Wei (2023/2025),
    "The local learning coefficient", AISTATS 2025). For L = 2 it reduces to
    :func:`reduced_rank_regression` with M = H_1, H = H_2, N = H_3 (checked in the tests), and for
    L = 1 to the regular value H_1 H_2 / 2. Conditions as in the module docstring.
    """
    return float(_dln_exact(widths, rank)[0])


def deep_linear_network_multiplicity(widths: Sequence[int], rank: int) -> int:
    """Multiplicity theta = a (ell - a) + 1 of :func:`deep_linear_network` (Aoyagi 2024, same theorem)."""
    return _dln_exact(widths, rank)[1]


def count_parameters(widths: Sequence[int]) -> int:
    """Number of parameters d = sum_s H_s H_{s+1} of a bias-free deep linear network with ``widths``.

    ``regular(count_parameters(widths))`` = d/2 is the upper bound lambda <= d/2 that every learning
    coefficient satisfies (Watanabe 2009).
    """
    ws = _as_int_list("widths", widths, minimum=1)
    if len(ws) < 2:
        raise ValueError(f"widths must list at least the input and the output width, got {ws}")
    return sum(a * b for a, b in pairwise(ws))
