"""Stage detection on a suite of shapes and noises: precision, recall, exactly-k rate, onset error,
confirmation delay and false alarms, with each series replayed point by point as in training.

    python benchmarks/bench_stages.py [--seeds 100] [--detector plateau|binseg|turning] [--noise-model auto|split|variogram|residual]
    python benchmarks/bench_stages.py --known-noise [...]   # the plateau tracker told the true noise level
    python benchmarks/bench_stages.py --noise-spread [--seeds 100]   # how the noise estimate wanders over refits

Shapes (100 points unless said; ``A`` is the amplitude of a rise, the noise has marginal sd 1):

* ``step``: 0 -> A at point 50;
* ``rise-w`` / ``fall-w``: a logistic rise (fall) of 10-90% width ``w`` points centred at 50;
* ``stairs-2`` / ``stairs-3``: 2 rises of width 6 centred at 33, 67; 3 rises at 30, 75, 120 (150 points);
* ``rise-fall``: a rise (width 8, centre 35) then a fall to 0.3 A (width 8, centre 70): the grokking shape;
* ``ramp``: a steady ramp 0 -> A over all points (no plateau: expected 0 transitions, one long stage);
* ``plateau-ramp``: flat up to point 40, then a steady ramp to A (expected 1 transition at 40);
* ``flat``: noise only (expected 0).

Real series (replayed with their reported standard errors, flagged points skipped):
``benchmarks/data/dln_llc.json`` (the deep linear network example, two known rises),
``benchmarks/data/grokking_llc.json`` (the grokking example, one smooth decline from the LLC peak),
``benchmarks/data/superposition_llc.json`` (the toy model of superposition, seed 0, one rise while the first
features form; written by ``benchmarks/make_superposition_llc.py``),
``benchmarks/data/icl_llc.json`` (the in-context linear regression example, seeds 0-2, 60 draws every 20
steps, written by ``benchmarks/make_icl_llc.py``; the ground truth is the step where the ICL score reaches
half its final value) and, where present, ``benchmarks/data/icl_llc_defaults.json`` (the same at the
example's defaults, 40 draws every 20 steps).

The true onset of a logistic rise is its 10% point, ``centre - w / 2``. A detection is a hit when its
direction is right and its onset is within ``max(3, w / 2)`` points of a true onset (each truth is
matched once). Noise: AR(1) ``e[t] = phi e[t-1] + sqrt(1 - phi**2) u[t]``, ``u`` standard normal, so its
marginal sd is 1 for every ``phi``. Columns: ``exact``: share of series with exactly the true number of
transitions; ``any``: share with at least one (the false-alarm rate on ``flat``); ``onset err``: median
|detected - true onset| of the hits; ``delay``: median (p90) points from the true onset to the
confirmation.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from devinterp_lightning.stages.base import replay  # noqa: E402
from devinterp_lightning.stages.changepoints import ChangepointTracker  # noqa: E402
from devinterp_lightning.stages.events import Transition  # noqa: E402
from devinterp_lightning.stages.plateaus import PlateauTracker  # noqa: E402
from devinterp_lightning.stages.turning_points import TurningPointTracker  # noqa: E402

LOGIT_10_90 = 2.0 * np.log(9.0)  # a logistic of scale s goes from 10% to 90% over 2 ln 9 * s


@dataclass(frozen=True)
class Truth:
    onset: float
    direction: str
    margin: float


@dataclass(frozen=True)
class Shape:
    name: str
    n: int
    curve: Callable[[np.ndarray, float], np.ndarray]  # (t, amplitude) -> levels
    truths: tuple[Truth, ...]


def logistic(t: np.ndarray, centre: float, width: float) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-(t - centre) * LOGIT_10_90 / width))


def rise(centre: float, width: float, direction: str = "increase") -> Truth:
    return Truth(centre - width / 2.0, direction, max(3.0, width / 2.0))


def shapes() -> list[Shape]:
    out = [Shape("step", 100, lambda t, a: a * (t >= 50), (Truth(50, "increase", 3),))]
    for w in (3, 10, 20, 30):
        out.append(Shape(f"rise-{w}", 100, lambda t, a, w=w: a * logistic(t, 50, w), (rise(50, w),)))
    for w in (3, 10, 30):
        out.append(Shape(f"fall-{w}", 100, lambda t, a, w=w: a * (1 - logistic(t, 50, w)), (rise(50, w, "decrease"),)))
    out.append(Shape("stairs-2", 100, lambda t, a: a * (logistic(t, 33, 6) + logistic(t, 67, 6)),
                     (rise(33, 6), rise(67, 6))))
    out.append(Shape("stairs-3", 150, lambda t, a: a * (logistic(t, 30, 6) + logistic(t, 75, 6) + logistic(t, 120, 6)),
                     (rise(30, 6), rise(75, 6), rise(120, 6))))
    out.append(Shape("rise-fall", 100, lambda t, a: a * (logistic(t, 35, 8) - 0.7 * logistic(t, 70, 8)),
                     (rise(35, 8), rise(70, 8, "decrease"))))
    out.append(Shape("ramp", 100, lambda t, a: a * t / 99.0, ()))
    out.append(Shape("plateau-ramp", 100, lambda t, a: a * np.clip((t - 40) / 59.0, 0, None),
                     (Truth(40, "increase", 5),)))
    out.append(Shape("flat", 100, lambda t, a: 0.0 * t, ()))
    return out


def ar1(rng: np.random.Generator, n: int, phi: float) -> np.ndarray:
    u = rng.normal(size=n)
    e = np.empty(n)
    e[0] = u[0]
    c = np.sqrt(1 - phi**2)
    for i in range(1, n):
        e[i] = phi * e[i - 1] + c * u[i]
    return e


def series(shape: Shape, amplitude: float, phi: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng([seed, int(phi * 100), int(amplitude * 10), sum(map(ord, shape.name))])
    t = np.arange(shape.n, dtype=float)
    return shape.curve(t, amplitude) + ar1(rng, shape.n, phi)


def true_long_run_sd(phi: float) -> float:
    """Long-run standard deviation of the suite's AR(1) noise (marginal sd 1): ``sqrt((1 + phi) / (1 - phi))``."""
    return float(np.sqrt((1.0 + phi) / (1.0 - phi)))


