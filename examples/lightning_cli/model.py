"""The deep linear network of ``examples/deep_linear_network.py`` as LightningCLI building blocks.

``config.yaml`` refers to these by import path: the model class, the data module and the loader
the LLCMonitor samples on (``examples.lightning_cli.model.probe_loader``).
"""

from __future__ import annotations

import lightning.pytorch as pl
from torch.utils.data import DataLoader

from examples._common import full_batch_loader
from examples.deep_linear_network import NOISE, NUM_SAMPLES, DeepLinearNetwork, teacher_data

__all__ = ["DeepLinearNetwork", "TeacherData", "probe_loader"]


class TeacherData(pl.LightningDataModule):
    """``y = T x + noise`` from a rank-3 teacher, served as one full batch per step."""

    def __init__(self, num_samples: int = NUM_SAMPLES, noise: float = NOISE, seed: int = 0,
                 num_batches: int = 100_000) -> None:
        super().__init__()
        self.save_hyperparameters()

    def train_dataloader(self) -> DataLoader:
        h = self.hparams
        # one epoch of num_batches identical full batches; trainer.max_steps ends the run
        return full_batch_loader(teacher_data(h.num_samples, h.noise, h.seed).tensors, h.num_batches)


def probe_loader(seed: int = 0) -> DataLoader:
    """The data LLCMonitor samples on: the training set as one batch (``nbeta`` = n / log n = 148)."""
    return full_batch_loader(teacher_data(seed=seed).tensors)
