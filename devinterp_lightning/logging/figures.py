"""All the package's drawing: the TensorBoard stage image and the report's figures.

Every figure is a ``matplotlib.figure.Figure`` on its own ``FigureCanvasAgg``: no pyplot state, no
global backend switch, so drawing is safe inside a training process and in threads.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from devinterp_lightning.stages.events import Stage, Transition

_STAGE_COLOURS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860")


def _figure(size: tuple[float, float], *, constrained: bool = False) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, layout="constrained" if constrained else None)
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Any, dpi: int = 90) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return buf.getvalue()


# --------------------------------------------------------------------------------------------------
# The report's figures (PNG bytes)
# --------------------------------------------------------------------------------------------------
@dataclass
class Curve:
    """One series of a report chart.

    ``band`` is the std (same length as ``values``) drawn as ``values -+ band``; ``flagged`` marks
    the unhealthy points (known from the sinks' ``flagged`` records), which are drawn as crosses,
    left out of the line and kept from setting the y-axis. ``flagged=None``: health unknown."""

    label: str
    steps: np.ndarray
    values: np.ndarray
    band: np.ndarray | None = None
    flagged: np.ndarray | None = None


@dataclass(frozen=True)
class Marker:
    """A vertical line on a chart: a transition's onset (``kind`` "changepoint" solid, "turning_point"
    dashed), coloured by ``direction``."""

    step: int
    direction: str
    kind: str = "changepoint"


@dataclass(frozen=True)
class Span:
    """A stage to shade: ``[start, end]`` in steps, coloured by ``index``."""

    index: int
    start: int
    end: int


def robust_limits(values: np.ndarray, margin: float = 1.0) -> tuple[float, float] | None:
    """Axis limits that keep the bulk of ``values`` readable when the health of the points is
    unknown: the 5-95 % range widened by ``margin`` times its width on each side; None when every
    finite value already lies inside (or there are fewer than 10 values to judge from)."""
    finite = values[np.isfinite(values)]
    if finite.size < 10:
        return None
    lo, hi = np.percentile(finite, [5, 95])
    width = max(hi - lo, 1e-12)
    lo, hi = lo - margin * width, hi + margin * width
    if finite.min() >= lo and finite.max() <= hi:
        return None
    return float(lo), float(hi)


def healthy_limits(curves: Sequence[Curve], pad: float = 0.08) -> tuple[float, float] | None:
    """y-limits spanning the healthy points of ``curves`` (with their bands), padded by ``pad`` of
    the range on each side; None when no curve knows its flags or none has a healthy point."""
    chunks: list[np.ndarray] = []
    for c in curves:
        if c.flagged is None:
            return None
        ok = ~c.flagged & np.isfinite(c.values)
        chunks.append(c.values[ok])
        if c.band is not None:
            b = np.where(np.isfinite(c.band), c.band, 0.0)
            chunks += [(c.values - b)[ok], (c.values + b)[ok]]
    vals = np.concatenate(chunks) if chunks else np.array([])
    if vals.size == 0:
        return None
    lo, hi = float(vals.min()), float(vals.max())
    width = hi - lo if hi > lo else max(abs(hi), 1.0)
    return lo - pad * width, hi + pad * width


def _draw_spans(ax: Any, spans: Sequence[Span]) -> None:
    for sp in spans:
        ax.axvspan(sp.start, sp.end, color=_STAGE_COLOURS[sp.index % len(_STAGE_COLOURS)], alpha=0.12, lw=0,
                   zorder=0)


def _draw_markers(ax: Any, markers: Sequence[Marker]) -> None:
    for m in markers:
        colour = "tab:green" if m.direction == "increase" else "tab:red"
        ax.axvline(m.step, color=colour, ls="--" if m.kind == "turning_point" else "-", lw=1.0, alpha=0.8,
                   zorder=1)


def curve_figure(
    curves: Sequence[Curve],
    *,
    title: str,
    ylabel: str,
    spans: Sequence[Span] = (),
    markers: Sequence[Marker] = (),
) -> bytes:
    """A chart of ``curves`` against the step, stages shaded and transition onsets as vertical lines.

    The y-axis is set by the healthy points when the flags are known (:func:`healthy_limits`),
    else by :func:`robust_limits`; flagged points outside it are drawn as triangles on the edge and
    counted in a note. Returns PNG bytes."""
    fig = _figure((8.0, 3.6), constrained=True)
    ax = fig.add_subplot(1, 1, 1)
    _draw_spans(ax, spans)
    any_flagged = False
    for c in curves:
        flagged = c.flagged if c.flagged is not None else np.zeros(len(c.steps), dtype=bool)
        ok = ~flagged
        marker = "." if ok.sum() < 60 else None
        # a flagged point breaks the line and the band (NaN): no straight segment across unhealthy stretches
        healthy = np.where(ok, c.values, np.nan)
        (line,) = ax.plot(c.steps, healthy, lw=1.2, label=c.label, marker=marker, zorder=3)
        if c.band is not None:
            b = np.where(ok & np.isfinite(c.band), c.band, np.nan)
            ax.fill_between(c.steps, healthy - b, healthy + b, color=line.get_color(), alpha=0.2, lw=0, zorder=2)
        if flagged.any():
            any_flagged = True
            ax.scatter(c.steps[flagged], c.values[flagged], marker="x", s=28, color=line.get_color(), zorder=4)
    limits = healthy_limits(curves)
    values = np.concatenate([c.values for c in curves]) if curves else np.array([])
    if limits is None:
        limits = robust_limits(values)
    if limits is not None:
        lo, hi = limits
        ax.set_ylim(lo, hi)
        outside = 0
        for c in curves:
            below, above = c.values < lo, c.values > hi
            outside += int(below.sum() + above.sum())
            # a point off the axis still shows where it is in time: a triangle on the edge
            ax.scatter(c.steps[below], np.full(int(below.sum()), lo), marker="v", s=30, color="crimson",
                       clip_on=False, zorder=5)
            ax.scatter(c.steps[above], np.full(int(above.sum()), hi), marker="^", s=30, color="crimson",
                       clip_on=False, zorder=5)
        if outside:
            ax.annotate(f"{outside} point(s) off the axis (triangles)", xy=(0.99, 0.03), xycoords="axes fraction",
                        ha="right", fontsize=7, color="dimgray")
    _draw_markers(ax, markers)
    if any_flagged:
        ax.scatter([], [], marker="x", color="0.3", label="flagged (unhealthy)")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3)
    return _png(fig)


@dataclass
class StageTimeline:
    """The stage index of one monitor over the run: the index switches to ``indices[i]`` at the
    onset ``onsets[i]`` and holds until the next one; ``confirmed[i]`` is when that switch was
    confirmed (None when it is only known from the scalar)."""

    label: str
    onsets: list[int]
    indices: list[int]
    confirmed: list[int | None]


def step_path(timeline: StageTimeline, first_step: int, last_step: int) -> tuple[list[int], list[int]]:
    """The vertices of ``timeline``'s step function (``where="post"``) from ``first_step`` to
    ``last_step``: index 0 at the start, each switch at its onset, and the last index held to the
    end, so a switch at the very last step is still drawn."""
    end = max([last_step, *timeline.onsets])
    xs = [first_step, *timeline.onsets, end]
    ys = [0, *timeline.indices, timeline.indices[-1] if timeline.indices else 0]
    return xs, ys


def stage_index_figure(timelines: Sequence[StageTimeline], first_step: int, last_step: int) -> bytes:
    """Each monitor's stage index as a step function from ``first_step`` to ``last_step`` (so the
    last stage is drawn to the end of the run, however short), switching at the onsets; a dotted
    line and a label show when each switch was confirmed. Returns PNG bytes."""
    fig = _figure((8.0, 2.4 + 0.3 * len(timelines)), constrained=True)
    ax = fig.add_subplot(1, 1, 1)
    top = 0
    span = max(last_step - first_step, 1)
    for k, tl in enumerate(timelines):
        xs, ys = step_path(tl, first_step, last_step)
        offset = 0.04 * k  # several monitors on one axis: keep overlapping steps apart
        (line,) = ax.step(xs, np.asarray(ys, dtype=float) + offset, where="post", lw=1.6, label=tl.label)
        top = max(top, *ys)
        for onset, idx, conf in zip(tl.onsets, tl.indices, tl.confirmed, strict=True):
            ax.axvline(onset, color=line.get_color(), lw=0.8, alpha=0.6)
            if conf is not None and conf != onset:
                ax.plot([onset, conf], [idx + offset, idx + offset], ls=":", color=line.get_color(), lw=2.0)
                ax.plot([conf], [idx + offset], marker="|", ms=10, color=line.get_color())
            text = f"onset {onset}" + (f", confirmed {conf}" if conf is not None and conf != onset else "")
            ax.annotate(text, xy=(onset, idx + offset), xytext=(3, 4), textcoords="offset points", fontsize=7,
                        color=line.get_color())
    ax.set_xlim(first_step - 0.02 * span, max([last_step, *(o for tl in timelines for o in tl.onsets)]) + 0.04 * span)
    ax.set_ylim(-0.5, top + 0.8)
    ax.set_yticks(range(top + 1))
    ax.set_xlabel("step")
    ax.set_ylabel("stage")
    ax.set_title("stage index (switches at the onset; dotted: until confirmed)", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(alpha=0.3)
    return _png(fig)


def trajectory_figure(
    steps: np.ndarray,
    coords: np.ndarray,
    names: Sequence[str],
    *,
    turning_steps: Sequence[int] = (),
    final_basis: bool = True,
) -> bytes:
    """The trajectory in each pair of the first three components, coloured by step, with the
    turning points as red stars (on the final PCA basis: a line joins the points). Returns PNG bytes."""
    return _png(trajectory_panels(steps, coords, names, turning_steps=turning_steps, final_basis=final_basis))


def trajectory_panels(
    steps: np.ndarray,
    coords: np.ndarray,
    names: Sequence[str],
    *,
    turning_steps: Sequence[int] = (),
    final_basis: bool = True,
) -> Any:
    """The ``Figure`` behind :func:`trajectory_figure` (square panels, constrained layout so that
    no label runs into the next panel)."""
    k = min(coords.shape[1], 3)
    pairs = [(a, b) for a in range(k) for b in range(a + 1, k)]
    fig = _figure((3.9 * len(pairs) + 0.9, 3.8), constrained=True)
    axes = fig.subplots(1, len(pairs), squeeze=False)[0]
    sc = None
    turns = [int(np.searchsorted(steps, t)) for t in turning_steps]
    turns = [j for j, t in zip(turns, turning_steps, strict=True) if j < len(steps) and steps[j] == t]
    for ax, (a, b) in zip(axes, pairs, strict=True):
        if final_basis:
            ax.plot(coords[:, a], coords[:, b], color="0.7", lw=0.8, zorder=1)
        sc = ax.scatter(coords[:, a], coords[:, b], c=steps, cmap="viridis", s=10, zorder=2)
        if turns:
            ax.scatter(coords[turns, a], coords[turns, b], marker="*", s=160, color="red", edgecolor="k", zorder=3)
        ax.set_xlabel(names[a])
        ax.set_ylabel(names[b], labelpad=1)
        ax.tick_params(labelsize=8)
        ax.set_box_aspect(1)
    fig.colorbar(sc, ax=list(axes), label="step", shrink=0.85)
    fig.suptitle("trajectory on the final PCA basis (red stars: turning points)" if final_basis
                 else "logged ed/pc* (each point on the PCA basis of its own time)", fontsize=10)
    return fig


# --------------------------------------------------------------------------------------------------
# The TensorBoard stage image (RGB array)
# --------------------------------------------------------------------------------------------------


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
