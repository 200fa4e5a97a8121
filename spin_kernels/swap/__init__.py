"""Host-memory side of spin_kernels: reference weights in (pinned) host memory, swapped into a live
model or streamed through it, and optimizer state parked in host memory (DESIGN.md, "Swap design").

    backend                               "cuda-ext" | "cpu-ext" | "torch": the implementation in use
    bank = WeightBank.from_module(model)  snapshot into one exact-size arena (pinned on CUDA)
    bank.load_into(model)                 in-place copy into the model's existing tensors
    with swapped(model, bank): ...        the model holds the bank's weights inside, its own after
    offload_optimizer(opt) / onload_optimizer(opt)
    streamed_reference_forward(model, bank, input_ids)   reference logits, layers streamed

Every function takes `backend=` ("auto", "ext" or "torch") where it creates host memory; the torch
fallback has the same behaviour with torch's pinned allocator and one `copy_` per tensor.

    bank.py       WeightBank: the arena, its layout and its transfers
    bank_file.py  its file format: safetensors with the arena order and a checksum per tensor
    engine.py     the copy engine (C++ extension or torch): allocation, batched copies, streams
    optimizer.py  optimizer-state offload
    streamed.py   the layer-streamed reference forward
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Mapping

import torch
from torch import nn

from spin_kernels.swap.streamed import streamed_reference_forward
from spin_kernels.swap.bank import WeightBank
from spin_kernels.swap.engine import live_backend
from spin_kernels.swap.optimizer import OptimizerOffload, offload_optimizer, onload_optimizer

backend: str = live_backend()


@contextlib.contextmanager
def swapped(model: nn.Module | Mapping[str, torch.Tensor], bank: WeightBank) -> Iterator[nn.Module]:
    """NeMo-Aligner's `cpu_weight_swap`: inside the block `model` computes with the bank's weights;
    on exit (also on an exception) it has its own again, bit for bit.

    Entering stashes the model's tensors into a second host arena of the bank (`bank.stash()`, kept
    for the next swap; `bank.release_stash()` frees it) while the bank's tensors are loaded, the two
    directions overlapping on the bus; leaving is one host-to-device batch. Device memory is not
    used, and the tensors stay the same objects (optimizer and autograd references stay valid)."""
    if not isinstance(bank, WeightBank):
        raise TypeError(f"bank must be a WeightBank, got {type(bank).__name__}")
    targets = bank.swap_in(model)
    try:
        yield model
    finally:
        bank.swap_out(targets)


__all__ = [
    "OptimizerOffload",
    "WeightBank",
    "backend",
    "offload_optimizer",
    "onload_optimizer",
    "streamed_reference_forward",
    "swapped",
]
