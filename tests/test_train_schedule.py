"""The learning-rate schedule (Hugging Face's, step for step; per iteration or over the run), the
epoch order and the batch-size arithmetic that the SPIN loop and the SFT runs share."""
import math

import pytest
import torch
from transformers import (get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup,
                          get_linear_schedule_with_warmup)

from spin_trainer.options import parse_config
from spin_trainer.errors import UsageError
from spin_trainer.optim import (StepScheduler, epoch_order, learning_rate_schedule, make_optimizer,
                                warmup_steps_for)
from spin_trainer.parallel.mesh import ParallelContext

HF_SCHEDULES = {"linear": get_linear_schedule_with_warmup, "cosine": get_cosine_schedule_with_warmup,
                "constant": lambda optimizer, warmup, steps: get_constant_schedule_with_warmup(optimizer, warmup)}
CTX = ParallelContext(0, 1, 1, 1, 0, 0, torch.device("cpu"))


def rates(schedule, total):
    return [schedule(step) for step in range(total)]


def hf_rates(shape, lr, steps, warmup):
    """The rate Hugging Face's scheduler gives each of `steps` optimizer steps (read before the step,
    as the Trainer's optimizer uses it; the scheduler steps after it)."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = HF_SCHEDULES[shape](optimizer, warmup, steps)
    used = []
    for _ in range(steps):
        used.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return used


@pytest.mark.parametrize("shape", ["linear", "cosine", "constant"])
@pytest.mark.parametrize("steps, warmup", [(16, 2), (10, 0), (7, 3), (5, 5), (3, 4), (1, 0)])
def test_each_step_matches_transformers_schedules(shape, steps, warmup):
    ours = rates(learning_rate_schedule([5e-7], [steps], shape=shape, warmup_steps=warmup), steps)
    assert ours == pytest.approx(hf_rates(shape, 5e-7, steps, warmup), rel=1e-12, abs=0)


@pytest.mark.parametrize("steps", [16, 30, 95])
def test_warmup_ratio_rounds_as_the_hugging_face_trainer(steps):
    # The Trainer's warm-up steps for a ratio: ceil(steps · ratio), in floating point as there.
    warmup = math.ceil(steps * 0.1)
    ours = rates(learning_rate_schedule([5e-7], [steps], shape="linear", warmup_ratio=0.1), steps)
    assert ours == pytest.approx(hf_rates("linear", 5e-7, steps, warmup), rel=1e-12, abs=0)


def test_the_trainers_scheduler_sets_the_rate_the_optimizer_steps_with():
    # make_optimizer's groups (weights with decay, biases without) all step with HF's rate of that step.
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.LayerNorm(3))
    steps, warmup = 9, 2
    lr_at = learning_rate_schedule([1e-3], [steps], shape="cosine", warmup_steps=warmup)
    optimizer = make_optimizer(model, ctx=CTX, lr=lr_at(0), name="rmsprop", weight_decay=0.1)
    scheduler = StepScheduler(optimizer, lr_at)
    used = []
    original_step = optimizer.step

    def step(*args, **kwargs):
        used.append({group["lr"] for group in optimizer.param_groups})
        return original_step(*args, **kwargs)

    optimizer.step = step
    for _ in range(steps):
        model(torch.randn(2, 3)).square().sum().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    assert len(optimizer.param_groups) == 2
    assert [rate for (rate,) in used] == pytest.approx(hf_rates("cosine", 1e-3, steps, warmup), rel=1e-12, abs=0)


def test_the_schedule_restarts_every_iteration_or_spans_the_run():
    # Two iterations of 20 and 10 steps, peak rates 5e-7 and 1e-7, 10 % warm-up.
    per_iteration = rates(learning_rate_schedule([5e-7, 1e-7], [20, 10], shape="linear", warmup_ratio=0.1), 30)
    assert per_iteration[:20] == pytest.approx(hf_rates("linear", 5e-7, 20, 2), rel=1e-12, abs=0)
    assert per_iteration[20:] == pytest.approx(hf_rates("linear", 1e-7, 10, 1), rel=1e-12, abs=0)
    assert per_iteration[:3] == pytest.approx([0.0, 2.5e-7, 5e-7]) and per_iteration[20] == 0.0
    # Over the run: one warm-up (ceil(0.1 · 30) = 3 steps) and one decay; each iteration's peak scales it.
    whole = hf_rates("linear", 1.0, 30, 3)
    run = rates(learning_rate_schedule([5e-7, 1e-7], [20, 10], shape="linear", warmup_ratio=0.1, span="run"), 30)
    assert run == pytest.approx([5e-7 * f for f in whole[:20]] + [1e-7 * f for f in whole[20:]], rel=1e-12, abs=0)
    with pytest.raises(SystemExit):   # the command line offers the spans and shapes there are
        parse_config(["--schedule-span", "epoch"])
    with pytest.raises(SystemExit):
        parse_config(["--lr-schedule", "exponential"])


def test_warmup_steps_override_the_ratio_as_in_hugging_face():
    assert warmup_steps_for(100, warmup_ratio=0.1) == 10
    assert warmup_steps_for(95, warmup_ratio=0.1) == 10    # ceil
    assert warmup_steps_for(100, warmup_ratio=0.1, warmup_steps=3) == 3
    assert warmup_steps_for(100) == 0


def test_epoch_order_is_a_reproducible_permutation():
    order = epoch_order(10, seed=3, iteration=1, epoch=2)
    assert sorted(order) == list(range(10)) and order == epoch_order(10, seed=3, iteration=1, epoch=2)
    assert order != epoch_order(10, seed=3, iteration=1, epoch=3)


@pytest.mark.parametrize("sizes, message", [
    ((6, 4, 1, 32), "--global-batch-size 6 must be a multiple of --micro-batch-size 4 x data-parallel size 1"),
    ((8, 2, 8, 32), "must be a multiple of --micro-batch-size 2 x data-parallel size 8"),
    ((64, 8, 1, 32), "--global-batch-size 64 is larger than the 32 training prompts"),
    ((8, 0, 1, 32), "--micro-batch-size must be >= 1"),
])
def test_batch_sizes(sizes, message):
    def check(global_batch, micro, dp_size, prompts):
        config = parse_config(["--global-batch-size", str(global_batch), "--micro-batch-size", str(micro)])
        config.check_layout(dp_size, True, prompts)

    with pytest.raises(UsageError) as info:
        check(*sizes)
    assert message in str(info.value)
    check(16, 2, 4, 32)
