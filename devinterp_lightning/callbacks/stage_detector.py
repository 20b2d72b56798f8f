"""StageDetector: stage transitions of monitored scalars, and the alert rules that react to them.

Thin glue: where points come from, rank-safe actions, state in ``state_dict``. The detection lives
in :mod:`devinterp_lightning.stages`, the rules in :mod:`devinterp_lightning.rules`, the TensorBoard
markers in :mod:`devinterp_lightning.logging.tensorboard`.
"""

from __future__ import annotations

import logging
import math
import os
from collections import Counter
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn

from devinterp_lightning import tags
from devinterp_lightning.interfaces import series_providers, transition_publishers
from devinterp_lightning.logging.tensorboard import TensorBoardStageSink, band_metrics
from devinterp_lightning.rules import AlertRule, Firing, RuleEngine, coerce_rules
from devinterp_lightning.series import SeriesPoint, SeriesStore
from devinterp_lightning.stages.base import Tracker
from devinterp_lightning.stages.changepoints import ChangepointTracker
from devinterp_lightning.stages.events import Stage, Transition
from devinterp_lightning.stages.plateaus import PlateauTracker
from devinterp_lightning.stages.segments import build_stages, stage_index_at
from devinterp_lightning.stages.turning_points import TurningPointTracker

log = logging.getLogger(__name__)

StageBoundaries = Literal["auto", "changepoint", "turning_point", "any"]
StageMethod = Literal["plateau", "binseg", "pelt", "bottomup"]
METHODS = ("plateau", "binseg", "pelt", "bottomup")


def _probes(trainer: pl.Trainer) -> list[Any]:
    return series_providers(trainer.callbacks)


def _publishers(trainer: pl.Trainer) -> list[Any]:
    return transition_publishers(trainer.callbacks)


