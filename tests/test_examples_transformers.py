"""The transformer examples (in-context linear regression, induction heads) run, and their full runs
show the documented results.

Fast tests run each example for a few steps with few SGLD draws; the full default runs are slow.
The margins of the slow tests come from seeds 0, 1, 2 (docs/examples.md has the tables).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

HEADS = [f"l{layer}.h{h}" for layer in range(2) for h in range(4)]


def test_icl_tasks_and_ridge_predictions() -> None:
    from examples.in_context_linear_regression import make_tasks, ridge_predictions

    d = make_tasks(2000, torch.Generator().manual_seed(0), noise_var=0.125)
    assert d["tokens"].shape == (2000, 16, 5)
    assert torch.equal(d["tokens"][:, 0::2, 1:], d["x"]) and torch.equal(d["tokens"][:, 1::2, 0], d["y"])
    assert (d["tokens"][:, 0::2, 0] == 0).all() and (d["tokens"][:, 1::2, 1:] == 0).all()
    # residual noise has variance 0.125
    resid = d["y"] - (d["x"] @ d["t"].unsqueeze(-1)).squeeze(-1)
    assert abs(float(resid.var()) - 0.125) < 0.01
    pred = ridge_predictions(d["x"], d["y"])
    err = (pred - d["y"]).pow(2).mean(0)
    # k = 1: the prior mean 0, E[y^2] = 4 + 0.125; with more pairs the posterior mean gets close to
    # the noise floor (Bayes risk sigma^2 (1 + tr((X^T X / sigma^2 + I)^-1 ...)) > 0.125)
    assert abs(float(err[0]) - 4.125) < 0.35
    assert all(float(err[k + 1]) < float(err[k]) for k in range(7))
    assert 0.125 < float(err[-1]) < 0.6


def test_induction_sequences_repeat_a_segment() -> None:
    from examples.induction_heads import SEGMENT, bigram_chain, make_sequences

    chain = bigram_chain(seed=3)
    assert torch.allclose(chain.sum(1), torch.ones(chain.shape[0]))
    d = make_sequences(500, chain, torch.Generator().manual_seed(0))
    tok, s1, s2, rep = d["tokens"], d["s1"], d["s2"], d["repeated"]
    assert (s2 >= s1 + SEGMENT).all() and (s2 + SEGMENT <= tok.shape[1]).all()
    for i in range(0, 500, 37):
        a, b = int(s1[i]), int(s2[i])
        assert torch.equal(tok[i, a:a + SEGMENT], tok[i, b:b + SEGMENT])
        # the targets tokens[p + 1] at repeated positions p are the copy's tokens 1 .. SEGMENT-1
        assert rep[i].nonzero().flatten().tolist() == list(range(b, b + SEGMENT - 1))
    assert int(rep.sum()) == 500 * (SEGMENT - 1)


def test_induction_scores_of_a_hand_built_pattern() -> None:
    """The score functions read the attention pattern the way their docstrings say."""
    from examples.induction_heads import AttentionOnly, bigram_chain, make_sequences

    model = AttentionOnly()
    data = make_sequences(16, bigram_chain(), torch.Generator().manual_seed(1))
    scores = model.scores(data)
    assert set(HEADS) == {k.split("/")[-1] for k in scores if k.startswith("heads/prev/")}
    # at initialization attention is spread over the causal prefix: no head scores high
    assert max(v for k, v in scores.items() if k.startswith("heads/")) < 0.35
    assert math.isfinite(scores["icl/score"])


def test_icl_short_run(tmp_path: Path) -> None:
    from examples import in_context_linear_regression as icl

    out = icl.main(["--logdir", str(tmp_path), "--max-steps", "40", "--llc-every", "20", "--eval-every", "10",
                    "--num-draws", "4", "--quiet"])
    llc = out["llc"]
    assert llc["steps"] == [0, 20, 40]
    for name in ("all", *icl.COMPONENTS):
        assert len(llc[name]) == 3 and all(math.isfinite(v) for v in llc[name])
    assert out["curve"]["step"] == [0.0, 10.0, 20.0, 30.0]
    assert set(out["milestones"]) == {"pred_norm_min", "icl_half", "icl_90"}
    assert isinstance(out["transitions"], list)
    assert set(out["final"]) >= {"icl/score", "icl/pred_norm", "icl/ridge_loss", "icl/zero_loss", "icl/loss"}
    # the same batch: ridge (posterior mean) beats the zero predictor by a wide margin
    assert out["final"]["icl/ridge_loss"] < 0.6 * out["final"]["icl/zero_loss"]
    assert list(tmp_path.rglob("events.out.tfevents.*"))


def test_induction_short_run(tmp_path: Path) -> None:
    from examples import induction_heads as ih

    out = ih.main(["--logdir", str(tmp_path), "--max-steps", "40", "--llc-every", "40", "--eval-every", "10",
                   "--num-draws", "3", "--quiet"])
    llc = out["llc"]
    assert llc["steps"] == [0, 40]
    for name in ("all", *HEADS, "repeated", "other"):
        assert len(llc[name]) == 2 and all(math.isfinite(v) for v in llc[name])
    assert set(out["milestones"]) == {"prev_token_0.5", "induction_0.5", "icl_half"}
    assert out["prev_token_head"].startswith("l0.") and out["induction_head"].startswith("l1.")
    assert isinstance(out["transitions"], list)
    # the bigram stage is under way: the loss falls from ~log(64) = 4.16
    assert out["curve"]["loss/all"][0] > 4.0 and out["curve"]["loss/all"][-1] < out["curve"]["loss/all"][0] - 0.2
    assert list(tmp_path.rglob("events.out.tfevents.*"))
