"""--pack-pairs: the layout of the Scorer's pair and SFT batches, packing.py's instead of padded rows.

`choose_packing` picks the layout once per run; `pair_batch` makes the micro-batches of the policy
step and of the reference log-probs (the trainer's and generation/rollouts.pair_logps'),
`sft_batch` those of the SFT validation loss; `*_tokens` count what they compute, for
--max-tokens-per-batch (micro_batches.py). logprobs.Scorer scores either layout.
"""
from .data import collate_pairs, collate_sft
from .errors import UsageError, option
from .packing import PackedPairs, pack_pairs, pack_sequences

# The families whose attention layers pass packed_attention's keyword arguments and mask through
# (tested in tests/test_packing.py).
PACKABLE_MODEL_TYPES = ("llama", "mistral", "qwen2")


def packing_layout(model, reference):
    """"shared" (one prompt for both responses) or "separate" (flash-attn: a prompt per response,
    documents told apart by position ids) for `model`; a UsageError where --pack-pairs cannot run."""
    return choose_packing(model, reference, True)[0]


def choose_packing(model, reference, requested):
    """(layout, why padded) of --pack-pairs `requested`: True packs or raises packing_layout's
    UsageError; False: (None, None); None (the default): packs where packing_layout allows, else
    (None, the reason), the part of its refusal before "; " (each reads "why; what to do")."""
    return choose_layout(model.config.model_type, model.config._attn_implementation, reference, requested)


def choose_layout(model_type, implementation, reference, requested):
    """choose_packing of a model of `model_type` on attention `implementation` (also `--plan`'s,
    which has a config and the run's settings but no model)."""
    if requested is False:
        return None, None
    name = option("pack_pairs")
    if model_type not in PACKABLE_MODEL_TYPES:
        refusal = (f"{name}: model type {model_type!r} is not one of {PACKABLE_MODEL_TYPES}, whose attention takes "
                   f"the packed layout; drop {name}")
    elif reference == "streamed":
        refusal = (f"{name}: {option('reference')} streamed runs its own padded forward; use another "
                   f"{option('reference')} or drop {name}")
    elif implementation in ("sdpa", "eager", "flex_attention"):
        return "shared", None
    elif implementation == "flash_attention_2":
        return "separate", None
    else:
        refusal = (f"{name}: attention implementation {implementation!r} cannot take packed pairs; use "
                   f"{option('attn')} sdpa or drop {name}")
    if requested:
        raise UsageError(refusal)
    return None, refusal.split("; ")[0]


def _packs(generated, packing):
    return packing is not None and all(len(g) for g in generated)


def pair_batch(examples, generated, pad_token_id, packing):
    """The pair batch of `examples` and their `generated` responses: padded (data.collate_pairs)
    when `packing` is None or a response is empty (a packed response needs a token), else packed."""
    if not _packs(generated, packing):
        return collate_pairs(examples, generated, pad_token_id)
    return pack_pairs([(e.prompt_ids, e.response_ids, g) for e, g in zip(examples, generated)],
                      share_prompt=packing == "shared")


def pair_batch_tokens(examples, generated, packing):
    """Tokens that pair_batch(examples, generated, ..., packing) computes: the packed row's length
    (a prompt per response without sharing), or 2b padded rows x the longest."""
    if not _packs(generated, packing):
        return 2 * len(examples) * max(len(e.prompt_ids) + max(len(e.response_ids), len(g))
                                       for e, g in zip(examples, generated))
    # A generated response equal to the gold one adds no token (packing.pack_pairs scores the gold rows again).
    return sum(len(e.prompt_ids) + len(e.response_ids) + (0 if list(g) == list(e.response_ids) else
                                                           len(g) + len(e.prompt_ids) * (packing == "separate"))
               for e, g in zip(examples, generated))


def sft_batch(examples, pad_token_id, packing):
    """The SFT batch of `examples` ([prompt | gold] each): padded (data.collate_sft) when `packing`
    is None, else one packed row, a document per example (packing.pack_sequences)."""
    if packing is None:
        return collate_sft(examples, pad_token_id)
    return pack_sequences([(e.prompt_ids, e.response_ids) for e in examples], share_prompt=packing == "shared")


def sft_batch_tokens(examples, packing):
    """Tokens that sft_batch(examples, ..., packing) computes."""
    lengths = [len(e.prompt_ids) + len(e.response_ids) for e in examples]
    return sum(lengths) if packing is not None else len(lengths) * max(lengths)


def sequence_tokens(batch):
    """Tokens of the batch's 2b sequences, a shared prompt counted in both: the padded batch's
    real tokens in either layout (the `tokens` metric does not depend on --pack-pairs)."""
    if not isinstance(batch, PackedPairs):
        return batch.attention_mask.sum()
    return batch.input_ids.new_full((), batch.sequence_tokens)   # filled on the device: no host copy
