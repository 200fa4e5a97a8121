"""A short end-to-end run of python/train.py, the HF export, and the errors of bad options."""
import json
import os
import subprocess
import sys

import pytest
import torch

from trainer_cases import ROOT, tiny_setup, train_args

from spin_trainer import cli as train_cli


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_setup(str(tmp_path_factory.mktemp("e2e")))


def test_end_to_end_run_exports_a_loadable_model(tiny, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = str(tmp_path / "run")
    rows = train_cli.main(train_args(*tiny, out, "--beta", "0.1", "0.2", "--mix-previous", "0.25"))
    assert [r["iteration"] for r in rows] == [0, 1, 2]
    assert [r["step"] for r in rows] == [0, 4, 9]   # 32 prompts / 8; then 32 + 8 mixed pairs / 8
    records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"), encoding="utf-8")]
    train_records = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train_records] == list(range(1, 10))
    assert {r["beta"] for r in train_records if r["iteration"] == 2} == {0.2}
    for record in train_records:
        assert 0.0 <= record["acc"] <= 1.0 and record["loss"] > 0
        assert record["grad_norm"] > 0
    for row in rows[1:]:
        assert 0.0 <= row["val_spin_acc"] <= 1.0 and row["train_gen_length"] >= 1
    assert os.path.getsize(os.path.join(out, "curves.png")) > 1000

    final = os.path.join(out, "final")
    model = AutoModelForCausalLM.from_pretrained(final)
    tokenizer = AutoTokenizer.from_pretrained(final)
    ids = tokenizer("12+34=", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size) and torch.isfinite(logits).all()
    # The export is the trained policy, not the starting model.
    start = AutoModelForCausalLM.from_pretrained(tiny[0])
    assert not torch.equal(start.lm_head.weight, model.lm_head.weight)


def test_micro_batches_with_accumulation_equal_one_big_batch(tiny, tmp_path):
    from safetensors.torch import load_file

    weights = []
    for micro in ("8", "2"):
        out = str(tmp_path / f"micro{micro}")
        train_cli.main(train_args(*tiny, out, "--iterations", "1", "--micro-batch-size", micro, "--greedy"))
        weights.append(load_file(os.path.join(out, "final", "model.safetensors")))
    for name, tensor in weights[0].items():
        torch.testing.assert_close(weights[1][name], tensor, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("extra, expected", [
    (["--tp", "3"], "--tp 3 does not divide the model's num_attention_heads (4)"),
    (["--global-batch-size", "6", "--micro-batch-size", "4"], "--global-batch-size 6 must be a multiple"),
    (["--global-batch-size", "64"], "--global-batch-size 64 is larger than the 32 training prompts"),
    (["--beta", "0.1", "0.2", "0.3"], "--beta: give one value or one per iteration (2), got 3"),
    (["--top-p", "0"], "--top-p must be in (0, 1]"),
    (["--model", "/nonexistent/model"], "--model '/nonexistent/model': no such directory"),
    (["--val-data", "/nonexistent/val.jsonl"], "--val-data '/nonexistent/val.jsonl': no such file"),
])
def test_bad_options_name_the_option(tiny, tmp_path, extra, expected):
    with pytest.raises(ValueError) as info:
        train_cli.main(train_args(*tiny, str(tmp_path / "bad"), *extra))
    assert expected in str(info.value)


def test_tp_must_divide_the_vocabulary(tmp_path):
    from transformers import AutoConfig

    from spin_trainer.model import create_default_model
    from spin_trainer.tp_plan import check_tensor_parallel

    model_dir = create_default_model(str(tmp_path / "m"), vocab_multiple=1, hidden_size=32, intermediate_size=64)
    config = AutoConfig.from_pretrained(model_dir)
    assert config.vocab_size == 16 + 0 and config.num_attention_heads == 4
    config.vocab_size = 17
    with pytest.raises(ValueError, match=r"--tp 2 does not divide the model's vocab_size \(17\)"):
        check_tensor_parallel(config, 2)
    config.vocab_size, config.tie_word_embeddings = 16, True
    with pytest.raises(ValueError, match="tie_word_embeddings"):
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
    assert "error: --train-data" in result.stderr and ":1: missing field(s) ['response']" in result.stderr
    assert "Traceback" not in result.stderr
    # Good data, but checkpoints of an earlier run are there: refused unless --resume.
    with pytest.raises(ValueError, match="already holds checkpoints"):
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
