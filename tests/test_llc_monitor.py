from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import Logger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from devinterp_lightning import LLCMonitor
from devinterp_lightning.sampling.estimator import estimate_llcs
from devinterp_lightning.schedule import ExplicitSteps

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # 'examples.configs.*' import paths resolve from the repository root
    sys.path.insert(0, str(ROOT))

FAST = dict(lr=1e-3, localization=100.0, num_chains=2, num_draws=8, num_burnin_steps=2, seed=0)


def mse(model: nn.Module, batch: Any) -> torch.Tensor:
    x, y = batch
    return F.mse_loss(model(x), y)


def make_data(n: int = 96, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    y = x @ torch.randn(6, 2, generator=g) + 0.1 * torch.randn(n, 2, generator=g)
    return TensorDataset(x, y)


class Net(pl.LightningModule):
    """Dropout and BatchNorm, so any disturbance of RNG, modes or buffers would show in the weights."""

    def __init__(self, shuffle: bool = True, dropout: float = 0.2) -> None:
        super().__init__()
        self.shuffle = shuffle
        self.body = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(dropout))
        self.head = nn.Linear(8, 2)
        self.training_steps = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.training_steps += 1
        return mse(self, batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-2)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(make_data(), batch_size=16, shuffle=self.shuffle)


class MemoryLogger(Logger):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[tuple[int, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.records.append((step, dict(metrics)))

    def steps_of(self, key: str) -> list[int]:
        return [s for s, m in self.records if key in m]


def trainer(callbacks: list, tmp_path: Path | None = None, **kwargs: Any) -> pl.Trainer:
    options = dict(
        max_steps=12, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )
    if tmp_path is not None:
        options["default_root_dir"] = str(tmp_path)
    options.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **options)


def probe() -> DataLoader:
    return DataLoader(make_data(48, seed=5), batch_size=16)


# --------------------------------------------------------------------------- schedule and logging
def test_logs_at_scheduled_steps_to_loggers_callback_metrics_and_history():
    logger = MemoryLogger()
    monitor = LLCMonitor(mse, data=probe(), every_n_steps=5, **FAST)
    pl.seed_everything(0)
    model = Net()
    trainer([monitor], logger=logger, log_every_n_steps=50).fit(model)
    assert logger.steps_of("llc/mean") == [0, 5, 10]
    assert logger.steps_of("llc/std") == [0, 5, 10]
    assert monitor.history.steps("llc/mean") == [0, 5, 10]
    last = monitor.history["llc/mean"][-1]
    assert torch.is_tensor(monitor.last_results["llc"].loss_trace)
    assert last.value == monitor.last_results["llc"].mean
    assert last.stderr == pytest.approx(monitor.last_results["llc"].stderr)
    assert float(model.trainer.callback_metrics["llc/mean"]) == pytest.approx(last.value)
    assert float(model.trainer.callback_metrics["llc/std"]) == pytest.approx(last.std)


def test_values_equal_a_direct_estimator_call_with_the_derived_seed():
    from devinterp_lightning.callbacks.llc_monitor import _derive_seed

    data = probe()
    monitor = LLCMonitor(mse, data=data, every_n_steps=[0], **FAST)
    pl.seed_everything(0)
    model = Net()
    expected = estimate_llcs(
        model, mse, {"llc": (data, None)}, lr=FAST["lr"], localization=FAST["localization"], num_chains=2,
        num_draws=8, num_burnin_steps=2, seed=_derive_seed(0, 0, 0),
    )["llc"]
    trainer([monitor], max_steps=3).fit(model)
    assert monitor.history["llc/mean"][0].value == expected.mean


def test_gradient_accumulation_measures_once_per_optimizer_step():
    logger = MemoryLogger()
    monitor = LLCMonitor(mse, data=probe(), every_n_steps=2, **FAST)
    model = Net()
    trainer([monitor], logger=logger, max_steps=4, accumulate_grad_batches=3).fit(model)
    assert model.training_steps == 12  # 4 optimizer steps x 3 micro-batches
    assert logger.steps_of("llc/mean") == [0, 2, 4]


def test_restriction_naming_and_cross_product():
    from devinterp_lightning.callbacks.llc_monitor import _derive_seed

    data, other = probe(), DataLoader(make_data(32, seed=9), batch_size=16)
    restrictions = {"head": "head.*", "first": ["body.0.weight", "body.0.bias"]}
    monitor = LLCMonitor(
        mse, data=data, every_n_steps=[4], restrictions=restrictions, datasets={"other": other}, cross=True, **FAST,
    )
    model = Net()
    trainer([monitor], max_steps=4).fit(model)
    expected = ["llc/mean", "llc/head/mean", "llc/first/mean", "llc/other/mean", "llc/head@other/mean",
                "llc/first@other/mean"]
    assert monitor.monitor_keys() == expected
    assert monitor.history.keys() == expected
    for key in expected:
        assert key in model.trainer.callback_metrics
        assert key.replace("/mean", "/std") in model.trainer.callback_metrics
    # each name is the estimate of its (weights x data) job: the final weights are the step-4 snapshot
    jobs = {
        "llc": (data, None), "llc/head": (data, "head.*"), "llc/first": (data, restrictions["first"]),
        "llc/other": (other, None), "llc/head@other": (other, "head.*"),
        "llc/first@other": (other, restrictions["first"]),
    }
    direct = estimate_llcs(
        model, mse, jobs, lr=FAST["lr"], localization=FAST["localization"], num_chains=2, num_draws=8,
        num_burnin_steps=2, seed=_derive_seed(0, 4, 0),
    )
    for name, result in direct.items():
        assert monitor.history[f"{name}/mean"][0].value == result.mean, name
    # the restrictions really restrict: different jobs give different chains
    assert len({r.mean for r in direct.values()}) == len(direct)


def test_adaptive_schedule_follows_the_unrestricted_estimate_and_is_checkpointed():
    from devinterp_lightning.schedule import Adaptive

    monitor = LLCMonitor(mse, data=probe(), every_n_steps=Adaptive(min_interval=2, max_interval=8), **FAST)
    trainer([monitor], max_steps=20).fit(Net())
    points = monitor.history["llc/mean"]
    # replaying the logged estimates through a fresh schedule gives exactly the measured steps
    replay = Adaptive(min_interval=2, max_interval=8)
    steps = []
    for point in points:
        assert replay.is_due(point.step) and not replay.is_due(point.step - 1)
        steps.append(point.step)
        replay.observe(point.step, point.value, point.stderr)
    assert steps[:2] == [0, 2] and len(steps) >= 4
    state = monitor.state_dict()["schedule"]
    assert state == replay.state_dict()
    resumed = LLCMonitor(mse, data=probe(), every_n_steps=Adaptive(min_interval=2, max_interval=8), **FAST)
    resumed.load_state_dict(monitor.state_dict())
    assert resumed.schedule.state_dict() == state


# --------------------------------------------------------------------------- the observer does not disturb
def _final_state(with_monitor: bool, **monitor_kwargs: Any) -> tuple[dict[str, torch.Tensor], Any, LLCMonitor | None]:
    pl.seed_everything(1234)
    model = Net(shuffle=True, dropout=0.3)
    monitor = None
    callbacks = []
    if with_monitor:
        monitor = LLCMonitor(mse, every_n_steps=3, restrictions={"head": "head.*"}, **{**FAST, **monitor_kwargs})
        callbacks.append(monitor)
    t = trainer(callbacks, max_steps=14)
    t.fit(model)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    optim = t.optimizers[0].state_dict()
    return state, (optim, model.training, [m.training for m in model.modules()], torch.rand(3)), monitor


@pytest.mark.parametrize("data", [None, "probe"])
def test_monitor_leaves_training_bitwise_identical(data: str | None):
    # data=None: the monitor caches the first train batches (shuffled loader) at train start;
    # a shuffled probe loader: the estimator draws its order without touching the global RNG
    base, (base_optim, *base_rest), _ = _final_state(False)
    loader = None if data is None else DataLoader(make_data(48, seed=5), batch_size=16, shuffle=True)
    watched, (optim, *rest), monitor = _final_state(True, data=loader)
    assert monitor is not None and monitor.history.steps("llc/mean") == [0, 3, 6, 9, 12]
    assert base.keys() == watched.keys()
    for key in base:  # weights and BatchNorm running statistics
        assert torch.equal(base[key], watched[key]), key
    for pid, s in base_optim["state"].items():
        for name, value in s.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(optim["state"][pid][name])), name
    assert base_rest[0] == rest[0] and base_rest[1] == rest[1]  # train/eval modes
    assert torch.equal(base_rest[2], rest[2])  # global RNG after fit


