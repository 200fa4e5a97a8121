"""Packed pair batches (spin_trainer.packing) give the padded layout's log-probs, on tiny Llama,
Mistral and Qwen2 models, and their attention keeps the generated response from the gold one and
every segment from the others; packed SFT sequences give the padded SFT batch's log-probs."""
from contextlib import nullcontext

import pytest
import torch
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM)

from spin_kernels.loss import token_logprobs
from spin_trainer.data import IGNORE_INDEX, Example, collate_pairs, collate_sft
from spin_trainer.lm_head import compacted_input, output_embedding
from spin_trainer.logprobs import Scorer
from spin_trainer.packed_attention import packed_forward
from spin_trainer.packing import GENERATED, GOLD, PROMPT, block_mask, dense_mask, pack_pairs, pack_sequences
from spin_trainer.parallel.mesh import ParallelContext

VOCAB, PAD = 61, 0
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, pad_token_id=PAD)


def packed_token_logps(model, packed, *, attention=None):
    """[M] float32 log-probs of `packed.targets` under `model`, the LM head run only on the target
    positions (the last prompt position twice), as the Scorer's "logits" head does."""
    with compacted_input(output_embedding(model), packed.targets.positions):
        logits = packed_forward(model, packed, attention=attention).logits   # [M, V]
    return token_logprobs(logits, packed.targets.labels)


def tiny_model(family, attention="sdpa", dtype=torch.float32):
    torch.manual_seed(0)
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**COMMON))
    elif family == "mistral":   # a window shorter than the pairs, so that the window rule is exercised
        model = MistralForCausalLM(MistralConfig(**COMMON, sliding_window=7))
    else:                       # layer 0 full attention, layer 1 windowed: a mask per layer type
        model = Qwen2ForCausalLM(Qwen2Config(**COMMON, use_sliding_window=True, sliding_window=7, max_window_layers=1))
    model.config._attn_implementation = attention
    return model.to(dtype).eval()


def random_pairs(seed, count=4):
    generator = torch.Generator().manual_seed(seed)

    def tokens(low, high):
        length = int(torch.randint(low, high, (1,), generator=generator))
        return torch.randint(1, VOCAB, (length,), generator=generator).tolist()

    return [(tokens(1, 9), tokens(1, 12), tokens(1, 12)) for _ in range(count)]


def padded_logps(model, pairs):
    """[2B] sums of the trainer's padded path (data.collate_pairs + logprobs.Scorer)."""
    examples = [Example(tuple(p), tuple(g)) for p, g, _ in pairs]
    batch = collate_pairs(examples, [generated for _, _, generated in pairs], PAD)
    device = model.device
    return Scorer(ParallelContext(0, 1, 1, 1, 0, 0, device)).sequence_logps(model, batch.to(device))


@torch.no_grad()
def packed_logps(model, pairs, *, share_prompt=True, attention=None):
    packed = pack_pairs(pairs, share_prompt=share_prompt).to(model.device)
    return packed.sequence_sums(packed_token_logps(model, packed, attention=attention))


def test_layout_of_one_pair():
    packed = pack_pairs([([5, 6], [7, 8, 9], [10, 11])])
    assert packed.input_ids.tolist() == [[5, 6, 7, 8, 9, 10, 11]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 4, 2, 3]]   # generated continues from the prompt
    assert packed.parts.tolist() == [PROMPT, PROMPT, GOLD, GOLD, GOLD, GENERATED, GENERATED]
    assert packed.labels.tolist() == [[IGNORE_INDEX, 7, 8, 9, IGNORE_INDEX, 11, IGNORE_INDEX]]
    assert packed.loss_mask.tolist() == [[0, 1, 1, 1, 0, 1, 0]]
    # The last prompt position (1) scores gold[0] and, a second time, generated[0].
    assert sorted(zip(packed.targets.positions.tolist(), packed.targets.labels.tolist(),
                      packed.targets.sequences.tolist())) == [(1, 7, 0), (1, 10, 1), (2, 8, 0), (3, 9, 0), (5, 11, 1)]
    allowed = dense_mask(packed)[0, 0].int().tolist()
    assert allowed[5] == [1, 1, 0, 0, 0, 1, 0]   # generated[0] sees the prompt and itself, no gold
    assert allowed[4] == [1, 1, 1, 1, 1, 0, 0]
    assert packed.segments == ((0, 7),)
    assert pack_pairs([([5], [7], [9]), ([6], [8, 8], [1])]).segments == ((0, 3), (3, 7))


