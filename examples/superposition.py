"""The toy model of superposition learns its features in stages; the LLC is watched while it does.

    python examples/superposition.py                     # ~1 min on 2 CPU cores
    python examples/superposition.py --max-steps 4000 --logdir runs/superposition
    tensorboard --logdir runs/superposition

The toy model of superposition (Elhage et al. 2022) compresses ``n = 6`` sparse features into
``m = 2`` dimensions and decodes them with a ReLU: ``h = W x``, ``x' = ReLU(W^T h + b)``. Each
feature is nonzero with probability ``p = 0.1`` (then uniform in [0, 1]) and has importance
``0.9^i`` in the loss ``sum_i I_i (x_i - x'_i)^2``. Trained by full-batch gradient descent from a
small initialization, it sits on a plateau at the origin, then represents features one after
another (the columns of ``W`` grow), and later rearranges them in the plane (a second loss drop,
in which the number of represented features briefly falls and rises again). Chen et al. (2023,
"Dynamical versus Bayesian phase transitions in a toy model of superposition") relate such steps
to changes of the LLC.

The script logs ``tms/features`` (columns of ``W`` with norm above 0.5) and ``tms/loss``, runs the
:class:`~devinterp_lightning.LLCMonitor` every ``--llc-every`` steps and a
:class:`~devinterp_lightning.StageDetector` on ``llc/mean``, and prints the steps where the feature
count changes, the loss drops (found from the loss curve alone) and the detected LLC transitions
side by side. What was measured: docs/examples.md.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make ``examples._common`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn

from devinterp_lightning import LLCMonitor, StageDetector
from examples._common import (
    LossRecorder,
    Stopwatch,
    find_loss_drops,
    format_table,
    full_batch_loader,
    nearest,
    set_threads,
)

NUM_FEATURES = 6
HIDDEN = 2
FEATURE_PROB = 0.1
IMPORTANCE_DECAY = 0.9
NUM_SAMPLES = 1024
#: a column of ``W`` with at least this norm counts as a represented feature (learned ones have ~1)
FEATURE_NORM = 0.5

# SGLD settings. The loss is small (~0.04) and flat, so the chains need a larger step than for the
# other examples; lr 1e-3 with localization 100 keeps split R-hat near 1.0-1.1 once features are
# represented (smaller lr: high_rhat everywhere). nbeta=None: n/log(n) = 148 for the 1024 samples.
LLC_SETTINGS = dict(lr=1e-3, localization=100.0, nbeta=None, num_chains=8, num_draws=200, num_burnin_steps=50)


def sparse_features(num_samples: int = NUM_SAMPLES, n: int = NUM_FEATURES, p: float = FEATURE_PROB,
                    seed: int = 0) -> torch.Tensor:
    """``x_i = u_i * [v_i < p]`` with ``u, v ~ U[0, 1]`` independent: each feature is on with probability ``p``."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(num_samples, n, generator=g) * (torch.rand(num_samples, n, generator=g) < p)


def importance(n: int = NUM_FEATURES, decay: float = IMPORTANCE_DECAY) -> torch.Tensor:
    """``I_i = decay^i``: feature 0 matters most."""
    return decay ** torch.arange(n, dtype=torch.float32)


def loss_fn(model: nn.Module, batch: Any) -> torch.Tensor:
    """Importance-weighted reconstruction error ``sum_i I_i (x_i - x'_i)^2``, averaged over the batch."""
    (x,) = batch
    return (model.importance * (model(x) - x).pow(2)).sum(dim=1).mean()


