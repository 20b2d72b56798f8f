"""Estimate the local learning coefficient (LLC) of a model at its current weights.

    llc = nbeta * (E_draws[L_batch(w)] - E_draws[L_batch(w*)])

where the draws ``w`` come from SGLD on the localized, tempered posterior
``p(w) ~ exp(-nbeta * L(w) - localization/2 * |w - w*|^2)`` around the snapshot ``w*``
(Lau et al. 2023, "Quantifying degeneracy in singular models via the learning coefficient").
See docs/estimator.md for the defaults, the diagnostics and the validation against theory.

The model is never modified: sampling runs on detached copies of the parameters through
``torch.func.functional_call``, with a private ``torch.Generator``; train/eval modes and the
global RNG state are restored afterwards.
"""

from __future__ import annotations

import fnmatch
import logging
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import contextmanager
from itertools import chain
from typing import Any

import torch
from torch import Tensor, nn

from devinterp_lightning.sampling.batches import batch_size_of, batch_stream, forked_global_rng
from devinterp_lightning.sampling.result import LLCResult, summarize_chains
from devinterp_lightning.sampling.sgld import LossEvaluator, SGLDSettings, run_chains

logger = logging.getLogger("devinterp_lightning")

#: None (all parameters) | a glob | a list of globs over ``named_parameters()`` names |
#: ``{parameter name: bool mask of the parameter's shape}``.
Restriction = str | Sequence[str] | Mapping[str, Tensor] | None
LossFn = Callable[[nn.Module, Any], Tensor]

__all__ = ["estimate_llc", "estimate_llcs", "default_nbeta", "Restriction"]


def default_nbeta(batch_size: int) -> float:
    """``B / log(B)``: the WBIC inverse temperature ``beta = 1/log n`` times ``n``, with ``n = B``.

    The sampler sees the batch-mean loss, so the stochastic gradient carries the information of
    ``B`` samples; tempering that evidence with WBIC's ``1/log n`` (Watanabe 2013) gives ``B/log B``.
    It is also the default of devinterp, so estimates are comparable with the literature.
    """
    if batch_size < 2:
        raise ValueError(
            f"cannot pick a default nbeta for batch size {batch_size} (B/log B needs B >= 2); pass nbeta="
        )
    return batch_size / math.log(batch_size)