def make_tracker(detector: str, **kw: Any) -> Any:
    if detector == "plateau":
        return PlateauTracker("x", **kw)
    if detector == "binseg":
        return ChangepointTracker("x", **kw)
    if detector == "turning":
        return TurningPointTracker("x", **kw)
    raise ValueError(detector)


def score(found: list[Transition], truths: tuple[Truth, ...]) -> tuple[int, int, list[float], list[int]]:
    """(hits, false detections, onset errors, delays) of one series (indices are steps here)."""
    used: set[int] = set()
    hits = fp = 0
    errs: list[float] = []
    delays: list[int] = []
    for t in found:
        best = None
        for k, tr in enumerate(truths):
            if k in used or tr.direction != t.direction:
                continue
            d = abs(t.changepoint_step - tr.onset)
            if d <= tr.margin and (best is None or d < best[1]):
                best = (k, d)
        if best is None:
            fp += 1
            continue
        used.add(best[0])
        hits += 1
        errs.append(best[1])
        delays.append(int(round(t.step - truths[best[0]].onset)))
    return hits, fp, errs, delays


def run_cell(shape: Shape, amplitude: float, phi: float, seeds: range, detector: str,
             **kw: Any) -> dict[str, Any]:
    hits = fps = exact = anyc = total_found = 0
    errs: list[float] = []
    delays: list[int] = []
    for s in seeds:
        x = series(shape, amplitude, phi, s)
        found = replay(make_tracker(detector, **kw), list(range(shape.n)), x)
        h, fp, e, d = score(found, shape.truths)
        hits += h
        fps += fp
        errs += e
        delays += d
        total_found += len(found)
        exact += len(found) == len(shape.truths)
        anyc += bool(found)
    n = len(seeds)
    truth_total = len(shape.truths) * n
    return {
        "shape": shape.name, "amplitude": amplitude, "phi": phi, "seeds": n,
        "precision": hits / total_found if total_found else float("nan"),
        "recall": hits / truth_total if truth_total else float("nan"),
        "exact": exact / n, "any": anyc / n, "per_series": total_found / n,
        "onset_err": float(np.median(errs)) if errs else float("nan"),
        "delay": float(np.median(delays)) if delays else float("nan"),
        "delay_p90": float(np.percentile(delays, 90)) if delays else float("nan"),
    }


def fmt(v: float, pct: bool = False) -> str:
    if v != v:  # nan
        return "-"
    return f"{100 * v:.0f}%" if pct else f"{v:.3g}"


