"""`devinterp-lightning report LOGDIR`: built from the event files of a real run (LLCMonitor +
StageDetector + EssentialDynamics writing to a TensorBoardLogger), not from a stand-in log."""

from __future__ import annotations

import base64
import html as htmlmod
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from devinterp_lightning import report as R
from devinterp_lightning import tags
from devinterp_lightning.cli import main
from devinterp_lightning.logging import figures as F
from devinterp_lightning.report import ReportError, find_runs, read_run, resolve_output, write_report

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "docs" / "scripts"))

import report_demo  # noqa: E402  (docs/scripts/report_demo.py: the small real run)

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def real_run(tmp_path_factory) -> dict:
    """The deep linear network for 240 steps: LLC every 10 steps (the first estimates, at the
    saddle, are flagged), loss transitions from the StageDetector, ED turning points adopted."""
    logdir = tmp_path_factory.mktemp("logs") / "dln"
    out = report_demo.run(logdir, max_steps=240)
    return {"logdir": logdir, **out}


def _table_rows(page: str) -> list[list[str]]:
    """The body rows of the transitions table (the one with an "onset step" column)."""
    table = next(t for t in re.findall(r"<table>.*?</table>", page, flags=re.S) if "onset step" in t)
    rows = re.findall(r"<tr>(.*?)</tr>", table, flags=re.S)[1:]
    return [[htmlmod.unescape(re.sub(r"<[^>]+>", "", c)) for c in re.findall(r"<td[^>]*>(.*?)</td>", r)]
            for r in rows]


def test_reader_gets_what_the_callbacks_wrote(real_run) -> None:
    (run_dir,) = find_runs(real_run["logdir"])
    run = read_run(run_dir)
    history = real_run["monitor"].history.get("llc/mean")
    steps, values = run.series("llc/mean")
    assert list(steps) == [p.step for p in history]
    assert np.allclose(values, [p.value for p in history], rtol=1e-6)
    detector = real_run["detector"]
    recorded = {(r["monitor"], r["changepoint_step"], r["step"], r["direction"], r["kind"])
                for r in run.records("transition")}
    seen = {(t.monitor, t.changepoint_step, t.step, t.direction, t.kind) for t in detector.all_transitions}
    assert recorded == seen and any(k == "changepoint" for *_, k in seen)
    flagged = {p.step for p in history if p.flags}
    assert flagged and {r["step"] for r in run.records("flagged") if r["monitor"] == "llc/mean"} == flagged
    assert [r["monitor"] for r in run.records("detector")] == ["llc/mean"]
    assert len(run.records("rule")) == len(detector.fired)
    png = run.images[tags.ED_TRAJECTORY][-1][1]
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_shows_transitions_flags_and_charts(real_run, tmp_path, capsys) -> None:
    logdir = real_run["logdir"]
    assert main(["report", str(logdir)]) == 0
    page_path = logdir / "report.html"
    page = page_path.read_text()
    captured = capsys.readouterr()
    assert str(page_path) in captured.out and "100%" in captured.err
    for section in ("Loss", "LLC", "Stages and transitions", "Essential dynamics"):
        assert f"<h3>{section}</h3>" in page, section
    # one row per transition, with its onset and confirmation steps, read from the JSON records
    rows = _table_rows(page)
    expected = sorted((t.monitor, t.kind, t.direction, str(t.changepoint_step), str(t.step))
                      for t in real_run["detector"].all_transitions)
    assert sorted(tuple(r[:5]) for r in rows) == expected
    assert all(int(r[5]) == int(r[4]) - int(r[3]) for r in rows)  # delay = confirmation - onset
    # the LLC table counts the flagged estimates
    n_flagged = sum(1 for p in real_run["monitor"].history.get("llc/mean") if p.flags)
    assert re.search(rf"<code>llc/mean</code></td><td class=num>\d+</td><td class=num>{n_flagged}</td>", page)
    # the rules that fired, once each, not their Markdown
    assert page.count("fired at step") == len(real_run["detector"].fired)
    assert "/json" not in page and '"record"' not in page  # records are read, not shown
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    # loss, LLC, stage index, the detector's curve images, the ED image and the trajectory panels
    assert len(images) >= 6 and all(base64.b64decode(b)[:4] == b"\x89PNG" for b in images)
    assert not re.search(r'(src|href)="(?!data:)', page)  # self-contained


