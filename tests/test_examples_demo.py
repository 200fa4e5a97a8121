"""The demo (examples/spin_vs_sft/demo.py): committed task data is what its generators write; the
verdict says who won only beyond the seed-to-seed noise; the seeds' means and curves; --out and
options are checked before any work; a shrunken demo runs end to end."""
import dataclasses
import filecmp
import json
import os
import subprocess
import sys

import pytest

from trainer_cases import ROOT, tiny_setup, train_args

from spin_trainer import cli as train_cli
from spin_trainer.errors import UsageError
from spin_trainer.plots import format_table

sys.path.insert(0, os.path.join(ROOT, "examples", "spin_vs_sft"))   # a folder of scripts, as run from there
import demo  # noqa: E402
from comparison import Protocol, Task  # noqa: E402
from seeds import ARM_PANELS, draw_curves, mean_and_se, mean_rows  # noqa: E402
from verdict import compare, verdict  # noqa: E402


@pytest.mark.parametrize("task", ["arith", "sort"])
def test_committed_task_data_is_the_generator_output(task, tmp_path):
    subprocess.run([sys.executable, os.path.join(ROOT, "data", f"make_{task}.py"), "--out", str(tmp_path)],
                   check=True, capture_output=True)
    for split in ("train", "val", "test"):
        assert filecmp.cmp(tmp_path / f"{split}.jsonl", os.path.join(ROOT, "data", task, f"{split}.jsonl"),
                           shallow=False), split
    records = {split: [json.loads(line) for line in open(tmp_path / f"{split}.jsonl", encoding="utf-8")]
               for split in ("train", "val", "test")}
    prompts = [{r["prompt"] for r in records[split]} for split in ("train", "val", "test")]
    assert not (prompts[0] & prompts[1]) and not (prompts[0] & prompts[2]) and not (prompts[1] & prompts[2])
    if task == "sort":
        for record in records["test"]:
            digits = record["prompt"].rstrip("=")
            assert record["response"] == "".join(sorted(digits)) and 6 <= len(digits) <= 9


def test_verdict_a_clear_win():
    winner, text = verdict([0.60, 0.62, 0.61], [0.40, 0.43, 0.39], num_test=256, steps=128)
    assert winner == "spin"
    assert "Verdict: SPIN did better; the interval excludes 0." in text
    assert "SPIN 0.610 ± 0.006, continued SFT 0.407 ± 0.012" in text and "+0.203" in text
    assert "Student t, 2 degrees of freedom" in text and "After 128 optimizer steps each" in text


def test_verdict_a_tie_within_noise():
    # SPIN is ahead on average (+0.033) but the seeds disagree: the interval includes 0.
    winner, text = verdict([0.50, 0.40, 0.65], [0.45, 0.55, 0.45], num_test=256, steps=128)
    assert winner == "neither"
    assert "Verdict: no difference is measurable; the interval includes 0" in text
    result = compare([0.50, 0.40, 0.65], [0.45, 0.55, 0.45])
    assert result["low"] < 0 < result["high"] and result["mean_diff"] == pytest.approx(0.1 / 3)


def test_verdict_a_loss():
    winner, text = verdict([0.40, 0.43, 0.39], [0.60, 0.62, 0.61], num_test=256, steps=128)
    assert winner == "sft"
    assert "Verdict: continued SFT did better; the interval excludes 0." in text and "-0.203" in text


def test_verdict_needs_two_seeds_and_paired_values():
    winner, text = verdict([0.6], [0.2], num_test=256, steps=10)
    assert winner is None and "no verdict" in text
    with pytest.raises(ValueError, match="one SPIN and one continued-SFT value per seed"):
        compare([0.5, 0.6], [0.5])
    # A consistent gap with identical seeds: standard error 0, a clear win.
    assert compare([0.5, 0.5], [0.4, 0.4])["winner"] == "spin"


