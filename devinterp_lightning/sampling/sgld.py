"""Vectorized SGLD over stacked parameter tensors ("lanes"). Pure torch, no Lightning.

A *lane* is one chain. All lanes of one run either share one batch stream or (per-chain
streams, :class:`ChainBatches`) each read their own, and are advanced together:
the moving parameters are stacked as ``[num_lanes, *shape]``; one ``torch.func.vmap`` forward
gives every lane's batch loss and one backward of their sum every lane's gradient.
Each lane carries its own update mask, so chains with different weight restrictions (and
chains that diverged and were frozen) live side by side in one vectorized step.

The update of lane ``c`` on the entries its mask allows (Welling & Teh 2011, localized as in
Lau et al. 2023):

    w <- w - lr/2 * (nbeta * grad L_batch(w) + localization * (w - w*)) + sqrt(lr) * N(0, 1)

Entries outside the mask stay exactly at w*.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap
from torch.utils._pytree import tree_leaves, tree_map

from devinterp_lightning.sampling.batches import concat_batches, stack_batches
from devinterp_lightning.sampling.settings import SGLDSettings

logger = logging.getLogger("devinterp_lightning")

#: A lane diverges when ``nbeta * (L(w) - L(w*)) > RUNAWAY_FACTOR * (moving entries + 1)``.
#: Under the localized tempered posterior ``nbeta * (L - L(w*))`` has mean ~lambda <= d/2 and
#: spread ~sqrt(d), so values a thousand times d are not sampling but a chain running away
#: (it would overflow to inf a few steps later).
RUNAWAY_FACTOR = 1000.0


class LossModule(nn.Module):
    """Lets ``functional_call`` call the user's ``loss_fn(model, batch)`` with swapped tensors."""

    def __init__(self, model: nn.Module, loss_fn: Callable[[nn.Module, Any], Tensor]) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: Any) -> Tensor:
        return self.loss_fn(self.model, batch)


def _compute_bound_on_cpu(stacked: Mapping[str, Tensor], batch: Any) -> bool:
    """True when a plain autograd loop over lanes beats vmap: big per-lane work on a CPU.

    Measured with one thread on an MLP: vmap wins while (moving weights x batch size) is below a
    few million (it removes per-call overhead); above, the loop's plain matmuls are ~7% faster
    than vmap's batched ones. On GPUs vmap batches kernels and always wins. Deterministic (no
    timing), so a fixed seed always takes the same path and gives the same numbers.
    """
    first = next(iter(stacked.values()))
    if first.device.type != "cpu":
        return False
    leaves = [t for t in tree_leaves(batch) if isinstance(t, Tensor) and t.ndim > 0]
    batch_size = int(leaves[0].shape[0]) if leaves else 1
    per_lane = sum(t[0].numel() for t in stacked.values())
    return per_lane * batch_size >= LOOP_THRESHOLD


#: moving weights x batch size above which CPU sampling loops over lanes instead of using vmap.
LOOP_THRESHOLD = 4_000_000

#: The losses at w* of up to this many upcoming steps are computed in one vmapped call. On a small
#: model each call costs mostly its fixed overhead (pytree handling, parameter swapping): one call
#: per step was ~9% of a sampling step on the 8-8-8-8 benchmark network.
ANCHOR_BLOCK_STEPS = 32
#: ... as long as the block's batches take at most this many bytes (the block is held in memory).
ANCHOR_BLOCK_BYTES = 4 * 2**20


@dataclass
class ChainBatches:
    """One step's batches when the chains read separate streams: lane ``l`` uses ``batches[l % S]``.

    ``stacked`` is the same ``S`` batches stacked along a new leading dimension (for one vmap
    call over the lanes), or None when they cannot be stacked (then the lanes are looped over).
    """

    batches: list[Any]
    stacked: Any | None

    def lane(self, lane: int) -> Any:
        return self.batches[lane % len(self.batches)]


@dataclass
class ChainTraces:
    """What a run produces: ``[num_lanes, num_draws]`` traces, a ``[num_lanes]`` divergence mask
    and the lanes' last offsets ``w - w*`` (``[num_lanes, moving entries]``, zero for a diverged
    lane; None when nothing was sampled), the start of a warm-started next run."""

    loss_trace: Tensor
    init_loss_trace: Tensor
    diverged: Tensor
    final_offsets: Tensor | None = None