def test_token_count_is_p_plus_a_plus_g():
    pairs = random_pairs(1, count=6)
    assert pack_pairs(pairs).num_tokens == sum(len(p) + len(a) + len(g) for p, a, g in pairs)
    assert pack_pairs(pairs, share_prompt=False).num_tokens == sum(2 * len(p) + len(a) + len(g) for p, a, g in pairs)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("implementation,attention", [("sdpa", "segments"), ("sdpa", "mask"), ("eager", "mask")])
def test_packed_sums_equal_padded_fp32(family, implementation, attention):
    model = tiny_model(family, implementation)
    pairs = random_pairs(2)
    want = padded_logps(model, pairs)
    torch.testing.assert_close(packed_logps(model, pairs, attention=attention), want, rtol=1e-5, atol=0)
    torch.testing.assert_close(packed_logps(model, pairs, share_prompt=False), want, rtol=1e-5, atol=0)
    assert model.config._attn_implementation == implementation   # "segments" switched it for its call only


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("precision", ["bf16 weights", "autocast"])
def test_packed_sums_bf16_within_bf16_noise(family, precision):
    """bf16 packed vs bf16 padded differ by rounding order only, the size of bf16's own noise (the
    padded bf16 sums' distance from fp32: 0.5e-4 to 2e-4 relative here). Measured on seeds 3-7 of
    all three families: at most 3.1e-5 relative with bf16 weights, 1.2e-4 under autocast, at most
    1.8x the noise; the bounds below (3x the noise, 1e-3 relative) leave margin. "autocast" is the
    trainer's --dtype bfloat16 on one process (fp32 weights, bf16 compute)."""
    pairs = random_pairs(3)
    exact = padded_logps(tiny_model(family), pairs)
    if precision == "autocast":
        model, compute = tiny_model(family), torch.autocast("cpu", dtype=torch.bfloat16)
    else:
        model, compute = tiny_model(family, dtype=torch.bfloat16), nullcontext()
    with compute:
        packed, padded = packed_logps(model, pairs), padded_logps(model, pairs)
    noise = (padded - exact).abs().max()
    assert noise > 0   # bf16 did run
    assert (packed - padded).abs().max() <= 3 * noise
    torch.testing.assert_close(packed, padded, rtol=1e-3, atol=0)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("attention", ["segments", "mask"])
def test_generated_never_sees_gold(family, attention):
    model = tiny_model(family)
    pairs = random_pairs(4, count=3)
    changed = [(p, [(t % (VOCAB - 1)) + 1 for t in g], r) for p, g, r in pairs]   # every gold token differs
    before, after = packed_logps(model, pairs, attention=attention), packed_logps(model, changed, attention=attention)
    assert torch.equal(before[3:], after[3:])            # the generated sums do not move at all
    assert not torch.allclose(before[:3], after[:3])     # the gold ones do


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("share_prompt", [True, False])
def test_a_generated_response_equal_to_the_gold_one_gets_exactly_its_sums(family, share_prompt):
    """As two identical padded rows: r(actual) − r(generated) exactly 0 (a second segment differs by
    rounding, which SPIN's acc would count as won or lost), and no token for the duplicate."""
    model = tiny_model(family)
    pairs = random_pairs(3, count=4)
    pairs = [(p, a, list(a) if i % 2 else g) for i, (p, a, g) in enumerate(pairs)]   # pairs 1 and 3: gen = gold
    got = packed_logps(model, pairs, share_prompt=share_prompt)
    assert torch.equal(got[1], got[5]) and torch.equal(got[3], got[7])
    torch.testing.assert_close(got, padded_logps(model, pairs), rtol=1e-5, atol=0)
    prompts = 1 if share_prompt else 2
    assert pack_pairs(pairs, share_prompt=share_prompt).num_tokens == sum(
        len(p) + len(a) + (0 if i % 2 else prompts * len(p) - len(p) + len(g)) for i, (p, a, g) in enumerate(pairs))


