"""When a probe measures: schedules over the trainer's global step (optimizer steps).

A schedule is a pure predicate ``is_due(step)`` over non-negative integer steps plus the helpers a
callback needs to validate it before training starts. No Lightning import.

- :class:`EveryNSteps` -- ``start, start + n, start + 2n, ...`` (linear; constant overhead per step).
- :class:`LogSpaced` -- geometrically spaced steps, dense early (where most stage transitions
  happen) and sparse late; total cost grows like ``log(max_steps)`` instead of ``max_steps``.
- :class:`ExplicitSteps` -- exactly the listed steps.
- :class:`Adaptive` -- the interval halves when consecutive measurements differ by more than
  ``threshold`` standard errors and doubles when they do not: dense around transitions, sparse
  on plateaus. It is fed the measurements (``observe``) and keeps state (``state_dict``).

:func:`as_schedule` turns the short forms accepted by the callbacks (an ``int`` or a list of
``int``) into one of these.
"""

from __future__ import annotations

import bisect
import math
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence

__all__ = ["Adaptive", "EveryNSteps", "ExplicitSteps", "LogSpaced", "Schedule", "as_schedule"]


def _unbounded(total_steps: float) -> bool:
    """An unknown run length: ``inf``, or ``-1`` as ``Trainer.estimated_stepping_batches`` and
    ``max_steps`` spell it."""
    return math.isinf(total_steps) or total_steps < 0


class Schedule(ABC):
    """Which global steps are due. Steps are optimizer steps (``trainer.global_step``)."""

    @abstractmethod
    def is_due(self, step: int) -> bool:
        """True when a measurement is due after ``step`` optimizer steps."""

    @abstractmethod
    def next_due(self, step: int) -> int | None:
        """The smallest due step ``>= step``; ``None`` when no further step is due."""

    def due_steps(self, stop: int) -> list[int]:
        """All due steps in ``[0, stop]`` (inclusive), ascending."""
        out: list[int] = []
        step = self.next_due(0)
        while step is not None and step <= stop:
            out.append(step)
            step = self.next_due(step + 1)
        return out

    def validate(self, total_steps: float) -> None:
        """Raise ``ValueError`` when the schedule cannot fire during a run of ``total_steps`` steps.

        ``total_steps`` may be ``inf`` or negative (an unbounded or unknown run length, as Lightning
        reports for an ``IterableDataset`` without ``max_steps``); then nothing is checked and the
        schedule goes on as long as training does. A schedule whose only due step within the run is step 0 is also rejected: it would
        measure the initialization and never again.
        """
        if _unbounded(total_steps):
            return
        total = int(total_steps)
        first = self.next_due(1)
        if first is None or first > total:
            raise ValueError(
                f"{self!r} has no step in 1..{total}, the number of optimizer steps this run will take "
                f"(max_steps or max_epochs x batches / accumulate_grad_batches): it would never measure "
                "after initialization. Use a smaller interval (every_n_steps), an explicit list of steps "
                "inside the run, or raise max_steps."
            )