# --------------------------------------------------------------------------- lightning integration
def test_state_dict_round_trip_and_resume_continues_the_series(tmp_path: Path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=6, save_top_k=-1)
    monitor = LLCMonitor(mse, data=probe(), every_n_steps=3, **FAST)
    pl.seed_everything(0)
    trainer([monitor, checkpoint], tmp_path, max_steps=6, enable_checkpointing=True).fit(Net(shuffle=False))
    first = monitor.history.state_dict()
    assert monitor.history.steps("llc/mean") == [0, 3, 6]

    resumed = LLCMonitor(mse, data=probe(), every_n_steps=3, **FAST)
    logger = MemoryLogger()
    trainer([resumed], tmp_path, max_steps=12, logger=logger).fit(Net(shuffle=False), ckpt_path=str(tmp_path / "epoch=0-step=6.ckpt"))
    assert resumed.history.steps("llc/mean") == [0, 3, 6, 9, 12]
    assert resumed.history.state_dict()["llc/mean"][:3] == first["llc/mean"]
    assert logger.steps_of("llc/mean") == [9, 12]  # step 6 is not measured twice

    fresh = LLCMonitor(mse, data=probe(), **FAST)
    fresh.load_state_dict(resumed.state_dict())
    assert fresh.history.state_dict() == resumed.history.state_dict()


