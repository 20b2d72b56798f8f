"""Per-head restrictions: the masks partition the projections, they select what each attention
layout computes for that head, and SGLD restricted to one head moves exactly that head's entries."""

from __future__ import annotations

import math
from functools import reduce
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from devinterp_lightning import LLCMonitor, estimate_llc, head_restrictions
from devinterp_lightning.heads import head_restrictions as direct_import

E, H = 12, 3
D = E // H


class SeparateAttention(nn.Module):
    """Causal self-attention with q/k/v/o Linears; ``heads_out`` is the concatenated head outputs."""

    def __init__(self, e: int = E, h: int = H, names: tuple[str, str, str, str] = ("q_proj", "k_proj", "v_proj",
                                                                                  "o_proj")) -> None:
        super().__init__()
        self.num_heads = h
        self.names = names
        for n in names:
            setattr(self, n, nn.Linear(e, e))

    def heads_out(self, x: Tensor) -> Tensor:
        b, t, e = x.shape
        q, k, v = (getattr(self, n)(x).view(b, t, self.num_heads, -1).transpose(1, 2) for n in self.names[:3])
        att = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-1)
        return (att @ v).transpose(1, 2).reshape(b, t, e)

    def forward(self, x: Tensor) -> Tensor:
        return getattr(self, self.names[3])(self.heads_out(x))


class FusedAttention(nn.Module):
    """GPT-2 style: one ``c_attn`` Linear [3E, E] computing q, k and v; ``c_proj`` the output."""

    def __init__(self, e: int = E, h: int = H) -> None:
        super().__init__()
        self.n_head = h
        self.c_attn = nn.Linear(e, 3 * e)
        self.c_proj = nn.Linear(e, e)

    def heads_out(self, x: Tensor) -> Tensor:
        b, t, e = x.shape
        q, k, v = (z.view(b, t, self.n_head, -1).transpose(1, 2) for z in self.c_attn(x).split(e, dim=-1))
        att = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-1)
        return (att @ v).transpose(1, 2).reshape(b, t, e)

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(self.heads_out(x))


class MHAModel(nn.Module):
    def __init__(self, bias: bool = True, add_bias_kv: bool = False, kdim: int | None = None) -> None:
        super().__init__()
        self.kdim = kdim
        self.embed = nn.Linear(4, E)
        self.attn = nn.MultiheadAttention(E, H, batch_first=True, bias=bias, add_bias_kv=add_bias_kv,
                                          kdim=kdim, vdim=kdim)
        self.head = nn.Linear(E, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x)
        kv = h if self.kdim is None else h[..., : self.kdim]
        return self.head(self.attn(h, kv, kv, need_weights=False)[0]).squeeze(-1)


class SeparateModel(nn.Module):
    def __init__(self, attn: nn.Module | None = None) -> None:
        super().__init__()
        self.embed = nn.Linear(4, E)
        self.blocks = nn.ModuleList([attn if attn is not None else SeparateAttention()])
        self.head = nn.Linear(E, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks[0](self.embed(x))).squeeze(-1)


def _get(module: nn.Module, dotted: str) -> Tensor:
    return reduce(getattr, dotted.split("."), module)


def _check_partition(model: nn.Module, rs: dict[str, dict[str, Tensor]], covered: list[str],
                     uncovered: list[str]) -> None:
    named = dict(model.named_parameters())
    for masks in rs.values():
        for n, m in masks.items():
            assert m.dtype == torch.bool and m.shape == named[n].shape
            assert int(m.sum()) > 0
    for n in covered:
        counts = sum(masks[n].long() for masks in rs.values())
        assert torch.equal(counts, torch.ones_like(counts)), n  # every entry in exactly one head
    for n in uncovered:
        assert all(n not in masks for masks in rs.values()), n


def test_mha_masks_partition_the_projections() -> None:
    model = MHAModel()
    rs = head_restrictions(model, "attn", prefix="l0")
    assert list(rs) == ["l0.h0", "l0.h1", "l0.h2"]
    _check_partition(model, rs, ["attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight"],
                     ["attn.out_proj.bias", "embed.weight", "head.weight"])
    m = rs["l0.h1"]
    # head 1: rows 4..7 of each of the q, k and v blocks, columns 4..7 of the output weight
    rows = torch.zeros(3 * E, dtype=torch.bool)
    for block in range(3):
        rows[block * E + D: block * E + 2 * D] = True
    assert torch.equal(m["attn.in_proj_weight"].all(1), rows) and torch.equal(m["attn.in_proj_weight"].any(1), rows)
    assert torch.equal(m["attn.in_proj_bias"], rows)
    assert m["attn.out_proj.weight"][:, D:2 * D].all() and int(m["attn.out_proj.weight"].sum()) == E * D
    # without biases only the weights
    no_bias = head_restrictions(model, "attn", include_bias=False)
    assert list(no_bias) == ["attn.h0", "attn.h1", "attn.h2"]
    assert set(no_bias["attn.h0"]) == {"attn.in_proj_weight", "attn.out_proj.weight"}
    assert direct_import is head_restrictions


