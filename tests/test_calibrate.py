"""calibrate_llc: the choice it makes, the evidence it records, and accuracy against theory."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from noisy_cases import dln_case, linear_case, make_loader, rrr_case
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from devinterp_lightning import theory
from devinterp_lightning.sampling.calibrate import (
    LOCALIZATION_BOOST,
    RELAXATION_EFOLDS,
    CalibrationResult,
    _agree,
    calibrate_llc,
)
from devinterp_lightning.sampling.estimator import estimate_llc
from devinterp_lightning.sampling.result import LLCResult
from devinterp_lightning.sampling.settings import SGLDSettings


def half_sse(model: nn.Module, batch) -> torch.Tensor:
    """Gaussian negative log-likelihood with unit noise, up to a constant: 1/2 |y - f(x)|^2."""
    x, y = batch
    return 0.5 * ((model(x) - y) ** 2).sum(-1).mean()


def teacher_dln(widths: list[int], rank: int, num_samples: int = 4096, seed: int = 0):
    """A bias-free deep linear network whose every layer has rank ``rank``, and its noise-free data.

    W_s = Q_{s+1} D_s Q_s^T with Q_j a random orthonormal ``rank``-frame of width j: the product has
    rank ``rank`` and so does every layer, the most singular kind of point of the true set (where the
    local learning coefficient equals Aoyagi's global one).
    """
    g = torch.Generator().manual_seed(seed)
    frames = [torch.linalg.qr(torch.randn(h, h, generator=g))[0][:, :rank] for h in widths]
    layers = []
    for s in range(len(widths) - 1):
        layer = nn.Linear(widths[s], widths[s + 1], bias=False)
        with torch.no_grad():
            layer.weight.copy_(frames[s + 1] @ torch.diag(0.5 + torch.rand(rank, generator=g)) @ frames[s].T)
        layers.append(layer)
    model = nn.Sequential(*layers)
    x = torch.randn(num_samples, widths[0], generator=g)
    with torch.no_grad():
        y = model(x)
    return model, TensorDataset(x, y)


def regression(offset: float = 0.0, seed: int = 0):
    """Linear regression (regular, d = 12, lambda = 6) at the truth, or ``offset`` away from it."""
    model, data = teacher_dln([4, 3], rank=3, num_samples=1024, seed=seed)
    with torch.no_grad():
        model[0].weight.add_(offset)
    return model, DataLoader(data, batch_size=128, shuffle=True)


def suite_cases(seed: int) -> dict[str, tuple]:
    """The validation suite, ``{name: (model, loss_fn, loader, lambda)}``: the noise-free regular
    model and deep linear networks at their teacher, and the noisy cases (label noise sigma = 1,
    w* the exact least-squares / reduced-rank minimiser, shuffled epochs of batch size 256)."""
    cases = {}
    model, loader = regression(seed=seed)
    cases["regular 4->3"] = (model, half_sse, loader, 6.0)
    for widths, rank in DLN_CASES:
        model, data = teacher_dln(widths, rank, seed=seed)
        name = "DLN " + "-".join(map(str, widths)) + f" r{rank}"
        cases[name] = (model, half_sse, DataLoader(data, batch_size=256, shuffle=True),
                       theory.deep_linear_network(widths, rank))
    for case in noisy_suite(seed):
        cases[case.name + " noisy"] = (case.model, case.loss_fn, make_loader(case, 256, "epoch", seed=seed), case.llc)
    return cases


FAST = dict(num_chains=4, num_draws=200, num_burnin_steps=100)
#: for tests of the bookkeeping, not of the choice (fallback warnings are expected and ignored)
TINY = dict(num_chains=2, num_draws=30, num_burnin_steps=10)


@pytest.fixture(scope="module")
def calibrated():
    """One full calibration of the regular model, shared by the tests that inspect it."""
    model, loader = regression()
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    rng = torch.get_rng_state()
    cal = calibrate_llc(model, half_sse, loader, **FAST)
    untouched = (
        model.training
        and torch.equal(torch.get_rng_state(), rng)
        and all(torch.equal(p, before[n]) and p.grad is None for n, p in model.named_parameters())
    )
    return model, loader, cal, untouched


def test_recommends_healthy_settings_and_records_evidence(calibrated) -> None:
    _, _, cal, _ = calibrated
    assert isinstance(cal, CalibrationResult) and cal.ok, cal.summary()
    assert cal.nbeta == pytest.approx(128 / math.log(128))
    assert cal.localization == pytest.approx(0.01 * cal.nbeta * cal.curvature)
    # x ~ N(0, I): the Hessian of 1/2 |W x - y|^2 is I (x) E[x x^T] ~ I, top eigenvalue ~1
    assert 0.7 < cal.curvature < 1.6
    lrs = [t.lr for t in cal.trials]
    assert lrs == sorted(lrs, reverse=True)
    assert lrs[0] == pytest.approx(2 / (cal.nbeta * cal.curvature + cal.localization))
    chosen = [t for t in cal.trials if not t.rejected]
    assert len(chosen) == 1 and chosen[0].lr == cal.lr
    assert chosen[0].estimate is cal.estimate and cal.estimate.healthy
    # the bias check passed for the pair (2 lr, lr) and the smaller step of the pair is returned
    above = next(t for t in cal.trials if t.lr == pytest.approx(2 * cal.lr))
    assert above.rejected.startswith("agrees with lr/2") and above.estimate.healthy, cal.summary()
    assert "agrees with 2x its lr" in cal.reason
    # every lr larger than the chosen one carries a reason; the stability limit itself is rejected
    for t in cal.trials:
        if t.lr > cal.lr:
            assert t.rejected and t.rejected != "not reached", cal.summary()
    assert cal.trials[0].acceptance < 0.9
    assert cal.num_steps > 0 and cal.seconds > 0
    assert "CHOSEN" in cal.summary()
    assert {"lr", "localization", "nbeta", "ok"} <= {k.split("/")[-1] for k in cal.hparams()}


def test_model_is_left_untouched(calibrated) -> None:
    assert calibrated[3]


def test_public_signature_has_no_private_arguments() -> None:
    import inspect

    params = inspect.signature(calibrate_llc).parameters
    assert not [p for p in params if p.startswith("_")]
    assert "settings" in params


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_settings_object_gives_layout_nbeta_and_a_fixed_localization() -> None:
    model, loader = regression()
    layout = SGLDSettings(lr=1.0, localization=5.0, nbeta=200.0, num_chains=2, num_draws=30, num_burnin_steps=10)
    cal = calibrate_llc(model, half_sse, loader, settings=layout, max_estimates=1)
    assert (cal.nbeta, cal.localization, cal.num_draws) == (200.0, 5.0, 30)
    # the caller's 10 burn-in steps, raised to the relaxation time of the flat directions
    assert cal.num_burnin_steps == max(10, math.ceil(RELAXATION_EFOLDS / (cal.lr * 5.0)))
    assert cal.estimate.num_chains == 2 and cal.lr != 1.0  # the settings' lr is what is calibrated
    # keywords override the settings' fields, as for estimate_llc
    cal = calibrate_llc(model, half_sse, loader, settings=layout, num_draws=20, max_estimates=1)
    assert cal.num_draws == 20 and cal.estimate.num_draws == 20
    as_settings = cal.settings(num_chains=3)
    assert isinstance(as_settings, SGLDSettings) and as_settings.num_chains == 3 and as_settings.lr == cal.lr
    assert as_settings.as_kwargs() == {**cal.as_kwargs(), "num_chains": 3}


@pytest.mark.slow
def test_as_kwargs_splat_into_estimate_llc(calibrated) -> None:
    model, loader, cal, _ = calibrated
    kwargs = cal.as_kwargs()
    assert set(kwargs) == {"lr", "localization", "nbeta", "num_draws", "num_burnin_steps", "num_steps_bw_draws",
                           "batch_streams", "batch_order"}
    assert (kwargs["batch_streams"], kwargs["batch_order"]) == ("shared", "loader")  # the trials' layout
    res = estimate_llc(model, half_sse, loader, num_chains=4, seed=3, **kwargs)
    assert res.lr == cal.lr and res.localization == cal.localization and res.nbeta == cal.nbeta
    # regular model at the truth: lambda = d/2 = 6, times nbeta h / (nbeta h + localization) ~ 0.99
    # for the localization the calibration picks.
    assert res.mean == pytest.approx(6.0, rel=0.15)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_given_nbeta_and_localization_are_kept() -> None:
    model, loader = regression()
    cal = calibrate_llc(model, half_sse, loader, nbeta=200.0, localization=5.0, max_estimates=1, **TINY)
    assert cal.nbeta == 200.0 and cal.localization == 5.0
    assert cal.trials[0].lr == pytest.approx(2 / (200.0 * cal.curvature + 5.0))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_too_large_steps_are_rejected_with_a_reason() -> None:
    model, loader = regression()
    cal = calibrate_llc(model, half_sse, loader, lrs=[1.0, 0.3, 1e-2, 5e-3], relaxation_efolds=0.0, **TINY)
    big = {t.lr: t for t in cal.trials}
    assert "MALA acceptance" in big[1.0].rejected and big[1.0].estimate is None
    assert "MALA acceptance" in big[0.3].rejected
    assert cal.lr <= 1e-2


def test_diverging_lr_is_rejected_by_its_flags() -> None:
    # with the probe screen disabled (acceptance threshold met by no lr: the grid starts at the
    # best accepted one), a step far beyond the stability limit diverges and is flagged
    model, loader = regression()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        cal = calibrate_llc(model, half_sse, loader, lrs=[0.5], **TINY)
    (trial,) = cal.trials
    assert not cal.ok
    assert trial.estimate is not None and "diverged" in trial.estimate.flags[0]


def test_not_at_a_minimum_falls_back_with_a_warning() -> None:
    # 0.3 away from the truth the chains run downhill: negative llc / draws below the initial loss
    model, loader = regression(offset=0.3)
    with pytest.warns(RuntimeWarning, match="no lr passed every check"):
        cal = calibrate_llc(model, half_sse, loader, **TINY)
    assert not cal.ok
    # no smaller lr can cure it (one trial per localization), and neither can a localization
    # raised twice by LOCALIZATION_BOOST: a slope is not a saddle
    tried = [t for t in cal.trials if t.estimate is not None]
    assert len(tried) == 3
    assert [t.estimate.localization for t in tried] == pytest.approx(
        [tried[0].estimate.localization * LOCALIZATION_BOOST**k for k in range(3)]
    )
    for t in tried:
        assert {"negative", "below_init"} <= set(t.estimate.flags), cal.summary()
    assert sum(t.rejected.startswith("localization ") for t in cal.trials) == 2 * len(cal.trials) // 3
    assert tried[-1].lr == cal.lr and "negative" in cal.reason


def test_a_saddle_is_calibrated_by_raising_the_localization() -> None:
    """K(w) = w0^2 - 0.01 w1^2 is a saddle. The curvature-based localization (0.01 * nbeta * 2 = 2)
    only just cancels the w1 curvature (nbeta * -0.02 = -2): w1 is a random walk that never relaxes
    (measured: the estimate at the chosen lr and loc 2 is +0.25..+0.43 for 100-600 burn-in steps and
    -6.5, flagged negative, after 3000). The smallest Hessian eigenvalue (-0.02) makes the relaxation
    time infinite, no trial runs, and the localization is raised to 20, which holds the chains
    (nbeta E[K] = 100 * (1/220 - 0.01/18) = 0.40 in the stationary law)."""

    class Saddle(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(2))

    def potential(model, batch):
        return model.w[0] ** 2 - 0.01 * model.w[1] ** 2 + 0.0 * batch.sum()

    loader = [torch.zeros(1)]
    cal = calibrate_llc(Saddle(), potential, loader, nbeta=100.0, num_chains=4, num_draws=200,
                        num_burnin_steps=100, seed=0)
    assert cal.ok, cal.summary()
    assert cal.localization == pytest.approx(20.0, rel=1e-3)
    assert cal.min_curvature == pytest.approx(-0.02, abs=1e-4)
    assert cal.relaxation_steps == pytest.approx(1 / (cal.lr * (20.0 - 100 * 0.02)), rel=1e-3)
    first_attempt = [t for t in cal.trials if t.rejected.startswith("localization 2:")]
    assert first_attempt and all(t.estimate is None for t in first_attempt)
    assert any("slowest directions need" in t.rejected for t in first_attempt), cal.summary()
    assert cal.estimate.mean > 0


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_batch_noise_in_the_hessian_is_not_taken_for_a_saddle() -> None:
    """Noisy RRR at its exact reduced-rank minimiser: the Hessian of the four probe batches has a
    negative eigenvalue (-0.027 at seed 0; nbeta times it, -1.23, outweighs the localization 0.97),
    which the full loss at its minimum does not have. Against the batch-to-batch spread of the
    curvature along it, it is noise: the relaxation time grows 1.23x (measured) instead of becoming
    infinite, and the localization is not boosted."""
    case = rrr_case(4, 2, 4, 2, n=2048, seed=0)
    loader = make_loader(case, 256, "epoch", seed=0)
    cal = calibrate_llc(case.model, case.loss_fn, loader, max_estimates=1, seed=0, **TINY)
    assert cal.min_curvature * cal.nbeta < -cal.localization, cal.summary()
    assert cal.localization == pytest.approx(0.01 * cal.nbeta * cal.curvature)
    assert 1 / (cal.lr * cal.localization) <= cal.relaxation_steps < 1.5 / (cal.lr * cal.localization)


def test_not_ok_when_the_pair_disagrees(monkeypatch) -> None:
    """lr * (nbeta h + localization) = 1.2 and 0.6 on the regular model: 8.34 and 7.15 (+39% and +19%
    over lambda = 6). With the MALA screen off, the bias check alone must refuse: it fails and
    nothing smaller is left, so the result is not ok."""
    import devinterp_lightning.sampling.calibrate as calibrate_module

    monkeypatch.setattr(calibrate_module, "MIN_ACCEPTANCE", 0.0)
    model, loader = regression()
    stiff = 128 / math.log(128) * 1.01 * 1.14  # nbeta * (h + 0.01 h), h = 1.14 for this fixture
    with pytest.warns(RuntimeWarning, match="no lr passed every check"):
        cal = calibrate_llc(model, half_sse, loader, lrs=[1.2 / stiff, 0.6 / stiff], **FAST)
    assert not cal.ok, cal.summary()
    assert "bias check against lr/2 failed" in cal.trials[0].rejected


def test_burnin_and_draws_cover_the_relaxation_time(calibrated) -> None:
    """Every trial, and the recommendation, burns in for RELAXATION_EFOLDS / (lr * localization)
    steps and spreads its draws over as many: the directions only the localization holds relax on
    that time scale, and the caller's 100 + 200 steps are far shorter."""
    _, _, cal, _ = calibrated
    relax = 1 / (cal.lr * cal.localization)
    assert cal.relaxation_steps == pytest.approx(relax)
    assert cal.num_burnin_steps == math.ceil(RELAXATION_EFOLDS * relax) > 100
    assert cal.num_draws == 200  # the caller's draw count, thinned to cover the span
    assert (cal.num_draws - 1) * cal.num_steps_bw_draws + 1 >= RELAXATION_EFOLDS * relax
    assert (cal.as_kwargs()["num_burnin_steps"], cal.as_kwargs()["num_steps_bw_draws"]) == (
        cal.num_burnin_steps, cal.num_steps_bw_draws)
    assert f"burn-in {cal.num_burnin_steps} steps" in cal.summary()
    for t in cal.trials:
        if t.estimate is not None:
            assert t.burnin == math.ceil(RELAXATION_EFOLDS / (t.lr * cal.localization)), cal.summary()


def _trial(per_chain: list[float], stderr: float) -> LLCResult:
    values = torch.tensor(per_chain, dtype=torch.float64)
    chains = len(per_chain)
    return LLCResult(mean=float(values.mean()), std=float(values.std()), stderr=stderr, per_chain=values,
                     loss_trace=torch.zeros(chains, 10), init_loss=0.0, init_loss_trace=torch.zeros(chains, 10),
                     nbeta=10.0, lr=1e-3, localization=1.0, diverged=torch.zeros(chains, dtype=torch.bool),
                     rhat=1.0, ess=100.0, frac_below_init=0.0, drift_z=0.0)


def test_the_bias_check_floor_is_one_percent_by_default() -> None:
    """A pair 3% apart whose chains agree to 0.1%: the step bias is resolved, so the default (1% + one
    standard error) rejects it, while the former 5% floor let it through (docs/calibration.md, "How much
    step bias the 5% floor left")."""
    import inspect

    default = inspect.signature(calibrate_llc).parameters["rel_tol"].default
    big, small = _trial([10.31, 10.29, 10.30, 10.30], 0.01), _trial([10.01, 9.99, 10.0, 10.0], 0.01)
    assert default == 0.01
    assert not _agree(big, small, default, 1.0)[0]
    assert _agree(big, small, 0.05, 1.0)[0]
    assert _agree(_trial([10.06, 10.04, 10.05, 10.05], 0.01), small, default, 1.0)[0]  # 0.5% apart


def test_not_ok_when_the_half_step_cannot_relax_within_the_cap(calibrated) -> None:
    """The same calibration with max_burnin_steps one below what the chosen step needed: its double
    still runs, but the bias check against it cannot, so the result is not ok, with a warning (the
    step that was run is not accepted on its own)."""
    model, loader, full, _ = calibrated
    cap = full.num_burnin_steps - 1
    with pytest.warns(RuntimeWarning, match="no lr passed every check"):
        cal = calibrate_llc(model, half_sse, loader, max_burnin_steps=cap, **FAST)
    assert not cal.ok, cal.summary()
    run = [t for t in cal.trials if t.estimate is not None]  # the descent down to the chosen step's double
    assert run[-1].lr == pytest.approx(2 * full.lr) and all(t.burnin <= cap for t in run), cal.summary()
    assert "cannot relax within max_burnin_steps" in cal.reason  # the fallback
    assert any(f"> max_burnin_steps {cap}" in t.rejected for t in cal.trials)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_burnin_is_doubled_when_a_trial_only_lacks_mixing() -> None:
    # the relaxation rule off (relaxation_efolds=0), so that the caller's 20 steps are the burn-in
    model, loader = regression()
    lr = 0.1 / (128 / math.log(128) * 1.01 * 1.14)
    kwargs = dict(lrs=[lr, lr / 2, lr / 4], num_chains=4, num_draws=200, num_burnin_steps=20, seed=0,
                  relaxation_efolds=0.0)
    cal = calibrate_llc(model, half_sse, loader, **kwargs)
    # lr * localization = 9.4e-4: 200 draws after 20 burn-in steps are flagged "unrelaxed" (the
    # settings check), and still after 220: 20 -> 220 (one full trial length) -> 440
    first = cal.trials[0]
    assert first.burnin == 440 and first.estimate.num_draws == 200, cal.summary()
    assert "burn-in extended after unrelaxed with 20; unrelaxed with 220" in first.rejected + cal.reason
    assert "unrelaxed" not in first.estimate.flags
    # the recommendation carries the layout its own trial ran with
    chosen = next(t for t in cal.trials if t.lr == cal.lr)
    assert cal.num_burnin_steps == chosen.burnin == cal.as_kwargs()["num_burnin_steps"]
    fixed = calibrate_llc(model, half_sse, loader, max_burnin_extensions=0, **kwargs)
    assert [t.burnin for t in fixed.trials if t.estimate is not None] == [20], fixed.summary()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_deterministic_for_a_seed() -> None:
    model, loader = regression()
    kwargs = dict(seed=5, lrs=[1e-2, 5e-3], relaxation_efolds=0.0, **TINY)  # short trials: the rule off
    a = calibrate_llc(model, half_sse, loader, **kwargs)
    b = calibrate_llc(model, half_sse, loader, **kwargs)
    assert a.lr == b.lr and a.estimate.mean == b.estimate.mean
    assert [t.acceptance for t in a.trials] == [t.acceptance for t in b.trials]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(num_chains=1), "num_chains >= 2"),
        (dict(lrs=[]), "non-empty list"),
        (dict(lrs=[1e-3, -1.0]), "positive"),
        (dict(rel_tol=0.0), "rel_tol"),
        (dict(localization=-1.0), "localization must be >= 0"),
        (dict(relaxation_efolds=-1.0), "relaxation_efolds"),
        (dict(max_burnin_steps=50), "max_burnin_steps"),
    ],
)
def test_bad_arguments_raise_early(kwargs, match: str) -> None:
    model, loader = regression()
    with pytest.raises(ValueError, match=match):
        calibrate_llc(model, half_sse, loader, **kwargs)


