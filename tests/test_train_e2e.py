"""A short end-to-end run of python/train.py, the HF export, and the errors of bad options."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from trainer_cases import ROOT, independent_logps, tiny_setup, train_args

from spin_trainer.errors import UsageError
from spin_trainer import cli as train_cli


LN2 = math.log(2.0)


def read_metrics(out):
    with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]



@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_setup(str(tmp_path_factory.mktemp("e2e")))


def test_end_to_end_run_exports_a_loadable_model(tiny, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = str(tmp_path / "run")
    rows = train_cli.main(train_args(*tiny, out, "--beta", "0.1", "0.2", "--mix-previous", "0.25"))
    assert [r["iteration"] for r in rows] == [0, 1, 2]
    assert [r["step"] for r in rows] == [0, 4, 9]   # 32 prompts / 8; then 32 + 8 mixed pairs / 8
    records = read_metrics(out)
    train_records = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train_records] == list(range(1, 10))
    assert [r["beta"] for r in train_records] == [0.1] * 4 + [0.2] * 5
    assert all(r["lr"] == 1e-3 for r in train_records)
    for record in train_records:  # the metrics of one batch hang together
        assert record["margin_mean"] == pytest.approx(record["rewards_actual_mean"] - record["rewards_generated_mean"],
                                                      abs=1e-6)
        assert record["rewards_all_mean"] == pytest.approx(
            (record["rewards_actual_mean"] + record["rewards_generated_mean"]) / 2, abs=1e-6)
    # An iteration's first step: the policy is still θ_t, the reference, so every reward is 0 and the
    # loss is ln 2; also for the previous iteration's pairs mixed in. To float rounding, not bit for
    # bit: the LM head runs on the labelled positions of each micro-batch, and the reference pass
    # (iteration order) and the training pass (epoch order) group the sequences differently, so the
    # head's matmuls have other row counts (a 1-ulp difference in a log-prob sum is ~5e-7). Which
    # pairs count as "won" (margin > 0) at that step is therefore rounding noise.
    for first in (train_records[0], train_records[4]):
        assert first["loss"] == pytest.approx(LN2, abs=1e-6)
        for name in ("rewards_actual_mean", "rewards_generated_mean", "margin_mean", "rewards_all_std"):
            assert abs(first[name]) <= 1e-6, name
    assert abs(rows[1]["margin_start"]) <= 1e-6

    # Independent recomputation from the starting model θ_0: the validation SFT loss of the
    # iteration-0 row (NLL per response token, EOS included) and step 1's mean log-prob of the
    # gold responses of its batch (the first 8 of the epoch's order).
    from spin_trainer.data import load_examples
    from spin_trainer.trainer import epoch_order
    from transformers import AutoTokenizer

    start = AutoModelForCausalLM.from_pretrained(tiny[0])
    tokenizer = AutoTokenizer.from_pretrained(tiny[0])
    with torch.no_grad():
        val = load_examples(tiny[2], tokenizer, max_length=16, source="--val-data")
        nll = -sum(independent_logps(start, e.prompt_ids, e.response_ids) for e in val)
        assert rows[0]["val_sft_loss"] == pytest.approx(nll.item() / sum(len(e.response_ids) for e in val), rel=1e-5)
        train = load_examples(tiny[1], tokenizer, max_length=16)
        batch = [train[k] for k in epoch_order(len(train), 0, 0, 0)[:8]]
        gold = sum(independent_logps(start, e.prompt_ids, e.response_ids) for e in batch) / 8
        assert train_records[0]["logps_actual_mean"] == pytest.approx(gold.item(), rel=1e-5)
    with open(os.path.join(out, "curves.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"

    final = os.path.join(out, "final")
    model = AutoModelForCausalLM.from_pretrained(final)
    tokenizer = AutoTokenizer.from_pretrained(final)
    ids = tokenizer("12+34=", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size) and torch.isfinite(logits).all()
    # The export is the trained policy, not the starting model.
    assert not torch.equal(start.lm_head.weight, model.lm_head.weight)


def test_micro_batches_with_accumulation_equal_one_big_batch(tiny, tmp_path):
    from safetensors.torch import load_file

    weights, steps = [], []
    for micro in ("8", "2"):
        out = str(tmp_path / f"micro{micro}")
        train_cli.main(train_args(*tiny, out, "--iterations", "1", "--micro-batch-size", micro, "--greedy"))
        weights.append(load_file(os.path.join(out, "final", "model.safetensors")))
        steps.append([r for r in read_metrics(out) if r["kind"] == "train"])
    for name, tensor in weights[0].items():
        torch.testing.assert_close(weights[1][name], tensor, rtol=1e-5, atol=1e-5, msg=name)
    for ours, theirs in zip(*steps):
        for name in ("loss", "grad_norm", "logps_actual_mean", "logps_generated_mean", "margin_mean"):
            assert ours[name] == pytest.approx(theirs[name], rel=1e-5, abs=1e-7), name
        # acc counts margins > 0; at step 1 every margin is 0 up to rounding (the policy is the
        # reference), so there it is rounding noise.
        if ours["step"] > 1:
            assert ours["acc"] == theirs["acc"]


def test_first_step_equals_an_independent_recomputation(tiny, tmp_path):
    """Step 1 of a greedy run recomputed by hand from θ_0: plain HF forwards, log_softmax, the SPIN
    loss formula and autograd, on the step's 8 pairs (gold responses and θ_0's greedy ones)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from spin_trainer.data import load_examples
    from spin_trainer.generation.decode import SamplingConfig, generate_responses
    from spin_trainer.trainer import epoch_order

    out = str(tmp_path / "run")
    train_cli.main(train_args(*tiny, out, "--iterations", "1", "--greedy", "--beta", "0.3", "--max-grad-norm", "0"))
    first = next(r for r in read_metrics(out) if r["kind"] == "train")

    start = AutoModelForCausalLM.from_pretrained(tiny[0]).float()
    tokenizer = AutoTokenizer.from_pretrained(tiny[0])
    train = load_examples(tiny[1], tokenizer, max_length=16)
    generated = generate_responses(start, [list(e.prompt_ids) for e in train], SamplingConfig(max_new_tokens=5, do_sample=False),
                                   eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                   max_length=16, progress=False)
    batch = epoch_order(len(train), 0, 0, 0)[:8]
    actual = torch.stack([independent_logps(start, train[k].prompt_ids, train[k].response_ids) for k in batch])
    sampled = torch.stack([independent_logps(start, train[k].prompt_ids, generated[k]) for k in batch])
    # The reference is θ_0 itself: the same numbers, held constant.
    margin = 0.3 * ((actual - actual.detach()) - (sampled - sampled.detach()))
    loss = -torch.nn.functional.logsigmoid(margin).mean()
    loss.backward()
    grad_norm = torch.sqrt(sum(p.grad.double().pow(2).sum() for p in start.parameters()))
    assert first["loss"] == pytest.approx(loss.item(), rel=1e-6)
    assert first["logps_actual_mean"] == pytest.approx(actual.mean().item(), rel=1e-5)
    assert first["logps_generated_mean"] == pytest.approx(sampled.mean().item(), rel=1e-5)
    assert first["grad_norm"] == pytest.approx(grad_norm.item(), rel=1e-4)


