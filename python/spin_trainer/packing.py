"""Packed pair micro-batches: every token once, each prompt shared by its two responses.

A micro-batch of B pairs (prompt, gold response, generated response) becomes one flat row [1, N]
of segments `[prompt | gold | generated]`, with no padding. Each token keeps the position it has
in its padded row (`data.collate_pairs`): the generated tokens continue from the prompt's end.
Attention is causal within a segment, never crosses segments, and the generated tokens never see
the gold ones, so every response token sees exactly what it sees in its padded row.

Labels follow data.py's alignment: `labels[t]` is token t + 1 of t's sequence. The last prompt
token has two next tokens: `labels` holds gold[0], and generated[0] is scored from the same
position's output a second time. The scorer reads the flat `targets` (positions, labels,
sequences), where that position appears twice: the LM head runs on the gathered [M, H] hidden
states, so the duplicate costs one head row and no token in any layer (a duplicated query token
would cost a token in every layer and a mask exception), and the backward sums both rows'
gradients into that position. A generated response equal to the gold one gets no segment: its
targets are the gold response's, so both sums are the same numbers added in the same order and
their difference is exactly 0 (as with two identical padded rows).

Sequence ids: pair i's gold response is sequence i, its generated one B + i (`spin_loss`'s row
order); per-sequence sums are `sums_by_index` over `targets.sequences`, with no host sync.

Attention: `attention_rule` is the one definition of who sees whom; `dense_mask` and `block_mask`
(FlexAttention) are its two forms, which packed_attention.py hands to Hugging Face models. The
fallback without a custom mask is `share_prompt=False`: `[prompt | gold]` and `[prompt | generated]`
as separate documents whose position ids restart at 0. `pack_sequences` packs SFT sequences
`[prompt | response]` the same way, a document each.
"""
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch

from spin_kernels.loss.packed import sums_by_index

from .data import IGNORE_INDEX

PROMPT, GOLD, GENERATED = 0, 1, 2


class Targets(NamedTuple):
    """The scored tokens of a packed batch, flat [M]: the position whose output scores each, its
    label, and its sequence (i gold, B + i generated)."""
    positions: torch.Tensor
    labels: torch.Tensor
    sequences: torch.Tensor


@dataclass(frozen=True)
class PackedPairs:
    input_ids: torch.Tensor      # [1, N]
    position_ids: torch.Tensor   # [1, N] each token's position in its own padded row
    documents: torch.Tensor      # [N] segment of each token; attention never crosses segments
    parts: torch.Tensor          # [N] PROMPT, GOLD or GENERATED
    labels: torch.Tensor         # [1, N] token t + 1 of t's sequence where loss_mask is 1, else IGNORE_INDEX
    loss_mask: torch.Tensor      # [1, N] float, 1 where labels score a response token
    targets: Targets             # every scored token, the first generated ones included
    num_sequences: int           # 2B
    share_prompt: bool
    segments: tuple              # (start, end) of each document, host ints (no sync to slice by them)
    sequence_tokens: int         # tokens of the 2B sequences [prompt | response], each prompt in both

    @property
    def num_tokens(self):
        return self.input_ids.shape[1]

    def to(self, device):
        moved = {name: value.to(device) for name, value in vars(self).items() if isinstance(value, torch.Tensor)}
        return replace(self, **moved, targets=Targets(*(t.to(device) for t in self.targets)))

    def sequence_sums(self, token_logps):
        """[2B] float32 sums of `token_logps` ([M], in `targets` order), differentiable."""
        return sums_by_index(token_logps, self.targets.sequences, self.num_sequences)


def _document(prompt, response, document, part, sequence):
    """The tokens of `[prompt | response]` as one document whose labels score the response, each a row
    (id, position, document, part, label, the sequence its label scores)."""
    tokens, cut = list(prompt) + list(response), len(prompt)
    return [(token, t, document, PROMPT if t < cut else part,
             tokens[t + 1] if cut - 1 <= t < len(tokens) - 1 else IGNORE_INDEX, sequence)
            for t, token in enumerate(tokens)]


