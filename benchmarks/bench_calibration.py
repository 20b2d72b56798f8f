"""Accuracy and cost of calibrate_llc: calibrate, then one estimate with the recommended settings
(no hand-set SGLD setting), against the theoretical learning coefficient, on the validation suite.

    python benchmarks/bench_calibration.py [--seeds 3] [--burnin 300] [--draws 300] [--chains 4]
        [--only SUBSTRING] [--loc-scan 0.5,1,2,3,4 [--scan-chains 8]] [--richardson [--scan-chains 8]]
        [--nbeta-scan 1,4,10 [--fixed-localization]]

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

``--loc-scan K1,K2,..`` measures how the estimate moves with the localization instead: after each
calibration, one estimate per ``k`` at the calibrated ``lr`` and ``nbeta`` with localization ``k`` times
the calibrated one, its own relaxation layout (burn-in ``2 / (lr * (k * localization + softest))``
steps, at least the caller's, at most 10,000, draws spread over as many; ``softest`` is the saddle
term the calibration found, from ``relaxation_steps``), ``--scan-chains`` chains, seed 100 + seed.
The column ``k1 vs 2`` is what a localization consistency check inside the calibration would see:
the calibration's own trial at the chosen lr (4 chains, its seed) against a trial at twice the
localization with the same seed and layout rule, judged like the bias check (they agree when the gap
is at most the paired standard error of the difference plus 5% of the estimate at 2x). ``move`` is
the variant that moves to the larger localization while the pair disagrees (``_move_rule``), with
the error of the estimate that follows (``--chains`` chains, seed 100 + seed, as in the main table).

``--richardson`` asks how much of each run's error is step-size bias: after each calibration, one
estimate at the calibrated settings and one at half the ``lr`` (burn-in and spacing doubled, so the
same relaxation), ``--scan-chains`` chains each, seed 100 + seed, and per chain the Richardson
extrapolation to ``lr -> 0``, ``2 llc(lr / 2) - llc(lr)``, which removes a bias linear in ``lr`` (the
leading term of SGLD's discretisation bias). Its standard error comes from the per-chain values.

``--nbeta-scan K1,K2,..`` asks whether a larger ``nbeta`` (a lower temperature, nearer the asymptotic
regime where the estimate tends to lambda) would reach lambda: per run, a calibration at ``k`` times the
default ``nbeta`` (``k = 1``: the usual one), then one estimate with its recommended settings
(``--chains`` chains, seed 100 + seed). The localization is the calibration's automatic
``0.01 * nbeta * h``, which grows with ``nbeta``, or with ``--fixed-localization`` the one the ``k = 1``
calibration chose, so that only ``nbeta`` moves.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from test_calibrate import half_sse, suite_cases, teacher_dln  # noqa: E402

from devinterp_lightning.sampling.calibrate import (  # noqa: E402
    MAX_BURNIN_STEPS,
    RELAXATION_EFOLDS,
    calibrate_llc,
)
from devinterp_lightning.sampling.estimator import estimate_llc  # noqa: E402
from devinterp_lightning.sampling.settings import SGLDSettings  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--burnin", type=int, default=300)
    parser.add_argument("--draws", type=int, default=300)
    parser.add_argument("--chains", type=int, default=4, help="chains of the estimate that follows")
    parser.add_argument("--only", default="", help="run only the cases whose name contains this")
    parser.add_argument("--rel-tol", type=float, default=None, help="calibrate_llc's rel_tol (default: its own)")
    parser.add_argument("--loc-scan", default="", help="comma-separated multiples of the calibrated localization")
    parser.add_argument("--scan-chains", type=int, default=8, help="chains of each --loc-scan / --richardson estimate")
    parser.add_argument("--richardson", action="store_true",
                        help="estimates at the calibrated lr and at lr/2, and their extrapolation to lr -> 0")
    parser.add_argument("--nbeta-scan", default="", help="comma-separated multiples of the default nbeta")
    parser.add_argument("--fixed-localization", action="store_true",
                        help="with --nbeta-scan: keep the localization the k = 1 calibration chose")
    args = parser.parse_args()
    if args.fixed_localization and not args.nbeta_scan:
        parser.error("--fixed-localization needs --nbeta-scan")
    torch.set_num_threads(1)
    warnings.simplefilter("ignore", RuntimeWarning)

    warm, data = teacher_dln([3, 3], 1, num_samples=256)
    estimate_llc(warm, half_sse, DataLoader(data, batch_size=64), lr=1e-3, localization=1.0,
                 num_chains=2, num_draws=5)

    if args.loc_scan:
        localization_scan(args, [float(k) for k in args.loc_scan.split(",")])
        return
    if args.richardson:
        richardson(args)
        return
    if args.nbeta_scan:
        nbeta_scan(args, [float(k) for k in args.nbeta_scan.split(",")])
        return
    print(f"{'case':>28} {'seed':>4} {'lambda':>7} {'llc':>8} {'error':>7} {'stderr':>7} {'ok':>5} "
          f"{'trials':>6} {'lr*stiff':>8} {'burn-in':>7} {'thin':>4} {'rhat':>6} {'steps':>6} {'time':>6}  flags",
          flush=True)
    ratios, step_ratios, errors = [], [], []
    for seed, name, (model, loss_fn, loader, expected), cal, seconds in _calibrated_runs(args):
        t1 = time.perf_counter()
        res = estimate_llc(model, loss_fn, loader, num_chains=args.chains, seed=100 + seed, **cal.as_kwargs())
        ratio = seconds / (time.perf_counter() - t1)
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


def _rel_tol(args: argparse.Namespace) -> dict[str, float]:
    """``--rel-tol`` for calibrate_llc, or nothing (its own default)."""
    return {} if args.rel_tol is None else {"rel_tol": args.rel_tol}


def _calibrated_runs(args: argparse.Namespace) -> Iterator[tuple[int, str, tuple[Any, ...], Any, float]]:
    """The suite runs that ``--seeds`` and ``--only`` select, each calibrated with the bench's layout:
    ``(seed, name, (model, loss_fn, loader, lambda), calibration, seconds the calibration took)``."""
    for seed in range(args.seeds):
        for name, case in suite_cases(seed).items():
            if args.only not in name:
                continue
            model, loss_fn, loader, _ = case
            t0 = time.perf_counter()
            cal = _calibrate(model, loss_fn, loader, seed, args)
            yield seed, name, case, cal, time.perf_counter() - t0


def _calibrate(model, loss_fn, loader, seed: int, args: argparse.Namespace, **overrides: Any) -> Any:
    """calibrate_llc with the bench's layout (``--draws``, ``--burnin``, ``--rel-tol``) and ``seed``."""
    return calibrate_llc(model, loss_fn, loader, num_draws=args.draws, num_burnin_steps=args.burnin, seed=seed,
                         **_rel_tol(args), **overrides)