def test_flat_point_without_localization_asks_for_one() -> None:
    # a depth-2 linear network at the origin: the loss is quartic there, the Hessian is zero
    model, data = teacher_dln([3, 2, 3], rank=0, num_samples=256)
    loader = DataLoader(data, batch_size=64)
    with pytest.raises(ValueError, match="pass localization="):
        calibrate_llc(model, half_sse, loader, **FAST)


DLN_CASES = [([4, 3, 5], 1), ([5, 4, 4, 3], 2), ([6, 5, 4, 6], 1)]


def noisy_suite(seed: int) -> list:
    return [
        linear_case(4, 3, n=2048, seed=seed),
        rrr_case(4, 2, 4, 2, n=2048, seed=seed),
        dln_case([3, 4, 4, 3], 2, n=2048, seed=seed),
    ]


# Acceptance (#11): calibrate, then one estimate with the recommended settings (no hand-set SGLD
# setting): the caller's layout 300 burn-in + 300 draws, raised by the relaxation rule; 4 chains,
# estimate seed 100 + seed. The test runs seed 0 of each case: within 15%, or flagged. Figures for
# seeds 0-2 of every case: docs/calibration.md (benchmarks/bench_calibration.py).
#
# Known miss, kept visible: DLN 6-5-4-6 seed 0 calibrates to lr * stiff = 0.031 (localization 0.284,
# burn-in 6464, draws every 22 steps) and the estimate reads +20.9%, well mixed (R-hat 1.011, chains
# 12.9 .. 13.6) and unflagged. Relaxed 8-chain runs at this localization read +21.8% / +15.6% /
# +12.0% at lr * stiff 0.0625 / 0.031 / 0.0156, and +2.5% / -7.3% at 3x the localization: what is
# left is the localized posterior at nbeta = 46 (plus a step bias of a few percent that the 4-chain
# bias check cannot resolve), not the burn-in. 8-chain runs at 0.5/1/2/3/4x the localization read
# +17.1/+17.1/+3.8/-4.9/-14.9%; every DLN of the suite falls with the localization like this, with no
# plateau, so a localization consistency check would flag good runs too and is not used
# (docs/calibration.md, "The localization"). Nor does a larger nbeta: at 4x / 10x this seed reads
# -2.0% / +9.5% with the automatic localization but seed 1 -29% / -40%, and +39% / +41% with the
# localization held (docs/calibration.md, "Raising nbeta"). Strict: the test fails as soon as this case passes.
KNOWN_MISS = {"DLN 6-5-4-6 r1": "well-mixed estimate of the localized posterior reads +20.9% (see comment)"}
SUITE_NAMES = [pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=KNOWN_MISS[n])) if n in KNOWN_MISS
               else n for n in suite_cases(0)]


