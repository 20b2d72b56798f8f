"""Grokking on modular addition: the LLC jumps when the network memorizes and falls as it generalizes.

    python examples/grokking.py                      # ~1.5 min on 2 CPU cores
    python examples/grokking.py --max-steps 3000 --logdir runs/grokking
    tensorboard --logdir runs/grokking

The task is ``(a, b) -> (a + b) mod 31``. Half of the 961 pairs are the training set, the other
half the test set. The model embeds both operands with one shared 32-dimensional embedding,
concatenates them, applies one ReLU layer of width 64 and reads out 31 logits. Trained full-batch
with AdamW (lr 1e-2, weight decay 2) it *memorizes* the training set within ~100 steps (train
accuracy 1.0, test accuracy at chance), and only much later *generalizes* (test accuracy rises
from ~0.05 at step 600 to ~0.85 at step 2000): grokking (Power et al. 2022).

The :class:`~devinterp_lightning.LLCMonitor` estimates the LLC on the training set for all weights
and, through restrictions, for each layer (``embed``, ``hidden``, ``unembed``) and for two halves
of the training set (pairs without wrap-around, ``a + b < 31``, and with it). The
:class:`~devinterp_lightning.StageDetector` finds the changes of ``llc/mean``. At the end the
script prints the accuracy curve, the detected transitions with every restricted LLC just before
and after each, and the LLC of each layer at the start, at memorization and at the end.

What was measured (the LLC peaks at memorization and then falls steadily, most of all in the hidden
layer, while the test accuracy rises): docs/examples.md.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make ``examples._common`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn

from devinterp_lightning import LLCMonitor, StageDetector
from examples._common import Stopwatch, format_table, full_batch_loader, nearest, set_threads

MODULUS = 31
TRAIN_FRACTION = 0.5
EMBED_DIM = 32
HIDDEN = 64

#: the LLC of each layer: globs over ``named_parameters()`` names of :class:`ModularAdditionMLP`
LAYERS = {"embed": "embed.*", "hidden": "hidden.*", "unembed": "out.*"}

# SGLD settings. lr 1e-2 with localization 100 gives split R-hat 1.00-1.03 at every snapshot
# (lr 1e-3: 1.1-1.5, flagged high_rhat, and the detector would skip those points). nbeta is fixed
# to n / log n of the whole training split (n = 480: 77.7), so that the two halves of the training
# set are sampled at the same temperature and their LLCs can be compared with each other.
LLC_SETTINGS = dict(lr=1e-2, localization=100.0, num_chains=4, num_draws=60, num_burnin_steps=30)


def modular_addition(p: int = MODULUS, train_fraction: float = TRAIN_FRACTION,
                     seed: int = 0) -> dict[str, torch.Tensor]:
    """All ``p * p`` pairs ``x = (a, b)`` with labels ``(a + b) mod p``, split at random.

    Returns ``train_x``, ``train_y``, ``test_x``, ``test_y`` (``x``: int64 ``[n, 2]``).
    """
    a, b = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
    x = torch.stack([a.flatten(), b.flatten()], dim=1)
    y = (x[:, 0] + x[:, 1]) % p
    perm = torch.randperm(p * p, generator=torch.Generator().manual_seed(seed))
    n_train = int(round(train_fraction * p * p))
    tr, te = perm[:n_train], perm[n_train:]
    return {"train_x": x[tr], "train_y": y[tr], "test_x": x[te], "test_y": y[te]}


def loss_fn(model: nn.Module, batch: Any) -> torch.Tensor:
    """Mean cross-entropy: the per-sample negative log-likelihood the LLC's ``nbeta`` refers to."""
    x, y = batch
    return F.cross_entropy(model(x), y)


