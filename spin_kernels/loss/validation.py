"""Argument checks shared by every entry point of `spin_kernels.loss`, and the backend choice.

Errors name the argument, the shapes and the expectation (`ValueError`/`TypeError`): a user's
mistake never reaches a kernel, where it could read out of bounds or return a wrong number.
"""
import math
import numbers
import os

import numpy as np
import torch

from spin_kernels.loss import torch_backend
from spin_kernels.loss.parallel import shard_bounds

try:
    from spin_kernels.loss.ops import logprobs as triton_ops
except ImportError:  # triton is optional: without it the torch backend serves every call
    triton_ops = None

LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BACKENDS = ("auto", "triton", "torch")
LOSS_TYPES = ("sigmoid", "hinge")


def shape_of(value) -> object:
    """The shape of a tensor, or the type name of anything else (for error messages)."""
    return tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__


def check_logits_labels(logits, labels, ignore_index: int, process_group) -> None:
    if not isinstance(logits, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise TypeError(f"logits and labels must be tensors, got {type(logits).__name__} and "
                        f"{type(labels).__name__}")
    if logits.dtype not in LOGIT_DTYPES:
        raise TypeError(f"logits must be float32, bfloat16 or float16, got {logits.dtype}")
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits must be [..., V] with V > 0, got shape {tuple(logits.shape)}")
    if tuple(labels.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"labels must have the shape of logits without its last dim: logits "
                         f"{tuple(logits.shape)} needs labels {tuple(logits.shape[:-1])}, got "
                         f"{tuple(labels.shape)}")
    check_labels(labels, logits.device, logits.shape[-1], ignore_index, process_group)


def check_labels(labels: torch.Tensor, device: torch.device, v_local: int, ignore_index: int,
                 process_group) -> None:
    """Integer labels on `device`, each in [0, V) or ignore_index (V: the whole vocabulary)."""
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    if labels.device != device:
        raise ValueError(f"labels are on {labels.device}, the scores they index on {device}")
    # On the host the check costs no device sync; on a GPU an out-of-range label is not checked
    # here (that would stall the stream) and yields a NaN log-prob instead. A compiled graph
    # cannot branch on values, so it gets the NaN too.
    if labels.device.type == "cpu" and not torch.compiler.is_compiling():
        _, vocab_total = shard_bounds(v_local, process_group)
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab_total))
        if bad.any():
            raise ValueError(f"labels must lie in [0, {vocab_total}) or equal ignore_index="
                             f"{ignore_index}; found {labels[bad][:5].tolist()} at "
                             f"{bad.nonzero()[:5].tolist()}")


def check_temperature(temperature) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
            math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")


