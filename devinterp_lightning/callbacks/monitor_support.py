"""The steps of :class:`~devinterp_lightning.LLCMonitor` that are not scheduling: resolving and
checking its options, reading the probe data, calibrating once for all ranks, showing progress
and publishing estimates to the loggers, ``callback_metrics`` and the series store.

Each is a function of plain values plus the trainer, so the callback stays a list of hooks.
"""

from __future__ import annotations

import importlib
import logging
import time
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info

from devinterp_lightning.sampling.result import LLCResult
from devinterp_lightning.sampling.settings import SGLDSettings
from devinterp_lightning.sampling.snapshot import forked_rng
from devinterp_lightning.sampling.worker import BackgroundSampler, EstimateRequest, WorkerDied
from devinterp_lightning.series import SeriesPoint, SeriesStore

__all__ = [
    "Progress",
    "WorkerLink",
    "cache_train_batches",
    "is_dry_run",
    "calibrate_on_rank_zero",
    "check_names",
    "check_options",
    "check_strategy",
    "jobs",
    "materialize",
    "pending_limit",
    "publish",
    "resolve_dotted",
    "validate_schedule",
]

log = logging.getLogger("devinterp_lightning")

#: Strategies whose parameters are sharded across ranks; sampling needs the full weights.
SHARDED_STRATEGIES = ("FSDP", "DeepSpeed", "ModelParallel")
#: what calibrate_llc gets from the monitor, so the calibration matches the estimates
RESERVED_CALIBRATE_KWARGS = frozenset({"model", "loss_fn", "loader", "nbeta", "num_chains", "num_draws",
                                       "num_burnin_steps", "num_steps_bw_draws", "seed", "device", "progress"})


def resolve_dotted(path: str) -> Any:
    """Import ``"package.module.attribute"`` (attributes may be nested: ``"mod.Class.method"``)."""
    if not isinstance(path, str) or "." not in path:
        raise ValueError(f"expected a dotted import path such as 'examples.configs.losses.mse'; got {path!r}")
    parts = path.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError as err:
            # only "this prefix is not a module" means try a shorter prefix; a module that fails
            # to import one of *its* dependencies must surface
            if err.name is None or not ".".join(parts[:cut]).startswith(err.name):
                raise
            continue
        try:
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
        except AttributeError:
            raise ValueError(
                f"cannot resolve {path!r}: module {'.'.join(parts[:cut])!r} has no attribute path "
                f"{'.'.join(parts[cut:])!r}. Check the spelling of the import path."
            ) from None
        return obj
    raise ValueError(
        f"cannot resolve {path!r}: no prefix of it is an importable module. Check that the package is "
        "installed or on PYTHONPATH (run from the repository root for 'examples.*' paths)."
    )


def is_dry_run(trainer: pl.Trainer) -> bool:
    """Sanity checking and ``fast_dev_run`` exercise the loop; an estimate there would only cost time."""
    return trainer.sanity_checking or bool(trainer.fast_dev_run)


def check_names(restrictions: Mapping[str, Any], datasets: Mapping[str, Any], cross: bool) -> None:
    """Names must be usable in metric names and unambiguous; ``cross`` needs both kinds."""
    for kind, names in (("restriction", restrictions), ("dataset", datasets)):
        for name in names:
            if not isinstance(name, str) or not name or "/" in name or "@" in name:
                raise ValueError(
                    f"{kind} name {name!r} is not usable in a metric name: use a non-empty string "
                    "without '/' or '@' (e.g. 'layer2')"
                )
    clash = sorted(set(restrictions) & set(datasets))
    if clash:
        raise ValueError(
            f"names {clash} are used both in restrictions and in datasets, so their metrics would collide; "
            "rename one of them"
        )
    if cross and not (restrictions and datasets):
        raise ValueError("cross=True needs both restrictions and datasets; pass both or set cross=False")


