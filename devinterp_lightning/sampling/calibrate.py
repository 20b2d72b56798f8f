"""Choose the SGLD settings (``lr``, ``localization``, ``nbeta``) from measurements, not by hand.

The scheme (docs/calibration.md has the reasoning and the validation):

1. ``nbeta``: the caller's value, else the estimator's default ``B / log B`` for the batch size B.
2. Curvature: the top eigenvalue ``h`` of the Hessian of the batch loss at ``w*`` (power iteration
   with Hessian-vector products on a few fixed batches). The SGLD drift is stable only while
   ``lr * (nbeta * h + localization) < 2``.
3. ``localization``: the caller's value, else ``LOCALIZATION_FRACTION * nbeta * h``: a pull to
   ``w*`` that is a small fraction of the stiffest direction of the tempered loss, so the loss,
   not the prior, shapes the draws in every direction it constrains, while the flat (singular)
   directions stay confined to a ball of radius ``~1/sqrt(localization)``.
4. A log-spaced ``lr`` grid from the stability limit down. A cheap vectorized probe on one fixed
   batch runs an SGLD trajectory per grid value and scores it with the Metropolis-adjusted
   (MALA) acceptance probability of each of its steps; values with low acceptance are skipped.
5. From the largest surviving ``lr`` down, full short estimates are run, each with a burn-in of at
   least ``RELAXATION_EFOLDS / (lr * localization)`` steps: the relaxation time of the flat
   directions, which only the localization holds. When the estimate at
   ``lr`` is healthy (no flag of :func:`~devinterp_lightning.sampling.result.health_flags`) and
   agrees with the healthy estimate at ``lr / 2`` (the bias check), ``lr / 2`` is chosen: the SGLD
   bias grows about linearly in ``lr``, so the gap between the two measures the bias left at
   ``lr / 2``, and the check bounds it; ``lr`` itself would carry about twice that bias.
6. When the localization was automatic and the chains slid off ``w*`` (a saddle), steps 3-5 are
   repeated with the localization raised by ``LOCALIZATION_BOOST`` (a loop, at most
   ``max_localization_boosts`` times).

Everything here is pure torch: the model is never modified.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value, vmap

from devinterp_lightning.sampling.batches import (
    batch_size_of,
    forked_global_rng,
    iterate_once,
    to_device,
)
from devinterp_lightning.sampling.estimator import default_nbeta, estimate_llc
from devinterp_lightning.sampling.result import UNRELAXED, LLCResult
from devinterp_lightning.sampling.settings import SGLDSettings
from devinterp_lightning.sampling.sgld import LossModule
from devinterp_lightning.sampling.snapshot import (
    cuda_devices,
    preserved_modes,
    resolve_restriction,
    take_snapshot,
)

logger = logging.getLogger("devinterp_lightning")

__all__ = ["calibrate_llc", "CalibrationResult", "Trial"]

#: localization = LOCALIZATION_FRACTION * nbeta * (top Hessian eigenvalue) when not given.
LOCALIZATION_FRACTION = 0.01
#: MALA acceptance below this marks an lr as too large without running an estimate.
MIN_ACCEPTANCE = 0.9
#: Flags that mean "not mixed within the layout" (a smaller lr only makes them worse; a longer
#: burn-in cures them) and flags that a smaller lr can cure.
_MIXING_FLAGS = frozenset({"drifting", "high_rhat", UNRELAXED})
_STEP_FLAGS = frozenset({"diverged", "all_diverged", "minibatch_noise"})
#: flags that say w* is not a local minimum of the sampled loss (a slope or a saddle)
_NOT_A_MINIMUM_FLAGS = frozenset({"negative", "below_init"})
#: factor by which an automatically chosen localization is raised when the chains slide off w*
LOCALIZATION_BOOST = 10.0
#: The burn-in of every trial, and of the recommendation, is at least ``RELAXATION_EFOLDS / (lr *
#: localization)`` steps. In a direction the loss leaves flat only the localization pulls, and from
#: w* the variance of the update ``w <- w - lr/2 * localization * (w - w*) + sqrt(lr) N`` grows as
#: ``(1 - exp(-lr * localization * t)) / localization``: two e-folds reach 86% of it. Every other
#: direction relaxes faster (its rate has ``nbeta * h_i`` added). Measured on the deep linear
#: networks of the suite (docs/calibration.md): the estimate is 5-20% low over the first
#: ``0.5 / (lr * localization)`` steps and levels off by about one e-fold.
RELAXATION_EFOLDS = 2.0
#: No trial runs a longer burn-in than this by default (``max_burnin_steps``): a step whose flat
#: directions need more cannot be checked at a cost comparable to an estimate.
MAX_BURNIN_STEPS = 10_000
#: Consecutive grid values differ by this factor (the bias check compares lr with lr / LR_FACTOR).
LR_FACTOR = 2.0
#: The trial layout when neither keywords nor ``settings=`` give one.
DEFAULT_LAYOUT: dict[str, int] = {"num_chains": 4, "num_draws": 200, "num_burnin_steps": 100, "num_steps_bw_draws": 1}

LossFn = Callable[[nn.Module, Any], Tensor]
Restriction = str | Sequence[str] | Mapping[str, Tensor] | None


@dataclass(frozen=True)
class Trial:
    """One candidate step size and what was measured for it.

    Attributes:
        lr: the step size.
        acceptance: mean MALA acceptance probability of the probe trajectory (nan if not probed).
        distance: RMS distance from ``w*`` per moving entry at the end of the probe trajectory,
            relative to the localization's own scale ``1/sqrt(localization)`` (~1 when local).
        estimate: the short LLC estimate at this lr, or None when the probe already rejected it.
        burnin: the burn-in steps of that estimate (None when none was run).
        rejected: why this lr was not chosen ("" for the chosen one, "not reached" when the search
            stopped before it).
    """

    lr: float
    acceptance: float
    distance: float
    estimate: LLCResult | None = None
    rejected: str = ""
    burnin: int | None = None

    def to_dict(self) -> dict[str, Any]:
        est = self.estimate
        return {
            "lr": self.lr,
            "acceptance": self.acceptance,
            "distance": self.distance,
            "llc": None if est is None else est.mean,
            "stderr": None if est is None else est.stderr,
            "flags": None if est is None else list(est.flags),
            "burnin": self.burnin,
            "rejected": self.rejected,
        }


@dataclass(frozen=True)
class CalibrationResult:
    """Recommended SGLD settings and the evidence for them.

    ``as_kwargs()`` gives the settings to splat into :func:`estimate_llc` / ``estimate_llcs``
    (``num_chains`` and ``seed`` are left to the caller).

    Attributes:
        lr, localization, nbeta: the recommendation.
        num_draws, num_burnin_steps, num_steps_bw_draws: the chain layout the recommendation was
            checked with: the caller's, with the burn-in raised to ``relaxation_efolds *
            relaxation_steps`` (the relaxation rule) and doubled where the trial still needed it to
            level off (``max_burnin_extensions``).
        ok: True when an lr passed every check: it is healthy and its estimate agrees with the one
            at twice its lr, both with their relaxation burn-in. False means the fallback (the
            healthiest trial) was returned and a warning was issued, with the reason in ``reason``.
        reason: one line saying why this lr was chosen.
        curvature: top eigenvalue of the Hessian of the batch loss at w* (power iteration).
        relaxation_steps: ``1 / (lr * (localization + nbeta * c))``, the e-folding time in steps of the
            variance of the slowest direction: one the loss leaves flat (only the localization holds
            it; ``c = 0``) or, at a saddle, one of negative curvature ``c < 0`` (``min_curvature``
            where it is negative beyond the batch-to-batch noise); inf without a localization, or
            when the localization does not outweigh the negative curvature.
        min_curvature: smallest eigenvalue of that Hessian (power iteration on ``H - curvature * I``).
        trials: every lr considered, largest first, with its measurements and rejection reason.
        estimate: the estimate at the chosen lr (a by-product: no need to estimate again).
        num_steps: SGLD steps per chain spent by the calibration (probe and estimates).
        seconds: wall time of the calibration.
        batch_streams, batch_order: the batch layout the trials ran with (from ``settings=``);
            the step-size bias depends on it, so the recommendation carries it.
    """

    lr: float
    localization: float
    nbeta: float
    num_draws: int
    num_burnin_steps: int
    num_steps_bw_draws: int
    ok: bool
    reason: str
    curvature: float
    trials: tuple[Trial, ...] = field(default=())
    estimate: LLCResult | None = None
    num_steps: int = 0
    seconds: float = 0.0
    batch_streams: str = "shared"
    batch_order: str = "loader"
    relaxation_steps: float = math.inf
    min_curvature: float = 0.0

    def as_kwargs(self) -> dict[str, Any]:
        """``{lr, localization, nbeta, num_draws, num_burnin_steps, num_steps_bw_draws, batch_streams,
        batch_order}``: keywords of :func:`estimate_llc`."""
        return {
            "lr": self.lr,
            "localization": self.localization,
            "nbeta": self.nbeta,
            "num_draws": self.num_draws,
            "num_burnin_steps": self.num_burnin_steps,
            "num_steps_bw_draws": self.num_steps_bw_draws,
            "batch_streams": self.batch_streams,
            "batch_order": self.batch_order,
        }

    def settings(self, num_chains: int | None = None) -> SGLDSettings:
        """The recommendation as :class:`SGLDSettings` (``num_chains`` default: the settings' default)."""
        extra = {} if num_chains is None else {"num_chains": num_chains}
        return SGLDSettings(**self.as_kwargs(), **extra)

    def hparams(self, prefix: str = "llc/calibrated") -> dict[str, float | int | bool | str]:
        """Flat scalars for ``logger.log_hyperparams``: the settings and the headline evidence."""
        out: dict[str, float | int | bool | str] = {f"{prefix}/{k}": v for k, v in self.as_kwargs().items()}
        out[f"{prefix}/ok"] = self.ok
        out[f"{prefix}/curvature"] = self.curvature
        out[f"{prefix}/num_trials"] = len(self.trials)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.as_kwargs(),
            "ok": self.ok,
            "reason": self.reason,
            "curvature": self.curvature,
            "relaxation_steps": self.relaxation_steps,
            "min_curvature": self.min_curvature,
            "num_steps": self.num_steps,
            "seconds": self.seconds,
            "trials": [t.to_dict() for t in self.trials],
        }

    def summary(self) -> str:
        """A small table of the trials, for logs and reports."""
        lines = [
            f"calibrate_llc: lr={self.lr:.3g} localization={self.localization:.3g} nbeta={self.nbeta:.4g} "
            f"({'ok' if self.ok else 'FALLBACK'}: {self.reason}); top Hessian eigenvalue {self.curvature:.3g}",
            f"burn-in {self.num_burnin_steps} steps, {self.num_steps_bw_draws} between draws; relaxation time "
            f"{self.relaxation_steps:.4g} steps (smallest Hessian eigenvalue {self.min_curvature:.3g})",
            f"{'lr':>10} {'accept':>7} {'dist':>6} {'burn-in':>7} {'llc':>10} {'stderr':>8}  verdict",
        ]
        for t in self.trials:
            llc = "-" if t.estimate is None else f"{t.estimate.mean:.4g}"
            se = "-" if t.estimate is None else f"{t.estimate.stderr:.3g}"
            burnin = "-" if t.burnin is None else str(t.burnin)
            lines.append(
                f"{t.lr:>10.3g} {t.acceptance:>7.3f} {t.distance:>6.2f} {burnin:>7} {llc:>10} {se:>8}  "
                f"{t.rejected or 'CHOSEN'}"
            )
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------ probes


