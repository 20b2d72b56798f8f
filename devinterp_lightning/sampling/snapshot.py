"""Taking a snapshot of a model without disturbing it: copies, modes, restrictions, RNG forks.

Everything that touches the live module or the process-wide random state on the sampler's
behalf lives here, so the estimator, the calibration and the callbacks share one implementation
of "leave the training run exactly as it was":

* :func:`copy_tensor` / :func:`take_snapshot`: detached copies of parameters and buffers;
* :func:`preserved_modes`: eval mode for the block, every submodule's train/eval flag restored;
* :func:`resolve_restriction`: a user's restriction (globs or masks) as ``{name: bool mask}``;
* :func:`forked_rng`: run a block on a fork of the global torch (and optionally Python and
  NumPy) random state, restored afterwards;
* :func:`cuda_devices`: the CUDA device indices a fork must cover for a given device.
"""

from __future__ import annotations

import fnmatch
import random
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

#: None (all parameters) | a glob | a list of globs over ``named_parameters()`` names |
#: ``{parameter name: bool mask of the parameter's shape}``.
Restriction = str | Sequence[str] | Mapping[str, Tensor] | None

__all__ = [
    "Restriction",
    "Snapshot",
    "copy_tensor",
    "cuda_devices",
    "forked_rng",
    "preserved_modes",
    "resolve_restriction",
    "take_snapshot",
]


def copy_tensor(t: Tensor, device: torch.device, dtype: torch.dtype | None) -> Tensor:
    """A detached copy on ``device``; floating tensors in ``dtype`` (float32 copies of bf16 weights)."""
    target = dtype if (dtype is not None and t.is_floating_point()) else t.dtype
    return t.detach().to(device=device, dtype=target, copy=True)


@dataclass
class Snapshot:
    """Detached copies of a model's parameters and buffers, by ``named_parameters()`` name."""

    params: dict[str, Tensor]
    buffers: dict[str, Tensor]


def take_snapshot(model: nn.Module, device: torch.device, dtype: torch.dtype | None) -> Snapshot:
    """Copy every parameter and buffer of ``model`` to ``device`` (floating ones in ``dtype``)."""
    return Snapshot(
        params={n: copy_tensor(p, device, dtype) for n, p in model.named_parameters()},
        buffers={n: copy_tensor(b, device, dtype) for n, b in model.named_buffers()},
    )


@contextmanager
def preserved_modes(model: nn.Module, eval_mode: bool = True) -> Iterator[None]:
    """Put the model in eval mode (if asked) and restore every submodule's mode afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        if eval_mode:
            model.eval()
        yield
    finally:
        for module, training in modes:
            module.training = training


def cuda_devices(device: torch.device | str | None) -> list[int]:
    """The CUDA device indices an RNG fork must cover for ``device``: ``[]`` off CUDA, and the
    *current* CUDA device for a bare ``"cuda"`` (not device 0)."""
    if device is None:
        return []
    device = torch.device(device)
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]


@contextmanager
def forked_rng(devices: Sequence[int] = (), *, host: bool = False, seed: int | None = None) -> Iterator[None]:
    """Run the block on a fork of the global torch RNG (CPU and the CUDA ``devices``), restored
    afterwards, so nothing inside advances the caller's random stream.

    Args:
        devices: CUDA device indices whose generators are forked too (see :func:`cuda_devices`).
        host: also save and restore Python's ``random`` and NumPy's global state (user code such
            as a DataLoader's worker seeding or a collate function may draw from them).
        seed: reseed the *fork* (never the caller's stream) with this value, for blocks whose
            randomness can only come from the global generator and must be reproducible.
    """
    py_state = random.getstate() if host else None
    np_state = np.random.get_state() if host else None
    with torch.random.fork_rng(devices=list(devices)):
        try:
            if seed is not None:
                torch.default_generator.manual_seed(seed)
            yield
        finally:
            if host:
                random.setstate(py_state)
                np.random.set_state(np_state)


def resolve_restriction(restrict: Restriction, named: Mapping[str, Tensor], job: str) -> dict[str, Tensor]:
    """``{name: bool mask}`` of the entries a job moves (only names with at least one True).

    ``restrict`` is None (everything), a glob or list of globs matched with
    :func:`fnmatch.fnmatchcase` against the names of ``named``, or ``{name: bool mask}``.
    Raises ``ValueError`` naming ``job`` and listing the parameters when nothing matches.
    """
    listing = ", ".join(named)
    if restrict is None:
        return {n: torch.ones(p.shape, dtype=torch.bool) for n, p in named.items()}
    if isinstance(restrict, Mapping):
        unknown = [n for n in restrict if n not in named]
        if unknown:
            raise ValueError(
                f"restriction {job!r} names unknown parameters {unknown}; the model's parameters are: {listing}"
            )
        out = {}
        for n, mask in restrict.items():
            mask = torch.as_tensor(mask).detach().cpu()
            if mask.dtype != torch.bool or mask.shape != named[n].shape:
                raise ValueError(
                    f"restriction {job!r}: the mask for {n!r} must be a bool tensor of shape "
                    f"{tuple(named[n].shape)}; got {mask.dtype} {tuple(mask.shape)}"
                )
            if bool(mask.any()):
                out[n] = mask
        if not out:
            raise ValueError(f"restriction {job!r}: every mask is all False, so no weight would move")
        return out
    globs = [restrict] if isinstance(restrict, str) else list(restrict) if isinstance(restrict, Sequence) else []
    if not globs or not all(isinstance(g, str) for g in globs):
        raise ValueError(f"restriction {job!r} must be a glob, a list of globs or a dict of masks; got {restrict!r}")
    matched = {n for n in named if any(fnmatch.fnmatchcase(n, g) for g in globs)}
    if not matched:
        raise ValueError(
            f"restriction {job!r} = {globs} matches no parameter. Globs are matched with "
            f"fnmatch.fnmatchcase against the full names from model.named_parameters() (use e.g. "
            f"'layer2.*' for all of a submodule's parameters). The parameters are: {listing}"
        )
    return {n: torch.ones(named[n].shape, dtype=torch.bool) for n in named if n in matched}
