"""StageDetector: stage transitions of monitored scalars, and the alert rules that react to them.

Thin glue: where points come from, rank-safe actions, state in ``state_dict``. The detection lives
in :mod:`devinterp_lightning.stages`, the rules in :mod:`devinterp_lightning.rules`, the TensorBoard
markers in :mod:`devinterp_lightning.logging.tensorboard`.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn

from devinterp_lightning.interfaces import series_providers, transition_publishers
from devinterp_lightning.logging.tensorboard import TensorBoardStageSink, band_metrics, stage_index_key
from devinterp_lightning.rules import AlertRule, Firing, RuleEngine, coerce_rules
from devinterp_lightning.series import SeriesPoint, SeriesStore
from devinterp_lightning.stages.changepoints import ChangepointTracker, Method
from devinterp_lightning.stages.events import Stage, Transition
from devinterp_lightning.stages.segments import build_stages, stage_index_at
from devinterp_lightning.stages.turning_points import TurningPointTracker

log = logging.getLogger(__name__)

StageBoundaries = Literal["auto", "changepoint", "turning_point", "any"]


def _probes(trainer: pl.Trainer) -> list[Any]:
    return series_providers(trainer.callbacks)


def _publishers(trainer: pl.Trainer) -> list[Any]:
    return transition_publishers(trainer.callbacks)


class StageDetector(Callback):
    r"""Detect stage transitions of ``monitor`` (and of every monitor the rules name) and fire rules.

    Where points come from, per watched key (see docs/stages.md):

    * a *probe*: a callback with a ``history: SeriesStore`` holding the key (``LLCMonitor``). Each new
      point is taken with its ``stderr`` as the noise level; points with health flags are skipped
      when ``ignore_flagged``;
    * otherwise ``trainer.callback_metrics[key]``, read every ``every_n_steps`` optimizer steps (for a
      metric logged every step such as the loss);
    * transitions published by any callback's ``published_transitions(key)`` are adopted as they are.

    Args:
        monitor: the main key; :attr:`transitions` and :attr:`stages` are about it.
        rules: a YAML path, an :class:`~devinterp_lightning.rules.AlertRule` or a list of them.
            Rules may name other monitors; those are watched too.
        checkpoint_dir: where ``checkpoint`` actions save ``<rule>-step=<step>.ckpt``; default
            ``<trainer.default_root_dir>/stage_checkpoints``.
        every_n_steps: sampling interval for keys no probe provides (``None``: probes only).
        ignore_flagged: skip probe points whose ``flags`` are non-empty (unhealthy estimates).
        penalty_scale, min_size, confirm, method, max_points: changepoint settings
            (:class:`~devinterp_lightning.stages.changepoints.ChangepointTracker`).
        turning_points: also report turning points (slope sign changes).
        turning_window, turning_z: turning-point settings
            (:class:`~devinterp_lightning.stages.turning_points.TurningPointTracker`).
        stage_boundaries: which transitions split stages: ``"auto"`` (changepoints; for a key that
            only has published transitions, those), ``"changepoint"``, ``"turning_point"``, ``"any"``.
        images: write the curve image to TensorBoard at each transition and at the end.
    """

    def __init__(
        self,
        monitor: str = "llc/mean",
        rules: str | list[AlertRule] | None = None,
        checkpoint_dir: str | os.PathLike[str] | None = None,
        *,
        every_n_steps: int | None = None,
        ignore_flagged: bool = True,
        penalty_scale: float = 6.0,
        min_size: int = 3,
        confirm: int = 3,
        method: Method = "binseg",
        max_points: int = 1000,
        turning_points: bool = True,
        turning_window: int = 8,
        turning_z: float = 3.0,
        stage_boundaries: StageBoundaries = "auto",
        images: bool = True,
    ) -> None:
        if not isinstance(monitor, str) or not monitor:
            raise ValueError(f"StageDetector: monitor must be a non-empty metric name, got {monitor!r}")
        if every_n_steps is not None and (not isinstance(every_n_steps, int) or every_n_steps < 1):
            raise ValueError(f"StageDetector: every_n_steps must be a positive int or None, got {every_n_steps!r}")
        if stage_boundaries not in ("auto", "changepoint", "turning_point", "any"):
            raise ValueError(f"StageDetector: unknown stage_boundaries {stage_boundaries!r}")
        self.monitor = monitor
        self.rules: list[AlertRule] = coerce_rules(rules)  # raises RuleConfigError now, not mid-run
        self.checkpoint_dir = None if checkpoint_dir is None else os.fspath(checkpoint_dir)
        self.every_n_steps = every_n_steps
        self.ignore_flagged = ignore_flagged
        self.stage_boundaries = stage_boundaries
        self.images = images
        self.keys: list[str] = list(dict.fromkeys([monitor, *(r.monitor for r in self.rules)]))
        self._cp = {
            k: ChangepointTracker(k, penalty_scale=penalty_scale, min_size=min_size, confirm=confirm,
                                  method=method, max_points=max_points)
            for k in self.keys
        }
        self._tp = {k: TurningPointTracker(k, window=turning_window, z=turning_z) for k in self.keys} \
            if turning_points else {}
        self.engine = RuleEngine(self.rules)
        self.series = SeriesStore()
        self._transitions: dict[str, list[Transition]] = {k: [] for k in self.keys}
        self._adopted: dict[str, set[tuple[Any, ...]]] = {k: set() for k in self.keys}
        self._last_step: dict[str, int] = {}
        self._ckpt_rules = [r for r in self.rules if "checkpoint" in r.actions]
        self._halt = any("halt" in r.actions for r in self.rules)
        self._sink = TensorBoardStageSink([])
        self._pending_ckpt: set[str] = set()
        self._pending_halt: list[Firing] = []
        self.halted_by: Firing | None = None

    # ------------------------------------------------------------------ public API
    @property
    def state_key(self) -> str:
        return self._generate_state_key(monitor=self.monitor)

    @property
    def transitions(self) -> list[Transition]:
        """Confirmed transitions of ``monitor`` (changepoints and turning points), in detection order."""
        return list(self._transitions[self.monitor])

    def transitions_for(self, key: str) -> list[Transition]:
        return list(self._transitions.get(key, []))

    @property
    def all_transitions(self) -> list[Transition]:
        return [t for k in self.keys for t in self._transitions[k]]

    @property
    def stages(self) -> list[Stage]:
        """Stages of ``monitor`` between consecutive boundary transitions (last one open)."""
        return self.stages_for(self.monitor)

    def stages_for(self, key: str) -> list[Stage]:
        pts = self.series.get(key)
        return build_stages([p.step for p in pts], [p.value for p in pts], self._boundaries(key))

    @property
    def fired(self) -> list[Firing]:
        return list(self.engine.fired)

    def _boundaries(self, key: str) -> list[Transition]:
        ts = self._transitions.get(key, [])
        mode = self.stage_boundaries
        if mode == "auto":
            mode = "any" if not self.series.get(key) else "changepoint"
        return [t for t in ts if mode == "any" or t.kind == mode]

    # ------------------------------------------------------------------ setup
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        probes = _probes(trainer)
        if self.every_n_steps is None:
            for key in self.keys:
                if not self._maybe_provided(key, probes, _publishers(trainer)):
                    who = [k for r in self.rules if r.monitor == key for k in [r.name]]
                    raise ValueError(
                        f"StageDetector: no probe callback provides {key!r}"
                        + (f" (named by rule(s) {who})" if who else "")
                        + f"; pass every_n_steps=N to sample trainer.callback_metrics[{key!r}] every N "
                        "steps (e.g. for a loss logged each step), or add the callback that logs it "
                        "(LLCMonitor for llc/... keys)."
                    )
        if self.checkpoint_dir is None:
            self.checkpoint_dir = os.path.join(trainer.default_root_dir, "stage_checkpoints")
        self._sink = TensorBoardStageSink(
            lg.experiment for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)
        ) if trainer.is_global_zero else TensorBoardStageSink([])

    @staticmethod
    def _maybe_provided(key: str, probes: list[Any], publishers: list[Any]) -> bool:
        for cb in probes:
            if key in cb.history:
                return True
            declared = getattr(cb, "monitor_keys", None)
            if not callable(declared) or key in declared():
                # a probe that does not declare its keys may still log this one: warn at the end instead
                return True
        return any(not callable(getattr(cb, "monitor_keys", None)) for cb in publishers)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._sink.write_layout(self.monitor)

    # ------------------------------------------------------------------ the loop
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        self._poll(trainer)
        self._act(trainer, allow_halt=True)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._poll(trainer)
        self._act(trainer, allow_halt=False)
        if self.images:
            for key in self.keys:
                self._write_curve(key, trainer.global_step)
        self._sink.flush()
        missing = [k for k in self.keys if not self.series.get(k) and not self._transitions[k]]
        for key in missing:
            names = [r.name for r in self.rules if r.monitor == key]
            rank_zero_warn(
                f"StageDetector: {key!r} never appeared during training"
                + (f", so rule(s) {names} never applied" if names else "")
                + ". Check the metric name (trainer.callback_metrics has "
                + f"{sorted(trainer.callback_metrics)[:10]}) and that its probe runs.",
                category=UserWarning,
            )

    def _poll(self, trainer: pl.Trainer) -> None:
        step = trainer.global_step
        probes = _probes(trainer)
        for key in self.keys:
            for point in self._new_points(trainer, key, probes):
                self._take_point(trainer, key, point, step)
            for cb in _publishers(trainer):
                for t in cb.published_transitions(key):
                    ident = tuple(sorted(t.to_dict().items()))
                    if ident not in self._adopted[key]:
                        self._adopted[key].add(ident)
                        self._on_transition(trainer, t, step)

    def _new_points(self, trainer: pl.Trainer, key: str, probes: list[Any]) -> list[SeriesPoint]:
        last = self._last_step.get(key, -1)
        for cb in probes:
            if key in cb.history:
                return [p for p in cb.history[key] if p.step > last]
        n = self.every_n_steps
        step = trainer.global_step
        if n is None or step % n != 0 or step <= last or key not in trainer.callback_metrics:
            return []
        value = float(trainer.callback_metrics[key])
        return [SeriesPoint(step=step, value=value)]

    def _take_point(self, trainer: pl.Trainer, key: str, p: SeriesPoint, step: int) -> None:
        self._last_step[key] = p.step
        if p.flags:
            self._sink.write_flagged(key, p.step, p.value, p.std, p.flags)
        if self.ignore_flagged and p.flags:
            return
        if not math.isfinite(p.value):
            return
        self.series.append(key, p)
        pts = self.series[key]
        steps = [q.step for q in pts]
        values = [q.value for q in pts]
        stderrs = [q.stderr for q in pts]
        new = self._cp[key].update(steps, values, stderrs=stderrs, now=step)
        if key in self._tp:
            new += self._tp[key].update(steps, values, stderrs=stderrs, now=step)
        for t in sorted(new, key=lambda t: t.changepoint_step):
            self._on_transition(trainer, t, step)
        for f in self.engine.on_point(key, p.step, p.value, step):
            self._on_firing(trainer, f)
        metrics = {stage_index_key(key, self.monitor): float(stage_index_at(self.stages_for(key), p.step))}
        metrics.update(band_metrics(key, p.value, p.std))
        for lg in trainer.loggers:
            lg.log_metrics(metrics, step=p.step)

    def _on_transition(self, trainer: pl.Trainer, t: Transition, step: int) -> None:
        self._transitions[t.monitor].append(t)
        stages = self.stages_for(t.monitor)
        if trainer.is_global_zero:
            log.info(
                "StageDetector: %s %s of %s at step %d (%.4g -> %.4g), confirmed at step %d (delay %d)",
                t.kind, t.direction, t.monitor, t.changepoint_step, t.level_before, t.level_after, t.step,
                t.detection_delay,
            )
        self._sink.write_transition(t, step, stages[-1].index if stages else None)
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
        if "checkpoint" in f.rule.actions:
            self._pending_ckpt.add(f.rule.name)
        if "halt" in f.rule.actions:
            self._pending_halt.append(f)

    def _act(self, trainer: pl.Trainer, *, allow_halt: bool) -> None:
        # Every rank runs the same collectives in the same order, whatever it saw locally.
        strategy = trainer.strategy
        for rule in self._ckpt_rules:
            if strategy.reduce_boolean_decision(rule.name in self._pending_ckpt, all=False):
                assert self.checkpoint_dir is not None
                trainer.save_checkpoint(
                    os.path.join(self.checkpoint_dir, f"{rule.name}-step={trainer.global_step}.ckpt")
                )
        self._pending_ckpt.clear()
        if self._halt and allow_halt:
            local = bool(self._pending_halt)
            if strategy.reduce_boolean_decision(local, all=False):
                if self._pending_halt:
                    self.halted_by = self._pending_halt[0]
                if trainer.is_global_zero:
                    log.warning("StageDetector: halting training at step %d (%s)", trainer.global_step,
                                self.halted_by.describe() if self.halted_by else "a rule fired on another rank")
                self._flush(trainer)
                trainer.should_stop = True
            self._pending_halt.clear()

    def _flush(self, trainer: pl.Trainer) -> None:
        self._sink.flush()
        for lg in trainer.loggers:
            lg.save()

    def _write_curve(self, key: str, step: int) -> None:
        if not self._sink:
            return
        pts = self.series.get(key)
        self._sink.write_curve(
            key, [p.step for p in pts], [p.value for p in pts], [p.std for p in pts],
            self.stages_for(key), self._transitions[key], step,
        )

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": 1,
            "series": self.series.state_dict(),
            "last_step": dict(self._last_step),
            "changepoints": {k: tr.state_dict() for k, tr in self._cp.items()},
            "turning_points": {k: tr.state_dict() for k, tr in self._tp.items()},
            "transitions": {k: [t.to_dict() for t in ts] for k, ts in self._transitions.items()},
            "adopted": {k: [dict(i) for i in ids] for k, ids in self._adopted.items()},
            "rules": self.engine.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.series.load_state_dict(state_dict["series"])
        self._last_step = {k: int(v) for k, v in state_dict["last_step"].items()}
        for k, st in state_dict["changepoints"].items():
            if k in self._cp:
                self._cp[k].load_state_dict(st)
        for k, st in state_dict["turning_points"].items():
            if k in self._tp:
                self._tp[k].load_state_dict(st)
        # keys no longer watched (rules changed between runs) are dropped
        for k, ts in state_dict["transitions"].items():
            if k in self._transitions:
                self._transitions[k] = [Transition.from_dict(t) for t in ts]
        for k, ids in state_dict["adopted"].items():
            if k in self._adopted:
                self._adopted[k] = {tuple(sorted(i.items())) for i in ids}
        self.engine.load_state_dict(state_dict["rules"])
