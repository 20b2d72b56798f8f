"""An endless batch stream from a user's loader, moved to the sampling device and dtype."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from itertools import islice
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_unflatten
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
    TensorDataset,
)
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
    ``generator`` (a DataLoader draws even a sequential epoch's base seed from the global RNG).
    For a ``generator`` in the state of the loader's own ``generator``, these are the loader's
    batches exactly."""
    batch_sampler = loader.batch_sampler
    size = len(loader.dataset)  # type: ignore[arg-type]
    if type(batch_sampler.sampler) is RandomSampler:  # type: ignore[union-attr]
        # A DataLoader first draws its iterator's base seed from its generator, then the sampler
        # its permutation: the same two draws give the loader's own order for the same state.
        torch.empty((), dtype=torch.int64).random_(generator=generator)
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
    passes = 0
    while True:
        empty = True
        for batch in iterate_once(loader, generator):
            empty = False
            yield to_device(batch, device, dtype)
        if empty:
            if passes and iter(loader) is loader:  # type: ignore[call-overload]
                raise ValueError(
                    "data must be re-iterable (a list of batches or a DataLoader): the sampler goes "
                    f"through it more than once, but the {type(loader).__name__} passed was used up "
                    "after one pass (a generator or an iterator yields its batches only once)"
                )
            raise ValueError("the loader yielded no batches; pass a loader with at least one batch")
        passes += 1


def supports_replacement(loader: Iterable[Any]) -> bool:
    """True for a DataLoader over a map-style dataset (indexable, with a length) with a batch size:
    its batches can be drawn sample by sample with replacement."""
    return (
        isinstance(loader, DataLoader)
        and not isinstance(loader.dataset, IterableDataset)
        and hasattr(loader.dataset, "__len__")
        and isinstance(loader.batch_size, int)
        and loader.batch_size > 0
    )


def replacement_stream(
    loader: DataLoader, device: torch.device, dtype: torch.dtype | None, generator: torch.Generator
) -> Iterator[Any]:
    """Endless batches of ``loader.batch_size`` samples drawn uniformly *with replacement* from
    ``loader.dataset`` with ``generator`` (i.i.d. batches, whatever the loader's own order).

    A TensorDataset with the default collate is indexed in bulk (the same tensors that collating
    the samples one by one would give); any other dataset is fetched sample by sample and collated
    with the loader's ``collate_fn``.
    """
    dataset = loader.dataset
    size, batch_size = len(dataset), int(loader.batch_size)  # type: ignore[arg-type]
    if size == 0:
        raise ValueError("the loader's dataset is empty; pass a loader with at least one sample")
    fast = type(dataset) is TensorDataset and loader.collate_fn is default_collate
    while True:
        index = torch.randint(size, (batch_size,), generator=generator)
        if fast:
            batch: Any = [t[index] for t in dataset.tensors]  # type: ignore[attr-defined]
        else:
            batch = loader.collate_fn([dataset[i] for i in index.tolist()])
        yield to_device(batch, device, dtype)


def stacked_replacement_streams(
    loader: DataLoader, device: torch.device, dtype: torch.dtype | None, generators: Sequence[torch.Generator]
) -> Iterator[tuple[list[Any], Any]]:
    """Per step ``(batches, stacked)``: stream ``s`` draws ``batch_size`` indices with replacement with
    ``generators[s]`` (the same indices as :func:`replacement_stream` would), and a TensorDataset is
    gathered for all streams at once into ``[S, batch_size, ...]`` tensors; ``batches`` are views."""
    dataset = loader.dataset
    size, batch_size = len(dataset), int(loader.batch_size)  # type: ignore[arg-type]
    if size == 0:
        raise ValueError("the loader's dataset is empty; pass a loader with at least one sample")
    tensors = dataset.tensors  # type: ignore[attr-defined]
    while True:
        index = torch.stack([torch.randint(size, (batch_size,), generator=g) for g in generators])
        stacked = to_device([t[index] for t in tensors], device, dtype)
        yield [[t[s] for t in stacked] for s in range(len(generators))], stacked


def bulk_replacement(loader: Iterable[Any]) -> bool:
    """True when per-chain i.i.d. batches can be gathered in bulk (:func:`stacked_replacement_streams`)."""
    return (
        supports_replacement(loader)
        and type(loader.dataset) is TensorDataset  # type: ignore[attr-defined]
        and loader.collate_fn is default_collate  # type: ignore[attr-defined]
    )


def _cyclic_order(loader: Iterable[Any]) -> bool:
    """True when every pass over ``loader`` gives the same batches in the same order (a list or
    tuple of batches, or a DataLoader with a sequential sampler)."""
    if isinstance(loader, (list, tuple)):
        return True
    return _private_order(loader) and type(loader.batch_sampler.sampler) is SequentialSampler  # type: ignore[attr-defined]


def chain_streams(
    loader: Iterable[Any],
    device: torch.device,
    dtype: torch.dtype | None,
    generators: Sequence[torch.Generator],
    replacement: bool = False,
) -> Iterator[list[Any]]:
    """One batch per stream per step: ``len(generators)`` independent endless streams of ``loader``.

    Stream ``s`` orders its batches with ``generators[s]``: its own shuffle of a map-style
    DataLoader, or (``replacement``) its own i.i.d. draws with replacement. A loader whose passes
    all look alike (a list of batches, a sequential DataLoader) cannot be reordered; stream ``s``
    then starts its cycle ``s * m // S`` batches in (``m`` batches a pass), so that the streams see
    different batches at every step. Any other loader is iterated separately by every stream
    (it draws its order from the global RNG, which the caller forks).
    """
    num = len(generators)
    if replacement:
        streams = [replacement_stream(loader, device, dtype, g) for g in generators]  # type: ignore[arg-type]
    else:
        streams = [batch_stream(loader, device, dtype, g) for g in generators]
        if _cyclic_order(loader):
            per_pass = len(loader)  # type: ignore[arg-type]
            streams = [islice(st, s * per_pass // num, None) for s, st in enumerate(streams)]
    while True:
        yield [next(st) for st in streams]


def _joined(batches: Sequence[Any], join: Callable[[Sequence[Tensor]], Tensor]) -> Any | None:
    """``join`` applied leaf by leaf across the batches, or None when they cannot be joined
    (different structures, non-tensor leaves or different shapes, e.g. a short last batch)."""
    flat = [tree_flatten(b) for b in batches]
    spec = flat[0][1]
    if any(f[1] != spec for f in flat):
        return None
    columns = list(zip(*(f[0] for f in flat), strict=True))
    if not columns:
        return None
    for column in columns:
        if not all(isinstance(t, Tensor) for t in column) or len({t.shape for t in column}) > 1:
            return None
    return tree_unflatten([join(column) for column in columns], spec)


def stack_batches(batches: Sequence[Any]) -> Any | None:
    """The batches stacked leaf by leaf along a new leading dimension, or None when they cannot be
    (different structures, non-tensor leaves or different shapes, e.g. a short last batch)."""
    return _joined(batches, torch.stack)


def concat_batches(batches: Sequence[Any]) -> Any | None:
    """Batches of equal structure and shapes joined leaf by leaf along their leading dimension
    (e.g. stacked ``[S, ...]`` stream batches of several steps into one ``[steps * S, ...]``), or None."""
    return _joined(batches, torch.cat)


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
