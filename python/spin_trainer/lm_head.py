"""The LM head, run only where a loss reads it: the hidden states compacted to the labelled
positions before the head ("logits"), or the head's forward redirected to spin_kernels' fused head
("fused"). logprobs.py's docstring says how each runs inside the model's own forward.
"""
from contextlib import contextmanager

import torch
from torch.distributed.tensor import DTensor, Shard

from spin_kernels.dtensor import is_dtensor

from .errors import UsageError, option


def output_embedding(model):
    head = model.get_output_embeddings()
    if head is None:
        raise UsageError(f"model: {type(model).__name__} has no output embeddings (LM head)")
    return head


def compacted_input(head, positions):
    """A context (the hook's handle) inside which `head` sees only the hidden states of the flat
    `positions` of its [S, T, H] input."""
    def compact(module, args):
        hidden = args[0]   # [S, T, H]
        return (hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions),) + tuple(args[1:])

    # Prepended: it runs before tensor parallelism's input hook turns the hidden states into a DTensor.
    return head.register_forward_pre_hook(compact, prepend=True)


def _local(tensor):
    """A DTensor's local tensor, differentiably (its gradient returns with the same placements);
    a plain tensor or None as it is."""
    return tensor.to_local() if is_dtensor(tensor) else tensor


@contextmanager
def redirected_head(head, ctx, compute):
    """Inside, a call of the LM head `head` (nn.Linear) returns `compute(hidden, weight, bias)` of
    plain tensors in one dtype, instead of the logits; yields the list of what it returned."""
    if not isinstance(head, torch.nn.Linear):
        raise UsageError(f"{option('head')} fused: the model's output embedding is a {type(head).__name__}, not "
                         f"an nn.Linear whose weight the fused head can take; use {option('head')} logits")
    produced = []

    def forward(hidden):
        mesh = hidden.device_mesh if is_dtensor(hidden) else None
        assert (mesh is None) == (ctx.tp_group is None), "the LM head is vocab-parallel exactly under --tp"
        out = compute(_local(hidden), _local(head.weight), _local(head.bias))
        produced.append(out)
        # Under --tp the plan's output hook (ColwiseParallel(use_local_output=True), tp_plan.py) takes a
        # Shard(-1) DTensor back to its local tensor: this rank's result passes through unchanged.
        return out if mesh is None else DTensor.from_local(out, mesh, [Shard(-1)], run_check=False)

    saved = head.__dict__.get("forward")   # an instance attribute someone set before, if any
    head.forward = forward
    try:
        yield produced
    finally:
        if saved is None:
            del head.forward
        else:
            head.forward = saved


def fused_output(model, produced, got):
    """The model's output, checked to be what the fused head returned (not transformed after the head)."""
    if len(produced) != 1 or got.data_ptr() != produced[0].data_ptr() or got.shape != produced[0].shape:
        raise UsageError(f"{option('head')} fused: {type(model).__name__}'s forward transforms its LM head's output "
                         f"(e.g. logit soft-capping or scaling) or calls the head more than once, which the fused "
                         f"head cannot follow; use {option('head')} logits")
    return got
