"""The largest micro-batch of a run (for `--plan`): its tokens, its LM head rows and its attention
segments, padded or packed as the trainer would batch it.

A pair is a prompt of P >= 1 tokens, a gold response of A <= L - P tokens (the tokenizer cuts it
to --max-length L) and a generated one of G <= min(M, L - P) tokens (generation stops at
--max-new-tokens M or at the context), so with c = min(M, L - 1):

    padded            2 rows of the micro-batch's longest P + max(A, G) <= L tokens each
    packed, shared    [prompt | gold | generated]: P + A + G <= L + min(M, L - P) <= L + c, at
                      P = 1 (the prompt is counted once, so the worst pair has the shortest one)
    packed, separate  [prompt | gold] and [prompt | generated] (flash-attn: no shared prompt):
                      2P + A + G <= L + P + min(M, L - P) <= 2L, at P = max(1, L - M)

The LM head runs on each scored token: A + G rows a pair (the gold tokens from P - 1, the first
generated token scored from the prompt's last position a second time: packing.py), its tokens - P
(shared) or - 2P (separate), at most (L - 1) + c. A generated response equal to the gold one packs
as no token but is scored again on the gold rows: 2A <= 2c rows for P + A tokens, two rows a token,
so under a token bound the most rows can come from such pairs.

A micro-batch holds at most m = --micro-batch-size pairs and, with --max-tokens-per-batch T, at
most T tokens as the layout computes them (micro_batches.py), except one pair over T alone:

    tokens       n = min(m x the most a pair takes, max(T, the most a pair takes))   (T = 0: m x it)
    head rows    the most of j pairs with an identical response (P = 1, A = G = c, 2c rows for
                 1 + c tokens) and the rest of the n tokens in as few other pairs as they fit, at
                 most m pairs in all, over j (P = 1 throughout: a prompt token is no row); with no
                 token bound m x ((L - 1) + c) (padded: every position, n, as before)
    segments     packed, shared: the attention segments, each pair's P + A + G tokens: as many
                 whole pairs as n holds and the rest (their squares size the masks of the
                 segmented SDPA path, activations.py)
"""
from dataclasses import dataclass

from ..errors import option


@dataclass(frozen=True)
class MicroBatch:
    layout: str | None      # None: padded rows; "shared" or "separate": packed (packed_scoring.packing_layout)
    pairs: int              # m, at most
    tokens: int             # n: the token budget
    labelled: int           # LM head rows, at most
    positions: int          # positions of a row (the RoPE tables): the padded row's length, or the packed row's
    pair_tokens: int        # the most one pair takes
    segments_squared: int   # sum of the squared attention segments (shared layout), else 0
    token_bound: int        # --max-tokens-per-batch (0: none)

    def describe(self, max_length):
        bound = f"{option('max_tokens_per_batch')} {self.token_bound}, " if self.token_bound else ""
        if self.layout is None:
            return (f"micro-batch: {self.pairs} pair(s), padded rows of at most {max_length} tokens: a token budget "
                    f"of {self.tokens} tokens ({bound}2 rows x {max_length} a pair), all taken as labelled (an upper "
                    f"bound)")
        sharing = "each prompt shared" if self.layout == "shared" else "a prompt per response"
        return (f"micro-batch: {self.pairs} pair(s) packed ({sharing}): a token budget of {self.tokens} tokens "
                f"({bound}{self.pair_tokens} the most a pair takes), at most {self.labelled} LM head rows (an "
                f"upper bound)")


def pair_tokens(layout, max_length, max_new_tokens):
    """The most tokens one pair takes in `layout` (None: padded, its 2 rows)."""
    longest_generated = min(max_new_tokens, max_length - 1)
    if layout is None:
        return 2 * max_length
    if layout == "shared":
        return max_length + longest_generated
    return 2 * max_length


def token_budget(pairs, most, token_bound):
    """Tokens of the largest micro-batch of at most `pairs` pairs of at most `most` tokens each,
    cut at `token_bound` tokens (0: none) except one pair alone (micro_batches.greedy_spans)."""
    if not token_bound:
        return pairs * most
    return min(pairs * most, max(token_bound, most))


def head_rows(pairs, tokens, max_length, longest_generated):
    """The most LM head rows of at most `pairs` packed pairs in `tokens` tokens (the docstring's
    bound): j identical pairs of 1 + c tokens, 2c rows each, and the rest in other pairs of at most
    L + c tokens, one prompt token each (the shared layout's; the separate one's rows are fewer)."""
    c, most = longest_generated, max_length + longest_generated
    best = 0
    for identical in range(min(pairs, tokens) + 1):
        identical_tokens = min(identical * (1 + c), tokens)
        rest = min(tokens - identical_tokens, (pairs - identical) * most)
        others = -(-rest // most)
        best = max(best, 2 * (identical_tokens - identical) + rest - others)
    return best


def micro_batch(layout, *, pairs, max_length, max_new_tokens, token_bound=0):
    most = pair_tokens(layout, max_length, max_new_tokens)
    tokens = token_budget(pairs, most, token_bound)
    if layout is None:
        return MicroBatch(layout=None, pairs=pairs, tokens=tokens, labelled=tokens, positions=max_length,
                          pair_tokens=most, segments_squared=0, token_bound=token_bound)
    labelled = head_rows(pairs, tokens, max_length, min(max_new_tokens, max_length - 1))
    whole, rest = divmod(tokens, most)
    segments_squared = whole * most * most + rest * rest if layout == "shared" else 0
    return MicroBatch(layout=layout, pairs=pairs, tokens=tokens, labelled=labelled, positions=tokens,
                      pair_tokens=most, segments_squared=segments_squared, token_bound=token_bound)
