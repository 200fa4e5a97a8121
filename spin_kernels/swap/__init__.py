"""Host-memory side of spin_kernels: reference weights in (pinned) host memory, swapped into a live
model or streamed through it, and optimizer state parked in host memory (DESIGN.md, "Swap design").

    backend                               "cuda-ext" | "cpu-ext" | "torch": the implementation in use
    bank = WeightBank.from_module(model)  snapshot into one exact-size arena (pinned on CUDA)
    bank.load_into(model)                 in-place copy into the model's existing tensors
    with swapped(model, bank): ...        the model holds the bank's weights inside, its own after
    record = offload_optimizer(opt); onload_optimizer(record)   (reuse=record: the same host arena)
    streamed_reference_forward(model, bank, input_ids)   reference logits, layers streamed

Every function takes `backend=` ("auto", "ext" or "torch") where it creates host memory; the torch
fallback has the same behaviour with torch's pinned allocator and one `copy_` per tensor.

    bank.py       WeightBank: the arena, its layout and its transfers
    swapping.py   swapped(): the state machine of a swap into a live model and back
    engine.py     the copy engine (C++ extension or torch): allocation, batched copies, streams
    optimizer.py  optimizer-state offload
    streamed.py   the layer-streamed reference forward
"""
from __future__ import annotations

from spin_kernels.swap.bank import WeightBank
from spin_kernels.swap.engine import live_backend
from spin_kernels.swap.optimizer import OptimizerOffload, offload_optimizer, onload_optimizer
from spin_kernels.swap.streamed import streamed_reference_forward
from spin_kernels.swap.swapping import swapped

backend: str = live_backend()

__all__ = [
    "OptimizerOffload",
    "WeightBank",
    "backend",
    "offload_optimizer",
    "onload_optimizer",
    "streamed_reference_forward",
    "swapped",
]
