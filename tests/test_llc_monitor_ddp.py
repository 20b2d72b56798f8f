"""LLCMonitor under DDP: chains split across 2 CPU processes (gloo), gathered and re-summarized."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from devinterp_lightning import LLCMonitor
from devinterp_lightning.callbacks.llc_monitor import _derive_seed
from devinterp_lightning.sampling.estimator import estimate_llcs
from devinterp_lightning.sampling.result import summarize_chains

SETTINGS = dict(lr=1e-3, localization=100.0, nbeta=10.0, num_chains=4, num_draws=10, num_burnin_steps=2, seed=3)


def mse(model: nn.Module, batch: Any) -> torch.Tensor:
    x, y = batch
    return F.mse_loss(model(x), y)


def dataset(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g)
    return TensorDataset(x, x @ torch.randn(5, 1, generator=g))


class Net(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return mse(self, batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(dataset(64, 0), batch_size=8, shuffle=True)


class Dump(Callback):
    """Each rank writes what it saw, so the test can compare ranks."""

    def __init__(self, monitor: LLCMonitor, out: str) -> None:
        self.monitor = monitor
        self.out = out

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        record = {
            "history": self.monitor.history.state_dict(),
            "metrics": {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("llc")},
            "num_chains": {k: r.num_chains for k, r in self.monitor.last_results.items()},
            "world_size": trainer.world_size,
        }
        Path(self.out, f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


@pytest.mark.slow
def test_ddp_spawn_splits_chains_and_every_rank_sees_the_same_values(tmp_path: Path):
    probe = DataLoader(dataset(32, 7), batch_size=8)
    monitor = LLCMonitor(mse, data=probe, every_n_steps=2, restrictions={"out": "net.2.*"}, **SETTINGS)
    pl.seed_everything(0)
    model = Net()
    initial = Net()
    initial.load_state_dict(model.state_dict())
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=4, callbacks=[monitor, Dump(monitor, str(tmp_path))],
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(model)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["world_size"] == 2
    assert ranks[0]["history"] == ranks[1]["history"]
    assert ranks[0]["metrics"] == ranks[1]["metrics"]
    assert set(ranks[0]["metrics"]) == {"llc/mean", "llc/std", "llc/out/mean", "llc/out/std"}
    assert ranks[0]["num_chains"] == {"llc": 4, "llc/out": 4}  # 2 chains per rank, gathered
    assert [p["step"] for p in ranks[0]["history"]["llc/mean"]] == [0, 2, 4]

    # step 0: the gathered estimate is exactly rank 0's chains followed by rank 1's, each run with its
    # rank's seed, summarized together
    jobs = {"llc": (probe, None), "llc/out": (probe, "net.2.*")}
    per_rank = [
        estimate_llcs(initial, mse, jobs, **{**{k: v for k, v in SETTINGS.items() if k != "seed"}, "num_chains": 2},
                      seed=_derive_seed(SETTINGS["seed"], 0, r))
        for r in range(2)
    ]
    for name in jobs:
        expected = summarize_chains(
            torch.cat([p[name].loss_trace for p in per_rank]), torch.cat([p[name].init_loss_trace for p in per_rank]),
            SETTINGS["nbeta"], lr=SETTINGS["lr"], localization=SETTINGS["localization"],
        )
        got = ranks[0]["history"][f"{name}/mean"][0]
        assert got["value"] == pytest.approx(expected.mean, rel=1e-6)
        assert got["std"] == pytest.approx(expected.std, rel=1e-6)
