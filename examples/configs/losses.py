"""Loss functions in the ``loss_fn(model, batch) -> scalar`` form LLCMonitor samples with.

Referenced from YAML by import path, e.g. ``loss_fn: examples.configs.losses.mse``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def mse(model: nn.Module, batch: Any) -> torch.Tensor:
    """Mean squared error of ``model(x)`` against ``y`` for a batch ``(x, y)``."""
    x, y = batch
    return F.mse_loss(model(x), y)


def cross_entropy(model: nn.Module, batch: Any) -> torch.Tensor:
    """Mean cross-entropy of the logits ``model(x)`` against class labels ``y``."""
    x, y = batch
    return F.cross_entropy(model(x), y)
