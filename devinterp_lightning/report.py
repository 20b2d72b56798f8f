"""Read a run's TensorBoard event files and write an HTML report.

Reading uses tensorboard's own ``EventFileLoader`` (record framing, checksums, and the migration
of old summary formats), which, unlike ``EventAccumulator``, keeps every scalar (no reservoir
sampling) and lets the reader report progress.

What the report knows about stages, transitions, rules and unhealthy points comes from the
structured JSON records the sinks write next to their display text (see
:mod:`devinterp_lightning.tags`); the display Markdown is never parsed. Text without a record
(the essential-dynamics turning-point table, a user's own text) is shown as it was written,
rendered with the ``markdown`` package. The figures are drawn by
:mod:`devinterp_lightning.logging.figures`.

Output (:func:`resolve_output`): a path ending in ``.html`` (or ``.htm``) is the page itself, one
self-contained file with the figures embedded; any other path is a directory that receives
``index.html`` (the same self-contained page) plus each figure as a PNG file under ``figures/``.
"""

from __future__ import annotations

import base64
import html
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from devinterp_lightning import tags
from devinterp_lightning.logging import figures as F

__all__ = ["ReportError", "RunData", "find_runs", "read_run", "resolve_output", "write_report"]

Progress = Callable[[int, int], None]  # (bytes_done, bytes_total)


class ReportError(Exception):
    """A problem with the user's input (no run found, unusable output path); the message says the fix."""


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------
@dataclass
class RunData:
    """Everything read from one run directory."""

    path: Path
    #: scalar tag -> [(step, value, wall_time)]
    scalars: dict[str, list[tuple[int, float, float]]] = field(default_factory=dict)
    #: text tag (without the ``/text_summary`` suffix) -> [(step, text)]
    texts: dict[str, list[tuple[int, str]]] = field(default_factory=dict)
    #: image tag -> [(step, encoded image bytes)]
    images: dict[str, list[tuple[int, bytes]]] = field(default_factory=dict)
    num_events: int = 0
    _records: dict[str, list[dict[str, Any]]] | None = field(default=None, repr=False, compare=False)

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

    def records(self, kind: str) -> list[dict[str, Any]]:
        """The structured records of ``kind`` ("transition", "flagged", "rule") from every record tag,
        each once (a resumed run may write a record again), in the order of their ``step``."""
        if self._records is None:
            seen: set[str] = set()
            by_kind: dict[str, list[dict[str, Any]]] = {}
            for tag, items in self.texts.items():
                if not tags.is_record_tag(tag):
                    continue
                for _, text in items:
                    rec = tags.decode_record(text)
                    if rec is not None and text not in seen:
                        seen.add(text)
                        by_kind.setdefault(str(rec["record"]), []).append(rec)
            self._records = {k: sorted(v, key=lambda r: int(r.get("step", 0))) for k, v in by_kind.items()}
        return list(self._records.get(kind, []))

    def step_range(self) -> tuple[int, int] | None:
        steps = [s for items in self.scalars.values() for s, _, _ in items]
        return (min(steps), max(steps)) if steps else None


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


def _add_value(run: RunData, step: int, wall: float, value: Any) -> None:
    from tensorboard.util import tensor_util

    plugin = value.metadata.plugin_data.plugin_name
    arr = tensor_util.make_ndarray(value.tensor)
    if plugin == "scalars":
        run.scalars.setdefault(value.tag, []).append((step, float(arr.reshape(-1)[0]), wall))
    elif plugin == "text":
        items = [x.decode("utf-8", "replace") if isinstance(x, bytes) else str(x) for x in arr.reshape(-1)]
        tag = value.tag.removesuffix(tags.TEXT_SUFFIX)
        run.texts.setdefault(tag, []).append((step, "\n".join(items)))
    elif plugin == "images" and arr.size >= 3:
        # [width, height, encoded image, ...]: the first image of the summary
        run.images.setdefault(value.tag, []).append((step, bytes(arr.reshape(-1)[2])))


