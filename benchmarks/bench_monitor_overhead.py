"""Overhead of LLCMonitor on a small deep linear network.

Trains the 4-layer, width-16 deep linear network of ``examples/configs/dln.py`` (small init,
rank-3 teacher, data generated in tensors) for ``--steps`` optimizer steps, without the monitor
and with it under several schedules, and prints per configuration: wall time, the overhead
ratio (time with monitor / time without), the number of estimates and the share of the run
spent sampling. Run from the repository root:

    python benchmarks/bench_monitor_overhead.py --steps 2000
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from devinterp_lightning import LLCMonitor  # noqa: E402
from devinterp_lightning.schedule import Adaptive, LogSpaced  # noqa: E402
from examples.configs.dln import DeepLinearNetwork, probe_loader  # noqa: E402
from examples.configs.losses import mse  # noqa: E402


class TimedMonitor(LLCMonitor):
    """LLCMonitor that accumulates the wall time spent inside the estimator."""

    sampling_s = 0.0
    estimates = 0

    def _estimate(self, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return super()._estimate(*args, **kwargs)
        finally:
            self.sampling_s += time.perf_counter() - start
            self.estimates += 1


def run(steps: int, monitor_kwargs: dict[str, Any] | None) -> tuple[float, TimedMonitor | None]:
    pl.seed_everything(0, verbose=False)
    model = DeepLinearNetwork(width=16, depth=4, rank=3, init_scale=0.1, lr=0.05)
    callbacks = []
    monitor = None
    if monitor_kwargs is not None:
        monitor = TimedMonitor(mse, data=probe_loader(), **monitor_kwargs)
        callbacks.append(monitor)
    trainer = pl.Trainer(
        max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=callbacks,
    )
    start = time.perf_counter()
    trainer.fit(model)
    return time.perf_counter() - start, monitor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--defaults-only", action="store_true", help="only the default settings (for long runs)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    configs: dict[str, dict[str, Any]] = {
        "defaults (LogSpaced 10/decade, 4x(50+200))": {},
        "every_n_steps=100": {"every_n_steps": 100},
        "Adaptive(10..1000 steps, 2 stderr)": {"every_n_steps": Adaptive(min_interval=10, max_interval=1000)},
        "LogSpaced 5/decade, 4x(25+100)": {
            "every_n_steps": LogSpaced(start=10, per_decade=5), "num_draws": 100, "num_burnin_steps": 25,
        },
    }
    if args.defaults_only:
        configs = dict(list(configs.items())[:1])
    baseline, _ = run(args.steps, None)
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.steps} steps of a 4x16 deep linear network")
    # "overhead" compares two runs and is at the mercy of other load on the machine; "from share"
    # = wall / (wall - sampling) uses one run only and is the steadier figure on a shared machine.
    print(
        f"{'configuration':46s} {'wall s':>8s} {'overhead':>9s} {'from share':>10s} {'estimates':>9s} "
        f"{'sampling share':>14s} {'s/estimate':>10s}"
    )
    print(f"{'no monitor':46s} {baseline:8.2f} {1.0:8.2f}x {1.0:9.2f}x {0:9d} {'-':>14s} {'-':>10s}")
    for label, kwargs in configs.items():
        wall, monitor = run(args.steps, kwargs)
        assert monitor is not None
        sampling = monitor.sampling_s
        print(
            f"{label:46s} {wall:8.2f} {wall / baseline:8.2f}x {wall / (wall - sampling):9.2f}x "
            f"{monitor.estimates:9d} {100 * sampling / wall:13.1f}% {sampling / max(monitor.estimates, 1):10.2f}"
        )
        if isinstance(monitor.schedule, Adaptive):
            points = monitor.history["llc/mean"]
            print("    adaptive steps: " + ", ".join(f"{p.step}:{p.value:.2f}" for p in points))


if __name__ == "__main__":
    main()
