"""--pack-pairs: the Scorer's pair batches in packing.py's layout instead of padded rows.

`pair_batch` makes the micro-batches of the policy step and of the reference log-probs (the
trainer's and generation/rollouts.pair_logps'), `sft_batch` those of the SFT validation loss;
`*_tokens` count what they compute, for --max-tokens-per-batch (micro_batches.py). The Scorer
sends a PackedPairs of pairs here. Both heads
run on the gathered target positions (the last prompt position twice, packing.py): "logits" by
the padded path's own arithmetic (token_logprobs, per-sequence sums, spin_loss_from_logps), "fused"
by linear_spin_loss with `seq_ids`, so that π − ref is exactly 0 at θ_t in either layout.

Under --tp the packed forward is the padded one's: the compacted head input is taken before tensor
parallelism's input hook makes it a DTensor (lm_head.compacted_input), the attention layers see
their rank's heads with the whole row's positions and mask, and the LM head's output is this rank's
vocab shard, which both heads read vocab-parallel over the tp group (`process_group`), as the
padded path does.
"""
import torch

from spin_kernels.loss import linear_spin_loss, spin_loss_from_logps, token_logprobs

from .data import collate_pairs, collate_sft
from .errors import UsageError, option
from .lm_head import compacted_input, fused_output, output_embedding, redirected_head
from .packing import PackedPairs, pack_pairs, pack_sequences

# The families whose attention layers pass packed_attention's keyword arguments and mask through
# (tested in tests/test_packing.py).
PACKABLE_MODEL_TYPES = ("llama", "mistral", "qwen2")


def packing_layout(model, reference):
    """"shared" (one prompt for both responses) or "separate" (flash-attn: a prompt per response,
    documents told apart by position ids) for `model`; a UsageError where --pack-pairs cannot run."""
    return layout_of(model.config.model_type, model.config._attn_implementation, reference)


def layout_of(model_type, implementation, reference):
    """packing_layout of a model of `model_type` on attention `implementation` (also `--plan`'s,
    which has a config and the run's settings but no model)."""
    name = option("pack_pairs")
    if model_type not in PACKABLE_MODEL_TYPES:
        raise UsageError(f"{name}: model type {model_type!r} is not one of {PACKABLE_MODEL_TYPES}, whose "
                         f"attention takes the packed layout; drop {name}")
    if reference == "streamed":
        raise UsageError(f"{name}: {option('reference')} streamed runs its own padded forward; use another "
                         f"{option('reference')} or drop {name}")
    if implementation in ("sdpa", "eager", "flex_attention"):
        return "shared"
    if implementation == "flash_attention_2":
        return "separate"
    raise UsageError(f"{name}: attention implementation {implementation!r} cannot take packed pairs; use "
                     f"{option('attn')} sdpa or drop {name}")


def choose_packing(model, reference, requested):
    """(layout, why padded) of --pack-pairs `requested`: True packs or raises packing_layout's
    UsageError; False: (None, None); None (the default): packs where packing_layout allows, else
    (None, the reason), the part of its refusal before "; " (each reads "why; what to do")."""
    return choose_layout(model.config.model_type, model.config._attn_implementation, reference, requested)


def choose_layout(model_type, implementation, reference, requested):
    """choose_packing of a model of `model_type` on attention `implementation`."""
    if requested is False:
        return None, None
    try:
        return layout_of(model_type, implementation, reference), None
    except UsageError as refused:
        if requested:
            raise
        return None, str(refused).split("; ")[0]


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


def _policy_sums(scorer, model, packed, *, inplace_backward):
    targets = packed.targets
    with compacted_input(output_embedding(model), targets.positions):
        logits = scorer._run(model, packed)   # [M, V], under --tp this rank's vocab shard [M, V/tp]
    token_logps = token_logprobs(logits, targets.labels, process_group=scorer.ctx.tp_group,
                                 inplace_backward=inplace_backward)
    return packed.sequence_sums(token_logps)


def packed_pair_loss(scorer, model, packed, ref_logps, *, beta, loss_type):
    if scorer.head == "logits":
        policy = _policy_sums(scorer, model, packed, inplace_backward=True)
        return spin_loss_from_logps(policy, ref_logps, beta=beta, loss_type=loss_type)
    targets, results = packed.targets, []

    def compute(hidden, weight, bias):   # hidden [M, H]: the target positions
        out = linear_spin_loss(hidden, weight, targets.labels, ref_logps, bias=bias, seq_ids=targets.sequences,
                               num_sequences=packed.num_sequences, beta=beta, loss_type=loss_type,
                               process_group=scorer.ctx.tp_group)
        results.append(out)
        return out.loss.reshape(1)

    head = output_embedding(model)
    with compacted_input(head, targets.positions), redirected_head(head, scorer.ctx, compute) as produced:
        loss = fused_output(model, produced, scorer._run(model, packed))
    return results[0]._replace(loss=loss[0])


@torch.no_grad()
def packed_sequence_logps(scorer, model, packed):
    if scorer.head == "logits":
        return _policy_sums(scorer, model, packed, inplace_backward=False)
    unused = torch.zeros(packed.num_sequences, device=packed.input_ids.device)
    return packed_pair_loss(scorer, model, packed, unused, beta=1.0, loss_type="sigmoid").policy_logps
