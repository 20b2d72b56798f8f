"""LLCMonitor(background=True): a spawned worker process samples the snapshots while training goes on.

The worker imports this module by name to unpickle the loss function and the model, so both are
defined at module level (as a user's script would have to).
"""

from __future__ import annotations

import math
import os
import signal
import time
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from test_llc_monitor import FAST, MemoryLogger, Net, make_data, mse, probe, trainer
from torch.utils.data import DataLoader

from devinterp_lightning import LLCMonitor, StageDetector
from devinterp_lightning.sampling import worker as worker_module


def slow_mse(model: torch.nn.Module, batch: Any) -> torch.Tensor:
    time.sleep(0.02)  # an estimate (10 SGLD steps) then takes longer than many training steps
    return mse(model, batch)


def failing_loss(model: torch.nn.Module, batch: Any) -> torch.Tensor:
    raise ValueError("boom: the loss function failed")


def _run(background: bool, **kwargs: Any) -> tuple[LLCMonitor, MemoryLogger, dict[str, torch.Tensor]]:
    logger = MemoryLogger()
    options = {**FAST, "data": probe(), "every_n_steps": 3, "restrictions": {"head": "head.*"},
               "datasets": {"other": DataLoader(make_data(32, seed=9), batch_size=16, shuffle=True)}, **kwargs}
    monitor = LLCMonitor(mse, background=background, **options)
    pl.seed_everything(1234)
    model = Net(shuffle=True, dropout=0.3)
    trainer([monitor], max_steps=10, logger=logger).fit(model)
    return monitor, logger, {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(("start_method", "warm_start"), [
    ("auto", False),
    ("auto", True),  # the worker carries the chains' offsets between snapshots as the monitor does
    pytest.param("spawn", False, marks=pytest.mark.slow),  # the method of Windows and macOS
])
def test_background_values_are_bitwise_those_of_the_synchronous_mode(start_method: str, warm_start: bool):
    sync, sync_log, sync_weights = _run(False, warm_start=warm_start)
    bg, bg_log, bg_weights = _run(True, worker_start_method=start_method, warm_start=warm_start)
    assert bg.history.steps("llc/mean") == [0, 3, 6, 9]
    # every estimate of every job, published at its snapshot's step, bit for bit
    assert bg.history.state_dict() == sync.history.state_dict()
    assert bg_log.records == sync_log.records
    # training is undisturbed: the same final weights and BatchNorm statistics
    for key, value in sync_weights.items():
        assert torch.equal(value, bg_weights[key]), key
    assert bg.worker_pid is None  # the worker is stopped when fit returns
    assert bg.worker_startup_s is not None and bg.worker_startup_s > 0


@pytest.mark.slow  # starts a worker process: ~3 s idle, 20-40 s on a loaded 2-core machine
def test_outstanding_estimates_are_flushed_before_fit_returns():
    logger = MemoryLogger()
    monitor = LLCMonitor(slow_mse, data=probe(), every_n_steps=4, background=True, max_pending=3, **FAST)
    model = Net()
    t = trainer([monitor], max_steps=12, logger=logger)
    t.fit(model)
    assert monitor.history.steps("llc/mean") == [0, 4, 8, 12]
    assert logger.steps_of("llc/mean") == [0, 4, 8, 12]
    assert float(t.callback_metrics["llc/mean"]) == pytest.approx(monitor.history["llc/mean"][-1].value)


@pytest.mark.slow  # starts a worker process: ~3 s idle, 20-40 s on a loaded 2-core machine
def test_skip_when_busy_drops_due_steps_and_bounds_the_snapshots_in_flight(monkeypatch: pytest.MonkeyPatch):
    in_flight = []
    submit = worker_module.BackgroundSampler.submit

    def counting(self: Any, request: Any) -> None:
        submit(self, request)
        in_flight.append(len(self.pending))

    monkeypatch.setattr(worker_module.BackgroundSampler, "submit", counting)
    monitor = LLCMonitor(slow_mse, data=probe(), every_n_steps=1, background=True, when_busy="skip", max_pending=1,
                         **FAST)
    trainer([monitor], max_steps=12).fit(Net())
    measured = monitor.history.steps("llc/mean")
    assert max(in_flight) == 1
    assert monitor.skipped_steps, "a 0.2 s estimate per training step of a few ms must skip steps"
    assert sorted(measured + monitor.skipped_steps) == list(range(13))
    assert measured[0] == 0 and measured == sorted(measured)


class KillWorker(Callback):
    """Kills the sampling worker right after the snapshot at ``step`` was handed to it."""

    def __init__(self, monitor: LLCMonitor, step: int) -> None:
        self.monitor, self.step = monitor, step

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step and self.monitor.worker_pid is not None:
            os.kill(self.monitor.worker_pid, signal.SIGKILL)


@pytest.mark.slow  # starts a worker process: ~3 s idle, 20-40 s on a loaded 2-core machine
def test_a_dead_worker_warns_and_falls_back_to_synchronous_sampling():
    sync, _, _ = _run(False, warm_start=False)
    logger = MemoryLogger()
    options = {**FAST, "data": probe(), "every_n_steps": 3, "restrictions": {"head": "head.*"},
               "datasets": {"other": DataLoader(make_data(32, seed=9), batch_size=16, shuffle=True)}}
    # cold starts: a warm-started worker's chain offsets die with it (docs/monitor.md, "Crashes")
    monitor = LLCMonitor(mse, background=True, max_pending=2, warm_start=False, **options)
    pl.seed_everything(1234)
    with pytest.warns(RuntimeWarning, match="Falling back to synchronous sampling"):
        trainer([monitor, KillWorker(monitor, 3)], max_steps=10, logger=logger).fit(Net(shuffle=True, dropout=0.3))
    # nothing is lost: the snapshots in flight are redone in-process with the same seeds
    assert monitor.history.state_dict() == sync.history.state_dict()


@pytest.mark.slow  # starts a worker process: ~3 s idle, 20-40 s on a loaded 2-core machine
def test_an_error_in_the_worker_is_raised_in_the_training_process():
    monitor = LLCMonitor(failing_loss, data=probe(), every_n_steps=2, background=True, **FAST)
    with pytest.raises(RuntimeError, match="boom: the loss function failed"):
        trainer([monitor], max_steps=6).fit(Net())
    assert monitor.worker_pid is None


def test_an_unpicklable_loss_fails_at_setup_with_the_fix():
    monitor = LLCMonitor(lambda m, b: mse(m, b), data=probe(), every_n_steps=2, background=True, **FAST)
    model = Net()
    with pytest.raises(TypeError, match=r"loss_fn to a worker process started with 'spawn'.*top level"):
        trainer([monitor], max_steps=4).fit(model)
    assert model.training_steps == 0


def test_background_under_ddp_is_refused_with_the_alternative():
    from types import SimpleNamespace

    monitor = LLCMonitor(mse, data=probe(), background=True, **FAST)
    ddp_like = SimpleNamespace(strategy=SimpleNamespace(), world_size=2)
    with pytest.raises(ValueError, match="background=False under DDP"):
        monitor.setup(ddp_like, Net(), "fit")  # type: ignore[arg-type]


@pytest.mark.slow  # starts a worker process: ~3 s idle, 20-40 s on a loaded 2-core machine
def test_a_checkpoint_waits_for_the_estimates_taken_before_it(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=6, save_top_k=-1)
    monitor = LLCMonitor(slow_mse, data=probe(), every_n_steps=3, background=True, max_pending=2, **FAST)
    trainer([monitor, checkpoint], tmp_path, max_steps=6, enable_checkpointing=True).fit(Net(shuffle=False))
    saved = torch.load(tmp_path / "epoch=0-step=6.ckpt", weights_only=False)["callbacks"][monitor.state_key]
    assert [p["step"] for p in saved["history"]["llc/mean"]] == [0, 3, 6]


@pytest.mark.slow  # starts a worker process: ~3 s idle, 20-40 s on a loaded 2-core machine
def test_the_stage_detector_reads_background_estimates():
    monitor = LLCMonitor(mse, data=probe(), every_n_steps=2, background=True, **FAST)
    detector = StageDetector(monitor="llc/mean", ignore_flagged=False)
    trainer([monitor, detector], max_steps=8).fit(Net())
    assert [p.step for p in detector.series["llc/mean"]] == [0, 2, 4, 6, 8]
    assert all(math.isfinite(p.value) for p in detector.series["llc/mean"])


def test_auto_max_pending_bounds_the_snapshots_by_memory():
    from devinterp_lightning.callbacks.monitor_support import AUTO_PENDING_BYTES, pending_limit

    small = torch.nn.Linear(4, 4)
    assert pending_limit("auto", small) == 8 and pending_limit(3, small) == 3
    # a third of the budget in float32, on the meta device (no memory is allocated)
    big = torch.nn.Linear(1, AUTO_PENDING_BYTES // 4 // 3 + 1, bias=False, device="meta")
    assert pending_limit("auto", big) == 2
    with pytest.raises(ValueError, match="max_pending must be a positive integer .* or 'auto'"):
        LLCMonitor(mse, max_pending=0)
