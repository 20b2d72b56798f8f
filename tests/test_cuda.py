"""The estimator and the monitor on a CUDA device: skipped where none is present (CI has none).

What a GPU user relies on and a CPU run cannot show:
- the monitor does not disturb a CUDA training run: dropout draws from the *CUDA* generator, so a
  monitor that used it, reseeded it or left a mode or gradient behind would change the weights;
- the estimate on CUDA (its own ``torch.Generator(device="cuda")``, float32 kernels) meets the same
  closed forms as on the CPU, with the CPU tests' measured tolerances;
- a background worker on the GPU gives the synchronous values bit for bit, and the default CPU
  worker accepts a CUDA model.

The GPU figures (errors over seeds, speed, the monitor's overhead) come from
``benchmarks/bench_cuda.py``; docs/validation.md ("On a GPU"), docs/estimator.md and docs/monitor.md
give them. All 8 tests passed on an NVIDIA H200 (torch 2.11 + CUDA 13.0, Lightning 2.6.6).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from test_estimator_noisy import SUITE_CASES, SUITE_TOLERANCE, suite_estimate
from test_estimator_theory import NET, relative_error, sq_error, teacher_loader, teacher_network
from test_llc_monitor import FAST, Net, make_data, mse, probe, trainer
from torch.utils.data import DataLoader

from devinterp_lightning import LLCMonitor, estimate_llc, theory

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture
def deterministic_cuda() -> Iterator[None]:
    """Deterministic cuBLAS / cuDNN kernels, so two identical runs give identical weights."""
    previous = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    yield
    torch.use_deterministic_algorithms(previous[0])
    torch.backends.cudnn.benchmark = previous[1]


def _fit_on_cuda(monitor: LLCMonitor | None, max_steps: int = 14) -> tuple[dict[str, torch.Tensor], Any]:
    pl.seed_everything(1234)
    model = Net(shuffle=True, dropout=0.3)
    t = trainer([] if monitor is None else [monitor], max_steps=max_steps, accelerator="gpu", devices=1)
    t.fit(model)
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return state, (t.optimizers[0].state_dict(), model.training, torch.cuda.get_rng_state(), torch.rand(3))


def _assert_same_run(a: tuple, b: tuple) -> None:
    (weights_a, (optim_a, training_a, cuda_rng_a, cpu_rng_a)) = a
    (weights_b, (optim_b, training_b, cuda_rng_b, cpu_rng_b)) = b
    for key in weights_a:  # weights and BatchNorm running statistics
        assert torch.equal(weights_a[key], weights_b[key]), key
    for pid, s in optim_a["state"].items():
        for name, value in s.items():
            assert torch.equal(torch.as_tensor(value).cpu(), torch.as_tensor(optim_b["state"][pid][name]).cpu()), name
    assert training_a == training_b
    assert torch.equal(cuda_rng_a, cuda_rng_b), "the CUDA generator moved"
    assert torch.equal(cpu_rng_a, cpu_rng_b), "the CPU generator moved"


@pytest.mark.usefixtures("deterministic_cuda")
def test_monitor_leaves_a_cuda_training_run_bitwise_identical() -> None:
    base = _fit_on_cuda(None)
    _assert_same_run(base, _fit_on_cuda(None))  # the control: this run is deterministic on this GPU
    monitor = LLCMonitor(mse, every_n_steps=3, restrictions={"head": "head.*"}, **FAST)
    watched = _fit_on_cuda(monitor)
    assert monitor.history.steps("llc/mean") == [0, 3, 6, 9, 12]
    assert all(math.isfinite(p.value) for p in monitor.history["llc/mean"])
    _assert_same_run(base, watched)


def test_estimate_on_cuda_is_repeatable_and_leaves_the_generators_alone() -> None:
    model = teacher_network([3, 4, 4, 3], 2, seed=0)
    loader = teacher_loader(model, 3, seed=0)
    model.cuda()
    cuda_state, cpu_state = torch.cuda.get_rng_state(), torch.get_rng_state()
    a = estimate_llc(model, sq_error, loader, **NET, num_draws=50, num_burnin_steps=10, seed=3)
    b = estimate_llc(model, sq_error, loader, **NET, num_draws=50, num_burnin_steps=10, seed=3)
    assert torch.equal(a.loss_trace.cpu(), b.loss_trace.cpu())
    assert torch.equal(torch.cuda.get_rng_state(), cuda_state) and torch.equal(torch.get_rng_state(), cpu_state)
    assert all(p.grad is None for p in model.parameters())


def test_regular_model_on_cuda_gives_half_the_dimension() -> None:
    # the CPU test's case and tolerance (tests/test_estimator_theory.py: seeds 0-4 within 1.8%, tol 6%);
    # on the H200, seeds 0-2: +0.9%, -0.2%, +3.5%
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3, bias=False)
    loader = teacher_loader(model, 4, seed=0)
    res = estimate_llc(model.cuda(), sq_error, loader, **NET, num_draws=400, num_burnin_steps=100, seed=0)
    assert relative_error(res.mean, theory.regular(12)) < 0.06, res.mean


def test_deep_linear_network_on_cuda_meets_aoyagi() -> None:
    # DLN 3-4-4-3 at a rank-2 teacher, lambda 4.5: the CPU slow test's settings and tolerance (8%);
    # on the H200, seeds 0-2: -0.6%, -3.1%, +0.7%
    widths, rank = [3, 4, 4, 3], 2
    model = teacher_network(widths, rank, seed=0)
    loader = teacher_loader(model, widths[0], seed=0)
    res = estimate_llc(model.cuda(), sq_error, loader, **NET, num_draws=2000, num_burnin_steps=500, seed=0)
    assert relative_error(res.mean, theory.deep_linear_network(widths, rank)) < 0.08, res.mean


@pytest.mark.parametrize("name", list(SUITE_CASES))
def test_noisy_suite_on_cuda(name: str) -> None:
    # label noise sigma 1 at the exact minimiser, per-chain streams, the documented settings of the
    # suite's B 128 epoch-order row, the CPU test's tolerance (tests/test_estimator_noisy.py); on the
    # H200, seeds 0-2: linear -4.0 / +1.9 / -2.1%, RRR -5.9 / -7.8 / -7.3%, DLN -9.5 / -6.4 / -6.4%
    case = SUITE_CASES[name](0)
    res = suite_estimate(case, "B128-epoch", seed=0, device="cuda")
    assert res.healthy, res.flags
    assert relative_error(res.mean, case.llc) < SUITE_TOLERANCE[name], (res.mean, case.llc)


@pytest.mark.usefixtures("deterministic_cuda")
def test_background_worker_on_the_gpu_gives_the_synchronous_values() -> None:
    def run(background: bool, **kw: Any) -> tuple[LLCMonitor, dict[str, torch.Tensor]]:
        options = {**FAST, "data": probe(), "every_n_steps": 3, "restrictions": {"head": "head.*"},
                   "datasets": {"other": DataLoader(make_data(32, seed=9), batch_size=16, shuffle=True)}}
        monitor = LLCMonitor(mse, background=background, **options, **kw)
        weights, _ = _fit_on_cuda(monitor, max_steps=10)
        return monitor, weights

    sync, sync_weights = run(False)
    gpu, gpu_weights = run(True, worker_device="cuda")
    assert gpu.history.steps("llc/mean") == [0, 3, 6, 9]
    assert gpu.history.state_dict() == sync.history.state_dict()
    for key, value in sync_weights.items():
        assert torch.equal(value, gpu_weights[key]), key
    cpu, cpu_weights = run(True)  # the default worker_device="cpu" with a model trained on the GPU
    assert cpu.history.steps("llc/mean") == [0, 3, 6, 9]
    assert all(math.isfinite(p.value) for p in cpu.history["llc/mean"])
    for key, value in sync_weights.items():
        assert torch.equal(value, cpu_weights[key]), key
