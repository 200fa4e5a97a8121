"""metrics.jsonl: per-step timing, samples, tokens and generated lengths that add up to what the
run processed; validation every --val-every steps from the weights of that step; strict JSON,
each record fsynced."""
import json
import os

import pytest
import torch

from trainer_cases import independent_logps, loop_data, metric_records, tiny_setup, train_args

from spin_trainer import cli as train_cli
from spin_trainer.metrics import TIMING_KEYS, MetricsLog

PROMPTS, BATCH = 32, 8


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_setup(str(tmp_path_factory.mktemp("logging")))


def test_step_records_add_up_and_validation_runs_every_n_steps(tiny, tmp_path):
    from spin_trainer.checkpoint import load_train_state
    from spin_trainer.data import load_examples
    from spin_trainer.parallel.mesh import ParallelContext
    from spin_trainer.evaluate import sft_loss
    from spin_trainer.logprobs import Scorer
    from spin_trainer.model import load_model, load_tokenizer

    model_dir, train_path, val_path, _ = tiny
    out = str(tmp_path / "run")
    common = ["--iterations", "1"]
    train_cli.main(train_args(*tiny, out, *common, "--val-every", "2", "--save-every", "2"))
    train = metric_records(out, "train")
    end = next(r for r in metric_records(out, "eval") if r["step"] == 4)
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    for record in train:
        assert record["consumed_samples"] == record["step"] * BATCH
        assert record["step_time"] > 0
        assert record["tokens_per_second"] * record["step_time"] == pytest.approx(record["tokens"], rel=1e-12)
    # One epoch is every pair once: the steps' generated lengths and tokens add up to the iteration's.
    assert sum(r["generated_length_mean"] for r in train) * BATCH == pytest.approx(end["train_gen_length"] * PROMPTS)
    tokenizer = load_tokenizer(model_dir)
    examples = load_examples(train_path, tokenizer, max_length=16)
    gold_tokens = sum(2 * len(e.prompt_ids) + len(e.response_ids) for e in examples)
    assert sum(r["tokens"] for r in train) == pytest.approx(gold_tokens + end["train_gen_length"] * PROMPTS)

    # Validation at step 2 (step 4 ends the iteration: its "eval" row), from step 2's weights.
    validations = metric_records(out, "val")
    assert [r["step"] for r in validations] == [2]
    ctx = ParallelContext(0, 1, 1, 1, 0, 0, torch.device("cpu"))
    model = load_model(model_dir)
    load_train_state(os.path.join(out, "checkpoints", "spin", "step-00000002", "model"), model,
                     torch.optim.AdamW(model.parameters()), ctx)
    val_examples = load_examples(val_path, tokenizer, max_length=16, source="--val-data")
    expected = sft_loss(model, val_examples, Scorer(ctx), micro_batch_size=4, pad_token_id=tokenizer.pad_token_id)
    assert validations[0]["val_sft_loss"] == pytest.approx(expected, abs=1e-6)
    assert validations[0]["val_sft_loss"] != end["val_sft_loss"]
    # Held-out SPIN acc and margin at step 2, recomputed from scratch: the policy's log-probs of the
    # validation pairs from step 2's weights, the reference's from the starting model (θ_0), the
    # generations the checkpoint holds.
    state = loop_data(out, 2)["data"]
    start = load_model(model_dir)
    margins = []
    with torch.no_grad():
        for example, generated, ref in zip(val_examples, state["val_generated"], state["val_ref_logps"].tolist()):
            assert ref == pytest.approx([float(independent_logps(start, example.prompt_ids, example.response_ids)),
                                         float(independent_logps(start, example.prompt_ids, generated))], abs=1e-4)
            actual = float(independent_logps(model, example.prompt_ids, example.response_ids)) - ref[0]
            fake = float(independent_logps(model, example.prompt_ids, generated)) - ref[1]
            margins.append(0.1 * (actual - fake))
    assert validations[0]["val_margin"] == pytest.approx(sum(margins) / len(margins), abs=1e-5)
    assert validations[0]["val_spin_acc"] == sum(m > 0 for m in margins) / len(margins)
    assert abs(validations[0]["val_margin"]) > 1e-3   # far from 0: a flipped sign cannot pass

    # Validating changes nothing in training.
    plain = str(tmp_path / "plain")
    train_cli.main(train_args(*tiny, plain, *common))
    strip = [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in train]
    assert strip == [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in metric_records(plain, "train")]


def test_records_are_strict_json_and_each_is_fsynced(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    log = MetricsLog(str(tmp_path / "metrics.jsonl"))
    log.write({"loss": float("nan"), "grad_norm": float("inf"), "nested": [1.0, float("-inf")], "step": 1})
    log.write({"loss": 0.5, "step": 2})
    assert len(synced) == 2

    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    with open(log.path, encoding="utf-8") as f:
        first, second = (json.loads(line, parse_constant=refuse) for line in f)
    assert first == {"loss": None, "grad_norm": None, "nested": [1.0, None], "step": 1}
    assert second == {"loss": 0.5, "step": 2}