def test_mean_rows_and_table_show_mean_and_standard_error():
    seeds = [[{"iteration": 0, "step": 0, "exact_match": 0.2, "val_sft_loss": 1.0, "spin_acc_start": None}],
             [{"iteration": 0, "step": 0, "exact_match": 0.4, "val_sft_loss": 0.5, "spin_acc_start": None}]]
    (row,) = mean_rows(seeds)
    assert row["exact_match"] == pytest.approx(0.3) and row["exact_match_se"] == pytest.approx(0.1)
    assert row["val_sft_loss"] == pytest.approx(0.75) and "spin_acc_start" not in row
    table = format_table([row], "title")
    assert "0.300 ± 0.100" in table and "0.7500" in table


def records(seed_shift):
    """A start of 300 SFT steps, then both arms for 8 steps (evaluated every 4)."""
    out = [{"kind": "train", "run": "sft_start", "step": s, "sft_loss": 2.0 / s} for s in range(1, 301)]
    out += [{"kind": "eval", "run": "sft_start", "step": s, "val_sft_loss": 3.0 / s, "exact_match": 0.1}
            for s in (100, 200, 300)]
    for run in ("sft", "spin"):
        for s in range(1, 9):
            out.append({"kind": "train", "run": run, "step": s, "sft_loss": 0.5, "loss": 0.69 - 0.01 * s,
                        "acc": s / 8, "margin_mean": 0.1 * s} if run == "spin" else
                       {"kind": "train", "run": run, "step": s, "sft_loss": 0.5 - 0.01 * s})
        for it, s in enumerate((0, 4, 8)):
            row = {"kind": "eval", "run": run, "iteration": it, "step": s, "exact_match": 0.1 + 0.05 * it + seed_shift,
                   "val_sft_loss": 0.9 - 0.1 * it}
            if run == "spin" and it:
                row["gen_equals_gold"] = 0.2 * it
            out.append(row)
    return out


def test_curves_draw_each_seed_and_the_mean_with_its_standard_error():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shifts = (0.0, 0.02, -0.05)
    fig = draw_curves([records(shift) for shift in shifts], ["sft_start", "sft", "spin"])
    try:
        panels = {ax.get_title(): ax for ax in fig.axes if ax.get_visible()}
        assert set(panels) == {"SFT start: loss"} | {panel[0] for panel in ARM_PANELS}
        # The 300 start steps are in their own panel; the arms' panels span the arms' 8 steps.
        assert panels["SFT start: loss"].get_xlim()[1] > 250
        for title in ("SPIN: training loss", "held-out exact match", "SFT validation loss"):
            assert panels[title].get_xlim()[1] < 20, title
        # Exact match: a thin line per seed and arm; per arm the mean over the seeds, ± the standard error.
        exact = panels["held-out exact match"]
        assert len([line for line in exact.lines if line.get_alpha() == 0.35]) == 2 * len(shifts)
        mean_line, _, (bars,) = exact.containers[-1]   # the errorbars of continued SFT, then SPIN
        assert list(mean_line.get_xdata()) == [0, 4, 8]
        for it, (y, (low, high)) in enumerate(zip(mean_line.get_ydata(), bars.get_segments())):
            mean, se = mean_and_se([0.1 + 0.05 * it + shift for shift in shifts])
            assert y == pytest.approx(mean) and (low[1], high[1]) == pytest.approx((mean - se, mean + se))
        # SPIN's per-step quantities show SPIN alone (continued SFT logs no acc or margin).
        assert len(panels["SPIN acc per step"].lines) == len(shifts)
    finally:
        plt.close(fig)


def test_demo_refuses_an_out_that_holds_a_training_run(tmp_path):
    tiny = tiny_setup(str(tmp_path / "setup"))
    out = str(tmp_path / "run")
    train_cli.main(train_args(*tiny, out, "--iterations", "1"))
    before = sorted(os.listdir(out))
    checkpoints = sorted(os.listdir(os.path.join(out, "checkpoints", "spin")))
    with pytest.raises(UsageError, match="already holds files that are not an earlier demo's"):
        demo.main(["--out", out])
    assert sorted(os.listdir(out)) == before
    assert sorted(os.listdir(os.path.join(out, "checkpoints", "spin"))) == checkpoints


