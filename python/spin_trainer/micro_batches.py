"""Micro-batches: a rank's items (pairs, or SFT sequences) cut into forwards of at most
--micro-batch-size items and --max-tokens-per-batch tokens, the same number on every data-parallel rank.

A micro-batch is consecutive items in the caller's order, grown greedily while both bounds hold;
its tokens are what its batch computes (`tokens(start, end)`, packed_scoring.pair_batch_tokens).
One item over the token bound is a micro-batch of its own (it cannot be cut).

Every rank of the data-parallel group must run the same number of forwards (FSDP gathers each
layer's weights in every forward, replicas reduce gradients in every backward). Every rank holds
every rank's items and knows the shards, so each computes every rank's greedy count, takes the
largest and cuts its own items into that many: no collective, no host sync. Halving a micro-batch
never raises either half's tokens (packed: a sum; padded: rows x the longest row), so both bounds
still hold; each micro-batch's loss weight is its share of the global batch (trainer.py), so the
cut does not change the update. A rank with fewer items than that count (validation shards differ
by one item; one may be empty) runs filler forwards of one item whose results it drops
(`counted` False); training shards are equal and never need one.
"""


def greedy_spans(start, end, tokens, *, max_items, max_tokens=0):
    """[(start, end)] of consecutive micro-batches covering items [start, end): each holds at most
    `max_items` items and at most `max_tokens` tokens (0: no token bound) by `tokens(start, end)`,
    except an item over `max_tokens` alone."""
    spans, first = [], start
    while first < end:
        last = first + 1
        while last < end and last - first < max_items and (not max_tokens or tokens(first, last + 1) <= max_tokens):
            last += 1
        spans.append((first, last))
        first = last
    return spans


def cut_into(spans, count, tokens):
    """`spans` cut further until there are `count` of them: the one of most tokens (of those with
    more than one item) is halved, again and again."""
    spans = list(spans)
    while len(spans) < count:
        divisible = [k for k, (a, b) in enumerate(spans) if b - a > 1]
        assert divisible, f"{sum(b - a for a, b in spans)} items cannot make {count} micro-batches"
        k = max(divisible, key=lambda k: tokens(*spans[k]))   # the first of the largest: deterministic
        a, b = spans[k]
        spans[k:k + 1] = [(a, (a + b) // 2), ((a + b) // 2, b)]
    return spans


def rank_spans(shards, rank, tokens, *, max_items, max_tokens=0):
    """[(start, end, counted)] of rank `rank`'s micro-batches, items [start, end) (counted False: a
    filler forward, whose result is dropped); `shards` [(start, end)] is every data-parallel rank's
    share of one list of items, `tokens(start, end)` the tokens of items [start, end) as a batch.
    Every rank gets as many spans as the rank whose greedy cut is longest (filler spans where its
    shard has fewer items than that)."""
    greedy = [greedy_spans(a, b, tokens, max_items=max_items, max_tokens=max_tokens) for a, b in shards]
    count = max(map(len, greedy))
    start, end = shards[rank]
    spans = [(a, b, True) for a, b in cut_into(greedy[rank], min(count, end - start), tokens)]
    # A filler runs one item: this rank's first, or (an empty shard) the first of the whole list.
    filler = (start, start + 1, False) if end > start else (0, 1, False)
    return spans + [filler] * (count - len(spans))
