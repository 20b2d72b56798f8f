"""Alert rules: schema, YAML loading with validation, and evaluation. No Lightning import.

A rule watches one monitored series and fires *actions* (``log``, ``checkpoint``, ``halt``) when

* ``when: transition`` - a confirmed transition of that series matches (``direction``, ``kind``,
  ``min_change``);
* ``when: above`` / ``when: below`` - the series *enters* the region ``value > threshold`` /
  ``value < threshold``. It fires once per entry, not on every point inside; it re-arms when the
  series leaves the region by more than ``hysteresis`` (default 0).

``after_step`` ignores earlier events: transitions whose detection step is ``< after_step`` and points
measured before ``after_step`` (those do not arm or disarm a threshold rule, so a series that is
already inside the region at ``after_step`` fires at its first point from there).
"""

from __future__ import annotations

import difflib
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from devinterp_lightning.stages.events import Transition

When = Literal["transition", "above", "below"]
RuleDirection = Literal["increase", "decrease", "any"]
RuleKind = Literal["changepoint", "turning_point", "any"]
Action = Literal["log", "checkpoint", "halt"]

WHENS = ("transition", "above", "below")
DIRECTIONS = ("increase", "decrease", "any")
KINDS = ("changepoint", "turning_point", "any")
ACTIONS = ("log", "checkpoint", "halt")
FIELDS = ("name", "monitor", "when", "direction", "kind", "min_change", "threshold", "hysteresis",
          "after_step", "actions")
_TRANSITION_ONLY = ("direction", "kind", "min_change")
_THRESHOLD_ONLY = ("threshold", "hysteresis")


class RuleConfigError(ValueError):
    """A mistake in a rule. ``rule`` is the rule's name (or ``#index`` when it has none), ``field`` the key."""

    def __init__(self, message: str, *, rule: str | None = None, field: str | None = None) -> None:
        where = []
        if rule is not None:
            where.append(f"rule {rule}")
        if field is not None:
            where.append(f"field {field!r}")
        super().__init__(f"{', '.join(where)}: {message}" if where else message)
        self.rule = rule
        self.field = field


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


_NUMERIC_FIELDS = ("min_change", "threshold", "hysteresis", "after_step")


def _coerce_numbers(d: Mapping[str, Any]) -> dict[str, Any]:
    """Numbers written as strings become numbers: YAML 1.1 (PyYAML) reads ``1.5e3`` (no dot in the
    mantissa) and ``1_500`` as strings. ``after_step`` also accepts a float with an integral value
    (``1.5e3`` -> 1500). Anything that is not a number is left as it is, for the check to report."""
    out = dict(d)
    for key in _NUMERIC_FIELDS:
        v = out.get(key)
        if isinstance(v, str):
            try:
                v = float(v.strip().replace("_", ""))
            except ValueError:
                continue
            out[key] = v
        if key == "after_step" and isinstance(v, float) and math.isfinite(v) and v.is_integer():
            out[key] = int(v)
    return out


@dataclass(frozen=True)
class AlertRule:
    """One alert rule (see the module docstring and docs/rules.md for the semantics).

    Construction validates every field and raises :class:`RuleConfigError` naming the rule and field.
    """

    name: str
    monitor: str
    actions: tuple[Action, ...]
    when: When = "transition"
    direction: RuleDirection = "any"
    kind: RuleKind = "changepoint"
    min_change: float = 0.0
    threshold: float | None = None
    hysteresis: float = 0.0
    after_step: int = 0

    def __post_init__(self) -> None:
        rule = repr(self.name) if isinstance(self.name, str) and self.name else None
        fields = _coerce_numbers(asdict(self))
        for key in _NUMERIC_FIELDS:
            object.__setattr__(self, key, fields[key])
        _check_rule_fields(fields, rule or "(unnamed)")
        object.__setattr__(self, "actions", tuple(self.actions))
        object.__setattr__(self, "min_change", float(self.min_change))
        object.__setattr__(self, "hysteresis", float(self.hysteresis))
        if self.threshold is not None:
            object.__setattr__(self, "threshold", float(self.threshold))

    def matches(self, transition: Transition) -> bool:
        """Whether a confirmed transition fires this rule (``when == "transition"`` only)."""
        if self.when != "transition" or transition.monitor != self.monitor:
            return False
        if transition.step < self.after_step:
            return False
        if self.kind != "any" and transition.kind != self.kind:
            return False
        if self.direction != "any" and transition.direction != self.direction:
            return False
        return abs(transition.change) >= self.min_change

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["actions"] = list(self.actions)
        return d


