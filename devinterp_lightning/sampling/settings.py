"""The SGLD settings of one LLC estimate, as one validated dataclass.

:func:`~devinterp_lightning.estimate_llc`, :func:`~devinterp_lightning.estimate_llcs`,
:func:`~devinterp_lightning.calibrate_llc` and :class:`~devinterp_lightning.LLCMonitor` all take
these settings, either as one :class:`SGLDSettings` or as the same-named keyword arguments, and
all validate them here, with the same messages.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

__all__ = ["BATCH_ORDERS", "BATCH_STREAMS", "SGLDSettings"]

#: ``SGLDSettings.batch_streams``: one batch stream for all chains, or one per chain.
BATCH_STREAMS = ("shared", "per_chain")
#: ``SGLDSettings.batch_order``: the loader's own order, or i.i.d. batches drawn with replacement.
BATCH_ORDERS = ("loader", "replacement")


@dataclass(frozen=True)
class SGLDSettings:
    """How the chains of one estimate are run.

    Each chain takes ``num_burnin_steps + (num_draws - 1) * num_steps_bw_draws + 1`` steps of

        w <- w - lr/2 * (nbeta * grad L_batch(w) + localization * (w - w*)) + sqrt(lr) * N(0, 1)

    Attributes:
        lr: SGLD step size (epsilon), > 0.
        localization: strength gamma of the pull back to ``w*``, >= 0.
        nbeta: inverse temperature times sample size; None: ``B / log B`` for batch size ``B``.
        num_chains: independent chains (>= 1).
        num_draws: draws recorded per chain after burn-in (>= 1).
        num_burnin_steps: steps discarded before the first draw (>= 0).
        num_steps_bw_draws: steps between two recorded draws (>= 1).
        batch_streams: ``"shared"``: every chain sees the same batch at each step (the chains of
            a run are then correlated through the batches, and ``stderr`` from the per-chain means
            is too small on noisy data); ``"per_chain"``: every chain draws its own batches, so the
            per-chain estimates are independent (see docs/estimator.md, "Batch streams").
        batch_order: ``"loader"``: the loader's order (one reshuffled epoch after another for a
            shuffling DataLoader); ``"replacement"``: every batch is ``batch_size`` samples drawn
            uniformly with replacement from the loader's map-style dataset, independent of the
            chain's past, which removes the epoch-order bias on noisy data (docs/estimator.md).
    """

    lr: float
    localization: float
    nbeta: float | None = None
    num_chains: int = 4
    num_draws: int = 100
    num_burnin_steps: int = 0
    num_steps_bw_draws: int = 1
    batch_streams: str = "shared"
    batch_order: str = "loader"

    def __post_init__(self) -> None:
        if not (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive finite step size; got {self.lr}")
        if not (isinstance(self.localization, (int, float)) and self.localization >= 0
                and math.isfinite(self.localization)):
            raise ValueError(f"localization must be >= 0 and finite; got {self.localization}")
        if self.nbeta is not None and not (
            isinstance(self.nbeta, (int, float)) and self.nbeta > 0 and math.isfinite(self.nbeta)
        ):
            raise ValueError(f"nbeta must be positive and finite (or None for B/log B); got {self.nbeta}")
        for label, low in (("num_chains", 1), ("num_draws", 1), ("num_burnin_steps", 0), ("num_steps_bw_draws", 1)):
            value = getattr(self, label)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{label} must be an integer >= {low}; got {value!r}")
        for label, allowed in (("batch_streams", BATCH_STREAMS), ("batch_order", BATCH_ORDERS)):
            if getattr(self, label) not in allowed:
                raise ValueError(f"{label} must be one of {list(allowed)}; got {getattr(self, label)!r}")

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The field names, which are also the keyword arguments of the estimator."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_kwargs(cls, settings: SGLDSettings | None = None, **kwargs: Any) -> SGLDSettings:
        """``settings`` with the keyword arguments that are not None laid over it.

        Without ``settings``, ``lr`` and ``localization`` are required keywords.
        """
        unknown = set(kwargs) - set(cls.names())
        if unknown:
            raise TypeError(f"unknown SGLD settings {sorted(unknown)}; the settings are {list(cls.names())}")
        given = {k: v for k, v in kwargs.items() if v is not None}
        if settings is None:
            missing = [k for k in ("lr", "localization") if k not in given]
            if missing:
                raise TypeError(
                    f"missing SGLD settings {missing}: pass them as keywords or as settings=SGLDSettings(...)"
                )
            return cls(**given)
        return dataclasses.replace(settings, **given)

    def replace(self, **changes: Any) -> SGLDSettings:
        return dataclasses.replace(self, **changes)

    def as_kwargs(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def total_steps(self) -> int:
        """Steps per chain: burn-in plus the steps that produce the draws."""
        return self.num_burnin_steps + (self.num_draws - 1) * self.num_steps_bw_draws + 1

    def draw_index(self, step: int) -> int | None:
        """The draw recorded at ``step`` (0-based), or None during burn-in / between draws."""
        since = step - self.num_burnin_steps
        if since < 0 or since % self.num_steps_bw_draws:
            return None
        return since // self.num_steps_bw_draws
