"""The fused LM head's custom ops: each runs a whole chunk loop (`head_chunks.ChunkedHead`) behind
one `torch.library.custom_op`, so that `torch.compile(fullgraph=True)` traces callers while the loop
itself (whose chunk count depends on the labels) stays eager.

    linear_logprob_stats   per-row stats [3, N] of this rank's vocab shard      (forward, 2·H·V)
    linear_logprob_grad    d hidden, d weight, d bias of Σ grad · log-prob     (backward, 6·H·V)
    linear_spin_forward    policy log-probs [2B] and the SPIN loss's gradients, formed pair by
                           pair in the forward                                   (6·H·V)
    scale_grad_            multiplies a preformed gradient by the upstream gradient, in fp32

Rows whose label is `ignore_index` are compacted away before any matmul; counting them is each
op's one host sync (none inside the chunk loop). `backend` picks the fold of the logits path:
"triton" (`ops/logprobs.py`) or "torch" (`reference.py`); the matmuls are cuBLAS in both.
"""
from typing import Optional

import torch

from spin_kernels.loss.head_chunks import ChunkedHead, labelled_rows, pair_groups, token_chunks
from spin_kernels.loss.pair import LOSS_TYPES
from spin_kernels.loss.reference import LN2


def _logp(stats: torch.Tensor) -> torch.Tensor:
    m, log_sum, t = stats.unbind(0)
    return ((t - m) - log_sum) * LN2  # as in logits.py: exact for a confident row


def _fake_grads(hidden, weight, bias, need_hidden, need_weight, need_bias):
    empty = hidden.new_empty
    return (torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if need_hidden
            else empty(0),
            torch.empty_like(weight) if need_weight else empty(0),
            torch.empty_like(bias) if need_bias and bias is not None else empty(0))


@torch.library.custom_op("spin_kernels::linear_logprob_stats", mutates_args=())
def linear_logprob_stats(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                         labels: torch.Tensor, ignore_index: int, inv_temperature: float,
                         vocab_start: int, vocab_total: int, backend: str) -> torch.Tensor:
    """Stats [3, N] of `logits = hidden @ weight.T + bias` over this rank's columns, as
    `logprob_stats` defines them (zeros for ignored rows); not combined over ranks."""
    flat = labels.reshape(-1)
    stats = torch.zeros(3, flat.numel(), dtype=torch.float32, device=hidden.device)
    head = ChunkedHead(hidden, weight, bias, backend=backend, ignore_index=ignore_index,
                       inv_temperature=inv_temperature, vocab_start=vocab_start,
                       vocab_total=vocab_total)
    rows = labelled_rows(flat != ignore_index)
    chunks = token_chunks(rows.numel(), head.rows_per_chunk)
    head.reserve(chunks)
    for start, end in chunks:
        chunk = rows[start:end]
        _, logits = head.logits(chunk)
        stats[:, chunk] = head.stats(logits, flat[chunk])
    return stats


@linear_logprob_stats.register_fake
def _(hidden, weight, bias, labels, ignore_index, inv_temperature, vocab_start, vocab_total, backend):
    return hidden.new_empty((3, labels.numel()), dtype=torch.float32)


