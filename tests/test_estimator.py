"""Unit tests of estimate_llc / estimate_llcs: contract, model safety, restrictions, divergence."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from devinterp_lightning import estimate_llc, estimate_llcs


def mse(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return ((model(x) - y) ** 2).mean()


def regression_data(n: int = 512, din: int = 4, dout: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, din, generator=g)
    w = torch.randn(dout, din, generator=g)
    return x, x @ w.T, w


class Potential(nn.Module):
    """A model whose 'loss' is a polynomial of its own weights; the data is ignored."""

    def __init__(self, init: list[float]) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(init))


def dummy_loader(n: int = 8):
    return DataLoader(TensorDataset(torch.zeros(n, 1)), batch_size=n)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.bn = nn.BatchNorm1d(8)
        self.drop = nn.Dropout(0.5)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(torch.relu(self.bn(self.fc1(x)))))


FAST = dict(lr=1e-4, localization=10.0, nbeta=50.0, num_chains=2, num_draws=20, num_burnin_steps=5)


def test_result_shapes_and_init_loss() -> None:
    x, y, _ = regression_data()
    model = nn.Linear(4, 3)
    loader = DataLoader(TensorDataset(x, y), batch_size=64)
    res = estimate_llc(model, mse, loader, seed=0, **{**FAST, "num_chains": 3, "num_draws": 7})
    assert res.loss_trace.shape == (3, 7) and res.init_loss_trace.shape == (3, 7)
    assert res.per_chain.shape == (3,)
    with torch.no_grad():
        full = float(mse(model, (x, y)))
    # init_loss is the loss at w* averaged over the draws' batches (here whole epochs' worth)
    assert res.init_loss == pytest.approx(float(res.init_loss_trace.double().mean()), rel=1e-6)
    assert res.init_loss == pytest.approx(full, rel=0.2)
    assert math.isfinite(res.mean) and res.num_chains == 3


def test_model_left_exactly_as_it_was() -> None:
    torch.manual_seed(123)
    x, y, _ = regression_data(n=256)
    model = Net()
    model.train()
    model.fc2.eval()  # a mixed-mode model: every submodule's mode must come back
    model.fc1.bias.requires_grad_(False)
    mse(model, (x[:32], y[:32])).backward()  # leaves .grad populated on some parameters
    model.bn.running_mean.add_(0.3)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    requires = {n: p.requires_grad for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    modes = {n: m.training for n, m in model.named_modules()}
    loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)
    for seed in (5, None):
        rng = torch.get_rng_state()
        res = estimate_llc(model, mse, loader, seed=seed, **FAST)
        assert torch.equal(torch.get_rng_state(), rng)
        assert math.isfinite(res.mean)
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), params[n]) and p.requires_grad == requires[n]
        assert (p.grad is None) == (grads[n] is None)
        if p.grad is not None:
            assert torch.equal(p.grad, grads[n])
    for n, b in model.named_buffers():
        assert torch.equal(b, buffers[n])
    assert {n: m.training for n, m in model.named_modules()} == modes


def test_shuffled_loader_deterministic_with_seed() -> None:
    x, y, _ = regression_data()
    model = nn.Linear(4, 3)
    loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)
    a = estimate_llc(model, mse, loader, seed=11, **FAST)
    b = estimate_llc(model, mse, loader, seed=11, **FAST)
    c = estimate_llc(model, mse, loader, seed=12, **FAST)
    assert torch.equal(a.loss_trace, b.loss_trace) and torch.equal(a.init_loss_trace, b.init_loss_trace)
    assert a.mean == b.mean
    assert not torch.equal(a.loss_trace, c.loss_trace)


def test_generic_loader_and_dict_batches() -> None:
    # any iterable of batches works (here a list of dicts), not only a DataLoader
    x, y, _ = regression_data(n=128)
    batches = [{"x": x[i : i + 32], "y": y[i : i + 32]} for i in range(0, 128, 32)]
    model = nn.Linear(4, 3)
    res = estimate_llc(model, lambda m, b: ((m(b["x"]) - b["y"]) ** 2).mean(), batches, seed=0, **FAST)
    assert math.isfinite(res.mean)


def test_default_nbeta_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    x, y, _ = regression_data()
    loader = DataLoader(TensorDataset(x, y), batch_size=64)
    kwargs = {k: v for k, v in FAST.items() if k != "nbeta"}
    with caplog.at_level(logging.INFO, logger="devinterp_lightning"):
        res = estimate_llc(nn.Linear(4, 3), mse, loader, seed=0, **kwargs)
    assert res.nbeta == pytest.approx(64 / math.log(64))
    assert any("B/log(B)" in r.getMessage() and r.name == "devinterp_lightning" for r in caplog.records)


def test_progress_reports_every_step() -> None:
    x, y, _ = regression_data()
    loader = DataLoader(TensorDataset(x, y), batch_size=64)
    calls: list[tuple[int, int]] = []
    estimate_llcs(
        nn.Linear(4, 3), mse, {"a": (loader, None), "b": (list(loader), "weight")},
        seed=0, progress=lambda d, t: calls.append((d, t)), **{**FAST, "num_draws": 4, "num_burnin_steps": 2},
    )
    total = 2 * (2 + 4)  # two batch streams (two loader objects), 6 steps each
    assert calls[-1] == (total, total)
    assert [d for d, _ in calls] == list(range(1, total + 1))


@pytest.mark.parametrize(
    "restrict, match",
    [
        ("decoder.*", r"matches no parameter.*fnmatch.*0\.weight, 0\.bias, 1\.weight, 1\.bias"),
        (["nope", "also.nope"], "matches no parameter"),
        ({"0.wieght": torch.ones(5, 4, dtype=torch.bool)}, r"unknown parameters \['0\.wieght'\].*0\.weight"),
        ({"0.weight": torch.ones(4, 5, dtype=torch.bool)}, "must be a bool tensor of shape"),
        ({"0.weight": torch.zeros(5, 4, dtype=torch.bool)}, "all False"),
        (3, "must be a glob"),
    ],
)
def test_restriction_errors(restrict, match: str) -> None:
    model = nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 3))
    x, y, _ = regression_data()
    with pytest.raises(ValueError, match=match):
        estimate_llc(model, mse, DataLoader(TensorDataset(x, y), batch_size=64), restrict=restrict, **FAST)


@pytest.mark.parametrize(
    "kwargs, match",
    [({"lr": 0.0}, "lr"), ({"localization": -1.0}, "localization"), ({"num_draws": 0}, "num_draws"),
     ({"nbeta": float("inf")}, "nbeta")],
)
def test_bad_settings_raise_early(kwargs, match: str) -> None:
    x, y, _ = regression_data()
    with pytest.raises(ValueError, match=match):
        estimate_llc(nn.Linear(4, 3), mse, DataLoader(TensorDataset(x, y), batch_size=64), **{**FAST, **kwargs})


def test_mask_restriction_moves_only_masked_entries() -> None:
    # loss = w0^2 (w1, w2 do not matter). Moving only w1 leaves the loss at w* on every draw: llc = 0
    # exactly. Moving only w0 gives a 1-d regular model: llc ~ 1/2.
    model = Potential([0.0, 0.0, 0.0])
    loss = lambda m, b: m.w[0] ** 2  # noqa: E731
    kw = dict(lr=1e-4, localization=1.0, nbeta=1000.0, num_chains=8, num_draws=400, num_burnin_steps=100, seed=0)
    off = estimate_llc(model, loss, dummy_loader(), restrict={"w": torch.tensor([False, True, False])}, **kw)
    assert off.mean == 0.0 and torch.all(off.loss_trace == 0)
    on = estimate_llc(model, loss, dummy_loader(), restrict={"w": torch.tensor([True, False, False])}, **kw)
    # 8 chains x 400 draws: seeds 0-4 gave 0.47-0.53
    assert on.mean == pytest.approx(0.5, abs=0.08)


def test_huge_lr_all_chains_diverge_cleanly() -> None:
    x, y, _ = regression_data()
    loader = DataLoader(TensorDataset(x, y), batch_size=64)
    with pytest.warns(RuntimeWarning, match="all 3 SGLD chains diverged"):
        res = estimate_llc(nn.Linear(4, 3), mse, loader, **{**FAST, "lr": 10.0, "nbeta": 100.0, "num_chains": 3})
    assert res.all_diverged and res.flags == ("all_diverged",)
    assert math.isnan(res.mean) and torch.isnan(res.per_chain).all()


def test_some_chains_diverge_and_are_excluded() -> None:
    # loss = w^4: stable near 0, unstable once lr/2 * nbeta * 12 w^2 > 2. With this lr some chains
    # are kicked out by the noise and blow up, the others sample normally.
    model = Potential([0.0])
    loss = lambda m, b: (m.w**4).sum()  # noqa: E731
    with pytest.warns(RuntimeWarning, match="of 16 SGLD chains diverged and were excluded"):
        res = estimate_llc(model, loss, dummy_loader(), lr=0.08, localization=0.0, nbeta=10.0,
                           num_chains=16, num_draws=200, seed=3)
    n_bad = int(res.diverged.sum())
    assert 0 < n_bad < 16 and "diverged" in res.flags
    good = res.per_chain[~res.diverged]
    assert torch.isnan(res.per_chain[res.diverged]).all() and torch.isfinite(good).all()
    assert res.mean == pytest.approx(float(good.double().mean()), rel=1e-6)
    assert torch.isfinite(res.loss_trace[~res.diverged]).all()


def test_bf16_model_is_sampled_in_float32() -> None:
    x, y, _ = regression_data()
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).to(torch.bfloat16)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loader = DataLoader(TensorDataset(x.bfloat16(), y.bfloat16()), batch_size=64)
    res = estimate_llc(model, mse, loader, seed=0, **FAST)
    assert math.isfinite(res.mean) and res.loss_trace.dtype == torch.float32
    for n, p in model.named_parameters():
        assert p.dtype == torch.bfloat16 and torch.equal(p.detach(), before[n])


def test_train_mode_batchnorm_falls_back_to_a_loop() -> None:
    # BatchNorm in train mode updates running stats in place, which vmap cannot batch; the sampler
    # loops over chains instead, and the model's own buffers stay untouched.
    x, y, _ = regression_data()
    model = Net()
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    rng = torch.get_rng_state()
    res = estimate_llc(model, mse, DataLoader(TensorDataset(x, y), batch_size=64), eval_mode=False, seed=0, **FAST)
    assert math.isfinite(res.mean)
    assert torch.equal(torch.get_rng_state(), rng)
    for n, b in model.named_buffers():
        assert torch.equal(b, buffers[n])


def test_estimate_llcs_matches_separate_estimates() -> None:
    # A teacher-initialised 2-layer linear net; "all" and "last" share one loader (one vectorized
    # run), "half" uses inputs confined to 2 of 4 dims (its own stream). Each must agree in
    # distribution with a separate estimate_llc call.
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 3, bias=False))
    x = torch.randn(512, 4, generator=g)
    with torch.no_grad():
        y = model(x)
        xh = x * torch.tensor([1.0, 1.0, 0.0, 0.0])
        yh = model(xh)
    full = DataLoader(TensorDataset(x, y), batch_size=128)
    half = DataLoader(TensorDataset(xh, yh), batch_size=128)
    kw = dict(lr=2e-4, localization=1.0, nbeta=500.0, num_chains=6, num_draws=150, num_burnin_steps=50)
    together = estimate_llcs(model, mse, {"all": (full, None), "last": (full, "1.*"), "half": (half, None)},
                             seed=1, **kw)
    assert list(together) == ["all", "last", "half"]
    apart = {
        "all": estimate_llc(model, mse, full, seed=2, **kw),
        "last": estimate_llc(model, mse, full, restrict="1.*", seed=3, **kw),
        "half": estimate_llc(model, mse, half, seed=4, **kw),
    }
    for name in together:
        a, b = together[name], apart[name]
        tol = 4 * math.hypot(a.stderr, b.stderr) + 0.05 * abs(b.mean)
        assert abs(a.mean - b.mean) < tol, (name, a.mean, b.mean, tol)
    # the restricted estimates are smaller than the full one (fewer moving weights)
    assert together["last"].mean < together["all"].mean
    assert together["half"].mean < together["all"].mean


def test_loop_path_matches_vmap_path(monkeypatch: pytest.MonkeyPatch) -> None:
    # Big models on a CPU loop over chains with plain autograd instead of vmap (it is faster
    # there). Same seed -> same noise and batches, so both paths must give the same chains up
    # to float rounding.
    from devinterp_lightning.sampling import sgld

    x, y, _ = regression_data()
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    loader = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True)
    vmapped = estimate_llc(model, mse, loader, seed=4, **FAST)
    monkeypatch.setattr(sgld, "LOOP_THRESHOLD", 0)
    looped = estimate_llc(model, mse, loader, seed=4, **FAST)
    assert torch.allclose(vmapped.loss_trace, looped.loss_trace, rtol=1e-4, atol=1e-6)
    assert looped.mean == pytest.approx(vmapped.mean, rel=1e-3, abs=1e-3)


def test_tied_weights_are_sampled_as_one_tensor():
    """A Parameter registered under two names (weight tying) is one set of coordinates: the
    estimate equals that of the same function written with the parameter used twice."""
    torch.manual_seed(0)
    x = torch.randn(256, 4)
    loader = [(x[i : i + 64],) for i in range(0, 256, 64)]

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.Linear(4, 4, bias=False)
            self.dec = nn.Linear(4, 4, bias=False)
            self.dec.weight = self.enc.weight  # tied: one Parameter, two names

        def forward(self, inputs):
            return self.dec(torch.tanh(self.enc(inputs)))

    class Shared(nn.Module):
        def __init__(self, weight):
            super().__init__()
            self.weight = nn.Parameter(weight.detach().clone())

        def forward(self, inputs):
            return torch.tanh(inputs @ self.weight.T) @ self.weight.T

    tied = Tied()
    shared = Shared(tied.enc.weight)
    target = tied(x).detach() + 0.1

    def loss_fn(model, batch):
        return ((model(batch[0]) - target[: batch[0].shape[0]]) ** 2).mean()

    kwargs = dict(lr=1e-4, localization=10.0, nbeta=100.0, num_chains=2, num_draws=30, seed=3)
    a = estimate_llc(tied, loss_fn, loader, **kwargs)
    b = estimate_llc(shared, loss_fn, loader, **kwargs)
    torch.testing.assert_close(a.loss_trace, b.loss_trace)
    assert tied.dec.weight is tied.enc.weight


class _SeedSpy:
    """Stands in for torch.default_generator and counts reseeds (everything else forwarded)."""

    def __init__(self, real):
        self.real, self.reseeds = real, 0

    def manual_seed(self, seed):
        self.reseeds += 1
        return self.real.manual_seed(seed)

    def __getattr__(self, name):
        return getattr(self.real, name)


def test_map_style_loaders_are_ordered_privately_without_reseeding_the_global_rng(monkeypatch) -> None:
    """A shuffled DataLoader over a map-style dataset gets its order from the estimator's own
    generator: the global generator is never reseeded, and the order does not depend on its state."""
    x, y, _ = regression_data()
    model = nn.Linear(4, 3)
    samples = [(x[i], y[i]) for i in range(len(x))]  # map-style, not a TensorDataset
    loader = DataLoader(samples, batch_size=32, shuffle=True)
    spy = _SeedSpy(torch.default_generator)
    monkeypatch.setattr(torch, "default_generator", spy)
    torch.random.manual_seed(1)  # the real generator, not through the spy
    a = estimate_llc(model, mse, loader, seed=11, **FAST)
    torch.random.manual_seed(2)
    b = estimate_llc(model, mse, loader, seed=11, **FAST)
    assert spy.reseeds == 0
    assert torch.equal(a.loss_trace, b.loss_trace)
    # the same samples through a TensorDataset loader give the same batches, hence the same traces
    c = estimate_llc(model, mse, DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True), seed=11, **FAST)
    torch.testing.assert_close(a.loss_trace, c.loss_trace)


def test_iterable_loaders_fall_back_to_a_seeded_fork_of_the_global_rng(monkeypatch) -> None:
    """An IterableDataset can only shuffle through the global RNG: it runs on a seeded fork, so
    the order is reproducible and the caller's RNG state is restored."""
    x, y, _ = regression_data()
    model = nn.Linear(4, 3)

    class Shuffled(torch.utils.data.IterableDataset):
        def __iter__(self):
            order = torch.randperm(len(x))  # the global RNG, as such datasets do
            for i in range(0, len(x), 32):
                idx = order[i : i + 32]
                yield x[idx], y[idx]

    loader = DataLoader(Shuffled(), batch_size=None)
    spy = _SeedSpy(torch.default_generator)
    monkeypatch.setattr(torch, "default_generator", spy)
    state = torch.get_rng_state()
    a = estimate_llc(model, mse, loader, seed=11, **FAST)
    b = estimate_llc(model, mse, loader, seed=11, **FAST)
    assert spy.reseeds == 2
    assert torch.equal(a.loss_trace, b.loss_trace)
    assert torch.equal(torch.get_rng_state(), state)


