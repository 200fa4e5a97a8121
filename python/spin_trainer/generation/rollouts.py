"""Generation and reference log-probs over a dataset, split across data-parallel ranks.

Tensor-parallel ranks of one data-parallel slot process the same prompts and sample the same
tokens from the gathered vocab shards (parallel/tp_plan.py, full_vocab_logits). Each prompt's
sampling noise is keyed by its index in the dataset and one seed per (iteration, epoch), never by
rank or batch: a run on any number of processes (or resumed on another) samples the same responses.
Under FSDP the weights are gathered for the whole generation (parallel/apply.py, full_weights) and
freed after it; generation computes in the run's precision (bf16 for --dtype bfloat16).
"""
import random
from contextlib import contextmanager, nullcontext

import torch

from spin_kernels.swap import offload_optimizer, onload_optimizer

from ..errors import UsageError, option
from ..model import evaluating
from ..micro_batches import rank_spans
from ..packed_scoring import pair_batch, pair_batch_tokens
from ..parallel.apply import full_weights
from ..parallel.mesh import gather_objects, shard_range
from ..parallel.tp_plan import full_vocab_logits
from .decode import Responses, generate_responses


def sampling_seed(base_seed, iteration, epoch):
    """A distinct, reproducible seed per (iteration, epoch)."""
    return (base_seed * 1_000_003 + iteration * 10_007 + epoch * 101) % (2 ** 31 - 1)


def eos_token_ids(model, tokenizer):
    """Every id that ends a response: the tokenizer's EOS and each id of the model's generation
    config `eos_token_id` (a list for chat models, e.g. end of text and end of turn)."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    configured = list(configured) if isinstance(configured, (list, tuple)) else [configured]
    return list(dict.fromkeys(i for i in [tokenizer.eos_token_id, *configured] if i is not None))


def drop_truncated(examples, generated, seed):
    """The pairs whose generation ended (EOS or a stop sequence) rather than being cut at the
    length cap (`generated.truncated`); each cut one's slot goes to a finished pair drawn with
    `seed`, so the iteration keeps its number of pairs and its step schedule."""
    kept = [i for i, cut in enumerate(generated.truncated) if not cut]
    if not kept:
        raise UsageError(f"{option('drop_truncated')}: all {len(examples)} generated responses were cut at "
                         f"{option('max_new_tokens')} (or the context); raise {option('max_new_tokens')} or drop "
                         f"{option('drop_truncated')}")
    fill = random.Random(seed)
    picks = [i if not cut else fill.choice(kept) for i, cut in enumerate(generated.truncated)]
    return [examples[i] for i in picks], [generated[i] for i in picks]


def iteration_pairs(examples, samples, previous_pairs, *, drop, mixed, seed, iteration):
    """(examples, generated, pairs dropped) of SPIN iteration `iteration`: one pair per training
    prompt (with `drop`, pairs cut at the length cap are replaced through drop_truncated; dropped is
    None without it), plus `mixed` pairs drawn from the previous iteration's `previous_pairs`."""
    examples, generated, dropped = list(examples), list(samples), None
    if drop:
        examples, generated = drop_truncated(examples, samples, seed=seed * 37 + iteration)
        dropped = sum(map(bool, samples.truncated))
    if mixed and previous_pairs is not None:
        previous_examples, previous_generated = previous_pairs
        picks = random.Random(seed * 31 + iteration).sample(range(len(previous_examples)), mixed)
        examples += [previous_examples[i] for i in picks]
        generated += [previous_generated[i] for i in picks]
    return examples, generated, dropped


class ParkedOptimizer:
    """Offloading: the optimizer's state waits in host memory while the model generates.

    One host arena serves the whole run (each offload refills it): pinning gigabytes costs far
    more than copying them."""

    def __init__(self, optimizer):
        self.optimizer = optimizer
        self.record = None   # spin_kernels.swap.OptimizerOffload of the last offload

    @contextmanager
    def parked(self):
        if len(self.optimizer.state) == 0:   # before the first step there is no state to move
            yield
            return
        self.record = offload_optimizer(self.optimizer, reuse=self.record)
        try:
            yield
        finally:
            onload_optimizer(self.record)


def generate(model, examples, sampling, scorer, *, tokenizer, max_length, batch_size, progress,
             parked_optimizer=None):
    """Response ids (EOS or stop sequence included when produced) for every example's prompt, on
    every rank, with `.truncated` flags; example i's sampling noise is keyed by i.
    `parked_optimizer` (a ParkedOptimizer) moves the optimizer state to host memory meanwhile."""
    ctx = scorer.ctx
    start, end = shard_range(len(examples), ctx.dp_rank, ctx.dp_size)
    prompts = [list(e.prompt_ids) for e in examples[start:end]]
    parked = parked_optimizer.parked() if parked_optimizer is not None else nullcontext()
    # (generate_responses itself runs in eval mode and without autograd)
    with parked, full_weights(model), full_vocab_logits(model, ctx):
        responses = generate_responses(
            model, prompts, sampling, eos_token_id=eos_token_ids(model, tokenizer),
            pad_token_id=tokenizer.pad_token_id, max_length=max_length, batch_size=batch_size,
            progress=progress and ctx.is_main, example_ids=list(range(start, end)))
    gathered = gather_objects([(list(r), cut) for r, cut in zip(responses, responses.truncated)],
                              ctx.dp_group, ctx.dp_size)
    return Responses([r for r, _ in gathered], [cut for _, cut in gathered])


@torch.no_grad()
def pair_logps(model, examples, generated, scorer, *, micro_batch_size, pad_token_id, max_tokens=0, batches=None):
    """[P, 2] float32 (actual, generated) response log-prob sums under `model`, on every rank.

    `batches`: lists of pair indices scored as the training steps take them (trainer.micro_batches:
    rank r the r-th of equal slices, then micro-batches of at most `micro_batch_size` pairs and
    `max_tokens` tokens, 0: no bound, as many as every other rank), the pairs they leave out after
    them; None: all pairs as one batch. Scored in a step's own micro-batches, the reference's sums
    at θ_t are the policy's of that step to the bit on any device (a GPU's matmuls may round a row
    otherwise in a batch of another shape)."""
    ctx = scorer.ctx
    batches = [list(range(len(examples)))] if batches is None else [list(b) for b in batches]
    left = sorted(set(range(len(examples))).difference(*batches))
    rows = []
    with evaluating(model):
        for indices in batches + ([left] if left else []):
            actual, samples = [examples[k] for k in indices], [generated[k] for k in indices]
            shards = [shard_range(len(indices), rank, ctx.dp_size) for rank in range(ctx.dp_size)]
            spans = rank_spans(shards, ctx.dp_rank,
                               lambda i, j: pair_batch_tokens(actual[i:j], samples[i:j], scorer.packing),
                               max_items=micro_batch_size, max_tokens=max_tokens)
            for i, j, counted in spans:
                batch = pair_batch(actual[i:j], samples[i:j], pad_token_id, scorer.packing).to(ctx.device)
                logps = scorer.sequence_logps(model, batch).float().cpu()
                if counted:
                    rows.extend(zip(indices[i:j], logps[:j - i].tolist(), logps[j - i:].tolist()))
    gathered = sorted(gather_objects(rows, ctx.dp_group, ctx.dp_size))
    assert [row[0] for row in gathered] == list(range(len(examples))), "every pair scored once"
    return torch.tensor([row[1:] for row in gathered], dtype=torch.float32).reshape(-1, 2)