@torch.library.custom_op("spin_kernels::linear_logprob_grad", mutates_args=())
def linear_logprob_grad(grad: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor,
                        bias: Optional[torch.Tensor], labels: torch.Tensor, stats: torch.Tensor,
                        ignore_index: int, inv_temperature: float, vocab_start: int, backend: str,
                        need_hidden: bool, need_weight: bool, need_bias: bool
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d hidden, d weight, d bias) of Σ_rows grad · log-prob, recomputing each chunk's logits;
    `stats` are the forward's (global under vocab parallelism). d hidden is this rank's share:
    the caller sums it over the group. Rows with a zero upstream gradient are skipped too."""
    flat, coef = labels.reshape(-1), grad.reshape(-1).float()
    head = ChunkedHead(hidden, weight, bias, backend=backend, ignore_index=ignore_index,
                       inv_temperature=inv_temperature, vocab_start=vocab_start,
                       vocab_total=0,  # unused: the stats are the forward's
                       need_grads=(need_hidden, need_weight, need_bias))
    rows = labelled_rows((flat != ignore_index) & (coef != 0))
    chunks = token_chunks(rows.numel(), head.rows_per_chunk)
    head.reserve(chunks)
    for start, end in chunks:
        chunk = rows[start:end]
        h, logits = head.logits(chunk)
        head.backprop(h, logits, flat[chunk], stats[:, chunk], coef[chunk], chunk)
    return head.gradients()


@linear_logprob_grad.register_fake
def _(grad, hidden, weight, bias, labels, stats, ignore_index, inv_temperature, vocab_start,
      backend, need_hidden, need_weight, need_bias):
    return _fake_grads(hidden, weight, bias, need_hidden, need_weight, need_bias)


def pair_loss_slopes(policy: torch.Tensor, ref: torch.Tensor, beta: torch.Tensor, loss_type: str,
                     first: int, end: int) -> torch.Tensor:
    """d loss / d policy_logps [2B] of `spin_loss_from_logps`, for pairs [first, end) (0 elsewhere).

    loss = mean_i ℓ(margin_i), margin_i = β(π_i − ref_i) − β(π_{B+i} − ref_{B+i}): pair i's slope
    depends on pair i alone, so it is known once the pair's rows are folded.
    """
    half = policy.shape[0] // 2
    actual, generated = slice(first, end), slice(half + first, half + end)
    margin = (beta * (policy[actual] - ref[actual])
              - beta * (policy[generated] - ref[generated]))  # as spin_loss_from_logps rounds it
    if loss_type == "sigmoid":  # −log σ(m)
        dloss_dmargin = -torch.sigmoid(-margin)
    elif loss_type == "hinge":  # relu(1 − m); relu' (0) = 0, as autograd takes it
        dloss_dmargin = -(margin < 1).float()
    else:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    slope = dloss_dmargin * beta / half
    coef = torch.zeros_like(policy)
    coef[actual], coef[generated] = slope, -slope
    return coef


@torch.library.custom_op("spin_kernels::linear_spin_forward", mutates_args=())
def linear_spin_forward(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                        labels: torch.Tensor, ref_logps: torch.Tensor, beta: torch.Tensor,
                        loss_type: str, ignore_index: int, inv_temperature: float,
                        vocab_start: int, vocab_total: int, group_name: str, backend: str,
                        need_hidden: bool, need_weight: bool, need_bias: bool
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(policy log-probs [2B], d hidden, d weight, d bias) of the SPIN loss on hidden [2B, T, H].

    Rows are compacted pair by pair (sequence i, then B + i); a chunk of whole pairs is folded,
    its pairs' loss slopes are then known, and the chunk's logits buffer turns into dlogits in
    place. `ref_logps` are per-sequence sums [2B] (fp32); `beta` a 0-d fp32 tensor.
    """
    group = None
    if group_name:  # a custom op takes the group by name, as torch's functional collectives do
        from torch.distributed.distributed_c10d import _resolve_process_group
        group = _resolve_process_group(group_name)
    two_b, T = labels.shape
    half = two_b // 2
    head = ChunkedHead(hidden, weight, bias, backend=backend, ignore_index=ignore_index,
                       inv_temperature=inv_temperature, vocab_start=vocab_start,
                       vocab_total=vocab_total, group=group,
                       need_grads=(need_hidden, need_weight, need_bias))
    labelled = (labels != ignore_index).view(2, half, T).transpose(0, 1)  # [B, 2, T]: pair-major
    pair_rows = labelled.sum((1, 2)).tolist()  # the one host sync
    found = torch.nonzero_static(labelled.reshape(-1), size=sum(pair_rows)).squeeze(1)
    seq = (found // T) % 2 * half + found // (2 * T)  # side·B + pair
    rows = seq * T + found % T  # flat row of hidden [2B, T, H] / labels [2B, T]
    flat = labels.reshape(-1)

    token_logps = torch.zeros(two_b, T, dtype=torch.float32, device=hidden.device)
    policy = torch.zeros(two_b, dtype=torch.float32, device=hidden.device)
    groups = pair_groups(pair_rows, head.rows_per_chunk)
    head.reserve([chunk for _, _, chunks in groups for chunk in chunks])
    for first, end, chunks in groups:
        kept, stats = None, []
        for start, stop in chunks:
            h, logits = head.logits(rows[start:stop])
            stats.append(head.stats(logits, flat[rows[start:stop]]))
            token_logps.view(-1)[rows[start:stop]] = _logp(stats[-1])
            kept = (h, logits) if len(chunks) == 1 else None
        for side in (slice(first, end), slice(half + first, half + end)):
            policy[side] = token_logps[side].sum(-1)  # as sequence_logprobs sums: over T
        if not head.needs_grads or not chunks:
            continue
        coef = pair_loss_slopes(policy, ref_logps, beta, loss_type, first, end)
        for (start, stop), chunk_stats in zip(chunks, stats):
            chunk = rows[start:stop]
            h, logits = kept if kept is not None else head.logits(chunk)
            head.backprop(h, logits, flat[chunk], chunk_stats, coef[seq[start:stop]], chunk)
    return (policy, *head.gradients())


@linear_spin_forward.register_fake
def _(hidden, weight, bias, labels, ref_logps, beta, loss_type, ignore_index, inv_temperature,
      vocab_start, vocab_total, group_name, backend, need_hidden, need_weight, need_bias):
    policy = hidden.new_empty(labels.shape[0], dtype=torch.float32)
    return (policy, *_fake_grads(hidden, weight, bias, need_hidden, need_weight, need_bias))


@torch.library.custom_op("spin_kernels::scale_grad_", mutates_args=("grad",))
def scale_grad_(grad: torch.Tensor, scale: torch.Tensor) -> None:
    """grad *= scale, the product taken in fp32 (a bf16 grad is rounded once, the scale never)."""
    step = 1 << 24  # fp32 working set of 64 MiB
    flat = grad.view(-1)
    for start in range(0, flat.numel(), step):
        part = flat[start:start + step]
        part.copy_(part.float() * scale)


@scale_grad_.register_fake
def _(grad, scale):
    return None
