"""--pack-pairs: the trainer's policy step and reference log-probs on packed pair batches (packing.py)
equal the padded ones in fp32 (loss, metrics, updated weights, reference log-probs), with either
head and in both packed layouts; a whole 1-iteration run equals the padded run; where packing
cannot run, the setting is refused naming it."""
import os
from dataclasses import replace
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import transformers

from trainer_cases import assert_runs_match, fixed_pairs, free_port, independent_logps, metric_records, \
    step_trainer, tiny_setup, train_args, torch_cat_pairs

import spin_trainer.packed_scoring as packed_scoring
from spin_trainer import cli as train_cli
from spin_trainer.errors import UsageError
from spin_trainer.evaluate import sft_loss
from spin_trainer.generation.rollouts import pair_logps
from spin_trainer.logprobs import Scorer
from spin_trainer.model import load_model, load_tokenizer
from spin_trainer.packed_scoring import choose_packing, packing_layout, pair_batch, sequence_tokens
from spin_trainer.packing import PackedPairs
from spin_trainer.parallel.apply import decoder_layers
from spin_trainer.parallel.mesh import ParallelContext
from spin_trainer.parallel.precision import Precision
from spin_trainer.parallel.recompute import apply_recompute

CTX = ParallelContext(0, 1, 1, 1, 0, 0, torch.device("cpu"))
PAIRS, MICRO = 8, 4
UNTIMED = ("step_time", "tokens_per_second")
# AdamW's first step is lr·g/(|g| + eps): with the default eps a gradient element near 1e-8 turns
# its rounding into the update's size; eps 1e-4 keeps the update a well-conditioned function of g.
EXTRA = ["--adam-eps", "1e-4"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_setup(str(tmp_path_factory.mktemp("packed")), train=8, val=4, test=4)


@pytest.fixture(scope="module")
def pairs(tiny):
    tokenizer = load_tokenizer(tiny[0])
    return tokenizer, *fixed_pairs(tokenizer, PAIRS)


def _step(model_dir, pairs, head, packing, recompute="none"):
    """(metrics, precomputed reference [P, 2], per-batch reference [2P], gradients, weights after one
    step)."""
    tokenizer, examples, generated = pairs
    pad = tokenizer.pad_token_id
    model = load_model(model_dir)
    apply_recompute(decoder_layers(model), recompute)
    scorer = Scorer(CTX, Precision(), head)
    trainer = step_trainer(model, scorer, pairs=PAIRS, lr=1e-3, beta=0.5, micro_batch_size=MICRO,
                           extra=EXTRA + (["--pack-pairs"] if packing else ["--no-pack-pairs"]))
    assert scorer.packing == ("shared" if packing else None)
    scorer.packing = packing   # "separate": flash-attn's layout, run here through sdpa and position ids
    precomputed = pair_logps(model, examples, generated, scorer, micro_batch_size=3, pad_token_id=pad)
    batches = [pair_batch(examples[i:i + MICRO], generated[i:i + MICRO], pad, packing) for i in range(0, PAIRS, MICRO)]
    assert all(isinstance(batch, PackedPairs) == bool(packing) for batch in batches)
    per_batch = torch.cat([scorer.sequence_logps(model, batch) for batch in batches])   # swap and resident modes
    # A reference away from θ_t, so that rewards, margins and accuracy are not all 0.
    reference = precomputed + torch.randn(PAIRS, 2, generator=torch.Generator().manual_seed(0))
    items = [(batch, torch_cat_pairs(reference[i:i + MICRO]), sum(map(len, generated[i:i + MICRO])))
             for batch, i in zip(batches, range(0, PAIRS, MICRO))]
    grads = {}
    hook = trainer.optimizer.register_step_pre_hook(
        lambda *_: grads.update({n: p.grad.clone() for n, p in model.named_parameters()}))
    metrics = {k: v for k, v in trainer.train_step(iter(items)).items() if k not in UNTIMED}
    hook.remove()
    return metrics, precomputed, per_batch, grads, {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("head,layout,recompute", [
    ("logits", "shared", "none"), ("fused", "shared", "none"), ("logits", "separate", "none"),
    ("fused", "separate", "none"),
    # The backward recomputes each layer's packed attention (the paper recipe's gradient checkpointing).
    ("logits", "shared", "full"), ("fused", "shared", "elementwise")])
def test_packed_step_equals_the_padded_step(tiny, pairs, head, layout, recompute):
    want_metrics, want_pre, want_batch, want_grads, want_weights = _step(tiny[0], pairs, head, None)
    got_metrics, got_pre, got_batch, got_grads, got_weights = _step(tiny[0], pairs, head, layout, recompute)
    assert got_metrics.keys() == want_metrics.keys()
    for key, value in want_metrics.items():
        assert got_metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    assert want_metrics["rewards_all_std"] > 0.1 and 0 < want_metrics["acc"] < 1   # the step has teeth
    torch.testing.assert_close(got_pre, want_pre, rtol=1e-5, atol=0)
    torch.testing.assert_close(got_batch, want_batch, rtol=1e-5, atol=0)
    initial = load_model(tiny[0]).state_dict()
    for name, tensor in want_weights.items():
        scale = want_grads[name].abs().max()
        assert scale > 0, name
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=1e-5, atol=1e-5 * scale, msg=name)
        assert not torch.equal(tensor, initial[name]), name   # the update moved every weight
        torch.testing.assert_close(got_weights[name], tensor, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("reference", ["precompute", "swap"])
def test_a_packed_run_equals_the_padded_run(tiny, tmp_path, monkeypatch, reference):
    packed_calls = []
    monkeypatch.setattr(packed_scoring, "pack_pairs",
                        lambda *a, _pack=packed_scoring.pack_pairs, **k: packed_calls.append(1) or _pack(*a, **k))
    outs = {}
    for flags in (("--no-pack-pairs",), ()):   # packed by default
        outs[flags] = str(tmp_path / ("packed" if not flags else "padded"))
        train_cli.main(train_args(*tiny, outs[flags], "--greedy", "--iterations", "1", "--reference", reference,
                                  *flags))
        assert bool(packed_calls) == (not flags)   # the packed run packed, the padded one did not
    assert_runs_match(outs[()], outs[("--no-pack-pairs",)], steps=[1], tolerance=1e-5)
    got, want = metric_records(outs[()], "train")[0], metric_records(outs[("--no-pack-pairs",)], "train")[0]
    for key, value in want.items():
        if key not in UNTIMED and isinstance(value, float):
            assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key


def _run_on_ranks(rank, world_size, port, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=180))
    packed_calls, pack = [], packed_scoring.pack_pairs
    packed_scoring.pack_pairs = lambda *a, **k: packed_calls.append(1) or pack(*a, **k)
    train_cli.main(args)   # the trainer tears the process group down when it is done
    assert packed_calls, "the run on two ranks did not pack"


def test_a_packed_run_under_fsdp_on_two_ranks_equals_the_padded_run(tiny, tmp_path):
    padded, packed = str(tmp_path / "padded"), str(tmp_path / "packed")
    common = ("--greedy", "--iterations", "1", "--reference", "swap")
    train_cli.main(train_args(*tiny, padded, *common, "--no-pack-pairs"))
    mp.spawn(_run_on_ranks, args=(2, free_port(), train_args(*tiny, packed, *common)), nprocs=2, join=True)
    assert_runs_match(packed, padded, steps=[1], tolerance=1e-5)


def _tiny_llama(attention="sdpa"):
    config = transformers.LlamaConfig(vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2)
    model = transformers.LlamaForCausalLM(config)
    model.config._attn_implementation = attention
    return model


def test_packing_layout_per_attention_implementation():
    assert packing_layout(_tiny_llama("sdpa"), "precompute") == "shared"
    assert packing_layout(_tiny_llama("eager"), "swap") == "shared"
    # flash-attn takes no custom mask: a prompt per response, the documents told apart by position ids.
    assert packing_layout(_tiny_llama("flash_attention_2"), "resident") == "separate"
    # The layout does not depend on the parallel layout: tests/test_packing_equality.py packs on dp2 x tp2.


def _unpackable(case):
    """(model, reference) where packing cannot run, for each reason packing_layout has."""
    model, reference = _tiny_llama(), "precompute"
    if case == "gpt2":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=16, n_embd=16, n_layer=1, n_head=2))
    elif case == "streamed":
        reference = "streamed"
    else:
        model.config._attn_implementation = "flash_attention_3"
    return model, reference


