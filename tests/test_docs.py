"""Every Python snippet in README.md and docs/ runs, every YAML rules snippet loads, and the
documentation site builds without warnings."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w+)[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)


def _blocks(path: Path, language: str) -> list[str]:
    return [body for lang, body in FENCE.findall(path.read_text()) if lang == language]


def _files_with(language: str) -> list[Path]:
    return [p for p in DOC_FILES if _blocks(p, language)]


@pytest.mark.parametrize("path", _files_with("python"), ids=lambda p: p.name)
def test_python_snippets_run(path: Path, tmp_path: Path) -> None:
    """The blocks of one page run in order in one namespace, as a reader would paste them."""
    source = "\n\n".join(_blocks(path, "python"))
    script = tmp_path / f"snippets_{path.stem}.py"
    script.write_text("import torch\ntorch.set_num_threads(1)\n" + source)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MPLBACKEND": "Agg"}
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, f"snippets of {path.name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"


@pytest.mark.parametrize("path", _files_with("yaml"), ids=lambda p: p.name)
def test_yaml_rule_snippets_load(path: Path, tmp_path: Path) -> None:
    """YAML blocks that define rules load through load_rules; other YAML blocks at least parse."""
    import yaml

    from devinterp_lightning.rules import load_rules

    for i, body in enumerate(_blocks(path, "yaml")):
        data = yaml.safe_load(body)
        if isinstance(data, dict) and set(data) == {"rules"}:
            rules_file = tmp_path / f"rules_{i}.yaml"
            rules_file.write_text(body)
            assert load_rules(rules_file)


def test_docs_build_strict(tmp_path: Path) -> None:
    mkdocs = shutil.which("mkdocs")
    if mkdocs is None:
        pytest.fail("mkdocs is not installed: `pip install -e '.[dev]'` installs it")
    proc = subprocess.run(
        [mkdocs, "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


#: fenced-block languages and what checks them; a block in any other language would be checked by nothing
CHECKED_LANGUAGES = {
    "python": "test_python_snippets_run",
    "yaml": "test_yaml_rule_snippets_load",
    **{lang: "tests/test_walkthrough.py (every command runs)" for lang in ("bash", "sh", "shell", "console")},
    "text": "not code (output shown to the reader)",
}


def test_every_code_block_is_checked() -> None:
    """A fenced block in a language nothing runs (say ```toml) fails here until a check is added for it."""
    opening = re.compile(r"^```(\S*)", re.MULTILINE)
    unchecked = []
    for path in DOC_FILES:
        inside = False
        for lang in opening.findall(path.read_text()):
            inside = not inside
            if inside and lang and lang not in CHECKED_LANGUAGES:
                unchecked.append(f"{path.name}: ```{lang}")
    assert not unchecked, f"code blocks no test checks: {unchecked}; add the language to CHECKED_LANGUAGES with its test"
