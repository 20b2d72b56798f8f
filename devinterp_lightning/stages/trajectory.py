"""Turning points of a trajectory in PCA space, confirmed as it grows. No Lightning import.

:class:`TrajectoryTurningTracker` is the :class:`~devinterp_lightning.stages.base.Tracker` of the
essential-dynamics trajectory: fed the whole trajectory (every stored snapshot on the *current*
principal components) each time a snapshot arrives, it runs
:func:`~devinterp_lightning.essential_dynamics.find_turning_points`, drops the candidates it has
already published (the same corner seen again on a moved basis) and turns the new ones into
``Transition(kind="turning_point")`` with their levels and direction.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from devinterp_lightning import tags
from devinterp_lightning.essential_dynamics import (
    TurningPoint,
    confirmation_lag,
    denoised_arclength,
    find_turning_points,
    window_half_width,
)
from devinterp_lightning.stages.base import Tracker
from devinterp_lightning.stages.events import Transition

__all__ = ["PARAMETERIZATIONS", "TrajectoryTurningTracker", "turn_levels"]

PARAMETERIZATIONS = ("time", "arclength")


def turn_levels(pc1: np.ndarray, index: int, half: int) -> tuple[float, float]:
    """``(before, after)``: the mean of ``pc1`` over ``[index - half, index]`` and over
    ``[index, index + half]`` (clipped at the ends). PC1 is the dominant direction of development,
    so the sign of ``after - before`` is the direction of the turn."""
    pc1 = np.asarray(pc1, dtype=np.float64)
    return float(pc1[max(0, index - half) : index + 1].mean()), float(pc1[index : index + half + 1].mean())


class TrajectoryTurningTracker(Tracker):
    r"""Confirms turning points of a growing trajectory in PCA space, once each, never retracted.

    **Why the trajectory goes through** ``values``. The :class:`Tracker` contract is "take the whole
    series so far". For essential dynamics the series is the trajectory, and each of its values is
    a point in ``R^k`` rather than a number, so ``values`` is an ``N x k`` array (row ``i`` is the
    snapshot taken at ``steps[i]``). Accepting more than the base class's ``Sequence[float]`` keeps
    the tracker substitutable wherever a tracker is driven (``replay`` slices growing prefixes of an
    array just as of a list). The alternative, a tracker holding the callback's ``IncrementalPCA``
    and ignoring ``values``, was rejected: its state would then live partly in another object, and
    it could no longer be tested or benchmarked on plain arrays. Because the PCA basis moves as
    snapshots arrive, the caller passes the coordinates of *all* stored snapshots on the current
    basis at every update; ``stderrs`` is ignored (the noise is estimated from the residual of the
    smoothed curve, see :func:`~devinterp_lightning.essential_dynamics.pair_vertices`).

    **De-duplication.** A candidate is new unless it lies within ``w = max(tolerance,
    window_half_width(smoothing))`` snapshots (converted to steps with the mean snapshot spacing)
    of an already published turning point: two vertices closer than the turn window cannot both be
    kept by ``pair_vertices``, so such a candidate is the same corner seen on a moved basis. With
    ``parameterization="arclength"`` it is also old when little distance was travelled between the
    two (``w + 1`` times the mean denoised arc length per snapshot), since the same corner can map
    to a different snapshot of a plateau as the basis moves. (Measured on 3-segment polylines,
    noise 0.02, seeds 0-9, arc length: a window of ``tolerance`` alone published 4 corners twice,
    this one none.) With ``"time"`` each stretch of the
    trajectory is judged once, when its smoothing window completes (``confirmation_lag`` snapshots
    later): candidates beyond that point are not yet ripe, and candidates behind the frontier come
    from a moved basis, not a moved trajectory. In arc length a plateau's arrival becomes a turn
    only when the trajectory leaves the plateau, possibly long after, so there is no frontier.

    **Transitions.** ``changepoint_step`` is the turning snapshot's step, ``step`` the decision step
    ``now``; the levels are :func:`turn_levels` of PC1 over ``window_half_width(smoothing)``
    snapshots, and ``direction`` their order.

    ``turning_points[i]`` (geometry: pairs, net turn, coordinates) belongs to ``transitions[i]``.

    Args:
        monitor: name copied into every transition (``"ed/trajectory"``).
        smoothing: Gaussian bandwidth, in points of the curve, of the local quadratic fit.
        min_angle_deg: minimal net tangent turn, in degrees, in ``(0, 360)``.
        min_pairs: component pairs in which the turn must appear.
        tolerance: points within which detections count as the same; default ``max(2, ceil(smoothing))``.
        min_snr: both legs of a turn must be this many times the local noise.
        parameterization: ``"time"`` or ``"arclength"`` (see ``find_turning_points``).
        alpha: level of the tests against noise (see ``find_turning_points``); ``None`` disables them.
    """

    def __init__(
        self,
        monitor: str = tags.ED_TRAJECTORY,
        *,
        smoothing: float = 3.0,
        min_angle_deg: float = 45.0,
        min_pairs: int = 2,
        tolerance: int | None = None,
        min_snr: float = 3.0,
        parameterization: str = "arclength",
        alpha: float | None = 0.01,
    ) -> None:
        if smoothing < 0:
            raise ValueError(f"smoothing is a bandwidth in snapshots and must be >= 0, got {smoothing}")
        if not 0 < min_angle_deg < 360:
            raise ValueError(f"min_angle_deg must be in (0, 360), got {min_angle_deg}")
        if parameterization not in PARAMETERIZATIONS:
            raise ValueError(f"parameterization must be 'time' or 'arclength', got {parameterization!r}")
        if alpha is not None and not 0 < alpha < 1:
            raise ValueError(f"alpha is the level of the noise tests and must be in (0, 1) or None, got {alpha}")
        if min_pairs < 1:
            raise ValueError(f"min_pairs must be >= 1, got {min_pairs}")
        self.monitor = monitor
        self.smoothing = float(smoothing)
        self.min_angle_deg = float(min_angle_deg)
        self.min_pairs = int(min_pairs)
        self.tolerance = tolerance
        self.min_snr = float(min_snr)
        self.parameterization = parameterization
        self.alpha = alpha
        self.turning_points: list[TurningPoint] = []
        self.transitions: list[Transition] = []
        self._frontier_step = -1  # with "time": snapshots at or before this step have been judged

    def update(
        self,
        steps: Sequence[int],
        values: Sequence[float] | np.ndarray,
        *,
        stderrs: Sequence[float] | None = None,
        now: int | None = None,
    ) -> list[Transition]:
        """Take the whole trajectory (``values``: ``N x k``, ``k >= 2``, on the current basis);
        return the turning points this update confirmed, as transitions decided at ``now``."""
        scores = np.asarray(values, dtype=np.float64)
        if scores.ndim != 2 or scores.shape[1] < 2:
            raise ValueError(
                f"TrajectoryTurningTracker needs the trajectory as an N x k array with k >= 2 components, "
                f"got shape {scores.shape}; pass the PCA scores (IncrementalPCA.components(k)[0])"
            )
        steps = [int(s) for s in steps]
        if len(steps) != len(scores):
            raise ValueError(f"steps has {len(steps)} entries but the trajectory has {len(scores)} rows")
        n = len(steps)
        lag = confirmation_lag(self.smoothing)
        if n <= 2 * lag:
            return []
        now = steps[-1] if now is None else int(now)
        found = find_turning_points(
            scores, steps, sigma=self.smoothing, min_angle=math.radians(self.min_angle_deg),
            min_pairs=self.min_pairs, tolerance=self.tolerance, min_snr=self.min_snr,
            parameter=self.parameterization, alpha=self.alpha, exclude_last=lag,  # points whose window is incomplete
        )
        ready = steps[n - 1 - lag]  # snapshots up to here have their full window
        tol_snap = self.tolerance if self.tolerance is not None else max(2, math.ceil(self.smoothing))
        spacing = (steps[-1] - steps[0]) / max(n - 1, 1)
        tol_steps = tol_snap * spacing
        # Two corners closer than the turn window cannot both be vertices (pair_vertices keeps one per
        # window), so a candidate that close to a published one is the same corner on a moved basis.
        dedup = max(tol_snap, window_half_width(self.smoothing))
        same = self._same_turn(steps, scores, dedup, dedup * spacing)
        new: list[TurningPoint] = []
        for tp in found:
            if self.parameterization == "time" and (tp.step > ready or tp.step <= self._frontier_step - tol_steps):
                continue
            if not any(same(tp.step, old.step) for old in self.turning_points):
                new.append(tp)
        self._frontier_step = max(self._frontier_step, ready)
        half = window_half_width(self.smoothing)
        out = []
        for tp in new:
            before, after = turn_levels(scores[:, 0], tp.index, half)
            out.append(Transition(
                monitor=self.monitor, step=now, changepoint_step=int(tp.step),
                direction="increase" if after >= before else "decrease",
                level_before=before, level_after=after, kind="turning_point",
            ))
        self.turning_points.extend(new)
        self.transitions.extend(out)
        return out

    def _same_turn(self, steps: list[int], scores: np.ndarray, tol_snap: int, tol_steps: float) -> Callable[[int, int], bool]:
        """``same(a, b)``: whether turning points at steps ``a`` and ``b`` are one corner."""
        if self.parameterization == "time":
            return lambda a, b: abs(a - b) <= tol_steps
        arc, _ = denoised_arclength(scores, self.smoothing)
        where = {s: i for i, s in enumerate(steps)}
        arc_tol = (tol_snap + 1) * arc[-1] / max(len(steps) - 1, 1)

        def same(a: int, b: int) -> bool:
            if abs(a - b) <= tol_steps:
                return True
            return a in where and b in where and abs(arc[where[a]] - arc[where[b]]) <= arc_tol

        return same

    def state_dict(self) -> dict[str, Any]:
        """JSON-able: the published turning points and transitions, and the judged frontier."""
        return {
            "turning_points": [tp.to_dict() for tp in self.turning_points],
            "transitions": [t.to_dict() for t in self.transitions],
            "frontier_step": self._frontier_step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.turning_points = [TurningPoint.from_dict(d) for d in state["turning_points"]]
        self.transitions = [Transition.from_dict(d) for d in state["transitions"]]
        self._frontier_step = int(state["frontier_step"])