class ModularAdditionMLP(pl.LightningModule):
    """``logits = out(relu(hidden([embed(a), embed(b)])))``, one embedding shared by both operands.

    Logs ``train/loss`` and ``train/acc`` every step and ``test/loss``, ``test/acc`` every
    ``eval_every`` steps; :attr:`curve` keeps ``(step, train_acc, test_acc, test_loss)``.
    """

    def __init__(self, p: int = MODULUS, embed_dim: int = EMBED_DIM, hidden: int = HIDDEN, lr: float = 1e-2,
                 weight_decay: float = 2.0, eval_every: int = 20, test_data: tuple[torch.Tensor, ...] = ()) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["test_data"])
        self.embed = nn.Embedding(p, embed_dim)
        self.hidden = nn.Linear(2 * embed_dim, hidden)
        self.out = nn.Linear(hidden, p)
        self.test_data = test_data
        self.curve: list[tuple[int, float, float, float]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.relu(self.hidden(self.embed(x).flatten(1))))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        train_acc = (logits.argmax(1) == y).float().mean()
        self.log_dict({"train/loss": loss, "train/acc": train_acc}, prog_bar=True)
        if self.test_data and self.global_step % self.hparams.eval_every == 0:
            # the test split is small enough to evaluate in the training step (no validation loop)
            with torch.no_grad():
                tx, ty = self.test_data
                test_logits = self(tx)
                test_loss = F.cross_entropy(test_logits, ty)
                test_acc = (test_logits.argmax(1) == ty).float().mean()
            self.log_dict({"test/loss": test_loss, "test/acc": test_acc}, prog_bar=True)
            self.curve.append((self.global_step, float(train_acc), float(test_acc), float(test_loss)))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # strong weight decay is what makes this configuration grok within 2000 full-batch steps
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)


