"""Between iterations: each iteration's pairs as text (OUT/generations/iter-N.jsonl), each iteration's
model in Hugging Face format (OUT/iter-N, bf16 by default) beside OUT/final, and the results table
printed as each iteration ends, before its export."""
import contextlib
import io
import json
import os

import pytest
import torch

from trainer_cases import independent_logps, tiny_setup, train_args

from spin_trainer import cli as train_cli
from spin_trainer.data import load_examples
from spin_trainer.model import create_default_model, load_model, load_tokenizer


@pytest.fixture(scope="module", params=["precompute", "swap"])
def tied_run(tmp_path_factory, request):
    """A 2-iteration run of a model with tied embeddings (as Qwen2, Llama-3.2 and GPT-2 have). The
    generations' reference log-probs come from the iteration's cache (precompute) or are scored for
    the file (swap keeps no cache)."""
    root = tmp_path_factory.mktemp(f"between_{request.param}")
    setup = tiny_setup(str(root))
    model_dir = create_default_model(str(root / "tied"), hidden_size=32, intermediate_size=64,
                                     tie_word_embeddings=True)
    out = str(root / "run")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        train_cli.main(train_args(model_dir, *setup[1:], out, "--top-k", "8", "--reference", request.param))
    return model_dir, setup[1], out, printed.getvalue()


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_each_iterations_pairs_are_written_as_text_with_their_reference_logps(tied_run):
    model_dir, train_path, out, _ = tied_run
    tokenizer = load_tokenizer(model_dir)
    examples = load_examples(train_path, tokenizer, max_length=16)
    assert sorted(os.listdir(os.path.join(out, "generations"))) == ["iter-1.jsonl", "iter-2.jsonl"]
    first = read_jsonl(os.path.join(out, "generations", "iter-1.jsonl"))
    assert [row["index"] for row in first] == list(range(len(examples)))
    policy = load_model(model_dir)   # θ_0: iteration 1's pairs are scored under the input model
    for row, example in zip(first, examples):
        assert row["prompt"] == tokenizer.decode(example.prompt_ids)
        assert row["real"] == tokenizer.decode(example.response_ids) and row["real"].endswith("</s>")
        generated = tokenizer(row["generated"], add_special_tokens=False)["input_ids"]
        assert row["truncated"] == (generated[-1] != tokenizer.eos_token_id)
        with torch.no_grad():
            real = independent_logps(policy, example.prompt_ids, example.response_ids)
            sampled = independent_logps(policy, example.prompt_ids, generated)
        assert abs(row["ref_logp_real"] - real.item()) < 1e-4
        assert abs(row["ref_logp_generated"] - sampled.item()) < 1e-4
    second = read_jsonl(os.path.join(out, "generations", "iter-2.jsonl"))
    assert len(second) == len(first) and [r["real"] for r in second] == [r["real"] for r in first]
    assert [r["ref_logp_real"] for r in second] != [r["ref_logp_real"] for r in first]   # under θ_1 now


def test_each_iterations_model_is_exported_in_bf16_and_reloads_tied(tied_run, capsys):
    from transformers import AutoModelForCausalLM

    _, _, out, _ = tied_run
    assert {"iter-1", "iter-2", "final"} <= set(os.listdir(out))
    weights = {}
    for name, dtype in (("iter-1", torch.bfloat16), ("iter-2", torch.bfloat16), ("final", torch.float32)):
        loaded = AutoModelForCausalLM.from_pretrained(os.path.join(out, name), dtype="auto")
        assert loaded.dtype == dtype and loaded.config.tie_word_embeddings
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
        ids = loaded.generate(torch.tensor([[1, 5, 6]]), max_new_tokens=3, do_sample=False, pad_token_id=0)
        assert ids.shape[1] > 3
        weights[name] = loaded.model.embed_tokens.weight
    # iter-2 is the final model in bf16; iter-1 the model one iteration earlier.
    assert torch.equal(weights["iter-2"], weights["final"].to(torch.bfloat16))
    assert not torch.equal(weights["iter-1"], weights["iter-2"])


def test_the_table_is_printed_as_each_iteration_ends_before_its_export(tied_run):
    printed = tied_run[3]
    for iteration in (1, 2):   # a failing export would find the table with this iteration's row printed
        before_export = printed[:printed.index(f"iteration {iteration} model:")]
        table = before_export[before_export.rindex("SPIN, per iteration"):]
        assert [line.split()[0] for line in table.splitlines()[3:]] == [str(i) for i in range(iteration + 1)]


def test_export_every_iteration_is_on_by_default_in_bf16():
    from spin_trainer.options import parse_config

    assert parse_config([]).model.export_every_iteration is True
    assert parse_config([]).model.iteration_export_dtype == "bfloat16"
    assert parse_config(["--no-export-every-iteration"]).model.export_every_iteration is False


def test_spin_train_export_converts_the_runs_checkpoint_to_its_final_model(tied_run, tmp_path):
    from safetensors.torch import load_file

    from spin_trainer.checkpoint import list_checkpoints

    _, _, out, _ = tied_run
    last = list_checkpoints(os.path.join(out, "checkpoints", "spin"))[-1]
    converted = train_cli.main(["export", last, str(tmp_path / "hf")])   # the model: from OUT/config.yaml
    got = load_file(os.path.join(converted, "model.safetensors"))
    want = load_file(os.path.join(out, "final", "model.safetensors"))
    assert got.keys() == want.keys() and all(torch.equal(got[name], want[name]) for name in want)
    for name in ("config.json", "tokenizer.json", "generation_config.json"):
        assert os.path.isfile(os.path.join(converted, name)), name