class LossEvaluator:
    """Batch loss (and gradient) of stacked parameters through the user's ``loss_fn``.

    ``anchor`` holds w* for every parameter; names in ``moving`` get a lane dimension and a
    gradient, the others are passed once, unbatched and undifferentiated (a frozen last-layer
    probe costs no gradient for the frozen body). ``buffers`` are passed as they are.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[nn.Module, Any], Tensor],
        anchor: Mapping[str, Tensor],
        buffers: Mapping[str, Tensor],
        moving: list[str],
        vectorize: bool | None = None,
    ) -> None:
        self.module = LossModule(model, loss_fn)
        self.moving = list(moving)
        self.fixed = {"model." + n: t for n, t in anchor.items() if n not in set(moving)}
        self.buffers = {"model." + n: t for n, t in buffers.items()}
        self.anchor_all = {"model." + n: t for n, t in anchor.items()}
        # Tied tensors (one Parameter under two names) are resolved here, once: every alias gets
        # the canonical name's tensor, so functional_call can skip its per-call tie analysis
        # (tie_weights=False), which cost ~70 us a call, about 7% of a sampling step on an MLP.
        self.aliases = _tied_aliases(model)
        self.vectorize = vectorize  # None: try vmap once, fall back to a loop over lanes
        # The lanes' losses come from one vmapped forward and their gradients from one ordinary
        # backward of the losses' sum (the lanes are independent, so each lane's gradient is its
        # own loss's): the same numbers as vmap(grad(loss)), bit for bit, at 0.63x its time on the
        # 8-8-8-8 benchmark network and 0.83x at width 128, because the backward then runs on
        # plain batched tensors instead of through vmap's batching rules.
        self._vmapped = vmap(self._loss, in_dims=(0, None), randomness="different")
        # per-chain streams: every lane has its own batch
        self._vmapped_lanes = vmap(self._loss, in_dims=(0, 0), randomness="different")
        self._vmapped_anchor = vmap(self._anchor_call, in_dims=0, randomness="different")
        self._lane_index: Tensor | None = None
        self._anchor_blocks = True  # False once a vmapped block of anchor losses failed

    def _call(self, tensors: dict[str, Tensor], batch: Any) -> Any:
        for alias, canonical in self.aliases.items():
            tensors[alias] = tensors[canonical]
        return functional_call(self.module, tensors, (batch,), tie_weights=False)

    def _loss(self, moving: dict[str, Tensor], batch: Any) -> Tensor:
        tensors = {**self.fixed, **self.buffers}
        for name, value in moving.items():
            tensors["model." + name] = value
        return _scalar(self._call(tensors, batch))

    def _anchor_call(self, batch: Any) -> Tensor:
        return _scalar(self._call({**self.anchor_all, **self.buffers}, batch))

    @torch.no_grad()
    def anchor_loss(self, batch: Any) -> Tensor:
        """L_batch(w*), a 0-d tensor; for :class:`ChainBatches`, ``[S]`` (one per stream)."""
        if isinstance(batch, ChainBatches):
            if batch.stacked is not None and self.vectorize is not False:
                try:
                    return self._vmapped_anchor(batch.stacked).detach().float()
                except Exception as err:  # noqa: BLE001 - vmap cannot run every model
                    logger.info("devinterp_lightning: vmap over batch streams failed (%s); looping", err)
                    self.vectorize = False
            return torch.stack([self._anchor_call(b).detach().float() for b in batch.batches])
        return self._anchor_call(batch).detach().float()

    @torch.no_grad()
    def anchor_losses(self, batches: list[Any]) -> list[Tensor]:
        """:meth:`anchor_loss` of each batch, in one vmapped call over all of them where it runs
        (equal shapes, a model vmap can run); otherwise one call per batch."""
        if len(batches) > 1 and self.vectorize is not False and self._anchor_blocks:
            per_lane = isinstance(batches[0], ChainBatches)
            parts = [b.stacked for b in batches] if per_lane else batches
            stacked = None
            if all(p is not None for p in parts):
                stacked = concat_batches(parts) if per_lane else stack_batches(parts)
            if stacked is not None:
                try:
                    values = self._vmapped_anchor(stacked).detach().float()
                    return list(values.reshape(len(batches), -1)) if per_lane else list(values)
                except Exception as err:  # noqa: BLE001 - vmap cannot run every model
                    logger.info("devinterp_lightning: vmap over upcoming batches failed (%s); one call each", err)
                    self._anchor_blocks = False
        return [self.anchor_loss(b) for b in batches]

    def _vmapped_call(self, stacked: dict[str, Tensor], batch: Any) -> tuple[dict[str, Tensor], Tensor]:
        if not isinstance(batch, ChainBatches):
            return _grad_of_sum(self._vmapped, stacked, batch)
        num_lanes = next(iter(stacked.values())).shape[0]
        streams = len(batch.batches)
        index = None
        if num_lanes != streams:
            if self._lane_index is None or self._lane_index.numel() != num_lanes:
                device = tree_leaves(batch.stacked)[0].device
                self._lane_index = torch.arange(num_lanes, device=device) % streams
            index = self._lane_index
        return _grad_of_sum(self._vmapped_lanes, stacked, _lanes_of(batch.stacked, num_lanes, index))

    def try_vmapped(
        self, stacked: dict[str, Tensor], batch: ChainBatches
    ) -> tuple[dict[str, Tensor], Tensor] | None:
        """One vmapped call with a batch per lane, or None when vmap cannot run it; unlike
        :meth:`grad_and_loss` a failure does not switch the evaluator to the loop over lanes
        (a model may vmap over chains with a shared batch but not over per-lane batches)."""
        if self.vectorize is False or batch.stacked is None:
            return None
        try:
            return self._vmapped_call(stacked, batch)
        except Exception as err:  # noqa: BLE001
            logger.info("devinterp_lightning: vmap over per-lane batches failed (%s)", err)
            return None

    def grad_and_loss(
        self, stacked: dict[str, Tensor], batch: Any, out: dict[str, Tensor] | None = None
    ) -> tuple[dict[str, Tensor], Tensor]:
        """Per-lane gradients ``{name: [L, *shape]}`` and batch losses ``[L]``.

        ``out``, if given, holds ``[L, *shape]`` views the gradients are written into (the loop
        over lanes then copies each gradient once instead of stacking and re-flattening it).
        """
        per_lane = isinstance(batch, ChainBatches)
        if self.vectorize is None and _compute_bound_on_cpu(stacked, batch.batches[0] if per_lane else batch):
            self.vectorize = False
        if per_lane and batch.stacked is None:
            self.vectorize = False
        if self.vectorize is None:
            try:
                out = self._vmapped_call(stacked, batch)
                self.vectorize = True
                return out
            except Exception as err:  # vmap cannot run some models (e.g. BatchNorm in train mode)
                logger.info("devinterp_lightning: vmap over chains failed (%s); looping over chains", err)
                self.vectorize = False
        if self.vectorize:
            return self._vmapped_call(stacked, batch)
        # Loop with plain autograd: unlike torch.func, it lets the forward mutate our buffer
        # copies (BatchNorm running statistics in train mode).
        num_lanes = next(iter(stacked.values())).shape[0]
        grads = out if out is not None else {n: torch.empty_like(t) for n, t in stacked.items()}
        losses = []
        for lane in range(num_lanes):
            leaves = {n: t[lane].detach().requires_grad_(True) for n, t in stacked.items()}
            with torch.enable_grad():
                loss = self._loss(leaves, batch.lane(lane) if per_lane else batch)
                g = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
            for n, gi in zip(leaves, g, strict=True):
                if gi is None:
                    grads[n][lane].zero_()
                else:
                    grads[n][lane].copy_(gi)
            losses.append(loss.detach())
        return grads, torch.stack(losses)


def _grad_of_sum(
    losses_of: Callable[[dict[str, Tensor], Any], Tensor], stacked: Mapping[str, Tensor], batch: Any
) -> tuple[dict[str, Tensor], Tensor]:
    """Per-lane losses ``[L]`` from ``losses_of`` and their gradients ``{name: [L, *shape]}``, as
    the gradient of their sum (a lane's loss depends on its own slice only)."""
    leaves = {n: t.detach().requires_grad_(True) for n, t in stacked.items()}
    with torch.enable_grad():
        losses = losses_of(leaves, batch)
        grads = torch.autograd.grad(losses.sum(), list(leaves.values()), allow_unused=True)
    out = {n: torch.zeros_like(leaves[n]) if g is None else g for n, g in zip(leaves, grads, strict=True)}
    return out, losses.detach()


def _scalar(loss: Any) -> Tensor:
    """``loss`` as a 0-d tensor, or a TypeError that says what ``loss_fn`` returned instead."""
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        raise TypeError(
            "loss_fn(model, batch) must return a scalar mean over the batch (e.g. reduction='mean', not "
            "'none'); it returned "
            + (f"a tensor of shape {tuple(loss.shape)}" if isinstance(loss, Tensor) else type(loss).__name__)
        )
    return loss.reshape(())


def _lanes_of(stacked: Any, num_lanes: int, index: Tensor | None) -> Any:
    """The ``S`` stacked stream batches repeated to one per lane (lane ``l`` gets stream ``l % S``)."""
    if index is None:
        return stacked
    return tree_map(lambda t: t.index_select(0, index), stacked)


def _batch_bytes(batch: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tree_leaves(batch) if isinstance(t, Tensor))


class AnchoredBatches:
    """The batch stream of a run, each step's batch paired with the loss at w* on it where the
    run needs that (draw steps and the first step), computed ahead in blocks of upcoming steps
    (:meth:`LossEvaluator.anchor_losses`). Reads exactly ``total_steps`` batches, in order."""

    def __init__(self, evaluator: LossEvaluator, batches: Iterator[Any], settings: SGLDSettings) -> None:
        self.evaluator, self.batches, self.settings = evaluator, batches, settings
        self.block = 1
        self.pending: list[tuple[Any, Tensor | None]] = []
        self.step = 0  # the step of the next batch to read from the stream

    def _needs_anchor(self, step: int) -> bool:
        return step == 0 or self.settings.draw_index(step) is not None

    def next(self) -> tuple[Any, Tensor | None]:
        if not self.pending:
            count = max(1, min(self.block, self.settings.total_steps - self.step))
            block = [next(self.batches) for _ in range(count)]
            if self.step == 0:  # size the blocks from the first batch
                size = _batch_bytes(block[0].stacked if isinstance(block[0], ChainBatches) else block[0])
                self.block = int(max(1, min(ANCHOR_BLOCK_STEPS, ANCHOR_BLOCK_BYTES // max(size, 1))))
            needed = [i for i in range(count) if self._needs_anchor(self.step + i)]
            losses = iter(self.evaluator.anchor_losses([block[i] for i in needed]) if needed else [])
            self.pending = [(b, next(losses) if i in needed else None) for i, b in enumerate(block)]
            self.pending.reverse()
            self.step += count
        return self.pending.pop()


def _tied_aliases(model: nn.Module) -> dict[str, str]:
    """``{"model.<alias>": "model.<canonical>"}`` for every parameter or buffer registered under
    more than one name (the canonical name is the one ``named_parameters()``/``named_buffers()`` keep)."""
    aliases: dict[str, str] = {}
    for named in (model.named_parameters, model.named_buffers):
        canonical = {id(t): n for n, t in named()}
        for name, tensor in named(remove_duplicate=False):
            first = canonical.get(id(tensor))
            if first is not None and first != name:
                aliases["model." + name] = "model." + first
    return aliases


class FlatLanes:
    """The moving parameters of all lanes in one ``[num_lanes, numel]`` buffer, with named views.

    One buffer makes the SGLD update a handful of fused tensor ops (and one noise draw) per step,
    however many parameter tensors the model has.
    """

    def __init__(self, anchor: Mapping[str, Tensor], masks: Mapping[str, Tensor], num_lanes: int) -> None:
        self.names = list(masks)
        first = anchor[self.names[0]]
        self.shapes = {n: anchor[n].shape for n in self.names}
        self.anchor = torch.cat([anchor[n].reshape(-1) for n in self.names])
        self.values = self.anchor.unsqueeze(0).repeat(num_lanes, 1)
        lane_masks = [masks[n].expand(num_lanes, *anchor[n].shape).reshape(num_lanes, -1) for n in self.names]
        mask = torch.cat(lane_masks, dim=1).to(first.dtype)
        whole_lanes = bool((mask == mask[:, :1]).all())
        # a [num_lanes, 1] mask when every lane moves all-or-nothing (saves memory and time)
        self.mask = mask[:, :1].contiguous() if whole_lanes else mask
        self.moving_count = mask.sum(dim=1)
        self.moves_everything = whole_lanes and bool((mask[:, 0] == 1).all())
        self.views: dict[str, Tensor] = {}
        self.offsets: dict[str, int] = {}
        offset = 0
        for n in self.names:
            size = anchor[n].numel()
            self.offsets[n] = offset
            self.views[n] = self.values[:, offset : offset + size].view(num_lanes, *anchor[n].shape)
            offset += size

    def flatten(self, tensors: Mapping[str, Tensor]) -> Tensor:
        num_lanes = self.values.shape[0]
        return torch.cat([tensors[n].reshape(num_lanes, -1) for n in self.names], dim=1)


def run_chains(
    evaluator: LossEvaluator,
    batches: Iterator[Any],
    anchor: Mapping[str, Tensor],
    masks: Mapping[str, Tensor],
    settings: SGLDSettings,
    generator: torch.Generator,
    *,
    progress: Callable[[int], None] | None = None,
    start_offsets: Tensor | None = None,
) -> ChainTraces:
    """Run all lanes for ``settings.total_steps`` steps and record the draws.

    Args:
        evaluator: computes per-lane gradients for the names in ``masks``.
        batches: an endless iterator of batches (already on the right device and dtype): one
            batch shared by all lanes, or a :class:`ChainBatches` per step (per-chain streams).
        anchor: w* for every parameter name.
        masks: ``{name: mask}`` for the moving parameters, each broadcastable to
            ``[num_lanes, *shape]`` with 1 where a lane may move an entry and 0 elsewhere.
        settings: step size, temperature, localization and step counts.
        generator: the only source of noise.
        progress: called with the number of steps done after each step.
        start_offsets: ``[num_lanes, moving entries]`` offsets ``w - w*`` to start the lanes at
            (a warm start from the ``final_offsets`` of an earlier run); None starts at ``w*``.
    """
    num_lanes = next(iter(masks.values())).shape[0]
    lanes = FlatLanes(anchor, masks, num_lanes)
    w, w0, device = lanes.values, lanes.anchor, lanes.values.device
    if start_offsets is not None:
        if start_offsets.shape != w.shape:
            raise ValueError(f"start_offsets has shape {tuple(start_offsets.shape)}; the lanes need {tuple(w.shape)}")
        w.add_(start_offsets.to(device=device, dtype=w.dtype) * lanes.mask)
    runaway = RUNAWAY_FACTOR * (lanes.moving_count + 1)

    loss_trace = torch.full((num_lanes, settings.num_draws), float("nan"), device=device)
    init_trace = torch.full((num_lanes, settings.num_draws), float("nan"), device=device)
    diverged = torch.zeros(num_lanes, dtype=torch.bool, device=device)
    half_lr = settings.lr / 2
    noise_scale = math.sqrt(settings.lr)
    nbeta, loc = settings.nbeta, settings.localization
    init_loss: Tensor | None = None
    noise = torch.empty_like(w)
    grad_flat = torch.empty_like(w)
    grad_views = {n: grad_flat[:, lanes.offsets[n] : lanes.offsets[n] + v[0].numel()].view(v.shape)
                  for n, v in lanes.views.items()}

    stream = AnchoredBatches(evaluator, batches, settings)
    on_cpu = device.type == "cpu"
    diverged_any = not on_cpu  # on an accelerator, never synchronize to find out
    for step in range(settings.total_steps):
        batch, anchor_loss = stream.next()
        draw = settings.draw_index(step)
        if anchor_loss is not None:
            init_loss = anchor_loss
            if isinstance(batch, ChainBatches):  # one value per stream -> one per lane
                init_loss = init_loss.repeat((num_lanes + init_loss.numel() - 1) // init_loss.numel())[:num_lanes]
        grads, losses = evaluator.grad_and_loss(lanes.views, batch, out=grad_views)
        losses = losses.detach().float()
        # a lane diverges on a non-finite or runaway loss; it is frozen back at w* from then on.
        # False on nan, +-inf and a runaway:
        healthy = ((losses - init_loss).mul_(nbeta) <= runaway) & (losses > -math.inf)
        newly = None
        if not on_cpu or diverged_any or not bool(healthy.all()):  # the check is free on CPU
            newly = ~healthy & ~diverged
            diverged |= newly
            diverged_any = not on_cpu or bool(diverged.any())
        if draw is not None:
            loss_trace[:, draw] = losses.masked_fill(diverged, float("nan")) if diverged_any else losses
            init_trace[:, draw] = init_loss
        # drift = nbeta * grad + localization * (w - w*); step = sqrt(lr) * noise - lr/2 * drift
        drift = (grad_flat if grads is grad_views else lanes.flatten(grads)).mul_(nbeta * half_lr)
        if loc:
            drift.add_(w - w0, alpha=loc * half_lr)
        torch.randn(w.shape, generator=generator, out=noise)
        delta = noise.mul_(noise_scale).sub_(drift)
        if lanes.moves_everything and not diverged_any:
            w.add_(delta)
        else:
            w.addcmul_(delta, lanes.mask * (~diverged).to(w.dtype)[:, None])
        # put a diverged lane back at w* so its tensors stay finite (one sync-free op on GPU)
        if not on_cpu or (newly is not None and bool(newly.any())):
            w.copy_(torch.where(diverged[:, None], w0, w))
        if progress is not None:
            progress(step + 1)
    final = (w - w0).masked_fill_(diverged[:, None], 0.0)
    return ChainTraces(loss_trace=loss_trace, init_loss_trace=init_trace, diverged=diverged, final_offsets=final)
