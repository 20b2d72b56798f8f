"""Overhead of LLCMonitor on the DLN demo: synchronous and background sampling.

Trains the 4-layer, width-16 deep linear network of ``examples/configs/dln.py`` (init scale 0.1,
rank-3 teacher, 1024 samples in tensors, batch 64, SGD) for ``--steps`` optimizer steps, with
the monitor at its defaults (probe data: 512 held-out samples in batches of 64), one torch thread
per process. Per mode it measures, in this one invocation, the wall time of ``trainer.fit``
without and then with the monitor, and prints the overhead (with / without), the number of
estimates and the due steps skipped. Modes:

- ``sync``: synchronous sampling (the default ``background=False``);
- ``pinned``: ``background=True``; training (and its baseline) pinned to one core, the worker to
  another (``os.sched_setaffinity``; Linux only);
- ``shared``: ``background=True``; training and worker both free to use every core.

Run from the repository root, on an otherwise idle machine:

    OMP_NUM_THREADS=1 python benchmarks/bench_monitor_overhead.py --steps 2000 20000 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from devinterp_lightning import LLCMonitor  # noqa: E402
from examples.configs.dln import DeepLinearNetwork, probe_loader  # noqa: E402
from examples.configs.losses import mse  # noqa: E402


class PinWorker(Callback):
    """Moves the monitor's worker process to ``cpus`` as soon as it exists."""

    def __init__(self, monitor: LLCMonitor, cpus: set[int]) -> None:
        self.monitor, self.cpus = monitor, cpus

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.monitor.worker_pid is not None:
            os.sched_setaffinity(self.monitor.worker_pid, self.cpus)


def fit(steps: int, monitor: LLCMonitor | None, extra: list[Callback]) -> float:
    pl.seed_everything(0, verbose=False)
    model = DeepLinearNetwork(width=16, depth=4, rank=3, init_scale=0.1, lr=0.05)
    trainer = pl.Trainer(
        max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=([monitor] if monitor else []) + extra,
    )
    start = time.perf_counter()
    trainer.fit(model)
    return time.perf_counter() - start


def measure(steps: int, mode: str, cpus: list[int]) -> dict[str, Any]:
    everything = set(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else set()
    if mode == "pinned":
        os.sched_setaffinity(0, {cpus[0]})
    try:
        baseline = fit(steps, None, [])
        monitor = LLCMonitor(mse, data=probe_loader(), background=mode != "sync", progress=False)
        extra: list[Callback] = [PinWorker(monitor, {cpus[1]})] if mode == "pinned" else []
        wall = fit(steps, monitor, extra)
    finally:
        if mode == "pinned":
            os.sched_setaffinity(0, everything)
    points = monitor.history.get("llc/mean")
    return {
        "steps": steps, "mode": mode, "without_s": round(baseline, 2), "with_s": round(wall, 2),
        "overhead": round(wall / baseline, 3), "estimates": len(points), "skipped": len(monitor.skipped_steps),
        "healthy": sum(not p.flags for p in points), "load_avg_1min": round(os.getloadavg()[0], 2),
        "worker_startup_s": None if monitor.worker_startup_s is None else round(monitor.worker_startup_s, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[2000, 20000])
    parser.add_argument("--modes", nargs="+", default=["sync", "pinned", "shared"],
                        choices=["sync", "pinned", "shared"])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--cpus", type=int, nargs=2, default=[0, 1], help="training core, worker core (pinned)")
    parser.add_argument("--out", default=None, help="append JSON lines here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    modes = list(args.modes)
    usable = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()
    if "pinned" in modes and not set(args.cpus) <= usable:
        # pinning needs os.sched_setaffinity (Linux) and both cores available to this process
        print(f"skipping mode 'pinned': cores {args.cpus} are not both available here (available: {sorted(usable)})")
        modes.remove("pinned")
    print(f"torch {torch.__version__}, one thread per process, cores available: {os.cpu_count()}")
    for _ in range(args.repeats):
        for steps in args.steps:
            for mode in modes:
                row = measure(steps, mode, args.cpus)
                print(json.dumps(row), flush=True)
                if args.out:
                    with open(args.out, "a") as f:
                        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
