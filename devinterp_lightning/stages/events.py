"""The events the stage detector emits and the rules react to."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

Direction = Literal["increase", "decrease"]
EventKind = Literal["changepoint", "turning_point"]


@dataclass(frozen=True)
class Transition:
    """A confirmed change in a monitored series.

    ``step`` is the global step at which the change was *confirmed* (when it is reported and
    written to the loggers); ``changepoint_step`` is the estimated onset, always ``<= step``.

    For ``kind == "changepoint"`` the levels are the series' means over the segments before and
    after the changepoint and ``direction`` is the sign of ``level_after - level_before``
    ("increase": new structure forming; "decrease": compression). For
    ``kind == "turning_point"`` the slope of the series changed sign at ``changepoint_step``;
    ``direction`` is the direction *after* the turn (a peak is followed by "decrease").
    """

    monitor: str
    step: int
    changepoint_step: int
    direction: Direction
    level_before: float
    level_after: float
    kind: EventKind = "changepoint"

    @property
    def change(self) -> float:
        """``level_after - level_before``."""
        return self.level_after - self.level_before

    @property
    def detection_delay(self) -> int:
        """Steps between the estimated onset and the confirmation: ``step - changepoint_step``."""
        return self.step - self.changepoint_step

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Transition:
        return cls(**data)


@dataclass(frozen=True)
class Stage:
    """A stretch of training between two consecutive changepoints of one series.

    ``end_step`` is ``None`` for the current, still open, stage.
    """

    index: int
    start_step: int
    end_step: int | None
    level: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Stage:
        return cls(**data)