def test_early_stopping_and_checkpoint_can_monitor_the_llc(tmp_path: Path):
    monitor = LLCMonitor(mse, data=probe(), every_n_steps=2, **FAST)
    # a threshold every estimate passes: EarlyStopping must find the key and stop at the first check
    stopper = EarlyStopping(monitor="llc/mean", mode="max", stopping_threshold=-1e9, check_on_train_epoch_end=True)
    best = ModelCheckpoint(dirpath=tmp_path, monitor="llc/mean", mode="min", every_n_train_steps=2)
    model = Net()
    trainer([monitor, stopper, best], tmp_path, max_steps=100, enable_checkpointing=True).fit(model)
    assert model.trainer.global_step == 6  # 96 samples / 16 = one epoch of 6 steps
    assert stopper.stopped_epoch == 0 and model.trainer.should_stop
    assert best.best_model_path and math.isfinite(float(best.best_model_score))


@pytest.mark.parametrize("precision", ["bf16-true", "bf16-mixed"])
def test_low_precision_runs_sample_in_float32(precision: str):
    monitor = LLCMonitor(mse, data=probe(), every_n_steps=[0, 3], **FAST)
    model = Net()
    trainer([monitor], max_steps=3, precision=precision).fit(model)
    values = monitor.history.values("llc/mean")
    assert len(values) == 2 and all(math.isfinite(v) for v in values)
    assert monitor.last_results["llc"].loss_trace.dtype == torch.float32
    if precision == "bf16-true":
        assert next(model.parameters()).dtype == torch.bfloat16


def test_progress_is_reported_through_the_estimator():
    # step 0 runs in on_train_start, possibly before the progress bar exists; that must not fail
    monitor = LLCMonitor(mse, data=probe(), every_n_steps=[0, 2], **FAST)
    trainer([monitor], max_steps=2, enable_progress_bar=True).fit(Net())
    # 2 burn-in + 8 draws = 10 SGLD steps, reported up to completion
    assert monitor.last_progress == (10, 10)


