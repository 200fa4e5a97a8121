"""The one DTensor test of the package (library and trainer): is a tensor a DTensor, and which
tensor holds this rank's data.

Parameters that FSDP2 or tensor parallelism manage are DTensors (an `nn.Parameter` of one is one
too); the swap code and the trainer work on their local shards, in place.
"""
from __future__ import annotations

import torch


def is_dtensor(tensor: object) -> bool:
    """Whether `tensor` is a `torch.distributed.tensor.DTensor` (False where torch.distributed is
    not built)."""
    if not isinstance(tensor, torch.Tensor) or not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor that holds this rank's data: a DTensor's local shard (the same storage, outside
    autograd, so an in-place write reaches the DTensor), else the tensor itself."""
    return tensor._local_tensor if is_dtensor(tensor) else tensor
