"""Vectorized SGLD over stacked parameter tensors ("lanes"). Pure torch, no Lightning.

A *lane* is one chain. All lanes of one run share the batch stream and are advanced together:
the moving parameters are stacked as ``[num_lanes, *shape]`` and one call of
``torch.func.vmap(torch.func.grad_and_value(...))`` gives every lane's batch loss and gradient.
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
from torch.func import functional_call, grad_and_value, vmap

logger = logging.getLogger("devinterp_lightning")

#: A lane diverges when ``nbeta * (L(w) - L(w*)) > RUNAWAY_FACTOR * (moving entries + 1)``.
#: Under the localized tempered posterior ``nbeta * (L - L(w*))`` has mean ~lambda <= d/2 and
#: spread ~sqrt(d), so values a thousand times d are not sampling but a chain running away
#: (it would overflow to inf a few steps later).
RUNAWAY_FACTOR = 1000.0


class _LossModule(nn.Module):
    """Lets ``functional_call`` call the user's ``loss_fn(model, batch)`` with swapped tensors."""

    def __init__(self, model: nn.Module, loss_fn: Callable[[nn.Module, Any], Tensor]) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: Any) -> Tensor:
        return self.loss_fn(self.model, batch)


@dataclass
class SGLDSettings:
    """Sampler settings shared by all lanes of one run."""

    lr: float
    nbeta: float
    localization: float
    num_burnin_steps: int
    num_draws: int
    num_steps_bw_draws: int = 1

    @property
    def total_steps(self) -> int:
        return self.num_burnin_steps + (self.num_draws - 1) * self.num_steps_bw_draws + 1

    def draw_index(self, step: int) -> int | None:
        """The draw recorded at ``step`` (0-based), or None during burn-in / between draws."""
        since = step - self.num_burnin_steps
        if since < 0 or since % self.num_steps_bw_draws:
            return None
        return since // self.num_steps_bw_draws


@dataclass
class ChainTraces:
    """What a run produces: ``[num_lanes, num_draws]`` traces and a ``[num_lanes]`` divergence mask."""

    loss_trace: Tensor
    init_loss_trace: Tensor
    diverged: Tensor


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
        self.module = _LossModule(model, loss_fn)
        self.moving = list(moving)
        self.fixed = {"model." + n: t for n, t in anchor.items() if n not in set(moving)}
        self.buffers = {"model." + n: t for n, t in buffers.items()}
        self.anchor_all = {"model." + n: t for n, t in anchor.items()}
        self.vectorize = vectorize  # None: try vmap once, fall back to a loop over lanes
        self._grad_fn = grad_and_value(self._loss)
        self._vmapped = vmap(self._grad_fn, in_dims=(0, None), randomness="different")

    def _loss(self, moving: dict[str, Tensor], batch: Any) -> Tensor:
        tensors = {**self.fixed, **self.buffers}
        for name, value in moving.items():
            tensors["model." + name] = value
        loss = functional_call(self.module, tensors, (batch,))
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise TypeError(
                "loss_fn(model, batch) must return a scalar tensor (the mean loss over the batch); got "
                f"{type(loss).__name__}{'' if not isinstance(loss, Tensor) else tuple(loss.shape)}"
            )
        return loss.reshape(())

    @torch.no_grad()
    def anchor_loss(self, batch: Any) -> Tensor:
        """L_batch(w*), a 0-d tensor."""
        loss = functional_call(self.module, {**self.anchor_all, **self.buffers}, (batch,))
        return loss.detach().reshape(()).float()

    def grad_and_loss(self, stacked: dict[str, Tensor], batch: Any) -> tuple[dict[str, Tensor], Tensor]:
        """Per-lane gradients ``{name: [L, *shape]}`` and batch losses ``[L]``."""
        if self.vectorize is None:
            try:
                out = self._vmapped(stacked, batch)
                self.vectorize = True
                return out
            except Exception as err:  # vmap cannot run some models (e.g. BatchNorm in train mode)
                logger.info("devinterp_lightning: vmap over chains failed (%s); looping over chains", err)
                self.vectorize = False
        if self.vectorize:
            return self._vmapped(stacked, batch)
        # Loop with plain autograd: unlike torch.func, it lets the forward mutate our buffer
        # copies (BatchNorm running statistics in train mode).
        num_lanes = next(iter(stacked.values())).shape[0]
        grads: dict[str, list[Tensor]] = {n: [] for n in stacked}
        losses = []
        for lane in range(num_lanes):
            leaves = {n: t[lane].detach().requires_grad_(True) for n, t in stacked.items()}
            with torch.enable_grad():
                loss = self._loss(leaves, batch)
                g = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
            for n, gi in zip(leaves, g, strict=True):
                grads[n].append(torch.zeros_like(leaves[n]) if gi is None else gi)
            losses.append(loss.detach())
        return {n: torch.stack(v) for n, v in grads.items()}, torch.stack(losses)


