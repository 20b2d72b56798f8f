"""Read a run's TensorBoard event files and write a self-contained HTML report.

The event files are read record by record (TFRecord framing, ``Event`` protos from the
``tensorboard`` package) rather than through ``EventAccumulator``, for two reasons: progress can
be reported in bytes read, and no scalar is dropped (``EventAccumulator`` keeps a reservoir sample
of 10,000 points per tag by default).

The report (one HTML file, figures embedded as base64 PNG) shows: loss curves (scalar tags
containing "loss"), LLC curves (``llc/mean`` with its ``llc/std`` band) and restricted LLCs
(``llc/<name>/mean``), stage indices (``stage/...index``) and the transitions written as text,
the essential-dynamics trajectory (``ed/pc*``) and the images found in the log (e.g. the
``ed/trajectory`` image, drawn on the final PCA basis).
"""

from __future__ import annotations

import base64
import html
import io
import os
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["ReportError", "RunData", "find_runs", "read_run", "write_report"]

Progress = Callable[[int, int], None]  # (bytes_done, bytes_total)


class ReportError(Exception):
    """A problem with the user's input (no run found, unreadable file); the message says the fix."""


@dataclass
class RunData:
    """Everything read from one run directory."""

    path: Path
    scalars: dict[str, list[tuple[int, float, float]]] = field(
        default_factory=dict
    )  # tag -> (step, value, wall)
    texts: dict[str, list[tuple[int, str]]] = field(default_factory=dict)  # tag -> (step, text)
    images: dict[str, list[tuple[int, bytes]]] = field(default_factory=dict)  # tag -> (step, png bytes)
    num_events: int = 0

    def is_empty(self) -> bool:
        return not (self.scalars or self.texts or self.images)

    def series(self, tag: str) -> tuple[np.ndarray, np.ndarray]:
        """``(steps, values)`` of a scalar tag, sorted by step; a step written twice (a resumed run)
        keeps its latest value."""
        latest: dict[int, tuple[float, float]] = {}
        for step, value, wall in self.scalars.get(tag, []):
            if step not in latest or wall >= latest[step][1]:
                latest[step] = (value, wall)
        steps = np.array(sorted(latest), dtype=np.int64)
        return steps, np.array([latest[s][0] for s in steps], dtype=np.float64)


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------
def _event_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.is_file() and "tfevents" in p.name)


def find_runs(logdir: str | os.PathLike[str]) -> list[Path]:
    """Directories under ``logdir`` (itself included) that hold TensorBoard event files."""
    root = Path(logdir)
    if not root.exists():
        raise ReportError(f"{root} does not exist; pass the directory your TensorBoardLogger wrote to")
    if not root.is_dir():
        raise ReportError(
            f"{root} is not a directory; pass the directory that holds the events.out.tfevents.* files"
        )
    runs = sorted({p.parent for p in root.rglob("*tfevents*") if p.is_file()})
    if not runs:
        raise ReportError(
            f"no TensorBoard event files (events.out.tfevents.*) under {root}; pass the logger's save_dir "
            "or version directory (e.g. lightning_logs/version_0) of a run that used a TensorBoardLogger"
        )
    return runs


def _records(path: Path, on_bytes: Callable[[int], None]):
    """Yield the payload of each TFRecord in ``path``; stop quietly at a truncated tail (a run that is
    still writing)."""
    with open(path, "rb") as fh:
        while True:
            header = fh.read(12)
            if len(header) < 12:
                return
            (length,) = struct.unpack("<Q", header[:8])
            data = fh.read(length)
            crc = fh.read(4)
            if len(data) < length or len(crc) < 4:
                return
            on_bytes(12 + length + 4)
            yield data


