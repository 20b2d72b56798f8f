"""In-context linear regression in a small transformer: the LLC, essential dynamics and the ICL score.

    python examples/in_context_linear_regression.py                 # 2.5 min on 2 shared CPU cores (load ~2)
    python examples/in_context_linear_regression.py --max-steps 300 --logdir runs/icl --figure icl.png
    tensorboard --logdir runs/in_context_linear_regression

Each sequence is one task ``t ~ N(0, I_4)``: ``K = 8`` pairs ``(x_k, y_k)`` with ``x_k ~ N(0, I_4)`` and
``y_k = t . x_k + N(0, 0.125)``, given to the model as 16 tokens ``x_1, y_1, ..., x_8, y_8`` (an
``x`` token is ``(0, x)``, a ``y`` token ``(y, 0, 0, 0, 0)``). At each ``x_k`` token the model predicts
``y_k`` from the pairs before it: it must infer ``t`` in context. Every batch draws fresh tasks
(infinite task diversity, so the best predictor is the Bayes posterior mean, i.e. ridge regression
with penalty ``sigma^2``; Raventos et al. 2023). The model: a linear token embedding, learned
positions, two pre-LayerNorm blocks (causal attention with 4 heads, MLP of width 64), a final
LayerNorm and a linear read-out (width 32, ~19k parameters), trained with Adam.

Behavioural ground truth, logged every ``--eval-every`` steps on a fixed batch of 512 tasks:

* ``icl/pred_norm``: mean squared prediction (stage LR1 of Hoogland et al. 2024: the model first
  learns the prior, predicting ``E[y] = 0``, so the predictions shrink);
* ``icl/score``: loss on the last quarter of the context positions minus loss on the first quarter
  (stage LR2: negative once the model regresses in context);
* ``icl/loss``, ``icl/ridge_loss`` (posterior mean from the preceding pairs), ``icl/zero_loss``
  (always predict 0) on the same batch.

The :class:`~devinterp_lightning.LLCMonitor` estimates the LLC of all weights and, restricted, of
each of the two blocks (attention, MLP and their LayerNorms);
:class:`~devinterp_lightning.EssentialDynamics` follows the predictions on a fixed probe batch;
the :class:`~devinterp_lightning.StageDetector` watches ``llc/mean`` (every 20 steps, 4 chains of 40
draws: fewer points, or fewer draws, leave too few healthy estimates to find the rise; see
``DETECTOR_SETTINGS`` for the tracker). ``main`` returns the
transitions, the milestones (ICL score crosses half its final value, prediction norm at its
minimum) and the final metrics. Measured results: docs/examples.md.
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
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn

from devinterp_lightning import EssentialDynamics, LLCMonitor, StageDetector
from examples._common import Stopwatch, format_table, full_batch_loader, mark_events, nearest, set_threads

TASK_DIM = 4
NUM_PAIRS = 8
NOISE_VAR = 0.125
D_MODEL = 32
NUM_HEADS = 4
MLP_WIDTH = 64
NUM_LAYERS = 2
BATCH = 64

#: restricted LLCs, one per block: globs over ``named_parameters()`` of :class:`ICLTransformer` (a block
#: includes its two LayerNorms). More restrictions cost more lanes in the vectorized SGLD run.
COMPONENTS = {
    "block0": "blocks.0.*",
    "block1": "blocks.1.*",
}

# SGLD on a fixed probe batch of 64 tasks (8 predictions each); nbeta fixed so that every
# restriction is sampled at the same temperature. lr * localization = 0.1: the pull to w* relaxes
# within ~20 SGLD steps, so 10 burn-in steps reach it (with lr 1e-4 and localization 300 the chains
# had not, and the estimates were ~0 +- 2 everywhere). 40 draws, not 20: with 4 x 20 draws (a split
# half-chain is 10 draws, ~3 autocorrelation times) the split R-hat exceeds 1.1 in about half of the
# estimates, the StageDetector skips them and too few points are left (docs/examples.md).
LLC_SETTINGS = dict(lr=1e-3, localization=100.0, nbeta=50.0, num_chains=4, num_draws=40, num_burnin_steps=10)
#: estimate every this many steps: 31 estimates in 600 steps, 20-25 of them healthy
LLC_EVERY = 20
#: The StageDetector's tracker: ruptures' binary segmentation of a piecewise-constant mean, with twice
#: its default penalty. On these series the default plateau tracker found the rise in 1 of 3 seeds
#: (its noise estimate reads the smooth rise as autocorrelated noise, docs/stages.md); binseg with
#: penalty_scale 10-15 found one increase per seed, 6 (its default) a second step in one seed.
DETECTOR_SETTINGS: dict[str, Any] = dict(method="binseg", penalty_scale=12.0)


def make_tasks(num: int, generator: torch.Generator, dim: int = TASK_DIM, pairs: int = NUM_PAIRS,
               noise_var: float = NOISE_VAR) -> dict[str, Tensor]:
    """``num`` regression tasks: ``x [num, pairs, dim]``, ``y [num, pairs]``, ``t [num, dim]`` and the
    interleaved tokens ``[num, 2 * pairs, dim + 1]`` (``x`` tokens ``(0, x)``, ``y`` tokens ``(y, 0..0)``)."""
    t = torch.randn(num, dim, generator=generator)
    x = torch.randn(num, pairs, dim, generator=generator)
    y = (x @ t.unsqueeze(-1)).squeeze(-1) + math.sqrt(noise_var) * torch.randn(num, pairs, generator=generator)
    tokens = torch.zeros(num, 2 * pairs, dim + 1)
    tokens[:, 0::2, 1:] = x
    tokens[:, 1::2, 0] = y
    return {"x": x, "y": y, "t": t, "tokens": tokens}


def ridge_predictions(x: Tensor, y: Tensor, noise_var: float = NOISE_VAR) -> Tensor:
    """Posterior-mean prediction of ``y_k`` from pairs ``1 .. k-1`` under the prior ``t ~ N(0, I)``:
    ``x_k . (X^T X + noise_var I)^{-1} X^T y`` (0 for ``k = 1``). ``[num, pairs]``."""
    num, pairs, dim = x.shape
    preds = torch.zeros(num, pairs)
    eye = noise_var * torch.eye(dim)
    for k in range(1, pairs):
        xs, ys = x[:, :k], y[:, :k]
        t_hat = torch.linalg.solve(xs.transpose(1, 2) @ xs + eye, (xs.transpose(1, 2) @ ys.unsqueeze(-1)))
        preds[:, k] = (x[:, k].unsqueeze(1) @ t_hat).reshape(num)
    return preds


class TaskStream(torch.utils.data.IterableDataset):
    """``num_batches`` batches ``(tokens, y)`` of fresh tasks from a private generator."""

    def __init__(self, num_batches: int, batch_size: int = BATCH, seed: int = 0) -> None:
        self.num_batches, self.batch_size, self.seed = num_batches, batch_size, seed

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Any:
        g = torch.Generator().manual_seed(self.seed)
        for _ in range(self.num_batches):
            d = make_tasks(self.batch_size, g)
            yield d["tokens"], d["y"]


def loss_fn(model: nn.Module, batch: Any) -> Tensor:
    """Mean squared error of the ``K`` predictions, averaged over tasks and positions."""
    tokens, y = batch
    return (model(tokens) - y).pow(2).mean()


class Attention(nn.Module):
    """Causal self-attention with q/k/v/o projections, written out so that vmap can batch it."""

    def __init__(self, d_model: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d_model, d_model) for _ in range(4))

    def forward(self, x: Tensor) -> Tensor:
        b, t, e = x.shape
        q, k, v = (p(x).view(b, t, self.num_heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj,
                                                                              self.v_proj))
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        pattern = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        return self.o_proj((pattern @ v).transpose(1, 2).reshape(b, t, e))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))``."""

    def __init__(self, d_model: int, num_heads: int, mlp_width: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = Attention(d_model, num_heads)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, mlp_width), nn.GELU(), nn.Linear(mlp_width, d_model))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class ICLTransformer(pl.LightningModule):
    """Predicts ``y_k`` at every ``x_k`` token; logs the behavioural scores every ``eval_every`` steps."""

    def __init__(self, dim: int = TASK_DIM, pairs: int = NUM_PAIRS, d_model: int = D_MODEL,
                 num_heads: int = NUM_HEADS, mlp_width: int = MLP_WIDTH, num_layers: int = NUM_LAYERS,
                 lr: float = 1e-3, eval_every: int = 25, eval_data: dict[str, Tensor] | None = None) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["eval_data"])
        self.embed = nn.Linear(dim + 1, d_model)
        self.pos = nn.Parameter(0.02 * torch.randn(2 * pairs, d_model))
        self.blocks = nn.ModuleList([Block(d_model, num_heads, mlp_width) for _ in range(num_layers)])
        self.ln_f = nn.LayerNorm(d_model)
        self.unembed = nn.Linear(d_model, 1)
        self.eval_data = eval_data
        if eval_data is not None:
            self.ridge = ridge_predictions(eval_data["x"], eval_data["y"])
        self.curve: list[dict[str, float]] = []

    def forward(self, tokens: Tensor) -> Tensor:
        """``[B, 2K, D+1]`` tokens -> ``[B, K]`` predictions (read at the ``x`` tokens)."""
        h = self.embed(tokens) + self.pos[: tokens.shape[1]]
        for block in self.blocks:
            h = block(h)
        return self.unembed(self.ln_f(h[:, 0::2])).squeeze(-1)

    @torch.no_grad()
    def scores(self, data: dict[str, Tensor]) -> dict[str, float]:
        pred = self(data["tokens"])
        err = (pred - data["y"]).pow(2).mean(0)  # per position k
        k = err.shape[0]
        return {
            "icl/loss": float(err.mean()),
            "icl/score": float(err[3 * k // 4:].mean() - err[: k // 4].mean()),
            "icl/pred_norm": float(pred.pow(2).mean()),
            "icl/ridge_loss": float((self.ridge - data["y"]).pow(2).mean()),
            "icl/zero_loss": float(data["y"].pow(2).mean()),
        }

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = loss_fn(self, batch)
        self.log("train/loss", loss, prog_bar=True)
        if self.eval_data is not None and self.global_step % self.hparams.eval_every == 0:
            scores = self.scores(self.eval_data)
            self.log_dict(scores)
            self.curve.append({"step": float(self.global_step), **scores})
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def first_crossing(steps: list[int], values: list[float], level: float, above: bool = True) -> int | None:
    """The first step at which ``values`` reaches ``level`` (from below if ``above``, else from above)."""
    for s, v in zip(steps, values, strict=True):
        if (v >= level) if above else (v <= level):
            return s
    return None


def plot_run(result: dict[str, Any], path: str | Path) -> None:
    """Render the behavioural curves and the LLCs of one run (``main``'s result) into a PNG."""
    from matplotlib.figure import Figure

    curve, llc = result["curve"], result.get("llc")
    fig = Figure(figsize=(11, 3.6), layout="constrained")
    ax1, ax2, ax3 = fig.subplots(1, 3)
    ax1.plot(curve["step"], curve["icl/loss"], label="model")
    ax1.plot(curve["step"], curve["icl/ridge_loss"], "--", label="ridge (posterior mean)")
    ax1.plot(curve["step"], curve["icl/zero_loss"], ":", label="predict 0")
    ax1.set(title="loss on 512 fixed tasks", xlabel="step")
    ax1.legend(fontsize=7)
    ax2.plot(curve["step"], curve["icl/score"], label="ICL score (late - early)")
    ax2.plot(curve["step"], curve["icl/pred_norm"], label="prediction norm (mean y^2)")
    ax2.set(title="behaviour", xlabel="step")
    ax2.legend(fontsize=7)
    if llc is not None:
        for name in ("all", *COMPONENTS):
            ax3.plot(llc["steps"], llc[name], marker=".", label=name, lw=2 if name == "all" else 1)
        ax3.set(title="LLC (all weights, per layer)", xlabel="step")
        ax3.legend(fontsize=7)
    shown = {name: step for name, step in result["milestones"].items() if name != "icl_90"}
    mark_events((ax1, ax2, ax3), shown, result["transitions"])
    fig.suptitle("in-context linear regression: grey = milestones (prediction-norm minimum, ICL score at half), "
                 "red = LLC transitions", fontsize=9)
    fig.savefig(path, dpi=110)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--logdir", default="runs/in_context_linear_regression", help="TensorBoard logs")
    p.add_argument("--max-steps", type=int, default=600, help="Adam steps (64 fresh tasks each)")
    p.add_argument("--seed", type=int, default=0, help="seeds the initialization, the tasks and the SGLD chains")
    p.add_argument("--data-seed", type=int, default=0, help="seeds the probe and evaluation batches")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    p.add_argument("--llc-every", type=int, default=LLC_EVERY, help="estimate the LLCs every this many steps (0: never)")
    p.add_argument("--eval-every", type=int, default=25, help="behavioural scores every this many steps")
    p.add_argument("--num-draws", type=int, default=LLC_SETTINGS["num_draws"], help="SGLD draws per chain")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--figure", default=None, help="also render the curves into this PNG (needs matplotlib)")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no tables")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train, estimate, detect; return every number the tables show."""
    args = parse_args(argv)
    set_threads(args.threads)
    pl.seed_everything(args.seed, verbose=False)
    logdir = Path(args.logdir)

    g = torch.Generator().manual_seed(20_000 + args.data_seed)
    eval_data = make_tasks(512, g)
    probe = make_tasks(64, g)
    model = ICLTransformer(lr=args.lr, eval_every=args.eval_every, eval_data=eval_data)
    callbacks: list[pl.Callback] = []
    monitor = detector = ed = None
    if args.llc_every > 0:
        monitor = LLCMonitor(loss_fn, data=full_batch_loader((probe["tokens"], probe["y"])),
                             every_n_steps=args.llc_every, restrictions=COMPONENTS, seed=args.seed,
                             progress=not args.quiet, **{**LLC_SETTINGS, "num_draws": args.num_draws})
        detector = StageDetector(monitor="llc/mean", **DETECTOR_SETTINGS)
        # the model's function: its predictions on 64 fixed tasks (512 numbers) as a trajectory
        ed = EssentialDynamics(probe=probe["tokens"], every_n_steps=args.eval_every)
        callbacks = [monitor, detector, ed]
    trainer = pl.Trainer(
        max_steps=args.max_steps, accelerator="cpu", devices=1, logger=TensorBoardLogger(logdir, name="", version=""),
        callbacks=callbacks, log_every_n_steps=25, enable_checkpointing=False, enable_model_summary=False,
        enable_progress_bar=not args.quiet,
    )
    with Stopwatch() as clock:
        trainer.fit(model, torch.utils.data.DataLoader(TaskStream(args.max_steps, seed=args.seed), batch_size=None))

    curve = model.curve
    steps = [int(c["step"]) for c in curve]
    final = {k: v for k, v in curve[-1].items() if k != "step"} if curve else {}
    icl = [c["icl/score"] for c in curve]
    norms = [c["icl/pred_norm"] for c in curve]
    final_icl = final.get("icl/score", float("nan"))
    milestones = {
        # LR1: the predictions shrink towards the prior mean 0; their norm is smallest here
        "pred_norm_min": steps[min(range(len(norms)), key=norms.__getitem__)] if norms else None,
        # LR2: the ICL score (negative = the context helps) reaches half its final value
        "icl_half": first_crossing(steps, icl, final_icl / 2, above=False) if final_icl < 0 else None,
        "icl_90": first_crossing(steps, icl, 0.9 * final_icl, above=False) if final_icl < 0 else None,
    }
    result: dict[str, Any] = {
        "curve": {k: [c[k] for c in curve] for k in (curve[0] if curve else {})},
        "milestones": milestones, "final": final, "train_seconds": clock.seconds, "logdir": str(logdir),
        "transitions": [],
    }
    if monitor is not None:
        keys = monitor.monitor_keys()
        names = ["all" if k == "llc/mean" else k.split("/")[1] for k in keys]
        llc: dict[str, Any] = {"steps": monitor.history.steps("llc/mean")}
        for name, key in zip(names, keys, strict=True):
            llc[name] = [p.value for p in monitor.history.get(key)]
        llc["flags"] = {name: [list(p.flags) for p in monitor.history.get(key)] for name, key in zip(names, keys,
                                                                                                      strict=True)}
        result["llc"] = llc
        result["transitions"] = [t.to_dict() for t in detector.transitions]
        result["ed_turning_points"] = [t.changepoint_step for t in ed.published_transitions("ed/trajectory")]

        def at(step: int | None) -> dict[str, float] | None:
            if step is None:
                return None
            i = llc["steps"].index(nearest(step, llc["steps"]))
            return {"step": llc["steps"][i], **{n: llc[n][i] for n in names}}

        result["llc_at"] = {"start": at(0), **{k: at(v) for k, v in milestones.items()}, "end": at(llc["steps"][-1])}
    if args.figure:
        plot_run(result, args.figure)
    if not args.quiet:
        print()
        print(f"Milestones: {milestones}")
        rows = [c for c in curve if int(c["step"]) % 250 == 0]
        print(format_table(["step", "loss", "ridge", "zero", "ICL score", "pred norm", "LLC"],
                           [[int(c["step"]), c["icl/loss"], c["icl/ridge_loss"], c["icl/zero_loss"], c["icl/score"],
                             c["icl/pred_norm"], None if monitor is None else result["llc"]["all"][
                                 llc["steps"].index(nearest(int(c["step"]), llc["steps"]))]] for c in rows]))
        if monitor is not None:
            print()
            cols = ["all", *COMPONENTS]
            print(format_table(["step", *cols], [[s, *[llc[n][i] for n in cols]] for i, s in enumerate(llc["steps"])]))
            print(f"\nTransitions of llc/mean: {[(t['changepoint_step'], t['direction']) for t in result['transitions']]}")
            print(f"Essential dynamics turning points: {result['ed_turning_points']}")
        print(f"\nTraining took {clock.seconds:.0f} s; TensorBoard: tensorboard --logdir {logdir}")
    return result


if __name__ == "__main__":
    main()
