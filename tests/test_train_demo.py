"""The demo's committed data is what its generator writes; the verdict says who won, honestly."""
import filecmp
import os
import subprocess
import sys

from trainer_cases import ARITH, ROOT

from spin_trainer.demo import verdict


def test_committed_task_data_is_the_generator_output(tmp_path):
    subprocess.run([sys.executable, os.path.join(ROOT, "data", "make_arith.py"), "--out", str(tmp_path)],
                   check=True, capture_output=True)
    for split in ("train", "val", "test"):
        assert filecmp.cmp(tmp_path / f"{split}.jsonl", os.path.join(ARITH, f"{split}.jsonl"), shallow=False), split
    problems = [set(open(tmp_path / f"{split}.jsonl", encoding="utf-8").read().splitlines())
                for split in ("train", "val", "test")]
    assert not (problems[0] & problems[1]) and not (problems[0] & problems[2]) and not (problems[1] & problems[2])


def rows(exact_match, loss=0.8):
    return [{"step": 0, "exact_match": 0.1, "val_sft_loss": 1.0},
            {"step": 96, "exact_match": exact_match, "val_sft_loss": loss}]


def test_verdict_names_the_winner_only_beyond_the_noise():
    clear = verdict(rows(0.60), rows(0.20), num_test=256)
    assert "SPIN did better" in clear and "0.600" in clear and "0.200" in clear
    assert "continued SFT did better" in verdict(rows(0.20), rows(0.60), num_test=256)
    close = verdict(rows(0.25), rows(0.26), num_test=256)
    assert "continued SFT ended higher on exact match, but by less than two standard errors" in close
    assert "SPIN has the lower SFT validation loss" in verdict(rows(0.3, loss=0.7), rows(0.3, loss=0.9), num_test=256)
    assert "Both have the same SFT validation loss" in close
    assert "continued SFT has the lower SFT validation loss" in verdict(rows(0.3, loss=0.9), rows(0.3, loss=0.7),
                                                                        num_test=256)
    assert "Neither did better" in verdict(rows(0.3), rows(0.3), num_test=256)
