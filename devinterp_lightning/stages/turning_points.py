"""Turning points of a growing scalar series: where its slope changes sign. No Lightning import.

At each point ``i`` with ``window`` points on each side, straight lines are fitted by least squares
to ``values[i-window : i+1]`` (left) and ``values[i : i+window+1]`` (right). With per-point noise
``sigma`` the standard error of a fitted slope over abscissae ``t`` is
``sigma / sqrt(sum((t - mean(t))**2))``, so each slope has a z-score. ``i`` is a candidate *peak*
when ``z_left >= z`` and ``z_right <= -z`` (a rise followed by a fall), a candidate *trough* in the
opposite case. Neighbouring candidates form one group; the group's turning point is the candidate
with the largest ``min(|z_left|, |z_right|)``. A group is confirmed (and reported) once a later point
can be tested and is no longer a candidate, so the detection delay is at least ``window + 1`` points.

A flat top longer than ``window`` points (a plateau between a rise and a fall) is two slope changes
that are each not a sign change within one window: it is not reported as a turning point. The
changepoint detector reports the level shifts around it instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from devinterp_lightning.stages.base import Tracker, replay
from devinterp_lightning.stages.changepoints import estimate_noise
from devinterp_lightning.stages.events import Transition


def slope_z_scores(values: Sequence[float], window: int, sigma: float) -> np.ndarray:
    """``(n, 2)`` array of (left, right) slope z-scores per point; nan where a window is incomplete.

    Slopes are taken against the point index (the z-score does not depend on the abscissa unit).
    The least-squares slope over ``window + 1`` points is a fixed linear filter of them,
    ``sum(tc * y) / sum(tc**2)`` with ``tc`` the centred abscissae, so all windows are one correlation.
    """
    y = np.asarray(values, dtype=float)
    n = y.size
    out = np.full((n, 2), np.nan)
    if n < 2 * window + 1:
        return out
    tc = np.arange(window + 1, dtype=float) - window / 2.0
    sxx = float(np.dot(tc, tc))
    # z = slope / (sigma / sqrt(sxx)) = dot(tc, y_window) / (sigma * sqrt(sxx))
    z = np.correlate(y, tc, mode="valid") / (max(sigma, 1e-12) * np.sqrt(sxx))  # z[j]: window y[j:j+w+1]
    idx = np.arange(window, n - window)
    out[idx, 0] = z[idx - window]
    out[idx, 1] = z[idx]
    return out


class TurningPointTracker(Tracker):
    """Confirms turning points of one growing series; state survives ``state_dict`` round trips.

    Args:
        monitor: name of the series, copied into the transitions.
        window: points on each side of a turning point used to fit the slopes.
        z: a slope counts as rising/falling when its z-score is beyond ``+-z``. The default was
            chosen for a low false-alarm rate on pure noise (docs/stages.md has the figures).
        tolerance: a candidate within this many points of a confirmed turning point is the same one.
            Default: ``window``.
        noise: ``None`` to estimate ``sigma`` with
            :func:`~devinterp_lightning.stages.changepoints.estimate_noise`, or a fixed ``sigma``.
    """

    def __init__(
        self,
        monitor: str,
        *,
        window: int = 8,
        z: float = 3.0,
        tolerance: int | None = None,
        noise: float | None = None,
    ) -> None:
        if window < 2:
            raise ValueError(f"window must be >= 2, got {window}")
        self.monitor = monitor
        self.window = int(window)
        self.z = float(z)
        self.tolerance = int(window if tolerance is None else tolerance)
        self.noise = noise
        self._confirmed: list[int] = []
        self.transitions: list[Transition] = []

    def update(
        self,
        steps: Sequence[int],
        values: Sequence[float],
        *,
        stderrs: Sequence[float] | None = None,
        now: int | None = None,
    ) -> list[Transition]:
        """Re-test the series and return the turning points confirmed by this update."""
        n = len(values)
        if n != len(steps):
            raise ValueError(f"steps ({len(steps)}) and values ({n}) differ in length")
        w = self.window
        if n < 2 * w + 2:
            return []
        now = int(steps[-1] if now is None else now)
        # Only the recent past can hold a new turning point: test the last 4 windows.
        lo = max(0, n - 6 * w - 2)
        y = np.asarray(values[lo:], dtype=float)
        sigma = self.noise if self.noise is not None else estimate_noise(
            values, None if stderrs is None else stderrs
        )
        zs = slope_z_scores(y, w, sigma)
        peak = (zs[:, 0] >= self.z) & (zs[:, 1] <= -self.z)
        trough = (zs[:, 0] <= -self.z) & (zs[:, 1] >= self.z)
        last_testable = y.size - 1 - w
        new: list[Transition] = []
        for mask, after in ((peak, "decrease"), (trough, "increase")):
            idx = np.flatnonzero(mask)
            groups: list[list[int]] = []
            for i in idx:
                if groups and i - groups[-1][-1] <= 1:
                    groups[-1].append(int(i))
                else:
                    groups.append([int(i)])
            for g in groups:
                if g[-1] >= last_testable:  # still growing: wait for a non-candidate after it
                    continue
                strength = [min(abs(zs[i, 0]), abs(zs[i, 1])) for i in g]
                best = g[int(np.argmax(strength))] + lo
                if any(abs(best - c) <= self.tolerance for c in self._confirmed):
                    continue
                self._confirmed.append(best)
                xs = np.asarray(values, dtype=float)
                new.append(
                    Transition(
                        monitor=self.monitor,
                        step=max(now, int(steps[best])),
                        changepoint_step=int(steps[best]),
                        direction=after,  # type: ignore[arg-type]
                        level_before=float(xs[best - w : best + 1].mean()),
                        level_after=float(xs[best : best + w + 1].mean()),
                        kind="turning_point",
                    )
                )
        self._confirmed.sort()
        new.sort(key=lambda t: t.changepoint_step)
        self.transitions.extend(new)
        return new

    def state_dict(self) -> dict[str, Any]:
        return {"confirmed": list(self._confirmed), "transitions": [t.to_dict() for t in self.transitions]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._confirmed = [int(i) for i in state.get("confirmed", [])]
        self.transitions = [Transition.from_dict(t) for t in state.get("transitions", [])]


def detect_turning_points(
    steps: Sequence[int],
    values: Sequence[float],
    *,
    stderrs: Sequence[float] | None = None,
    **tracker_kwargs: Any,
) -> list[Transition]:
    """Replay ``values`` point by point through a :class:`TurningPointTracker`; all confirmed turns."""
    tracker = TurningPointTracker(tracker_kwargs.pop("monitor", "series"), **tracker_kwargs)
    return replay(tracker, steps, values, stderrs)