class StageDetector(Callback):
    r"""Detect stage transitions of ``monitor`` (and of every monitor the rules name) and fire rules.

    Where points come from, per watched key (see docs/stages.md):

    * a *probe*: a callback with a ``history: SeriesStore`` holding the key (``LLCMonitor``). Each new
      point is taken with its ``stderr`` as a lower bound on the noise; points with health flags are
      skipped when ``ignore_flagged``;
    * otherwise ``trainer.callback_metrics[key]``, read every ``every_n_steps`` optimizer steps (for a
      metric logged every step such as the loss; default: the trainer's ``log_every_n_steps``);
    * transitions published by any callback's ``published_transitions(key)`` are adopted as they are.

    Args:
        monitor: the main key; :attr:`transitions` and :attr:`stages` are about it.
        rules: a YAML path, an :class:`~devinterp_lightning.rules.AlertRule` or a list of them.
            Rules may name other monitors; those are watched too.
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
        turning_points: also report turning points (slope sign changes). Off by default: their
            false-alarm rate on autocorrelated noise is above 5% (docs/stages.md).
        turning_window, turning_z: turning-point settings
            (:class:`~devinterp_lightning.stages.turning_points.TurningPointTracker`).
        stage_boundaries: which transitions split stages: ``"auto"`` (changepoints; for a key that
            only has published transitions, those), ``"changepoint"``, ``"turning_point"``, ``"any"``.
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
        turning_points: bool = False,
        turning_window: int = 8,
        turning_z: float = 3.0,
        stage_boundaries: StageBoundaries = "auto",
        images: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(monitor, str) or not monitor:
            raise ValueError(f"StageDetector: monitor must be a non-empty metric name, got {monitor!r}")
        if every_n_steps is not None and (not isinstance(every_n_steps, int) or every_n_steps < 1):
            raise ValueError(f"StageDetector: every_n_steps must be a positive int or None, got {every_n_steps!r}")
        if stage_boundaries not in ("auto", "changepoint", "turning_point", "any"):
            raise ValueError(f"StageDetector: unknown stage_boundaries {stage_boundaries!r}")
        if method not in METHODS:
            raise ValueError(f"StageDetector: unknown method {method!r}; use one of {', '.join(METHODS)}")
        self.monitor = monitor
        self.rules: list[AlertRule] = coerce_rules(rules)  # raises RuleConfigError now, not mid-run
        self.checkpoint_dir = None if checkpoint_dir is None else os.fspath(checkpoint_dir)
        self.every_n_steps = every_n_steps
        self.ignore_flagged = ignore_flagged
        self.stage_boundaries = stage_boundaries
        self.images = images
        self.method: StageMethod = method
        self.keys: list[str] = list(dict.fromkeys([monitor, *(r.monitor for r in self.rules)]))
        settings = {"penalty_scale": penalty_scale, "min_size": min_size, "confirm": confirm,
                    "max_points": max_points}
        settings = {k: v for k, v in settings.items() if v is not None}
        self._cp: dict[str, Tracker] = {k: self._make_tracker(k, settings) for k in self.keys}
        self._tp = {k: TurningPointTracker(k, window=turning_window, z=turning_z) for k in self.keys} \
            if turning_points else {}
        self.engine = RuleEngine(self.rules)
        self.series = SeriesStore()
        self._transitions: dict[str, list[Transition]] = {k: [] for k in self.keys}
        self._adopted: dict[str, set[tuple[Any, ...]]] = {k: set() for k in self.keys}
        self._last_step: dict[str, int] = {}
        self._index_logged: dict[str, int] = {}  # last step whose stage index went to the loggers
        self._skipped: dict[str, Counter[str]] = {k: Counter() for k in self.keys}
        self._ckpt_rules = [r for r in self.rules if "checkpoint" in r.actions]
        self._halt = any("halt" in r.actions for r in self.rules)
        self._sink = TensorBoardStageSink([])
        self._pending_ckpt: set[str] = set()
        self._pending_halt: list[Firing] = []
        self.halted_by: Firing | None = None

    def _make_tracker(self, key: str, settings: dict[str, Any]) -> Tracker:
        if self.method == "plateau":
            return PlateauTracker(key, **settings)
        return ChangepointTracker(key, method=self.method, **settings)

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
        if self.every_n_steps is None:
            # keys no probe provides are read from callback_metrics at Lightning's logging interval
            self._sample_every = max(1, int(getattr(trainer, "log_every_n_steps", 50) or 1))
        else:
            self._sample_every = self.every_n_steps
        if self.checkpoint_dir is None:
            self.checkpoint_dir = os.path.join(trainer.default_root_dir, "stage_checkpoints")
        self._sink = TensorBoardStageSink(
            lg.experiment for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)
        ) if trainer.is_global_zero else TensorBoardStageSink([])

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._should_skip(trainer):
            return
        self._sink.write_layout(self.monitor)

    @staticmethod
    def _should_skip(trainer: pl.Trainer) -> bool:
        """Lightning's ``EarlyStopping`` guard: nothing during the sanity check, and nothing in a
        ``fast_dev_run`` (a smoke test must not save checkpoints or stop on a transition)."""
        return bool(trainer.sanity_checking or trainer.fast_dev_run)

    # ------------------------------------------------------------------ the loop
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        if self._should_skip(trainer):
            return
        self._poll(trainer)
        self._act(trainer, allow_halt=True)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._should_skip(trainer):
            return
        self._poll(trainer)
        self._act(trainer, allow_halt=False)
        if self.images:
            for key in self.keys:
                self._write_curve(key, trainer.global_step)
        self._sink.flush()
        for key in self.keys:
            message = self.missing_message(key, sorted(trainer.callback_metrics))
            if message is not None:
                rank_zero_warn(message, category=UserWarning)

    def missing_message(self, key: str, metric_names: list[str] | None = None) -> str | None:
        """Why ``key`` has no point and no transition (``None`` when it has some): every point was
        skipped (flagged or not finite), or it never appeared at all."""
        if self.series.get(key) or self._transitions[key]:
            return None
        names = [r.name for r in self.rules if r.monitor == key]
        rules = f"; rule(s) {names} never applied" if names else ""
        skipped = self._skipped[key]
        total = sum(skipped.values())
        if total:
            counts = ", ".join(f"{reason}: {n}" for reason, n in sorted(skipped.items(), key=lambda kv: (-kv[1], kv[0])))
            return (f"StageDetector: all {total} points of {key!r} were skipped as flagged or not finite "
                    f"({counts}){rules}, so no stage could be detected. See docs/troubleshooting.md "
                    "(\"Every point was flagged\") for what each flag means and how to get healthy estimates; "
                    "ignore_flagged=False keeps flagged points.")
        have = "" if metric_names is None else f" (trainer.callback_metrics has {metric_names[:10]})"
        return (f"StageDetector: {key!r} never appeared during training{rules}. Check the metric name{have} "
                "and that its probe runs.")

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
        n = getattr(self, "_sample_every", self.every_n_steps or 1)
        step = trainer.global_step
        if step % n != 0 or step <= last or key not in trainer.callback_metrics:
            return []
        value = float(trainer.callback_metrics[key])
        return [SeriesPoint(step=step, value=value)]

    def _take_point(self, trainer: pl.Trainer, key: str, p: SeriesPoint, step: int) -> None:
        self._last_step[key] = p.step
        if p.flags:
            self._sink.write_flagged(key, p.step, p.value, p.std, p.flags)
        if self.ignore_flagged and p.flags:
            self._skipped[key].update(p.flags)
            return
        if not math.isfinite(p.value):
            self._skipped[key]["not finite"] += 1
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
        metrics = {tags.stage_index_key(key, self.monitor): float(stage_index_at(self.stages_for(key), p.step))}
        metrics.update(band_metrics(key, p.value, p.std))
        for lg in trainer.loggers:
            lg.log_metrics(metrics, step=p.step)
        self._index_logged[key] = p.step

    def _on_transition(self, trainer: pl.Trainer, t: Transition, step: int) -> None:
        self._transitions[t.monitor].append(t)
        stages = self.stages_for(t.monitor)
        if trainer.is_global_zero:
            log.info(
                "StageDetector: %s %s of %s at step %d (%.4g -> %.4g), confirmed at step %d (delay %d)",
                t.kind, t.direction, t.monitor, t.changepoint_step, t.level_before, t.level_after, t.step,
                t.detection_delay,
            )
        if any(b is t for b in self._boundaries(t.monitor)):
            self._relog_index_from_onset(trainer, t.monitor, t.changepoint_step, stages)
        self._sink.write_transition(t, step, stage_index_at(stages, t.changepoint_step) if stages else None)
        if self.images:
            self._write_curve(t.monitor, step)
        for f in self.engine.on_transition(t, step):
            self._on_firing(trainer, f)

    def _relog_index_from_onset(self, trainer: pl.Trainer, key: str, onset: int, stages: list[Stage]) -> None:
        """Write the stage index again, with the new boundary, at every step from the onset on that
        was already logged (docs/tensorboard.md): TensorBoard replaces a series' points from the
        first step that goes back, so the chart switches at the onset, not at the confirmation."""
        name = tags.stage_index_key(key, self.monitor)
        last = self._index_logged.get(key, -1)
        points = [q for q in self.series.get(key) if onset <= q.step <= last]
        for q in points:
            for lg in trainer.loggers:
                lg.log_metrics({name: float(stage_index_at(stages, q.step))}, step=q.step)

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

    def decide_halt(self) -> tuple[bool, str | None]:
        """The pure decision step (Lightning ``EarlyStopping`` style): whether a rule asked this rank
        to halt since the last batch, and why. No collective call, no side effect."""
        if not self._pending_halt:
            return False, None
        return True, self._pending_halt[0].describe()

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
            should_stop, reason = self.decide_halt()
            if strategy.reduce_boolean_decision(should_stop, all=False):
                self._stop(trainer, reason)
            self._pending_halt.clear()

    def _stop(self, trainer: pl.Trainer, reason: str | None) -> None:
        """The act step: record who stopped training, flush the loggers, set ``should_stop``."""
        if self._pending_halt:
            self.halted_by = self._pending_halt[0]
        if trainer.is_global_zero:
            log.warning("StageDetector: halting training at step %d (%s)", trainer.global_step,
                        reason or "a rule fired on another rank")
        self._flush(trainer)
        trainer.should_stop = True

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
            "skipped": {k: dict(c) for k, c in self._skipped.items()},
            "index_logged": dict(self._index_logged),
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
        self._index_logged = {k: int(v) for k, v in state_dict.get("index_logged", {}).items()}
        for k, counts in state_dict.get("skipped", {}).items():
            if k in self._skipped:
                self._skipped[k] = Counter({str(r): int(n) for r, n in counts.items()})