def _cell(mean: float, stderr: float, expected: float, flags: tuple[str, ...] = ()) -> str:
    return f"{mean / expected - 1:+.1%}±{stderr / expected:.1%}{'*' if flags else ''}"


def richardson(args: argparse.Namespace) -> None:
    """Relative error against lambda at the calibrated lr, at lr / 2, and extrapolated to lr -> 0."""
    print(f"{'case':>28} {'seed':>4} {'lambda':>7} {'lr*stiff':>8} {'at lr':>14} {'at lr/2':>14} {'lr -> 0':>14}",
          flush=True)
    for seed, name, (model, loss_fn, loader, expected), cal, _ in _calibrated_runs(args):
        at = cal.as_kwargs()
        half = dict(at, lr=at["lr"] / 2, num_burnin_steps=2 * at["num_burnin_steps"],
                    num_steps_bw_draws=2 * at["num_steps_bw_draws"])
        a, b = (estimate_llc(model, loss_fn, loader, num_chains=args.scan_chains, seed=100 + seed, **kw)
                for kw in (at, half))
        extrapolated = (2 * b.per_chain - a.per_chain).double()
        se = float(extrapolated.std()) / math.sqrt(len(extrapolated))
        stiff = cal.lr * (cal.nbeta * cal.curvature + cal.localization)
        print(f"{name:>28} {seed:>4} {expected:>7.2f} {stiff:>8.3g} {_cell(a.mean, a.stderr, expected, a.flags):>14} "
              f"{_cell(b.mean, b.stderr, expected, b.flags):>14} {_cell(float(extrapolated.mean()), se, expected):>14}",
              flush=True)
    print("cells: relative error against lambda ± stderr (relative to lambda; * = flagged); lr -> 0: per chain "
          "2 llc(lr/2) - llc(lr)")


def nbeta_scan(args: argparse.Namespace, ks: list[float]) -> None:
    """Relative error against lambda of a calibrated estimate at k x the default nbeta, per run."""
    print(f"{'case':>28} {'seed':>4} {'lambda':>7} " + " ".join(f"{'x' + format(k, 'g'):>21}" for k in ks), flush=True)
    for seed, name, (model, loss_fn, loader, expected), base, _ in _calibrated_runs(args):
        cells = []
        for k in ks:
            cal = base if k == 1 else _calibrate(
                model, loss_fn, loader, seed, args, nbeta=k * base.nbeta,
                localization=base.localization if args.fixed_localization else None)
            res = estimate_llc(model, loss_fn, loader, num_chains=args.chains, seed=100 + seed, **cal.as_kwargs())
            cells.append(f"{_cell(res.mean, res.stderr, expected, res.flags)}{'' if cal.ok else ' (!ok)'} "
                         f"{cal.localization:.3g}")
        print(f"{name:>28} {seed:>4} {expected:>7.2f} " + " ".join(f"{c:>21}" for c in cells), flush=True)
    print("cells: relative error of the calibrated estimate (± its stderr, relative to lambda; * = flagged; "
          "(!ok): the calibration was not ok), then the localization it used")