UNPACKABLE = {"gpt2": "model type 'gpt2'", "streamed": "--reference streamed", "attention": "'flash_attention_3'"}


@pytest.mark.parametrize("case", list(UNPACKABLE))
def test_packing_is_refused_where_it_cannot_run(case):
    with pytest.raises(UsageError, match="--pack-pairs"):
        packing_layout(*_unpackable(case))
    with pytest.raises(UsageError, match="--pack-pairs"):   # asked for: the same error
        choose_packing(*_unpackable(case), True)


@pytest.mark.parametrize("case", list(UNPACKABLE))
def test_the_default_falls_back_to_padded_batches_and_says_why(case):
    layout, why = choose_packing(*_unpackable(case), None)
    # The reason alone: no advice to drop a setting the user did not give.
    assert layout is None and UNPACKABLE[case] in why and "drop" not in why and "; " not in why, why
    assert choose_packing(*_unpackable(case), False) == (None, None)


def test_packing_is_the_trainers_default_and_the_fallback_is_one_line_on_rank_0(tiny, capsys):
    for flags, want in (((), "shared"), (("--pack-pairs",), "shared"), (("--no-pack-pairs",), None)):
        scorer = Scorer(CTX)
        step_trainer(load_model(tiny[0]), scorer, pairs=PAIRS, extra=flags)
        assert scorer.packing == want, flags
    assert "padded pair batches" not in capsys.readouterr().out
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=16, n_embd=16, n_layer=1, n_head=2))
    for rank in (0, 1):
        scorer = Scorer(replace(CTX, rank=rank))
        step_trainer(gpt2, scorer, pairs=PAIRS)
        assert scorer.packing is None
        lines = [line for line in capsys.readouterr().out.splitlines() if "padded pair batches" in line]
        assert lines == ([f"padded pair batches: --pack-pairs: model type 'gpt2' is not one of "
                          f"{packed_scoring.PACKABLE_MODEL_TYPES}, whose attention takes the packed layout"]
                         if rank == 0 else [])