def check_options(seed: Any, num_data_batches: Any, calibrate: str, calibrate_kwargs: Mapping[str, Any],
                  background: Any, when_busy: str, max_pending: Any) -> None:
    """The monitor's own options (the SGLD settings are checked by ``SGLDSettings``)."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer; got {seed!r}")
    if isinstance(num_data_batches, bool) or not isinstance(num_data_batches, int) or num_data_batches < 1:
        raise ValueError(f"num_data_batches must be a positive integer; got {num_data_batches!r}")
    if background not in (False, True, "process"):
        raise ValueError(f"background must be False, True or 'process'; got {background!r}")
    if when_busy not in ("block", "skip"):
        raise ValueError(f"when_busy must be 'block' or 'skip'; got {when_busy!r}")
    if max_pending != "auto" and (isinstance(max_pending, bool) or not isinstance(max_pending, int) or max_pending < 1):
        raise ValueError(f"max_pending must be a positive integer (snapshots in flight) or 'auto'; got {max_pending!r}")
    if calibrate not in ("never", "once"):
        raise ValueError(f"calibrate must be 'never' or 'once'; got {calibrate!r}")
    reserved = sorted(set(calibrate_kwargs) & RESERVED_CALIBRATE_KWARGS)
    if reserved:
        raise ValueError(
            f"calibrate_kwargs may not set {reserved}: the monitor passes its own values so the calibration "
            "matches the estimates; set them on LLCMonitor instead"
        )


def check_strategy(trainer: pl.Trainer, num_chains: int, background: bool) -> None:
    """Refuse sharded strategies, fewer chains than ranks, and background sampling under DDP."""
    strategy = type(trainer.strategy).__name__
    if any(s in strategy for s in SHARDED_STRATEGIES):
        raise RuntimeError(
            f"LLCMonitor does not support {strategy} yet: the parameters are sharded across ranks and "
            "SGLD needs the full weights. Use strategy='ddp' (chains are split across ranks), or "
            "estimate after training with estimate_llc on a gathered full state dict."
        )
    if trainer.world_size > num_chains:
        raise ValueError(f"num_chains={num_chains} is smaller than the world size {trainer.world_size}: "
                         f"every rank runs at least one chain. Set num_chains >= {trainer.world_size}.")
    if background and trainer.world_size > 1:
        raise ValueError(
            "LLCMonitor(background=True) does not support multi-process training yet: the ranks' estimates "
            "would arrive at different times and their merge is a collective. Use background=False under "
            "DDP (the chains are already split across the ranks)."
        )


def jobs(prefix: str, data: Any, restrictions: Mapping[str, Any], datasets: Mapping[str, Any],
         cross: bool) -> dict[str, tuple[Any, Any]]:
    """``{metric base: (loader, restriction)}`` in estimation order: all weights on ``data``, each
    weight restriction on ``data``, all weights on each data restriction, then the cross product."""
    out: dict[str, tuple[Any, Any]] = {prefix: (data, None)}
    out.update({f"{prefix}/{w}": (data, r) for w, r in restrictions.items()})
    out.update({f"{prefix}/{d}": (loader, None) for d, loader in datasets.items()})
    if cross:
        out.update({f"{prefix}/{w}@{d}": (loader, r) for w, r in restrictions.items() for d, loader in datasets.items()})
    return out


def validate_schedule(schedule: Any, total_steps: float | None) -> None:
    """``schedule.validate`` with the monitor's name in the message; Lightning reports an unknown
    run length (an ``IterableDataset`` without ``max_steps``) as -1 or inf: no bound then."""
    total = float("inf") if total_steps is None or total_steps < 0 else total_steps
    try:
        schedule.validate(total)
    except ValueError as err:
        raise ValueError(f"LLCMonitor every_n_steps: {err}") from None


#: ``max_pending="auto"``: snapshots in flight may hold this many bytes in all (at most 8 snapshots)
AUTO_PENDING_BYTES = 1 << 30


def pending_limit(max_pending: int | str, model: torch.nn.Module) -> int:
    """``max_pending``, or for ``"auto"`` the number of copies of ``model``'s parameters and buffers
    that fit in :data:`AUTO_PENDING_BYTES`, between 1 and 8: a log-spaced schedule's dense early
    steps then queue up instead of making training wait, with memory bounded for large models."""
    if max_pending != "auto":
        return int(max_pending)
    size = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    return max(1, min(8, AUTO_PENDING_BYTES // max(size, 1)))


def materialize(spec: Any, label: str) -> Any:
    """A re-iterable of batches from a loader, a list or a zero-argument callable returning one."""
    loader = spec() if callable(spec) and not hasattr(spec, "__iter__") else spec
    if not hasattr(loader, "__iter__"):
        raise TypeError(
            f"LLCMonitor {label} must be an iterable of batches (a DataLoader, a list) or a callable "
            f"returning one; got {type(loader).__name__}"
        )
    try:
        length = len(loader)
    except TypeError:  # an iterable without a length is checked when first iterated
        length = None
    if length == 0:
        raise ValueError(
            f"LLCMonitor {label} has no batches (len 0): check the dataset is not empty and that "
            "drop_last=True with batch_size > dataset size is not dropping everything"
        )
    return loader


def cache_train_batches(trainer: pl.Trainer, count: int) -> list[Any]:
    """The first ``count`` batches of the train loader, read on a fork of the global RNGs."""
    loader = trainer.train_dataloader
    if loader is None or isinstance(loader, (Mapping, list, tuple)):
        raise ValueError(
            "LLCMonitor(data=None) samples on the first batches of the train dataloader, which needs a "
            "single train dataloader; pass data=<loader> (or a dotted path to a function returning one)"
        )
    batches = []
    # Iterating a shuffling loader draws its order from the global RNG; fork it so training
    # sees exactly the order it would have seen without the monitor.
    with forked_rng(host=True):
        for batch in loader:
            batches.append(batch)
            if len(batches) >= count:
                break
    if not batches:
        raise ValueError("LLCMonitor(data=None): the train dataloader yielded no batches; pass data=<loader> explicitly")
    return batches


class Progress:
    """Throttled ``progress(done, total)`` sink: the TQDM bar's postfix, else a console line every ~10 s."""

    def __init__(self, trainer: pl.Trainer, step: int, interval_s: float = 10.0) -> None:
        self.step = step
        self.interval_s = interval_s
        self.start = self.last_report = time.monotonic()
        self.last: tuple[int, int] | None = None
        self.bar = None
        callback = getattr(trainer, "progress_bar_callback", None)
        if callback is not None and trainer.is_global_zero:
            try:  # TQDMProgressBar raises TypeError before its bar exists (e.g. in on_train_start)
                self.bar = getattr(callback, "train_progress_bar", None)
            except TypeError:
                self.bar = None

    def __call__(self, done: int, total: int) -> None:
        self.last = (done, total)
        now = time.monotonic()
        if done < total and now - self.last_report < (0.2 if self.bar is not None else self.interval_s):
            return
        self.last_report = now
        pct = 100.0 * done / max(total, 1)
        if self.bar is not None and hasattr(self.bar, "set_postfix_str"):
            try:
                self.bar.set_postfix_str(f"LLC@{self.step} {pct:.0f}%", refresh=True)
            except Exception:  # a closed or foreign bar must never break training
                self.bar = None
        elif done < total:
            rank_zero_info(f"LLCMonitor: step {self.step}: sampling {pct:.0f}% ({done}/{total} SGLD steps, "
                           f"{now - self.start:.0f} s)")


