"""The result of an LLC estimate and the chain diagnostics computed from its traces.

Everything here is a pure function of the per-chain loss traces, so results computed on
different processes (DDP ranks) can be merged by concatenating traces and summarizing again.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

#: R-hat above this means the chains have not mixed into one distribution.
RHAT_LIMIT = 1.1
#: More than this fraction of draws below the initial loss: w* is not a local minimum.
BELOW_INIT_LIMIT = 0.5
#: |z| above this for the late-vs-early trace means the chains are still drifting.
DRIFT_Z_LIMIT = 4.0


@dataclass(frozen=True)
class LLCResult:
    """An LLC estimate with its chains and diagnostics.

    Per chain ``c``: ``llc_c = nbeta * (mean_d loss_trace[c, d] - mean_d init_loss_trace[c, d])``.
    ``init_loss_trace[c, d]`` is the loss at the snapshot w* on the very batch that produced
    ``loss_trace[c, d]``, so batch-to-batch noise cancels in the difference.

    Attributes:
        mean: mean of ``per_chain`` over the chains that did not diverge (nan if none survive).
        std: standard deviation (ddof=1) of ``per_chain`` over surviving chains; 0 for one chain.
        stderr: ``std / sqrt(number of surviving chains)``: the standard error of ``mean``.
        per_chain: tensor ``[num_chains]``; nan for diverged chains.
        loss_trace: tensor ``[num_chains, num_draws]`` of batch losses at the draws.
        init_loss: L(w*): mean of ``init_loss_trace`` over surviving chains, i.e. the loss at the
            snapshot averaged over exactly the batches the draws were evaluated on.
        init_loss_trace: tensor ``[num_chains, num_draws]``.
        nbeta, lr, localization: the sampler settings used.
        diverged: bool tensor ``[num_chains]``; True for chains excluded from the estimate.
        rhat: split R-hat of the per-draw LLC values across surviving chains (nan if < 2 draws).
        ess: bulk effective sample size of the per-draw LLC values, summed over chains.
        frac_below_init: fraction of surviving draws whose loss is below the paired init loss.
        drift_z: z-score of (mean of last quarter - mean of the quarter before) of the chain-averaged
            per-draw LLC; large values mean the chains had not levelled off.
        flags: names of the health problems found (see :meth:`health_flags`).
    """

    mean: float
    std: float
    stderr: float
    per_chain: Tensor
    loss_trace: Tensor
    init_loss: float
    init_loss_trace: Tensor
    nbeta: float
    lr: float
    localization: float
    diverged: Tensor
    rhat: float
    ess: float
    frac_below_init: float
    drift_z: float
    flags: tuple[str, ...] = field(default=())

    @property
    def num_chains(self) -> int:
        return int(self.loss_trace.shape[0])

    @property
    def num_draws(self) -> int:
        return int(self.loss_trace.shape[1])

    @property
    def all_diverged(self) -> bool:
        return bool(self.diverged.all())

    @property
    def negative(self) -> bool:
        """True when the estimate is below zero: w* is not a local minimum of the sampled loss."""
        return bool(self.mean < 0)

    @property
    def healthy(self) -> bool:
        """True when no health flag is raised."""
        return not self.flags

    def to_dict(self) -> dict[str, Any]:
        """Scalars only (for logging); tensors are left out."""
        return {
            "mean": self.mean,
            "std": self.std,
            "stderr": self.stderr,
            "init_loss": self.init_loss,
            "nbeta": self.nbeta,
            "lr": self.lr,
            "localization": self.localization,
            "num_chains": self.num_chains,
            "num_draws": self.num_draws,
            "num_diverged": int(self.diverged.sum()),
            "rhat": self.rhat,
            "ess": self.ess,
            "frac_below_init": self.frac_below_init,
            "drift_z": self.drift_z,
            "flags": list(self.flags),
        }


def split_rhat(draws: Tensor) -> float:
    """Split R-hat (Gelman et al., BDA3 eq. 11.4) of ``draws[chain, draw]``.

    Each chain is cut in two halves so that a drifting chain also inflates R-hat. Returns nan
    when there are fewer than 4 draws.
    """
    draws = draws.double()
    num_draws = draws.shape[1]
    if num_draws < 4 or draws.shape[0] < 1:
        return float("nan")
    half = num_draws // 2
    halves = torch.cat([draws[:, :half], draws[:, num_draws - half :]], dim=0)
    n = halves.shape[1]
    chain_means = halves.mean(dim=1)
    within = halves.var(dim=1, unbiased=True).mean()
    between = n * chain_means.var(unbiased=True)
    if within <= 0:
        return float("nan") if between > 0 else 1.0
    var_plus = (n - 1) / n * within + between / n
    return float(torch.sqrt(var_plus / within))


def _autocorrelation(x: Tensor) -> Tensor:
    """Autocorrelation of each row of ``x`` via FFT (lags 0 .. n-1)."""
    n = x.shape[-1]
    centered = x - x.mean(dim=-1, keepdim=True)
    size = 1 << (2 * n - 1).bit_length()
    spectrum = torch.fft.rfft(centered, n=size)
    acov = torch.fft.irfft(spectrum * spectrum.conj(), n=size)[..., :n]
    variance = acov[..., :1]
    return torch.where(variance > 0, acov / variance.clamp_min(1e-300), torch.zeros_like(acov))


def effective_sample_size(draws: Tensor) -> float:
    """Effective sample size of ``draws[chain, draw]``, summed over chains.

    Per chain, the integrated autocorrelation time ``tau = 1 + 2 sum_k rho_k`` is summed over
    Geyer's initial positive sequence of pair sums; ESS is ``num_draws / tau``.
    """
    draws = draws.double()
    num_chains, num_draws = draws.shape
    if num_draws < 4:
        return float(num_chains * num_draws)
    rho = _autocorrelation(draws)
    total = 0.0
    for c in range(num_chains):
        pairs = rho[c, : num_draws - num_draws % 2].reshape(-1, 2).sum(dim=1)
        positive = pairs > 0
        cut = int(positive.logical_not().nonzero()[0]) if not bool(positive.all()) else pairs.numel()
        # Geyer's initial monotone sequence: pair sums must not increase.
        monotone = torch.cummin(pairs[:cut], dim=0).values if cut > 0 else pairs[:0]
        tau = -1.0 + 2.0 * float(monotone.sum())
        tau = max(tau, 1.0 / math.log10(max(num_draws, 10)))
        total += num_draws / tau
    return float(total)


def _drift_z(per_draw_llc: Tensor) -> float:
    """z-score of the last quarter's mean against the quarter before it (chain-averaged trace)."""
    num_draws = per_draw_llc.shape[1]
    quarter = num_draws // 4
    if quarter < 2:
        return 0.0
    trace = per_draw_llc.double().mean(dim=0)
    late = trace[-quarter:]
    early = trace[-2 * quarter : -quarter]
    # Autocorrelation inflates the naive standard error; use ESS-corrected variances.
    ess_late = max(effective_sample_size(late[None]), 1.0)
    ess_early = max(effective_sample_size(early[None]), 1.0)
    var = late.var(unbiased=True) / ess_late + early.var(unbiased=True) / ess_early
    if var <= 0:
        return 0.0
    return float((late.mean() - early.mean()) / var.sqrt())


