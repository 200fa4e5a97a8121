"""The study (examples/spin_vs_sft/study_outcome.py) in its smallest configuration (one task, one
seed, a few steps) writes its table; its choice of each arm's grid point looks at the validation
split only; its SFT runs stop early where the validation loss stops improving."""
import json
import os
import subprocess
import sys

import pytest
import torch

from trainer_cases import ROOT, tiny_setup

from spin_trainer.errors import UsageError

EXAMPLE = os.path.join(ROOT, "examples", "spin_vs_sft")
sys.path.insert(0, EXAMPLE)   # a folder of scripts, as run from there
from comparison import choose_run  # noqa: E402
from outcome_report import best_on_average  # noqa: E402
from sft import EarlyStopping, run_sft  # noqa: E402

SMALLEST = ["--tasks", "arith", "--seeds", "0", "--starts", "warmup", "--sft-lrs", "1e-3", "3e-3",
            "--spin-lrs", "3e-5", "--betas", "0.5", "--iterations", "3", "--spin-prompts", "64", "--workers", "1"]


def test_smallest_study_writes_its_table(tmp_path):
    out = tmp_path / "outcome.md"
    result = subprocess.run([sys.executable, os.path.join(EXAMPLE, "study_outcome.py"), *SMALLEST,
                             "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = out.read_text()
    assert "Command: `python examples/spin_vs_sft/study_outcome.py --tasks arith --seeds 0" in report
    assert "Ran in " in report and "load average before" in report
    assert "| arith | short warm-up | 300 |" in report
    raw = json.loads((tmp_path / "outcome.json").read_text())
    (unit,) = raw["results"]
    runs = unit["starts"]["warmup"]["runs"]
    assert [(r["arm"], r["lr"], r["beta"]) for r in runs] == [("sft", 1e-3, None), ("sft", 3e-3, None),
                                                              ("spin", 3e-5, 0.5)]
    for run in runs:   # 64 prompts / batch 32 = 2 steps per iteration, 3 iterations
        assert [row["step"] for row in run["rows"]] == [0, 2, 4, 6]
        assert all(0 <= row["val_exact_match"] <= 1 and 0 <= row["exact_match"] <= 1 for row in run["rows"])
    spin_rows = runs[2]["rows"]
    assert all(0 <= row["gen_equals_gold"] <= 1 for row in spin_rows[1:])
    chosen_sft = choose_run(runs, "sft")
    for row, spin_row in zip(chosen_sft["rows"], spin_rows):
        assert (f"| {row['iteration']} | {row['step']} | {row['exact_match']:.3f} | {spin_row['exact_match']:.3f} |"
                in report)
    assert "Chosen on validation exact match, per seed" in report and "one seed: none" in report


def test_the_grid_point_is_chosen_on_validation_only():
    def run(arm, lr, val, loss, test):
        return {"arm": arm, "lr": lr, "beta": None, "rows": [{"val_exact_match": val, "val_sft_loss": loss,
                                                               "exact_match": test}]}

    runs = [run("sft", 1e-4, 0.5, 0.3, 0.9), run("sft", 1e-3, 0.6, 0.4, 0.1), run("sft", 3e-3, 0.6, 0.2, 0.2),
            run("spin", 1e-5, 0.7, 0.1, 0.0)]
    chosen = choose_run(runs, "sft")
    assert chosen["lr"] == 3e-3   # best validation exact match; the tie broken by the lower validation loss


def test_the_demo_takes_the_grid_point_best_on_average_over_seeds():
    def start(values):
        return {"runs": [{"arm": "spin", "lr": lr, "beta": 2.0,
                          "rows": [{"val_exact_match": v, "val_sft_loss": 0.5, "exact_match": 1.0 - v}]}
                         for lr, v in values]}

    # Seed by seed 1e-4 wins twice, but 3e-4 is better on average.
    starts = [start([(1e-4, 0.50), (3e-4, 0.49)]), start([(1e-4, 0.50), (3e-4, 0.49)]),
              start([(1e-4, 0.10), (3e-4, 0.40)])]
    assert best_on_average(starts, "spin") == {"lr": 3e-4, "beta": 2.0}


def test_early_stopping_waits_patience_evaluations_and_keeps_the_best_weights():
    model = torch.nn.Linear(2, 1)
    stop = EarlyStopping(model, patience=2)
    decisions = []
    for step, loss in [(0, 1.0), (10, 0.5), (20, 0.7), (30, 0.4), (40, 0.4), (50, 0.6)]:
        with torch.no_grad():
            model.weight.fill_(step)
        decisions.append(stop({"step": step, "val_sft_loss": loss}))
    # 0.4 at step 40 ties the best (no improvement); 50 is the second evaluation without one.
    assert decisions == [False, False, False, False, False, True]
    assert stop.best_step == 30 and stop.best_loss == 0.4
    assert torch.equal(stop.best_state["weight"], torch.full((1, 2), 30.0))
    with pytest.raises(UsageError, match="patience must be >= 1"):
        EarlyStopping(model, patience=0)


def sft_run(tmp_path, **kwargs):
    """(eval rows, train records, final weights) of run_sft on the tiny model and arithmetic data."""
    from spin_trainer.data import load_examples
    from spin_trainer.evaluate import HeldOut
    from spin_trainer.export import full_state_dict
    from spin_trainer.logprobs import Scorer
    from spin_trainer.metrics import MetricsLog, read_records
    from spin_trainer.model import load_model, load_tokenizer
    from spin_trainer.parallel.mesh import setup_parallel, teardown_parallel

    model_dir, train_path, val_path, _ = tiny_setup(str(tmp_path / "setup"))
    tokenizer = load_tokenizer(model_dir)
    train, val = (load_examples(p, tokenizer, max_length=16, source="data") for p in (train_path, val_path))
    ctx = setup_parallel(1, "cpu")
    try:
        scorer = Scorer(ctx)
        model = load_model(model_dir, device=ctx.device)
        metrics = MetricsLog(str(tmp_path / "metrics.jsonl"))   # run_sft replaces an earlier run's records
        held_out = HeldOut(val, val, scorer, tokenizer=tokenizer, max_length=16, max_new_tokens=4, batch_size=8,
                           micro_batch_size=8, val_exact_match=True)
        rows = run_sft(model, tokenizer, train, scorer, lr=1e-3, global_batch_size=8, seed=0, metrics=metrics,
                       run="sft", held_out=held_out, progress=False, **kwargs)
        state = full_state_dict(model)
    finally:
        teardown_parallel(ctx)
    return rows, [r for r in read_records(metrics.path) if r["kind"] == "train"], state


def test_run_sft_stops_where_the_hook_says(tmp_path):
    calls = []
    rows, train_records, _ = sft_run(tmp_path, steps=20, micro_batch_size=4, eval_at=(2, 4, 6, 8),
                                     stop=lambda row: calls.append(row["step"]) or len(calls) == 2)
    assert calls == [2, 4] and [r["step"] for r in rows] == [0, 2, 4]
    assert all(0.0 <= r["val_exact_match"] <= 1.0 for r in rows)
    assert [r["step"] for r in train_records] == [1, 2, 3, 4] and all(r["lr"] == 1e-3 for r in train_records)


def test_an_sft_step_is_the_same_for_any_micro_batch_size(tmp_path):
    # Each micro-batch's loss is its share of the global batch's response tokens.
    _, whole, whole_state = sft_run(tmp_path, steps=2, micro_batch_size=8)
    _, split, split_state = sft_run(tmp_path, steps=2, micro_batch_size=2)
    for a, b in zip(whole, split):
        assert a["sft_loss"] == pytest.approx(b["sft_loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    for name, weight in whole_state.items():
        torch.testing.assert_close(split_state[name], weight, rtol=1e-4, atol=1e-6)


def test_every_held_out_number_is_scored_in_the_trainers_layout_from_the_start(tmp_path):
    """The study's Scorer packs as the SPIN arm's trainer will, before any trainer exists: the starting
    SFT run's validation losses and the arms' are scored alike, whichever runs first."""
    from comparison import TASKS, prepare

    from spin_trainer.packed_scoring import choose_packing
    from spin_trainer.parallel.mesh import ParallelContext

    setup = prepare(TASKS["sort"], 0, str(tmp_path), ParallelContext(0, 1, 1, 1, 0, 0, torch.device("cpu")))
    assert setup.scorer.packing == "shared"
    assert setup.scorer.packing == choose_packing(setup.model, "precompute", None)[0]
