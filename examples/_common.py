"""Small helpers shared by the examples: a loss recorder, an independent loss-drop finder, tables.

Nothing here is part of the library; the examples import it as ``examples._common`` (run them from
the repository root, or as scripts: each example puts the repository root on ``sys.path``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch


class LossRecorder(pl.Callback):
    """Keeps ``(global_step, loss)`` for every optimizer step, in memory.

    The examples find the loss drops from this series *independently* of the LLC, to check that the
    stages the detector reports line up with what the loss curve shows.
    """

    def __init__(self, key: str = "loss") -> None:
        self.key = key
        self.steps: list[int] = []
        self.values: list[float] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        loss = outputs[self.key] if isinstance(outputs, dict) else outputs
        # global_step has already been incremented: the loss belongs to the step before
        self.steps.append(trainer.global_step - 1)
        self.values.append(float(loss.detach()))


@dataclass(frozen=True)
class LossDrop:
    """A stretch where the (smoothed) log-loss falls fast: ``start``..``end``, steepest at ``step``.

    ``factor`` is ``loss(start) / loss(end)``.
    """

    step: int
    start: int
    end: int
    factor: float


def find_loss_drops(
    steps: Sequence[int],
    losses: Sequence[float],
    *,
    window: int = 9,
    min_rate: float = 2e-3,
    min_factor: float = 2.0,
) -> list[LossDrop]:
    """Steps where the loss drops sharply, found from the loss curve alone.

    The log-loss is smoothed with a running median, then a running mean, of ``window`` points
    (robust to minibatch noise), its slope ``-d log(loss)/d step`` is taken with central differences, and every maximal
    run where the slope exceeds ``min_rate`` (per step: ``2e-3`` = 0.2 % per step) is a candidate.
    A candidate is a drop if the loss falls by at least ``min_factor`` over it; its ``step`` is the
    point of steepest descent.
    """
    s = np.asarray(steps, dtype=float)
    y = np.log(np.maximum(np.asarray(losses, dtype=float), 1e-30))
    if y.size < 3:
        return []
    half = window // 2
    padded = np.pad(y, half, mode="edge")
    smooth = np.array([np.median(padded[i:i + window]) for i in range(y.size)])
    # then a running mean: the median removes outliers, the mean the jitter that would move the argmax
    smooth = np.convolve(np.pad(smooth, half, mode="edge"), np.ones(window) / window, mode="valid")
    rate = -np.gradient(smooth, s)
    drops: list[LossDrop] = []
    i = 0
    while i < y.size:
        if rate[i] <= min_rate:
            i += 1
            continue
        j = i
        while j + 1 < y.size and rate[j + 1] > min_rate:
            j += 1
        factor = math.exp(smooth[i] - smooth[j])
        if factor >= min_factor:
            k = i + int(np.argmax(rate[i:j + 1]))
            drops.append(LossDrop(step=int(s[k]), start=int(s[i]), end=int(s[j]), factor=factor))
        i = j + 1
    return drops


def nearest(value: int, candidates: Sequence[int]) -> int | None:
    """The element of ``candidates`` closest to ``value`` (None if there are none)."""
    return min(candidates, key=lambda c: abs(c - value)) if candidates else None


def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table with right-aligned columns (floats to 3 significant digits)."""

    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.3e}"
        return str(v)

    text = [[str(h) for h in header]] + [[cell(v) for v in row] for row in rows]
    widths = [max(len(r[c]) for r in text) for c in range(len(header))]
    lines = ["  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)) for r in text]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


class RepeatedBatch(torch.utils.data.IterableDataset):
    """The whole data set as one batch, ``num_batches`` times: full-batch gradient descent in one epoch.

    (A ``DataLoader(batch_size=len(data))`` would make every step its own epoch, and Lightning's
    per-epoch bookkeeping then costs more than the step itself.)
    """

    def __init__(self, tensors: Sequence[torch.Tensor], num_batches: int) -> None:
        self.tensors = tuple(tensors)
        self.num_batches = num_batches

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Any:
        for _ in range(self.num_batches):
            yield self.tensors


def full_batch_loader(tensors: Sequence[torch.Tensor], num_batches: int = 1) -> torch.utils.data.DataLoader:
    """A loader that yields ``tuple(tensors)`` (each whole) ``num_batches`` times."""
    return torch.utils.data.DataLoader(RepeatedBatch(tensors, num_batches), batch_size=None)


class Stopwatch:
    """``with Stopwatch() as sw: ...`` then ``sw.seconds``."""

    def __enter__(self) -> Stopwatch:
        self.start = time.perf_counter()
        self.seconds = float("nan")
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start


def set_threads(n: int | None) -> None:
    """Limit torch's intra-op threads (the examples are tiny; more threads only add overhead)."""
    if n:
        torch.set_num_threads(n)


def mark_events(axes: Sequence[Any], milestones: Mapping[str, int | None],
                transitions: Sequence[Mapping[str, Any]]) -> None:
    """On every axis: grey dotted lines at the behavioural milestones (``None``: not reached) and red
    lines at the onsets (``changepoint_step``) of the detected LLC transitions."""
    for ax in axes:
        for step in milestones.values():
            if step is not None:
                ax.axvline(step, color="grey", ls=":", lw=1)
        for t in transitions:
            ax.axvline(t["changepoint_step"], color="tab:red", lw=1, alpha=0.6)
