"""``LLCMonitor``: estimate the local learning coefficient on a schedule while a model trains.

The callback is glue: it decides *when* (a :mod:`devinterp_lightning.schedule`), snapshots the
weights, calls :func:`~devinterp_lightning.sampling.estimator.estimate_llcs` once per due step
for the unrestricted estimate and every restriction, merges chains across DDP ranks, and hands
the numbers to the trainer's loggers, ``trainer.callback_metrics`` and ``monitor.history``.
See docs/monitor.md for every parameter, the metric names and the overhead figures.
"""

from __future__ import annotations

import importlib
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from devinterp_lightning.sampling.estimator import estimate_llcs
from devinterp_lightning.sampling.result import LLCResult, summarize_chains
from devinterp_lightning.sampling.settings import SGLDSettings
from devinterp_lightning.sampling.snapshot import forked_rng, resolve_restriction
from devinterp_lightning.schedule import LogSpaced, Schedule, as_schedule
from devinterp_lightning.series import SeriesPoint, SeriesStore

__all__ = ["LLCMonitor", "resolve_dotted"]

log = logging.getLogger("devinterp_lightning")

#: Strategies whose parameters are sharded across ranks; sampling needs the full weights.
_SHARDED_STRATEGIES = ("FSDP", "DeepSpeed", "ModelParallel")


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


def _derive_seed(seed: int, step: int, rank: int) -> int:
    """The sampler seed for an estimate at ``step`` on ``rank``: distinct per step and per rank.

    A fixed odd-multiplier mix, so the same (seed, step, rank) always gives the same chains.
    """
    mixed = (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + rank * 0x94D049BB133111EB) % (1 << 63)
    return mixed


class _Progress:
    """Throttled ``progress(done, total)`` sink: the TQDM bar's postfix, else a console line every ~10 s."""

    def __init__(self, trainer: pl.Trainer, step: int, interval_s: float = 10.0) -> None:
        self.trainer = trainer
        self.step = step
        self.interval_s = interval_s
        self.start = time.monotonic()
        self.last_report = self.start
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
            rank_zero_info(
                f"LLCMonitor: step {self.step}: sampling {pct:.0f}% ({done}/{total} SGLD steps, "
                f"{now - self.start:.0f} s)"
            )


