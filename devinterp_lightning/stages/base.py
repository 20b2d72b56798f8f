"""The interface every tracker implements (in the style of ruptures' base classes).

A tracker watches one growing series and confirms transitions in it. It is fed the *whole*
series each time a point arrives (``update``), returns the transitions that this update
confirmed, keeps every confirmed transition in ``transitions`` (never retracted), and
round-trips its state through ``state_dict`` / ``load_state_dict`` so a resumed run goes on
where it stopped.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

from devinterp_lightning.stages.events import Transition

__all__ = ["Tracker", "replay"]


class Tracker(ABC):
    """Confirms transitions of one growing series.

    Attributes:
        monitor: the name of the series, copied into every :class:`Transition`.
        transitions: every transition confirmed so far, in confirmation order.
    """

    monitor: str
    transitions: list[Transition]

    @abstractmethod
    def update(
        self,
        steps: Sequence[int],
        values: Sequence[float],
        *,
        stderrs: Sequence[float] | None = None,
        now: int | None = None,
    ) -> list[Transition]:
        """Take the whole series so far; return the transitions confirmed by this update.

        Args:
            steps: the global step of each point (non-decreasing).
            values: the series.
            stderrs: per-point standard errors (may contain nan), a lower bound on the noise.
            now: the step at which the decision is made (``Transition.step``); default: the last step.
        """

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: JSON-able values only."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""


def replay(tracker: Tracker, steps: Sequence[int], values: Sequence[float],
           stderrs: Sequence[float] | None = None) -> list[Transition]:
    """Feed a tracker the growing prefixes of a series, as a training run would, and return every
    transition it confirmed (each with the step at which it was confirmed)."""
    for k in range(1, len(values) + 1):
        tracker.update(steps[:k], values[:k], stderrs=None if stderrs is None else stderrs[:k])
    return list(tracker.transitions)
