"""``LLCMonitor``: estimate the local learning coefficient on a schedule while a model trains.

The callback is glue: it decides *when* (a :mod:`devinterp_lightning.schedule`), snapshots the
weights and either estimates right away (:func:`~devinterp_lightning.sampling.estimator.estimate_llcs`)
or hands the snapshot to a worker process (:mod:`devinterp_lightning.sampling.worker`), merges
chains across DDP ranks (:mod:`devinterp_lightning.sampling.distributed`) and publishes the
numbers (:mod:`devinterp_lightning.callbacks.monitor_support`). See docs/monitor.md.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from devinterp_lightning.callbacks import monitor_support as support
from devinterp_lightning.callbacks.monitor_support import resolve_dotted
from devinterp_lightning.sampling.distributed import gather_chains, local_chains
from devinterp_lightning.sampling.estimator import estimate_llcs
from devinterp_lightning.sampling.result import LLCResult
from devinterp_lightning.sampling.settings import SGLDSettings
from devinterp_lightning.sampling.snapshot import resolve_restriction
from devinterp_lightning.sampling.warm_start import ChainOffsets
from devinterp_lightning.sampling.worker import (
    START_METHODS,
    BackgroundSampler,
    derive_seed,
    pack_payload,
    snapshot_request,
)
from devinterp_lightning.schedule import LogSpaced, Schedule, as_schedule
from devinterp_lightning.series import SeriesStore

__all__ = ["DEFAULT_SETTINGS", "LLCMonitor", "resolve_dotted"]

_derive_seed = derive_seed  # the name the tests and older scripts import
def default_schedule() -> LogSpaced:
    """The schedule of a monitor given no ``every_n_steps`` (docs/monitor.md, "Choosing the defaults")."""
    return LogSpaced(start=100, per_decade=5)


#: burn-in steps of a warm-started estimate (``warm_start=True``)
WARM_START_BURNIN = 10
#: the SGLD settings a monitor samples with when none are given (docs/monitor.md: how they were chosen)
DEFAULT_SETTINGS = SGLDSettings(lr=1e-4, localization=100.0, nbeta=None, num_chains=4, num_draws=100,
                                num_burnin_steps=50, num_steps_bw_draws=1)


class _Setting:
    """``monitor.lr`` etc.: a view of one field of ``monitor.settings`` (settable, re-validated)."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, owner: type) -> Any:
        return self if obj is None else getattr(obj.settings, self.name)

    def __set__(self, obj: Any, value: Any) -> None:
        obj.settings = obj.settings.replace(**{self.name: value})


