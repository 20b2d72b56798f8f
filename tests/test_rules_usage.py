"""Every ``StageDetector(...)`` usage written in a rules file's header or in docs/rules.md runs as written
(issue #15 item 5): the detector is built from the text and trained with a probe for ``llc/mean`` and a
module that logs ``train_loss``, in a directory that holds the files the usage names."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from test_stage_detector import FakeProbe, TinyModule, make_trainer  # tests/ is on sys.path

from devinterp_lightning import StageDetector

ROOT = Path(__file__).parents[1]
RULE_FILES = sorted((ROOT / "examples" / "rules").glob("*.yaml"))


def usages(text: str) -> list[str]:
    """``StageDetector(...)`` calls in ``text``, joined across ``#`` comment lines, parentheses balanced."""
    lines = [re.sub(r"^\s*#\s?", "", line) for line in text.splitlines()]
    flat = "\n".join(lines)
    out = []
    for m in re.finditer(r"StageDetector\(", flat):
        depth, i = 0, m.start() + len("StageDetector")
        while i < len(flat):
            depth += {"(": 1, ")": -1}.get(flat[i], 0)
            i += 1
            if depth == 0:
                break
        out.append(" ".join(flat[m.start():i].split()))
    return out


def documented_usages() -> list[tuple[str, str]]:
    found = [(p.name, u) for p in RULE_FILES for u in usages(p.read_text())]
    found += [("docs/rules.md", u) for u in usages((ROOT / "docs" / "rules.md").read_text())]
    return found


def test_usages_are_found():
    names = {where for where, _ in documented_usages()}
    assert {"halt_on_transition.yaml", "docs/rules.md"} <= names


@pytest.mark.parametrize("where, usage", documented_usages())
def test_documented_usage_runs(tmp_path, monkeypatch, where, usage):
    # the files the usages name: the example rules (same relative path) and docs/rules.md's YAML block
    shutil.copytree(ROOT / "examples" / "rules", tmp_path / "examples" / "rules")
    block = re.search(r"```yaml\n(.*?)```", (ROOT / "docs" / "rules.md").read_text(), re.S)
    assert block is not None
    (tmp_path / "rules.yaml").write_text(block.group(1))
    monkeypatch.chdir(tmp_path)
    rules = []  # docs/rules.md's Python block defines `rules`; a usage may refer to it
    detector = eval(usage, {"StageDetector": StageDetector, "rules": rules})  # noqa: S307 - our own docs
    assert isinstance(detector, StageDetector)
    trainer = make_trainer(tmp_path, [FakeProbe(), detector], max_steps=40, log_every_n_steps=5)
    trainer.fit(TinyModule())
    if "train_loss" in detector.keys:  # sampled from callback_metrics at the logging interval
        assert detector.series.steps("train_loss") == list(range(5, 41, 5))
