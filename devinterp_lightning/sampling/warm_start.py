"""Warm-started chains: carry the SGLD chains' offsets ``w - w*`` from one estimate to the next.

A chain started at ``w*`` spends its burn-in relaxing to the localized posterior: in a direction
of curvature ``h`` the offset's variance grows like ``1 - exp(-lr * (nbeta * h + localization) * t)``,
so the flat directions, held only by the localization, need ``~ 1 / (lr * localization)`` steps
(200 at the monitor's defaults ``lr = 1e-4``, ``localization = 100``), more than the default
burn-in of 50. Between two estimates of a training run, ``w*`` moves little and the posterior's
shape even less, so the last state of the previous chains, re-centred on the new ``w*``, is
already close to a draw from the new posterior: the new chains need only a short burn-in, and
their flat directions keep equilibrating across estimates instead of restarting from zero.

Memory: ``num_chains`` offsets per moving parameter (per restriction), held in host memory
between estimates, so an accelerator's memory is not taken from training.

The state is explicit, as in a torchmetrics ``Metric``: :class:`ChainOffsets` holds one
``[num_lanes, moving entries]`` tensor per group of jobs sampled together, ``lookup`` returns it
when the next run has the same layout (else None: a cold start) and ``update`` replaces it.
Nothing here touches a model or an RNG.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["ChainOffsets"]


@dataclass
class ChainOffsets:
    """The chains' last offsets per job group, and the burn-in a warm-started run keeps.

    Args:
        burnin_steps: burn-in steps of a warm-started run (the cold-start burn-in of the
            settings applies when no offsets of the right layout are held). A run takes
            ``min(settings.num_burnin_steps, burnin_steps)``.
    """

    burnin_steps: int = 10
    offsets: dict[Hashable, Tensor] = field(default_factory=dict)
    #: how many runs started warm / cold (for the docs' measurements and tests)
    warm_runs: int = 0
    cold_runs: int = 0
    #: how many runs' offsets were dropped because the estimate showed the chains off the posterior
    discarded: int = 0

    def __post_init__(self) -> None:
        if not (isinstance(self.burnin_steps, int) and self.burnin_steps >= 0):
            raise ValueError(f"burnin_steps must be an int >= 0; got {self.burnin_steps!r}")

    def lookup(self, key: Hashable, shape: tuple[int, ...]) -> Tensor | None:
        """The stored offsets for ``key`` if they have ``shape`` and are finite; else None (start cold)."""
        stored = self.offsets.get(key)
        fits = stored is not None and tuple(stored.shape) == tuple(shape) and bool(torch.isfinite(stored).all())
        if fits:
            self.warm_runs += 1
            return stored
        self.cold_runs += 1
        return None

    def update(self, key: Hashable, final_offsets: Tensor) -> None:
        # kept in host memory: between estimates the accelerator's memory belongs to training
        self.offsets[key] = final_offsets.detach().to("cpu", copy=True)

    def discard(self, key: Hashable) -> None:
        """Forget ``key``'s offsets (the next run of that group starts at ``w*``)."""
        self.offsets.pop(key, None)
        self.discarded += 1

    def reset(self) -> None:
        """Forget every stored offset: the next run of every group starts at ``w*``."""
        self.offsets.clear()
