"""Resume onto another world size: a run stopped by --max-steps at 2 processes (--tp 2) resumes at 1
process and at 4 (2 data-parallel ranks, FSDP-sharded by default, x --tp 2) and finishes where the
uninterrupted 1-process run does.

The stop (step 3) falls inside iteration 1, whose generations, reference log-probs and θ_t (the
swap mode's bank) come from the checkpoint; iteration 2 samples after the resume, at the new
world size (the sampling noise is keyed by each prompt's index, not by the rank that generates
it). Tolerance: the resumed runs add
gradients in another order (tensor-parallel matmul splits, data-parallel all-reduce), so metrics
and weights agree with the 1-process run to float32 rounding, checked at 1e-5 (relative + absolute).
"""
import json
import os
import shutil

import pytest
import torch
import torch.multiprocessing as mp

from trainer_cases import free_port, tiny_setup, train_args

from spin_trainer import cli as train_cli
from spin_trainer.metrics import TIMING_KEYS

EXTRA = ("--reference", "swap", "--mix-previous", "0.25", "--keep", "5")
STOP_AT = 3   # iteration 1 has 4 steps (32 prompts / 8), iteration 2 has 5 (32 + 8 mixed)
TOLERANCE = 1e-5


def _worker(rank, world_size, port, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    train_cli.main(args)


def run_processes(world_size, args):
    mp.spawn(_worker, args=(world_size, free_port(), args), nprocs=world_size, join=True)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_setup(str(tmp_path_factory.mktemp("reshard")))


@pytest.fixture(scope="module")
def uninterrupted(setup, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("reshard_full") / "run")
    train_cli.main(train_args(*setup, out, *EXTRA))
    return out


@pytest.fixture(scope="module")
def stopped_at_two(setup, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("reshard_stop") / "run")
    run_processes(2, train_args(*setup, out, *EXTRA, "--tp", "2", "--max-steps", str(STOP_AT)))
    return out


def records(out):
    with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def weights(out):
    from safetensors.torch import load_file

    return load_file(os.path.join(out, "final", "model.safetensors"))


def assert_close_runs(out, reference_out):
    got, want = records(out), records(reference_out)
    assert [(r["kind"], r["step"]) for r in got] == [(r["kind"], r["step"]) for r in want]
    for record, expected in zip(got, want):
        assert record.keys() == expected.keys()
        for key, value in expected.items():
            if key in TIMING_KEYS:
                continue
            if isinstance(value, float):
                assert abs(record[key] - value) <= TOLERANCE * (1 + abs(value)), (record["step"], key)
            else:
                assert record[key] == value, (record["step"], key)
    final, expected_final = weights(out), weights(reference_out)
    assert final.keys() == expected_final.keys()
    for name, tensor in expected_final.items():
        torch.testing.assert_close(final[name], tensor, rtol=TOLERANCE, atol=TOLERANCE, msg=name)


def test_max_steps_stops_with_a_checkpoint_and_no_export(stopped_at_two):
    from spin_trainer.checkpoint import list_checkpoints

    checkpoints = list_checkpoints(os.path.join(stopped_at_two, "checkpoints", "spin"))
    assert os.path.basename(checkpoints[-1]) == f"step-{STOP_AT:08d}"
    assert os.path.isdir(os.path.join(checkpoints[-1], "reference"))   # θ_t of the iteration in progress
    assert not os.path.exists(os.path.join(stopped_at_two, "final"))
    assert [r["step"] for r in records(stopped_at_two) if r["kind"] == "train"] == [1, 2, 3]


@pytest.mark.parametrize("world_size", [1, 4])
def test_resume_on_another_world_size_finishes_like_the_uninterrupted_run(
        setup, stopped_at_two, uninterrupted, tmp_path, world_size, capfd):
    out = str(tmp_path / "run")
    shutil.copytree(stopped_at_two, out)
    args = train_args(*setup, out, *EXTRA, "--resume")
    if world_size == 1:
        train_cli.main(args)
    else:
        run_processes(world_size, [*args, "--tp", "2"])
    printed = capfd.readouterr().out
    assert (f"step {STOP_AT}; written by 2 process(es) with --tp 2, resharded to {world_size} with "
            f"--tp {1 if world_size == 1 else 2}") in printed
    assert_close_runs(out, uninterrupted)
