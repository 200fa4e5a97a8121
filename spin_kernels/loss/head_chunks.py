"""The chunk loop behind the fused LM head (`spin_kernels.loss.linear`): labelled rows in chunks,
one reused `[rows, V_local]` logits buffer, and the logits path's own fold ops on it.

Per chunk of compacted rows (rows whose label is `ignore_index` never get here):
    logits = h_rows @ W.T (+ b)       cuBLAS, into the buffer, in the hidden states' dtype (as an
                                      LM head writes its logits)
    stats  = logprob_stats(logits)    the same op as `token_logprobs` (Triton, or reference.py for
                                      the torch backend), then the vocab-parallel combine
    dlogits                           `logprob_grad_inplace` overwrites the buffer
    d hidden rows  = dlogits @ W      (K = V_local, fp32 inside the matmul)
    d weight      += dlogits.T @ h    fp32 accumulator, whatever the weight's dtype
    d bias        += dlogits.sum(0)   fp32

Extra memory of one chunk loop: the logits buffer (at most `CHUNK_BYTES`), the fp32 accumulator
of d weight when the weight is not fp32, and per-chunk temporaries; linear.py's docstring gives the
whole bound.
"""
import torch

from spin_kernels.loss import reference
from spin_kernels.loss.parallel import combine_shard_stats
from spin_kernels.loss.validation import triton_ops

# Bytes of the logits buffer: one chunk's [rows, V_local] logits. 1 GiB holds a SPIN pair of 2 x
# 2048 fully labelled tokens at V = 128256 in bf16, so that `linear_spin_loss` forms the gradient of
# whole pairs in the forward; a larger pair takes the two-pass route (see `pair_groups`).
CHUNK_BYTES = 1 << 30


def rows_per_chunk(v_local: int, dtype: torch.dtype) -> int:
    return max(1, CHUNK_BYTES // (max(v_local, 1) * dtype.itemsize))


def labelled_rows(keep: torch.Tensor) -> torch.Tensor:
    """Flat ids of the rows where `keep` is true, in order. The count is the call's one host sync."""
    keep = keep.reshape(-1)
    count = int(keep.sum())
    return torch.nonzero_static(keep, size=count).squeeze(1)


def token_chunks(count: int, rows: int) -> list[tuple[int, int]]:
    """[start, end) ranges over `count` compacted rows, `rows` at a time."""
    return [(start, min(start + rows, count)) for start in range(0, count, rows)]


def pair_groups(pair_rows: list[int], rows: int) -> list[tuple[int, int, list[tuple[int, int]]]]:
    """Consecutive whole pairs packed into groups of at most `rows` compacted rows.

    Returns (first pair, end pair, [start, end) chunks of the group's rows). A group is one chunk,
    except a single pair larger than `rows`, which is cut into several: its loss is known only once
    all of them are folded, so their logits are computed again for the gradient (8 instead of 6
    FLOPs·H·V per row, memory still bounded).
    """
    groups, first, start, size = [], 0, 0, 0

    def close(end_pair):
        groups.append((first, end_pair, [(start + s, start + e) for s, e in token_chunks(size, rows)]))

    for pair, count in enumerate(pair_rows):
        if pair > first and size + count > rows:
            close(pair)
            first, start, size = pair, start + size, 0
        size += count
    if pair_rows:
        close(len(pair_rows))
    return groups


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
        self.hidden, self.weight, self.bias = hidden, weight, bias
        self.backend, self.group = backend, group
        self.ops = triton_ops if backend == "triton" else reference
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

    def reserve(self, chunks: list[tuple[int, int]]) -> None:
        """Allocates the logits buffer for the largest of these [start, end) chunks."""
        rows = max((end - start for start, end in chunks), default=0)
        assert rows <= self.rows_per_chunk
        self._buffer = self.hidden.new_empty((rows, self.weight.shape[0]))

    def logits(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden rows [c, H], their logits [c, V_local] in the reserved buffer)."""
        h = gather_rows(self.hidden, rows)
        out = self._buffer[: rows.shape[0]]
        if self.bias is None:
            torch.mm(h, self.weight.t(), out=out)
        else:
            torch.addmm(self.bias, h, self.weight.t(), out=out)
        return h, out

    def stats(self, logits: torch.Tensor, labels: torch.Tensor, *, combine: bool = True):
        """[3, c] (max, log2-sum, target) of the chunk's rows; global over the group if `combine`."""
        stats = self.ops.logprob_stats(logits[None], labels, self.ignore_index,
                                       self.inv_temperature, self.vocab_start, self.vocab_total)
        if combine and self.group is not None:
            stats = combine_shard_stats(stats, self.group)
        return stats

    def backprop(self, h, logits, labels, stats, coef, rows) -> None:
        """Gradient of Σ coef_row · logp_row through this chunk; overwrites the logits buffer."""
        rows3 = logits[None]
        args = (coef.float().contiguous(), rows3, labels, stats.contiguous(), self.ignore_index,
                self.inv_temperature, self.vocab_start)
        if self.backend == "triton":
            triton_ops.logprob_grad_inplace(*args)
        else:
            reference.logprob_grad(*args, out=rows3)
        if self.d_hidden is not None:
            d_rows = torch.mm(logits, self.weight)  # [c, H]
            self.d_hidden.view(-1, self.d_hidden.shape[-1]).index_copy_(0, rows, d_rows)
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
            torch.distributed.all_reduce(d_hidden, group=self.group)
        d_weight = empty(0) if self.d_weight is None else self.d_weight.to(self.weight.dtype)
        d_bias = empty(0) if self.d_bias is None else self.d_bias.to(self.bias.dtype)
        self.d_weight = self.d_bias = None
        return d_hidden, d_weight, d_bias