def estimate_llc(
    model: nn.Module,
    loss_fn: LossFn,
    loader: Iterable[Any],
    *,
    lr: float,
    localization: float,
    nbeta: float | None = None,
    num_chains: int = 4,
    num_draws: int = 100,
    num_burnin_steps: int = 0,
    num_steps_bw_draws: int = 1,
    restrict: Restriction = None,
    seed: int | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = torch.float32,
    eval_mode: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> LLCResult:
    """Estimate the LLC of ``model`` at its current weights ``w*`` with SGLD.

    Each chain starts at ``w*`` and updates only the entries ``restrict`` allows:

        w <- w - lr/2 * (nbeta * grad L_batch(w) + localization * (w - w*)) + sqrt(lr) * N(0, 1)

    Per chain, ``llc = nbeta * (mean_d L_{b_d}(w_d) - mean_d L_{b_d}(w*))`` over the draws after
    burn-in, with ``b_d`` the batch the chain saw at draw ``d`` (the paired loss at ``w*`` on the
    same batch cancels batch-to-batch noise).

    Args:
        model: the network; it is left exactly as it was (parameters, buffers, ``.grad``,
            ``requires_grad``, every submodule's train/eval mode, the global RNG state).
        loss_fn: ``loss_fn(model, batch) -> scalar`` mean loss over the batch.
        loader: any iterable of batches (re-iterated when exhausted). Restricting by data means
            passing another loader. A DataLoader over a TensorDataset is sliced directly.
        lr: SGLD step size (epsilon).
        localization: strength gamma of the pull back to ``w*``.
        nbeta: inverse temperature times sample size. None: ``B / log(B)`` with ``B`` the batch
            size (see :func:`default_nbeta`); the choice is logged.
        num_chains, num_draws, num_burnin_steps, num_steps_bw_draws: chain layout; each chain
            takes ``num_burnin_steps + (num_draws - 1) * num_steps_bw_draws + 1`` steps.
        restrict: which weights move: None (all), a glob or list of globs matched with
            :func:`fnmatch.fnmatchcase` against ``model.named_parameters()`` names (e.g.
            ``"layers.2.*"``), or ``{name: bool mask}`` for individual entries.
        seed: seeds the sampler's own generator and the loader's shuffling; None draws a fresh
            seed from ``os.urandom`` (the global RNG is never consumed).
        device: where to sample; None: the device of the model's parameters.
        dtype: the floating dtype of the sampled copies and of floating batch tensors; float32
            by default (so bf16/fp16 models are sampled in float32). None keeps each tensor's dtype.
        eval_mode: sample with the model in eval mode (dropout off, BatchNorm on running
            statistics), so the sampled loss is a deterministic function of the weights.
        progress: optional ``progress(done_steps, total_steps)``, called after every step.

    Returns:
        An :class:`LLCResult`. ``res.init_loss`` is L(w*): the loss at the snapshot averaged over
        exactly the batches the draws were evaluated on (surviving chains). Diverged chains are
        excluded with a warning; if all diverge, ``res.all_diverged`` is True and ``res.mean`` nan.
    """
    results = estimate_llcs(
        model, loss_fn, {"llc": (loader, restrict)}, lr=lr, localization=localization, nbeta=nbeta,
        num_chains=num_chains, num_draws=num_draws, num_burnin_steps=num_burnin_steps,
        num_steps_bw_draws=num_steps_bw_draws, seed=seed, device=device, dtype=dtype,
        eval_mode=eval_mode, progress=progress,
    )
    return results["llc"]


def estimate_llcs(
    model: nn.Module,
    loss_fn: LossFn,
    jobs: Mapping[str, tuple[Iterable[Any], Restriction]],
    *,
    lr: float,
    localization: float,
    nbeta: float | None = None,
    num_chains: int = 4,
    num_draws: int = 100,
    num_burnin_steps: int = 0,
    num_steps_bw_draws: int = 1,
    seed: int | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = torch.float32,
    eval_mode: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, LLCResult]:
    """Several (weights x data) restricted estimates at one snapshot: ``{name: LLCResult}``.

    ``jobs`` maps a name to ``(loader, restrict)``. Jobs that share the *same loader object*
    share one batch stream and are sampled together: their chains become lanes of one vectorized
    run, each lane with its own update mask, so the batch loss at ``w*`` is computed once per
    batch for all of them. Keyword arguments are those of :func:`estimate_llc`.
    """
    _check_settings(lr, localization, nbeta, num_chains, num_draws, num_burnin_steps, num_steps_bw_draws)
    if not jobs:
        raise ValueError("jobs is empty; pass at least one {name: (loader, restrict)}")
    named = dict(model.named_parameters())
    if not named:
        raise ValueError("the model has no parameters to sample")
    masks_per_job = {name: _resolve_restriction(restrict, named, name) for name, (_, restrict) in jobs.items()}
    if device is None:
        device = next(iter(named.values())).device
    device = torch.device(device)
    if seed is None:
        seed = int.from_bytes(os.urandom(8), "little") >> 1
    settings = SGLDSettings(lr, float("nan"), localization, num_burnin_steps, num_draws, num_steps_bw_draws)

    # group jobs by loader identity: one batch stream and one vectorized run per group
    groups: dict[int, list[str]] = {}
    for name, (loader, _) in jobs.items():
        groups.setdefault(id(loader), []).append(name)
    total = settings.total_steps * len(groups)

    results: dict[str, LLCResult] = {}
    with _preserved(model, eval_mode, device):
        anchor = {n: _copy(p, device, dtype) for n, p in named.items()}
        buffers = {n: _copy(b, device, dtype) for n, b in model.named_buffers()}
        for index, names in enumerate(groups.values()):
            loader = jobs[names[0]][0]
            done = index * settings.total_steps
            report = None if progress is None else (lambda k, done=done: progress(done + k, total))
            traces, group_nbeta = _run_group(
                model, loss_fn, loader, [masks_per_job[n] for n in names], anchor, buffers, settings,
                nbeta, num_chains, seed + 7919 * index, device, dtype, report,
            )
            for k, name in enumerate(names):
                lanes = slice(k * num_chains, (k + 1) * num_chains)
                results[name] = summarize_chains(
                    traces.loss_trace[lanes], traces.init_loss_trace[lanes], group_nbeta,
                    lr=lr, localization=localization, diverged=traces.diverged[lanes],
                )
    return {name: results[name] for name in jobs}


def _run_group(
    model: nn.Module,
    loss_fn: LossFn,
    loader: Iterable[Any],
    job_masks: list[dict[str, Tensor]],
    anchor: dict[str, Tensor],
    buffers: dict[str, Tensor],
    settings: SGLDSettings,
    nbeta: float | None,
    num_chains: int,
    seed: int,
    device: torch.device,
    dtype: torch.dtype | None,
    progress: Callable[[int], None] | None,
) -> tuple[Any, float]:
    # Lane masks [num_lanes, *shape] for every parameter some job moves; parameters moved by
    # no job are passed unbatched and get no gradient.
    moving = [n for n in anchor if any(n in m for m in job_masks)]
    if len({anchor[n].dtype for n in moving}) > 1:
        raise ValueError(
            "the sampled parameters have mixed dtypes "
            f"{sorted({str(anchor[n].dtype) for n in moving})}; pass dtype=torch.float32 (the default)"
        )
    masks = {}
    for n in moving:
        per_job = []
        for m in job_masks:
            mask = m.get(n)
            full = torch.zeros(anchor[n].shape, device=device) if mask is None else mask.to(device).float()
            per_job.append(full.unsqueeze(0).expand(num_chains, *anchor[n].shape))
        masks[n] = torch.cat(per_job).to(anchor[n].dtype)

    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    cuda_devices = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    # Batch order: from a private generator where the loader allows it; otherwise from a seeded
    # fork of the global RNG (restored afterwards), so the order is reproducible either way.
    order = torch.Generator().manual_seed(seed ^ 0x5EED)
    with forked_global_rng(loader, seed ^ 0x5EED, cuda_devices):
        stream = batch_stream(loader, device, dtype, order)
        first = next(stream)
        if nbeta is None:
            size = batch_size_of(loader, first)
            if size is None:
                raise ValueError("cannot infer the batch size for the default nbeta; pass nbeta= explicitly")
            nbeta = default_nbeta(size)
            logger.info("devinterp_lightning: nbeta=None, using B/log(B) = %.4g for batch size B=%d", nbeta, size)
        settings = SGLDSettings(
            settings.lr, float(nbeta), settings.localization, settings.num_burnin_steps,
            settings.num_draws, settings.num_steps_bw_draws,
        )
        evaluator = LossEvaluator(model, loss_fn, anchor, buffers, moving)
        traces = run_chains(evaluator, chain([first], stream), anchor, masks, settings, generator, progress=progress)
    return traces, float(nbeta)


def _check_settings(
    lr: float, localization: float, nbeta: float | None, num_chains: int, num_draws: int,
    num_burnin_steps: int, num_steps_bw_draws: int,
) -> None:
    if not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a positive finite step size; got {lr}")
    if not (localization >= 0 and math.isfinite(localization)):
        raise ValueError(f"localization must be >= 0 and finite; got {localization}")
    if nbeta is not None and not (nbeta > 0 and math.isfinite(nbeta)):
        raise ValueError(f"nbeta must be positive and finite (or None for B/log B); got {nbeta}")
    for label, value, low in (
        ("num_chains", num_chains, 1), ("num_draws", num_draws, 1),
        ("num_burnin_steps", num_burnin_steps, 0), ("num_steps_bw_draws", num_steps_bw_draws, 1),
    ):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"{label} must be an integer >= {low}; got {value!r}")


