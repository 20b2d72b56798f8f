"""Essential dynamics: a low-rank PCA of a model's functional trajectory and its turning points.

No Lightning import: tensors / arrays in, arrays and small dataclasses out.

Pipeline (Hoogland et al. 2024, "The developmental landscape of in-context learning"):

1. At each snapshot ``t`` the model's outputs on a fixed probe batch are flattened into a vector
   ``x_t`` in ``R^D``. :class:`IncrementalPCA` keeps a bounded-memory PCA of ``x_0, ..., x_t``.
2. The trajectory is projected on the top ``k`` principal components, giving a curve in ``R^k``.
3. For each pair of components ``(i, j)`` the planar curve is smoothed (a Gaussian-weighted local
   quadratic fit, which also yields the derivatives) and its signed curvature
   ``kappa = (x' y'' - y' x'') / (x'^2 + y'^2)^{3/2}`` is computed. The osculating circle at a point
   has radius ``1/|kappa|`` and centre ``p + n / kappa`` (``n`` the unit normal); the centres form
   the *evolute*.
4. The evolute has a cusp exactly where ``d kappa / ds = 0`` (a *vertex* of the curve). Turning
   points are the vertices where ``|kappa|`` is a local maximum and the tangent turns by at least
   ``min_angle`` radians around it.
5. A turning point is kept when it appears in at least ``min_pairs`` component pairs within
   ``tolerance`` snapshots of each other (cusps seen in a single projection are often projection
   artefacts; a random walk produces plenty of them).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from itertools import combinations
from statistics import NormalDist
from typing import Any

import numpy as np
import torch

from devinterp_lightning.stages.noise import smoothing_half_width

__all__ = [
    "IncrementalPCA",
    "PlanarGeometry",
    "TurningPoint",
    "planar_geometry",
    "smooth_derivatives",
    "confirmation_lag",
    "default_forward",
    "denoised_arclength",
    "find_turning_points",
    "flatten_outputs",
    "chi2_quantile",
    "pair_vertices",
    "persistent_legs",
    "noise_variance",
    "residual_variance_factor",
    "significant_legs",
    "trajectory_csv",
    "turning_points_markdown",
    "window_half_width",
]


# --------------------------------------------------------------------------------------------------
# Incremental PCA with bounded memory
# --------------------------------------------------------------------------------------------------
class IncrementalPCA:
    """PCA of a growing sequence of vectors in ``R^D`` with memory ``O(D * rank + N * rank)``.

    Representation: every stored snapshot ``x_i`` is approximated by ``c + Q a_i`` with a reference
    point ``c`` in ``R^D``, an orthonormal basis ``Q`` (``D x r``, ``r <= rank``) and coordinates
    ``a_i`` in ``R^r``. A new vector ``x`` is projected, ``a = Q^T (x - c)``; the part of ``x - c``
    outside ``span(Q)`` becomes a new basis column (old snapshots get coordinate 0 on it). When the
    basis exceeds ``rank`` columns, the coordinates are rotated onto their own principal axes and
    the axis of least variance is dropped; its energy is added to each row's ``residual``.

    The PCA of the approximated points ``c + Q a_i`` is then computed exactly from the ``N x r``
    coordinate matrix. It is the exact PCA of the snapshots while their affine span has dimension
    ``<= rank``; otherwise an approximation whose error is reported by :attr:`residual_fraction`.

    What is bounded by what:
      * ``D * rank`` floats for ``Q``, ``D`` for ``c`` (``D`` = flattened probe output size);
      * ``max_snapshots * rank`` floats for the coordinates: when ``max_snapshots`` would be
        exceeded, every other stored snapshot is dropped and the storage stride doubles, so the
        stored snapshots stay evenly spaced and span the whole run.
    """

    def __init__(self, rank: int = 8, max_snapshots: int = 2000, *, tol: float = 1e-10) -> None:
        if rank < 2:
            raise ValueError(f"rank must be >= 2 to draw a plane, got {rank}; pass rank >= num_components")
        if max_snapshots < 2 * (rank + 2):
            # After thinning at least rank + 2 snapshots must remain, so that truncating the basis
            # is always a full rotation of the coordinates.
            raise ValueError(
                f"max_snapshots ({max_snapshots}) must be >= 2 * (rank + 2) = {2 * (rank + 2)}; "
                "raise max_snapshots or lower rank"
            )
        self.rank = int(rank)
        self.max_snapshots = int(max_snapshots)
        self.tol = float(tol)
        # numpy float64 internally: the matrices are small (r <= rank columns) and torch's per-op
        # overhead dominated; the D-sized products are single BLAS calls either way.
        self.center: np.ndarray | None = None  # (D,)
        self.basis: np.ndarray | None = None  # (D, r), orthonormal columns
        self.coords = np.zeros((0, 0))  # (N, r)
        self.residual = np.zeros(0)  # (N,) squared distance of each snapshot to the subspace
        self.steps: list[int] = []  # step of each stored snapshot
        self.stride = 1  # store one snapshot out of `stride` offered
        self.num_seen = 0  # snapshots offered so far (stored or not)

    # ---- updates ---------------------------------------------------------------------------------
    def _check(self, x: torch.Tensor | np.ndarray) -> np.ndarray:
        if isinstance(x, torch.Tensor):
            x = x.detach().to(device="cpu", dtype=torch.float64).numpy()
        x = np.asarray(x, dtype=np.float64).reshape(-1)
        if self.center is not None and x.size != self.center.size:
            raise ValueError(
                f"snapshot has {x.size} values but earlier ones had {self.center.size}; "
                "the probe batch and the model's output shape must stay fixed"
            )
        if not np.isfinite(x).all():
            raise ValueError("snapshot contains nan/inf; the model's outputs on the probe batch diverged")
        return x

    def add(self, x: torch.Tensor | np.ndarray, step: int) -> bool:
        """Offer snapshot ``x`` (any shape, flattened) taken at ``step``. Returns True if stored."""
        x = self._check(x)
        seen = self.num_seen
        self.num_seen += 1
        if seen % self.stride != 0:
            return False
        if self.center is None:
            self.center = x.copy()
            self.basis = np.zeros((x.size, 0))
            self.coords = np.zeros((1, 0))
            self.residual = np.zeros(1)
            self.steps = [int(step)]
            return True
        assert self.basis is not None
        d = x - self.center
        a = self.basis.T @ d
        e = d - self.basis @ a
        # Gram-Schmidt twice: one pass loses orthogonality when e is small relative to d.
        a2 = self.basis.T @ e
        a = a + a2
        e = e - self.basis @ a2
        enorm = float(np.linalg.norm(e))
        scale = max(float(np.linalg.norm(d)), 1e-300)
        n = self.coords.shape[0]
        if enorm > self.tol * scale:
            self.basis = np.concatenate([self.basis, (e / enorm)[:, None]], axis=1)
            self.coords = np.concatenate([self.coords, np.zeros((n, 1))], axis=1)
            new_row = np.concatenate([a, [enorm]])
            res = 0.0
        else:
            new_row = a
            res = enorm**2
        self.coords = np.concatenate([self.coords, new_row[None, :]], axis=0)
        self.residual = np.concatenate([self.residual, [res]])
        self.steps.append(int(step))
        if self.basis.shape[1] > self.rank:
            self._truncate()
        if len(self.steps) > self.max_snapshots:
            self._thin()
        return True

    def _truncate(self) -> None:
        assert self.basis is not None and self.center is not None
        mean = self.coords.mean(axis=0)
        centered = self.coords - mean
        # Principal axes of the coordinates from the r x r scatter matrix (N >= r + 1 here, see
        # __init__), by decreasing variance.
        _, w = np.linalg.eigh(centered.T @ centered)
        w = w[:, ::-1]
        keep = w[:, : self.rank]
        dropped = centered @ w[:, self.rank :]
        self.residual = self.residual + (dropped**2).sum(axis=1)
        self.center = self.center + self.basis @ mean
        self.basis = self.basis @ keep
        self.coords = centered @ keep

    def _thin(self) -> None:
        # Keep the snapshots whose offer index is a multiple of the doubled stride (the first one
        # included), so spacing stays uniform.
        keep = [i for i in range(len(self.steps)) if (i * self.stride) % (2 * self.stride) == 0]
        self.coords = self.coords[keep]
        self.residual = self.residual[keep]
        self.steps = [self.steps[i] for i in keep]
        self.stride *= 2

    # ---- queries ---------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.steps)

    def components(self, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Top-``k`` PCA of the stored snapshots.

        Returns ``(scores, axes, variances)``: ``scores`` (``N x k``) are the coordinates of every
        stored snapshot on the current principal components, ``axes`` (``r x k``) express the
        components in the internal basis (the ``D``-space direction is ``basis @ axes``) and
        ``variances`` (``k``) the variance along each (divided by ``N``). Missing components (fewer
        snapshots than ``k + 1``) are zero columns. Signs are fixed so that the first stored
        snapshot has a non-positive score: the trajectory runs towards the positive side (the first
        snapshot of a drifting trajectory sits at an extreme of every component, so this is stable).
        """
        n, r = self.coords.shape
        scores = np.zeros((n, k))
        axes = np.zeros((r, k))
        variances = np.zeros(k)
        if n < 2 or r == 0:
            return scores, axes, variances
        centered = self.coords - self.coords.mean(axis=0)
        # Eigen-decomposition of the small r x r scatter matrix rather than an SVD of the N x r
        # coordinates: the same axes, and LAPACK stays single-threaded on tiny inputs (a threaded
        # SVD runs every snapshot, next to the training's own threads).
        evals, evecs = np.linalg.eigh(centered.T @ centered)
        order = np.argsort(evals)[::-1]
        m = min(k, r)
        w = evecs[:, order[:m]]
        sc = centered @ w
        sign = np.where(sc[0] > 0, -1.0, 1.0)
        scores[:, :m] = sc * sign
        axes[:, :m] = w * sign
        variances[:m] = np.clip(evals[order[:m]], 0.0, None) / n
        return scores, axes, variances

    def project(self, x: torch.Tensor | np.ndarray, k: int) -> np.ndarray:
        """Scores of an arbitrary vector on the current top-``k`` components (same signs as
        :meth:`components`)."""
        x = self._check(x)
        if self.basis is None or self.center is None:
            return np.zeros(k)
        _, axes, _ = self.components(k)
        a = self.basis.T @ (x - self.center)
        return (a - self.coords.mean(axis=0)) @ axes

    def _total_spread(self) -> float:
        return float(((self.coords - self.coords.mean(axis=0)) ** 2).sum() + self.residual.sum())

    @property
    def residual_fraction(self) -> float:
        """Share of the stored snapshots' squared spread lost to the rank truncation (an upper
        bound): ``sum_i residual_i / (sum_i residual_i + sum_i |a_i - mean(a)|^2)``."""
        if len(self.steps) < 2:
            return 0.0
        total = self._total_spread()
        return float(self.residual.sum()) / total if total > 0 else 0.0

    def explained_variance_ratio(self, k: int) -> np.ndarray:
        """Share of the total spread (truncated residual included) on each of the top-``k`` components."""
        _, _, var = self.components(k)
        total = self._total_spread() / max(len(self.steps), 1)
        return var / total if total > 0 else np.zeros_like(var)

    # ---- persistence -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain values only (loadable by ``torch.load(weights_only=True)``)."""

        def t(a: np.ndarray | None) -> torch.Tensor | None:
            return None if a is None else torch.from_numpy(a.copy())

        return {
            "rank": self.rank,
            "max_snapshots": self.max_snapshots,
            "tol": self.tol,
            "center": t(self.center),
            "basis": t(self.basis),
            "coords": t(self.coords),
            "residual": t(self.residual),
            "steps": list(self.steps),
            "stride": self.stride,
            "num_seen": self.num_seen,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        def a(v: Any) -> np.ndarray | None:
            return None if v is None else np.array(torch.as_tensor(v, dtype=torch.float64).numpy(), copy=True)

        self.rank = int(state["rank"])
        self.max_snapshots = int(state["max_snapshots"])
        self.tol = float(state["tol"])
        self.center = a(state["center"])
        self.basis = a(state["basis"])
        self.coords = a(state["coords"])  # type: ignore[assignment]
        self.residual = a(state["residual"])  # type: ignore[assignment]
        self.steps = [int(s) for s in state["steps"]]
        self.stride = int(state["stride"])
        self.num_seen = int(state["num_seen"])


# --------------------------------------------------------------------------------------------------
# Planar curve geometry
# --------------------------------------------------------------------------------------------------
#: Half-width, in points, of every window tied to the bandwidth ``sigma``: the support of the local
#: fit, the window over which a net turn is measured (wide enough to contain a smoothed corner) and
#: the levels around a turn. The one formula, ``max(2, ceil(3 sigma))``, lives in ``stages.noise``.
window_half_width = smoothing_half_width


def smooth_derivatives(y: np.ndarray, sigma: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gaussian-weighted local quadratic regression of ``y`` (``N`` or ``N x d``) on the index.

    At each index ``i`` fits ``y(i + u) ~ b0 + b1 u + b2 u^2`` by least squares with weights
    ``exp(-u^2 / (2 sigma^2))`` over ``|u| <= max(2, ceil(3 sigma))`` (truncated at the ends, where
    the fit becomes one-sided). Returns ``(y_hat, y', y'')`` with ``y' = b1``, ``y'' = 2 b2`` (per
    snapshot). ``sigma <= 0`` means the smallest window (±2) with equal weights.
    """
    y = np.asarray(y, dtype=np.float64)
    squeeze = y.ndim == 1
    if squeeze:
        y = y[:, None]
    n = y.shape[0]
    if n < 3:
        raise ValueError(f"need at least 3 points for second derivatives, got {n}")
    half = min(window_half_width(sigma), n - 1)
    u = np.arange(-half, half + 1, dtype=np.float64)
    w = np.exp(-(u**2) / (2 * sigma**2)) if sigma > 0 else np.ones_like(u)
    idx = np.arange(n)[:, None] + u[None, :].astype(np.int64)  # (N, W)
    valid = (idx >= 0) & (idx < n)
    wv = np.where(valid, w[None, :], 0.0)  # (N, W)
    design = np.stack([np.ones_like(u), u, u**2], axis=1)  # (W, 3)
    # Normal equations per point: (X^T W X) b = X^T W y
    xtwx = np.einsum("nw,wa,wb->nab", wv, design, design)
    yv = y[np.clip(idx, 0, n - 1)]  # (N, W, d)
    xtwy = np.einsum("nw,wa,nwd->nad", wv, design, yv)
    coef = np.linalg.solve(xtwx, xtwy)  # (N, 3, d)
    out = (coef[:, 0], coef[:, 1], 2.0 * coef[:, 2])
    if squeeze:
        return tuple(o[:, 0] for o in out)  # type: ignore[return-value]
    return out


@dataclass(frozen=True)
class PlanarGeometry:
    """Smoothed planar curve with its curvature and evolute.

    Attributes:
        points: smoothed curve, ``N x 2``.
        velocity: ``d p / d i`` per snapshot, ``N x 2``.
        curvature: signed curvature ``kappa`` (1 / coordinate unit); positive = turning left.
        evolute: centres of the osculating circles ``p + n / kappa``, ``N x 2`` (inf where kappa = 0).
        tangent_angle: unwrapped tangent direction ``theta`` (radians), ``N``.
    """

    points: np.ndarray
    velocity: np.ndarray
    curvature: np.ndarray
    evolute: np.ndarray
    tangent_angle: np.ndarray


def planar_geometry(xy: np.ndarray, sigma: float) -> PlanarGeometry:
    """Osculating-circle geometry of the planar curve ``xy`` (``N x 2``) smoothed with ``sigma``.

    ``kappa = (x' y'' - y' x'') / (x'^2 + y'^2)^{3/2}``; evolute ``= p + (-y', x') / (|p'| kappa)``.
    """
    xy = np.asarray(xy, dtype=np.float64)
    p, d1, d2 = smooth_derivatives(xy, sigma)
    speed2 = (d1**2).sum(axis=1)
    tiny = np.finfo(np.float64).tiny
    cross = d1[:, 0] * d2[:, 1] - d1[:, 1] * d2[:, 0]
    with np.errstate(divide="ignore", invalid="ignore"):
        kappa = np.where(speed2 > tiny, cross / np.maximum(speed2, tiny) ** 1.5, 0.0)
        normal = np.stack([-d1[:, 1], d1[:, 0]], axis=1) / np.sqrt(np.maximum(speed2, tiny))[:, None]
        radius = np.where(kappa != 0, 1.0 / kappa, np.inf)
        evolute = p + normal * radius[:, None]
    theta = np.arctan2(d1[:, 1], d1[:, 0])
    theta = np.unwrap(theta)
    return PlanarGeometry(points=p, velocity=d1, curvature=kappa, evolute=evolute, tangent_angle=theta)


def confirmation_lag(sigma: float) -> int:
    """Snapshots needed after a turning point before its window and smoothing support are complete:
    the turn window plus the smoothing support, ``2 * window_half_width(sigma)``."""
    return 2 * window_half_width(sigma)


def pair_vertices(
    xy: np.ndarray, sigma: float, min_angle: float, min_snr: float = 0.0
) -> tuple[list[tuple[int, float, float]], PlanarGeometry]:
    """Turning-point candidates of one planar curve: cusps of its evolute where ``|kappa|`` peaks.

    A candidate is an index ``i`` where ``d|kappa|/ds`` changes sign from + to - (a vertex whose
    osculating circle is locally smallest) and the unwrapped tangent angle changes by at least
    ``min_angle`` between ``i - h`` and ``i + h`` (``h = max(2, ceil(3 sigma))``). Candidates closer
    than ``h`` are suppressed in favour of the larger turn.

    ``min_snr`` guards against the jitter of a trajectory that has stopped moving (where tangents
    are noise): both legs of the turn, ``|p(i) - p(i-h)|`` and ``|p(i+h) - p(i)|`` on the smoothed
    curve, must be at least ``min_snr`` times the local noise, the RMS distance of the raw points
    from the smoothed curve over ``[i-h, i+h]``.

    Returns ``[(index, turn, |kappa|)]`` sorted by index, and the geometry.
    """
    xy = np.asarray(xy, dtype=np.float64)
    geo = planar_geometry(xy, sigma)
    n = len(geo.curvature)
    h = window_half_width(sigma)
    ak = np.abs(geo.curvature)
    res2 = ((xy - geo.points) ** 2).sum(axis=1)
    cands: list[tuple[int, float, float]] = []
    for i in range(1, n - 1):
        if not (ak[i] >= ak[i - 1] and ak[i] > ak[i + 1]):
            continue
        lo, hi = max(0, i - h), min(n - 1, i + h)
        turn = abs(float(geo.tangent_angle[hi] - geo.tangent_angle[lo]))
        if turn < min_angle:
            continue
        if min_snr > 0:
            noise = math.sqrt(float(res2[lo : hi + 1].mean()))
            legs = min(
                np.linalg.norm(geo.points[i] - geo.points[lo]), np.linalg.norm(geo.points[hi] - geo.points[i])
            )
            if legs < min_snr * noise:
                continue
        cands.append((i, turn, float(ak[i])))
    kept: list[tuple[int, float, float]] = []
    for c in sorted(cands, key=lambda c: -c[1]):
        if all(abs(c[0] - k[0]) > h for k in kept):
            kept.append(c)
    return sorted(kept), geo


@dataclass(frozen=True)
class TurningPoint:
    """A turning point of the essential-dynamics trajectory seen consistently across projections.

    Attributes:
        index: index of the snapshot in the stored trajectory.
        step: training step of that snapshot.
        pairs: the component pairs (0-based) in which an evolute cusp was found near ``index``.
        turn: largest net tangent turn (radians) among those pairs.
        coords: the snapshot's coordinates on the top components at detection time.
    """

    index: int
    step: int
    pairs: tuple[tuple[int, int], ...]
    turn: float
    coords: tuple[float, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["pairs"] = [list(p) for p in self.pairs]
        d["coords"] = list(self.coords)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TurningPoint:
        return cls(
            index=int(d["index"]),
            step=int(d["step"]),
            pairs=tuple(tuple(p) for p in d["pairs"]),  # type: ignore[misc]
            turn=float(d["turn"]),
            coords=tuple(float(c) for c in d.get("coords", ())),
        )


def chi2_quantile(p: float, k: int) -> float:
    """Upper quantile ``q`` with ``P(chi^2_k > q) = p``: exact for ``k = 2`` (``-2 ln p``), else the
    Wilson-Hilferty approximation ``k (1 - 2/(9k) + z sqrt(2/(9k)))^3`` with ``z`` the normal
    ``1 - p`` quantile (for ``k >= 3`` and ``p >= 1e-6`` at most 8% above the exact value, so on the strict side)."""
    if not 0 < p < 1:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if k == 2:
        return -2.0 * math.log(p)
    z = NormalDist().inv_cdf(1.0 - p)
    c = 2.0 / (9.0 * k)
    return k * max(1.0 - c + z * math.sqrt(c), 0.0) ** 3


@lru_cache(maxsize=16)
def residual_variance_factor(sigma: float) -> float:
    """``rho = sum_j (delta_0j - S_0j)^2``: the variance of the residual ``y - y_hat`` of the local
    quadratic fit at an interior point, per unit variance of i.i.d. noise in ``y`` (``S`` the fit's
    linear smoother; 0.756 for ``sigma = 3``)."""
    m = 2 * window_half_width(sigma) + 1
    row = smooth_derivatives(np.eye(m), sigma)[0][m // 2]  # the smoother's weights at the middle point
    return float(((np.eye(m)[m // 2] - row) ** 2).sum())


def noise_variance(v: float, k: int, sigma: float) -> float:
    """Per-component variance ``s^2`` of i.i.d. Gaussian noise around a smooth curve in ``R^k``,
    from ``v``, the median over points of the squared residual of the local fit (see
    :func:`denoised_arclength`): ``s^2 = v / (rho * m_k)`` with ``rho`` from
    :func:`residual_variance_factor` and ``m_k`` the median of ``chi^2_k``. Fast moves are a
    minority of snapshots, so the median ignores them."""
    return v / (residual_variance_factor(sigma) * chi2_quantile(0.5, k))


def denoised_arclength(scores: np.ndarray, sigma: float) -> tuple[np.ndarray, float]:
    """Cumulative distance travelled (``N``, starting at 0) counting only steps clearly larger than
    noise, and the per-snapshot noise variance ``v``.

    Jitter on a plateau would otherwise pile up arc length: a step counts only when
    ``|dp|^2 > 4 * 2v``, with ``v`` estimated as the median squared residual of the time-smoothed
    curve (fast transitions are a minority of snapshots, so the median ignores them). On a still
    trajectory about 7% of the steps still pass; :func:`significant_legs` then keeps the corners
    that such steps make from being reported.
    """
    scores = np.asarray(scores, dtype=np.float64)
    smooth, _, _ = smooth_derivatives(scores, sigma)
    v = float(np.median(((scores - smooth) ** 2).sum(axis=1)))
    d2 = (np.diff(scores, axis=0) ** 2).sum(axis=1)
    ds = np.where(d2 > 8.0 * v, np.sqrt(d2), 0.0)
    return np.concatenate([[0.0], np.cumsum(ds)]), v


def significant_legs(scores: np.ndarray, a: int, i: int, b: int, noise_var: float, alpha: float = 0.01) -> bool:
    """Whether both legs of a turn at snapshot ``i``, from snapshot ``a`` and to snapshot ``b``, are
    displacements beyond noise: under i.i.d. noise of variance ``noise_var`` per component around a
    still point, ``|p_i - p_a|^2 / (2 noise_var) ~ chi^2_k``; both must exceed its ``alpha`` upper
    quantile."""
    q = 2.0 * noise_var * chi2_quantile(alpha, scores.shape[1])
    return bool(((scores[i] - scores[a]) ** 2).sum() > q and ((scores[b] - scores[i]) ** 2).sum() > q)


def persistent_legs(scores: np.ndarray, index: int, half: int, alpha: float = 0.01) -> bool:
    """Whether both legs of a turn at ``index`` are directed motion rather than a random walk.

    For the leg ``[a, b]`` (``[index - half, index]`` and ``[index, index + half]``, clipped) the
    statistic is ``T = k |p_b - p_a|^2 / sum_{a <= j < b} |p_{j+1} - p_j|^2``. Directed motion gives
    up to ``k (b - a)``; a Gaussian random walk (i.i.d. increments) gives about ``chi^2_k``, i.i.d.
    or AR(1) noise less. Both legs must exceed the ``alpha`` upper quantile of ``chi^2_k``.
    """
    n, k = scores.shape
    q = chi2_quantile(alpha, k)
    for a, b in ((max(0, index - half), index), (index, min(n - 1, index + half))):
        path = float((np.diff(scores[a : b + 1], axis=0) ** 2).sum())
        if b - a < 2 or path <= 0 or k * float(((scores[b] - scores[a]) ** 2).sum()) / path < q:
            return False
    return True


def find_turning_points(
    scores: np.ndarray,
    steps: list[int] | np.ndarray | None = None,
    *,
    sigma: float = 2.0,
    min_angle: float = math.radians(45),
    min_pairs: int = 2,
    tolerance: int | None = None,
    min_snr: float = 3.0,
    parameter: str = "time",
    exclude_last: int = 0,
    alpha: float | None = 0.01,
) -> list[TurningPoint]:
    """Turning points of a trajectory in PC space (``scores``: ``N x k``).

    ``parameter`` chooses the curve's parameter, along which smoothing and windows are measured:
    ``"time"`` (the snapshot index) or ``"arclength"`` (the trajectory is first resampled at ``N``
    points evenly spaced in arc length in the ``k``-dimensional PC space). Arc length suits
    stop-and-go development (plateaus and fast transitions): a plateau shrinks to a point and the
    turn between the arriving and the departing transition becomes a corner; the turning point is
    then reported at the first snapshot that reached the corner (the end of the arriving move).
    ``exclude_last`` drops turning points among the last ``exclude_last`` points of the
    (resampled) curve, whose smoothing window is still incomplete.

    For each pair of components the evolute cusps are found with :func:`pair_vertices`; the
    candidates of all pairs are grouped greedily (largest turn first) with those of the other pairs
    within ``tolerance`` snapshots (default ``max(2, ceil(sigma))``), and a group becomes a turning
    point when it spans at least ``min(min_pairs, number of pairs)`` distinct pairs. The turning
    point's index is the median index of the group. ``min_snr``: see :func:`pair_vertices`.

    ``alpha`` is the level of the tests against noise (``None``: no tests, the behaviour before
    they were added):
    in arc length both legs of a turn must be displacements beyond the noise of the raw snapshots
    (:func:`significant_legs`; the resampled curve itself hides the noise); in time both legs
    must be directed motion rather than a random walk (:func:`persistent_legs`). See docs/essential_dynamics.md for their measured effect.
    Returns the points sorted by index.
    """
    scores = np.asarray(scores, dtype=np.float64)
    n, k = scores.shape
    if k < 2:
        raise ValueError(f"need at least 2 components for a planar trajectory, got {k}")
    steps_arr = np.arange(n) if steps is None else np.asarray(steps)
    if len(steps_arr) != n:
        raise ValueError(f"steps has {len(steps_arr)} entries but scores has {n} rows")
    if n < 5:
        return []
    tol = max(2, math.ceil(sigma)) if tolerance is None else int(tolerance)
    half = window_half_width(sigma)
    if parameter == "time":
        curve = scores

        def to_snapshot(j: int) -> int:
            return j
    elif parameter == "arclength":
        arc, v = denoised_arclength(scores, sigma)
        d2 = (np.diff(scores, axis=0) ** 2).sum(axis=1)
        if arc[-1] <= 0:
            return []
        grid = np.linspace(0.0, arc[-1], n)
        curve = np.stack([np.interp(grid, arc, scores[:, c]) for c in range(k)], axis=1)
        spacing = arc[-1] / (n - 1)

        radius = 3.0 * math.sqrt(2 * v) + 0.5 * spacing
        steplen = np.sqrt(d2)
        reach = tol * spacing + 3.0 * math.sqrt(v)

        def to_snapshot(j: int) -> int:
            # The snapshot nearest to the turning point on the curve, moved back while the
            # trajectory was (nearly) standing still: on a plateau, the arrival (the end of the
            # transition into it).
            dist = np.linalg.norm(scores - curve[j], axis=1)
            i = int(np.argmin(dist))
            while i > 0 and steplen[i - 1] <= radius and dist[i - 1] <= reach:
                i -= 1
            return i
    else:
        raise ValueError(f"parameter must be 'time' or 'arclength', got {parameter!r}")
    pairs = list(combinations(range(k), 2))
    need = max(1, min(min_pairs, len(pairs)))
    cands: list[tuple[int, float, tuple[int, int]]] = []
    for pair in pairs:
        verts, _ = pair_vertices(curve[:, list(pair)], sigma, min_angle, min_snr)
        cands.extend((i, turn, pair) for i, turn, _ in verts)
    used = [False] * len(cands)
    out: list[TurningPoint] = []
    for ci in sorted(range(len(cands)), key=lambda c: -cands[c][1]):
        if used[ci]:
            continue
        i0, turn0, _ = cands[ci]
        group = [ci]
        seen_pairs = {cands[ci][2]}
        for cj in sorted(range(len(cands)), key=lambda c: abs(cands[c][0] - i0)):
            if used[cj] or cj == ci or abs(cands[cj][0] - i0) > tol or cands[cj][2] in seen_pairs:
                continue
            group.append(cj)
            seen_pairs.add(cands[cj][2])
        if len(seen_pairs) < need:
            continue
        for g in group:
            used[g] = True
        idx = int(np.median([cands[g][0] for g in group]))  # on the (resampled) curve
        if idx > n - 1 - exclude_last:
            continue
        if parameter == "time" and alpha is not None and not persistent_legs(scores, idx, half, alpha):
            continue
        out.append(
            TurningPoint(
                index=idx, step=0, pairs=tuple(sorted(seen_pairs)), turn=max(cands[g][1] for g in group)
            )
        )
    # Groups are formed strongest first; two groups may still sit within tol of each other when
    # each lacked the other's pairs. Keep the stronger.
    final: list[TurningPoint] = []
    for tp in sorted(out, key=lambda t: -t.turn):
        if all(abs(tp.index - f.index) > tol for f in final):
            final.append(tp)
    snapshots = []
    for tp in sorted(final, key=lambda t: t.index):
        i = to_snapshot(tp.index)
        if parameter == "arclength" and alpha is not None:
            # The legs' ends are the snapshots h resampled points before and after the corner.
            a = min(i, int(np.searchsorted(arc, grid[max(0, tp.index - half)], side="right")) - 1)
            b = max(i, min(n - 1, int(np.searchsorted(arc, grid[min(n - 1, tp.index + half)], side="left"))))
            if not significant_legs(scores, max(a, 0), i, b, noise_variance(v, k, sigma), alpha):
                continue
        coords = tuple(float(v) for v in scores[i])
        snapshots.append(
            TurningPoint(index=i, step=int(steps_arr[i]), pairs=tp.pairs, turn=tp.turn, coords=coords)
        )
    return snapshots


# --------------------------------------------------------------------------------------------------
# Snapshots of a model's function, and the text formats the callback logs
# --------------------------------------------------------------------------------------------------
def default_forward(model: torch.nn.Module, batch: Any) -> Any:
    """``model(*batch)`` for a tuple/list, ``model(**batch)`` for a mapping, else ``model(batch)``."""
    if isinstance(batch, tuple | list):
        return model(*batch)
    if isinstance(batch, Mapping):
        return model(**batch)
    return model(batch)


def flatten_outputs(out: Any) -> torch.Tensor:
    """Every tensor in a (possibly nested) model output, detached, flattened and concatenated in a
    fixed order (mapping keys sorted), as one float64 vector."""
    if isinstance(out, torch.Tensor):
        return out.detach().reshape(-1).to(torch.float64)
    if isinstance(out, Mapping):
        parts = [flatten_outputs(out[k]) for k in sorted(out, key=str)]
    elif isinstance(out, Sequence) and not isinstance(out, str | bytes):
        parts = [flatten_outputs(o) for o in out]
    else:
        raise TypeError(
            f"the model returned {type(out).__name__}; EssentialDynamics needs a Tensor (or tuple/dict "
            "of Tensors). Pass forward_fn=lambda model, batch: ... that returns the outputs to track"
        )
    parts = [p for p in parts if p.numel()]
    if not parts:
        raise ValueError("the model's output on the probe batch is empty; use a non-empty probe batch")
    return torch.cat(parts)


def turning_points_markdown(confirmed_at: int, points: Sequence[TurningPoint]) -> str:
    """Markdown table, one row per turning point: confirmation step, turning step, net turn in
    degrees, component pairs. The report reads the turning step back from the second column."""
    rows = ["| confirmed at step | turning step | turn (deg) | pairs |", "|---|---|---|---|"]
    for tp in points:
        pairs = ", ".join(f"PC{a + 1}/PC{b + 1}" for a, b in tp.pairs)
        rows.append(f"| {confirmed_at} | {tp.step} | {math.degrees(tp.turn):.0f} | {pairs} |")
    return "\n".join(rows)


def trajectory_csv(steps: Sequence[int], scores: np.ndarray) -> str:
    """The trajectory as a CSV block (``step,pc1,...``) inside a Markdown code fence, as logged in
    ``ed/trajectory_final`` and read back by the report."""
    header = "step," + ",".join(f"pc{i + 1}" for i in range(scores.shape[1]))
    lines = [f"{s}," + ",".join(f"{v:.6g}" for v in row) for s, row in zip(steps, scores, strict=True)]
    return "Trajectory on the final PCA basis (CSV):\n\n```\n" + "\n".join([header, *lines]) + "\n```"