def _check_rule_fields(d: Mapping[str, Any], rule: str) -> None:
    def fail(fld: str, msg: str) -> None:
        raise RuleConfigError(msg, rule=rule, field=fld)

    for key in ("name", "monitor"):
        if not isinstance(d.get(key), str) or not d[key].strip():
            fail(key, f"must be a non-empty string, got {d.get(key)!r}")
    when = d.get("when", "transition")
    if when not in WHENS:
        fail("when", f"unknown value {when!r}; use one of {', '.join(WHENS)}")
    if when == "transition":
        if d.get("direction", "any") not in DIRECTIONS:
            fail("direction", f"unknown value {d.get('direction')!r}; use one of {', '.join(DIRECTIONS)}")
        if d.get("kind", "changepoint") not in KINDS:
            fail("kind", f"unknown value {d.get('kind')!r}; use one of {', '.join(KINDS)}")
        mc = d.get("min_change", 0.0)
        if not _is_number(mc) or not math.isfinite(mc) or mc < 0:
            fail("min_change", f"must be a number >= 0, got {mc!r}")
        if d.get("threshold") is not None:
            fail("threshold", "only applies to when: above/below; remove it or change 'when'")
        if d.get("hysteresis", 0.0) not in (0, 0.0):
            fail("hysteresis", "only applies to when: above/below; remove it or change 'when'")
    else:
        th = d.get("threshold")
        if th is None:
            fail("threshold", f"is required for when: {when}")
        if not _is_number(th) or not math.isfinite(th):
            fail("threshold", f"must be a finite number, got {th!r}")
        hy = d.get("hysteresis", 0.0)
        if not _is_number(hy) or not math.isfinite(hy) or hy < 0:
            fail("hysteresis", f"must be a number >= 0, got {hy!r}")
        defaults = {"direction": "any", "kind": "changepoint", "min_change": 0.0}
        for key in _TRANSITION_ONLY:
            if d.get(key, defaults[key]) != defaults[key]:
                fail(key, f"only applies to when: transition; remove it or change 'when' (is {when!r})")
    after = d.get("after_step", 0)
    if not isinstance(after, int) or isinstance(after, bool) or after < 0:
        fail("after_step", f"must be an integer >= 0 (a step count such as 1500 or 1.5e3), got {after!r}")
    actions = d.get("actions")
    if isinstance(actions, str) or not isinstance(actions, (list, tuple)):
        fail("actions", f"must be a list of actions such as [log, halt], got {actions!r}")
    if not actions:
        fail("actions", f"needs at least one action out of {', '.join(ACTIONS)}")
    for a in actions:
        if a not in ACTIONS:
            hint = difflib.get_close_matches(str(a), ACTIONS, n=1)
            fail("actions", f"unknown action {a!r}; use one of {', '.join(ACTIONS)}"
                 + (f" (did you mean {hint[0]!r}?)" if hint else ""))


def parse_rules(data: Any, *, source: str = "rules") -> list[AlertRule]:
    """Build rules from already-parsed data: ``{"rules": [ {...}, ... ]}``. Validates everything."""
    if data is None:
        raise RuleConfigError(f"{source} is empty; it needs a top-level 'rules:' list")
    if not isinstance(data, Mapping):
        raise RuleConfigError(f"{source}: the top level must be a mapping with a 'rules:' list, "
                              f"got {type(data).__name__}")
    extra = [k for k in data if k != "rules"]
    if extra:
        raise RuleConfigError(f"{source}: unknown top-level key {extra[0]!r}; the only one is 'rules'")
    items = data.get("rules")
    if not isinstance(items, list) or not items:
        raise RuleConfigError(f"{source}: 'rules' must be a non-empty list of rules, got {items!r}")
    rules: list[AlertRule] = []
    names: set[str] = set()
    for i, item in enumerate(items):
        label = f"#{i}"
        if isinstance(item, Mapping) and isinstance(item.get("name"), str):
            label = f"#{i} ({item['name']!r})"
        if not isinstance(item, Mapping):
            raise RuleConfigError(f"must be a mapping of fields, got {item!r}", rule=label)
        for key in item:
            if key not in FIELDS:
                hint = difflib.get_close_matches(str(key), FIELDS, n=1)
                raise RuleConfigError(
                    "unknown key" + (f"; did you mean {hint[0]!r}?" if hint else f"; valid keys: {', '.join(FIELDS)}"),
                    rule=label, field=str(key),
                )
        for key in ("name", "monitor", "actions"):
            if key not in item:
                raise RuleConfigError("missing (required)", rule=label, field=key)
        item = _coerce_numbers(item)
        _check_rule_fields(item, label)
        if item["name"] in names:
            raise RuleConfigError(f"duplicate name {item['name']!r}; rule names must be unique", rule=label,
                                  field="name")
        names.add(item["name"])
        rules.append(AlertRule(**{**item, "actions": tuple(item["actions"])}))
    return rules