# The bias check's floor for the monitor's calibration (calibrate_llc's default is 0.01). The monitor
# keeps its own short layout instead of the calibration's relaxation layout, and a smaller step needs a
# longer burn-in: with the 1% floor the deep linear network demo's calibration chose a step that the
# monitor's 4 x 200 draws could not mix, 40 of its 41 estimates came back high_rhat and no transition
# was found; with 5% its estimates are healthy and the first rise is found (docs/monitor.md).
MONITOR_CALIBRATION_REL_TOL = 0.05


def calibrate_on_rank_zero(
    trainer: pl.Trainer, pl_module: pl.LightningModule, loss_fn: Any, data: Any, settings: SGLDSettings,
    seed: int, progress: Any, calibrate_kwargs: Mapping[str, Any],
) -> tuple[Any, dict[str, float], bool]:
    """Run :func:`calibrate_llc` on rank 0 and broadcast its choice.

    Returns ``(calibration or None off rank 0, {"lr", "localization", "nbeta"}, passed its checks)``.
    """
    from devinterp_lightning.sampling.calibrate import calibrate_llc

    calibration, chosen = None, None
    if trainer.is_global_zero:
        with forked_rng(host=True):
            calibration = calibrate_llc(
                pl_module, loss_fn, data, nbeta=settings.nbeta, num_chains=settings.num_chains,
                num_draws=settings.num_draws, num_burnin_steps=settings.num_burnin_steps,
                num_steps_bw_draws=settings.num_steps_bw_draws, seed=seed, device=pl_module.device,
                progress=progress, **{"rel_tol": MONITOR_CALIBRATION_REL_TOL, **calibrate_kwargs},
            )
        kwargs = calibration.as_kwargs()
        chosen = {k: float(kwargs[k]) for k in ("lr", "localization", "nbeta")}
        chosen["ok"] = float(calibration.ok)
        if calibration.ok:
            for logger in trainer.loggers:
                logger.log_hyperparams(calibration.hparams())
        else:
            log.info("LLCMonitor: the calibration did not pass its checks; sampling with its fallback and "
                     "calibrating again at the next scheduled step")
    chosen = trainer.strategy.broadcast(chosen, src=0)
    ok = bool(chosen.pop("ok"))
    return calibration, chosen, ok


