"""Pure-PyTorch SPIN log-probs: the CPU backend, the test oracle and the benchmark baseline (the
"torch" backend; not to be confused with SPIN's reference *policy*).

- `logprob_stats` / `logprob_grad` / `logprob_grad_inplace`: the torch backend. Same contract as
  the Triton ops in `spin_kernels.loss.ops.logprobs`, computed over chunks of rows so that the
  extra memory is O(chunk x V), never an fp32 copy of all the logits.
- `stats_logprobs`: log-probs from those stats, shared by both backends.
- `naive_token_logprobs` / `naive_spin_loss`: the textbook formulas with a full `log_softmax` in
  a chosen dtype. In float64 they are the oracle of the tests; in float32 they are what
  NeMo-Aligner and the SPIN paper's code run, i.e. the benchmark baseline.
"""
import math

import torch
import torch.nn.functional as F

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)

# Rows per chunk of the torch backend: 2**24 fp32 elements (64 MiB) of working memory.
_CHUNK_ELEMENTS = 1 << 24


def _row_chunks(*tensors: torch.Tensor):
    """Yield (first_row, [rows, V] views) over same-shaped [B, T, V] tensors, without copies.

    The views of every tensor cover the same rows, whatever their strides.
    """
    B, T, V = tensors[0].shape
    chunk = max(1, _CHUNK_ELEMENTS // max(V, 1))
    # Rows evenly spaced in every tensor: walk one [N, V] view of each.
    if all(B == 1 or t.stride(0) == T * t.stride(1) for t in tensors):
        flats = [t.flatten(0, 1) for t in tensors]  # views under this condition
        for start in range(0, B * T, chunk):
            yield start, [f[start:start + chunk] for f in flats]
        return
    for b in range(B):
        for t0 in range(0, T, chunk):
            yield b * T + t0, [t[b, t0:t0 + chunk] for t in tensors]


def _local_targets(labels: torch.Tensor, vocab_start: int, v_local: int):
    local = labels.long() - vocab_start
    in_shard = (local >= 0) & (local < v_local)
    return local.clamp(0, v_local - 1), in_shard


def logprob_stats(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int,
                  inv_temperature: float, vocab_start: int, vocab_total: int) -> torch.Tensor:
    """Per row of [B, T, V_local] logits: stats [3, N] fp32 = (max, log2-sum, target) in base-2
    units of x/T, as the Triton kernel defines them; log-prob = ((t − m) − l)·ln 2.

    Ignored rows give zeros; a label outside [0, vocab_total) gives t = NaN.
    """
    n, v_local = labels.numel(), logits.shape[-1]
    stats = torch.zeros(3, n, dtype=torch.float32, device=logits.device)
    scale = inv_temperature * LOG2E
    for start, (rows,) in _row_chunks(logits):
        end = start + rows.shape[0]
        lab = labels[start:end]
        x = rows.float() * scale
        m = x.max(-1).values
        log_sum = torch.log2(torch.exp2(x - m[:, None]).sum(-1))
        local, in_shard = _local_targets(lab, vocab_start, v_local)
        t = x.gather(-1, local[:, None]).squeeze(-1).masked_fill(~in_shard, 0.0)
        t = t.masked_fill((lab < 0) | (lab >= vocab_total), float("nan"))
        ignored = (lab == ignore_index)[None]
        stats[:, start:end] = torch.stack([m, log_sum, t]).masked_fill(ignored, 0.0)
    return stats


def logprob_grad(grad: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor,
                 stats: torch.Tensor, ignore_index: int, inv_temperature: float,
                 vocab_start: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """d(sum_i grad_i * logp_i) / dlogits for [B, T, V_local] logits, chunk by chunk.

    `out` may be `logits` itself (in-place backward); by default a new tensor.
    """
    if out is None:
        out = torch.empty_like(logits)
    v_local = logits.shape[-1]
    scale = inv_temperature * LOG2E
    for start, (rows, out_rows) in _row_chunks(logits, out):
        end = start + rows.shape[0]
        lab = labels[start:end]
        coef = grad[start:end].float() * inv_temperature
        coef = coef.masked_fill(lab == ignore_index, 0.0)
        m, log_sum, t = (stats[i, start:end, None] for i in range(3))
        g = torch.exp2((rows.float() * scale - m) - log_sum).neg_()
        # The target's 1 − p from the exact (t − m), as the Triton kernel does: accurate as p → 1.
        local, in_shard = _local_targets(lab, vocab_start, v_local)
        target_grad = -torch.expm1(((t - m) - log_sum) * LN2)
        kept = g.gather(-1, local[:, None])
        g.scatter_(-1, local[:, None], torch.where(in_shard[:, None], target_grad, kept))
        g.mul_(coef[:, None])
        # Zero (not 0 * inf) where no gradient flows, as the Triton kernel does.
        g.masked_fill_((coef == 0)[:, None], 0.0)
        out_rows.copy_(g)
    return out


def logprob_grad_inplace(grad: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor,
                         stats: torch.Tensor, ignore_index: int, inv_temperature: float,
                         vocab_start: int) -> None:
    """`logprob_grad` written over the logits themselves, as the Triton op of the same name."""
    logprob_grad(grad, logits, labels, stats, ignore_index, inv_temperature, vocab_start,
                 out=logits)


def stats_logprobs(stats: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Log-probs [N] from stats [3, N] (either backend's, combined over ranks); 0 where ignored.
    (t − m) first: exact for a confident row, whose target is the max."""
    m, log_sum, t = stats.unbind(0)
    return torch.where(labels == ignore_index, 0.0, ((t - m) - log_sum) * LN2)


def naive_token_logprobs(logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100,
                         temperature: float = 1.0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`log_softmax(logits / T)` gathered at the labels, in `dtype`; 0 where ignored."""
    logp = (logits.to(dtype) / temperature).log_softmax(-1)
    active = labels != ignore_index
    picked = logp.gather(-1, labels.masked_fill(~active, 0).long().unsqueeze(-1)).squeeze(-1)
    return picked * active


def naive_spin_loss(logits: torch.Tensor, labels: torch.Tensor, ref_logps: torch.Tensor, *,
                    loss_mask: torch.Tensor | None = None, beta: float = 0.1,
                    loss_type: str = "sigmoid", ignore_index: int = -100,
                    temperature: float = 1.0, dtype: torch.dtype = torch.float32):
    """The SPIN loss as the paper's code computes it. Returns (loss, policy_logps [2B])."""
    tok = naive_token_logprobs(logits, labels, ignore_index=ignore_index,
                               temperature=temperature, dtype=dtype)
    mask = labels != ignore_index
    if loss_mask is not None:
        mask = mask & loss_mask.bool()
    policy = (tok * mask).sum(-1)
    ref = ref_logps.to(dtype)
    if ref.dim() == 2:
        ref = (ref * mask).sum(-1)
    half = policy.shape[0] // 2
    margin = beta * ((policy[:half] - ref[:half]) - (policy[half:] - ref[half:]))
    if loss_type == "sigmoid":
        loss = -F.logsigmoid(margin).mean()
    else:
        loss = F.relu(1 - margin).mean()
    return loss, policy
