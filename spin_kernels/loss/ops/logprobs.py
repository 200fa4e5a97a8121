"""Fused per-token log-probs from logits, in Triton: never materializes the vocabulary softmax.

Forward (one read of every row that has a label): online max / sum-exp in fp32 and the target
logit, giving per row `stats = (m, l, t)` in base-2 units of x/T: the row max, l = log2 of the
sum of 2^(x − m) (kept as 1 + rest, the max's exact 1 apart), and the target.
`log-prob = ((t − m) − l)·ln 2`: `t − m` is exact when the target is (near) the max, so a
confident row keeps its precision; `l ≥ 0` makes log-prob ≤ 0.
Backward (one read + one write): `dlogits = coef · (onehot(label) − 2^((x − m) − l))`,
`coef = upstream grad / T`, the target's `1 − p` taken once per row from `(t − m) − l`; rows
that are ignored or have a zero upstream grad (prompt tokens, masked positions) are zero-filled
without being read.

With a vocab-parallel shard the same kernels run on the local columns `[vocab_start, vocab_start +
V_local)`; `spin_kernels.loss.parallel` combines the per-rank stats with one collective, and the
backward needs no communication because the combined (m, l) are global.

Layers: kernels -> launchers -> torch.library custom ops (so torch.compile traces callers).
The autograd wiring that picks this backend or the torch one lives in `spin_kernels.loss.logits`.
"""
import torch
import triton
import triton.language as tl

from spin_kernels.loss.torch_backend import LN2, LOG2E

# The package's one ln 2 and log2(e) (torch_backend.py), as compile-time constants a kernel reads.
_LN2 = tl.constexpr(LN2)
_LOG2E = tl.constexpr(LOG2E)


@triton.jit
def _log2_1p(rest):
    """log2(1 + rest) for rest >= 0, accurate to fp32 rounding for small rest.

    Small rest is a confident row, whose log-prob −log(1 + rest) is tiny: rounding 1 + rest, or
    tl.log2's ~2e-7 absolute error on a GPU (lg2.approx), would dominate it. ln(1 + r) = r − r²/2
    + … + r⁷/7 is exact to 1e-8 for r < 1/8.
    """
    r = rest
    ln1p = r * (1.0 - r * (0.5 - r * (1.0 / 3 - r * (0.25 - r * (0.2 - r * (1.0 / 6 - r / 7))))))
    return tl.where(r < 0.125, ln1p * _LOG2E, tl.log2(1.0 + r))


@triton.jit
def _one_minus_exp2(u):
    """1 − 2^u for u <= 0, accurate to fp32 rounding near u = 0, where 1 − 2^u is tiny."""
    z = u * _LN2  # 1 − e^z = −z − z²/2 − … − z⁶/720: exact to 1e-9 for |z| < 1/8
    neg_expm1 = -z * (1.0 + z * (0.5 + z * (1.0 / 6 + z * (1.0 / 24 + z * (1.0 / 120 + z / 720)))))
    return tl.where(z > -0.125, neg_expm1, 1.0 - tl.exp2(u))


