"""Public API: masked per-token log-probs and the SPIN loss, straight from logits.

    r(y) = Σ_t mask_t · (log π_θ(y_t | ·) − log π_ref(y_t | ·))
    loss = mean_i −log σ(β · (r(y_actual_i) − r(y_generated_i)))      (or hinge: relu(1 − β·margin))

Alignment: `labels[..., t]` is the token that `logits[..., t, :]` scores; callers shift (for a
Hugging Face model: `logits[:, :-1]` with `input_ids[:, 1:]`). Backends: "triton" (fused kernels,
`spin_kernels.ops.logprobs`; CUDA tensors, or CPU tensors under TRITON_INTERPRET=1), "torch"
(chunked PyTorch, `spin_kernels.reference`), "auto" (Triton for CUDA tensors, torch otherwise).
"""
import math
import os
from typing import NamedTuple

import torch
import torch.nn.functional as F

from spin_kernels import reference
from spin_kernels.parallel import combine_shard_stats, shard_bounds

try:
    from spin_kernels.ops import logprobs as _triton_ops
except ImportError:  # triton is optional: without it the torch backend serves every call
    _triton_ops = None

_LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_BACKENDS = ("auto", "triton", "torch")
_LOSS_TYPES = ("sigmoid", "hinge")
_LN2 = math.log(2.0)


class SpinLossOutput(NamedTuple):
    loss: torch.Tensor  # scalar, differentiable
    metrics: dict[str, torch.Tensor]  # detached scalars; reading them is the caller's host sync


# --------------------------------------------------------------------------------- validation


def _check_logits_labels(logits, labels, ignore_index: int, process_group) -> None:
    if not isinstance(logits, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise TypeError(f"logits and labels must be tensors, got {type(logits).__name__} and "
                        f"{type(labels).__name__}")
    if logits.dtype not in _LOGIT_DTYPES:
        raise TypeError(f"logits must be float32, bfloat16 or float16, got {logits.dtype}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits must be [..., V] with V > 0, got shape {tuple(logits.shape)}")
    if tuple(labels.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"labels must have the shape of logits without its last dim: logits "
                         f"{tuple(logits.shape)} needs labels {tuple(logits.shape[:-1])}, got "
                         f"{tuple(labels.shape)}")
    if labels.device != logits.device:
        raise ValueError(f"logits are on {logits.device} but labels on {labels.device}")
    # On the host the check costs no device sync; on a GPU an out-of-range label is not checked
    # here (that would stall the stream) and yields a NaN log-prob instead. A compiled graph
    # cannot branch on values, so it gets the NaN too.
    if labels.device.type == "cpu" and not torch.compiler.is_compiling():
        _, vocab_total = shard_bounds(logits.shape[-1], process_group)
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab_total))
        if bad.any():
            raise ValueError(f"labels must lie in [0, {vocab_total}) or equal ignore_index="
                             f"{ignore_index}; found {labels[bad][:5].tolist()} at "
                             f"{bad.nonzero()[:5].tolist()}")


def _check_temperature(temperature) -> None:
    if not isinstance(temperature, (int, float)) or not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")


def _resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and _triton_ops is not None else "torch"
    if backend == "triton":
        if _triton_ops is None:
            raise ValueError("backend='triton' needs the triton package, which is not importable")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(f"backend='triton' needs CUDA tensors (got {device}), or "
                             "TRITON_INTERPRET=1 set before triton is imported to run the kernels "
                             "on the CPU")
    return backend


def _masked_labels(labels: torch.Tensor, loss_mask, ignore_index: int) -> torch.Tensor:
    """Labels with positions outside `loss_mask` set to ignore_index (so kernels skip them)."""
    if loss_mask is None:
        return labels
    if not isinstance(loss_mask, torch.Tensor) or tuple(loss_mask.shape) != tuple(labels.shape):
        shape = tuple(loss_mask.shape) if isinstance(loss_mask, torch.Tensor) else type(loss_mask).__name__
        raise ValueError(f"loss_mask must have the shape of labels {tuple(labels.shape)}, got {shape}")
    return labels.masked_fill(loss_mask == 0, ignore_index)


# ------------------------------------------------------------------------------- autograd op


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
        ops = _triton_ops if backend == "triton" else reference
        stats = ops.logprob_stats(rows, flat_labels, ignore_index, 1.0 / temperature,
                                  vocab_start, vocab_total)
        if process_group is not None:
            stats = combine_shard_stats(stats, process_group)
        m, log_sum, t = stats.unbind(0)
        logp = torch.where(flat_labels == ignore_index, 0.0, ((t - m) - log_sum) * _LN2)
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
        if inplace:
            if backend == "triton":
                _triton_ops.logprob_grad_inplace(*args)
            else:
                reference.logprob_grad(*args, out=rows)
            return (logits,) + no_grads
        ops = _triton_ops if backend == "triton" else reference
        return (ops.logprob_grad(*args).reshape(logits.shape),) + no_grads


