"""benchmarks/study_outcome.py in its smallest configuration (one task, one seed, a few steps) writes its
table; its choice of each arm's grid point looks at the validation split only."""
import importlib.util
import json
import os
import subprocess
import sys

from trainer_cases import ROOT

from spin_trainer.comparison import choose_run

SMALLEST = ["--tasks", "arith", "--seeds", "0", "--starts", "warmup", "--sft-lrs", "1e-3", "3e-3",
            "--spin-lrs", "3e-5", "--betas", "0.5", "--iterations", "3", "--spin-prompts", "64", "--workers", "1"]


def load_benchmark(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smallest_study_writes_its_table(tmp_path):
    out = tmp_path / "outcome.md"
    result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "study_outcome.py"), *SMALLEST,
                             "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = out.read_text()
    assert "Command: `python benchmarks/study_outcome.py --tasks arith --seeds 0" in report
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
    best_on_average = load_benchmark("outcome_report").best_on_average

    def start(values):
        return {"runs": [{"arm": "spin", "lr": lr, "beta": 2.0,
                          "rows": [{"val_exact_match": v, "val_sft_loss": 0.5, "exact_match": 1.0 - v}]}
                         for lr, v in values]}

    # Seed by seed 1e-4 wins twice, but 3e-4 is better on average.
    starts = [start([(1e-4, 0.50), (3e-4, 0.49)]), start([(1e-4, 0.50), (3e-4, 0.49)]),
              start([(1e-4, 0.10), (3e-4, 0.40)])]
    assert best_on_average(starts, "spin") == {"lr": 3e-4, "beta": 2.0}