def test_dotted_paths_for_loss_and_data():
    monitor = LLCMonitor(
        "examples.configs.losses.mse", data="examples.configs.dln.probe_loader", every_n_steps=[1], **FAST
    )
    from examples.configs import losses

    assert monitor.loss_fn is losses.mse
    from examples.configs.dln import DeepLinearNetwork

    model = DeepLinearNetwork(width=16, depth=2, num_samples=128)
    trainer([monitor], max_steps=1).fit(model)
    assert monitor.history.steps("llc/mean") == [1]


# --------------------------------------------------------------------------- errors, before training
class CountingNet(Net):
    pass


@pytest.mark.parametrize(
    "kwargs, kind, message",
    [
        (dict(restrictions={"bad": "decoder.*"}), ValueError, r"restriction 'bad' = \['decoder.\*'\] matches no parameter"),
        (dict(data=DataLoader(TensorDataset(torch.zeros(0, 6), torch.zeros(0, 2)), batch_size=4)), ValueError, "has no batches"),
        (dict(every_n_steps=50), ValueError, r"no step in 1..12.*raise max_steps"),
        (dict(every_n_steps=[5, 20, 30]), ValueError, r"steps \[20, 30\] are beyond the 12"),
        (dict(num_chains=1, every_n_steps=[1]), None, None),  # a valid config runs
    ],
)
def test_bad_configuration_fails_before_training(kwargs: dict, kind: type | None, message: str | None):
    settings = {**FAST, "data": probe(), **kwargs}
    monitor = LLCMonitor(mse, **settings)
    model = CountingNet()
    if kind is None:
        trainer([monitor], max_steps=1).fit(model)
        return
    with pytest.raises(kind, match=message):
        trainer([monitor]).fit(model)
    assert model.training_steps == 0


def test_schedule_beyond_an_epoch_limited_run_fails_at_train_start():
    monitor = LLCMonitor(mse, data=probe(), every_n_steps=ExplicitSteps([3, 40]), **FAST)
    model = CountingNet()
    with pytest.raises(ValueError, match=r"steps \[40\] are beyond the 12 optimizer steps"):
        trainer([monitor], max_steps=-1, max_epochs=2).fit(model)
    assert model.training_steps == 0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(loss_fn="examples.configs.losses.nope"), "has no attribute path 'nope'"),
        (dict(loss_fn="nosuchpackage.loss"), "no prefix of it is an importable module"),
        (dict(restrictions={"a/b": "head.*"}), "without '/' or '@'"),
        (dict(restrictions={"x": "head.*"}, datasets={"x": [1]}), "used both in restrictions and in datasets"),
        (dict(cross=True, restrictions={"x": "head.*"}), "cross=True needs both"),
        (dict(lr=-1.0), "lr must be a positive"),
        (dict(num_data_batches=0), "num_data_batches must be a positive"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs: dict, message: str):
    args = {"loss_fn": mse, **FAST, **kwargs}
    with pytest.raises((ValueError, TypeError), match=message):
        LLCMonitor(**args)


def test_num_chains_must_cover_the_world_size():
    from types import SimpleNamespace

    monitor = LLCMonitor(mse, data=probe(), **{**FAST, "num_chains": 1})
    ddp_like = SimpleNamespace(strategy=SimpleNamespace(), world_size=2)  # what 2-process DDP reports
    with pytest.raises(ValueError, match="Set num_chains >= 2"):
        monitor.setup(ddp_like, Net(), "fit")  # type: ignore[arg-type]


def test_sharded_strategies_are_refused_at_setup():
    class FSDPStrategy:  # stands in for lightning's FSDPStrategy (needs CUDA to build)
        pass

    monitor = LLCMonitor(mse, data=probe(), **FAST)

    class FakeTrainer:
        strategy = FSDPStrategy()

    with pytest.raises(RuntimeError, match="does not support FSDPStrategy yet.*strategy='ddp'"):
        monitor.setup(FakeTrainer(), Net(), "fit")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- LightningCLI
