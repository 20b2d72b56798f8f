"""A small real run for the report: the deep linear network of ``examples/deep_linear_network.py``
with LLCMonitor, StageDetector and EssentialDynamics, sized to finish in seconds on a CPU.

    python docs/scripts/report_demo.py LOGDIR [--max-steps N]

Used by ``docs/scripts/screenshot_report.py`` and by ``tests/test_report.py``: both build the
report from what the real callbacks and sinks wrote, not from a stand-in.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]

#: fast SGLD settings: fewer chains and draws than the demo (the estimates are noisier, which the
#: report must show anyway); localization as in the demo, so the plateau estimates stay steady
SETTINGS = dict(lr=1e-4, localization=1000.0, num_chains=4, num_draws=100, num_burnin_steps=20)


def run(logdir: str | Path, max_steps: int = 300, llc_every: int = 10, seed: int = 0, init_scale: float = 0.05) -> dict[str, Any]:
    """Train, writing TensorBoard events under ``logdir`` (one run, no version subdirectory);
    returns the callbacks so a caller can compare the report with what they saw."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import TensorBoardLogger

    from devinterp_lightning import AlertRule, EssentialDynamics, LLCMonitor, StageDetector
    from examples._common import full_batch_loader
    from examples.deep_linear_network import DeepLinearNetwork, loss_fn, teacher_data

    pl.seed_everything(seed, verbose=False)
    data = teacher_data(seed=0)
    monitor = LLCMonitor(loss_fn, data=full_batch_loader(data.tensors), every_n_steps=llc_every, seed=seed,
                         progress=False, **SETTINGS)
    detector = StageDetector(
        monitor="llc/mean",
        rules=[AlertRule(name="log-transition", monitor="llc/mean", actions=("log",)),
               # the loss, read from trainer.callback_metrics every 5 steps: its drops are the stages
               AlertRule(name="loss-drop", monitor="train/loss", direction="decrease", actions=("log",)),
               # the turning points EssentialDynamics publishes are adopted and recorded too
               AlertRule(name="log-turn", monitor="ed/trajectory", actions=("log",))],
        every_n_steps=5,
        turning_points=False,
    )
    ed = EssentialDynamics(probe=data.tensors[0][:64], every_n_steps=5)
    trainer = pl.Trainer(
        max_steps=max_steps, accelerator="cpu", devices=1,
        logger=TensorBoardLogger(str(logdir), name="", version=""),
        callbacks=[monitor, detector, ed], log_every_n_steps=5, enable_checkpointing=False,
        enable_model_summary=False, enable_progress_bar=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(DeepLinearNetwork(init_scale=init_scale), full_batch_loader(data.tensors, num_batches=max_steps))
    trainer.logger.experiment.flush()
    return {"monitor": monitor, "detector": detector, "essential_dynamics": ed, "trainer": trainer}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("logdir")
    parser.add_argument("--max-steps", type=int, default=400)
    args = parser.parse_args(argv)
    out = run(args.logdir, args.max_steps)
    for t in out["detector"].transitions:
        print(t)


if __name__ == "__main__":
    main()
