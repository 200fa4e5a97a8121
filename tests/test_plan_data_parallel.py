"""`--plan`'s training step on a data-parallel rank against a measured one: two gloo processes, FSDP
over both (a shard group of 2, so in the backward FSDP prefetches the next decoder layer: two
layers gathered, the prefetched one as its all-gather output), SpinTrainer.train_step on each, its
bytes measured as in test_plan_training.py (the same step, the same phases) and compared with the
plan of that rank within 10%."""
import os

import pytest
import torch
import torch.multiprocessing as mp

from test_plan_training import CASES, assert_step_equals_plan, measured_step, planned_step
from trainer_cases import free_port

WORLD = 2
CASE = CASES["mixed_fsdp"]


def _worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as monkeypatch:
        config, got = measured_step(CASE, monkeypatch)   # sets up and tears down the process group
    torch.save((config, got), os.path.join(out_dir, f"rank{rank}.pt"))


def test_a_data_parallel_rank_equals_its_plan(tmp_path):
    # forked: the ranks need not import torch and the trainer again (2 s instead of 10-15 on 2 cores)
    mp.start_processes(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, start_method="fork")
    for rank in range(WORLD):
        config, got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        plan = planned_step(CASE, config, nproc=WORLD, rank=rank)
        assert plan.step_units.group == WORLD
        assert_step_equals_plan(CASE, got, plan)
