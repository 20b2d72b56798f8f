"""Noise level of a monitored series that survives autocorrelation, and the smoothing window. No Lightning import.

A loss or an LLC series is not i.i.d. around its trend: neighbouring points share a minibatch history,
an SGLD chain's start, a slowly moving set of weights. Model the noise as AR(1),
``e[t] = phi * e[t-1] + innovation``, with marginal variance ``sigma**2``. Then the lag-``k`` variogram
is

    gamma(k) = E[(x[t+k] - x[t])**2] / 2 = sigma**2 * (1 - phi**k)

(the level cancels in a difference), so ``phi = gamma(2) / gamma(1) - 1`` and, for a mean over ``m``
points, ``Var(mean) ~= sigma_lr**2 / m`` with the *long-run* variance

    sigma_lr**2 = sigma**2 * (1 + phi) / (1 - phi).

A first-difference estimate alone sees ``gamma(1) = sigma**2 (1 - phi)``: too small by a factor
``(1 - phi)`` for the marginal variance and by ``(1 - phi)**2 / (1 + phi)`` for the long-run one (45x at
``phi = 0.8``), which is why a detector that uses it sees changes in autocorrelated noise.

The variogram ratio ``gamma(2) / gamma(1) - 1`` is a noisy estimate of ``phi`` on a short series
(standard deviation 0.16-0.17 over 100 points at ``phi`` = 0.5 and 0.8, against 0.07-0.09 for the
lag-1 autocorrelation, measured over 400 series). :func:`segment_noise` estimates ``phi`` from the
lag-1 autocorrelation of the residuals of a segment fit, corrected exactly for the bias of fitting a
level or a line to each segment; it reads the curvature of a smooth curve that a piecewise-linear fit
leaves in its residuals as autocorrelation. ``PlateauTracker(noise_model="split")`` therefore fits with
the smaller of the two estimates and tests with this one raised by a margin (docs/stages.md).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "NoiseLevel", "ar1_residual_moments", "estimate_long_run_noise", "segment_noise", "segment_noise_levels",
    "smoothing_half_width",
]

_MAD_TO_SIGMA = 1.4826  # MAD of a Gaussian = 0.6745 sigma


def smoothing_half_width(sigma: float) -> int:
    """Half-width ``max(2, ceil(3 * sigma))`` (in points) of a Gaussian kernel of width ``sigma`` points:
    the kernel is cut at three standard deviations, and never narrower than two points on each side.
    ``sigma <= 0`` gives 2."""
    return max(2, math.ceil(3 * sigma)) if sigma > 0 else 2


@dataclass(frozen=True)
class NoiseLevel:
    """The noise of a series, in the unit of its values.

    Attributes:
        sigma: marginal standard deviation of one point around the trend.
        phi: lag-1 autocorrelation of the noise (AR(1)), clipped to ``[0, phi_max]``.
        long_run: ``sqrt(sigma**2 (1 + phi) / (1 - phi))``: the standard deviation that a mean over
            ``m`` points has, times ``sqrt(m)``. Change tests use this one.
    """

    sigma: float
    phi: float
    long_run: float


def _lag_differences(x: np.ndarray, lag: int, breaks: Sequence[int] = ()) -> np.ndarray:
    """``x[t + lag] - x[t]`` for the pairs that do not straddle a break (an index where a new segment
    starts), so that a level shift between segments does not count as noise."""
    d = x[lag:] - x[:-lag]
    if len(breaks):
        t = np.arange(d.size)
        b = np.asarray(breaks)
        # pair (t, t + lag) straddles break b when t < b <= t + lag
        crossing = ((t[:, None] < b[None, :]) & (b[None, :] <= t[:, None] + lag)).any(axis=1)
        d = d[~crossing]
    return d


def _variogram(d: np.ndarray, robust: bool) -> float:
    """``mean(d**2) / 2`` of lag differences ``d`` after removing their median (a steady trend).

    ``robust``: ``(1.4826 * median|d|)**2 / 2`` instead, which a quarter of the pairs straddling jumps
    barely moves but which is about three times noisier. Otherwise each ``d`` is clipped at five
    robust standard deviations, so a lone jump or outlier adds little.
    """
    d = d - float(np.median(d))
    mad = _MAD_TO_SIGMA * float(np.median(np.abs(d)))
    if robust:
        return mad**2 / 2.0
    if mad > 0:
        d = np.clip(d, -5.0 * mad, 5.0 * mad)
    return float(np.mean(d**2)) / 2.0


def estimate_long_run_noise(
    values: Sequence[float],
    stderrs: Sequence[float] | None = None,
    *,
    breaks: Sequence[int] = (),
    robust: bool = False,
    phi_max: float = 0.9,
    margin: float = 2.0,
) -> NoiseLevel:
    """AR(1) noise level of a series from its lag-1 and lag-2 variograms (see the module docstring).

    ``phi = gamma(2) / gamma(1) - 1`` is noisy on short series (its standard error is about
    ``sqrt((1 - phi**2) / m)`` for ``m`` pairs), and an estimate that is too low turns noise into
    changes; so the value used is ``phi + margin * sqrt((1 - phi**2) / m)``, clipped to
    ``[0, phi_max]`` (``phi_max`` bounds the long-run factor ``(1 + phi) / (1 - phi)`` at 19).

    Args:
        values: the series (nan skipped).
        stderrs: reported per-point standard errors (for an LLC: the spread across chains /
            sqrt(chains)); where finite, their median is a lower bound on ``sigma``.
        breaks: indices where a segment of a fit starts: pairs across them are left out, so level
            shifts do not count as noise (for the ramps, pass ``values`` minus their fitted trend).
        robust: median-based variograms (for a first pass, before any break is known).
        margin: how many standard errors ``phi`` is raised by (0: the plain estimate).

    Fewer than 4 points and no finite stderr give zeros.
    """
    x = np.asarray(values, dtype=float)
    finite = np.isfinite(x)
    if not finite.all():
        keep = np.flatnonzero(finite)
        breaks = [int(np.searchsorted(keep, b)) for b in breaks]
        x = x[finite]
    sigma = 0.0
    phi = 0.0
    if x.size >= 4:
        d1, d2 = _lag_differences(x, 1, breaks), _lag_differences(x, 2, breaks)
        if d1.size >= 3 and d2.size >= 3:
            g1, g2 = _variogram(d1, robust), _variogram(d2, robust)
            if g1 > 0:
                raw = min(max(g2 / g1 - 1.0, 0.0), phi_max)
                phi = min(raw + margin * np.sqrt((1.0 - raw**2) / d1.size), phi_max)
                sigma = math.sqrt(g1 / (1.0 - phi))
    return _noise_level(sigma, phi, stderrs)


def _noise_level(sigma: float, phi: float, stderrs: Sequence[float] | None) -> NoiseLevel:
    """The AR(1) noise level from an estimated ``sigma`` and ``phi``; the median reported standard
    error, where there is one, is a lower bound on ``sigma``."""
    if stderrs is not None:
        s = np.asarray(stderrs, dtype=float)
        s = s[np.isfinite(s)]
        if s.size:
            sigma = max(sigma, float(np.median(s)))
    long_run = sigma * math.sqrt((1.0 + phi) / (1.0 - phi))
    return NoiseLevel(sigma=sigma, phi=phi, long_run=long_run)


_PHI_GRID = np.linspace(0.0, 0.98, 99)


def ar1_residual_moments(m: int, ramp: bool, phi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(E[sum r_t**2], E[sum r_t r_(t+1)])`` in units of ``sigma**2`` for the residuals ``r = P e`` of
    ``m`` points of AR(1) noise ``e`` (marginal variance 1, lag-1 correlation ``phi``, one value per
    entry of ``phi``) after a least-squares fit of a level (``ramp=False``) or a line (``ramp=True``).

    With ``Q`` an orthonormal basis of the fitted columns, ``P = I - Q Q^T`` and the correlation
    matrix ``R[i, j] = phi**|i - j|``: ``E[r^T r] = m - tr(Q^T R Q)`` and ``E[r^T S r] = (m - 1) phi -
    (sub-diagonal sums of Q Q^T R + R Q Q^T - Q Q^T R Q Q^T)``. ``R q`` for ``q = 1`` and ``q = t`` has
    closed forms (geometric sums), so each trace costs ``O(m)`` per value of ``phi``.
    """
    p = phi[:, None]
    t = np.arange(m, dtype=float)[None, :]
    back = m - 1 - t
    one_m = 1.0 - p
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = (1.0 - p ** (t + 1)) / one_m  # sum_{i <= t} phi**(t - i)
        b1 = p * (1.0 - p**back) / one_m  # sum_{i > t} phi**(i - t)

        def ksum(k: np.ndarray) -> np.ndarray:  # sum_{j <= k} j phi**j
            return p * (1.0 - (k + 1) * p**k + k * p ** (k + 1)) / one_m**2

        r1 = f1 + b1  # (R 1)_t
        cols = [(np.ones_like(t) / math.sqrt(m), r1 / math.sqrt(m))]
        if ramp and m >= 3:
            rt = t * f1 - ksum(t) + t * b1 + ksum(back)  # (R t)_t
            tc = t - (m - 1) / 2.0
            nrm = math.sqrt(float((tc**2).sum()))
            cols.append((tc / nrm, (rt - (m - 1) / 2.0 * r1) / nrm))
    a = sum((q * y).sum(axis=1) for q, y in cols)
    c = sum((q[:, 1:] * y[:, :-1]).sum(axis=1) + (y[:, 1:] * q[:, :-1]).sum(axis=1) for q, y in cols)
    for qj, _ in cols:
        for qk, yk in cols:
            mjk = (qj * yk).sum(axis=1)
            c = c - mjk * (qj[:, 1:] * qk[:, :-1]).sum(axis=1)
    return m - a, (m - 1) * phi - c