class EveryNSteps(Schedule):
    """Due at ``start, start + n, start + 2n, ...``.

    Args:
        n: interval in optimizer steps (>= 1).
        start: first due step (>= 0). With the default 0 the initialization (step 0) is measured too,
            which gives the stage detector a baseline.
    """

    def __init__(self, n: int, start: int = 0) -> None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"every_n_steps must be a positive integer (optimizer steps), got {n!r}")
        if isinstance(start, bool) or not isinstance(start, int) or start < 0:
            raise ValueError(f"start must be a non-negative integer step, got {start!r}")
        self.n = n
        self.start = start

    def is_due(self, step: int) -> bool:
        return step >= self.start and (step - self.start) % self.n == 0

    def next_due(self, step: int) -> int | None:
        if step <= self.start:
            return self.start
        return self.start + -(-(step - self.start) // self.n) * self.n

    def __repr__(self) -> str:
        return f"EveryNSteps(n={self.n}, start={self.start})"


class LogSpaced(Schedule):
    """Geometrically spaced steps: ``per_decade`` measurements per factor of 10 in the step.

    The due steps are ``0`` (if ``include_zero``) and ``round(start * 10 ** (k / per_decade))`` for
    ``k = 0, 1, ...`` (duplicates after rounding removed), with the gap between consecutive steps
    capped at ``max_interval`` when given (log-spaced early, linear late).

    Example: ``LogSpaced(start=10, per_decade=5)`` is due at 0, 10, 16, 25, 40, 63, 100, 158, ...

    Args:
        start: first non-zero due step (>= 1).
        per_decade: measurements per decade of steps (>= 1).
        max_interval: optional upper bound on the gap between due steps, in optimizer steps.
        include_zero: also measure at step 0 (the initialization).
    """

    def __init__(
        self, start: int = 10, per_decade: int = 10, max_interval: int | None = None, include_zero: bool = True
    ) -> None:
        if isinstance(start, bool) or not isinstance(start, int) or start < 1:
            raise ValueError(f"LogSpaced start must be a positive integer step, got {start!r}")
        if isinstance(per_decade, bool) or not isinstance(per_decade, int) or per_decade < 1:
            raise ValueError(f"LogSpaced per_decade must be a positive integer, got {per_decade!r}")
        if max_interval is not None and (not isinstance(max_interval, int) or max_interval < 1):
            raise ValueError(f"LogSpaced max_interval must be a positive integer or None, got {max_interval!r}")
        self.start = start
        self.per_decade = per_decade
        self.max_interval = max_interval
        self.include_zero = include_zero
        self._steps: list[int] = ([0] if include_zero else []) + [start]
        self._k = 0  # exponent of the last geometric point generated
        self._last_geometric = float(start)

    def _extend_to(self, step: int) -> None:
        # Generate lazily: the sequence is infinite and only the prefix up to the queried step is needed.
        while self._steps[-1] < step:
            last = self._steps[-1]
            while True:
                self._k += 1
                candidate = round(self.start * 10 ** (self._k / self.per_decade))
                if candidate > last:
                    break
            if self.max_interval is not None:
                candidate = min(candidate, last + self.max_interval)
                # Keep the geometric exponent in step with the capped sequence: once capped, the
                # sequence is linear from here on.
                if candidate == last + self.max_interval:
                    self._k -= 1
            self._steps.append(candidate)

    def is_due(self, step: int) -> bool:
        if step < 0:
            return False
        self._extend_to(step)
        i = bisect.bisect_left(self._steps, step)
        return i < len(self._steps) and self._steps[i] == step

    def next_due(self, step: int) -> int | None:
        self._extend_to(max(step, 0))
        i = bisect.bisect_left(self._steps, max(step, 0))
        return self._steps[i]

    def __repr__(self) -> str:
        return (
            f"LogSpaced(start={self.start}, per_decade={self.per_decade}, "
            f"max_interval={self.max_interval}, include_zero={self.include_zero})"
        )


class ExplicitSteps(Schedule):
    """Due exactly at the given steps (duplicates removed, order irrelevant)."""

    def __init__(self, steps: Sequence[int]) -> None:
        steps = list(steps)
        if not steps:
            raise ValueError("an explicit schedule needs at least one step, got an empty list")
        bad = [s for s in steps if isinstance(s, bool) or not isinstance(s, int) or s < 0]
        if bad:
            raise ValueError(f"explicit schedule steps must be non-negative integers, got {bad!r}")
        self.steps = sorted(set(steps))
        self._set = frozenset(self.steps)

    def is_due(self, step: int) -> bool:
        return step in self._set

    def next_due(self, step: int) -> int | None:
        i = bisect.bisect_left(self.steps, step)
        return self.steps[i] if i < len(self.steps) else None

    def validate(self, total_steps: float) -> None:
        # explicit steps are taken literally (``[0]`` measures only the initialization, on purpose)
        if _unbounded(total_steps):
            return
        beyond = [s for s in self.steps if s > total_steps]
        if beyond:
            raise ValueError(
                f"explicit schedule steps {beyond} are beyond the {int(total_steps)} optimizer steps this run "
                "will take (max_steps or max_epochs x batches / accumulate_grad_batches); they would never "
                "be measured. Remove them or raise max_steps."
            )

    def __iter__(self) -> Iterator[int]:
        return iter(self.steps)

    def __repr__(self) -> str:
        return f"ExplicitSteps({self.steps})"


class Adaptive(Schedule):
    """Measurement interval that adapts to how fast the measured value moves.

    After a measurement ``v`` with standard error ``se`` at step ``t``, compared with the previous
    one ``(v', se')``: if ``|v - v'| > threshold * sqrt(se^2 + se'^2)`` the interval halves (down to
    ``min_interval``), otherwise it doubles (up to ``max_interval``); the next due step is ``t +
    interval``. Without an observation the schedule advances by the current interval. The first
    due step is 0 (or ``min_interval`` when ``include_zero`` is False), the first interval is
    ``min_interval``.

    The decisions depend only on the measured values, so a run is as deterministic as its
    estimates; :meth:`state_dict` carries the state across a resume.

    Args:
        min_interval: smallest gap between measurements, in optimizer steps (>= 1).
        max_interval: largest gap, in optimizer steps (>= ``min_interval``).
        threshold: change, in combined standard errors, that counts as movement (> 0).
        include_zero: measure the initialization (step 0).
    """

    def __init__(
        self, min_interval: int = 10, max_interval: int = 1000, threshold: float = 2.0, include_zero: bool = True
    ) -> None:
        if isinstance(min_interval, bool) or not isinstance(min_interval, int) or min_interval < 1:
            raise ValueError(f"Adaptive min_interval must be a positive integer, got {min_interval!r}")
        if not isinstance(max_interval, int) or max_interval < min_interval:
            raise ValueError(
                f"Adaptive max_interval must be an integer >= min_interval={min_interval}, got {max_interval!r}"
            )
        if not threshold > 0:
            raise ValueError(f"Adaptive threshold must be positive (in standard errors), got {threshold!r}")
        self.min_interval = min_interval
        self.max_interval = max_interval
        self.threshold = float(threshold)
        self.include_zero = include_zero
        self.interval = min_interval
        self.next = 0 if include_zero else min_interval
        self.previous: tuple[float, float] | None = None

    def is_due(self, step: int) -> bool:
        # ">=": a step that was skipped (several optimizer steps per batch) is caught up at once
        return step >= self.next

    def next_due(self, step: int) -> int | None:
        return max(step, self.next)

    def observe(self, step: int, value: float, stderr: float) -> None:
        """Record the measurement taken at ``step`` and schedule the next one."""
        if math.isfinite(value):
            # a failed estimate (nan) keeps the interval and is not a reference for the next one
            if self.previous is not None:
                prev_value, prev_se = self.previous
                se = stderr if math.isfinite(stderr) else 0.0
                moved = abs(value - prev_value) > self.threshold * math.sqrt(se**2 + prev_se**2)
                if moved:
                    self.interval = max(self.min_interval, self.interval // 2)
                else:
                    self.interval = min(self.max_interval, self.interval * 2)
            self.previous = (float(value), float(stderr) if math.isfinite(stderr) else 0.0)
        self.next = step + self.interval

    def validate(self, total_steps: float) -> None:
        if not _unbounded(total_steps) and self.min_interval > total_steps:
            raise ValueError(
                f"{self!r}: min_interval={self.min_interval} is beyond the {int(total_steps)} optimizer steps this "
                "run will take; lower min_interval or raise max_steps."
            )

    def state_dict(self) -> dict[str, object]:
        return {"interval": self.interval, "next": self.next, "previous": self.previous}

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.interval = int(state["interval"])  # type: ignore[arg-type]
        self.next = int(state["next"])  # type: ignore[arg-type]
        previous = state["previous"]
        self.previous = None if previous is None else (float(previous[0]), float(previous[1]))  # type: ignore[index]

    def __repr__(self) -> str:
        return (
            f"Adaptive(min_interval={self.min_interval}, max_interval={self.max_interval}, "
            f"threshold={self.threshold}, include_zero={self.include_zero})"
        )


def as_schedule(spec: int | Sequence[int] | Schedule) -> Schedule:
    """``int`` -> :class:`EveryNSteps`, list of ``int`` -> :class:`ExplicitSteps`, a schedule -> itself."""
    if isinstance(spec, Schedule):
        return spec
    if isinstance(spec, int) and not isinstance(spec, bool):
        return EveryNSteps(spec)
    if isinstance(spec, Sequence) and not isinstance(spec, str):
        return ExplicitSteps(spec)
    raise TypeError(
        f"a schedule must be an int (every n optimizer steps), a list of steps or a Schedule "
        f"(EveryNSteps, LogSpaced, ExplicitSteps); got {spec!r}"
    )