class _Probe:
    """Batch loss, gradient and Hessian-vector products of the moving weights, on fixed batches."""

    def __init__(
        self, model: nn.Module, loss_fn: LossFn, masks: dict[str, Tensor], anchor: dict[str, Tensor],
        buffers: dict[str, Tensor], batches: list[Any],
    ) -> None:
        self.module = LossModule(model, loss_fn)
        self.masks = masks
        self.anchor = anchor
        self.fixed = {"model." + n: t for n, t in {**anchor, **buffers}.items() if n not in masks}
        self.batches = batches

    def loss(self, moving: dict[str, Tensor], batch: Any) -> Tensor:
        tensors = dict(self.fixed)
        tensors.update({"model." + n: t for n, t in moving.items()})
        return functional_call(self.module, tensors, (batch,)).reshape(())

    def _hessian(self, batches: list[Any]) -> tuple[dict[str, Tensor], list[tuple[str, Tensor]]]:
        """``w*`` as leaves and the gradient of the mean loss over ``batches`` with its graph kept."""
        w0 = {n: self.anchor[n].detach().clone().requires_grad_(True) for n in self.masks}
        with torch.enable_grad():
            loss = sum(self.loss(w0, b) for b in batches) / len(batches)
            grads = torch.autograd.grad(loss, list(w0.values()), create_graph=True, allow_unused=True)
        return w0, [(n, g) for n, g in zip(w0, grads, strict=True) if g is not None and g.requires_grad]

    def _hvp(self, w0: dict[str, Tensor], pairs: list[tuple[str, Tensor]], v: dict[str, Tensor]) -> dict[str, Tensor]:
        with torch.enable_grad():
            dot = sum((g * v[n]).sum() for n, g in pairs)
            hv = torch.autograd.grad(dot, [w0[n] for n, _ in pairs], retain_graph=True, allow_unused=True)
        return {n: (torch.zeros_like(v[n]) if h is None else h.detach() * self.masks[n])
                for (n, _), h in zip(pairs, hv, strict=True)}

    def _power(self, iters: int, generator: torch.Generator, shift: float) -> tuple[float, dict[str, Tensor]]:
        """Power iteration on ``H - shift * I``: the Rayleigh quotient of the dominant eigenvalue (signed)
        and its unit vector (empty when the loss is at most linear in the moving weights)."""
        w0, pairs = self._hessian(self.batches)
        if not pairs:
            return 0.0, {}
        v = {n: torch.randn(w0[n].shape, generator=generator, device=w0[n].device, dtype=w0[n].dtype)
             * self.masks[n] for n, _ in pairs}
        eig, unit = 0.0, v
        for _ in range(iters):
            norm = math.sqrt(sum(float((x * x).sum()) for x in v.values()))
            if norm == 0.0 or not math.isfinite(norm):
                break
            unit = {n: x / norm for n, x in v.items()}
            hv = {n: h - shift * unit[n] for n, h in self._hvp(w0, pairs, unit).items()}
            eig = float(sum((hv[n] * unit[n]).sum() for n in unit))
            v = hv
        return eig, unit

    def top_eigenvalue(self, iters: int, generator: torch.Generator) -> float:
        """Largest |eigenvalue| of the Hessian ``H`` of the mean loss over the fixed batches at w*.

        Power iteration with Hessian-vector products by double backward (plain autograd: forward
        mode would pull in torch's decomposition tables, seconds of import time).
        """
        return abs(self._power(iters, generator, 0.0)[0])

    def bottom_eigenvalue(self, top: float, iters: int, generator: torch.Generator, z: float = 2.0) -> tuple[float, float]:
        """Smallest eigenvalue of ``H`` and the part of it that is not batch noise.

        Power iteration on ``H - top * I`` (its eigenvalues ``h_i - top`` are all <= 0; the smallest
        ``h_i`` is the largest in magnitude) gives ``h_min`` and its vector ``v``. On noisy data the
        Hessian of a few batches has negative directions that the full loss at its minimum does not
        have; so the curvature along ``v`` is also taken on each batch, and the returned bound is
        ``min(0, h_min + z * se)`` with ``se`` the standard error of those per-batch values: a
        negative bound is a saddle direction beyond the batch-to-batch noise.
        """
        if top <= 0:
            return 0.0, 0.0
        q, v = self._power(iters, generator, top)
        h_min = top + q
        if not v or h_min >= 0:
            return h_min, 0.0
        per_batch = []
        for batch in self.batches:
            w0, pairs = self._hessian([batch])
            hv = self._hvp(w0, pairs, v) if pairs else {}
            per_batch.append(float(sum((hv[n] * v[n]).sum() for n in hv)))
        k = len(per_batch)
        se = 0.0 if k < 2 else float(torch.tensor(per_batch, dtype=torch.float64).std()) / math.sqrt(k)
        return h_min, min(0.0, h_min + z * se)

    def mala(
        self, lrs: Sequence[float], nbeta: float, localization: float, steps: int, generator: torch.Generator
    ) -> tuple[Tensor, Tensor]:
        """Run one SGLD trajectory per lr (vectorized lanes) on the first fixed batch.

        Returns the mean MALA acceptance probability per lane over the second half of the steps,
        and the RMS distance from w* per moving entry at the end, times ``sqrt(localization)``.

        For ``U(w) = nbeta * L(w) + localization/2 * |w - w*|^2`` and the proposal
        ``w' = w - lr/2 * grad U(w) + sqrt(lr) * xi``, the acceptance is
        ``min(1, exp(U(w) - U(w') - |w - w' + lr/2 grad U(w')|^2 / (2 lr) + |xi|^2 / 2))``.
        """
        batch = self.batches[0]
        lanes = len(lrs)
        lr = torch.tensor(list(lrs), dtype=torch.float64)
        w0 = {n: self.anchor[n] for n in self.masks}

        def potential(w: dict[str, Tensor]) -> Tensor:
            prior = sum(((w[n] - w0[n]) ** 2 * self.masks[n]).sum() for n in w)
            return nbeta * self.loss(w, batch) + 0.5 * localization * prior

        step_fn = grad_and_value(potential)
        try:
            batched = vmap(step_fn)
            w = {n: t.unsqueeze(0).expand(lanes, *t.shape).clone() for n, t in w0.items()}
            batched(w)
        except Exception:  # vmap cannot run every model: loop over lanes instead
            def batched(w: dict[str, Tensor]) -> tuple[dict[str, Tensor], Tensor]:
                outs = [step_fn({n: t[i] for n, t in w.items()}) for i in range(lanes)]
                return {n: torch.stack([o[0][n] for o in outs]) for n in w}, torch.stack([o[1] for o in outs])

        w = {n: t.unsqueeze(0).expand(lanes, *t.shape).clone() for n, t in w0.items()}
        g, u = batched(w)
        accept_sum = torch.zeros(lanes, dtype=torch.float64)
        counted = 0
        alive = torch.ones(lanes, dtype=torch.bool)
        for step in range(steps):
            new, xi_sq = {}, torch.zeros(lanes, dtype=torch.float64)
            for n, t in w.items():
                shape = (lanes,) + (1,) * (t.ndim - 1)
                eps = lr.to(t.dtype).view(shape)
                xi = torch.randn(t.shape, generator=generator, device=t.device, dtype=t.dtype) * self.masks[n]
                new[n] = t - eps / 2 * g[n] * self.masks[n] + eps.sqrt() * xi
                xi_sq += (xi.double() ** 2).reshape(lanes, -1).sum(1).cpu()
            g_new, u_new = batched(new)
            back = torch.zeros(lanes, dtype=torch.float64)
            for n in w:
                shape = (lanes,) + (1,) * (w[n].ndim - 1)
                eps = lr.to(w[n].dtype).view(shape)
                diff = (w[n] - new[n] + eps / 2 * g_new[n]) * self.masks[n]
                back += (diff.double() ** 2).reshape(lanes, -1).sum(1).cpu() / lr
            log_alpha = u.double().cpu() - u_new.double().cpu() - back / 2 + xi_sq / 2
            alpha = torch.exp(torch.clamp(log_alpha, max=0.0))
            finite = torch.isfinite(u_new.double().cpu()) & torch.isfinite(log_alpha)
            alive &= finite
            if step >= steps // 2:
                accept_sum += torch.where(alive, alpha, torch.zeros_like(alpha))
                counted += 1
            # lanes that blew up are reset to w* so their numbers stay finite (they score 0)
            keep = alive.to(next(iter(w.values())).device)
            for n in w:
                shape = (lanes,) + (1,) * (w[n].ndim - 1)
                w[n] = torch.where(keep.view(shape), new[n], w0[n].unsqueeze(0).expand_as(new[n]))
                g_new[n] = torch.where(keep.view(shape), g_new[n], torch.zeros_like(g_new[n]))
            g, u = g_new, torch.where(keep, u_new, torch.zeros_like(u_new))
        moving = sum(float(m.sum()) for m in self.masks.values())
        dist_sq = sum(((w[n] - w0[n]) ** 2 * self.masks[n]).reshape(lanes, -1).sum(1) for n in w)
        distance = torch.sqrt(dist_sq.double().cpu() / max(moving, 1.0)) * math.sqrt(max(localization, 0.0))
        distance = torch.where(alive, distance, torch.full_like(distance, float("inf")))
        return accept_sum / max(counted, 1), distance