def read_run(directory: str | os.PathLike[str], progress: Progress | None = None) -> RunData:
    """Read every event file in ``directory`` (not its subdirectories) with tensorboard's
    ``EventFileLoader``. A record cut off at the end of a file (a run still writing) ends that file
    quietly. ``progress(bytes_done, bytes_total)`` is called as records are read (the byte count is
    estimated from the records' sizes)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    directory = Path(directory)
    files = sorted(p for p in directory.iterdir() if p.is_file() and "tfevents" in p.name)
    total = sum(p.stat().st_size for p in files)
    done = 0
    run = RunData(path=directory)
    for path in files:
        start, size = done, path.stat().st_size
        for event in EventFileLoader(str(path)).Load():
            run.num_events += 1
            done = min(start + size, done + event.ByteSize() + 16)  # 16: record framing
            if progress is not None and run.num_events % 256 == 0:
                progress(done, total)
            if event.HasField("summary"):
                for value in event.summary.value:
                    _add_value(run, int(event.step), float(event.wall_time), value)
        done = start + size
    if progress is not None:
        progress(total, total)
    return run


# --------------------------------------------------------------------------------------------------
# What the records say
# --------------------------------------------------------------------------------------------------
def _timelines(run: RunData) -> list[F.StageTimeline]:
    """The stage index of each monitor, switching at the transitions' onsets (from the records).
    A stage-index scalar without records (an older log) is read as it was written."""
    by_tag: dict[str, F.StageTimeline] = {}
    last_index: dict[str, int] = {}
    for rec in run.records("transition"):
        tag = rec.get("stage_index_tag") or tags.stage_index_key(rec["monitor"], rec["monitor"])
        idx = rec.get("stage_index")
        if idx is None or idx == last_index.get(tag, 0):
            continue  # a transition that does not split stages (a turning point, by default)
        last_index[tag] = idx
        tl = by_tag.setdefault(tag, F.StageTimeline(f"{tag} ({rec['monitor']})", [], [], []))
        tl.onsets.append(int(rec["changepoint_step"]))
        tl.indices.append(int(idx))
        tl.confirmed.append(int(rec["step"]))
    main = {r["stage_index_tag"]: r["monitor"] for r in run.records("detector")}
    for tag in tags.stage_index_tags(run.scalars):
        if tag in by_tag:
            continue
        steps, vals = run.series(tag)
        change = np.flatnonzero(np.diff(vals) != 0) + 1
        label = f"{tag} ({main[tag]})" if tag in main else tag
        by_tag[tag] = F.StageTimeline(label, [int(steps[i]) for i in change], [int(vals[i]) for i in change],
                                      [None] * len(change))
    ordered = tags.stage_index_tags(by_tag)
    return [by_tag[t] for t in ordered]


def _main_spans(run: RunData, timelines: list[F.StageTimeline]) -> list[F.Span]:
    """The main monitor's stages (``stage/index``, else the first timeline) as shaded spans."""
    rng = run.step_range()
    if not timelines or rng is None:
        return []
    tl = timelines[0]
    if not tl.onsets:
        return []  # one stage: nothing to tell apart
    bounds = [rng[0], *tl.onsets, rng[1]]
    indices = [0, *tl.indices]
    return [F.Span(i, a, b) for i, a, b in zip(indices, bounds[:-1], bounds[1:], strict=True)]


def _markers(run: RunData, chart_tags: list[str]) -> list[F.Marker]:
    """Onsets of the transitions of the series on a chart; for a chart whose series have none, of
    the main monitor (the one whose stage index is ``stage/index``)."""
    recs = run.records("transition")
    own = [r for r in recs if r["monitor"] in chart_tags]
    if not own:
        main = {r["monitor"] for r in run.records("detector")}
        main |= {r["monitor"] for r in recs if r.get("stage_index_tag") == tags.STAGE_INDEX}
        own = [r for r in recs if r["monitor"] in main]
    return [F.Marker(int(r["changepoint_step"]), r["direction"], r.get("kind", "changepoint")) for r in own]


