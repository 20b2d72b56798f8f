"""The series store: step-indexed scalar series shared by the probes and the stage detector.

A probe (``LLCMonitor``, ``EssentialDynamics``) appends one :class:`SeriesPoint` per estimate
under the key it logs (``"llc/mean"``, ``"llc/layer2/mean"``, ...). The stage detector reads
the series, with its noise level, from there.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class SeriesPoint:
    """One value of a series.

    Attributes:
        step: trainer global step (optimizer steps) at which the value was measured.
        value: the value (for an LLC: the mean over chains).
        std: spread of the measurement (for an LLC: standard deviation across chains); nan if unknown.
        stderr: standard error of ``value``; nan if unknown.
        flags: health flags of the measurement (see ``LLCResult.flags``); empty when healthy.
    """

    step: int
    value: float
    std: float = math.nan
    stderr: float = math.nan
    flags: tuple[str, ...] = field(default=())

    @property
    def healthy(self) -> bool:
        return not self.flags


class SeriesStore:
    """Ordered series of :class:`SeriesPoint` by key, with ``state_dict`` round-tripping."""

    def __init__(self) -> None:
        self._series: dict[str, list[SeriesPoint]] = {}

    def append(self, key: str, point: SeriesPoint) -> None:
        points = self._series.setdefault(key, [])
        if points and point.step < points[-1].step:
            raise ValueError(f"series {key!r}: step {point.step} is before the last step {points[-1].step}")
        points.append(point)

    def __getitem__(self, key: str) -> list[SeriesPoint]:
        return self._series[key]

    def get(self, key: str) -> list[SeriesPoint]:
        return self._series.get(key, [])

    def __contains__(self, key: object) -> bool:
        return key in self._series

    def __iter__(self) -> Iterator[str]:
        return iter(self._series)

    def __len__(self) -> int:
        return len(self._series)

    def keys(self) -> list[str]:
        return list(self._series)

    def steps(self, key: str) -> list[int]:
        return [p.step for p in self.get(key)]

    def values(self, key: str) -> list[float]:
        return [p.value for p in self.get(key)]

    def state_dict(self) -> dict[str, Any]:
        return {key: [asdict(p) for p in points] for key, points in self._series.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._series = {
            key: [SeriesPoint(**{**p, "flags": tuple(p.get("flags", ()))}) for p in points]
            for key, points in state.items()
        }
