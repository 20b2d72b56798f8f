"""Detection quality against cost for LLCMonitor settings on the DLN example.

Runs ``examples/deep_linear_network.py`` (8-8-8-8 deep linear network, full batch, loss drops near
steps 200, 470 and 1150) with its own SGLD step size and localization, but with the schedule and
the chain layout of each configuration below, and prints per configuration and seed: the LLC
transitions the StageDetector confirmed, the onset error against the nearest loss drop (onset -
drop, in steps), the number of estimates, the SGLD steps spent, and the stderr of the plateau
estimates. Run from the repository root:

    OMP_NUM_THREADS=1 python benchmarks/bench_monitor_defaults.py --seeds 0 1 --configs all

``--grokking --seeds 0 1 2`` runs ``examples/grokking.py`` with cold and with warm-started chains.

``--variance 0 500 2000 --seeds 0 1 2 3 4 5 6 7`` instead measures, at snapshots of the overhead
benchmark's DLN, how the spread of an estimate over sampler seeds grows as the chains get shorter.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import examples.deep_linear_network as dln  # noqa: E402
from devinterp_lightning import LLCMonitor  # noqa: E402
from devinterp_lightning.callbacks.llc_monitor import WARM_START_BURNIN  # noqa: E402
from devinterp_lightning.schedule import LogSpaced  # noqa: E402

#: name -> (schedule or None for the example's every 40 steps, num_burnin_steps, num_draws,
#: warm_start: False or the burn-in of warm-started estimates)
CONFIGS: dict[str, tuple[Any, int, int, bool | int]] = {
    "example: every 40, 4x(50+200)": (None, 50, 200, False),
    "every 40, 4x(25+100)": (None, 25, 100, False),
    "LogSpaced 10/decade, 4x(50+200)": ("log10", 50, 200, False),
    "LogSpaced 10/decade, 4x(25+100)": ("log10", 25, 100, False),
    "LogSpaced 5/decade, 4x(25+100)": ("log5", 25, 100, False),
    "every 40, 4x(50+100)": (None, 50, 100, False),
    "every 40, 4x(50+100), warm 10": (None, 50, 100, 10),
    "LogSpaced 5/decade, 4x(50+100)": ("log5", 50, 100, False),
    "LogSpaced 5/decade, 4x(50+100), warm 10": ("log5", 50, 100, 10),
    "every 40, 4x(50+60), warm 10": (None, 50, 60, 10),
}
SCHEDULES = {"log10": lambda: LogSpaced(start=10, per_decade=10), "log5": lambda: LogSpaced(start=10, per_decade=5)}


def sgld_steps_per_chain(estimates: int, burnin: int, draws: int, warm: bool | int) -> int:
    """SGLD steps per chain over ``estimates`` estimates: the first with ``burnin``, every later one
    with the warm-start burn-in (``min(burnin, 10)`` for ``True``, ``min(burnin, warm)`` for an int)."""
    later = burnin if warm is False else min(burnin, WARM_START_BURNIN if warm is True else warm)
    return burnin + draws + (estimates - 1) * (later + draws) if estimates else 0


def run(name: str, seed: int, max_steps: int) -> dict[str, Any]:
    schedule, burnin, draws, warm = CONFIGS[name]
    counted: list[LLCMonitor] = []

    def monitor_factory(*args: Any, **kwargs: Any) -> LLCMonitor:
        if schedule is not None:
            kwargs["every_n_steps"] = SCHEDULES[schedule]()
        kwargs["num_burnin_steps"] = burnin
        kwargs["warm_start"] = warm
        monitor = LLCMonitor(*args, **kwargs)
        counted.append(monitor)
        return monitor

    dln.LLCMonitor = monitor_factory  # type: ignore[assignment]
    start = time.perf_counter()
    out = dln.main(["--quiet", "--no-final-llc", "--seed", str(seed), "--max-steps", str(max_steps),
                    "--num-draws", str(draws), "--logdir", f"/tmp/bench_defaults/{seed}"])
    wall = time.perf_counter() - start
    monitor = counted[-1]
    drops = [d["step"] for d in out["loss_drops"]]
    onsets = [t["changepoint_step"] for t in out["transitions"]]
    errors = [min((o - d for d in drops), key=abs) if drops else None for o in onsets]
    points = monitor.history["llc/mean"]
    return {
        "config": name, "seed": seed, "loss_drops": drops, "onsets": onsets, "onset_minus_drop": errors,
        "directions": [t["direction"] for t in out["transitions"]], "estimates": len(points),
        "sgld_steps_per_chain": sgld_steps_per_chain(len(points), burnin, draws, warm),
        "plateau_values": [round(p.value, 2) for p in points if not p.flags][-5:],
        "median_stderr": statistics.median(p.stderr for p in points if not p.flags) if any(
            not p.flags for p in points) else None,
        "flagged": sum(bool(p.flags) for p in points), "wall_s": wall,
    }


def run_grokking(warm: bool | int, seed: int, max_steps: int | None = None) -> dict[str, Any]:
    """``examples/grokking.py`` with its own schedule and layout (4 x (30 + 60)), chains warm-started
    or not: the transitions its detector confirms against the LLC peak, and the SGLD steps spent."""
    import examples.grokking as grokking

    counted: list[LLCMonitor] = []
    original = grokking.LLCMonitor

    def monitor_factory(*args: Any, **kwargs: Any) -> LLCMonitor:
        monitor = original(*args, **{**kwargs, "warm_start": warm})
        counted.append(monitor)
        return monitor

    grokking.LLCMonitor = monitor_factory  # type: ignore[assignment]
    try:
        start = time.perf_counter()
        steps = [] if max_steps is None else ["--max-steps", str(max_steps)]
        out = grokking.main(["--quiet", "--seed", str(seed), "--logdir", f"/tmp/bench_defaults/grokking{seed}", *steps])
        wall = time.perf_counter() - start
    finally:
        grokking.LLCMonitor = original  # type: ignore[assignment]
    monitor = counted[-1]
    points = monitor.history["llc/mean"]
    burnin, draws = monitor.num_burnin_steps, monitor.num_draws
    return {
        "example": "grokking", "warm_start": warm, "seed": seed, "llc_peak_step": out["llc_peak_step"],
        "transitions": [(t["monitor"], t["changepoint_step"], t["direction"]) for t in out["transitions"]],
        # per chain of one vectorized run (each distinct loader samples one such run)
        "estimates": len(points), "sgld_steps_per_chain": sgld_steps_per_chain(len(points), burnin, draws, warm),
        "flagged": sum(bool(p.flags) for p in points), "wall_s": round(wall, 1),
    }


def draws_variance(seeds: list[int], train_steps: list[int], init_scale: float = 0.3, lr: float = 1e-3,
                   warm: bool = False) -> None:
    """Spread of the estimate over sampler seeds against the chain layout, at snapshots of the DLN
    of ``examples/configs/dln.py`` (4x16, batch 64, probe = 512 held-out samples), SGLD ``lr``,
    localization 100. At init scale 0.3 it learns its teacher between steps ~400 and ~800.

    ``warm``: each measured estimate is the fourth of a warm-started sequence at the snapshot (a
    cold first estimate with the layout's burn-in, then estimates with 10 burn-in steps, as
    ``LLCMonitor(warm_start=True)`` takes them), instead of one cold estimate."""
    import lightning.pytorch as pl
    import torch

    from devinterp_lightning import estimate_llcs
    from devinterp_lightning.sampling.warm_start import ChainOffsets
    from examples.configs.dln import DeepLinearNetwork, probe_loader
    from examples.configs.losses import mse

    layouts = [(50, 200), (50, 100), (25, 75), (25, 50)] if not warm else [(50, 100), (50, 60), (50, 40)]
    for steps in train_steps:
        pl.seed_everything(0, verbose=False)
        model = DeepLinearNetwork(width=16, depth=4, rank=3, init_scale=init_scale, lr=0.05)
        if steps:
            pl.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                       enable_model_summary=False).fit(model)
        loader = probe_loader()
        for burnin, draws in layouts:
            means, stderrs, flagged = [], [], 0
            for seed in seeds:
                chains = ChainOffsets(burnin_steps=10) if warm else None
                for k in range(4 if warm else 1):
                    res = estimate_llcs(model, mse, {"llc": (loader, None)}, lr=lr, localization=100.0, num_chains=4,
                                        num_draws=draws, num_burnin_steps=burnin, seed=1000 * k + seed,
                                        warm_start=chains)["llc"]
                means.append(res.mean)
                stderrs.append(res.stderr)
                flagged += bool(res.flags)
            t = torch.tensor(means)
            layout = f"4x(10+{draws}) warm" if warm else f"4x({burnin}+{draws})"
            print(json.dumps({"init_scale": init_scale, "lr": lr, "train_steps": steps, "layout": layout, "mean": round(t.mean().item(), 3),
                              "sd_over_seeds": round(t.std().item(), 3),
                              "median_reported_stderr": round(statistics.median(stderrs), 3),
                              "flagged": flagged, "seeds": len(seeds)}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--configs", nargs="+", default=["all"], help="indices into CONFIGS or 'all'")
    parser.add_argument("--max-steps", type=int, default=None,
                        help="training steps (default: 1600 for the DLN example, the example's own for --grokking)")
    parser.add_argument("--out", default=None, help="append JSON lines here")
    parser.add_argument("--variance", type=int, nargs="*", default=None,
                        help="instead: the spread of the estimate over --seeds at these training steps")
    parser.add_argument("--warm", action="store_true", help="with --variance: warm-started estimates")
    parser.add_argument("--grokking", action="store_true",
                        help="instead: the grokking example with cold and warm-started chains, per --seeds")
    args = parser.parse_args()
    if args.grokking:
        for warm in (False, True):
            for seed in args.seeds:
                print(json.dumps(run_grokking(warm, seed, args.max_steps)), flush=True)
        return
    if args.variance is not None:
        draws_variance(args.seeds, args.variance, warm=args.warm)
        return
    names = list(CONFIGS) if args.configs == ["all"] else [list(CONFIGS)[int(i)] for i in args.configs]
    for name in names:
        for seed in args.seeds:
            row = run(name, seed, args.max_steps or 1600)
            print(json.dumps(row), flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