def read_run(directory: str | os.PathLike[str], progress: Progress | None = None) -> RunData:
    """Read every event file in ``directory`` (not its subdirectories)."""
    from tensorboard.compat.proto import event_pb2
    from tensorboard.util import tensor_util

    directory = Path(directory)
    files = _event_files(directory)
    total = sum(p.stat().st_size for p in files)
    done = 0
    run = RunData(path=directory)

    def on_bytes(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(done, total)

    for path in files:
        for record in _records(path, on_bytes):
            try:
                event = event_pb2.Event.FromString(record)
            except Exception:  # a corrupt record: skip it, keep the rest of the log
                continue
            run.num_events += 1
            if not event.HasField("summary"):
                continue
            step, wall = int(event.step), float(event.wall_time)
            for value in event.summary.value:
                plugin = value.metadata.plugin_data.plugin_name
                kind = value.WhichOneof("value")
                if kind == "simple_value":
                    run.scalars.setdefault(value.tag, []).append((step, float(value.simple_value), wall))
                elif kind == "image":
                    run.images.setdefault(value.tag, []).append(
                        (step, bytes(value.image.encoded_image_string))
                    )
                elif kind == "tensor":
                    arr = tensor_util.make_ndarray(value.tensor)
                    if plugin == "text":
                        items = [
                            x.decode("utf-8", "replace") if isinstance(x, bytes) else str(x)
                            for x in arr.reshape(-1)
                        ]
                        run.texts.setdefault(value.tag, []).append((step, "\n".join(items)))
                    elif plugin == "scalars" or arr.size == 1 and arr.dtype.kind in "fiu":
                        run.scalars.setdefault(value.tag, []).append((step, float(arr.reshape(-1)[0]), wall))
                    elif plugin == "images" and arr.dtype.kind in "SO" and arr.size >= 3:
                        run.images.setdefault(value.tag, []).append((step, bytes(arr.reshape(-1)[2])))
    if progress is not None:
        progress(total, total)
    return run


# --------------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------------
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    _plt().close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _transition_steps(run: RunData) -> list[int]:
    steps: set[int] = set()
    for tag, items in run.texts.items():
        if "transition" in tag or "turning" in tag or tag.startswith("stage"):
            steps.update(s for s, _ in items)
    return sorted(steps)


def _stage_tags(run: RunData) -> list[str]:
    return sorted(t for t in run.scalars if "stage/" in t and "index" in t)


def _shade_stages(ax, run: RunData) -> None:
    tags = _stage_tags(run)
    if not tags:
        return
    # The main monitor's stages ("stage/index") shade the curves; other monitors have their own tags.
    steps, idx = run.series("stage/index" if "stage/index" in tags else tags[0])
    if len(steps) == 0:
        return
    cmap = _plt().get_cmap("Pastel1")
    start = 0
    for i in range(1, len(steps) + 1):
        if i == len(steps) or idx[i] != idx[start]:
            end = steps[i] if i < len(steps) else steps[-1]
            ax.axvspan(steps[start], end, color=cmap(int(idx[start]) % 9), alpha=0.5, lw=0, zorder=0)
            start = i


def _robust_limits(values: np.ndarray, margin: float = 1.0) -> tuple[float, float] | None:
    """Axis limits that keep the bulk of ``values`` readable: the 5-95 % range widened by ``margin``
    times its width on each side; None when every finite value already lies inside."""
    finite = values[np.isfinite(values)]
    if finite.size < 10:
        return None
    lo, hi = np.percentile(finite, [5, 95])
    width = max(hi - lo, 1e-12)
    lo, hi = lo - margin * width, hi + margin * width
    if finite.min() >= lo and finite.max() <= hi:
        return None
    return float(lo), float(hi)


def _clip_outliers(ax, series: list[np.ndarray]) -> None:
    """One wild estimate (an LLC sampled on a steep slope can be -1000) must not flatten the whole
    curve: clip the y-axis to the bulk of the values and say how many points fall outside."""
    if not series:
        return
    values = np.concatenate([np.asarray(v, dtype=float) for v in series])
    limits = _robust_limits(values)
    if limits is None:
        return
    outside = int(np.sum((values < limits[0]) | (values > limits[1])))
    ax.set_ylim(*limits)
    ax.annotate(
        f"{outside} point(s) outside the axis", xy=(0.99, 0.02), xycoords="axes fraction", ha="right",
        fontsize=7, color="dimgray",
    )


def _curve_figure(
    run: RunData, tags: list[str], title: str, ylabel: str, bands: dict[str, str] | None = None
) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 3.6))
    _shade_stages(ax, run)
    for tag in tags:
        steps, vals = run.series(tag)
        (line,) = ax.plot(steps, vals, lw=1.2, label=tag, marker="." if len(steps) < 60 else None)
        band = (bands or {}).get(tag)
        if band and band in run.scalars:
            bs, bv = run.series(band)
            common, ia, ib = np.intersect1d(steps, bs, return_indices=True)
            ax.fill_between(
                common, vals[ia] - bv[ib], vals[ia] + bv[ib], color=line.get_color(), alpha=0.2, lw=0
            )
    for s in _transition_steps(run):
        ax.axvline(s, color="crimson", lw=0.8, ls="--", alpha=0.7)
    _clip_outliers(ax, [run.series(tag)[1] for tag in tags])
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3)
    return _png(fig)