def test_demo_out_may_hold_only_an_earlier_demo(tmp_path):
    out = tmp_path / "demo"
    demo.check_demo_out(str(out))   # absent
    out.mkdir()
    demo.check_demo_out(str(out))   # empty
    (out / "seed-0").mkdir()
    (out / "curves.png").write_bytes(b"png")
    with pytest.raises(UsageError, match="seed-0"):   # no marker: not known to be a demo
        demo.check_demo_out(str(out))
    (out / demo.MARKER).write_text("{}")
    demo.check_demo_out(str(out))
    (out / "metrics.jsonl").write_text("")
    with pytest.raises(UsageError, match=r"\(metrics.jsonl\)"):
        demo.check_demo_out(str(out))
    (out / "metrics.jsonl").unlink()
    demo.reset_demo_out(str(out), {"task": "x"})
    assert os.listdir(out) == [demo.MARKER] and json.loads((out / demo.MARKER).read_text()) == {"task": "x"}
    with pytest.raises(UsageError, match="is a file"):
        demo.check_demo_out(str(out / demo.MARKER))


def test_demo_out_may_hold_the_one_seed_demo_of_before(tmp_path):
    for name in ("base_model", "checkpoints", "final"):
        (tmp_path / name).mkdir()
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"kind": "eval", "run": "sft_warmup", "step": 0}) + "\n")
    demo.check_demo_out(str(tmp_path))
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"kind": "eval", "run": "spin", "step": 0}) + "\n")
    with pytest.raises(UsageError, match="not an earlier demo's"):
        demo.check_demo_out(str(tmp_path))


def test_demo_takes_no_training_options(tmp_path, capsys):
    with pytest.raises(SystemExit):
        demo.main(["--out", str(tmp_path / "d"), "--model", "m", "--iterations", "2"])
    assert "unrecognized arguments: --model m --iterations 2" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "d")


def test_demo_refuses_to_run_under_torchrun(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UsageError, match="run it without torchrun"):
        demo.main(["--out", str(tmp_path / "d")])
    assert not os.path.exists(tmp_path / "d")


def test_a_shrunken_demo_runs_end_to_end_in_parallel_seeds(tmp_path, monkeypatch, capsys):
    shrunken = dataclasses.replace(demo.DEMO, task=Task("arith", max_length=16, max_new_tokens=6, warmup_steps=20),
                                   protocol=Protocol(spin_prompts=64, iterations=2), seeds=2)
    monkeypatch.setattr(demo, "DEMO", shrunken)
    monkeypatch.setattr(demo.os, "cpu_count", lambda: 2)   # the seeds run in 2 worker processes
    out = str(tmp_path / "demo")
    spin_by_seed, sft_by_seed = demo.main(["--out", out])
    printed = capsys.readouterr().out
    assert len(spin_by_seed) == len(sft_by_seed) == 2
    assert [r["step"] for r in spin_by_seed[0]] == [r["step"] for r in sft_by_seed[1]] == [0, 2, 4]
    assert printed.count("Verdict:") == 1
    assert printed.index("seed 0: start after 20 SFT steps") < printed.index("seed 1: start after 20 SFT steps")
    assert "± " in printed and "gen = gold" in printed and "\r" not in printed
    assert sorted(os.listdir(out)) == ["curves.png", "demo.json", "seed-0", "seed-1"]
    marker = json.loads(open(os.path.join(out, "demo.json"), encoding="utf-8").read())
    assert marker["seeds"] == [0, 1] and marker["winner"] in ("spin", "sft", "neither")
    assert marker["spin_final"] == [rows[-1]["exact_match"] for rows in spin_by_seed]
    assert os.path.isfile(os.path.join(out, "seed-1", "final", "config.json"))
    demo.check_demo_out(out)   # a second demo may replace this one