@pytest.mark.parametrize("extra, expected", [
    (["--tp", "3"], "--tp 3 does not divide the model's num_attention_heads (4)"),
    (["--global-batch-size", "6", "--micro-batch-size", "4"], "--global-batch-size 6 must be a multiple"),
    (["--global-batch-size", "64"], "--global-batch-size 64 is larger than the 32 training prompts"),
    (["--iterations", "3", "--beta", "0.1", "0.2"], "--beta: give one value or at least one per iteration (3), got 2"),
    (["--top-p", "0"], "--top-p must be in (0, 1]"),
    (["--model", "/nonexistent/model"], "--model '/nonexistent/model': no such directory"),
    (["--val-data", "/nonexistent/val.jsonl"], "--val-data '/nonexistent/val.jsonl': no such file"),
])
def test_bad_options_name_the_option(tiny, tmp_path, extra, expected):
    with pytest.raises(UsageError) as info:
        train_cli.main(train_args(*tiny, str(tmp_path / "bad"), *extra))
    assert expected in str(info.value)


def test_tp_must_divide_the_vocabulary(tmp_path):
    from transformers import AutoConfig

    from spin_trainer.model import create_default_model
    from spin_trainer.parallel.tp_plan import check_tensor_parallel

    model_dir = create_default_model(str(tmp_path / "m"), vocab_multiple=1, hidden_size=32, intermediate_size=64)
    config = AutoConfig.from_pretrained(model_dir)
    assert config.vocab_size == 16 + 0 and config.num_attention_heads == 4
    config.vocab_size = 17
    with pytest.raises(UsageError, match=r"--tp 2 does not divide the model's vocab_size \(17\)"):
        check_tensor_parallel(config, 2)
    config.vocab_size, config.tie_word_embeddings = 16, True
    with pytest.raises(UsageError, match="tie_word_embeddings"):
        check_tensor_parallel(config, 2)


