"""Rules: schema validation (every mistake names rule and field), YAML loading, evaluation."""

from __future__ import annotations

from pathlib import Path

import pytest

from devinterp_lightning.rules import AlertRule, RuleConfigError, RuleEngine, load_rules, loads_rules
from devinterp_lightning.stages.events import Transition

EXAMPLE = Path(__file__).parents[1] / "examples" / "rules" / "halt_on_transition.yaml"

GOOD = """\
rules:
  - name: capability-jump
    monitor: llc/mean
    when: transition
    direction: increase
    min_change: 0.5
    after_step: 10
    actions: [log, checkpoint, halt]
  - name: loss-high
    monitor: train_loss
    when: above
    threshold: 5.0
    actions: [log]
"""


def test_example_file_and_good_rules_load():
    rules = load_rules(EXAMPLE)
    assert {r.name for r in rules} >= {"capability-jump", "compression-halt"}
    a, b = loads_rules(GOOD)
    assert a == AlertRule(name="capability-jump", monitor="llc/mean", direction="increase", min_change=0.5,
                          after_step=10, actions=("log", "checkpoint", "halt"))
    assert b.when == "above" and b.threshold == 5.0 and b.actions == ("log",)


def test_rule_error_is_a_value_error():
    assert issubclass(RuleConfigError, ValueError)


@pytest.mark.parametrize(
    "text, pattern",
    [
        # unknown key, with the closest valid key suggested
        ("rules:\n  - name: a\n    monitor: m\n    treshold: 1\n    when: above\n    actions: [log]\n",
         r"rule #0 \('a'\), field 'treshold': unknown key; did you mean 'threshold'\?"),
        ("rules:\n  - name: a\n    monitor: m\n    action: [log]\n", r"field 'action'.*did you mean 'actions'"),
        # missing fields
        ("rules:\n  - name: a\n    actions: [log]\n", r"rule #0 \('a'\), field 'monitor': missing"),
        ("rules:\n  - monitor: m\n    actions: [log]\n", r"rule #0, field 'name': missing"),
        ("rules:\n  - name: a\n    monitor: m\n", r"field 'actions': missing"),
        ("rules:\n  - name: a\n    monitor: m\n    when: above\n    actions: [log]\n", r"'threshold': is required"),
        # wrong types
        ("rules:\n  - name: a\n    monitor: m\n    when: above\n    threshold: high\n    actions: [log]\n",
         r"field 'threshold': must be a finite number"),
        ("rules:\n  - name: a\n    monitor: m\n    min_change: -1\n    actions: [log]\n", r"'min_change': must be a number >= 0"),
        ("rules:\n  - name: a\n    monitor: m\n    after_step: 1.5\n    actions: [log]\n", r"'after_step': must be an integer"),
        ("rules:\n  - name: a\n    monitor: m\n    actions: halt\n", r"'actions': must be a list"),
        ("rules:\n  - name: a\n    monitor: m\n    actions: []\n", r"'actions': needs at least one"),
        ("rules:\n  - name: 3\n    monitor: m\n    actions: [log]\n", r"field 'name': must be a non-empty string"),
        ("rules:\n  - [name, a]\n", r"rule #0: must be a mapping"),
        # unknown enum values
        ("rules:\n  - name: a\n    monitor: m\n    when: crossing\n    actions: [log]\n", r"'when': unknown value 'crossing'"),
        ("rules:\n  - name: a\n    monitor: m\n    direction: up\n    actions: [log]\n", r"'direction': unknown value 'up'"),
        ("rules:\n  - name: a\n    monitor: m\n    kind: peak\n    actions: [log]\n", r"'kind': unknown value 'peak'"),
        ("rules:\n  - name: a\n    monitor: m\n    actions: [log, stop]\n", r"'actions': unknown action 'stop'"),
        ("rules:\n  - name: a\n    monitor: m\n    actions: [hlat]\n", r"did you mean 'halt'"),
        # fields that do not apply to the rule's 'when'
        ("rules:\n  - name: a\n    monitor: m\n    threshold: 1\n    actions: [log]\n", r"'threshold': only applies to when: above/below"),
        ("rules:\n  - name: a\n    monitor: m\n    when: below\n    threshold: 1\n    direction: increase\n    actions: [log]\n",
         r"'direction': only applies to when: transition"),
        # duplicates
        ("rules:\n  - name: a\n    monitor: m\n    actions: [log]\n  - name: a\n    monitor: n\n    actions: [halt]\n",
         r"rule #1 \('a'\), field 'name': duplicate name 'a'"),
        ("rules:\n  - name: a\n    monitor: m\n    monitor: n\n    actions: [log]\n", r"line 4.*duplicate key 'monitor'"),
        # YAML syntax error, with the line
        ("rules:\n  - name: a\n    monitor: [m\n    actions: [log]\n", r"YAML syntax error at line \d"),
        ("rules:\n  - name: a\n   monitor: m\n", r"YAML syntax error at line 3"),
        # empty file / wrong top level
        ("", r"is empty"),
        ("# only a comment\n", r"is empty"),
        ("- name: a\n", r"top level must be a mapping"),
        ("rule:\n  - name: a\n", r"unknown top-level key 'rule'"),
        ("rules: []\n", r"'rules' must be a non-empty list"),
    ],
)
def test_bad_yaml_raises_rule_config_error(tmp_path, text, pattern):
    p = tmp_path / "rules.yaml"
    p.write_text(text)
    with pytest.raises(RuleConfigError, match=pattern):
        load_rules(p)