def llc_schedule(max_steps: int, early: int = 20, memorized: int = 140, late: int = 100) -> list[int]:
    """Every ``early`` steps until ``memorized`` (the memorization jump), then every ``late`` steps."""
    steps = list(range(0, min(memorized, max_steps) + 1, early))
    steps += list(range((steps[-1] // late + 1) * late, max_steps + 1, late))
    return steps


def first_step_above(curve: list[tuple[int, float, float, float]], column: int, level: float) -> int | None:
    """The first logged step where ``curve[column]`` reaches ``level`` (1: train acc, 2: test acc)."""
    return next((row[0] for row in curve if row[column] >= level), None)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--logdir", default="runs/grokking", help="TensorBoard logs")
    p.add_argument("--max-steps", type=int, default=2000, help="full-batch AdamW steps")
    p.add_argument("--seed", type=int, default=0, help="seeds the initialization and the SGLD chains")
    p.add_argument("--data-seed", type=int, default=0, help="seeds the train/test split")
    p.add_argument("--weight-decay", type=float, default=2.0, help="AdamW weight decay")
    p.add_argument("--num-draws", type=int, default=LLC_SETTINGS["num_draws"], help="SGLD draws per chain")
    p.add_argument("--threads", type=int, default=1, help="torch threads (more only adds overhead here)")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no tables")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train, detect the transitions, print the tables; return every number the tables show."""
    args = parse_args(argv)
    set_threads(args.threads)
    pl.seed_everything(args.seed, verbose=False)
    logdir = Path(args.logdir)

    data = modular_addition(seed=args.data_seed)
    train = (data["train_x"], data["train_y"])
    wraps = data["train_x"].sum(1) >= MODULUS
    n_train = len(data["train_y"])
    # one full batch per loader: exact losses for SGLD, and the restrictions on `probe` share one run
    probe = full_batch_loader(train)
    halves = {"nowrap": full_batch_loader((train[0][~wraps], train[1][~wraps])),
              "wrap": full_batch_loader((train[0][wraps], train[1][wraps]))}
    model = ModularAdditionMLP(weight_decay=args.weight_decay, test_data=(data["test_x"], data["test_y"]))

    monitor = LLCMonitor(
        loss_fn, data=probe, every_n_steps=llc_schedule(args.max_steps), restrictions=LAYERS, datasets=halves,
        nbeta=n_train / math.log(n_train), seed=args.seed, progress=not args.quiet,
        **{**LLC_SETTINGS, "num_draws": args.num_draws},
    )
    # changepoints only: the decline after memorization is smooth, and every bend of it would be a
    # turning point
    detector = StageDetector(monitor="llc/mean", turning_points=False)
    trainer = pl.Trainer(
        max_steps=args.max_steps, accelerator="cpu", devices=1, logger=TensorBoardLogger(logdir, name="", version=""),
        callbacks=[monitor, detector], log_every_n_steps=10, enable_checkpointing=False,
        enable_model_summary=False, enable_progress_bar=not args.quiet,
    )
    with Stopwatch() as clock:
        trainer.fit(model, full_batch_loader(train, num_batches=args.max_steps))

    keys = monitor.monitor_keys()  # llc/mean, llc/embed/mean, ..., llc/nowrap/mean, llc/wrap/mean
    names = ["all" if k == "llc/mean" else k.split("/")[1] for k in keys]
    llc = {"steps": monitor.history.steps("llc/mean")}
    for name, key in zip(names, keys, strict=True):
        llc[name] = [p.value for p in monitor.history.get(key)]
    llc["flags"] = [list(p.flags) for p in monitor.history.get("llc/mean")]
    transitions = [t.to_dict() for t in detector.transitions]

    def at(step: int, offset: int = 0) -> dict[str, float]:
        """Every LLC at the estimate nearest to ``step`` (``offset``: that many estimates later)."""
        i = llc["steps"].index(nearest(step, llc["steps"])) + offset
        i = min(max(i, 0), len(llc["steps"]) - 1)
        return {"step": llc["steps"][i], **{n: llc[n][i] for n in names}}

    memorized = first_step_above(model.curve, 1, 1.0)
    test_half = first_step_above(model.curve, 2, 0.5)
    test_08 = first_step_above(model.curve, 2, 0.8)
    peak = llc["steps"][max(range(len(llc["steps"])), key=lambda i: llc["all"][i])]
    result = {
        "curve": {"steps": [r[0] for r in model.curve], "train_acc": [r[1] for r in model.curve],
                  "test_acc": [r[2] for r in model.curve], "test_loss": [r[3] for r in model.curve]},
        "memorized_step": memorized, "test_acc_0.5_step": test_half, "test_acc_0.8_step": test_08,
        "final_test_acc": model.curve[-1][2] if model.curve else float("nan"),
        "llc": llc, "llc_peak_step": peak,
        "transitions": transitions,
        "at_transitions": [{"before": at(t["changepoint_step"], -1), "after": at(t["changepoint_step"])}
                           for t in transitions],
        "milestones": {"start": at(0), "peak": at(peak), "end": at(llc["steps"][-1])},
        "train_seconds": clock.seconds, "logdir": str(logdir),
    }
    if not args.quiet:
        print()
        rows = [r for r in model.curve if r[0] % 200 == 0 or r[0] in (20, 40, 60, 80, 100)]
        print(f"Accuracy (memorized at step {memorized}; test accuracy 0.5 at {test_half}, 0.8 at {test_08}):")
        print(format_table(["step", "train acc", "test acc", "test loss", "LLC"],
                           [[s, a, b, c, at(s)["all"]] for s, a, b, c in rows]))
        print()
        print("LLC changepoints (StageDetector on llc/mean) with every restricted LLC before -> after:")
        header = ["onset", "confirmed", "direction", *names]
        table = []
        for t, ba in zip(transitions, result["at_transitions"], strict=True):
            b, a = ba["before"], ba["after"]
            table.append([t["changepoint_step"], t["step"], t["direction"],
                          *[f"{b[n]:.1f} -> {a[n]:.1f}" for n in names]])
        print(format_table(header, table) if table else "(none detected)")
        print()
        print("Restricted LLCs at the start, at the LLC's peak and at the end:")
        print(format_table(["", "step", *names], [[k, m["step"], *[m[n] for n in names]]
                                                  for k, m in result["milestones"].items()]))
        print(f"\nTraining with the monitor took {clock.seconds:.0f} s; TensorBoard: tensorboard --logdir {logdir}")
    return result


if __name__ == "__main__":
    main()