def test_mha_variants_bias_kv_separate_kdim_and_no_bias() -> None:
    model = MHAModel(add_bias_kv=True)
    rs = head_restrictions(model, "attn")
    _check_partition(model, rs, ["attn.in_proj_weight", "attn.in_proj_bias", "attn.bias_k", "attn.bias_v",
                                 "attn.out_proj.weight"], ["attn.out_proj.bias"])
    model = MHAModel(kdim=8)  # kdim != embed_dim: separate q/k/v_proj_weight parameters
    rs = head_restrictions(model, "attn")
    _check_partition(model, rs, ["attn.q_proj_weight", "attn.k_proj_weight", "attn.v_proj_weight",
                                 "attn.in_proj_bias", "attn.out_proj.weight"], ["attn.out_proj.bias"])
    model = MHAModel(bias=False)
    rs = head_restrictions(model, "attn")
    _check_partition(model, rs, ["attn.in_proj_weight", "attn.out_proj.weight"], [])


@pytest.mark.parametrize("names", [("q_proj", "k_proj", "v_proj", "o_proj"), ("query", "key", "value", "out"),
                                   ("W_Q", "W_K", "W_V", "W_O")])
def test_separate_layout_masks_partition_the_projections(names: tuple[str, str, str, str]) -> None:
    model = SeparateModel(SeparateAttention(names=names))
    rs = head_restrictions(model, "blocks.0", prefix="l0")
    assert list(rs) == ["l0.h0", "l0.h1", "l0.h2"]
    proj = [f"blocks.0.{n}.{p}" for n in names[:3] for p in ("weight", "bias")] + [f"blocks.0.{names[3]}.weight"]
    _check_partition(model, rs, proj, [f"blocks.0.{names[3]}.bias"])
    assert torch.equal(rs["l0.h2"][f"blocks.0.{names[0]}.weight"].all(1),
                       torch.arange(E) >= 2 * D)


def test_fused_qkv_linear_and_explicit_projection_names() -> None:
    model = SeparateModel(FusedAttention())
    rs = head_restrictions(model, "blocks.0", projections=("c_attn", "c_attn", "c_attn", "c_proj"))
    _check_partition(model, rs, ["blocks.0.c_attn.weight", "blocks.0.c_attn.bias", "blocks.0.c_proj.weight"],
                     ["blocks.0.c_proj.bias"])
    rows = rs["blocks.0.h0"]["blocks.0.c_attn.weight"].all(1)
    assert rows.nonzero().flatten().tolist() == [0, 1, 2, 3, 12, 13, 14, 15, 24, 25, 26, 27]


def _perturb(module: nn.Module, prefix: str, masks: dict[str, Tensor], scale: float = 0.5) -> None:
    with torch.no_grad():
        for name, m in masks.items():
            p = _get(module, name[len(prefix) + 1:] if prefix else name)
            p.add_(scale * torch.randn(p.shape) * m)


@pytest.mark.parametrize("layout", ["mha", "separate", "fused"])
def test_masks_select_what_the_module_computes_for_that_head(layout: str) -> None:
    """Moving head h's q/k/v entries changes only head h's output features; moving its output
    columns changes the output by exactly (that head's features) @ (the change)."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, E)
    if layout == "mha":
        attn = nn.MultiheadAttention(E, H, batch_first=True)

        def heads_out(a: nn.Module) -> Tensor:  # the concatenated heads: run with an identity out_proj
            w, b = a.out_proj.weight.detach().clone(), a.out_proj.bias.detach().clone()
            with torch.no_grad():
                a.out_proj.weight.copy_(torch.eye(E))
                a.out_proj.bias.zero_()
                y = a(x, x, x, need_weights=False)[0]
                a.out_proj.weight.copy_(w)
                a.out_proj.bias.copy_(b)
            return y
        out_w = "out_proj.weight"
        projections = None
    else:
        attn = SeparateAttention() if layout == "separate" else FusedAttention()

        def heads_out(a: nn.Module) -> Tensor:
            return a.heads_out(x).detach()
        out_w = "o_proj.weight" if layout == "separate" else "c_proj.weight"
        projections = None if layout == "separate" else ("c_attn", "c_attn", "c_attn", "c_proj")
    rs = head_restrictions(attn, "", num_heads=H, projections=projections)
    assert list(rs) == ["head.h0", "head.h1", "head.h2"]
    for h, masks in enumerate(rs.values()):
        before = heads_out(attn)
        y_before = attn(x, x, x, need_weights=False)[0] if layout == "mha" else attn(x)
        _perturb(attn, "", {n: m for n, m in masks.items() if n != out_w})
        after = heads_out(attn)
        changed = (after - before).abs().amax(dim=(0, 1)) > 0
        assert changed.view(H, D)[h].all() and not changed.view(H, D)[torch.arange(H) != h].any()
        # the output columns of head h multiply head h's features only
        feats = heads_out(attn)
        y0 = attn(x, x, x, need_weights=False)[0] if layout == "mha" else attn(x)
        w0 = _get(attn, out_w).detach().clone()
        _perturb(attn, "", {out_w: masks[out_w]})
        y1 = attn(x, x, x, need_weights=False)[0] if layout == "mha" else attn(x)
        delta = _get(attn, out_w).detach() - w0
        assert torch.allclose((y1 - y0).detach(), feats @ delta.T, atol=1e-5)
        assert not torch.equal(y_before, y1)


def _recording_loss(record: list[dict[str, Tensor]], names: list[str]) -> Any:
    """MSE that records the weights it is evaluated at. ``.tolist()`` cannot run under vmap, so the
    estimator falls back to looping over chains, where the recorded tensors are the chains' weights."""

    def loss_fn(model: nn.Module, batch: Any) -> Tensor:
        x, y = batch
        for n in names:  # .item() raises on the lanes vmap batches, before anything is recorded
            _get(model, n).detach().reshape(-1)[0].item()
        record.append({n: _get(model, n).detach().clone() for n in names})
        return (model(x) - y).pow(2).mean()

    return loss_fn


