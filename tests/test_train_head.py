"""--head fused (hidden states -> log-probs and the SPIN loss, no logits) equals --head logits in one
process: whole runs with each reference mode (per-step losses and metrics, evaluation rows with the
SFT validation loss, final weights), SFT training steps, tied embeddings; the fused head's errors;
--head's default per device. The sharded runs (tp=2, FSDP, FSDP x TP, bf16 mixed precision) are in
test_train_parallel.py, --dtype bfloat16 under autocast in test_train_precision.py."""
import os
from collections import Counter

import pytest
import torch

from trainer_cases import assert_runs_match, fixed_pairs, metric_records, tiny_setup, train_args

import spin_trainer.logprobs as logprobs
from spin_trainer import cli as train_cli
from spin_trainer.data import collate_pairs, collate_sft
from spin_trainer.distributed import ParallelContext, choose_head
from spin_trainer.metrics import MetricsLog
from spin_trainer.model import create_default_model, load_model, load_tokenizer
from spin_trainer.sft import run_sft
from spin_trainer.steps import spin_micro_loss

HEADS = ("fused", "logits")


def context(head):
    return ParallelContext(0, 1, 1, 1, 0, 0, torch.device("cpu"), head=head)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_setup(str(tmp_path_factory.mktemp("head")))


@pytest.fixture
def head_calls(monkeypatch):
    """Counts the calls of each head's log-prob functions (as spin_trainer.logprobs calls them)."""
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
            assert head_calls["linear_spin_loss"] == 16 and head_calls["linear_token_logprobs"] > 16  # 8 steps x 2 micro-batches
            assert head_calls["token_logprobs"] == 0
        else:
            assert head_calls["token_logprobs"] > 8 and head_calls.keys() == {"token_logprobs"}
    assert_runs_match(outs["fused"], outs["logits"], steps=range(1, 9))
    # The comparison has teeth: the run moved the weights and the validation loss.
    evals = metric_records(outs["fused"], "eval")
    assert evals[-1]["val_sft_loss"] < evals[0]["val_sft_loss"] - 1e-2


def test_sft_steps_through_the_fused_head_equal_the_logits_head(setup, tmp_path):
    """The SFT loss's gradient through linear_token_logprobs (its recomputing backward)."""
    tokenizer = load_tokenizer(setup[0])
    examples, _ = fixed_pairs(tokenizer, 8)
    results = {}
    for head in HEADS:
        torch.manual_seed(0)
        model = load_model(setup[0])
        metrics = MetricsLog(str(tmp_path / head / "metrics.jsonl"))
        run_sft(model, tokenizer, examples, context(head), steps=3, lr=1e-2, micro_batch_size=4, global_batch_size=8,
                seed=0, metrics=metrics, run="sft", progress=False)
        records = metric_records(str(tmp_path / head), "train")
        results[head] = ([r["sft_loss"] for r in records], dict(model.named_parameters()))
    losses, weights = results["fused"]
    want_losses, want_weights = results["logits"]
    assert losses == pytest.approx(want_losses, rel=1e-6) and want_losses[-1] < want_losses[0]
    for name, tensor in want_weights.items():
        torch.testing.assert_close(weights[name], tensor, rtol=1e-5, atol=1e-6, msg=name)


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
        loss, _ = spin_micro_loss(model, batch, torch.linspace(-9.0, -5.0, 8), beta=0.5, loss_type="sigmoid",
                                  weight=0.5, ctx=context(head))
        loss.backward()
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
    with pytest.raises(ValueError, match="--head fused: .* transforms its LM head's output.*use --head logits"):
        logprobs.labelled_logps(model, batch, context("fused"))
    with pytest.raises(ValueError, match="--head fused"):
        logprobs.pair_loss(model, collate_pairs(examples, generated, tokenizer.pad_token_id), torch.zeros(4),
                           context("fused"), beta=0.1, loss_type="sigmoid")
    # The logits head is unaffected: the forward restored the output embedding's own forward.
    assert "forward" not in vars(model.get_output_embeddings())
    logprobs.labelled_logps(model, batch, context("logits"))


def test_an_output_embedding_that_is_not_a_linear_is_refused(setup):
    tokenizer = load_tokenizer(setup[0])
    examples, _ = fixed_pairs(tokenizer, 2)
    model = load_model(setup[0])
    model.lm_head = torch.nn.Sequential(model.lm_head)
    with pytest.raises(ValueError, match="--head fused: the model's output embedding is a Sequential"):
        logprobs.labelled_logps(model, collate_sft(examples, tokenizer.pad_token_id), context("fused"))


def test_head_default_per_device_and_option_errors(setup, tmp_path):
    assert choose_head(None, "cuda") == "fused" and choose_head(None, "cpu") == "logits"
    assert choose_head("logits", "cuda") == "logits" and choose_head("fused", "cpu") == "fused"
    with pytest.raises(ValueError, match="--head must be one of fused, logits"):
        choose_head("chunked", "cpu")
    assert train_cli.build_parser().parse_args(["--out", "x"]).head is None   # the device decides
    with pytest.raises(SystemExit):
        train_cli.build_parser().parse_args(["--out", "x", "--head", "chunked"])
    assert "--head {fused,logits}" in train_cli.build_parser().format_help()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_trainer_on_cuda_defaults_to_the_fused_head(setup, tmp_path, head_calls):
    """On CUDA without --head the run takes the fused head (Triton fold, bf16) and trains like
    --head logits to bf16 rounding."""
    losses = {}
    for head in (None, "logits"):
        head_calls.clear()
        out = str(tmp_path / str(head))
        extra = ("--head", head) if head else ()
        train_cli.main(train_args(*setup, out, "--device", "cuda", "--dtype", "bfloat16", "--greedy",
                                  "--iterations", "1", *extra))
        losses[head] = [r["loss"] for r in metric_records(out, "train")]
        if head is None:
            assert head_calls["linear_spin_loss"] == 8 and head_calls["token_logprobs"] == 0
    assert len(losses[None]) == 4 and all(0 < loss < 10 for loss in losses[None])
    for got, want in zip(losses[None], losses["logits"]):
        assert abs(got - want) <= 2e-2 * (1 + abs(want)), (losses[None], losses["logits"])
    assert os.path.isdir(str(tmp_path / "None" / "final"))
