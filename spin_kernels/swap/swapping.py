"""`swapped`: a model computes with a `WeightBank`'s weights inside a block, its own after it.

The state machine of a swap lives here; the bank only provides the arenas and the transfers.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Mapping

import torch
from torch import nn

from spin_kernels.swap.bank import WeightBank


@contextlib.contextmanager
def swapped(model: nn.Module | Mapping[str, torch.Tensor], bank: WeightBank) -> Iterator[nn.Module]:
    """NeMo-Aligner's `cpu_weight_swap`: inside the block `model` computes with the bank's weights;
    on exit (also on an exception) it has its own again, bit for bit.

    Entering stashes the model's tensors into a second host arena of the bank (`bank.lend_stash()`,
    kept for the next swap; `bank.release_stash()` frees it) while the bank's tensors are loaded, the
    two directions overlapping on the bus; leaving is one host-to-device batch. Device memory is not
    used, and the tensors stay the same objects (optimizer and autograd references stay valid)."""
    if not isinstance(bank, WeightBank):
        raise TypeError(f"bank must be a WeightBank, got {type(bank).__name__}")
    if bank.swap_active:
        raise ValueError("swapped: this bank is already swapped into a model (nested swap of one bank)")
    targets = bank.match(model)  # ValueError naming every mismatch, before anything moves
    with bank.lend_stash() as stash:
        bank.stash_and_load(targets, stash)
        try:
            yield model
        finally:
            stash.load_into(targets)
