"""Overhead of the README's training-script snippet: the same script with and without its callbacks.

Extracts the first ``python`` block of README.md that builds an ``LLCMonitor``, and runs it twice in
fresh processes, one torch thread each: as written, and with ``callbacks=[monitor, detector]``
replaced by ``callbacks=[]`` (the same data, model and trainer). Times ``trainer.fit`` alone and
prints the ratio, then the monitored run's own output (the table the README shows). Run from the
repository root, on an otherwise idle machine:

    OMP_NUM_THREADS=1 python benchmarks/bench_readme_snippet.py --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIT = "trainer.fit(TwoLayerLinear(), loader)"
TIMED = f"import time as _time; _t0 = _time.perf_counter(); {FIT}; print('FIT_SECONDS', _time.perf_counter() - _t0)"


def snippet() -> str:
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    source = next(b for b in blocks if "LLCMonitor(" in b and FIT in b)
    if "callbacks=[monitor, detector]" not in source:
        raise SystemExit("the README snippet no longer passes callbacks=[monitor, detector]; update this script")
    return source


def run(source: str) -> tuple[float, str]:
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "snippet.py"
        script.write_text("import torch\ntorch.set_num_threads(1)\n" + source.replace(FIT, TIMED))
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
        done = subprocess.run([sys.executable, str(script)], cwd=tmp, env=env, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"the snippet failed:\n{done.stderr[-3000:]}")
        out = done.stdout
    seconds = float(re.search(r"FIT_SECONDS ([0-9.]+)", out).group(1))
    return seconds, "\n".join(line for line in out.splitlines() if not line.startswith("FIT_SECONDS"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    source = snippet()
    bare = source.replace("callbacks=[monitor, detector]", "callbacks=[]")
    bare = bare[: bare.index(FIT) + len(FIT)] + "\n"  # nothing after fit reads the callbacks
    output = ""
    for _ in range(args.repeats):
        without, _ = run(bare)
        with_, output = run(source)
        print(json.dumps({"without_s": round(without, 2), "with_s": round(with_, 2),
                          "overhead": round(with_ / without, 3), "load_avg_1min": round(os.getloadavg()[0], 2)}),
              flush=True)
    print(output)


if __name__ == "__main__":
    main()
