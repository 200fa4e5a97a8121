"""benchmarks/bench_packing.py runs end to end in its tiny CPU mode and reports both layouts
(belongs beside the other scripts' smoke runs in test_benchmarks.py)."""
import json
import os
import subprocess
import sys

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


def test_bench_packing_tiny_run_counts_every_token_once(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(BENCHMARKS, "bench_packing.py"), "--tiny",
                             "--out", str(tmp_path / "packing")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "packing.json").read_text())
    for row in report["tokens"]["rows"]:
        assert row["packed_ratio"] == 1.0   # no padding, each prompt once: exactly P + A + G
        assert row["padded_ratio"] > 1.0
    steps = report["steps"]
    assert steps["packed"]["tokens"] < steps["padded"]["tokens"]
    assert steps["packed"]["ms"] > 0 and steps["padded"]["ms"] > 0
    assert (tmp_path / "packing.md").read_text().startswith("# bench_packing on cpu")