class ToyModel(pl.LightningModule):
    """``x' = ReLU(W^T W x + b)`` with ``W`` of shape ``[m, n]``, entries ``N(0, init_scale^2)``.

    Logs ``tms/loss`` every step and, every ``log_every`` steps, ``tms/features`` (columns of
    ``W`` with norm above :data:`FEATURE_NORM`); :attr:`feature_counts` keeps ``(step, count)``.
    """

    def __init__(self, n: int = NUM_FEATURES, m: int = HIDDEN, init_scale: float = 0.01, lr: float = 0.05,
                 importance_decay: float = IMPORTANCE_DECAY, log_every: int = 10) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.W = nn.Parameter(init_scale * torch.randn(m, n))
        self.b = nn.Parameter(torch.zeros(n))
        self.register_buffer("importance", importance(n, importance_decay))
        self.feature_counts: list[tuple[int, int]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x @ self.W.T @ self.W + self.b)

    def represented(self) -> int:
        return int((self.W.detach().norm(dim=0) > FEATURE_NORM).sum())

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = loss_fn(self, batch)
        self.log("tms/loss", loss, prog_bar=True)
        if self.global_step % self.hparams.log_every == 0:
            k = self.represented()
            self.feature_counts.append((self.global_step, k))
            self.log("tms/features", float(k), prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # plain full-batch gradient descent: Adam crosses all the stages within ~300 steps
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


def count_changes(counts: list[tuple[int, int]]) -> list[dict[str, int]]:
    """Steps where the number of represented features changes: ``{step, before, after}``."""
    return [{"step": s, "before": k0, "after": k} for (s0, k0), (s, k) in zip(counts, counts[1:], strict=False)
            if k != k0]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--logdir", default="runs/superposition", help="TensorBoard logs")
    p.add_argument("--max-steps", type=int, default=3000, help="full-batch gradient steps")
    p.add_argument("--seed", type=int, default=0, help="seeds the initialization and the SGLD chains")
    p.add_argument("--data-seed", type=int, default=0, help="seeds the sparse features")
    p.add_argument("--llc-every", type=int, default=50, help="estimate the LLC every this many steps")
    p.add_argument("--num-draws", type=int, default=LLC_SETTINGS["num_draws"], help="SGLD draws per chain")
    p.add_argument("--llc-lr", type=float, default=LLC_SETTINGS["lr"], help="SGLD step size")
    p.add_argument("--localization", type=float, default=LLC_SETTINGS["localization"], help="SGLD localization")
    p.add_argument("--threads", type=int, default=1, help="torch threads (more only adds overhead here)")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no tables")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train, detect the transitions, print the tables; return every number the tables show."""
    args = parse_args(argv)
    set_threads(args.threads)
    pl.seed_everything(args.seed, verbose=False)
    logdir = Path(args.logdir)

    x = sparse_features(seed=args.data_seed)
    model = ToyModel()
    monitor = LLCMonitor(
        loss_fn, data=full_batch_loader((x,)), every_n_steps=args.llc_every, seed=args.seed,
        progress=not args.quiet,
        **{**LLC_SETTINGS, "num_draws": args.num_draws, "lr": args.llc_lr, "localization": args.localization},
    )
    detector = StageDetector(monitor="llc/mean", turning_points=False)
    losses = LossRecorder()
    trainer = pl.Trainer(
        max_steps=args.max_steps, accelerator="cpu", devices=1, logger=TensorBoardLogger(logdir, name="", version=""),
        callbacks=[monitor, detector, losses], log_every_n_steps=10, enable_checkpointing=False,
        enable_model_summary=False, enable_progress_bar=not args.quiet,
    )
    with Stopwatch() as clock:
        trainer.fit(model, full_batch_loader((x,), num_batches=args.max_steps))

    series = monitor.history.get("llc/mean")
    changes = count_changes(model.feature_counts)
    drops = find_loss_drops(losses.steps, losses.values, min_factor=1.2)
    transitions = [t.to_dict() for t in detector.transitions]
    change_steps = [c["step"] for c in changes]
    result = {
        "feature_counts": {"steps": [s for s, _ in model.feature_counts], "counts": [k for _, k in model.feature_counts]},
        "count_changes": changes,
        "loss_drops": [asdict(d) for d in drops],
        "transitions": transitions,
        "stages": [s.to_dict() for s in detector.stages],
        "llc": {"steps": [p.step for p in series], "values": [p.value for p in series],
                "std": [p.std for p in series], "flags": [list(p.flags) for p in series]},
        "final_features": model.represented(),
        "final_loss": losses.values[-1] if losses.values else float("nan"),
        "feature_norms": model.W.detach().norm(dim=0).tolist(),
        "train_seconds": clock.seconds, "logdir": str(logdir),
    }
    if not args.quiet:
        print()
        print("Represented features (columns of W with norm > 0.5) and loss drops (from the loss curve):")
        print("  feature count changes: " + (", ".join(f"{c['step']}: {c['before']}->{c['after']}" for c in changes)
                                             or "none"))
        print("  loss drops: " + (", ".join(f"{d.step} ({d.start}-{d.end}, x{d.factor:.2f})" for d in drops) or "none"))
        print()
        print("LLC changepoints (StageDetector on llc/mean) vs the nearest feature-count change:")
        rows = []
        for t in transitions:
            c = nearest(t["changepoint_step"], change_steps)
            rows.append([t["changepoint_step"], t["step"], t["direction"], t["level_before"], t["level_after"], c,
                         None if c is None else t["changepoint_step"] - c])
        print(format_table(["LLC onset", "confirmed", "direction", "LLC before", "LLC after", "count change",
                            "onset - change"], rows) if rows else "(none detected)")
        print()
        step_rows = [[p.step, model_count_at(model.feature_counts, p.step), p.value, p.std, ",".join(p.flags) or None]
                     for p in series if p.step % (4 * args.llc_every) == 0]
        print(format_table(["step", "features", "LLC", "std", "flags"], step_rows))
        print(f"\nFinal: {result['final_features']} features, loss {result['final_loss']:.4f}; "
              f"training with the monitor took {clock.seconds:.0f} s; TensorBoard: tensorboard --logdir {logdir}")
    return result


def model_count_at(counts: list[tuple[int, int]], step: int) -> int | None:
    """The feature count logged at the latest step not after ``step``."""
    known = [k for s, k in counts if s <= step]
    return known[-1] if known else None


if __name__ == "__main__":
    main()
