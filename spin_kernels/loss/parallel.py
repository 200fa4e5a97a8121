"""Vocab-parallel reductions: combine per-shard log-prob statistics over a process group.

Each rank holds a contiguous vocab shard `[rank·V_local, (rank+1)·V_local)` and computes, per
row, the max and log-sum of its columns and the target logit if the label falls in its shard (0
otherwise). One all-gather of those three numbers per row gives every rank the global values; the
backward then needs no communication, since `exp(x − lse_global)` is local.
"""
import torch
import torch.distributed as dist

from spin_kernels.loss.torch_backend import LN2


def shard_bounds(v_local: int, group) -> tuple[int, int]:
    """(first vocab id of this rank's shard, total vocab size); the whole vocab without a group."""
    if group is None:
        return 0, v_local
    return dist.get_rank(group) * v_local, dist.get_world_size(group) * v_local


# torch 2.13 renamed all_gather_into_tensor (deprecated there) to all_gather_single; 2.11 has only the old name.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def combine_shard_stats(stats: torch.Tensor, group) -> torch.Tensor:
    """Global stats [3, N] (max, log2-sum, target; base 2) from every rank's local ones, in one
    collective."""
    world = dist.get_world_size(group)
    gathered = stats.new_empty((world * 3, stats.shape[1]))  # ranks concatenated along dim 0
    _all_gather_single(gathered, stats.contiguous(), group=group)
    m, log_sum, t = gathered.view(world, 3, -1).unbind(1)  # each [world, N]
    m_all = m.max(dim=0).values
    # Σ_r 2^(m_r − M + l_r) = 1 + rest, with the exact 1 of (one) max rank kept out of the sum,
    # as the kernels do within a rank: a confident row's tiny log-prob keeps its precision.
    is_max = m == m_all
    terms = torch.where(is_max, torch.expm1(log_sum * LN2), torch.exp2((m - m_all) + log_sum))
    rest = terms.sum(dim=0) + (is_max.sum(dim=0) - 1)
    return torch.stack([m_all, torch.log1p(rest) / LN2, t.sum(dim=0)])
