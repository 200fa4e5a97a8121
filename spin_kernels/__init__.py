"""spin_kernels: fused SPIN loss kernels, pinned-memory weight swap, a SPIN trainer.

    spin_kernels.loss   log-probs and the SPIN loss from logits, never materializing the softmax,
                        or from hidden states and the LM head, never materializing the logits
    spin_kernels.swap   reference weights and optimizer state in pinned host memory
"""
from spin_kernels.loss import (
    SpinLoss,
    SpinLossOutput,
    linear_sequence_logprobs,
    linear_spin_loss,
    linear_token_logprobs,
    sequence_logprobs,
    spin_loss,
    spin_loss_from_logps,
    token_logprobs,
)

__all__ = [
    "SpinLoss",
    "SpinLossOutput",
    "linear_sequence_logprobs",
    "linear_spin_loss",
    "linear_token_logprobs",
    "sequence_logprobs",
    "spin_loss",
    "spin_loss_from_logps",
    "token_logprobs",
]