# ------------------------------------------------------------------ anchor losses in blocks (#14)


def _evaluator(loss_fn=mse):
    from devinterp_lightning.sampling.sgld import LossEvaluator

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    anchor = {n: p.detach().clone() for n, p in model.named_parameters()}
    return LossEvaluator(model, loss_fn, anchor, {}, list(anchor))


def test_anchor_losses_of_a_block_equal_one_call_per_batch() -> None:
    """The losses at w* of upcoming steps come from one vmapped call; each equals the loss of its
    own batch computed alone (float rounding aside), shared batches and per-chain streams alike."""
    from devinterp_lightning.sampling.batches import stack_batches
    from devinterp_lightning.sampling.sgld import ChainBatches

    ev = _evaluator()
    x, y, _ = regression_data(n=320)
    batches = [(x[i : i + 32], y[i : i + 32]) for i in range(0, 320, 32)]
    block = ev.anchor_losses(batches)
    assert ev._anchor_blocks
    torch.testing.assert_close(torch.stack(block), torch.stack([ev.anchor_loss(b) for b in batches]))
    streams = [ChainBatches(batches[i : i + 2], stack_batches(batches[i : i + 2])) for i in range(0, 10, 2)]
    per_lane = ev.anchor_losses(streams)
    assert [tuple(t.shape) for t in per_lane] == [(2,)] * 5
    torch.testing.assert_close(torch.stack(per_lane), torch.stack(block).reshape(5, 2))


