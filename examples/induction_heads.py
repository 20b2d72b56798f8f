"""Induction heads in a two-layer attention-only transformer, with one restricted LLC per head.

    python examples/induction_heads.py                      # ~4 min on 2 shared CPU cores (load ~3.5)
    python examples/induction_heads.py --max-steps 1000 --logdir runs/induction_heads --figure ih.png
    tensorboard --logdir runs/induction_heads

The data are token sequences (vocabulary 64, length 32) drawn from a fixed random bigram chain, in
which a random segment of 12 tokens is copied to a random later place. Inside the copy the next
token is predictable only *in context*: find the earlier occurrence of the current token and
read off the token after it. A two-layer attention-only transformer (4 heads per layer, width 32,
no MLPs, no layer norm) first learns the bigram statistics, then forms the induction circuit: a
*previous-token head* in layer 0 (attends from position ``p`` to ``p - 1``) and an *induction
head* in layer 1 (attends from the second ``A`` of ``A B ... A`` to the ``B`` after the first one)
(Olsson et al. 2022).

Behavioural ground truth, logged every ``--eval-every`` steps on a fixed batch of 256 sequences:

* ``heads/prev/l0.h<i>``, ``heads/prev/l1.h<i>``: mean attention from every position to the one before;
* ``heads/induction/l1.h<i>`` (and ``l0``): mean attention from each repeated position ``s2 + k``
  to ``s1 + k + 1`` (the token after the first occurrence);
* ``icl/score``: loss on the last quarter of the positions minus loss on the first quarter
  (negative once the model uses the context), ``loss/repeated``, ``loss/other``.

The :class:`~devinterp_lightning.LLCMonitor` estimates the LLC of all weights, one restricted LLC
per head (:func:`~devinterp_lightning.head_restrictions`: that head's rows of Q, K, V and columns
of O) and two data-restricted LLCs: the loss counted only on the repeated positions (``repeated``)
and only on the others (``other``). The :class:`~devinterp_lightning.StageDetector` watches
``llc/mean``. ``main`` returns the transitions, the behavioural milestones (best previous-token
score passes 0.5, best induction score passes 0.5, the ICL score crosses half its final value) and
the per-head LLCs around them. Measured results: docs/examples.md.
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
from torch import Tensor, nn

from devinterp_lightning import LLCMonitor, StageDetector, head_restrictions
from examples._common import Stopwatch, format_table, full_batch_loader, mark_events, nearest, set_threads

VOCAB = 64
SEQ_LEN = 32
SEGMENT = 12
D_MODEL = 32
NUM_HEADS = 4
NUM_LAYERS = 2
BATCH = 64
#: scale of the bigram chain's logits: larger = fewer likely successors per token
BIGRAM_TEMPERATURE = 1.0

#: sequences in the LLC probe batch (each with 31 predicted tokens)
PROBE_SEQUENCES = 32
# SGLD on the probe batch. nbeta is fixed, so the full, per-head and data-restricted estimates are
# sampled at one temperature and can be compared with each other. lr * localization = 0.1: the pull
# to w* relaxes within ~20 SGLD steps, so 10 burn-in + 30 draws reach it.
LLC_SETTINGS = dict(lr=1e-3, localization=100.0, nbeta=50.0, num_chains=4, num_draws=30, num_burnin_steps=10)


def bigram_chain(vocab: int = VOCAB, temperature: float = BIGRAM_TEMPERATURE, seed: int = 0) -> Tensor:
    """A ``[vocab, vocab]`` row-stochastic transition matrix: ``softmax(temperature * N(0, 1))`` per row."""
    g = torch.Generator().manual_seed(seed)
    return (temperature * torch.randn(vocab, vocab, generator=g)).softmax(dim=1)


def make_sequences(num: int, chain: Tensor, generator: torch.Generator, seq_len: int = SEQ_LEN,
                   segment: int = SEGMENT) -> dict[str, Tensor]:
    """``num`` sequences from ``chain`` with one segment of ``segment`` tokens copied later on.

    Returns ``tokens [num, seq_len]`` (int64), the segment starts ``s1``, ``s2`` (``[num]``: the
    copy of ``tokens[s1:s1+segment]`` sits at ``s2 >= s1 + segment``) and ``repeated
    [num, seq_len - 1]``: True where the *target* ``tokens[p + 1]`` is a copied token that the
    copy's own earlier tokens predict (``p = s2 .. s2 + segment - 2``).
    """
    vocab = chain.shape[0]
    tokens = torch.empty(num, seq_len, dtype=torch.long)
    tokens[:, 0] = torch.randint(0, vocab, (num,), generator=generator)
    for p in range(1, seq_len):
        tokens[:, p] = torch.multinomial(chain[tokens[:, p - 1]], 1, generator=generator).squeeze(1)
    s1 = torch.randint(0, seq_len - 2 * segment + 1, (num,), generator=generator)
    room = seq_len - segment - (s1 + segment) + 1  # choices for s2 in [s1 + segment, seq_len - segment]
    s2 = s1 + segment + (torch.rand(num, generator=generator) * room).long()
    ar = torch.arange(segment)
    rows = torch.arange(num).unsqueeze(1)
    tokens[rows, s2.unsqueeze(1) + ar] = tokens[rows, s1.unsqueeze(1) + ar]
    pos = torch.arange(seq_len - 1)
    repeated = (pos >= s2.unsqueeze(1)) & (pos <= (s2 + segment - 2).unsqueeze(1))
    return {"tokens": tokens, "s1": s1, "s2": s2, "repeated": repeated}


class SequenceStream(torch.utils.data.IterableDataset):
    """``num_batches`` fresh batches ``(tokens, weights)`` from a private generator (reproducible)."""

    def __init__(self, chain: Tensor, num_batches: int, batch_size: int = BATCH, seed: int = 0) -> None:
        self.chain, self.num_batches, self.batch_size, self.seed = chain, num_batches, batch_size, seed

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Any:
        g = torch.Generator().manual_seed(self.seed)
        for _ in range(self.num_batches):
            tokens = make_sequences(self.batch_size, self.chain, g)["tokens"]
            yield tokens, torch.ones(tokens.shape[0], tokens.shape[1] - 1)


def loss_fn(model: nn.Module, batch: Any) -> Tensor:
    """Next-token cross-entropy averaged over the positions ``weights`` selects (1 = counted).

    With all weights 1 this is the usual per-token loss; the data restrictions pass 0/1 weights
    that keep only the repeated positions, or only the others.
    """
    tokens, weights = batch
    logits = model(tokens[:, :-1])
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1), reduction="none")
    w = weights.reshape(-1)
    return (ce * w).sum() / w.sum()


class Attention(nn.Module):
    """Causal multi-head self-attention with separate q/k/v/o projections (no biases).

    Written out (no ``scaled_dot_product_attention``) so that SGLD can vectorize chains over it with
    ``torch.func.vmap``, and so that the attention pattern of each head can be read.
    """

    def __init__(self, d_model: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d_model, d_model, bias=False)
                                                              for _ in range(4))

    def forward(self, x: Tensor, return_pattern: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        b, t, e = x.shape
        q, k, v = (p(x).view(b, t, self.num_heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj,
                                                                              self.v_proj))
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        pattern = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        out = self.o_proj((pattern @ v).transpose(1, 2).reshape(b, t, e))
        return (out, pattern) if return_pattern else out


class AttentionOnly(pl.LightningModule):
    """Token + position embedding, ``num_layers`` residual attention layers, unembedding.

    Every ``eval_every`` steps it logs the per-head scores and the ICL score on ``eval_data`` (see
    the module docstring) and keeps them in :attr:`curve`.
    """

    def __init__(self, vocab: int = VOCAB, seq_len: int = SEQ_LEN, d_model: int = D_MODEL,
                 num_heads: int = NUM_HEADS, num_layers: int = NUM_LAYERS, lr: float = 5e-3,
                 eval_every: int = 50, eval_data: dict[str, Tensor] | None = None) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["eval_data"])
        self.embed = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(seq_len, d_model)
        self.layers = nn.ModuleList([Attention(d_model, num_heads) for _ in range(num_layers)])
        self.unembed = nn.Linear(d_model, vocab, bias=False)
        self.eval_data = eval_data
        self.curve: list[dict[str, float]] = []

    def forward(self, tokens: Tensor, return_patterns: bool = False) -> Tensor | tuple[Tensor, list[Tensor]]:
        x = self.embed(tokens) + self.pos.weight[: tokens.shape[1]]
        patterns = []
        for layer in self.layers:
            out, pattern = layer(x, return_pattern=True)
            x = x + out
            patterns.append(pattern)
        logits = self.unembed(x)
        return (logits, patterns) if return_patterns else logits

    @torch.no_grad()
    def scores(self, data: dict[str, Tensor]) -> dict[str, float]:
        """Per-head previous-token and induction scores, ICL score and losses on ``data``."""
        tokens, s1, s2, rep = data["tokens"], data["s1"], data["s2"], data["repeated"]
        logits, patterns = self(tokens[:, :-1], return_patterns=True)
        ce = F.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], reduction="none")  # [B, T-1]
        t = ce.shape[1]
        out = {"icl/score": float(ce[:, 3 * t // 4:].mean() - ce[:, : t // 4].mean()),
               "loss/all": float(ce.mean()), "loss/repeated": float(ce[rep].mean()),
               "loss/other": float(ce[~rep].mean())}
        b_idx, p_idx = rep.nonzero(as_tuple=True)  # repeated positions p = s2 + k
        target = s1[b_idx] + (p_idx - s2[b_idx]) + 1  # the token after the first occurrence
        for layer, pattern in enumerate(patterns):  # [B, H, T-1, T-1]
            prev = pattern.diagonal(offset=-1, dim1=-2, dim2=-1).mean(dim=(0, 2))  # att[p, p-1]
            induction = pattern[b_idx, :, p_idx, target].mean(0)
            for h in range(pattern.shape[1]):
                out[f"heads/prev/l{layer}.h{h}"] = float(prev[h])
                out[f"heads/induction/l{layer}.h{h}"] = float(induction[h])
        return out

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


def per_head_restrictions(model: AttentionOnly) -> dict[str, dict[str, Tensor]]:
    """``{"l0.h0": masks, ..., "l1.h3": masks}``: one restriction per head of every layer."""
    out: dict[str, dict[str, Tensor]] = {}
    for i in range(len(model.layers)):
        out.update(head_restrictions(model, f"layers.{i}", prefix=f"l{i}"))
    return out


def first_crossing(steps: list[int], values: list[float], level: float, above: bool = True) -> int | None:
    """The first step at which ``values`` reaches ``level`` (from below if ``above``, else from above)."""
    for s, v in zip(steps, values, strict=True):
        if (v >= level) if above else (v <= level):
            return s
    return None


def plot_run(result: dict[str, Any], path: str | Path) -> None:
    """Render the behavioural curves and the per-head LLCs of one run (``main``'s result) into a PNG."""
    from matplotlib.figure import Figure

    curve, llc = result["curve"], result.get("llc")
    prev_head, ind_head = result["prev_token_head"], result["induction_head"]
    heads = [k.split("/")[-1] for k in curve if k.startswith("heads/prev/")]
    fig = Figure(figsize=(13, 3.6), layout="constrained")
    ax1, ax2, ax3, ax4 = fig.subplots(1, 4)
    ax1.plot(curve["step"], curve["loss/repeated"], label="loss, repeated positions")
    ax1.plot(curve["step"], curve["loss/other"], label="loss, other positions")
    ax1.plot(curve["step"], curve["icl/score"], label="ICL score (late - early)")
    ax1.set(title="loss on 256 fixed sequences", xlabel="step")
    ax1.legend(fontsize=7)
    for h in heads:
        if h.startswith("l0."):
            ax2.plot(curve["step"], curve[f"heads/prev/{h}"], lw=2 if h == prev_head else 0.8, label=h)
        else:
            ax2.plot(curve["step"], curve[f"heads/induction/{h}"], ls="--", lw=2 if h == ind_head else 0.8, label=h)
    ax2.set(title="previous-token score (l0, solid), induction score (l1, dashed)", xlabel="step")
    ax2.title.set_fontsize(8)
    ax2.legend(fontsize=6, ncol=2)
    if llc is not None:
        for h in heads:
            special = h in (prev_head, ind_head)
            ax3.plot(llc["steps"], llc[h], marker="." if special else None, lw=2 if special else 0.8,
                     ls="-" if h.startswith("l0.") else "--", label=h)
        ax3.set(title=f"per-head LLC (thick: {prev_head}, {ind_head})", xlabel="step")
        ax3.title.set_fontsize(8)
        ax3.legend(fontsize=6, ncol=2)
        for name in ("all", "repeated", "other"):
            ax4.plot(llc["steps"], llc[name], marker=".", label=name)
        ax4.set(title="LLC: all weights; data restricted", xlabel="step")
        ax4.legend(fontsize=7)
    mark_events((ax1, ax2, ax3, ax4), result["milestones"], result["transitions"])
    fig.suptitle("induction heads: grey = milestones (previous-token / induction score 0.5, ICL score at half), "
                 "red = LLC transitions", fontsize=9)
    fig.savefig(path, dpi=110)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--logdir", default="runs/induction_heads", help="TensorBoard logs")
    p.add_argument("--max-steps", type=int, default=2000, help="Adam steps (batch of 64 fresh sequences each)")
    p.add_argument("--seed", type=int, default=0, help="seeds the initialization, the batches and the SGLD chains")
    p.add_argument("--data-seed", type=int, default=0, help="seeds the bigram chain and the probe/eval batches")
    p.add_argument("--lr", type=float, default=5e-3, help="Adam learning rate")
    p.add_argument("--llc-every", type=int, default=200, help="estimate the LLCs every this many steps (0: never)")
    p.add_argument("--eval-every", type=int, default=50, help="behavioural scores every this many steps")
    p.add_argument("--num-draws", type=int, default=LLC_SETTINGS["num_draws"], help="SGLD draws per chain")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--figure", default=None, help="also render the curves into this PNG (needs matplotlib)")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no tables")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train, score the heads, estimate the per-head LLCs; return every number the tables show."""
    args = parse_args(argv)
    set_threads(args.threads)
    pl.seed_everything(args.seed, verbose=False)
    logdir = Path(args.logdir)

    chain = bigram_chain(seed=args.data_seed)
    g = torch.Generator().manual_seed(10_000 + args.data_seed)
    eval_data = make_sequences(256, chain, g)
    probe = make_sequences(PROBE_SEQUENCES, chain, g)
    tokens, rep = probe["tokens"], probe["repeated"].float()
    # one full batch per loader: the three loaders hold the same sequences, only the counted positions differ
    data = full_batch_loader((tokens, torch.ones_like(rep)))
    datasets = {"repeated": full_batch_loader((tokens, rep)), "other": full_batch_loader((tokens, 1.0 - rep))}

    model = AttentionOnly(lr=args.lr, eval_every=args.eval_every, eval_data=eval_data)
    heads = per_head_restrictions(model)
    callbacks: list[pl.Callback] = []
    monitor = detector = None
    if args.llc_every > 0:
        monitor = LLCMonitor(loss_fn, data=data, every_n_steps=args.llc_every, restrictions=heads, datasets=datasets,
                             seed=args.seed, progress=not args.quiet, **{**LLC_SETTINGS, "num_draws": args.num_draws})
        detector = StageDetector(monitor="llc/mean")
        callbacks = [monitor, detector]
    trainer = pl.Trainer(
        max_steps=args.max_steps, accelerator="cpu", devices=1, logger=TensorBoardLogger(logdir, name="", version=""),
        callbacks=callbacks, log_every_n_steps=25, enable_checkpointing=False, enable_model_summary=False,
        enable_progress_bar=not args.quiet,
    )
    with Stopwatch() as clock:
        trainer.fit(model, torch.utils.data.DataLoader(SequenceStream(chain, args.max_steps, seed=args.seed),
                                                       batch_size=None))

    curve = model.curve
    steps = [int(c["step"]) for c in curve]
    head_names = list(heads)
    final = {k: v for k, v in curve[-1].items() if k != "step"} if curve else {}
    prev_head = max((h for h in head_names if h.startswith("l0.")), key=lambda h: final[f"heads/prev/{h}"])
    ind_head = max((h for h in head_names if h.startswith("l1.")), key=lambda h: final[f"heads/induction/{h}"])
    best_prev = [max(c[f"heads/prev/{h}"] for h in head_names if h.startswith("l0.")) for c in curve]
    best_ind = [max(c[f"heads/induction/{h}"] for h in head_names if h.startswith("l1.")) for c in curve]
    icl = [c["icl/score"] for c in curve]
    final_icl = icl[-1] if icl else float("nan")
    milestones = {
        "prev_token_0.5": first_crossing(steps, best_prev, 0.5),
        "induction_0.5": first_crossing(steps, best_ind, 0.5),
        # the ICL score falls below zero as the context starts to help
        "icl_half": first_crossing(steps, icl, final_icl / 2, above=False) if final_icl < 0 else None,
    }
    result: dict[str, Any] = {
        "curve": {k: [c[k] for c in curve] for k in (curve[0] if curve else {})},
        "milestones": milestones,
        "prev_token_head": prev_head, "induction_head": ind_head,
        "final": final, "train_seconds": clock.seconds, "logdir": str(logdir), "transitions": [],
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
        print(f"Milestones: {milestones}; previous-token head {prev_head}, induction head {ind_head}")
        rows = [c for c in curve if int(c["step"]) % 250 == 0]
        print(format_table(["step", "loss", "repeated", "other", "ICL score", f"prev {prev_head}",
                            f"ind {ind_head}", "best ind"],
                           [[int(c["step"]), c["loss/all"], c["loss/repeated"], c["loss/other"], c["icl/score"],
                             c[f"heads/prev/{prev_head}"], c[f"heads/induction/{ind_head}"],
                             max(c[f"heads/induction/{h}"] for h in head_names if h.startswith("l1."))]
                            for c in rows]))
        if monitor is not None:
            print()
            print("LLCs (all weights, per head, per data restriction):")
            cols = ["all", *head_names, "repeated", "other"]
            print(format_table(["step", *cols], [[s, *[llc[n][i] for n in cols]]
                                                 for i, s in enumerate(llc["steps"])]))
            print(f"\nTransitions of llc/mean: {[(t['changepoint_step'], t['direction']) for t in result['transitions']]}")
        print(f"\nTraining took {clock.seconds:.0f} s; TensorBoard: tensorboard --logdir {logdir}")
    return result


if __name__ == "__main__":
    main()
