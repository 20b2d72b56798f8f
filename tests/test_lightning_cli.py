"""examples/lightning_cli: the callbacks' options are overridable on the command line, as its header
says (`--llc_monitor.<option>`, `--stage_detector.<option>`), and a wrong option is a clear error."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
MAIN = "examples/lightning_cli/main.py"
CONFIG = "examples/lightning_cli/config.yaml"


def _cli(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """The example as a user runs it: from the repository root (the config's paths are relative to it)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, MAIN, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_monitor_and_detector_options_are_overridden_from_the_command_line(tmp_path: Path) -> None:
    """Training runs with the overrides applied: the monitor's overridden schedule is what is logged,
    and the config LightningCLI saves next to the logs records every overridden option."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    proc = _cli(["fit", "--config", CONFIG,
                 "--trainer.max_steps", "40", "--trainer.enable_progress_bar", "false",
                 "--trainer.logger.init_args.save_dir", str(tmp_path),
                 "--llc_monitor.every_n_steps", "20",      # config: 40
                 "--llc_monitor.num_draws", "20",          # config: 200
                 "--llc_monitor.num_burnin_steps", "10",
                 "--stage_detector.min_size", "4",         # config: default 3
                 "--stage_detector.checkpoint_dir", str(tmp_path / "ckpts")])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]

    events = sorted(tmp_path.rglob("events.out.tfevents.*"))
    assert events, f"no event file under {tmp_path}"
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    assert [e.step for e in acc.Scalars("llc/mean")] == [0, 20, 40]   # the overridden schedule (config: 0, 40)

    saved = yaml.safe_load(next(tmp_path.rglob("config.yaml")).read_text())
    assert saved["llc_monitor"]["num_draws"] == 20 and saved["llc_monitor"]["every_n_steps"] == 20
    assert saved["llc_monitor"]["localization"] == 1000.0          # not overridden: from config.yaml
    assert saved["stage_detector"]["min_size"] == 4


def test_overrides_reach_the_callback_objects(tmp_path: Path) -> None:
    from devinterp_lightning import LLCMonitor, StageDetector
    from examples.lightning_cli.main import main

    cli = main(["fit", "--config", str(ROOT / CONFIG), "--trainer.max_steps", "2",
                "--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.save_dir", str(tmp_path),
                "--llc_monitor.num_draws", "7", "--llc_monitor.num_chains", "2", "--llc_monitor.every_n_steps", "2",
                "--stage_detector.rules", str(ROOT / "examples/lightning_cli/rules.yaml"),
                "--stage_detector.min_size", "4"])
    monitors = [cb for cb in cli.trainer.callbacks if isinstance(cb, LLCMonitor)]
    detectors = [cb for cb in cli.trainer.callbacks if isinstance(cb, StageDetector)]
    assert len(monitors) == 1 and len(detectors) == 1     # each callback exactly once
    assert (monitors[0].num_draws, monitors[0].num_chains, monitors[0].localization) == (7, 2, 1000.0)
    assert [r.name for r in detectors[0].rules] == ["halt-on-new-structure"]
    assert monitors[0].history.steps("llc/mean") == [0, 2]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        # a misspelled option: named in the error, before any training
        (["--llc_monitor.num_drawz", "20"], "unrecognized arguments: --llc_monitor.num_drawz"),
        # a value of the wrong type
        (["--llc_monitor.num_draws", "many"], "num_draws"),
        # the spelling that did not work before (issue 15, item 7) is still an error, not silently ignored
        (["--trainer.callbacks.num_draws", "20"], "num_draws"),
    ],
    ids=["misspelled", "wrong-type", "trainer-callbacks"],
)
def test_a_wrong_option_is_a_clear_error_before_training(args: list[str], expected: str,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    from examples.lightning_cli.main import main

    with pytest.raises(SystemExit) as exit_info:    # the parser exits with status 2, as on a command line
        main(["fit", "--config", str(ROOT / CONFIG), *args])
    assert exit_info.value.code != 0
    out = capsys.readouterr()
    assert expected in out.err, out.err[-3000:]
    assert "LLCMonitor: step" not in out.err        # nothing was trained


def test_help_lists_the_monitor_options(capsys: pytest.CaptureFixture[str]) -> None:
    from examples.lightning_cli.main import main

    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for option in ("--llc_monitor.num_draws", "--llc_monitor.localization", "--stage_detector.rules"):
        assert option in out
