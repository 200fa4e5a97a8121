"""--head fused (hidden states -> log-probs and the SPIN loss, no logits) equals --head logits in one
process: whole runs with each reference mode (per-step losses and metrics, evaluation rows with the
SFT validation loss, final weights), SFT training steps, tied embeddings; the fused head's errors;
--head's default per device; in bf16 runs, each iteration's first step has a margin of exactly 0
with either head (also on CUDA: gpu_check.sh runs the `cuda` tests). The sharded runs (tp=2, FSDP,
FSDP x TP, bf16 mixed precision) are in test_train_parallel.py, --dtype bfloat16 in
test_train_precision.py."""
import os
from collections import Counter

import pytest
import torch

from trainer_cases import assert_runs_match, fixed_pairs, metric_records, tiny_setup, train_args

import spin_trainer.logprobs as logprobs
from spin_trainer import cli as train_cli
from spin_trainer.options import parse_config
from spin_trainer.data import collate_pairs, collate_sft
from spin_trainer.errors import UsageError
from spin_trainer.logprobs import Scorer, default_head
from spin_trainer.model import create_default_model, load_model, load_tokenizer
from spin_trainer.parallel.mesh import ParallelContext
from spin_trainer.parallel.precision import Precision

HEADS = ("fused", "logits")


def scorer(head):
    return Scorer(ParallelContext(0, 1, 1, 1, 0, 0, torch.device("cpu")), Precision(), head)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_setup(str(tmp_path_factory.mktemp("head")))


@pytest.fixture
def head_calls(monkeypatch):
    """Counts the calls of each head's log-prob functions, as spin_trainer.logprobs calls them (padded
    and packed batches alike)."""
    calls = Counter()
    for name in ("linear_spin_loss", "linear_token_logprobs", "token_logprobs"):

        def counting(*args, _name=name, _function=getattr(logprobs, name), **kwargs):
            calls[_name] += 1
            return _function(*args, **kwargs)

        monkeypatch.setattr(logprobs, name, counting)
    return calls


@pytest.mark.parametrize("reference", ["precompute", "swap", "resident"])
def test_fused_run_equals_the_logits_run(setup, tmp_path, head_calls, reference):
    outs = {}
    for head in HEADS:
        head_calls.clear()
        outs[head] = str(tmp_path / head)
        train_cli.main(train_args(*setup, outs[head], "--greedy", "--reference", reference, "--head", head))
        # Every log-prob of the run (reference, policy loss, SFT validation, held-out SPIN acc) went
        # through the chosen head only.
        if head == "fused":
            # 8 steps x 2 micro-batches of the policy, plus the reference's pair log-probs (the same op,
            # so that π − ref is exactly 0 at θ_t); the per-token op for the SFT validation loss.
            assert head_calls["linear_spin_loss"] > 16 and head_calls["linear_token_logprobs"] > 0
            assert head_calls["token_logprobs"] == 0
        else:
            assert head_calls["token_logprobs"] > 8 and head_calls.keys() == {"token_logprobs"}
    assert_runs_match(outs["fused"], outs["logits"], steps=range(1, 9))
    # The comparison has teeth: the run moved the weights and the validation loss.
    evals = metric_records(outs["fused"], "eval")
    assert evals[-1]["val_sft_loss"] < evals[0]["val_sft_loss"] - 1e-2


def test_sft_loss_gradients_through_the_fused_head_equal_the_logits_head(setup):
    """The SFT loss's gradient through linear_token_logprobs (its recomputing backward)."""
    tokenizer = load_tokenizer(setup[0])
    examples, _ = fixed_pairs(tokenizer, 8)
    batch = collate_sft(examples, tokenizer.pad_token_id)
    results = {}
    for head in HEADS:
        model = load_model(setup[0])
        token_logps = scorer(head).labelled_logps(model, batch).token_logps
        loss = -token_logps.sum() / token_logps.numel()
        loss.backward()
        results[head] = (float(loss.detach()), {name: p.grad for name, p in model.named_parameters()})
    loss, grads = results["fused"]
    want_loss, want_grads = results["logits"]
    assert loss == pytest.approx(want_loss, rel=1e-6)
    for name, grad in want_grads.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_tied_embeddings_get_both_gradients_in_one_parameter(tmp_path):
    model_dir = create_default_model(str(tmp_path / "tied"), hidden_size=32, intermediate_size=64,
                                     tie_word_embeddings=True)
    tokenizer = load_tokenizer(model_dir)
    examples, generated = fixed_pairs(tokenizer, 4)
    batch = collate_pairs(examples, generated, tokenizer.pad_token_id)
    grads = {}
    for head in HEADS:
        model = load_model(model_dir)
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
        out = scorer(head).pair_loss(model, batch, torch.linspace(-9.0, -5.0, 8), beta=0.5, loss_type="sigmoid")
        (out.loss * 0.5).backward()
        grads[head] = {name: p.grad for name, p in model.named_parameters()}
    assert grads["fused"].keys() == grads["logits"].keys()
    for name, grad in grads["logits"].items():
        torch.testing.assert_close(grads["fused"][name], grad, rtol=1e-5, atol=1e-7, msg=name)
    # The tied weight's gradient holds the head's part (every vocabulary row) beside the embedding's.
    tied = grads["fused"]["model.embed_tokens.weight"]
    assert bool((tied != 0).all(dim=1).all())


