"""The fused LM head as one op: log-probs, and the SPIN loss's gradients, from hidden states and
the LM head weight, never materializing the logits `[..., V]` (API and cost: `loss/linear.py`).

Rows whose label is `ignore_index` are compacted away first (counting them is each op's one host
sync, none happens inside the chunk loop). The labelled rows go through in chunks, each with the
whole (local) vocabulary, sharing one reused `[rows, V_local]` logits buffer:

    logits = h_rows @ W.T (+ b)       cuBLAS, into the buffer, in the hidden states' dtype (as an
                                      LM head writes its logits)
    stats  = logprob_stats(logits)    the logits path's own fold (`ops/logprobs.py` for "triton",
                                      `torch_backend.py` for "torch"), then the vocab-parallel
                                      combine
    dlogits                           `logprob_grad_inplace` overwrites the buffer
    d hidden rows  = dlogits @ W      (K = V_local, fp32 inside the matmul)
    d weight      += dlogits.T @ h    fp32 accumulator, whatever the weight's dtype
    d bias        += dlogits.sum(0)   fp32

Chunks are of rows rather than of vocabulary tiles: a row's dlogits need its complete log-sum-exp,
so forming the gradient in the forward needs all of a row's logits at once; vocabulary tiles would
mean recomputing them, or summing d hidden over the tiles in an fp32 [N, H] buffer that grows
with N. The backends differ only in the fold.

Layers: the chunk loop (`ChunkedHead.chunks`) -> custom ops, each a whole loop behind one
`torch.library.custom_op` (`torch.compile(fullgraph=True)` traces callers; the loop, whose chunk
count depends on the labels, stays eager) -> autograd.Functions -> `fused_token_logprobs`,
`fused_spin_loss`. The ops: `linear_logprob_stats` (per-row stats of this rank's vocab shard,
2·H·V FLOPs a row), `linear_logprob_grad` (its backward, 6·H·V), `linear_spin_forward` (policy
log-probs [2B] and the SPIN loss's gradients, formed pair by pair in the forward, 6·H·V) and
`scale_grad_` (a preformed gradient times the upstream gradient, in fp32).
"""
import math
from typing import Optional

import torch
import torch.distributed as dist

from spin_kernels.loss.ops.pair_rows import pair_groups, pair_order, token_chunks
from spin_kernels.loss.pair import SpinLossOutput, pair_loss, pair_loss_slopes
from spin_kernels.loss.parallel import combine_shard_stats, shard_bounds
from spin_kernels.loss.torch_backend import stats_logprobs
from spin_kernels.loss.validation import backend_ops

# Bytes of the logits buffer: one chunk's [rows, V_local] logits. 1 GiB holds a SPIN pair of 2 x
# 2048 fully labelled tokens at V = 128256 in bf16, so that `linear_spin_forward` forms the gradient
# of whole pairs in the forward; a larger pair takes the two-pass route (see `pair_groups`).
CHUNK_BYTES = 1 << 30