def health_flags(result: LLCResult) -> tuple[str, ...]:
    """Names of the problems that make an estimate untrustworthy.

    - ``"all_diverged"``: every chain diverged; there is no estimate.
    - ``"diverged"``: some chains diverged and were excluded (lr too large or localization too small).
    - ``"negative"``: the LLC is below zero; w* is not a local minimum of the sampled loss.
    - ``"below_init"``: most draws have a lower loss than w*; the snapshot sits on a slope or saddle.
    - ``"drifting"``: the chains have not levelled off by the last draws (burn-in too short, lr too small).
    - ``"high_rhat"``: split R-hat above 1.1; chains disagree or have not mixed.
    """
    if result.all_diverged:
        return ("all_diverged",)
    flags: list[str] = []
    if bool(result.diverged.any()):
        flags.append("diverged")
    if result.mean < 0:
        flags.append("negative")
    if result.frac_below_init > BELOW_INIT_LIMIT:
        flags.append("below_init")
    if abs(result.drift_z) > DRIFT_Z_LIMIT:
        flags.append("drifting")
    if not math.isnan(result.rhat) and result.rhat > RHAT_LIMIT:
        flags.append("high_rhat")
    return tuple(flags)


def summarize_chains(
    loss_trace: Tensor,
    init_loss_trace: Tensor,
    nbeta: float,
    *,
    lr: float,
    localization: float,
    diverged: Tensor | None = None,
    warn: bool = True,
) -> LLCResult:
    """Turn per-chain loss traces into an :class:`LLCResult`.

    Args:
        loss_trace: ``[num_chains, num_draws]`` batch losses at the draws.
        init_loss_trace: ``[num_chains, num_draws]`` losses at w* on the same batches.
        nbeta: the inverse temperature times the sample size used by the sampler.
        lr, localization: recorded on the result.
        diverged: optional ``[num_chains]`` mask of chains the sampler already found diverging.
            Chains with any non-finite loss are added to it.
        warn: emit a :class:`RuntimeWarning` when chains diverged.
    """
    loss_trace = loss_trace.detach().to("cpu", torch.float64)
    init_loss_trace = init_loss_trace.detach().to("cpu", torch.float64)
    if loss_trace.ndim != 2 or loss_trace.shape != init_loss_trace.shape:
        raise ValueError(
            "loss_trace and init_loss_trace must both have shape [num_chains, num_draws]; got "
            f"{tuple(loss_trace.shape)} and {tuple(init_loss_trace.shape)}"
        )
    num_chains = loss_trace.shape[0]
    bad = ~torch.isfinite(loss_trace).all(dim=1) | ~torch.isfinite(init_loss_trace).all(dim=1)
    if diverged is not None:
        bad = bad | diverged.detach().to("cpu", torch.bool)
    if loss_trace.shape[1] == 0:
        raise ValueError("num_draws must be at least 1")
    per_draw = nbeta * (loss_trace - init_loss_trace)
    per_chain = per_draw.mean(dim=1)
    per_chain = torch.where(bad, torch.full_like(per_chain, float("nan")), per_chain)
    good = ~bad
    num_good = int(good.sum())
    if warn and num_good < num_chains:
        if num_good == 0:
            warnings.warn(
                f"all {num_chains} SGLD chains diverged (non-finite or runaway loss): there is no LLC "
                "estimate. Lower `lr` or raise `localization` (see docs/troubleshooting.md).",
                RuntimeWarning,
                stacklevel=3,
            )
        else:
            warnings.warn(
                f"{num_chains - num_good} of {num_chains} SGLD chains diverged and were excluded from "
                "the estimate. Lower `lr` or raise `localization` (see docs/troubleshooting.md).",
                RuntimeWarning,
                stacklevel=3,
            )
    if num_good == 0:
        nan = float("nan")
        result = LLCResult(
            mean=nan, std=nan, stderr=nan, per_chain=per_chain.float(), loss_trace=loss_trace.float(),
            init_loss=nan, init_loss_trace=init_loss_trace.float(), nbeta=float(nbeta), lr=float(lr),
            localization=float(localization), diverged=bad, rhat=nan, ess=0.0, frac_below_init=nan,
            drift_z=nan,
        )
        return _with_flags(result)
    good_draws = per_draw[good]
    good_chains = per_chain[good]
    mean = float(good_chains.mean())
    std = float(good_chains.std(unbiased=True)) if num_good > 1 else 0.0
    result = LLCResult(
        mean=mean,
        std=std,
        stderr=std / math.sqrt(num_good),
        per_chain=per_chain.float(),
        loss_trace=loss_trace.float(),
        init_loss=float(init_loss_trace[good].mean()),
        init_loss_trace=init_loss_trace.float(),
        nbeta=float(nbeta),
        lr=float(lr),
        localization=float(localization),
        diverged=bad,
        rhat=split_rhat(good_draws),
        ess=effective_sample_size(good_draws),
        frac_below_init=float((loss_trace[good] < init_loss_trace[good]).double().mean()),
        drift_z=_drift_z(good_draws),
    )
    return _with_flags(result)


def _with_flags(result: LLCResult) -> LLCResult:
    from dataclasses import replace

    return replace(result, flags=health_flags(result))