def test_a_model_that_transforms_the_head_output_is_refused(setup):
    """The fused head returns log-probs in place of logits; a forward that changes the head's output
    after it (soft-capping, scaling) would change them silently, so it is refused."""
    tokenizer = load_tokenizer(setup[0])
    examples, generated = fixed_pairs(tokenizer, 2)
    batch = collate_sft(examples, tokenizer.pad_token_id)
    model = load_model(setup[0])

    def scale_logits(module, args, output):
        output.logits = output.logits * 0.5
        return output

    model.register_forward_hook(scale_logits)
    with pytest.raises(UsageError, match="--head fused: .* transforms its LM head's output.*use --head logits"):
        scorer("fused").labelled_logps(model, batch)
    with pytest.raises(UsageError, match="--head fused"):
        scorer("fused").pair_loss(model, collate_pairs(examples, generated, tokenizer.pad_token_id), torch.zeros(4),
                                  beta=0.1, loss_type="sigmoid")
    # The logits head is unaffected: the forward restored the output embedding's own forward.
    assert "forward" not in vars(model.get_output_embeddings())
    scorer("logits").labelled_logps(model, batch)


def test_an_output_embedding_that_is_not_a_linear_is_refused(setup):
    tokenizer = load_tokenizer(setup[0])
    examples, _ = fixed_pairs(tokenizer, 2)
    model = load_model(setup[0])
    model.lm_head = torch.nn.Sequential(model.lm_head)
    with pytest.raises(UsageError, match="--head fused: the model's output embedding is a Sequential"):
        scorer("fused").labelled_logps(model, collate_sft(examples, tokenizer.pad_token_id))


def test_head_default_per_device_and_option_errors(setup, tmp_path):
    assert default_head("cuda") == "fused" and default_head("cpu") == "logits"
    assert parse_config(["--out", "x"]).model.head is None   # the device decides
    assert parse_config(["--out", "x", "--head", "fused"]).model.head == "fused"
    with pytest.raises(SystemExit):
        parse_config(["--out", "x", "--head", "chunked"])


@pytest.mark.parametrize("device, head, reference", [
    ("cpu", "fused", "precompute"), ("cpu", "fused", "swap"), ("cpu", "logits", "resident"),
    pytest.param("cuda", "fused", "precompute", marks=pytest.mark.cuda),
    pytest.param("cuda", "logits", "precompute", marks=pytest.mark.cuda)])
def test_bf16_runs_start_each_iteration_with_a_margin_of_exactly_zero(setup, tmp_path, device, head, reference):
    """π − ref is exactly 0 for every pair at θ_t: precomputed at the iteration's start in other
    batches (dataset order) than the step's (shuffled), on a GPU where bf16 matmuls of other shapes
    may round otherwise; swapped into (or copied from) the policy's FSDP DTensors on a 1-rank mesh."""
    out = str(tmp_path / "run")
    train_cli.main(train_args(*setup, out, "--device", device, "--dtype", "bfloat16", "--head", head,
                              "--reference", reference, "--lr", "5e-3"))
    records = metric_records(out, "train")
    firsts = [(r["iteration"], r["margin_mean"], r["rewards_all_std"]) for r in records if r["step"] in (1, 5)]
    assert firsts == [(1, 0.0, 0.0), (2, 0.0, 0.0)]
    assert records[1]["rewards_all_std"] > 0   # the steps after it do move the policy away from θ_t