# ------------------------------------------------------------------------------------- calibration


def _agree(big: LLCResult, small: LLCResult, rel_tol: float, z: float) -> tuple[bool, str]:
    """The bias check: ``|llc(lr) - llc(lr/2)| <= z * stderr of the difference + rel_tol * |llc(lr/2)|``.

    Both estimates use the same seed, so chain c of one and chain c of the other share batches and
    noise draws: the standard error of the difference is taken from the paired per-chain
    differences (never below the unpaired one's half, so two lucky chains cannot make it vanish).
    The SGLD bias grows about linearly in lr, ``b(lr) ~ c lr``, so the gap ``b(lr) - b(lr/2)``
    estimates the bias ``b(lr/2)`` left at the smaller step: that is the step to return.
    """
    gap = abs(big.mean - small.mean)
    both = ~(big.diverged | small.diverged)
    diff = (big.per_chain - small.per_chain)[both].double()
    unpaired = math.hypot(big.stderr, small.stderr)
    paired = float(diff.std() / math.sqrt(len(diff))) if len(diff) > 1 else unpaired
    se = max(paired, unpaired / 2)
    allowed = z * se + rel_tol * abs(small.mean)
    verdict = f"|{big.mean:.4g} - {small.mean:.4g}| = {gap:.3g} vs allowed {allowed:.3g}"
    return gap <= allowed, verdict


