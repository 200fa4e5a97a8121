"""Log-probs of the labelled tokens: the one place where the trainer runs a model's LM head.

Every log-prob of the trainer comes from here: the SPIN policy loss, the reference log-probs, the
SFT loss and the validation numbers. The backbone runs over the whole batch [S, T], but the LM
head only over the N positions whose label the loss mask counts (the response tokens, EOS
included): the hidden states of those positions are compacted into [N, H] before the head (a
pre-hook on the output embedding, inside the model's own forward, so that FSDP's and tensor
parallelism's hooks run as usual), so prompt and padding positions never produce logits. With
SPIN's prompts, a quarter of a sequence on the benchmark shape, that is the same share of the
head's matmul, of its [N, V] logits and of the loss's work.

Under tensor parallelism the head's output is this rank's vocab shard [N, V/tp] and the log-probs
are combined over the tp group (spin_kernels.loss, vocab-parallel). The head's [N, V] logits
are one branch; a fused hidden-states -> log-probs head (spin_kernels.loss.linear_token_logprobs)
is the other, taking the same compacted [N, H] hidden states and the head's weight.
"""
from dataclasses import dataclass

import torch
from spin_kernels.loss import token_logprobs


@dataclass
class LabelledLogps:
    token_logps: torch.Tensor   # [N] float32 log-prob of each labelled token, row-major order
    rows: torch.Tensor          # [N] the batch row of each
    num_rows: int

    def sequence_sums(self):
        """[S] float32 sum per row (differentiable); a row with no labelled token gives 0."""
        sums = self.token_logps.new_zeros(self.num_rows)
        return sums.index_add(0, self.rows, self.token_logps)


def labelled_logps(model, batch, ctx, *, inplace_backward=False):
    """Log-probs of the labelled tokens of `batch` (a data.Batch) under `model`, in ctx's precision.

    `inplace_backward=True` lets the loss's gradient overwrite the logits' memory (nothing else
    reads them after the loss).
    """
    num_rows, width = batch.labels.shape
    positions = batch.loss_mask.reshape(-1).nonzero().squeeze(1)   # [N]
    labels = batch.labels.reshape(-1).index_select(0, positions)    # [N]

    def compact(module, args):
        hidden = args[0]   # [S, T, H]
        return (hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions),) + tuple(args[1:])

    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"model: {type(model).__name__} has no output embeddings (LM head)")
    # Prepended: it runs before tensor parallelism's input hook turns the hidden states into a DTensor.
    handle = head.register_forward_pre_hook(compact, prepend=True)
    try:
        with ctx.compute():
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
    finally:
        handle.remove()
    assert logits.shape[0] == positions.shape[0], (tuple(logits.shape), positions.shape)
    logps = token_logprobs(logits, labels, process_group=ctx.tp_group, inplace_backward=inplace_backward)
    return LabelledLogps(logps, torch.div(positions, width, rounding_mode="floor"), num_rows)


@torch.no_grad()
def sequence_logps(model, batch, ctx):
    """[S] masked sums of the response log-probs (EOS included), float32, no gradient."""
    return labelled_logps(model, batch, ctx).sequence_sums()