def test_cli_reports_bad_input_without_touching_existing_output(tiny, tmp_path):
    out = tmp_path / "run"
    checkpoint = out / "checkpoints" / "spin" / "step-00000004"
    checkpoint.mkdir(parents=True)
    (checkpoint / "rank00000.pt").write_bytes(b"precious")
    final = out / "final"
    final.mkdir()
    (final / "config.json").write_text("{}", encoding="utf-8")
    bad_data = tmp_path / "bad.jsonl"
    bad_data.write_text('{"prompt": "1+1="}\n', encoding="utf-8")
    args = train_args(tiny[0], str(bad_data), *tiny[2:], str(out))
    result = subprocess.run([sys.executable, os.path.join(ROOT, "python", "train.py"), *args],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "error: --train-data" in result.stderr and "record 1: no known format in fields ['prompt']" in result.stderr
    assert "Traceback" not in result.stderr
    # Good data, but checkpoints of an earlier run are there: refused unless --resume.
    with pytest.raises(UsageError, match="already holds checkpoints"):
        train_cli.main(train_args(*tiny, str(out)))
    assert (checkpoint / "rank00000.pt").read_bytes() == b"precious"
    assert (final / "config.json").read_text(encoding="utf-8") == "{}"


def test_reference_modes_and_per_epoch_regeneration_agree(tiny, tmp_path):
    """The reference log-probs precomputed, swapped in per batch, or from a resident copy are the
    same numbers, so the runs agree; per-epoch regeneration (reference swapped in to sample) and
    optimizer offload run through the same loop."""
    from safetensors.torch import load_file

    common = ["--iterations", "1", "--epochs", "2", "--greedy"]
    weights = {}
    for mode in ("precompute", "swap", "resident"):
        out = str(tmp_path / mode)
        train_cli.main(train_args(*tiny, out, *common, "--reference", mode))
        weights[mode] = load_file(os.path.join(out, "final", "model.safetensors"))
    for mode in ("swap", "resident"):
        for name, tensor in weights["precompute"].items():
            torch.testing.assert_close(weights[mode][name], tensor, rtol=1e-5, atol=1e-5, msg=f"{mode}: {name}")

    out = str(tmp_path / "regenerate")
    rows = train_cli.main(train_args(*tiny, out, "--iterations", "1", "--epochs", "2", "--generate-every", "epoch",
                                     "--offload-optimizer", "--temperature", "0.7", "--top-p", "0.9"))
    assert rows[-1]["step"] == 8
    records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"), encoding="utf-8")]
    assert [r["generated_at_epoch"] for r in records if r["kind"] == "train"] == [0] * 4 + [1] * 4
    regenerated = load_file(os.path.join(out, "final", "model.safetensors"))
    assert not torch.equal(regenerated["lm_head.weight"], weights["precompute"]["lm_head.weight"])


class _FirstStep(Exception):
    pass


def test_dropout_is_off_so_step_one_loss_is_ln2_in_every_reference_mode(tiny, tmp_path):
    """At step 1 the policy is the reference: with dropout off the loss is exactly ln 2 (with the
    model's attention_dropout=0.3 active it was 0.6925 / 0.6869 / 0.6947)."""
    import math
    import shutil

    from transformers import AutoModelForCausalLM

    model_dir = str(tmp_path / "dropout_model")
    shutil.copytree(tiny[0], model_dir)
    config_path = os.path.join(model_dir, "config.json")
    config = json.load(open(config_path, encoding="utf-8"))
    config["attention_dropout"] = 0.3
    json.dump(config, open(config_path, "w", encoding="utf-8"))
    raw = AutoModelForCausalLM.from_pretrained(model_dir).train()
    ids = torch.tensor([[1, 6, 7, 4, 8, 9, 15, 5]])
    with torch.no_grad():
        assert not torch.equal(raw(ids).logits, raw(ids).logits)   # the dropout is really there

    def stop(record):
        raise _FirstStep(record["loss"])

    for mode in ("precompute", "swap", "resident"):
        with pytest.raises(_FirstStep) as info:
            train_cli.main(train_args(model_dir, *tiny[1:], str(tmp_path / mode), "--reference", mode), on_step=stop)
        assert abs(info.value.args[0] - math.log(2)) < 1e-5, (mode, info.value.args[0])
