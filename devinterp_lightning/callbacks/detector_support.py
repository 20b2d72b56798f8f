"""Lightning-side helpers of :class:`~devinterp_lightning.callbacks.stage_detector.StageDetector`:
argument checks, the skip guard, the sampling interval, the TensorBoard sink of rank zero, checkpoint
paths, logging to every logger, the rank reduction of an action decision, and the queue of actions
that rules asked for (:class:`RuleActions`, plain state). The per-key bookkeeping is in
:mod:`devinterp_lightning.stages.watch` (no Lightning there)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.loggers import TensorBoardLogger

from devinterp_lightning.logging.tensorboard import TensorBoardStageSink
from devinterp_lightning.rules import AlertRule, Firing
from devinterp_lightning.stages.watch import BOUNDARIES, METHODS

__all__ = [
    "RuleActions", "any_rank", "check_arguments", "checkpoint_path", "log_metrics", "sample_interval",
    "save_loggers", "should_skip", "stage_sink",
]


def check_arguments(monitor: Any, every_n_steps: Any, stage_boundaries: Any, method: Any) -> None:
    """Raise ``ValueError`` naming the first bad ``StageDetector`` argument, at construction."""
    if not isinstance(monitor, str) or not monitor:
        raise ValueError(f"StageDetector: monitor must be a non-empty metric name, got {monitor!r}")
    if every_n_steps is not None and (not isinstance(every_n_steps, int) or every_n_steps < 1):
        raise ValueError(
            f"StageDetector: every_n_steps must be a positive int or None, got {every_n_steps!r}"
        )
    if stage_boundaries not in BOUNDARIES:
        raise ValueError(f"StageDetector: unknown stage_boundaries {stage_boundaries!r}")
    if method not in METHODS:
        raise ValueError(f"StageDetector: unknown method {method!r}; use one of {', '.join(METHODS)}")


def should_skip(trainer: pl.Trainer) -> bool:
    """Lightning's ``EarlyStopping`` guard: nothing during the sanity check, and nothing in a
    ``fast_dev_run`` (a smoke test must not save checkpoints or stop on a transition)."""
    return bool(trainer.sanity_checking or trainer.fast_dev_run)


def sample_interval(trainer: pl.Trainer, every_n_steps: int | None) -> int:
    """Optimizer steps between two reads of a key no probe provides: ``every_n_steps``, or by default
    the trainer's ``log_every_n_steps`` (the interval at which Lightning logs such metrics)."""
    if every_n_steps is not None:
        return every_n_steps
    return max(1, int(getattr(trainer, "log_every_n_steps", 50) or 1))


def stage_sink(trainer: pl.Trainer) -> TensorBoardStageSink:
    """The markers' sink: the trainer's TensorBoard writers on global rank zero, none elsewhere."""
    if not trainer.is_global_zero:
        return TensorBoardStageSink([])
    return TensorBoardStageSink(lg.experiment for lg in trainer.loggers if isinstance(lg, TensorBoardLogger))


def checkpoint_path(directory: str, rule_name: str, step: int) -> str:
    """Where a rule's ``checkpoint`` action saves: ``<directory>/<rule>-step=<step>.ckpt``."""
    return os.path.join(directory, f"{rule_name}-step={step}.ckpt")


def log_metrics(trainer: pl.Trainer, metrics: dict[str, Any], step: int) -> None:
    """Send ``metrics`` at ``step`` to every logger of the trainer."""
    for lg in trainer.loggers:
        lg.log_metrics(metrics, step=step)


def save_loggers(trainer: pl.Trainer) -> None:
    """Make every logger write out what it holds (before a halt)."""
    for lg in trainer.loggers:
        lg.save()


def any_rank(trainer: pl.Trainer, flag: bool) -> bool:
    """Whether ``flag`` holds on at least one rank. A collective: every rank must call it, in the
    same order, whatever it saw locally."""
    return bool(trainer.strategy.reduce_boolean_decision(flag, all=False))


class RuleActions:
    """The checkpoint and halt actions that rules asked for on this rank since the last decision, in
    firing order. Plain state, no collective call: the callback reduces :meth:`wants_checkpoint` and
    :meth:`decide_halt` over the ranks with :func:`any_rank`, then calls :meth:`clear`."""

    def __init__(self, rules: Sequence[AlertRule]) -> None:
        self.checkpoint_rules = [r for r in rules if "checkpoint" in r.actions]
        self.can_halt = any("halt" in r.actions for r in rules)
        self.checkpoints: set[str] = set()
        self.halts: list[Firing] = []

    def add(self, f: Firing) -> None:
        """Queue the checkpoint and/or halt actions of a firing (its ``log`` action is immediate)."""
        if "checkpoint" in f.rule.actions:
            self.checkpoints.add(f.rule.name)
        if "halt" in f.rule.actions:
            self.halts.append(f)

    def wants_checkpoint(self, rule: AlertRule) -> bool:
        """Whether ``rule`` fired a checkpoint action since the last :meth:`clear`."""
        return rule.name in self.checkpoints

    def decide_halt(self) -> tuple[bool, str | None]:
        """Whether a rule asked to halt, and the first such firing's description. No side effect."""
        if not self.halts:
            return False, None
        return True, self.halts[0].describe()

    def clear(self, *, halts: bool = True) -> None:
        """Forget the queued checkpoints, and the queued halts unless ``halts=False``."""
        self.checkpoints.clear()
        if halts:
            self.halts.clear()