def segment_noise(
    values: Sequence[float],
    segments: Sequence[tuple[int, int, bool]],
    stderrs: Sequence[float] | None = None,
    *,
    phi_max: float = 0.9,
    margin: float = 2.0,
) -> NoiseLevel:
    """AR(1) noise level from the residuals of a segment fit.

    Each segment ``(start, end, ramp)`` is fitted by least squares (a level, or a line when ``ramp``);
    the pooled lag-1 ratio ``rho = sum r_t r_(t+1) / sum r_t**2`` of the residuals inside segments is
    matched to its expectation under AR(1) noise, ``sum_s E_phi[r^T S r] / sum_s E_phi[r^T r]``
    (:func:`ar1_residual_moments`), which removes the downward bias of fitting a level or a line
    (``-(1 + 3 phi) / m`` per level of ``m`` points, more for a line, large at high ``phi``).
    ``sigma**2 = sum r_t**2 / sum_s E_phi[r^T r]``. ``phi`` is then raised by ``margin`` standard
    errors ``sqrt((1 - phi**2) / dof)``, with ``dof = sum_s E_phi[r^T r] - segments`` the residual degrees
    of freedom (short segments carry little information on ``phi``), and clipped to ``[0, phi_max]``;
    ``sigma`` is re-evaluated at the raised ``phi`` (an estimate that is too low turns autocorrelated
    noise into changes). Levels of fewer than 3 points and lines of fewer than 4 are left out.

    Args:
        values: the series (nan skipped inside each segment).
        segments: ``(start, end, ramp)`` index ranges, ``ramp`` when the segment is a line.
        stderrs: reported per-point standard errors; where finite, their median is a lower bound on
            ``sigma``.
        phi_max: bound on ``phi`` (the long-run factor ``(1 + phi) / (1 - phi)`` is then at most 19).
        margin: standard errors ``phi`` is raised by (0: the bias-corrected estimate).

    No usable segment and no finite stderr give zeros.
    """
    return segment_noise_levels(values, segments, stderrs, phi_max=phi_max, margins=(margin,))[0]


