"""A deep linear network learns its teacher one singular value at a time; the LLC sees each step.

    python examples/deep_linear_network.py                      # ~1-2 min on 2 CPU cores
    python examples/deep_linear_network.py --max-steps 600 --logdir runs/dln
    tensorboard --logdir runs/deep_linear_network

The model is ``x -> W3 W2 W1 x`` with 8x8 matrices (widths 8-8-8-8, no biases, no nonlinearity),
trained by full-batch gradient descent from a small initialization on ``y = T x + noise`` where the
teacher ``T`` has singular values 10, 5 and 2.5 (rank 3). From a small initialization gradient
descent moves from saddle to saddle: it sits on a plateau, learns the largest remaining singular
value in a short burst (a loss drop), and sits on the next plateau. The bursts come at times
roughly proportional to ``1 / s_k``, so here near steps 200, 470 and 1150.

Each learned singular value adds effective parameters, so the LLC rises plateau by plateau. The
:class:`~devinterp_lightning.LLCMonitor` estimates it every ``--llc-every`` steps, the
:class:`~devinterp_lightning.StageDetector` finds the changepoints of that series and a rule saves
a checkpoint at each one. At the end the script prints the detected stages next to the loss drops
(found independently, from the loss curve alone) and the LLC of each plateau next to the
theoretical learning coefficient of a teacher of that rank (Aoyagi 2024,
:func:`devinterp_lightning.theory.deep_linear_network`).

What was measured, and why the in-training LLC sits below the theory values: docs/examples.md.
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
from torch.utils.data import TensorDataset

from devinterp_lightning import AlertRule, EssentialDynamics, LLCMonitor, StageDetector, estimate_llc, theory
from examples._common import (
    LossRecorder,
    Stopwatch,
    find_loss_drops,
    format_table,
    full_batch_loader,
    nearest,
    set_threads,
)

#: the teacher's nonzero singular values; well separated, so the three loss drops are far apart
TEACHER_SINGULAR_VALUES = (10.0, 5.0, 2.5)
WIDTH = 8
DEPTH = 3
NUM_SAMPLES = 1024
NOISE = 0.1

# SGLD settings of the in-training estimates. A plateau is a saddle, not a minimum: localization
# 1000 keeps the chains from sliding off it along the not-yet-learned direction (with 100-300 the
# plateau estimates turn negative), at the price of estimates below the theory values
# (docs/examples.md). nbeta=None: n/log(n) = 148 for the full batch of 1024 samples.
LLC_SETTINGS = dict(lr=1e-4, localization=1000.0, nbeta=None, num_chains=4, num_draws=200, num_burnin_steps=50)


def teacher_matrix(singular_values: tuple[float, ...] = TEACHER_SINGULAR_VALUES, width: int = WIDTH,
                   seed: int = 0) -> torch.Tensor:
    """``T = U diag(s) V^T`` with random orthogonal ``U``, ``V`` (``width x width``)."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(width, width, generator=g))
    v, _ = torch.linalg.qr(torch.randn(width, width, generator=g))
    s = torch.zeros(width)
    s[: len(singular_values)] = torch.tensor(singular_values)
    return u @ torch.diag(s) @ v.T