def _resolve_restriction(restrict: Restriction, named: Mapping[str, Tensor], job: str) -> dict[str, Tensor]:
    """``{name: bool mask}`` of the entries a job moves (only names with at least one True)."""
    listing = ", ".join(named)
    if restrict is None:
        return {n: torch.ones(p.shape, dtype=torch.bool) for n, p in named.items()}
    if isinstance(restrict, Mapping):
        unknown = [n for n in restrict if n not in named]
        if unknown:
            raise ValueError(
                f"restriction {job!r} names unknown parameters {unknown}; the model's parameters are: {listing}"
            )
        out = {}
        for n, mask in restrict.items():
            mask = torch.as_tensor(mask).detach().cpu()
            if mask.dtype != torch.bool or mask.shape != named[n].shape:
                raise ValueError(
                    f"restriction {job!r}: the mask for {n!r} must be a bool tensor of shape "
                    f"{tuple(named[n].shape)}; got {mask.dtype} {tuple(mask.shape)}"
                )
            if bool(mask.any()):
                out[n] = mask
        if not out:
            raise ValueError(f"restriction {job!r}: every mask is all False, so no weight would move")
        return out
    globs = [restrict] if isinstance(restrict, str) else list(restrict) if isinstance(restrict, Sequence) else []
    if not globs or not all(isinstance(g, str) for g in globs):
        raise ValueError(f"restriction {job!r} must be a glob, a list of globs or a dict of masks; got {restrict!r}")
    matched = {n for n in named if any(fnmatch.fnmatchcase(n, g) for g in globs)}
    if not matched:
        raise ValueError(
            f"restriction {job!r} = {globs} matches no parameter. Globs are matched with "
            f"fnmatch.fnmatchcase against the full names from model.named_parameters() (use e.g. "
            f"'layer2.*' for all of a submodule's parameters). The parameters are: {listing}"
        )
    return {n: torch.ones(named[n].shape, dtype=torch.bool) for n in named if n in matched}


def _copy(t: Tensor, device: torch.device, dtype: torch.dtype | None) -> Tensor:
    """A detached copy on ``device``; floating tensors in ``dtype`` (float32 copies of bf16 weights)."""
    target = dtype if (dtype is not None and t.is_floating_point()) else t.dtype
    return t.detach().to(device=device, dtype=target, copy=True)


@contextmanager
def _preserved(model: nn.Module, eval_mode: bool, device: torch.device) -> Any:
    """Put the model in eval mode (if asked) and restore every submodule's mode afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        if eval_mode:
            model.eval()
        yield
    finally:
        for module, training in modes:
            module.training = training