def test_missing_file():
    with pytest.raises(RuleConfigError, match="does not exist"):
        load_rules("/nonexistent/rules.yaml")


def test_python_rules_validate_too():
    with pytest.raises(RuleConfigError, match=r"rule 'x', field 'direction'"):
        AlertRule(name="x", monitor="m", direction="sideways", actions=["log"])  # type: ignore[arg-type]
    with pytest.raises(RuleConfigError, match=r"field 'threshold': is required"):
        AlertRule(name="x", monitor="m", when="below", actions=["log"])


def _t(direction="increase", before=1.0, after=2.0, step=50, kind="changepoint", monitor="m"):
    return Transition(monitor, step, step - 5, direction, before, after, kind=kind)


def test_transition_matching():
    r = AlertRule(name="r", monitor="m", direction="increase", min_change=0.5, after_step=20, actions=["log"])
    assert r.matches(_t())
    assert not r.matches(_t(direction="decrease", before=2.0, after=1.0))
    assert not r.matches(_t(after=1.2))  # |change| 0.2 < 0.5
    assert not r.matches(_t(step=10))  # detected before after_step
    assert not r.matches(_t(monitor="other"))
    assert not r.matches(_t(kind="turning_point"))  # default kind: changepoint only
    anyk = AlertRule(name="r", monitor="m", kind="any", actions=["log"])
    assert anyk.matches(_t(kind="turning_point")) and anyk.matches(_t())
    assert AlertRule(name="r", monitor="m", kind="turning_point", actions=["log"]).matches(_t(kind="turning_point"))


def test_threshold_fires_once_per_crossing_with_hysteresis_and_after_step():
    rules = [
        AlertRule(name="hi", monitor="m", when="above", threshold=1.0, hysteresis=0.2, actions=["log"]),
        AlertRule(name="lo", monitor="m", when="below", threshold=0.0, after_step=5, actions=["log"]),
    ]
    eng = RuleEngine(rules)
    series = [(0, -1.0), (1, 0.5), (2, 1.5), (3, 1.7), (4, 0.9), (5, 1.3), (6, 0.7), (7, 1.1), (8, -0.5), (9, -0.6)]
    fired = [(f.rule.name, s) for s, v in series for f in eng.on_point("m", s, v, s)]
    # hi: enters at 2; 0.9 is not below 1.0 - 0.2 so 1.3 is not a new crossing; 0.7 re-arms, 1.1 fires.
    # lo: the point at step 0 is ignored (after_step=5); enters at 8 only.
    assert fired == [("hi", 2), ("hi", 7), ("lo", 8)]
    state = eng.state_dict()
    eng2 = RuleEngine(rules)
    eng2.load_state_dict(state)
    assert eng2.on_point("m", 10, -0.7, 10) == []  # still inside after a resume: no re-fire
    assert [f.rule.name for f in eng2.fired] == ["hi", "hi", "lo"]


def test_rules_module_does_not_import_lightning():
    import subprocess
    import sys

    code = ("import sys, devinterp_lightning.rules, devinterp_lightning.stages.changepoints, "
            "devinterp_lightning.stages.turning_points, devinterp_lightning.stages.segments; "
            "assert not any(m.startswith(('lightning', 'pytorch_lightning')) for m in sys.modules), 'lightning imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("text, value", [("1.5e3", 1500), ("1_500", 1500), ("'1500'", 1500), ("2e2", 200)])
def test_after_step_written_as_yaml_1_1_string_is_accepted(text, value):
    # PyYAML (YAML 1.1) reads 1.5e3 and 1_500 as strings; they are step counts all the same (issue #15 item 8)
    (rule,) = loads_rules(f"rules:\n  - name: a\n    monitor: m\n    after_step: {text}\n    actions: [log]\n")
    assert rule.after_step == value and isinstance(rule.after_step, int)


def test_numeric_strings_for_threshold_and_errors_that_say_how_to_write_them():
    (rule,) = loads_rules("rules:\n  - name: a\n    monitor: m\n    when: above\n    threshold: 1e1\n"
                          "    hysteresis: 5e-1\n    actions: [log]\n")
    assert (rule.threshold, rule.hysteresis) == (10.0, 0.5)
    assert AlertRule(name="a", monitor="m", after_step=1.5e3, actions=["log"]).after_step == 1500
    with pytest.raises(RuleConfigError, match=r"'after_step': must be an integer >= 0 \(a step count such as 1500"):
        loads_rules("rules:\n  - name: a\n    monitor: m\n    after_step: soon\n    actions: [log]\n")