@dataclass
class _Context:
    """What every step of one calibration shares: the problem, the probe and the target layout."""

    model: nn.Module
    loss_fn: LossFn
    loader: Iterable[Any]
    restrict: Restriction
    layout: SGLDSettings
    seed: int
    device: torch.device | str | None
    dtype: torch.dtype | None
    progress: Callable[[int, int], None] | None
    probe: _Probe
    generator: torch.Generator
    #: how many more times the burn-in may be doubled
    burnin_extensions: int = 0
    #: the relaxation rule: burn-in >= relaxation_efolds / (lr * (localization + softest)), at most
    #: max_burnin; softest = nbeta * (the negative curvature beyond batch noise; 0 at a minimum)
    relaxation_efolds: float = RELAXATION_EFOLDS
    max_burnin: int = MAX_BURNIN_STEPS
    softest: float = 0.0

    def relaxation(self, lr: float, localization: float) -> float:
        """Steps per e-fold of the slowest direction: ``1 / (lr * (localization + softest))``; 0 without
        a localization (no scale to relax to: the rule is off)."""
        if localization <= 0:
            return 0.0
        return _relaxation_steps(lr, localization + self.softest)

    def _span(self, lr: float, localization: float) -> float:
        """``relaxation_efolds`` relaxation times (0 when the rule is off, even for an infinite time)."""
        return 0.0 if self.relaxation_efolds == 0 else self.relaxation_efolds * self.relaxation(lr, localization)

    def burnin_for(self, lr: float, localization: float) -> float:
        """The burn-in of a trial at ``lr``: the layout's, raised to ``relaxation_efolds`` times
        :meth:`relaxation` (inf when the localization does not outweigh a negative curvature)."""
        relax = self._span(lr, localization)
        return max(self.layout.num_burnin_steps, math.ceil(relax) if math.isfinite(relax) else math.inf)

    def layout_for(self, lr: float, localization: float) -> SGLDSettings:
        """The layout of a trial at ``lr``: :meth:`burnin_for`, and draws spread (``num_steps_bw_draws``
        raised) over at least ``relaxation_efolds`` relaxation times, so that a chain's mean
        averages over the flat directions instead of taking one snapshot of them."""
        layout = self.layout.replace(lr=lr, localization=localization,
                                     num_burnin_steps=int(min(self.burnin_for(lr, localization), self.max_burnin)))
        span = min(self._span(lr, localization), self.max_burnin)
        if layout.num_draws < 2 or span <= 1:
            return layout
        thin = math.ceil((span - 1) / (layout.num_draws - 1))
        return layout.replace(num_steps_bw_draws=max(layout.num_steps_bw_draws, thin))


