"""Matplotlib drawing of a monitored curve with its stages and transitions (Agg canvas, no pyplot)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from devinterp_lightning.stages.events import Stage, Transition

_STAGE_COLOURS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860")


def stage_figure_rgb(
    monitor: str,
    steps: Sequence[int],
    values: Sequence[float],
    stds: Sequence[float] | None,
    stages: Sequence[Stage],
    transitions: Sequence[Transition],
    *,
    size: tuple[float, float] = (7.0, 3.5),
    dpi: int = 80,
) -> np.ndarray:
    """The curve (with a +-std band where known), stages shaded, changepoints as solid vertical
    lines and turning points as dashed ones. Returns an ``(H, W, 3)`` uint8 RGB array."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=dpi)
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    s = np.asarray(steps, dtype=float)
    v = np.asarray(values, dtype=float)
    if s.size:
        last = s[-1]
        for st in stages:
            end = st.end_step if st.end_step is not None else last
            ax.axvspan(st.start_step, end, color=_STAGE_COLOURS[st.index % len(_STAGE_COLOURS)], alpha=0.12,
                       lw=0)
        if stds is not None:
            sd = np.asarray(stds, dtype=float)
            ok = np.isfinite(sd)
            if ok.any():
                ax.fill_between(s[ok], (v - sd)[ok], (v + sd)[ok], color="0.6", alpha=0.35, lw=0, label="±std")
        ax.plot(s, v, color="k", lw=1.2, marker="." if s.size < 200 else None, ms=3, label=monitor)
    for t in transitions:
        turning = t.kind == "turning_point"
        colour = "tab:green" if t.direction == "increase" else "tab:red"
        ax.axvline(t.changepoint_step, color=colour, ls="--" if turning else "-", lw=1.0)
    ax.set_xlabel("step")
    ax.set_ylabel(monitor)
    ax.set_title(f"{monitor}: {len(stages)} stage(s), {len(transitions)} transition(s)", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()
