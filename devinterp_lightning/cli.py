"""Command line: ``devinterp-lightning report LOGDIR [--output PATH] [--quiet]``.

Options are spelled out in full: ``allow_abbrev=False``, so ``--out`` is an error rather than a
silent abbreviation of ``--output``.

Also runs as ``python -m devinterp_lightning.cli``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from devinterp_lightning import __version__


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="devinterp-lightning",
        allow_abbrev=False,
        description="Tools for runs monitored with devinterp-lightning (LLC, stages, essential dynamics).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    rep = sub.add_parser(
        "report",
        allow_abbrev=False,
        help="write a self-contained HTML report of a run's TensorBoard logs",
        description="Read the TensorBoard event files under LOGDIR and write an HTML page (figures embedded) "
        "with the loss, LLC and restricted-LLC curves, stages and transitions, and the essential-dynamics trajectory.",
    )
    rep.add_argument(
        "logdir",
        metavar="LOGDIR",
        help="directory holding the run's events.out.tfevents.* files (searched recursively)",
    )
    rep.add_argument(
        "-o",
        "--output",
        metavar="PATH",
        default=None,
        help="a path ending in .html: write that one self-contained page; anything else (an existing or new "
        "directory, with or without a trailing /): write PATH/index.html plus PATH/figures/*.png "
        "(default: LOGDIR/report.html)",
    )
    rep.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    return parser


class _ProgressPrinter:
    """Progress on stderr: a rewritten line on a terminal, a few plain lines otherwise."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self.last = 0.0
        self.last_pct = -1
        self.finished: set[str] = set()

    def __call__(self, run: str, done: int, total: int) -> None:
        pct = 100 if total == 0 else int(100 * done / total)
        if run in self.finished:
            return
        now = time.monotonic()
        if pct != 100 and (now - self.last < 0.2 or pct == self.last_pct):
            return
        if not self.tty and pct != 100 and pct // 25 == self.last_pct // 25:
            return
        self.last, self.last_pct = now, pct
        msg = f"reading {run}: {pct:3d}% ({done / 1e6:.1f}/{total / 1e6:.1f} MB)"
        if self.tty:
            sys.stderr.write("\r" + msg + ("\n" if pct == 100 else ""))
        else:
            sys.stderr.write(msg + "\n")
        sys.stderr.flush()
        if pct == 100:
            self.last_pct = -1
            self.finished.add(run)


def _report(args: argparse.Namespace) -> int:
    from devinterp_lightning.report import ReportError, write_report

    try:
        path = write_report(args.logdir, args.output, progress=None if args.quiet else _ProgressPrinter())
    except ReportError as err:
        print(f"devinterp-lightning report: error: {err}", file=sys.stderr)
        return 1
    except OSError as err:
        print(f"devinterp-lightning report: error: {err.strerror or err}: {err.filename}", file=sys.stderr)
        return 1
    if not args.quiet:
        print(f"wrote {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``devinterp-lightning`` script; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "report":
        return _report(args)
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
