"""The new user's walk, scripted: every command written in README.md and docs/*.md is run.

Commands are collected from the Markdown itself, so a command added to a page is picked up:

- every line of a ```bash / ```sh / ```shell / ```console block (``console``: the ``$ `` lines),
- lines of unlabelled fences and of indented code blocks, and inline `code` spans, that start
  with a program (``python``, ``pip``, ``tensorboard``, ``mkdocs``, ``devinterp-lightning``, ...:
  ``PROGRAMS``) or an executable path (``.ci/run``, ``./x.sh``),

split at ``&&``, ``||`` and ``;``, trailing ``# comments`` dropped. Each distinct command is one
test (its id is the command). ``COMMANDS`` says how each one is run and checked; a documented
command without an entry fails, and so does an entry whose command is no longer in the docs.

How commands run: in a temporary copy of the repository (what a fresh clone holds, without
``runs/``, ``lightning_logs/``, ``.git``), through ``bash`` as written, with the interpreter
running the tests first on ``PATH`` (so ``python``, ``pip``, ``tensorboard`` are this
environment's) and the copy first on ``PYTHONPATH``; one torch/BLAS thread; a timeout each.
Servers (``tensorboard``, ``mkdocs serve``) are started, probed on 127.0.0.1 until they answer,
then stopped. The few commands not run exactly as written say why in their entry (``why``).

The walk goes README -> examples -> TensorBoard -> report (``phase``). Commands that read a run
(``tensorboard --logdir runs/deep_linear_network``, ``devinterp-lightning report ...``) first
run the command that writes it; without ``--runslow`` the 1.5-minute demo is replaced there by a
200-step run of the same script into the same directory (``stand_in``), and the demo's own test
is skipped as slow.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

SHELL_LANGS = {"bash", "sh", "shell", "console", "zsh", "shell-session"}
PROGRAMS = {
    "python", "python3", "pip", "pip3", "pytest", "tensorboard", "mkdocs", "devinterp-lightning", "torchrun",
    "ruff", "bash", "sh", "git", "cd", "export", "apt", "apt-get", "chromium", "uv", "conda", "srun", "nohup",
    "lightning", "make", "docker",
}
#: what a walkthrough copy of the repository leaves out: git data, run outputs, caches, virtualenvs
COPY_IGNORE = shutil.ignore_patterns(".git", "runs", "lightning_logs", "ckpts", "site", "build", "dist",
                                     "__pycache__", "*.egg-info", ".pytest_cache", ".ruff_cache", ".venv*",
                                     ".devinterp-venv", "*.ckpt")


# ---------------------------------------------------------------- collecting commands from Markdown
@dataclasses.dataclass(frozen=True)
class Found:
    command: str
    where: str  # "README.md:24"


def _strip_comment(line: str) -> str:
    """Drop a shell ``# comment`` (a ``#`` at the start or after whitespace, outside quotes)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def _split_commands(line: str) -> list[str]:
    """Split a shell line at ``&&``, ``||`` and ``;`` outside quotes; whitespace collapsed."""
    parts, current, quote, i = [], "", None, 0
    while i < len(line):
        ch = line[i]
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif line.startswith(("&&", "||"), i) or ch == ";":
            parts.append(current)
            current, i = "", i + (1 if ch == ";" else 2)
            continue
        current += ch
        i += 1
    parts.append(current)
    return [" ".join(p.split()) for p in parts if p.strip()]


def _starts_with_program(text: str, *, inline: bool = False) -> bool:
    words = text.split()
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):  # FOO=1 python ...
        words = words[1:]
    if not words:
        return False
    first = words[0]
    if first.startswith(("./", ".ci/")) or first.endswith(".sh"):
        return True
    # inline, a lone `tensorboard` or `mkdocs` names the package, not a command
    return first in PROGRAMS and (len(words) > 1 or not inline)


def collect(paths: list[Path] = DOC_FILES) -> dict[str, list[str]]:
    """Every command written in ``paths``: ``{command: ["FILE:LINE", ...]}``, in document order."""
    found: list[Found] = []
    for path in paths:
        name = path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else path.name
        lines = path.read_text().splitlines()
        fence: str | None = None  # language of the open fence ("" when unlabelled)
        fence_marker = ""
        pending = ""  # a line continued with a trailing backslash
        prev_blank = True
        in_indented = False
        for number, raw in enumerate(lines, start=1):
            stripped = raw.strip()
            if fence is None and re.match(r"^\s*(```|~~~)", raw):
                fence_marker = stripped[:3]
                fence = stripped[3:].strip().split()[0].lower() if stripped[3:].strip() else ""
                continue
            if fence is not None:
                if stripped.startswith(fence_marker) and stripped.strip("`~") == "":
                    fence = None
                    continue
                text = raw
                if fence == "console":
                    if not stripped.startswith("$ ") and not pending:
                        continue
                    text = stripped[2:] if stripped.startswith("$ ") else stripped
                elif fence not in SHELL_LANGS:
                    if fence != "" or not (_starts_with_program(stripped) or pending):
                        continue
                text = _strip_comment(text).strip()
                if text.endswith("\\"):
                    pending += text[:-1] + " "
                    continue
                text, pending = pending + text, ""
                found += [Found(c, f"{name}:{number}") for c in _split_commands(text)]
                continue
            # indented code block: 4+ spaces after a blank line (or inside such a block)
            if raw.startswith("    ") and stripped and (prev_blank or in_indented):
                in_indented = True
                text = _strip_comment(stripped)
                if pending or _starts_with_program(text):
                    if text.endswith("\\"):
                        pending += text[:-1] + " "
                        continue
                    text, pending = pending + text, ""
                    found += [Found(c, f"{name}:{number}") for c in _split_commands(text)]
            else:
                in_indented = in_indented and not stripped == "" and raw.startswith("    ")
                for span in re.findall(r"(?<!`)`([^`\n]+)`(?!`)", raw):
                    if _starts_with_program(span.strip(), inline=True):
                        found += [Found(c, f"{name}:{number}") for c in _split_commands(_strip_comment(span))]
            prev_blank = stripped == ""
    commands: dict[str, list[str]] = {}
    for f in found:
        commands.setdefault(f.command, []).append(f.where)
    return commands


# ---------------------------------------------------------------- how each command is run
Check = Callable[["Walk", "Result"], None]


