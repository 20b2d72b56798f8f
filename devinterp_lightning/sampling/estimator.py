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

import dataclasses
import logging
import math
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from itertools import chain
from typing import Any

import torch
from torch import Tensor, nn

from devinterp_lightning.sampling.batches import (
    batch_size_of,
    batch_stream,
    bulk_replacement,
    chain_streams,
    forked_global_rng,
    replacement_stream,
    stack_batches,
    stacked_replacement_streams,
    supports_replacement,
)
from devinterp_lightning.sampling.result import (
    UNRELAXED,
    UNRELAXED_LIMIT,
    LLCResult,
    relaxed_burnin,
    summarize_chains,
    unrelaxed_fraction,
)
from devinterp_lightning.sampling.settings import SGLDSettings
from devinterp_lightning.sampling.sgld import ChainBatches, ChainTraces, LossEvaluator, run_chains
from devinterp_lightning.sampling.snapshot import (
    Restriction,
    cuda_devices,
    preserved_modes,
    resolve_restriction,
    take_snapshot,
)
from devinterp_lightning.sampling.warm_start import ChainOffsets

logger = logging.getLogger("devinterp_lightning")

LossFn = Callable[[nn.Module, Any], Tensor]

__all__ = [
    "MINIBATCH_NOISE",
    "NONFINITE_INIT",
    "Restriction",
    "SGLDSettings",
    "default_nbeta",
    "estimate_llc",
    "estimate_llcs",
    "predicted_minibatch_inflation",
]

#: Flag of a result whose model already gives a nan/inf loss at the snapshot (nothing was sampled).
NONFINITE_INIT = "nonfinite_init"
#: Flag of a result whose predicted minibatch-noise inflation is a sizeable part of the estimate.
MINIBATCH_NOISE = "minibatch_noise"
#: ``minibatch_noise`` is raised when the predicted inflation exceeds this fraction of the estimate.
MINIBATCH_NOISE_LIMIT = 0.1
#: Batches whose gradients at w* estimate the minibatch gradient variance (one gradient each).
NOISE_PROBE_BATCHES = 8
#: Epoch-ordered batches (no replacement) add a paired cross term of up to twice the variance term.
EPOCH_ORDER_FACTOR = 3.0


