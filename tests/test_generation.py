"""spin_trainer.generation: batched generation equals Hugging Face generate(), stops and caps right,
is reproducible from its seed, and rejects bad prompts by index."""

import warnings
from dataclasses import replace

import pytest
import torch

transformers = pytest.importorskip("transformers")

from spin_trainer.generation.decode import (
    GenerationStats,
    SamplingConfig,
    choose_backend,
    generate_responses,
    sample_next_tokens,
)
from spin_trainer.model import build_tiny_llama

VOCAB = 97
PAD = 0


def tiny_llama(seed: int = 0, *, kv_heads: int = 2, dtype=torch.float32, device="cpu"):
    # A wide init spreads the logits, so greedy choices are not decided by rounding noise.
    return build_tiny_llama(VOCAB, num_kv_heads=kv_heads, max_position_embeddings=256, initializer_range=0.3,
                            seed=seed, dtype=dtype, device=device).eval()


# Lengths 1..11, unsorted, so batches of 2 mix lengths (padding) and sorting reorders them.
PROMPTS = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9], [10], [40, 41, 42, 43, 44], [3] * 11, [90, 12]]


def hf_greedy(model, prompt, max_new_tokens, eos_token_id=None, min_new_tokens=0):
    """The oracle: Hugging Face greedy decoding of one unpadded prompt."""
    ids = torch.tensor([prompt], device=model.device)
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        min_new_tokens=min_new_tokens,
        do_sample=False,
        pad_token_id=PAD,
        eos_token_id=eos_token_id,
    )
    return out[0, len(prompt):].tolist()


def generate(model, prompts, sampling, *, eos=-1, max_length=64, batch_size=2, backend="static", stats=None,
             example_ids=None):
    return generate_responses(
        model, prompts, sampling, eos_token_id=eos, pad_token_id=PAD, max_length=max_length,
        batch_size=batch_size, progress=False, backend=backend, stats=stats, example_ids=example_ids,
    )


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@pytest.fixture(scope="module")
def greedy_reference(model):
    return [hf_greedy(model, p, 12) for p in PROMPTS]


@pytest.mark.parametrize("backend", ["static", "hf"])
@pytest.mark.parametrize("batch_size", [2, 64])
def test_greedy_equals_hf_generate(model, greedy_reference, backend, batch_size):
    stats = GenerationStats()
    got = generate(model, PROMPTS, SamplingConfig(max_new_tokens=12, do_sample=False), batch_size=batch_size, backend=backend, stats=stats)
    assert got == greedy_reference
    assert stats.backend == backend
    assert stats.new_tokens == 12 * len(PROMPTS)
    assert stats.batches == -(-len(PROMPTS) // batch_size)


def test_greedy_equals_hf_generate_multi_query_attention():
    mqa = tiny_llama(seed=3, kv_heads=1)
    expected = [hf_greedy(mqa, p, 7) for p in PROMPTS]
    assert generate(mqa, PROMPTS, SamplingConfig(max_new_tokens=7, do_sample=False), batch_size=4) == expected


@pytest.mark.parametrize("family", ["qwen2", "mistral", "llama3_rope"])
def test_static_decoder_equals_hf_generate_on_other_llama_family_models(family):
    shape = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.3)
    config = {
        "qwen2": lambda: transformers.Qwen2Config(**shape),  # q/k/v projections with bias
        "mistral": lambda: transformers.MistralConfig(sliding_window=None, **shape),
        "llama3_rope": lambda: transformers.LlamaConfig(rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64}, **shape),
    }[family]()
    torch.manual_seed(0)
    other = transformers.AutoModelForCausalLM.from_config(config).eval()
    stats = GenerationStats()
    got = generate(other, PROMPTS, SamplingConfig(max_new_tokens=10, do_sample=False), batch_size=4, stats=stats)
    assert stats.backend == "static"
    assert got == [hf_greedy(other, p, 10) for p in PROMPTS]


@pytest.mark.parametrize("backend", ["static", "hf"])
def test_eos_ends_each_response_and_is_included(model, greedy_reference, backend):
    # Pick a token that greedy decoding produces in the middle of some response.
    eos = greedy_reference[1][4]
    got = generate(model, PROMPTS, SamplingConfig(max_new_tokens=12, do_sample=False), eos=eos, backend=backend)
    for reference, response in zip(greedy_reference, got):
        if eos in reference:
            assert response == reference[: reference.index(eos) + 1]
        else:
            assert response == reference
    assert got[1][-1] == eos and len(got[1]) <= 5
    # The oracle agrees when told the same EOS.
    assert got == [hf_greedy(model, p, 12, eos_token_id=eos) for p in PROMPTS]