@dataclasses.dataclass(frozen=True)
class Entry:
    """How the walkthrough runs one documented command.

    how: "run" (through bash, must exit 0), "serve" (a server: started, probed, stopped) or
        "not-run" (``why`` says why; ``check`` verifies what can be verified instead).
    phase: the order of the walk (0 install, 1 README demo, 2 examples, 3 TensorBoard, 4 report,
        5 benchmarks and the rest).
    instead: the command line actually run, when it is not the one written (``why`` says why);
        ``{port}`` is replaced by a free port.
    needs: documented commands (keys of COMMANDS) whose output this one reads; run first.
    stand_in: for a slow command that others need: a quick command writing the same output,
        used for them when slow tests are not run.
    cwd: "copy" (the walkthrough's copy of the repository) or "root" (this checkout: pip installs).
    skip_unless: says why the command cannot run on this machine ("" when it can); the test is then
        skipped with that reason, never silently.
    """

    how: str = "run"
    phase: int = 5
    timeout: float = 120
    slow: bool = False
    instead: str | None = None
    why: str = ""
    needs: tuple[str, ...] = ()
    stand_in: str | None = None
    check: Check | None = None
    probe: str = "/"  # "serve": the path probed until it answers 200 with ``ready_text`` in the page
    ready_text: str = ""
    cwd: str = "copy"
    skip_unless: Callable[[], str] | None = None  # returns why this machine cannot run it, or ""