def predicted_minibatch_inflation(
    lr: float, nbeta: float, gradient_variance: float, batch_order: str = "replacement"
) -> float:
    """Upper estimate of the LLC inflation caused by minibatch gradient noise, to first order in ``lr``.

    With ``g_b`` the batch gradient at w* and ``V = Cov(g_b)`` (``= C / B`` for i.i.d. batches, C
    the per-sample gradient covariance), one SGLD step adds ``(lr/2)^2 nbeta^2 V`` of position
    covariance on top of the injected ``lr * I``. In the quadratic approximation
    ``L ~ L* + 1/2 dw' H dw`` the stationary covariance solves
    ``K S + S K = lr nbeta^2 V / 2`` with ``K = nbeta H + localization``, and the estimate
    ``nbeta/2 tr(H S)`` grows by ``lr nbeta^2 tr(H K^-1 V) / 8 <= lr nbeta^2 tr(V) / 8`` (because
    ``H K^-1 <= 1/nbeta``). For i.i.d. batches (``batch_order="replacement"``) that is the bias.
    In epoch order the current batch is anticorrelated with the earlier batches of its epoch, which
    moved the chain; the paired loss difference then picks up ``nbeta E[g_b . dw]``, at most
    ``lr nbeta^2 tr(V) / 4`` (no decay within the epoch), so the bound is 3x.

    Args:
        lr, nbeta: the SGLD settings.
        gradient_variance: ``tr(V)``, the summed variance of the batch gradient at w* over the
            moving weights.
        batch_order: ``"replacement"`` or ``"loader"`` (taken to be epoch-like).
    """
    base = lr * nbeta**2 * gradient_variance / 8
    return base * (1.0 if batch_order == "replacement" else EPOCH_ORDER_FACTOR)


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
    batch_streams: str | None = None,
    batch_order: str | None = None,
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
        loss_fn: ``loss_fn(model, batch) -> scalar`` mean loss over the batch (a per-sample loss
            vector, ``reduction="none"``, is rejected with its shape).
        loader: any re-iterable collection of batches (a DataLoader or a list; re-iterated when
            exhausted, so a one-shot generator is rejected once it runs dry). Restricting by data means
            passing another loader. A DataLoader over a TensorDataset is sliced directly.
        lr: SGLD step size (epsilon).
        localization: strength gamma of the pull back to ``w*``.
        nbeta: inverse temperature times sample size. None: ``B / log(B)`` with ``B`` the batch
            size (see :func:`default_nbeta`); the choice is logged.
        num_chains, num_draws, num_burnin_steps, num_steps_bw_draws: chain layout; each chain
            takes ``num_burnin_steps + (num_draws - 1) * num_steps_bw_draws + 1`` steps
            (defaults 4, 100, 0, 1).
        batch_streams: ``"shared"`` (default): all chains see the same batch at each step;
            ``"per_chain"``: every chain reads its own stream, so the per-chain estimates (and
            ``stderr``) are independent. See docs/estimator.md, "Batch streams".
        batch_order: ``"loader"`` (default): the loader's order; ``"replacement"``: i.i.d.
            batches of ``batch_size`` samples drawn with replacement from a map-style DataLoader's
            dataset (no epoch-order bias on noisy data).
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
        num_burnin_steps=num_burnin_steps, num_steps_bw_draws=num_steps_bw_draws, batch_streams=batch_streams,
        batch_order=batch_order,
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
    batch_streams: str | None = None,
    batch_order: str | None = None,
    settings: SGLDSettings | None = None,
    seed: int | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = torch.float32,
    eval_mode: bool = True,
    progress: Callable[[int, int], None] | None = None,
    warm_start: ChainOffsets | None = None,
) -> dict[str, LLCResult]:
    """Several (weights x data) restricted estimates at one snapshot: ``{name: LLCResult}``.

    ``jobs`` maps a name to ``(loader, restrict)``. Jobs that share the *same loader object*
    share one batch stream and are sampled together: their chains become lanes of one vectorized
    run, each lane with its own update mask, so the batch loss at ``w*`` is computed once per
    batch for all of them. Keyword arguments are those of :func:`estimate_llc`, and:

    warm_start: a :class:`~devinterp_lightning.sampling.warm_start.ChainOffsets` from the
        previous call on the same model and jobs. A group whose offsets it holds starts its
        chains at ``w* + offset`` with ``min(num_burnin_steps, warm_start.burnin_steps)`` burn-in
        steps; every group's last offsets are stored back into it.
    """
    settings = SGLDSettings.from_kwargs(
        settings, lr=lr, localization=localization, nbeta=nbeta, num_chains=num_chains, num_draws=num_draws,
        num_burnin_steps=num_burnin_steps, num_steps_bw_draws=num_steps_bw_draws, batch_streams=batch_streams,
        batch_order=batch_order,
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
            # warm-started chains carry the relaxation of earlier estimates, which the settings cannot show
            unrelaxed = (warm_start is None or tuple(names) not in warm_start.offsets) and _unrelaxed(settings)
            traces, group_nbeta, bad_start, variances = _run_group(
                model, loss_fn, loader, [masks_per_job[n] for n in names], anchor, buffers, settings,
                seed + 7919 * index, device, dtype, report, warm_start, tuple(names),
            )
            if bad_start is not None:
                warnings.warn(
                    f"the model gives a non-finite loss at the snapshot on the probe data (loss_fn = {bad_start} "
                    "at the current weights on the first batch): there is no LLC to estimate. The weights "
                    "or the data hold nan/inf; this is not a problem of the SGLD settings.",
                    RuntimeWarning,
                    stacklevel=3,
                )
            for k, name in enumerate(names):
                lanes = slice(k * num_chains, (k + 1) * num_chains)
                result = summarize_chains(
                    traces.loss_trace[lanes], traces.init_loss_trace[lanes], group_nbeta,
                    lr=settings.lr, localization=settings.localization, diverged=traces.diverged[lanes],
                    warn=bad_start is None,
                )
                if bad_start is not None:
                    result = dataclasses.replace(result, flags=(NONFINITE_INIT,))
                else:
                    result = _flag_minibatch_noise(result, variances[k], settings.batch_order, name)
                    if unrelaxed:
                        result = dataclasses.replace(result, flags=(*result.flags, UNRELAXED))
                results[name] = result
            if unrelaxed and bad_start is None:
                warnings.warn(_unrelaxed_message(settings), RuntimeWarning, stacklevel=3)
            if warm_start is not None and any(set(results[n].flags) - WARM_START_KEEPS for n in names):
                # chains that slid off a saddle or diverged are no sample of the next posterior
                warm_start.discard(tuple(names))
    return {name: results[name] for name in jobs}


#: health flags after which a group's last chain offsets still serve as a warm start: the chains
#: disagree (``high_rhat``), the step size is noisy (``minibatch_noise``) or the layout is short
#: (``unrelaxed``: a warm start is what relaxes them), but they sample the posterior; after any
#: other flag (``negative``, ``below_init``, ``drifting``, ``diverged``, ...) they are dropped and
#: the next estimate of the group starts at ``w*``
WARM_START_KEEPS = frozenset({"high_rhat", MINIBATCH_NOISE, UNRELAXED})


def _unrelaxed(settings: SGLDSettings) -> bool:
    return unrelaxed_fraction(settings.lr, settings.localization, settings.num_burnin_steps, settings.num_draws,
                              settings.num_steps_bw_draws) > UNRELAXED_LIMIT


def _unrelaxed_message(settings: SGLDSettings) -> str:
    """The ``unrelaxed`` warning: the cause and the burn-in that removes it (the same text for the same
    settings, so the default warning filter shows it once)."""
    steps = 1.0 / (settings.lr * settings.localization)
    need = relaxed_burnin(settings.lr, settings.localization, settings.num_draws, settings.num_steps_bw_draws)
    return (f"LLC estimate flagged 'unrelaxed': directions that only the localization holds relax in "
            f"1/(lr * localization) = {steps:.4g} steps, and these chains draw from step "
            f"{settings.num_burnin_steps} to {settings.total_steps}; on singular models such estimates read low "
            f"(docs/estimator.md). Use num_burnin_steps >= {need} for this layout, or a larger lr * localization.")


def _flag_minibatch_noise(result: LLCResult, variance: float, batch_order: str, name: str) -> LLCResult:
    """Add ``minibatch_noise`` when :func:`predicted_minibatch_inflation` exceeds
    ``MINIBATCH_NOISE_LIMIT`` of the estimate (the bias from minibatch gradient noise is then
    larger than the accuracy the validation suite reaches at well-chosen settings)."""
    if not (math.isfinite(variance) and math.isfinite(result.mean)):
        return result
    inflation = predicted_minibatch_inflation(result.lr, result.nbeta, variance, batch_order)
    logger.info(
        "devinterp_lightning: %s: predicted minibatch-noise inflation %.3g (estimate %.3g)", name, inflation,
        result.mean,
    )
    if inflation > MINIBATCH_NOISE_LIMIT * abs(result.mean):
        return dataclasses.replace(result, flags=(*result.flags, MINIBATCH_NOISE))
    return result


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
    warm_start: ChainOffsets | None = None,
    key: tuple[str, ...] = (),
) -> tuple[ChainTraces, float, float | None, list[float]]:
    """Sample one group of jobs sharing a loader: ``(traces, nbeta, None, gradient variances)``
    (one ``tr Cov(g_b)`` per job), or ``(all-nan traces, nbeta, loss, nans)`` when the loss at w*
    on the first batch is non-finite (nothing is sampled)."""
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
    replacement = settings.batch_order == "replacement"
    if replacement and not supports_replacement(loader):
        raise ValueError(
            "batch_order='replacement' draws samples from the loader's dataset, so it needs a DataLoader over "
            f"a map-style dataset (with a length) and a batch_size; got {type(loader).__name__}. "
            "Use batch_order='loader' for this loader."
        )
    # Batch order: from private generators where the loader allows it; otherwise from a seeded
    # fork of the global RNG (restored afterwards), so the order is reproducible either way.
    order = torch.Generator().manual_seed(seed ^ 0x5EED)
    with forked_global_rng(loader, seed ^ 0x5EED, cuda_devices(device)):
        if settings.batch_streams == "per_chain":
            orders = [order] + [torch.Generator().manual_seed((seed ^ 0x5EED) + 104729 * s) for s in
                                range(1, settings.num_chains)]
            if replacement and bulk_replacement(loader):
                stream: Iterator[Any] = (
                    ChainBatches(batches, stacked)
                    for batches, stacked in stacked_replacement_streams(loader, device, dtype, orders)  # type: ignore[arg-type]
                )
            else:
                stream = (
                    ChainBatches(step, stack_batches(step))
                    for step in chain_streams(loader, device, dtype, orders, replacement)
                )
        elif replacement:
            stream = replacement_stream(loader, device, dtype, order)  # type: ignore[arg-type]
        else:
            stream = batch_stream(loader, device, dtype, order)
        first = next(stream)
        nbeta = settings.nbeta
        if nbeta is None:
            size = batch_size_of(loader, first.batches[0] if isinstance(first, ChainBatches) else first)
            if size is None:
                raise ValueError("cannot infer the batch size for the default nbeta; pass nbeta= explicitly")
            nbeta = default_nbeta(size)
            logger.info("devinterp_lightning: nbeta=None, using B/log(B) = %.4g for batch size B=%d", nbeta, size)
        settings = settings.replace(nbeta=float(nbeta))
        evaluator = LossEvaluator(model, loss_fn, anchor, buffers, moving)
        # The loss at w* first: a model that is already nan/inf there has nothing to sample, and
        # its chains would all "diverge" and send the user to the SGLD settings.
        start = evaluator.anchor_loss(first)
        if not bool(torch.isfinite(start).all()):
            num_lanes = len(job_masks) * settings.num_chains
            nan = torch.full((num_lanes, settings.num_draws), float("nan"), device=device)
            traces = ChainTraces(nan, nan.clone(), torch.ones(num_lanes, dtype=torch.bool, device=device))
            return traces, float(nbeta), float(start.flatten()[0]), [float("nan")] * len(job_masks)
        peeked = [first]
        while sum(len(b.batches) if isinstance(b, ChainBatches) else 1 for b in peeked) < NOISE_PROBE_BATCHES:
            peeked.append(next(stream))
        variances = _gradient_variance(evaluator, peeked, anchor, moving, job_masks)
        offsets = None
        if warm_start is not None:
            num_lanes = len(job_masks) * settings.num_chains
            offsets = warm_start.lookup(key, (num_lanes, sum(anchor[n].numel() for n in moving)))
            if offsets is not None:
                settings = settings.replace(num_burnin_steps=min(settings.num_burnin_steps, warm_start.burnin_steps))
        traces = run_chains(evaluator, chain(peeked, stream), anchor, masks, settings, generator, progress=progress,
                            start_offsets=offsets)
        if warm_start is not None and traces.final_offsets is not None:
            warm_start.update(key, traces.final_offsets)
    return traces, float(nbeta), None, variances


