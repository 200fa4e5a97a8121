"""Validation: held-out exact match (greedy), SFT loss on gold responses, SPIN acc on held-out pairs."""
import torch

from .data import collate_sft
from .distributed import all_reduce_sum, shard_range
from .logprobs import labelled_logps
from .modes import evaluating
from .rollouts import generate, greedy, pair_logps


def exact_match(model, examples, ctx, *, tokenizer, max_length, max_new_tokens, batch_size, progress=False):
    """(fraction of prompts whose greedy response equals the gold one, EOS included; mean length)."""
    if not examples:
        return None, None
    responses = generate(model, examples, greedy(max_new_tokens), ctx, tokenizer=tokenizer,
                         max_length=max_length, batch_size=batch_size, progress=progress)
    hits = sum(list(r) == list(e.response_ids) for r, e in zip(responses, examples))
    return hits / len(examples), sum(len(r) for r in responses) / len(responses)


@torch.no_grad()
def sft_loss(model, examples, ctx, *, micro_batch_size, pad_token_id):
    """Mean negative log-likelihood per response token (EOS included) over `examples`."""
    if not examples:
        return None
    start, end = shard_range(len(examples), ctx.dp_rank, ctx.dp_size)
    totals = torch.zeros(2, dtype=torch.float64, device=ctx.device)
    with evaluating(model):
        for i in range(start, end, micro_batch_size):
            batch = collate_sft(examples[i:min(i + micro_batch_size, end)], pad_token_id).to(ctx.device)
            token_logps = labelled_logps(model, batch, ctx).token_logps
            totals[0] -= token_logps.sum().double()
            totals[1] += token_logps.numel()
    all_reduce_sum(totals, ctx.dp_group)
    return float(totals[0] / totals[1])


def spin_pair_accuracy(model, examples, generated, ref_logps, ctx, *, beta, micro_batch_size, pad_token_id):
    """(acc, mean margin) of the policy on held-out pairs: margin = β·((π−ref)_actual − (π−ref)_gen)."""
    if not examples:
        return None, None
    policy = pair_logps(model, examples, generated, ctx, micro_batch_size=micro_batch_size,
                        pad_token_id=pad_token_id)
    rewards = beta * (policy - ref_logps)
    margin = rewards[:, 0] - rewards[:, 1]
    return float((margin > 0).float().mean()), float(margin.mean())


class HeldOut:
    """held_out(model) -> {exact_match, gen_length, val_sft_loss}: the numbers every table row shows.

    With `val_exact_match=True` also the exact match on the validation prompts ("val_exact_match"),
    which is what a learning rate or β may be chosen by (the test split never is).
    """

    def __init__(self, test_examples, val_examples, ctx, *, tokenizer, max_length, max_new_tokens,
                 batch_size, micro_batch_size, val_exact_match=False):
        self.test_examples, self.val_examples, self.ctx = test_examples, val_examples, ctx
        self.tokenizer, self.max_length, self.max_new_tokens = tokenizer, max_length, max_new_tokens
        self.batch_size, self.micro_batch_size = batch_size, micro_batch_size
        self.val_exact_match = val_exact_match

    def __call__(self, model):
        accuracy, length = exact_match(model, self.test_examples, self.ctx, tokenizer=self.tokenizer,
                                       max_length=self.max_length, max_new_tokens=self.max_new_tokens,
                                       batch_size=self.batch_size)
        loss = sft_loss(model, self.val_examples, self.ctx, micro_batch_size=self.micro_batch_size,
                        pad_token_id=self.tokenizer.pad_token_id)
        row = {"exact_match": accuracy, "gen_length": length, "val_sft_loss": loss}
        if self.val_exact_match:
            row["val_exact_match"], _ = exact_match(model, self.val_examples, self.ctx, tokenizer=self.tokenizer,
                                                    max_length=self.max_length, max_new_tokens=self.max_new_tokens,
                                                    batch_size=self.batch_size)
        return row
