"""Numeric precision of a run: what the parameters are stored in and what the forward computes in.

`--dtype bfloat16` (or float16) is mixed precision: fp32 master weights, gradient reduction and
optimizer state, as a bf16 weight cannot hold a SPIN-sized update (tests/test_train_precision.py
measures it). The cast is FSDP2's MixedPrecisionPolicy in every layout, one process included
(mesh.py, as torchtitan does), so that every layout is one numerical model; torch.autocast would be
another (fp32 embeddings, norms and residual stream). `--pure-low-precision` stores everything in
--dtype: half the weight memory, but updates below a weight's rounding step are lost.
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
        mixed = dict(param_dtype=self.compute_dtype, reduce_dtype=torch.float32) if self.mixed else {}
        return MixedPrecisionPolicy(**mixed)