def test_charts_use_the_records(real_run) -> None:
    (run_dir,) = find_runs(real_run["logdir"])
    run = read_run(run_dir)
    # the loss chart plots the loss only: not the stage index of the loss, nor its std band
    assert R._loss_tags(run) == ["train/loss"]
    assert "stage/train/loss/index" in run.scalars
    # the stage index switches at the onsets, not where the scalar was written
    loss_ts = [t for t in real_run["detector"].transitions_for("train/loss") if t.kind == "changepoint"]
    (timeline,) = [tl for tl in R._timelines(run) if tl.label.startswith("stage/train/loss/index")]
    assert timeline.onsets == [t.changepoint_step for t in loss_ts]
    assert timeline.confirmed == [t.step for t in loss_ts]
    # flagged LLC estimates are known, drawn apart and do not set the axis
    curve = R._curve(run, "llc/mean", "llc/std")
    flags = [bool(p.flags) for p in real_run["monitor"].history.get("llc/mean")]
    assert curve.flagged is not None and list(curve.flagged) == flags
    lo, hi = F.healthy_limits([curve])
    healthy = curve.values[~curve.flagged]
    assert lo <= healthy.min() and hi >= healthy.max()
    assert curve.values[curve.flagged].min() < lo  # the saddle's wild estimates lie off the axis
    # turning points of the trajectory come from the adopted transition records
    assert R._turning_steps(run) == sorted({t.changepoint_step for t in
                                           real_run["detector"].transitions_for(tags.ED_TRAJECTORY)})


# --------------------------------------------------------------------------------------------------
# --output: a .html path is the page, anything else a directory
# --------------------------------------------------------------------------------------------------
def _figures(directory: Path) -> list[str]:
    return sorted(p.name for p in (directory / "figures").glob("*.png"))


def test_output_html_path_is_one_page(real_run, tmp_path) -> None:
    target = tmp_path / "sub" / "r.html"
    assert main(["report", str(real_run["logdir"]), "--output", str(target), "--quiet"]) == 0
    assert target.is_file() and target.stat().st_size > 10_000
    assert not (tmp_path / "sub" / "figures").exists()


def test_output_with_trailing_slash_is_a_directory(real_run, tmp_path, capsys) -> None:
    target = tmp_path / "new_dir"
    assert main(["report", str(real_run["logdir"]), "--output", str(target) + "/", "-q"]) == 0
    assert target.is_dir() and (target / "index.html").is_file()
    names = _figures(target)
    assert any("loss" in n for n in names) and any("llc" in n for n in names)
    assert capsys.readouterr().out == ""


def test_output_existing_directory_receives_index_html(real_run, tmp_path) -> None:
    target = tmp_path / "existing"
    target.mkdir()
    assert main(["report", str(real_run["logdir"]), "--output", str(target), "-q"]) == 0
    assert (target / "index.html").is_file() and _figures(target)


def test_output_new_name_without_suffix_is_a_directory(real_run, tmp_path) -> None:
    target = tmp_path / "report"
    assert main(["report", str(real_run["logdir"]), "--output", str(target), "-q"]) == 0
    assert (target / "index.html").is_file()


def test_output_rules_and_the_errors(tmp_path, capsys) -> None:
    assert resolve_output(tmp_path, None) == (tmp_path / "report.html", None)
    assert resolve_output(tmp_path, tmp_path / "a.HTML") == (tmp_path / "a.HTML", None)
    assert resolve_output(tmp_path, tmp_path / "d") == (tmp_path / "d" / "index.html", tmp_path / "d" / "figures")
    (tmp_path / "page.html").mkdir()  # an existing directory wins over the suffix
    assert resolve_output(tmp_path, tmp_path / "page.html")[0] == tmp_path / "page.html" / "index.html"
    (tmp_path / "plain").write_text("x")
    with pytest.raises(ReportError, match="existing file"):
        resolve_output(tmp_path, tmp_path / "plain")
    # an abbreviated option is an error, not a silent --output
    with pytest.raises(SystemExit) as exc:
        main(["report", str(tmp_path), "--out", str(tmp_path / "x")])
    assert exc.value.code == 2 and "--out" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# Reading edge cases, logs without records, text
# --------------------------------------------------------------------------------------------------
def test_reader_tolerates_a_truncated_tail_and_a_resumed_run(tmp_path: Path) -> None:
    from torch.utils.tensorboard import SummaryWriter

    w = SummaryWriter(str(tmp_path))
    for step in range(5):
        w.add_scalar("train/loss", 1.0 / (step + 1), step)
    w.add_scalar("train/loss", 99.0, 3)  # a resumed run rewrites step 3
    w.close()
    (path,) = list(tmp_path.glob("*tfevents*"))
    with open(path, "ab") as fh:
        fh.write(b"\x10\x00\x00\x00\x00\x00\x00\x00\x00\x00")  # a record cut off mid-header
    run = read_run(tmp_path)
    steps, values = run.series("train/loss")
    assert list(steps) == [0, 1, 2, 3, 4] and values[3] == 99.0