def _final_trajectory(run: RunData) -> tuple[np.ndarray, np.ndarray] | None:
    """``(steps, coords)`` from the last ``ed/trajectory_final`` text (CSV written by EssentialDynamics
    at the end of training), or None."""
    items = [v for t, v in run.texts.items() if t.startswith("ed/trajectory_final")]
    if not items or not items[0]:
        return None
    text = max(items[0], key=lambda i: i[0])[1]
    rows = []
    for line in text.splitlines():
        parts = line.strip().split(",")
        try:
            rows.append([float(p) for p in parts])
        except ValueError:
            continue
    if len(rows) < 3 or len({len(r) for r in rows}) != 1 or len(rows[0]) < 3:
        return None
    arr = np.array(rows)
    return arr[:, 0].astype(np.int64), arr[:, 1:]


def _turning_steps(run: RunData) -> list[int]:
    out: list[int] = []
    for tag, items in run.texts.items():
        if tag.startswith("ed/turning_points"):
            for _, text in items:
                for line in text.splitlines():
                    cells = [c.strip() for c in line.strip().strip("|").split("|")]
                    if len(cells) >= 2 and cells[1].isdigit():
                        out.append(int(cells[1]))
    return sorted(set(out))


def _ed_figure(run: RunData, pcs: list[str]) -> tuple[str, bool]:
    """Figure of the trajectory in each pair of the first three components; True when drawn on the
    final basis (from ``ed/trajectory_final``), False when from the logged ``ed/pc*`` scalars."""
    plt = _plt()
    final = _final_trajectory(run)
    if final is not None:
        steps, coords = final
        names = [f"PC{i + 1}" for i in range(coords.shape[1])]
    else:
        series = [run.series(t) for t in pcs[:3]]
        steps = series[0][0]
        for s, _ in series[1:]:
            steps = np.intersect1d(steps, s)
        coords = np.stack([v[np.searchsorted(s, steps)] for s, v in series], axis=1)
        names = [t.split("/")[-1].upper() for t in pcs[:3]]
    k = min(coords.shape[1], 3)
    pairs = [(a, b) for a in range(k) for b in range(a + 1, k)]
    turns = _turning_steps(run)
    fig, axes = plt.subplots(1, len(pairs), figsize=(4.2 * len(pairs), 4.0), squeeze=False)
    sc = None
    for ax, (a, b) in zip(axes[0], pairs, strict=True):
        if final is not None:
            ax.plot(coords[:, a], coords[:, b], color="0.7", lw=0.8, zorder=1)
        sc = ax.scatter(coords[:, a], coords[:, b], c=steps, cmap="viridis", s=10, zorder=2)
        for t in turns:
            j = int(np.searchsorted(steps, t))
            if j < len(steps) and steps[j] == t:
                ax.scatter(
                    coords[j, a], coords[j, b], marker="*", s=160, color="red", edgecolor="k", zorder=3
                )
        ax.set_xlabel(names[a])
        ax.set_ylabel(names[b])
    fig.colorbar(sc, ax=axes[0].tolist(), label="step")
    fig.suptitle(
        "trajectory on the final PCA basis (red stars: turning points)"
        if final is not None
        else "logged ed/pc* (each point on the PCA basis of its own time)"
    )
    return _png(fig), final is not None