@dataclasses.dataclass
class Result:
    command: str  # the command line that ran
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float
    stand_in: bool = False
    body: str = ""  # "serve": the probed page


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Walk:
    """The walkthrough's state: its copy of the repository and the commands that ran in it."""

    def __init__(self, workspace: Path, runslow: bool) -> None:
        self.workspace = workspace
        self.runslow = runslow
        self.results: dict[str, Result] = {}
        self.lines: dict[tuple[str, str], Result] = {}
        bindir = str(Path(sys.executable).parent)
        self.env = {
            **os.environ,
            "PATH": bindir + os.pathsep + os.environ.get("PATH", ""),
            "PYTHONPATH": str(workspace),
            "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            "MPLBACKEND": "Agg",
            "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        }

    def cwd(self, entry: Entry) -> Path:
        return ROOT if entry.cwd == "root" else self.workspace

    def shell(self, command: str, entry: Entry, timeout: float | None = None) -> Result:
        """Run ``command`` through bash; a line already run in the same place is not run again."""
        if (command, entry.cwd) in self.lines:
            return self.lines[command, entry.cwd]
        start = time.monotonic()
        proc = subprocess.Popen(["bash", "-c", command], cwd=self.cwd(entry), env=self.env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        try:
            out, err = proc.communicate(timeout=timeout or entry.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the whole group: bash and what it started
            out, err = proc.communicate()
            pytest.fail(f"`{command}` did not finish within {timeout or entry.timeout:.0f} s\n"
                        f"{out[-2000:]}\n{err[-3000:]}")
        result = Result(command, proc.returncode, out, err, time.monotonic() - start)
        self.lines[command, entry.cwd] = result
        return result

    def serve(self, command: str, entry: Entry) -> Result:
        """Start a server, GET ``http://127.0.0.1:PORT{probe}`` until it answers 200, stop it."""
        port = _free_port()
        line = command.replace("{port}", str(port))
        start = time.monotonic()
        log = self.workspace.parent / f"server-{port}.log"  # a file, not a pipe nobody reads while probing
        with log.open("w") as sink:
            proc = subprocess.Popen(["bash", "-c", f"exec {line}"], cwd=self.cwd(entry), env=self.env,
                                    stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
        body, error = "", ""
        try:
            while time.monotonic() - start < entry.timeout and proc.poll() is None:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}{entry.probe}", timeout=5) as r:
                        page = r.read().decode("utf-8", "replace")
                        # TensorBoard answers before it has read the logs: wait for what the user looks for
                        if r.status == 200 and entry.ready_text in page:
                            body = page
                            break
                        error = f"HTTP {r.status}, {len(page)} characters without {entry.ready_text!r}"
                except OSError as exc:  # not listening yet
                    error = repr(exc)
                time.sleep(0.5)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            out = log.read_text(errors="replace")
        assert body, (f"`{line}` never answered on 127.0.0.1:{port}{entry.probe} within {entry.timeout:.0f} s "
                      f"(exit status {proc.returncode}; last error {error})\n{out[-3000:]}")
        return Result(line, 0, out, "", time.monotonic() - start, body=body)

    def run(self, key: str) -> Result:
        """Run the documented command ``key`` (once per session) after the commands it needs."""
        if key in self.results:
            return self.results[key]
        entry = COMMANDS[key]
        for need in entry.needs:
            self.prepare(need)
        if entry.how == "serve":
            result = self.serve(entry.instead or key, entry)
        else:
            result = self.shell(entry.instead or key, entry)
            assert result.returncode == 0, (
                f"`{result.command}` exited with {result.returncode}\n--- stdout\n{result.stdout[-3000:]}\n"
                f"--- stderr\n{result.stderr[-5000:]}")
        self.results[key] = result
        return result

    def prepare(self, key: str) -> Result:
        """What a dependent needs from ``key``: its run, or its quick stand-in without --runslow."""
        if key in PRECONDITIONS:
            if key not in self.results and not (self.workspace / key).exists():
                result = self.shell(PRECONDITIONS[key], Entry(timeout=300))
                assert result.returncode == 0, f"precondition {key!r} failed\n{result.stderr[-5000:]}"
                self.results[key] = result
            return self.results.get(key, Result(f"(exists: {key})", 0, "", "", 0.0))
        entry = COMMANDS[key]
        if key in self.results or self.runslow or not entry.slow or entry.stand_in is None:
            return self.run(key)
        stand_key = f"stand-in for {key}"
        if stand_key not in self.results:
            result = self.shell(entry.stand_in, entry)
            assert result.returncode == 0, f"`{entry.stand_in}` failed\n{result.stderr[-5000:]}"
            result.stand_in = True
            self.results[stand_key] = result
        return self.results[stand_key]


# ---------------------------------------------------------------- checks
def _scalar_tags(logdir: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = sorted({p.parent for p in logdir.rglob("events.out.tfevents.*")})
    assert runs, f"no TensorBoard event file under {logdir}"
    tags: set[str] = set()
    for run in runs:  # each directory with event files is one run, as TensorBoard shows them
        acc = EventAccumulator(str(run))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    return tags


def _demo_output(logdir: str) -> Check:
    def check(walk: Walk, result: Result) -> None:
        tags = _scalar_tags(walk.workspace / logdir)
        assert {"llc/mean", "llc/std", "stage/index", "train/loss"} <= tags, sorted(tags)
        # what docs/getting-started.md says the run prints: the stages next to the loss drops, two rises
        table = result.stdout.split("vs LLC changepoints")[-1].split("LLC per plateau")[0]
        assert "vs LLC changepoints" in result.stdout and table.count("increase") >= 2, result.stdout[-3000:]
        assert len(list((walk.workspace / logdir / "transitions").glob("*.ckpt"))) >= 2  # the checkpoint rule

    return check


def _event_files(logdir: str, *tags: str) -> Check:
    def check(walk: Walk, result: Result) -> None:
        found = _scalar_tags(walk.workspace / logdir)
        assert set(tags) <= found, f"{logdir}: scalars {sorted(found)}; expected {tags}"

    return check


def _tensorboard_sees(logdir: str, *tags: str) -> Check:
    """TensorBoard's scalar plugin lists the run's tags (the page a user opens shows them), and the
    event files hold the LLC and stage series (read back with EventAccumulator)."""

    def check(walk: Walk, result: Result) -> None:
        listed = json.loads(result.body)  # {run: {tag: {...}}}
        names = {tag for run in listed.values() for tag in run}
        assert set(tags) <= names, f"TensorBoard lists {sorted(names)}"
        _event_files(logdir, *tags)(walk, result)

    return check


def _report_written(path: str, quiet: bool = False) -> Check:
    """An HTML page at ``path`` (in the copy) that shows the run's LLC."""

    def check(walk: Walk, result: Result) -> None:
        target = walk.workspace / path
        page = target / "index.html" if target.is_dir() else target
        assert page.is_file(), f"no report at {path}; {result.stdout[-1000:]}{result.stderr[-2000:]}"
        html = page.read_text()
        assert html.lstrip().lower().startswith("<!doctype html") and "llc/mean" in html
        assert page.stat().st_mtime >= time.time() - result.seconds - 5  # written by this command
        if quiet:
            assert result.stdout.strip() == "", result.stdout

    return check


def _ci_runs(line: str) -> Check:
    """``.ci/run`` runs exactly ``line`` (the README promises it)."""

    def check(walk: Walk, result: Result) -> None:
        script = ROOT / ".ci" / "run"
        assert os.access(script, os.X_OK), ".ci/run is not executable"
        assert line in script.read_text(), f".ci/run does not run `{line}`:\n{script.read_text()}"

    return check


def _other_torch() -> str:
    import torch

    version = torch.__version__.split("+")[0]
    return "" if version == "2.13.0" else (
        f"torch {torch.__version__} is installed: `pip install torch==2.13.0` would replace the torch these tests "
        "run on (CI installs 2.13.0 first, so there it runs)")


def _pip_noop(walk: Walk, result: Result) -> None:
    text = result.stdout + result.stderr
    assert "already satisfied" in text or "Successfully installed" in text or "Would install" in text, text[-2000:]


def _mkdocs_page(walk: Walk, result: Result) -> None:
    assert "devinterp-lightning" in result.body and "</html>" in result.body.lower()


def _slow_tests_need_runslow(walk: Walk, result: Result) -> None:
    """What the README says of ``python -m pytest``: without ``--runslow`` the slow tests are skipped."""
    conftest = (ROOT / "tests" / "conftest.py").read_text()
    assert '"--runslow"' in conftest and '"slow" in item.keywords' in conftest
    assert "slow:" in (ROOT / "pyproject.toml").read_text()  # the marker is declared (--strict-markers)


def _figures(walk: Walk, result: Result) -> None:
    for name in ("tensorboard_stages.png", "tensorboard_trajectory.png"):
        png = walk.workspace / "docs" / "img" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert png.stat().st_mtime >= time.time() - result.seconds - 5, f"{name} was not rewritten"


def _lines_in_output(*needles: str) -> Check:
    def check(walk: Walk, result: Result) -> None:
        for needle in needles:
            assert needle in result.stdout + result.stderr, (needle, result.stdout[-2000:], result.stderr[-2000:])

    return check


def _bench_cuda_on_the_cpu(arguments: str, shorter: str, *needles: str) -> Entry:
    """benchmarks/bench_cuda.py needs a CUDA device (CI has none, and it prints "no CUDA device" there);
    its ``--device cpu`` runs the same code on the CPU, so the walkthrough checks the script, not the
    GPU figures."""
    return Entry(phase=5, timeout=600, slow=True, instead=f"python benchmarks/bench_cuda.py --device cpu {arguments}",
                 why=f"the figures need a GPU; the same code on the CPU, {shorter}", check=_lines_in_output(*needles))


def _bench_calibration_regular(arguments: str, why: str, needle: str) -> Entry:
    """A scan of benchmarks/bench_calibration.py on one seed of the regular case with short chains: the
    documented scans calibrate many suite runs and follow each with further estimates (minutes)."""
    return Entry(phase=5, timeout=600, slow=True,
                 instead=f"python benchmarks/bench_calibration.py {arguments} --seeds 1 --burnin 100 --draws 100 "
                         "--only regular",
                 why=f"as written: {why}; one seed of the regular case, 2 chains", check=_lines_in_output(needle))


def _no_chromium() -> str:
    browsers = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
    if any(shutil.which(b) for b in browsers):
        return ""
    return "no Chromium on PATH (`apt-get install chromium`): the screenshot needs a real browser"


def _png(path: str) -> Check:
    def check(walk: Walk, result: Result) -> None:
        png = walk.workspace / path
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert png.stat().st_mtime >= time.time() - result.seconds - 5, f"{path} was not rewritten"

    return check


def _chromium_is_the_name_searched(walk: Walk, result: Result) -> None:
    script = ROOT / "docs" / "scripts" / "screenshot_report.py"
    assert '"chromium"' in script.read_text(), f"{script} does not look for the `chromium` binary"


DEMO = "python examples/deep_linear_network.py"
DEMO_LOGDIR = "runs/deep_linear_network"
#: a 200-step run of the demo into the same directory: what later steps read when the demo is skipped
DEMO_STAND_IN = f"{DEMO} --logdir {DEMO_LOGDIR} --max-steps 200 --seed 0 --num-draws 20 --no-final-llc --quiet"
README_TESTS = 'pip install torch==2.13.0 && pip install -e ".[dev]" && python -m pytest --runslow'
RECURSION = ("it is this test suite: running it from one of its own tests would run the walkthrough "
             "inside itself. CI runs it (.ci/run is exactly the README's command); checked: .ci/run runs it")


FEWER_SEEDS = "as written: 100 seeds per row (minutes); the walkthrough runs the same code on a few seeds"


def _files_written(path: str) -> Check:
    def check(walk: Walk, result: Result) -> None:
        out = walk.workspace / path
        assert out.stat().st_size > 0 and out.stat().st_mtime >= time.time() - result.seconds - 5, path

    return check


def _help_lists(script: str, option: str) -> Check:
    def check(walk: Walk, result: Result) -> None:
        done = subprocess.run([sys.executable, str(ROOT / script), "--help"], capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0 and option in done.stdout, done.stdout + done.stderr

    return check


def _installed_editable_from_here() -> bool:
    """Is devinterp-lightning installed in editable mode from this checkout (as .ci/run does)?"""
    from importlib import metadata

    try:
        text = metadata.distribution("devinterp-lightning").read_text("direct_url.json") or "{}"
    except metadata.PackageNotFoundError:
        return False
    info = json.loads(text)
    url = info.get("url", "")
    return bool(info.get("dir_info", {}).get("editable")) and url.startswith("file://") and \
        Path(url[len("file://"):]).resolve() == ROOT


#: CI (.ci/run) installs this checkout in editable mode: there `pip install -e .` is run as written
EDITABLE_HERE = _installed_editable_from_here()
DRY_RUN = ("installing would point the environment's package at this checkout, away from the checkout it "
           "is installed from (e.g. another git worktree); `--dry-run` resolves the same requirements without "
           "installing")

COMMANDS: dict[str, Entry] = {
    # ---- install (README, getting started)
    "pip install torch==2.13.0": Entry(
        phase=0, timeout=300, check=_pip_noop, cwd="root", skip_unless=_other_torch,
        why="as written; on a machine with torch 2.13.0 installed it is a no-op ('already satisfied')"),
    "pip install -e .": Entry(
        phase=0, timeout=300, check=_pip_noop, cwd="root",
        instead=None if EDITABLE_HERE else "pip install --dry-run --no-deps --no-build-isolation -e .",
        why="as written where this checkout is the editable install (CI); elsewhere: " + DRY_RUN),
    'pip install -e ".[dev]"': Entry(
        phase=0, timeout=300, check=_pip_noop, cwd="root",
        instead=None if EDITABLE_HERE else 'pip install --dry-run --no-build-isolation -e ".[dev]"',
        why="as written where this checkout is the editable install (CI); elsewhere: " + DRY_RUN),
    'pip install -e ".[cli]"': Entry(
        phase=0, timeout=300, check=_pip_noop, cwd="root",
        instead=None if EDITABLE_HERE else 'pip install --dry-run --no-build-isolation -e ".[cli]"',
        why="as written where this checkout is the editable install (CI); elsewhere: " + DRY_RUN),
    "python -m pytest --runslow": Entry(how="not-run", phase=0, why=RECURSION, check=_ci_runs(README_TESTS)),
    ".ci/run": Entry(how="not-run", phase=0, why=RECURSION, check=_ci_runs(README_TESTS)),
    "python -m pytest": Entry(
        how="not-run", phase=0, why=RECURSION.split(". CI")[0] + "; checked: the slow tests it skips need --runslow",
        check=_slow_tests_need_runslow),
    # ---- the README demo, then TensorBoard and the report on its run (getting started)
    DEMO: Entry(
        phase=1, timeout=900, slow=True, stand_in=DEMO_STAND_IN, check=_demo_output(DEMO_LOGDIR),
        why="as written: the 1.5-minute demo (slow)"),
    f"tensorboard --logdir {DEMO_LOGDIR}": Entry(
        how="serve", phase=3, timeout=180, needs=(DEMO,),
        instead=f"tensorboard --logdir {DEMO_LOGDIR} --host 127.0.0.1 --port {{port}}",
        probe="/data/plugin/scalars/tags", ready_text='"llc/mean"', check=_tensorboard_sees(DEMO_LOGDIR, "llc/mean", "stage/index"),
        why="a free port instead of 6006, so that two test runs on one machine do not collide"),
    f"devinterp-lightning report {DEMO_LOGDIR}": Entry(
        phase=4, timeout=300, needs=(DEMO,), check=_report_written(f"{DEMO_LOGDIR}/report.html")),
    "devinterp-lightning report LOGDIR": Entry(
        phase=4, timeout=300, needs=(DEMO,), instead=f"devinterp-lightning report {DEMO_LOGDIR}",
        why="LOGDIR is a placeholder: the demo's log directory", check=_report_written(f"{DEMO_LOGDIR}/report.html")),
    # ---- docs/examples.md: synopses ([--option default] written out) and the LightningCLI example
    "python examples/deep_linear_network.py [--logdir runs/deep_linear_network] [--max-steps 1600] [--seed 0]": Entry(
        phase=2, timeout=300,
        instead=f"{DEMO} --logdir runs/synopsis/deep_linear_network --max-steps 160 --seed 0 --num-draws 20 "
                "--no-final-llc --quiet",
        why="a synopsis: the bracketed options are accepted (the default-length run is the README's demo, above); "
            "160 steps and short chains keep it quick; its own directory keeps the demo's log one run",
        check=_event_files("runs/synopsis/deep_linear_network", "llc/mean")),
    "python examples/grokking.py [--logdir runs/grokking] [--max-steps 2000] [--seed 0] [--weight-decay 2]": Entry(
        phase=2, timeout=300,
        instead="python examples/grokking.py --logdir runs/grokking --max-steps 60 --seed 0 --weight-decay 2 --num-draws 10 --quiet",
        why="a synopsis: the bracketed options are accepted; the full run is "
            "tests/test_examples_more.py::test_grokking_full_run_llc_peaks_at_memorization_and_falls (slow)",
        check=_event_files("runs/grokking", "llc/mean")),
    "tensorboard --logdir runs/grokking": Entry(
        how="serve", phase=3, timeout=180,
        needs=("python examples/grokking.py [--logdir runs/grokking] [--max-steps 2000] [--seed 0] "
               "[--weight-decay 2]",),
        instead="tensorboard --logdir runs/grokking --host 127.0.0.1 --port {port}",
        probe="/data/plugin/scalars/tags", ready_text='"llc/mean"', check=_tensorboard_sees("runs/grokking", "llc/mean"),
        why="a free port instead of 6006"),
    "python examples/superposition.py [--logdir runs/superposition] [--max-steps 3000] [--seed 0]": Entry(
        phase=2, timeout=300,
        instead="python examples/superposition.py --logdir runs/superposition --max-steps 100 --seed 0 --num-draws 20 --quiet",
        why="a synopsis: the bracketed options are accepted; the full run is "
            "tests/test_examples_more.py::test_superposition_full_run_llc_rises_when_features_form (slow)",
        check=_event_files("runs/superposition", "llc/mean")),
    "tensorboard --logdir runs/superposition": Entry(
        how="serve", phase=3, timeout=180,
        needs=("python examples/superposition.py [--logdir runs/superposition] [--max-steps 3000] [--seed 0]",),
        instead="tensorboard --logdir runs/superposition --host 127.0.0.1 --port {port}",
        probe="/data/plugin/scalars/tags", ready_text='"llc/mean"', check=_tensorboard_sees("runs/superposition", "llc/mean"),
        why="a free port instead of 6006"),
    "python examples/in_context_linear_regression.py [--logdir runs/in_context_linear_regression] [--max-steps 600] [--seed 0] [--figure icl.png]": Entry(
        phase=2, timeout=300,
        instead="python examples/in_context_linear_regression.py --logdir runs/in_context_linear_regression "
                "--max-steps 40 --llc-every 20 --eval-every 10 --num-draws 5 --seed 0 --figure icl.png --quiet",
        why="a synopsis: the bracketed options are accepted; the full run is "
            "tests/test_examples_transformers.py (slow)",
        check=_event_files("runs/in_context_linear_regression", "llc/mean")),
    "tensorboard --logdir runs/in_context_linear_regression": Entry(
        how="serve", phase=3, timeout=180,
        needs=("python examples/in_context_linear_regression.py [--logdir runs/in_context_linear_regression] [--max-steps 600] [--seed 0] [--figure icl.png]",),
        instead="tensorboard --logdir runs/in_context_linear_regression --host 127.0.0.1 --port {port}",
        probe="/data/plugin/scalars/tags", ready_text='"llc/mean"',
        check=_tensorboard_sees("runs/in_context_linear_regression", "llc/mean"), why="a free port instead of 6006"),
    "python examples/induction_heads.py [--logdir runs/induction_heads] [--max-steps 2000] [--seed 0] [--figure ih.png]": Entry(
        phase=2, timeout=300,
        instead="python examples/induction_heads.py --logdir runs/induction_heads --max-steps 40 --llc-every 40 "
                "--eval-every 10 --num-draws 5 --seed 0 --figure ih.png --quiet",
        why="a synopsis: the bracketed options are accepted; the full run is "
            "tests/test_examples_transformers.py (slow)",
        check=_event_files("runs/induction_heads", "llc/mean")),
    "tensorboard --logdir runs/induction_heads": Entry(
        how="serve", phase=3, timeout=180,
        needs=("python examples/induction_heads.py [--logdir runs/induction_heads] [--max-steps 2000] [--seed 0] [--figure ih.png]",),
        instead="tensorboard --logdir runs/induction_heads --host 127.0.0.1 --port {port}",
        probe="/data/plugin/scalars/tags", ready_text='"llc/mean"',
        check=_tensorboard_sees("runs/induction_heads", "llc/mean"), why="a free port instead of 6006"),
    "python examples/lightning_cli/main.py fit --config examples/lightning_cli/config.yaml": Entry(
        phase=2, timeout=600, slow=True, check=_event_files("runs/lightning_cli", "llc/mean"),
        why="as written: trains until the rules file halts at the first rise of the LLC (slow)"),
    "python examples/lightning_cli/main.py fit --config examples/lightning_cli/config.yaml --trainer.max_steps 300 "
    "--llc_monitor.num_draws 100": Entry(
        phase=2, timeout=600, slow=True, check=_event_files("runs/lightning_cli", "llc/mean"),
        why="as written (slow: 8 estimates of 4 x 150 SGLD steps); tests/test_lightning_cli.py overrides quickly"),
    # docs/monitor.md: the plain LightningCLI with the monitor in trainer.callbacks
    'python -c "from lightning.pytorch.cli import LightningCLI; LightningCLI()" fit '
    "--config examples/configs/llc_monitor.yaml": Entry(
        phase=2, timeout=900, slow=True, check=_event_files("lightning_logs", "llc/mean", "llc/first/mean"),
        why="as written (slow: 2000 steps)"),
    # ---- TensorBoard page
    "python docs/scripts/make_figures.py": Entry(
        phase=3, timeout=300, slow=True, needs=(DEMO,),
        instead=f"python docs/scripts/make_figures.py --reuse --logdir {DEMO_LOGDIR}",
        why="as written it trains the demo a second time; --reuse reads the README demo's run instead",
        check=_figures),
    # ---- report page
    "devinterp-lightning report lightning_logs/version_0": Entry(
        phase=4, timeout=300, needs=("lightning_logs/version_0",), check=_report_written("lightning_logs/version_0/report.html")),
    "devinterp-lightning report lightning_logs --output run.html": Entry(
        phase=4, timeout=300, needs=("lightning_logs/version_0",), check=_report_written("run.html")),
    "python -m devinterp_lightning.cli report lightning_logs --quiet": Entry(
        phase=4, timeout=300, needs=("lightning_logs/version_0",), check=_report_written("lightning_logs/report.html", quiet=True)),
    # ---- benchmarks
    "python benchmarks/bench_estimator.py": Entry(
        phase=5, timeout=600, slow=True, instead="python benchmarks/bench_estimator.py --no-devinterp --repeats 1",
        why="as written it also builds benchmarks/.devinterp-venv (downloads torch and devinterp 2.0.1, ~1 GB); "
            "the walkthrough runs the same script without that arm, one repeat",
        check=_lines_in_output("chain-step")),
    "python benchmarks/bench_cuda.py --parts accuracy --seeds 3": _bench_cuda_on_the_cpu(
        "--parts accuracy --seeds 1", "one seed", "accuracy on cpu", "DLN 3-4-4-3 r2, noisy, B 128 epochs"),
    "python benchmarks/bench_cuda.py --parts speed": _bench_cuda_on_the_cpu(
        "--parts speed --draws 5 --repeats 1", "5 draws, one repeat",
        "mlp-784-1024-1024-10-b512    16 chains", "chain-step / training step"),
    "python benchmarks/bench_cuda.py --parts monitor": _bench_cuda_on_the_cpu(
        "--parts monitor --steps 150", "150 steps", "synchronous", "background, worker on the CPU"),
    "python benchmarks/bench_monitor_overhead.py": Entry(
        phase=5, timeout=600, slow=True, instead="python benchmarks/bench_monitor_overhead.py --steps 300",
        why="as written it trains 2,000 and 20,000 steps in three modes (minutes); 300 steps run the same code paths",
        check=_lines_in_output('"overhead":', '"mode": "sync"')),
    "python benchmarks/bench_calibration.py": Entry(
        phase=5, timeout=600, slow=True,
        instead="python benchmarks/bench_calibration.py --seeds 1 --burnin 100 --draws 100",
        why="as written: 3 seeds x 3 shapes with 600-step chains (minutes); one seed, shorter chains",
        check=_lines_in_output("cost (wall time) median")),
    "python benchmarks/bench_calibration.py --loc-scan 0.5,1,2,3,4 --rel-tol 0.05": _bench_calibration_regular(
        "--loc-scan 1,2 --scan-chains 2 --rel-tol 0.05",
        "21 calibrations, each followed by five 8-chain estimates (tens of minutes); two multiples",
        "cells: relative error"),
    **{f"python benchmarks/bench_calibration.py --richardson{tol}": _bench_calibration_regular(
        f"--richardson{tol} --scan-chains 2", "21 calibrations, each followed by two 8-chain estimates (minutes)",
        "lr -> 0: per chain") for tol in ("", " --rel-tol 0.05")},
    **{f"python benchmarks/bench_calibration.py --only DLN --nbeta-scan 1,4,10{fixed}": _bench_calibration_regular(
        f"--nbeta-scan 1,2{fixed} --chains 2",
        "12 calibrations at three nbeta each, with an estimate after each (tens of minutes); two multiples",
        "the localization it used") for fixed in ("", " --fixed-localization")},
    # ---- stage, essential-dynamics and estimator-value benchmarks (docs/stages.md, essential_dynamics.md,
    # validation.md): the same scripts with fewer seeds, since 100 seeds per row take minutes
    "python benchmarks/bench_stages.py --seeds 100 --amplitudes 8 --phis 0 0.5 0.8 --shapes flat rise-10 step stairs-2":
        Entry(phase=5, timeout=600, slow=True, check=_lines_in_output("| flat |", "| stairs-2 |"),
              instead="python benchmarks/bench_stages.py --seeds 5 --amplitudes 8 --phis 0 0.5 0.8 "
                      "--shapes flat rise-10 step stairs-2", why=FEWER_SEEDS),
    "python benchmarks/bench_stages.py --seeds 100 --amplitudes 8 --phis 0 --shapes rise-3 rise-30 fall-10 fall-30 "
    "stairs-3 rise-fall ramp plateau-ramp":
        Entry(phase=5, timeout=600, slow=True, check=_lines_in_output("| ramp |", "| rise-fall |"),
              instead="python benchmarks/bench_stages.py --seeds 5 --amplitudes 8 --phis 0 --shapes rise-3 rise-30 "
                      "fall-10 fall-30 stairs-3 rise-fall ramp plateau-ramp", why=FEWER_SEEDS),
    "python benchmarks/bench_stages.py --seeds 100 --amplitudes 8 --phis 0.5 0.8 --shapes rise-3 rise-30 fall-10 "
    "fall-30 stairs-3 rise-fall ramp":
        Entry(phase=5, timeout=600, slow=True, check=_lines_in_output("| fall-30 |", "| rise-fall |"),
              instead="python benchmarks/bench_stages.py --seeds 5 --amplitudes 8 --phis 0.5 0.8 --shapes rise-3 "
                      "rise-30 fall-10 fall-30 stairs-3 rise-fall ramp", why=FEWER_SEEDS),
    "python benchmarks/bench_stages.py --seeds 100 --amplitudes 4 --phis 0 0.5 0.8 --shapes rise-10 stairs-2 ramp":
        Entry(phase=5, timeout=600, slow=True, check=_lines_in_output("| rise-10 | 4 |", "| stairs-2 | 4 |"),
              instead="python benchmarks/bench_stages.py --seeds 5 --amplitudes 4 --phis 0 0.5 0.8 --shapes rise-10 "
                      "stairs-2 ramp", why=FEWER_SEEDS),
    "python benchmarks/bench_stages.py --seeds 100 --detector binseg --amplitudes 8 --phis 0 0.5 0.8 --shapes flat "
    "rise-10 stairs-2":
        Entry(phase=5, timeout=600, slow=True, check=_lines_in_output("| flat |"),
              instead="python benchmarks/bench_stages.py --seeds 5 --detector binseg --amplitudes 8 --phis 0 0.5 0.8 "
                      "--shapes flat rise-10 stairs-2", why=FEWER_SEEDS),
    "python benchmarks/bench_stages.py --seeds 100 --amplitudes 4 --phis 0 0.5 0.8 --shapes rise-fall":
        Entry(phase=5, timeout=600, slow=True, check=_lines_in_output("| rise-fall | 4 | 0.8 |"),
              instead="python benchmarks/bench_stages.py --seeds 5 --amplitudes 4 --phis 0 0.5 0.8 --shapes rise-fall",
              why=FEWER_SEEDS),
    "python benchmarks/bench_stages.py --noise-spread --seeds 100":
        Entry(phase=5, timeout=600, slow=True, check=_lines_in_output("| flat | 1 | 0.8 |", "| rise-10 | 4 | 0.5 |"),
              instead="python benchmarks/bench_stages.py --noise-spread --seeds 5", why=FEWER_SEEDS),
    "python benchmarks/bench_stages.py --known-noise --seeds 100 --amplitudes 4 8 --phis 0 0.5 0.8 --shapes flat "
    "rise-10 stairs-2 rise-30 fall-30 rise-fall":
        Entry(phase=5, timeout=600, slow=True, check=_lines_in_output("told the true noise level", "| rise-fall | 4 |"),
              instead="python benchmarks/bench_stages.py --known-noise --seeds 5 --amplitudes 4 8 --phis 0 0.5 0.8 "
                      "--shapes flat rise-10 stairs-2 rise-30 fall-30 rise-fall", why=FEWER_SEEDS),
    "python benchmarks/bench_stages.py --cost": Entry(phase=5, timeout=600, slow=True),
    "python benchmarks/bench_stages.py --detector turning --shapes flat":
        Entry(phase=5, timeout=600, slow=True, check=_lines_in_output("| flat |"),
              instead="python benchmarks/bench_stages.py --seeds 5 --detector turning --shapes flat", why=FEWER_SEEDS),
    "OMP_NUM_THREADS=1 python benchmarks/bench_ed_turning_points.py --out ed_tp.json": Entry(
        phase=5, timeout=600, slow=True, check=_files_written("ed_tp.json"),
        instead="OMP_NUM_THREADS=1 python benchmarks/bench_ed_turning_points.py --quick --out ed_tp.json",
        why=FEWER_SEEDS),
    "OMP_NUM_THREADS=1 python benchmarks/bench_ed_turning_points.py --alpha none --growing-seeds 30 --recall-seeds 10":
        Entry(phase=5, timeout=600, slow=True,
              instead="OMP_NUM_THREADS=1 python benchmarks/bench_ed_turning_points.py --alpha none --quick",
              why=FEWER_SEEDS),
    "python benchmarks/bench_estimator.py --values-only": Entry(
        how="not-run", phase=5, check=_help_lists("benchmarks/bench_estimator.py", "--values-only"),
        why="it builds benchmarks/.devinterp-venv (downloads torch and devinterp 2.0.1, ~1 GB) to run devinterp; "
            "checked: the option exists; its figures are in docs/validation.md"),
    # ---- report output, the report screenshot and the monitor benchmarks
    "devinterp-lightning report lightning_logs --output report/": Entry(
        phase=4, timeout=300, needs=("lightning_logs/version_0",), check=_report_written("report")),
    "python docs/scripts/screenshot_report.py": Entry(
        phase=4, timeout=600, slow=True, skip_unless=_no_chromium, check=_png("docs/img/report.png"),
        why="as written where Chromium is installed; skipped with the reason elsewhere"),
    "apt-get install chromium": Entry(
        how="not-run", phase=4, check=_chromium_is_the_name_searched,
        why="installs a system package (root, network); checked: `chromium`, the binary Debian's package "
            "installs, is what docs/scripts/screenshot_report.py looks for"),
    "OMP_NUM_THREADS=1 python benchmarks/bench_monitor_overhead.py --steps 2000 20000 --repeats 2": Entry(
        phase=5, timeout=600, slow=True,
        instead="OMP_NUM_THREADS=1 python benchmarks/bench_monitor_overhead.py --steps 200 --repeats 1",
        why="the full measurement trains 2 x (2,000 + 20,000) steps per mode (tens of minutes); 200 steps run "
            "the same code"),
    "python benchmarks/bench_monitor_defaults.py --variance 2000 600 --seeds 0 1 2 3 4 5 6 7": Entry(
        phase=5, timeout=600, slow=True,
        instead="python benchmarks/bench_monitor_defaults.py --variance 200 100 --seeds 0 1",
        why="8 seeds at 2,000 steps take many minutes; 2 seeds at 200 run the same code"),
    "python benchmarks/bench_monitor_defaults.py --seeds 0 --configs 0 1 2 3 4": Entry(
        phase=5, timeout=600, slow=True,
        instead="python benchmarks/bench_monitor_defaults.py --seeds 0 --configs 0 --max-steps 200",
        why="five 1,600-step runs of the demo take many minutes; one 200-step run runs the same code"),
    "python benchmarks/bench_monitor_defaults.py --variance 2000 600 --seeds 0 1 2 3 4 5 6 7 --warm": Entry(
        phase=5, timeout=600, slow=True,
        instead="python benchmarks/bench_monitor_defaults.py --variance 200 100 --seeds 0 1 --warm",
        why="8 seeds x 3 layouts x 4 warm-started estimates at 2,000 steps take minutes; 2 seeds at 200 run "
            "the same code", check=_lines_in_output("warm")),
    "python benchmarks/bench_monitor_defaults.py --grokking --seeds 0 1 2": Entry(
        phase=5, timeout=600, slow=True,
        instead="python benchmarks/bench_monitor_defaults.py --grokking --seeds 0 --max-steps 100",
        why="six full 2,000-step grokking runs take about 7 minutes; two 100-step runs run the same code",
        check=_lines_in_output('"example": "grokking"')),
    "python benchmarks/bench_monitor_defaults.py --seeds 0 1 2 --configs 5 6 7 8 9": Entry(
        phase=5, timeout=600, slow=True,
        instead="python benchmarks/bench_monitor_defaults.py --seeds 0 --configs 6 --max-steps 200",
        why="fifteen 1,600-step runs of the demo take many minutes; one 200-step warm-started run runs the "
            "same code"),
    "OMP_NUM_THREADS=1 python benchmarks/bench_readme_snippet.py --repeats 2": Entry(
        phase=5, timeout=600, slow=True,
        instead="OMP_NUM_THREADS=1 python benchmarks/bench_readme_snippet.py --repeats 1",
        why="one repeat runs the same code", check=_lines_in_output('"overhead":', "LLC of the last layer")),
    "OMP_NUM_THREADS=1 PYTHONPATH=$PWD python benchmarks/make_icl_llc.py --seeds 0 1 2 -- --llc-every 20 "
    "--num-draws 60": Entry(
        phase=5, timeout=600, slow=True,
        instead="OMP_NUM_THREADS=1 PYTHONPATH=$PWD python benchmarks/make_icl_llc.py --seeds 0 --out icl_short.json "
                "-- --max-steps 40 --llc-every 20 --num-draws 5",
        why="three 600-step runs of the example take 7-9 minutes each on 2 cores; one 40-step run, written "
            "next to the copy instead of over the recorded series, runs the same code",
        check=_files_written("icl_short.json")),
    "OMP_NUM_THREADS=1 PYTHONPATH=$PWD python benchmarks/make_superposition_llc.py --seed 0": Entry(
        phase=5, timeout=600, slow=True,
        instead="OMP_NUM_THREADS=1 PYTHONPATH=$PWD python benchmarks/make_superposition_llc.py --seed 0 "
                "--out superposition.json",
        why="the same run (about 30 s), written next to the copy instead of over the recorded series",
        check=_files_written("superposition.json")),
    # ---- the docs site
    "mkdocs serve": Entry(
        how="serve", phase=5, timeout=240, instead="mkdocs serve --dev-addr 127.0.0.1:{port}",
        why="a free port instead of 8000", check=_mkdocs_page),
}

#: entries whose command is about to be documented (for a change that lands tests before docs): they
#: are exempt from the stale-entry check. Empty: every entry's command is on a page.
AWAITED: set[str] = set()

#: what a user has before a command on a page, when no documented command makes it: a path in the
#: copy, and the command that creates it when it is missing
PRECONDITIONS: dict[str, str] = {
    # docs/report.md starts from Lightning's default log directory: a Trainer with the default logger
    "lightning_logs/version_0": (
        "python - <<'EOF'\n"
        "import torch, lightning.pytorch as pl\n"
        "from torch.utils.data import DataLoader, TensorDataset\n"
        "from devinterp_lightning import LLCMonitor, StageDetector\n"
        "torch.manual_seed(0)\n"
        "x = torch.randn(256, 4); y = x @ torch.randn(4, 2)\n"
        "loader = DataLoader(TensorDataset(x, y), batch_size=64)\n"
        "class M(pl.LightningModule):\n"
        "    def __init__(self):\n"
        "        super().__init__(); self.net = torch.nn.Linear(4, 2)\n"
        "    def training_step(self, b, i):\n"
        "        loss = torch.nn.functional.mse_loss(self.net(b[0]), b[1]); self.log('train_loss', loss); return loss\n"
        "    def configure_optimizers(self):\n"
        "        return torch.optim.SGD(self.parameters(), lr=0.05)\n"
        "mse = lambda m, b: torch.nn.functional.mse_loss(m.net(b[0]), b[1])\n"
        "trainer = pl.Trainer(max_steps=40, enable_progress_bar=False, enable_checkpointing=False,\n"
        "                     callbacks=[LLCMonitor(mse, data=loader, every_n_steps=10, num_chains=2, num_draws=30,\n"
        "                                           num_burnin_steps=10, nbeta=50.0), StageDetector()])\n"
        "trainer.fit(M(), loader)\n"
        "EOF"
    ),
}


# ---------------------------------------------------------------- the tests
DOCUMENTED = collect()


def _order(command: str) -> tuple[int, int]:
    entry = COMMANDS.get(command)
    return (entry.phase if entry else -1, list(DOCUMENTED).index(command))


def _params() -> list:
    params = []
    for command in sorted(DOCUMENTED, key=_order):
        entry = COMMANDS.get(command)
        marks = [pytest.mark.slow] if entry is not None and entry.slow else []
        params.append(pytest.param(command, marks=marks, id=command))
    return params


@pytest.fixture(scope="session")
def walk(tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config) -> Walk:
    """A copy of the repository, as a fresh clone holds it, shared by the whole walk."""
    workspace = tmp_path_factory.mktemp("walkthrough") / "repo"
    shutil.copytree(ROOT, workspace, ignore=COPY_IGNORE)
    return Walk(workspace, runslow=bool(pytestconfig.getoption("--runslow")))


def test_the_collector_finds_the_documented_commands() -> None:
    """The collector reads every form a command is written in (checked on the real pages)."""
    assert "pip install torch==2.13.0" in DOCUMENTED                      # fenced bash, split at &&
    assert DEMO in DOCUMENTED and DOCUMENTED[DEMO][0].startswith("README.md:")
    assert "mkdocs serve" in DOCUMENTED                                   # inline code span
    assert f"tensorboard --logdir {DEMO_LOGDIR}" in DOCUMENTED            # fenced block in getting started
    assert "tensorboard" not in DOCUMENTED                                # a lone package name is no command
    assert not any("#" in c for c in DOCUMENTED)                          # comments dropped


def test_the_collector_handles_every_block_form(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "Run `python a.py --x 1` or read `tensorboard`.\n\n"
        "```console\n$ pip install foo  # comment\nCollecting foo\n$ python b.py \\\n    --y 2\n```\n\n"
        "```sh\ncd build; make all\n```\n\n"
        "```\nsome output\nmkdocs build --strict\n```\n\n"
        "```python\npython = 3\n```\n\n"
        "Synopsis:\n\n    python c.py [--z 3]\n    tensorboard --logdir runs/c \\\n        --port 1\n\n"
        "* a list item\n"
    )
    found = collect([page])
    assert found["python a.py --x 1"] == ["page.md:1"]
    assert list(found) == ["python a.py --x 1", "pip install foo", "python b.py --y 2", "cd build", "make all",
                           "mkdocs build --strict", "python c.py [--z 3]", "tensorboard --logdir runs/c --port 1"]


def test_every_documented_command_has_an_entry() -> None:
    missing = {c: w for c, w in DOCUMENTED.items() if c not in COMMANDS}
    assert not missing, (
        "commands written in the docs without an entry in tests/test_walkthrough.py COMMANDS (say how each "
        "is run and checked, or why it is not run):\n" + "\n".join(f"  {c!r}  ({', '.join(w)})" for c, w in missing.items()))


def test_no_entry_for_a_command_the_docs_dropped() -> None:
    stale = sorted(set(COMMANDS) - set(DOCUMENTED) - AWAITED)
    assert not stale, f"COMMANDS entries no longer written in README.md or docs/*.md (remove them): {stale}"


def test_every_substitution_says_why() -> None:
    for command, entry in COMMANDS.items():
        if entry.instead is not None or entry.how == "not-run":
            assert entry.why, f"{command!r} is not run as written but its entry does not say why"
        assert entry.how in ("run", "serve", "not-run"), command
        assert all(n in COMMANDS or n in PRECONDITIONS for n in entry.needs), command


@pytest.mark.parametrize("command", _params())
def test_documented_command(command: str, walk: Walk) -> None:
    """Run one documented command (or do what its entry says instead) and check what it produced."""
    entry = COMMANDS.get(command)
    if entry is None:
        pytest.fail(f"{command!r} ({', '.join(DOCUMENTED[command])}) has no entry in COMMANDS")
    if entry.skip_unless is not None and (reason := entry.skip_unless()):
        pytest.skip(reason)
    if entry.how == "not-run":
        assert entry.check is not None, f"{command!r}: a command that is not run must check something instead"
        entry.check(walk, Result(command, None, "", "", 0.0))
        return
    result = walk.run(command)
    if entry.check is not None:
        entry.check(walk, result)


def test_ci_run_fails_when_pytest_collects_no_tests(tmp_path: Path) -> None:
    """`.ci/run` cannot pass on an empty suite: pytest's exit status 5 ("no tests ran") is the script's
    status (its last command, under ``set -e``). Run on a tree with no tests and a stub ``pip``."""
    (tmp_path / ".ci").mkdir()
    shutil.copy2(ROOT / ".ci" / "run", tmp_path / ".ci" / "run")
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "conftest.py").write_text(
        "def pytest_addoption(parser):\n    parser.addoption('--runslow', action='store_true')\n")
    (tmp_path / "pytest.ini").write_text("[pytest]\ntestpaths = tests\n")
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    (stubs / "pip").write_text("#!/bin/sh\nexit 0\n")
    (stubs / "pip").chmod(0o755)
    (stubs / "python").symlink_to(sys.executable)
    env = {**os.environ, "PATH": f"{stubs}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.run([str(tmp_path / ".ci" / "run")], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert "no tests ran" in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    assert proc.returncode == 5, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
