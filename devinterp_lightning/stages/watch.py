"""Per-key stage bookkeeping: points in, transitions and stages out. No Lightning import.

:class:`StageWatch` is the state a :class:`~devinterp_lightning.callbacks.stage_detector.StageDetector`
keeps for each watched key, written as a small torchmetrics-style object with explicit state:
``update`` takes one point and returns the transitions it confirmed, ``stages`` computes the stages
from the series and the boundary transitions, ``state_dict`` / ``load_state_dict`` round-trip it all
(JSON-able values only). It also counts the points it skipped (flagged or not finite) and words the
end-of-training message for a key that never got a usable point.

It decides nothing about logging, checkpoints or halting: recording a transition is a separate call
(:meth:`StageWatch.record`) so that a caller reacting to each transition in turn sees the stages as
they are up to that transition.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any, Literal

from devinterp_lightning.series import SeriesPoint, SeriesStore
from devinterp_lightning.stages.base import Tracker
from devinterp_lightning.stages.changepoints import ChangepointTracker
from devinterp_lightning.stages.events import Stage, Transition
from devinterp_lightning.stages.plateaus import PlateauTracker
from devinterp_lightning.stages.segments import build_stages, stage_index_at
from devinterp_lightning.stages.turning_points import TurningPointTracker

__all__ = [
    "BOUNDARIES", "METHODS", "StageBoundaries", "StageMethod", "StageWatch", "describe", "make_tracker",
]

StageBoundaries = Literal["auto", "changepoint", "turning_point", "any"]
StageMethod = Literal["plateau", "binseg", "pelt", "bottomup"]
METHODS = ("plateau", "binseg", "pelt", "bottomup")
BOUNDARIES = ("auto", "changepoint", "turning_point", "any")


def make_tracker(key: str, method: StageMethod, settings: dict[str, Any] | None = None) -> Tracker:
    """The transition tracker for ``method``: a :class:`PlateauTracker` for ``"plateau"``, otherwise a
    :class:`ChangepointTracker` running that ruptures search. ``settings`` are its keyword arguments."""
    if method not in METHODS:
        raise ValueError(f"unknown stage method {method!r}; use one of {', '.join(METHODS)}")
    if method == "plateau":
        return PlateauTracker(key, **(settings or {}))
    return ChangepointTracker(key, method=method, **(settings or {}))


def describe(t: Transition) -> str:
    """One line for a log: kind, direction, key, onset, levels, confirmation step and delay."""
    return (f"{t.kind} {t.direction} of {t.monitor} at step {t.changepoint_step} ({t.level_before:.4g} -> "
            f"{t.level_after:.4g}), confirmed at step {t.step} (delay {t.detection_delay})")


def _identity(t: Transition) -> tuple[Any, ...]:
    """A hashable identity of a transition: equal for the same transition published twice."""
    return tuple(sorted(t.to_dict().items()))


class StageWatch:
    """Series, trackers, transitions and skip counts of a fixed list of keys.

    Args:
        keys: the watched keys, in order (:attr:`all_transitions` follows it).
        method: the tracker of every key (:func:`make_tracker`).
        settings: keyword arguments of that tracker (absent: its defaults).
        turning_points: also run a :class:`TurningPointTracker` per key.
        turning_window, turning_z: its settings.
        stage_boundaries: which transitions split stages: ``"auto"`` (changepoints; for a key with
            no point of its own, i.e. only adopted transitions, every transition), ``"changepoint"``,
            ``"turning_point"`` or ``"any"``.
        ignore_flagged: skip points whose ``flags`` are non-empty.
    """

    def __init__(
        self,
        keys: Sequence[str],
        *,
        method: StageMethod = "plateau",
        settings: dict[str, Any] | None = None,
        turning_points: bool = False,
        turning_window: int = 8,
        turning_z: float = 3.0,
        stage_boundaries: StageBoundaries = "auto",
        ignore_flagged: bool = True,
    ) -> None:
        if stage_boundaries not in BOUNDARIES:
            raise ValueError(
                f"unknown stage_boundaries {stage_boundaries!r}; use one of {', '.join(BOUNDARIES)}"
            )
        self.keys: list[str] = list(dict.fromkeys(keys))
        self.stage_boundaries = stage_boundaries
        self.ignore_flagged = ignore_flagged
        self.series = SeriesStore()
        self._cp: dict[str, Tracker] = {k: make_tracker(k, method, settings) for k in self.keys}
        self._tp: dict[str, Tracker] = (
            {k: TurningPointTracker(k, window=turning_window, z=turning_z) for k in self.keys}
            if turning_points else {}
        )
        self._transitions: dict[str, list[Transition]] = {k: [] for k in self.keys}
        self._adopted: dict[str, set[tuple[Any, ...]]] = {k: set() for k in self.keys}
        self._last_step: dict[str, int] = {}
        self._skipped: dict[str, Counter[str]] = {k: Counter() for k in self.keys}
        self._indexed: dict[str, int] = {}  # last step whose stage index was published, per key

    # ------------------------------------------------------------------ intake
    def last_step(self, key: str) -> int:
        """The step of the last point offered for ``key`` (taken or skipped); -1 before any."""
        return self._last_step.get(key, -1)

    def unseen(self, key: str, points: Iterable[SeriesPoint]) -> list[SeriesPoint]:
        """The points of a provider's history that come after the last one offered for ``key``."""
        last = self.last_step(key)
        return [p for p in points if p.step > last]

    def is_due(self, key: str, step: int, every: int) -> bool:
        """Whether a sampled key takes a point at ``step``: a multiple of ``every`` past the last one."""
        return step % every == 0 and step > self.last_step(key)

    def update(self, key: str, point: SeriesPoint, now: int) -> list[Transition] | None:
        """Offer one point of ``key``, decided on at step ``now``.

        Returns ``None`` when the point is skipped (flagged and ``ignore_flagged``, or not finite;
        counted by reason), else the transitions this point confirmed, by onset step. They are not
        recorded yet: pass each to :meth:`record`.
        """
        self._last_step[key] = point.step
        if self.ignore_flagged and point.flags:
            self._skipped[key].update(point.flags)
            return None
        if not math.isfinite(point.value):
            self._skipped[key]["not finite"] += 1
            return None
        self.series.append(key, point)
        pts = self.series[key]
        steps = [q.step for q in pts]
        values = [q.value for q in pts]
        stderrs = [q.stderr for q in pts]
        new = self._cp[key].update(steps, values, stderrs=stderrs, now=now)
        if key in self._tp:
            new += self._tp[key].update(steps, values, stderrs=stderrs, now=now)
        return sorted(new, key=lambda t: t.changepoint_step)

    def adopt(self, key: str, t: Transition) -> bool:
        """Note a transition of ``key`` published by someone else; ``True`` the first time it is seen
        (record it then), ``False`` when it was already adopted."""
        ident = _identity(t)
        seen = self._adopted[key]
        if ident in seen:
            return False
        seen.add(ident)
        return True

    def record(self, t: Transition) -> None:
        """Add a confirmed or adopted transition to its key's list."""
        self._transitions[t.monitor].append(t)

    # ------------------------------------------------------------------ results
    def transitions(self, key: str) -> list[Transition]:
        """Recorded transitions of ``key`` in recording order (empty for an unwatched key)."""
        return list(self._transitions.get(key, []))

    @property
    def all_transitions(self) -> list[Transition]:
        """Recorded transitions of every key, key by key."""
        return [t for k in self.keys for t in self._transitions[k]]

    def boundaries(self, key: str) -> list[Transition]:
        """The recorded transitions of ``key`` that split stages under ``stage_boundaries``."""
        mode = self.stage_boundaries
        if mode == "auto":
            mode = "any" if not self.series.get(key) else "changepoint"
        return [t for t in self._transitions.get(key, []) if mode == "any" or t.kind == mode]

    def is_boundary(self, t: Transition) -> bool:
        """Whether this very transition object is a stage boundary of its key."""
        return any(b is t for b in self.boundaries(t.monitor))

    def stages(self, key: str) -> list[Stage]:
        """Stages of ``key`` between consecutive boundaries (the last one open)."""
        pts = self.series.get(key)
        return build_stages([p.step for p in pts], [p.value for p in pts], self.boundaries(key))

    def stage_index(self, key: str, step: int) -> int:
        """The index of the stage of ``key`` that holds ``step``, with the boundaries known now."""
        return stage_index_at(self.stages(key), step)

    def onset_index(self, t: Transition) -> int | None:
        """The stage index at the onset of ``t`` (recorded), ``None`` while ``t.monitor`` has no stage."""
        stages = self.stages(t.monitor)
        return stage_index_at(stages, t.changepoint_step) if stages else None

    def mark_indexed(self, key: str, step: int) -> None:
        """Note that the stage index of ``key`` was published up to ``step``."""
        self._indexed[key] = step

    def reindex(self, t: Transition) -> list[tuple[int, int]]:
        """After recording ``t``: ``(step, stage index)`` of every taken point from its onset up to the
        last published index, with the boundaries known now; empty when ``t`` is no boundary. A chart
        that re-plots them switches stage at the onset, not at the confirmation."""
        if not self.is_boundary(t):
            return []
        last, stages = self._indexed.get(t.monitor, -1), self.stages(t.monitor)
        return [(p.step, stage_index_at(stages, p.step)) for p in self.series.get(t.monitor)
                if t.changepoint_step <= p.step <= last]

    def curve(self, key: str) -> tuple[list[int], list[float], list[float], list[Stage], list[Transition]]:
        """What a curve image of ``key`` shows: steps, values, stds, stages and recorded transitions."""
        pts = self.series.get(key)
        return ([p.step for p in pts], [p.value for p in pts], [p.std for p in pts], self.stages(key),
                self.transitions(key))

    def skipped(self, key: str) -> Counter[str]:
        """How many points of ``key`` were skipped, by flag (``"not finite"`` for non-finite values)."""
        return Counter(self._skipped.get(key, {}))

    def missing_message(self, key: str, rule_names: Sequence[str] = (),
                        metric_names: Sequence[str] | None = None) -> str | None:
        """Why ``key`` has no point and no transition (``None`` when it has some): every point was
        skipped (flagged or not finite), or it never appeared at all. ``rule_names`` are the rules
        on that key (they never applied); ``metric_names`` the names that did appear, if known."""
        if self.series.get(key) or self._transitions[key]:
            return None
        rules = f"; rule(s) {list(rule_names)} never applied" if rule_names else ""
        skipped = self._skipped[key]
        total = sum(skipped.values())
        if total:
            by_count = sorted(skipped.items(), key=lambda kv: (-kv[1], kv[0]))
            counts = ", ".join(f"{reason}: {n}" for reason, n in by_count)
            return (f"StageDetector: all {total} points of {key!r} were skipped as flagged or not finite "
                    f"({counts}){rules}, so no stage could be detected. See docs/troubleshooting.md "
                    "(\"Every point was flagged\") for what each flag means and how to get healthy "
                    "estimates; ignore_flagged=False keeps flagged points.")
        have = "" if metric_names is None else f" (trainer.callback_metrics has {list(metric_names)[:10]})"
        return (f"StageDetector: {key!r} never appeared during training{rules}. Check the metric name{have} "
                "and that its probe runs.")

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume, JSON-able."""
        return {
            "series": self.series.state_dict(),
            "last_step": dict(self._last_step),
            "changepoints": {k: tr.state_dict() for k, tr in self._cp.items()},
            "turning_points": {k: tr.state_dict() for k, tr in self._tp.items()},
            "transitions": {k: [t.to_dict() for t in ts] for k, ts in self._transitions.items()},
            "adopted": {k: [dict(i) for i in ids] for k, ids in self._adopted.items()},
            "skipped": {k: dict(c) for k, c in self._skipped.items()},
            "index_logged": dict(self._indexed),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`. Keys no longer watched (the rules changed between runs) are
        dropped; keys watched now but absent from ``state`` start empty."""
        self.series.load_state_dict(state["series"])
        self._last_step = {k: int(v) for k, v in state["last_step"].items()}
        for k, st in state["changepoints"].items():
            if k in self._cp:
                self._cp[k].load_state_dict(st)
        for k, st in state["turning_points"].items():
            if k in self._tp:
                self._tp[k].load_state_dict(st)
        for k, ts in state["transitions"].items():
            if k in self._transitions:
                self._transitions[k] = [Transition.from_dict(t) for t in ts]
        for k, ids in state["adopted"].items():
            if k in self._adopted:
                self._adopted[k] = {tuple(sorted(i.items())) for i in ids}
        for k, counts in state.get("skipped", {}).items():
            if k in self._skipped:
                self._skipped[k] = Counter({str(r): int(n) for r, n in counts.items()})
        self._indexed = {k: int(v) for k, v in state.get("index_logged", {}).items()}
