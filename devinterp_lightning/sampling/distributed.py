"""Merge the chains of one estimate across distributed ranks (no Lightning import).

Under DDP every rank samples its share of the chains (chain ``c`` on rank ``c % world_size``).
:func:`gather_chains` all-gathers each job's per-chain traces with torchmetrics'
:func:`~torchmetrics.utilities.distributed.gather_all_tensors` (which pads and trims uneven
chain counts itself) and re-summarizes them, so every rank ends with the same
:class:`~devinterp_lightning.sampling.result.LLCResult` per job, built from rank 0's chains
followed by rank 1's, and so on. :func:`merge_packed` is the pure half, testable without a
process group.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from devinterp_lightning.sampling.estimator import MINIBATCH_NOISE, NONFINITE_INIT
from devinterp_lightning.sampling.result import UNRELAXED, LLCResult, summarize_chains

#: flags the estimator attaches from outside the traces; they travel as 0/1 columns so a merged
#: result keeps a flag any rank raised
ESTIMATOR_FLAGS = (MINIBATCH_NOISE, NONFINITE_INIT, UNRELAXED)

__all__ = ["gather_chains", "local_chains", "merge_packed", "pack_chains"]


def local_chains(num_chains: int, rank: int, world_size: int) -> int:
    """Chains run by ``rank`` when chain ``c`` belongs to rank ``c % world_size``."""
    return len(range(rank, num_chains, world_size))


def pack_chains(local: Mapping[str, LLCResult]) -> Tensor:
    """``[chains, jobs, 2 * draws + 2 + F]`` float64: per chain and job the loss trace, the trace at
    w*, the diverged flag, the job's nbeta and one 0/1 column per :data:`ESTIMATOR_FLAGS` (repeated
    per chain so that one tensor carries it all)."""
    rows = []
    for res in local.values():
        n = res.num_chains
        rows.append(torch.cat([
            res.loss_trace.detach().to("cpu", torch.float64),
            res.init_loss_trace.detach().to("cpu", torch.float64),
            res.diverged.detach().to("cpu", torch.float64).reshape(n, 1),
            torch.full((n, 1), float(res.nbeta), dtype=torch.float64),
            torch.tensor([[float(f in res.flags) for f in ESTIMATOR_FLAGS]], dtype=torch.float64).expand(n, -1),
        ], dim=1))
    return torch.stack(rows, dim=1)


def merge_packed(per_rank: Sequence[Tensor], local: Mapping[str, LLCResult]) -> dict[str, LLCResult]:
    """Re-summarize every job over the chains of all ranks (``per_rank`` from :func:`pack_chains`,
    in rank order). ``local`` supplies the job names and the recorded lr and localization."""
    merged: dict[str, LLCResult] = {}
    for j, (name, res) in enumerate(local.items()):
        rows = torch.cat([packed[:, j].to("cpu", torch.float64) for packed in per_rank if packed.shape[0]])
        draws = (rows.shape[1] - 2 - len(ESTIMATOR_FLAGS)) // 2
        nbetas = rows[:, 2 * draws + 1]
        raised = rows[:, 2 * draws + 2 :].amax(dim=0) if rows.shape[0] else torch.zeros(len(ESTIMATOR_FLAGS))
        if not torch.allclose(nbetas, nbetas[0].expand_as(nbetas), rtol=1e-9, atol=0.0):
            raise RuntimeError(
                f"LLCMonitor: ranks sampled {name!r} with different nbeta ({sorted(set(nbetas.tolist()))}) "
                "because their probe batches differ in size; pass nbeta= explicitly"
            )
        merged[name] = summarize_chains(
            rows[:, :draws], rows[:, draws : 2 * draws], float(nbetas[0]), lr=res.lr,
            localization=res.localization, diverged=rows[:, 2 * draws].bool(), warn=False,
            extra_flags=[f for f, r in zip(ESTIMATOR_FLAGS, raised.tolist(), strict=True) if r > 0],
        )
    return merged


def gather_chains(local: Mapping[str, LLCResult], device: torch.device | str = "cpu",
                  group: object | None = None) -> dict[str, LLCResult]:
    """All-gather every rank's chains and re-summarize; the identity without a process group.

    ``device`` is where the collective runs (the rank's CUDA device for NCCL, CPU for gloo).
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return dict(local)
    from torchmetrics.utilities.distributed import gather_all_tensors

    return merge_packed(gather_all_tensors(pack_chains(local).to(device), group=group), local)