@dataclass
class _Attempt:
    """The lr search at one localization: the grid, the screen and the trial estimates."""

    localization: float
    lrs: list[float]
    acceptance: Tensor
    distance: Tensor
    estimates: dict[int, LLCResult] = field(default_factory=dict)
    reasons: dict[int, str] = field(default_factory=dict)
    chosen: int | None = None
    why: str = ""
    #: trial estimates run and their chain-steps (re-runs with a longer burn-in included)
    runs: int = 0
    steps: int = 0
    #: lr index -> why its burn-in was extended
    extended: dict[int, str] = field(default_factory=dict)
    #: lr index -> the layout its (last) trial estimate ran with
    layouts: dict[int, SGLDSettings] = field(default_factory=dict)

    #: True when a trial could not run because the localization barely (or does not) outweigh a
    #: negative curvature: the chains would slide off w* along it
    unheld: bool = False

    @property
    def slid_off(self) -> bool:
        """True when some trial says w* is not a minimum of the sampled loss (a slope or a saddle), or
        could not run because the localization does not hold a direction of negative curvature."""
        return self.unheld or any(set(r.flags) & _NOT_A_MINIMUM_FLAGS for r in self.estimates.values())

    def trials(self, prefix: str = "", chosen: int | None = None) -> tuple[Trial, ...]:
        out = []
        for k, lr in enumerate(self.lrs):
            reason = "" if k == chosen else prefix + self.reasons.get(k, "not reached")
            if k in self.extended and k != chosen:
                reason += f"; burn-in extended after {self.extended[k]} burn-in steps"
            out.append(Trial(lr, float(self.acceptance[k]), float(self.distance[k]), self.estimates.get(k), reason,
                             self.layouts[k].num_burnin_steps if k in self.layouts else None))
        return tuple(out)


def _prepare(
    model: nn.Module, loss_fn: LossFn, loader: Iterable[Any], nbeta: float | None, restrict: Restriction,
    seed: int, device: torch.device | str | None, dtype: torch.dtype | None,
) -> tuple[_Probe, float, torch.Generator]:
    """Snapshot w*, resolve the restriction, take four fixed batches and settle nbeta."""
    named = dict(model.named_parameters())
    if not named:
        raise ValueError("the model has no parameters to sample")
    dev = torch.device(device) if device is not None else next(iter(named.values())).device
    generator = torch.Generator(device=dev)
    generator.manual_seed(seed)
    snapshot = take_snapshot(model, dev, dtype)
    anchor, buffers = snapshot.params, snapshot.buffers
    # the same validation (and error messages) as the estimates that follow
    masks = {n: m.to(dev, anchor[n].dtype) for n, m in resolve_restriction(restrict, anchor, "restrict").items()}
    batches = []
    with forked_global_rng(loader, seed, cuda_devices(dev)):
        for batch in iterate_once(loader, torch.Generator().manual_seed(seed)):
            batches.append(to_device(batch, dev, dtype))
            if len(batches) == 4:
                break
    if not batches:
        raise ValueError("the loader yielded no batches; pass a loader with at least one batch")
    if nbeta is None:
        size = batch_size_of(loader, batches[0])
        if size is None:
            raise ValueError("cannot infer the batch size for the default nbeta; pass nbeta= explicitly")
        nbeta = default_nbeta(size)
    return _Probe(model, loss_fn, masks, anchor, buffers, batches), float(nbeta), generator


def _choose_localization(curvature: float, nbeta: float) -> float:
    """``LOCALIZATION_FRACTION * nbeta * h``: a pull to w* far weaker than the stiffest direction."""
    localization = LOCALIZATION_FRACTION * nbeta * curvature
    if not localization > 0:
        raise ValueError(
            "the loss has no curvature at these weights (top Hessian eigenvalue "
            f"{curvature:.3g}), so the localization cannot be set from it; pass localization="
        )
    return localization


def _candidate_lrs(stiffness: float, lrs: Sequence[float] | None, num_lrs: int) -> list[float]:
    """The caller's ``lrs``, else ``num_lrs`` values halving down from the stability limit ``2 / stiffness``."""
    if lrs is None:
        top = 2.0 / stiffness
        lrs = [top / LR_FACTOR**k for k in range(num_lrs)]
    return sorted((float(x) for x in lrs), reverse=True)


