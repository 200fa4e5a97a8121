"""Packed (padding-free) input: flat `[N, V]` logits or `[N, H]` hidden states whose tokens carry
sequence ids, given as `seq_ids` [N] (-1 = no sequence) with `num_sequences`, or as flash-attn's
`cu_seqlens` [S + 1]. Per-sequence sums are `sums_by_index` over the ids: no host sync, no padding.
"""
import math
from typing import NamedTuple, Optional

import torch

from spin_kernels.loss.validation import (masked_labels, packed_invalid, packed_sequences,
                                          shape_of)


def sums_by_index(values: torch.Tensor, index: torch.Tensor, count: int) -> torch.Tensor:
    """[count] float32 sums of `values` [N] by `index` [N] (ids in [0, count)), differentiable, and
    the same on every call. On CUDA `index_add` adds with atomics, in any order, so the same input
    could give sums that differ in the last bit (and a policy that is the reference a margin that is
    not exactly 0); `index_put` with accumulate sorts the ids and adds each one's values in order.
    On the CPU `index_add` adds in order (`index_put` may split the work over threads)."""
    zeros = values.new_zeros(count, dtype=torch.float32)
    if values.is_cuda:
        return zeros.index_put((index,), values.float(), accumulate=True)
    return zeros.index_add(0, index, values.float())


class Packing(NamedTuple):
    seq: torch.Tensor  # [N] int64 in [-1, S): -1 where a token belongs to no sequence
    num_sequences: int
    invalid: Optional[torch.Tensor]  # 0-dim bool on the device, or None when checked on the host

    def labels(self, labels: torch.Tensor, loss_mask, ignore_index: int) -> torch.Tensor:
        """Labels with tokens outside `loss_mask` or outside every sequence set to ignore_index."""
        return masked_labels(labels, loss_mask, ignore_index).masked_fill(self.seq < 0, ignore_index)

    def sums(self, values: torch.Tensor) -> torch.Tensor:
        """[S] float32 per-sequence sums of `values` [N] (differentiable); NaN for ids a CPU call
        would have refused."""
        spill = self.num_sequences  # one extra bin for the tokens of no sequence, then dropped
        index = self.seq.masked_fill(self.seq < 0, spill)
        sums = sums_by_index(values, index, spill + 1)[:spill]
        if self.invalid is not None:
            sums = sums + torch.where(self.invalid, math.nan, 0.0)
        return sums


def packing(inputs, name: str, width: str, labels, seq_ids, cu_seqlens, num_sequences, *,
            pairs: bool = False) -> Optional[Packing]:
    """The packing of `inputs` [N, width] and `labels` [N], or None for a padded call (no seq_ids,
    cu_seqlens or num_sequences). With `pairs`, S must be 2B: sequence i is pair i's actual
    response, B + i its generated one."""
    if seq_ids is None and cu_seqlens is None and num_sequences is None:
        return None
    if not isinstance(inputs, torch.Tensor) or inputs.dim() != 2:
        raise ValueError(f"packed {name} must be [N, {width}], got {shape_of(inputs)}")
    if not isinstance(labels, torch.Tensor) or tuple(labels.shape) != (inputs.shape[0],):
        raise ValueError(f"packed labels must be [N] = ({inputs.shape[0]},) for {name} "
                         f"{tuple(inputs.shape)}, got {shape_of(labels)}")
    seq, count = packed_sequences(inputs.shape[0], inputs.device, seq_ids, cu_seqlens,
                                  num_sequences)
    if pairs and count % 2:
        raise ValueError(f"the SPIN loss needs an even number of sequences (B actual, then B "
                         f"generated), got {count}")
    if inputs.device.type == "cpu" and not torch.compiler.is_compiling():
        return Packing(seq, count, None)
    invalid = packed_invalid(seq, count, cu_seqlens)
    return Packing(seq.masked_fill((seq < -1) | (seq >= count), -1), count, invalid)


def packed_ref(ref_logps, pack: Packing, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Reference log-probs [S]: given so, or per-token [N] (the shape of labels) summed over the
    same counted tokens as the policy's. [S] wins when N = S."""
    tokens, count = labels.shape[0], pack.num_sequences
    if not isinstance(ref_logps, torch.Tensor) or tuple(ref_logps.shape) not in ((count,), (tokens,)):
        raise ValueError(f"packed ref_logps must be [{count}] (per sequence) or [{tokens}] (per "
                         f"token), got {shape_of(ref_logps)}")
    if ref_logps.shape[0] == count:  # per sequence, also in the corner case N = S
        return ref_logps
    return pack.sums(ref_logps.detach().float() * (labels != ignore_index))
