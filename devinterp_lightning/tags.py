"""The names of everything the callbacks log, in one place.

The sinks write these tags, the callbacks choose them, and the report reads them back; none of
them spells a tag out by hand. Changing a name here changes it for all three.

Scalars:

* ``llc/mean``, ``llc/std``, ``llc/<name>/mean``: the LLC estimates (:func:`llc_key`);
* ``<monitor>_lower`` / ``<monitor>_upper``: ``mean -+ std`` band (:func:`band_keys`);
* ``stage/index`` and ``stage/<monitor>/index``: the stage index (:func:`stage_index_key`);
* ``ed/pc<i>``, ``ed/explained_variance``: essential-dynamics coordinates.

Text and images:

* ``stages/<monitor>`` (a transition), ``rules/<name>`` (a fired rule);
* ``stages/<monitor>/curve`` (the stage image), ``ed/trajectory`` (the trajectory image);
* ``ed/turning_points`` and ``ed/trajectory_final``.

Structured records (for programs: the report reads these, never the display Markdown). Each is
a text summary holding one JSON object with ``"record"`` (its kind) and ``"version"``:

* ``stages/<monitor>/json`` (:func:`transition_record_tag`): at step 0 a ``"detector"`` record
  naming the StageDetector's main monitor (:func:`detector_record`); then one ``"transition"`` record per
  transition, written at the confirmation step: the :class:`~devinterp_lightning.stages.events.Transition`
  fields (onset ``changepoint_step``, confirmation ``step``, ``direction``, ``level_before``,
  ``level_after``, ``kind``), plus ``stage_index`` (the index of the newest stage after it) and
  ``stage_index_tag`` (the scalar that carries that monitor's stage index);
* ``stages/<monitor>/flagged`` (:func:`flagged_record_tag`): one ``"flagged"`` record per unhealthy
  point of a watched series (``step``, ``value``, ``std``, ``flags``);
* ``rules/<name>/json`` (:func:`rule_record_tag`): one ``"rule"`` record per firing (``rule``,
  ``step``, ``text``).

:func:`encode_record` writes them and :func:`decode_record` reads them back.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

#: prefix of every LLC scalar
LLC_PREFIX = "llc"
#: the unrestricted LLC estimate
LLC_MEAN = "llc/mean"
#: the stage index of the main monitor (the StageDetector's ``monitor``)
STAGE_INDEX = "stage/index"
STAGE_PREFIX = "stage/"
#: essential dynamics
ED_PREFIX = "ed/"
ED_TRAJECTORY = "ed/trajectory"
ED_EXPLAINED_VARIANCE = "ed/explained_variance"
ED_TURNING_POINTS = "ed/turning_points"
ED_TRAJECTORY_FINAL = "ed/trajectory_final"


def llc_key(base: str, stat: str = "mean") -> str:
    """``llc_key("llc") == "llc/mean"``; ``llc_key("llc/layer2", "std") == "llc/layer2/std"``."""
    return f"{base}/{stat}"


def band_keys(monitor: str) -> tuple[str, str]:
    """Scalar names of the std band around ``monitor``: ``llc/mean_lower``, ``llc/mean_upper``."""
    return f"{monitor}_lower", f"{monitor}_upper"


def stage_index_key(monitor: str, main_monitor: str) -> str:
    """``stage/index`` for the detector's main monitor, ``stage/<monitor>/index`` for the others."""
    return STAGE_INDEX if monitor == main_monitor else f"{STAGE_PREFIX}{monitor}/index"


def is_stage_index(tag: str) -> bool:
    return tag.startswith(STAGE_PREFIX) and tag.endswith("index")


def transition_text_tag(monitor: str) -> str:
    return f"stages/{monitor}"


def rule_text_tag(rule_name: str) -> str:
    return f"rules/{rule_name}"


def stage_curve_tag(monitor: str) -> str:
    return f"stages/{monitor}/curve"


def ed_component(i: int) -> str:
    """``ed/pc1`` for ``i == 0``."""
    return f"{ED_PREFIX}pc{i + 1}"


def stage_index_tags(tags: Iterable[str]) -> list[str]:
    """The stage-index scalar tags among ``tags``, the main monitor's ``stage/index`` first."""
    found = sorted(t for t in tags if is_stage_index(t))
    return sorted(found, key=lambda t: t != STAGE_INDEX)


def is_band(tag: str) -> bool:
    """``<monitor>_lower`` / ``<monitor>_upper`` (see :func:`band_keys`)."""
    return tag.endswith(("_lower", "_upper"))


# ---------------------------------------------------------------------------------------------------
# Structured records
# ---------------------------------------------------------------------------------------------------
#: the version written into every record; a reader skips records of a newer version
RECORD_VERSION = 1
RECORD_SUFFIX = "/json"
FLAGGED_SUFFIX = "/flagged"