# ------------------------------------------------------------------------------ public API


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100,
                   temperature: float = 1.0, process_group=None, backend: str = "auto",
                   inplace_backward: bool = False) -> torch.Tensor:
    """log softmax(logits / T)[label] per position, float32 `[...]`; 0 where label == ignore_index.

    logits `[..., V]` (float32/bfloat16/float16, any strides); labels `[...]` integer. With
    `process_group`, logits is this rank's contiguous vocab shard and labels are global ids.
    `inplace_backward=True` writes the gradient into the logits' storage (saves a logits-sized
    buffer; the logits are then overwritten).
    """
    _check_logits_labels(logits, labels, ignore_index, process_group)
    _check_temperature(temperature)
    backend = _resolve_backend(backend, logits.device)
    return _TokenLogprobs.apply(logits, labels, ignore_index, float(temperature), process_group,
                                backend, bool(inplace_backward))


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor, loss_mask=None, *,
                      average: bool = False, ignore_index: int = -100, temperature: float = 1.0,
                      process_group=None, backend: str = "auto",
                      inplace_backward: bool = False) -> torch.Tensor:
    """Masked sum (or, with `average`, mean over the mask) of the log-probs of each sequence.

    logits `[S, T, V]`, labels `[S, T]`, loss_mask `[S, T]` (nonzero = counted). Returns `[S]`;
    a sequence with no counted position gives 0.
    """
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"logits must be [S, T, V], got {shape}")
    if not isinstance(labels, torch.Tensor) or tuple(labels.shape) != tuple(logits.shape[:2]):
        shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"labels must be [S, T] = {tuple(logits.shape[:2])} for logits "
                         f"{tuple(logits.shape)}, got {shape}")
    labels = _masked_labels(labels, loss_mask, ignore_index)
    tok = token_logprobs(logits, labels, ignore_index=ignore_index, temperature=temperature,
                         process_group=process_group, backend=backend,
                         inplace_backward=inplace_backward)
    total = tok.sum(-1)
    if average:
        total = total / (labels != ignore_index).sum(-1).clamp(min=1)
    return total


def spin_loss_from_logps(policy_logps: torch.Tensor, ref_logps: torch.Tensor, *,
                         beta=0.1, loss_type: str = "sigmoid") -> SpinLossOutput:
    """SPIN loss from per-sequence log-probs `[2B]`: rows [0, B) actual, [B, 2B) generated."""
    if loss_type not in _LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {_LOSS_TYPES}, got {loss_type!r}")
    if isinstance(beta, (int, float)) and not (math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta must be a finite number > 0, got {beta!r}")
    if policy_logps.dim() != 1 or policy_logps.shape[0] % 2 or policy_logps.shape[0] == 0:
        raise ValueError("policy_logps must be [2B] (B actual rows, then B generated rows), got "
                         f"shape {tuple(policy_logps.shape)}")
    if tuple(ref_logps.shape) != tuple(policy_logps.shape):
        raise ValueError(f"ref_logps must match policy_logps {tuple(policy_logps.shape)}, got "
                         f"{tuple(ref_logps.shape)}")
    half = policy_logps.shape[0] // 2
    rewards = beta * (policy_logps - ref_logps.detach().to(policy_logps.dtype))  # [2B]
    margin = rewards[:half] - rewards[half:]  # [B]
    if loss_type == "sigmoid":
        loss = -F.logsigmoid(margin).mean()
    else:
        loss = F.relu(1 - margin).mean()
    with torch.no_grad():  # few, batched ops: a training step pays their launch overhead
        rewards, margin = rewards.detach(), margin.detach()
        rewards_std, rewards_mean = torch.std_mean(rewards, correction=0)
        rewards_by_half = rewards.view(2, half).mean(1)  # [actual, generated]
        logps_by_half = policy_logps.detach().view(2, half).mean(1)
        metrics = {
            "acc": (margin > 0).float().mean(),
            "rewards_actual_mean": rewards_by_half[0],
            "rewards_generated_mean": rewards_by_half[1],
            "rewards_all_mean": rewards_mean,
            "rewards_all_std": rewards_std,
            "margin_mean": margin.mean(),
            "logps_actual_mean": logps_by_half[0],
            "logps_generated_mean": logps_by_half[1],
        }
    return SpinLossOutput(loss, metrics)


def spin_loss(logits: torch.Tensor, labels: torch.Tensor, ref_logps: torch.Tensor, *,
              loss_mask=None, beta=0.1, loss_type: str = "sigmoid", ignore_index: int = -100,
              temperature: float = 1.0, process_group=None, backend: str = "auto",
              inplace_backward: bool = False) -> SpinLossOutput:
    """SPIN loss from logits `[2B, T, V]`: rows [0, B) actual, rows [B, 2B) generated.

    `ref_logps` is `[2B]` (per-sequence masked sums) or `[2B, T]` (per-token, masked here the
    same way as the policy's). Rewards in the metrics include β: `β·(π − ref)`.
    """
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"logits must be [2B, T, V], got {shape}")
    rows, T = logits.shape[0], logits.shape[1]
    if rows == 0 or rows % 2:
        raise ValueError(f"logits need an even, nonzero number of rows (B actual, then B generated), "
                         f"got {rows}")
    if not isinstance(ref_logps, torch.Tensor) or tuple(ref_logps.shape) not in ((rows,), (rows, T)):
        shape = tuple(ref_logps.shape) if isinstance(ref_logps, torch.Tensor) else type(ref_logps).__name__
        raise ValueError(f"ref_logps must be [{rows}] or [{rows}, {T}] for logits "
                         f"{tuple(logits.shape)}, got {shape}")
    policy = sequence_logprobs(logits, labels, loss_mask, ignore_index=ignore_index,
                               temperature=temperature, process_group=process_group,
                               backend=backend, inplace_backward=inplace_backward)
    if ref_logps.dim() == 2:
        counted = _masked_labels(labels, loss_mask, ignore_index) != ignore_index
        ref_logps = (ref_logps.float() * counted).sum(-1)
    return spin_loss_from_logps(policy, ref_logps, beta=beta, loss_type=loss_type)


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

    def forward(self, logits, labels, ref_logps, loss_mask=None) -> SpinLossOutput:
        return spin_loss(logits, labels, ref_logps, loss_mask=loss_mask, beta=self.beta,
                         loss_type=self.loss_type, ignore_index=self.ignore_index,
                         temperature=self.temperature, process_group=self.process_group,
                         backend=self.backend, inplace_backward=self.inplace_backward)
