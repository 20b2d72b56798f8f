"""Render the run report in headless Chromium to a PNG (docs/img/report.png).

    python docs/scripts/screenshot_report.py [--logdir runs/report-screenshot] [--reuse] [--output PNG]

Trains the small deep-linear-network run of ``docs/scripts/report_demo.py`` (unless ``--reuse`` and
the log directory already holds a run), writes its report with ``devinterp-lightning report``, and
has Chromium (``apt-get install chromium``) take a screenshot of the page as a browser shows it.
Exits with status 3 and a message when no Chromium is installed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
NO_BROWSER = 3


def find_browser() -> str | None:
    """The first Chromium-like browser on PATH, or None."""
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    return None


def screenshot(page: Path, png: Path, size: tuple[int, int] = (1200, 3600), browser: str | None = None) -> Path:
    """Render ``page`` (an HTML file) in headless Chromium at ``size`` (CSS pixels) into ``png``."""
    browser = browser or find_browser()
    if browser is None:
        raise FileNotFoundError(f"no Chromium on PATH (tried {', '.join(BROWSERS)}); install it with "
                                "`apt-get install chromium`")
    png.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as profile:  # a fresh profile: no first-run state, no locks
        cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
               "--force-device-scale-factor=1", f"--user-data-dir={profile}", f"--window-size={size[0]},{size[1]}",
               f"--screenshot={png}", page.resolve().as_uri()]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0 or not png.exists():
        raise RuntimeError(f"Chromium failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
    return png


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("--logdir", default=str(ROOT / "runs" / "report-screenshot"))
    parser.add_argument("--reuse", action="store_true", help="use an existing run in --logdir")
    parser.add_argument("--max-steps", type=int, default=300)
    parser.add_argument("--output", default=str(ROOT / "docs" / "img" / "report.png"))
    parser.add_argument("--window-size", default="1200,3600", help="WIDTH,HEIGHT in CSS pixels")
    args = parser.parse_args(argv)
    browser = find_browser()
    if browser is None:
        print(f"screenshot_report: no Chromium on PATH (tried {', '.join(BROWSERS)}); "
              "install it with `apt-get install chromium`", file=sys.stderr)
        return NO_BROWSER
    logdir = Path(args.logdir)
    if not (args.reuse and list(logdir.glob("events.out.tfevents.*"))):
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from report_demo import run

        os.environ.setdefault("OMP_NUM_THREADS", "1")
        run(logdir, max_steps=args.max_steps)
    from devinterp_lightning.report import write_report

    page = write_report(logdir, logdir / "report.html")
    width, height = (int(v) for v in args.window_size.split(","))
    png = screenshot(page, Path(args.output), (width, height), browser)
    print(f"wrote {png} from {page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
