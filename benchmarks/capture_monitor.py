"""Run an example's ``main`` and keep the :class:`~devinterp_lightning.LLCMonitor` it builds, whose
history holds what ``main`` does not return (per-point standard errors, health flags). The example
itself is not changed: its module's ``LLCMonitor`` name is swapped, for the call, for a subclass
that remembers its instances."""

from __future__ import annotations

import tempfile
import time
from types import ModuleType
from typing import Any


def run_capturing_monitor(example: ModuleType, argv: list[str]) -> tuple[dict[str, Any], Any, float]:
    """``(example.main(argv + [--logdir <temporary>]), the first LLCMonitor it built, wall seconds)``."""
    captured: list[Any] = []
    original = example.LLCMonitor

    class Capturing(original):  # type: ignore[misc, valid-type]
        def __init__(self, *a: Any, **kw: Any) -> None:
            super().__init__(*a, **kw)
            captured.append(self)

    example.LLCMonitor = Capturing
    try:
        with tempfile.TemporaryDirectory() as logdir:
            start = time.perf_counter()
            result = example.main([*argv, "--logdir", logdir])
            seconds = time.perf_counter() - start
    finally:
        example.LLCMonitor = original
    return result, captured[0], seconds


def llc_points(monitor: Any, tag: str = "llc/mean") -> dict[str, list[Any]]:
    """The monitor's history of ``tag`` as the columns the stage benchmark replays."""
    points = monitor.history.get(tag)
    return {"steps": [p.step for p in points], "values": [p.value for p in points], "std": [p.std for p in points],
            "stderr": [p.stderr for p in points], "flags": [list(p.flags) for p in points]}
