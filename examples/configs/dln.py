"""A deep linear network trained on a low-rank teacher: the small model of the LLC examples.

Everything is generated in tensors from a seed (nothing is downloaded). A deep linear network
``x -> W_L ... W_1 x`` from a small initialization learns the teacher's singular directions one
at a time, so its LLC rises in steps: a clear test case for the monitor and the stage detector.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def teacher_data(
    num_samples: int = 1024, width: int = 16, rank: int = 3, noise: float = 0.1, seed: int = 0,
    teacher_seed: int = 0,
) -> TensorDataset:
    """``y = T x + noise`` with a rank-``rank`` teacher ``T`` with singular values 4, 3, 2, ...

    ``teacher_seed`` fixes the teacher, ``seed`` the samples: held-out data keeps the teacher and
    changes ``seed``.
    """
    t = torch.Generator().manual_seed(teacher_seed)
    u, _ = torch.linalg.qr(torch.randn(width, width, generator=t))
    v, _ = torch.linalg.qr(torch.randn(width, width, generator=t))
    singular = torch.zeros(width)
    singular[:rank] = torch.arange(rank + 1, 1, -1, dtype=torch.float32)
    teacher = u @ torch.diag(singular) @ v.T
    g = torch.Generator().manual_seed(seed + 1_000_003)
    x = torch.randn(num_samples, width, generator=g)
    y = x @ teacher.T + noise * torch.randn(num_samples, width, generator=g)
    return TensorDataset(x, y)


def probe_loader(batch_size: int = 64, seed: int = 1) -> DataLoader:
    """Held-out samples of the training teacher for the monitor (``data: examples.configs.dln.probe_loader``)."""
    return DataLoader(teacher_data(512, seed=seed), batch_size=batch_size, shuffle=True)


class DeepLinearNetwork(pl.LightningModule):
    """``depth`` bias-free linear layers of width ``width``, initialized at scale ``init_scale``."""

    def __init__(
        self, width: int = 16, depth: int = 4, rank: int = 3, init_scale: float = 0.3, lr: float = 0.05,
        batch_size: int = 64, num_samples: int = 1024, data_seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.layers = nn.Sequential(*[nn.Linear(width, width, bias=False) for _ in range(depth)])
        with torch.no_grad():
            for layer in self.layers:
                layer.weight.normal_(0.0, init_scale / width**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.mse_loss(self(x), y)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)

    def train_dataloader(self) -> DataLoader:
        h = self.hparams
        data = teacher_data(h.num_samples, h.width, h.rank, seed=h.data_seed)
        return DataLoader(data, batch_size=h.batch_size, shuffle=True)
