"""Masked per-token log-probs and the SPIN loss, straight from logits.

    r(y) = Σ_t mask_t · (log π_θ(y_t | ·) − log π_ref(y_t | ·))
    loss = mean_i −log σ(β · (r(y_actual_i) − r(y_generated_i)))      (or hinge: relu(1 − β·margin))

Alignment: `labels[..., t]` is the token that `logits[..., t, :]` scores; callers shift (for a
Hugging Face model: `logits[:, :-1]` with `input_ids[:, 1:]`). Backends: "triton" (fused kernels,
`spin_kernels.loss.ops.logprobs`; CUDA tensors, or CPU tensors under TRITON_INTERPRET=1), "torch"
(chunked PyTorch, `spin_kernels.loss.torch_backend`), "auto" (Triton for CUDA tensors, torch otherwise).
"""
import torch

from spin_kernels.loss.packed import packed_ref, packing
from spin_kernels.loss.pair import SpinLossOutput, pair_loss
from spin_kernels.loss.parallel import combine_shard_stats, shard_bounds
from spin_kernels.loss.torch_backend import stats_logprobs
from spin_kernels.loss.validation import (backend_ops, check_logits_labels, check_loss_args,
                                          check_pair_rows, check_temperature, masked_labels,
                                          resolve_backend, shape_of)


def _as_rows(logits: torch.Tensor) -> torch.Tensor:
    """A [B, T, V] view of [..., V] logits (a copy only for >3-D logits that cannot be viewed)."""
    if logits.dim() <= 3:
        return logits.reshape((1,) * (3 - logits.dim()) + tuple(logits.shape))
    try:
        return logits.view(-1, logits.shape[-2], logits.shape[-1])
    except RuntimeError:
        return logits.reshape(-1, logits.shape[-2], logits.shape[-1])


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, ignore_index, temperature, process_group, backend,
                inplace_backward):
        rows = _as_rows(logits)
        if inplace_backward and rows.data_ptr() != logits.data_ptr():
            raise ValueError("inplace_backward=True needs logits whose leading dims can be viewed "
                             f"as one; got shape {tuple(logits.shape)}, strides {logits.stride()}")
        flat_labels = labels.reshape(-1).contiguous()
        vocab_start, vocab_total = shard_bounds(rows.shape[-1], process_group)
        stats = backend_ops(backend).logprob_stats(rows, flat_labels, ignore_index,
                                                   1.0 / temperature, vocab_start, vocab_total)
        if process_group is not None:
            stats = combine_shard_stats(stats, process_group)
        logp = stats_logprobs(stats, flat_labels, ignore_index)
        ctx.save_for_backward(logits, flat_labels, stats)
        ctx.config = (ignore_index, 1.0 / temperature, vocab_start, backend, inplace_backward)
        return logp.view(labels.shape)

    @staticmethod
    def backward(ctx, grad):
        logits, flat_labels, stats = ctx.saved_tensors
        ignore_index, inv_temperature, vocab_start, backend, inplace = ctx.config
        rows = _as_rows(logits)
        grad = grad.reshape(-1).float().contiguous()
        args = (grad, rows, flat_labels, stats, ignore_index, inv_temperature, vocab_start)
        no_grads = (None,) * 6  # labels and the five non-tensor arguments
        ops = backend_ops(backend)
        if inplace:
            ops.logprob_grad_inplace(*args)
            return (logits,) + no_grads
        return (ops.logprob_grad(*args).reshape(logits.shape),) + no_grads


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100,
                   temperature: float = 1.0, process_group=None, backend: str = "auto",
                   inplace_backward: bool = False) -> torch.Tensor:
    """log softmax(logits / T)[label] per position, float32 `[...]`; 0 where label == ignore_index.

    logits `[..., V]` (float32/bfloat16/float16, any strides); labels `[...]` integer. With
    `process_group`, logits is this rank's contiguous vocab shard and labels are global ids.
    `inplace_backward=True` writes the gradient into the logits' storage (saves a logits-sized
    buffer; the logits are then overwritten).
    """
    check_logits_labels(logits, labels, ignore_index, process_group)
    check_temperature(temperature)
    backend = resolve_backend(backend, logits.device)
    return _TokenLogprobs.apply(logits, labels, ignore_index, float(temperature), process_group,
                                backend, bool(inplace_backward))


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor, loss_mask=None, *,
                      seq_ids=None, cu_seqlens=None, num_sequences=None,
                      average: bool = False, ignore_index: int = -100, temperature: float = 1.0,
                      process_group=None, backend: str = "auto",
                      inplace_backward: bool = False) -> torch.Tensor:
    """Masked sum (or, with `average`, mean over the mask) of the log-probs of each sequence.

    logits `[S, T, V]`, labels `[S, T]`, loss_mask `[S, T]` (nonzero = counted). Returns `[S]`;
    a sequence with no counted position gives 0. Packed: logits `[N, V]`, labels and loss_mask
    `[N]`, with `seq_ids` `[N]` (-1 = no sequence) and `num_sequences`, or `cu_seqlens` `[S + 1]`.
    """
    pack = packing(logits, "logits", "V", labels, seq_ids, cu_seqlens, num_sequences)
    if pack is not None:
        labels = pack.labels(labels, loss_mask, ignore_index)
    elif not isinstance(logits, torch.Tensor) or logits.dim() != 3:
        raise ValueError(f"logits must be [S, T, V], got {shape_of(logits)}")
    elif not isinstance(labels, torch.Tensor) or tuple(labels.shape) != tuple(logits.shape[:2]):
        raise ValueError(f"labels must be [S, T] = {tuple(logits.shape[:2])} for logits "
                         f"{tuple(logits.shape)}, got {shape_of(labels)}")
    else:
        labels = masked_labels(labels, loss_mask, ignore_index)
    tok = token_logprobs(logits, labels, ignore_index=ignore_index, temperature=temperature,
                         process_group=process_group, backend=backend,
                         inplace_backward=inplace_backward)
    return sequence_totals(tok, labels, pack, average, ignore_index)


