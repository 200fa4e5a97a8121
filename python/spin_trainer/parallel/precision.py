"""Numeric precision of a run: what the parameters are stored in and what the forward computes in.

`--dtype bfloat16` (or float16) is mixed precision: fp32 master weights, gradient reduction and
optimizer state, compute in the low-precision dtype. A SPIN update at lr 5e-7 is far below a bf16
weight's rounding step (2^-8 relative): 10 AdamW steps at 5e-7 on a bf16 Linear(2048, 2048) change
about 1 % of the weights, and all of them in fp32 (tests/test_train_precision.py measures it).

The cast is FSDP2's `MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)` in every layout
(embeddings and norms too, so the residual stream is bf16): one process and tensor parallelism alone
put FSDP on a data-parallel axis of one rank for it (mesh.py, as torchtitan does), so that one
process and FSDP over many give the same bits. torch.autocast keeps embeddings, norm weights and the
residual stream in fp32: another model, whose bf16 results differ from FSDP's. float32 casts nothing.

`--pure-low-precision` keeps parameters, gradients and optimizer state in --dtype: half the memory
of the weights, but updates below a weight's rounding step are lost.
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