def markdown(rows: list[dict[str, Any]]) -> str:
    head = ("| shape | A | phi | exact | any | per series | precision | recall | onset err | delay (p90) |\n"
            "|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        lines.append(
            f"| {r['shape']} | {r['amplitude']:g} | {r['phi']:g} | {fmt(r['exact'], True)} | {fmt(r['any'], True)} "
            f"| {r['per_series']:.2f} | {fmt(r['precision'])} | {fmt(r['recall'])} | {fmt(r['onset_err'])} "
            f"| {fmt(r['delay'])} ({fmt(r['delay_p90'])}) |"
        )
    return "\n".join(lines)


def dln_check(detector: str = "plateau", **kw: Any) -> dict[str, Any]:
    """The DLN example's healthy llc/mean series (benchmarks/data/dln_llc.json) against its known onsets."""
    return real_check("dln_llc.json", detector, **kw)


def replay_healthy(series: dict[str, Any], detector: str = "plateau", **kw: Any) -> Any:
    """A fresh tracker fed a recorded series (``steps``, ``values``, ``stderr``, ``flags``) point by
    point with its standard errors, flagged points skipped, as a StageDetector would."""
    keep = [i for i, f in enumerate(series["flags"]) if not f]
    steps = [series["steps"][i] for i in keep]
    values = [series["values"][i] for i in keep]
    stderrs = [series["stderr"][i] for i in keep]
    tracker = make_tracker(detector, **kw)
    for k in range(1, len(steps) + 1):
        tracker.update(steps[:k], values[:k], stderrs=stderrs[:k])
    return tracker


def real_check(name: str, detector: str = "plateau", **kw: Any) -> dict[str, Any]:
    """A recorded example series (benchmarks/data/<name>: steps, values, stderr, flags, ground_truth) replayed
    point by point with its standard errors, flagged points skipped."""
    data = json.loads((ROOT / "benchmarks" / "data" / name).read_text())
    tracker = replay_healthy(data, detector, **kw)
    gt = data["ground_truth"]
    return {"found": [(t.changepoint_step, t.direction, t.step) for t in tracker.transitions],
            "truth": list(zip(gt["onsets"], gt["directions"], strict=True))}


def icl_check(detector: str = "plateau", name: str = "icl_llc.json", **kw: Any) -> list[dict[str, Any]]:
    """The in-context regression example's healthy llc/mean series (benchmarks/data/<name>, one run per
    seed, written by benchmarks/make_icl_llc.py) against its ICL milestone: the step where the ICL score
    first reaches half its final value."""
    data = json.loads((ROOT / "benchmarks" / "data" / name).read_text())
    out = []
    for run in data["runs"]:
        tracker = replay_healthy(run, detector, **kw)
        out.append({"seed": run["seed"], "icl_half": run["milestones"]["icl_half"],
                    "found": [(t.changepoint_step, t.direction, t.step) for t in tracker.transitions]})
    return out


def noise_spread(phis: list[float], seeds: range, cells: tuple[tuple[str, float], ...] = (("flat", 1.0), ("rise-10", 4.0)),
                 min_points: int = 70) -> list[dict[str, Any]]:
    """How far the split noise model's estimates wander, per series: over every refit from ``min_points``
    points on, the quantiles (0.5%, 5%, 50%, 95%) of the residual ``phi`` before the margin
    (``PlateauTracker.last_residual_noise``) and of the tests' level over the true long-run sd
    (``last_noise.long_run / sqrt((1 + phi) / (1 - phi))``)."""
    shape_of = {s.name: s for s in shapes()}
    rows = []
    for name, amplitude in cells:
        for phi in phis:
            raw: list[float] = []
            ratio: list[float] = []
            truth = true_long_run_sd(phi)
            for seed in seeds:
                x = series(shape_of[name], amplitude, phi, seed)
                tracker = PlateauTracker("x")
                for k in range(1, x.size + 1):
                    tracker.update(list(range(k)), x[:k])
                    if k >= min_points and tracker.last_residual_noise is not None and tracker.last_noise is not None:
                        raw.append(tracker.last_residual_noise.phi)
                        ratio.append(tracker.last_noise.long_run / truth)
            q = (0.5, 5, 50, 95)
            rows.append({"shape": name, "amplitude": amplitude, "phi": phi,
                         "phi_quantiles": np.percentile(raw, q).tolist(),
                         "level_quantiles": np.percentile(ratio, q).tolist()})
    return rows


