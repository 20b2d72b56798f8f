"""The result of an LLC estimate and the chain diagnostics computed from its traces.

Everything here is a pure function of the per-chain loss traces, so results computed on
different processes (DDP ranks) can be merged by concatenating traces and summarizing again.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

#: Rank-normalised split R-hat above this means the chains have not mixed into one distribution.
#: Vehtari et al. (2021) recommend 1.01, which needs thousands of effective draws: at the usual
#: 4 chains x 200 draws healthy SGLD chains have a bulk ESS near 100 and a median R-hat of 1.02-1.03,
#: with a 99th percentile of 1.10 (docs/calibration.md), so 1.01 would flag nearly every estimate.
RHAT_LIMIT = 1.1
#: More than this fraction of draws below the initial loss: w* is not a local minimum.
BELOW_INIT_LIMIT = 0.5
#: |z| above this for the late-vs-early trace means the chains are still drifting.
DRIFT_Z_LIMIT = 4.0
#: Flag of an estimate whose draws were mostly taken before the directions that only the
#: localization holds could relax (a check of the settings, raised by the estimator; see
#: :func:`unrelaxed_fraction`).
UNRELAXED = "unrelaxed"
#: ``unrelaxed`` is raised when :func:`unrelaxed_fraction` exceeds this. Measured on the noisy
#: suite's networks (RRR 4-4-4 r2, DLN 3-4-4-3 r2, 13 runs; docs/validation.md): windows of draws
#: with a fraction of 0.94 / 0.86 / 0.79 / 0.60 / 0.49 / 0.31 read -14% / -13% / -9% / -5% / -4% /
#: -2.5% on average against theory (worst run -31% / -22% / -16% / -10% / -9% / -8%); relaxed, -0.2%.
UNRELAXED_LIMIT = 0.7


@dataclass(frozen=True)
class LLCResult:
    """An LLC estimate with its chains and diagnostics.

    Per chain ``c``: ``llc_c = nbeta * (mean_d loss_trace[c, d] - mean_d init_loss_trace[c, d])``.
    ``init_loss_trace[c, d]`` is the loss at the snapshot w* on the very batch that produced
    ``loss_trace[c, d]``, so batch-to-batch noise cancels in the difference.

    Attributes:
        mean: mean of ``per_chain`` over the chains that did not diverge (nan if none survive).
        std: standard deviation (ddof=1) of ``per_chain`` over surviving chains; 0 for one chain.
        stderr: Monte-Carlo standard error of ``mean``: ``sd(all draws) / sqrt(ESS_mean)``
            (:func:`mean_stderr`); measured coverage in docs/calibration.md.
        per_chain: tensor ``[num_chains]``; nan for diverged chains.
        loss_trace: tensor ``[num_chains, num_draws]`` of batch losses at the draws.
        init_loss: L(w*): mean of ``init_loss_trace`` over surviving chains, i.e. the loss at the
            snapshot averaged over exactly the batches the draws were evaluated on.
        init_loss_trace: tensor ``[num_chains, num_draws]``.
        nbeta, lr, localization: the sampler settings used.
        diverged: bool tensor ``[num_chains]``; True for chains excluded from the estimate.
        rhat: rank-normalised split R-hat (:func:`split_rhat`, Vehtari et al. 2021) of the per-draw
            LLC values of the surviving chains (nan if < 4 draws).
        ess: multi-chain bulk effective sample size (:func:`effective_sample_size`, Vehtari et al.
            2021) of the per-draw LLC values of the surviving chains: chains that disagree lower it.
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


def split_chains(draws: Tensor) -> Tensor:
    """``draws[chain, draw]`` with every chain cut into its first and last ``num_draws // 2`` draws.

    ``[C, N] -> [2C, N // 2]`` (the middle draw of an odd-length chain is dropped), so that a chain
    that drifts looks like two chains that disagree (Vehtari et al. 2021, section 4.1).
    """
    half = draws.shape[1] // 2
    return torch.cat([draws[:, :half], draws[:, draws.shape[1] - half :]], dim=0)