@pytest.mark.parametrize("backend", ["static", "hf"])
def test_every_eos_id_of_a_list_ends_a_response(model, greedy_reference, backend):
    eos = [greedy_reference[1][4], greedy_reference[3][2]]
    assert eos[0] != eos[1]
    got = generate(model, PROMPTS, SamplingConfig(max_new_tokens=12, do_sample=False), eos=eos, backend=backend)
    assert got == [hf_greedy(model, p, 12, eos_token_id=eos) for p in PROMPTS]
    assert got[1][-1] == eos[0] and got[3][-1] == eos[1]
    # Truncated: cut at the cap (12 tokens) without an EOS at the end; an EOS ended the others.
    assert got.truncated == [r[-1] not in eos for r in got]
    assert all(len(r) == 12 for r, cut in zip(got, got.truncated) if cut)


@pytest.mark.parametrize("backend", ["static", "hf"])
def test_a_response_ends_at_its_first_eos_when_the_model_repeats_it(backend):
    # Zero logits: greedy draws token 0 at every step, so the EOS comes again right after the first.
    flat = tiny_llama()
    with torch.no_grad():
        flat.lm_head.weight.zero_()
    got = generate_responses(flat, PROMPTS, SamplingConfig(max_new_tokens=8, do_sample=False), eos_token_id=0,
                             pad_token_id=5, max_length=64, batch_size=4, progress=False, backend=backend)
    assert list(got) == [[0]] * len(PROMPTS) and got.truncated == [False] * len(PROMPTS)


def test_eos_at_the_length_cap_is_not_truncated(model, greedy_reference):
    eos = greedy_reference[0][4]
    cap = greedy_reference[0].index(eos) + 1
    got = generate(model, PROMPTS, SamplingConfig(max_new_tokens=cap, do_sample=False), eos=eos)
    assert got[0] == greedy_reference[0][:cap] and not got.truncated[0]
    for reference, response, cut in zip(greedy_reference, got, got.truncated):
        assert cut == (eos not in reference[:cap])
        assert response == (reference[:cap] if cut else reference[:reference.index(eos) + 1])


@pytest.mark.parametrize("backend", ["static", "hf"])
def test_a_stop_sequence_ends_a_response_and_is_kept(model, greedy_reference, backend):
    stop = greedy_reference[1][2:4]
    got = generate(model, PROMPTS, SamplingConfig(max_new_tokens=12, do_sample=False, stop_sequences=[stop]),
                   backend=backend)
    for reference, response, cut in zip(greedy_reference, got, got.truncated):
        ends = [i + 2 for i in range(len(reference) - 1) if reference[i:i + 2] == stop]
        assert response == reference[:ends[0]] if ends else response == reference
        assert cut == (not ends)
    assert got[1] == greedy_reference[1][:4]


@pytest.mark.parametrize("backend", ["static", "hf"])
def test_min_new_tokens_masks_eos_and_stop_ids_like_hf(model, greedy_reference, backend):
    eos = greedy_reference[1][1]
    sampling = SamplingConfig(max_new_tokens=12, min_new_tokens=3, do_sample=False)
    got = generate(model, PROMPTS, sampling, eos=eos, backend=backend)
    assert got == [hf_greedy(model, p, 12, eos_token_id=eos, min_new_tokens=3) for p in PROMPTS]
    assert got[1] != greedy_reference[1][:2] and all(len(r) > 3 for r in got)
    # A one-token stop sequence is an extra EOS id: masked the same way.
    as_stop = replace(sampling, stop_sequences=[[eos]])
    assert generate(model, PROMPTS, as_stop, backend=backend) == got


def test_a_prompt_samples_the_same_response_in_any_batch_and_order(model):
    sampling = SamplingConfig(max_new_tokens=16, temperature=1.2, top_p=0.95, seed=3)
    everything = generate(model, PROMPTS, sampling, batch_size=len(PROMPTS))
    for batch_size in (1, 3):
        assert generate(model, PROMPTS, sampling, batch_size=batch_size) == everything
    order = [4, 1, 5, 0, 3, 2]
    shuffled = generate(model, [PROMPTS[i] for i in order], sampling, batch_size=4, example_ids=order)
    assert shuffled == [everything[i] for i in order]
    # A data-parallel shard (examples 2..4 of the dataset, as rank 1 of 2 would get them) too.
    assert generate(model, PROMPTS[2:5], sampling, example_ids=[2, 3, 4]) == everything[2:5]
    # Without the dataset indices the same prompts are other examples: other draws.
    assert generate(model, PROMPTS[2:5], sampling) != everything[2:5]