@pytest.mark.slow
@pytest.mark.parametrize("name", SUITE_NAMES)
def test_calibrated_estimate_matches_theory(name: str) -> None:
    model, loss_fn, loader, expected = suite_cases(0)[name]
    cal = calibrate_llc(model, loss_fn, loader, num_draws=300, num_burnin_steps=300, seed=0)
    assert cal.ok, cal.summary()
    res = estimate_llc(model, loss_fn, loader, num_chains=4, seed=100, **cal.as_kwargs())
    error = res.mean / expected - 1
    assert abs(error) <= 0.15 or res.flags, f"{error:+.1%}\n{cal.summary()}"


def a2b2_closed_form(n: float) -> float:
    """``nbeta E[a^2 b^2]`` under ``exp(-nbeta a^2 b^2 - localization/2 (a^2 + b^2))``: with ``(a, b) = (u, v) /
    sqrt(localization)`` it depends only on ``n = nbeta / localization^2``; the v-integral is Gaussian
    (weight ``c^-1/2`` and ``E[n u^2 v^2 | u] = n u^2 / (2c)`` for ``c = n u^2 + 1/2``), u by quadrature."""
    u = torch.linspace(0.0, 12.0, 400_001, dtype=torch.float64)
    c = n * u**2 + 0.5
    weight = torch.exp(-(u**2) / 2) * c.rsqrt()
    return float(torch.trapezoid(weight * n * u**2 / (2 * c), u) / torch.trapezoid(weight, u))