def teacher_data(num_samples: int = NUM_SAMPLES, noise: float = NOISE, seed: int = 0) -> TensorDataset:
    """``x ~ N(0, I)``, ``y = T x + noise * N(0, I)``, all generated from ``seed``."""
    t = teacher_matrix(seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(num_samples, t.shape[1], generator=g)
    y = x @ t.T + noise * torch.randn(num_samples, t.shape[0], generator=g)
    return TensorDataset(x, y)


def loss_fn(model: nn.Module, batch: Any) -> torch.Tensor:
    """``0.5 * |f(x) - y|^2`` summed over outputs, averaged over the batch.

    This is the per-sample negative log-likelihood of a unit-variance Gaussian model (up to a
    constant), the loss the LLC's ``nbeta`` is calibrated for.
    """
    x, y = batch
    return 0.5 * (model(x) - y).pow(2).sum(dim=1).mean()


class DeepLinearNetwork(pl.LightningModule):
    """``depth`` bias-free ``width x width`` linear layers, entries initialized ``N(0, init_scale^2)``.

    Logs ``train/loss`` every step and, every ``log_svd_every`` steps, the singular values of the
    product matrix (``dln/sv1``, ...) and the learned rank ``dln/rank`` (singular values above 1,
    half the teacher's smallest): the ground truth the LLC stages are compared with.
    """

    def __init__(self, width: int = WIDTH, depth: int = DEPTH, init_scale: float = 0.01, lr: float = 0.02,
                 log_svd_every: int = 25) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.layers = nn.Sequential(*[nn.Linear(width, width, bias=False) for _ in range(depth)])
        with torch.no_grad():
            for layer in self.layers:
                layer.weight.normal_(0.0, init_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)

    def product(self) -> torch.Tensor:
        """The end-to-end matrix ``W_depth ... W_1``."""
        w = self.layers[0].weight
        for layer in self.layers[1:]:
            w = layer.weight @ w
        return w

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = loss_fn(self, batch)
        self.log("train/loss", loss, prog_bar=True)
        if self.global_step % self.hparams.log_svd_every == 0:
            with torch.no_grad():
                sv = torch.linalg.svdvals(self.product())
            self.log_dict({f"dln/sv{k + 1}": sv[k] for k in range(len(TEACHER_SINGULAR_VALUES))})
            self.log("dln/rank", (sv > 1.0).sum().float())
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # plain full-batch gradient descent: the plateaus then sit on their valley floors, which
        # keeps the LLC estimates on the plateaus steady (SGD noise lowers them, docs/examples.md)
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--logdir", default="runs/deep_linear_network", help="TensorBoard logs and checkpoints")
    p.add_argument("--max-steps", type=int, default=1600, help="gradient steps")
    p.add_argument("--seed", type=int, default=0, help="seeds the initialization and the SGLD chains")
    p.add_argument("--data-seed", type=int, default=0, help="seeds the teacher and the data")
    p.add_argument("--llc-every", type=int, default=40, help="estimate the LLC every this many steps")
    p.add_argument("--num-draws", type=int, default=LLC_SETTINGS["num_draws"], help="SGLD draws per chain")
    p.add_argument("--final-llc", action=argparse.BooleanOptionalAction, default=True,
                   help="also estimate the LLC of the final weights with settings suited to a minimum")
    p.add_argument("--calibrate", action="store_true",
                   help="let LLCMonitor(calibrate='once') choose lr and localization instead of LLC_SETTINGS")
    p.add_argument("--threads", type=int, default=1, help="torch threads (more only adds overhead here)")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no tables")
    return p.parse_args(argv)


def plateau_llcs(steps: list[int], values: list[float], drops: list[Any], margin: int) -> list[dict[str, Any]]:
    """Mean LLC on each stretch between loss drops (``margin`` steps clear of each drop).

    Plateau ``k`` comes after ``k`` loss drops, i.e. the network has learned ``k`` singular values.
    """
    out: list[dict[str, Any]] = []
    if not steps:
        return out
    for k in range(len(drops) + 1):
        lo = 0 if k == 0 else drops[k - 1].end + margin
        hi = drops[k].start - margin if k < len(drops) else max(steps) + 1
        pts = [v for s, v in zip(steps, values, strict=True) if lo <= s < hi]
        if pts:
            mean = sum(pts) / len(pts)
            spread = (sum((v - mean) ** 2 for v in pts) / max(len(pts) - 1, 1)) ** 0.5
            out.append({"learned_rank": k, "from_step": lo, "to_step": hi, "points": len(pts), "llc": mean,
                        "llc_spread": spread})
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train, detect the stages, print the tables; return every number the tables show."""
    args = parse_args(argv)
    set_threads(args.threads)
    pl.seed_everything(args.seed, verbose=False)
    logdir = Path(args.logdir)

    data = teacher_data(seed=args.data_seed)
    # the whole data set is one batch: full-batch gradient descent for training, exact losses for SGLD
    train_loader = full_batch_loader(data.tensors, num_batches=args.max_steps)
    loader = full_batch_loader(data.tensors)
    model = DeepLinearNetwork()
    widths = [WIDTH] * (DEPTH + 1)

    monitor = LLCMonitor(loss_fn, data=loader, every_n_steps=args.llc_every, seed=args.seed,
                         progress=not args.quiet, calibrate="once" if args.calibrate else "never",
                         **{**LLC_SETTINGS, "num_draws": args.num_draws})
    # one rule: every confirmed change of the LLC saves a checkpoint (and is logged)
    detector = StageDetector(
        monitor="llc/mean",
        rules=[AlertRule(name="checkpoint-at-transition", monitor="llc/mean", actions=("log", "checkpoint"))],
        checkpoint_dir=logdir / "transitions",
        turning_points=False,  # the DLN's stages are level shifts; slope turns add nothing here
    )
    # the second probe: the network's outputs on a fixed batch, as a trajectory in function space
    essential_dynamics = EssentialDynamics(probe=data.tensors[0][:64], every_n_steps=10)
    losses = LossRecorder()
    trainer = pl.Trainer(
        max_steps=args.max_steps, accelerator="cpu", devices=1, logger=TensorBoardLogger(logdir, name="", version=""),
        callbacks=[monitor, detector, essential_dynamics, losses], log_every_n_steps=5, enable_checkpointing=False,
        enable_model_summary=False, enable_progress_bar=not args.quiet,
    )
    with Stopwatch() as train_clock:
        trainer.fit(model, train_loader)

    series = monitor.history.get("llc/mean")
    llc_steps = [p.step for p in series]
    llc_values = [p.value for p in series]
    drops = find_loss_drops(losses.steps, losses.values)
    drop_steps = [d.step for d in drops]
    transitions = [t for t in detector.transitions if t.monitor == "llc/mean"]
    # unhealthy estimates (flagged: negative, below_init, ...) are left out, as the detector does;
    # on the first plateau (the origin, a saddle) every estimate is flagged
    healthy = [(p.step, p.value) for p in series if not p.flags]
    plateaus = plateau_llcs([s for s, _ in healthy], [v for _, v in healthy], drops, margin=2 * args.llc_every)
    for p in plateaus:
        p["theory"] = float(theory.deep_linear_network(widths, p["learned_rank"]))

    final = None
    if args.final_llc:
        # at the end the weights sit at a minimum, not a saddle, so weak localization is safe and
        # the chains explore the flat directions further (closer to the theory value)
        with Stopwatch() as clock:
            res = estimate_llc(model, loss_fn, loader, lr=1e-4, localization=10.0, num_chains=4, num_draws=1000,
                               num_burnin_steps=250, seed=args.seed)
        final = {"llc": res.mean, "std": res.std, "theory": float(theory.deep_linear_network(widths, 3)),
                 "seconds": clock.seconds}

    result = {
        "loss_drops": [asdict(d) for d in drops],
        "transitions": [t.to_dict() for t in transitions],
        "stages": [s.to_dict() for s in detector.stages],
        "plateaus": plateaus,
        "llc": {"steps": llc_steps, "values": llc_values, "std": [p.std for p in series],
                "flags": [list(p.flags) for p in series]},
        "ed_turning_points": [t.changepoint_step for t in essential_dynamics.published_transitions("ed/trajectory")],
        "checkpoints": sorted(str(p) for p in (logdir / "transitions").glob("*.ckpt")),
        "final": final,
        "train_seconds": train_clock.seconds,
        "logdir": str(logdir),
    }
    if not args.quiet:
        print()
        print("Loss drops (from the loss curve) vs LLC changepoints (from the StageDetector):")
        rows = []
        for t in transitions:
            d = nearest(t.changepoint_step, drop_steps)
            rows.append([t.changepoint_step, t.step, t.direction, t.level_before, t.level_after, d,
                         None if d is None else t.changepoint_step - d])
        print(format_table(["LLC onset", "confirmed", "direction", "LLC before", "LLC after", "loss drop",
                            "onset - drop"], rows))
        print()
        print("LLC per plateau (between loss drops) vs the learning coefficient of a rank-k teacher:")
        print(format_table(["learned rank", "steps", "LLC", "spread", "theory"],
                           [[p["learned_rank"], f"{p['from_step']}-{p['to_step']}", p["llc"], p["llc_spread"],
                             p["theory"]] for p in plateaus]))
        if final is not None:
            print(f"\nFinal weights, weak localization: LLC {final['llc']:.1f} +- {final['std']:.1f} "
                  f"(theory {final['theory']:.1f}); training took {train_clock.seconds:.0f} s")
        print(f"Essential dynamics: turning points of the output trajectory at steps {result['ed_turning_points']}")
        print(f"Checkpoints: {len(result['checkpoints'])} in {logdir / 'transitions'}; "
              f"TensorBoard: tensorboard --logdir {logdir}; report: devinterp-lightning report {logdir}")
    return result


if __name__ == "__main__":
    main()