def test_example_ids_must_fit_the_prompts(model):
    sampling = SamplingConfig(max_new_tokens=2)
    with pytest.raises(ValueError, match="example_ids must hold one int >= 0 per prompt"):
        generate(model, PROMPTS[:2], sampling, example_ids=[0])
    with pytest.raises(ValueError, match="example_ids"):
        generate(model, PROMPTS[:2], sampling, example_ids=[0, -1])
    with pytest.raises(TypeError, match="eos_token_id must be an int or a list of ints"):
        generate(model, PROMPTS[:2], sampling, eos=[1, "2"])


def test_pad_equal_to_eos_is_handled(model, greedy_reference):
    eos = greedy_reference[0][2]
    got = generate_responses(
        model, PROMPTS, SamplingConfig(max_new_tokens=12, do_sample=False),
        eos_token_id=eos, pad_token_id=eos, max_length=64, batch_size=3, progress=False, backend="static",
    )
    for reference, response in zip(greedy_reference, got):
        assert response == (reference[: reference.index(eos) + 1] if eos in reference else reference)


@pytest.mark.parametrize("backend", ["static", "hf"])
def test_length_capped_by_context_left(model, greedy_reference, backend):
    max_length = 16  # prompts of 11 and 9 tokens leave 5 and 7
    got = generate(model, PROMPTS, SamplingConfig(max_new_tokens=12, do_sample=False), max_length=max_length, backend=backend)
    for prompt, reference, response in zip(PROMPTS, greedy_reference, got):
        cap = min(12, max_length - len(prompt))
        assert len(response) == cap
        assert response == reference[:cap]


def test_max_new_tokens_caps_sampled_responses(model):
    got = generate(model, PROMPTS, SamplingConfig(max_new_tokens=3, seed=1))
    assert [len(r) for r in got] == [3] * len(PROMPTS)
    assert all(0 <= t < VOCAB for r in got for t in r)


def test_sampling_is_deterministic_for_a_seed(model):
    sampling = SamplingConfig(max_new_tokens=20, temperature=1.3, top_p=0.95, seed=7)
    first = generate(model, PROMPTS, sampling)
    assert generate(model, PROMPTS, sampling) == first
    # Other global RNG activity must not matter: the noise is a hash, not an RNG stream.
    torch.manual_seed(12345)
    torch.rand(100)
    assert generate(model, PROMPTS, sampling) == first
    assert generate(model, PROMPTS, SamplingConfig(max_new_tokens=20, temperature=1.3, top_p=0.95, seed=8)) != first
    # Both decoders see the same logits and the same noise, so they draw the same tokens.
    assert generate(model, PROMPTS, sampling, backend="hf") == first


def test_top_k_one_equals_greedy(model, greedy_reference):
    got = generate(model, PROMPTS, SamplingConfig(max_new_tokens=12, temperature=0.7, top_k=1, seed=3))
    assert got == greedy_reference


def test_sample_next_tokens_respects_top_k_top_p_and_frequencies():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])
    logits = probs.log().expand(40000, 4).contiguous()
    examples, step = torch.arange(40000), torch.tensor(0)
    counts = lambda tokens: torch.bincount(tokens, minlength=4).double() / tokens.numel()  # noqa: E731
    # Full distribution: frequencies within 5 standard errors (≤ 0.0125) of the probabilities.
    full = counts(sample_next_tokens(logits, SamplingConfig(max_new_tokens=1), examples, step))
    assert torch.allclose(full, probs.double(), atol=0.0125)
    # top_p=0.7 keeps {1, 3} (0.5 + 0.3 reaches 0.7), renormalised to 0.625 / 0.375.
    nucleus = counts(sample_next_tokens(logits, SamplingConfig(max_new_tokens=1, top_p=0.7), examples, step))
    assert nucleus[0] == 0 and nucleus[2] == 0
    assert abs(nucleus[1] - 0.625) < 0.0125
    # top_k=3 drops the least likely token only.
    top3 = counts(sample_next_tokens(logits, SamplingConfig(max_new_tokens=1, top_k=3), examples, step))
    assert top3[0] == 0 and abs(top3[2] - 0.15 / 0.95) < 0.0125
    # A low temperature sharpens towards the mode.
    cold = counts(sample_next_tokens(logits, SamplingConfig(max_new_tokens=1, temperature=0.25), examples, step))
    assert cold[1] > 0.85


