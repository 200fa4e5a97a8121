"""spin_kernels: fused SPIN loss kernels, pinned-memory weight swap, a SPIN trainer.

    spin_kernels.loss   log-probs and the SPIN loss from logits, never materializing the softmax
    spin_kernels.swap   reference weights and optimizer state in pinned host memory
"""
from spin_kernels.loss import (
    SpinLoss,
    SpinLossOutput,
    sequence_logprobs,
    spin_loss,
    spin_loss_from_logps,
    token_logprobs,
)

__all__ = [
    "SpinLoss",
    "SpinLossOutput",
    "sequence_logprobs",
    "spin_loss",
    "spin_loss_from_logps",
    "token_logprobs",
]