def _unique_key_loader() -> type:
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    def construct_mapping(loader: Any, node: Any, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, construct_mapping)
    return Loader


def loads_rules(text: str, *, source: str = "<string>") -> list[AlertRule]:
    """Parse rules from YAML text (safe loading; duplicate keys are errors)."""
    import yaml

    if not text.strip():
        raise RuleConfigError(f"{source} is empty; it needs a top-level 'rules:' list")
    try:
        data = yaml.load(text, Loader=_unique_key_loader())  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise RuleConfigError(f"{source}: YAML syntax error{line}: {e.problem or e}") from e
    except yaml.YAMLError as e:
        raise RuleConfigError(f"{source}: YAML error: {e}") from e
    return parse_rules(data, source=source)


def load_rules(path: str | os.PathLike[str]) -> list[AlertRule]:
    """Load and validate a rules file. Raises :class:`RuleConfigError` on any mistake."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise RuleConfigError(f"rules file {path!r} does not exist; pass the path of a YAML file")
    with open(path, encoding="utf-8") as f:
        return loads_rules(f.read(), source=path)


def coerce_rules(rules: str | os.PathLike[str] | AlertRule | Iterable[AlertRule] | None) -> list[AlertRule]:
    """Accept a path, one rule, a list of rules or None; check names are unique."""
    if rules is None:
        return []
    if isinstance(rules, (str, os.PathLike)):
        return load_rules(rules)
    if isinstance(rules, AlertRule):
        return [rules]
    out = list(rules)
    names: set[str] = set()
    for i, r in enumerate(out):
        if not isinstance(r, AlertRule):
            raise RuleConfigError(f"expected an AlertRule, got {type(r).__name__}", rule=f"#{i}")
        if r.name in names:
            raise RuleConfigError(f"duplicate name {r.name!r}", rule=f"#{i}", field="name")
        names.add(r.name)
    return out


@dataclass(frozen=True)
class Firing:
    """A rule that fired: at trainer ``step``, because of ``transition`` or of a threshold crossing."""

    rule: AlertRule
    step: int
    transition: Transition | None = None
    value: float | None = None

    def describe(self) -> str:
        r = self.rule
        if self.transition is not None:
            t = self.transition
            what = (f"{t.kind} {t.direction} of {t.monitor} at step {t.changepoint_step} "
                    f"({t.level_before:.4g} -> {t.level_after:.4g}, detected at step {t.step})")
        else:
            side = ">" if r.when == "above" else "<"
            what = f"{r.monitor} = {self.value:.4g} {side} {r.threshold:g}"
        return f"rule {r.name!r} fired at step {self.step}: {what}; actions: {', '.join(r.actions)}"


@dataclass
class RuleEngine:
    """Evaluates rules against transitions and points; keeps the above/below arming state."""

    rules: Sequence[AlertRule]
    _inside: dict[str, bool] = field(default_factory=dict)  # rule name -> currently in region
    fired: list[Firing] = field(default_factory=list)

    @property
    def monitors(self) -> list[str]:
        return list(dict.fromkeys(r.monitor for r in self.rules))

    def on_transition(self, transition: Transition, step: int) -> list[Firing]:
        out = [Firing(r, step, transition=transition) for r in self.rules if r.matches(transition)]
        self.fired.extend(out)
        return out

    def on_point(self, monitor: str, point_step: int, value: float, step: int) -> list[Firing]:
        out = []
        for r in self.rules:
            if r.monitor != monitor or r.when == "transition" or point_step < r.after_step:
                continue
            if not math.isfinite(value):
                continue
            assert r.threshold is not None
            if r.when == "above":
                inside, leave = value > r.threshold, value <= r.threshold - r.hysteresis
            else:
                inside, leave = value < r.threshold, value >= r.threshold + r.hysteresis
            was = self._inside.get(r.name, False)
            if inside and not was:
                out.append(Firing(r, step, value=value))
                self._inside[r.name] = True
            elif was and leave:
                self._inside[r.name] = False
        self.fired.extend(out)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "inside": dict(self._inside),
            "fired": [
                {"rule": f.rule.name, "step": f.step, "value": f.value,
                 "transition": None if f.transition is None else f.transition.to_dict()}
                for f in self.fired
            ],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._inside = {str(k): bool(v) for k, v in state.get("inside", {}).items()}
        by_name = {r.name: r for r in self.rules}
        self.fired = [
            Firing(by_name[f["rule"]], int(f["step"]),
                   transition=None if f["transition"] is None else Transition.from_dict(f["transition"]),
                   value=f["value"])
            for f in state.get("fired", []) if f["rule"] in by_name
        ]
