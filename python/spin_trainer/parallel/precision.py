"""Numeric precision of a run: what the parameters are stored in and what the forward computes in.

`--dtype bfloat16` (or float16) is mixed precision, the standard way: fp32 master weights, fp32
gradient reduction and fp32 optimizer state, compute in the low-precision dtype. A SPIN update at
lr 5e-7 is far below a bf16 weight's rounding step (2^-8 relative), so a bf16 weight mostly keeps
its old value: 10 AdamW steps at 5e-7 on a bf16 Linear(2048, 2048) change about 1 % of the
weights, and all of them in fp32 (tests/test_train_precision.py measures it).

- The cast is FSDP2's `MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)` in every layout:
  the all-gathered weights are bf16 (embeddings and norms too, so the residual stream is bf16),
  gradients are reduced in fp32 into the fp32 shards. One process and tensor parallelism alone
  put `fully_shard` (`replicate` with `--no-dp-shard`) on a data-parallel axis of one rank for it
  (parallel/mesh.py, as torchtitan does), so that every layout is one numerical model: the first
  step's log-probs and the generations of one process and of FSDP over many are the same bits.
  (torch.autocast, the other common way, keeps embeddings, norm weights and the residual stream in
  fp32: another model, whose bf16 results differ from FSDP's.)
- float32 is the plain path: no casts (and one process without FSDP).

`--pure-low-precision` keeps the parameters, gradients and optimizer state themselves in --dtype
(the old behaviour: half the memory of the weights, but updates below a weight's rounding step are
lost).
"""
from dataclasses import dataclass

import torch
from torch.distributed.fsdp import MixedPrecisionPolicy

from .. import config

DTYPES = {name: getattr(torch, name) for name in config.DTYPES}   # the dtype setting's choices


@dataclass(frozen=True)
class Precision:
    dtype: str = "float32"   # compute dtype (--dtype)
    pure: bool = False       # --pure-low-precision: parameters and optimizer state in `dtype` too

    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]

    @property
    def param_dtype_name(self):
        """The dtype the parameters (and so gradients and optimizer state) are stored in."""
        return self.dtype if self.pure else "float32"

    @property
    def param_dtype(self):
        return DTYPES[self.param_dtype_name]

    @property
    def mixed(self):
        return self.compute_dtype != self.param_dtype

    def mp_policy(self):
        """FSDP2's policy: all-gather in the compute dtype, reduce gradients in fp32 (mixed only)."""
        if not self.mixed:
            return MixedPrecisionPolicy()
        return MixedPrecisionPolicy(param_dtype=self.compute_dtype, reduce_dtype=torch.float32)
