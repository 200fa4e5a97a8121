"""Log-probs and the SPIN loss straight from hidden states and the LM head, never materializing
the logits `[..., V]`.

    linear_token_logprobs(hidden, weight, labels)      = token_logprobs(hidden @ weight.T + bias, labels)
    linear_sequence_logprobs(hidden, weight, labels)   = sequence_logprobs(...)
    linear_spin_loss(hidden, weight, labels, ref)      = spin_loss(...)   (same loss, same metrics)

How (`ops/linear_logprobs.py`, the op): positions without a label are compacted away first, so a
prompt token costs nothing; the labelled rows go through in chunks, a cuBLAS matmul writing a
chunk's logits into one reused buffer that the logits path's own fold reduces to per-row stats and,
for a gradient, overwrites with dlogits. One host sync per call counts the labelled rows. This
module checks the arguments and calls the op.

Cost, with N labelled rows (times H·V_local multiply-adds of 2 FLOPs each):
- `linear_spin_loss`: 6·N·H·V FLOPs. The pair loss of a chunk of whole pairs (sequence i with
  B + i) is known as soon as the chunk is folded, so its gradients are formed in the forward, from
  the logits still in the buffer: logits (2), d hidden (2), d weight (2). The backward only scales
  them by the upstream gradient (a trainer weights the loss for gradient accumulation). A single
  pair longer than a chunk is folded first and its logits computed again for the gradient (8).
- `linear_token_logprobs` / `linear_sequence_logprobs`: 2·N·H·V in the forward (reference
  log-probs under no_grad cost just that), and 6·N·H·V in the backward, which recomputes the
  logits because the upstream gradient of each log-prob is unknown until then: 8 in all.
Extra memory (beyond inputs, outputs and gradients), independent of N:
- the logits buffer: one chunk, at most `ops/linear_logprobs.CHUNK_BYTES` (1 GiB);
- for a bf16/fp16 weight, the fp32 accumulator of d weight, 4·V_local·H bytes (2 GiB at
  V = 128256, H = 4096): forming d weight chunk by chunk and accumulating it in fp32 cannot avoid
  it, and an fp32 weight's gradient is its own accumulator;
- a chunk's hidden rows and d hidden rows, and fp32 d bias;
- the torch backend: up to four fp32 copies of a block of min(chunk, 2^24 / V_local) rows
  (torch_backend.py), and on the CPU fp32 copies of the chunk for the d weight product;
- O(N) bookkeeping under 100 bytes per row (row ids, per-row stats; the hidden states themselves
  take 2·H bytes a row). `tests/test_loss_linear_memory.py` measures this bound on the CPU.
`linear_spin_loss` holds its preformed gradients from the forward to the backward (they are the
gradients themselves, only allocated at the end of the forward rather than in the backward); the
backward's upstream scale rounds a bf16 d weight a second time unless the scale is a power of two.

With `process_group`, `weight` (and `bias`) is this rank's contiguous vocab shard, as a
column-parallel LM head holds it, and `hidden` is replicated: the result equals the unsharded one
on every rank, d weight is the local shard's, and d hidden is summed over the group.
`linear_spin_loss` gathers three numbers per row once per chunk; the per-token functions once per
call.
"""
import torch

from spin_kernels.dtensor import is_dtensor
from spin_kernels.loss.ops.linear_logprobs import fused_spin_loss, fused_token_logprobs
from spin_kernels.loss.logits import sequence_totals
from spin_kernels.loss.packed import packed_ref, packing
from spin_kernels.loss.pair import SpinLossOutput
from spin_kernels.loss.validation import (LOGIT_DTYPES, check_labels, check_loss_args,
                                          check_pair_rows, check_temperature, masked_labels,
                                          resolve_backend, shape_of)


def _check_head(hidden, weight, bias, labels, ignore_index, temperature, process_group,
                backend) -> str:
    """Validates the fused head's arguments; returns the resolved backend."""
    for name, value in (("hidden", hidden), ("weight", weight), ("labels", labels)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(value).__name__}")
    for name, value in (("hidden", hidden), ("weight", weight), ("bias", bias)):
        if is_dtensor(value):
            raise TypeError(f"{name} is a DTensor: pass its local shard ({name}.to_local(), which "
                            "keeps the gradient flowing) with process_group= for a column-parallel "
                            "head, or the full tensor")
    if hidden.dtype not in LOGIT_DTYPES:
        raise TypeError(f"hidden must be float32, bfloat16 or float16, got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight must have the dtype of hidden ({hidden.dtype}), got {weight.dtype}")
    if weight.dim() != 2 or weight.shape[0] == 0:
        raise ValueError(f"weight must be [V, H] with V > 0, got shape {tuple(weight.shape)}")
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden [..., H] and weight [V, H] must have the same width H: hidden "
                         f"{tuple(hidden.shape)}, weight {tuple(weight.shape)}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.dtype != hidden.dtype:
            raise TypeError(f"bias must be a {hidden.dtype} tensor like hidden, got "
                            f"{getattr(bias, 'dtype', type(bias).__name__)}")
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias must be [V] = ({weight.shape[0]},) for weight "
                             f"{tuple(weight.shape)}, got {tuple(bias.shape)}")
    for name, value in (("weight", weight), ("bias", bias)):
        if value is not None and value.device != hidden.device:
            raise ValueError(f"{name} is on {value.device}, hidden on {hidden.device}")
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"labels must have the shape of hidden without its last dim: hidden "
                         f"{tuple(hidden.shape)} needs labels {tuple(hidden.shape[:-1])}, got "
                         f"{tuple(labels.shape)}")
    check_labels(labels, hidden.device, weight.shape[0], ignore_index, process_group)
    check_temperature(temperature)
    return resolve_backend(backend, hidden.device)


