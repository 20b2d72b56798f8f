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
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["NoiseLevel", "estimate_long_run_noise", "smoothing_half_width"]

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
    if stderrs is not None:
        s = np.asarray(stderrs, dtype=float)
        s = s[np.isfinite(s)]
        if s.size:
            sigma = max(sigma, float(np.median(s)))
    long_run = sigma * math.sqrt((1.0 + phi) / (1.0 - phi))
    return NoiseLevel(sigma=sigma, phi=phi, long_run=long_run)