def test_lightning_cli_parses_the_example_config(monkeypatch: pytest.MonkeyPatch):
    from lightning.pytorch.cli import LightningCLI

    from devinterp_lightning.schedule import LogSpaced

    monkeypatch.chdir(ROOT)
    cli = LightningCLI(
        args=["--config", "examples/configs/llc_monitor.yaml", "--trainer.logger=false",
              "--trainer.enable_checkpointing=false", "--trainer.max_steps=10"],
        run=False, save_config_callback=None,
    )
    monitors = [c for c in cli.trainer.callbacks if isinstance(c, LLCMonitor)]
    assert len(monitors) == 1
    monitor = monitors[0]
    from examples.configs import losses

    assert monitor.loss_fn is losses.mse
    assert isinstance(monitor.schedule, LogSpaced) and monitor.schedule.per_decade == 10
    assert monitor.monitor_keys() == ["llc/mean", "llc/first/mean", "llc/last/mean"]
    assert (monitor.num_chains, monitor.num_draws, monitor.num_burnin_steps) == (4, 200, 50)
    # and the configured run trains and measures (fewer draws to stay fast)
    monitor.num_draws, monitor.num_burnin_steps = 5, 0
    cli.trainer.fit(cli.model)
    assert monitor.history.steps("llc/last/mean") == [0, 10]


