"""One weight restriction per attention head, as boolean masks over the Q, K, V and O projections.

A refined LLC restricted to one head (Wang et al. 2024) lets SGLD move only the weights that
belong to that head and keeps every other weight at the snapshot ``w*``. In a multi-head
attention layer with ``H`` heads of width ``d = E / H`` the projections are shared tensors, so a
head is not a parameter but a block of rows and columns:

* head ``h`` owns rows ``h*d .. (h+1)*d - 1`` of the query, key and value projections (their
  weights ``[E_out, E_in]`` and their biases ``[E_out]``): the ``d`` output features of the head;
* head ``h`` owns columns ``h*d .. (h+1)*d - 1`` of the output projection's weight ``[E, E]``:
  the inputs that come from the head.

The output projection's bias is added after the heads are summed, so it belongs to no head and
is never in a head's mask. This assumes the usual layout in which the ``E`` output features of a
projection are the heads' features one head after the other (``q.view(..., H, d)``), as in
:class:`torch.nn.MultiheadAttention` and in the q/k/v/o-``Linear`` layout of most
implementations.

:func:`head_restrictions` returns ``{name: {parameter name: bool mask of the parameter's shape}}``,
the form ``LLCMonitor(restrictions=...)`` and ``estimate_llc(restrict=...)`` accept. Pure torch,
no Lightning.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["SEPARATE_PROJECTION_NAMES", "head_restrictions"]

#: Attribute names of (query, key, value, output) ``nn.Linear`` children tried by
#: ``layout="auto"``/``"separate"`` when ``projections`` is not given, in this order.
SEPARATE_PROJECTION_NAMES: tuple[tuple[str, str, str, str], ...] = (
    ("q_proj", "k_proj", "v_proj", "o_proj"),
    ("q_proj", "k_proj", "v_proj", "out_proj"),
    ("query", "key", "value", "out"),
    ("q", "k", "v", "o"),
    ("W_Q", "W_K", "W_V", "W_O"),
)

_HEAD_COUNT_ATTRS = ("num_heads", "n_heads", "n_head", "num_attention_heads", "nhead")


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _infer_num_heads(module: nn.Module, module_name: str) -> int:
    for attr in _HEAD_COUNT_ATTRS:
        value = getattr(module, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ValueError(
        f"head_restrictions: cannot tell how many heads {module_name!r} ({type(module).__name__}) has: it has "
        f"none of the attributes {list(_HEAD_COUNT_ATTRS)}. Pass num_heads=<number of heads>."
    )


def _check_divisible(width: int, num_heads: int, what: str, module_name: str) -> int:
    if num_heads < 1 or width % num_heads:
        raise ValueError(
            f"head_restrictions: {module_name!r}: {what} has width {width}, which {num_heads} heads do not divide "
            "evenly; check num_heads"
        )
    return width // num_heads


def _mha_masks(module: nn.MultiheadAttention, name: str, num_heads: int,
               include_bias: bool) -> list[dict[str, Tensor]]:
    e = module.embed_dim
    d = _check_divisible(e, num_heads, "embed_dim", name)
    out: list[dict[str, Tensor]] = []
    for h in range(num_heads):
        rows = slice(h * d, (h + 1) * d)
        masks: dict[str, Tensor] = {}
        if module.in_proj_weight is not None:
            # fused [3E, E]: the query, key and value blocks one after the other
            w = torch.zeros(module.in_proj_weight.shape, dtype=torch.bool)
            for block in range(3):
                w[block * e + rows.start: block * e + rows.stop] = True
            masks[_join(name, "in_proj_weight")] = w
        else:  # kdim/vdim differ from embed_dim: three separate [E, in] weights
            for pname in ("q_proj_weight", "k_proj_weight", "v_proj_weight"):
                p = getattr(module, pname)
                w = torch.zeros(p.shape, dtype=torch.bool)
                w[rows] = True
                masks[_join(name, pname)] = w
        if include_bias and module.in_proj_bias is not None:
            b = torch.zeros(module.in_proj_bias.shape, dtype=torch.bool)
            for block in range(3):
                b[block * e + rows.start: block * e + rows.stop] = True
            masks[_join(name, "in_proj_bias")] = b
        if include_bias:
            for pname in ("bias_k", "bias_v"):  # add_bias_kv: [1, 1, E], one slice per head
                p = getattr(module, pname, None)
                if p is not None:
                    b = torch.zeros(p.shape, dtype=torch.bool)
                    b[..., rows] = True
                    masks[_join(name, pname)] = b
        o = torch.zeros(module.out_proj.weight.shape, dtype=torch.bool)
        o[:, rows] = True
        masks[_join(name, "out_proj.weight")] = o
        out.append(masks)
    return out


def _find_projections(module: nn.Module, module_name: str,
                      projections: Sequence[str] | None) -> tuple[str, str, str, str]:
    if projections is not None:
        if len(projections) != 4 or not all(isinstance(p, str) for p in projections):
            raise ValueError(
                "head_restrictions: projections must be four attribute names (query, key, value, output), "
                f"e.g. ('q_proj', 'k_proj', 'v_proj', 'o_proj'); got {projections!r}"
            )
        candidates: Sequence[Sequence[str]] = [tuple(projections)]
    else:
        candidates = SEPARATE_PROJECTION_NAMES
    for names in candidates:
        if all(isinstance(getattr(module, n, None), nn.Linear) for n in names):
            return tuple(names)  # type: ignore[return-value]
    children = [n for n, m in module.named_children() if isinstance(m, nn.Linear)]
    tried = [tuple(projections)] if projections is not None else list(SEPARATE_PROJECTION_NAMES)
    raise ValueError(
        f"head_restrictions: {module_name!r} ({type(module).__name__}) is not an nn.MultiheadAttention and has no "
        f"query/key/value/output nn.Linear children named {tried}; its nn.Linear children are {children}. "
        "Pass projections=(query, key, value, output) with their attribute names."
    )


def _separate_masks(module: nn.Module, name: str, num_heads: int, include_bias: bool,
                    projections: Sequence[str] | None) -> list[dict[str, Tensor]]:
    qn, kn, vn, on = _find_projections(module, name, projections)
    q, k, v, o = (getattr(module, n) for n in (qn, kn, vn, on))
    fused = q is k and k is v  # one Linear [3E, in] computing q, k and v (GPT-2's c_attn)
    if fused:
        width = _check_divisible(q.out_features, 3, "the fused qkv projection", name)
        d = _check_divisible(width, num_heads, "the fused qkv projection's thirds", name)
    else:
        d = _check_divisible(q.out_features, num_heads, f"{qn}.out_features", name)
        for n, p in ((kn, k), (vn, v)):
            if p.out_features != q.out_features:
                raise ValueError(
                    f"head_restrictions: {name!r}: {n}.out_features = {p.out_features} differs from "
                    f"{qn}.out_features = {q.out_features} (grouped or multi-query attention); heads that "
                    "share key/value weights cannot be separated by masks, so this layout is not supported"
                )
    if o.in_features != num_heads * d:
        raise ValueError(
            f"head_restrictions: {name!r}: {on}.in_features = {o.in_features}, but {num_heads} heads of width {d} "
            f"give {num_heads * d}; check num_heads and projections"
        )
    out: list[dict[str, Tensor]] = []
    for h in range(num_heads):
        rows = slice(h * d, (h + 1) * d)
        masks: dict[str, Tensor] = {}
        if fused:  # the query, key and value blocks of the fused output, one after the other
            e = num_heads * d
            blocks = [(qn, q, [slice(b * e + rows.start, b * e + rows.stop) for b in range(3)])]
        else:
            blocks = [(qn, q, [rows]), (kn, k, [rows]), (vn, v, [rows])]
        for pname, lin, slices in blocks:
            w = torch.zeros(lin.weight.shape, dtype=torch.bool)
            for s in slices:
                w[s] = True
            masks[_join(name, f"{pname}.weight")] = w
            if include_bias and lin.bias is not None:
                b = torch.zeros(lin.bias.shape, dtype=torch.bool)
                for s in slices:
                    b[s] = True
                masks[_join(name, f"{pname}.bias")] = b
        w = torch.zeros(o.weight.shape, dtype=torch.bool)
        w[:, rows] = True
        masks[_join(name, f"{on}.weight")] = w
        out.append(masks)
    return out


def head_restrictions(
    model: nn.Module,
    module_name: str,
    num_heads: int | None = None,
    *,
    prefix: str | None = None,
    include_bias: bool = True,
    layout: str = "auto",
    projections: Sequence[str] | None = None,
) -> dict[str, dict[str, Tensor]]:
    """One weight restriction per head of the attention module ``model.<module_name>``.

    Returns ``{f"{prefix}.h{i}": {parameter name: bool mask}}`` for heads ``i = 0 .. H-1``, with
    parameter names as in ``model.named_parameters()``, ready for ``LLCMonitor(restrictions=...)``
    (merge several layers with ``{**head_restrictions(m, "blocks.0.attn", prefix="l0"), ...}``)
    or ``estimate_llc(restrict=...)`` (one value of the dict). Head ``i``'s mask covers rows
    ``i*d .. (i+1)*d - 1`` of the query, key and value weights (and biases) and the same columns of
    the output weight, ``d = E / H``; the heads' masks are disjoint and together cover those
    tensors entirely, except the output bias, which belongs to no head.

    Args:
        model: the network whose ``named_parameters()`` the masks refer to.
        module_name: the attention module's name in ``model.named_modules()`` (``""``: ``model``
            itself is the attention module).
        num_heads: ``H``; None reads ``num_heads`` (or ``n_heads``, ``n_head``,
            ``num_attention_heads``, ``nhead``) from the module.
        prefix: restriction names are ``f"{prefix}.h{i}"``; None uses ``module_name`` (``"head"``
            if that is empty). Metric names come out as ``llc/<prefix>.h<i>/mean``.
        include_bias: also restrict the per-head entries of the q/k/v biases (and
            ``bias_k``/``bias_v`` of an ``nn.MultiheadAttention`` built with ``add_bias_kv``).
        layout: ``"mha"`` (:class:`torch.nn.MultiheadAttention`: fused ``in_proj_weight``
            ``[3E, E]`` or ``q/k/v_proj_weight``, ``in_proj_bias``, ``out_proj``), ``"separate"``
            (q, k, v, o :class:`~torch.nn.Linear` children of width ``H*d``; q, k and v may be one
            fused ``[3E, in]`` Linear), or ``"auto"`` (``"mha"`` for an ``nn.MultiheadAttention``,
            else ``"separate"``).
        projections: ``(query, key, value, output)`` attribute names for ``"separate"``; None tries
            :data:`SEPARATE_PROJECTION_NAMES`. Give the same name three times for a fused qkv Linear.

    Raises:
        ValueError: the module does not exist, the layout does not match it, ``num_heads`` does not
            divide the projection width, or key/value have fewer heads than the query (grouped
            attention: heads share weights there, so no mask can separate them).
    """
    modules = dict(model.named_modules())
    if module_name not in modules:
        attn = [n for n, m in modules.items() if isinstance(m, nn.MultiheadAttention) or any(
            isinstance(getattr(m, p, None), nn.Linear) for p in ("q_proj", "query", "q", "W_Q"))]
        raise ValueError(
            f"head_restrictions: the model has no submodule {module_name!r}; attention-like submodules: {attn}"
        )
    module = modules[module_name]
    if layout not in ("auto", "mha", "separate"):
        raise ValueError(f"head_restrictions: layout must be 'auto', 'mha' or 'separate'; got {layout!r}")
    is_mha = isinstance(module, nn.MultiheadAttention)
    if layout == "mha" and not is_mha:
        raise ValueError(
            f"head_restrictions: layout='mha' needs an nn.MultiheadAttention, but {module_name!r} is a "
            f"{type(module).__name__}; use layout='separate' (q/k/v/o Linear children) or 'auto'"
        )
    if num_heads is None:
        num_heads = _infer_num_heads(module, module_name)
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"head_restrictions: num_heads must be a positive int; got {num_heads!r}")
    if is_mha and layout in ("auto", "mha"):
        if num_heads != module.num_heads:
            raise ValueError(
                f"head_restrictions: num_heads={num_heads} but {module_name!r} has num_heads={module.num_heads}"
            )
        per_head = _mha_masks(module, module_name, num_heads, include_bias)
    else:
        per_head = _separate_masks(module, module_name, num_heads, include_bias, projections)
    if prefix is None:
        prefix = module_name or "head"
    if not prefix or "/" in prefix or "@" in prefix:
        raise ValueError(f"head_restrictions: prefix {prefix!r} must be non-empty, without '/' or '@'")
    return {f"{prefix}.h{i}": masks for i, masks in enumerate(per_head)}