@pytest.mark.parametrize("layout", ["mha", "separate"])
def test_sgld_restricted_to_one_head_moves_exactly_that_head(layout: str) -> None:
    torch.manual_seed(1)
    model = MHAModel() if layout == "mha" else SeparateModel()
    module = "attn" if layout == "mha" else "blocks.0"
    x = torch.randn(16, 5, 4)
    y = torch.randn(16, 5)
    loader = [(x, y)]
    names = [n for n, _ in model.named_parameters()]
    anchor = {n: p.detach().clone() for n, p in model.named_parameters()}
    rs = head_restrictions(model, module, prefix="l0")
    record: list[dict[str, Tensor]] = []
    res = estimate_llc(model, _recording_loss(record, names), loader, lr=1e-3, localization=100.0, nbeta=10.0,
                       num_chains=2, num_draws=5, num_burnin_steps=2, restrict=rs["l0.h1"], seed=0)
    assert math.isfinite(res.mean)
    assert len(record) > 10
    mask = rs["l0.h1"]
    moved_any = {n: torch.zeros(anchor[n].shape, dtype=torch.bool) for n in names}
    for weights in record:
        for n in names:
            moved = weights[n] != anchor[n]
            inside = mask.get(n, torch.zeros_like(moved))
            assert not (moved & ~inside).any(), f"{n} moved outside head 1"  # bitwise unchanged elsewhere
            moved_any[n] |= moved
    for n in names:
        expected = mask.get(n, torch.zeros(anchor[n].shape, dtype=torch.bool))
        assert torch.equal(moved_any[n], expected), n  # every entry of head 1 moved, and nothing else
    # the model itself is untouched
    for n, p in model.named_parameters():
        assert torch.equal(p, anchor[n])


def test_llc_monitor_accepts_the_restrictions() -> None:
    model = MHAModel()
    rs = {**head_restrictions(model, "attn", prefix="l0")}
    monitor = LLCMonitor(lambda m, b: (m(b[0]) - b[1]).pow(2).mean(), data=[(torch.randn(8, 5, 4),
                                                                             torch.randn(8, 5))],
                         restrictions=rs, every_n_steps=10, num_draws=5, num_burnin_steps=1)
    assert monitor.monitor_keys() == ["llc/mean", "llc/l0.h0/mean", "llc/l0.h1/mean", "llc/l0.h2/mean"]


def test_errors_name_the_problem() -> None:
    model = SeparateModel()
    with pytest.raises(ValueError, match="no submodule 'blocks.1'.*blocks.0"):
        head_restrictions(model, "blocks.1")
    with pytest.raises(ValueError, match="do not divide"):
        head_restrictions(model, "blocks.0", num_heads=5)
    with pytest.raises(ValueError, match="layout='mha' needs an nn.MultiheadAttention"):
        head_restrictions(model, "blocks.0", layout="mha")
    with pytest.raises(ValueError, match="no query/key/value/output nn.Linear children.*projections="):
        head_restrictions(model, "embed", num_heads=2)
    with pytest.raises(ValueError, match="cannot tell how many heads"):
        head_restrictions(SeparateModel(FusedAttention()), "blocks.0.c_attn")
    with pytest.raises(ValueError, match="num_heads=2 but 'attn' has num_heads=3"):
        head_restrictions(MHAModel(), "attn", num_heads=2)
    gqa = SeparateAttention()
    gqa.k_proj = nn.Linear(E, D)
    gqa.v_proj = nn.Linear(E, D)
    with pytest.raises(ValueError, match="grouped or multi-query"):
        head_restrictions(gqa, "", num_heads=H)
    with pytest.raises(ValueError, match="prefix"):
        head_restrictions(model, "blocks.0", prefix="a/b")
