"""Iteration diagnostics (generations equal to gold, SPIN acc and margin at an iteration's start and
end) and early stopping of SFT on the validation loss."""
import json
import os

import pytest
import torch

from trainer_cases import tiny_setup, train_args

from spin_trainer import cli as train_cli
from spin_trainer.data import Example
from spin_trainer.evaluate import fraction_equal_to_gold, iteration_diagnostics
from spin_trainer.generation.decode import Responses


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_setup(str(tmp_path_factory.mktemp("diagnostics")))


def test_fraction_equal_to_gold_compares_whole_responses_eos_included():
    examples = [Example((1, 5), (7, 8, 2)), Example((1, 6), (9, 2)), Example((1, 4), (3, 2)), Example((1,), (4, 2))]
    generated = [[7, 8, 2], [9], [3, 2, 2], (4, 2)]
    assert fraction_equal_to_gold(examples, generated) == 0.5
    assert fraction_equal_to_gold([], []) is None


def test_iteration_diagnostics_average_the_first_and_last_quarter_of_steps():
    history = [{"acc": a, "margin_mean": m} for a, m in
               [(0.0, 0.0), (0.25, 0.5), (0.5, 1.0), (0.5, 1.5), (0.75, 2.0), (1.0, 3.0), (1.0, 4.0)]]
    got = iteration_diagnostics(history)   # 7 steps: quarters of ceil(7 / 4) = 2 steps
    assert got == {"spin_acc_start": 0.125, "spin_acc_end": 1.0, "margin_start": 0.25, "margin_end": 3.5}
    one = iteration_diagnostics(history[:1])
    assert one["spin_acc_start"] == one["spin_acc_end"] == 0.0
    assert iteration_diagnostics([])["margin_end"] is None


def test_spin_rows_carry_the_iteration_diagnostics(tiny, tmp_path, monkeypatch):
    import spin_trainer.trainer as loop

    real_generate = loop.generate

    def half_gold(model, examples, *args, **kwargs):
        """Every other response is the gold one; the rest are the gold one without its EOS."""
        real_generate(model, examples, *args, **kwargs)
        return Responses([list(e.response_ids) if i % 2 == 0 else list(e.response_ids)[:-1]
                          for i, e in enumerate(examples)], truncated=[i % 2 == 1 for i in range(len(examples))])

    monkeypatch.setattr(loop, "generate", half_gold)
    steps = []
    out = str(tmp_path / "run")
    rows = train_cli.main(train_args(*tiny, out, "--iterations", "1"), on_step=steps.append)
    assert len(steps) == 4   # 32 prompts / 8: quarters of one step
    row = rows[1]
    assert row["gen_equals_gold"] == 0.5
    assert row["spin_acc_start"] == steps[0]["acc"] and row["spin_acc_end"] == steps[-1]["acc"]
    assert row["margin_start"] == steps[0]["margin_mean"] and row["margin_end"] == steps[-1]["margin_mean"]
    # At the first step the policy is the reference: no margin yet.
    assert abs(row["margin_start"]) < 1e-4 and row["spin_acc_start"] == 0.0
    logged = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"), encoding="utf-8")]
    assert [r["gen_equals_gold"] for r in logged if r["kind"] == "eval" and r["iteration"] == 1] == [0.5]


def test_diagnostics_describe_the_samples_before_drop_truncated_reassigns_slots(tiny, tmp_path, monkeypatch,
                                                                               capsys):
    import spin_trainer.trainer as loop
    from spin_trainer.generation.decode import Responses

    sampled = []

    def gold_or_cut(model, examples, *args, **kwargs):
        """Every other response is the gold one; the rest are cut at the cap (one token, no EOS)."""
        responses = [list(e.response_ids) if i % 2 == 0 else list(e.response_ids)[:1] for i, e in enumerate(examples)]
        sampled.append(responses)
        return Responses(responses, [i % 2 == 1 for i in range(len(examples))])

    monkeypatch.setattr(loop, "generate", gold_or_cut)
    out = str(tmp_path / "run")
    rows = train_cli.main(train_args(*tiny, out, "--iterations", "1", "--drop-truncated"))
    training_prompts = sampled[0]
    # How many pairs were left out: a line as the iteration starts, and the iteration's record.
    assert "iteration 1: --drop-truncated left out 16 of 32 pairs" in capsys.readouterr().out
    logged = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"), encoding="utf-8")]
    assert rows[1]["dropped_truncated"] == 16 == logged[-1]["dropped_truncated"]   # the first call samples the training prompts, then the validation ones
    assert rows[1]["gen_equals_gold"] == 0.5
    # Over what was sampled, cut responses included (the pairs trained on hold finished ones only).
    assert rows[1]["train_gen_length"] == sum(map(len, training_prompts)) / len(training_prompts)
