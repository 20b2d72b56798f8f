"""An endless batch stream from a user's loader, moved to the sampling device and dtype."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data._utils.collate import default_collate


def to_device(batch: Any, device: torch.device, dtype: torch.dtype | None) -> Any:
    """Move every tensor in a (nested) batch to ``device``; floating tensors also to ``dtype``.

    Converting floating inputs matters for bf16/fp16 models: the sampler runs on float32 copies
    of the weights, so the inputs must be float32 too.
    """
    if isinstance(batch, Tensor):
        if dtype is not None and batch.is_floating_point() and batch.dtype != dtype:
            return batch.to(device=device, dtype=dtype)
        return batch.to(device=device)
    if isinstance(batch, dict):
        return {k: to_device(v, device, dtype) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(to_device(v, device, dtype) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device, dtype) for v in batch)
    return batch


def _tensor_fast_path(loader: Iterable[Any]) -> bool:
    """A plain DataLoader over a TensorDataset can be sliced instead of collated sample by sample."""
    return (
        isinstance(loader, DataLoader)
        and type(loader.dataset) is TensorDataset
        and loader.collate_fn is default_collate
        and loader.batch_sampler is not None
        and loader.num_workers == 0
    )


def _iterate_once(loader: Iterable[Any]) -> Iterator[Any]:
    if _tensor_fast_path(loader):
        tensors = loader.dataset.tensors  # type: ignore[attr-defined]
        # The batch sampler draws its shuffle from the same RNG the DataLoader would use, and the
        # sliced batch equals what default_collate would build: a list of stacked tensors.
        for indices in loader.batch_sampler:  # type: ignore[union-attr]
            index = torch.as_tensor(indices, dtype=torch.long)
            yield [t[index] for t in tensors]
    else:
        yield from loader


def batch_stream(loader: Iterable[Any], device: torch.device, dtype: torch.dtype | None) -> Iterator[Any]:
    """Cycle through ``loader`` forever (re-iterating it, so a shuffling loader reshuffles)."""
    while True:
        empty = True
        for batch in _iterate_once(loader):
            empty = False
            yield to_device(batch, device, dtype)
        if empty:
            raise ValueError("the loader yielded no batches; pass a loader with at least one batch")


def batch_size_of(loader: Iterable[Any], first_batch: Any) -> int | None:
    """The number of samples per batch: ``loader.batch_size`` or the leading dim of the first tensor."""
    size = getattr(loader, "batch_size", None)
    if isinstance(size, int) and size > 0:
        return size

    def first_tensor(x: Any) -> Tensor | None:
        if isinstance(x, Tensor):
            return x
        values = x.values() if isinstance(x, dict) else x if isinstance(x, (list, tuple)) else ()
        for v in values:
            t = first_tensor(v)
            if t is not None:
                return t
        return None

    t = first_tensor(first_batch)
    if t is None or t.ndim == 0:
        return None
    return int(t.shape[0])
