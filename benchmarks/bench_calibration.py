"""Accuracy and cost of calibrate_llc: calibrate, then one estimate with the recommended settings
(no hand-set SGLD setting), against the theoretical learning coefficient, on the validation suite.

    python benchmarks/bench_calibration.py [--seeds 3] [--burnin 300] [--draws 300] [--chains 4]
        [--only SUBSTRING]

Cases (``suite_cases`` in tests/test_calibrate.py): the noise-free regular model and deep linear
networks at their teacher, and the noisy cases of tests/noisy_cases.py (label noise sigma = 1 at
the exact least-squares / reduced-rank minimiser). The estimate uses seed 100 + seed, an
independent run from the calibration's trial estimates.

The cost figure is the wall time of ``calibrate_llc`` over that of the one estimate that follows,
timed in the same process after a warm-up (the first vmap call imports torch's compiler stack,
seconds that neither should be charged for); the machine may be shared, so read the ratio, not
the seconds. ``steps`` is the calibration's own count of chain-steps over the estimate's, which
load cannot distort. ``burn-in`` and ``thin`` are the recommended layout (the relaxation rule of
``calibrate_llc`` raises both); ``rhat`` and ``flags`` are the follow-up estimate's.
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

from test_calibrate import half_sse, suite_cases, teacher_dln  # noqa: E402

from devinterp_lightning.sampling.calibrate import calibrate_llc  # noqa: E402
from devinterp_lightning.sampling.estimator import estimate_llc  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--burnin", type=int, default=300)
    parser.add_argument("--draws", type=int, default=300)
    parser.add_argument("--chains", type=int, default=4, help="chains of the estimate that follows")
    parser.add_argument("--only", default="", help="run only the cases whose name contains this")
    parser.add_argument("--rel-tol", type=float, default=None, help="calibrate_llc's rel_tol (default: its own)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore", RuntimeWarning)

    warm, data = teacher_dln([3, 3], 1, num_samples=256)
    estimate_llc(warm, half_sse, DataLoader(data, batch_size=64), lr=1e-3, localization=1.0,
                 num_chains=2, num_draws=5)

    print(f"{'case':>28} {'seed':>4} {'lambda':>7} {'llc':>8} {'error':>7} {'stderr':>7} {'ok':>5} "
          f"{'trials':>6} {'lr*stiff':>8} {'burn-in':>7} {'thin':>4} {'rhat':>6} {'steps':>6} {'time':>6}  flags",
          flush=True)
    ratios, step_ratios, errors = [], [], []
    for seed in range(args.seeds):
        for name, (model, loss_fn, loader, expected) in suite_cases(seed).items():
            if args.only not in name:
                continue
            t0 = time.perf_counter()
            extra = {} if args.rel_tol is None else {"rel_tol": args.rel_tol}
            cal = calibrate_llc(model, loss_fn, loader, num_draws=args.draws, num_burnin_steps=args.burnin,
                                seed=seed, **extra)
            t1 = time.perf_counter()
            res = estimate_llc(model, loss_fn, loader, num_chains=args.chains, seed=100 + seed, **cal.as_kwargs())
            t2 = time.perf_counter()
            ratio = (t1 - t0) / (t2 - t1)
            steps = cal.num_steps / (cal.settings(num_chains=args.chains).total_steps * args.chains / 4)
            error = (res.mean - expected) / expected
            ratios.append(ratio)
            step_ratios.append(steps)
            errors.append(error)
            trials = sum(t.estimate is not None for t in cal.trials)
            stiff = cal.lr * (cal.nbeta * cal.curvature + cal.localization)
            print(f"{name:>28} {seed:>4} {expected:>7.2f} {res.mean:>8.3f} {error:>+7.1%} "
                  f"{res.stderr / expected:>7.1%} {cal.ok!s:>5} {trials:>6} {stiff:>8.3g} {cal.num_burnin_steps:>7} "
                  f"{cal.num_steps_bw_draws:>4} {res.rhat:>6.3f} {steps:>6.2f} {ratio:>6.2f}  {','.join(res.flags)}",
                  flush=True)
    def med(xs: list[float]) -> float:
        return sorted(xs)[len(xs) // 2]

    within = sum(abs(e) <= 0.15 for e in errors)
    print(f"{within} of {len(errors)} within 15%; max |error| {max(abs(e) for e in errors):.1%}; cost (wall time) median {med(ratios):.2f}x, "
          f"range {min(ratios):.2f}-{max(ratios):.2f}x; chain-steps median {med(step_ratios):.2f}x, "
          f"range {min(step_ratios):.2f}-{max(step_ratios):.2f}x")


if __name__ == "__main__":
    main()
