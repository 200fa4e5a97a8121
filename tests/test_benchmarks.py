"""The benchmark scripts run end to end in their tiny CPU mode and report what they must (the GPU
tables come from benchmarks/gpu_check.sh); their shared timing helper times what it says."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


def run_script(name, *args):
    result = subprocess.run([sys.executable, os.path.join(BENCHMARKS, name), *args], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.fixture(scope="module")
def timing():
    spec = importlib.util.spec_from_file_location("timing", os.path.join(BENCHMARKS, "timing.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_median_ms_times_only_fn_after_a_warm_up(timing, monkeypatch):
    clock = {"now": 0.0}
    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock["now"])
    calls = []

    def setup():
        clock["now"] += 100.0  # seconds that must not be counted

    def fn():
        calls.append(len(calls))
        clock["now"] += 10.0 if len(calls) == 1 else [0.001, 0.003, 0.002][len(calls) - 2]

    assert timing.median_ms(fn, torch.device("cpu"), reps=3, setup=setup) == pytest.approx(2.0)
    assert len(calls) == 4
    with pytest.raises(ValueError, match="reps"):
        timing.median_ms(fn, torch.device("cpu"), reps=0)
    with timing.PeakMemory(torch.device("cpu")) as peak:
        torch.ones(1000)
    assert peak.extra_bytes is None and peak.extra_gib is None


def test_bench_swap_tiny_run_reports_exact_reference_logprobs(tmp_path):
    run_script("bench_swap.py", "--tiny", "--out", str(tmp_path / "swap"))
    report = json.loads((tmp_path / "swap.json").read_text())
    impls = [row["impl"] for row in report["transfers"]["rows"]]
    assert any(impl.startswith("WeightBank.load_into") for impl in impls)
    assert all(row["ms"] > 0 for row in report["transfers"]["rows"])
    rows = report["reference_logprobs"]["rows"]
    assert set(rows) == {"resident reference model", "NeMo-Aligner style swap + forward", "swapped() + forward",
                         "streamed_reference_forward"}
    # Same weights, same kernels: swapping or streaming the reference changes no bit.
    assert all(row["max_abs_diff_vs_resident"] == 0 for row in rows.values())
    assert (tmp_path / "swap.md").read_text().startswith("# bench_swap on cpu")


def test_bench_loss_tiny_run_reports_gradient_errors(tmp_path):
    run_script("bench_loss.py", "--vocab", "101", "--seqs", "2", "--seq-len", "16", "--reps", "2",
               "--compile-vocab", "--out", str(tmp_path / "loss"))
    report = json.loads((tmp_path / "loss.json").read_text())
    (table,) = report["tables"]
    assert table["vocab"] == 101 and table["rows"] == 32
    rows = {row["impl"]: row for row in table["impls"]}
    assert {"spin_kernels", "spin_kernels inplace_backward"} <= set(rows)
    for row in rows.values():
        assert row["fwd_bwd_ms"] > 0 and row["no_grad_ms"] > 0
        # dlogits come back in bf16: each element is within 2^-8 (bf16's unit roundoff) of the exact
        # value, so the norm of the error is too.
        assert 0 < row["grad_rel_err"] <= 2**-8


def test_bench_head_tiny_run_reports_every_row(tmp_path):
    run_script("bench_head.py", "--tiny", "--out", str(tmp_path / "head"))
    report = json.loads((tmp_path / "head.json").read_text())
    (table,) = report["tables"]
    assert (table["hidden"], table["vocab"]) == (32, 512) and table["labelled"] == 4 * (32 - 9)
    rows = {row["impl"]: row for row in table["impls"]}
    assert len(rows) == 6
    ours, eager = rows["spin_kernels linear_spin_loss"], rows["eager: HF head + fp32 log_softmax"]
    for row in rows.values():  # a peer missing here (or unable to run on a CPU) says why
        if "error" in row:
            assert not row["impl"].startswith(("spin_kernels", "eager", "HF head")), row
            assert len(row["error"]) > 10, row
            continue
        assert row["fwd_bwd_ms"] > 0 and row["x_floor"] > 0
        assert 0 < row["d_hidden_rel_err"] < 0.05 and 0 < row["d_weight_rel_err"] < 0.05
    # Same loss, same bf16 logits: our gradients are as close to float64 as the eager head's.
    for key in ("d_hidden_rel_err", "d_weight_rel_err"):
        assert ours[key] <= 1.5 * eager[key], (key, ours[key], eager[key])
    assert (tmp_path / "head.md").read_text().startswith("# bench_head on cpu")


def test_bench_e2e_tiny_run_goes_through_the_trainer_with_the_flags_it_names(tmp_path):
    from spin_trainer.options import parse_config

    run_script("bench_e2e.py", "--tiny", "--steps", "1", "--gen-repeats", "0", "--out", str(tmp_path / "e2e"))
    report = json.loads((tmp_path / "e2e.json").read_text())
    train = report["train"]
    assert train["tokens_per_step"] == 2 * 2 * 64 and "fp32 weights, bf16 compute" in train["precision"]
    impls = [row["impl"] for row in train["rows"]]
    assert impls[0].startswith("baseline") and impls[1:-1] == ["ours"] * 4 and impls[-1].startswith("pure bf16")
    settings = []
    for row in train["rows"][1:]:
        # Each row's flags are what a user passes to spin-train to get that step (the benchmark runs
        # what the trainer's parser makes of them).
        config = parse_config(["--out", str(tmp_path / "x"), *row["flags"].split()])
        assert config.model.dtype == "bfloat16" and config.model.pure_low_precision == row["impl"].startswith("pure")
        assert config.model.head == "logits"   # the trainer's default on the CPU (fused on CUDA)
        assert row["s_per_step"] > 0 and row["tokens_per_s_with_precompute"] < row["tokens_per_s"]
        settings.append((config.train.optimizer_in_backward, config.train.max_grad_norm, config.parallel.recompute))
    assert settings == [(False, 1.0, "none"), (True, 0.0, "none"), (True, 0.0, "elementwise"),
                        (True, 0.0, "full"), (True, 0.0, "elementwise")]
    assert [row["impl"] for row in report["generate"]["rows"]] == ["HF generate(), dynamic cache", "generate_responses"]
    assert report["failed_parts"] == []
    assert "| ours | `--dtype bfloat16 --optimizer-in-backward" in (tmp_path / "e2e.md").read_text()


def test_bench_tokenize_measures_the_data_path():
    out = run_script("bench_tokenize.py", "--records", "40", "--max-length", "4096")
    assert "40 records (" in out and "records/s" in out and "read back from the cache" in out, out


def test_bench_bf16_noise_measures_the_step_against_each_precision():
    spec = importlib.util.spec_from_file_location("bench_bf16_noise", os.path.join(BENCHMARKS, "bench_bf16_noise.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    # A step at a large lr on a tiny shape: its change dwarfs fp32 rounding, and bf16 still blurs it.
    result = bench.main(["--hidden", "32", "--layers", "1", "--heads", "2", "--vocab", "64", "--pairs", "4",
                         "--seq-len", "16", "--lr", "1e-4"])
    fp32, bf16 = result["rows"]["float32"], result["rows"]["bfloat16"]
    assert fp32["correlation"] > 0.999 and fp32["error"] < 1e-3 * result["signal"]
    assert bf16["error"] > 10 * fp32["error"]
