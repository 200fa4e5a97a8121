"""Generation and reference log-probs over a dataset, split across data-parallel ranks.

Tensor-parallel ranks of one data-parallel slot process the same prompts; the LM head's vocab
shards are gathered while sampling (spin_trainer.tp_plan.full_vocab_logits), and
generate_responses is deterministic for a seed and identical on every tensor-parallel rank.
"""
import torch

from .data import collate_pairs
from .distributed import gather_objects, shard_range
from .generation import SamplingConfig, generate_responses
from .steps import sequence_logps
from .tp_plan import full_vocab_logits


def sampling_seed(base_seed, iteration, epoch):
    """A distinct, reproducible seed per (iteration, epoch). The noise is keyed by the seed and each
    prompt's index in the dataset (`generate` passes it), so a response does not depend on the
    data-parallel layout: a run resumed on another number of processes samples the same responses."""
    return (base_seed * 1_000_003 + iteration * 10_007 + epoch * 101) % (2 ** 31 - 1)


def generate(model, examples, sampling, ctx, *, tokenizer, max_length, batch_size, progress,
             optimizer=None, offload_optimizer=False):
    """Response ids (EOS included when produced) for every example's prompt, on every rank."""
    start, end = shard_range(len(examples), ctx.dp_rank, ctx.dp_size)
    prompts = [list(e.prompt_ids) for e in examples[start:end]]
    offload = offload_optimizer and optimizer is not None and len(optimizer.state) > 0
    if offload:
        from spin_kernels.swap import offload_optimizer as offload_state, onload_optimizer as onload_state
        offloaded = offload_state(optimizer)
    was_training = model.training
    model.eval()
    try:
        with full_vocab_logits(model, ctx), torch.no_grad():
            responses = generate_responses(
                model, prompts, sampling, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id, max_length=max_length, batch_size=batch_size,
                progress=progress and ctx.is_main, example_ids=list(range(start, end))) if prompts else []
    finally:
        model.train(was_training)
        if offload:
            onload_state(offloaded)
    return gather_objects([list(r) for r in responses], ctx.dp_group, ctx.dp_size)


def greedy(max_new_tokens):
    return SamplingConfig(max_new_tokens=max_new_tokens, do_sample=False)


@torch.no_grad()
def pair_logps(model, examples, generated, ctx, *, micro_batch_size, pad_token_id):
    """[P, 2] float32 (actual, generated) response log-prob sums under `model`, on every rank."""
    start, end = shard_range(len(examples), ctx.dp_rank, ctx.dp_size)
    was_training = model.training
    model.eval()
    rows = []
    try:
        for i in range(start, end, micro_batch_size):
            j = min(i + micro_batch_size, end)
            batch = collate_pairs(examples[i:j], generated[i:j], pad_token_id).to(ctx.device)
            logps = sequence_logps(model, batch, ctx).float().cpu()
            b = j - i
            rows.extend(torch.stack([logps[:b], logps[b:]], dim=1).tolist())
    finally:
        model.train(was_training)
    gathered = gather_objects(rows, ctx.dp_group, ctx.dp_size)
    return torch.tensor(gathered, dtype=torch.float32).reshape(len(examples), 2)