def test_anchor_losses_fall_back_to_one_call_per_batch_where_vmap_fails() -> None:
    def branching(model: nn.Module, batch) -> torch.Tensor:
        scale = 2.0 if bool(batch[1].sum() > 0) else 1.0  # a Python branch on the data: no vmap
        return scale * mse(model, batch)

    ev = _evaluator(branching)
    x, y, _ = regression_data(n=96)
    batches = [(x[i : i + 32], y[i : i + 32]) for i in range(0, 96, 32)]
    values = ev.anchor_losses(batches)
    assert not ev._anchor_blocks
    assert [float(v) for v in values] == [float(branching(ev.module.model, b)) for b in batches]


@pytest.mark.parametrize("block_bytes", [10**9, 1])
def test_anchored_stream_reads_each_step_once_and_anchors_draw_steps(monkeypatch, block_bytes: int) -> None:
    """The stream reads exactly ``total_steps`` batches in order (blocks never read ahead past the
    run) and pairs a loss at w* with step 0 and every draw step, whatever the block size."""
    from devinterp_lightning.sampling import sgld
    from devinterp_lightning.sampling.settings import SGLDSettings

    monkeypatch.setattr(sgld, "ANCHOR_BLOCK_BYTES", block_bytes)
    ev = _evaluator()
    x, y, _ = regression_data(n=64 * 20)
    batches = [(x[i : i + 64], y[i : i + 64]) for i in range(0, 64 * 20, 64)]
    read = []

    def source():
        for i, b in enumerate(batches):
            read.append(i)
            yield b

    settings = SGLDSettings(lr=1e-3, localization=1.0, nbeta=10.0, num_chains=2, num_draws=4, num_burnin_steps=3,
                            num_steps_bw_draws=2)
    stream = sgld.AnchoredBatches(ev, source(), settings)
    seen = [stream.next() for _ in range(settings.total_steps)]
    assert read == list(range(settings.total_steps))
    assert stream.block == (1 if block_bytes == 1 else sgld.ANCHOR_BLOCK_STEPS)
    for step, (batch, anchor) in enumerate(seen):
        assert batch is batches[step]
        if step == 0 or settings.draw_index(step) is not None:
            torch.testing.assert_close(anchor, ev.anchor_loss(batch))
        else:
            assert anchor is None
