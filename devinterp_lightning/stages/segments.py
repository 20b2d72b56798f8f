"""Stages from transitions: the stretches of a series between consecutive boundaries. No Lightning import."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from devinterp_lightning.stages.events import Stage, Transition


def build_stages(steps: Sequence[int], values: Sequence[float], boundaries: Iterable[Transition]) -> list[Stage]:
    """Split the series at the onsets (``changepoint_step``) of ``boundaries``.

    Stage ``k`` covers ``start_step <= step < end_step`` (the next boundary's onset); the last stage
    is open (``end_step=None``). ``level`` is the mean of the series' values inside the stage
    (nan if the stage holds no point yet). An empty series gives no stage.
    """
    if len(steps) == 0:
        return []
    onsets = sorted({int(t.changepoint_step) for t in boundaries if t.changepoint_step > steps[0]})
    starts = [int(steps[0]), *onsets]
    ends: list[int | None] = [*onsets, None]
    s = np.asarray(steps)
    v = np.asarray(values, dtype=float)
    stages = []
    for k, (a, b) in enumerate(zip(starts, ends, strict=True)):
        inside = (s >= a) & (s < b) if b is not None else s >= a
        level = float(v[inside].mean()) if inside.any() else float("nan")
        stages.append(Stage(index=k, start_step=a, end_step=b, level=level))
    return stages


def stage_index_at(stages: Sequence[Stage], step: int) -> int:
    """Index of the stage containing ``step`` (0 before the first stage starts)."""
    index = 0
    for st in stages:
        if step >= st.start_step:
            index = st.index
    return index