def test_bad_prompts_are_named_by_index(model):
    sampling = SamplingConfig(max_new_tokens=4)
    with pytest.raises(ValueError, match=r"prompts\[2\].*max_length=10"):
        generate(model, [[1, 2], [3], list(range(1, 11))], sampling, max_length=10)
    with pytest.raises(ValueError, match=r"prompts\[1\] is empty"):
        generate(model, [[1], []], sampling)
    with pytest.raises(ValueError, match=r"prompts\[0\].*vocabulary"):
        generate(model, [[1, VOCAB]], sampling)
    with pytest.raises(TypeError, match=r"prompts\[0\]"):
        generate(model, [["a", "b"]], sampling)
    with pytest.raises(ValueError, match="pad_token_id"):
        generate_responses(model, [[1]], sampling, eos_token_id=2, pad_token_id=VOCAB, max_length=8, progress=False)
    with pytest.raises(ValueError, match="backend"):
        generate(model, [[1]], sampling, backend="fast")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": 4, "temperature": 0.0}, "temperature"),
        ({"max_new_tokens": 4, "top_p": 0.0}, "top_p"),
        ({"max_new_tokens": 4, "top_k": -1}, "top_k"),
    ],
)
def test_bad_sampling_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingConfig(**kwargs)


def test_empty_prompt_list_and_training_mode_restored(model):
    model.train()
    try:
        assert generate(model, [], SamplingConfig(max_new_tokens=2)) == []
        generate(model, [[1, 2]], SamplingConfig(max_new_tokens=2))
        assert model.training
    finally:
        model.eval()


def test_backend_choice_on_cpu(model):
    assert choose_backend(model, "auto", torch.device("cpu")) == ("static", [])
    assert choose_backend(model, "auto", torch.device("cuda")) == ("cuda_graph", [])
    backend, reasons = choose_backend(model, "cuda_graph", torch.device("cpu"))
    assert backend == "static" and "CUDA" in reasons[0]
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2))
    backend, reasons = choose_backend(gpt2, "static", torch.device("cpu"))
    assert backend == "hf" and "gpt2" in reasons[0]
    assert choose_backend(gpt2, "auto", torch.device("cpu")) == ("hf", [])


def test_hf_backend_runs_another_architecture_without_warnings():
    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2, initializer_range=0.3)
    ).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = generate(gpt2, PROMPTS[:3], SamplingConfig(max_new_tokens=5, do_sample=False), backend="hf")
    expected = [
        gpt2.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long), max_new_tokens=5,
                      do_sample=False, pad_token_id=PAD, eos_token_id=None)[0, len(p):].tolist()
        for p in PROMPTS[:3]
    ]
    assert got == expected


def test_failed_graph_capture_falls_back_to_eager_with_a_warning(model, greedy_reference, monkeypatch):
    import spin_trainer.generation.decode as generation
    from spin_trainer.generation.static_decoder import StaticKVDecoder

    def refuse_capture(self):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(StaticKVDecoder, "_capture", refuse_capture)
    monkeypatch.setattr(generation, "choose_backend", lambda model, backend, device: ("cuda_graph", []))
    stats = GenerationStats()
    with pytest.warns(RuntimeWarning, match="capture of the decode step failed"):
        got = generate(model, PROMPTS, SamplingConfig(max_new_tokens=12, do_sample=False), stats=stats)
    assert got == greedy_reference
    assert stats.backend == "static" and stats.fallback_reasons == ["CUDA graph capture failed"]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_decoder_matches_eager_and_hf():
    gpu = tiny_llama(dtype=torch.float32, device="cuda")
    greedy = SamplingConfig(max_new_tokens=40, do_sample=False)
    stats = GenerationStats()
    graphed = generate(gpu, PROMPTS, greedy, batch_size=4, backend="cuda_graph", stats=stats)
    assert stats.backend == "cuda_graph" and stats.captures >= 1, stats
    assert graphed == generate(gpu, PROMPTS, greedy, batch_size=4, backend="static")
    assert graphed == [hf_greedy(gpu, p, 40) for p in PROMPTS]
    sampling = SamplingConfig(max_new_tokens=40, top_p=0.9, seed=5)
    assert generate(gpu, PROMPTS, sampling, backend="cuda_graph") == generate(gpu, PROMPTS, sampling, backend="static")
    bf16 = tiny_llama(dtype=torch.bfloat16, device="cuda")
    stats = GenerationStats()
    responses = generate_responses(bf16, PROMPTS, SamplingConfig(max_new_tokens=30, seed=1), eos_token_id=-1,
                                   pad_token_id=PAD, max_length=64, progress=False, stats=stats)
    assert stats.backend == "cuda_graph" and [len(r) for r in responses] == [30] * len(PROMPTS)