def _packed(rows, extra, num_sequences, share_prompt, sequence_tokens):
    """The PackedPairs of `_document` rows; `extra`: (position, label, sequence) of each token scored
    a second time, after the row's."""
    ids, positions, documents, parts, labels, scores = (torch.tensor(column, dtype=torch.long) for column in zip(*rows))
    scored = (labels != IGNORE_INDEX).nonzero().squeeze(1)
    targets = [scored, labels[scored], scores[scored]]
    if extra:
        targets = [torch.cat([t, more]) for t, more in zip(targets, torch.tensor(extra, dtype=torch.long).T)]
    starts = [t for t in range(len(rows)) if t == 0 or rows[t][2] != rows[t - 1][2]]
    return PackedPairs(input_ids=ids[None], position_ids=positions[None], documents=documents, parts=parts,
                       labels=labels[None], loss_mask=(labels != IGNORE_INDEX).float()[None],
                       targets=Targets(*targets), num_sequences=num_sequences, share_prompt=share_prompt,
                       segments=tuple(zip(starts, starts[1:] + [len(rows)])), sequence_tokens=sequence_tokens)


def pack_pairs(pairs, *, share_prompt=True):
    """A PackedPairs of `pairs`, a list of (prompt_ids, gold_ids, generated_ids) token sequences.

    share_prompt=False is the fallback without a custom mask: each response gets its own copy of
    the prompt, as its own document."""
    if not pairs:
        raise ValueError("pack_pairs needs at least one pair")
    count, rows, extra = len(pairs), [], []
    for i, (prompt, gold, generated) in enumerate(pairs):
        prompt, gold, generated = list(prompt), list(gold), list(generated)
        if not prompt:
            raise ValueError(f"pair {i}: the prompt is empty (a response is scored from the prompt's last token)")
        for name, response in (("gold", gold), ("generated", generated)):
            if not response:
                raise ValueError(f"pair {i}: the {name} response is empty")
        rows += _document(prompt, gold, i if share_prompt else 2 * i, GOLD, i)
        last_prompt = len(rows) - len(gold) - 1
        if generated == gold:   # no segment: the gold rows scored again as sequence B + i, in the same order
            extra += [(last_prompt + k, token, count + i) for k, token in enumerate(gold)]
        elif share_prompt:   # the same document, after the gold tokens; its first token scored from the prompt's last
            extra.append((last_prompt, generated[0], count + i))
            rows += _document(prompt, generated, i, GENERATED, count + i)[len(prompt):]
        else:
            rows += _document(prompt, generated, 2 * i + 1, GENERATED, count + i)
    sequence_tokens = sum(2 * len(p) + len(a) + len(g) for p, a, g in pairs)
    return _packed(rows, extra, 2 * count, share_prompt, sequence_tokens)


def pack_sequences(sequences, *, share_prompt=True):
    """A PackedPairs of SFT `sequences`, a list of (prompt_ids, response_ids): `[prompt | response]`
    as document i, its response sequence i, no padding (the SFT validation loss). `share_prompt`
    chooses only how attention keeps the documents apart (True: attention_rule's mask; False:
    position ids, for flash-attn)."""
    if not sequences:
        raise ValueError("pack_sequences needs at least one sequence")
    rows = []
    for i, (prompt, response) in enumerate(sequences):
        if len(prompt) < 1:
            raise ValueError(f"sequence {i}: the prompt is empty (a response is scored from the prompt's last token)")
        rows += _document(prompt, response, i, GOLD, i)
    return _packed(rows, [], len(sequences), share_prompt, sum(len(p) + len(r) for p, r in sequences))


def attention_rule(packed, sliding_window=None):
    """rule(q, kv) -> bool tensor: may query token q attend to key token kv? Works on broadcast
    index tensors (the dense mask) and inside FlexAttention's mask_mod alike."""
    documents, parts, positions = packed.documents, packed.parts, packed.position_ids[0]

    def rule(q, kv):
        allowed = (documents[q] == documents[kv]) & (kv <= q)
        allowed = allowed & ~((parts[q] == GENERATED) & (parts[kv] == GOLD))
        if sliding_window is not None:   # HF's window: kv > q - window, on the padded row's positions
            allowed = allowed & (positions[q] - positions[kv] < sliding_window)
        return allowed

    return rule


def dense_mask(packed, sliding_window=None, span=None):
    """[1, 1, N, N] bool, True where attention is allowed; the [L, L] block of tokens [start, end)
    with `span=(start, end)`."""
    start, end = span or (0, packed.num_tokens)
    index = torch.arange(start, end, device=packed.input_ids.device)
    return attention_rule(packed, sliding_window)(index[:, None], index[None, :])[None, None]


def block_mask(packed, sliding_window=None):
    from torch.nn.attention.flex_attention import create_block_mask

    rule = attention_rule(packed, sliding_window)
    n = packed.num_tokens
    return create_block_mask(lambda b, h, q, kv: rule(q, kv), None, None, n, n, device=packed.input_ids.device)
