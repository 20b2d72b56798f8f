"""EssentialDynamics: PCA of the model's outputs on a fixed probe batch over training, and its
turning points. Thin glue: the PCA and geometry live in :mod:`devinterp_lightning.essential_dynamics`,
the confirmation of turning points in :mod:`devinterp_lightning.stages.trajectory`, the drawing in
:mod:`devinterp_lightning.logging.figures`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from devinterp_lightning import tags
from devinterp_lightning.callbacks.stage_detector import StageDetector
from devinterp_lightning.essential_dynamics import (
    IncrementalPCA,
    TurningPoint,
    default_forward,
    flatten_outputs,
    trajectory_csv,
    turning_points_markdown,
)
from devinterp_lightning.logging.figures import trajectory_figure_rgb
from devinterp_lightning.sampling.batches import to_device
from devinterp_lightning.sampling.snapshot import cuda_devices, forked_rng, preserved_modes
from devinterp_lightning.schedule import EveryNSteps
from devinterp_lightning.series import SeriesPoint, SeriesStore
from devinterp_lightning.stages.events import Stage, Transition
from devinterp_lightning.stages.trajectory import TrajectoryTurningTracker

MONITOR = tags.ED_TRAJECTORY

ProbeSpec = Tensor | tuple | list | Mapping | Callable[[], Any]


@runtime_checkable
class StageSource(Protocol):
    """Anything with ``stages`` (a :class:`~devinterp_lightning.stages.events.Stage` sequence), such as
    a :class:`~devinterp_lightning.callbacks.stage_detector.StageDetector`: colours the image."""

    @property
    def stages(self) -> Sequence[Stage]: ...


class EssentialDynamics(Callback):
    r"""Track the model's function through training and detect turning points of its trajectory.

    Every ``every_n_steps`` optimizer steps (and once before the first step) the model's outputs
    on a fixed ``probe`` batch are flattened into one vector (under ``torch.no_grad``, in eval mode,
    on a fork of the RNG state, so training is not disturbed). An incremental, bounded-memory PCA
    (:class:`~devinterp_lightning.essential_dynamics.IncrementalPCA`) of these vectors gives a
    trajectory in the top ``num_components`` principal components.

    Logged at each snapshot (at the trainer's global step): ``ed/pc1 .. ed/pc{k}`` = the newest
    snapshot's coordinates on the *current* principal components, and ``ed/explained_variance`` =
    the share of the spread captured by those components. The same points are kept in :attr:`history`.
    Logged values are never rewritten, so a logged ``ed/pc1`` curve mixes bases; the image, the
    final CSV and the turning points always use all stored snapshots on the current basis.

    Turning points (:class:`~devinterp_lightning.stages.trajectory.TrajectoryTurningTracker`) are
    published once through :meth:`published_transitions` (``monitor="ed/trajectory"``,
    ``kind="turning_point"``) and never retracted. They are hypotheses to check, not alarms: on
    trajectories with no development at all (autocorrelated noise, random walks) they are published
    in most series (docs/essential_dynamics.md, "False alarms"). So a ``StageDetector`` applies rules
    to them only when its monitor or a rule names ``"ed/trajectory"`` (off by default), and a halt or
    checkpoint rule on them draws a warning at setup.

    Sanity checking and ``fast_dev_run`` are skipped (no snapshot, no validation of the schedule).

    Args:
        probe: the fixed inputs: a Tensor (``model(probe)``), a tuple/list (``model(*probe)``), a
            dict (``model(**probe)``), or a zero-argument callable returning one of those (called
            once, at the start of fitting). It must be the same on every rank.
        every_n_steps: snapshot interval in optimizer steps.
        num_components: principal components to log and analyse (``>= 2``).
        max_snapshots: stored snapshots; beyond it every other one is dropped and the storage
            stride doubles (memory ``O(max_snapshots * rank)`` for coordinates).
        rank: dimension of the internal subspace (memory ``O(D * rank)`` for ``D`` output values);
            defaults to ``num_components + 5``.
        forward_fn: ``forward_fn(model, batch) -> Tensor | tuple | dict`` of outputs to track;
            default calls the LightningModule as above.
        smoothing, min_angle_deg, min_pairs, tolerance, parameterization, min_snr, alpha: turning-point
            settings (``alpha``: level of the tests against noise, ``None`` to disable them), see :class:`~devinterp_lightning.stages.trajectory.TrajectoryTurningTracker`
            (``parameterization="time"`` suits steady motion, ``"arclength"`` plateaus joined by fast
            transitions; measured accuracy of both in docs/essential_dynamics.md).
        image_every_n_snapshots: how often to write the PC-plane image to TensorBoard (and at the end
            of training); ``0`` disables images.
        stages_from: what colours the image by stage (a :class:`StageSource`); default: the
            ``StageDetector`` among the trainer's callbacks if there is one, else our turning points.
    """

    def __init__(
        self,
        probe: ProbeSpec,
        every_n_steps: int = 50,
        num_components: int = 3,
        max_snapshots: int = 2000,
        rank: int | None = None,
        forward_fn: Callable[[torch.nn.Module, Any], Any] | None = None,
        smoothing: float = 3.0,
        min_angle_deg: float = 45.0,
        min_pairs: int = 2,
        tolerance: int | None = None,
        image_every_n_snapshots: int = 20,
        parameterization: str = "arclength",
        min_snr: float = 3.0,
        stages_from: StageSource | None = None,
        alpha: float | None = 0.01,
    ) -> None:
        super().__init__()
        if not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"every_n_steps must be a positive int, got {every_n_steps!r}")
        if num_components < 2:
            raise ValueError(f"num_components must be >= 2 (a trajectory needs a plane), got {num_components}")
        rank = num_components + 5 if rank is None else int(rank)
        if rank < num_components:
            raise ValueError(f"rank ({rank}) must be >= num_components ({num_components})")
        if probe is None:
            raise ValueError("probe is required: a fixed batch of inputs (Tensor/tuple/dict) or a callable returning one")
        if stages_from is not None and not isinstance(stages_from, StageSource):
            raise TypeError(f"stages_from must have a `stages` attribute (e.g. a StageDetector), got {stages_from!r}")
        self.probe = probe
        self.every_n_steps = every_n_steps
        self.schedule = EveryNSteps(every_n_steps)
        self.num_components = int(num_components)
        self.forward_fn = forward_fn or default_forward
        self.image_every_n_snapshots = int(image_every_n_snapshots)
        self.stages_from = stages_from
        self.tracker = TrajectoryTurningTracker(
            MONITOR, smoothing=smoothing, min_angle_deg=min_angle_deg, min_pairs=min_pairs, tolerance=tolerance,
            min_snr=min_snr, parameterization=parameterization, alpha=alpha,
        )
        self.pca = IncrementalPCA(rank=rank, max_snapshots=max_snapshots)
        self.history = SeriesStore()
        self._last_step = -1
        self._probe_batch: Any = None
        self._stage_source: StageSource | None = stages_from

    @property
    def state_key(self) -> str:
        # Two instances (e.g. different probes or intervals) must not overwrite each other's state.
        return self._generate_state_key(every_n_steps=self.every_n_steps, num_components=self.num_components)

    # ---- public API ------------------------------------------------------------------------------
    @property
    def turning_points(self) -> list[TurningPoint]:
        """Confirmed turning points, in order of confirmation (``turning_points[i]`` is transition ``i``)."""
        return self.tracker.turning_points

    def published_transitions(self, monitor: str) -> list[Transition]:
        """Confirmed turning points as ``Transition(kind="turning_point")``, for ``"ed/trajectory"``."""
        return list(self.tracker.transitions) if monitor == MONITOR else []

    def trajectory(self) -> tuple[list[int], np.ndarray]:
        """``(steps, scores)``: all stored snapshots on the current top components (``N x k``)."""
        scores, _, _ = self.pca.components(self.num_components)
        return list(self.pca.steps), scores

    @torch.no_grad()
    def snapshot(self, model: torch.nn.Module) -> Tensor:
        """The model's flattened outputs on the probe batch (float64, CPU); the model is left as found."""
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        batch = to_device(self._resolve_probe(), device, None)
        with forked_rng(cuda_devices(device)), preserved_modes(model, eval_mode=True):
            out = self.forward_fn(model, batch)
        return flatten_outputs(out).cpu()

    def render_image(self, stage_steps: Sequence[int] | None = None) -> np.ndarray:
        """RGB image (``H x W x 3`` uint8) of the trajectory in each pair of the first three
        components, coloured by stage (segments between ``stage_steps``; default: the confirmed
        turning points), with the evolute of the smoothed curve and the turning points marked."""
        steps, scores = self.trajectory()
        turns = [tp.step for tp in self.turning_points]
        return trajectory_figure_rgb(steps, scores, turning_steps=turns,
                                     stage_steps=turns if stage_steps is None else stage_steps,
                                     smoothing=self.tracker.smoothing)

    # ---- Lightning hooks -------------------------------------------------------------------------
    @staticmethod
    def _should_skip(trainer: pl.Trainer) -> bool:
        return bool(trainer.sanity_checking or trainer.fast_dev_run)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        detectors = [cb for cb in trainer.callbacks if isinstance(cb, StageDetector)]
        if self.stages_from is None:
            self._stage_source = next(iter(detectors), None)
        acting = [r.name for d in detectors for r in d.rules
                  if r.monitor == MONITOR and {"halt", "checkpoint"} & set(r.actions)]
        if acting:
            rank_zero_warn(
                f"EssentialDynamics: rule(s) {acting} halt or checkpoint on {MONITOR!r} turning points, which "
                "are published on most pure-noise trajectories (docs/essential_dynamics.md, 'False alarms'). "
                "Use actions=['log'] and check a turning point against the LLC before acting on it.",
                category=UserWarning,
            )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._should_skip(trainer):
            return
        try:
            self.schedule.validate(float(trainer.estimated_stepping_batches))
        except ValueError as err:
            raise ValueError(f"EssentialDynamics(every_n_steps={self.every_n_steps}): {err}") from None
        self._resolve_probe()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._should_skip(trainer) and trainer.global_step > self._last_step:  # not on resume
            self._snapshot_and_publish(trainer, pl_module)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        # With gradient accumulation several batches end at the same global step; record once.
        if not self._should_skip(trainer) and step > self._last_step and self.schedule.is_due(step):
            self._snapshot_and_publish(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._should_skip(trainer) or len(self.pca) < 3 or not trainer.is_global_zero:
            return
        if self.image_every_n_snapshots:
            self._log_image(trainer)
        # The whole trajectory on the final basis, once: the logged ed/pc* scalars each sit on the
        # basis of their own time, so they cannot be redrawn as one curve afterwards.
        for w in self._tb_writers(trainer):
            w.add_text(tags.ED_TRAJECTORY_FINAL, trajectory_csv(*self.trajectory()), global_step=trainer.global_step)

    # ---- one snapshot ----------------------------------------------------------------------------
    def _resolve_probe(self) -> Any:
        if self._probe_batch is None:
            self._probe_batch = self.probe() if callable(self.probe) and not isinstance(self.probe, Tensor) \
                else self.probe
        return self._probe_batch

    def _snapshot_and_publish(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = int(trainer.global_step)
        x = self.snapshot(pl_module)
        self.pca.add(x, step)
        self._last_step = step
        k = self.num_components
        coords = self.pca.project(x, k)
        metrics = {tags.ed_component(i): float(coords[i]) for i in range(k)}
        metrics[tags.ED_EXPLAINED_VARIANCE] = float(self.pca.explained_variance_ratio(k).sum())
        for key, value in metrics.items():
            self.history.append(key, SeriesPoint(step=step, value=value))
        steps, scores = self.trajectory()
        new = self.tracker.update(steps, scores, now=step)
        # Loggers are rank-zero-only; every rank computes the same PCA from the same outputs, so the
        # published transitions agree across ranks without communication.
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)
            if new:
                self._log_turning_points(trainer, self.turning_points[-len(new):], step)
            n = self.pca.num_seen
            if self.image_every_n_snapshots and n >= 3 and n % self.image_every_n_snapshots == 0:
                self._log_image(trainer)
        trainer.callback_metrics.update({key: torch.tensor(v) for key, v in metrics.items()})

    # ---- sinks -----------------------------------------------------------------------------------
    @staticmethod
    def _tb_writers(trainer: pl.Trainer) -> list[Any]:
        exps = [getattr(logger, "experiment", None) for logger in trainer.loggers]
        return [e for e in exps if e is not None and hasattr(e, "add_image") and hasattr(e, "add_text")]

    def _log_turning_points(self, trainer: pl.Trainer, new: list[TurningPoint], step: int) -> None:
        for w in self._tb_writers(trainer):
            w.add_text(tags.ED_TURNING_POINTS, turning_points_markdown(step, new), global_step=step)

    def _log_image(self, trainer: pl.Trainer) -> None:
        writers = self._tb_writers(trainer)
        if not writers:
            return
        source = self._stage_source
        img = self.render_image(None if source is None else [s.start_step for s in source.stages if s.index > 0])
        for w in writers:
            w.add_image(tags.ED_TRAJECTORY, img, global_step=int(trainer.global_step), dataformats="HWC")

    # ---- persistence -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        # The tracker's keys sit at the top level, as before the tracker was split out, so older
        # checkpoints still load.
        return {**self.tracker.state_dict(), "pca": self.pca.state_dict(), "history": self.history.state_dict(),
                "last_step": self._last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.pca.load_state_dict(state_dict["pca"])
        self.history.load_state_dict(state_dict["history"])
        self.tracker.load_state_dict(state_dict)
        self._last_step = int(state_dict["last_step"])