def cost_per_update(lengths: tuple[int, ...] = (100, 300, 1000), repeats: int = 20) -> list[dict[str, Any]]:
    """Wall time of one ``update`` on a series of ``n`` points (noise plus a rise), for the plateau
    tracker (window ``max_points=300``) and the binseg tracker (window 1000), in the same process.
    Beyond the window the cost no longer grows with the length of the run."""
    rng = np.random.default_rng(0)
    rows = []
    for n in lengths:
        x = 8 * logistic(np.arange(n, dtype=float), n / 2, 10) + rng.normal(size=n)
        steps = list(range(n))
        row: dict[str, Any] = {"n": n}
        for name, tracker in (("plateau", PlateauTracker("x")), ("binseg", ChangepointTracker("x"))):
            tracker.update(steps[:-1], x[:-1])  # warm-up (imports, caches)
            t0 = time.perf_counter()
            for _ in range(repeats):
                tracker.update(steps, x)
            row[name] = (time.perf_counter() - t0) / repeats * 1e3
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=100)
    p.add_argument("--detector", default="plateau", choices=["plateau", "binseg", "turning"])
    p.add_argument("--amplitudes", type=float, nargs="+", default=[8.0, 4.0])
    p.add_argument("--phis", type=float, nargs="+", default=[0.0, 0.5, 0.8])
    p.add_argument("--shapes", nargs="+", default=None)
    p.add_argument("--noise-model", default="auto", choices=["auto", "split", "variogram", "residual"],
                   help="PlateauTracker(noise_model=...); auto: split for the synthetic shapes (no stderr), "
                        "variogram for the recorded series (with stderr)")
    p.add_argument("--known-noise", action="store_true",
                   help="give the plateau tracker the true long-run noise level of each row "
                        "(PlateauTracker(noise=sqrt((1 + phi) / (1 - phi)))): an oracle no real series has, "
                        "which shows what estimating the noise costs; the recorded series are skipped")
    p.add_argument("--noise-spread", action="store_true",
                   help="only measure how the split noise model's estimates spread over refits and seeds "
                        "(flat noise and 4 sd rises, at --phis)")
    p.add_argument("--json", default=None, help="also write the rows to this file")
    p.add_argument("--cost", action="store_true", help="only measure the time per update")
    args = p.parse_args(argv)
    if args.known_noise and args.detector != "plateau":
        p.error("--known-noise is an option of the plateau detector (--detector plateau)")
    if args.cost:
        print("| points | plateau (ms / update) | binseg (ms / update) |\n|---|---|---|")
        for r in cost_per_update():
            print(f"| {r['n']} | {r['plateau']:.1f} | {r['binseg']:.1f} |")
        return
    if args.noise_spread:
        print(f"Over the refits from 70 points on, {args.seeds} seeds per row: quantiles 0.5% / 5% / 50% / 95%\n"
              "| series | A | phi | residual phi (no margin) | tests' level / true long-run sd |\n|---|---|---|---|---|")
        for r in noise_spread(args.phis, range(args.seeds)):
            qs = (" / ".join(f"{v:.2f}" for v in r[key]) for key in ("phi_quantiles", "level_quantiles"))
            print(f"| {r['shape']} | {r['amplitude']:g} | {r['phi']:g} | {next(qs)} | {next(qs)} |")
        return
    kw: dict[str, Any] = {"noise_model": args.noise_model} if args.detector == "plateau" else {}
    rows = []
    t0 = time.perf_counter()
    for sh in shapes():
        if args.shapes and sh.name not in args.shapes:
            continue
        amps = [1.0] if sh.name == "flat" else args.amplitudes
        for a in amps:
            for phi in args.phis:
                known = {"noise": true_long_run_sd(phi)} if args.known_noise else {}
                rows.append(run_cell(sh, a, phi, range(args.seeds), args.detector, **kw, **known))
                print(markdown([rows[-1]]).splitlines()[-1], flush=True, file=sys.stderr)
    print(markdown(rows))
    oracle = ", told the true noise level" if args.known_noise else ""
    print(f"\n{args.detector}{oracle}, {args.seeds} seeds per row, {time.perf_counter() - t0:.0f} s")
    if args.detector != "turning" and not args.known_noise:
        print("DLN example:", dln_check(args.detector, **kw))
        print("grokking example:", real_check("grokking_llc.json", args.detector, **kw))
        print("superposition example:", real_check("superposition_llc.json", args.detector, **kw))
        for name in ("icl_llc.json", "icl_llc_defaults.json"):
            if not (ROOT / "benchmarks" / "data" / name).exists():
                continue
            for r in icl_check(args.detector, name, **kw):
                print(f"ICL example ({name}), seed {r['seed']}: ICL milestone (half) at step {r['icl_half']}; "
                      f"found (onset, direction, confirmed): {r['found']}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