def transition_record_tag(monitor: str) -> str:
    """``stages/<monitor>/json``: the JSON records of the transitions of ``monitor``."""
    return f"stages/{monitor}{RECORD_SUFFIX}"


def flagged_record_tag(monitor: str) -> str:
    """``stages/<monitor>/flagged``: the JSON records of the unhealthy (flagged) points of ``monitor``."""
    return f"stages/{monitor}{FLAGGED_SUFFIX}"


def rule_record_tag(rule_name: str) -> str:
    """``rules/<name>/json``: the JSON records of the firings of rule ``name``."""
    return f"rules/{rule_name}{RECORD_SUFFIX}"


def is_record_tag(tag: str) -> bool:
    """True for the tags of structured records (written for programs, not for reading)."""
    tag = tag.removesuffix(TEXT_SUFFIX)
    return tag.startswith(("stages/", "rules/")) and tag.endswith((RECORD_SUFFIX, FLAGGED_SUFFIX))


#: the suffix ``torch.utils.tensorboard`` appends to every text tag
TEXT_SUFFIX = "/text_summary"


def _plain(value: Any) -> Any:
    # JSON has no NaN or infinity: an unknown std or a diverged estimate becomes a string
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def encode_record(kind: str, fields: Mapping[str, Any]) -> str:
    """One record as a JSON object: ``{"record": kind, "version": RECORD_VERSION, **fields}``.

    Non-finite floats are written as the strings ``"nan"``, ``"inf"``, ``"-inf"`` (standard JSON
    has no such numbers); :func:`decode_record` turns them back into floats."""
    body = {"record": kind, "version": RECORD_VERSION}
    body.update({k: [_plain(x) for x in v] if isinstance(v, (list, tuple)) else _plain(v)
                 for k, v in fields.items()})
    return json.dumps(body, sort_keys=True)


_NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
_FLOAT_FIELDS = ("value", "std", "level_before", "level_after")


def decode_record(text: str) -> dict[str, Any] | None:
    """The record in ``text``, or None when ``text`` is not a record this version can read."""
    try:
        body = json.loads(text)
    except ValueError:
        return None
    if not isinstance(body, dict) or "record" not in body or not isinstance(body.get("version"), int):
        return None
    if body["version"] > RECORD_VERSION:
        return None
    for key in _FLOAT_FIELDS:
        if isinstance(body.get(key), str) and body[key] in _NONFINITE:
            body[key] = _NONFINITE[body[key]]
    return body


def transition_record(transition: Any, stage_index: int | None, stage_index_tag: str | None) -> str:
    """The ``"transition"`` record of a :class:`~devinterp_lightning.stages.events.Transition`."""
    return encode_record("transition", {**transition.to_dict(), "stage_index": stage_index,
                                        "stage_index_tag": stage_index_tag})


def detector_record(monitor: str, stage_index_tag: str) -> str:
    """The ``"detector"`` record: a StageDetector watches ``monitor`` (its main monitor), and writes
    its stage index as ``stage_index_tag``."""
    return encode_record("detector", {"monitor": monitor, "stage_index_tag": stage_index_tag, "step": 0})


def flagged_record(monitor: str, step: int, value: float, std: float, flags: Sequence[str]) -> str:
    """The ``"flagged"`` record of one unhealthy point."""
    return encode_record("flagged", {"monitor": monitor, "step": int(step), "value": float(value),
                                     "std": float(std), "flags": list(flags)})


def rule_record(rule_name: str, step: int, text: str) -> str:
    """The ``"rule"`` record of one firing."""
    return encode_record("rule", {"rule": rule_name, "step": int(step), "text": text})


# ---------------------------------------------------------------------------------------------------
# The essential-dynamics trajectory text (``ed/trajectory_final``)
# ---------------------------------------------------------------------------------------------------
def parse_trajectory_csv(text: str) -> tuple[list[int], list[list[float]]] | None:
    """``(steps, rows)`` from the CSV that ``ed/trajectory_final`` holds (a ``step,pc1,pc2,...``
    header, then one line per snapshot; surrounding prose and code fences are ignored), or None
    when it holds fewer than 3 rows of at least 2 components."""
    steps: list[int] = []
    rows: list[list[float]] = []
    for line in text.splitlines():
        parts = line.strip().split(",")
        try:
            nums = [float(p) for p in parts]
        except ValueError:
            continue
        if len(nums) < 3 or (rows and len(nums) != len(rows[0]) + 1):
            continue
        steps.append(int(nums[0]))
        rows.append(nums[1:])
    return (steps, rows) if len(rows) >= 3 else None
