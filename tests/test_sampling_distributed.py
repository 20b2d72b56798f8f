"""The rank merge of chain traces, without a process group (the DDP test covers the collective)."""

from __future__ import annotations

import pytest
import torch

from devinterp_lightning.sampling.distributed import gather_chains, local_chains, merge_packed, pack_chains
from devinterp_lightning.sampling.result import summarize_chains


def _result(chains: int, seed: int, nbeta: float = 12.0, diverge: int | None = None):
    g = torch.Generator().manual_seed(seed)
    init = 1.0 + 0.1 * torch.rand(chains, 7, generator=g)
    loss = init + 0.05 + 0.02 * torch.randn(chains, 7, generator=g)
    if diverge is not None:
        loss[diverge, 3] = float("inf")
    return summarize_chains(loss.float(), init.float(), nbeta, lr=1e-3, localization=50.0, warn=False)


def test_chains_are_dealt_round_robin():
    assert [local_chains(5, r, 2) for r in range(2)] == [3, 2]
    assert sum(local_chains(7, r, 3) for r in range(3)) == 7


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_merging_uneven_ranks_equals_summarizing_all_chains_in_rank_order(seed: int):
    ranks = [{"llc": _result(3, seed, diverge=1), "llc/head": _result(3, seed + 10)},
             {"llc": _result(2, seed + 20), "llc/head": _result(2, seed + 30)}]
    merged = merge_packed([pack_chains(r) for r in ranks], ranks[0])
    for name in ("llc", "llc/head"):
        expected = summarize_chains(
            torch.cat([r[name].loss_trace for r in ranks]), torch.cat([r[name].init_loss_trace for r in ranks]),
            12.0, lr=1e-3, localization=50.0, warn=False,
        )
        got = merged[name]
        assert got.num_chains == 5 and got.mean == expected.mean and got.std == expected.std
        assert torch.equal(got.diverged, expected.diverged)
    assert merged["llc"].diverged.tolist() == [False, True, False, False, False]


def test_different_nbeta_across_ranks_is_an_error_naming_the_fix():
    ranks = [{"llc": _result(2, 0, nbeta=12.0)}, {"llc": _result(2, 1, nbeta=9.0)}]
    with pytest.raises(RuntimeError, match="different nbeta.*pass nbeta= explicitly"):
        merge_packed([pack_chains(r) for r in ranks], ranks[0])


def test_without_a_process_group_the_local_result_is_kept():
    local = {"llc": _result(2, 0)}
    assert gather_chains(local)["llc"] is local["llc"]


def test_a_flag_the_estimator_raised_on_one_rank_survives_the_merge():
    import dataclasses

    noisy = _result(2, 1)
    noisy = dataclasses.replace(noisy, flags=(*noisy.flags, "minibatch_noise"))
    ranks = [{"llc": _result(3, 0)}, {"llc": noisy}]
    merged = merge_packed([pack_chains(r) for r in ranks], ranks[0])["llc"]
    assert "minibatch_noise" in merged.flags and "nonfinite_init" not in merged.flags
    clean = merge_packed([pack_chains(r) for r in ranks[:1]], ranks[0])["llc"]
    assert "minibatch_noise" not in clean.flags
