"""The order in which the fused SPIN head visits rows: labelled rows compacted pair by pair
(sequence i's, then B + i's), grouped into chunks of whole pairs (`ops/linear_logprobs.py`)."""
from typing import NamedTuple, Optional

import torch


def token_chunks(count: int, rows: int) -> list[tuple[int, int]]:
    """[start, end) ranges over `count` compacted rows, `rows` at a time."""
    return [(start, min(start + rows, count)) for start in range(0, count, rows)]


def pair_groups(pair_rows: list[int], rows: int) -> list[tuple[int, int, list[tuple[int, int]]]]:
    """Consecutive whole pairs packed into groups of at most `rows` compacted rows.

    Returns (first pair, end pair, [start, end) chunks of the group's rows). A group is one chunk,
    except a single pair larger than `rows`, which is cut into several: its loss is known only once
    all of them are folded, so their logits are computed again for the gradient (8 instead of 6
    FLOPs·H·V per row, memory still bounded).
    """
    groups, first, start, size = [], 0, 0, 0

    def close(end_pair):
        groups.append((first, end_pair, [(start + s, start + e) for s, e in token_chunks(size, rows)]))

    for pair, count in enumerate(pair_rows):
        if pair > first and size + count > rows:
            close(pair)
            first, start, size = pair, start + size, 0
        size += count
    if pair_rows:
        close(len(pair_rows))
    return groups


class PairOrder(NamedTuple):
    rows: torch.Tensor  # [count] flat ids of the labelled rows, pair-major
    seq: torch.Tensor  # [N] each flat row's sequence (-1: none)
    pair_rows: list  # labelled rows per pair (host ints)
    width: int  # of the [2B, width] per-token log-probs
    slots: torch.Tensor  # [count] each compacted row's flat index in those log-probs


def pair_order(labelled: torch.Tensor, seq_ids: Optional[torch.Tensor], T: int,
               two_b: int) -> PairOrder:
    """Labelled rows of padded [2B, T] input (`seq_ids` None: row r is sequence r // T) or of packed
    [N] input (`seq_ids` [N]), pair-major, each sequence's rows in order. Counting them per
    sequence is the one host sync."""
    half = two_b // 2
    seq = seq_ids if seq_ids is not None else torch.arange(labelled.numel(),
                                                           device=labelled.device) // T
    counted = labelled & (seq >= 0)
    seq_counts = torch.bincount(seq.masked_fill(~counted, two_b), minlength=two_b + 1)[:two_b]
    per_seq = seq_counts.tolist()
    found = torch.nonzero_static(counted, size=sum(per_seq)).squeeze(1)
    key = seq[found] % half * 2 + seq[found] // half  # (pair, side)
    rows = found[torch.sort(key, stable=True).indices]
    pair_rows = [per_seq[i] + per_seq[half + i] for i in range(half)]
    if seq_ids is None:  # a padded row's slot in the [2B, T] log-probs is its own place
        return PairOrder(rows, seq, pair_rows, T, rows)
    # Packed: [2B, longest], each sequence's rows in order, so that summing a row of it is as
    # deterministic as the padded sum over T.
    counts = seq_counts.view(2, half).t().reshape(-1)  # rows of each (pair, side), pair-major
    starts = counts.cumsum(0) - counts  # the compacted index of each one's first row
    row_seq = seq[rows]
    rank = torch.arange(rows.numel(), device=rows.device) - starts[row_seq % half * 2
                                                                  + row_seq // half]
    width = max(max(per_seq, default=0), 1)
    return PairOrder(rows, seq, pair_rows, width, row_seq * width + rank)