@pytest.mark.slow
def test_localization_sets_the_finite_nbeta_estimate_of_a_singular_model() -> None:
    """Why no localization consistency check (docs/calibration.md, "The localization"): for K = a^2 b^2
    (lambda = 1/2) the estimate depends on nbeta / localization^2, so it moves with the localization at
    any nbeta and reads well below lambda (0.354 at n = 100, 0.378 at 400). Measured (16 chains x 1000
    draws over 10 relaxation times, seed 0): 0.360 +- 0.009 at (nbeta, localization, lr) = (100, 1, 4e-4)
    and 0.392 +- 0.007 at (400, 1, 2e-4)."""

    class AB(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(2))

    def potential(model, batch):
        return (model.w[0] * model.w[1]) ** 2 + 0.0 * batch.sum()

    assert a2b2_closed_form(100) == pytest.approx(0.354, abs=1e-3)
    assert a2b2_closed_form(400) == pytest.approx(0.378, abs=1e-3)
    for nbeta, localization, lr in [(100.0, 1.0, 4e-4), (400.0, 1.0, 2e-4)]:
        relax = 1 / (lr * localization)
        res = estimate_llc(AB(), potential, [torch.zeros(1)], lr=lr, localization=localization, nbeta=nbeta,
                           num_chains=16, num_draws=1000, num_burnin_steps=int(3 * relax),
                           num_steps_bw_draws=int(10 * relax / 1000), seed=0)
        expected = a2b2_closed_form(nbeta / localization**2)
        assert not res.flags and res.mean == pytest.approx(expected, abs=max(0.03, 3 * res.stderr)), (nbeta, res)


def test_bench_refuses_fixed_localization_without_an_nbeta_scan() -> None:
    import subprocess
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_calibration.py"
    run = subprocess.run([sys.executable, str(bench), "--fixed-localization"], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 2 and "--fixed-localization needs --nbeta-scan" in run.stderr
