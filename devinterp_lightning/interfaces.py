"""What callbacks promise each other, declared instead of sniffed.

* :class:`SeriesProvider`: a callback that keeps a :class:`~devinterp_lightning.series.SeriesStore`
  of the points it measured (``LLCMonitor``, ``EssentialDynamics``). The stage detector reads new
  points, with their standard errors and health flags, from ``history``.
* :class:`TransitionPublisher`: a callback that finds transitions itself (``EssentialDynamics``'
  turning points) and hands them to the stage detector, which applies the rules to them.

Both are ``runtime_checkable`` protocols: a user's own callback takes part by having the
attribute or method, with no base class to inherit.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from devinterp_lightning.series import SeriesStore
from devinterp_lightning.stages.events import Transition

__all__ = ["SeriesProvider", "TransitionPublisher", "series_providers", "transition_publishers"]


@runtime_checkable
class SeriesProvider(Protocol):
    #: every measured point, by logged key (``"llc/mean"``, ``"ed/pc1"``)
    history: SeriesStore


@runtime_checkable
class TransitionPublisher(Protocol):
    def published_transitions(self, monitor: str) -> list[Transition]:
        """Every transition of ``monitor`` confirmed so far (never retracted), in confirmation order."""
        ...


def series_providers(callbacks: list[object]) -> list[SeriesProvider]:
    return [cb for cb in callbacks if isinstance(cb, SeriesProvider) and isinstance(cb.history, SeriesStore)]


def transition_publishers(callbacks: list[object]) -> list[TransitionPublisher]:
    return [cb for cb in callbacks if isinstance(cb, TransitionPublisher)]
