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
"""

from __future__ import annotations

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