def test_a_log_without_records_and_user_text(tmp_path: Path) -> None:
    """An older log (stage index as a scalar only) still gets its stage chart; text without a record
    is rendered as Markdown with any HTML in it escaped."""
    from torch.utils.tensorboard import SummaryWriter

    w = SummaryWriter(str(tmp_path))
    for step in range(0, 50, 5):
        w.add_scalar("llc/mean", 1.0 + (step >= 30), step)
        w.add_scalar(tags.STAGE_INDEX, float(step >= 40), step)
    w.add_text("notes", "| a | b |\n|---|---|\n| 1 | <script>x</script> |", 10)
    w.close()
    run = read_run(tmp_path)
    (timeline,) = R._timelines(run)
    assert timeline.onsets == [40] and timeline.indices == [1] and timeline.confirmed == [None]
    assert R._flagged_steps(run, "llc/mean") is None  # no detector watched it: health unknown
    page = write_report(tmp_path).read_text()
    assert "<th>a</th>" in page and "&lt;script&gt;" in page and "<script>" not in page


def test_report_fails_clearly_on_a_directory_without_a_run(tmp_path: Path) -> None:
    with pytest.raises(ReportError, match="no TensorBoard event files"):
        write_report(tmp_path)
    with pytest.raises(ReportError, match="does not exist"):
        write_report(tmp_path / "missing")
    (tmp_path / "events.out.tfevents.0.host").write_bytes(b"")
    with pytest.raises(ReportError, match="hold no scalars"):
        write_report(tmp_path)


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "devinterp_lightning.cli", *args], capture_output=True, text=True,
                          env=env, timeout=120)


def test_cli_exit_status_and_message_without_traceback(tmp_path: Path) -> None:
    proc = _cli("report", str(tmp_path))
    assert proc.returncode == 1
    assert "no TensorBoard event files" in proc.stderr and "Traceback" not in proc.stderr
    helped = _cli("report", "--help")
    assert helped.returncode == 0 and "index.html" in helped.stdout
    assert main([]) == 2  # no command: help, non-zero


# --------------------------------------------------------------------------------------------------
# The drawing
# --------------------------------------------------------------------------------------------------
def test_flagged_outlier_does_not_set_the_axis() -> None:
    """The issue's case: a 6 -> 11 rise and one flagged estimate at -1012."""
    steps = np.arange(0, 200, 10)
    values = np.linspace(6.0, 11.0, len(steps))
    values[7] = -1012.0
    flagged = np.zeros(len(steps), dtype=bool)
    flagged[7] = True
    lo, hi = F.healthy_limits([F.Curve("llc/mean", steps, values, np.full(len(steps), 0.2), flagged)])
    assert 5.0 < lo < 6.0 - 0.2 and 11.0 + 0.2 < hi < 12.0
    png = F.curve_figure([F.Curve("llc/mean", steps, values, None, flagged)], title="t", ylabel="LLC")
    assert png[:4] == b"\x89PNG"
    # without flags (health unknown), the percentile rule still keeps the outlier off the axis
    lo, hi = F.robust_limits(values)
    assert -1012.0 < lo < 6.0 and hi >= 11.0
    assert F.robust_limits(np.linspace(0.0, 13.0, 40)) is None


def test_the_only_stage_switch_is_not_clipped() -> None:
    tl = F.StageTimeline("stage/index", [120], [1], [120])
    xs, ys = F.step_path(tl, 0, 120)
    assert xs[-2:] == [120, 120] and ys[-2:] == [1, 1]  # the switch and its stage both drawn
    assert F.stage_index_figure([tl], 0, 120)[:4] == b"\x89PNG"


def test_trajectory_panel_labels_do_not_overlap() -> None:
    rng = np.random.default_rng(0)
    coords = np.cumsum(rng.normal(size=(60, 3)) * [300.0, 1.0, 0.01], axis=0)  # long tick labels
    fig = F.trajectory_panels(np.arange(60) * 10, coords, ["PC1", "PC2", "PC3"], turning_steps=[100])
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    boxes = [ax.get_tightbbox(renderer) for ax in fig.axes]  # panels (labels included) and colorbar
    for i in range(len(boxes)):
        for j in range(i + 1, len(boxes)):
            assert not boxes[i].overlaps(boxes[j]), (i, j)


@pytest.mark.slow
def test_report_on_a_deep_linear_network_example_run(tmp_path: Path) -> None:
    """The report reads a real run of the main demo: loss, LLC, stages and the ED trajectory."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from examples.deep_linear_network import main as run_demo

    logdir = tmp_path / "dln"
    result = run_demo(["--logdir", str(logdir), "--max-steps", "700", "--quiet", "--no-final-llc"])
    output = tmp_path / "report.html"
    assert main(["report", str(logdir), "--output", str(output), "--quiet"]) == 0
    page = output.read_text()
    rows = _table_rows(page) if result["transitions"] else []
    onsets = {int(r[3]) for r in rows if r[0] == "llc/mean"}
    assert onsets == {t["changepoint_step"] for t in result["transitions"]}
    assert page.count("data:image/png;base64,") >= 3
