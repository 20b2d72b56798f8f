"""TensorBoard stage markers.

TensorBoard cannot draw vertical lines on a scalar chart, so a stage is shown four ways:

* ``stage/index`` (``stage/<monitor>/index`` for other monitors): a step-function scalar, sent to
  every logger (CSV included); when a transition is confirmed the StageDetector writes it again from
  the onset on, so that TensorBoard (which drops a tag's points from a step written again) shows
  the switch at the onset (docs/tensorboard.md);
* ``<monitor>_lower`` / ``<monitor>_upper``: ``mean -+ std`` of each point, also to every logger;
* a text entry per transition (``stages/<monitor>``, a small Markdown table) and per fired rule
  (``rules/<name>``), for people; next to each, a structured JSON record for programs
  (``stages/<monitor>/json``, ``rules/<name>/json``; see :mod:`devinterp_lightning.tags`), and one
  record per unhealthy point of a watched series (``stages/<monitor>/flagged``);
* an image ``stages/<monitor>/curve``: the curve with shaded stages and changepoint lines;
* one custom-scalars layout per run: the monitor with its std band (a Margin chart) next to every
  scalar whose name contains "loss".

Everything here works on ``torch.utils.tensorboard.SummaryWriter``-like objects (the
``experiment`` of Lightning's ``TensorBoardLogger``; on ranks other than 0 Lightning hands out a
dummy that ignores calls).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

from devinterp_lightning import tags
from devinterp_lightning.logging.figures import stage_figure_rgb
from devinterp_lightning.stages.events import Stage, Transition
from devinterp_lightning.tags import band_keys, stage_index_key

__all__ = ["TensorBoardStageSink", "band_keys", "band_metrics", "custom_scalars_layout", "stage_index_key",
           "transition_markdown"]


def band_metrics(monitor: str, value: float, std: float) -> dict[str, float]:
    """``{lower: value - std, upper: value + std}``, or ``{}`` when ``std`` is unknown."""
    if not math.isfinite(std):
        return {}
    lo, hi = band_keys(monitor)
    return {lo: value - std, hi: value + std}


def transition_markdown(t: Transition, stage_index: int | None = None) -> str:
    """A two-row Markdown table describing one transition."""
    cols = ["monitor", "kind", "direction", "onset step", "detected at", "delay", "before", "after", "change"]
    vals = [t.monitor, t.kind, t.direction, str(t.changepoint_step), str(t.step), str(t.detection_delay),
            f"{t.level_before:.5g}", f"{t.level_after:.5g}", f"{t.change:+.5g}"]
    if stage_index is not None:
        cols.append("new stage")
        vals.append(str(stage_index))
    return "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n| " + " | ".join(vals) + " |"


def custom_scalars_layout(monitor: str, loss_regex: str = r".*loss.*") -> dict[str, Any]:
    """Layout for ``SummaryWriter.add_custom_scalars``: Margin chart of the monitor and its band,
    a Multiline chart of the losses and one of the stage index."""
    lo, hi = band_keys(monitor)
    return {
        "devinterp": {
            f"{monitor} ± std": ["Margin", [monitor, lo, hi]],
            "loss": ["Multiline", [loss_regex]],
            "stage": ["Multiline", [tags.STAGE_PREFIX + ".*"]],
        }
    }


class TensorBoardStageSink:
    """Writes stage markers to a set of SummaryWriters."""

    def __init__(self, writers: Iterable[Any]) -> None:
        self.writers = list(writers)
        #: the detector's main monitor (set by :meth:`write_layout`): its stage index is ``stage/index``
        self.main_monitor: str | None = None

    def __bool__(self) -> bool:
        return bool(self.writers)

    def write_layout(self, monitor: str) -> None:
        """The custom-scalars layout, and a ``"detector"`` record (``stages/<monitor>/json`` at step 0)
        that names the main monitor: a reader then knows the monitor was watched (so a point without
        a ``flagged`` record was healthy) and that its stage index is ``stage/index``."""
        self.main_monitor = monitor
        record = tags.detector_record(monitor, tags.STAGE_INDEX)
        for w in self.writers:
            w.add_custom_scalars(custom_scalars_layout(monitor))
            w.add_text(tags.transition_record_tag(monitor), record, global_step=0)

    def write_transition(self, t: Transition, step: int, stage_index: int | None = None) -> None:
        """The Markdown table (``stages/<monitor>``) and the JSON record (``stages/<monitor>/json``)."""
        if not self.writers:
            return
        index_tag = stage_index_key(t.monitor, self.main_monitor or t.monitor)
        record = tags.transition_record(t, stage_index, index_tag)
        for w in self.writers:
            w.add_text(tags.transition_text_tag(t.monitor), transition_markdown(t, stage_index), global_step=step)
            w.add_text(tags.transition_record_tag(t.monitor), record, global_step=step)

    def write_rule(self, rule_name: str, text: str, step: int) -> None:
        """The firing's description (``rules/<name>``) and its JSON record (``rules/<name>/json``)."""
        record = tags.rule_record(rule_name, step, text)
        for w in self.writers:
            w.add_text(tags.rule_text_tag(rule_name), text, global_step=step)
            w.add_text(tags.rule_record_tag(rule_name), record, global_step=step)

    def write_flagged(self, monitor: str, step: int, value: float, std: float, flags: Sequence[str]) -> None:
        """The JSON record of one unhealthy point (``stages/<monitor>/flagged``) at its own ``step``:
        the report draws these points apart and keeps them from setting the axis."""
        if not self.writers or not flags:
            return
        record = tags.flagged_record(monitor, step, value, std, flags)
        for w in self.writers:
            w.add_text(tags.flagged_record_tag(monitor), record, global_step=int(step))

    def write_curve(
        self,
        monitor: str,
        steps: Sequence[int],
        values: Sequence[float],
        stds: Sequence[float] | None,
        stages: Sequence[Stage],
        transitions: Sequence[Transition],
        step: int,
    ) -> None:
        if not self.writers or not len(steps):
            return
        img = stage_figure_rgb(monitor, steps, values, stds, stages, transitions)
        for w in self.writers:
            w.add_image(tags.stage_curve_tag(monitor), img, global_step=step, dataformats="HWC")

    def flush(self) -> None:
        for w in self.writers:
            flush = getattr(w, "flush", None)
            if callable(flush):
                flush()