# --------------------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------------------
_CSS = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.5em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}
img{max-width:100%}pre{background:#f6f6f6;padding:.6em;overflow-x:auto;font-size:.85em}
table{border-collapse:collapse;font-size:.9em}td,th{border:1px solid #ccc;padding:.2em .6em}
.muted{color:#777}
"""


def _markdown(text: str) -> str:
    """Markdown as written by the sinks: pipe tables become HTML tables, fenced blocks stay
    preformatted, other lines are paragraphs. Everything is escaped."""
    out: list[str] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        if line.startswith("```"):
            j = i + 1
            while j < len(lines) and not lines[j].strip().startswith("```"):
                j += 1
            out.append("<pre>" + html.escape("\n".join(lines[i + 1 : j])) + "</pre>")
            i = j + 1
        elif line.startswith("|"):
            rows = []
            while i < len(lines) and lines[i].strip().startswith("|"):
                cells = [c.strip() for c in lines[i].strip().strip("|").split("|")]
                if not all(set(c) <= set("-: ") for c in cells):  # skip the |---| separator
                    rows.append(cells)
                i += 1
            head, *body = rows or [[]]
            table = "<tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in head) + "</tr>"
            table += "".join(
                "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in body
            )
            out.append(f"<table>{table}</table>")
        else:
            if line:
                out.append(f"<p>{html.escape(line)}</p>")
            i += 1
    return "\n".join(out)


def _img(b64: str, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{b64}">'


def _run_section(run: RunData, logdir: Path) -> str:
    out: list[str] = []
    rel = run.path.relative_to(logdir) if run.path != logdir and logdir in run.path.parents else run.path.name
    steps_all = [s for items in run.scalars.values() for s, _, _ in items]
    span = f"steps {min(steps_all)}..{max(steps_all)}" if steps_all else "no scalars"
    out.append(f"<h2>Run <code>{html.escape(str(rel))}</code></h2>")
    out.append(f'<p class="muted">{run.num_events} events, {len(run.scalars)} scalar tags, {span}.</p>')

    loss_tags = sorted(t for t in run.scalars if "loss" in t.lower())
    if loss_tags:
        out.append("<h3>Loss</h3>" + _img(_curve_figure(run, loss_tags, "loss", "loss"), "loss curves"))

    llc_tags = sorted(t for t in run.scalars if t.startswith("llc/") and t.endswith("mean"))
    bands = {t: t[: -len("mean")] + "std" for t in llc_tags}
    main = [t for t in llc_tags if t == "llc/mean"]
    restricted = [t for t in llc_tags if t != "llc/mean"]
    if main:
        out.append(
            "<h3>LLC</h3>"
            + _img(
                _curve_figure(run, main, "local learning coefficient (±1 std across chains)", "LLC", bands),
                "LLC",
            )
        )
    if restricted:
        out.append(
            "<h3>Restricted LLCs</h3>"
            + _img(
                _curve_figure(run, restricted, "restricted LLCs (±1 std)", "LLC", bands), "restricted LLCs"
            )
        )
    if llc_tags:
        rows = [
            "<table><tr><th>series</th><th>estimates</th><th>last step</th><th>last value</th><th>last std</th></tr>"
        ]
        for tag in llc_tags:
            steps, vals = run.series(tag)
            std = run.series(bands[tag])[1] if bands[tag] in run.scalars else np.array([])
            last_std = f"{std[-1]:.3g}" if len(std) else "-"
            rows.append(
                f"<tr><td><code>{html.escape(tag)}</code></td><td>{len(steps)}</td><td>{steps[-1]}</td>"
                f"<td>{vals[-1]:.4g}</td><td>{last_std}</td></tr>"
            )
        out.append("\n".join(rows) + "</table>")
    other_llc = sorted(
        t
        for t in run.scalars
        if t.startswith("llc/") and t not in llc_tags and not t.endswith(("std", "_lower", "_upper"))
    )
    if other_llc:
        out.append(f'<p class="muted">other LLC diagnostics logged: {html.escape(", ".join(other_llc))}</p>')

    stage_tags = _stage_tags(run)
    text_tags = sorted(t for t in run.texts if not t.startswith("ed/trajectory_final"))
    if stage_tags or text_tags or any(t.startswith("stage") for t in run.images):
        out.append("<h3>Stages and transitions</h3>")
        if stage_tags:
            out.append(_img(_curve_figure(run, stage_tags, "stage index", "stage"), "stages"))
        for tag in text_tags:
            out.append(f"<h4><code>{html.escape(tag.removesuffix('/text_summary'))}</code></h4>")
            for step, text in run.texts[tag]:
                out.append(f'<p class="muted">step {step}</p>{_markdown(text)}')
        for tag, items in sorted(run.images.items()):
            if tag.startswith("stage"):
                step, png = max(items, key=lambda i: i[0])
                out.append(f'<p class="muted"><code>{html.escape(tag)}</code> at step {step}</p>')
                out.append(_img(base64.b64encode(png).decode("ascii"), tag))

    pcs = sorted((t for t in run.scalars if t.startswith("ed/pc")), key=lambda t: (len(t), t))
    ed_images = {t: v for t, v in run.images.items() if t.startswith("ed/")}
    if len(pcs) >= 2 or ed_images or _final_trajectory(run) is not None:
        out.append("<h3>Essential dynamics</h3>")
        for tag, items in sorted(ed_images.items()):
            step, png = max(items, key=lambda i: i[0])
            out.append(
                f'<p class="muted"><code>{html.escape(tag)}</code> at step {step} (final PCA basis)</p>'
            )
            out.append(_img(base64.b64encode(png).decode("ascii"), tag))
        if len(pcs) >= 2 or _final_trajectory(run) is not None:
            fig, on_final = _ed_figure(run, pcs)
            out.append(_img(fig, "essential-dynamics trajectory"))
            if not on_final:
                out.append(
                    '<p class="muted">No ed/trajectory_final in this log (written at the end of training): '
                    "each point above is on the PCA basis of its own time, so the curve is only indicative.</p>"
                )
        if "ed/explained_variance" in run.scalars:
            steps, vals = run.series("ed/explained_variance")
            out.append(
                f'<p class="muted">variance explained by the top components at the end: {vals[-1]:.1%}</p>'
            )

    other_images = {t: v for t, v in run.images.items() if not t.startswith(("ed/", "stage"))}
    if other_images:
        out.append("<h3>Other images</h3>")
        for tag, items in sorted(other_images.items()):
            step, png = max(items, key=lambda i: i[0])
            out.append(f'<p class="muted"><code>{html.escape(tag)}</code> at step {step}</p>')
            out.append(_img(base64.b64encode(png).decode("ascii"), tag))

    shown = set(loss_tags) | set(llc_tags) | set(stage_tags) | set(pcs) | {"ed/explained_variance"}
    rest = sorted(t for t in run.scalars if t not in shown and not t.startswith("llc/"))
    if rest:
        out.append(f'<p class="muted">other scalar tags (not plotted): {html.escape(", ".join(rest))}</p>')
    return "\n".join(out)


def write_report(
    logdir: str | os.PathLike[str],
    output: str | os.PathLike[str] | None = None,
    *,
    progress: Callable[[str, int, int], None] | None = None,
) -> Path:
    """Read every run under ``logdir`` and write one self-contained HTML report.

    ``output`` defaults to ``logdir/report.html``. ``progress(run_name, bytes_done, bytes_total)`` is
    called while reading. Raises :class:`ReportError` when ``logdir`` holds no run.
    """
    logdir = Path(logdir).resolve()
    runs_paths = find_runs(logdir)
    runs = []
    for path in runs_paths:
        name = str(path.relative_to(logdir)) if path != logdir else path.name
        cb = (lambda d, t, _n=name: progress(_n, d, t)) if progress is not None else None
        run = read_run(path, cb)
        if not run.is_empty():
            runs.append(run)
    if not runs:
        raise ReportError(
            f"the event files under {logdir} hold no scalars, text or images; the run may not have logged "
            "anything yet (loggers flush every few seconds) - train longer or call logger.finalize()"
        )
    out_path = Path(output) if output is not None else logdir / "report.html"
    body = "\n".join(_run_section(r, logdir) for r in runs)
    doc = (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        f"<title>devinterp-lightning report: {html.escape(logdir.name)}</title><style>{_CSS}</style></head><body>"
        f"<h1>devinterp-lightning report</h1><p class='muted'>{html.escape(str(logdir))} &middot; "
        f"generated {time.strftime('%Y-%m-%d %H:%M:%S')}</p>{body}</body></html>"
    )
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(doc, encoding="utf-8")
    return out_path
