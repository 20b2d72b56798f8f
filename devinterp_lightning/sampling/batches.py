"""An endless batch stream from a user's loader, moved to the sampling device and dtype."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler, TensorDataset
from torch.utils.data._utils.collate import default_collate

from devinterp_lightning.sampling.snapshot import forked_rng


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


def _private_order(loader: Iterable[Any]) -> bool:
    """True for a map-style DataLoader whose order is a plain shuffle or the identity in batches:
    its batches can be drawn with our own generator instead of the global RNG."""
    if not isinstance(loader, DataLoader) or type(loader.batch_sampler) is not BatchSampler:
        return False
    sampler = loader.batch_sampler.sampler
    if type(sampler) is SequentialSampler:
        return True
    return type(sampler) is RandomSampler and not sampler.replacement and sampler._num_samples is None


def _index_batches(loader: DataLoader, generator: torch.Generator) -> list[Sequence[int]]:
    """One epoch of index batches, in the order the loader's sampler would give, but shuffled with
    ``generator`` (a DataLoader draws even a sequential epoch's base seed from the global RNG)."""
    batch_sampler = loader.batch_sampler
    size = len(loader.dataset)  # type: ignore[arg-type]
    if type(batch_sampler.sampler) is RandomSampler:  # type: ignore[union-attr]
        order: Sequence[int] = torch.randperm(size, generator=generator).tolist()
    else:
        order = range(size)
    step = batch_sampler.batch_size  # type: ignore[union-attr]
    chunks = [order[i : i + step] for i in range(0, size, step)]
    if batch_sampler.drop_last and chunks and len(chunks[-1]) < step:  # type: ignore[union-attr]
        chunks.pop()
    return chunks


def uses_global_rng(loader: Iterable[Any]) -> bool:
    """True when iterating ``loader`` can only be done through the global RNG (any DataLoader we
    cannot order privately, or an unknown iterable); False for lists, tuples and the DataLoaders
    :func:`batch_stream` orders with its own generator."""
    return not (isinstance(loader, (list, tuple)) or _private_order(loader))


@contextmanager
def forked_global_rng(loader: Iterable[Any], seed: int, cuda_devices: list[int]) -> Iterator[None]:
    """Run the block on a fork of the global RNG, restored afterwards, so nothing inside (a
    shuffling loader, dropout when sampling in train mode) advances the caller's stream.

    Only a loader that can draw its order from nowhere but the global RNG gets the fork seeded
    from ``seed`` (for a reproducible order); for all others the global RNG is never reseeded.
    """
    with forked_rng(cuda_devices, seed=seed if uses_global_rng(loader) else None):
        yield


def iterate_once(loader: Iterable[Any], generator: torch.Generator | None) -> Iterator[Any]:
    """One epoch of ``loader``'s batches (ordered with ``generator`` where :func:`batch_stream` would)."""
    if generator is None or not _private_order(loader):
        yield from loader
        return
    dataset = loader.dataset  # type: ignore[attr-defined]
    for indices in _index_batches(loader, generator):  # type: ignore[arg-type]
        if _tensor_fast_path(loader):
            # the sliced batch equals what default_collate builds: a list of stacked tensors
            index = torch.as_tensor(indices, dtype=torch.long)
            yield [t[index] for t in dataset.tensors]
        else:
            # in-process fetch, as a DataLoader with num_workers=0 would do it
            yield loader.collate_fn([dataset[i] for i in indices])  # type: ignore[attr-defined]


def batch_stream(
    loader: Iterable[Any], device: torch.device, dtype: torch.dtype | None, generator: torch.Generator | None = None
) -> Iterator[Any]:
    """Cycle through ``loader`` forever (re-iterating it, so a shuffling loader reshuffles).

    With ``generator``, map-style DataLoaders with a plain shuffle or sequential order are read
    directly, their shuffle drawn from ``generator``: the global RNG is never touched.
    """
    while True:
        empty = True
        for batch in iterate_once(loader, generator):
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