def publish(trainer: pl.Trainer, step: int, results: Mapping[str, LLCResult], history: SeriesStore,
            warned: bool) -> bool:
    """Log ``{base}/mean`` and ``{base}/std`` at ``step`` to every logger, ``callback_metrics`` and
    ``history``; report unhealthy estimates (a warning the first time, then INFO). Returns
    whether a warning has now been given."""
    metrics: dict[str, float] = {}
    for base, res in results.items():
        metrics[f"{base}/mean"] = res.mean
        metrics[f"{base}/std"] = res.std
        history.append(f"{base}/mean", SeriesPoint(step=step, value=res.mean, std=res.std, stderr=res.stderr,
                                                   flags=res.flags))
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=step)
    for key, value in metrics.items():
        trainer.callback_metrics[key] = torch.tensor(value)
    unhealthy = {b: r.flags for b, r in results.items() if r.flags}
    if unhealthy and trainer.is_global_zero:
        log.log(logging.INFO if warned else logging.WARNING,
                "LLCMonitor: step %d: unhealthy estimates %s; the flags are kept in monitor.history "
                "(see docs/troubleshooting.md)", step, unhealthy)
    return warned or bool(unhealthy)


class WorkerLink:
    """The training side of a background worker: snapshots in flight (at most ``max_pending``),
    answers handed to ``publish(step, results)`` as they arrive, and the fall-back when the worker
    dies: a warning, then its snapshots in flight estimated in-process with the same seeds.

    After a fall-back :attr:`alive` is False and the monitor samples synchronously.
    """

    def __init__(self, worker: BackgroundSampler, max_pending: int,
                 publish: Callable[[int, dict[str, LLCResult]], None]) -> None:
        self.worker: BackgroundSampler | None = worker
        self.max_pending = max_pending
        self.publish = publish
        #: seconds the worker took to start (imports and unpickling), once it was closed
        self.startup_s: float | None = None

    @property
    def alive(self) -> bool:
        return self.worker is not None

    @property
    def pid(self) -> int | None:
        return None if self.worker is None else self.worker.pid

    @property
    def num_pending(self) -> int:
        return 0 if self.worker is None else len(self.worker.pending)

    def submit(self, request: EstimateRequest) -> bool:
        """Send a snapshot; False when the worker is gone (it has fallen back: sample it here)."""
        if self.worker is None:
            return False
        try:
            self.worker.submit(request)
            return True
        except WorkerDied as err:
            self.fall_back(err)
            return False

    def collect(self, wait: bool, count: int | None = None) -> None:
        """Publish the answers that arrived (or wait for ``count`` of them, all by default)."""
        if self.worker is None:
            return
        try:
            answers = self.worker.wait(count) if wait else self.worker.ready()
        except WorkerDied as err:
            self.fall_back(err)
            return
        for request, results in answers:
            self.publish(request.step, results)

    def fall_back(self, err: WorkerDied) -> None:
        worker, self.worker = self.worker, None
        assert worker is not None
        warnings.warn(f"{err}. Falling back to synchronous sampling; the {len(worker.pending)} snapshot(s) "
                      "in flight are estimated in the training process.", RuntimeWarning, stacklevel=4)
        for request, results in worker.redo_in_process():
            self.publish(request.step, results)

    def close(self, timeout: float = 10.0) -> None:
        if self.worker is not None:
            self.startup_s = self.worker.startup_s
            self.worker.close(timeout)
            self.worker = None