def _first_to_estimate(attempt: _Attempt) -> int:
    """The largest lr the MALA screen lets through; the rejected ones get their reason."""
    acceptance = attempt.acceptance
    first = next((i for i in range(len(attempt.lrs)) if float(acceptance[i]) >= MIN_ACCEPTANCE), None)
    if first is None:
        # no lr is clean on the probe (high-dimensional models accept less at any lr): start
        # the estimates at the best-accepted one and let the flags and the bias check decide
        return int(torch.argmax(torch.nan_to_num(acceptance, nan=-1.0)))
    for i in range(first):
        attempt.reasons[i] = f"MALA acceptance {float(acceptance[i]):.2f} < {MIN_ACCEPTANCE}: step too large"
    return first


def _relaxation_steps(lr: float, pull: float) -> float:
    """``1 / (lr * pull)``: e-folding time in steps of the variance of a direction held by ``pull``
    (the localization plus ``nbeta`` times the direction's curvature); inf when nothing holds it."""
    return math.inf if pull <= 0 else 1.0 / (lr * pull)


def _too_slow(ctx: _Context, attempt: _Attempt, i: int) -> str:
    """Why the trial at ``lrs[i]`` cannot be run ("" when it can): its relaxation burn-in exceeds the cap."""
    need = ctx.burnin_for(attempt.lrs[i], attempt.localization)
    if need <= ctx.max_burnin:
        return ""
    if ctx.softest < 0:
        attempt.unheld = True
    return (f"its slowest directions need {need:.4g} burn-in steps ({ctx.relaxation_efolds:g} / (lr * (localization "
            f"{attempt.localization:.4g} + negative curvature {ctx.softest:.4g}))) > max_burnin_steps {ctx.max_burnin}")


def _estimate(ctx: _Context, attempt: _Attempt, i: int) -> LLCResult:
    """The trial estimate at ``attempt.lrs[i]`` with the current layout and the burn-in of
    :meth:`_Context.burnin_for` (every trial shares the seed)."""
    if i not in attempt.estimates:
        lr = attempt.lrs[i]
        layout = ctx.layout_for(lr, attempt.localization)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # divergence is evidence here, not news
            attempt.estimates[i] = estimate_llc(
                ctx.model, ctx.loss_fn, ctx.loader, settings=layout,
                restrict=ctx.restrict, seed=ctx.seed, device=ctx.device, dtype=ctx.dtype, progress=ctx.progress,
            )
        attempt.runs += 1
        attempt.steps += layout.total_steps
        attempt.layouts[i] = layout
    return attempt.estimates[i]


def _extend_burnin(ctx: _Context, attempt: _Attempt, i: int, max_estimates: int) -> LLCResult:
    """Re-run the trial at ``lrs[i]`` with the burn-in doubled while it only lacks mixing (at most
    ``ctx.burnin_extensions`` times in all): a step half as large needs twice the steps to level
    off, and the bias check needs both estimates levelled off. Later trials keep the longer burn-in."""
    res = attempt.estimates[i]
    while (res.flags and set(res.flags) <= _MIXING_FLAGS and ctx.burnin_extensions > 0
           and attempt.runs < max_estimates):
        used = attempt.layouts[i].num_burnin_steps
        burnin = max(2 * used, attempt.layouts[i].total_steps)
        if burnin > ctx.max_burnin:
            break
        ctx.burnin_extensions -= 1
        note = f"{', '.join(res.flags)} with {used}"
        attempt.extended[i] = attempt.extended[i] + "; " + note if i in attempt.extended else note
        ctx.layout = ctx.layout.replace(num_burnin_steps=burnin)
        del attempt.estimates[i]
        res = _estimate(ctx, attempt, i)
    return res


def _search_lr(ctx: _Context, attempt: _Attempt, rel_tol: float, z: float, max_estimates: int) -> None:
    """Walk the grid from the first screened lr down and fill ``attempt.chosen`` / ``.why`` / ``.reasons``.

    At each healthy ``lr`` the estimate at ``lr/2`` is the bias check; when they agree, ``lr/2`` is
    chosen: the gap estimates the bias left at ``lr/2`` and the tolerance bounds it. The larger
    step would carry about twice that bias. Each trial runs with its own relaxation burn-in
    (:meth:`_Context.burnin_for`), so the pair is compared at equal relaxation, not at equal step
    counts (where the smaller step would read low for having relaxed less). Without a passed bias
    check nothing is chosen: the result is the fallback, not ok.
    """
    reasons = attempt.reasons
    n = len(attempt.lrs)
    i = _first_to_estimate(attempt)
    while i < n and attempt.runs < max_estimates:
        slow = _too_slow(ctx, attempt, i)
        if slow:
            reasons[i] = slow
            return  # smaller steps relax more slowly still
        _estimate(ctx, attempt, i)
        res = _extend_burnin(ctx, attempt, i, max_estimates)
        if res.flags:
            reasons[i] = "flags: " + ", ".join(res.flags)
            if not set(res.flags) & _STEP_FLAGS:
                # not mixed after its relaxation burn-in: a smaller lr covers even less of the flat
                # directions within the same draws; negative or below the initial loss: w* is not
                # a minimum, and no lr changes that
                return
            i += 1
            continue
        if i + 1 >= n or attempt.runs >= max_estimates:
            reasons[i] = f"no lr/{LR_FACTOR:g} left for the bias check"
            return
        slow = _too_slow(ctx, attempt, i + 1)
        if slow:
            reasons[i + 1] = slow
            reasons[i] = f"no bias check possible: lr/{LR_FACTOR:g} cannot relax within max_burnin_steps"
            return
        _estimate(ctx, attempt, i + 1)
        half = _extend_burnin(ctx, attempt, i + 1, max_estimates)
        if half.flags:
            stalled = set(half.flags) <= _MIXING_FLAGS
            reasons[i + 1] = "flags: " + ", ".join(half.flags)
            reasons[i] = f"lr/{LR_FACTOR:g} is flagged ({', '.join(half.flags)}): no bias check possible"
            if stalled:
                return  # smaller lrs mix even less within the draws
            i += 2
            continue
        agree, verdict = _agree(res, half, rel_tol, z)
        if agree:
            attempt.chosen = i + 1
            attempt.why = (
                f"healthy and agrees with {LR_FACTOR:g}x its lr, so its bias is at most about the gap: {verdict}"
            )
            reasons[i] = f"agrees with lr/{LR_FACTOR:g}, but carries about {LR_FACTOR:g}x its bias"
            return
        reasons[i] = f"bias check against lr/{LR_FACTOR:g} failed: {verdict}"
        i += 1


