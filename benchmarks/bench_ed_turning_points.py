"""False alarms and recall of EssentialDynamics' turning points, fed as the callback feeds them.

Each series is a trajectory of ``n`` snapshots in ``R^64``. Snapshots go one at a time into an
``IncrementalPCA(rank=8)`` (the callback's default rank for 3 components) and, after each, the
whole trajectory on the current top-3 basis goes to a ``TrajectoryTurningTracker`` with the
callback's defaults (``smoothing=3``, ``min_angle_deg=45``, ``min_pairs=2``, ``min_snr=3``). What
is counted is what the callback would publish by the end of the run.

Noise (no development at all): stationary AR(1) noise ``x_t = phi x_{t-1} + e_t`` with
``phi in {0, 0.5, 0.8}`` (``phi = 0``: i.i.d.), and a Gaussian random walk (``phi = 1``, i.e.
diffusion with no drift). A series is a false alarm when anything is published.

Known turns: 3-segment polylines at constant speed (noise 0.02 per snapshot, ~one step length)
and stop-and-go trajectories (3 fast logistic transitions joined by plateaus, noise 0.002); see
tests/test_essential_dynamics.py. A turn is found when a published turning point is within
``tol`` snapshots of it (4 in time, 8 in arc length, whose turns on steady motion sit a few
snapshots early); other published points are false.

Noise is run twice: on the final trajectory only (``feed="final"``, 100 seeds, 100 and 200
snapshots; cheap) and fed as the callback feeds it (``feed="growing"``, 100 seeds of 100
snapshots; each series costs ~70 detections).

Run:  OMP_NUM_THREADS=1 python benchmarks/bench_ed_turning_points.py --out ed_tp.json
(a few minutes of CPU). ``--quick`` runs 10 seeds everywhere; ``--alpha none`` measures the
detector without its noise tests.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np

from devinterp_lightning.essential_dynamics import IncrementalPCA
from devinterp_lightning.stages.trajectory import TrajectoryTurningTracker

D = 64
K = 3
RANK = 8


def ar1_noise(seed: int, n: int, phi: float) -> np.ndarray:
    """Stationary AR(1) in R^D with unit marginal variance per coordinate; ``phi = 1`` is a random
    walk from 0 with unit increments."""
    rng = np.random.default_rng(seed)
    e = rng.standard_normal((n, D))
    if phi >= 1.0:
        return np.cumsum(e, axis=0)
    x = np.zeros((n, D))
    x[0] = e[0]
    scale = math.sqrt(1.0 - phi**2)
    for t in range(1, n):
        x[t] = phi * x[t - 1] + scale * e[t]
    return x


def polyline(seed: int, n: int = 200, noise: float = 0.02) -> tuple[np.ndarray, list[int]]:
    rng = np.random.default_rng(seed)
    dirs = rng.standard_normal((3, D))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    lengths = rng.uniform(0.6, 1.6, 3)
    dur = rng.uniform(0.6, 1.4, 3)
    bounds = np.concatenate([[0], np.round(np.cumsum(dur) / dur.sum() * (n - 1)).astype(int)])
    pts = np.zeros((n, D))
    pos = np.zeros(D)
    for s in range(3):
        a, b = bounds[s], bounds[s + 1]
        pts[a : b + 1] = pos + np.outer((np.arange(a, b + 1) - a) / (b - a), dirs[s] * lengths[s])
        pos = pts[b]
    return pts + noise * rng.standard_normal(pts.shape) / math.sqrt(D), [int(b) for b in bounds[1:-1]]


def stop_and_go(seed: int, n: int = 200, noise: float = 0.002, width: float = 1.5) -> tuple[np.ndarray, list[int]]:
    rng = np.random.default_rng(seed)
    dirs = rng.standard_normal((3, D))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    lengths = rng.uniform(0.6, 1.6, 3)
    centers = np.sort(rng.uniform(0.1, 0.9, 3)) * n
    while np.min(np.diff(centers)) < 30:
        centers = np.sort(rng.uniform(0.1, 0.9, 3)) * n
    progress = 1 / (1 + np.exp(-(np.arange(n)[:, None] - centers[None]) / width))
    pts = progress @ (dirs * lengths[:, None]) + noise * rng.standard_normal((n, D)) / math.sqrt(D)
    return pts, [int(round(c + 3 * width)) for c in centers[:-1]]


def published(points: np.ndarray, parameterization: str, **kw: float | None) -> list[int]:
    """Snapshot indices of every turning point the callback would publish on this trajectory
    (fed one snapshot at a time, the whole trajectory on the current basis each time)."""
    pca = IncrementalPCA(rank=RANK, max_snapshots=4000)
    tracker = TrajectoryTurningTracker(parameterization=parameterization, **kw)
    for i, x in enumerate(points):
        pca.add(x, i)
        tracker.update(pca.steps, pca.components(K)[0], now=i)
    return [t.changepoint_step for t in tracker.transitions]


def final(points: np.ndarray, parameterization: str, **kw: float | None) -> list[int]:
    """Snapshot indices of the turning points of the whole trajectory on its final basis, found once
    (what the last image shows; the callback, which looks at every basis on the way, publishes at
    least about as many)."""
    pca = IncrementalPCA(rank=RANK, max_snapshots=4000)
    for i, x in enumerate(points):
        pca.add(x, i)
    tracker = TrajectoryTurningTracker(parameterization=parameterization, **kw)
    tracker.update(pca.steps, pca.components(K)[0])
    return [t.changepoint_step for t in tracker.transitions]


def noise_row(phi: float, n: int, parameterization: str, seeds: int, feed: str = "growing",
              **kw: float | None) -> dict:
    run = published if feed == "growing" else final
    counts = [len(run(ar1_noise(s, n, phi), parameterization, **kw)) for s in range(seeds)]
    return {"phi": phi, "n": n, "parameterization": parameterization, "seeds": seeds, "feed": feed,
            "series_with_alarm": int(sum(c > 0 for c in counts)), "points": int(sum(counts)), **kw}


def recall_row(shape: str, parameterization: str, seeds: int, **kw: float | None) -> dict:
    make = {"polyline": polyline, "stop_and_go": stop_and_go}[shape]
    tol = 4 if parameterization == "time" else 8
    found = false = total = 0
    for s in range(seeds):
        pts, turns = make(s)
        on = published(pts, parameterization, **kw)
        found += sum(any(abs(o - t) <= tol for o in on) for t in turns)
        false += sum(not any(abs(o - t) <= tol for t in turns) for o in on)
        total += len(turns)
    return {"shape": shape, "parameterization": parameterization, "seeds": seeds, "tol": tol,
            "found": found, "turns": total, "false": false, **kw}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=100, help="noise series per row")
    ap.add_argument("--growing-seeds", type=int, default=100, help="noise series per row fed as the callback")
    ap.add_argument("--recall-seeds", type=int, default=30)
    ap.add_argument("--quick", action="store_true", help="10 seeds everywhere")
    ap.add_argument("--alpha", default="0.01", help="level of the noise tests, or 'none' (no tests)")
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    args = ap.parse_args()
    if args.quick:
        args.seeds = args.growing_seeds = args.recall_seeds = 10
    kw = {"alpha": None if args.alpha == "none" else float(args.alpha)}
    rows: list[dict] = []
    t0 = time.perf_counter()

    def show(r: dict) -> None:
        rows.append(r)
        if "phi" in r:
            print(f"noise phi={r['phi']} n={r['n']} {r['parameterization']} {r['feed']}: "
                  f"{r['series_with_alarm']}/{r['seeds']} series with an alarm, {r['points']} points", end="")
        else:
            print(f"{r['shape']} {r['parameterization']}: {r['found']}/{r['turns']} turns within {r['tol']}, "
                  f"{r['false']} false", end="")
        print(f"  [{time.perf_counter() - t0:.0f}s]", flush=True)

    for param in ("arclength", "time"):
        for phi in (0.0, 0.5, 0.8, 1.0):
            for n in (100, 200):
                show(noise_row(phi, n, param, args.seeds, "final", **kw))
    for param in ("arclength", "time"):
        for phi in (0.0, 0.5, 0.8, 1.0):
            show(noise_row(phi, 100, param, args.growing_seeds, "growing", **kw))
    for param in ("arclength", "time"):
        for shape in ("polyline", "stop_and_go"):
            show(recall_row(shape, param, args.recall_seeds, **kw))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