def test_the_trainer_refuses_packing_with_the_streamed_reference(tiny):
    with pytest.raises(UsageError, match="--pack-pairs.*--reference"):
        step_trainer(load_model(tiny[0]), Scorer(CTX), pairs=PAIRS, extra=["--pack-pairs", "--reference", "streamed"])


@pytest.mark.parametrize("head,layout", [("logits", "shared"), ("fused", "shared"), ("logits", "separate")])
def test_the_packed_sft_validation_loss_equals_the_padded_one(tiny, pairs, monkeypatch, head, layout):
    tokenizer, examples, _ = pairs
    model, pad = load_model(tiny[0]), tokenizer.pad_token_id
    packed_calls = []
    monkeypatch.setattr(packed_scoring, "pack_sequences",
                        lambda *a, _pack=packed_scoring.pack_sequences, **k: packed_calls.append(1) or _pack(*a, **k))
    want = sft_loss(model, examples, Scorer(CTX, head=head), micro_batch_size=3, pad_token_id=pad)
    assert not packed_calls
    got = sft_loss(model, examples, Scorer(CTX, head=head, packing=layout), micro_batch_size=3, pad_token_id=pad)
    assert len(packed_calls) == 3   # 8 sequences in micro-batches of 3, each one packed row
    assert got == pytest.approx(want, rel=1e-6)
    with torch.no_grad():   # and both are the mean NLL per response token of plain unpadded forwards
        nll = -sum(float(independent_logps(model, e.prompt_ids, e.response_ids)) for e in examples)
    assert got == pytest.approx(nll / sum(len(e.response_ids) for e in examples), rel=1e-6)


@pytest.mark.parametrize("head", ["logits", "fused"])
def test_a_pair_whose_generated_response_is_the_gold_one_has_a_margin_of_exactly_zero(tiny, pairs, head):
    """As in the padded layout: SPIN's acc never counts such a pair (packing.pack_pairs)."""
    tokenizer, examples, generated = pairs
    generated = [list(e.response_ids) if i % 2 else g for i, (e, g) in enumerate(zip(examples, generated))]
    batch = pair_batch(examples, generated, tokenizer.pad_token_id, "shared")
    reference = torch.randn(PAIRS, generator=torch.Generator().manual_seed(1)).repeat(2)   # the same for both rows
    out = Scorer(CTX, head=head, packing="shared").pair_loss(load_model(tiny[0]), batch, reference, beta=0.5,
                                                             loss_type="sigmoid")
    margins = out.rewards[:PAIRS] - out.rewards[PAIRS:]
    assert torch.all(margins[1::2] == 0) and torch.all(margins[::2] != 0), margins
    # The tokens metric still counts both sequences, as the padded batch does.
    padded = pair_batch(examples, generated, tokenizer.pad_token_id, None)
    assert int(sequence_tokens(batch)) == int(sequence_tokens(padded)) > batch.num_tokens


def test_a_micro_batch_with_an_empty_generated_response_is_scored_padded(pairs):
    tokenizer, examples, generated = pairs
    batch = pair_batch(examples[:2], [generated[0], []], tokenizer.pad_token_id, "shared")
    assert not isinstance(batch, PackedPairs) and batch.loss_mask[3].sum() == 0   # its sum is 0, as padded