class LLCMonitor(Callback):
    """Estimate the LLC of the model on a schedule during ``trainer.fit``.

    Metric names (``prefix`` defaults to ``"llc"``), logged at the trainer's global step:

    - ``llc/mean``, ``llc/std``: all weights on ``data``.
    - ``llc/<w>/mean``, ``llc/<w>/std``: weight restriction ``w`` (in ``restrictions``) on ``data``.
    - ``llc/<d>/mean``, ``llc/<d>/std``: all weights on the data restriction ``d`` (in ``datasets``).
    - ``llc/<w>@<d>/mean``, ``llc/<w>@<d>/std``: the cross product, only when ``cross=True``.

    ``mean`` is the mean LLC over chains, ``std`` the standard deviation across chains (its
    standard error, ``std / sqrt(chains)``, and the health flags are in :attr:`history`).

    Args:
        loss_fn: ``loss_fn(model, batch) -> scalar`` mean loss over the batch, or a dotted import
            path to such a function (resolved at init). ``model`` is the LightningModule.
        data: the batches to sample on: any re-iterable of batches (a DataLoader, a list), a dotted
            path to one or to a zero-argument callable returning one (called at setup), or None:
            the first ``num_data_batches`` batches of the trainer's train dataloader, cached when
            training starts without consuming the global RNG.
        every_n_steps: when to estimate, in optimizer steps (``trainer.global_step``): an ``int``
            ``n`` (steps 0, n, 2n, ...), a list of steps, or a :class:`~devinterp_lightning.schedule.Schedule`
            (``Adaptive`` follows the unrestricted estimate: denser when it moves).
            None: ``LogSpaced(start=10, per_decade=10)`` (0, 10, 13, 16, 20, 25, ... dense early).
        restrictions: ``{name: glob or list of globs}`` over ``named_parameters()`` names
            (``fnmatch.fnmatchcase``; ``*`` also matches dots), or ``{name: {param: bool mask}}``.
        datasets: ``{name: loader or dotted path}``: data restrictions, each on all weights.
        cross: also estimate every (weight restriction, data restriction) pair as ``"<w>@<d>"``.
        lr, localization, nbeta, num_chains, num_draws, num_burnin_steps, num_steps_bw_draws: the
            SGLD settings of :func:`~devinterp_lightning.sampling.estimator.estimate_llc`.
        seed: base seed; the estimate at step ``t`` on rank ``r`` uses ``_derive_seed(seed, t, r)``.
        num_data_batches: how many train batches to cache when ``data`` is None.
        progress: report sampling progress in the progress bar (or the console every ~10 s).
        prefix: first component of every metric name.
        calibrate: ``"never"`` (default) samples with ``lr``, ``localization`` and ``nbeta`` as given;
            ``"once"`` runs :func:`~devinterp_lightning.sampling.calibrate.calibrate_llc` (on ``data``,
            all weights) at the first scheduled step and keeps the chosen ``lr`` and ``localization``
            for the rest of the run, so the series stays comparable (the given ``lr`` and
            ``localization`` are then unused; ``nbeta`` is kept as given). If that calibration does
            not pass its checks (the weights sit on a saddle, as at a small initialization), the
            step is sampled with its fallback settings and the next scheduled step calibrates again,
            until one passes. The chosen settings are logged as
            hyperparameters (``llc/calibrated/*``), kept in :attr:`calibration` and in the checkpoint.
        calibrate_kwargs: extra keyword arguments for ``calibrate_llc`` (e.g. ``{"localization": 1000.0}``
            to keep the localization fixed and choose only ``lr``, or ``{"lrs": [...]}`` for the grid).
    """

    def __init__(
        self,
        loss_fn: Callable[..., Tensor] | str,
        data: Iterable[Any] | str | None = None,
        every_n_steps: int | list[int] | Schedule | None = None,
        restrictions: Mapping[str, str | list[str] | Mapping[str, Tensor]] | None = None,
        datasets: Mapping[str, Any] | None = None,
        cross: bool = False,
        lr: float = 1e-4,
        localization: float = 100.0,
        nbeta: float | None = None,
        num_chains: int = 4,
        num_draws: int = 200,
        num_burnin_steps: int = 50,
        num_steps_bw_draws: int = 1,
        seed: int = 0,
        num_data_batches: int = 16,
        progress: bool = True,
        prefix: str = "llc",
        calibrate: str = "never",
        calibrate_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        self.loss_fn = resolve_dotted(loss_fn) if isinstance(loss_fn, str) else loss_fn
        if not callable(self.loss_fn):
            raise TypeError(f"loss_fn must be callable as loss_fn(model, batch) -> scalar; got {self.loss_fn!r}")
        self._data_spec = resolve_dotted(data) if isinstance(data, str) else data
        self.schedule = LogSpaced(start=10, per_decade=10) if every_n_steps is None else as_schedule(every_n_steps)
        self.restrictions = dict(restrictions or {})
        self._datasets_spec = {k: resolve_dotted(v) if isinstance(v, str) else v for k, v in (datasets or {}).items()}
        for kind, names in (("restriction", self.restrictions), ("dataset", self._datasets_spec)):
            for name in names:
                if not isinstance(name, str) or not name or "/" in name or "@" in name:
                    raise ValueError(
                        f"{kind} name {name!r} is not usable in a metric name: use a non-empty string "
                        "without '/' or '@' (e.g. 'layer2')"
                    )
        clash = sorted(set(self.restrictions) & set(self._datasets_spec))
        if clash:
            raise ValueError(
                f"names {clash} are used both in restrictions and in datasets, so their metrics would collide; "
                "rename one of them"
            )
        if cross and not (self.restrictions and self._datasets_spec):
            raise ValueError("cross=True needs both restrictions and datasets; pass both or set cross=False")
        self.cross = cross
        self.lr = lr
        self.localization = localization
        self.nbeta = nbeta
        self.num_chains = num_chains
        self.num_draws = num_draws
        self.num_burnin_steps = num_burnin_steps
        self.num_steps_bw_draws = num_steps_bw_draws
        # the estimator checks these again, but a typo should fail at construction, not at step 100
        SGLDSettings(lr, localization, nbeta, num_chains, num_draws, num_burnin_steps, num_steps_bw_draws)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an integer; got {seed!r}")
        self.seed = seed
        if not isinstance(num_data_batches, int) or num_data_batches < 1:
            raise ValueError(f"num_data_batches must be a positive integer; got {num_data_batches!r}")
        self.num_data_batches = num_data_batches
        self.progress = progress
        self.prefix = prefix
        if calibrate not in ("never", "once"):
            raise ValueError(f"calibrate must be 'never' or 'once'; got {calibrate!r}")
        self.calibrate = calibrate
        self.calibrate_kwargs = dict(calibrate_kwargs or {})
        reserved = sorted(set(self.calibrate_kwargs) & {"model", "loss_fn", "loader", "nbeta", "num_chains",
                                                         "num_draws", "num_burnin_steps", "num_steps_bw_draws",
                                                         "seed", "device", "progress"})
        if reserved:
            raise ValueError(
                f"calibrate_kwargs may not set {reserved}: the monitor passes its own values so the calibration "
                "matches the estimates; set them on LLCMonitor instead"
            )
        #: the calibration run at the first scheduled step (``calibrate="once"``), else None
        self.calibration: Any = None
        self._calibrated_settings: dict[str, float] | None = None

        self.history = SeriesStore()
        #: the last estimates, by metric base name (``"llc"``, ``"llc/layer2"``, ...)
        self.last_results: dict[str, LLCResult] = {}
        self._last_step = -1
        self._data: Any = None
        self._datasets: dict[str, Any] = {}
        self.last_progress: tuple[int, int] | None = None
        self._warned_unhealthy = False

    # ------------------------------------------------------------------ naming
    @property
    def state_key(self) -> str:
        return self._generate_state_key(prefix=self.prefix)

    def metric_bases(self) -> list[str]:
        """Metric base names in estimation order: ``prefix``, then ``prefix/<name>`` per restriction."""
        bases = [self.prefix]
        bases += [f"{self.prefix}/{w}" for w in self.restrictions]
        bases += [f"{self.prefix}/{d}" for d in self._datasets_spec]
        if self.cross:
            bases += [f"{self.prefix}/{w}@{d}" for w in self.restrictions for d in self._datasets_spec]
        return bases

    def monitor_keys(self) -> list[str]:
        """The keys this callback puts in ``callback_metrics`` and ``history`` (the ``/mean`` ones)."""
        return [f"{b}/mean" for b in self.metric_bases()]

    # ------------------------------------------------------------------ setup and validation
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        strategy = type(trainer.strategy).__name__
        if any(s in strategy for s in _SHARDED_STRATEGIES):
            raise RuntimeError(
                f"LLCMonitor does not support {strategy} yet: the parameters are sharded across ranks and "
                "SGLD needs the full weights. Use strategy='ddp' (chains are split across ranks), or "
                "estimate after training with estimate_llc on a gathered full state dict."
            )
        if trainer.world_size > self.num_chains:
            raise ValueError(
                f"num_chains={self.num_chains} is smaller than the world size {trainer.world_size}: every rank "
                f"runs at least one chain. Set num_chains >= {trainer.world_size}."
            )
        named = dict(pl_module.named_parameters())
        for name, restrict in self.restrictions.items():
            resolve_restriction(restrict, named, name)  # raises naming the glob and listing the parameters
        if self._data_spec is not None:
            self._data = self._materialize(self._data_spec, "data")
        self._datasets = {k: self._materialize(v, f"datasets[{k!r}]") for k, v in self._datasets_spec.items()}
        if trainer.max_steps is not None and trainer.max_steps >= 0:
            self._validate_schedule(trainer.max_steps)

    def _materialize(self, spec: Any, label: str) -> Any:
        loader = spec
        if callable(spec) and not hasattr(spec, "__iter__"):
            loader = spec()
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

    def _validate_schedule(self, total_steps: float) -> None:
        try:
            self.schedule.validate(total_steps)
        except ValueError as err:
            raise ValueError(f"LLCMonitor every_n_steps: {err}") from None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._validate_schedule(trainer.estimated_stepping_batches)
        if self._data_spec is None:
            self._data = self._cache_train_batches(trainer)
        step = trainer.global_step
        if self.schedule.is_due(step) and step > self._last_step:
            self._measure(trainer, pl_module, step)

    def _cache_train_batches(self, trainer: pl.Trainer) -> list[Any]:
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
                if len(batches) >= self.num_data_batches:
                    break
        if not batches:
            raise ValueError(
                "LLCMonitor(data=None): the train dataloader yielded no batches; pass data=<loader> explicitly"
            )
        return batches

    # ------------------------------------------------------------------ the schedule
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # global_step counts optimizer steps, so under gradient accumulation it repeats across the
        # micro-batches of one step; _last_step dedupes them.
        step = trainer.global_step
        if step > self._last_step and self.schedule.is_due(step):
            self._measure(trainer, pl_module, step)

    # ------------------------------------------------------------------ measuring
    def _jobs(self) -> dict[str, tuple[Any, Any]]:
        jobs: dict[str, tuple[Any, Any]] = {self.prefix: (self._data, None)}
        for w, restrict in self.restrictions.items():
            jobs[f"{self.prefix}/{w}"] = (self._data, restrict)
        for d, loader in self._datasets.items():
            jobs[f"{self.prefix}/{d}"] = (loader, None)
        if self.cross:
            for w, restrict in self.restrictions.items():
                for d, loader in self._datasets.items():
                    jobs[f"{self.prefix}/{w}@{d}"] = (loader, restrict)
        return jobs

    def _local_chains(self, rank: int, world_size: int) -> int:
        """Chains run by ``rank``: chain ``c`` belongs to rank ``c % world_size``."""
        return len(range(rank, self.num_chains, world_size))

    def _calibrate(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        """Choose lr and localization once, on rank 0, and share them with every rank."""
        from devinterp_lightning.sampling.calibrate import calibrate_llc

        settings = None
        if trainer.is_global_zero:
            with forked_rng(host=True):
                self.calibration = calibrate_llc(
                    pl_module, self.loss_fn, self._data, nbeta=self.nbeta, num_chains=self.num_chains,
                    num_draws=self.num_draws, num_burnin_steps=self.num_burnin_steps,
                    num_steps_bw_draws=self.num_steps_bw_draws, seed=_derive_seed(self.seed, step, 0),
                    device=pl_module.device, progress=_Progress(trainer, step) if self.progress else None,
                    **self.calibrate_kwargs,
                )
            chosen = self.calibration.as_kwargs()
            settings = {k: float(chosen[k]) for k in ("lr", "localization", "nbeta")}
            settings["ok"] = float(self.calibration.ok)
            log.info("LLCMonitor: calibrated at step %d: %s", step, settings)
        settings = trainer.strategy.broadcast(settings, src=0)
        if not settings.pop("ok"):
            # w* is not yet a point the sampler can be tuned at (the first saddle of training):
            # this step is sampled with the calibration's fallback and the next one tries again
            self.lr, self.localization, self.nbeta = settings["lr"], settings["localization"], settings["nbeta"]
            if trainer.is_global_zero:
                log.info("LLCMonitor: calibration at step %d did not pass its checks; retrying at the next "
                         "scheduled step", step)
            return
        self._apply_calibration(settings)
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_hyperparams(self.calibration.hparams())

    def _apply_calibration(self, settings: dict[str, float]) -> None:
        self._calibrated_settings = dict(settings)
        self.lr, self.localization, self.nbeta = settings["lr"], settings["localization"], settings["nbeta"]

    def _estimate(self, model: torch.nn.Module, step: int, rank: int, world_size: int, device: torch.device,
                  progress: Callable[[int, int], None] | None) -> dict[str, LLCResult]:
        return estimate_llcs(
            model, self.loss_fn, self._jobs(), lr=self.lr, localization=self.localization, nbeta=self.nbeta,
            num_chains=self._local_chains(rank, world_size), num_draws=self.num_draws,
            num_burnin_steps=self.num_burnin_steps, num_steps_bw_draws=self.num_steps_bw_draws,
            seed=_derive_seed(self.seed, step, rank), device=device, dtype=torch.float32, progress=progress,
        )

    def _measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        self._last_step = step
        if self.calibrate == "once" and self._calibrated_settings is None:
            self._calibrate(trainer, pl_module, step)
        rank, world_size = trainer.global_rank, trainer.world_size
        progress = _Progress(trainer, step) if self.progress else None
        local = self._estimate(pl_module, step, rank, world_size, pl_module.device, progress)
        if progress is not None:
            self.last_progress = progress.last
        results = self._merge_ranks(trainer, local)
        self._publish(trainer, step, results)
        observe = getattr(self.schedule, "observe", None)
        if callable(observe):
            # adaptive schedules follow the unrestricted estimate; it is the same on every rank
            unrestricted = results[self.prefix]
            observe(step, unrestricted.mean, unrestricted.stderr)

    def _merge_ranks(self, trainer: pl.Trainer, local: dict[str, LLCResult]) -> dict[str, LLCResult]:
        """All-gather every rank's chains and re-summarize, so all ranks hold the same estimates."""
        world_size = trainer.world_size
        if world_size == 1:
            return local
        names = list(local)
        per_rank = -(-self.num_chains // world_size)
        num_draws = self.num_draws
        device = trainer.strategy.root_device
        loss = torch.full((len(names), per_rank, num_draws), math.nan, dtype=torch.float64)
        init = torch.full_like(loss, math.nan)
        diverged = torch.zeros(len(names), per_rank, dtype=torch.float64)
        present = torch.zeros(len(names), per_rank, dtype=torch.float64)
        nbeta = torch.zeros(len(names), dtype=torch.float64)
        for j, name in enumerate(names):
            res = local[name]
            n = res.num_chains
            loss[j, :n] = res.loss_trace.double()
            init[j, :n] = res.init_loss_trace.double()
            diverged[j, :n] = res.diverged.double()
            present[j, :n] = 1.0
            nbeta[j] = res.nbeta
        packed = torch.cat([loss.flatten(), init.flatten(), diverged.flatten(), present.flatten(), nbeta])
        gathered = trainer.strategy.all_gather(packed.to(device)).to("cpu").reshape(world_size, -1)
        sizes = [loss.numel(), init.numel(), diverged.numel(), present.numel(), nbeta.numel()]
        parts = [row.split(sizes) for row in gathered]
        ref_nbeta = parts[0][4]
        merged: dict[str, LLCResult] = {}
        for j, name in enumerate(names):
            losses, inits, divs = [], [], []
            for r_loss, r_init, r_div, r_present, r_nbeta in parts:
                if not math.isclose(float(r_nbeta[j]), float(ref_nbeta[j]), rel_tol=1e-9):
                    raise RuntimeError(
                        f"LLCMonitor: ranks sampled {name!r} with different nbeta ({float(ref_nbeta[j])} vs "
                        f"{float(r_nbeta[j])}) because their probe batches differ in size; pass nbeta= explicitly"
                    )
                keep = r_present.reshape(len(names), per_rank)[j].bool()
                losses.append(r_loss.reshape(len(names), per_rank, num_draws)[j][keep])
                inits.append(r_init.reshape(len(names), per_rank, num_draws)[j][keep])
                divs.append(r_div.reshape(len(names), per_rank)[j][keep].bool())
            merged[name] = summarize_chains(
                torch.cat(losses), torch.cat(inits), float(ref_nbeta[j]), lr=self.lr,
                localization=self.localization, diverged=torch.cat(divs), warn=False,
            )
        return merged

    def _publish(self, trainer: pl.Trainer, step: int, results: dict[str, LLCResult]) -> None:
        metrics: dict[str, float] = {}
        for base, res in results.items():
            metrics[f"{base}/mean"] = res.mean
            metrics[f"{base}/std"] = res.std
            self.history.append(
                f"{base}/mean", SeriesPoint(step=step, value=res.mean, std=res.std, stderr=res.stderr, flags=res.flags)
            )
        self.last_results = dict(results)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        callback_metrics = trainer.callback_metrics
        for key, value in metrics.items():
            callback_metrics[key] = torch.tensor(value)
        unhealthy = {b: r.flags for b, r in results.items() if r.flags}
        if unhealthy:
            # warn once per run, then keep it out of the way (the flags are in history)
            level = logging.INFO if self._warned_unhealthy else logging.WARNING
            self._warned_unhealthy = True
            if trainer.is_global_zero:
                log.log(
                    level, "LLCMonitor: step %d: unhealthy estimates %s; the flags are kept in "
                    "monitor.history (see docs/troubleshooting.md)", step, unhealthy,
                )

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
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
            self._apply_calibration(state_dict["calibrated_settings"])
        if "schedule" in state_dict and callable(getattr(self.schedule, "load_state_dict", None)):
            self.schedule.load_state_dict(state_dict["schedule"])  # type: ignore[attr-defined]