def check_loss_args(beta, loss_type: str):
    """Checks the pair loss's options, once per public call (inner layers take them as checked);
    returns β as a float, or as the caller's 0-dim tensor (kept a tensor: a compiled graph then
    takes it as an input and a new value does not recompile).

    A Python or numpy number, a 0-dim numpy array and a 0-dim CPU tensor are checked here (finite,
    > 0). A tensor on a device, or any tensor inside a compiled graph, is not read on the host
    (that would stall the stream or break the graph): an invalid value there turns into NaN, so
    the loss and the metrics come out NaN, never a silently reversed or zero loss.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if isinstance(beta, np.ndarray):
        if beta.ndim != 0:
            raise ValueError(f"beta must be a number or a 0-dim tensor/array, got an array of shape "
                             f"{beta.shape}")
        beta = beta[()]
    if isinstance(beta, torch.Tensor):
        if beta.dim() != 0:
            raise ValueError(f"beta must be a number or a 0-dim tensor, got a tensor of shape "
                             f"{tuple(beta.shape)}")
        if beta.dtype == torch.bool or beta.dtype.is_complex:
            raise TypeError(f"beta must be a real number, got a {beta.dtype} tensor")
        if beta.device.type != "cpu" or torch.compiler.is_compiling():
            return torch.where(torch.isfinite(beta) & (beta > 0), beta, math.nan)
        value = beta.item()
    elif isinstance(beta, numbers.Real) and not isinstance(beta, (bool, np.bool_)):
        value = beta = float(beta)
    else:
        raise TypeError(f"beta must be a number (float, int, numpy scalar) or a 0-dim tensor, got "
                        f"{type(beta).__name__} {beta!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"beta must be a finite number > 0, got {value!r}")
    return beta


def check_pair_rows(name: str, inputs, width: str, ref_logps) -> None:
    """`inputs` is [2B, T, width] (rows [0, B) actual, [B, 2B) generated) and `ref_logps` is [2B] or
    [2B, T]. Shared by the pair losses from logits and from hidden states."""
    if not isinstance(inputs, torch.Tensor) or inputs.dim() != 3:
        raise ValueError(f"{name} must be [2B, T, {width}], got {shape_of(inputs)}")
    rows, T = inputs.shape[0], inputs.shape[1]
    if rows == 0 or rows % 2:
        raise ValueError(f"{name} needs an even, nonzero number of rows (B actual, then B generated), "
                         f"got {rows}")
    if not isinstance(ref_logps, torch.Tensor) or tuple(ref_logps.shape) not in ((rows,), (rows, T)):
        raise ValueError(f"ref_logps must be [{rows}] or [{rows}, {T}] for {name} "
                         f"{tuple(inputs.shape)}, got {shape_of(ref_logps)}")


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_ops is not None else "torch"
    if backend == "triton":
        if triton_ops is None:
            raise ValueError("backend='triton' needs the triton package, which is not importable")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(f"backend='triton' needs CUDA tensors (got {device}), or "
                             "TRITON_INTERPRET=1 set before triton is imported to run the kernels "
                             "on the CPU")
    return backend


def backend_ops(backend: str):
    """The fold ops (`logprob_stats`, `logprob_grad`, `logprob_grad_inplace`) of a resolved
    backend: the Triton kernels or their PyTorch twins."""
    return triton_ops if backend == "triton" else torch_backend


def masked_labels(labels: torch.Tensor, loss_mask, ignore_index: int) -> torch.Tensor:
    """Labels with positions outside `loss_mask` set to ignore_index (so kernels skip them)."""
    if loss_mask is None:
        return labels
    if not isinstance(loss_mask, torch.Tensor) or tuple(loss_mask.shape) != tuple(labels.shape):
        raise ValueError(f"loss_mask must have the shape of labels {tuple(labels.shape)}, got "
                         f"{shape_of(loss_mask)}")
    return labels.masked_fill(loss_mask == 0, ignore_index)


def packed_sequences(tokens: int, device: torch.device, seq_ids, cu_seqlens, num_sequences):
    """The sequence of each of `tokens` packed positions: ([tokens] int64, -1 = none; S), from
    `seq_ids` [tokens] with `num_sequences` = S, or from flash-attn's `cu_seqlens` [S + 1].

    Checked on the host for CPU tensors. On a device (or in a compiled graph) nothing is read back:
    `packed_invalid` flags bad ids or bounds, and the sums built from them come out NaN.
    """
    if (seq_ids is None) == (cu_seqlens is None):
        raise ValueError("packed input needs exactly one of seq_ids= (with num_sequences=) and "
                         "cu_seqlens=")
    given = seq_ids if cu_seqlens is None else cu_seqlens
    name = "seq_ids" if cu_seqlens is None else "cu_seqlens"
    if not isinstance(given, torch.Tensor) or given.dim() != 1:
        raise ValueError(f"{name} must be a 1-D integer tensor, got {shape_of(given)}")
    if given.dtype.is_floating_point or given.dtype.is_complex or given.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {given.dtype}")
    if given.device != device:
        raise ValueError(f"{name} is on {given.device}, the scores it groups on {device}")
    host_check = device.type == "cpu" and not torch.compiler.is_compiling()
    if cu_seqlens is not None:
        if num_sequences is not None and num_sequences != cu_seqlens.numel() - 1:
            raise ValueError(f"num_sequences={num_sequences!r} contradicts cu_seqlens, which "
                             f"delimits {cu_seqlens.numel() - 1} sequences")
        if cu_seqlens.numel() < 2:
            raise ValueError(f"cu_seqlens must hold S + 1 >= 2 offsets, got {cu_seqlens.numel()}")
        bounds = cu_seqlens.long()
        if host_check and (bounds[0] != 0 or bounds[-1] != tokens or (bounds.diff() < 0).any()):
            raise ValueError(f"cu_seqlens must rise from 0 to the number of tokens {tokens} "
                             f"without decreasing, got {cu_seqlens[:8].tolist()}...")
        positions = torch.arange(tokens, device=device)
        seq = torch.searchsorted(bounds, positions, right=True) - 1
        return seq.masked_fill(seq >= bounds.numel() - 1, -1), bounds.numel() - 1
    if isinstance(num_sequences, bool) or not isinstance(num_sequences, int) or num_sequences < 1:
        raise ValueError(f"seq_ids needs num_sequences=, an int >= 1 (not read from the ids: that "
                         f"would be a host sync), got {num_sequences!r}")
    if seq_ids.numel() != tokens:
        raise ValueError(f"seq_ids must be [{tokens}], one id per packed token, got "
                         f"{tuple(seq_ids.shape)}")
    seq = seq_ids.long()
    if host_check:
        bad = (seq < -1) | (seq >= num_sequences)
        if bad.any():
            raise ValueError(f"seq_ids must lie in [0, {num_sequences}) or equal -1 (no sequence); "
                             f"found {seq[bad][:5].tolist()} at {bad.nonzero()[:5].flatten().tolist()}")
    return seq, num_sequences


def packed_invalid(seq: torch.Tensor, num_sequences: int, cu_seqlens=None) -> torch.Tensor:
    """0-dim bool: ids or bounds that a CPU call would have refused (computed on the device)."""
    bad = ((seq < -1) | (seq >= num_sequences)).any()
    if cu_seqlens is not None:
        bounds = cu_seqlens.long()
        bad = bad | (bounds[0] != 0) | (bounds[-1] != seq.numel()) | (bounds.diff() < 0).any()
    return bad
