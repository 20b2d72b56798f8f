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


def trajectory_figure_rgb(
    steps: Sequence[int],
    scores: np.ndarray,
    *,
    turning_steps: Sequence[int] = (),
    stage_steps: Sequence[int] = (),
    smoothing: float = 3.0,
    size_per_panel: tuple[float, float] = (4.2, 4.0),
    dpi: int = 80,
) -> np.ndarray:
    """The essential-dynamics trajectory (``scores``: ``N x k`` on one PCA basis) in each pair of its
    first three components: points coloured by stage (a new stage begins at each of ``stage_steps``),
    the evolute of the curve smoothed with ``smoothing`` (black dots; see
    :func:`~devinterp_lightning.essential_dynamics.planar_geometry`) and the snapshots at
    ``turning_steps`` as red stars. Returns an ``(H, W, 3)`` uint8 RGB array."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from devinterp_lightning.essential_dynamics import planar_geometry

    scores = np.asarray(scores, dtype=float)
    steps_arr = np.asarray(steps)
    stage = np.searchsorted(np.sort(np.asarray(stage_steps)), steps_arr, side="right")
    k = min(scores.shape[1], 3)
    pairs = [(a, b) for a in range(k) for b in range(a + 1, k)]
    fig = Figure(figsize=(size_per_panel[0] * len(pairs), size_per_panel[1]), dpi=dpi)
    canvas = FigureCanvasAgg(fig)
    cmap = colormaps["tab10"]
    turns = [int(j) for j in np.searchsorted(steps_arr, np.asarray(turning_steps, dtype=np.int64))]
    for n_ax, (a, b) in enumerate(pairs, start=1):
        ax = fig.add_subplot(1, len(pairs), n_ax)
        xy = scores[:, [a, b]]
        ax.plot(xy[:, 0], xy[:, 1], color="0.75", lw=0.8, zorder=1)
        ax.scatter(xy[:, 0], xy[:, 1], c=[cmap(s % 10) for s in stage], s=9, zorder=2)
        if len(xy) >= 5:
            ev = planar_geometry(xy, smoothing).evolute
            span = np.ptp(xy, axis=0).max() or 1.0
            # Near-straight stretches put the centres of curvature far away; keep the drawing readable.
            with np.errstate(invalid="ignore"):
                ok = np.all(np.isfinite(ev), axis=1) & (np.abs(ev - xy.mean(axis=0)).max(axis=1) < 2 * span)
            ax.scatter(ev[ok, 0], ev[ok, 1], s=2, color="black", alpha=0.4, zorder=1)
        for j in turns:
            if j < len(xy):
                ax.scatter(xy[j, 0], xy[j, 1], marker="*", s=140, color="red", edgecolor="k", zorder=3)
        ax.set_xlabel(f"PC{a + 1}")
        ax.set_ylabel(f"PC{b + 1}")
        ax.set_aspect("equal", adjustable="datalim")
    fig.suptitle(f"essential dynamics: {len(steps_arr)} snapshots to step {steps_arr[-1] if len(steps_arr) else 0}")
    fig.tight_layout()
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()