def _flagged_steps(run: RunData, monitor: str) -> set[int] | None:
    """Steps of the flagged points of ``monitor``; None when no sink recorded the health of it
    (a ``stages/<monitor>/flagged`` tag, or its transitions, show that a StageDetector watched it)."""
    recs = [r for r in run.records("flagged") if r.get("monitor") == monitor]
    if not recs and tags.transition_record_tag(monitor) not in run.texts:
        return None
    return {int(r["step"]) for r in recs}


def _curve(run: RunData, tag: str, band_tag: str | None = None) -> F.Curve:
    steps, vals = run.series(tag)
    band = None
    if band_tag and band_tag in run.scalars:
        bs, bv = run.series(band_tag)
        band = np.full(len(steps), np.nan)
        common, ia, ib = np.intersect1d(steps, bs, return_indices=True)
        band[ia] = bv[ib]
    flagged = _flagged_steps(run, tag)
    mask = None if flagged is None else np.isin(steps, sorted(flagged))
    return F.Curve(tag, steps, vals, band, mask)


# --------------------------------------------------------------------------------------------------
# The page, one section at a time
# --------------------------------------------------------------------------------------------------
_CSS = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.5em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}
img{max-width:100%}pre{background:#f6f6f6;padding:.6em;overflow-x:auto;font-size:.85em}
table{border-collapse:collapse;font-size:.9em;margin:.5em 0}td,th{border:1px solid #ccc;padding:.2em .6em}
td.num{text-align:right;font-variant-numeric:tabular-nums}.muted{color:#777}
"""


def _markdown(text: str) -> str:
    """Text as its writer meant it (Markdown: tables, fenced code), with any HTML in it escaped."""
    import markdown

    return markdown.markdown(html.escape(text, quote=False), extensions=["tables", "fenced_code"])


@dataclass
class _Page:
    """The HTML being built and the figures in it (kept for a directory output)."""

    parts: list[str] = field(default_factory=list)
    figures: list[tuple[str, bytes]] = field(default_factory=list)

    def add(self, *html_parts: str) -> None:
        self.parts.extend(html_parts)

    def figure(self, png: bytes, name: str, alt: str) -> None:
        self.figures.append((name, png))
        b64 = base64.b64encode(png).decode("ascii")
        self.parts.append(f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{b64}">')

    def logged_image(self, tag: str, items: list[tuple[int, bytes]], note: str = "") -> None:
        step, png = max(items, key=lambda i: i[0])
        self.add(f'<p class="muted"><code>{html.escape(tag)}</code> at step {step}{note}</p>')
        self.figure(png, tag, tag)


def _section_header(page: _Page, run: RunData, name: str) -> None:
    rng = run.step_range()
    span = f"steps {rng[0]}..{rng[1]}" if rng else "no scalars"
    page.add(f"<h2>Run <code>{html.escape(name)}</code></h2>",
             f'<p class="muted">{run.num_events} events, {len(run.scalars)} scalar tags, {span}.</p>')


def _loss_tags(run: RunData) -> list[str]:
    return sorted(t for t in run.scalars
                  if "loss" in t.lower() and not tags.is_stage_index(t) and not tags.is_band(t))


def _section_loss(page: _Page, run: RunData, spans: list[F.Span]) -> None:
    loss = _loss_tags(run)
    if loss:
        page.add("<h3>Loss</h3>")
        png = F.curve_figure([_curve(run, t, None) for t in loss], title="loss (vertical lines: transition onsets)",
                             ylabel="loss", spans=spans, markers=_markers(run, loss))
        page.figure(png, "loss", "loss curves")


def _llc_tags(run: RunData) -> list[str]:
    return sorted(t for t in run.scalars if t.startswith(tags.LLC_PREFIX + "/") and t.endswith("/mean"))


def _std_tag(mean_tag: str) -> str:
    return mean_tag[: -len("mean")] + "std"


def _section_llc(page: _Page, run: RunData, spans: list[F.Span]) -> None:
    llc = _llc_tags(run)
    main = [t for t in llc if t == tags.LLC_MEAN]
    restricted = [t for t in llc if t != tags.LLC_MEAN]
    for title, heading, chosen, name in (
        ("local learning coefficient (±1 std across chains; x: flagged)", "LLC", main, "llc"),
        ("restricted LLCs (±1 std; x: flagged)", "Restricted LLCs", restricted, "restricted_llc"),
    ):
        if chosen:
            page.add(f"<h3>{heading}</h3>")
            curves = [_curve(run, t, _std_tag(t)) for t in chosen]
            png = F.curve_figure(curves, title=title, ylabel="LLC", spans=spans, markers=_markers(run, chosen))
            page.figure(png, name, heading)
    if llc:
        rows = ["<table><tr><th>series</th><th>estimates</th><th>flagged</th><th>last step</th>"
                "<th>last value</th><th>last std</th></tr>"]
        for tag in llc:
            c = _curve(run, tag, _std_tag(tag))
            flagged = "-" if c.flagged is None else str(int(c.flagged.sum()))
            last_std = f"{c.band[-1]:.3g}" if c.band is not None and np.isfinite(c.band[-1]) else "-"
            rows.append(f"<tr><td><code>{html.escape(tag)}</code></td><td class=num>{len(c.steps)}</td>"
                        f"<td class=num>{flagged}</td><td class=num>{c.steps[-1]}</td>"
                        f"<td class=num>{c.values[-1]:.4g}</td><td class=num>{last_std}</td></tr>")
        page.add("\n".join(rows) + "</table>")
    diagnostics = sorted(t for t in run.scalars if t.startswith(tags.LLC_PREFIX + "/") and t not in llc
                         and not t.endswith("/std") and not tags.is_band(t))
    if diagnostics:
        page.add(f'<p class="muted">other LLC diagnostics logged: {html.escape(", ".join(diagnostics))}</p>')


def _transitions_table(records: list[dict[str, Any]]) -> str:
    head = ("monitor", "kind", "direction", "onset step", "confirmed at step", "delay", "before", "after",
            "change", "new stage")
    rows = ["<table><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>"]
    for r in sorted(records, key=lambda r: (r["monitor"], int(r["changepoint_step"]))):
        before, after = float(r["level_before"]), float(r["level_after"])
        cells = [f"<td><code>{html.escape(str(r['monitor']))}</code></td>", f"<td>{html.escape(str(r['kind']))}</td>",
                 f"<td>{html.escape(str(r['direction']))}</td>"]
        nums = [int(r["changepoint_step"]), int(r["step"]), int(r["step"]) - int(r["changepoint_step"]),
                f"{before:.4g}", f"{after:.4g}", f"{after - before:+.4g}",
                "-" if r.get("stage_index") is None else r["stage_index"]]
        cells += [f"<td class=num>{v}</td>" for v in nums]
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return "\n".join(rows) + "</table>"


def _section_stages(page: _Page, run: RunData, timelines: list[F.StageTimeline]) -> None:
    transitions = run.records("transition")
    rules = run.records("rule")
    # display text that has a structured record is not shown twice
    recorded = {tags.transition_text_tag(r["monitor"]) for r in transitions}
    recorded |= {tags.rule_text_tag(r["rule"]) for r in rules}
    texts = sorted(t for t in run.texts if t.startswith(("stages/", "rules/")) and not tags.is_record_tag(t)
                   and t not in recorded)
    images = {t: v for t, v in run.images.items() if t.startswith("stage")}
    if not (timelines or transitions or rules or texts or images):
        return
    page.add("<h3>Stages and transitions</h3>")
    rng = run.step_range()
    if timelines and rng is not None:
        page.figure(F.stage_index_figure(timelines, rng[0], rng[1]), "stage_index", "stage index")
    if transitions:
        page.add(_transitions_table(transitions))
    else:
        page.add('<p class="muted">No transition was detected.</p>')
    if rules:
        items = "".join(f"<li>step {int(r['step'])}: {html.escape(str(r['text']))}</li>" for r in rules)
        page.add(f"<h4>Rules that fired</h4><ul>{items}</ul>")
    for tag in texts:
        page.add(f"<h4><code>{html.escape(tag)}</code></h4>")
        for step, text in run.texts[tag]:
            page.add(f'<p class="muted">step {step}</p>', _markdown(text))
    for tag, items in sorted(images.items()):
        page.logged_image(tag, items)


def _final_trajectory(run: RunData) -> tuple[np.ndarray, np.ndarray] | None:
    """``(steps, coords)`` from the last ``ed/trajectory_final`` text (written by EssentialDynamics at
    the end of training), or None."""
    items = run.texts.get(tags.ED_TRAJECTORY_FINAL)
    if not items:
        return None
    parsed = tags.parse_trajectory_csv(max(items, key=lambda i: i[0])[1])
    if parsed is None:
        return None
    steps, rows = parsed
    return np.asarray(steps, dtype=np.int64), np.asarray(rows, dtype=np.float64)


def _turning_steps(run: RunData) -> list[int]:
    """Onsets of the trajectory's turning points, from the transition records of ``ed/trajectory``."""
    return sorted({int(r["changepoint_step"]) for r in run.records("transition")
                   if r["monitor"] == tags.ED_TRAJECTORY})


def _pc_tags(run: RunData) -> list[str]:
    return sorted((t for t in run.scalars if re.fullmatch(re.escape(tags.ED_PREFIX) + r"pc\d+", t)),
                  key=lambda t: (len(t), t))


def _section_ed(page: _Page, run: RunData) -> None:
    pcs = _pc_tags(run)
    final = _final_trajectory(run)
    ed_images = {t: v for t, v in run.images.items() if t.startswith(tags.ED_PREFIX)}
    ed_texts = sorted(t for t in run.texts if t.startswith(tags.ED_PREFIX) and t != tags.ED_TRAJECTORY_FINAL)
    if len(pcs) < 2 and final is None and not ed_images:
        return
    page.add("<h3>Essential dynamics</h3>")
    for tag, items in sorted(ed_images.items()):
        page.logged_image(tag, items, " (drawn by the callback on the final PCA basis)")
    if final is not None:
        steps, coords = final
        names = [f"PC{i + 1}" for i in range(coords.shape[1])]
    elif len(pcs) >= 2:
        series = [run.series(t) for t in pcs[:3]]
        steps = series[0][0]
        for s, _ in series[1:]:
            steps = np.intersect1d(steps, s)
        coords = np.stack([v[np.searchsorted(s, steps)] for s, v in series], axis=1)
        names = [t.split("/")[-1].upper() for t in pcs[:3]]
    if final is not None or len(pcs) >= 2:
        png = F.trajectory_figure(steps, coords, names, turning_steps=_turning_steps(run),
                                  final_basis=final is not None)
        page.figure(png, "trajectory", "essential-dynamics trajectory")
    if final is None:
        page.add('<p class="muted">No ed/trajectory_final in this log (written at the end of training): each '
                 "point is on the PCA basis of its own time, so the curve is only indicative.</p>")
    if tags.ED_EXPLAINED_VARIANCE in run.scalars:
        _, vals = run.series(tags.ED_EXPLAINED_VARIANCE)
        page.add(f'<p class="muted">variance explained by the top components at the end: {vals[-1]:.1%}</p>')
    for tag in ed_texts:
        page.add(f"<h4><code>{html.escape(tag)}</code></h4>")
        for step, text in run.texts[tag]:
            page.add(f'<p class="muted">step {step}</p>', _markdown(text))


def _section_other(page: _Page, run: RunData) -> None:
    images = {t: v for t, v in run.images.items() if not t.startswith((tags.ED_PREFIX, "stage"))}
    if images:
        page.add("<h3>Other images</h3>")
        for tag, items in sorted(images.items()):
            page.logged_image(tag, items)
    texts = sorted(t for t in run.texts if not t.startswith(("stages/", "rules/", tags.ED_PREFIX)))
    for tag in texts:
        page.add(f"<h4><code>{html.escape(tag)}</code></h4>")
        for step, text in run.texts[tag]:
            page.add(f'<p class="muted">step {step}</p>', _markdown(text))
    shown = set(_loss_tags(run)) | set(tags.stage_index_tags(run.scalars)) | set(_pc_tags(run))
    shown.add(tags.ED_EXPLAINED_VARIANCE)
    rest = sorted(t for t in run.scalars if t not in shown and not t.startswith(tags.LLC_PREFIX + "/")
                  and not tags.is_band(t))
    if rest:
        page.add(f'<p class="muted">other scalar tags (not plotted): {html.escape(", ".join(rest))}</p>')


def _run_section(page: _Page, run: RunData, name: str) -> None:
    timelines = _timelines(run)
    spans = _main_spans(run, timelines)
    _section_header(page, run, name)
    _section_loss(page, run, spans)
    _section_llc(page, run, spans)
    _section_stages(page, run, timelines)
    _section_ed(page, run)
    _section_other(page, run)


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------
def resolve_output(logdir: str | os.PathLike[str], output: str | os.PathLike[str] | None) -> tuple[Path, Path | None]:
    """``(page, figures_dir)`` for ``output``.

    * None: the page ``LOGDIR/report.html``, no figure files;
    * a path ending in ``.html`` or ``.htm`` (and not an existing directory): that page, no figure files;
    * anything else (an existing directory, a path ending in ``/``, a new name): a directory that
      receives ``index.html`` and ``figures/*.png``.
    """
    if output is None:
        return Path(logdir) / "report.html", None
    text = os.fspath(output)
    path = Path(text)
    as_dir = path.is_dir() or text.endswith(("/", os.sep)) or path.suffix.lower() not in (".html", ".htm")
    if not as_dir:
        return path, None
    if path.exists() and not path.is_dir():
        raise ReportError(
            f"{path} is an existing file, and an output without .html names a directory; pass a path ending in "
            f".html to write a single page, or a directory name"
        )
    return path / "index.html", path / "figures"


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "figure"


def write_report(
    logdir: str | os.PathLike[str],
    output: str | os.PathLike[str] | None = None,
    *,
    progress: Callable[[str, int, int], None] | None = None,
) -> Path:
    """Read every run under ``logdir`` and write the HTML report; returns the page's path.

    ``output``: see :func:`resolve_output` (default ``LOGDIR/report.html``). ``progress(run_name,
    bytes_done, bytes_total)`` is called while reading. Raises :class:`ReportError` when ``logdir``
    holds no run or ``output`` cannot be used.
    """
    logdir = Path(logdir).resolve()
    page_path, figures_dir = resolve_output(logdir, output)
    runs: list[tuple[str, RunData]] = []
    for path in find_runs(logdir):
        name = str(path.relative_to(logdir)) if path != logdir else path.name
        cb = (lambda d, t, _n=name: progress(_n, d, t)) if progress is not None else None
        run = read_run(path, cb)
        if not run.is_empty():
            runs.append((name, run))
    if not runs:
        raise ReportError(
            f"the event files under {logdir} hold no scalars, text or images; the run may not have logged "
            "anything yet (loggers flush every few seconds) - train longer or call logger.finalize()"
        )
    page = _Page()
    for name, run in runs:
        mark = len(page.figures)
        _run_section(page, run, name)
        if len(runs) > 1:  # figure files of different runs must not collide
            page.figures[mark:] = [(f"{name}/{n}", png) for n, png in page.figures[mark:]]
    doc = (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        f"<title>devinterp-lightning report: {html.escape(logdir.name)}</title><style>{_CSS}</style></head><body>"
        f"<h1>devinterp-lightning report</h1><p class='muted'>{html.escape(str(logdir))} &middot; "
        f"generated {time.strftime('%Y-%m-%d %H:%M:%S')}</p>{''.join(page.parts)}</body></html>"
    )
    page_path.parent.mkdir(parents=True, exist_ok=True)
    page_path.write_text(doc, encoding="utf-8")
    if figures_dir is not None:
        figures_dir.mkdir(parents=True, exist_ok=True)
        for i, (name, png) in enumerate(page.figures):
            (figures_dir / f"{i:02d}-{_safe_name(name)}.png").write_bytes(png)
    return page_path