class LLCMonitor(Callback):
    """Estimate the LLC of the model on a schedule during ``trainer.fit``.

    Logs ``<prefix>/mean`` and ``<prefix>/std`` (all weights on ``data``), ``<prefix>/<w>/...``
    per weight restriction, ``<prefix>/<d>/...`` per data restriction and ``<prefix>/<w>@<d>/...``
    with ``cross=True``, at the step of the snapshot; ``mean`` is the mean over chains, ``std``
    their standard deviation (stderr and health flags are in :attr:`history`). Every parameter is
    documented in docs/monitor.md.

    Args:
        loss_fn: ``loss_fn(model, batch) -> scalar`` mean loss over the batch, or a dotted path to one.
        data: re-iterable batches (or a dotted path to them or to a function returning them); None:
            the first ``num_data_batches`` train batches, cached at train start.
        every_n_steps: an ``int``, a list of steps or a :class:`~devinterp_lightning.schedule.Schedule`;
            None: ``LogSpaced(start=100, per_decade=5)`` (0, 100, 158, 251, 398, 631, 1000, ...).
        restrictions, datasets, cross: weight restrictions (globs or masks), data restrictions
            (loaders), and their cross product.
        lr, localization, nbeta, num_chains, num_draws, num_burnin_steps, num_steps_bw_draws: SGLD
            settings laid over ``settings`` (default :data:`DEFAULT_SETTINGS`).
        settings: all SGLD settings as one :class:`~devinterp_lightning.sampling.settings.SGLDSettings`.
        seed: the estimate at step ``t`` on rank ``r`` uses seed ``derive_seed(seed, t, r)``.
        num_data_batches, progress, prefix: train batches cached for ``data=None``, progress display,
            first component of every metric name.
        calibrate, calibrate_kwargs: ``"once"`` chooses ``lr`` and ``localization`` with ``calibrate_llc``.
        background: sample in a worker process while training goes on (``True`` or ``"process"``).
        worker_device, worker_threads: the worker's device and torch threads.
        worker_start_method: ``"auto"`` (``fork`` on Linux for a CPU worker while CUDA is not
            initialized, else ``spawn``), ``"spawn"``, ``"fork"`` or ``"forkserver"``.
        max_pending: snapshots in flight at most (each holds one copy of the weights); ``"auto"``:
            as many as fit in 1 GiB, between 1 and 8.
        when_busy: ``"block"`` (wait for the oldest estimate) or ``"skip"`` (drop the due step).
        warm_start: ``True`` (default): every estimate after the first of a ``fit`` starts its
            chains at the new ``w*`` plus the previous chains' last offsets, with 10 burn-in steps
            (fewer SGLD steps, and the flat directions keep equilibrating across estimates;
            docs/monitor.md, "Warm-started chains"); an ``int``: that many burn-in steps for
            warm-started estimates; ``False``: every estimate starts its chains at ``w*``.
    """

    lr = _Setting()
    localization = _Setting()
    nbeta = _Setting()
    num_chains = _Setting()
    num_draws = _Setting()
    num_burnin_steps = _Setting()
    num_steps_bw_draws = _Setting()

    def __init__(
        self,
        loss_fn: Callable[..., Tensor] | str,
        data: Iterable[Any] | str | None = None,
        every_n_steps: int | list[int] | Schedule | None = None,
        restrictions: Mapping[str, str | list[str] | Mapping[str, Tensor]] | None = None,
        datasets: Mapping[str, Any] | None = None,
        cross: bool = False,
        lr: float | None = None,
        localization: float | None = None,
        nbeta: float | None = None,
        num_chains: int | None = None,
        num_draws: int | None = None,
        num_burnin_steps: int | None = None,
        num_steps_bw_draws: int | None = None,
        seed: int = 0,
        num_data_batches: int = 16,
        progress: bool = True,
        prefix: str = "llc",
        calibrate: str = "never",
        calibrate_kwargs: Mapping[str, Any] | None = None,
        settings: SGLDSettings | None = None,
        background: bool | str = False,
        worker_device: str = "cpu",
        worker_threads: int = 1,
        max_pending: int | str = "auto",
        when_busy: str = "block",
        warm_start: bool | int = True,
        worker_start_method: str = "auto",
    ) -> None:
        super().__init__()
        self.loss_fn = resolve_dotted(loss_fn) if isinstance(loss_fn, str) else loss_fn
        if not callable(self.loss_fn):
            raise TypeError(f"loss_fn must be callable as loss_fn(model, batch) -> scalar; got {self.loss_fn!r}")
        self._data_spec = resolve_dotted(data) if isinstance(data, str) else data
        self.schedule = default_schedule() if every_n_steps is None else as_schedule(every_n_steps)
        self.restrictions = dict(restrictions or {})
        self._datasets_spec = {k: resolve_dotted(v) if isinstance(v, str) else v for k, v in (datasets or {}).items()}
        support.check_names(self.restrictions, self._datasets_spec, cross)
        self.cross = cross
        self.settings = SGLDSettings.from_kwargs(
            settings or DEFAULT_SETTINGS, lr=lr, localization=localization, nbeta=nbeta, num_chains=num_chains,
            num_draws=num_draws, num_burnin_steps=num_burnin_steps, num_steps_bw_draws=num_steps_bw_draws,
        )
        self.calibrate, self.calibrate_kwargs = calibrate, dict(calibrate_kwargs or {})
        support.check_options(seed, num_data_batches, calibrate, self.calibrate_kwargs, background, when_busy,
                              max_pending)
        if isinstance(warm_start, bool):
            self.warm_start_burnin: int | None = WARM_START_BURNIN if warm_start else None
        elif isinstance(warm_start, int) and warm_start >= 0:
            self.warm_start_burnin = warm_start
        else:
            raise ValueError(f"warm_start must be True, False or a burn-in step count >= 0; got {warm_start!r}")
        #: the chains' last offsets between estimates (``warm_start``; sampled synchronously), else None
        self.chain_offsets: ChainOffsets | None = None
        if worker_start_method not in START_METHODS:
            raise ValueError(f"worker_start_method must be one of {START_METHODS}; got {worker_start_method!r}")
        self.worker_start_method = worker_start_method
        self.seed, self.num_data_batches, self.progress, self.prefix = seed, num_data_batches, progress, prefix
        self.background, self.worker_device, self.worker_threads = bool(background), worker_device, worker_threads
        self.max_pending, self.when_busy = max_pending, when_busy
        #: the calibration run (``calibrate="once"``), else None
        self.calibration: Any = None
        self._calibrated_settings: dict[str, float] | None = None
        self.history = SeriesStore()
        #: the last estimates, by metric base name (``"llc"``, ``"llc/layer2"``, ...)
        self.last_results: dict[str, LLCResult] = {}
        #: due steps dropped because the worker was busy (``when_busy="skip"``)
        self.skipped_steps: list[int] = []
        self.last_progress: tuple[int, int] | None = None
        self._last_step = -1
        self._data: Any = None
        self._datasets: dict[str, Any] = {}
        self._link: support.WorkerLink | None = None
        #: seconds the last worker took to start (imports and unpickling), for benchmarks
        self.worker_startup_s: float | None = None
        self._warned_unhealthy = False

    @property
    def state_key(self) -> str:
        return self._generate_state_key(prefix=self.prefix)

    @property
    def worker_pid(self) -> int | None:
        """The pid of the sampling worker while one runs (to pin it to cores, say), else None."""
        return None if self._link is None else self._link.pid

    def metric_bases(self) -> list[str]:
        """Metric base names in estimation order: ``prefix``, then ``prefix/<name>`` per restriction."""
        return list(self._jobs(with_data=False))

    def monitor_keys(self) -> list[str]:
        """The keys this callback puts in ``callback_metrics`` and ``history`` (the ``/mean`` ones)."""
        return [f"{b}/mean" for b in self.metric_bases()]

    def _jobs(self, with_data: bool = True) -> dict[str, tuple[Any, Any]]:
        datasets = self._datasets if with_data else dict.fromkeys(self._datasets_spec)
        return support.jobs(self.prefix, self._data if with_data else None, self.restrictions, datasets, self.cross)

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        support.check_strategy(trainer, self.num_chains, self.background)
        named = dict(pl_module.named_parameters())
        for name, restrict in self.restrictions.items():
            resolve_restriction(restrict, named, name)  # raises naming the glob and listing the parameters
        if self._data_spec is not None:
            self._data = support.materialize(self._data_spec, "data")
        self._datasets = {k: support.materialize(v, f"datasets[{k!r}]") for k, v in self._datasets_spec.items()}
        if trainer.max_steps is not None and trainer.max_steps >= 0:
            support.validate_schedule(self.schedule, trainer.max_steps)
        if self.background:  # fail before training, not in the worker
            pack_payload(pl_module, self.loss_fn, self._jobs() if self._data is not None else {})

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if support.is_dry_run(trainer):
            return
        support.validate_schedule(self.schedule, trainer.estimated_stepping_batches)
        if self._data_spec is None:
            self._data = support.cache_train_batches(trainer, self.num_data_batches)
        # offsets are not checkpointed: each fit (and a resumed one) starts its first estimate cold
        self.chain_offsets = None if self.warm_start_burnin is None else ChainOffsets(self.warm_start_burnin)
        if self.background:
            worker = BackgroundSampler(pack_payload(pl_module, self.loss_fn, self._jobs()), self.worker_device,
                                       self.worker_threads, start_method=self.worker_start_method)
            self._link = support.WorkerLink(worker, support.pending_limit(self.max_pending, pl_module),
                                            lambda step, results: self._publish(trainer, step, results))
        self._maybe_measure(trainer, pl_module)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not support.is_dry_run(trainer):
            self._collect(wait=False)
            self._maybe_measure(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._collect(wait=True)  # outstanding estimates are logged before fit returns
        self._stop_worker()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._stop_worker(timeout=1.0)  # the estimates in flight are abandoned

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._stop_worker()

    # ------------------------------------------------------------------ measuring
    def _maybe_measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # global_step counts optimizer steps, so under gradient accumulation it repeats across the
        # micro-batches of one step; _last_step dedupes them.
        step = trainer.global_step
        if step <= self._last_step or not self.schedule.is_due(step):
            return
        link = self._link
        if link is not None and link.num_pending and callable(getattr(self.schedule, "observe", None)):
            return  # an adaptive schedule decides after the pending estimate; Adaptive catches up late steps
        if link is not None and link.num_pending >= link.max_pending:
            if self.when_busy == "skip":
                self._last_step = step
                self.skipped_steps.append(step)
                return
            link.collect(wait=True, count=1)
        self._last_step = step
        if self.calibrate == "once" and self._calibrated_settings is None:
            self._calibrate(trainer, pl_module, step)
            if self.chain_offsets is not None:
                self.chain_offsets.reset()  # offsets drawn at other settings are no warm start
        rank, world_size = trainer.global_rank, trainer.world_size
        settings = self.settings.replace(num_chains=local_chains(self.num_chains, rank, world_size))
        seed = derive_seed(self.seed, step, rank)
        # a dead worker falls back (its snapshots in flight first) and this step is sampled here
        if link is not None and link.submit(snapshot_request(pl_module, step, settings, seed, self.warm_start_burnin)):
            return
        progress = support.Progress(trainer, step) if self.progress else None
        local = estimate_llcs(pl_module, self.loss_fn, self._jobs(), settings=settings, seed=seed,
                              device=pl_module.device, dtype=torch.float32, progress=progress,
                              warm_start=self.chain_offsets)
        self.last_progress = None if progress is None else progress.last
        results = local if world_size == 1 else gather_chains(local, trainer.strategy.root_device)
        self._publish(trainer, step, results)

    def _calibrate(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        """Choose lr and localization once, on rank 0, and share them with every rank. A failed
        calibration (w* on a saddle early in training) samples this step with its fallback and
        the next scheduled step tries again."""
        progress = support.Progress(trainer, step) if self.progress else None
        self.calibration, chosen, ok = support.calibrate_on_rank_zero(
            trainer, pl_module, self.loss_fn, self._data, self.settings, derive_seed(self.seed, step, 0),
            progress, self.calibrate_kwargs,
        )
        self.settings = self.settings.replace(**chosen)
        if ok:
            self._calibrated_settings = dict(chosen)

    def _collect(self, wait: bool) -> None:
        if self._link is not None:
            self._link.collect(wait)

    def _publish(self, trainer: pl.Trainer, step: int, results: dict[str, LLCResult]) -> None:
        self._warned_unhealthy = support.publish(trainer, step, results, self.history, self._warned_unhealthy)
        self.last_results = dict(results)
        observe = getattr(self.schedule, "observe", None)
        if callable(observe):  # adaptive schedules follow the unrestricted estimate, the same on every rank
            observe(step, results[self.prefix].mean, results[self.prefix].stderr)

    def _stop_worker(self, timeout: float = 10.0) -> None:
        if self._link is not None:
            self._link.close(timeout)
            self.worker_startup_s = self._link.startup_s if self._link.startup_s is not None else self.worker_startup_s
            self._link = None

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        self._collect(wait=True)  # a checkpoint holds every estimate taken before it
        state: dict[str, Any] = {"history": self.history.state_dict(), "last_step": self._last_step, "version": 1}
        if self._calibrated_settings is not None:
            state["calibrated_settings"] = dict(self._calibrated_settings)
        if callable(getattr(self.schedule, "state_dict", None)):
            state["schedule"] = self.schedule.state_dict()  # type: ignore[attr-defined]
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history.load_state_dict(state_dict["history"])
        self._last_step = int(state_dict["last_step"])
        if state_dict.get("calibrated_settings") is not None:
            # a resumed run keeps sampling with the settings its series was measured with
            self._calibrated_settings = dict(state_dict["calibrated_settings"])
            self.settings = self.settings.replace(**self._calibrated_settings)
        if "schedule" in state_dict and callable(getattr(self.schedule, "load_state_dict", None)):
            self.schedule.load_state_dict(state_dict["schedule"])  # type: ignore[attr-defined]