def rank_normalize(draws: Tensor) -> Tensor:
    """Normal scores of the pooled ranks: ``z = Phi^-1((r - 3/8) / (S + 1/4))``.

    ``r`` is the rank of a draw among all ``S`` draws of all chains (ties get their average rank);
    this is the rank normalisation of Vehtari, Gelman, Simpson, Carpenter & Buerkner (2021),
    "Rank-normalization, folding, and localization: An improved R-hat for assessing convergence
    of MCMC", Bayesian Analysis 16(2), eq. 14 (Blom's offset 3/8). It makes R-hat and ESS
    invariant to monotone transforms and finite for heavy-tailed draws.
    """
    flat = draws.reshape(-1).double()
    size = flat.numel()
    order = torch.argsort(flat, stable=True)
    sorted_vals = flat[order]
    _, counts = torch.unique_consecutive(sorted_vals, return_counts=True)
    ends = torch.cumsum(counts, 0).double()  # 1-based rank of the last member of each tie group
    average = ends - (counts.double() - 1) / 2
    ranks = torch.empty(size, dtype=torch.float64, device=flat.device)
    ranks[order] = torch.repeat_interleave(average, counts)
    z = torch.special.ndtri((ranks - 0.375) / (size + 0.25))
    return z.reshape(draws.shape)


def _plain_rhat(draws: Tensor) -> float:
    """``sqrt(var_plus / W)`` with ``var_plus = (N - 1)/N W + B/N`` (BDA3 eq. 11.3-11.4) over the rows."""
    n = draws.shape[1]
    within = draws.var(dim=1, unbiased=True).mean()
    between = n * draws.mean(dim=1).var(unbiased=True)
    if not within > 0:
        return float("nan") if between > 0 else 1.0
    var_plus = (n - 1) / n * within + between / n
    return float(torch.sqrt(var_plus / within))