def linear_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                          bias=None, ignore_index: int = -100, temperature: float = 1.0,
                          process_group=None, backend: str = "auto") -> torch.Tensor:
    """log softmax((hidden @ weight.T + bias) / T)[label] per position, float32 `[...]`; 0 where
    label == ignore_index. Differentiable in hidden, weight and bias (recomputing backward).

    hidden `[..., H]` (float32/bfloat16/float16, any strides), weight `[V or V_local, H]` and bias
    `[V or V_local]` of the same dtype, labels `[...]` integer (global ids under `process_group`).
    """
    backend = _check_head(hidden, weight, bias, labels, ignore_index, temperature, process_group,
                          backend)
    return fused_token_logprobs(hidden, weight, bias, labels, ignore_index, temperature,
                                process_group, backend)


def linear_sequence_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                             loss_mask=None, *, seq_ids=None, cu_seqlens=None,
                             num_sequences=None, bias=None, average: bool = False,
                             ignore_index: int = -100, temperature: float = 1.0,
                             process_group=None, backend: str = "auto") -> torch.Tensor:
    """Masked sum (or, with `average`, mean over the mask) of the log-probs of each sequence, from
    hidden `[S, T, H]`, labels `[S, T]`, loss_mask `[S, T]`. Returns `[S]`; positions outside the
    mask are compacted away before any matmul. Packed: hidden `[N, H]`, labels `[N]` and sequence
    ids as `sequence_logprobs` takes them."""
    pack = packing(hidden, "hidden", "H", labels, seq_ids, cu_seqlens, num_sequences)
    if pack is not None:
        labels = pack.labels(labels, loss_mask, ignore_index)
    elif not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
        raise ValueError(f"hidden must be [S, T, H], got {shape_of(hidden)}")
    elif not isinstance(labels, torch.Tensor) or tuple(labels.shape) != tuple(hidden.shape[:2]):
        raise ValueError(f"labels must be [S, T] = {tuple(hidden.shape[:2])} for hidden "
                         f"{tuple(hidden.shape)}, got {shape_of(labels)}")
    else:
        labels = masked_labels(labels, loss_mask, ignore_index)
    tok = linear_token_logprobs(hidden, weight, labels, bias=bias, ignore_index=ignore_index,
                                temperature=temperature, process_group=process_group,
                                backend=backend)
    return sequence_totals(tok, labels, pack, average, ignore_index)


def linear_spin_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                     ref_logps: torch.Tensor, *, bias=None, loss_mask=None, seq_ids=None,
                     cu_seqlens=None, num_sequences=None, beta=0.1, loss_type: str = "sigmoid",
                     ignore_index: int = -100, temperature: float = 1.0, process_group=None,
                     backend: str = "auto") -> SpinLossOutput:
    """SPIN loss from hidden states `[2B, T, H]` (rows [0, B) actual, [B, 2B) generated) and the LM
    head `weight [V or V_local, H]` (+ `bias`): the loss and metrics of
    `spin_loss(hidden @ weight.T + bias, labels, ref_logps, ...)`, with the gradients of hidden,
    weight and bias formed in the forward (6·N·H·V FLOPs over the N labelled rows).

    `ref_logps` is `[2B]` (per-sequence masked sums) or `[2B, T]` (per-token, masked here the same
    way as the policy's). Rewards (`out.rewards`, and in the metrics) include β.
    `out.policy_logps` of a call under `torch.no_grad()` are reference log-probs of the same
    arithmetic (chunks, summation order): at θ_t they equal the policy's bit for bit, which
    `linear_sequence_logprobs`, chunked over the rows in another order, does not promise.
    Packed: hidden `[N, H]`, labels `[N]`, sequence ids as `spin_loss` takes them (i actual,
    B + i generated), `ref_logps` `[2B]` or per-token `[N]`; chunks still hold whole pairs.
    """
    pack = packing(hidden, "hidden", "H", labels, seq_ids, cu_seqlens, num_sequences, pairs=True)
    if pack is None:
        check_pair_rows("hidden", hidden, "H", ref_logps)
    beta = check_loss_args(beta, loss_type)  # before any work
    backend = _check_head(hidden, weight, bias, labels, ignore_index, temperature, process_group,
                          backend)
    if pack is not None:
        labels = pack.labels(labels, loss_mask, ignore_index)
        ref_logps = packed_ref(ref_logps, pack, labels, ignore_index)
    else:
        labels = masked_labels(labels, loss_mask, ignore_index)
        if ref_logps.dim() == 2:
            ref_logps = (ref_logps.float() * (labels != ignore_index)).sum(-1)
    return fused_spin_loss(hidden, weight, bias, labels, ref_logps, beta, loss_type, ignore_index,
                           temperature, process_group, backend, pack)
