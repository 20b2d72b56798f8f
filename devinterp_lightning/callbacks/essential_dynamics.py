"""EssentialDynamics: PCA of the model's outputs on a fixed probe batch over training, and its
turning points. Thin glue around :mod:`devinterp_lightning.essential_dynamics`.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from devinterp_lightning import tags
from devinterp_lightning.essential_dynamics import (
    IncrementalPCA,
    TurningPoint,
    confirmation_lag,
    denoised_arclength,
    find_turning_points,
    planar_geometry,
)
from devinterp_lightning.sampling.batches import to_device
from devinterp_lightning.sampling.snapshot import cuda_devices, forked_rng, preserved_modes
from devinterp_lightning.schedule import EveryNSteps
from devinterp_lightning.series import SeriesPoint, SeriesStore
from devinterp_lightning.stages.events import Transition

MONITOR = tags.ED_TRAJECTORY

ProbeSpec = Tensor | tuple | list | Mapping | Callable[[], Any]


def _flatten_output(out: Any) -> Tensor:
    """Concatenate every tensor in a (possibly nested) model output, flattened, in a fixed order."""
    if isinstance(out, Tensor):
        return out.detach().reshape(-1)
    if isinstance(out, Mapping):
        parts = [_flatten_output(out[k]) for k in sorted(out, key=str)]
    elif isinstance(out, Sequence) and not isinstance(out, str | bytes):
        parts = [_flatten_output(o) for o in out]
    else:
        raise TypeError(
            f"the model returned {type(out).__name__}; EssentialDynamics needs a Tensor (or tuple/dict "
            "of Tensors). Pass forward_fn=lambda model, batch: ... that returns the outputs to track"
        )
    parts = [p for p in parts if p.numel()]
    if not parts:
        raise ValueError("the model's output on the probe batch is empty; use a non-empty probe batch")
    return torch.cat([p.to(torch.float64) for p in parts])


def _default_forward(model: torch.nn.Module, batch: Any) -> Any:
    if isinstance(batch, tuple | list):
        return model(*batch)
    if isinstance(batch, Mapping):
        return model(**batch)
    return model(batch)


class EssentialDynamics(Callback):
    r"""Track the model's function through training and detect turning points of its trajectory.

    Every ``every_n_steps`` optimizer steps (and once before the first step) the model's outputs
    on a fixed ``probe`` batch are flattened into one vector (under ``torch.no_grad``, in eval mode,
    with the global RNG state saved and restored, so training is not disturbed). An incremental,
    bounded-memory PCA (:class:`~devinterp_lightning.essential_dynamics.IncrementalPCA`) of these
    vectors gives a trajectory in the top ``num_components`` principal components.

    Logged at each snapshot (at the trainer's global step): ``ed/pc1 .. ed/pc{k}`` = the newest
    snapshot's coordinates on the *current* principal components, and
    ``ed/explained_variance`` = the share of the spread captured by those components. The same
    points are kept in :attr:`history`.

    The PCA basis changes as snapshots arrive. Logged values are never rewritten (TensorBoard
    cannot write into the past), so a logged ``ed/pc1`` curve mixes bases; the trajectory image
    and the turning-point detection always recompute the coordinates of *all* stored snapshots on
    the current basis.

    Turning points are cusps of the evolute (vertices of maximal curvature) that appear in at
    least ``min_pairs`` pairs of components within ``tolerance`` snapshots, with a net tangent turn
    of at least ``min_angle_deg``. A turning point is confirmed once ``confirmation_lag(smoothing)``
    further snapshots exist (its smoothing window is complete), published once through
    :meth:`published_transitions` (``monitor="ed/trajectory"``, ``kind="turning_point"``) and never
    retracted.

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
        smoothing: Gaussian bandwidth, in snapshots, of the local quadratic fit used for
            derivatives. Larger = fewer false turns, later confirmation.
        min_angle_deg: minimal net turn of the tangent around a turning point, in degrees.
        min_pairs: a turning point must appear in this many component pairs.
        tolerance: snapshots within which detections in different pairs count as the same one.
        image_every_n_snapshots: how often to write the PC-plane image to TensorBoard (and at the end
            of training); ``0`` disables images.
        parameterization: ``"time"`` (smooth and measure turns along the snapshot index; best for
            steady motion) or ``"arclength"`` (along the distance travelled; best for plateaus
            separated by fast transitions, e.g. saddle-to-saddle dynamics). See
            docs/essential_dynamics.md for the measured accuracy of both.
        min_snr: both legs of a turn must be this many times the local noise.
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
    ) -> None:
        super().__init__()
        if not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"every_n_steps must be a positive int, got {every_n_steps!r}")
        if num_components < 2:
            raise ValueError(
                f"num_components must be >= 2 (a trajectory needs a plane), got {num_components}"
            )
        rank = num_components + 5 if rank is None else int(rank)
        if rank < num_components:
            raise ValueError(f"rank ({rank}) must be >= num_components ({num_components})")
        if smoothing < 0:
            raise ValueError(f"smoothing is a bandwidth in snapshots and must be >= 0, got {smoothing}")
        if not 0 < min_angle_deg < 360:
            raise ValueError(f"min_angle_deg must be in (0, 360), got {min_angle_deg}")
        if parameterization not in ("time", "arclength"):
            raise ValueError(f"parameterization must be 'time' or 'arclength', got {parameterization!r}")
        if probe is None:
            raise ValueError(
                "probe is required: a fixed batch of inputs (Tensor/tuple/dict) or a callable returning one"
            )
        self.probe = probe
        self.every_n_steps = every_n_steps
        self.schedule = EveryNSteps(every_n_steps)
        self.num_components = int(num_components)
        self.forward_fn = forward_fn or _default_forward
        self.smoothing = float(smoothing)
        self.min_angle_deg = float(min_angle_deg)
        self.min_pairs = int(min_pairs)
        self.tolerance = tolerance
        self.image_every_n_snapshots = int(image_every_n_snapshots)
        self.parameterization = parameterization
        self.min_snr = float(min_snr)
        self.pca = IncrementalPCA(rank=rank, max_snapshots=max_snapshots)
        self.history = SeriesStore()
        self.turning_points: list[TurningPoint] = []  # confirmed, in order of confirmation
        self._transitions: list[Transition] = []
        self._frontier_step = -1  # snapshots at or before this step have been judged
        self._last_step = -1
        self._probe_batch: Any = None

    @property
    def state_key(self) -> str:
        # Two instances (e.g. different probes or intervals) must not overwrite each other's state
        # in a checkpoint.
        return self._generate_state_key(every_n_steps=self.every_n_steps, num_components=self.num_components)

    # ---- public API ------------------------------------------------------------------------------
    def published_transitions(self, monitor: str) -> list[Transition]:
        """Confirmed turning points as ``Transition(kind="turning_point")``, for ``"ed/trajectory"``."""
        return list(self._transitions) if monitor == MONITOR else []

    def trajectory(self) -> tuple[list[int], np.ndarray]:
        """``(steps, scores)``: all stored snapshots on the current top components (``N x k``)."""
        scores, _, _ = self.pca.components(self.num_components)
        return list(self.pca.steps), scores

    # ---- snapshot --------------------------------------------------------------------------------
    def _resolve_probe(self) -> Any:
        if self._probe_batch is None:
            probe = (
                self.probe() if callable(self.probe) and not isinstance(self.probe, Tensor) else self.probe
            )
            self._probe_batch = probe
        return self._probe_batch

    @torch.no_grad()
    def snapshot(self, model: torch.nn.Module) -> Tensor:
        """The model's flattened outputs on the probe batch (float64, CPU); the model is left as found."""
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        batch = to_device(self._resolve_probe(), device, None)
        with forked_rng(cuda_devices(device)), preserved_modes(model, eval_mode=True):
            out = self.forward_fn(model, batch)
        return _flatten_output(out).cpu()

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        try:
            self.schedule.validate(float(trainer.estimated_stepping_batches))
        except ValueError as err:
            raise ValueError(f"EssentialDynamics(every_n_steps={self.every_n_steps}): {err}") from None
        self._resolve_probe()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_step > self._last_step:  # not when resuming at an already-recorded step
            self._record(trainer, pl_module)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        # With gradient accumulation several batches end at the same global step; record once.
        if step > self._last_step and self.schedule.is_due(step):
            self._record(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if len(self.pca) < 3 or not trainer.is_global_zero:
            return
        if self.image_every_n_snapshots:
            self._write_image(trainer)
        # The whole trajectory on the final basis, once: the logged ed/pc* scalars each sit on the
        # basis of their own time, so they cannot be redrawn as one curve afterwards.
        steps, scores = self.trajectory()
        header = "step," + ",".join(f"pc{i + 1}" for i in range(scores.shape[1]))
        lines = [f"{s}," + ",".join(f"{v:.6g}" for v in row) for s, row in zip(steps, scores, strict=True)]
        text = "Trajectory on the final PCA basis (CSV):\n\n```\n" + "\n".join([header, *lines]) + "\n```"
        for w in self._tb_writers(trainer):
            w.add_text(tags.ED_TRAJECTORY_FINAL, text, global_step=int(trainer.global_step))

    def _record(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = int(trainer.global_step)
        x = self.snapshot(pl_module)
        self.pca.add(x, step)
        self._last_step = step
        k = self.num_components
        coords = self.pca.project(x, k)
        evr = float(self.pca.explained_variance_ratio(k).sum())
        metrics = {tags.ed_component(i): float(coords[i]) for i in range(k)}
        metrics[tags.ED_EXPLAINED_VARIANCE] = evr
        for key, value in metrics.items():
            self.history.append(key, SeriesPoint(step=step, value=value))
        new = self._detect(step)
        # Loggers are rank-zero-only; every rank computes the same PCA from the same outputs, so the
        # published transitions agree across ranks without communication.
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)
            if new:
                self._write_text(trainer, new, step)
            n = self.pca.num_seen
            if self.image_every_n_snapshots and n >= 3 and n % self.image_every_n_snapshots == 0:
                self._write_image(trainer)
        trainer.callback_metrics.update({key: torch.tensor(v) for key, v in metrics.items()})

    # ---- detection -------------------------------------------------------------------------------
    def _detect(self, step: int) -> list[TurningPoint]:
        steps, scores = self.trajectory()
        n = len(steps)
        lag = confirmation_lag(self.smoothing)
        if n <= 2 * lag:
            return []
        found = find_turning_points(
            scores,
            steps,
            sigma=self.smoothing,
            min_angle=math.radians(self.min_angle_deg),
            min_pairs=self.min_pairs,
            tolerance=self.tolerance,
            min_snr=self.min_snr,
            parameter=self.parameterization,
            exclude_last=lag,  # points whose smoothing window is still incomplete
        )
        ready = steps[n - 1 - lag]  # snapshots up to here have their full window
        tol_snap = self.tolerance if self.tolerance is not None else max(2, math.ceil(self.smoothing))
        spacing = (steps[-1] - steps[0]) / max(n - 1, 1)
        tol_steps = tol_snap * spacing
        if self.parameterization == "arclength":
            # The same corner can map to a slightly different snapshot as the basis moves; two
            # turning points are the same when close in steps or when little distance was
            # travelled between them.
            arc, _ = denoised_arclength(scores, self.smoothing)
            where = {s: i for i, s in enumerate(steps)}
            arc_tol = (tol_snap + 1) * arc[-1] / max(n - 1, 1)

            def same(a: int, b: int) -> bool:
                if abs(a - b) <= tol_steps:
                    return True
                return a in where and b in where and abs(arc[where[a]] - arc[where[b]]) <= arc_tol
        else:

            def same(a: int, b: int) -> bool:
                return abs(a - b) <= tol_steps

        new: list[TurningPoint] = []
        for tp in found:
            # In time, each stretch is judged once, when its window completes; later candidates
            # there come from a moved basis, not a moved trajectory. In arc length a plateau's
            # arrival becomes a turn only when the trajectory leaves it, possibly long after.
            if self.parameterization == "time" and (
                tp.step > ready or tp.step <= self._frontier_step - tol_steps
            ):
                continue
            if any(same(tp.step, old.step) for old in self.turning_points):
                continue
            new.append(tp)
        self._frontier_step = max(self._frontier_step, ready)
        for tp in new:
            self.turning_points.append(tp)
            self._transitions.append(self._to_transition(tp, step, scores, steps))
        return new

    def _to_transition(self, tp: TurningPoint, step: int, scores: np.ndarray, steps: list[int]) -> Transition:
        # Levels: mean PC1 over the smoothing window before / after the turn; direction: sign of
        # the PC1 change across it (PC1 is the dominant direction of development).
        h = max(2, math.ceil(3 * self.smoothing))
        i = tp.index
        before = float(scores[max(0, i - h) : i + 1, 0].mean())
        after = float(scores[i : i + h + 1, 0].mean())
        return Transition(
            monitor=MONITOR,
            step=int(step),
            changepoint_step=int(tp.step),
            direction="increase" if after >= before else "decrease",
            level_before=before,
            level_after=after,
            kind="turning_point",
        )

    # ---- sinks -----------------------------------------------------------------------------------
    @staticmethod
    def _tb_writers(trainer: pl.Trainer) -> list[Any]:
        out = []
        for logger in trainer.loggers:
            exp = getattr(logger, "experiment", None)
            if exp is not None and hasattr(exp, "add_image") and hasattr(exp, "add_text"):
                out.append(exp)
        return out

    def _write_text(self, trainer: pl.Trainer, new: list[TurningPoint], step: int) -> None:
        rows = ["| confirmed at step | turning step | turn (deg) | pairs |", "|---|---|---|---|"]
        for tp in new:
            pairs = ", ".join(f"PC{a + 1}/PC{b + 1}" for a, b in tp.pairs)
            rows.append(f"| {step} | {tp.step} | {math.degrees(tp.turn):.0f} | {pairs} |")
        for w in self._tb_writers(trainer):
            w.add_text(tags.ED_TURNING_POINTS, "\n".join(rows), global_step=step)

    def render_image(self, stage_steps: Sequence[int] | None = None) -> np.ndarray:
        """RGB image (``H x W x 3`` uint8) of the trajectory in each pair of the first three
        components, coloured by stage (segments between ``stage_steps``; default: the confirmed
        turning points), with the evolute of the smoothed curve and the turning points marked."""
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        steps, scores = self.trajectory()
        steps_arr = np.asarray(steps)
        bounds = sorted(stage_steps if stage_steps is not None else [tp.step for tp in self.turning_points])
        stage = np.searchsorted(np.asarray(bounds), steps_arr, side="right")
        k = min(self.num_components, 3)
        pairs = [(a, b) for a in range(k) for b in range(a + 1, k)]
        fig, axes = plt.subplots(1, len(pairs), figsize=(4.2 * len(pairs), 4.0), squeeze=False)
        cmap = plt.get_cmap("tab10")
        for ax, (a, b) in zip(axes[0], pairs, strict=True):
            xy = scores[:, [a, b]]
            ax.plot(xy[:, 0], xy[:, 1], color="0.75", lw=0.8, zorder=1)
            ax.scatter(xy[:, 0], xy[:, 1], c=[cmap(s % 10) for s in stage], s=9, zorder=2)
            if len(xy) >= 5:
                geo = planar_geometry(xy, self.smoothing)
                ev = geo.evolute
                span = np.ptp(xy, axis=0).max() or 1.0
                ok = np.all(np.isfinite(ev), axis=1) & (np.abs(ev - xy.mean(axis=0)).max(axis=1) < 2 * span)
                ax.scatter(ev[ok, 0], ev[ok, 1], s=2, color="black", alpha=0.4, zorder=1)
            for tp in self.turning_points:
                j = int(np.searchsorted(steps_arr, tp.step))
                if j < len(xy):
                    ax.scatter(xy[j, 0], xy[j, 1], marker="*", s=140, color="red", edgecolor="k", zorder=3)
            ax.set_xlabel(f"PC{a + 1}")
            ax.set_ylabel(f"PC{b + 1}")
            ax.set_aspect("equal", adjustable="datalim")
        fig.suptitle(f"essential dynamics: {len(steps)} snapshots to step {steps[-1] if steps else 0}")
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=80)
        plt.close(fig)
        buf.seek(0)
        img = plt.imread(buf)
        return (img[..., :3] * 255).astype(np.uint8)

    def _stage_steps(self, trainer: pl.Trainer) -> list[int] | None:
        # Colour by the stage detector's stages when one exposes them (duck-typed: an attribute or
        # method `stages` giving Stage objects); otherwise by our own turning points.
        for cb in trainer.callbacks:  # type: ignore[attr-defined]
            stages = getattr(cb, "stages", None)
            if cb is self or stages is None:
                continue
            try:
                stages = stages() if callable(stages) else stages
                if isinstance(stages, Mapping):
                    stages = next(iter(stages.values()), [])
                return [int(s.start_step) for s in stages if getattr(s, "index", 0) > 0]
            except Exception:  # a foreign object we do not understand: fall back
                return None
        return None

    def _write_image(self, trainer: pl.Trainer) -> None:
        writers = self._tb_writers(trainer)
        if not writers or not trainer.is_global_zero:
            return
        img = self.render_image(self._stage_steps(trainer))
        for w in writers:
            w.add_image(tags.ED_TRAJECTORY, img, global_step=int(trainer.global_step), dataformats="HWC")

    # ---- persistence -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "pca": self.pca.state_dict(),
            "history": self.history.state_dict(),
            "turning_points": [tp.to_dict() for tp in self.turning_points],
            "transitions": [t.to_dict() for t in self._transitions],
            "frontier_step": self._frontier_step,
            "last_step": self._last_step,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.pca.load_state_dict(state_dict["pca"])
        self.history.load_state_dict(state_dict["history"])
        self.turning_points = [TurningPoint.from_dict(d) for d in state_dict["turning_points"]]
        self._transitions = [Transition.from_dict(d) for d in state_dict["transitions"]]
        self._frontier_step = int(state_dict["frontier_step"])
        self._last_step = int(state_dict["last_step"])
