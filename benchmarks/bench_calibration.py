"""Cost of calibrate_llc relative to one estimate with the settings it recommends, and the error of
that estimate against Aoyagi's learning coefficient, on deep linear networks at their teacher.

    python benchmarks/bench_calibration.py [--seeds 3] [--burnin 300] [--draws 300]

Both are timed in the same process after a warm-up (the first vmap call imports torch's
compiler stack, seconds that neither should be charged for). The machine may be shared: the
ratio of the two wall times is the figure to read, not the absolute seconds.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from test_calibrate import DLN_CASES, half_sse, teacher_dln  # noqa: E402

from devinterp_lightning import theory  # noqa: E402
from devinterp_lightning.sampling.calibrate import calibrate_llc  # noqa: E402
from devinterp_lightning.sampling.estimator import estimate_llc  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--burnin", type=int, default=300)
    parser.add_argument("--draws", type=int, default=300)
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore", RuntimeWarning)

    warm, data = teacher_dln([3, 3], 1, num_samples=256)
    estimate_llc(warm, half_sse, DataLoader(data, batch_size=64), lr=1e-3, localization=1.0,
                 num_chains=2, num_draws=5)

    print(f"{'widths':>14} {'r':>2} {'seed':>4} {'lambda':>7} {'llc':>8} {'error':>7} {'ok':>5} "
          f"{'trials':>6} {'cal s':>6} {'est s':>6} {'ratio':>6}")
    ratios, errors = [], []
    for widths, rank in DLN_CASES:
        expected = theory.deep_linear_network(widths, rank)
        for seed in range(args.seeds):
            model, data = teacher_dln(widths, rank, seed=seed)
            loader = DataLoader(data, batch_size=256, shuffle=True)
            t0 = time.perf_counter()
            cal = calibrate_llc(model, half_sse, loader, num_draws=args.draws, num_burnin_steps=args.burnin, seed=seed)
            t1 = time.perf_counter()
            res = estimate_llc(model, half_sse, loader, num_chains=4, seed=100 + seed, **cal.as_kwargs())
            t2 = time.perf_counter()
            ratio = (t1 - t0) / (t2 - t1)
            error = (res.mean - expected) / expected
            ratios.append(ratio)
            errors.append(error)
            trials = sum(t.estimate is not None for t in cal.trials)
            print(f"{str(widths):>14} {rank:>2} {seed:>4} {expected:>7.2f} {res.mean:>8.3f} {error:>+7.1%} "
                  f"{cal.ok!s:>5} {trials:>6} {t1 - t0:>6.2f} {t2 - t1:>6.2f} {ratio:>6.2f}", flush=True)
    print(f"max |error| {max(abs(e) for e in errors):.1%}; cost ratio median "
          f"{sorted(ratios)[len(ratios) // 2]:.2f}, range {min(ratios):.2f}-{max(ratios):.2f}")


if __name__ == "__main__":
    main()
