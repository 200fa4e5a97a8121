"""spin_kernels: fused SPIN loss kernels, pinned-memory weight swap, a SPIN trainer."""
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