def _calibration_run(tmp_path, at_minimum: bool, calibrate_kwargs=None):
    """A linear regression trained with a calibrating monitor (steps 5 and 10); returns the monitor,
    the top-level calibrate_llc calls and the CSV log directory."""
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import CSVLogger

    from devinterp_lightning.sampling import calibrate as calibrate_module

    torch.manual_seed(0)
    x = torch.randn(256, 4)
    y = x @ torch.randn(4, 2)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64)

    class Regression(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Linear(4, 2)
            if at_minimum:  # start at the least-squares solution; a tiny lr keeps it there
                solution = torch.linalg.lstsq(torch.cat([x, torch.ones(256, 1)], 1), y).solution
                with torch.no_grad():
                    self.net.weight.copy_(solution[:4].T)
                    self.net.bias.copy_(solution[4])

        def training_step(self, batch, batch_idx):
            return torch.nn.functional.mse_loss(self.net(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=1e-6 if at_minimum else 0.1)

    calls = []
    real = calibrate_module.calibrate_llc

    def counting(*args, **kwargs):
        if not kwargs.get("_auto_localization"):  # the localization boosts call it again
            calls.append(kwargs)
        return real(*args, **kwargs)

    calibrate_module.calibrate_llc = counting
    try:
        monitor = LLCMonitor(
            lambda m, b: torch.nn.functional.mse_loss(m.net(b[0]), b[1]), data=loader, every_n_steps=[5, 10],
            num_chains=2, num_draws=60, num_burnin_steps=30, calibrate="once", lr=123.0,
            calibrate_kwargs=calibrate_kwargs,
        )
        trainer = pl.Trainer(
            max_steps=12, logger=CSVLogger(tmp_path), callbacks=[monitor], enable_progress_bar=False,
            enable_model_summary=False, default_root_dir=tmp_path,
        )
        trainer.fit(Regression(), loader)
    finally:
        calibrate_module.calibrate_llc = real
    return monitor, calls, tmp_path / "lightning_logs" / "version_0"


def test_calibrate_once_chooses_settings_once_and_logs_them(tmp_path):
    """At a minimum, calibrate="once" calibrates at the first scheduled step only, samples every
    later estimate with the chosen settings, logs them as hyperparameters and keeps them in the
    checkpoint."""
    import csv

    from devinterp_lightning.callbacks.monitor_support import MONITOR_CALIBRATION_REL_TOL

    monitor, calls, logdir = _calibration_run(tmp_path, at_minimum=True)
    assert len(calls) == 1
    # the monitor keeps its own short layout, so it calibrates with the 5% floor, not calibrate_llc's 1%
    assert calls[0]["rel_tol"] == MONITOR_CALIBRATION_REL_TOL == 0.05
    assert monitor.calibration.ok, monitor.calibration.summary()
    chosen = monitor.calibration.as_kwargs()
    assert monitor.lr == chosen["lr"] != 123.0
    for res in monitor.last_results.values():
        assert res.lr == chosen["lr"] and res.localization == chosen["localization"]
    assert monitor.state_dict()["calibrated_settings"]["lr"] == chosen["lr"]
    assert "llc/calibrated/lr" in (logdir / "hparams.yaml").read_text()
    with open(logdir / "metrics.csv") as f:
        steps = [row["step"] for row in csv.DictReader(f) if row.get("llc/mean")]
    assert steps == ["5", "10"]
    restored = LLCMonitor(lambda m, b: 0.0, data=monitor._data, calibrate="once")
    restored.load_state_dict(monitor.state_dict())
    assert restored.lr == chosen["lr"] and restored.localization == chosen["localization"]


def test_calibrate_kwargs_override_the_monitors_bias_floor(tmp_path):
    _, calls, _ = _calibration_run(tmp_path, at_minimum=True, calibrate_kwargs={"rel_tol": 0.01})
    assert [c["rel_tol"] for c in calls] == [0.01]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_calibrate_once_retries_while_the_weights_are_not_at_a_minimum(tmp_path):
    """Far from a minimum (a fresh regression) the calibration falls back: that step is sampled
    with the fallback settings and the next scheduled step calibrates again."""
    monitor, calls, _ = _calibration_run(tmp_path, at_minimum=False)
    assert len(calls) == 2
    assert not monitor.calibration.ok
    assert "calibrated_settings" not in monitor.state_dict()
    assert monitor.history.steps("llc/mean") == [5, 10]
    assert monitor.last_results["llc"].lr == monitor.calibration.lr


def test_an_iterable_dataset_without_max_steps_measures_for_the_whole_run():
    """Regression (#15 item 2): Lightning reports the length of this run as -1 steps; the schedule
    must go on as long as training does instead of refusing to start."""
    from torch.utils.data import IterableDataset

    class Stream(IterableDataset):
        def __iter__(self):
            g = torch.Generator().manual_seed(0)
            for _ in range(6):
                x = torch.randn(16, 6, generator=g)
                yield x, x[:, :2]

    monitor = LLCMonitor(mse, every_n_steps=4, **FAST)
    model = Net()
    t = trainer([monitor], max_steps=-1, max_epochs=2)
    t.fit(model, DataLoader(Stream(), batch_size=None))
    assert t.estimated_stepping_batches in (-1, math.inf)
    assert monitor.history.steps("llc/mean") == [0, 4, 8, 12]


def test_settings_object_keywords_and_defaults():
    from devinterp_lightning.callbacks.llc_monitor import DEFAULT_SETTINGS
    from devinterp_lightning.sampling.settings import SGLDSettings
    from devinterp_lightning.schedule import LogSpaced

    default = LLCMonitor(mse)
    assert default.settings == DEFAULT_SETTINGS
    assert (default.num_chains, default.num_draws, default.num_burnin_steps) == (4, 100, 50)
    assert isinstance(default.schedule, LogSpaced) and default.schedule.due_steps(1000) == [0, 100, 158, 251, 398, 631, 1000]
    given = SGLDSettings(lr=2e-3, localization=30.0, num_chains=3, num_draws=9)
    monitor = LLCMonitor(mse, settings=given, num_draws=7)  # keywords are laid over the settings object
    assert monitor.settings == given.replace(num_draws=7)
    monitor.lr = 5e-3  # the attributes are views of the settings, validated on assignment
    assert monitor.settings.lr == 5e-3
    with pytest.raises(ValueError, match="lr must be a positive"):
        monitor.lr = -1.0