def run_chains(
    evaluator: LossEvaluator,
    batches: Iterator[Any],
    anchor: Mapping[str, Tensor],
    masks: Mapping[str, Tensor],
    settings: SGLDSettings,
    generator: torch.Generator,
    *,
    progress: Callable[[int], None] | None = None,
) -> ChainTraces:
    """Run all lanes for ``settings.total_steps`` steps and record the draws.

    Args:
        evaluator: computes per-lane gradients for the names in ``masks``.
        batches: an endless iterator of batches (already on the right device and dtype).
        anchor: w* for every parameter name.
        masks: ``{name: mask}`` for the moving parameters, each broadcastable to
            ``[num_lanes, *shape]`` with 1 where a lane may move an entry and 0 elsewhere.
        settings: step size, temperature, localization and step counts.
        generator: the only source of noise.
        progress: called with the number of steps done after each step.
    """
    names = list(masks)
    num_lanes = next(iter(masks.values())).shape[0]
    device = anchor[names[0]].device
    params = {n: anchor[n].unsqueeze(0).expand(num_lanes, *anchor[n].shape).clone() for n in names}
    # moving entries per lane, for the runaway criterion
    moving_count = torch.zeros(num_lanes, device=device)
    for n in names:
        moving_count += masks[n].expand(num_lanes, *anchor[n].shape).reshape(num_lanes, -1).sum(1)
    runaway = RUNAWAY_FACTOR * (moving_count + 1)

    loss_trace = torch.full((num_lanes, settings.num_draws), float("nan"), device=device)
    init_trace = torch.full((num_lanes, settings.num_draws), float("nan"), device=device)
    diverged = torch.zeros(num_lanes, dtype=torch.bool, device=device)
    half_lr = settings.lr / 2
    noise_scale = math.sqrt(settings.lr)
    nbeta, loc = settings.nbeta, settings.localization
    init_loss: Tensor | None = None

    for step in range(settings.total_steps):
        batch = next(batches)
        draw = settings.draw_index(step)
        if draw is not None or init_loss is None:
            init_loss = evaluator.anchor_loss(batch)
        grads, losses = evaluator.grad_and_loss(params, batch)
        losses = losses.detach().float()
        # a lane diverges on a non-finite or runaway loss; it is frozen back at w* from then on
        diverged |= ~torch.isfinite(losses) | (nbeta * (losses - init_loss) > runaway)
        if draw is not None:
            loss_trace[:, draw] = losses.masked_fill(diverged, float("nan"))
            init_trace[:, draw] = init_loss
        keep = (~diverged).to(losses.dtype)
        for n in names:
            w, g, w0 = params[n], grads[n], anchor[n]
            shape = (num_lanes,) + (1,) * (w.ndim - 1)
            # drift = nbeta * grad + localization * (w - w*), then the Langevin step
            step_ = g.mul_(nbeta * half_lr).add_(w - w0, alpha=loc * half_lr)
            noise = torch.randn(w.shape, generator=generator, device=device, dtype=w.dtype)
            step_ = noise.mul_(noise_scale).sub_(step_)
            w.addcmul_(step_, masks[n] * keep.view(shape))
            # a diverged lane is put back at w* so its tensors stay finite
            w.copy_(torch.where(diverged.view(shape), w0, w))
        if progress is not None:
            progress(step + 1)
    return ChainTraces(loss_trace=loss_trace, init_loss_trace=init_trace, diverged=diverged)
