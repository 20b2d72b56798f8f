"""Regenerate the pictures in docs/img/ from a real run of the main demo.

    python docs/scripts/make_figures.py [--logdir runs/docs-figures] [--reuse]

Runs ``examples/deep_linear_network.py`` (unless ``--reuse`` and the log directory already holds a
run), then copies the images the callbacks wrote to TensorBoard (the StageDetector's stage curve
and the EssentialDynamics trajectory, as they appear in TensorBoard's IMAGES tab) into docs/img/.
Nothing is drawn by hand: every picture is read back from the run's event files.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
IMAGES = {"stages/llc/mean/curve": "tensorboard_stages.png", "ed/trajectory": "tensorboard_trajectory.png"}


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--logdir", default=str(ROOT / "runs" / "docs-figures"))
    parser.add_argument("--reuse", action="store_true", help="use an existing run in --logdir")
    parser.add_argument("--output", default=str(ROOT / "docs" / "img"))
    args = parser.parse_args(argv)
    logdir, output = Path(args.logdir), Path(args.output)
    if not (args.reuse and list(logdir.glob("events.out.tfevents.*"))):
        sys.path.insert(0, str(ROOT))
        from examples.deep_linear_network import main as run_demo

        run_demo(["--logdir", str(logdir), "--quiet", "--no-final-llc"])
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(logdir), size_guidance={"images": 0})
    events.Reload()
    output.mkdir(parents=True, exist_ok=True)
    written = []
    for tag, name in IMAGES.items():
        if tag not in events.Tags()["images"]:
            raise SystemExit(f"the run in {logdir} has no image {tag!r}; run without --reuse")
        last = events.Images(tag)[-1]  # the end-of-training refresh
        path = output / name
        path.write_bytes(last.encoded_image_string)
        written.append(path)
        print(f"wrote {path} (tag {tag}, step {last.step})")
    return written


if __name__ == "__main__":
    main()
