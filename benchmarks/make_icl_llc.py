"""Record the ``llc/mean`` series of the in-context linear regression example for a few seeds into
benchmarks/data/icl_llc.json (the real series that bench_stages.py replays).

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python benchmarks/make_icl_llc.py --seeds 0 1 2 -- --llc-every 20 --num-draws 60

Everything after ``--`` is passed to ``examples/in_context_linear_regression.py`` as it is (with
``--seed``, ``--quiet`` and a private ``--logdir`` added). The example's ``main`` does not return the
per-point standard errors, so the monitor it builds is captured
(``benchmarks/capture_monitor.py``) and its history is read directly; the example itself is not changed.

benchmarks/data/icl_llc.json keeps its own settings (the command above: 60 draws every 20 steps),
recorded before the example's defaults became 40 draws every 20 steps with a binseg detector and
before warm starts dropped the offsets of flagged estimates, so a rerun gives slightly different
values; its ``example_transitions`` are those of the plateau tracker the example used then.
``--seeds 0 1 2 --out benchmarks/data/icl_llc_defaults.json`` (nothing after ``--``) records the
default run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from capture_monitor import llc_points, run_capturing_monitor  # noqa: E402

import examples.in_context_linear_regression as icl  # noqa: E402


def run_seed(seed: int, example_args: list[str]) -> dict[str, Any]:
    result, monitor, seconds = run_capturing_monitor(icl, [*example_args, "--seed", str(seed), "--quiet"])
    curve = result["curve"]
    return {
        "seed": seed,
        "milestones": result["milestones"],
        "example_transitions": [(t["changepoint_step"], t["direction"]) for t in result["transitions"]],
        "seconds": round(seconds, 1),
        **llc_points(monitor),
        "icl_score": {"steps": [int(s) for s in curve["step"]], "values": curve["icl/score"]},
    }


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    example_args: list[str] = []
    if "--" in argv:
        k = argv.index("--")
        argv, example_args = argv[:k], argv[k + 1:]
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "data" / "icl_llc.json"))
    args = p.parse_args(argv)
    runs = []
    for s in args.seeds:
        runs.append(run_seed(s, example_args))
        r = runs[-1]
        print(f"seed {s}: {len(r['steps'])} points, milestones {r['milestones']}, "
              f"example transitions {r['example_transitions']}, {r['seconds']} s", flush=True)
    data = {
        "source": ("OMP_NUM_THREADS=1 PYTHONPATH=$PWD python benchmarks/make_icl_llc.py --seeds "
                   + " ".join(map(str, args.seeds)) + (" -- " + " ".join(example_args) if example_args else "")),
        "example_args": example_args,
        "runs": runs,
    }
    Path(args.out).write_text(json.dumps(data, indent=1))


if __name__ == "__main__":
    main()