def sequence_totals(tok, labels, pack, average: bool, ignore_index: int) -> torch.Tensor:
    """Per-sequence sums (means with `average`) of token log-probs, padded [S, T] or packed [N]."""
    counted = labels != ignore_index
    total = tok.sum(-1) if pack is None else pack.sums(tok)
    if average:
        count = counted.sum(-1) if pack is None else pack.sums(counted)
        total = total / count.clamp(min=1)
    return total


def spin_loss(logits: torch.Tensor, labels: torch.Tensor, ref_logps: torch.Tensor, *,
              loss_mask=None, seq_ids=None, cu_seqlens=None, num_sequences=None, beta=0.1,
              loss_type: str = "sigmoid", ignore_index: int = -100, temperature: float = 1.0,
              process_group=None, backend: str = "auto",
              inplace_backward: bool = False) -> SpinLossOutput:
    """SPIN loss from logits `[2B, T, V]`: rows [0, B) actual, rows [B, 2B) generated.

    `ref_logps` is `[2B]` (per-sequence masked sums) or `[2B, T]` (per-token, masked here the
    same way as the policy's). Rewards (`out.rewards`, and in the metrics) include β:
    `β·(π − ref)`. Packed: logits `[N, V]` and sequence ids as `sequence_logprobs` takes them,
    sequence i actual and B + i generated; `ref_logps` `[2B]` or per-token `[N]`.
    """
    pack = packing(logits, "logits", "V", labels, seq_ids, cu_seqlens, num_sequences, pairs=True)
    if pack is None:
        check_pair_rows("logits", logits, "V", ref_logps)
    else:
        ref_logps = packed_ref(ref_logps, pack, pack.labels(labels, loss_mask, ignore_index),
                               ignore_index)
    beta = check_loss_args(beta, loss_type)  # before any work
    policy = sequence_logprobs(logits, labels, loss_mask, seq_ids=seq_ids, cu_seqlens=cu_seqlens,
                               num_sequences=num_sequences, ignore_index=ignore_index,
                               temperature=temperature, process_group=process_group,
                               backend=backend, inplace_backward=inplace_backward)
    if pack is None and ref_logps.dim() == 2:
        counted = masked_labels(labels, loss_mask, ignore_index) != ignore_index
        ref_logps = (ref_logps.float() * counted).sum(-1)
    return pair_loss(policy, ref_logps, beta, loss_type)


class SpinLoss(torch.nn.Module):
    """`spin_loss` as a module; `beta` may be reassigned between SPIN iterations."""

    def __init__(self, beta=0.1, loss_type: str = "sigmoid", *, ignore_index: int = -100,
                 temperature: float = 1.0, process_group=None, backend: str = "auto",
                 inplace_backward: bool = False):
        super().__init__()
        self.beta, self.loss_type = beta, loss_type
        self.ignore_index, self.temperature = ignore_index, temperature
        self.process_group, self.backend = process_group, backend
        self.inplace_backward = inplace_backward

    def forward(self, logits, labels, ref_logps, loss_mask=None, *, seq_ids=None, cu_seqlens=None,
                num_sequences=None) -> SpinLossOutput:
        return spin_loss(logits, labels, ref_logps, loss_mask=loss_mask, seq_ids=seq_ids,
                         cu_seqlens=cu_seqlens, num_sequences=num_sequences, beta=self.beta,
                         loss_type=self.loss_type, ignore_index=self.ignore_index,
                         temperature=self.temperature, process_group=self.process_group,
                         backend=self.backend, inplace_backward=self.inplace_backward)
