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

import logging
import math
import os
from collections.abc import Callable, Iterable, Mapping
from itertools import chain
from typing import Any

import torch
from torch import Tensor, nn

from devinterp_lightning.sampling.batches import batch_size_of, batch_stream, forked_global_rng
from devinterp_lightning.sampling.result import LLCResult, summarize_chains
from devinterp_lightning.sampling.settings import SGLDSettings
from devinterp_lightning.sampling.sgld import LossEvaluator, run_chains
from devinterp_lightning.sampling.snapshot import (
    Restriction,
    cuda_devices,
    preserved_modes,
    resolve_restriction,
    take_snapshot,
)

logger = logging.getLogger("devinterp_lightning")

LossFn = Callable[[nn.Module, Any], Tensor]

__all__ = ["estimate_llc", "estimate_llcs", "default_nbeta", "Restriction", "SGLDSettings"]


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
    lr: float | None = None,
    localization: float | None = None,
    nbeta: float | None = None,
    num_chains: int | None = None,
    num_draws: int | None = None,
    num_burnin_steps: int | None = None,
    num_steps_bw_draws: int | None = None,
    settings: SGLDSettings | None = None,
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
            takes ``num_burnin_steps + (num_draws - 1) * num_steps_bw_draws + 1`` steps
            (defaults 4, 100, 0, 1).
        settings: all of the above as one :class:`SGLDSettings`; keywords that are not None
            override its fields. ``lr`` and ``localization`` are required one way or the other.
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
    settings = SGLDSettings.from_kwargs(
        settings, lr=lr, localization=localization, nbeta=nbeta, num_chains=num_chains, num_draws=num_draws,
        num_burnin_steps=num_burnin_steps, num_steps_bw_draws=num_steps_bw_draws,
    )
    results = estimate_llcs(
        model, loss_fn, {"llc": (loader, restrict)}, settings=settings, seed=seed, device=device, dtype=dtype,
        eval_mode=eval_mode, progress=progress,
    )
    return results["llc"]


def estimate_llcs(
    model: nn.Module,
    loss_fn: LossFn,
    jobs: Mapping[str, tuple[Iterable[Any], Restriction]],
    *,
    lr: float | None = None,
    localization: float | None = None,
    nbeta: float | None = None,
    num_chains: int | None = None,
    num_draws: int | None = None,
    num_burnin_steps: int | None = None,
    num_steps_bw_draws: int | None = None,
    settings: SGLDSettings | None = None,
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
    settings = SGLDSettings.from_kwargs(
        settings, lr=lr, localization=localization, nbeta=nbeta, num_chains=num_chains, num_draws=num_draws,
        num_burnin_steps=num_burnin_steps, num_steps_bw_draws=num_steps_bw_draws,
    )
    num_chains = settings.num_chains
    if not jobs:
        raise ValueError("jobs is empty; pass at least one {name: (loader, restrict)}")
    named = dict(model.named_parameters())
    if not named:
        raise ValueError("the model has no parameters to sample")
    masks_per_job = {name: resolve_restriction(restrict, named, name) for name, (_, restrict) in jobs.items()}
    if device is None:
        device = next(iter(named.values())).device
    device = torch.device(device)
    if seed is None:
        seed = int.from_bytes(os.urandom(8), "little") >> 1

    # group jobs by loader identity: one batch stream and one vectorized run per group
    groups: dict[int, list[str]] = {}
    for name, (loader, _) in jobs.items():
        groups.setdefault(id(loader), []).append(name)
    total = settings.total_steps * len(groups)

    results: dict[str, LLCResult] = {}
    with preserved_modes(model, eval_mode):
        snapshot = take_snapshot(model, device, dtype)
        anchor, buffers = snapshot.params, snapshot.buffers
        for index, names in enumerate(groups.values()):
            loader = jobs[names[0]][0]
            done = index * settings.total_steps
            report = None if progress is None else (lambda k, done=done: progress(done + k, total))
            traces, group_nbeta = _run_group(
                model, loss_fn, loader, [masks_per_job[n] for n in names], anchor, buffers, settings,
                seed + 7919 * index, device, dtype, report,
            )
            for k, name in enumerate(names):
                lanes = slice(k * num_chains, (k + 1) * num_chains)
                results[name] = summarize_chains(
                    traces.loss_trace[lanes], traces.init_loss_trace[lanes], group_nbeta,
                    lr=settings.lr, localization=settings.localization, diverged=traces.diverged[lanes],
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
            per_job.append(full.unsqueeze(0).expand(settings.num_chains, *anchor[n].shape))
        masks[n] = torch.cat(per_job).to(anchor[n].dtype)

    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    # Batch order: from a private generator where the loader allows it; otherwise from a seeded
    # fork of the global RNG (restored afterwards), so the order is reproducible either way.
    order = torch.Generator().manual_seed(seed ^ 0x5EED)
    with forked_global_rng(loader, seed ^ 0x5EED, cuda_devices(device)):
        stream = batch_stream(loader, device, dtype, order)
        first = next(stream)
        nbeta = settings.nbeta
        if nbeta is None:
            size = batch_size_of(loader, first)
            if size is None:
                raise ValueError("cannot infer the batch size for the default nbeta; pass nbeta= explicitly")
            nbeta = default_nbeta(size)
            logger.info("devinterp_lightning: nbeta=None, using B/log(B) = %.4g for batch size B=%d", nbeta, size)
        settings = settings.replace(nbeta=float(nbeta))
        evaluator = LossEvaluator(model, loss_fn, anchor, buffers, moving)
        traces = run_chains(evaluator, chain([first], stream), anchor, masks, settings, generator, progress=progress)
    return traces, float(nbeta)