@pytest.mark.parametrize("share_prompt,attention", [(True, "segments"), (True, "mask"), (False, None)])
def test_attention_never_crosses_segments(share_prompt, attention):
    model = tiny_model("llama")
    pairs = random_pairs(5, count=3)
    changed = list(pairs)
    changed[1] = ([1] + pairs[1][0], pairs[1][1][::-1], [2] + pairs[1][2])   # pair 1 other tokens, other lengths
    before, after = (packed_logps(model, p, share_prompt=share_prompt, attention=attention) for p in (pairs, changed))
    for sequence in (0, 2, 3, 5):
        assert torch.equal(before[sequence], after[sequence])
    mask = dense_mask(pack_pairs(pairs, share_prompt=share_prompt))[0, 0]
    documents = pack_pairs(pairs, share_prompt=share_prompt).documents
    assert not (mask & (documents[:, None] != documents[None, :])).any()


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_gradients_equal_padded(family):
    model = tiny_model(family)
    pairs = random_pairs(6, count=3)
    examples = [Example(tuple(p), tuple(g)) for p, g, _ in pairs]
    batch = collate_pairs(examples, [g for _, _, g in pairs], PAD)
    scorer = Scorer(ParallelContext(0, 1, 1, 1, 0, 0, torch.device("cpu")))
    weights = torch.linspace(-1, 1, 2 * len(pairs))
    (scorer.labelled_logps(model, batch).sequence_sums() * weights).sum().backward()
    want = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    packed = pack_pairs(pairs)
    (packed.sequence_sums(packed_token_logps(model, packed)) * weights).sum().backward()
    for got, expected in zip((p.grad for p in model.parameters()), want):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


def test_block_mask_is_the_dense_rule():
    """FlexAttention's BlockMask (the GPU path) attends exactly as the dense mask does."""
    from torch.nn.attention.flex_attention import flex_attention

    packed = pack_pairs(random_pairs(7, count=5))
    n = packed.num_tokens
    q, k, v = torch.randn(3, 1, 2, n, 16).unbind(0)
    for window in (None, 5):
        want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask(packed, window))
        got = flex_attention(q, k, v, block_mask=block_mask(packed, window))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_flex_attention_through_hugging_face(family):
    """The GPU path: HF's "flex_attention" implementation takes the BlockMask as its attention_mask.
    (On the CPU the same check passes too, measured 1.2e-7 relative, but inductor's CPU compile of
    flex_attention takes ~45 s, too long for CI.)"""
    pairs = random_pairs(2)
    want = padded_logps(tiny_model(family).cuda(), pairs)
    got = packed_logps(tiny_model(family, "flex_attention").cuda(), pairs)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)


def test_unsupported_attention_needs_the_fallback():
    model = tiny_model("llama", "flash_attention_2")   # not runnable here: the error comes before the forward
    with pytest.raises(ValueError, match="share_prompt=False"):
        packed_logps(model, random_pairs(8))
    with pytest.raises(ValueError, match="share_prompt=False"):
        packed_logps(tiny_model("llama"), random_pairs(8), attention="positions")


def test_layout_of_sft_sequences():
    packed = pack_sequences([([5, 6], [7, 8]), ([9], [10]), ([4], [])])   # an empty response scores nothing
    assert packed.input_ids.tolist() == [[5, 6, 7, 8, 9, 10, 4]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 0]]
    assert packed.labels.tolist() == [[IGNORE_INDEX, 7, 8, IGNORE_INDEX, 10, IGNORE_INDEX, IGNORE_INDEX]]
    assert packed.targets.sequences.tolist() == [0, 0, 1] and packed.num_sequences == 3
    assert packed.segments == ((0, 4), (4, 6), (6, 7))
    assert dense_mask(packed)[0, 0, 4].int().tolist() == [0, 0, 0, 0, 1, 0, 0]   # nothing across documents


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("implementation,attention,share_prompt", [("sdpa", "segments", True), ("eager", "mask", True),
                                                                   ("sdpa", None, False)])
def test_packed_sft_sequences_equal_padded_fp32(family, implementation, attention, share_prompt):
    model = tiny_model(family, implementation)
    examples = [Example(tuple(p), tuple(a)) for p, a, _ in random_pairs(9, count=5)]
    scorer = Scorer(ParallelContext(0, 1, 1, 1, 0, 0, torch.device("cpu")))
    with torch.no_grad():
        want = scorer.labelled_logps(model, collate_sft(examples, PAD)).token_logps
        packed = pack_sequences([(e.prompt_ids, e.response_ids) for e in examples], share_prompt=share_prompt)
        got = packed_token_logps(model, packed, attention=attention)   # the same tokens in the same order
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_bad_pairs():
    with pytest.raises(ValueError, match="pair 1: the prompt is empty"):
        pack_pairs([([1], [2], [3]), ([], [2], [3])])
    with pytest.raises(ValueError, match="pair 0: the generated response is empty"):
        pack_pairs([([1], [2], [])])
    with pytest.raises(ValueError, match="at least one pair"):
        pack_pairs([])
