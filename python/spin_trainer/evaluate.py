"""Held-out evaluation (SFT loss on gold responses, SPIN acc and margin on held-out pairs, greedy
exact match where asked: it means something on tasks with one right answer, about 0 on chat data)
and the diagnostics that show whether SPIN had anything to learn in an iteration.
"""
import math

import torch

from spin_kernels.loss import spin_loss_from_logps

from .generation.rollouts import generate, pair_logps
from .generation.sampling import SamplingConfig
from .micro_batches import rank_spans
from .model import evaluating
from .packed_scoring import sft_batch, sft_batch_tokens
from .parallel.mesh import all_reduce_sum, shard_range


def fraction_equal_to_gold(examples, generated):
    """Fraction of `examples` whose generated response ids (EOS included) equal the gold ones: such a
    pair gives SPIN no gradient (r(actual) and r(generated) are the same function of θ)."""
    if not examples:
        return None
    assert len(examples) == len(generated)
    return sum(list(g) == list(e.response_ids) for e, g in zip(examples, generated)) / len(examples)


def iteration_diagnostics(history):
    """{spin_acc_start, spin_acc_end, margin_start, margin_end}: means over the first and last quarter
    of an iteration's steps. At the first step the policy is the reference: margin 0, acc 0."""
    quarter = max(1, math.ceil(len(history) / 4))
    parts = {"start": history[:quarter], "end": history[-quarter:]}   # both empty without history: None
    return {f"{name}_{part}": sum(r[key] for r in records) / len(records) if records else None
            for name, key in (("spin_acc", "acc"), ("margin", "margin_mean")) for part, records in parts.items()}


def exact_match(model, examples, scorer, *, tokenizer, max_length, max_new_tokens, batch_size, progress=False):
    """(fraction of prompts whose greedy response equals the gold one, EOS included; mean length)."""
    if not examples:
        return None, None
    greedy = SamplingConfig(max_new_tokens=max_new_tokens, do_sample=False)
    responses = generate(model, examples, greedy, scorer, tokenizer=tokenizer, max_length=max_length,
                         batch_size=batch_size, progress=progress)
    return fraction_equal_to_gold(examples, responses), sum(len(r) for r in responses) / len(responses)


@torch.no_grad()
def sft_loss(model, examples, scorer, *, micro_batch_size, pad_token_id, max_tokens=0):
    """Mean negative log-likelihood per response token (EOS included) over `examples`, in
    micro-batches as pair_logps makes them (packed where the Scorer packs pairs)."""
    if not examples:
        return None
    ctx = scorer.ctx
    shards = [shard_range(len(examples), rank, ctx.dp_size) for rank in range(ctx.dp_size)]
    spans = rank_spans(shards, ctx.dp_rank, lambda i, j: sft_batch_tokens(examples[i:j], scorer.packing),
                       max_items=micro_batch_size, max_tokens=max_tokens)
    totals = torch.zeros(2, dtype=torch.float64, device=ctx.device)
    with evaluating(model):
        for i, j, counted in spans:
            batch = sft_batch(examples[i:j], pad_token_id, scorer.packing).to(ctx.device)
            token_logps = scorer.labelled_logps(model, batch).token_logps
            if counted:
                totals[0] -= token_logps.sum().double()
                totals[1] += token_logps.numel()
    all_reduce_sum(totals, ctx.dp_group)
    return float(totals[0] / totals[1])


def spin_pair_accuracy(model, examples, generated, ref_logps, scorer, *, beta, micro_batch_size, pad_token_id,
                       max_tokens=0):
    """(acc, mean margin) of the policy on held-out pairs: margin = β·((π−ref)_actual − (π−ref)_gen)."""
    if not examples:
        return None, None
    policy = pair_logps(model, examples, generated, scorer, micro_batch_size=micro_batch_size,
                        pad_token_id=pad_token_id, max_tokens=max_tokens)   # [P, 2]
    # [2P]: the actual responses' sums, then the generated ones' (a pair batch's layout)
    losses = spin_loss_from_logps(policy.T.flatten(), ref_logps.T.flatten(), beta=beta)
    rewards = losses.rewards.reshape(2, -1)
    margin = rewards[0] - rewards[1]
    return float((margin > 0).float().mean()), float(margin.mean())


class HeldOut:
    """held_out(model) -> {val_sft_loss}, and with `exact_match=True` {exact_match, gen_length} of
    greedy answers to the test prompts (a generation over all of them).

    With `val_exact_match=True` also the exact match on the validation prompts ("val_exact_match"),
    which is what a learning rate or β may be chosen by (the test split never is).
    """

    def __init__(self, test_examples, val_examples, scorer, *, tokenizer, max_length, max_new_tokens,
                 batch_size, micro_batch_size, max_tokens=0, exact_match=False, val_exact_match=False):
        self.test_examples, self.val_examples, self.scorer = test_examples, val_examples, scorer
        self.tokenizer, self.sft = tokenizer, dict(micro_batch_size=micro_batch_size, max_tokens=max_tokens)
        self.greedy = dict(tokenizer=tokenizer, max_length=max_length, max_new_tokens=max_new_tokens,
                           batch_size=batch_size)
        self.exact_match, self.val_exact_match = exact_match, val_exact_match

    def __call__(self, model):
        row = {}
        if self.exact_match:
            row["exact_match"], row["gen_length"] = exact_match(model, self.test_examples, self.scorer, **self.greedy)
        row["val_sft_loss"] = sft_loss(model, self.val_examples, self.scorer, pad_token_id=self.tokenizer.pad_token_id,
                                       **self.sft)
        if self.val_exact_match:
            row["val_exact_match"], _ = exact_match(model, self.val_examples, self.scorer, **self.greedy)
        return row
