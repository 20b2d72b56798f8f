"""Stages between plateaus: one transition per rise or fall, whatever its width. No Lightning import.

The model (Hoogland et al. 2024's definition of a developmental stage): a curve alternates between
*plateaus* (flat stretches) and *transitions* (one rise or one fall between two plateaus). A stage
is the period between two transitions; its boundary is the onset of the transition, where the
plateau before it ends.

**Noise.** The long-run noise level ``sigma_lr`` (:mod:`~devinterp_lightning.stages.noise`, AR(1))
is estimated twice per fit: from median-based variograms (robust to the jumps of a step), then from
the residuals of a first fit. Two estimates of the second kind exist: the lag-1 / lag-2 variograms of
the residuals, leaving out the pairs of points across the first fit's segment boundaries, across the
previous update's boundaries and across confirmed transitions
(:func:`~devinterp_lightning.stages.noise.estimate_long_run_noise`); and the lag-1 autocorrelation of
the residuals, corrected exactly for the bias of fitting a level or a line to each segment
(:func:`~devinterp_lightning.stages.noise.segment_noise`). Each is raised by a margin of standard
errors on ``phi`` (an estimate that is too low turns autocorrelated noise into changes). The
``noise_model`` decides how they are used:

* ``"split"`` (the default for a series without reported standard errors, such as a loss): the
  segments are fitted with a *central* level, the smaller of the two estimates with no margin (each
  is inflated only by structure the first fit missed: the variograms by the misfit beside a smooth
  jump, the autocorrelation by the curvature of a smooth curve), and every z-test (``z_change``,
  ``z_sharp``) uses an *upper* level, the bias-corrected estimate raised by ``significance_margin``
  standard errors. A noise level that is too high merges the stairs of a staircase into one ramp; one
  that is too low turns autocorrelated noise into changes. With one level for both, no margin
  avoids both on 100 points of AR(1) noise at ``phi = 0.8`` (docs/stages.md).
* ``"variogram"`` (the default for a series with reported standard errors, such as the LLC, whose
  points are independent estimates): one level, the variogram estimate raised by ``noise_margin``.
* ``"residual"``: one level, the bias-corrected estimate raised by ``noise_margin``; it reads the
  curvature of a smooth curve as autocorrelation.

**Segmentation.** The series, divided by ``sigma_lr``, is cut into segments by exact optimal
partitioning (dynamic programming). Each segment is either *flat* (one level) or a *ramp* (a
straight line), whichever costs less:

    cost(segment) = min(SSE_flat, SSE_line + max(z_slope**2, beta))     (in units of sigma_lr**2)
    total = sum(cost) + beta * (number of segments - 1),   beta = penalty_scale * log(n)

so a segment is a ramp only when its slope's z-score exceeds ``z_slope`` (the SSE drop of the slope
is its squared z-score) and the slope pays at least as much as a new segment would (otherwise a
plateau followed by a jump is fitted as one long ramp from the first point). Lone outliers (further
than ``5 sigma`` from the median of themselves and their two neighbours) are replaced by that median
first, which leaves steps and ramps untouched (a monotone triple is its own median).

**Transitions.** A plateau is a flat segment of at least ``min_plateau`` points whose slope has a
z-score below ``z_plateau``, or a shorter one bounded by two sharp jumps (the first and the last
segment count when flat; :func:`changes`); with ``noise_model="split"`` also a line of at least
``min_plateau`` points whose slope is not significant at the test level, whose level is then its
mean. Everything between two
plateaus (ramps, short levels, jumps) is one change; a change whose ramps switch sign (a rise straight
into a fall) is split at the peak. Each part becomes a transition when the levels on its two sides
pass a z-test,

    |level_after - level_before| >= z_change * sigma_lr * sqrt(v_before + v_after)

where ``v = 1 / m`` for a plateau of ``m`` points (``m`` capped at ``level_points``) and ``v = 4 / m``
for the fitted end of a ramp of ``m`` points (the end of a fitted line is about twice as uncertain
as a mean). Its onset is the first point after the plateau (for a part after a peak: the first
point after the peak). A change with no plateau and no peak before it (the series, or the
window, starts inside it) is not a transition: it is part of the first stage. So a steady ramp from
the first point is one long stage; a ramp that starts after a plateau is one transition at the
end of that plateau, confirmed once the rise is significant.

**Online use.** :class:`PlateauTracker` refits the last ``max_points`` points at every update
(cost ``O(max_points**2)`` per update, two fits; docs/stages.md has the measured time). A
transition is *confirmed* once the same onset (within ``jitter`` points, same direction) has been
found in ``confirm`` consecutive refits; confirmed transitions are never retracted, and a later
change of the same direction whose extent covers a confirmed onset (within ``tolerance`` points),
or that starts less than ``settle`` points after the confirmation, is the same transition; so is one
that starts less than ``settle`` points *before* a confirmed onset that no change of the refit finds
again (the slow start of a wide rise is first fitted into the plateau before it, later into the rise,
and the onset moves back).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import numpy as np

from devinterp_lightning.stages.base import Tracker, replay
from devinterp_lightning.stages.events import Transition
from devinterp_lightning.stages.noise import (
    NoiseLevel,
    estimate_long_run_noise,
    segment_noise,
    segment_noise_levels,
)

__all__ = ["Change", "PlateauTracker", "Segment", "changes", "despike", "detect_transitions", "fit_segments"]

SegmentKind = Literal["flat", "ramp"]
NoiseModel = Literal["auto", "split", "variogram", "residual"]


@dataclass(frozen=True)
class Segment:
    """Points ``start <= i < end`` fitted by ``intercept + slope * (i - start)`` (``slope == 0`` when flat)."""

    start: int
    end: int
    kind: SegmentKind
    intercept: float
    slope: float
    slope_z: float = 0.0  # z-score of the least-squares slope, also for a flat segment

    @property
    def size(self) -> int:
        return self.end - self.start

    def value_at(self, i: int) -> float:
        return self.intercept + self.slope * (i - self.start)

    @property
    def first(self) -> float:
        return self.value_at(self.start)

    @property
    def last(self) -> float:
        return self.value_at(self.end - 1)


@dataclass(frozen=True)
class Change:
    """One rise or fall found in a fit (not yet confirmed).

    ``onset``: first index of the change; ``end``: first index of the plateau after it (or the end
    of its last ramp); ``z``: the level difference over its standard error.
    """

    onset: int
    end: int
    direction: Literal["increase", "decrease"]
    level_before: float
    level_after: float
    z: float
    sharp_before: bool = False  # the plateau before it is short but bounded by sharp jumps


def despike(values: np.ndarray, sigma: float, k: float = 5.0) -> np.ndarray:
    """Replace each interior point further than ``k * sigma`` from the median of itself and its two
    neighbours by that median (a lone outlier; a step or a ramp is its own median and is kept)."""
    x = np.array(values, dtype=float)
    if x.size < 3 or sigma <= 0:
        return x
    trio = np.stack([x[:-2], x[1:-1], x[2:]])
    med = np.median(trio, axis=0)
    bad = np.abs(x[1:-1] - med) > k * sigma
    x[1:-1][bad] = med[bad]
    return x


def fit_segments(
    values: Sequence[float],
    scale: float,
    *,
    penalty_scale: float = 3.0,
    z_slope: float = 3.0,
    min_size: int = 3,
    slope_scale: float | None = None,
) -> list[Segment]:
    """Optimal flat-or-ramp segmentation of ``values`` with noise ``scale`` (see the module docstring).

    ``slope_scale``: the noise level in whose unit ``Segment.slope_z`` is given (default ``scale``;
    ``noise_model="split"`` fits with a central level and judges slopes at an upper one).

    Exact optimal partitioning: all ``O(n**2)`` segment costs come from cumulative sums in one
    vectorised pass, then the recursion ``F(e) = min_s F(s) + cost(s, e) + penalty`` takes one
    vectorised minimum per end point.
    """
    y = np.asarray(values, dtype=float)
    n = y.size
    if n == 0:
        return []
    scale = max(float(scale), 1e-12)
    centre = float(np.median(y))
    z = (y - centre) / scale
    t = np.arange(n, dtype=float)
    zero = np.zeros(1)
    c1 = np.concatenate([zero, np.cumsum(t)])
    c2 = np.concatenate([zero, np.cumsum(t * t)])
    cy = np.concatenate([zero, np.cumsum(z)])
    cyy = np.concatenate([zero, np.cumsum(z * z)])
    cty = np.concatenate([zero, np.cumsum(t * z)])
    beta = penalty_scale * math.log(max(n, 2))
    slope_ratio = max(float(slope_scale) / scale, 1.0) if slope_scale is not None else 1.0
    slope_pen = max(z_slope**2, beta)

    def costs(s: np.ndarray, e: np.ndarray) -> tuple[np.ndarray, ...]:
        m = np.maximum(e - s, 1).astype(float)
        sy, syy = cy[e] - cy[s], cyy[e] - cyy[s]
        st, stt, sty = c1[e] - c1[s], c2[e] - c2[s], cty[e] - cty[s]
        sse_flat = np.maximum(syy - sy * sy / m, 0.0)
        sxx = stt - st * st / m
        sxy = sty - st * sy / m
        safe = np.where(sxx > 0, sxx, 1.0)
        gain = np.where(sxx > 0, sxy * sxy / safe, 0.0)
        sse_line = np.maximum(sse_flat - gain, 0.0)
        ramp = sse_line + slope_pen < sse_flat
        return np.where(ramp, sse_line + slope_pen, sse_flat), ramp, sy / m, sxy / safe, sxy / np.sqrt(safe)

    # all segment costs at once (row: start, column: end); the recursion below is then one min per end
    idx = np.arange(n + 1)
    cost, ramp_m, mean_m, slope_m, slope_z_m = costs(idx[:, None], idx[None, :])
    f = np.full(n + 1, np.inf)
    f[0] = -beta
    last = np.zeros(n + 1, dtype=int)
    for e in range(min_size, n + 1):
        total = f[: e - min_size + 1] + cost[: e - min_size + 1, e]
        j = int(total.argmin())
        f[e] = total[j] + beta
        last[e] = j
    if not np.isfinite(f[n]):  # fewer than min_size points: one segment
        bounds = [0, n]
    else:
        bounds = [n]
        while bounds[-1] > 0:
            bounds.append(int(last[bounds[-1]]))
        bounds.reverse()
    out: list[Segment] = []
    for a, b in zip(bounds, bounds[1:], strict=False):
        sz = float(slope_z_m[a, b]) / slope_ratio
        m = b - a
        if bool(ramp_m[a, b]):
            # intercept at the first point: mean - slope * (mean abscissa - start)
            sl = float(slope_m[a, b])
            icpt = float(mean_m[a, b]) - sl * (m - 1) / 2.0
            out.append(Segment(a, b, "ramp", centre + scale * icpt, scale * sl, sz))
        else:
            out.append(Segment(a, b, "flat", centre + scale * float(mean_m[a, b]), 0.0, sz))
    return out


def changes(
    segments: Sequence[Segment],
    scale: float,
    *,
    z_change: float = 3.0,
    level_points: int = 30,
    min_plateau: int = 15,
    z_plateau: float = 3.0,
    z_sharp: float = 8.0,
) -> list[Change]:
    """The significant rises and falls of a segmentation (see the module docstring), in onset order.

    A flat segment shorter than ``min_plateau`` points, or whose slope still has a z-score of
    ``z_plateau`` or more (below the ramp threshold, but not flat either), is not a plateau: it is
    part of the change around it (a smooth rise is often fitted as jump, short level, jump). The
    first and the last segments count as plateaus when flat. A shorter flat segment (at least
    ``min_plateau // 3`` points) is a plateau too when the jumps to both neighbours are sharp: each
    level difference has a z-score of ``z_sharp`` or more (a staircase of sharp steps, as an LLC
    sampled every few hundred steps shows, rather than the middle of one smooth rise).
    """
    scale = max(float(scale), 1e-12)
    out: list[Change] = []
    # (level, variance factor) of what precedes the current change: a plateau or a peak; None at the start
    k = 0
    segs = list(segments)

    def variance(sg: Segment) -> float:  # of its fitted end, in units of scale**2
        return (1.0 if sg.kind == "flat" else 4.0) / min(sg.size, level_points)

    def as_level(sg: Segment) -> tuple[float, float] | None:
        # a line whose slope is not significant is a level: its mean, known to 1/m
        if sg.kind == "ramp" and plateau(sg):
            return sg.value_at(sg.start) + sg.slope * (sg.size - 1) / 2.0, 1.0 / min(sg.size, level_points)
        return None

    def start_of(sg: Segment) -> tuple[float, float]:
        return as_level(sg) or (sg.first, variance(sg))

    def end_of(sg: Segment) -> tuple[float, float]:
        return as_level(sg) or (sg.last, variance(sg))

    def jump_z(a: Segment, b: Segment) -> float:
        return abs(b.first - a.last) / (scale * math.sqrt(variance(a) + variance(b)))

    def plateau(sg: Segment) -> bool:
        if sg.kind != "flat":
            # a line fitted at a lower noise level than the tests use (noise_model="split") whose slope
            # is not significant at the test level: the tail of a smooth jump inside a plateau
            return sg.size >= min_plateau and abs(sg.slope_z) < z_plateau
        if sg is segs[0] or sg is segs[-1]:
            return True
        if abs(sg.slope_z) >= z_plateau:
            return False
        if sg.size >= min_plateau:
            return True
        return sg.size >= max(min_plateau // 3, 2) and sharp(sg)

    def sharp(sg: Segment) -> bool:
        i = segs.index(sg)
        if i == 0 or i == len(segs) - 1:
            return False
        return min(jump_z(segs[i - 1], sg), jump_z(sg, segs[i + 1])) >= z_sharp

    prev: tuple[float, float] | None = None
    prev_sharp = False
    while k < len(segs):
        if plateau(segs[k]):
            prev = end_of(segs[k])
            prev_sharp = sharp(segs[k])
            k += 1
            continue
        # a run of ramps, up to the next flat segment (or the end)
        j = k
        while j < len(segs) and not plateau(segs[j]):
            j += 1
        run = segs[k:j]
        after_flat = segs[j] if j < len(segs) else None
        # split the run where the slope of its ramps changes sign (a peak or a trough); short flat
        # segments take no side
        parts: list[list[Segment]] = [[run[0]]]
        sign = np.sign(run[0].slope)
        for sg in run[1:]:
            s = np.sign(sg.slope)
            if s == 0 or sign == 0 or s == sign:
                parts[-1].append(sg)
                sign = sign or s
            else:
                parts.append([sg])
                sign = s
        for p, part in enumerate(parts):
            is_last = p == len(parts) - 1
            if is_last and after_flat is not None:
                end_level, v_end = start_of(after_flat)
                end = after_flat.start
            else:
                tail = part[-1]
                end_level, v_end, end = tail.last, 4.0 / min(tail.size, level_points), tail.end
            if prev is not None:
                _add(out, part[0].start, end, prev, (end_level, v_end), scale, z_change, prev_sharp)
            prev = (part[-1].last, 4.0 / min(part[-1].size, level_points))
            prev_sharp = False
        if after_flat is not None:
            prev = end_of(after_flat)
            prev_sharp = sharp(after_flat)
            k = j + 1
        else:
            k = j
    # plateau-to-plateau jumps (no ramp between two flat segments)
    for a, b in zip(segs, segs[1:], strict=False):
        if plateau(a) and plateau(b):
            _add(out, b.start, b.start, end_of(a), start_of(b), scale, z_change, sharp(a))
    out.sort(key=lambda c: c.onset)
    return out


def _add(out: list[Change], onset: int, end: int, before: tuple[float, float], after: tuple[float, float],
         scale: float, z_change: float, sharp_before: bool) -> None:
    delta = after[0] - before[0]
    z = abs(delta) / (scale * math.sqrt(before[1] + after[1]))
    if z >= z_change:
        out.append(Change(onset, end, "increase" if delta > 0 else "decrease", before[0], after[0], z, sharp_before))


@dataclass
class _Candidate:
    onset: int
    direction: str
    seen: int


@dataclass(frozen=True)
class _Confirmed:
    onset: int  # series index of the onset
    direction: str
    at: int  # series index of the last point when it was confirmed
    end: int  # series index where the change ended (its extent when confirmed)


class PlateauTracker(Tracker):
    """Confirms transitions between plateaus of one growing series (module docstring has the model).

    Args:
        monitor: name of the series, copied into the transitions.
        penalty_scale: the segment penalty is ``penalty_scale * log(n)`` in units of ``sigma_lr**2``.
        z_slope: a segment is a ramp when its slope's z-score exceeds this.
        z_change: a change is a transition when its level difference's z-score exceeds this.
        min_size: minimum number of points of a segment.
        min_plateau: a flat segment shorter than this is part of the change around it, not a plateau.
        settle: a change in the same direction that starts less than this many points after a
            transition was confirmed is that transition again (a wide rise first fitted as two jumps),
            unless the level between them is bounded by sharp jumps; so is one in the same direction
            that starts less than this many points before a confirmed onset that no change of the
            refit finds again (the onset of a wide rise moving back).
        confirm: consecutive refits that must find the same onset (within ``jitter`` points, same
            direction) before the transition is reported.
        jitter: how far (points) an onset may move between refits and still count as seen again.
        tolerance: a change whose extent covers a confirmed onset of the same direction, give or take
            this many points, is that transition and is not reported again.
        max_points: only the last ``max_points`` points are refitted (the cost bound).
        noise: ``None`` to estimate the noise at every refit with
            :func:`~devinterp_lightning.stages.noise.estimate_long_run_noise`, or a fixed long-run
            ``sigma_lr``.
        noise_margin: for ``noise_model="variogram"`` / ``"residual"``: the estimated AR(1)
            coefficient is raised by this many standard errors
            (:func:`~devinterp_lightning.stages.noise.estimate_long_run_noise`,
            :func:`~devinterp_lightning.stages.noise.segment_noise`).
        noise_model: ``"auto"`` (``"variogram"`` when the series has a finite reported standard error,
            else ``"split"``), ``"split"`` (segments from a central noise level, z-tests from an upper
            one), ``"variogram"`` or ``"residual"`` (one level from the lag-1 / lag-2 variogram ratio or
            from the bias-corrected lag-1 autocorrelation of the residuals); module docstring.
        significance_margin: for ``"split"``: standard errors the upper level's AR(1) coefficient is
            raised by.
        min_points: no fit before the series has this many points.

    Attributes:
        last_noise: the noise level the last fit's z-tests used (``sigma``, ``phi``, ``long_run``).
        last_residual_noise: with ``noise_model="split"``, the last fit's bias-corrected residual
            estimate before ``significance_margin`` raised it (what the series alone says).
    """

    def __init__(
        self,
        monitor: str,
        *,
        penalty_scale: float = 3.0,
        z_slope: float = 3.0,
        z_change: float = 3.0,
        min_size: int = 3,
        min_plateau: int = 15,
        settle: int = 15,
        confirm: int = 3,
        jitter: int = 2,
        tolerance: int = 3,
        max_points: int = 300,
        noise: float | None = None,
        noise_margin: float = 2.0,
        noise_model: NoiseModel = "auto",
        significance_margin: float = 4.0,
        min_points: int = 10,
    ) -> None:
        if min_size < 2:
            raise ValueError(f"min_size must be >= 2, got {min_size}")
        if confirm < 1:
            raise ValueError(f"confirm must be >= 1, got {confirm}")
        if penalty_scale <= 0 or z_slope <= 0 or z_change <= 0:
            raise ValueError("penalty_scale, z_slope and z_change must be > 0, got "
                             f"{penalty_scale}, {z_slope}, {z_change}")
        if noise_margin < 0 or significance_margin < 0:
            raise ValueError("noise_margin and significance_margin are numbers of standard errors and must be "
                             f">= 0, got {noise_margin}, {significance_margin}")
        if noise_model not in get_args(NoiseModel):
            raise ValueError(f"noise_model must be one of {get_args(NoiseModel)}, got {noise_model!r}")
        if max_points < 2 * min_size:
            raise ValueError(f"max_points must be >= 2 * min_size = {2 * min_size}, got {max_points}")
        self.monitor = monitor
        self.penalty_scale = float(penalty_scale)
        self.z_slope = float(z_slope)
        self.z_change = float(z_change)
        self.min_size = int(min_size)
        self.min_plateau = int(min_plateau)
        self.settle = int(settle)
        self.confirm = int(confirm)
        self.jitter = int(jitter)
        self.tolerance = int(tolerance)
        self.max_points = int(max_points)
        self.noise = noise
        self.noise_margin = float(noise_margin)
        self.noise_model = noise_model
        self.significance_margin = float(significance_margin)
        self.min_points = max(int(min_points), 2 * int(min_size))
        self._confirmed: list[_Confirmed] = []
        self._pending: list[_Candidate] = []
        self._breaks: list[int] = []  # series indices where the last fit's segments start
        self.transitions: list[Transition] = []
        self.last_noise: NoiseLevel | None = None
        self.last_residual_noise: NoiseLevel | None = None

    def fit(self, values: Sequence[float], stderrs: Sequence[float] | None = None, *,
            known: Sequence[tuple[int, int]] = (), previous: Sequence[int] = ()
            ) -> tuple[list[Segment], list[Change], float]:
        """Segment ``values`` (the whole window) and return (segments, significant changes, sigma_lr).

        ``known``: ``(onset, end)`` index ranges of transitions already confirmed in this window;
        ``previous``: the breaks of the previous update's fit. Pairs of points across either are left
        out of the noise estimate.
        """
        x = np.asarray(values, dtype=float)
        if self.noise is not None:
            self.last_noise = NoiseLevel(float(self.noise), 0.0, float(self.noise))
            x = despike(x, self.last_noise.sigma)
            return self._segment(x, self.last_noise.long_run, self.last_noise.long_run)
        # first pass: median-based variograms, which the jumps of a step barely move
        first = estimate_long_run_noise(x, stderrs, robust=True, margin=0.0, phi_max=0.5)
        x = despike(x, first.sigma)
        segs = fit_segments(x, first.long_run, penalty_scale=self.penalty_scale, z_slope=self.z_slope,
                            min_size=self.min_size)
        spans = [(s.start, s.end, s.kind == "ramp") for s in segs]
        model = self.resolved_noise_model(stderrs)
        if model == "residual":
            self.last_noise = segment_noise(x, spans, stderrs, margin=self.noise_margin)
            return self._segment(x, self.last_noise.long_run, self.last_noise.long_run)
        if model == "variogram":
            self.last_noise = self._variogram_noise(x, segs, stderrs, known, previous, self.noise_margin)
            return self._segment(x, self.last_noise.long_run, self.last_noise.long_run)
        # split: the segments from the central estimate (the smaller of the two, each inflated only by
        # structure the first fit missed), the z-tests from the residual estimate's upper bound
        residual, upper = segment_noise_levels(x, spans, stderrs, margins=(0.0, self.significance_margin))
        self.last_residual_noise = residual
        central = min(self._variogram_noise(x, segs, stderrs, known, previous, 0.0), residual,
                      key=lambda n: n.long_run)
        self.last_noise = upper if upper.long_run >= central.long_run else central
        return self._segment(x, central.long_run, self.last_noise.long_run)

    def resolved_noise_model(self, stderrs: Sequence[float] | None = None) -> str:
        """The noise model a fit uses: ``noise_model``, or for ``"auto"``: ``"variogram"`` when any
        reported standard error is finite (an LLC series), else ``"split"``."""
        if self.noise_model != "auto":
            return self.noise_model
        has_stderr = stderrs is not None and bool(np.isfinite(np.asarray(stderrs, dtype=float)).any())
        return "variogram" if has_stderr else "split"

    @staticmethod
    def _variogram_noise(x: np.ndarray, segs: Sequence[Segment], stderrs: Sequence[float] | None,
                         known: Sequence[tuple[int, int]], previous: Sequence[int], margin: float) -> NoiseLevel:
        """Variograms of the residuals inside the segments of ``segs`` and outside the known
        transitions (pairs across them left out), which neither a jump nor a ramp inflates."""
        trend = np.concatenate([[s.value_at(i) for i in range(s.start, s.end)] for s in segs])
        breaks = {s.start for s in segs[1:]} | {i for a, b in known for i in range(max(a, 1), b + 1)}
        breaks |= {b for b in previous if 0 < b < x.size}
        return estimate_long_run_noise(x - trend, stderrs, breaks=sorted(breaks), margin=margin)

    def _segment(self, x: np.ndarray, scale: float, test_scale: float) -> tuple[list[Segment], list[Change], float]:
        """Segments fitted with noise ``scale``; changes whose level differences pass the z-tests at
        ``test_scale`` (``changes`` uses its scale for nothing else)."""
        segs = fit_segments(x, scale, penalty_scale=self.penalty_scale, z_slope=self.z_slope, min_size=self.min_size,
                            slope_scale=test_scale)
        return segs, changes(segs, test_scale, z_change=self.z_change, min_plateau=self.min_plateau), test_scale

    def _known(self, c: Change, start: int, found: Sequence[Change] = ()) -> bool:
        """Whether ``c`` is a confirmed transition seen again: an onset within ``tolerance`` points;
        or the same direction with the confirmed onset inside ``c``'s extent; or the same direction
        starting less than ``settle`` points after that transition was confirmed (a wide rise is often
        first fitted as a jump to a short level, then as another jump), unless the level between
        them is bounded by sharp jumps (see :func:`changes`); or the same direction starting less than
        ``settle`` points *before* a confirmed onset that no change of this fit (``found``) sees again
        (the slow start of a wide rise, first fitted into the plateau, later into the rise: the onset
        moves back)."""
        onset = c.onset + start
        for k in self._confirmed:
            if self._seen_again(k, c, start):
                return True
            if k.direction != c.direction:
                continue
            if not c.sharp_before and k.onset <= onset < k.at + self.settle:
                return True
            if onset < k.onset < onset + self.settle and not any(self._seen_again(k, o, start) for o in found):
                return True
        return False

    def _seen_again(self, k: _Confirmed, c: Change, start: int) -> bool:
        """Whether change ``c`` (window indices from ``start``) is confirmed transition ``k``: onsets
        within ``tolerance`` points, or the same direction with ``k``'s onset inside ``c``'s extent."""
        onset = c.onset + start
        if abs(k.onset - onset) <= self.tolerance:
            return True
        return k.direction == c.direction and onset - self.tolerance <= k.onset <= c.end + start + self.tolerance

    def update(
        self,
        steps: Sequence[int],
        values: Sequence[float],
        *,
        stderrs: Sequence[float] | None = None,
        now: int | None = None,
    ) -> list[Transition]:
        n = len(values)
        if n != len(steps):
            raise ValueError(f"steps ({len(steps)}) and values ({n}) differ in length")
        if n < self.min_points:
            return []
        now = int(steps[-1] if now is None else now)
        start = max(0, n - self.max_points)
        known = [(k.onset - start, k.end - start) for k in self._confirmed if k.end >= start]
        segs, found, _ = self.fit(values[start:], None if stderrs is None else stderrs[start:], known=known,
                                  previous=[b - start for b in self._breaks])
        self._breaks = [sg.start + start for sg in segs[1:]]
        pending: list[_Candidate] = []
        new: list[Transition] = []
        for c in found:
            if self._known(c, start, found):
                continue
            onset = c.onset + start
            prev = next((p for p in self._pending if p.direction == c.direction
                         and abs(p.onset - onset) <= self.jitter), None)
            cand = _Candidate(onset, c.direction, 1 if prev is None else prev.seen + 1)
            if cand.seen >= self.confirm:
                self._confirmed.append(_Confirmed(onset, c.direction, n - 1, c.end + start))
                new.append(Transition(
                    monitor=self.monitor, step=max(now, int(steps[onset])), changepoint_step=int(steps[onset]),
                    direction=c.direction, level_before=c.level_before, level_after=c.level_after,
                    kind="changepoint",
                ))
            else:
                pending.append(cand)
        self._pending = pending
        self._confirmed.sort(key=lambda k: k.onset)
        new.sort(key=lambda t: t.changepoint_step)
        self.transitions.extend(new)
        return new

    @property
    def confirmed_indices(self) -> list[int]:
        return [k.onset for k in self._confirmed]

    def state_dict(self) -> dict[str, Any]:
        return {
            "confirmed": [[k.onset, k.direction, k.at, k.end] for k in self._confirmed],
            "pending": [[c.onset, c.direction, c.seen] for c in self._pending],
            "transitions": [t.to_dict() for t in self.transitions],
            "breaks": list(self._breaks),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._breaks = [int(b) for b in state.get("breaks", [])]
        self._confirmed = [_Confirmed(int(i), str(d), int(a), int(e)) for i, d, a, e in state.get("confirmed", [])]
        self._pending = [_Candidate(int(i), str(d), int(s)) for i, d, s in state.get("pending", [])]
        self.transitions = [Transition.from_dict(t) for t in state.get("transitions", [])]


def detect_transitions(
    steps: Sequence[int],
    values: Sequence[float],
    *,
    stderrs: Sequence[float] | None = None,
    **tracker_kwargs: Any,
) -> list[Transition]:
    """Replay ``values`` point by point through a :class:`PlateauTracker` (as a training run would
    feed it) and return every confirmed transition, with its confirmation step."""
    tracker = PlateauTracker(tracker_kwargs.pop("monitor", "series"), **tracker_kwargs)
    return replay(tracker, steps, values, stderrs)