def segment_noise_levels(
    values: Sequence[float],
    segments: Sequence[tuple[int, int, bool]],
    stderrs: Sequence[float] | None = None,
    *,
    phi_max: float = 0.9,
    margins: Sequence[float] = (2.0,),
) -> list[NoiseLevel]:
    """:func:`segment_noise` at each of ``margins``, from one pass over the residuals (the fit and
    the moment matching do not depend on the margin)."""
    x = np.asarray(values, dtype=float)
    num = den = 0.0
    used: list[tuple[int, bool]] = []
    for a, b, ramp in segments:
        seg = x[a:b]
        seg = seg[np.isfinite(seg)]
        m = seg.size
        if m < (4 if ramp else 3):  # a line through 3 points leaves one residual, which says nothing on phi
            continue
        t = np.arange(m, dtype=float)
        if ramp:
            coef = np.polyfit(t, seg, 1)
            r = seg - np.polyval(coef, t)
        else:
            r = seg - seg.mean()
        num += float(r[1:] @ r[:-1])
        den += float(r @ r)
        used.append((m, bool(ramp)))
    if not used or den <= 0:
        return [_noise_level(0.0, 0.0, stderrs) for _ in margins]
    e_den = np.zeros_like(_PHI_GRID)
    e_num = np.zeros_like(_PHI_GRID)
    for m, ramp in used:
        d, nm = ar1_residual_moments(m, ramp, _PHI_GRID)
        e_den += d
        e_num += nm
    # increasing in phi; the running maximum guards the interpolation against rounding
    ratio = np.maximum.accumulate(e_num / np.maximum(e_den, 1e-12))
    rho = num / den
    # the phi whose expected ratio matches the observed one
    raw = float(np.interp(rho, ratio, _PHI_GRID)) if rho > ratio[0] else 0.0
    raw = min(raw, phi_max)
    # residual degrees of freedom left once the levels / lines are fitted: short segments carry
    # little information about phi, so the margin grows where the fit cut the series finely
    dof = float(np.interp(raw, _PHI_GRID, e_den)) - len(used)
    out = []
    for margin in margins:
        phi = min(raw + margin * math.sqrt((1.0 - raw**2) / max(dof, 1.0)), phi_max)
        sigma = math.sqrt(den / max(float(np.interp(phi, _PHI_GRID, e_den)), 1.0))
        out.append(_noise_level(sigma, phi, stderrs))
    return out
