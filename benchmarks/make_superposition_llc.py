"""Record the ``llc/mean`` series of the toy model of superposition example into
benchmarks/data/superposition_llc.json (a real series that bench_stages.py replays).

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python benchmarks/make_superposition_llc.py --seed 0

The example runs at its default settings. Ground truth: the LLC steps up once while the first
features form (docs/examples.md: from ~0.9 on the plateau at the origin to ~1.75 with 3-4
features); the onset is taken as the first change of the represented-feature count (columns of
``W`` with norm above 0.5), and the tolerance covers the rest of that burst of feature growth
(up to the third feature), since the count's threshold is arbitrary and the LLC follows the
columns' norms, not the count.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from capture_monitor import llc_points, run_capturing_monitor  # noqa: E402

import examples.superposition as tms  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "data" / "superposition_llc.json"))
    args = p.parse_args(argv)
    result, monitor, seconds = run_capturing_monitor(tms, ["--seed", str(args.seed), "--quiet"])
    changes = result["count_changes"]
    first = changes[0]["step"]
    third = next((c["step"] for c in changes if c["after"] >= 3), first)
    data = {
        "source": f"OMP_NUM_THREADS=1 PYTHONPATH=$PWD python benchmarks/make_superposition_llc.py --seed {args.seed}",
        "ground_truth": {
            "note": (f"first represented feature at step {first}, the third at {third}; the LLC steps up once "
                     "while the first features form (one increase)"),
            "onsets": [first], "directions": ["increase"], "tolerance_steps": max(third - first, 50) + 50,
        },
        "count_changes": changes,
        "example_transitions": [(t["changepoint_step"], t["direction"]) for t in result["transitions"]],
        "seconds": round(seconds, 1),
        **llc_points(monitor),
    }
    Path(args.out).write_text(json.dumps(data, indent=1))
    print(f"{len(data['steps'])} points, feature-count changes {changes}, example transitions "
          f"{data['example_transitions']}, {seconds:.0f} s")


if __name__ == "__main__":
    main()