def split_rhat(draws: Tensor) -> float:
    """Rank-normalised split R-hat of ``draws[chain, draw]`` (Vehtari et al. 2021, section 4.2-4.3).

    ``max(R-hat(rank_normalize(split)), R-hat(rank_normalize(|split - median|)))``: the bulk
    R-hat of the rank-normalised split chains, and the "folded" tail R-hat that catches chains
    with equal locations but different scales. Vehtari, Gelman, Simpson, Carpenter & Buerkner
    (2021), "Rank-normalization, folding, and localization: An improved R-hat for assessing
    convergence of MCMC", Bayesian Analysis 16(2). Returns nan for fewer than 4 draws or 1 chain
    (with one chain the split halves still compare start and end, so it is computed from 1 chain
    too when there are >= 4 draws).
    """
    draws = draws.double()
    if draws.shape[1] < 4 or draws.shape[0] < 1:
        return float("nan")
    split = split_chains(draws)
    bulk = _plain_rhat(rank_normalize(split))
    # the median of an even count is the mean of the two middle values (torch.median takes the lower)
    flat = split.reshape(-1).sort().values
    median = (flat[(flat.numel() - 1) // 2] + flat[flat.numel() // 2]) / 2
    folded = (split - median).abs()
    tail = _plain_rhat(rank_normalize(folded))
    return max(bulk, tail)


def _autocovariance(x: Tensor) -> Tensor:
    """Biased autocovariance (divided by ``n``) of each row of ``x`` via FFT, lags 0 .. n-1."""
    n = x.shape[-1]
    centered = x - x.mean(dim=-1, keepdim=True)
    size = 1 << (2 * n - 1).bit_length()
    spectrum = torch.fft.rfft(centered, n=size)
    return torch.fft.irfft(spectrum * spectrum.conj(), n=size)[..., :n] / n


def _multichain_ess(draws: Tensor) -> float:
    """Multi-chain ESS ``C N / tau`` of ``draws[chain, draw]`` (Vehtari et al. 2021, section 3.2).

    ``rho_t = 1 - (W - mean_c acov_c(t)) / var_plus`` combines the chains' autocovariances with the
    between-chain variance in ``var_plus``, so chains that disagree shrink the ESS. ``tau`` is
    ``-1 + 2 sum rho_t`` over Geyer's initial positive sequence of pair sums, made monotone.
    """
    num_chains, n = draws.shape
    if n < 2 or float(draws.max() - draws.min()) < 1e-15:
        return float(num_chains * n)  # constant draws: every draw is exactly the mean
    acov = _autocovariance(draws)
    mean_acov = acov.mean(dim=0)
    within = float(mean_acov[0]) * n / (n - 1)
    var_plus = within * (n - 1) / n
    if num_chains > 1:
        var_plus += float(draws.mean(dim=1).var(unbiased=True))
    rho_all = (1.0 - (within - mean_acov) / var_plus).tolist()
    rho = [0.0] * n
    rho[0] = 1.0
    even, odd = 1.0, rho_all[1]
    rho[1] = odd
    t = 1
    # Geyer's initial positive sequence: keep pairs (rho_{t+1}, rho_{t+2}) while their sum is > 0
    while t < n - 3 and even + odd > 0:
        even, odd = rho_all[t + 1], rho_all[t + 2]
        if even + odd >= 0:
            rho[t + 1], rho[t + 2] = even, odd
        t += 2
    max_t = t - 2
    if even > 0:  # the first even lag of the dropped pair still carries positive correlation
        rho[max_t + 1] = even
    # Geyer's initial monotone sequence: pair sums may not increase
    t = 1
    while t <= max_t - 2:
        if rho[t + 1] + rho[t + 2] > rho[t - 1] + rho[t]:
            rho[t + 1] = rho[t + 2] = (rho[t - 1] + rho[t]) / 2
        t += 2
    tau = -1.0 + 2.0 * sum(rho[: max_t + 1]) + sum(rho[max_t + 1 : max_t + 2])
    tau = max(tau, 1.0 / math.log10(num_chains * n))
    return num_chains * n / tau


def effective_sample_size(draws: Tensor, method: str = "bulk") -> float:
    """Multi-chain effective sample size of ``draws[chain, draw]`` (Vehtari et al. 2021).

    - ``"bulk"``: the ESS of the rank-normalised split chains (section 4.3 of Vehtari, Gelman,
      Simpson, Carpenter & Buerkner (2021), "Rank-normalization, folding, and localization: An
      improved R-hat for assessing convergence of MCMC", Bayesian Analysis 16(2)): how many
      independent draws the bulk of the distribution is worth. One chain shifted away from the
      others makes it small, unlike a sum of per-chain values.
    - ``"mean"``: the same on the split chains without rank normalisation, the ESS of the mean
      (``sd / sqrt(ESS)`` is its Monte-Carlo standard error).

    Returns ``num_chains * num_draws`` for fewer than 4 draws (nothing to estimate from).
    """
    draws = draws.double()
    num_chains, num_draws = draws.shape
    if num_draws < 4:
        return float(num_chains * num_draws)
    split = split_chains(draws)
    if method == "bulk":
        split = rank_normalize(split)
    elif method != "mean":
        raise ValueError(f"method must be 'bulk' or 'mean'; got {method!r}")
    return _multichain_ess(split)


def mean_stderr(draws: Tensor) -> float:
    """Monte-Carlo standard error of the mean of ``draws[chain, draw]``: ``sd / sqrt(ESS_mean)``.

    ``sd`` is the standard deviation of all draws pooled and ``ESS_mean`` the multi-chain ESS of
    the split chains (:func:`effective_sample_size` with ``method="mean"``; Vehtari et al. 2021),
    which counts the autocorrelation within chains and the disagreement between them. Unlike
    ``std(chain means) / sqrt(num_chains)``, it does not rest on a handful of chain means (three
    degrees of freedom for four chains). With fewer than 4 draws it falls back to that.
    """
    draws = draws.double()
    num_chains, num_draws = draws.shape
    if num_draws < 4:
        if num_chains < 2:
            return float("nan")
        return float(draws.mean(dim=1).std(unbiased=True) / math.sqrt(num_chains))
    if draws.numel() < 2:
        return float("nan")
    return float(draws.std(unbiased=True)) / math.sqrt(effective_sample_size(draws, "mean"))


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
    ess_late = max(_multichain_ess(late[None]), 1.0)
    ess_early = max(_multichain_ess(early[None]), 1.0)
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
    - ``"high_rhat"``: rank-normalised split R-hat above ``RHAT_LIMIT``; chains disagree or have not mixed.

    The estimator adds three flags that the traces alone cannot show (see docs/estimator.md):
    ``"minibatch_noise"`` (the predicted stationary inflation from minibatch gradient noise is a
    sizeable fraction of the estimate: lower ``lr``), ``"unrelaxed"`` (the draws came before the
    directions only the localization holds could relax, :func:`unrelaxed_fraction`: more burn-in,
    or a larger ``lr * localization``) and ``"nonfinite_init"`` (the loss at w* itself is NaN or inf).
    """
    return _flags(result.diverged, result.mean, result.frac_below_init, result.drift_z, result.rhat)


def unrelaxed_fraction(
    lr: float, localization: float, num_burnin_steps: int, num_draws: int, num_steps_bw_draws: int = 1
) -> float:
    """How far from relaxed the draws of a chain started at ``w*`` are, from the settings alone.

    In a direction the loss leaves flat only the localization pulls, and from ``w*`` the variance of
    ``w <- w - lr/2 * localization * (w - w*) + sqrt(lr) N(0, 1)`` reaches
    ``(1 - exp(-lr * localization * t)) / localization`` after ``t`` steps: its missing fraction is
    ``exp(-lr * localization * t)``. This returns that fraction averaged over the draws,

        mean_d exp(-lr * localization * (num_burnin_steps + d * num_steps_bw_draws)),  d = 0 .. num_draws - 1

    1 when no draw had time to relax, 0 when all did; 0 without a localization (there is no scale
    to relax to). It bounds the deficit from above: the loss of a singular model reaches its level
    before the flat directions reach their full spread, and a direction the loss also holds relaxes
    faster (measured: :data:`UNRELAXED_LIMIT`); on a regular model at ``nbeta h >> localization``
    the deficit does not show in the estimate at all.
    """
    rate = lr * localization
    if not rate > 0 or num_draws < 1:
        return 0.0
    decay = math.exp(-rate * num_steps_bw_draws)
    start = math.exp(-rate * num_burnin_steps)
    if decay >= 1.0:
        return start
    return start * (1.0 - decay**num_draws) / (num_draws * (1.0 - decay))


def relaxed_burnin(
    lr: float, localization: float, num_draws: int, num_steps_bw_draws: int = 1, limit: float = UNRELAXED_LIMIT
) -> int:
    """The smallest ``num_burnin_steps`` whose :func:`unrelaxed_fraction` is at most ``limit``.

    The fraction is ``exp(-lr * localization * num_burnin_steps)`` times its value without burn-in,
    so the burn-in is ``ln(fraction without burn-in / limit) / (lr * localization)``, or 0.
    """
    rate = lr * localization
    unburnt = unrelaxed_fraction(lr, localization, 0, num_draws, num_steps_bw_draws)
    if not rate > 0 or unburnt <= limit:
        return 0
    return math.ceil(math.log(unburnt / limit) / rate)


def _flags(diverged: Tensor, mean: float, frac_below_init: float, drift_z: float, rhat: float) -> tuple[str, ...]:
    if bool(diverged.all()):
        return ("all_diverged",)
    flags: list[str] = []
    if bool(diverged.any()):
        flags.append("diverged")
    if mean < 0:
        flags.append("negative")
    if frac_below_init > BELOW_INIT_LIMIT:
        flags.append("below_init")
    if abs(drift_z) > DRIFT_Z_LIMIT:
        flags.append("drifting")
    if not math.isnan(rhat) and rhat > RHAT_LIMIT:
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
    extra_flags: Sequence[str] = (),
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
        extra_flags: flags found outside the traces (the estimator's ``minibatch_noise`` and
            ``nonfinite_init``), kept after the trace flags; re-summarizing merged traces (DDP)
            passes the union of the parts' extra flags so none is lost.
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
        stats = dict(mean=nan, std=nan, stderr=nan, init_loss=nan, rhat=nan, ess=0.0, frac_below_init=nan,
                     drift_z=nan)
    else:
        good_draws = per_draw[good]
        good_chains = per_chain[good]
        std = float(good_chains.std(unbiased=True)) if num_good > 1 else 0.0
        stats = dict(
            mean=float(good_chains.mean()),
            std=std,
            stderr=mean_stderr(good_draws),
            init_loss=float(init_loss_trace[good].mean()),
            rhat=split_rhat(good_draws),
            ess=effective_sample_size(good_draws),
            frac_below_init=float((loss_trace[good] < init_loss_trace[good]).double().mean()),
            drift_z=_drift_z(good_draws),
        )
    flags = _flags(bad, stats["mean"], stats["frac_below_init"], stats["drift_z"], stats["rhat"])
    flags = (*flags, *(f for f in dict.fromkeys(extra_flags) if f not in flags))
    return LLCResult(
        per_chain=per_chain.float(), loss_trace=loss_trace.float(), init_loss_trace=init_loss_trace.float(),
        nbeta=float(nbeta), lr=float(lr), localization=float(localization), diverged=bad, flags=flags, **stats,
    )