def rows_per_chunk(v_local: int, dtype: torch.dtype) -> int:
    return max(1, CHUNK_BYTES // (max(v_local, 1) * dtype.itemsize))


def labelled_rows(keep: torch.Tensor) -> torch.Tensor:
    """Flat ids of the rows where `keep` is true, in order. The count is the call's one host sync."""
    keep = keep.reshape(-1)
    count = int(keep.sum())
    return torch.nonzero_static(keep, size=count).squeeze(1)


def gather_rows(hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """hidden[..., H] at flat row ids, [rows, H], without copying the rest (hidden may be a shifted,
    non-viewable slice such as `hidden_states[:, :-1]`)."""
    if hidden.dim() == 2:
        return hidden.index_select(0, rows)
    return hidden[torch.unravel_index(rows, hidden.shape[:-1])]


def accumulate_product(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b, accumulated in acc's fp32 whatever the dtype of a and b."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif a.is_cuda:
        # cuBLAS multiplies bf16/fp16 operands into the fp32 acc in place (beta = 1).
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    else:
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


class ChunkedHead:
    """The state of one chunk loop: the LM head, the logits buffer, the gradient accumulators."""

    def __init__(self, hidden, weight, bias, *, backend: str, ignore_index: int,
                 inv_temperature: float, vocab_start: int, vocab_total: int, group=None,
                 need_grads: tuple[bool, bool, bool] = (False, False, False)):
        self.hidden, self.weight, self.bias, self.group = hidden, weight, bias, group
        self.ops = backend_ops(backend)
        self.ignore_index, self.inv_temperature = ignore_index, inv_temperature
        self.vocab_start, self.vocab_total = vocab_start, vocab_total
        self.rows_per_chunk = rows_per_chunk(weight.shape[0], hidden.dtype)
        self._buffer = None
        need_hidden, need_weight, need_bias = need_grads
        device = hidden.device
        self.d_hidden = (torch.zeros(hidden.shape, dtype=hidden.dtype, device=device)
                         if need_hidden else None)
        self.d_weight = (torch.zeros(weight.shape, dtype=torch.float32, device=device)
                         if need_weight else None)
        self.d_bias = (torch.zeros(weight.shape[0], dtype=torch.float32, device=device)
                       if need_bias and bias is not None else None)

    @property
    def needs_grads(self) -> bool:
        return any(g is not None for g in (self.d_hidden, self.d_weight, self.d_bias))

    def reserve(self, ranges) -> None:
        """Allocates the logits buffer for the largest of these [start, end) ranges."""
        rows = max((end - start for start, end in ranges), default=0)
        assert rows <= self.rows_per_chunk
        self._buffer = self.hidden.new_empty((rows, self.weight.shape[0]))

    def chunks(self, rows: torch.Tensor, ranges=None):
        """The chunk loop: (row ids [c], hidden rows [c, H], logits [c, V_local]) for each [start,
        end) range of the compacted `rows` (by default `rows_per_chunk` at a time, the buffer
        reserved for them). Every chunk's logits lie in the one buffer: the next chunk overwrites
        them."""
        if ranges is None:
            ranges = token_chunks(rows.numel(), self.rows_per_chunk)
            self.reserve(ranges)
        for start, end in ranges:
            ids = rows[start:end]
            h = gather_rows(self.hidden, ids)
            logits = self._buffer[: ids.shape[0]]
            if self.bias is None:
                torch.mm(h, self.weight.t(), out=logits)
            else:
                torch.addmm(self.bias, h, self.weight.t(), out=logits)
            yield ids, h, logits

    def stats(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """[3, c] (max, log2-sum, target) of the chunk's rows, global over the group if any."""
        stats = self.ops.logprob_stats(logits[None], labels, self.ignore_index,
                                       self.inv_temperature, self.vocab_start, self.vocab_total)
        return stats if self.group is None else combine_shard_stats(stats, self.group)

    def backprop(self, ids, h, logits, labels, stats, coef) -> None:
        """Gradient of Σ coef_row · logp_row through this chunk; overwrites the logits buffer."""
        self.ops.logprob_grad_inplace(coef.float().contiguous(), logits[None], labels,
                                      stats.contiguous(), self.ignore_index, self.inv_temperature,
                                      self.vocab_start)
        if self.d_hidden is not None:
            d_rows = torch.mm(logits, self.weight)  # [c, H]
            self.d_hidden.view(-1, self.d_hidden.shape[-1]).index_copy_(0, ids, d_rows)
        if self.d_weight is not None:
            accumulate_product(self.d_weight, logits.t(), h)
        if self.d_bias is not None:
            self.d_bias.add_(logits.sum(0, dtype=torch.float32))

    def gradients(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(d hidden, d weight, d bias) in the inputs' dtypes; an empty tensor for each one not
        asked for. d hidden is summed over the group (hidden is replicated, the vocab sharded)."""
        self._buffer = None
        empty = self.hidden.new_empty  # a fresh one each (custom ops' outputs may not alias)
        d_hidden = empty(0) if self.d_hidden is None else self.d_hidden
        if self.d_hidden is not None and self.group is not None:
            dist.all_reduce(d_hidden, group=self.group)
        d_weight = empty(0) if self.d_weight is None else self.d_weight.to(self.weight.dtype)
        d_bias = empty(0) if self.d_bias is None else self.d_bias.to(self.bias.dtype)
        self.d_weight = self.d_bias = None
        return d_hidden, d_weight, d_bias


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
    for ids, _, logits in head.chunks(labelled_rows(flat != ignore_index)):
        stats[:, ids] = head.stats(logits, flat[ids])
    return stats


@linear_logprob_stats.register_fake
def _(hidden, weight, bias, labels, ignore_index, inv_temperature, vocab_start, vocab_total,
      backend):
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
    for ids, h, logits in head.chunks(labelled_rows((flat != ignore_index) & (coef != 0))):
        head.backprop(ids, h, logits, flat[ids], stats[:, ids], coef[ids])
    return head.gradients()


@linear_logprob_grad.register_fake
def _(grad, hidden, weight, bias, labels, stats, ignore_index, inv_temperature, vocab_start,
      backend, need_hidden, need_weight, need_bias):
    return _fake_grads(hidden, weight, bias, need_hidden, need_weight, need_bias)


@torch.library.custom_op("spin_kernels::linear_spin_forward", mutates_args=())
def linear_spin_forward(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                        labels: torch.Tensor, seq_ids: Optional[torch.Tensor], num_sequences: int,
                        ref_logps: torch.Tensor, beta: torch.Tensor,
                        loss_type: str, ignore_index: int, inv_temperature: float,
                        vocab_start: int, vocab_total: int, group_name: str, backend: str,
                        need_hidden: bool, need_weight: bool, need_bias: bool
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(policy log-probs [2B], d hidden, d weight, d bias) of the SPIN loss on hidden [2B, T, H],
    or on packed hidden [N, H] whose rows belong to sequences `seq_ids` [N] (-1: none).

    Rows are compacted pair by pair (sequence i, then B + i); a chunk of whole pairs is folded,
    its pairs' loss slopes are then known, and the chunk's logits buffer turns into dlogits in
    place. `ref_logps` are per-sequence sums [2B] (fp32); `beta` a 0-d fp32 tensor.
    """
    group = None
    if group_name:  # a custom op takes the group by name, as torch's functional collectives do
        from torch.distributed.distributed_c10d import _resolve_process_group
        group = _resolve_process_group(group_name)
    two_b, half = num_sequences, num_sequences // 2
    head = ChunkedHead(hidden, weight, bias, backend=backend, ignore_index=ignore_index,
                       inv_temperature=inv_temperature, vocab_start=vocab_start,
                       vocab_total=vocab_total, group=group,
                       need_grads=(need_hidden, need_weight, need_bias))
    flat = labels.reshape(-1)
    order = pair_order(flat != ignore_index, seq_ids, labels.shape[-1], two_b)
    rows, seq = order.rows, order.seq
    token_logps = torch.zeros(two_b, order.width, dtype=torch.float32, device=hidden.device)
    policy = torch.zeros(two_b, dtype=torch.float32, device=hidden.device)
    groups = pair_groups(order.pair_rows, head.rows_per_chunk)
    head.reserve([chunk for _, _, chunks in groups for chunk in chunks])
    for first, end, chunks in groups:
        stats, kept = [], None
        for chunk, (start, stop) in zip(head.chunks(rows, chunks), chunks):
            ids, _, logits = kept = chunk
            stats.append(head.stats(logits, flat[ids]))
            logps = stats_logprobs(stats[-1], flat[ids], ignore_index)
            token_logps.view(-1)[order.slots[start:stop]] = logps
        for side in (slice(first, end), slice(half + first, half + end)):
            policy[side] = token_logps[side].sum(-1)  # padded: as sequence_logprobs sums, over T
        if not head.needs_grads or not chunks:
            continue
        coef = pair_loss_slopes(policy, ref_logps, beta, loss_type, first, end)
        # One chunk: its logits are still in the buffer; a pair cut in several: computed again.
        again = [kept] if len(chunks) == 1 else head.chunks(rows, chunks)
        for (ids, h, logits), chunk_stats in zip(again, stats):
            head.backprop(ids, h, logits, flat[ids], chunk_stats, coef[seq[ids]])
    return (policy, *head.gradients())


@linear_spin_forward.register_fake
def _(hidden, weight, bias, labels, seq_ids, num_sequences, ref_logps, beta, loss_type,
      ignore_index, inv_temperature, vocab_start, vocab_total, group_name, backend, need_hidden,
      need_weight, need_bias):
    policy = hidden.new_empty(num_sequences, dtype=torch.float32)
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


def _needs_grad(*tensors) -> tuple[bool, ...]:
    enabled = torch.is_grad_enabled()
    return tuple(enabled and t is not None and t.requires_grad for t in tensors)


class _LinearTokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ignore_index, temperature, process_group,
                backend):
        vocab_start, vocab_total = shard_bounds(weight.shape[0], process_group)
        stats = linear_logprob_stats(hidden, weight, bias, labels, ignore_index, 1.0 / temperature,
                                     vocab_start, vocab_total, backend)
        if process_group is not None:
            stats = combine_shard_stats(stats, process_group)
        ctx.save_for_backward(hidden, weight, bias, labels, stats)
        ctx.config = (ignore_index, 1.0 / temperature, vocab_start, process_group, backend)
        return stats_logprobs(stats, labels.reshape(-1), ignore_index).view(labels.shape)

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, bias, labels, stats = ctx.saved_tensors
        ignore_index, inv_temperature, vocab_start, process_group, backend = ctx.config
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        d_hidden, d_weight, d_bias = linear_logprob_grad(
            grad.contiguous(), hidden, weight, bias, labels, stats, ignore_index, inv_temperature,
            vocab_start, backend, need_hidden, need_weight, need_bias and bias is not None)
        if need_hidden and process_group is not None:
            dist.all_reduce(d_hidden, group=process_group)
        return (d_hidden if need_hidden else None, d_weight if need_weight else None,
                d_bias if need_bias else None) + (None,) * 5


class _PreformedGrads(torch.autograd.Function):
    """Passes the loss through; its gradients w.r.t. hidden, weight and bias were formed in the
    forward, so the backward only scales them by the upstream gradient (in place: a second
    backward through the same graph raises autograd's in-place error instead of scaling twice)."""

    @staticmethod
    def forward(ctx, loss, hidden, weight, bias, d_hidden, d_weight, d_bias):
        ctx.save_for_backward(d_hidden, d_weight, d_bias)
        return loss.clone()

    @staticmethod
    def backward(ctx, grad):
        grads = []
        for preformed, needed in zip(ctx.saved_tensors, ctx.needs_input_grad[1:4]):
            if needed:
                scale_grad_(preformed, grad.float())
            grads.append(preformed if needed else None)
        return (None, *grads, None, None, None)


def fused_token_logprobs(hidden, weight, bias, labels, ignore_index: int, temperature: float,
                         process_group, backend: str) -> torch.Tensor:
    """Per-token log-probs `[...]` of checked arguments (`linear.linear_token_logprobs`)."""
    return _LinearTokenLogprobs.apply(hidden, weight, bias, labels, ignore_index,
                                      float(temperature), process_group, backend)


def fused_spin_loss(hidden, weight, bias, labels, ref_logps, beta, loss_type: str,
                    ignore_index: int, temperature: float, process_group,
                    backend: str, pack=None) -> SpinLossOutput:
    """The SPIN loss of checked arguments (`linear.linear_spin_loss`): labels already masked,
    `ref_logps` per-sequence sums [2B], β from `check_loss_args`; `pack` (`packed.Packing`) for
    packed hidden [N, H]."""
    vocab_start, vocab_total = shard_bounds(weight.shape[0], process_group)
    needs = _needs_grad(hidden, weight, bias)
    beta_tensor = torch.as_tensor(beta, dtype=torch.float32, device=hidden.device).detach()
    policy, *grads = linear_spin_forward(
        hidden.detach(), weight.detach(), None if bias is None else bias.detach(), labels,
        None if pack is None else pack.seq, labels.shape[0] if pack is None else pack.num_sequences,
        ref_logps.detach().float(), beta_tensor, loss_type, ignore_index, 1.0 / float(temperature),
        vocab_start, vocab_total, "" if process_group is None else process_group.group_name,
        backend, *needs)
    if pack is not None and pack.invalid is not None:  # bad ids on a device: NaN, as a CPU call raises
        policy = policy + torch.where(pack.invalid, math.nan, 0.0)
    out = pair_loss(policy, ref_logps, beta, loss_type)
    if not any(needs):
        return out
    return out._replace(loss=_PreformedGrads.apply(out.loss, hidden, weight, bias, *grads))