def _relaxed_layout(cal, localization: float, args: argparse.Namespace) -> dict[str, int]:
    """The relaxation rule of calibrate_llc at another localization (RELAXATION_EFOLDS e-folds, at most
    MAX_BURNIN_STEPS steps)."""
    softest = 1 / (cal.lr * cal.relaxation_steps) - cal.localization  # 0 unless the calibration saw a saddle
    span = RELAXATION_EFOLDS / (cal.lr * (localization + softest))
    burnin = int(min(max(args.burnin, math.ceil(span)), MAX_BURNIN_STEPS))
    thin = max(1, math.ceil((min(span, MAX_BURNIN_STEPS) - 1) / (args.draws - 1)))
    return {"num_draws": args.draws, "num_burnin_steps": burnin, "num_steps_bw_draws": thin}


def _paired_agree(a, b) -> bool:
    """|a - b| <= paired stderr of the difference (at least half the unpaired one) + 5% of |b|."""
    diff = (a.per_chain - b.per_chain).double()
    se = max(float(diff.std()) / math.sqrt(len(diff)), math.hypot(a.stderr, b.stderr) / 2)
    return abs(a.mean - b.mean) <= se + 0.05 * abs(b.mean)


def localization_scan(args: argparse.Namespace, ks: list[float]) -> None:
    """Relative error of the estimate against lambda at k x the calibrated localization, per run; then
    what the "move" rule (see :func:`_move_rule`) would return, estimated as the main table is."""
    print(f"{'case':>28} {'seed':>4} {'lambda':>7} {'loc':>6} {'lr*stiff':>8} "
          + " ".join(f"{'x' + format(k, 'g'):>14}" for k in ks)
          + f" {'k1 vs 2':>8} {'move':>5} {'error':>7} {'steps':>6} {'before':>6}", flush=True)
    for seed, name, (model, loss_fn, loader, expected), cal, _ in _calibrated_runs(args):
        cells = []
        for k in ks:
            loc = k * cal.localization
            res = estimate_llc(model, loss_fn, loader, lr=cal.lr, localization=loc, nbeta=cal.nbeta,
                               num_chains=args.scan_chains, seed=100 + seed, **_relaxed_layout(cal, loc, args))
            cells.append(_cell(res.mean, res.stderr, expected, res.flags))
        trials, extra, chosen = _move_rule(cal, model, loss_fn, loader, seed, args)
        verdict = "agree" if _paired_agree(trials[1], trials[2]) else "DIFFER"
        k = chosen or 1
        layout = _relaxed_layout(cal, k * cal.localization, args)
        res = estimate_llc(model, loss_fn, loader, lr=cal.lr, localization=k * cal.localization, nbeta=cal.nbeta,
                           num_chains=args.chains, seed=100 + seed, **layout)
        per_chain = SGLDSettings(lr=cal.lr, localization=k * cal.localization, **layout).total_steps
        before = cal.num_steps / cal.settings().total_steps
        stiff = cal.lr * (cal.nbeta * cal.curvature + cal.localization)
        print(f"{name:>28} {seed:>4} {expected:>7.2f} {cal.localization:>6.3g} {stiff:>8.3g} "
              + " ".join(f"{c:>14}" for c in cells)
              + f" {verdict:>8} {('x' + str(k)) if chosen else 'NOTOK':>5} {res.mean / expected - 1:>+7.1%} "
              f"{(cal.num_steps + extra) / per_chain:>6.2f} {before:>6.2f}", flush=True)
    print("cells: relative error of the estimate (± its stderr, relative to lambda; * = flagged). move: the "
          "localization multiple the move rule returns (NOTOK: none agreed); error: the estimate there (chains "
          "--chains, seed 100 + seed); steps: calibration plus the rule's trials over that estimate, in "
          "chain-steps per chain; before: the calibration alone over its own recommended estimate")


def _move_rule(cal, model, loss_fn, loader, seed: int, args: argparse.Namespace):
    """The localization "move" rule, measured and not adopted (docs/calibration.md): trials at the
    calibrated lr with 1, 2, 4, 8 x the localization (4 chains, the calibration's seed, relaxation
    layout; x1 is the calibration's own trial); the first pair (1, 2), (2, 4), (4, 8) that agrees
    (:func:`_paired_agree`) gives its smaller multiple, none: not ok. Returns the trials, their
    chain-steps per chain, and the multiple (None when not ok)."""
    trials, extra = {1: cal.estimate}, 0
    for a, b in [(1, 2), (2, 4), (4, 8)]:
        for k in (a, b):
            if k not in trials:
                layout = _relaxed_layout(cal, k * cal.localization, args)
                extra += SGLDSettings(lr=cal.lr, localization=k * cal.localization, **layout).total_steps
                trials[k] = estimate_llc(model, loss_fn, loader, lr=cal.lr, localization=k * cal.localization,
                                         nbeta=cal.nbeta, num_chains=cal.estimate.num_chains, seed=seed, **layout)
        if _paired_agree(trials[a], trials[b]):
            return trials, extra, a
    return trials, extra, None


if __name__ == "__main__":
    main()
