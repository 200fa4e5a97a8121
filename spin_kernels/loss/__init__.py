"""`spin_kernels.loss`: masked per-token log-probs and the SPIN loss, computed without ever
materializing the vocabulary softmax.

    logits.py         token_logprobs, sequence_logprobs, spin_loss, SpinLoss (from logits [..., V])
    linear.py         linear_token_logprobs, linear_sequence_logprobs, linear_spin_loss (from hidden
                      states [..., H] and the LM head, never materializing the logits): argument
                      checks, then the op in ops/linear_logprobs.py
    pair.py           spin_loss_from_logps, SpinLossOutput (the pair loss, its metrics and the
                      per-sequence rewards β·(π − ref) a trainer logs over a global batch)
    validation.py     argument checks (β and loss_type once per call) and the backend choice
    torch_backend.py  pure PyTorch: the CPU backend, the float64 test oracle, the eager baselines
    parallel.py       the vocab-parallel combine of per-shard statistics
    packed.py         packed (padding-free) input: sequence ids or cu_seqlens, per-sequence sums
    ops/              one op a file: logprobs.py (the Triton kernels of the logits path),
                      linear_logprobs.py (the fused LM head: chunk loop, custom ops, autograd),
                      pair_rows.py (the fused SPIN head's pair-by-pair row order)
"""
from spin_kernels.loss.linear import (linear_sequence_logprobs, linear_spin_loss,
                                      linear_token_logprobs)
from spin_kernels.loss.logits import SpinLoss, sequence_logprobs, spin_loss, token_logprobs
from spin_kernels.loss.pair import SpinLossOutput, spin_loss_from_logps

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