def _fallback(attempt: _Attempt) -> tuple[int, str]:
    """The healthiest trial (fewest flags, then the smaller lr: less bias) and the reason."""
    tried = [k for k, r in attempt.estimates.items() if not r.all_diverged]
    if tried:
        chosen = min(tried, key=lambda k: (len(attempt.estimates[k].flags), -k))
    else:
        chosen = len(attempt.lrs) - 1
    why = f"no lr passed every check; using the healthiest trial ({attempt.reasons.get(chosen, 'untested')})"
    return chosen, why


def calibrate_llc(
    model: nn.Module,
    loss_fn: LossFn,
    loader: Iterable[Any],
    *,
    nbeta: float | None = None,
    localization: float | None = None,
    lrs: Sequence[float] | None = None,
    num_chains: int | None = None,
    num_draws: int | None = None,
    num_burnin_steps: int | None = None,
    num_steps_bw_draws: int | None = None,
    settings: SGLDSettings | None = None,
    restrict: Restriction = None,
    rel_tol: float = 0.01,
    z: float = 1.0,
    num_lrs: int = 10,
    probe_steps: int = 50,
    max_estimates: int = 6,
    max_localization_boosts: int = 2,
    max_burnin_extensions: int = 2,
    relaxation_efolds: float = RELAXATION_EFOLDS,
    max_burnin_steps: int = MAX_BURNIN_STEPS,
    seed: int = 0,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = torch.float32,
    progress: Callable[[int, int], None] | None = None,
) -> CalibrationResult:
    """Choose ``lr``, ``localization`` and ``nbeta`` for :func:`estimate_llc` at the model's weights.

    The steps: settle ``nbeta`` and probe the curvature -> choose the localization -> the
    candidate lrs -> the MALA screen -> trial estimates with the bias check -> decide (or raise the
    localization and search again when the chains slid off w*).

    Args:
        model, loss_fn, loader, restrict, device, dtype: as for :func:`estimate_llc` (the same
            objects the estimates will use; the model is left untouched).
        nbeta: fixed if given; else ``B / log B`` for the loader's batch size B.
        localization: fixed if given; else ``LOCALIZATION_FRACTION * nbeta * h`` with ``h`` the top
            Hessian eigenvalue of the batch loss at ``w*``.
        lrs: the candidate step sizes (any order; tried largest first). None: ``num_lrs`` values
            spaced by a factor ``LR_FACTOR`` down from the stability limit ``2 / (nbeta h + localization)``.
        num_chains, num_draws, num_burnin_steps, num_steps_bw_draws: the layout of each trial
            estimate (default 4 chains, 200 draws, 100 burn-in steps, 1 step between draws); pass
            the layout the real estimates will use, so "levels off within the burn-in" is checked
            for that layout.
        settings: an :class:`SGLDSettings` giving the layout, ``nbeta`` and a fixed
            ``localization`` in one object (its ``lr`` is what is calibrated, so it is ignored);
            keyword arguments that are not None override its fields.
        rel_tol, z: the bias check compares ``lr`` with ``lr/2``: they agree when
            ``|llc(lr) - llc(lr/2)| <= z * stderr + rel_tol * |llc(lr/2)|``, and then ``lr/2`` is
            chosen (its bias is about the gap, so this bounds it by about one standard error of the
            trials; the 1% floor keeps many chains from chasing a bias no estimate could resolve). A
            false disagreement only costs one more halving: every trial is relaxed, so a smaller step
            is not read low for having moved less (docs/calibration.md).
        probe_steps: length of the MALA-acceptance probe trajectory (one fixed batch).
        max_estimates: at most this many trial estimates are run (per localization tried).
        max_localization_boosts: when the localization was chosen automatically and no lr passed
            because the chains slid off w* (``negative`` / ``below_init``: a saddle or a slope, as
            on the plateaus of saddle-to-saddle dynamics), the search is repeated with the
            localization raised by ``LOCALIZATION_BOOST``, at most this many times. The trials of
            every attempt are kept in the evidence.
        max_burnin_extensions: when a trial estimate is flagged only for mixing (``drifting`` /
            ``high_rhat``) the burn-in is doubled and it is run again, at most this many times in
            all; the recommendation then carries the longer burn-in.
        relaxation_efolds, max_burnin_steps: every trial's burn-in is at least ``relaxation_efolds /
            (lr * localization)`` steps, the relaxation time of the directions only the
            localization holds (none when ``localization`` is 0), and the recommendation carries
            the chosen trial's burn-in. A step that would need more than ``max_burnin_steps`` is
            not run; when that leaves ``lr/2`` of a healthy ``lr`` unchecked the result is not ok.
        seed: every trial uses this seed (common random numbers make the bias check sharper).
        progress: optional ``progress(done, total)`` in trial estimates.

    Returns:
        A :class:`CalibrationResult`; ``res.as_kwargs()`` goes straight into ``estimate_llc``.
    """
    start = time.perf_counter()
    layout = _layout(settings, nbeta, localization, num_chains, num_draws, num_burnin_steps, num_steps_bw_draws)
    fixed_localization = layout.localization if (localization is not None or settings is not None) else None
    if layout.num_chains < 2:
        raise ValueError(f"calibration needs num_chains >= 2 to judge chain agreement; got {layout.num_chains}")
    if not 0 < rel_tol < 1:
        raise ValueError(f"rel_tol must be in (0, 1), e.g. 0.1; got {rel_tol}")
    if lrs is not None and (not lrs or any(not (x > 0 and math.isfinite(x)) for x in lrs)):
        raise ValueError(f"lrs must be a non-empty list of positive step sizes; got {lrs!r}")
    if max_burnin_extensions < 0 or max_localization_boosts < 0:
        raise ValueError("max_burnin_extensions and max_localization_boosts must be >= 0")
    if not (relaxation_efolds >= 0 and math.isfinite(relaxation_efolds)):
        raise ValueError(f"relaxation_efolds must be a finite number >= 0, e.g. {RELAXATION_EFOLDS}; "
                         f"got {relaxation_efolds}")
    if max_burnin_steps < layout.num_burnin_steps:
        raise ValueError(f"max_burnin_steps ({max_burnin_steps}) is below the layout's num_burnin_steps "
                         f"({layout.num_burnin_steps}); raise it or shorten the burn-in")

    with preserved_modes(model, eval_mode=True):
        probe, nbeta, generator = _prepare(model, loss_fn, loader, layout.nbeta, restrict, seed, device, dtype)
        curvature = probe.top_eigenvalue(20, generator)
        # a saddle's negative curvature slows (or undoes) the localization's pull: the relaxation
        # rule must see it
        bottom, held_against = probe.bottom_eigenvalue(curvature, 20, generator)
        ctx = _Context(model, loss_fn, loader, restrict, layout.replace(nbeta=nbeta), seed, device, dtype,
                       progress, probe, generator, burnin_extensions=max_burnin_extensions,
                       relaxation_efolds=relaxation_efolds, max_burnin=max_burnin_steps,
                       softest=nbeta * held_against)
        loc = fixed_localization if fixed_localization is not None else _choose_localization(curvature, nbeta)
        attempts: list[_Attempt] = []
        for boost in range(max_localization_boosts + 1):
            attempt = _screened_attempt(ctx, loc, curvature, lrs, num_lrs, probe_steps)
            attempts.append(attempt)
            _search_lr(ctx, attempt, rel_tol, z, max_estimates)
            if attempt.chosen is not None or fixed_localization is not None or not attempt.slid_off:
                break
            if boost < max_localization_boosts:
                # w* is not a minimum along some direction: a stronger localization holds the chains
                # at w*, which is what a local coefficient at a saddle or on a slope can measure
                loc *= LOCALIZATION_BOOST
    return _decide(ctx, attempts, curvature, bottom, probe_steps, start)


