"""Benchmark on a CUDA device: estimator accuracy over seeds, sampling speed against training, and
the monitor's overhead in a Lightning fit. Prints "no CUDA device" and exits 0 where there is none.

Usage: python benchmarks/bench_cuda.py [--parts accuracy speed monitor] [--seeds 5]

- ``accuracy``: relative error against the closed form, seeds ``0 .. --seeds-1``, on the GPU, for the
  cases of tests/test_cuda.py at the CPU tests' settings: a regular linear map 4 -> 3 (lambda 6) and
  DLN 3-4-4-3 at a rank-2 teacher (lambda 4.5), noise-free; and the noisy suite (label noise sigma 1
  at the exact minimiser: linear 4 -> 3, RRR 4-4-4 r2, DLN 3-4-4-3 r2) at its documented settings of
  the B 128 epoch-order row, per-chain streams.
- ``speed``: the same estimation as benchmarks/bench_estimator.py (4 and 16 chains, burn-in 0) against a
  plain training loop doing as many forward/backward steps as all chains together. Like with like:
  both slice shuffled batches from the same CPU tensors (the estimator's fast path for a DataLoader
  over a TensorDataset; bench_estimator.py's loop) and move each batch to the GPU. Figures are
  the best of ``--repeats`` after a warm-up, with ``torch.cuda.synchronize()`` before each clock read.
  "chain-step / training step" is the time of one SGLD update of one chain over that of one training
  step; below 1 means the vectorised chains share kernel launches.
- ``monitor``: ``trainer.fit`` of the DLN demo (examples/configs/dln.py) on the GPU for ``--steps``
  steps, without and with ``LLCMonitor`` at its defaults: synchronous, and ``background=True`` with
  the worker on the GPU (``worker_device="cuda"``) and on the CPU (the default).
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "tests", ROOT / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))


DEVICE = torch.device("cuda")


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def device_name() -> str:
    return torch.cuda.get_device_name() if DEVICE.type == "cuda" else str(DEVICE)


def synced(run) -> float:
    sync()
    start = time.perf_counter()
    run()
    sync()
    return time.perf_counter() - start


def accuracy(seeds: range) -> None:
    from test_estimator_noisy import SUITE_CASES, suite_estimate
    from test_estimator_theory import NET, sq_error, teacher_loader, teacher_network

    from devinterp_lightning import estimate_llc, theory

    def noise_free(widths: list[int] | None, seed: int) -> tuple[float, str]:
        if widths is None:
            torch.manual_seed(seed)
            model = nn.Linear(4, 3, bias=False)
            loader, truth, draws, burnin = teacher_loader(model, 4, seed=seed), theory.regular(12), 400, 100
        else:
            model = teacher_network(widths, 2, seed=seed)
            loader, truth = teacher_loader(model, widths[0], seed=seed), theory.deep_linear_network(widths, 2)
            draws, burnin = 2000, 500
        res = estimate_llc(model.to(DEVICE), sq_error, loader, **NET, num_draws=draws, num_burnin_steps=burnin, seed=seed)
        return res.mean / truth - 1, ",".join(res.flags)

    def noisy(name: str, seed: int) -> tuple[float, str]:
        case = SUITE_CASES[name](seed)
        res = suite_estimate(case, "B128-epoch", seed, device=DEVICE)
        return res.mean / case.llc - 1, ",".join(res.flags)

    rows: dict[str, Any] = {
        "regular 4 -> 3, noise-free (lambda 6)": lambda s: noise_free(None, s),
        "DLN 3-4-4-3 r2, noise-free (lambda 4.5)": lambda s: noise_free([3, 4, 4, 3], s),
    }
    for name in SUITE_CASES:
        rows[f"{name}, noisy, B 128 epochs"] = lambda s, name=name: noisy(name, s)
    print(f"\naccuracy on {device_name()}: relative error per seed {list(seeds)} (flags)")
    for name, run in rows.items():
        out = [run(s) for s in seeds]
        errors = ", ".join(f"{100 * e:+.1f}%" + (f" ({f})" if f else "") for e, f in out)
        print(f"  {name:46s} {errors}   max |error| {100 * max(abs(e) for e, _ in out):.1f}%", flush=True)


def time_case(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int, chains: int, draws: int,
              repeats: int) -> tuple[float, float]:
    """Best wall times of one estimate (``chains`` x ``draws``, burn-in 0) and of a training loop doing
    as many forward/backward steps, both on ``DEVICE``: bench_estimator.py's two runners."""
    from bench_estimator import ours_runner, training_runner

    ours = ours_runner(model, x, y, batch, draws, num_chains=chains)
    train = training_runner(model, x, y, batch, chains * draws, device=DEVICE)
    ours(), train()  # warm-up: cuBLAS handles, torch.func caches
    return min(synced(ours) for _ in range(repeats)), min(synced(train) for _ in range(repeats))