def _gradient_variance(
    evaluator: LossEvaluator, steps: list[Any], anchor: dict[str, Tensor], moving: list[str],
    job_masks: list[dict[str, Tensor]],
) -> list[float]:
    """Per job, ``tr Cov(g_b)`` over its moving entries: the variance of the batch gradient at w*,
    estimated from the gradients on the given batches (the first ones of the sampler's stream)."""
    batches = [b for step in steps for b in (step.batches if isinstance(step, ChainBatches) else [step])]
    if not moving or len(batches) < 2:
        return [float("nan")] * len(job_masks)
    # one vmapped call where it runs: w* as one lane per batch
    lanes = {n: anchor[n].unsqueeze(0).expand(len(batches), *anchor[n].shape) for n in moving}
    out = None if evaluator.vectorize is False else evaluator.try_vmapped(
        lanes, ChainBatches(batches, stack_batches(batches)))
    if out is not None:
        grads = out[0]
        rows = torch.cat([grads[n].detach().reshape(len(batches), -1).double() for n in moving], dim=1)
    else:
        at_anchor = {n: anchor[n].unsqueeze(0) for n in moving}
        per_batch = []
        for batch in batches:
            grads, _ = evaluator.grad_and_loss(at_anchor, batch)
            per_batch.append(torch.cat([grads[n].detach().reshape(-1).double() for n in moving]))
        rows = torch.stack(per_batch)
    variance = rows.var(dim=0)
    out = []
    for mask in job_masks:
        weights = torch.cat([
            (mask[n].to(variance.device).double().reshape(-1) if n in mask else torch.zeros(anchor[n].numel(),
             dtype=torch.float64, device=variance.device)) for n in moving
        ])
        out.append(float((variance * weights).sum()))
    return out