def _layout(
    settings: SGLDSettings | None, nbeta: float | None, localization: float | None, num_chains: int | None,
    num_draws: int | None, num_burnin_steps: int | None, num_steps_bw_draws: int | None,
) -> SGLDSettings:
    """The trial layout as SGLDSettings (lr is a placeholder; localization 0 stands for automatic)."""
    if localization is not None and localization < 0:
        raise ValueError(f"localization must be >= 0; got {localization}")
    if settings is None:
        settings = SGLDSettings(lr=1.0, localization=0.0, **DEFAULT_LAYOUT)
    return SGLDSettings.from_kwargs(
        settings, localization=localization, nbeta=nbeta, num_chains=num_chains, num_draws=num_draws,
        num_burnin_steps=num_burnin_steps, num_steps_bw_draws=num_steps_bw_draws,
    )


def _screened_attempt(
    ctx: _Context, localization: float, curvature: float, lrs: Sequence[float] | None, num_lrs: int,
    probe_steps: int,
) -> _Attempt:
    """The candidate lrs at this localization and their MALA screen."""
    nbeta = float(ctx.layout.nbeta)
    grid = _candidate_lrs(nbeta * curvature + localization, lrs, num_lrs)
    acceptance, distance = ctx.probe.mala(grid, nbeta, localization, probe_steps, ctx.generator)
    return _Attempt(localization, grid, acceptance, distance)


def _decide(
    ctx: _Context, attempts: list[_Attempt], curvature: float, bottom: float, probe_steps: int, start: float
) -> CalibrationResult:
    """The chosen lr of the last attempt (or its fallback, with a warning) and all the evidence."""
    last = attempts[-1]
    ok = last.chosen is not None
    if ok:
        chosen, why = last.chosen, last.why
    else:
        chosen, why = _fallback(last)
        warnings.warn(
            f"calibrate_llc: {why}. The estimate may be biased: inspect CalibrationResult.summary(), "
            "pass a wider `lrs` grid, more num_burnin_steps, or set lr/localization by hand "
            "(see docs/calibration.md).",
            RuntimeWarning,
            stacklevel=3,
        )
    if chosen in last.extended:
        why += f" (burn-in extended after {last.extended[chosen]} burn-in steps)"
    trials: tuple[Trial, ...] = ()
    for attempt in attempts[:-1]:
        trials += attempt.trials(prefix=f"localization {attempt.localization:.4g}: ")
    trials += last.trials(chosen=chosen)
    layout = last.layouts.get(chosen, ctx.layout_for(last.lrs[chosen], last.localization))
    # chain-steps spent: the probe lanes and HVPs, then every trial estimate
    spent = sum(probe_steps * len(a.lrs) // layout.num_chains + 80 + a.steps for a in attempts)
    result = CalibrationResult(
        lr=last.lrs[chosen], localization=float(last.localization), nbeta=float(layout.nbeta),
        num_draws=layout.num_draws, num_burnin_steps=layout.num_burnin_steps,
        num_steps_bw_draws=layout.num_steps_bw_draws, ok=ok, reason=why, curvature=curvature, trials=trials,
        estimate=last.estimates.get(chosen), num_steps=spent, seconds=time.perf_counter() - start,
        batch_streams=layout.batch_streams, batch_order=layout.batch_order,
        relaxation_steps=ctx.relaxation(last.lrs[chosen], last.localization) or math.inf,
        min_curvature=bottom,
    )
    logger.info("%s", result.summary())
    return result