@triton.jit
def _logprob_stats_kernel(
    # pointers
    logits_ptr,  # [B, T, V_local], any strides
    labels_ptr,  # [N] int32/int64, N = B * T
    stats_ptr,  # [3, N] fp32 out: max, log-sum, target (base 2)
    # sizes
    N,
    T,
    V_local,
    vocab_start,
    vocab_total,
    ignore_index,
    # strides
    stride_b,
    stride_t,
    stride_v,
    # scalars
    inv_temperature,  # fp32 runtime argument: a new T never recompiles
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row).to(tl.int64)
    if label == ignore_index:
        tl.store(stats_ptr + row, 0.0)
        tl.store(stats_ptr + N + row, 0.0)
        tl.store(stats_ptr + 2 * N + row, 0.0)
    else:
        # int64 row offset: N * V passes 2**31 at N = 16,744 for V = 128256.
        row_ptr = logits_ptr + (row // T) * stride_b + (row % T) * stride_t
        # Base 2: each element costs one multiply and one ex2.
        scale = inv_temperature * _LOG2E
        m = float("-inf")
        # Σ 2^(x − m) = 1 + rest: `rest` leaves out one instance of the max, whose term is exactly
        # 1, so that the small terms of a confident row are never rounded against a 1.
        rest = 0.0
        for start in range(0, V_local, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            x = tl.load(row_ptr + cols * stride_v, mask=cols < V_local, other=float("-inf"))
            x = x.to(tl.float32) * scale
            m_new = tl.maximum(m, tl.max(x, 0))
            is_max = x == m_new
            small = tl.sum(tl.where(is_max, 0.0, tl.exp2(x - m_new)), 0)
            n_max = tl.sum(is_max.to(tl.float32), 0)  # elements worth exactly 1
            rest = small + tl.where(m_new > m, (1.0 + rest) * tl.exp2(m - m_new) + (n_max - 1.0),
                                    rest + n_max)
            m = m_new
        # The target is converted exactly as the loop's elements were, so t ≤ m holds exactly.
        # The masked load keeps a label outside this shard (or the vocabulary) in bounds.
        local = label - vocab_start
        in_shard = (local >= 0) & (local < V_local)
        x_t = tl.load(row_ptr + local * stride_v, mask=in_shard, other=0.0)
        t = tl.where(in_shard, x_t.to(tl.float32) * scale, 0.0)
        # A label outside [0, vocab_total) poisons its log-prob instead of reading out of bounds.
        t = tl.where((label < 0) | (label >= vocab_total), float("nan"), t)
        tl.store(stats_ptr + row, m)
        tl.store(stats_ptr + N + row, _log2_1p(rest))
        tl.store(stats_ptr + 2 * N + row, t)


@triton.jit
def _logprob_grad_kernel(
    # pointers
    grad_ptr,  # [N] fp32, upstream grad of each log-prob
    logits_ptr,  # [B, T, V_local], any strides
    labels_ptr,  # [N]
    stats_ptr,  # [3, N] fp32 from the forward (global under vocab parallelism)
    dlogits_ptr,  # [B, T, V_local], any strides; may alias logits (inplace backward)
    # sizes
    N,
    T,
    V_local,
    vocab_start,
    ignore_index,
    # strides
    stride_b,
    stride_t,
    stride_v,
    dstride_b,
    dstride_t,
    dstride_v,
    # scalars
    inv_temperature,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row).to(tl.int64)
    coef = tl.load(grad_ptr + row).to(tl.float32) * inv_temperature
    b = row // T
    t = row % T
    drow_ptr = dlogits_ptr + b * dstride_b + t * dstride_t
    if (label == ignore_index) | (coef == 0.0):
        # A masked row's gradient is exactly zero: write it without reading the logits.
        for start in range(0, V_local, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            zeros = tl.zeros([BLOCK_V], dtype=tl.float32)
            tl.store(drow_ptr + cols * dstride_v, zeros.to(dlogits_ptr.dtype.element_ty),
                     mask=cols < V_local)
    else:
        row_ptr = logits_ptr + b * stride_b + t * stride_t
        scale = inv_temperature * _LOG2E
        m = tl.load(stats_ptr + row)
        log_sum = tl.load(stats_ptr + N + row)
        target = tl.load(stats_ptr + 2 * N + row)
        # The target's 1 − p, once per row from the forward's exact (t − m): for a confident row
        # (p → 1) the subtraction 1 − p in the loop would keep only its rounding error.
        target_grad = _one_minus_exp2((target - m) - log_sum)
        local = label - vocab_start
        for start in range(0, V_local, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            x = tl.load(row_ptr + cols * stride_v, mask=cols < V_local, other=0.0)
            # (x − m) first: exact near the max, so that p keeps fp32 precision.
            p = tl.exp2((x.to(tl.float32) * scale - m) - log_sum)
            # Folded in fp32 before the single store in the logits' dtype.
            g = tl.where(cols == local, target_grad, -p) * coef
            tl.store(drow_ptr + cols * dstride_v, g.to(dlogits_ptr.dtype.element_ty),
                     mask=cols < V_local)


# Launch configurations, (BLOCK_V, num_warps, num_stages) by V_local, one table per kernel.
# Rows past 8192 are the winners of `benchmarks/bench_loss.py --sweep` on an H200 (bf16, 16384
# rows; V = 32000 for the middle row, V = 128256 and 151936 for the last); rows up to 8192 keep
# the whole row in one block and are not tuned.
def _stats_config(v_local: int) -> tuple[int, int, int]:
    if v_local <= 2048:
        return triton.next_power_of_2(v_local), 4, 3
    if v_local <= 8192:
        return triton.next_power_of_2(v_local), 8, 3
    if v_local <= 65536:
        return 2048, 2, 2
    return 4096, 4, 3


def _grad_config(v_local: int) -> tuple[int, int, int]:
    if v_local <= 2048:
        return triton.next_power_of_2(v_local), 4, 3
    if v_local <= 8192:
        return triton.next_power_of_2(v_local), 8, 3
    if v_local <= 65536:
        return 1024, 8, 4
    return 16384, 32, 3


def _rows_layout(x: torch.Tensor) -> tuple[int, int, int, int]:
    """(T, stride_b, stride_t, stride_v) of a [B, T, V] tensor."""
    return x.shape[1], x.stride(0), x.stride(1), x.stride(2)


# ---------------------------------------------------------------------------------------------
# Launchers, registered as custom ops. `logits` is always a 3-D [B, T, V_local] view and `labels`
# a contiguous [B * T] vector (spin_kernels.loss normalizes the caller's shapes).


@torch.library.custom_op("spin_kernels::logprob_stats", mutates_args=())
def logprob_stats(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int,
                  inv_temperature: float, vocab_start: int, vocab_total: int) -> torch.Tensor:
    n = labels.numel()
    stats = torch.empty(3, n, dtype=torch.float32, device=logits.device)
    if n == 0:
        return stats
    v_local = logits.shape[-1]
    block_v, num_warps, num_stages = _stats_config(v_local)
    T, stride_b, stride_t, stride_v = _rows_layout(logits)
    _logprob_stats_kernel[(n,)](
        logits, labels, stats,
        n, T, v_local, vocab_start, vocab_total, ignore_index,
        stride_b, stride_t, stride_v,
        inv_temperature,
        BLOCK_V=block_v, num_warps=num_warps, num_stages=num_stages,
        # No fused multiply-add: x·scale − m must round x·scale exactly as the stored target t
        # was rounded, so that the max element contributes exactly 2^0 (else confident rows
        # lose ~1e-6 of log-prob to the product's rounding residue).
        enable_fp_fusion=False,
    )
    return stats


@logprob_stats.register_fake
def _(logits, labels, ignore_index, inv_temperature, vocab_start, vocab_total):
    return logits.new_empty((3, labels.numel()), dtype=torch.float32)


def _launch_grad(grad: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor,
                 stats: torch.Tensor, out: torch.Tensor, ignore_index: int,
                 inv_temperature: float, vocab_start: int) -> None:
    n = labels.numel()
    if n == 0:
        return
    v_local = logits.shape[-1]
    block_v, num_warps, num_stages = _grad_config(v_local)
    T, stride_b, stride_t, stride_v = _rows_layout(logits)
    _, dstride_b, dstride_t, dstride_v = _rows_layout(out)
    _logprob_grad_kernel[(n,)](
        grad, logits, labels, stats, out,
        n, T, v_local, vocab_start, ignore_index,
        stride_b, stride_t, stride_v,
        dstride_b, dstride_t, dstride_v,
        inv_temperature,
        BLOCK_V=block_v, num_warps=num_warps, num_stages=num_stages,
        enable_fp_fusion=False,  # as in the forward: 1 − p of a confident row stays exact
    )


@torch.library.custom_op("spin_kernels::logprob_grad", mutates_args=())
def logprob_grad(grad: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor,
                 stats: torch.Tensor, ignore_index: int, inv_temperature: float,
                 vocab_start: int) -> torch.Tensor:
    out = torch.empty_like(logits)
    _launch_grad(grad, logits, labels, stats, out, ignore_index, inv_temperature, vocab_start)
    return out


@logprob_grad.register_fake
def _(grad, logits, labels, stats, ignore_index, inv_temperature, vocab_start):
    return torch.empty_like(logits)


@torch.library.custom_op("spin_kernels::logprob_grad_inplace", mutates_args=("logits",))
def logprob_grad_inplace(grad: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor,
                         stats: torch.Tensor, ignore_index: int, inv_temperature: float,
                         vocab_start: int) -> None:
    # Each block of a row is read before the same block is written, and rows never overlap.
    _launch_grad(grad, logits, labels, stats, logits, ignore_index, inv_temperature, vocab_start)


@logprob_grad_inplace.register_fake
def _(grad, logits, labels, stats, ignore_index, inv_temperature, vocab_start):
    return None