def speed(draws: int, repeats: int) -> None:
    from bench_estimator import CASES, build_model, make_data

    cases = dict(CASES)
    cases["mlp-784-1024-1024-10-b512"] = ([784, 1024, 1024, 10], True, 512)
    print(f"\nspeed on {device_name()}: burn-in 0, {draws} draws per chain, best of {repeats}")
    for name, (widths, relu, batch) in cases.items():
        torch.manual_seed(0)
        model = build_model(widths, relu).to(DEVICE)
        x, y = make_data(widths)
        for chains in (4, 16):
            steps = chains * draws
            ours, train = time_case(model, x, y, batch, chains, draws, repeats)
            print(f"  {name:28s} {chains:2d} chains: ours {ours:6.3f} s ({ours / steps * 1e3:.3f} ms per "
                  f"chain-step), train {train:6.3f} s ({train / steps * 1e3:.3f} ms per step); "
                  f"chain-step / training step {ours / train:.2f}", flush=True)


def monitor(steps: int) -> None:
    import lightning.pytorch as pl

    from devinterp_lightning import LLCMonitor
    from examples.configs.dln import DeepLinearNetwork, probe_loader
    from examples.configs.losses import mse

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

    def fit(callback: LLCMonitor | None, steps: int = steps) -> float:
        pl.seed_everything(0, verbose=False)
        model = DeepLinearNetwork(width=16, depth=4, rank=3, init_scale=0.1, lr=0.05)
        trainer = pl.Trainer(max_steps=steps, accelerator=DEVICE.type, devices=1, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False,
                             callbacks=[] if callback is None else [callback])
        return synced(lambda: trainer.fit(model))

    fit(None)  # warm-ups: CUDA context and kernels, then the estimator's first-call costs (torch.func)
    fit(LLCMonitor(mse, data=probe_loader(), progress=False, every_n_steps=[0]), steps=10)
    baseline = fit(None)
    print(f"\nmonitor on {device_name()}: DLN demo, {steps} steps; without the monitor {baseline:.2f} s")
    here = "the GPU" if DEVICE.type == "cuda" else f"worker_device={DEVICE.type!r}"
    for label, kw in (("synchronous", {}), (f"background, worker on {here}", {"background": True, "worker_device": DEVICE.type}),
                      ("background, worker on the CPU", {"background": True})):
        mon = LLCMonitor(mse, data=probe_loader(), progress=False, **kw)
        wall = fit(mon)
        points = mon.history.get("llc/mean")
        healthy = sum(not p.flags for p in points)
        last = points[-1].value if points else math.nan
        startup = "" if mon.worker_startup_s is None else f"; worker start {mon.worker_startup_s:.1f} s"
        print(f"  {label:32s} {wall:6.2f} s: {wall / baseline:.2f}x; {len(points)} estimates ({healthy} healthy), "
              f"{len(mon.skipped_steps)} skipped, last LLC {last:.2f}{startup}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", default=["accuracy", "speed", "monitor"],
                        choices=["accuracy", "speed", "monitor"])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--draws", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--device", default="cuda", help="'cpu' runs the same code without a GPU (a dry run)")
    args = parser.parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing measured")
        return
    print(f"torch {torch.__version__}, {device_name()}")
    if "accuracy" in args.parts:
        accuracy(range(args.seeds))
    if "speed" in args.parts:
        speed(args.draws, args.repeats)
    if "monitor" in args.parts:
        monitor(args.steps)


if __name__ == "__main__":
    main()
