"""StageDetector: stage transitions of monitored scalars, and the alert rules that react to them.

Thin glue: where points come from, rank-safe actions, state in ``state_dict``. The per-key bookkeeping
(series, trackers, transitions, stages, skipped points) is
:class:`~devinterp_lightning.stages.watch.StageWatch`, the rules are :mod:`devinterp_lightning.rules`, the
TensorBoard markers :mod:`devinterp_lightning.logging.tensorboard`, the Lightning-side helpers and the
queue of rule actions :mod:`devinterp_lightning.callbacks.detector_support`.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn

from devinterp_lightning import tags
from devinterp_lightning.callbacks.detector_support import (
    RuleActions,
    any_rank,
    check_arguments,
    checkpoint_path,
    log_metrics,
    sample_interval,
    save_loggers,
    should_skip,
    stage_sink,
)
from devinterp_lightning.interfaces import series_providers, transition_publishers
from devinterp_lightning.logging.tensorboard import TensorBoardStageSink, band_metrics
from devinterp_lightning.rules import AlertRule, Firing, RuleEngine, coerce_rules
from devinterp_lightning.series import SeriesPoint, SeriesStore
from devinterp_lightning.stages.events import Stage, Transition
from devinterp_lightning.stages.watch import METHODS, StageBoundaries, StageMethod, StageWatch, describe

__all__ = ["METHODS", "StageBoundaries", "StageDetector", "StageMethod"]

log = logging.getLogger(__name__)


class StageDetector(Callback):
    r"""Detect stage transitions of ``monitor`` (and of every monitor the rules name) and fire rules.

    Where points come from, per watched key (see docs/stages.md):

    * a *probe*: a callback with a ``history: SeriesStore`` holding the key (``LLCMonitor``). Each new point
      is taken with its ``stderr`` as a lower bound on the noise; points with health flags are skipped when
      ``ignore_flagged``;
    * otherwise ``trainer.callback_metrics[key]``, read every ``every_n_steps`` optimizer steps (for a metric
      logged every step such as the loss; default: the trainer's ``log_every_n_steps``);
    * transitions published by any callback's ``published_transitions(key)`` are adopted as they are.

    Args:
        monitor: the main key; :attr:`transitions` and :attr:`stages` are about it.
        rules: a YAML path, an :class:`~devinterp_lightning.rules.AlertRule` or a list of them. Rules may
            name other monitors; those are watched too.
        checkpoint_dir: where ``checkpoint`` actions save ``<rule>-step=<step>.ckpt``; default
            ``<trainer.default_root_dir>/stage_checkpoints``.
        every_n_steps: sampling interval for keys no probe provides (``None``: the trainer's
            ``log_every_n_steps``, the interval at which Lightning logs such metrics).
        ignore_flagged: skip probe points whose ``flags`` are non-empty (unhealthy estimates).
        method: ``"plateau"`` (default): transitions between plateaus, one per rise or fall
            (:class:`~devinterp_lightning.stages.plateaus.PlateauTracker`); ``"binseg"``, ``"pelt"``,
            ``"bottomup"``: shifts of a piecewise-constant mean with ruptures
            (:class:`~devinterp_lightning.stages.changepoints.ChangepointTracker`).
        penalty_scale, min_size, confirm, max_points: settings of that tracker (``None``: its default).
        noise_model: ``method="plateau"`` only: ``"auto"`` (the tracker's default: ``"variogram"`` for a
            series with reported standard errors such as the LLC, ``"split"`` for one without such as the
            loss), ``"split"``, ``"variogram"`` or ``"residual"`` (docs/stages.md, "Noise models");
            ``None``: the default.
        turning_points: also report turning points (slope sign changes). Off by default: their false-alarm
            rate on autocorrelated noise is above 5% (docs/stages.md).
        turning_window, turning_z: turning-point settings
            (:class:`~devinterp_lightning.stages.turning_points.TurningPointTracker`).
        stage_boundaries: which transitions split stages: ``"auto"`` (changepoints; for a key that only has
            published transitions, those), ``"changepoint"``, ``"turning_point"``, ``"any"``.
        images: write the curve image to TensorBoard at each transition and at the end.
    """

    def __init__(
        self,
        monitor: str = tags.LLC_MEAN,
        rules: str | list[AlertRule] | None = None,
        checkpoint_dir: str | os.PathLike[str] | None = None,
        *,
        every_n_steps: int | None = None,
        ignore_flagged: bool = True,
        method: StageMethod = "plateau",
        penalty_scale: float | None = None,
        min_size: int | None = None,
        confirm: int = 3,
        max_points: int | None = None,
        noise_model: str | None = None,
        turning_points: bool = False,
        turning_window: int = 8,
        turning_z: float = 3.0,
        stage_boundaries: StageBoundaries = "auto",
        images: bool = True,
    ) -> None:
        super().__init__()
        check_arguments(monitor, every_n_steps, stage_boundaries, method)
        if noise_model is not None and method != "plateau":
            raise ValueError(
                f"StageDetector: noise_model={noise_model!r} is a setting of method='plateau', not of "
                f"method={method!r}; drop noise_model or use method='plateau'"
            )
        self.monitor = monitor
        self.rules: list[AlertRule] = coerce_rules(rules)  # raises RuleConfigError now, not mid-run
        self.checkpoint_dir = None if checkpoint_dir is None else os.fspath(checkpoint_dir)
        self.every_n_steps = every_n_steps
        self._sample_every = every_n_steps or 1  # until setup() reads the trainer's logging interval
        self.ignore_flagged = ignore_flagged
        self.stage_boundaries = stage_boundaries
        self.images = images
        self.method: StageMethod = method
        settings = {"penalty_scale": penalty_scale, "min_size": min_size, "confirm": confirm,
                    "max_points": max_points, "noise_model": noise_model}
        self.watch = StageWatch(
            [monitor, *(r.monitor for r in self.rules)], method=method,
            settings={k: v for k, v in settings.items() if v is not None}, turning_points=turning_points,
            turning_window=turning_window, turning_z=turning_z, stage_boundaries=stage_boundaries,
            ignore_flagged=ignore_flagged,
        )
        self.keys: list[str] = self.watch.keys
        self.engine = RuleEngine(self.rules)
        self.actions = RuleActions(self.rules)  # checkpoint/halt requests awaiting the rank-wide decision
        self._sink = TensorBoardStageSink([])
        self.halted_by: Firing | None = None

    # ------------------------------------------------------------------ public API
    @property
    def state_key(self) -> str:
        return self._generate_state_key(monitor=self.monitor)

    @property
    def series(self) -> SeriesStore:
        """The points taken so far, per watched key."""
        return self.watch.series

    @property
    def transitions(self) -> list[Transition]:
        """Confirmed transitions of ``monitor`` (changepoints and turning points), in detection order."""
        return self.watch.transitions(self.monitor)

    def transitions_for(self, key: str) -> list[Transition]:
        return self.watch.transitions(key)

    @property
    def all_transitions(self) -> list[Transition]:
        return self.watch.all_transitions

    @property
    def stages(self) -> list[Stage]:
        """Stages of ``monitor`` between consecutive boundary transitions (last one open)."""
        return self.watch.stages(self.monitor)

    def stages_for(self, key: str) -> list[Stage]:
        return self.watch.stages(key)

    @property
    def fired(self) -> list[Firing]:
        return list(self.engine.fired)

    def missing_message(self, key: str, metric_names: list[str] | None = None) -> str | None:
        """Why ``key`` has no point and no transition (``None`` when it has some): every point was
        skipped (flagged or not finite), or it never appeared at all."""
        names = [r.name for r in self.rules if r.monitor == key]
        return self.watch.missing_message(key, names, metric_names)

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._sample_every = sample_interval(trainer, self.every_n_steps)
        if self.checkpoint_dir is None:
            self.checkpoint_dir = os.path.join(trainer.default_root_dir, "stage_checkpoints")
        self._sink = stage_sink(trainer)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not should_skip(trainer):
            self._sink.write_layout(self.monitor)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        if should_skip(trainer):
            return
        self._poll(trainer)
        self._act(trainer, allow_halt=True)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if should_skip(trainer):
            return
        self._poll(trainer)
        self._act(trainer, allow_halt=False)
        if self.images:
            for key in self.keys:
                self._write_curve(key, trainer.global_step)
        self._sink.flush()
        names = sorted(trainer.callback_metrics)
        for message in filter(None, (self.missing_message(k, names) for k in self.keys)):
            rank_zero_warn(message, category=UserWarning)

    # ------------------------------------------------------------------ intake
    def _poll(self, trainer: pl.Trainer) -> None:
        step = trainer.global_step
        probes = series_providers(trainer.callbacks)
        for key in self.keys:
            for point in self._new_points(trainer, key, probes):
                self._take_point(trainer, key, point, step)
            for cb in transition_publishers(trainer.callbacks):
                for t in cb.published_transitions(key):
                    if self.watch.adopt(key, t):
                        self._on_transition(trainer, t, step)

    def _new_points(self, trainer: pl.Trainer, key: str, probes: list[Any]) -> list[SeriesPoint]:
        """A probe's unseen points of ``key``; else the logged metric, when a sample is due."""
        for cb in probes:
            if key in cb.history:
                return self.watch.unseen(key, cb.history[key])
        step = trainer.global_step
        due = self.watch.is_due(key, step, self._sample_every) and key in trainer.callback_metrics
        return [SeriesPoint(step=step, value=float(trainer.callback_metrics[key]))] if due else []

    def _take_point(self, trainer: pl.Trainer, key: str, p: SeriesPoint, step: int) -> None:
        if p.flags:
            self._sink.write_flagged(key, p.step, p.value, p.std, p.flags)
        new = self.watch.update(key, p, now=step)
        if new is None:  # skipped: flagged or not finite
            return
        for t in new:
            self._on_transition(trainer, t, step)
        for f in self.engine.on_point(key, p.step, p.value, step):
            self._on_firing(trainer, f)
        index = {tags.stage_index_key(key, self.monitor): float(self.watch.stage_index(key, p.step))}
        log_metrics(trainer, {**index, **band_metrics(key, p.value, p.std)}, p.step)
        self.watch.mark_indexed(key, p.step)

    # ------------------------------------------------------------------ reactions
    def _on_transition(self, trainer: pl.Trainer, t: Transition, step: int) -> None:
        self.watch.record(t)
        if trainer.is_global_zero:
            log.info("StageDetector: %s", describe(t))
        for at, index in self.watch.reindex(t):  # TensorBoard re-plots from there (docs/tensorboard.md)
            log_metrics(trainer, {tags.stage_index_key(t.monitor, self.monitor): float(index)}, at)
        self._sink.write_transition(t, step, self.watch.onset_index(t))
        if self.images:
            self._write_curve(t.monitor, step)
        for f in self.engine.on_transition(t, step):
            self._on_firing(trainer, f)

    def _on_firing(self, trainer: pl.Trainer, f: Firing) -> None:
        text = f.describe()
        if "log" in f.rule.actions:
            if trainer.is_global_zero:
                log.warning("StageDetector: %s", text)
            self._sink.write_rule(f.rule.name, text, f.step)
        self.actions.add(f)

    def _write_curve(self, key: str, step: int) -> None:
        if self._sink:  # rank zero with a TensorBoard logger: elsewhere, no stage fit for nothing
            self._sink.write_curve(key, *self.watch.curve(key), step)

    # ------------------------------------------------------------------ decide, then act on every rank
    def decide_halt(self) -> tuple[bool, str | None]:
        """The pure decision step (Lightning ``EarlyStopping`` style): whether a rule asked this rank
        to halt since the last batch, and why. No collective call, no side effect."""
        return self.actions.decide_halt()

    def _act(self, trainer: pl.Trainer, *, allow_halt: bool) -> None:
        # Every rank runs the same collectives in the same order, whatever it saw locally.
        for rule in self.actions.checkpoint_rules:
            if any_rank(trainer, self.actions.wants_checkpoint(rule)):
                assert self.checkpoint_dir is not None
                trainer.save_checkpoint(checkpoint_path(self.checkpoint_dir, rule.name, trainer.global_step))
        decide = self.actions.can_halt and allow_halt
        if decide:
            should_stop, reason = self.decide_halt()
            if any_rank(trainer, should_stop):
                self._stop(trainer, reason)
        self.actions.clear(halts=decide)

    def _stop(self, trainer: pl.Trainer, reason: str | None) -> None:
        """The act step: record who stopped training, flush the loggers, set ``should_stop``."""
        if self.actions.halts:
            self.halted_by = self.actions.halts[0]
        if trainer.is_global_zero:
            log.warning("StageDetector: halting training at step %d (%s)", trainer.global_step,
                        reason or "a rule fired on another rank")
        self._sink.flush()
        save_loggers(trainer)
        trainer.should_stop = True

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"version": 1, **self.watch.state_dict(), "rules": self.engine.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.watch.load_state_dict(state_dict)
        self.engine.load_state_dict(state_dict["rules"])
