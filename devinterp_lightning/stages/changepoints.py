"""Online changepoint detection in a growing scalar series, with ruptures. No Lightning import.

The series is re-segmented from scratch each time it grows (a *fresh* ruptures estimator per refit,
``jump=1``) with a penalty scaled by the measured noise variance of the series:

    pen = penalty_scale * sigma**2 * log(n)

where ``n`` is the number of points fitted and ``sigma`` the per-point noise (see
:func:`estimate_noise`). For the ``"l2"`` cost a split of a segment lowers the cost by
``n1*n2/(n1+n2) * (mean1 - mean2)**2``, so the penalty is a threshold on a squared, noise-normalised
level shift: under pure noise that reduction is ``sigma**2`` times a maximum of chi-square(1)
variables, which grows like ``log n``.

A changepoint is reported (a :class:`~devinterp_lightning.stages.events.Transition`) only once it is
*confirmed*: it has been found within one point of the same place in ``confirm`` consecutive
refits. Confirmed changepoints are never retracted; later refits that put a breakpoint
within ``tolerance`` points of a confirmed one are matched to it and not reported again.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from devinterp_lightning.stages.base import Tracker, replay
from devinterp_lightning.stages.events import Transition

Method = Literal["binseg", "pelt", "bottomup"]

_MAD_TO_SIGMA = 1.4826  # MAD of a Gaussian = 0.6745 sigma


def estimate_noise(values: Sequence[float], stderrs: Sequence[float] | None = None) -> float:
    """Per-point noise level ``sigma`` of a series (same unit as the values).

    Two estimates, the larger is used:

    * the reported standard errors (for an LLC: std across chains / sqrt(num_chains)), median over
      the points where it is finite;
    * an empirical one that does not assume the reported errors are right, from the first
      differences ``d`` of the series (differencing removes the level): ``sqrt(mean(d**2) / 2)``
      with ``d`` clipped at ``5 * 1.4826 * median(|d|)``. A level shift of size ``delta`` only adds
      ``delta**2 / (2 (n - 1))`` to the variance, and the clipping bounds what a single outlier or
      a large jump can add. (The median-only estimate is robust but too noisy on short series: it
      tripled the false-alarm rate in our measurements.)

    Taking the larger protects against chains that under-report the scatter between estimates
    (which would otherwise turn noise into changepoints). Returns 0.0 for fewer than 3 points and
    no finite stderr.
    """
    x = np.asarray(values, dtype=float)
    empirical = 0.0
    if x.size >= 3:
        d = np.diff(x)
        cap = 5.0 * _MAD_TO_SIGMA * float(np.median(np.abs(d)))
        if cap > 0:
            d = np.clip(d, -cap, cap)
        empirical = math.sqrt(float(np.mean(d**2)) / 2.0)
    reported = 0.0
    if stderrs is not None:
        s = np.asarray(stderrs, dtype=float)
        s = s[np.isfinite(s)]
        if s.size:
            reported = float(np.median(s))
    return max(empirical, reported)


def penalty(n: int, sigma: float, penalty_scale: float) -> float:
    """``penalty_scale * sigma**2 * log(n)`` (floored so a noiseless series still needs a real shift)."""
    return penalty_scale * max(sigma, 1e-12) ** 2 * math.log(max(n, 2))


def segment(
    values: Sequence[float],
    pen: float,
    *,
    method: Method = "binseg",
    model: str = "l2",
    min_size: int = 3,
) -> list[int]:
    """Breakpoints of ``values`` (indices of the first point of each new segment, ``len`` excluded).

    A fresh ruptures estimator is built on every call (ruptures estimators cache costs of the last
    signal they were fitted on), with ``jump=1`` so that a breakpoint can fall on any point.
    """
    import ruptures as rpt  # deferred: ruptures is only needed once a series has enough points

    x = np.asarray(values, dtype=float).reshape(-1, 1)
    n = x.shape[0]
    if n < 2 * min_size:
        return []
    algos = {"binseg": rpt.Binseg, "pelt": rpt.Pelt, "bottomup": rpt.BottomUp}
    if method not in algos:
        raise ValueError(f"unknown changepoint method {method!r}; use one of {sorted(algos)}")
    if model == "l2":
        algo = algos[method](custom_cost=_fast_l2_cost(), min_size=min_size, jump=1).fit(x)
    else:
        algo = algos[method](model=model, min_size=min_size, jump=1).fit(x)
    try:
        bkps = algo.predict(pen=pen)
    except rpt.exceptions.BadSegmentationParameters:
        return []
    return [int(b) for b in bkps if 0 < b < n]


def _fast_l2_cost() -> Any:
    """ruptures' ``l2`` cost with O(1) segment errors from cumulative sums (same values as
    ``CostL2``: the sum of squared deviations from the segment mean), ~10x faster per refit."""
    from ruptures.base import BaseCost

    class CumsumL2(BaseCost):
        model = "l2"
        min_size = 1

        def fit(self, signal: np.ndarray) -> CumsumL2:
            x = np.asarray(signal, dtype=float).reshape(len(signal), -1)
            self.signal = x
            zero = np.zeros((1, x.shape[1]))
            # Summed over dimensions at the end, so a 1-d series is kept as plain floats: per-call
            # numpy overhead would dominate the O(1) arithmetic.
            self._s1 = np.concatenate([zero, np.cumsum(x, axis=0)]).tolist()
            self._s2 = np.concatenate([zero, np.cumsum(x**2, axis=0)]).sum(axis=1).tolist()
            return self

        def error(self, start: int, end: int) -> float:
            n = end - start
            a, b = self._s1[end], self._s1[start]
            return (self._s2[end] - self._s2[start]) - sum((u - v) ** 2 for u, v in zip(a, b, strict=True)) / n

    return CumsumL2()


@dataclass
class _Candidate:
    index: int
    seen: int  # consecutive refits that contained it


class ChangepointTracker(Tracker):
    """Confirms changepoints of one growing series; state survives ``state_dict`` round trips.

    Call :meth:`update` with the *whole* series each time it grows; it returns the transitions
    confirmed by this update (in onset order).

    Args:
        monitor: name of the series, copied into the transitions.
        penalty_scale: ``pen = penalty_scale * sigma**2 * log(n)``. The default keeps the measured
            false-alarm rate on pure Gaussian noise low (docs/stages.md has the figures).
        min_size: minimum number of points in a segment (ruptures ``min_size``).
        confirm: number of consecutive refits in which a changepoint must appear before it is
            reported, within one point of the same place. The detection delay is therefore
            ``(min_size - 1) + (confirm - 1)`` points after the onset at the earliest (one less when
            the onset estimate moved one point later while being confirmed).
        tolerance: a breakpoint within this many points of a known one is the same changepoint
            (re-segmentations move breakpoints by a point or two). Default: ``min_size``.
        method: ruptures search method (``"binseg"`` is O(n log n) per refit; ``"pelt"`` is exact
            but O(n^2) in pure Python per refit, fine up to a few hundred points).
        model: ruptures cost (``"l2"``: shifts of the mean; ``"l1"``: shifts of the median, robust
            to outliers; ``"normal"``: mean and variance).
        max_points: only the last ``max_points`` points are refitted, which bounds the cost of long
            series; confirmed changepoints before the window stay confirmed.
        noise: ``None`` to estimate ``sigma`` with :func:`estimate_noise` at every refit, or a fixed
            ``sigma``.
        min_points: no fit before the series has this many points (an empirical noise level from a
            handful of points is too unreliable to set a penalty with).
    """

    def __init__(
        self,
        monitor: str,
        *,
        penalty_scale: float = 6.0,
        min_size: int = 3,
        confirm: int = 3,
        tolerance: int | None = None,
        method: Method = "binseg",
        model: str = "l2",
        max_points: int = 1000,
        noise: float | None = None,
        min_points: int = 10,
    ) -> None:
        if min_size < 1:
            raise ValueError(f"min_size must be >= 1, got {min_size}")
        if confirm < 1:
            raise ValueError(f"confirm must be >= 1, got {confirm}")
        if penalty_scale <= 0:
            raise ValueError(f"penalty_scale must be > 0, got {penalty_scale}")
        self.monitor = monitor
        self.penalty_scale = float(penalty_scale)
        self.min_size = int(min_size)
        self.confirm = int(confirm)
        self.tolerance = int(min_size if tolerance is None else tolerance)
        self.method: Method = method
        self.model = model
        self.max_points = int(max_points)
        self.noise = noise
        self.min_points = max(int(min_points), 2 * int(min_size))
        self._confirmed: list[int] = []  # indices into the series, sorted
        self._pending: list[_Candidate] = []
        self.transitions: list[Transition] = []

    @property
    def confirmed_indices(self) -> list[int]:
        return list(self._confirmed)

    def _near(self, index: int, others: Sequence[int]) -> bool:
        return any(abs(index - o) <= self.tolerance for o in others)

    def update(
        self,
        steps: Sequence[int],
        values: Sequence[float],
        *,
        stderrs: Sequence[float] | None = None,
        now: int | None = None,
    ) -> list[Transition]:
        """Refit the series and return the changepoints confirmed by this update.

        Args:
            steps: global step of each point (non-decreasing).
            values: the series.
            stderrs: per-point standard errors, used for the noise level (may contain nan).
            now: the step at which the detection happens (``Transition.step``); default: last step.
        """
        n = len(values)
        if n != len(steps):
            raise ValueError(f"steps ({len(steps)}) and values ({n}) differ in length")
        if n < self.min_points:
            return []
        now = int(steps[-1] if now is None else now)
        start = max(0, n - self.max_points)
        window = np.asarray(values[start:], dtype=float)
        sigma = self.noise if self.noise is not None else estimate_noise(
            window, None if stderrs is None else stderrs[start:]
        )
        pen = penalty(len(window), sigma, self.penalty_scale)
        bkps = [b + start for b in segment(window, pen, method=self.method, model=self.model,
                                           min_size=self.min_size)]

        pending: list[_Candidate] = []
        for b in bkps:
            if self._near(b, self._confirmed):
                continue
            # A candidate counts as seen again only if it stayed within one point: a breakpoint that
            # still wanders has an uncertain onset and, confirmed too early, would be reported twice.
            previous = next((c for c in self._pending if abs(c.index - b) <= 1), None)
            pending.append(_Candidate(b, 1 if previous is None else previous.seen + 1))
        self._pending = pending

        new: list[Transition] = []
        for cand in pending:
            if cand.seen >= self.confirm and not self._near(cand.index, self._confirmed):
                self._confirmed.append(cand.index)
                self._confirmed.sort()
                new.append(self._make_transition(cand.index, bkps, steps, values, now))
        self._pending = [c for c in self._pending if c.index not in self._confirmed]
        new.sort(key=lambda t: t.changepoint_step)
        self.transitions.extend(new)
        return new

    def _make_transition(
        self, index: int, bkps: Sequence[int], steps: Sequence[int], values: Sequence[float], now: int
    ) -> Transition:
        # Segment levels: bounded by the neighbouring breakpoints of this fit or confirmed before.
        bounds = sorted(set(bkps) | set(self._confirmed) | {0, len(values)})
        i = bounds.index(index)
        lo, hi = bounds[i - 1], bounds[i + 1]
        x = np.asarray(values, dtype=float)
        before = float(x[lo:index].mean())
        after = float(x[index:hi].mean())
        return Transition(
            monitor=self.monitor,
            step=max(now, int(steps[index])),
            changepoint_step=int(steps[index]),
            direction="increase" if after >= before else "decrease",
            level_before=before,
            level_after=after,
            kind="changepoint",
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "confirmed": list(self._confirmed),
            "pending": [[c.index, c.seen] for c in self._pending],
            "transitions": [t.to_dict() for t in self.transitions],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._confirmed = [int(i) for i in state.get("confirmed", [])]
        self._pending = [_Candidate(int(i), int(s)) for i, s in state.get("pending", [])]
        self.transitions = [Transition.from_dict(t) for t in state.get("transitions", [])]


def detect_changepoints(
    steps: Sequence[int],
    values: Sequence[float],
    *,
    stderrs: Sequence[float] | None = None,
    **tracker_kwargs: Any,
) -> list[Transition]:
    """Replay ``values`` point by point through a :class:`ChangepointTracker` (as a training run
    would feed it) and return every confirmed changepoint, with its detection step.

    Useful offline (notebooks, the report) and to measure detection delays.
    """
    tracker = ChangepointTracker(tracker_kwargs.pop("monitor", "series"), **tracker_kwargs)
    return replay(tracker, steps, values, stderrs)
