"""`devinterp-lightning report LOGDIR`: reading event files and writing the one-file HTML report."""

from __future__ import annotations

import base64
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from devinterp_lightning.cli import main
from devinterp_lightning.report import ReportError, find_runs, read_run, write_report

pl = pytest.importorskip("lightning.pytorch")

from lightning.pytorch.loggers import TensorBoardLogger  # noqa: E402

from devinterp_lightning.callbacks.essential_dynamics import EssentialDynamics  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


class TinyRun(pl.LightningModule):
    """Logs what the plugin's callbacks log (loss, llc/*, stage/index, transitions as Markdown text),
    so the report is exercised on a genuine TensorBoardLogger event file."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = ((self(x) - y) ** 2).mean()
        self.log("train/loss", loss)
        step = self.global_step
        if step % 10 == 0:
            # Straight to the logger at the exact step, as the callbacks do (self.log on_step would
            # repeat a value at later logging steps of the same epoch).
            llc = 2.0 + (step > 60)  # a jump at step 60
            metrics = {"llc/mean": llc, "llc/std": 0.2, "llc/net.0/mean": llc / 2, "llc/net.0/std": 0.1}
            metrics |= {"llc/mean_lower": llc - 0.2, "llc/mean_upper": llc + 0.2, "llc/mean/rhat": 1.01}
            self.logger.log_metrics({**metrics, "stage/index": float(step > 60)}, step=step)
        if step == 80:
            self.logger.experiment.add_text(
                "stages/llc/mean",
                "| monitor | step | changepoint_step | direction |\n|---|---|---|---|\n| llc/mean | 80 | 60 | increase |",
                global_step=step,
            )
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.fixture(scope="module")
def real_run(tmp_path_factory) -> Path:
    logdir = tmp_path_factory.mktemp("logs")
    pl.seed_everything(0, verbose=False)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, generator=g)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, x[:, :1] * x[:, 1:2]), batch_size=8
    )
    ed = EssentialDynamics(torch.randn(16, 3, generator=g), every_n_steps=4, image_every_n_snapshots=15)
    trainer = pl.Trainer(
        max_steps=120,
        logger=TensorBoardLogger(str(logdir), name="tiny"),
        callbacks=[ed],
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        accelerator="cpu",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(TinyRun(), loader)
    trainer.logger.experiment.flush()
    return logdir


def test_reader_finds_what_the_run_logged(real_run: Path) -> None:
    (run_dir,) = find_runs(real_run)
    assert run_dir.name == "version_0"
    run = read_run(run_dir)
    steps, values = run.series("llc/mean")
    assert list(steps) == list(range(0, 120, 10)) and values[0] == 2.0 and values[-1] == 3.0
    assert len(run.series("train/loss")[0]) == 120
    assert {"ed/pc1", "ed/pc2", "ed/pc3", "ed/explained_variance"} <= set(run.scalars)
    assert len(run.series("ed/pc1")[0]) == 31  # step 0 and every 4th up to 120
    assert any("changepoint_step" in text for _, text in run.texts["stages/llc/mean/text_summary"])
    final = run.texts["ed/trajectory_final/text_summary"][-1][1]
    assert final.count("\n") > 31 and "step,pc1,pc2,pc3" in final
    # every 15 snapshots, and at the end
    assert [step for step, _ in run.images["ed/trajectory"]] == [56, 116, 120]
    png = run.images["ed/trajectory"][-1][1]
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_is_one_self_contained_html_file(real_run: Path, capsys) -> None:
    assert main(["report", str(real_run)]) == 0
    out = real_run / "report.html"
    html = out.read_text()
    captured = capsys.readouterr()
    assert str(out) in captured.out
    assert "100%" in captured.err  # progress while reading
    for section in ("Loss", "LLC", "Restricted LLCs", "Stages and transitions", "Essential dynamics"):
        assert f"<h3>{section}</h3>" in html, section
    assert "changepoint_step" in html and "llc/net.0/mean" in html
    assert "No ed/trajectory_final" not in html  # drawn on the final basis
    assert "<th>changepoint_step</th>" in html  # the Markdown transition table, as a table
    assert "llc/mean/rhat" in html and "llc/mean_lower" not in html  # diagnostics listed, bands not
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert len(images) >= 6  # loss, LLC, restricted, stages, ED image from the log, ED scatter
    assert all(base64.b64decode(b)[:4] == b"\x89PNG" for b in images)
    # self-contained: nothing fetched from elsewhere
    assert not re.search(r'(src|href)="(?!data:)', html)


def test_report_output_option_and_quiet(real_run: Path, tmp_path: Path, capsys) -> None:
    target = tmp_path / "sub" / "r.html"
    assert main(["report", str(real_run), "--output", str(target), "--quiet"]) == 0
    assert target.exists() and target.stat().st_size > 10_000
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


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


def test_report_fails_clearly_on_a_directory_without_a_run(tmp_path: Path) -> None:
    with pytest.raises(ReportError, match="no TensorBoard event files"):
        write_report(tmp_path)
    with pytest.raises(ReportError, match="does not exist"):
        write_report(tmp_path / "missing")
    (tmp_path / "events.out.tfevents.0.host").write_bytes(b"")
    with pytest.raises(ReportError, match="hold no scalars"):
        write_report(tmp_path)


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MPLBACKEND": "Agg"}
    return subprocess.run(
        [sys.executable, "-m", "devinterp_lightning.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def test_cli_exit_status_and_message_without_traceback(tmp_path: Path) -> None:
    proc = _cli("report", str(tmp_path))
    assert proc.returncode == 1
    assert "no TensorBoard event files" in proc.stderr and "Traceback" not in proc.stderr
    helped = _cli("--help")
    assert helped.returncode == 0 and "report" in helped.stdout
    assert main([]) == 2  # no command: help, non-zero


@pytest.mark.slow
def test_report_on_a_deep_linear_network_example_run(tmp_path: Path) -> None:
    """The report reads a real run of the main demo: loss, LLC, stages and the ED trajectory."""
    root = Path(__file__).resolve().parents[1]
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from devinterp_lightning.cli import main as cli_main
    from examples.deep_linear_network import main as run_demo

    logdir = tmp_path / "dln"
    run_demo(["--logdir", str(logdir), "--max-steps", "700", "--quiet", "--no-final-llc"])
    output = tmp_path / "report.html"
    assert cli_main(["report", str(logdir), "--output", str(output), "--quiet"]) in (0, None)
    html = output.read_text()
    assert "llc/mean" in html
    assert "loss" in html.lower()
    assert "ed/" in html or "trajectory" in html.lower()
    assert html.count("data:image/png;base64,") >= 3


def test_robust_limits_clip_a_wild_estimate_but_leave_clean_curves_alone() -> None:
    import numpy as np

    from devinterp_lightning.report import _robust_limits

    clean = np.linspace(0.0, 13.0, 40)
    assert _robust_limits(clean) is None
    wild = clean.copy()
    wild[20] = -1000.0
    lo, hi = _robust_limits(wild)
    assert -1000.0 < lo < 0.0 and hi >= 13.0
